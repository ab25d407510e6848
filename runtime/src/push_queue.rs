//! Pushes waiting for their delay: one entry per (user, chat), due when the first unfetched message
//! of that chat's burst has waited the delay, collapsing later messages into it. Cancelling is
//! deleting that entry when what the user fetched or read covers it; sending is claiming a due entry
//! with compare-and-delete, so of several notifier nodes exactly one sends it.
//!
//! [`NatsPushQueue`] keeps the entries in a JetStream key-value bucket (`<prefix>_push`), so they
//! survive a restart of any node and of NATS; [`EmbeddedPushQueue`] in a SQLite file of its own.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv;
use async_trait::async_trait;
use confab_schema::{ChatId, SignalId, UserId};
use futures::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::bus::BusError;
use crate::kv_bucket::KvBucket;

/// A push waiting for its due time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPush {
    pub user: UserId,
    pub chat: ChatId,
    /// The newest message it announces.
    pub newest: SignalId,
    /// Who sent the newest one.
    pub author: UserId,
    /// Messages it announces (collapsed).
    pub count: u32,
    /// When it is due (Unix ms).
    pub due_ms: i64,
    /// When it must no longer be sent (Unix ms).
    pub expires_ms: i64,
}

impl PendingPush {
    /// `pending` with one more message, `signal`, joined in: it keeps its due time and announces
    /// the newest message. A new push when nothing was pending.
    #[allow(clippy::too_many_arguments)]
    fn joined(
        pending: Option<PendingPush>,
        user: UserId,
        chat: ChatId,
        signal: SignalId,
        author: UserId,
        due_ms: i64,
        expires_ms: i64,
    ) -> PendingPush {
        match pending {
            Some(mut push) => {
                if signal > push.newest {
                    push.newest = signal;
                    push.author = author;
                }
                push.count = push.count.saturating_add(1);
                push.expires_ms = push.expires_ms.max(expires_ms);
                push
            }
            None => PendingPush {
                user,
                chat,
                newest: signal,
                author,
                count: 1,
                due_ms,
                expires_ms,
            },
        }
    }
}

#[async_trait]
pub trait PushQueue: Send + Sync + 'static {
    /// Schedules a push for `user` about `signal` in `chat`, due at `due_ms` unless one is pending
    /// for that chat already (then it announces one more message, and stays due when it was).
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        signal: SignalId,
        author: UserId,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError>;
    /// Cancels `user`'s pending push of `chat` if it announces nothing newer than `up_to`.
    async fn cancel(&self, user: UserId, chat: ChatId, up_to: SignalId) -> Result<(), BusError>;
    /// Claims up to `limit` pushes due at `now_ms`: each is handed to one caller only.
    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingPush>, BusError>;
}

fn key(user: UserId, chat: ChatId) -> String {
    format!("{user}.{chat}")
}

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("push queue: {error}"))
}

/// The push queue in a JetStream key-value bucket.
pub struct NatsPushQueue {
    bucket: KvBucket,
}

impl NatsPushQueue {
    pub async fn connect(url: &str, prefix: &str) -> Result<NatsPushQueue, BusError> {
        let bucket = KvBucket::connect(
            url,
            "confab-push",
            kv::Config {
                bucket: format!("{}_push", prefix.replace(['.', '-'], "_")),
                description: "confab pending pushes: one per (user, chat)".into(),
                history: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(unavailable)?;
        Ok(NatsPushQueue { bucket })
    }

    /// Deletes the bucket (tests clean up with this).
    pub async fn delete_bucket(&self) -> Result<(), BusError> {
        self.bucket.delete().await.map_err(unavailable)
    }

    async fn kv(&self) -> Result<&kv::Store, BusError> {
        self.bucket.store().await.map_err(unavailable)
    }

    async fn pending(
        &self,
        kv: &kv::Store,
        key: &str,
    ) -> Result<Option<(PendingPush, u64)>, BusError> {
        let Some(entry) = kv.entry(key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&entry.value)
            .ok()
            .map(|push| (push, entry.revision)))
    }
}

#[async_trait]
impl PushQueue for NatsPushQueue {
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        signal: SignalId,
        author: UserId,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError> {
        let kv = self.kv().await?;
        let key = key(user, chat);
        for _ in 0..16 {
            let (pending, revision) = match self.pending(kv, &key).await? {
                Some((push, revision)) => (Some(push), Some(revision)),
                None => (None, None),
            };
            let push = PendingPush::joined(pending, user, chat, signal, author, due_ms, expires_ms);
            let value: bytes::Bytes = serde_json::to_vec(&push)?.into();
            let written = match revision {
                Some(revision) => kv.update(&key, value, revision).await.is_ok(),
                None => kv.create(&key, value).await.is_ok(),
            };
            if written {
                return Ok(());
            }
        }
        Err(unavailable("too many concurrent updates"))
    }

    async fn cancel(&self, user: UserId, chat: ChatId, up_to: SignalId) -> Result<(), BusError> {
        let kv = self.kv().await?;
        let key = key(user, chat);
        for _ in 0..16 {
            let Some((push, revision)) = self.pending(kv, &key).await? else {
                return Ok(());
            };
            if push.newest > up_to {
                return Ok(());
            }
            match kv.delete_expect_revision(&key, Some(revision)).await {
                Ok(()) => return Ok(()),
                // Changed meanwhile: look again.
                Err(_) => continue,
            }
        }
        Err(unavailable("too many concurrent updates"))
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingPush>, BusError> {
        let kv = self.kv().await?;
        let mut keys = kv.keys().await.map_err(unavailable)?;
        let mut claimed = Vec::new();
        while let Some(key) = keys.next().await {
            if claimed.len() >= limit {
                break;
            }
            let key = key.map_err(unavailable)?;
            let Some((push, revision)) = self.pending(kv, &key).await? else {
                continue;
            };
            if push.due_ms > now_ms {
                continue;
            }
            // Compare-and-delete: the node whose delete lands sends it; the others skip it.
            if kv
                .delete_expect_revision(&key, Some(revision))
                .await
                .is_ok()
            {
                claimed.push(push);
            }
        }
        Ok(claimed)
    }
}

/// The push queue in a SQLite file of its own, for `confab serve`.
pub struct EmbeddedPushQueue {
    connection: Arc<Mutex<Connection>>,
}

impl EmbeddedPushQueue {
    pub fn open(path: &Path) -> Result<EmbeddedPushQueue, BusError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(unavailable)?;
        }
        let connection = Connection::open(path).map_err(unavailable)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 CREATE TABLE IF NOT EXISTS pending_pushes (
                     key TEXT PRIMARY KEY,
                     due_ms INTEGER NOT NULL,
                     body TEXT NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS pending_pushes_by_due ON pending_pushes (due_ms);",
            )
            .map_err(unavailable)?;
        Ok(EmbeddedPushQueue {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, BusError> + Send + 'static,
    ) -> Result<T, BusError> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut guard = connection
                .lock()
                .map_err(|_| unavailable("poisoned by a panic"))?;
            work(&mut guard)
        })
        .await
        .map_err(unavailable)?
    }
}

fn read(connection: &Connection, key: &str) -> Result<Option<PendingPush>, BusError> {
    let body: Option<String> = connection
        .query_row(
            "SELECT body FROM pending_pushes WHERE key = ?1",
            params![key],
            |row| row.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    Ok(body.and_then(|body| serde_json::from_str(&body).ok()))
}

#[async_trait]
impl PushQueue for EmbeddedPushQueue {
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        signal: SignalId,
        author: UserId,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError> {
        self.with(move |connection| {
            let key = key(user, chat);
            let tx = connection.transaction().map_err(unavailable)?;
            let push = PendingPush::joined(
                read(&tx, &key)?,
                user,
                chat,
                signal,
                author,
                due_ms,
                expires_ms,
            );
            tx.execute(
                "INSERT INTO pending_pushes (key, due_ms, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (key) DO UPDATE SET due_ms = excluded.due_ms, body = excluded.body",
                params![key, push.due_ms, serde_json::to_string(&push)?],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn cancel(&self, user: UserId, chat: ChatId, up_to: SignalId) -> Result<(), BusError> {
        self.with(move |connection| {
            let key = key(user, chat);
            let tx = connection.transaction().map_err(unavailable)?;
            if read(&tx, &key)?.is_some_and(|push| push.newest <= up_to) {
                tx.execute("DELETE FROM pending_pushes WHERE key = ?1", params![key])
                    .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingPush>, BusError> {
        self.with(move |connection| {
            let tx = connection.transaction().map_err(unavailable)?;
            let due: Vec<(String, String)> = {
                let mut statement = tx
                    .prepare(
                        "SELECT key, body FROM pending_pushes WHERE due_ms <= ?1 ORDER BY due_ms LIMIT ?2",
                    )
                    .map_err(unavailable)?;
                statement
                    .query_map(
                        params![now_ms, i64::try_from(limit).unwrap_or(i64::MAX)],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .map_err(unavailable)?
                    .collect::<Result<_, _>>()
                    .map_err(unavailable)?
            };
            for (key, _) in &due {
                tx.execute("DELETE FROM pending_pushes WHERE key = ?1", params![key])
                    .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(due
                .into_iter()
                .filter_map(|(_, body)| serde_json::from_str(&body).ok())
                .collect())
        })
        .await
    }
}
