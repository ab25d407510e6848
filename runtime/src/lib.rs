//! The seams every confab process shares: typed configuration, telemetry (tracing, metrics, health
//! and readiness), identity (OIDC and dev tokens), the event bus (NATS and in-process), signed
//! tokens (SSE tickets, cursors), `application/problem+json` responses and graceful shutdown.
//!
//! Each external system sits behind a small trait here ([`identity::Identity`], [`bus::Bus`],
//! [`search::Search`]) with a
//! production implementation and an embedded one.

pub mod addresses;
pub mod blobs;
pub mod bus;
pub mod config;
pub mod identity;
pub mod kv_bucket;
pub mod limits;
pub mod presence;
pub mod problem;
pub mod push_auth;
pub mod push_queue;
pub mod revocation;
pub mod search;
pub mod sessions;
pub mod shutdown;
pub mod signed;
pub mod telemetry;
pub mod vapid;
pub mod webpush;

pub use config::Config;
pub use problem::Problem;
