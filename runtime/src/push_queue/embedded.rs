//! The push queue in a SQLite file of its own, for `confab serve`: pending pushes indexed by due
//! time, and the pushes sent lately.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use confab_schema::{ChatId, SignalId, UserId};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{
    AfterDeletion, Cancelled, Claimed, PendingPush, PushKind, PushMessage, PushQueue, SentPush,
    key, unavailable, user_prefix,
};
use crate::bus::BusError;

/// Every transaction here reads and then writes, so each begins IMMEDIATE: a deferred one that
/// upgrades from reading to writing while another handle on the file has written fails at once
/// with "database is locked", without waiting out the busy timeout.
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
                 PRAGMA busy_timeout = 5000;
                 CREATE TABLE IF NOT EXISTS pending_pushes (
                     key TEXT PRIMARY KEY,
                     due_ms INTEGER NOT NULL,
                     body TEXT NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS pending_pushes_by_due ON pending_pushes (due_ms);
                 CREATE TABLE IF NOT EXISTS sent_pushes (
                     key TEXT PRIMARY KEY,
                     forget_ms INTEGER NOT NULL,
                     body TEXT NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS sent_pushes_by_age ON sent_pushes (forget_ms);",
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

fn read<T: serde::de::DeserializeOwned>(
    connection: &Connection,
    table: &str,
    key: &str,
) -> Result<Option<T>, BusError> {
    let body: Option<String> = connection
        .query_row(
            &format!("SELECT body FROM {table} WHERE key = ?1"),
            params![key],
            |row| row.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    Ok(body.and_then(|body| serde_json::from_str(&body).ok()))
}

fn put_pending(connection: &Connection, key: &str, push: &PendingPush) -> Result<(), BusError> {
    connection
        .execute(
            "INSERT INTO pending_pushes (key, due_ms, body) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET due_ms = excluded.due_ms, body = excluded.body",
            params![key, push.due_ms, serde_json::to_string(push)?],
        )
        .map_err(unavailable)?;
    Ok(())
}

/// Forgets the push sent to `user` in `chat` if `covered` says it is to be withdrawn, and queues
/// its withdrawal unless it is forgotten by now; says whether it queued one. Nothing is pending
/// for the chat but, with `waiting`, a withdrawal up to that message, which the new one replaces
/// (it withdraws up to the newer of the two).
fn withdraw_sent(
    tx: &Connection,
    user: UserId,
    chat: ChatId,
    covered: impl FnOnce(&SentPush) -> bool,
    now_ms: i64,
    waiting: Option<SignalId>,
) -> Result<bool, BusError> {
    let key = key(user, chat);
    let sent: Option<SentPush> = read(tx, "sent_pushes", &key)?;
    let Some(sent) = sent.filter(|sent| covered(sent)) else {
        return Ok(false);
    };
    tx.execute("DELETE FROM sent_pushes WHERE key = ?1", params![key])
        .map_err(unavailable)?;
    if sent.forget_ms <= now_ms {
        return Ok(false);
    }
    let mut withdrawal = PendingPush::withdrawal(user, chat, sent.newest, sent.author, now_ms);
    if let Some(waiting) = waiting {
        withdrawal.newest = withdrawal.newest.max(waiting);
    }
    put_pending(tx, &key, &withdrawal)?;
    Ok(true)
}

#[async_trait]
impl PushQueue for EmbeddedPushQueue {
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        message: &PushMessage,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError> {
        let message = message.clone();
        self.with(move |connection| {
            let key = key(user, chat);
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let pending = read(&tx, "pending_pushes", &key)?;
            let push = PendingPush::joined(pending, user, chat, &message, due_ms, expires_ms);
            put_pending(&tx, &key, &push)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn cancel(
        &self,
        user: UserId,
        chat: ChatId,
        up_to: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        self.with(move |connection| {
            let key = key(user, chat);
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let mut outcome = Cancelled::Nothing;
            let pending: Option<PendingPush> = read(&tx, "pending_pushes", &key)?;
            let (still_pending, waiting) = match pending {
                Some(push) if push.kind == PushKind::Messages && push.newest <= up_to => {
                    outcome = Cancelled::Pending;
                    match push.dropped(now_ms) {
                        Some(withdrawal) => {
                            put_pending(&tx, &key, &withdrawal)?;
                            outcome = Cancelled::Withdrawn;
                            (false, Some(withdrawal.newest))
                        }
                        None => {
                            tx.execute("DELETE FROM pending_pushes WHERE key = ?1", params![key])
                                .map_err(unavailable)?;
                            (false, None)
                        }
                    }
                }
                // A withdrawal on its way: widened to a push sent since that this read covers.
                Some(push) if push.kind == PushKind::Withdrawal => (false, Some(push.newest)),
                Some(_) => (true, None),
                None => (false, None),
            };
            if !still_pending
                && withdraw_sent(
                    &tx,
                    user,
                    chat,
                    |sent| sent.newest <= up_to,
                    now_ms,
                    waiting,
                )?
            {
                outcome = Cancelled::Withdrawn;
            }
            tx.commit().map_err(unavailable)?;
            Ok(outcome)
        })
        .await
    }

    async fn message_deleted(
        &self,
        user: UserId,
        chat: ChatId,
        deleted: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        self.with(move |connection| {
            let key = key(user, chat);
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let pending: Option<PendingPush> = read(&tx, "pending_pushes", &key)?;
            let outcome = match pending {
                Some(push) if push.kind == PushKind::Messages => {
                    match push.after_deletion(deleted) {
                        AfterDeletion::Untouched => Cancelled::Nothing,
                        AfterDeletion::Dropped(push) => {
                            let replaced = push.dropped(now_ms);
                            match &replaced {
                                Some(withdrawal) => put_pending(&tx, &key, withdrawal)?,
                                None => {
                                    tx.execute(
                                        "DELETE FROM pending_pushes WHERE key = ?1",
                                        params![key],
                                    )
                                    .map_err(unavailable)?;
                                }
                            }
                            // The push dropped would have replaced the notification on screen,
                            // which may show a message deleted while this one waited: nothing
                            // replaces it now, so it is withdrawn.
                            withdraw_sent(
                                &tx,
                                user,
                                chat,
                                |sent| sent.newest <= deleted,
                                now_ms,
                                replaced.map(|withdrawal| withdrawal.newest),
                            )?;
                            Cancelled::Pending
                        }
                        AfterDeletion::Narrowed(push) => {
                            put_pending(&tx, &key, &push)?;
                            Cancelled::Narrowed
                        }
                    }
                }
                // Nothing pending, or a withdrawal on its way (widened to the push): a push sent
                // announcing it is withdrawn.
                waiting => {
                    let waiting = waiting.map(|withdrawal| withdrawal.newest);
                    if withdraw_sent(
                        &tx,
                        user,
                        chat,
                        |sent| sent.newest == deleted,
                        now_ms,
                        waiting,
                    )? {
                        Cancelled::Withdrawn
                    } else {
                        Cancelled::Nothing
                    }
                }
            };
            tx.commit().map_err(unavailable)?;
            Ok(outcome)
        })
        .await
    }

    async fn drop_pending(&self, user: UserId, chat: ChatId) -> Result<bool, BusError> {
        self.with(move |connection| {
            let key = key(user, chat);
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let pending: Option<PendingPush> = read(&tx, "pending_pushes", &key)?;
            let Some(push) = pending.filter(|push| push.kind == PushKind::Messages) else {
                return Ok(false);
            };
            // The withdrawal it took the place of stays, as any other would.
            match push.dropped(crate::presence::now_ms()) {
                Some(withdrawal) => put_pending(&tx, &key, &withdrawal)?,
                None => {
                    tx.execute("DELETE FROM pending_pushes WHERE key = ?1", params![key])
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn drop_previews(&self, user: UserId) -> Result<usize, BusError> {
        self.with(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            // The user's keys, and no other's: `<user>.` up to `<user>/` ('/' follows '.').
            let prefix = user_prefix(user);
            let end = format!("{user}/");
            let pending: Vec<(String, String)> = {
                let mut statement = tx
                    .prepare_cached(
                        "SELECT key, body FROM pending_pushes WHERE key >= ?1 AND key < ?2",
                    )
                    .map_err(unavailable)?;
                statement
                    .query_map(params![prefix, end], |row| Ok((row.get(0)?, row.get(1)?)))
                    .map_err(unavailable)?
                    .collect::<Result<_, _>>()
                    .map_err(unavailable)?
            };
            let mut changed = 0;
            for (key, body) in pending {
                let Ok(mut push) = serde_json::from_str::<PendingPush>(&body) else {
                    continue;
                };
                if push.preview.take().is_some() {
                    put_pending(&tx, &key, &push)?;
                    changed += 1;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(changed)
        })
        .await
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Claimed, BusError> {
        self.with(move |connection| {
            let tx = connection
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let due: Vec<(String, String)> = {
                let mut statement = tx
                    .prepare_cached(
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
            // Sent pushes old enough to be gone from the devices need no withdrawal.
            tx.execute(
                "DELETE FROM sent_pushes WHERE forget_ms < ?1",
                params![now_ms],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            // Every row looked at was due: a full batch may have more behind it.
            let more = due.len() >= limit;
            Ok(Claimed {
                pushes: due
                    .into_iter()
                    .filter_map(|(_, body)| serde_json::from_str(&body).ok())
                    .collect(),
                more,
            })
        })
        .await
    }

    async fn sent(&self, push: &PendingPush, now_ms: i64) -> Result<(), BusError> {
        let key = key(push.user, push.chat);
        let Some(sent) = SentPush::of(push, now_ms) else {
            return Ok(());
        };
        self.with(move |connection| {
            connection
                .execute(
                    "INSERT INTO sent_pushes (key, forget_ms, body) VALUES (?1, ?2, ?3)
                     ON CONFLICT (key) DO UPDATE SET forget_ms = excluded.forget_ms, body = excluded.body",
                    params![key, sent.forget_ms, serde_json::to_string(&sent)?],
                )
                .map_err(unavailable)?;
            Ok(())
        })
        .await
    }
}
