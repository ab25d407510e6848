//! confab's HTTP API: authentication, chats and signals over the [`store::Store`], events onto the
//! [`confab_runtime::bus::Bus`].

pub mod store;
