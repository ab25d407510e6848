//! confab's HTTP API: authentication, chats and signals over the [`store::Store`], events onto the
//! [`confab_runtime::bus::Bus`].
//!
//! Invariant: the API is the only writer to the store, and nothing unchecked reaches it.

pub mod coalesce;
pub mod error;
pub mod http;
pub mod store;

pub use http::{ApiState, Page, openapi, openapi_base, routes};
