//! The embedded store: SQLite, one file in the data directory.
//!
//! Why SQLite: it is the most widely deployed transactional engine there is, survives crashes (WAL),
//! and gives us the uniqueness rules (send parity) as constraints inside one transaction, with no
//! server to run. One connection behind a mutex is enough for one machine: writes are serialised by
//! SQLite anyway, and every call runs on the blocking pool so it never stalls the async runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use confab_schema::attachment::ImageInfo;
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::push::Device;
use confab_schema::settings::{ChatSettings, UserSettings};
use confab_schema::{
    Attachment, AttachmentKind, Chat, ChatId, CircleId, DeviceId, Member, MemberRole, Signal,
    SignalId, User, UserId,
};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use time::OffsetDateTime;
use uuid::Uuid;

use confab_schema::call::CallStatus;

use super::{
    CallRecord, ChatActivity, ChatEntry, DEFAULT_NONCE_TTL, GuardedChange, InfoChange, Inserted,
    LEFT_CHATS_KEPT, LeftChat, ListedCall, MarkerKind, MemberPut, MemberWrite, NewChat,
    OutboxEntry, OutboxWriter, PendingCallSignal, Slot, SlotState, SlotWrite, SmallObjectInfo,
    Store, StoreError, UNREAD_SCAN_LIMIT, address_terms, circle_pool, claim_orphaned, created_at,
    from_millis, millis, parse, search_terms, stored_text, text_and_call,
};
use std::collections::BTreeMap;

/// The schema, one file per version, applied in order and recorded in `PRAGMA user_version`.
const MIGRATIONS: &[&str] = &[
    include_str!("schema/0001_initial.sql"),
    include_str!("schema/0002_activity_reactions_markers_search.sql"),
    include_str!("schema/0003_nonces_with_expiry.sql"),
    include_str!("schema/0004_devices.sql"),
    include_str!("schema/0005_settings.sql"),
    include_str!("schema/0006_attachments.sql"),
    include_str!("schema/0007_outbox.sql"),
    include_str!("schema/0008_circles_queues.sql"),
    include_str!("schema/0009_calls.sql"),
    include_str!("schema/0010_small_objects.sql"),
    include_str!("schema/0011_blob_marks.sql"),
    include_str!("schema/0012_live_calls.sql"),
    include_str!("schema/0013_call_signals.sql"),
    include_str!("schema/0014_call_joins.sql"),
    include_str!("schema/0015_left_chats.sql"),
    include_str!("schema/0016_user_sessions.sql"),
    include_str!("schema/0017_user_addresses.sql"),
    include_str!("schema/0018_circle_removals.sql"),
];

/// The version whose migration writes every user's terms again ([`index_all_users`]).
const USER_ADDRESSES_VERSION: usize = 17;

pub struct EmbeddedStore {
    connection: Arc<Mutex<Connection>>,
    /// How long a nonce protects against a repeated send, in milliseconds.
    nonce_ttl_ms: i64,
    /// Stops the background checkpointer when the store is dropped.
    _checkpointer: std::sync::mpsc::Sender<()>,
}

impl EmbeddedStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date. Nonces
    /// expire after [`DEFAULT_NONCE_TTL`].
    pub fn open(path: &Path) -> Result<EmbeddedStore, StoreError> {
        Self::open_with_nonce_ttl(path, DEFAULT_NONCE_TTL)
    }

    /// [`EmbeddedStore::open`], with nonces expiring after `nonce_ttl`.
    pub fn open_with_nonce_ttl(
        path: &Path,
        nonce_ttl: Duration,
    ) -> Result<EmbeddedStore, StoreError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Unavailable(e.to_string()))?;
        }
        let connection = Connection::open(path).map_err(unavailable)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = NORMAL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;
                 PRAGMA wal_autocheckpoint = 0;",
            )
            .map_err(unavailable)?;
        migrate(&connection)?;
        Ok(EmbeddedStore {
            connection: Arc::new(Mutex::new(connection)),
            nonce_ttl_ms: i64::try_from(nonce_ttl.as_millis()).unwrap_or(i64::MAX),
            _checkpointer: spawn_checkpointer(path)?,
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let connection = Arc::clone(&self.connection);
        tokio::task::spawn_blocking(move || {
            let mut guard = connection.lock().map_err(|_| {
                StoreError::Unavailable("embedded store poisoned by a panic".into())
            })?;
            work(&mut guard)
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

/// Checkpoints the WAL from a connection of its own, off the request path: SQLite's automatic
/// checkpoint would run inside a committing request (while it holds the store) and stall every other
/// request behind an fsync.
fn spawn_checkpointer(path: &Path) -> Result<std::sync::mpsc::Sender<()>, StoreError> {
    let connection = Connection::open(path).map_err(unavailable)?;
    connection
        .execute_batch("PRAGMA busy_timeout = 5000;")
        .map_err(unavailable)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("confab-sqlite-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(std::time::Duration::from_millis(500))
            {
                if let Err(error) =
                    connection.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(%error, "embedded store checkpoint failed");
                }
            }
            let _ = connection.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(stop)
}

fn unavailable(error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn migrate(connection: &Connection) -> Result<(), StoreError> {
    let applied: usize = connection
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(unavailable)?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = index + 1;
        connection
            .execute_batch(&format!("BEGIN; {migration}"))
            .map_err(unavailable)?;
        // A migration's data step runs in its transaction: it is applied whole or not at all.
        let data_step = match version {
            USER_ADDRESSES_VERSION => index_all_users(connection),
            _ => Ok(()),
        };
        let recorded = data_step.and_then(|()| {
            connection
                .execute_batch(&format!("PRAGMA user_version = {version}; COMMIT;"))
                .map_err(unavailable)
        });
        if let Err(error) = recorded {
            let _ = connection.execute_batch("ROLLBACK;");
            return Err(error);
        }
        tracing::info!(version, "embedded store migrated");
    }
    Ok(())
}

/// Migration 17: writes every user's search terms and addresses again, so that no address (nor a
/// name that looks like one) is left among the terms a prefix scan reads.
fn index_all_users(c: &Connection) -> Result<(), StoreError> {
    c.execute("DELETE FROM user_terms", [])
        .map_err(unavailable)?;
    let users = all(
        c,
        "SELECT id, username, display_name, email FROM users",
        [],
        |row| {
            Ok((
                row.get::<_, Vec<u8>>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<String>>(3)?,
            ))
        },
    )?;
    for (id, username, display_name, email) in users {
        let user = User {
            id: UserId(uuid_from(id)?),
            username,
            display_name,
            email,
        };
        write_user_terms(c, &user)?;
    }
    Ok(())
}

/// Writes `user`'s search terms and addresses in place of those on record.
fn write_user_terms(c: &Connection, user: &User) -> Result<(), StoreError> {
    let id = blob(user.id.0);
    c.prepare_cached("DELETE FROM user_terms WHERE user_id = ?1")
        .map_err(unavailable)?
        .execute(params![id])
        .map_err(unavailable)?;
    c.prepare_cached("DELETE FROM user_addresses WHERE user_id = ?1")
        .map_err(unavailable)?
        .execute(params![id])
        .map_err(unavailable)?;
    for term in search_terms(user) {
        c.prepare_cached("INSERT OR IGNORE INTO user_terms (term, user_id) VALUES (?1, ?2)")
            .map_err(unavailable)?
            .execute(params![term, id])
            .map_err(unavailable)?;
    }
    for address in address_terms(user) {
        c.prepare_cached("INSERT OR IGNORE INTO user_addresses (address, user_id) VALUES (?1, ?2)")
            .map_err(unavailable)?
            .execute(params![address, id])
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Every row of a cached statement, mapped.
fn all<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    map: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StoreError> {
    c.prepare_cached(sql)
        .map_err(unavailable)?
        .query_map(params, map)
        .map_err(unavailable)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(unavailable)
}

/// Records that `user`'s membership of `chat` ended now ([`Store::left_chats_of`]), in the
/// removal's transaction, and forgets a few endings older than [`LEFT_CHATS_KEPT`], oldest first:
/// bounded work, and the table stays the size of what it keeps.
fn record_left_chat(c: &Connection, chat: ChatId, user: UserId) -> Result<(), StoreError> {
    let now = millis(OffsetDateTime::now_utc());
    let kept = i64::try_from(LEFT_CHATS_KEPT.as_millis()).unwrap_or(i64::MAX);
    c.prepare_cached(
        "DELETE FROM left_chats WHERE (user_id, chat_id) IN
         (SELECT user_id, chat_id FROM left_chats WHERE left_at < ?1 ORDER BY left_at LIMIT 16)",
    )
    .map_err(unavailable)?
    .execute(params![now - kept])
    .map_err(unavailable)?;
    c.prepare_cached(
        "INSERT INTO left_chats (user_id, chat_id, left_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id, chat_id) DO UPDATE SET left_at = max(left_at, excluded.left_at)",
    )
    .map_err(unavailable)?
    .execute(params![blob(user.0), blob(chat.0), now])
    .map_err(unavailable)?;
    Ok(())
}

type MemberRow = (Vec<u8>, String, i64);

fn member_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<MemberRow> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

fn to_member((user, role, joined): MemberRow) -> Result<Member, StoreError> {
    Ok(Member {
        user_id: UserId(uuid_from(user)?),
        role: parse(&role)?,
        joined_at: from_millis(joined)?,
    })
}

fn to_json(value: &impl serde::Serialize) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(body: &str) -> Result<T, StoreError> {
    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn blob(id: Uuid) -> [u8; 16] {
    *id.as_bytes()
}

fn uuid_from(bytes: Vec<u8>) -> Result<Uuid, StoreError> {
    Uuid::from_slice(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The join `user` is in call `id` under; `None` when they are not in it, or under none.
fn participant_join(c: &Connection, id: Uuid, user: UserId) -> Result<Option<Uuid>, StoreError> {
    let join: Option<Option<Vec<u8>>> = c
        .query_row(
            "SELECT join_id FROM call_participants WHERE call_id = ?1 AND user_id = ?2",
            params![blob(id), blob(user.0)],
            |row| row.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    join.flatten().map(uuid_from).transpose()
}

const SIGNAL_COLUMNS: &str =
    "chat_id, id, kind, author_id, nonce, text, reply_to, attachments, edited_at, deleted";

type SignalRow = (
    Vec<u8>,
    Vec<u8>,
    String,
    Vec<u8>,
    Option<String>,
    Option<String>,
    Option<Vec<u8>>,
    String,
    Option<i64>,
    bool,
);

fn signal_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<SignalRow> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
        row.get(8)?,
        row.get(9)?,
    ))
}

fn to_signal(row: SignalRow) -> Result<Signal, StoreError> {
    let (chat_id, id, kind, author_id, nonce, text, reply_to, attachments, edited_at, deleted) =
        row;
    let id = SignalId(uuid_from(id)?);
    let kind = parse(&kind)?;
    let (text, call) = text_and_call(kind, if deleted { None } else { text })?;
    Ok(Signal {
        id,
        chat_id: ChatId(uuid_from(chat_id)?),
        kind,
        author_id: UserId(uuid_from(author_id)?),
        created_at: created_at(id)?,
        nonce,
        text,
        reply_to: reply_to.map(uuid_from).transpose()?.map(SignalId),
        attachments: serde_json::from_str(&attachments)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        edited_at: edited_at.map(from_millis).transpose()?,
        deleted,
        reactions: Default::default(),
        call,
    })
}

/// A chat as stored (`my_role`, `latest_signal` and `unread_count` left empty).
fn chat_row(c: &Connection, id: ChatId) -> Result<Option<Chat>, StoreError> {
    let row = c
        .prepare_cached(
            "SELECT kind, name, description, created_at, created_by FROM chats WHERE id = ?1",
        )
        .map_err(unavailable)?
        .query_row(params![blob(id.0)], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, Option<String>>(2)?,
                row.get::<_, i64>(3)?,
                row.get::<_, Vec<u8>>(4)?,
            ))
        })
        .optional()
        .map_err(unavailable)?;
    row.map(|(kind, name, description, created_at, created_by)| {
        Ok(Chat {
            id,
            kind: parse(&kind)?,
            name,
            description,
            created_at: from_millis(created_at)?,
            created_by: UserId(uuid_from(created_by)?),
            my_role: None,
            latest_signal: None,
            unread_count: 0,
        })
    })
    .transpose()
}

/// Emoji → count of one signal's reactions.
fn reaction_counts(
    c: &Connection,
    chat: ChatId,
    signal: SignalId,
) -> Result<BTreeMap<String, i64>, StoreError> {
    c.prepare_cached(
        "SELECT emoji, COUNT(*) FROM reactions WHERE chat_id = ?1 AND signal_id = ?2 GROUP BY emoji",
    )
    .map_err(unavailable)?
    .query_map(params![blob(chat.0), blob(signal.0)], |row| {
        Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
    })
    .map_err(unavailable)?
    .collect::<Result<BTreeMap<_, _>, _>>()
    .map_err(unavailable)
}

/// A signal with its reaction counts.
fn decorated(c: &Connection, chat: ChatId, id: SignalId) -> Result<Option<Signal>, StoreError> {
    let row = c
        .prepare_cached(&format!(
            "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ?1 AND id = ?2"
        ))
        .map_err(unavailable)?
        .query_row(params![blob(chat.0), blob(id.0)], signal_row)
        .optional()
        .map_err(unavailable)?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut signal = to_signal(row)?;
    signal.reactions = reaction_counts(c, chat, id)?;
    Ok(Some(signal))
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn check(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(unavailable))
            .await
    }

    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        let user = user.clone();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            write_user_terms(&tx, &user)?;
            tx.execute(
                "INSERT INTO users (id, username, display_name, email, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (id) DO UPDATE SET username = ?2, display_name = ?3, email = ?4, updated_at = ?5",
                params![
                    blob(user.id.0),
                    user.username,
                    user.display_name,
                    user.email,
                    millis(time::OffsetDateTime::now_utc())
                ],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT username, display_name, email FROM users WHERE id = ?1",
                params![blob(id.0)],
                |row| {
                    Ok(User {
                        id,
                        username: row.get(0)?,
                        display_name: row.get(1)?,
                        email: row.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn create_chat(&self, chat: &NewChat) -> Result<(), StoreError> {
        let chat = chat.clone();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            tx.execute(
                // A direct chat's id is its two users': two first messages at once make it twice, and
                // the second finds it made.
                "INSERT INTO chats (id, kind, name, description, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO NOTHING",
                params![
                    blob(chat.id.0),
                    chat.kind.as_str(),
                    chat.name,
                    chat.description,
                    millis(chat.created_at),
                    blob(chat.created_by.0)
                ],
            )
            .map_err(unavailable)?;
            {
                let mut insert = tx
                    .prepare(
                        "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (chat_id, user_id) DO UPDATE SET role = ?3",
                    )
                    .map_err(unavailable)?;
                for (user, role) in &chat.members {
                    insert
                        .execute(params![blob(chat.id.0), blob(user.0), role.as_str(), millis(chat.created_at)])
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        self.with(move |c| chat_row(c, id)).await
    }

    async fn member_role(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<MemberRole>, StoreError> {
        let role = self
            .with(move |c| {
                c.query_row(
                    "SELECT role FROM chat_members WHERE chat_id = ?1 AND user_id = ?2",
                    params![blob(chat.0), blob(user.0)],
                    |row| row.get::<_, String>(0),
                )
                .optional()
                .map_err(unavailable)
            })
            .await?;
        role.map(|r| parse(&r)).transpose()
    }

    async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT chat_id FROM chat_members WHERE user_id = ?1")
                .map_err(unavailable)?;
            let ids = statement
                .query_map(params![blob(user.0)], |row| row.get::<_, Vec<u8>>(0))
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            ids.into_iter()
                .map(|id| uuid_from(id).map(ChatId))
                .collect()
        })
        .await
    }

    async fn chat_ids(
        &self,
        after: Option<ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            // Ids are 16-byte blobs in byte order; no chat has the nil id.
            let after = after.map(|a| blob(a.0)).unwrap_or([0; 16]);
            let mut statement = c
                .prepare_cached("SELECT id FROM chats WHERE id > ?1 ORDER BY id LIMIT ?2")
                .map_err(unavailable)?;
            let ids = statement
                .query_map(params![after, limit], |row| row.get::<_, Vec<u8>>(0))
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            ids.into_iter()
                .map(|id| uuid_from(id).map(ChatId))
                .collect()
        })
        .await
    }

    async fn record_session(
        &self,
        user: UserId,
        session: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let session = session.to_owned();
        let now = millis(OffsetDateTime::now_utc());
        let expires = now.saturating_add(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX));
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            // The user's expired sessions go here, so the table holds no more than live ones.
            tx.execute(
                "DELETE FROM user_sessions WHERE user_id = ?1 AND expires_at_ms <= ?2",
                params![blob(user.0), now],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO user_sessions (user_id, session, expires_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id, session) DO UPDATE SET expires_at_ms = excluded.expires_at_ms",
                params![blob(user.0), session, expires],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn sessions_of(&self, user: UserId) -> Result<Vec<String>, StoreError> {
        let now = millis(OffsetDateTime::now_utc());
        self.with(move |c| {
            all(
                c,
                "SELECT session FROM user_sessions WHERE user_id = ?1 AND expires_at_ms > ?2",
                params![blob(user.0), now],
                |row| row.get(0),
            )
        })
        .await
    }

    async fn forget_sessions(&self, user: UserId, sessions: &[String]) -> Result<(), StoreError> {
        let sessions = sessions.to_vec();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            for session in &sessions {
                tx.execute(
                    "DELETE FROM user_sessions WHERE user_id = ?1 AND session = ?2",
                    params![blob(user.0), session],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn put_device(&self, device: &Device) -> Result<Option<Device>, StoreError> {
        let body = serde_json::to_string(device).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, user) = (device.id, device.user_id);
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let previous: Option<String> = tx
                .query_row(
                    "SELECT body FROM devices WHERE id = ?1",
                    params![blob(id.0)],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO devices (id, user_id, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (id) DO UPDATE SET user_id = excluded.user_id, body = excluded.body",
                params![blob(id.0), blob(user.0), body],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            previous
                .map(|body| {
                    serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .transpose()
        })
        .await
    }

    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT body FROM devices WHERE user_id = ?1 ORDER BY id")
                .map_err(unavailable)?;
            let bodies = statement
                .query_map(params![blob(user.0)], |row| row.get::<_, String>(0))
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            bodies
                .into_iter()
                .map(|body| {
                    serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .collect()
        })
        .await
    }

    async fn user_settings(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, UserSettings)>, StoreError> {
        let users = users.to_vec();
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT body FROM user_settings WHERE user_id = ?1")
                .map_err(unavailable)?;
            let mut found = Vec::new();
            for user in users {
                let body: Option<String> = statement
                    .query_row(params![blob(user.0)], |row| row.get(0))
                    .optional()
                    .map_err(unavailable)?;
                if let Some(body) = body {
                    found.push((user, from_json(&body)?));
                }
            }
            Ok(found)
        })
        .await
    }

    async fn put_user_settings(
        &self,
        user: UserId,
        settings: &UserSettings,
    ) -> Result<(), StoreError> {
        let body = to_json(settings)?;
        self.with(move |c| {
            c.execute(
                "INSERT INTO user_settings (user_id, body) VALUES (?1, ?2)
                 ON CONFLICT (user_id) DO UPDATE SET body = excluded.body",
                params![blob(user.0), body],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<ChatSettings>, StoreError> {
        self.with(move |c| {
            let body: Option<String> = c
                .query_row(
                    "SELECT body FROM chat_member_settings WHERE chat_id = ?1 AND user_id = ?2",
                    params![blob(chat.0), blob(user.0)],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            body.map(|body| from_json(&body)).transpose()
        })
        .await
    }

    async fn chat_settings_of(
        &self,
        chat: ChatId,
    ) -> Result<Vec<(UserId, ChatSettings)>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT user_id, body FROM chat_member_settings WHERE chat_id = ?1")
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![blob(chat.0)], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, String>(1)?))
                })
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            rows.into_iter()
                .map(|(user, body)| Ok((UserId(uuid_from(user)?), from_json(&body)?)))
                .collect()
        })
        .await
    }

    async fn put_chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
        settings: &ChatSettings,
    ) -> Result<(), StoreError> {
        let body = to_json(settings)?;
        self.with(move |c| {
            c.execute(
                "INSERT INTO chat_member_settings (chat_id, user_id, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT (chat_id, user_id) DO UPDATE SET body = excluded.body",
                params![blob(chat.0), blob(user.0), body],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn delete_device(&self, user: UserId, id: DeviceId) -> Result<bool, StoreError> {
        self.with(move |c| {
            let deleted = c
                .execute(
                    "DELETE FROM devices WHERE id = ?1 AND user_id = ?2",
                    params![blob(id.0), blob(user.0)],
                )
                .map_err(unavailable)?;
            Ok(deleted > 0)
        })
        .await
    }

    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError> {
        self.with(move |c| {
            all(
                c,
                "SELECT user_id, role, joined_at FROM chat_members WHERE chat_id = ?1",
                params![blob(chat.0)],
                member_row,
            )
        })
        .await?
        .into_iter()
        .map(to_member)
        .collect()
    }

    async fn insert_signal(&self, signal: &Signal) -> Result<Inserted, StoreError> {
        let signal = signal.clone();
        let ttl = self.nonce_ttl_ms;
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            if let Some(nonce) = &signal.nonce {
                let now = millis(time::OffsetDateTime::now_utc());
                // Forget a few expired nonces on every send, oldest first: bounded work, and the
                // table stays the size of one TTL's sends.
                tx.prepare_cached(
                    "DELETE FROM signal_nonces WHERE (chat_id, author_id, nonce) IN
                     (SELECT chat_id, author_id, nonce FROM signal_nonces WHERE claimed_at < ?1
                      ORDER BY claimed_at LIMIT 16)",
                )
                .map_err(unavailable)?
                .execute(params![now - ttl])
                .map_err(unavailable)?;
                let holder: Option<(Vec<u8>, i64)> = tx
                    .query_row(
                        "SELECT signal_id, claimed_at FROM signal_nonces
                         WHERE chat_id = ?1 AND author_id = ?2 AND nonce = ?3",
                        params![blob(signal.chat_id.0), blob(signal.author_id.0), nonce],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )
                    .optional()
                    .map_err(unavailable)?;
                if let Some((holder, claimed_at)) = holder
                    && claimed_at >= now - ttl
                {
                    let row = tx
                        .query_row(
                            &format!("SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ?1 AND id = ?2"),
                            params![blob(signal.chat_id.0), holder],
                            signal_row,
                        )
                        .map_err(unavailable)?;
                    let existing = to_signal(row)?;
                    tx.commit().map_err(unavailable)?;
                    return Ok(Inserted::Existing(existing));
                }
                tx.execute(
                    "INSERT OR REPLACE INTO signal_nonces (chat_id, author_id, nonce, signal_id, claimed_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![blob(signal.chat_id.0), blob(signal.author_id.0), nonce, blob(signal.id.0), now],
                )
                .map_err(unavailable)?;
            }
            let ids: Vec<Uuid> = signal.attachments.iter().map(|a| a.id()).collect();
            let attachments = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
            tx.prepare_cached(
                "INSERT INTO signals (chat_id, id, kind, author_id, nonce, text, reply_to, attachments, edited_at, deleted)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(unavailable)?
            .execute(params![
                blob(signal.chat_id.0),
                blob(signal.id.0),
                signal.kind.as_str(),
                blob(signal.author_id.0),
                signal.nonce,
                stored_text(&signal),
                signal.reply_to.map(|r| blob(r.0)),
                attachments,
                signal.edited_at.map(millis),
                signal.deleted
            ])
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(Inserted::Created(signal))
        })
        .await
        // One transaction: when it fails, it is rolled back, and nothing of it was written.
        .map_err(|error| match error {
            StoreError::Unavailable(why) => StoreError::NotWritten(why),
            other => other,
        })
    }

    async fn nonce_holder(
        &self,
        chat: ChatId,
        author: UserId,
        nonce: &str,
    ) -> Result<Option<SignalId>, StoreError> {
        let ttl = self.nonce_ttl_ms;
        let nonce = nonce.to_owned();
        self.with(move |c| {
            let now = millis(time::OffsetDateTime::now_utc());
            let holder: Option<Vec<u8>> = c
                .prepare_cached(
                    "SELECT signal_id FROM signal_nonces
                     WHERE chat_id = ?1 AND author_id = ?2 AND nonce = ?3 AND claimed_at >= ?4",
                )
                .map_err(unavailable)?
                .query_row(
                    params![blob(chat.0), blob(author.0), nonce, now - ttl],
                    |row| row.get(0),
                )
                .optional()
                .map_err(unavailable)?;
            holder
                .map(|bytes| {
                    Uuid::from_slice(&bytes)
                        .map(SignalId)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .transpose()
        })
        .await
    }

    async fn signals_before(
        &self,
        chat: ChatId,
        before: Option<SignalId>,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError> {
        let rows = self
            .with(move |c| {
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = match before {
                    Some(before) => c
                        .prepare_cached(&format!(
                            "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
                        ))
                        .map_err(unavailable)?
                        .query_map(params![blob(chat.0), blob(before.0), limit], signal_row)
                        .map_err(unavailable)?
                        .collect::<Result<Vec<_>, _>>(),
                    None => c
                        .prepare_cached(&format!(
                            "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ?1 ORDER BY id DESC LIMIT ?2"
                        ))
                        .map_err(unavailable)?
                        .query_map(params![blob(chat.0), limit], signal_row)
                        .map_err(unavailable)?
                        .collect::<Result<Vec<_>, _>>(),
                };
                rows.map_err(unavailable)
            })
            .await?;
        rows.into_iter().map(to_signal).collect()
    }

    async fn user_terms(
        &self,
        prefix: &str,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        let prefix = prefix.to_owned();
        let rows = self
            .with(move |c| {
                // Terms starting with `prefix`: [prefix, prefix + U+10FFFF).
                let upper = format!("{prefix}\u{10FFFF}");
                let (after_term, after_user) = match after {
                    Some((term, user)) => (term, blob(user.0).to_vec()),
                    None => (String::new(), Vec::new()),
                };
                let mut statement = c
                    .prepare_cached(
                        "SELECT term, user_id FROM user_terms
                         WHERE term >= ?1 AND term < ?2 AND (term > ?3 OR (term = ?3 AND user_id > ?4))
                         ORDER BY term, user_id LIMIT ?5",
                    )
                    .map_err(unavailable)?;
                let rows = statement
                    .query_map(
                        params![prefix, upper, after_term, after_user, i64::try_from(limit).unwrap_or(i64::MAX)],
                        |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?)),
                    )
                    .map_err(unavailable)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(unavailable)?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(term, user)| Ok((term, UserId(uuid_from(user)?))))
            .collect()
    }

    async fn users_by_address(
        &self,
        address: &str,
        limit: usize,
    ) -> Result<Vec<UserId>, StoreError> {
        let address = address.to_owned();
        let rows = self
            .with(move |c| {
                all(
                    c,
                    "SELECT user_id FROM user_addresses WHERE address = ?1 ORDER BY user_id LIMIT ?2",
                    params![address, i64::try_from(limit).unwrap_or(i64::MAX)],
                    |row| row.get::<_, Vec<u8>>(0),
                )
            })
            .await?;
        rows.into_iter()
            .map(|user| Ok(UserId(uuid_from(user)?)))
            .collect()
    }

    async fn update_chat(&self, id: ChatId, change: InfoChange<'_>) -> Result<(), StoreError> {
        let owned = |changed: Option<Option<&str>>| changed.map(|value| value.map(str::to_owned));
        let (name, description) = (owned(change.name), owned(change.description));
        self.with(move |c| {
            // Only the changed columns: a change of the other one made at the same time stays.
            let tx = c.transaction().map_err(unavailable)?;
            if let Some(name) = name {
                tx.execute(
                    "UPDATE chats SET name = ?2 WHERE id = ?1",
                    params![blob(id.0), name],
                )
                .map_err(unavailable)?;
            }
            if let Some(description) = description {
                tx.execute(
                    "UPDATE chats SET description = ?2 WHERE id = ?1",
                    params![blob(id.0), description],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn members_among(
        &self,
        chat: ChatId,
        users: &[UserId],
    ) -> Result<Vec<Member>, StoreError> {
        let users = users.to_vec();
        self.with(move |c| {
            // One statement, asked once per user: SQLite answers a keyed lookup in microseconds.
            let mut statement = c
                .prepare_cached(
                    "SELECT user_id, role, joined_at FROM chat_members
                     WHERE chat_id = ?1 AND user_id = ?2",
                )
                .map_err(unavailable)?;
            let mut members = Vec::new();
            for user in users {
                let row = statement
                    .query_row(params![blob(chat.0), blob(user.0)], member_row)
                    .optional()
                    .map_err(unavailable)?;
                if let Some(row) = row {
                    members.push(to_member(row)?);
                }
            }
            Ok(members)
        })
        .await
    }

    async fn members_page(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError> {
        let after = after.map(|a| blob(a.0).to_vec()).unwrap_or_default();
        self.with(move |c| {
            all(
                c,
                "SELECT user_id, role, joined_at FROM chat_members
                 WHERE chat_id = ?1 AND user_id > ?2 ORDER BY user_id LIMIT ?3",
                params![
                    blob(chat.0),
                    after,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                member_row,
            )
        })
        .await?
        .into_iter()
        .map(to_member)
        .collect()
    }

    async fn put_member(&self, chat: ChatId, member: &Member) -> Result<(), StoreError> {
        let member = member.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (chat_id, user_id) DO UPDATE SET role = ?3",
                params![blob(chat.0), blob(member.user_id.0), member.role.as_str(), millis(member.joined_at)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn change_member(
        &self,
        chat: ChatId,
        change: &GuardedChange,
    ) -> Result<bool, StoreError> {
        let change = change.clone();
        self.with(move |c| {
            // One write transaction at a time: the checks and the write see no other change.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let role_of = |user: UserId| -> Result<Option<String>, StoreError> {
                tx.query_row(
                    "SELECT role FROM chat_members WHERE chat_id = ?1 AND user_id = ?2",
                    params![blob(chat.0), blob(user.0)],
                    |row| row.get::<_, String>(0),
                )
                .optional()
                .map_err(unavailable)
            };
            for (user, role) in &change.expect {
                if role_of(*user)?.as_deref() != Some(role.as_str()) {
                    return Ok(false);
                }
            }
            match &change.write {
                MemberWrite::Add(member) => {
                    if role_of(member.user_id)?.is_some() {
                        return Ok(false);
                    }
                    tx.execute(
                        "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES (?1, ?2, ?3, ?4)",
                        params![blob(chat.0), blob(member.user_id.0), member.role.as_str(), millis(member.joined_at)],
                    )
                    .map_err(unavailable)?;
                }
                MemberWrite::SetRole(user, role) => {
                    let changed = tx
                        .execute(
                            "UPDATE chat_members SET role = ?3 WHERE chat_id = ?1 AND user_id = ?2",
                            params![blob(chat.0), blob(user.0), role.as_str()],
                        )
                        .map_err(unavailable)?;
                    if changed == 0 {
                        return Ok(false);
                    }
                }
                MemberWrite::Remove(user) => {
                    let changed = tx
                        .execute(
                            "DELETE FROM chat_members WHERE chat_id = ?1 AND user_id = ?2",
                            params![blob(chat.0), blob(user.0)],
                        )
                        .map_err(unavailable)?;
                    if changed == 0 {
                        return Ok(false);
                    }
                    record_left_chat(&tx, chat, *user)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }

    async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let removed = tx
                .execute(
                    "DELETE FROM chat_members WHERE chat_id = ?1 AND user_id = ?2",
                    params![blob(chat.0), blob(user.0)],
                )
                .map_err(unavailable)?;
            if removed > 0 {
                record_left_chat(&tx, chat, user)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn forget_left_chat(&self, _chat: ChatId, _user: UserId) -> Result<(), StoreError> {
        // A membership is one row, removed in one statement: a removal leaves nothing behind.
        Ok(())
    }

    async fn left_chats_of(
        &self,
        user: UserId,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<LeftChat>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            all(
                c,
                "SELECT chat_id, left_at FROM left_chats WHERE user_id = ?1 AND left_at >= ?2
                 ORDER BY left_at DESC LIMIT ?3",
                params![blob(user.0), millis(since), limit],
                |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?)),
            )?
            .into_iter()
            .map(|(id, left_at)| {
                Ok(LeftChat {
                    chat_id: ChatId(uuid_from(id)?),
                    left_at: from_millis(left_at)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn restore_joined_chat(&self, _chat: ChatId, _user: UserId) -> Result<(), StoreError> {
        // A membership is one row, added in one statement: an addition leaves nothing undone.
        Ok(())
    }

    async fn touch_chat(
        &self,
        chat: ChatId,
        _members: &[UserId],
        activity: SignalId,
        _latest: Option<&Signal>,
    ) -> Result<(), StoreError> {
        // One row per chat: the members' view of it is a join.
        self.with(move |c| {
            c.execute(
                "INSERT INTO chat_activity (chat_id, activity) VALUES (?1, ?2)
                 ON CONFLICT (chat_id) DO UPDATE SET activity = max(activity, ?2)",
                params![blob(chat.0), blob(activity.0)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn untouch_chat(&self, _chat: ChatId, _user: UserId) -> Result<(), StoreError> {
        // Activity is read through membership, which the caller has already removed.
        Ok(())
    }

    async fn chats_by_activity(
        &self,
        user: UserId,
        after: Option<ChatActivity>,
        limit: usize,
    ) -> Result<Vec<ChatActivity>, StoreError> {
        let rows = self
            .with(move |c| {
                let (after_activity, after_chat) = match after {
                    Some(a) => (blob(a.activity.0).to_vec(), blob(a.chat_id.0).to_vec()),
                    None => (vec![0xff; 17], Vec::new()),
                };
                let mut statement = c
                    .prepare_cached(
                        "SELECT a.chat_id, a.activity FROM chat_members m
                         JOIN chat_activity a ON a.chat_id = m.chat_id
                         WHERE m.user_id = ?1 AND (a.activity < ?2 OR (a.activity = ?2 AND a.chat_id > ?3))
                         ORDER BY a.activity DESC, a.chat_id ASC LIMIT ?4",
                    )
                    .map_err(unavailable)?;
                let rows = statement
                    .query_map(
                        params![blob(user.0), after_activity, after_chat, i64::try_from(limit).unwrap_or(i64::MAX)],
                        |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)),
                    )
                    .map_err(unavailable)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(unavailable)?;
                Ok(rows)
            })
            .await?;
        rows.into_iter()
            .map(|(chat, activity)| {
                Ok(ChatActivity {
                    chat_id: ChatId(uuid_from(chat)?),
                    activity: SignalId(uuid_from(activity)?),
                })
            })
            .collect()
    }

    async fn get_signal(&self, chat: ChatId, id: SignalId) -> Result<Option<Signal>, StoreError> {
        Ok(self.get_signals(&[(chat, id)]).await?.pop().flatten())
    }

    async fn get_signals(
        &self,
        ids: &[(ChatId, SignalId)],
    ) -> Result<Vec<Option<Signal>>, StoreError> {
        let ids = ids.to_vec();
        // One hop to the blocking pool and one hold of the connection for them all.
        let rows = self
            .with(move |c| {
                let mut statement = c
                    .prepare_cached(&format!(
                        "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ?1 AND id = ?2"
                    ))
                    .map_err(unavailable)?;
                ids.into_iter()
                    .map(|(chat, id)| {
                        statement
                            .query_row(params![blob(chat.0), blob(id.0)], signal_row)
                            .optional()
                            .map_err(unavailable)
                    })
                    .collect::<Result<Vec<_>, _>>()
            })
            .await?;
        rows.into_iter()
            .map(|row| row.map(to_signal).transpose())
            .collect()
    }

    async fn edit_signal(
        &self,
        chat: ChatId,
        id: SignalId,
        text: &str,
        edited_at: time::OffsetDateTime,
    ) -> Result<Option<Signal>, StoreError> {
        let text = text.to_owned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            // One transaction: a deleted signal stays deleted.
            tx.execute(
                "UPDATE signals SET text = ?3, edited_at = ?4 WHERE chat_id = ?1 AND id = ?2 AND deleted = 0",
                params![blob(chat.0), blob(id.0), text, millis(edited_at)],
            )
            .map_err(unavailable)?;
            let signal = decorated(&tx, chat, id)?;
            tx.commit().map_err(unavailable)?;
            Ok(signal)
        })
        .await
    }

    async fn delete_signal(
        &self,
        chat: ChatId,
        id: SignalId,
    ) -> Result<Option<Signal>, StoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            // The nonce record holds only the signal's id, so the text lives nowhere else.
            tx.execute(
                "UPDATE signals SET deleted = 1, text = NULL WHERE chat_id = ?1 AND id = ?2",
                params![blob(chat.0), blob(id.0)],
            )
            .map_err(unavailable)?;
            let signal = decorated(&tx, chat, id)?;
            tx.commit().map_err(unavailable)?;
            Ok(signal)
        })
        .await
    }

    async fn chat_entries(
        &self,
        user: UserId,
        chats: &[ChatId],
    ) -> Result<Vec<ChatEntry>, StoreError> {
        let chats = chats.to_vec();
        self.with(move |c| {
            let mut entries = Vec::with_capacity(chats.len());
            for chat_id in chats {
                let Some(role) = c
                    .prepare_cached("SELECT role FROM chat_members WHERE chat_id = ?1 AND user_id = ?2")
                    .map_err(unavailable)?
                    .query_row(params![blob(chat_id.0), blob(user.0)], |row| row.get::<_, String>(0))
                    .optional()
                    .map_err(unavailable)?
                else {
                    continue;
                };
                let Some(mut chat) = chat_row(c, chat_id)? else {
                    continue;
                };
                chat.my_role = Some(parse(&role)?);
                let latest: Option<Vec<u8>> = c
                    .prepare_cached("SELECT id FROM signals WHERE chat_id = ?1 ORDER BY id DESC LIMIT 1")
                    .map_err(unavailable)?
                    .query_row(params![blob(chat_id.0)], |row| row.get(0))
                    .optional()
                    .map_err(unavailable)?;
                if let Some(latest) = latest {
                    chat.latest_signal =
                        decorated(c, chat_id, SignalId(uuid_from(latest)?))?.map(Box::new);
                }
                let read_marker: Option<Vec<u8>> = c
                    .prepare_cached(
                        "SELECT up_to FROM markers WHERE chat_id = ?1 AND kind = 'read' AND user_id = ?2",
                    )
                    .map_err(unavailable)?
                    .query_row(params![blob(chat_id.0), blob(user.0)], |row| row.get(0))
                    .optional()
                    .map_err(unavailable)?;
                entries.push(ChatEntry {
                    chat,
                    read_marker: read_marker.map(uuid_from).transpose()?.map(SignalId),
                });
            }
            Ok(entries)
        })
        .await
    }

    async fn signals_after(
        &self,
        chat: ChatId,
        after: SignalId,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError> {
        let rows = self
            .with(move |c| {
                c.prepare_cached(&format!(
                    "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ?1 AND id > ?2 ORDER BY id ASC LIMIT ?3"
                ))
                .map_err(unavailable)?
                .query_map(
                    params![blob(chat.0), blob(after.0), i64::try_from(limit).unwrap_or(i64::MAX)],
                    signal_row,
                )
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)
            })
            .await?;
        rows.into_iter().map(to_signal).collect()
    }

    async fn count_unread(
        &self,
        chat: ChatId,
        after: Option<SignalId>,
        through: Option<SignalId>,
        _chat_created_at: OffsetDateTime,
        reader: UserId,
        cap: usize,
    ) -> Result<usize, StoreError> {
        self.with(move |c| {
            let after = after.map(|a| blob(a.0).to_vec()).unwrap_or_default();
            // Ids are 16 bytes; this one sorts after every id.
            let through = through
                .map(|t| blob(t.0).to_vec())
                .unwrap_or_else(|| vec![0xFF; 17]);
            // Scan at most UNREAD_SCAN_LIMIT signals after the marker; count those that are unread.
            let (scanned, unread): (i64, i64) = c
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(unread), 0) FROM
                     (SELECT (kind = 'message' AND deleted = 0 AND author_id != ?3) AS unread
                      FROM signals WHERE chat_id = ?1 AND id > ?2 AND id <= ?5 ORDER BY id LIMIT ?4)",
                )
                .map_err(unavailable)?
                .query_row(
                    params![
                        blob(chat.0),
                        after,
                        blob(reader.0),
                        i64::try_from(UNREAD_SCAN_LIMIT).unwrap_or(i64::MAX),
                        through
                    ],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .map_err(unavailable)?;
            let unread = usize::try_from(unread).unwrap_or(0);
            if unread >= cap || usize::try_from(scanned).unwrap_or(0) >= UNREAD_SCAN_LIMIT {
                return Ok(cap);
            }
            Ok(unread)
        })
        .await
    }

    async fn add_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let emoji = emoji.to_owned();
        self.with(move |c| {
            let added = c
                .execute(
                    "INSERT OR IGNORE INTO reactions (chat_id, signal_id, emoji, user_id) VALUES (?1, ?2, ?3, ?4)",
                    params![blob(chat.0), blob(signal.0), emoji, blob(user.0)],
                )
                .map_err(unavailable)?;
            Ok(added == 1)
        })
        .await
    }

    async fn remove_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let emoji = emoji.to_owned();
        self.with(move |c| {
            let removed = c
                .execute(
                    "DELETE FROM reactions WHERE chat_id = ?1 AND signal_id = ?2 AND emoji = ?3 AND user_id = ?4",
                    params![blob(chat.0), blob(signal.0), emoji, blob(user.0)],
                )
                .map_err(unavailable)?;
            Ok(removed == 1)
        })
        .await
    }

    async fn has_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let emoji = emoji.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT EXISTS (SELECT 1 FROM reactions WHERE chat_id = ?1 AND signal_id = ?2 AND emoji = ?3 AND user_id = ?4)",
                params![blob(chat.0), blob(signal.0), emoji, blob(user.0)],
                |row| row.get::<_, bool>(0),
            )
            .map_err(unavailable)
        })
        .await
    }

    async fn reaction_counts_of(
        &self,
        chat: ChatId,
        signals: &[SignalId],
    ) -> Result<HashMap<SignalId, BTreeMap<String, i64>>, StoreError> {
        let signals: Vec<(ChatId, SignalId)> = signals.iter().map(|&id| (chat, id)).collect();
        self.reaction_counts_across(&signals).await
    }

    async fn reaction_counts_across(
        &self,
        signals: &[(ChatId, SignalId)],
    ) -> Result<HashMap<SignalId, BTreeMap<String, i64>>, StoreError> {
        let signals = signals.to_vec();
        self.with(move |c| {
            let mut counts = HashMap::new();
            for (chat, signal) in signals {
                let of_signal = reaction_counts(c, chat, signal)?;
                if !of_signal.is_empty() {
                    counts.insert(signal, of_signal);
                }
            }
            Ok(counts)
        })
        .await
    }

    async fn reactions_page(
        &self,
        chat: ChatId,
        signal: SignalId,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        let (after_emoji, after_user) = match after {
            Some((emoji, user)) => (emoji, blob(user.0).to_vec()),
            None => (String::new(), Vec::new()),
        };
        let rows = self
            .with(move |c| {
                all(
                    c,
                    "SELECT emoji, user_id FROM reactions WHERE chat_id = ?1 AND signal_id = ?2
                     AND (emoji > ?3 OR (emoji = ?3 AND user_id > ?4)) ORDER BY emoji, user_id LIMIT ?5",
                    params![
                        blob(chat.0),
                        blob(signal.0),
                        after_emoji,
                        after_user,
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?)),
                )
            })
            .await?;
        rows.into_iter()
            .map(|(emoji, user)| Ok((emoji, UserId(uuid_from(user)?))))
            .collect()
    }

    /// One row per attachment, its kind a column: a changed kind moves it by itself.
    async fn put_attachment(&self, attachment: &Attachment) -> Result<(), StoreError> {
        let body =
            serde_json::to_string(attachment).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let (id, chat, kind) = (attachment.id, attachment.chat_id, attachment.kind);
        let blobs: Vec<String> = attachment.blobs().into_iter().map(str::to_owned).collect();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO attachments (id, chat_id, kind, body) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body, kind = excluded.kind",
                params![blob(id), blob(chat.0), kind.as_str(), body],
            )
            .map_err(unavailable)?;
            for sha in blobs {
                tx.execute(
                    "INSERT OR IGNORE INTO blob_refs (sha256, attachment_id) VALUES (?1, ?2)",
                    params![sha, blob(id)],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    /// One transaction: the record is read and written with nothing in between, and the kind
    /// column is the list.
    async fn update_derived(
        &self,
        id: Uuid,
        _chat: ChatId,
        _stored_as: AttachmentKind,
        kind: AttachmentKind,
        image: Option<&ImageInfo>,
    ) -> Result<Option<Attachment>, StoreError> {
        let image = image.cloned();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let Some(mut attachment) = attachment_record(&tx, id)? else {
                return Ok(None);
            };
            attachment.kind = kind;
            attachment.image = image;
            let body = serde_json::to_string(&attachment)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.execute(
                "UPDATE attachments SET kind = ?2, body = ?3 WHERE id = ?1",
                params![blob(id), kind.as_str(), body],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(Some(attachment))
        })
        .await
    }

    async fn claim_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<Vec<(Uuid, SignalId)>, StoreError> {
        let ids = ids.to_vec();
        self.with(move |c| {
            // One transaction: of two claims of one attachment, the second reads the first's,
            // and a claim taken over is the one read, its message still not stored.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let now = OffsetDateTime::now_utc();
            let mut holders = Vec::with_capacity(ids.len());
            for id in ids {
                let Some(mut attachment) = attachment_in(&tx, id, chat)? else {
                    continue;
                };
                // Held, unless orphaned: old, and its message not stored.
                if let Some(holder) = attachment.message_id
                    && (!claim_orphaned(holder, now) || signal_stored(&tx, chat, holder)?)
                {
                    holders.push((id, holder));
                    continue;
                }
                attachment.message_id = Some(message);
                write_attachment_body(&tx, &attachment)?;
                holders.push((id, message));
            }
            tx.commit().map_err(unavailable)?;
            Ok(holders)
        })
        .await
    }

    async fn release_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            for id in ids {
                let Some(mut attachment) = attachment_in(&tx, id, chat)? else {
                    continue;
                };
                if attachment.message_id != Some(message) {
                    continue;
                }
                attachment.message_id = None;
                write_attachment_body(&tx, &attachment)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    /// The chat's lists are the records themselves: the claim is listed already.
    async fn list_claimed_attachments(
        &self,
        _chat: ChatId,
        _ids: &[Uuid],
        _message: SignalId,
    ) -> Result<(), StoreError> {
        Ok(())
    }

    async fn add_blob_refs(&self, attachment: Uuid, blobs: &[String]) -> Result<(), StoreError> {
        let blobs = blobs.to_vec();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            for sha in blobs {
                tx.execute(
                    "INSERT OR IGNORE INTO blob_refs (sha256, attachment_id) VALUES (?1, ?2)",
                    params![sha, blob(attachment)],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_attachments(&self, ids: &[Uuid]) -> Result<Vec<Attachment>, StoreError> {
        let ids = ids.to_vec();
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT body FROM attachments WHERE id = ?1")
                .map_err(unavailable)?;
            let mut found = Vec::new();
            for id in ids {
                let body: Option<String> = statement
                    .query_row(params![blob(id)], |row| row.get(0))
                    .optional()
                    .map_err(unavailable)?;
                if let Some(body) = body {
                    found.push(
                        serde_json::from_str(&body)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    );
                }
            }
            Ok(found)
        })
        .await
    }

    async fn chat_attachments(
        &self,
        chat: ChatId,
        kind: Option<AttachmentKind>,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Attachment>, StoreError> {
        // The largest id, so "before" it is everything.
        let before = before.unwrap_or(Uuid::max());
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            let bodies: Vec<String> = match kind {
                Some(kind) => all(
                    c,
                    "SELECT body FROM attachments WHERE chat_id = ?1 AND kind = ?2 AND id < ?3
                     ORDER BY id DESC LIMIT ?4",
                    params![blob(chat.0), kind.as_str(), blob(before), limit],
                    |row| row.get(0),
                )?,
                None => all(
                    c,
                    "SELECT body FROM attachments WHERE chat_id = ?1 AND id < ?2
                     ORDER BY id DESC LIMIT ?3",
                    params![blob(chat.0), blob(before), limit],
                    |row| row.get(0),
                )?,
            };
            bodies
                .iter()
                .map(|body| {
                    serde_json::from_str(body).map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .collect()
        })
        .await
    }

    async fn delete_attachments(&self, attachments: &[Attachment]) -> Result<(), StoreError> {
        let ids: Vec<Uuid> = attachments.iter().map(|a| a.id).collect();
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            for id in ids {
                tx.execute("DELETE FROM attachments WHERE id = ?1", params![blob(id)])
                    .map_err(unavailable)?;
                tx.execute(
                    "DELETE FROM blob_refs WHERE attachment_id = ?1",
                    params![blob(id)],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn blob_referrers(
        &self,
        sha256: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        let sha = sha256.to_owned();
        let after = blob(after.unwrap_or(Uuid::nil()));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with(move |c| {
            let mut statement = c
                .prepare_cached(
                    "SELECT attachment_id FROM blob_refs WHERE sha256 = ?1 AND attachment_id > ?2 \
                     ORDER BY attachment_id LIMIT ?3",
                )
                .map_err(unavailable)?;
            let ids = statement
                .query_map(params![sha, after, limit], |row| row.get::<_, Vec<u8>>(0))
                .map_err(unavailable)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(unavailable)?;
            ids.into_iter().map(uuid_from).collect()
        })
        .await
    }

    async fn drop_blob_ref(&self, sha256: &str, attachment: Uuid) -> Result<(), StoreError> {
        let sha = sha256.to_owned();
        self.with(move |c| {
            c.execute(
                "DELETE FROM blob_refs WHERE sha256 = ?1 AND attachment_id = ?2",
                params![sha, blob(attachment)],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn condemn_blob(
        &self,
        sha256: &str,
        run: Uuid,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let sha = sha256.to_owned();
        self.with(move |c| {
            c.execute(
                "INSERT INTO blob_marks (sha256, run, until_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sha256, run) DO UPDATE SET until_ms = excluded.until_ms",
                params![sha, run.to_string(), millis(until)],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn blob_condemned(&self, sha256: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        let sha = sha256.to_owned();
        let until: Option<i64> = self
            .with(move |c| {
                c.query_row(
                    "SELECT MAX(until_ms) FROM blob_marks WHERE sha256 = ?1",
                    params![sha],
                    |row| row.get::<_, Option<i64>>(0),
                )
                .map_err(unavailable)
            })
            .await?;
        until.map(from_millis).transpose()
    }

    async fn absolve_blob(&self, sha256: &str, run: Uuid) -> Result<(), StoreError> {
        let sha = sha256.to_owned();
        self.with(move |c| {
            c.execute(
                "DELETE FROM blob_marks WHERE sha256 = ?1 AND run = ?2",
                params![sha, run.to_string()],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn put_small_object(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let sha = sha256.to_owned();
        let bytes = bytes.to_vec();
        let now = millis(OffsetDateTime::now_utc());
        self.with(move |c| {
            c.execute(
                "INSERT INTO small_objects (sha256, bytes, stored_at_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT (sha256) DO UPDATE SET stored_at_ms = excluded.stored_at_ms",
                params![sha, bytes, now],
            )
            .map(|_| ())
            .map_err(unavailable)
        })
        .await
    }

    async fn small_object(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let sha = sha256.to_owned();
        self.with(move |c| {
            c.query_row(
                "SELECT bytes FROM small_objects WHERE sha256 = ?1",
                params![sha],
                |row| row.get(0),
            )
            .optional()
            .map_err(unavailable)
        })
        .await
    }

    async fn delete_small_object(&self, sha256: &str) -> Result<(), StoreError> {
        let sha = sha256.to_owned();
        self.with(move |c| {
            c.execute("DELETE FROM small_objects WHERE sha256 = ?1", params![sha])
                .map(|_| ())
                .map_err(unavailable)
        })
        .await
    }

    async fn small_objects(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SmallObjectInfo>, StoreError> {
        let after = after.unwrap_or("").to_owned();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let listed: Vec<(String, i64, i64)> = self
            .with(move |c| {
                let mut statement = c
                    .prepare_cached(
                        "SELECT sha256, length(bytes), stored_at_ms FROM small_objects
                         WHERE sha256 > ?1 ORDER BY sha256 LIMIT ?2",
                    )
                    .map_err(unavailable)?;
                let rows = statement
                    .query_map(params![after, limit], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })
                    .map_err(unavailable)?;
                rows.collect::<Result<_, _>>().map_err(unavailable)
            })
            .await?;
        listed
            .into_iter()
            .map(|(sha256, size, stored_at)| {
                Ok(SmallObjectInfo {
                    sha256,
                    size: u64::try_from(size).unwrap_or(0),
                    stored_at: from_millis(stored_at)?,
                })
            })
            .collect()
    }

    async fn advance_marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
        up_to: SignalId,
    ) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "INSERT INTO markers (chat_id, kind, user_id, up_to) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (chat_id, kind, user_id) DO UPDATE SET up_to = max(up_to, ?4)",
                params![blob(chat.0), kind.as_str(), blob(user.0), blob(up_to.0)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<SignalId>, StoreError> {
        let row = self
            .with(move |c| {
                c.query_row(
                    "SELECT up_to FROM markers WHERE chat_id = ?1 AND kind = ?2 AND user_id = ?3",
                    params![blob(chat.0), kind.as_str(), blob(user.0)],
                    |row| row.get::<_, Vec<u8>>(0),
                )
                .optional()
                .map_err(unavailable)
            })
            .await?;
        row.map(|r| uuid_from(r).map(SignalId)).transpose()
    }

    async fn create_call(&self, call: &CallRecord) -> Result<Option<CallRecord>, StoreError> {
        let call = call.clone();
        self.with(move |c| {
            // One write transaction: of starts racing in one chat, the first stores its call and
            // the others find it live.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let live: Option<(Vec<u8>, Vec<u8>, i64, i64, String)> = tx
                .query_row(
                    "SELECT id, started_by, started_at, ring_until, status FROM calls
                     WHERE chat_id = ?1 AND status IN ('ringing', 'active') ORDER BY id LIMIT 1",
                    params![blob(call.chat_id.0)],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
                )
                .optional()
                .map_err(unavailable)?;
            if let Some((id, started_by, started_at, ring_until, status)) = live {
                let id = uuid_from(id)?;
                if id != call.id {
                    return Ok(Some(CallRecord {
                        id,
                        chat_id: call.chat_id,
                        started_by: UserId(uuid_from(started_by)?),
                        started_at: from_millis(started_at)?,
                        ring_until: from_millis(ring_until)?,
                        status: parse(&status)?,
                    }));
                }
            }
            tx.execute(
                "INSERT OR IGNORE INTO calls (id, chat_id, started_by, started_at, ring_until, status)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    blob(call.id),
                    blob(call.chat_id.0),
                    blob(call.started_by.0),
                    millis(call.started_at),
                    millis(call.ring_until),
                    call.status.as_str()
                ],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT OR IGNORE INTO call_participants (call_id, user_id) VALUES (?1, ?2)",
                params![blob(call.id), blob(call.started_by.0)],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT OR IGNORE INTO listed_calls (due, call_id, chat_id) VALUES (?1, ?2, ?3)",
                params![millis(call.ring_until), blob(call.id), blob(call.chat_id.0)],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(None)
        })
        .await
    }

    async fn get_call(&self, id: Uuid) -> Result<Option<CallRecord>, StoreError> {
        self.with(move |c| {
            let row: Option<(Vec<u8>, Vec<u8>, i64, i64, String)> = c
                .query_row(
                    "SELECT chat_id, started_by, started_at, ring_until, status FROM calls WHERE id = ?1",
                    params![blob(id)],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(chat_id, started_by, started_at, ring_until, status)| {
                Ok(CallRecord {
                    id,
                    chat_id: ChatId(uuid_from(chat_id)?),
                    started_by: UserId(uuid_from(started_by)?),
                    started_at: from_millis(started_at)?,
                    ring_until: from_millis(ring_until)?,
                    status: parse(&status)?,
                })
            })
            .transpose()
        })
        .await
    }

    async fn transition_call(
        &self,
        id: Uuid,
        from: CallStatus,
        to: CallStatus,
    ) -> Result<bool, StoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let changed = tx
                .execute(
                    "UPDATE calls SET status = ?1 WHERE id = ?2 AND status = ?3",
                    params![to.as_str(), blob(id), from.as_str()],
                )
                .map_err(unavailable)?;
            // An answered call leaves the sweeper's list; a missed or ended one stays until its
            // signal is written.
            if changed == 1 && from == CallStatus::Ringing && to.is_live() {
                tx.execute(
                    "DELETE FROM listed_calls WHERE call_id = ?1
                     AND due = (SELECT ring_until FROM calls WHERE id = ?1)",
                    params![blob(id)],
                )
                .map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(changed == 1)
        })
        .await
    }

    async fn live_calls(&self, chat: ChatId) -> Result<Vec<CallRecord>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached(
                    "SELECT id, started_by, started_at, ring_until, status FROM calls
                     WHERE chat_id = ?1 AND status IN ('ringing', 'active') ORDER BY id",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![blob(chat.0)], |row| {
                    Ok((
                        row.get::<_, Vec<u8>>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, String>(4)?,
                    ))
                })
                .map_err(unavailable)?;
            rows.map(|row| {
                let (id, started_by, started_at, ring_until, status) = row.map_err(unavailable)?;
                Ok(CallRecord {
                    id: uuid_from(id)?,
                    chat_id: chat,
                    started_by: UserId(uuid_from(started_by)?),
                    started_at: from_millis(started_at)?,
                    ring_until: from_millis(ring_until)?,
                    status: parse(&status)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn call_participants(&self, id: Uuid) -> Result<Vec<UserId>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT user_id FROM call_participants WHERE call_id = ?1")
                .map_err(unavailable)?;
            let users = statement
                .query_map(params![blob(id)], |row| row.get::<_, Vec<u8>>(0))
                .map_err(unavailable)?
                .map(|user| Ok(UserId(uuid_from(user.map_err(unavailable)?)?)))
                .collect::<Result<Vec<UserId>, StoreError>>()?;
            Ok(users)
        })
        .await
    }

    async fn remove_call_participant(&self, id: Uuid, user: UserId) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "DELETE FROM call_participants WHERE call_id = ?1 AND user_id = ?2",
                params![blob(id), blob(user.0)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn put_call_participant(
        &self,
        id: Uuid,
        user: UserId,
        join: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        self.with(move |c| {
            // One hold of the connection: of joins racing, the first puts the row in, and every
            // one reads back the join it holds.
            c.execute(
                "INSERT OR IGNORE INTO call_participants (call_id, user_id, join_id) VALUES (?1, ?2, ?3)",
                params![blob(id), blob(user.0), blob(join)],
            )
            .map_err(unavailable)?;
            participant_join(c, id, user)
        })
        .await
    }

    async fn call_participant_join(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<Uuid>, StoreError> {
        self.with(move |c| participant_join(c, id, user)).await
    }

    async fn pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<PendingCallSignal>, StoreError> {
        self.with(move |c| {
            let row: Option<(String, Vec<u8>)> = c
                .query_row(
                    "SELECT state, change_id FROM pending_call_signals WHERE call_id = ?1 AND user_id = ?2",
                    params![blob(id), blob(user.0)],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )
                .optional()
                .map_err(unavailable)?;
            row.map(|(state, token)| {
                Ok(PendingCallSignal {
                    state: parse(&state)?,
                    token: uuid_from(token)?,
                })
            })
            .transpose()
        })
        .await
    }

    async fn set_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        pending: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        let pending = *pending;
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO pending_call_signals (call_id, user_id, state, change_id)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    blob(id),
                    blob(user.0),
                    pending.state.as_str(),
                    blob(pending.token)
                ],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn forget_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        done: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        let done = *done;
        self.with(move |c| {
            c.execute(
                "DELETE FROM pending_call_signals
                 WHERE call_id = ?1 AND user_id = ?2 AND state = ?3 AND change_id = ?4",
                params![
                    blob(id),
                    blob(user.0),
                    done.state.as_str(),
                    blob(done.token)
                ],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn list_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        let call = *call;
        self.with(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO listed_calls (due, call_id, chat_id) VALUES (?1, ?2, ?3)",
                params![millis(call.due), blob(call.id), blob(call.chat_id.0)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn listed_calls_due(
        &self,
        now: OffsetDateTime,
        after: Option<&ListedCall>,
        limit: usize,
    ) -> Result<Vec<ListedCall>, StoreError> {
        // Before every listing when there is no `after`: no time is earlier than `i64::MIN`.
        let (after_due, after_id) = match after {
            Some(after) => (millis(after.due), blob(after.id).to_vec()),
            None => (i64::MIN, Vec::new()),
        };
        self.with(move |c| {
            let mut statement = c
                .prepare_cached(
                    "SELECT due, call_id, chat_id FROM listed_calls
                     WHERE due <= ?1 AND (due, call_id) > (?2, ?3)
                     ORDER BY due, call_id LIMIT ?4",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(
                    params![
                        millis(now),
                        after_due,
                        after_id,
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            row.get::<_, Vec<u8>>(1)?,
                            row.get::<_, Vec<u8>>(2)?,
                        ))
                    },
                )
                .map_err(unavailable)?;
            rows.map(|row| {
                let (due, id, chat_id) = row.map_err(unavailable)?;
                Ok(ListedCall {
                    id: uuid_from(id)?,
                    chat_id: ChatId(uuid_from(chat_id)?),
                    due: from_millis(due)?,
                })
            })
            .collect()
        })
        .await
    }

    async fn forget_listed_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        let call = *call;
        self.with(move |c| {
            c.execute(
                "DELETE FROM listed_calls WHERE due = ?1 AND call_id = ?2",
                params![millis(call.due), blob(call.id)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn markers_page(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<(UserId, SignalId)>, StoreError> {
        let after = after.map(|a| blob(a.0).to_vec()).unwrap_or_default();
        let rows = self
            .with(move |c| {
                all(
                    c,
                    "SELECT user_id, up_to FROM markers WHERE chat_id = ?1 AND kind = ?2 AND user_id > ?3
                     ORDER BY user_id LIMIT ?4",
                    params![blob(chat.0), kind.as_str(), after, i64::try_from(limit).unwrap_or(i64::MAX)],
                    |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)),
                )
            })
            .await?;
        rows.into_iter()
            .map(|(user, up_to)| Ok((UserId(uuid_from(user)?), SignalId(uuid_from(up_to)?))))
            .collect()
    }

    async fn outbox_put(&self, writer: Uuid, entry: &OutboxEntry) -> Result<(), StoreError> {
        let entry = entry.clone();
        self.with(move |c| {
            c.execute(
                "INSERT OR REPLACE INTO event_outbox (writer, bucket, id, envelope) VALUES (?1, ?2, ?3, ?4)",
                params![blob(writer), entry.bucket, blob(entry.id), entry.envelope],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn outbox_remove(
        &self,
        writer: Uuid,
        bucket: i64,
        ids: &[Uuid],
    ) -> Result<(), StoreError> {
        let ids = ids.to_vec();
        self.with(move |c| {
            let tx = c.transaction().map_err(unavailable)?;
            {
                let mut delete = tx
                    .prepare_cached(
                        "DELETE FROM event_outbox WHERE writer = ?1 AND bucket = ?2 AND id = ?3",
                    )
                    .map_err(unavailable)?;
                for id in ids {
                    delete
                        .execute(params![blob(writer), bucket, blob(id)])
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn outbox_entries(
        &self,
        writer: Uuid,
        from: i64,
        to: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached(
                    "SELECT bucket, id, envelope FROM event_outbox
                     WHERE writer = ?1 AND bucket BETWEEN ?2 AND ?3 ORDER BY bucket, id",
                )
                .map_err(unavailable)?;
            let rows = statement
                .query_map(params![blob(writer), from, to], |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, Vec<u8>>(1)?,
                        row.get(2)?,
                    ))
                })
                .map_err(unavailable)?;
            let mut found = Vec::new();
            for row in rows {
                let (bucket, id, envelope) = row.map_err(unavailable)?;
                found.push(OutboxEntry {
                    bucket,
                    id: uuid_from(id)?,
                    envelope,
                });
            }
            Ok(found)
        })
        .await
    }

    async fn outbox_heartbeat(
        &self,
        writer: Uuid,
        entries_from_ms: i64,
        seen_ms: i64,
    ) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                // The column keeps its first name (the writer's start).
                "INSERT OR REPLACE INTO outbox_writers (writer, started_ms, seen_ms) VALUES (?1, ?2, ?3)",
                params![blob(writer), entries_from_ms, seen_ms],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn outbox_writers(&self) -> Result<Vec<OutboxWriter>, StoreError> {
        self.with(move |c| {
            let mut statement = c
                .prepare_cached("SELECT writer, started_ms, seen_ms FROM outbox_writers")
                .map_err(unavailable)?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get(1)?, row.get(2)?))
                })
                .map_err(unavailable)?;
            let mut found = Vec::new();
            for row in rows {
                let (writer, entries_from_ms, seen_ms) = row.map_err(unavailable)?;
                found.push(OutboxWriter {
                    writer: uuid_from(writer)?,
                    entries_from_ms,
                    seen_ms,
                });
            }
            Ok(found)
        })
        .await
    }

    async fn outbox_claim(
        &self,
        writer: Uuid,
        sweeper: Uuid,
        claim_ttl_secs: i32,
    ) -> Result<bool, StoreError> {
        let now = millis(OffsetDateTime::now_utc());
        let until = now + i64::from(claim_ttl_secs) * 1000;
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            tx.execute(
                "DELETE FROM outbox_sweeps WHERE writer = ?1 AND until_ms < ?2",
                params![blob(writer), now],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT OR IGNORE INTO outbox_sweeps (writer, sweeper, until_ms) VALUES (?1, ?2, ?3)",
                params![blob(writer), blob(sweeper), until],
            )
            .map_err(unavailable)?;
            let holder: Vec<u8> = tx
                .query_row(
                    "SELECT sweeper FROM outbox_sweeps WHERE writer = ?1",
                    params![blob(writer)],
                    |row| row.get(0),
                )
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(uuid_from(holder)? == sweeper)
        })
        .await
    }

    async fn outbox_forget_writer(&self, writer: Uuid) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "DELETE FROM outbox_writers WHERE writer = ?1",
                params![blob(writer)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }
    async fn delete_chat(&self, chat: ChatId) -> Result<(), StoreError> {
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let id = blob(chat.0);
            tx.execute(
                "DELETE FROM blob_refs WHERE attachment_id IN (SELECT id FROM attachments WHERE chat_id = ?1)",
                params![id],
            )
            .map_err(unavailable)?;
            // Its members' memberships end with it.
            let members = all(
                &tx,
                "SELECT user_id FROM chat_members WHERE chat_id = ?1",
                params![id],
                |row| row.get::<_, Vec<u8>>(0),
            )?;
            for member in members {
                record_left_chat(&tx, chat, UserId(uuid_from(member)?))?;
            }
            for table in [
                "attachments",
                "chat_member_settings",
                "signal_nonces",
                "markers",
                "reactions",
                "chat_activity",
                "signals",
                "chat_members",
            ] {
                tx.execute(&format!("DELETE FROM {table} WHERE chat_id = ?1"), params![id])
                    .map_err(unavailable)?;
            }
            tx.execute("DELETE FROM chats WHERE id = ?1", params![id])
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn create_circle(&self, circle: &Circle) -> Result<(), StoreError> {
        let circle = circle.clone();
        let code = circle
            .access_code
            .clone()
            .ok_or_else(|| StoreError::Corrupt("a circle needs an access code".into()))?;
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            tx.execute(
                "INSERT INTO circles (id, name, description, rules, owner_id, access_code, max_members, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    blob(circle.id.0),
                    circle.name,
                    circle.description,
                    circle.rules,
                    blob(circle.owner_id.0),
                    code,
                    circle.max_members,
                    millis(circle.created_at),
                    millis(circle.expires_at)
                ],
            )
            .map_err(unavailable)?;
            tx.execute(
                "INSERT OR REPLACE INTO circle_codes (code, circle_id) VALUES (?1, ?2)",
                params![code, blob(circle.id.0)],
            )
            .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn get_circle(&self, id: CircleId) -> Result<Option<Circle>, StoreError> {
        type Row = (
            String,
            Option<String>,
            Option<String>,
            Vec<u8>,
            String,
            u32,
            i64,
            i64,
        );
        let row: Option<Row> = self
            .with(move |c| {
                c.query_row(
                    "SELECT name, description, rules, owner_id, access_code, max_members, created_at, expires_at
                     FROM circles WHERE id = ?1",
                    params![blob(id.0)],
                    |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get(3)?,
                            r.get(4)?,
                            r.get(5)?,
                            r.get(6)?,
                            r.get(7)?,
                        ))
                    },
                )
                .optional()
                .map_err(unavailable)
            })
            .await?;
        row.map(
            |(name, description, rules, owner, code, max_members, created, expires)| {
                Ok(Circle {
                    id,
                    name,
                    description,
                    rules,
                    owner_id: UserId(uuid_from(owner)?),
                    access_code: Some(code),
                    max_members,
                    created_at: from_millis(created)?,
                    expires_at: from_millis(expires)?,
                })
            },
        )
        .transpose()
    }

    async fn circle_by_code(&self, code: &str) -> Result<Option<CircleId>, StoreError> {
        let code = code.to_owned();
        let row = self
            .with(move |c| {
                c.query_row(
                    "SELECT circle_id FROM circle_codes WHERE code = ?1",
                    params![code],
                    |r| r.get::<_, Vec<u8>>(0),
                )
                .optional()
                .map_err(unavailable)
            })
            .await?;
        row.map(|id| uuid_from(id).map(CircleId)).transpose()
    }

    async fn rotate_circle_code(
        &self,
        id: CircleId,
        old: &str,
        new: &str,
    ) -> Result<(), StoreError> {
        let (old, new) = (old.to_owned(), new.to_owned());
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            tx.execute(
                "INSERT OR REPLACE INTO circle_codes (code, circle_id) VALUES (?1, ?2)",
                params![new, blob(id.0)],
            )
            .map_err(unavailable)?;
            tx.execute(
                "UPDATE circles SET access_code = ?1 WHERE id = ?2",
                params![new, blob(id.0)],
            )
            .map_err(unavailable)?;
            tx.execute("DELETE FROM circle_codes WHERE code = ?1", params![old])
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn put_circle_member(
        &self,
        circle: CircleId,
        member: &CircleMember,
        max_members: u32,
    ) -> Result<MemberPut, StoreError> {
        let member = member.clone();
        self.with(move |c| {
            // Counted and added under SQLite's write lock: racing joins take the last seat once.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let renamed = tx
                .execute(
                    "UPDATE circle_members SET display_name = ?3 WHERE circle_id = ?1 AND user_id = ?2",
                    params![blob(circle.0), blob(member.user_id.0), member.display_name],
                )
                .map_err(unavailable)?;
            let put = if renamed > 0 {
                MemberPut::Renamed
            } else {
                let taken: i64 = tx
                    .query_row(
                        "SELECT COUNT(*) FROM circle_members WHERE circle_id = ?1",
                        params![blob(circle.0)],
                        |r| r.get(0),
                    )
                    .map_err(unavailable)?;
                if taken >= i64::from(max_members) {
                    MemberPut::Full
                } else {
                    tx.execute(
                        "INSERT INTO circle_members (circle_id, user_id, display_name, joined_at) VALUES (?1, ?2, ?3, ?4)",
                        params![
                            blob(circle.0),
                            blob(member.user_id.0),
                            member.display_name,
                            millis(member.joined_at)
                        ],
                    )
                    .map_err(unavailable)?;
                    MemberPut::Added
                }
            };
            tx.commit().map_err(unavailable)?;
            Ok(put)
        })
        .await
    }

    async fn circle_members(&self, circle: CircleId) -> Result<Vec<CircleMember>, StoreError> {
        let rows = self
            .with(move |c| {
                all(
                    c,
                    "SELECT user_id, display_name, joined_at FROM circle_members WHERE circle_id = ?1
                     ORDER BY user_id",
                    params![blob(circle.0)],
                    |r| {
                        Ok((
                            r.get::<_, Vec<u8>>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, i64>(2)?,
                        ))
                    },
                )
            })
            .await?;
        rows.into_iter()
            .map(|(user, display_name, joined)| {
                Ok(CircleMember {
                    user_id: UserId(uuid_from(user)?),
                    display_name,
                    joined_at: from_millis(joined)?,
                })
            })
            .collect()
    }

    async fn remove_circle_member(&self, circle: CircleId, user: UserId) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "DELETE FROM circle_members WHERE circle_id = ?1 AND user_id = ?2",
                params![blob(circle.0), blob(user.0)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn record_circle_removal(
        &self,
        circle: CircleId,
        user: UserId,
        _circle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // The sweep's transaction removes the row with the circle's: no expiry of its own.
        let now = millis(OffsetDateTime::now_utc());
        self.with(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO circle_removals (circle_id, user_id, removed_at) VALUES (?1, ?2, ?3)",
                params![blob(circle.0), blob(user.0), now],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn removed_from_circle(
        &self,
        circle: CircleId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.with(move |c| {
            c.query_row(
                "SELECT 1 FROM circle_removals WHERE circle_id = ?1 AND user_id = ?2",
                params![blob(circle.0), blob(user.0)],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(unavailable)
        })
        .await
    }

    async fn add_circle_chat(&self, circle: CircleId, chat: ChatId) -> Result<(), StoreError> {
        self.with(move |c| {
            c.execute(
                "INSERT OR IGNORE INTO circle_chats (circle_id, chat_id) VALUES (?1, ?2)",
                params![blob(circle.0), blob(chat.0)],
            )
            .map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn circle_chats(&self, circle: CircleId) -> Result<Vec<ChatId>, StoreError> {
        let rows = self
            .with(move |c| {
                all(
                    c,
                    "SELECT chat_id FROM circle_chats WHERE circle_id = ?1",
                    params![blob(circle.0)],
                    |r| r.get::<_, Vec<u8>>(0),
                )
            })
            .await?;
        rows.into_iter()
            .map(|id| uuid_from(id).map(ChatId))
            .collect()
    }

    async fn expired_circles(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CircleId>, StoreError> {
        let rows = self
            .with(move |c| {
                all(
                    c,
                    "SELECT id FROM circles WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2",
                    params![millis(now), i64::try_from(limit).unwrap_or(i64::MAX)],
                    |r| r.get::<_, Vec<u8>>(0),
                )
            })
            .await?;
        rows.into_iter()
            .map(|id| uuid_from(id).map(CircleId))
            .collect()
    }

    async fn delete_circle(&self, id: CircleId) -> Result<(), StoreError> {
        let pool = circle_pool(id);
        self.with(move |c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            let key = blob(id.0);
            tx.execute("DELETE FROM pairing_slots WHERE pool = ?1", params![pool])
                .map_err(unavailable)?;
            tx.execute(
                "DELETE FROM circle_codes WHERE circle_id = ?1",
                params![key],
            )
            .map_err(unavailable)?;
            for table in ["circle_members", "circle_removals", "circle_chats"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE circle_id = ?1"),
                    params![key],
                )
                .map_err(unavailable)?;
            }
            tx.execute("DELETE FROM circles WHERE id = ?1", params![key])
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)
        })
        .await
    }

    async fn slots(&self, pool: &str) -> Result<Vec<Slot>, StoreError> {
        let pool = pool.to_owned();
        self.with(move |c| {
            let rows = all(
                c,
                "SELECT user_id, kind, state, since, partner, chat_id, previous, version
                 FROM pairing_slots WHERE pool = ?1",
                params![pool],
                |r| {
                    Ok((
                        r.get::<_, Vec<u8>>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<Vec<u8>>>(4)?,
                        r.get::<_, Option<Vec<u8>>>(5)?,
                        r.get::<_, Option<Vec<u8>>>(6)?,
                        r.get::<_, i64>(7)?,
                    ))
                },
            )?;
            rows.into_iter()
                .map(
                    |(user, kind, state, since, partner, chat, previous, version)| {
                        Ok(Slot {
                            user_id: UserId(uuid_from(user)?),
                            kind,
                            state: SlotState::parse(&state)?,
                            since: from_millis(since)?,
                            partner: partner.map(uuid_from).transpose()?.map(UserId),
                            chat: chat.map(uuid_from).transpose()?.map(ChatId),
                            previous: previous.map(uuid_from).transpose()?.map(UserId),
                            version,
                        })
                    },
                )
                .collect()
        })
        .await
    }

    async fn write_slots(&self, pool: &str, writes: &[SlotWrite]) -> Result<bool, StoreError> {
        let pool = pool.to_owned();
        let writes = writes.to_vec();
        self.with(move |c| {
            // One IMMEDIATE transaction: every condition is checked and every row written under
            // SQLite's write lock, so racing handles (and processes) apply one write set at a time.
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(unavailable)?;
            for write in &writes {
                let changed = match write {
                    SlotWrite::Create(slot) => tx
                        .execute(
                            "INSERT INTO pairing_slots (pool, user_id, kind, state, since, partner, chat_id, previous, version)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (pool, user_id) DO NOTHING",
                            params![
                                pool,
                                blob(slot.user_id.0),
                                slot.kind,
                                slot.state.as_str(),
                                millis(slot.since),
                                slot.partner.map(|u| blob(u.0)),
                                slot.chat.map(|c| blob(c.0)),
                                slot.previous.map(|u| blob(u.0)),
                                slot.version
                            ],
                        )
                        .map_err(unavailable)?,
                    SlotWrite::Replace { expected, slot } => tx
                        .execute(
                            "UPDATE pairing_slots SET kind = ?3, state = ?4, since = ?5, partner = ?6, chat_id = ?7,
                             previous = ?8, version = ?9 WHERE pool = ?1 AND user_id = ?2 AND version = ?10",
                            params![
                                pool,
                                blob(slot.user_id.0),
                                slot.kind,
                                slot.state.as_str(),
                                millis(slot.since),
                                slot.partner.map(|u| blob(u.0)),
                                slot.chat.map(|c| blob(c.0)),
                                slot.previous.map(|u| blob(u.0)),
                                slot.version,
                                expected
                            ],
                        )
                        .map_err(unavailable)?,
                    SlotWrite::Delete { user, expected } => tx
                        .execute(
                            "DELETE FROM pairing_slots WHERE pool = ?1 AND user_id = ?2 AND version = ?3",
                            params![pool, blob(user.0), expected],
                        )
                        .map_err(unavailable)?,
                };
                if changed != 1 {
                    // Dropping the transaction rolls every earlier write back.
                    return Ok(false);
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(true)
        })
        .await
    }
}

/// Attachment `id`'s record, when it exists.
fn attachment_record(
    tx: &rusqlite::Transaction<'_>,
    id: Uuid,
) -> Result<Option<Attachment>, StoreError> {
    let body: Option<String> = tx
        .query_row(
            "SELECT body FROM attachments WHERE id = ?1",
            params![blob(id)],
            |row| row.get(0),
        )
        .optional()
        .map_err(unavailable)?;
    body.map(|body| serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string())))
        .transpose()
}

/// Attachment `id`'s record, when it exists and is `chat`'s.
fn attachment_in(
    tx: &rusqlite::Transaction<'_>,
    id: Uuid,
    chat: ChatId,
) -> Result<Option<Attachment>, StoreError> {
    Ok(attachment_record(tx, id)?.filter(|attachment| attachment.chat_id == chat))
}

/// Whether signal `id` of `chat` is stored (a tombstone counts).
fn signal_stored(
    tx: &rusqlite::Transaction<'_>,
    chat: ChatId,
    id: SignalId,
) -> Result<bool, StoreError> {
    tx.prepare_cached("SELECT 1 FROM signals WHERE chat_id = ?1 AND id = ?2")
        .map_err(unavailable)?
        .exists(params![blob(chat.0), blob(id.0)])
        .map_err(unavailable)
}

/// Writes `attachment`'s record over the stored one (its kind, and so its list, stays).
fn write_attachment_body(
    tx: &rusqlite::Transaction<'_>,
    attachment: &Attachment,
) -> Result<(), StoreError> {
    let body = serde_json::to_string(attachment).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    tx.execute(
        "UPDATE attachments SET body = ?2 WHERE id = ?1",
        params![blob(attachment.id), body],
    )
    .map_err(unavailable)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{search_users, user_scan_rows};

    /// A user row, and its search terms as a store before migration 17 wrote them (the address
    /// among them), written straight into `c`.
    fn old_form_user(
        c: &Connection,
        username: &str,
        display_name: &str,
        email: Option<&str>,
    ) -> UserId {
        let id = UserId(Uuid::now_v7());
        c.execute(
            "INSERT INTO users (id, username, display_name, email, updated_at) VALUES (?1, ?2, ?3, ?4, 0)",
            params![blob(id.0), username, display_name, email],
        )
        .unwrap();
        for term in [Some(username), Some(display_name), email]
            .into_iter()
            .flatten()
        {
            c.execute(
                "INSERT OR IGNORE INTO user_terms (term, user_id) VALUES (?1, ?2)",
                params![term.trim().to_lowercase(), blob(id.0)],
            )
            .unwrap();
        }
        id
    }

    #[tokio::test]
    async fn migration_17_moves_addresses_out_of_the_prefix_terms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.sqlite3");
        let (boss, dora) = {
            let c = Connection::open(&path).unwrap();
            for (index, migration) in MIGRATIONS[..USER_ADDRESSES_VERSION - 1].iter().enumerate() {
                c.execute_batch(&format!(
                    "BEGIN; {migration} PRAGMA user_version = {}; COMMIT;",
                    index + 1
                ))
                .unwrap();
            }
            let boss = old_form_user(&c, "boss", "The Boss", Some("CEO@Corp.example"));
            let dora = old_form_user(
                &c,
                "dora@corp.example",
                "dora@corp.example",
                Some("dora@corp.example"),
            );
            (boss, dora)
        };
        let store = EmbeddedStore::open(&path).unwrap();
        for prefix in ["ceo", "dora", "c", "d"] {
            let rows = store.user_terms(prefix, None, 50).await.unwrap();
            assert!(rows.is_empty(), "{prefix} reaches {rows:?}");
        }
        assert_eq!(
            store.user_terms("b", None, 50).await.unwrap(),
            vec![("boss".to_owned(), boss)]
        );
        assert_eq!(
            store
                .users_by_address("ceo@corp.example", 10)
                .await
                .unwrap(),
            vec![boss]
        );
        assert_eq!(
            store
                .users_by_address("dora@corp.example", 10)
                .await
                .unwrap(),
            vec![dora]
        );
    }

    /// Rows of addresses a process of the previous version writes while a new one searches (or
    /// any rows a search skips) cost a page no more than [`user_scan_rows`]: the page stops short
    /// where its scan did, and the next goes on from there.
    #[tokio::test]
    async fn a_search_reads_a_bounded_number_of_rows_under_its_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("store.sqlite3")).unwrap();
        let rows = 2000;
        store
            .with(move |c| {
                for i in 0..rows {
                    old_form_user(
                        c,
                        &format!("u{i}"),
                        "User",
                        Some(&format!("j{i:04}@corp.example")),
                    );
                }
                Ok(())
            })
            .await
            .unwrap();
        let mut after = None;
        let mut pages = 0;
        loop {
            pages += 1;
            assert!(
                pages <= rows / user_scan_rows(10) + 2,
                "the pages never ended"
            );
            let (found, next) = search_users(&store, "j", after.clone(), 10).await.unwrap();
            assert!(found.is_empty(), "{found:?}");
            let Some(next) = next else { break };
            // The page read exactly its budget of rows, and stopped at the last of them.
            let read = store.user_terms("j", after.clone(), rows).await.unwrap();
            assert!(read.len() > user_scan_rows(10));
            assert_eq!(next, read[user_scan_rows(10) - 1]);
            after = Some(next);
        }
        assert_eq!(pages, rows / user_scan_rows(10) + 1);
    }
}
