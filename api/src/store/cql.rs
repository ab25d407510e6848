//! The CQL store: ScyllaDB in production, Apache Cassandra 5 locally and in CI. Only CQL both accept:
//! prepared statements, no materialized views, no secondary indexes, no `ALLOW FILTERING`.
//!
//! History lives in `signals`, partitioned by (chat, UTC day) and clustered by the UUIDv7 signal id,
//! newest first; `signal_buckets` lists the days a chat has signals so paging walks only those. Send
//! parity is a lightweight transaction on `signal_nonces`, the one place uniqueness demands it.

use std::time::Duration;

use async_trait::async_trait;
use confab_schema::migrations::{CQL_MIGRATIONS, signal_bucket};
use confab_schema::{Chat, ChatId, Member, MemberRole, Signal, SignalId, SignalKind, User, UserId};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue, Row};
use uuid::Uuid;

use super::{Inserted, NewChat, Store, StoreError, created_at, from_millis, millis, parse};

/// Where and how to reach the cluster.
#[derive(Clone, Debug)]
pub struct CqlOptions {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    pub replication: String,
    pub request_timeout: Duration,
}

impl CqlOptions {
    pub fn from_config(config: &confab_runtime::config::StoreConfig) -> CqlOptions {
        CqlOptions {
            contact_points: config
                .cql_contact_points
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            keyspace: config.keyspace.clone(),
            replication: config.replication.clone(),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        }
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

async fn session(options: &CqlOptions, keyspace: Option<&str>) -> Result<Session, StoreError> {
    let profile = ExecutionProfile::builder()
        .request_timeout(Some(options.request_timeout))
        .build();
    let mut builder = SessionBuilder::new()
        .known_nodes(&options.contact_points)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile.into_handle());
    if let Some(keyspace) = keyspace {
        builder = builder.use_keyspace(keyspace, false);
    }
    builder.build().await.map_err(unavailable)
}

/// Creates the keyspace if needed and applies every migration not yet recorded. Safe to run twice and
/// from several processes at once (every statement is `IF NOT EXISTS`).
pub async fn migrate(options: &CqlOptions) -> Result<Vec<i32>, StoreError> {
    let session = session(options, None).await?;
    let keyspace = &options.keyspace;
    session
        .query_unpaged(
            format!(
                "CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}",
                options.replication
            ),
            &[],
        )
        .await
        .map_err(unavailable)?;
    session
        .query_unpaged(
            format!(
                "CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)"
            ),
            &[],
        )
        .await
        .map_err(unavailable)?;
    session
        .await_schema_agreement()
        .await
        .map_err(unavailable)?;
    session
        .use_keyspace(keyspace, false)
        .await
        .map_err(unavailable)?;

    let applied: Vec<i32> = session
        .query_unpaged("SELECT version FROM schema_migrations", &[])
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(corrupt)?
        .rows::<(i32,)>()
        .map_err(corrupt)?
        .map(|row| row.map(|(v,)| v).map_err(corrupt))
        .collect::<Result<_, _>>()?;
    let mut newly_applied = Vec::new();
    for migration in CQL_MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        for statement in migration.statements() {
            session
                .query_unpaged(statement, &[])
                .await
                .map_err(unavailable)?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(unavailable)?;
        session
            .query_unpaged(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (
                    migration.version,
                    migration.name,
                    CqlTimestamp(millis(time::OffsetDateTime::now_utc())),
                ),
            )
            .await
            .map_err(unavailable)?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "CQL migration applied"
        );
        newly_applied.push(migration.version);
    }
    Ok(newly_applied)
}

/// Drops a keyspace (tests use one per test).
pub async fn drop_keyspace(options: &CqlOptions) -> Result<(), StoreError> {
    let session = session(options, None).await?;
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", options.keyspace), &[])
        .await
        .map_err(unavailable)?;
    Ok(())
}

struct Statements {
    check: PreparedStatement,
    upsert_user: PreparedStatement,
    get_user: PreparedStatement,
    insert_chat: PreparedStatement,
    get_chat: PreparedStatement,
    insert_chat_member: PreparedStatement,
    insert_user_chat: PreparedStatement,
    member_role: PreparedStatement,
    members: PreparedStatement,
    claim_nonce: PreparedStatement,
    insert_signal: PreparedStatement,
    insert_bucket: PreparedStatement,
    buckets_up_to: PreparedStatement,
    signals_in_bucket: PreparedStatement,
    signals_in_bucket_before: PreparedStatement,
    get_signal: PreparedStatement,
}

pub struct CqlStore {
    session: Session,
    statements: Statements,
}

const SIGNAL_COLUMNS: &str =
    "id, kind, author_id, nonce, text, reply_to, attachments, edited_at, deleted";

type SignalRow = (
    Uuid,
    String,
    Uuid,
    Option<String>,
    Option<String>,
    Option<Uuid>,
    Option<Vec<Uuid>>,
    Option<CqlTimestamp>,
    Option<bool>,
);

/// How many bucket rows to look up at a time when a page spans days.
const BUCKET_BATCH: i32 = 16;

impl CqlStore {
    /// Connects to an already migrated keyspace and prepares every statement.
    pub async fn connect(options: &CqlOptions) -> Result<CqlStore, StoreError> {
        let session = session(options, Some(&options.keyspace)).await?;
        let prepare = |cql: String| {
            let session = &session;
            async move { session.prepare(cql).await.map_err(unavailable) }
        };
        let statements = Statements {
            check: prepare("SELECT version FROM schema_migrations LIMIT 1".into()).await?,
            upsert_user: prepare(
                "INSERT INTO users (id, username, display_name, email, updated_at) VALUES (?, ?, ?, ?, ?)".into(),
            )
            .await?,
            get_user: prepare("SELECT username, display_name, email FROM users WHERE id = ?".into()).await?,
            insert_chat: prepare(
                "INSERT INTO chats (id, kind, name, description, created_at, created_by) VALUES (?, ?, ?, ?, ?, ?)"
                    .into(),
            )
            .await?,
            get_chat: prepare(
                "SELECT kind, name, description, created_at, created_by FROM chats WHERE id = ?".into(),
            )
            .await?,
            insert_chat_member: prepare(
                "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES (?, ?, ?, ?)".into(),
            )
            .await?,
            insert_user_chat: prepare(
                "INSERT INTO user_chats (user_id, chat_id, role, joined_at) VALUES (?, ?, ?, ?)".into(),
            )
            .await?,
            member_role: prepare("SELECT role FROM chat_members WHERE chat_id = ? AND user_id = ?".into()).await?,
            members: prepare("SELECT user_id, role, joined_at FROM chat_members WHERE chat_id = ?".into()).await?,
            claim_nonce: prepare(
                "INSERT INTO signal_nonces (chat_id, author_id, nonce, signal_id, kind, text, reply_to, attachments) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS"
                    .into(),
            )
            .await?,
            // The write timestamp is the signal's creation time, so a repair re-write of the original
            // never overwrites a later edit or deletion.
            insert_signal: prepare(format!(
                "INSERT INTO signals (chat_id, bucket, {SIGNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            insert_bucket: prepare("INSERT INTO signal_buckets (chat_id, bucket) VALUES (?, ?)".into()).await?,
            buckets_up_to: prepare(
                "SELECT bucket FROM signal_buckets WHERE chat_id = ? AND bucket <= ? LIMIT ?".into(),
            )
            .await?,
            signals_in_bucket: prepare(format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? LIMIT ?"
            ))
            .await?,
            signals_in_bucket_before: prepare(format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? AND id < ? LIMIT ?"
            ))
            .await?,
            get_signal: prepare(format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? AND id = ?"
            ))
            .await?,
        };
        Ok(CqlStore {
            session,
            statements,
        })
    }

    /// The raw session, for benchmarks that compare against driver-level inserts.
    pub fn session(&self) -> &Session {
        &self.session
    }

    async fn write_signal(&self, signal: &Signal) -> Result<(), StoreError> {
        let created = signal
            .id
            .unix_millis()
            .ok_or_else(|| corrupt("signal id is not time-ordered"))?;
        let bucket = signal_bucket(created);
        // Bucket first: a signal is never in a day the pager does not know about.
        self.session
            .execute_unpaged(&self.statements.insert_bucket, (signal.chat_id.0, bucket))
            .await
            .map_err(unavailable)?;
        let attachments = (!signal.attachments.is_empty()).then(|| signal.attachments.clone());
        self.session
            .execute_unpaged(
                &self.statements.insert_signal,
                (
                    signal.chat_id.0,
                    bucket,
                    signal.id.0,
                    signal.kind.as_str(),
                    signal.author_id.0,
                    signal.nonce.as_deref(),
                    signal.text.as_deref(),
                    signal.reply_to.map(|r| r.0),
                    attachments,
                    signal.edited_at.map(|t| CqlTimestamp(millis(t))),
                    signal.deleted,
                    created * 1000,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn to_signal(chat_id: ChatId, row: SignalRow) -> Result<Signal, StoreError> {
    let (id, kind, author_id, nonce, text, reply_to, attachments, edited_at, deleted) = row;
    let id = SignalId(id);
    Ok(Signal {
        id,
        chat_id,
        kind: parse(&kind)?,
        author_id: UserId(author_id),
        created_at: created_at(id)?,
        nonce,
        text,
        reply_to: reply_to.map(SignalId),
        attachments: attachments.unwrap_or_default(),
        edited_at: edited_at.map(|t| from_millis(t.0)).transpose()?,
        deleted: deleted.unwrap_or(false),
        reactions: Default::default(),
    })
}

fn column(row: &Row, index: usize) -> Option<&CqlValue> {
    row.columns.get(index).and_then(Option::as_ref)
}

#[async_trait]
impl Store for CqlStore {
    async fn check(&self) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.statements.check, ())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.statements.upsert_user,
                (
                    user.id.0,
                    user.username.as_str(),
                    user.display_name.as_str(),
                    user.email.as_deref(),
                    CqlTimestamp(millis(time::OffsetDateTime::now_utc())),
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.get_user, (id.0,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<String>, Option<String>, Option<String>)>()
            .map_err(corrupt)?;
        Ok(row.map(|(username, display_name, email)| {
            let username = username.unwrap_or_default();
            User {
                id,
                display_name: display_name.unwrap_or_else(|| username.clone()),
                username,
                email,
            }
        }))
    }

    async fn create_chat(&self, chat: &NewChat) -> Result<(), StoreError> {
        let joined = CqlTimestamp(millis(chat.created_at));
        for (user, role) in &chat.members {
            self.session
                .execute_unpaged(
                    &self.statements.insert_user_chat,
                    (user.0, chat.id.0, role.as_str(), joined),
                )
                .await
                .map_err(unavailable)?;
            self.session
                .execute_unpaged(
                    &self.statements.insert_chat_member,
                    (chat.id.0, user.0, role.as_str(), joined),
                )
                .await
                .map_err(unavailable)?;
        }
        // Written last: a chat is found only once its members are in place.
        self.session
            .execute_unpaged(
                &self.statements.insert_chat,
                (
                    chat.id.0,
                    chat.kind.as_str(),
                    chat.name.as_deref(),
                    chat.description.as_deref(),
                    joined,
                    chat.created_by.0,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.get_chat, (id.0,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(String, Option<String>, Option<String>, CqlTimestamp, Uuid)>()
            .map_err(corrupt)?;
        row.map(|(kind, name, description, created, created_by)| {
            Ok(Chat {
                id,
                kind: parse(&kind)?,
                name,
                description,
                created_at: from_millis(created.0)?,
                created_by: UserId(created_by),
                my_role: None,
                latest_signal: None,
                unread_count: 0,
            })
        })
        .transpose()
    }

    async fn member_role(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<MemberRole>, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.member_role, (chat.0, user.0))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(String,)>()
            .map_err(corrupt)?;
        row.map(|(role,)| parse(&role)).transpose()
    }

    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError> {
        // A chat's members fit in one partition; the driver pages through it.
        let mut members = Vec::new();
        let mut paging = scylla::response::PagingState::start();
        loop {
            let (result, next) = self
                .session
                .execute_single_page(&self.statements.members, (chat.0,), paging)
                .await
                .map_err(unavailable)?;
            for row in result
                .into_rows_result()
                .map_err(corrupt)?
                .rows::<(Uuid, String, CqlTimestamp)>()
                .map_err(corrupt)?
            {
                let (user, role, joined) = row.map_err(corrupt)?;
                members.push(Member {
                    user_id: UserId(user),
                    role: parse(&role)?,
                    joined_at: from_millis(joined.0)?,
                });
            }
            match next.into_paging_control_flow() {
                std::ops::ControlFlow::Break(()) => break,
                std::ops::ControlFlow::Continue(state) => paging = state,
            }
        }
        Ok(members)
    }

    async fn insert_signal(&self, signal: &Signal) -> Result<Inserted, StoreError> {
        let Some(nonce) = signal.nonce.as_deref() else {
            self.write_signal(signal).await?;
            return Ok(Inserted::Created(signal.clone()));
        };
        let attachments = (!signal.attachments.is_empty()).then(|| signal.attachments.clone());
        let result = self
            .session
            .execute_unpaged(
                &self.statements.claim_nonce,
                (
                    signal.chat_id.0,
                    signal.author_id.0,
                    nonce,
                    signal.id.0,
                    signal.kind.as_str(),
                    signal.text.as_deref(),
                    signal.reply_to.map(|r| r.0),
                    attachments,
                ),
            )
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?;
        let row = result
            .maybe_first_row::<Row>()
            .map_err(corrupt)?
            .ok_or_else(|| corrupt("lightweight transaction returned no row"))?;
        // Columns: [applied], then (when not applied) the existing row in table order:
        // chat_id, author_id, nonce, attachments, kind, reply_to, signal_id, text.
        let applied = matches!(column(&row, 0), Some(CqlValue::Boolean(true)));
        if applied {
            self.write_signal(signal).await?;
            return Ok(Inserted::Created(signal.clone()));
        }
        let specs = result.column_specs();
        let named = |name: &str| {
            specs
                .iter()
                .position(|spec| spec.name() == name)
                .and_then(|index| column(&row, index))
        };
        let Some(CqlValue::Uuid(existing_id)) = named("signal_id") else {
            return Err(corrupt("nonce row without signal id"));
        };
        let kind: SignalKind = match named("kind") {
            Some(CqlValue::Text(kind)) => parse(kind)?,
            _ => return Err(corrupt("nonce row without kind")),
        };
        let existing = Signal {
            id: SignalId(*existing_id),
            chat_id: signal.chat_id,
            kind,
            author_id: signal.author_id,
            created_at: created_at(SignalId(*existing_id))?,
            nonce: Some(nonce.to_owned()),
            text: match named("text") {
                Some(CqlValue::Text(text)) => Some(text.clone()),
                _ => None,
            },
            reply_to: match named("reply_to") {
                Some(CqlValue::Uuid(id)) => Some(SignalId(*id)),
                _ => None,
            },
            attachments: match named("attachments") {
                Some(CqlValue::List(items)) => items
                    .iter()
                    .filter_map(|item| match item {
                        CqlValue::Uuid(id) => Some(*id),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            },
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
        };
        // The winner may have died between claiming the nonce and writing the signal: write it again.
        // Its write timestamp is the creation time, so this cannot undo a later edit or deletion.
        self.write_signal(&existing).await?;
        // Answer with the stored row, which carries any edits since.
        let bucket = signal_bucket(existing.id.unix_millis().unwrap_or_default());
        let stored = self
            .session
            .execute_unpaged(
                &self.statements.get_signal,
                (signal.chat_id.0, bucket, existing.id.0),
            )
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<SignalRow>()
            .map_err(corrupt)?
            .map(|row| to_signal(signal.chat_id, row))
            .transpose()?;
        Ok(Inserted::Existing(stored.unwrap_or(existing)))
    }

    async fn signals_before(
        &self,
        chat: ChatId,
        before: Option<SignalId>,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError> {
        let mut out = Vec::with_capacity(limit);
        let mut upper_bucket = match before {
            Some(before) => signal_bucket(before.unix_millis().unwrap_or(i64::MAX)),
            None => i32::MAX,
        };
        'buckets: loop {
            let buckets: Vec<i32> = self
                .session
                .execute_unpaged(
                    &self.statements.buckets_up_to,
                    (chat.0, upper_bucket, BUCKET_BATCH),
                )
                .await
                .map_err(unavailable)?
                .into_rows_result()
                .map_err(corrupt)?
                .rows::<(i32,)>()
                .map_err(corrupt)?
                .map(|row| row.map(|(b,)| b).map_err(corrupt))
                .collect::<Result<_, _>>()?;
            let exhausted = buckets.len() < BUCKET_BATCH as usize;
            for bucket in &buckets {
                let want = i32::try_from(limit - out.len()).unwrap_or(i32::MAX);
                let result = match before {
                    Some(before) => {
                        self.session
                            .execute_unpaged(
                                &self.statements.signals_in_bucket_before,
                                (chat.0, *bucket, before.0, want),
                            )
                            .await
                    }
                    None => {
                        self.session
                            .execute_unpaged(
                                &self.statements.signals_in_bucket,
                                (chat.0, *bucket, want),
                            )
                            .await
                    }
                }
                .map_err(unavailable)?;
                for row in result
                    .into_rows_result()
                    .map_err(corrupt)?
                    .rows::<SignalRow>()
                    .map_err(corrupt)?
                {
                    out.push(to_signal(chat, row.map_err(corrupt)?)?);
                }
                if out.len() >= limit {
                    break 'buckets;
                }
            }
            match buckets.last() {
                Some(last) if !exhausted => upper_bucket = last - 1,
                _ => break,
            }
        }
        Ok(out)
    }
}
