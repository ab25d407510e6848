//! The signal store: users, chats, members and chat history. [`Store`] is the seam; [`cql::CqlStore`]
//! (ScyllaDB in production, Cassandra in CI) and [`embedded::EmbeddedStore`] (SQLite) implement it,
//! and [`conformance::test_suite`] holds both to the same behaviour.
//!
//! Invariant: only the API writes to the store, and it checks every input before calling it.

pub mod conformance;
pub mod cql;
pub mod embedded;

use std::sync::Arc;

use async_trait::async_trait;
use confab_runtime::telemetry::ReadinessCheck;
use confab_schema::{Chat, ChatId, ChatKind, Member, MemberRole, Signal, SignalId, User, UserId};
use futures::future::BoxFuture;
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or did not answer in time.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be read back (written by a newer version, or damaged).
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
}

/// A chat to create, with its first members (the creator among them).
#[derive(Clone, Debug)]
pub struct NewChat {
    pub id: ChatId,
    pub kind: ChatKind,
    pub name: Option<String>,
    pub description: Option<String>,
    pub created_at: OffsetDateTime,
    pub created_by: UserId,
    pub members: Vec<(UserId, MemberRole)>,
}

/// The outcome of [`Store::insert_signal`].
#[derive(Clone, Debug, PartialEq)]
pub enum Inserted {
    /// Stored now.
    Created(Signal),
    /// The author already sent a signal with this nonce to this chat; that one, unchanged.
    Existing(Signal),
}

impl Inserted {
    pub fn signal(&self) -> &Signal {
        match self {
            Inserted::Created(signal) | Inserted::Existing(signal) => signal,
        }
    }
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the store answers now.
    async fn check(&self) -> Result<(), StoreError>;

    /// Creates or refreshes a user's profile.
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError>;
    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError>;

    /// Creates a chat and its members. The chat becomes visible only once its members are stored.
    async fn create_chat(&self, chat: &NewChat) -> Result<(), StoreError>;
    /// A chat as stored (`my_role`, `latest_signal` and `unread_count` left empty).
    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError>;
    async fn member_role(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<MemberRole>, StoreError>;
    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError>;

    /// Stores `signal` unless its author already stored one with the same nonce in the same chat, in
    /// which case that one is returned. Holds when two requests race.
    async fn insert_signal(&self, signal: &Signal) -> Result<Inserted, StoreError>;
    /// Up to `limit` signals of `chat` older than `before` (or the newest), newest first.
    async fn signals_before(
        &self,
        chat: ChatId,
        before: Option<SignalId>,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError>;
}

/// Readiness of a [`Store`].
pub struct StoreReadiness(pub Arc<dyn Store>);

impl ReadinessCheck for StoreReadiness {
    fn name(&self) -> &'static str {
        "store"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

/// Time as whole milliseconds since the epoch, the precision both stores keep.
pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

pub(crate) fn created_at(id: SignalId) -> Result<OffsetDateTime, StoreError> {
    id.created_at()
        .ok_or_else(|| StoreError::Corrupt(format!("signal id {id} is not time-ordered")))
}

pub(crate) fn parse<T: std::str::FromStr>(value: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e: T::Err| StoreError::Corrupt(e.to_string()))
}
