//! confab's notifier: consumes events from the bus and delivers each to its recipients' open
//! connections. [`hub::Hub`] routes envelopes to connections; [`sse`] serves `GET /v1/events`
//! (Server-Sent Events) and `POST /v1/events/ticket`. The ws-plexer reuses the hub for WebSockets.

pub mod asyncapi;
pub mod auth;
pub mod hub;
pub mod push;
pub mod push_apns;
pub mod push_fcm;
pub mod sse;

pub use hub::{Hub, HubReadiness, Membership};
pub use sse::{NotifierState, openapi, routes};
