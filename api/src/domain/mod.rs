//! The API's operations, between the edges (HTTP handlers, and later WebSocket request frames) and
//! the store. Each operation takes the caller and typed inputs ([`inputs`], parsed once at the
//! edge), checks who may do it ([`access`] for membership, [`rules`] for everything else), does it,
//! publishes its event, and returns a domain value or an [`ApiError`](crate::error::ApiError). The
//! edges only extract, call and map.

pub mod access;
pub mod attachments;
pub mod calls;
pub mod chats;
pub mod circles;
pub mod devices;
pub mod events;
pub mod inputs;
pub mod markers;
pub mod members;
pub mod paging;
pub mod pairing;
pub mod presence;
pub mod pushes;
pub mod queues;
pub mod reactions;
pub mod rules;
pub mod search;
pub mod sessions;
pub mod settings;
pub mod signals;
pub mod typing;
pub mod users;

pub use paging::Page;

/// The outcome of an idempotent creation: made now, or there already (HTTP 201 or 200).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome<T> {
    Created(T),
    Existing(T),
}
