//! The event log. The API publishes one [`Envelope`] per change on its chat's subject; the log
//! gives each event a sequence number, keeps it for the retention period, and hands every new event
//! to each live subscriber (one per notifier node) in sequence order. A client resumes from the
//! sequence of the last event it saw: [`Bus::read`] replays the log after it.
//!
//! [`NatsBus`] is the production log (a JetStream stream); [`EmbeddedBus`] keeps the log in a SQLite
//! file of its own, for `confab serve`. Both pass [`conformance::test_suite`].

mod embedded;
mod nats;

pub mod conformance;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_schema::{ChatId, Envelope, LoggedEvent};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use time::OffsetDateTime;

pub use embedded::EmbeddedBus;
pub use nats::NatsBus;

use crate::telemetry::ReadinessCheck;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    #[error("event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Why [`Bus::read`] cannot replay from a position.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Events after the position were dropped by retention.
    #[error("events after {0} are no longer kept")]
    Expired(u64),
    /// The log never issued the position.
    #[error("no event {0} was ever published")]
    Unknown(u64),
    /// More than the limit of matching events: the client is better served by re-reading history.
    #[error("more than {0} events to replay")]
    TooMany(usize),
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// How many events a read may look at per event it may return.
pub const SCAN_FACTOR: usize = 20;

/// The longest a log may keep events (`bus.retention_secs`): what a resume reads besides the log,
/// the chats a user left (`Store::left_chats_of`), is kept a little longer than this.
pub const MAX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long the log keeps events, and how long it recognises a re-published event id.
#[derive(Clone, Copy, Debug)]
pub struct LogSettings {
    pub retention: Duration,
    pub duplicate_window: Duration,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            retention: Duration::from_secs(24 * 3600),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// A part of a range of the log, read by [`Bus::read_page`].
#[derive(Debug, Default)]
pub struct Page {
    /// The events found, in order.
    pub events: Vec<LoggedEvent>,
    /// The last sequence the page covers: the next page reads after it. The end of the range
    /// (`up_to`, or the log's last sequence if lower) once the whole range is read.
    pub through: u64,
    /// How many events it looked at, of every chat.
    pub scanned: usize,
}

/// Which chats' events a read returns.
#[derive(Clone, Copy, Debug)]
pub enum ChatFilter<'a> {
    All,
    Only(&'a HashSet<ChatId>),
}

impl ChatFilter<'_> {
    pub fn admits(&self, chat: ChatId) -> bool {
        match self {
            ChatFilter::All => true,
            ChatFilter::Only(chats) => chats.contains(&chat),
        }
    }
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Appends `envelope` to the log and returns its sequence. An envelope whose id the log stored
    /// within the duplicate window is not stored again: the first one's sequence is returned.
    async fn publish(&self, envelope: &Envelope) -> Result<u64, BusError>;
    /// Every event appended from now on, in sequence order with no gap. The subscription is active
    /// when this returns; the stream ends only if the subscription cannot continue.
    async fn subscribe(&self) -> Result<BoxStream<'static, LoggedEvent>, BusError>;
    /// The sequence of the newest event (0 when none was ever published).
    async fn last_seq(&self) -> Result<u64, BusError>;
    /// The events with `after < seq <= up_to` of the chats `chats` admits, in order. At most `limit`
    /// of them, else [`ReadError::TooMany`]; and a read that would look at more than
    /// [`SCAN_FACTOR`] × `limit` events of other chats to find them stops with it too, so an old
    /// id costs the server a bounded amount of work.
    async fn read(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, ReadError> {
        // One page a step past both bounds: reaching either means the range holds more.
        let max_scan = limit.saturating_mul(SCAN_FACTOR);
        let page = self
            .read_page(
                after,
                up_to,
                chats,
                limit.saturating_add(1),
                max_scan.saturating_add(1),
            )
            .await?;
        if page.events.len() > limit || page.scanned > max_scan {
            return Err(ReadError::TooMany(limit));
        }
        Ok(page.events)
    }
    /// The first events with `after < seq <= up_to` of the chats `chats` admits, in order: at most
    /// `max` of them, looking at at most `max_scan` events. For a range too long to hold whole:
    /// the caller reads it a page at a time, each after the previous one's [`Page::through`].
    /// Refuses a position as [`Bus::read`] does, but never with [`ReadError::TooMany`].
    async fn read_page(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        max: usize,
        max_scan: usize,
    ) -> Result<Page, ReadError>;
    /// When the log appended the event at `seq`, by the log's own clock: `None` when it holds no
    /// such event (never published, or no longer kept). Unlike the time in an envelope, which
    /// its publisher stamped when it made it, this tells an event published again late (a retry
    /// or an outbox sweep past the duplicate window) from the first publish of it.
    async fn appended_at(&self, seq: u64) -> Result<Option<OffsetDateTime>, BusError>;
    /// Hands `envelope` to the live subscribers of [`Bus::subscribe_ephemeral`] now, without
    /// logging it: for events that mean nothing later (typing). It has no sequence and is never
    /// replayed; a subscriber that is not keeping up may miss it.
    async fn publish_ephemeral(&self, envelope: &Envelope) -> Result<(), BusError>;
    /// Every ephemeral event published from now on.
    async fn subscribe_ephemeral(&self) -> Result<BoxStream<'static, Envelope>, BusError>;
    /// Whether publishing works now.
    async fn check(&self) -> Result<(), BusError>;
}

/// Readiness of a [`Bus`].
pub struct BusReadiness(pub Arc<dyn Bus>);

impl ReadinessCheck for BusReadiness {
    fn name(&self) -> &'static str {
        "bus"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

/// Checks `after` against the log's bounds: `first` is the oldest kept sequence (`last + 1` when
/// nothing is kept).
fn check_position(after: u64, first: u64, last: u64) -> Result<(), ReadError> {
    if after > last {
        return Err(ReadError::Unknown(after));
    }
    if after + 1 < first {
        return Err(ReadError::Expired(after));
    }
    Ok(())
}
