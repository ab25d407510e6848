//! The embedded event log: a table in a SQLite file of its own, with an in-process broadcast for
//! live subscribers. A subscriber that falls behind the broadcast reads what it missed from the
//! table, so it sees every event in order, like a JetStream ordered consumer.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use confab_schema::{Envelope, LoggedEvent};
use futures::StreamExt;
use futures::stream::BoxStream;
use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use super::{Bus, BusError, ChatFilter, LogSettings, Page, ReadError, check_position};

/// How many events a live subscriber may fall behind before it reads from the table instead.
const BROADCAST_CAPACITY: usize = 4096;
/// Events expired by retention are deleted at most this often (milliseconds).
const PRUNE_EVERY_MS: i64 = 60_000;

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("embedded event log: {error}"))
}

struct Log {
    connection: Connection,
    last_prune_ms: i64,
}

struct Shared {
    log: Mutex<Log>,
    sender: broadcast::Sender<Arc<LoggedEvent>>,
    ephemeral: broadcast::Sender<Arc<Envelope>>,
    settings: LogSettings,
}

/// The event log of `confab serve`.
#[derive(Clone)]
pub struct EmbeddedBus {
    shared: Arc<Shared>,
}

fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl EmbeddedBus {
    /// Opens (creating if needed) the log at `path`.
    pub fn open(path: &Path, settings: LogSettings) -> Result<EmbeddedBus, BusError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(unavailable)?;
        }
        let connection = Connection::open(path).map_err(unavailable)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA busy_timeout = 5000;",
            )
            .map_err(unavailable)?;
        Self::with_connection(connection, settings)
    }

    /// A log kept in memory only: for tests of code that needs a bus, not of the log itself.
    pub fn in_memory(settings: LogSettings) -> Result<EmbeddedBus, BusError> {
        Self::with_connection(Connection::open_in_memory().map_err(unavailable)?, settings)
    }

    fn with_connection(
        connection: Connection,
        settings: LogSettings,
    ) -> Result<EmbeddedBus, BusError> {
        connection
            .execute_batch(
                "CREATE TABLE IF NOT EXISTS events (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     id BLOB NOT NULL,
                     chat_id TEXT NOT NULL,
                     at_ms INTEGER NOT NULL,
                     body BLOB NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS events_by_id ON events (id);
                 CREATE INDEX IF NOT EXISTS events_by_time ON events (at_ms);",
            )
            .map_err(unavailable)?;
        let (sender, _) = broadcast::channel(BROADCAST_CAPACITY);
        let (ephemeral, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(EmbeddedBus {
            shared: Arc::new(Shared {
                log: Mutex::new(Log {
                    connection,
                    last_prune_ms: 0,
                }),
                sender,
                ephemeral,
                settings,
            }),
        })
    }

    async fn with_log<T: Send + 'static, E: From<BusError> + Send + 'static>(
        &self,
        work: impl FnOnce(&mut Log, &Shared) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let mut log = shared
                .log
                .lock()
                .map_err(|_| unavailable("poisoned by a panic"))?;
            work(&mut log, &shared)
        })
        .await
        .map_err(|e| E::from(unavailable(e)))?
    }
}

impl Log {
    /// The newest sequence ever issued (deleted or not), 0 before the first event.
    fn last_seq(&self) -> Result<u64, BusError> {
        let last: Option<i64> = self
            .connection
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'events'",
                [],
                |row| row.get(0),
            )
            .optional()
            .map_err(unavailable)?;
        Ok(last.map_or(0, |seq| u64::try_from(seq).unwrap_or(0)))
    }

    /// The oldest sequence still within retention (`last + 1` when none is), whether or not the
    /// expired ones were deleted yet.
    fn first_seq(&self, last: u64, retention: std::time::Duration) -> Result<u64, BusError> {
        let first: Option<i64> = self
            .connection
            .query_row(
                "SELECT MIN(seq) FROM events WHERE at_ms >= ?1",
                params![now_ms() - millis(retention)],
                |row| row.get(0),
            )
            .map_err(unavailable)?;
        Ok(first.map_or(last + 1, |seq| u64::try_from(seq).unwrap_or(0)))
    }

    /// [`Bus::read_page`] on the log, past its bounds check.
    fn read_page(
        &self,
        after: u64,
        up_to: u64,
        mut admit: impl FnMut(&LoggedEvent) -> bool,
        max: usize,
        max_scan: usize,
    ) -> Result<Page, ReadError> {
        let mut statement = self
            .connection
            .prepare_cached(
                "SELECT seq, body FROM events WHERE seq > ?1 AND seq <= ?2 ORDER BY seq",
            )
            .map_err(unavailable)?;
        let mut rows = statement
            .query(params![
                i64::try_from(after).unwrap_or(i64::MAX),
                i64::try_from(up_to).unwrap_or(i64::MAX)
            ])
            .map_err(unavailable)?;
        let mut page = Page {
            events: Vec::new(),
            through: up_to,
            scanned: 0,
        };
        while page.events.len() < max.max(1) && page.scanned < max_scan.max(1) {
            let Some(row) = rows.next().map_err(unavailable)? else {
                return Ok(page);
            };
            page.scanned += 1;
            let seq: i64 = row.get(0).map_err(unavailable)?;
            let body: Vec<u8> = row.get(1).map_err(unavailable)?;
            let envelope: Envelope = serde_json::from_slice(&body).map_err(BusError::Encode)?;
            let event = LoggedEvent {
                seq: u64::try_from(seq).unwrap_or(0),
                envelope,
            };
            let seq = event.seq;
            if admit(&event) {
                page.events.push(event);
            }
            page.through = seq;
        }
        // Stopped at a bound: the range may go on, unless the last one looked at ended it.
        Ok(page)
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, envelope: &Envelope) -> Result<u64, BusError> {
        let body = serde_json::to_vec(envelope)?;
        let envelope = envelope.clone();
        self.with_log(move |log, shared| {
            let now = now_ms();
            let id = envelope.id.as_bytes().to_vec();
            let earlier: Option<i64> = log
                .connection
                .prepare_cached("SELECT seq FROM events WHERE id = ?1 AND at_ms >= ?2")
                .and_then(|mut statement| {
                    statement
                        .query_row(
                            params![id, now - millis(shared.settings.duplicate_window)],
                            |row| row.get(0),
                        )
                        .optional()
                })
                .map_err(unavailable)?;
            if let Some(seq) = earlier {
                return Ok(u64::try_from(seq).unwrap_or(0));
            }
            log.connection
                .prepare_cached(
                    "INSERT INTO events (id, chat_id, at_ms, body) VALUES (?1, ?2, ?3, ?4)",
                )
                .and_then(|mut statement| {
                    statement.execute(params![id, envelope.chat_id.to_string(), now, body])
                })
                .map_err(unavailable)?;
            let seq = u64::try_from(log.connection.last_insert_rowid()).unwrap_or(0);
            // Sent while the log is locked, so live subscribers see sequence order.
            let _ = shared.sender.send(Arc::new(LoggedEvent { seq, envelope }));
            if now - log.last_prune_ms > PRUNE_EVERY_MS.min(millis(shared.settings.retention)) {
                log.last_prune_ms = now;
                log.connection
                    .execute(
                        "DELETE FROM events WHERE at_ms < ?1",
                        params![now - millis(shared.settings.retention)],
                    )
                    .map_err(unavailable)?;
            }
            Ok(seq)
        })
        .await
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, LoggedEvent>, BusError> {
        // Subscribing while the log is locked: no event falls between `last` and the receiver.
        let (receiver, last) = self
            .with_log(|log, shared| Ok::<_, BusError>((shared.sender.subscribe(), log.last_seq()?)))
            .await?;
        struct Live {
            bus: EmbeddedBus,
            receiver: broadcast::Receiver<Arc<LoggedEvent>>,
            last: u64,
            backlog: VecDeque<LoggedEvent>,
        }
        let live = Live {
            bus: self.clone(),
            receiver,
            last,
            backlog: VecDeque::new(),
        };
        Ok(futures::stream::unfold(live, |mut live| async move {
            loop {
                if let Some(event) = live.backlog.pop_front() {
                    live.last = event.seq;
                    return Some((event, live));
                }
                match live.receiver.recv().await {
                    Ok(event) if event.seq <= live.last => continue,
                    Ok(event) if event.seq == live.last + 1 => {
                        live.last = event.seq;
                        return Some((LoggedEvent::clone(&event), live));
                    }
                    // A gap: the broadcast dropped events for this subscriber. Read them back.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        metrics::counter!("confab_bus_lagged_reads_total").increment(1);
                        let after = live.last;
                        let missed = live
                            .bus
                            .with_log(move |log, _| {
                                let last = log.last_seq()?;
                                log.read_page(after, last, |_| true, usize::MAX, usize::MAX)
                                    .map(|page| page.events)
                            })
                            .await;
                        match missed {
                            Ok(missed) => live.backlog.extend(missed),
                            Err(error) => {
                                tracing::error!(%error, "event subscription failed");
                                return None;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed())
    }

    async fn last_seq(&self) -> Result<u64, BusError> {
        self.with_log(|log, _| log.last_seq()).await
    }

    async fn read_page(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        max: usize,
        max_scan: usize,
    ) -> Result<Page, ReadError> {
        let only = match chats {
            ChatFilter::All => None,
            ChatFilter::Only(chats) => Some(chats.clone()),
        };
        self.with_log(move |log, shared| {
            let last = log.last_seq()?;
            check_position(after, log.first_seq(last, shared.settings.retention)?, last)?;
            let up_to = up_to.min(last);
            if after >= up_to {
                return Ok(Page {
                    through: up_to.max(after),
                    ..Page::default()
                });
            }
            log.read_page(
                after,
                up_to,
                |event| {
                    only.as_ref()
                        .is_none_or(|chats| chats.contains(&event.envelope.chat_id))
                },
                max,
                max_scan,
            )
        })
        .await
    }

    async fn appended_at(&self, seq: u64) -> Result<Option<OffsetDateTime>, BusError> {
        let Ok(seq) = i64::try_from(seq) else {
            return Ok(None);
        };
        self.with_log(move |log, _| {
            let at_ms: Option<i64> = log
                .connection
                .prepare_cached("SELECT at_ms FROM events WHERE seq = ?1")
                .and_then(|mut statement| {
                    statement
                        .query_row(params![seq], |row| row.get(0))
                        .optional()
                })
                .map_err(unavailable)?;
            Ok(at_ms.and_then(|ms| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
            }))
        })
        .await
    }

    async fn publish_ephemeral(&self, envelope: &Envelope) -> Result<(), BusError> {
        // No subscriber is not an error: nobody is connected.
        let _ = self.shared.ephemeral.send(Arc::new(envelope.clone()));
        Ok(())
    }

    async fn subscribe_ephemeral(&self) -> Result<BoxStream<'static, Envelope>, BusError> {
        Ok(
            tokio_stream::wrappers::BroadcastStream::new(self.shared.ephemeral.subscribe())
                .filter_map(|item| async move { item.ok().map(|e| Envelope::clone(&e)) })
                .boxed(),
        )
    }

    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }
}
