//! confab's HTTP API: authentication, chats and signals over the [`store::Store`], events onto the
//! [`confab_runtime::bus::Bus`]. [`domain`] holds the operations; [`http`] is one edge that calls
//! them.
//!
//! Invariant: the API is the only writer to the store, and nothing unchecked reaches it.

mod backoff;
pub mod coalesce;
pub mod domain;
pub mod error;
pub mod http;
pub mod images;
pub mod indexer;
pub mod limits;
pub mod outbox;
pub mod state;
pub mod store;

pub use domain::Page;
pub use http::{openapi, openapi_base, routes};
pub use state::ApiState;
