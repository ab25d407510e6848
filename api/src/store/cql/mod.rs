//! The CQL store: ScyllaDB in production, Apache Cassandra 5 locally and in CI. Only CQL both accept:
//! prepared statements, no materialized views, no secondary indexes, no `ALLOW FILTERING`.
//!
//! History lives in `signals`, partitioned by (chat, UTC day) and clustered by the UUIDv7 signal id,
//! newest first; `signal_buckets` lists the days a chat has signals so paging walks only those. Send
//! parity is a lightweight transaction on `signal_nonces`, the one place uniqueness demands it.

use std::time::Duration;

use async_trait::async_trait;
mod calls;
mod circles;
mod migrations;
mod outbox;
mod parity;

pub use parity::SendParity;
use parity::{Claim, NonceBucket};

use confab_schema::attachment::ImageInfo;
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::push::Device;
use confab_schema::settings::{ChatSettings, UserSettings};
use confab_schema::{
    Attachment, AttachmentKind, AttachmentRef, Chat, ChatId, CircleId, DeviceId, Member,
    MemberRole, Signal, SignalId, SignalKind, User, UserId,
};
pub use migrations::{CQL_MIGRATIONS, Migration, SIGNAL_BUCKET_MILLIS, signal_bucket};
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::Consistency;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue, MaybeUnset, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use std::collections::{BTreeMap, HashMap, HashSet};

use futures::future::BoxFuture;
use futures::{StreamExt, TryFutureExt, TryStreamExt};

use confab_schema::call::CallStatus;

use super::{
    CallRecord, ChatActivity, ChatEntry, GuardedChange, InfoChange, Inserted, LEFT_CHATS_KEPT,
    LeftChat, ListedCall, MarkerKind, MemberPut, MemberWrite, NewChat, OutboxEntry, OutboxWriter,
    PendingCallSignal, Slot, SlotWrite, SmallObjectInfo, Store, StoreError, UNREAD_SCAN_LIMIT,
    UnreadQuery, address_terms, address_terms_written_before, claim_orphaned, created_at,
    from_millis, looks_like_address, millis, parse, search_terms, stored_text, text_and_call,
};

/// How many of a chat's newest signals [`Store::count_unreads`] reads at once; a chat with more
/// past its marker is counted on its own.
const UNREAD_BATCH_ROWS: usize = 128;
/// Chats per `IN` of [`Store::count_unreads`] (ScyllaDB refuses more than 100 partition keys).
const UNREAD_BATCH_CHATS: usize = 50;

/// Attachments per read of [`Store::get_attachments`] (ScyllaDB refuses more than 100 partition
/// keys).
const ATTACHMENTS_PER_READ: usize = 100;

/// Users asked per read of [`Store::members_among`]: ScyllaDB refuses more than 100 clustering
/// keys in one `IN` (`max_clustering_key_restrictions_per_query`).
const MEMBERS_AMONG_PER_READ: usize = 100;

/// Where and how to reach the cluster.
#[derive(Clone, Debug)]
pub struct CqlOptions {
    pub contact_points: Vec<String>,
    pub keyspace: String,
    pub replication: String,
    pub request_timeout: Duration,
    /// How long a nonce protects against a repeated send.
    pub nonce_ttl: Duration,
    /// How racing sends of one nonce are settled.
    pub parity: SendParity,
}

impl CqlOptions {
    /// The options the configuration names: send parity through the JetStream bucket
    /// `<keyspace>_nonces` on the configured NATS server unless `store.send_parity = "lwt"`.
    pub fn from_config(config: &confab_runtime::config::Config) -> CqlOptions {
        let nats_url = config.bus.nats_url.clone();
        let config = &config.store;
        CqlOptions {
            nonce_ttl: Duration::from_secs(config.nonce_ttl_secs.max(1)),
            parity: match config.send_parity {
                confab_runtime::config::SendParityMode::Jetstream => SendParity::JetStream {
                    nats_url,
                    bucket: format!("{}_nonces", config.keyspace),
                },
                confab_runtime::config::SendParityMode::Lwt => SendParity::Lwt,
            },
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

/// A failure of a call that wrote nothing of what it was asked to, and never will: told apart
/// from one whose write may still be applied ([`StoreError::NotWritten`]).
fn not_written(error: StoreError) -> StoreError {
    match error {
        StoreError::Unavailable(why) => StoreError::NotWritten(why),
        other => other,
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

async fn session(options: &CqlOptions) -> Result<Session, StoreError> {
    let profile = ExecutionProfile::builder()
        .request_timeout(Some(options.request_timeout))
        .build();
    SessionBuilder::new()
        .known_nodes(&options.contact_points)
        .connection_timeout(Duration::from_secs(5))
        .default_execution_profile_handle(profile.into_handle())
        .build()
        .await
        .map_err(unavailable)
}

/// Qualifies the table after every `FROM`, `INTO` and `UPDATE` with `keyspace`. Prepared statements
/// name their keyspace rather than rely on `USE`, which is ambiguous with prepared statements (and
/// Cassandra warns about it).
pub fn qualify(cql: &str, keyspace: &str) -> String {
    let mut previous = "";
    cql.split(' ')
        .map(|token| {
            let keyword = previous.trim().to_ascii_uppercase();
            previous = token;
            if matches!(keyword.as_str(), "FROM" | "INTO" | "UPDATE")
                && !token.is_empty()
                && !token.contains('.')
            {
                format!("{keyspace}.{token}")
            } else {
                token.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Creates the keyspace if needed and applies every migration not yet recorded. Safe to run twice and
/// from several processes at once (every statement is `IF NOT EXISTS`).
pub async fn migrate(options: &CqlOptions) -> Result<Vec<i32>, StoreError> {
    // Boxed: the state machine of every migration's steps is large.
    Box::pin(migrate_keyspace(options)).await
}

/// The least time a migration's statement is given: a schema change waits for the cluster to
/// agree on it, which takes seconds on a loaded node, and a migration is not on anyone's request
/// path.
const MIGRATION_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn migrate_keyspace(options: &CqlOptions) -> Result<Vec<i32>, StoreError> {
    let options = &CqlOptions {
        request_timeout: options.request_timeout.max(MIGRATION_REQUEST_TIMEOUT),
        ..options.clone()
    };
    let session = session(options).await?;
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
            if let Some((table, column)) = migrations::added_column(&statement)
                && column_exists(&session, keyspace, table, column).await?
            {
                continue;
            }
            session
                .query_unpaged(statement, &[])
                .await
                .map_err(unavailable)?;
        }
        session
            .await_schema_agreement()
            .await
            .map_err(unavailable)?;
        // A migration's data steps come before it is recorded: they are idempotent, so one that
        // failed half-way runs again with the next `migrate`.
        match migration.version {
            3 => backfill_tallies_and_summaries(&session).await?,
            11 => move_summaries_and_copy_read_markers(&session, keyspace).await?,
            12 => copy_chats_into_member_rows(&session, keyspace).await?,
            23 => move_addresses_out_of_user_search(&session, keyspace).await?,
            _ => {}
        }
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
    if let SendParity::JetStream { nats_url, bucket } = &options.parity {
        NonceBucket::open(nats_url, bucket, options.nonce_ttl).await?;
    }
    Ok(newly_applied)
}

/// Whether `keyspace.table` has `column` already (a migration re-run after it added it).
async fn column_exists(
    session: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
) -> Result<bool, StoreError> {
    // A plain query with the names as literals: a query with bound values is prepared on the
    // fly, and a migration runs once, so there is nothing to gain from preparing it.
    let literal = |name: &str| format!("'{}'", name.to_lowercase().replace('\'', "''"));
    let result = session
        .query_unpaged(
            format!(
                "SELECT column_name FROM system_schema.columns \
                 WHERE keyspace_name = {} AND table_name = {} AND column_name = {}",
                literal(keyspace),
                literal(table),
                literal(column)
            ),
            &[],
        )
        .await
        .map_err(unavailable)?;
    Ok(!rows::<(String,)>(result)?.is_empty())
}

/// Migration 3 moves reaction counts from counters to per-bucket tallies, and the chat list's
/// activity to `chat_summaries`: copies what the old tables hold. Idempotent (plain upserts), so a
/// migration re-run after a failure copies again.
async fn backfill_tallies_and_summaries(session: &Session) -> Result<(), StoreError> {
    let mut activity = session
        .query_iter("SELECT chat_id, activity FROM chat_activity", ())
        .await
        .map_err(unavailable)?
        .rows_stream::<(Uuid, Option<Uuid>)>()
        .map_err(corrupt)?;
    while let Some(row) = activity.next().await {
        let (chat, Some(activity)) = row.map_err(corrupt)? else {
            continue;
        };
        let at = SignalId(activity).unix_millis().unwrap_or_default() * 1000;
        session
            .query_unpaged(
                "INSERT INTO chat_summaries (chat_id, activity) VALUES (?, ?) USING TIMESTAMP ?",
                (chat, activity, at),
            )
            .await
            .map_err(unavailable)?;
    }
    let mut counts = session
        .query_iter(
            "SELECT chat_id, signal_id, emoji, count FROM reaction_counts",
            (),
        )
        .await
        .map_err(unavailable)?
        .rows_stream::<(Uuid, Uuid, String, Option<scylla::value::Counter>)>()
        .map_err(corrupt)?;
    while let Some(row) = counts.next().await {
        let (chat, signal, emoji, count) = row.map_err(corrupt)?;
        let bucket = signal_bucket(SignalId(signal).unix_millis().unwrap_or_default());
        let count = i32::try_from(count.map(|c| c.0).unwrap_or(0)).unwrap_or(i32::MAX);
        // Timestamp 1: any recount since wins over the copied counter.
        session
            .query_unpaged(
                "INSERT INTO reaction_tallies (chat_id, bucket, signal_id, emoji, count) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP 1",
                (chat, bucket, signal, emoji, count),
            )
            .await
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Migration 11: adds the summary columns to `chats` and copies each old summary there, and
/// copies every read marker into `user_read_markers`, each value with its own write timestamp so
/// that whatever was written since (newer by that timestamp) stays.
async fn move_summaries_and_copy_read_markers(
    session: &Session,
    keyspace: &str,
) -> Result<(), StoreError> {
    for (column, cql_type) in [("activity", "uuid"), ("latest", "blob")] {
        add_column_if_missing(session, keyspace, "chats", column, cql_type).await?;
    }
    session
        .await_schema_agreement()
        .await
        .map_err(unavailable)?;
    let set_activity = session
        .prepare(qualify(
            "UPDATE chats USING TIMESTAMP ? SET activity = ? WHERE id = ?",
            keyspace,
        ))
        .await
        .map_err(unavailable)?;
    let set_latest = session
        .prepare(qualify(
            "UPDATE chats USING TIMESTAMP ? SET latest = ? WHERE id = ?",
            keyspace,
        ))
        .await
        .map_err(unavailable)?;
    let summaries = session
        .query_iter(
            qualify(
                "SELECT chat_id, activity, WRITETIME(activity), latest, WRITETIME(latest) FROM chat_summaries",
                keyspace,
            ),
            (),
        )
        .await
        .map_err(unavailable)?
        .rows_stream::<(Uuid, Option<Uuid>, Option<i64>, Option<Vec<u8>>, Option<i64>)>()
        .map_err(corrupt)?;
    summaries
        .map_err(corrupt)
        .try_for_each_concurrent(32, |(chat, activity, activity_at, latest, latest_at)| {
            let (set_activity, set_latest) = (&set_activity, &set_latest);
            async move {
                if let (Some(activity), Some(at)) = (activity, activity_at) {
                    session
                        .execute_unpaged(set_activity, (at, activity, chat))
                        .await
                        .map_err(unavailable)?;
                }
                if let (Some(latest), Some(at)) = (latest, latest_at) {
                    session
                        .execute_unpaged(set_latest, (at, latest, chat))
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            }
        })
        .await?;
    let copy_marker = session
        .prepare(qualify(
            "INSERT INTO user_read_markers (user_id, chat_id, up_to) VALUES (?, ?, ?) USING TIMESTAMP ?",
            keyspace,
        ))
        .await
        .map_err(unavailable)?;
    let markers = session
        .query_iter(
            qualify(
                "SELECT chat_id, kind, user_id, up_to, WRITETIME(up_to) FROM markers",
                keyspace,
            ),
            (),
        )
        .await
        .map_err(unavailable)?
        .rows_stream::<(Uuid, String, Uuid, Option<Uuid>, Option<i64>)>()
        .map_err(corrupt)?;
    markers
        .map_err(corrupt)
        .try_for_each_concurrent(32, |(chat, kind, user, up_to, at)| {
            let copy_marker = &copy_marker;
            async move {
                if let (true, Some(up_to), Some(at)) =
                    (kind == MarkerKind::Read.as_str(), up_to, at)
                {
                    session
                        .execute_unpaged(copy_marker, (user, chat, up_to, at))
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            }
        })
        .await
}

/// Migration 23: copies every user's addresses (their e-mail address, and a name that looks like
/// one) to `user_addresses`, and deletes the rows of addresses from `user_search`: those of each
/// user's current terms, and any row whose term looks like an address (one a user had before).
/// Idempotent, so a migration re-run after a failure does it again.
async fn move_addresses_out_of_user_search(
    session: &Session,
    keyspace: &str,
) -> Result<(), StoreError> {
    let prepare = |cql: &str| session.prepare(qualify(cql, keyspace));
    let delete_term =
        prepare("DELETE FROM user_search WHERE shard = ? AND term = ? AND user_id = ?")
            .await
            .map_err(unavailable)?;
    let insert_address = prepare("INSERT INTO user_addresses (address, user_id) VALUES (?, ?)")
        .await
        .map_err(unavailable)?;
    let users = session
        .query_iter(
            qualify(
                "SELECT id, username, display_name, email FROM users",
                keyspace,
            ),
            (),
        )
        .await
        .map_err(unavailable)?
        .rows_stream::<(Uuid, Option<String>, Option<String>, Option<String>)>()
        .map_err(corrupt)?;
    users
        .map_err(corrupt)
        .try_for_each_concurrent(32, |(id, username, display_name, email)| {
            let (delete_term, insert_address) = (&delete_term, &insert_address);
            async move {
                let username = username.unwrap_or_default();
                let user = User {
                    id: UserId(id),
                    display_name: display_name.unwrap_or_else(|| username.clone()),
                    username,
                    email,
                };
                for address in address_terms(&user) {
                    session
                        .execute_unpaged(delete_term, (shard(&address), address.as_str(), id))
                        .await
                        .map_err(unavailable)?;
                    session
                        .execute_unpaged(insert_address, (address.as_str(), id))
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            }
        })
        .await?;
    let terms = session
        .query_iter(
            qualify("SELECT shard, term, user_id FROM user_search", keyspace),
            (),
        )
        .await
        .map_err(unavailable)?
        .rows_stream::<(String, String, Uuid)>()
        .map_err(corrupt)?;
    terms
        .map_err(corrupt)
        .try_for_each_concurrent(32, |(shard, term, user)| {
            let delete_term = &delete_term;
            async move {
                if looks_like_address(&term) {
                    session
                        .execute_unpaged(delete_term, (shard, term, user))
                        .await
                        .map_err(unavailable)?;
                }
                Ok(())
            }
        })
        .await
}

/// Migration 12: adds the copies' columns to `user_chats` and copies every chat's row and summary
/// into its members' rows, each value with its own write timestamp, so that whatever was written
/// since (newer by that timestamp) stays.
async fn copy_chats_into_member_rows(session: &Session, keyspace: &str) -> Result<(), StoreError> {
    add_column_if_missing(session, keyspace, "chats", "info_at", "bigint").await?;
    for (column, cql_type) in [
        ("kind", "text"),
        ("name", "text"),
        ("description", "text"),
        ("created_at", "timestamp"),
        ("created_by", "uuid"),
        ("activity", "uuid"),
        ("latest", "blob"),
    ] {
        add_column_if_missing(session, keyspace, "user_chats", column, cql_type).await?;
    }
    session
        .await_schema_agreement()
        .await
        .map_err(unavailable)?;
    let prepare = |cql: &str| session.prepare(qualify(cql, keyspace)).map_err(unavailable);
    let (members_of, copy_info, set_activity, set_latest) = futures::try_join!(
        prepare("SELECT user_id FROM chat_members WHERE chat_id = ?"),
        prepare(
            "UPDATE user_chats USING TIMESTAMP ? SET kind = ?, name = ?, description = ?, \
             created_at = ?, created_by = ? WHERE user_id = ? AND chat_id = ?"
        ),
        prepare(
            "UPDATE user_chats USING TIMESTAMP ? SET activity = ? WHERE user_id = ? AND chat_id = ?"
        ),
        prepare(
            "UPDATE user_chats USING TIMESTAMP ? SET latest = ? WHERE user_id = ? AND chat_id = ?"
        ),
    )?;
    type Written = (
        Uuid,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<CqlTimestamp>,
        Option<Uuid>,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<Uuid>,
        Option<i64>,
        Option<Vec<u8>>,
        Option<i64>,
        Option<i64>,
    );
    let chats = session
        .query_iter(
            qualify(
                "SELECT id, kind, name, description, created_at, created_by, WRITETIME(kind), \
                 WRITETIME(name), WRITETIME(description), activity, WRITETIME(activity), latest, \
                 WRITETIME(latest), info_at FROM chats",
                keyspace,
            ),
            (),
        )
        .await
        .map_err(unavailable)?
        .rows_stream::<Written>()
        .map_err(corrupt)?;
    let (members_of, copy_info, set_activity, set_latest) =
        (&members_of, &copy_info, &set_activity, &set_latest);
    chats
        .map_err(corrupt)
        .try_for_each_concurrent(8, |row| async move {
            let (id, kind, name, description, created_at, created_by) =
                (row.0, row.1, row.2, row.3, row.4, row.5);
            let (Some(kind), Some(created_at), Some(created_by)) = (kind, created_at, created_by)
            else {
                // A summary written by a touch that raced the chat's removal: no chat.
                return Ok(());
            };
            let info_at = [row.6, row.7, row.8, row.13]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0);
            let (activity, latest) = (row.9.zip(row.10), row.11.zip(row.12));
            let mut members = session
                .execute_iter(members_of.clone(), (id,))
                .await
                .map_err(unavailable)?
                .rows_stream::<(Uuid,)>()
                .map_err(corrupt)?;
            while let Some(member) = members.next().await {
                let (user,) = member.map_err(corrupt)?;
                session
                    .execute_unpaged(
                        copy_info,
                        (
                            info_at,
                            kind.as_str(),
                            name.as_deref(),
                            description.as_deref(),
                            created_at,
                            created_by,
                            user,
                            id,
                        ),
                    )
                    .await
                    .map_err(unavailable)?;
                if let Some((activity, at)) = activity {
                    session
                        .execute_unpaged(set_activity, (at, activity, user, id))
                        .await
                        .map_err(unavailable)?;
                }
                if let Some((latest, at)) = &latest {
                    session
                        .execute_unpaged(set_latest, (*at, latest, user, id))
                        .await
                        .map_err(unavailable)?;
                }
            }
            Ok(())
        })
        .await
}

/// `ALTER TABLE … ADD` unless the column is there; a concurrent migration adding it first is fine.
async fn add_column_if_missing(
    session: &Session,
    keyspace: &str,
    table: &str,
    column: &str,
    cql_type: &str,
) -> Result<(), StoreError> {
    let exists = || async {
        let found = session
            .query_unpaged(
                "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?",
                // Unquoted names are stored lower-cased.
                (keyspace.to_lowercase(), table, column),
            )
            .await
            .map_err(unavailable)?;
        Ok::<bool, StoreError>(!rows::<(String,)>(found)?.is_empty())
    };
    if exists().await? {
        return Ok(());
    }
    match session
        .query_unpaged(
            format!("ALTER TABLE {keyspace}.{table} ADD {column} {cql_type}"),
            (),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(error) => {
            session
                .await_schema_agreement()
                .await
                .map_err(unavailable)?;
            if exists().await? {
                Ok(())
            } else {
                Err(unavailable(error))
            }
        }
    }
}

/// Drops a keyspace (tests use one per test).
pub async fn drop_keyspace(options: &CqlOptions) -> Result<(), StoreError> {
    let session = session(options).await?;
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", options.keyspace), &[])
        .await
        .map_err(unavailable)?;
    if let SendParity::JetStream { nats_url, bucket } = &options.parity {
        parity::delete_bucket(nats_url, bucket).await?;
    }
    Ok(())
}

/// A fresh name for a scratch keyspace (tests use one each): `t_<seconds since the epoch, in
/// hex>_<random>`. A test that panics or is killed never drops its own, and hundreds of leftover
/// keyspaces slow a Cassandra node's schema changes to a crawl; the time in the name lets a later
/// run drop the ones left behind ([`drop_stale_scratch_keyspaces`]) without touching a running
/// one's.
pub fn scratch_keyspace() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "t_{now:08x}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

/// When a [`scratch_keyspace`] name was made, or `None` for any other name.
fn scratch_keyspace_made(name: &str) -> Option<std::time::SystemTime> {
    let (seconds, random) = name.strip_prefix("t_")?.split_once('_')?;
    if seconds.len() != 8 || random.is_empty() {
        return None;
    }
    let seconds = u64::from_str_radix(seconds, 16).ok()?;
    Some(std::time::UNIX_EPOCH + Duration::from_secs(seconds))
}

/// Drops the scratch keyspaces made more than `older_than` ago (left behind by test runs that
/// stopped before dropping them); answers how many it dropped.
pub async fn drop_stale_scratch_keyspaces(
    options: &CqlOptions,
    older_than: Duration,
) -> Result<usize, StoreError> {
    let session = session(options).await?;
    let names: Vec<String> = session
        .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", &[])
        .await
        .map_err(unavailable)?
        .into_rows_result()
        .map_err(corrupt)?
        .rows::<(String,)>()
        .map_err(corrupt)?
        .map(|row| row.map(|(name,)| name).map_err(corrupt))
        .collect::<Result<_, _>>()?;
    let cutoff = std::time::SystemTime::now()
        .checked_sub(older_than)
        .unwrap_or(std::time::UNIX_EPOCH);
    let mut dropped = 0;
    for name in names {
        if scratch_keyspace_made(&name).is_some_and(|made| made < cutoff) {
            session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {name}"), &[])
                .await
                .map_err(unavailable)?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// The statements of [`Statements`], each prepared by `$prepare`, all at once.
macro_rules! prepare_concurrently {
    ($prepare:ident; $($field:ident: $cql:expr,)*) => {{
        // One vector, not a `try_join!` of a hundred futures: that one's poll frame outgrew a
        // worker thread's stack in a debug build.
        let mut prepared = futures::future::try_join_all(vec![$($prepare($cql)),*])
            .await?
            .into_iter();
        Statements {
            $($field: prepared.next().expect("one prepared statement per field"),)*
        }
    }};
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
    member_written: PreparedStatement,
    insert_user_chat_at: PreparedStatement,
    chats_of: PreparedStatement,
    chat_ids_first: PreparedStatement,
    chat_ids_after: PreparedStatement,
    record_session: PreparedStatement,
    sessions_of: PreparedStatement,
    forget_sessions: PreparedStatement,
    get_device: PreparedStatement,
    /// `get_device` read at `LOCAL_SERIAL`: it sees every conditional write already applied.
    get_device_serial: PreparedStatement,
    put_device_if_absent: PreparedStatement,
    put_device_if_unchanged: PreparedStatement,
    put_device_by_user: PreparedStatement,
    delete_device_if_owner: PreparedStatement,
    device_listed: PreparedStatement,
    delete_device_by_user: PreparedStatement,
    devices_of: PreparedStatement,
    user_settings: PreparedStatement,
    put_user_settings: PreparedStatement,
    chat_settings: PreparedStatement,
    chat_settings_of: PreparedStatement,
    put_chat_settings: PreparedStatement,
    claim_nonce: PreparedStatement,
    insert_signal: PreparedStatement,
    insert_bucket: PreparedStatement,
    buckets_up_to: PreparedStatement,
    signals_in_bucket: PreparedStatement,
    signals_in_bucket_before: PreparedStatement,
    get_signal: PreparedStatement,
    signal_text_state: PreparedStatement,
    edit_text: PreparedStatement,
    mark_deleted: PreparedStatement,
    scrub_text: PreparedStatement,
    scrub_nonce: PreparedStatement,
    nonce_holder: PreparedStatement,
    buckets_from: PreparedStatement,
    signals_in_bucket_after: PreparedStatement,
    unread_in_bucket: PreparedStatement,
    newest_in_buckets: PreparedStatement,
    newest_buckets_in: PreparedStatement,
    insert_term: PreparedStatement,
    delete_term: PreparedStatement,
    insert_address: PreparedStatement,
    delete_address: PreparedStatement,
    users_by_address: PreparedStatement,
    terms_from: PreparedStatement,
    terms_after: PreparedStatement,
    update_chat: PreparedStatement,
    members_among: PreparedStatement,
    members_first: PreparedStatement,
    members_after: PreparedStatement,
    delete_chat_member: PreparedStatement,
    delete_user_chat: PreparedStatement,
    user_chat_role_written: PreparedStatement,
    delete_user_chat_written: PreparedStatement,
    /// The conditional parts of a membership change (one partition of `chat_members`, one Paxos
    /// round): see `change_member`.
    member_if_role: PreparedStatement,
    add_member_if_absent: PreparedStatement,
    remove_member_if_role: PreparedStatement,
    insert_left_chat: PreparedStatement,
    left_chats_of: PreparedStatement,
    get_summary: PreparedStatement,
    latest_written: PreparedStatement,
    set_summary: PreparedStatement,
    set_latest: PreparedStatement,
    chats_in: PreparedStatement,
    user_entries_in: PreparedStatement,
    chat_info_written: PreparedStatement,
    copy_chat_info: PreparedStatement,
    copy_chat_name: PreparedStatement,
    copy_chat_description: PreparedStatement,
    set_user_summary: PreparedStatement,
    set_user_latest: PreparedStatement,
    read_markers_in: PreparedStatement,
    set_user_read_marker: PreparedStatement,
    delete_user_read_marker: PreparedStatement,
    insert_user_activity: PreparedStatement,
    delete_user_activity: PreparedStatement,
    activity_first: PreparedStatement,
    activity_same: PreparedStatement,
    activity_older: PreparedStatement,
    claim_reaction: PreparedStatement,
    release_reaction: PreparedStatement,
    recount_reaction: PreparedStatement,
    set_tally: PreparedStatement,
    tally_written: PreparedStatement,
    tallies_between: PreparedStatement,
    has_reaction: PreparedStatement,
    reactions_first: PreparedStatement,
    reactions_after: PreparedStatement,
    set_marker: PreparedStatement,
    get_marker: PreparedStatement,
    markers_first: PreparedStatement,
    markers_after: PreparedStatement,
    put_attachment: PreparedStatement,
    put_chat_attachment: PreparedStatement,
    put_blob_ref: PreparedStatement,
    get_attachments: PreparedStatement,
    chat_attachments: PreparedStatement,
    delete_attachment: PreparedStatement,
    delete_chat_attachment: PreparedStatement,
    /// What `update_derived` reads, and writes at a time of its choosing.
    attachment_written: PreparedStatement,
    chat_attachment_written: PreparedStatement,
    put_attachment_at: PreparedStatement,
    put_chat_attachment_at: PreparedStatement,
    /// A send's claim on an attachment's record, before the message is stored: a lightweight
    /// transaction, and its release one too. They are the only writes of the record's
    /// `message_id` cell, so no plain write (whose timestamp Paxos does not order) can hide one.
    claim_attachment_if_free: PreparedStatement,
    /// A claim taken over from the one message named, whose send stopped before storing it.
    take_over_attachment_claim: PreparedStatement,
    release_attachment_if_held: PreparedStatement,
    /// The claim copied to the attachment's row in its chat's list, at a time of its choosing.
    claim_chat_attachment_at: PreparedStatement,
    delete_chat_attachment_at: PreparedStatement,
    delete_blob_ref: PreparedStatement,
    blob_referrers: PreparedStatement,
    condemn_blob: PreparedStatement,
    blob_condemned: PreparedStatement,
    absolve_blob: PreparedStatement,
    put_small_object: PreparedStatement,
    small_object: PreparedStatement,
    small_object_written: PreparedStatement,
    delete_small_object: PreparedStatement,
    small_objects_first: PreparedStatement,
    small_objects_after: PreparedStatement,
}

pub struct CqlStore {
    session: Session,
    keyspace: String,
    statements: Statements,
    /// Circles, pairing pools and removing chats (`circles`).
    circles: circles::CircleStatements,
    calls: calls::CallStatements,
    /// (chat, bucket) pairs this process has written to `signal_buckets`: the row is idempotent, so
    /// writing it once per day per chat is enough.
    known_buckets: std::sync::Mutex<std::collections::HashSet<(Uuid, i32)>>,
    /// Send parity through JetStream; `None` for the lightweight transaction.
    nonce_bucket: Option<NonceBucket>,
    outbox: outbox::OutboxStatements,
    nonce_ttl_secs: i32,
}

const KNOWN_BUCKETS_MAX: usize = 100_000;
/// How many times one recount of a reaction writes its tally at most
/// (`CqlStore::recount_meanwhile`).
const RECOUNT_ROUNDS: usize = 4;

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

/// The partition of a small object: the first two hex digits of its name.
fn small_object_shard(sha256: &str) -> &str {
    sha256.get(..2).unwrap_or("00")
}

/// How many times a device registration tries its conditional write before giving up: each retry
/// follows another registration of the same device that applied meanwhile.
const DEVICE_WRITE_ATTEMPTS: usize = 16;

/// How many of a user's sessions one `IN` deletion names.
const SESSIONS_FORGOTTEN_AT_ONCE: usize = 100;

/// How many users' settings one `IN` query asks for.
const SETTINGS_BATCH: usize = 100;

/// How many bucket rows to look up at a time when a page spans days.
const BUCKET_BATCH: i32 = 16;

impl CqlStore {
    /// The device's row in `devices` as stored (the text a conditional write compares with).
    async fn device_body(&self, id: DeviceId) -> Result<Option<String>, StoreError> {
        self.device_body_by(&self.statements.get_device, id).await
    }

    /// The device's body as `statement` (a read of `devices` by id) finds it.
    async fn device_body_by(
        &self,
        statement: &PreparedStatement,
        id: DeviceId,
    ) -> Result<Option<String>, StoreError> {
        let row = self
            .session
            .execute_unpaged(statement, (id.0,))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<String>,)>()
            .map_err(corrupt)?;
        Ok(row.and_then(|(body,)| body))
    }

    /// The device's body when `devices` names `user` as its owner, read at `LOCAL_SERIAL` (after
    /// every conditional write that applied).
    async fn body_owned_by(
        &self,
        user: UserId,
        id: DeviceId,
    ) -> Result<Option<String>, StoreError> {
        let Some(body) = self
            .device_body_by(&self.statements.get_device_serial, id)
            .await?
        else {
            return Ok(None);
        };
        let owner = serde_json::from_str::<Device>(&body).map_err(corrupt)?;
        Ok((owner.user_id == user).then_some(body))
    }

    /// Makes `user`'s listing of device `id` what `devices` says: its body when it names them,
    /// none otherwise. The listing and `devices` are different partitions, so another
    /// registration can move the device between the read and the write; the read is made again
    /// after each write, and the write again until they agree. Every change of owner settles the
    /// listings of the owner before and after it once applied, so whichever settling comes last
    /// leaves each user's listing right: two registrations at once cannot leave the owner
    /// unlisted, nor someone else listed (and sent the owner's previews).
    async fn settle_listing(&self, user: UserId, id: DeviceId) -> Result<(), StoreError> {
        let mut owned = self.body_owned_by(user, id).await?;
        for _ in 0..DEVICE_WRITE_ATTEMPTS {
            match &owned {
                Some(body) => self
                    .session
                    .execute_unpaged(&self.statements.put_device_by_user, (user.0, id.0, body))
                    .await
                    .map_err(unavailable)?,
                None => self
                    .session
                    .execute_unpaged(&self.statements.delete_device_by_user, (user.0, id.0))
                    .await
                    .map_err(unavailable)?,
            };
            let now = self.body_owned_by(user, id).await?;
            if now == owned {
                return Ok(());
            }
            owned = now;
        }
        Err(StoreError::Unavailable(
            "a device's listing kept changing under other registrations".into(),
        ))
    }

    /// Connects to an already migrated keyspace and prepares every statement.
    pub async fn connect(options: &CqlOptions) -> Result<CqlStore, StoreError> {
        // Boxed: the state machine that prepares every statement is large.
        Box::pin(Self::prepare_all(options)).await
    }

    async fn prepare_all(options: &CqlOptions) -> Result<CqlStore, StoreError> {
        let session = session(options).await?;
        let keyspace = options.keyspace.as_str();
        // Boxed: joined inline, a hundred preparations make a future too large for a thread's
        // stack in a debug build.
        let prepare = |cql: String| -> BoxFuture<'_, Result<PreparedStatement, StoreError>> {
            let session = &session;
            Box::pin(async move {
                session
                    .prepare(qualify(&cql, keyspace))
                    .await
                    .map_err(unavailable)
            })
        };
        // Prepared concurrently: one round of round trips at start, not ninety in a row.
        let mut statements = prepare_concurrently!(prepare;
            check: "SELECT version FROM schema_migrations LIMIT 1".into(),
            upsert_user: "INSERT INTO users (id, username, display_name, email, updated_at) VALUES (?, ?, ?, ?, ?)".into(),
            get_user: "SELECT username, display_name, email FROM users WHERE id = ?".into(),
            // The write timestamp is the one the members' copies are written with (see
            // `copy_chat_info`).
            insert_chat: "INSERT INTO chats (id, kind, name, description, created_at, created_by, info_at) VALUES (?, ?, ?, ?, ?, ?, ?) \
                 USING TIMESTAMP ?"
                    .into(),
            get_chat: "SELECT id, kind, name, description, created_at, created_by FROM chats WHERE id = ?".into(),
            insert_chat_member: "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES (?, ?, ?, ?)".into(),
            insert_user_chat: "INSERT INTO user_chats (user_id, chat_id, role, joined_at) VALUES (?, ?, ?, ?)".into(),
            member_role: "SELECT role FROM chat_members WHERE chat_id = ? AND user_id = ?".into(),
            member_written: "SELECT role, joined_at, writetime(role) FROM chat_members WHERE chat_id = ? AND user_id = ?".into(),
            insert_user_chat_at: "INSERT INTO user_chats (user_id, chat_id, role, joined_at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?".into(),
            chats_of: "SELECT chat_id, role FROM user_chats WHERE user_id = ?".into(),
            chat_ids_first: "SELECT id FROM chats LIMIT ?".into(),
            chat_ids_after: "SELECT id FROM chats WHERE token(id) > token(?) LIMIT ?".into(),
            record_session: "INSERT INTO user_sessions (user_id, session) VALUES (?, ?) USING TTL ?".into(),
            sessions_of: "SELECT session FROM user_sessions WHERE user_id = ?".into(),
            forget_sessions: "DELETE FROM user_sessions WHERE user_id = ? AND session IN ?".into(),
            get_device: "SELECT body FROM devices WHERE device_id = ?".into(),
            get_device_serial: "SELECT body FROM devices WHERE device_id = ?".into(),
            put_device_if_absent: "INSERT INTO devices (device_id, user_id, body) VALUES (?, ?, ?) IF NOT EXISTS".into(),
            put_device_if_unchanged: "UPDATE devices SET user_id = ?, body = ? WHERE device_id = ? IF body = ?".into(),
            put_device_by_user: "INSERT INTO devices_by_user (user_id, device_id, body) VALUES (?, ?, ?)".into(),
            delete_device_if_owner: "DELETE FROM devices WHERE device_id = ? IF user_id = ?".into(),
            device_listed: "SELECT device_id FROM devices_by_user WHERE user_id = ? AND device_id = ?".into(),
            delete_device_by_user: "DELETE FROM devices_by_user WHERE user_id = ? AND device_id = ?".into(),
            devices_of: "SELECT body FROM devices_by_user WHERE user_id = ?".into(),
            user_settings: "SELECT user_id, body FROM user_settings WHERE user_id IN ?".into(),
            put_user_settings: "INSERT INTO user_settings (user_id, body) VALUES (?, ?)".into(),
            chat_settings: "SELECT body FROM chat_member_settings WHERE chat_id = ? AND user_id = ?".into(),
            chat_settings_of: "SELECT user_id, body FROM chat_member_settings WHERE chat_id = ?".into(),
            put_chat_settings: "INSERT INTO chat_member_settings (chat_id, user_id, body) VALUES (?, ?, ?)".into(),

            claim_nonce: "INSERT INTO signal_nonces (chat_id, author_id, nonce, signal_id, kind, text, reply_to, attachments) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS USING TTL ?"
                    .into(),
            // Only the deleted signal's own record: the nonce may have expired and been sent again.
            scrub_nonce: "UPDATE signal_nonces SET text = null, attachments = null WHERE chat_id = ? AND author_id = ? AND nonce = ? IF signal_id = ?".into(),
            nonce_holder: "SELECT signal_id FROM signal_nonces WHERE chat_id = ? AND author_id = ? AND nonce = ?".into(),
            // The write timestamp is the signal's creation time, so a repair re-write of the original
            // never overwrites a later edit or deletion.
            insert_signal: format!(
                "INSERT INTO signals (chat_id, bucket, {SIGNAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ),
            insert_bucket: "INSERT INTO signal_buckets (chat_id, bucket) VALUES (?, ?)".into(),
            buckets_up_to: "SELECT bucket FROM signal_buckets WHERE chat_id = ? AND bucket <= ? LIMIT ?".into(),
            signals_in_bucket: format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? LIMIT ?"
            ),
            signals_in_bucket_before: format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? AND id < ? LIMIT ?"
            ),
            get_signal: format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? AND id = ?"
            ),
            signal_text_state: "SELECT deleted, text, WRITETIME(text) FROM signals WHERE chat_id = ? AND bucket = ? AND id = ?".into(),
            // Edits write only `text` and `edited_at`, and deletions only `deleted` and `text`: an
            // edit never writes `deleted`, so it cannot undo a deletion. See `edit_signal`.
            edit_text: "UPDATE signals USING TIMESTAMP ? SET text = ?, edited_at = ? WHERE chat_id = ? AND bucket = ? AND id = ?"
                    .into(),
            mark_deleted: "UPDATE signals USING TIMESTAMP ? SET deleted = true, text = null WHERE chat_id = ? AND bucket = ? AND id = ?"
                    .into(),
            scrub_text: "UPDATE signals USING TIMESTAMP ? SET text = null WHERE chat_id = ? AND bucket = ? AND id = ?".into(),
            buckets_from: "SELECT bucket FROM signal_buckets WHERE chat_id = ? AND bucket >= ? ORDER BY bucket ASC LIMIT ?".into(),
            signals_in_bucket_after: format!(
                "SELECT {SIGNAL_COLUMNS} FROM signals WHERE chat_id = ? AND bucket = ? AND id > ? ORDER BY id ASC LIMIT ?"
            ),
            unread_in_bucket: "SELECT id, author_id, kind, deleted FROM signals WHERE chat_id = ? AND bucket = ? AND id > ? \
                 ORDER BY id ASC LIMIT ?"
                    .into(),
            newest_in_buckets: format!(
                "SELECT chat_id, id, author_id, kind, deleted FROM signals WHERE chat_id IN ? AND bucket = ? \
                 PER PARTITION LIMIT {UNREAD_BATCH_ROWS}"
            ),
            newest_buckets_in: "SELECT chat_id, bucket FROM signal_buckets WHERE chat_id IN ? PER PARTITION LIMIT 2"
                .into(),
            insert_term: "INSERT INTO user_search (shard, term, user_id) VALUES (?, ?, ?)".into(),
            delete_term: "DELETE FROM user_search WHERE shard = ? AND term = ? AND user_id = ?".into(),
            insert_address: "INSERT INTO user_addresses (address, user_id) VALUES (?, ?)".into(),
            delete_address: "DELETE FROM user_addresses WHERE address = ? AND user_id = ?".into(),
            users_by_address: "SELECT user_id FROM user_addresses WHERE address = ? LIMIT ?".into(),
            terms_from: "SELECT term, user_id FROM user_search WHERE shard = ? AND term >= ? AND term < ? LIMIT ?".into(),
            terms_after: "SELECT term, user_id FROM user_search WHERE shard = ? AND (term, user_id) > (?, ?) AND (term) < (?) LIMIT ?"
                    .into(),
            update_chat: "UPDATE chats USING TIMESTAMP ? SET name = ?, description = ?, info_at = ? WHERE id = ?".into(),
            members_among: "SELECT user_id, role, joined_at FROM chat_members WHERE chat_id = ? AND user_id IN ?".into(),
            members_first: "SELECT user_id, role, joined_at FROM chat_members WHERE chat_id = ? LIMIT ?".into(),
            members_after: "SELECT user_id, role, joined_at FROM chat_members WHERE chat_id = ? AND user_id > ? LIMIT ?".into(),
            delete_chat_member: "DELETE FROM chat_members WHERE chat_id = ? AND user_id = ?".into(),
            delete_user_chat: "DELETE FROM user_chats WHERE user_id = ? AND chat_id = ?".into(),
            user_chat_role_written: "SELECT writetime(role) FROM user_chats WHERE user_id = ? AND chat_id = ?".into(),
            delete_user_chat_written: "DELETE FROM user_chats USING TIMESTAMP ? WHERE user_id = ? AND chat_id = ?".into(),
            member_if_role: "UPDATE chat_members SET role = ? WHERE chat_id = ? AND user_id = ? IF role = ?".into(),
            add_member_if_absent: "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES (?, ?, ?, ?) IF NOT EXISTS".into(),
            remove_member_if_role: "DELETE FROM chat_members WHERE chat_id = ? AND user_id = ? IF role = ?".into(),
            insert_left_chat: "INSERT INTO user_left_chats (user_id, left_at, chat_id) VALUES (?, ?, ?) USING TTL ?".into(),
            left_chats_of: "SELECT chat_id, left_at FROM user_left_chats WHERE user_id = ? AND left_at >= ? LIMIT ?".into(),
            // The chat list's summary lives in the chat's row, so one read gives both. Written
            // with UPDATE (no row marker): a touch that races the chat's removal leaves no row
            // that looks like a chat.
            get_summary: "SELECT activity, latest FROM chats WHERE id = ?".into(),
            latest_written: "SELECT latest, WRITETIME(latest) FROM chats WHERE id = ?".into(),
            set_summary: "UPDATE chats USING TIMESTAMP ? SET activity = ?, latest = ? WHERE id = ?".into(),
            set_latest: "UPDATE chats USING TIMESTAMP ? SET latest = ? WHERE id = ?".into(),
            chats_in: "SELECT id, kind, name, description, created_at, created_by, activity, latest FROM chats WHERE id IN ?".into(),
            // A member's row of `user_chats` also holds copies of the chat's row and summary, so
            // the chat list reads its entries from the user's own partition. A row without a
            // role is no membership: a copy written by a touch, a refresh or a rename that raced
            // the member's leaving.
            user_entries_in: "SELECT chat_id, role, kind, name, description, created_at, created_by, activity, latest \
                 FROM user_chats WHERE user_id = ? AND chat_id IN ?"
                .into(),
            // `info_at` is the write timestamp of the row's last change: a name or description
            // set to null has no WRITETIME.
            chat_info_written: "SELECT kind, name, description, created_at, created_by, \
                 WRITETIME(kind), WRITETIME(name), WRITETIME(description), info_at FROM chats WHERE id = ?"
                .into(),
            // Written with the timestamp of the chat row's values it copies, so a copy never
            // overwrites a newer one, whichever arrives last.
            copy_chat_info: "UPDATE user_chats USING TIMESTAMP ? SET kind = ?, name = ?, description = ?, \
                 created_at = ?, created_by = ? WHERE user_id = ? AND chat_id = ?"
                .into(),
            // A copy of one column at that column's own write time (`write_info_copy`).
            copy_chat_name: "UPDATE user_chats USING TIMESTAMP ? SET name = ? WHERE user_id = ? AND chat_id = ?"
                .into(),
            copy_chat_description: "UPDATE user_chats USING TIMESTAMP ? SET description = ? WHERE user_id = ? AND chat_id = ?"
                .into(),
            set_user_summary: "UPDATE user_chats USING TIMESTAMP ? SET activity = ?, latest = ? WHERE user_id = ? AND chat_id = ?"
                .into(),
            set_user_latest: "UPDATE user_chats USING TIMESTAMP ? SET latest = ? WHERE user_id = ? AND chat_id = ?".into(),
            read_markers_in: "SELECT chat_id, up_to FROM user_read_markers WHERE user_id = ? AND chat_id IN ?".into(),
            set_user_read_marker: "INSERT INTO user_read_markers (user_id, chat_id, up_to) VALUES (?, ?, ?) USING TIMESTAMP ?".into(),
            delete_user_read_marker: "DELETE FROM user_read_markers WHERE user_id = ? AND chat_id = ?".into(),
            insert_user_activity: "INSERT INTO chat_activity_by_user (user_id, activity, chat_id) VALUES (?, ?, ?)".into(),
            delete_user_activity: "DELETE FROM chat_activity_by_user WHERE user_id = ? AND activity = ? AND chat_id = ?".into(),
            activity_first: "SELECT activity, chat_id FROM chat_activity_by_user WHERE user_id = ? LIMIT ?".into(),
            activity_same: "SELECT activity, chat_id FROM chat_activity_by_user WHERE user_id = ? AND activity = ? AND chat_id > ? LIMIT ?"
                    .into(),
            activity_older: "SELECT activity, chat_id FROM chat_activity_by_user WHERE user_id = ? AND activity < ? LIMIT ?".into(),
            claim_reaction: "INSERT INTO reactions (chat_id, signal_id, emoji, user_id) VALUES (?, ?, ?, ?) IF NOT EXISTS".into(),
            release_reaction: "DELETE FROM reactions WHERE chat_id = ? AND signal_id = ? AND emoji = ? AND user_id = ? IF EXISTS".into(),
            recount_reaction: "SELECT COUNT(*) FROM reactions WHERE chat_id = ? AND signal_id = ? AND emoji = ?".into(),
            // The write timestamp is the recount's read time, but later than the tally's as read
            // (`CqlStore::recount_meanwhile`).
            set_tally: "INSERT INTO reaction_tallies (chat_id, bucket, signal_id, emoji, count) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
                    .into(),
            tally_written: "SELECT count, WRITETIME(count) FROM reaction_tallies WHERE chat_id = ? AND bucket = ? AND signal_id = ? AND emoji = ?"
                    .into(),
            tallies_between: "SELECT signal_id, emoji, count FROM reaction_tallies WHERE chat_id = ? AND bucket = ? AND signal_id >= ? AND signal_id <= ?"
                    .into(),
            has_reaction: "SELECT user_id FROM reactions WHERE chat_id = ? AND signal_id = ? AND emoji = ? AND user_id = ?".into(),
            reactions_first: "SELECT emoji, user_id FROM reactions WHERE chat_id = ? AND signal_id = ? LIMIT ?".into(),
            reactions_after: "SELECT emoji, user_id FROM reactions WHERE chat_id = ? AND signal_id = ? AND (emoji, user_id) > (?, ?) LIMIT ?"
                    .into(),
            // The write timestamp is the marked signal's time: the newest marker wins in any order.
            set_marker: "INSERT INTO markers (chat_id, kind, user_id, up_to) VALUES (?, ?, ?, ?) USING TIMESTAMP ?".into(),
            get_marker: "SELECT up_to FROM markers WHERE chat_id = ? AND kind = ? AND user_id = ?".into(),
            markers_first: "SELECT user_id, up_to FROM markers WHERE chat_id = ? AND kind = ? LIMIT ?".into(),
            markers_after: "SELECT user_id, up_to FROM markers WHERE chat_id = ? AND kind = ? AND user_id > ? LIMIT ?".into(),
            put_attachment: "INSERT INTO attachments (id, body) VALUES (?, ?)".into(),
            put_chat_attachment: "INSERT INTO chat_attachments (chat_id, kind, id, body) VALUES (?, ?, ?, ?)".into(),
            put_blob_ref: "INSERT INTO blob_refs (sha256, attachment_id) VALUES (?, ?)".into(),
            get_attachments: "SELECT body, message_id FROM attachments WHERE id IN ?".into(),
            chat_attachments: "SELECT body, message_id FROM chat_attachments WHERE chat_id = ? AND kind = ? AND id < ? LIMIT ?".into(),
            delete_attachment: "DELETE FROM attachments WHERE id = ?".into(),
            delete_chat_attachment: "DELETE FROM chat_attachments WHERE chat_id = ? AND kind = ? AND id = ?".into(),
            attachment_written: "SELECT body, WRITETIME(body), message_id FROM attachments WHERE id = ?".into(),
            chat_attachment_written: "SELECT body, WRITETIME(body), message_id FROM chat_attachments WHERE chat_id = ? AND kind = ? AND id = ?".into(),
            claim_attachment_if_free: "UPDATE attachments SET message_id = ? WHERE id = ? IF message_id = null".into(),
            take_over_attachment_claim: "UPDATE attachments SET message_id = ? WHERE id = ? IF message_id = ?".into(),
            release_attachment_if_held: "UPDATE attachments SET message_id = null WHERE id = ? IF message_id = ?".into(),
            claim_chat_attachment_at: "UPDATE chat_attachments USING TIMESTAMP ? SET message_id = ? WHERE chat_id = ? AND kind = ? AND id = ?".into(),
            put_attachment_at: "INSERT INTO attachments (id, body) VALUES (?, ?) USING TIMESTAMP ?".into(),
            put_chat_attachment_at: "INSERT INTO chat_attachments (chat_id, kind, id, body) VALUES (?, ?, ?, ?) USING TIMESTAMP ?".into(),
            delete_chat_attachment_at: "DELETE FROM chat_attachments USING TIMESTAMP ? WHERE chat_id = ? AND kind = ? AND id = ?".into(),
            delete_blob_ref: "DELETE FROM blob_refs WHERE sha256 = ? AND attachment_id = ?".into(),
            blob_referrers: "SELECT attachment_id FROM blob_refs WHERE sha256 = ? AND attachment_id > ? LIMIT ?".into(),
            // A day: far past any mark's end, so a run that died leaves nothing for long.
            condemn_blob:
                "INSERT INTO blob_marks (sha256, run, until) VALUES (?, ?, ?) USING TTL 86400"
                    .into(),
            blob_condemned: "SELECT until FROM blob_marks WHERE sha256 = ?".into(),
            absolve_blob: "DELETE FROM blob_marks WHERE sha256 = ? AND run = ?".into(),
            put_small_object: "INSERT INTO small_objects (shard, sha256, bytes, size, stored_at) VALUES (?, ?, ?, ?, ?)".into(),
            small_object: "SELECT bytes FROM small_objects WHERE shard = ? AND sha256 = ?".into(),
            small_object_written: "SELECT WRITETIME(bytes) FROM small_objects WHERE shard = ? AND sha256 = ?".into(),
            delete_small_object: "DELETE FROM small_objects USING TIMESTAMP ? WHERE shard = ? AND sha256 = ?".into(),
            small_objects_first: "SELECT sha256, size, stored_at FROM small_objects WHERE shard = ? LIMIT ?".into(),
            small_objects_after: "SELECT sha256, size, stored_at FROM small_objects WHERE shard = ? AND sha256 > ? LIMIT ?".into(),
        );
        statements
            .get_device_serial
            .set_consistency(Consistency::LocalSerial);
        let nonce_bucket = match &options.parity {
            SendParity::JetStream { nats_url, bucket } => {
                Some(NonceBucket::connect(nats_url, bucket, options.nonce_ttl).await?)
            }
            SendParity::Lwt => None,
        };
        let outbox = outbox::OutboxStatements::prepare(&session, keyspace).await?;
        let circles = circles::CircleStatements::prepare(&session, keyspace).await?;
        let calls = calls::CallStatements::prepare(&session, keyspace).await?;
        Ok(CqlStore {
            session,
            keyspace: options.keyspace.clone(),
            statements,
            circles,
            calls,
            known_buckets: Default::default(),
            nonce_bucket,
            outbox,
            nonce_ttl_secs: i32::try_from(options.nonce_ttl.as_secs()).unwrap_or(i32::MAX),
        })
    }

    /// The raw session, for benchmarks that compare against driver-level inserts.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// [`Store::change_member`], with `meanwhile` run after its conditional batch applied and
    /// before its writes of the member's row of `user_chats`: how a test plays a change of the
    /// same member that arrives in between.
    pub async fn change_member_meanwhile(
        &self,
        chat: ChatId,
        change: &GuardedChange,
        meanwhile: impl Future<Output = ()>,
    ) -> Result<bool, StoreError> {
        use scylla::statement::batch::{Batch, BatchType};
        // One conditional batch on the chat's partition of `chat_members`: Paxos serializes it
        // with every other change of the chat's members, from any process, and applies it only if
        // all its conditions hold.
        let target = change.write.user();
        let text = |role: MemberRole| CqlValue::Text(role.as_str().to_owned());
        let mut batch = Batch::new(BatchType::Logged);
        let mut values: Vec<Vec<CqlValue>> = Vec::new();
        for (user, role) in change.expect.iter().filter(|(user, _)| *user != target) {
            // Rewrites the role it requires: a write that changes nothing, for its condition.
            batch.append_statement(self.statements.member_if_role.clone());
            values.push(vec![
                text(*role),
                CqlValue::Uuid(chat.0),
                CqlValue::Uuid(user.0),
                text(*role),
            ]);
        }
        let expected = |user: UserId| {
            change
                .expect
                .iter()
                .find(|(u, _)| *u == user)
                .map(|(_, role)| *role)
                .ok_or_else(|| corrupt("a re-role or removal without the target's expected role"))
        };
        match &change.write {
            MemberWrite::Add(member) => {
                batch.append_statement(self.statements.add_member_if_absent.clone());
                values.push(vec![
                    CqlValue::Uuid(chat.0),
                    CqlValue::Uuid(member.user_id.0),
                    text(member.role),
                    CqlValue::Timestamp(CqlTimestamp(millis(member.joined_at))),
                ]);
            }
            MemberWrite::SetRole(user, role) => {
                batch.append_statement(self.statements.member_if_role.clone());
                values.push(vec![
                    text(*role),
                    CqlValue::Uuid(chat.0),
                    CqlValue::Uuid(user.0),
                    text(expected(*user)?),
                ]);
            }
            MemberWrite::Remove(user) => {
                batch.append_statement(self.statements.remove_member_if_role.clone());
                values.push(vec![
                    CqlValue::Uuid(chat.0),
                    CqlValue::Uuid(user.0),
                    text(expected(*user)?),
                ]);
            }
        }
        let result = self
            .session
            .batch(&batch, values)
            .await
            .map_err(unavailable)?;
        if !applied(result)? {
            return Ok(false);
        }
        meanwhile.await;
        // The user's own index follows the authoritative row, read back after the batch and
        // written at the role's write time (a later change's, if one came since): a removal of
        // the member whose batch came before the read leaves nothing to write, and one after it
        // deletes the row later than the role was written, so it wins over this write whichever
        // arrives first. A write sent at its own time, with the change's values, could land
        // after such a removal's deletion and list the chat to the removed member for good.
        match &change.write {
            MemberWrite::Add(member) => self.restore_joined_chat(chat, member.user_id).await?,
            MemberWrite::SetRole(user, _) => {
                self.list_as_of_role(chat, *user).await?;
            }
            MemberWrite::Remove(user) => {
                // Not in the batch above: a conditional batch may not span tables or partitions.
                // If this fails (or the process stops first), the user's row still lists the
                // chat to them, to their search and to their streams, and no retry of the removal
                // deletes it: the member is gone, so it is refused. The removal's outbox entry,
                // written before the batch, is what finishes it: the sweep that publishes
                // `member.left` for a removal the store holds calls `forget_left_chat` first.
                //
                // The deletion is made after this batch, so it is later than the batch of every
                // addition or change of role of the member before it (Paxos orders them), and
                // later than their rows here, written at their batches' time however late.
                self.record_left_chat(chat, *user).await?;
                self.session
                    .execute_unpaged(&self.statements.delete_user_chat, (user.0, chat.0))
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(true)
    }

    /// [`Store::update_derived`], with `meanwhile` run between its reads and its writes: how a
    /// test plays a deletion that arrives in between.
    ///
    /// Each row (the record, and the attachment's row in its chat's list) gets the version read,
    /// its kind and pictures replaced, written 1 µs after that version's write time (`USING
    /// TIMESTAMP`): the row in the list first, the record last. Why this never undoes a deletion,
    /// in whatever order the writes arrive and whatever the clock of the node that takes them,
    /// without a lightweight transaction:
    ///
    /// - A deletion removes what was written at or before its own write time (a tombstone wins
    ///   a tie), so it removes this write whenever it is later than the version read. A deletion
    ///   reads the attachment, then deletes it, so it is later than every version written before
    ///   its read (a write made after another is later than it: what every deletion in this
    ///   store assumes). It removes this write too, whether that arrives before or after it. Only
    ///   a claim racing the deletion writes a version after the deletion's read; whether that
    ///   version survives is the claim's own race, which this write does not change (but for a
    ///   deletion in the very microsecond of the claim).
    /// - A deletion that finds the image without its pictures removes its row in the file list
    ///   as well ([`Store::delete_attachments`]), where this write lists an image it re-files. One
    ///   that finds it re-filed read the record after this write's rows were written, and removes
    ///   the file row later than them.
    /// - Only the kind and the pictures change. The message the attachment was sent in is a cell
    ///   of its own (`message_id`, see `list_claimed_attachments_meanwhile`) that this write leaves
    ///   alone, except to carry it to a re-filed image's new row in the list.
    ///
    /// The record is read back at the end, so that a deletion that arrived between the read and
    /// the write is seen (and the caller drops the pictures' references).
    pub async fn update_derived_meanwhile(
        &self,
        id: Uuid,
        chat: ChatId,
        stored_as: AttachmentKind,
        kind: AttachmentKind,
        image: Option<&ImageInfo>,
        meanwhile: impl Future<Output = ()>,
    ) -> Result<Option<Attachment>, StoreError> {
        let record = self
            .session
            .execute_unpaged(&self.statements.attachment_written, (id,));
        let listed = self.session.execute_unpaged(
            &self.statements.chat_attachment_written,
            (chat.0, stored_as.as_str(), id),
        );
        let (record, listed) = futures::join!(record, listed);
        let Some(record) = record_to_rewrite(record.map_err(unavailable)?)? else {
            return Ok(None);
        };
        // Without its row (a deletion is under way), the attachment is not listed again.
        let listed = written_attachment(listed.map_err(unavailable)?)?;
        meanwhile.await;
        let derive = |(mut attachment, written): (Attachment, i64)| {
            attachment.kind = kind;
            attachment.image = image.cloned();
            let body = serde_json::to_string(&attachment).map_err(corrupt)?;
            Ok::<_, StoreError>((body, written + 1))
        };
        // The new row of a re-filed image, and whether it carries the message it was sent in.
        let mut refiled: Option<(i64, bool)> = None;
        if let Some(listed) = listed {
            let claimed = listed.0.message_id.is_some();
            let (body, at) = derive(listed)?;
            if kind != stored_as {
                refiled = Some((at, claimed));
            }
            let list = self.session.execute_unpaged(
                &self.statements.put_chat_attachment_at,
                (chat.0, kind.as_str(), id, &body, at),
            );
            let unlist = async {
                if kind == stored_as {
                    return Ok(());
                }
                self.session
                    .execute_unpaged(
                        &self.statements.delete_chat_attachment_at,
                        (at, chat.0, stored_as.as_str(), id),
                    )
                    .await
                    .map(|_| ())
            };
            let (list, unlist) = futures::join!(list, unlist);
            list.map_err(unavailable)?;
            unlist.map_err(unavailable)?;
        }
        let (body, at) = derive(record)?;
        self.session
            .execute_unpaged(&self.statements.put_attachment_at, (id, &body, at))
            .await
            .map_err(unavailable)?;
        let stored = self.get_attachments(&[id]).await?.pop();
        // A claim made after the list's row was read went to the old row, which this write
        // removed. Either the claim reads the record's kind after this write (and claims the new
        // row itself), or its own write is seen here, since the record's claim comes before that
        // read.
        if let (
            Some((at, false)),
            Some(Attachment {
                message_id: Some(message),
                ..
            }),
        ) = (refiled, &stored)
        {
            self.session
                .execute_unpaged(
                    &self.statements.claim_chat_attachment_at,
                    (at, message.0, chat.0, kind.as_str(), id),
                )
                .await
                .map_err(unavailable)?;
        }
        Ok(stored)
    }

    /// [`Store::list_claimed_attachments`], with `meanwhile` run between its read of each
    /// attachment and its write: how a test plays a deletion, or the write of an image's pictures,
    /// that arrives in between.
    ///
    /// The record's `message_id` cell holds the claim ([`Store::claim_attachments`]); this copies
    /// it to the row in the chat's list, writing only that row's `message_id` cell, never the row
    /// itself: the pictures' write ([`Store::update_derived`]) rewrites the row, and neither can
    /// undo the other. The cell is written 1 µs after the write time of the row as read (`USING
    /// TIMESTAMP`), so a deletion that read that version or a later one (every deletion after
    /// this read) removes the copy too, in whatever order their writes arrive: a deleted
    /// attachment is not brought back as a row of a lone claim. The list's row is the one of the
    /// kind the record has after the claim: see `update_derived_meanwhile` for a re-filing racing
    /// it.
    pub async fn list_claimed_attachments_meanwhile(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
        meanwhile: impl Future<Output = ()>,
    ) -> Result<(), StoreError> {
        let mut meanwhile = Some(meanwhile);
        for &id in ids {
            let read = self
                .session
                .execute_unpaged(&self.statements.attachment_written, (id,))
                .await
                .map_err(unavailable)?;
            let Some((attachment, _)) = written_attachment(read)? else {
                continue;
            };
            if attachment.chat_id != chat || attachment.message_id != Some(message) {
                continue;
            }
            if let Some(meanwhile) = meanwhile.take() {
                meanwhile.await;
            }
            let read = self
                .session
                .execute_unpaged(&self.statements.attachment_written, (id,))
                .await
                .map_err(unavailable)?;
            let Some((now, _)) = written_attachment(read)? else {
                continue;
            };
            let mut kinds = vec![attachment.kind];
            if now.kind != attachment.kind {
                kinds.push(now.kind);
            }
            for kind in kinds {
                let listed = self
                    .session
                    .execute_unpaged(
                        &self.statements.chat_attachment_written,
                        (chat.0, kind.as_str(), id),
                    )
                    .await
                    .map_err(unavailable)?;
                let Some((_, listed_at)) = written_attachment(listed)? else {
                    continue;
                };
                self.session
                    .execute_unpaged(
                        &self.statements.claim_chat_attachment_at,
                        (listed_at + 1, message.0, chat.0, kind.as_str(), id),
                    )
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    /// [`Store::claim_attachments`] for one attachment: the message that holds it after the call,
    /// `None` when it is not `chat`'s (or gone).
    async fn claim_attachment(
        &self,
        chat: ChatId,
        id: Uuid,
        message: SignalId,
    ) -> Result<Option<SignalId>, StoreError> {
        // A claim read free or orphaned may be taken by another claimant before this one's
        // condition is checked; the condition then shows it, and the record is read again. Each
        // turn goes round only because another claim changed the cell, so a few are plenty.
        for _ in 0..4 {
            let Some(attachment) = self.get_attachments(&[id]).await?.pop() else {
                return Ok(None);
            };
            if attachment.chat_id != chat {
                return Ok(None);
            }
            let claimed = match attachment.message_id {
                None => {
                    self.session
                        .execute_unpaged(&self.statements.claim_attachment_if_free, (message.0, id))
                        .await
                }
                Some(holder) if holder == message => return Ok(Some(message)),
                Some(holder) => {
                    if !claim_orphaned(holder, OffsetDateTime::now_utc())
                        || self.get_signal(chat, holder).await?.is_some()
                    {
                        return Ok(Some(holder));
                    }
                    self.session
                        .execute_unpaged(
                            &self.statements.take_over_attachment_claim,
                            (message.0, id, holder.0),
                        )
                        .await
                }
            }
            .map_err(unavailable)?;
            match lwt_row(claimed, "message_id")? {
                None => {
                    if self.get_attachments(&[id]).await?.is_empty() {
                        self.release_attachment(id, message).await?;
                        return Ok(None);
                    }
                    return Ok(Some(message));
                }
                Some(Some(CqlValue::Uuid(holder))) if attachment.message_id.is_none() => {
                    return Ok(Some(SignalId(holder)));
                }
                // The orphaned claim was taken over (or given back) meanwhile: read again, to
                // see whether the new holder is itself one to take over or keep.
                Some(Some(CqlValue::Uuid(_))) => continue,
                Some(None | Some(CqlValue::Empty)) => {
                    if attachment.message_id.is_none() {
                        // Not applied, and nothing holds it: the row is gone.
                        return Ok(None);
                    }
                    // The cell is empty: given back meanwhile, or a record that names its
                    // message in its body alone (see `claimed_attachment`), which the condition
                    // on the cell cannot take over.
                    if self
                        .get_attachments(&[id])
                        .await?
                        .pop()
                        .and_then(|a| a.message_id)
                        == attachment.message_id
                    {
                        return Ok(attachment.message_id);
                    }
                    continue;
                }
                Some(Some(other)) => {
                    return Err(corrupt(format!("an attachment's message_id {other:?}")));
                }
            }
        }
        // Taken and taken again by other claimants all along: the holder as last read.
        Ok(self
            .get_attachments(&[id])
            .await?
            .pop()
            .filter(|a| a.chat_id == chat)
            .and_then(|a| a.message_id))
    }

    /// Gives up `message`'s claim on attachment `id`'s record, if it holds it.
    async fn release_attachment(&self, id: Uuid, message: SignalId) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.statements.release_attachment_if_held, (id, message.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// `cql` with its tables qualified by this store's keyspace.
    pub fn qualify(&self, cql: &str) -> String {
        qualify(cql, &self.keyspace)
    }

    /// Claims `signal`'s nonce with a lightweight transaction; `None` when this signal won, else
    /// the signal recorded with the nonce.
    async fn claim_nonce_with_lwt(
        &self,
        signal: &Signal,
        nonce: &str,
    ) -> Result<Option<Signal>, StoreError> {
        let attachments = (!signal.attachments.is_empty()).then(|| {
            signal
                .attachments
                .iter()
                .map(AttachmentRef::id)
                .collect::<Vec<Uuid>>()
        });
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
                    // As the signal's row keeps it: a call signal's call is in its text column.
                    stored_text(signal),
                    signal.reply_to.map(|r| r.0),
                    attachments,
                    self.nonce_ttl_secs,
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
        // Columns: [applied], then (when not applied) the existing row, by name.
        if matches!(column(&row, 0), Some(CqlValue::Boolean(true))) {
            return Ok(None);
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
        let (text, call) = text_and_call(
            kind,
            match named("text") {
                Some(CqlValue::Text(text)) => Some(text.clone()),
                _ => None,
            },
        )?;
        let attachments: Vec<AttachmentRef> = match named("attachments") {
            Some(CqlValue::List(items)) => items
                .iter()
                .filter_map(|item| match item {
                    CqlValue::Uuid(id) => Some(AttachmentRef::Id(*id)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Ok(Some(Signal {
            id: SignalId(*existing_id),
            chat_id: signal.chat_id,
            kind,
            author_id: signal.author_id,
            created_at: created_at(SignalId(*existing_id))?,
            nonce: Some(nonce.to_owned()),
            // A message with neither text nor attachments in its nonce row was deleted: a deletion
            // scrubs both (a message has at least one of them).
            deleted: kind == SignalKind::Message && text.is_none() && attachments.is_empty(),
            text,
            reply_to: match named("reply_to") {
                Some(CqlValue::Uuid(id)) => Some(SignalId(*id)),
                _ => None,
            },
            attachments,
            edited_at: None,
            reactions: Default::default(),
            call,
        }))
    }

    async fn write_signal(&self, signal: &Signal) -> Result<(), StoreError> {
        let created = signal
            .id
            .unix_millis()
            .ok_or_else(|| corrupt("signal id is not time-ordered"))?;
        let bucket = signal_bucket(created);
        // Bucket first: a signal is never in a day the pager does not know about.
        let key = (signal.chat_id.0, bucket);
        let known = self
            .known_buckets
            .lock()
            .map(|k| k.contains(&key))
            .unwrap_or(false);
        if !known {
            self.session
                .execute_unpaged(&self.statements.insert_bucket, key)
                .await
                .map_err(unavailable)?;
            if let Ok(mut known) = self.known_buckets.lock() {
                if known.len() >= KNOWN_BUCKETS_MAX {
                    known.clear();
                }
                known.insert(key);
            }
        }
        let attachments = (!signal.attachments.is_empty()).then(|| {
            signal
                .attachments
                .iter()
                .map(AttachmentRef::id)
                .collect::<Vec<Uuid>>()
        });
        self.session
            .execute_unpaged(
                &self.statements.insert_signal,
                (
                    signal.chat_id.0,
                    bucket,
                    signal.id.0,
                    signal.kind.as_str(),
                    signal.author_id.0,
                    // Absent values are left unset, not bound as null: a null is a tombstone
                    // cell, which every read of the row would then have to skip. `deleted` is
                    // written by deletions only (see `edit_signal`).
                    MaybeUnset::from_option(signal.nonce.as_deref()),
                    MaybeUnset::from_option(stored_text(signal)),
                    MaybeUnset::from_option(signal.reply_to.map(|r| r.0)),
                    MaybeUnset::from_option(attachments),
                    MaybeUnset::from_option(signal.edited_at.map(|t| CqlTimestamp(millis(t)))),
                    MaybeUnset::from_option(signal.deleted.then_some(true)),
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
    let deleted = deleted.unwrap_or(false);
    let kind = parse(&kind)?;
    let (text, call) = text_and_call(kind, if deleted { None } else { text })?;
    Ok(Signal {
        id,
        chat_id,
        kind,
        author_id: UserId(author_id),
        created_at: created_at(id)?,
        nonce,
        text,
        reply_to: reply_to.map(SignalId),
        attachments: attachments
            .unwrap_or_default()
            .into_iter()
            .map(AttachmentRef::Id)
            .collect(),
        edited_at: edited_at.map(|t| from_millis(t.0)).transpose()?,
        deleted,
        reactions: Default::default(),
        call,
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
        let (old_terms, old_addresses) = match self.get_user(user.id).await? {
            Some(old) => (search_terms(&old), address_terms_written_before(&old)),
            None => (Vec::new(), Vec::new()),
        };
        let new_terms = search_terms(user);
        let new_addresses = address_terms(user);
        for address in old_addresses.iter().filter(|a| !new_addresses.contains(a)) {
            self.session
                .execute_unpaged(
                    &self.statements.delete_address,
                    (address.as_str(), user.id.0),
                )
                .await
                .map_err(unavailable)?;
        }
        // Every address is written, not only the new ones: a process of the build before
        // migration 23 writes users without their rows here, and only a write like this one gives
        // them back (the write is idempotent).
        for address in &new_addresses {
            self.session
                .execute_unpaged(
                    &self.statements.insert_address,
                    (address.as_str(), user.id.0),
                )
                .await
                .map_err(unavailable)?;
        }
        for term in old_terms.iter().filter(|t| !new_terms.contains(t)) {
            self.session
                .execute_unpaged(
                    &self.statements.delete_term,
                    (shard(term), term.as_str(), user.id.0),
                )
                .await
                .map_err(unavailable)?;
        }
        for term in new_terms.iter().filter(|t| !old_terms.contains(t)) {
            self.session
                .execute_unpaged(
                    &self.statements.insert_term,
                    (shard(term), term.as_str(), user.id.0),
                )
                .await
                .map_err(unavailable)?;
        }
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
        let info = ChatInfo {
            kind: chat.kind.as_str().to_owned(),
            name: chat.name.clone(),
            description: chat.description.clone(),
            created_at: joined,
            created_by: chat.created_by.0,
            written: now_micros(),
            name_written: None,
            description_written: None,
        };
        for (user, role) in &chat.members {
            self.join_with_copy(chat.id, *user, role.as_str(), joined, &info)
                .await?;
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
                    // A new row: an absent value is left unset rather than written as a null,
                    // which would be a tombstone.
                    MaybeUnset::from_option(chat.name.as_deref()),
                    MaybeUnset::from_option(chat.description.as_deref()),
                    joined,
                    chat.created_by.0,
                    info.written,
                    info.written,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.get_chat, (id.0,))
            .await
            .map_err(unavailable)?;
        match rows::<ChatRow>(result)?.into_iter().next() {
            Some(row) => to_chat(row),
            None => Ok(None),
        }
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
        // A chat's members fit in one partition; read it a page at a time.
        const PAGE: usize = 1_000;
        let mut members: Vec<Member> = Vec::new();
        loop {
            let page = self
                .members_page(chat, members.last().map(|m| m.user_id), PAGE)
                .await?;
            let done = page.len() < PAGE;
            members.extend(page);
            if done {
                return Ok(members);
            }
        }
    }

    async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, StoreError> {
        // One partition, read a page at a time by the driver.
        let mut rows = self
            .session
            .execute_iter(self.statements.chats_of.clone(), (user.0,))
            .await
            .map_err(unavailable)?
            .rows_stream::<(Uuid, Option<String>)>()
            .map_err(corrupt)?;
        let mut chats = Vec::new();
        while let Some(row) = rows.next().await {
            // A row without a role is a copy that raced the member's leaving, not a membership.
            if let (chat, Some(_)) = row.map_err(corrupt)? {
                chats.push(ChatId(chat));
            }
        }
        Ok(chats)
    }

    async fn chat_ids(
        &self,
        after: Option<ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, StoreError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let result = match after {
            None => {
                self.session
                    .execute_unpaged(&self.statements.chat_ids_first, (limit,))
                    .await
            }
            Some(after) => {
                self.session
                    .execute_unpaged(&self.statements.chat_ids_after, (after.0, limit))
                    .await
            }
        }
        .map_err(unavailable)?;
        result
            .into_rows_result()
            .map_err(corrupt)?
            .rows::<(Uuid,)>()
            .map_err(corrupt)?
            .map(|row| row.map(|(id,)| ChatId(id)).map_err(corrupt))
            .collect()
    }

    /// `devices` names one owner and is only written conditionally (on what was read before), so
    /// of two registrations at once each applies in turn and the later one's owner stays. The new
    /// owner's listing is written before they own the device (so that owning it never goes
    /// without it); once the write applies, the registration settles the listings of both the
    /// previous owner and the new one against `devices` (`settle_listing`), which leaves the last
    /// owner listed, and only them, whatever the order the racing registrations finish in.
    async fn put_device(&self, device: &Device) -> Result<Option<Device>, StoreError> {
        let body = serde_json::to_string(device).map_err(corrupt)?;
        self.session
            .execute_unpaged(
                &self.statements.put_device_by_user,
                (device.user_id.0, device.id.0, &body),
            )
            .await
            .map_err(unavailable)?;
        let mut previous = self.device_body(device.id).await?;
        let mut attempts = 0;
        loop {
            let result = match &previous {
                None => {
                    self.session
                        .execute_unpaged(
                            &self.statements.put_device_if_absent,
                            (device.id.0, device.user_id.0, &body),
                        )
                        .await
                }
                Some(before) => {
                    self.session
                        .execute_unpaged(
                            &self.statements.put_device_if_unchanged,
                            (device.user_id.0, &body, device.id.0, before),
                        )
                        .await
                }
            }
            .map_err(unavailable)?;
            match lwt_text(result, "body")? {
                None => break,
                Some(now) => previous = now,
            }
            attempts += 1;
            if attempts == DEVICE_WRITE_ATTEMPTS {
                // Not the owner: not listed either (unless they own it after all).
                self.settle_listing(device.user_id, device.id).await?;
                return Err(StoreError::Unavailable(
                    "a device registration kept losing to others of the same device".into(),
                ));
            }
        }
        let previous: Option<Device> = previous
            .map(|body| serde_json::from_str(&body).map_err(corrupt))
            .transpose()?;
        if let Some(previous) = &previous
            && previous.user_id != device.user_id
        {
            self.settle_listing(previous.user_id, device.id).await?;
        }
        self.settle_listing(device.user_id, device.id).await?;
        Ok(previous)
    }

    async fn record_session(
        &self,
        user: UserId,
        session: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        // A TTL of 0 would keep the row for ever; the protocol's limit is 20 years.
        let ttl = i32::try_from(ttl.as_secs().clamp(1, 20 * 365 * 24 * 3600)).unwrap_or(i32::MAX);
        self.session
            .execute_unpaged(&self.statements.record_session, (user.0, session, ttl))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn sessions_of(&self, user: UserId) -> Result<Vec<String>, StoreError> {
        let mut rows = self
            .session
            .execute_iter(self.statements.sessions_of.clone(), (user.0,))
            .await
            .map_err(unavailable)?
            .rows_stream::<(String,)>()
            .map_err(corrupt)?;
        let mut sessions = Vec::new();
        while let Some(row) = rows.next().await {
            sessions.push(row.map_err(corrupt)?.0);
        }
        Ok(sessions)
    }

    async fn forget_sessions(&self, user: UserId, sessions: &[String]) -> Result<(), StoreError> {
        // One partition; a bounded `IN` list at a time.
        for batch in sessions.chunks(SESSIONS_FORGOTTEN_AT_ONCE) {
            self.session
                .execute_unpaged(&self.statements.forget_sessions, (user.0, batch))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, StoreError> {
        let mut rows = self
            .session
            .execute_iter(self.statements.devices_of.clone(), (user.0,))
            .await
            .map_err(unavailable)?
            .rows_stream::<(String,)>()
            .map_err(corrupt)?;
        let mut devices = Vec::new();
        while let Some(row) = rows.next().await {
            devices.push(serde_json::from_str(&row.map_err(corrupt)?.0).map_err(corrupt)?);
        }
        Ok(devices)
    }

    async fn user_settings(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, UserSettings)>, StoreError> {
        // `IN` on the partition key, a bounded list at a time, the lists read concurrently.
        let reads = users.chunks(SETTINGS_BATCH).map(|batch| async move {
            let ids: Vec<Uuid> = batch.iter().map(|user| user.0).collect();
            let mut rows = self
                .session
                .execute_iter(self.statements.user_settings.clone(), (ids,))
                .await
                .map_err(unavailable)?
                .rows_stream::<(Uuid, String)>()
                .map_err(corrupt)?;
            let mut found = Vec::new();
            while let Some(row) = rows.next().await {
                let (user, body) = row.map_err(corrupt)?;
                found.push((UserId(user), serde_json::from_str(&body).map_err(corrupt)?));
            }
            Ok::<_, StoreError>(found)
        });
        let batches = futures::future::try_join_all(reads).await?;
        Ok(batches.into_iter().flatten().collect())
    }

    async fn put_user_settings(
        &self,
        user: UserId,
        settings: &UserSettings,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(settings).map_err(corrupt)?;
        self.session
            .execute_unpaged(&self.statements.put_user_settings, (user.0, body))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<ChatSettings>, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.chat_settings, (chat.0, user.0))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<String>,)>()
            .map_err(corrupt)?;
        row.and_then(|(body,)| body)
            .map(|body| serde_json::from_str(&body).map_err(corrupt))
            .transpose()
    }

    async fn chat_settings_of(
        &self,
        chat: ChatId,
    ) -> Result<Vec<(UserId, ChatSettings)>, StoreError> {
        let mut rows = self
            .session
            .execute_iter(self.statements.chat_settings_of.clone(), (chat.0,))
            .await
            .map_err(unavailable)?
            .rows_stream::<(Uuid, String)>()
            .map_err(corrupt)?;
        let mut found = Vec::new();
        while let Some(row) = rows.next().await {
            let (user, body) = row.map_err(corrupt)?;
            found.push((UserId(user), serde_json::from_str(&body).map_err(corrupt)?));
        }
        Ok(found)
    }

    async fn put_chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
        settings: &ChatSettings,
    ) -> Result<(), StoreError> {
        let body = serde_json::to_string(settings).map_err(corrupt)?;
        self.session
            .execute_unpaged(&self.statements.put_chat_settings, (chat.0, user.0, body))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The caller's own listing goes whoever `devices` names: a registration by someone else that
    /// raced theirs may have left it, and it must not outlive their removing it. It is settled
    /// once the device is gone (see `settle_listing`): a registration racing the removal may have
    /// written it back meanwhile.
    async fn delete_device(&self, user: UserId, id: DeviceId) -> Result<bool, StoreError> {
        let listed = self
            .session
            .execute_unpaged(&self.statements.device_listed, (user.0, id.0))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Uuid,)>()
            .map_err(corrupt)?
            .is_some();
        self.session
            .execute_unpaged(&self.statements.delete_device_by_user, (user.0, id.0))
            .await
            .map_err(unavailable)?;
        let owned = applied(
            self.session
                .execute_unpaged(&self.statements.delete_device_if_owner, (id.0, user.0))
                .await
                .map_err(unavailable)?,
        )?;
        self.settle_listing(user, id).await?;
        Ok(listed || owned)
    }

    async fn insert_signal(&self, signal: &Signal) -> Result<Inserted, StoreError> {
        let Some(nonce) = signal.nonce.as_deref() else {
            self.write_signal(signal).await?;
            return Ok(Inserted::Created(signal.clone()));
        };
        // `signal` is written only once its nonce is won, and only by the write below: a failure
        // before that write, or on the way to answering another attempt's signal, leaves nothing
        // of `signal` written, and nothing will be (even a claim of the nonce that timed out and
        // was applied after all only lets a retry write the signal again, as its holder).
        let holder = match &self.nonce_bucket {
            Some(bucket) => match bucket.claim(signal, nonce).await.map_err(not_written)? {
                Claim::Won => None,
                Claim::Taken(holder) => Some(*holder),
            },
            None => self
                .claim_nonce_with_lwt(signal, nonce)
                .await
                .map_err(not_written)?,
        };
        let Some(holder) = holder else {
            self.write_signal(signal).await?;
            return Ok(Inserted::Created(signal.clone()));
        };
        // The winner may have died between claiming the nonce and writing the signal: write it
        // again. Its write timestamp is the creation time, so this cannot undo a later edit or
        // deletion (those are written later in time; see `edit_signal`).
        if !holder.deleted {
            self.write_signal(&holder).await.map_err(not_written)?;
        }
        // Answer with the stored row, which carries any edits since.
        let stored = self
            .get_signal(holder.chat_id, holder.id)
            .await
            .map_err(not_written)?;
        Ok(Inserted::Existing(stored.unwrap_or(holder)))
    }

    async fn nonce_holder(
        &self,
        chat: ChatId,
        author: UserId,
        nonce: &str,
    ) -> Result<Option<SignalId>, StoreError> {
        if let Some(bucket) = &self.nonce_bucket {
            return bucket.holder(chat, author, nonce).await;
        }
        let result = self
            .session
            .execute_unpaged(&self.statements.nonce_holder, (chat.0, author.0, nonce))
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Uuid,)>(result)?
            .into_iter()
            .next()
            .map(|(id,)| SignalId(id)))
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

    async fn user_terms(
        &self,
        prefix: &str,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        if prefix.is_empty() {
            return Ok(Vec::new());
        }
        let shard = shard(prefix);
        let upper = format!("{prefix}\u{10FFFF}");
        let limit = limit_i32(limit);
        let result = match after {
            Some((term, user)) => {
                self.session
                    .execute_unpaged(
                        &self.statements.terms_after,
                        (shard, term, user.0, upper, limit),
                    )
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.statements.terms_from, (shard, prefix, upper, limit))
                    .await
            }
        }
        .map_err(unavailable)?;
        rows::<(String, Uuid)>(result)?
            .into_iter()
            .map(|(term, user)| Ok((term, UserId(user))))
            .collect()
    }

    async fn users_by_address(
        &self,
        address: &str,
        limit: usize,
    ) -> Result<Vec<UserId>, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.users_by_address,
                (address, limit_i32(limit)),
            )
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Uuid,)>(result)?
            .into_iter()
            .map(|(user,)| UserId(user))
            .collect())
    }

    async fn update_chat(&self, id: ChatId, change: InfoChange<'_>) -> Result<(), StoreError> {
        let Some(before) = self.chat_info(id).await? else {
            return Ok(());
        };
        // Later than what it replaces, whatever this process's clock says; the members' copies
        // are written with the same timestamp. Only the changed columns are written, here and in
        // the copies: a change of the other column made at the same time stays.
        let info = ChatInfo {
            name: change
                .name
                .map_or(before.name.clone(), |name| name.map(str::to_owned)),
            description: change
                .description
                .map_or(before.description.clone(), |d| d.map(str::to_owned)),
            written: now_micros().max(before.written + 1),
            ..before
        };
        fn column(changed: Option<Option<&str>>) -> MaybeUnset<Option<&str>> {
            changed.map_or(MaybeUnset::Unset, MaybeUnset::Set)
        }
        self.session
            .execute_unpaged(
                &self.statements.update_chat,
                (
                    info.written,
                    column(change.name),
                    column(change.description),
                    info.written,
                    id.0,
                ),
            )
            .await
            .map_err(unavailable)?;
        // Members read after the write: a member added meanwhile either is among them or copies
        // the chat's row after this write (`copy_info_to`, which reads after its own write).
        let members = self.members(id).await?;
        let info = &info;
        futures::stream::iter(members)
            .map(|member| async move {
                self.session
                    .execute_unpaged(
                        &self.statements.copy_chat_info,
                        info.change_values(member.user_id, id, change),
                    )
                    .await
                    .map_err(unavailable)
                    .map(drop)
            })
            .buffer_unordered(32)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn members_among(
        &self,
        chat: ChatId,
        users: &[UserId],
    ) -> Result<Vec<Member>, StoreError> {
        let reads = users.chunks(MEMBERS_AMONG_PER_READ).map(|chunk| {
            let ids: Vec<Uuid> = chunk.iter().map(|user| user.0).collect();
            async move {
                let result = self
                    .session
                    .execute_unpaged(&self.statements.members_among, (chat.0, ids))
                    .await
                    .map_err(unavailable)?;
                member_rows(result)
            }
        });
        Ok(futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    async fn members_page(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError> {
        let result = match after {
            Some(after) => {
                self.session
                    .execute_unpaged(
                        &self.statements.members_after,
                        (chat.0, after.0, limit_i32(limit)),
                    )
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(&self.statements.members_first, (chat.0, limit_i32(limit)))
                    .await
            }
        }
        .map_err(unavailable)?;
        member_rows(result)
    }

    async fn put_member(&self, chat: ChatId, member: &Member) -> Result<(), StoreError> {
        let joined = CqlTimestamp(millis(member.joined_at));
        let user = member.user_id.0;
        self.session
            .execute_unpaged(
                &self.statements.insert_user_chat,
                (user, chat.0, member.role.as_str(), joined),
            )
            .await
            .map_err(unavailable)?;
        self.session
            .execute_unpaged(
                &self.statements.insert_chat_member,
                (chat.0, user, member.role.as_str(), joined),
            )
            .await
            .map_err(unavailable)?;
        self.copy_info_to(chat, member.user_id).await
    }

    async fn change_member(
        &self,
        chat: ChatId,
        change: &GuardedChange,
    ) -> Result<bool, StoreError> {
        self.change_member_meanwhile(chat, change, async {}).await
    }

    async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        use scylla::statement::batch::{Batch, BatchType};
        // Both rows in one logged batch. As two requests, a failure of the second left the user's
        // row of `user_chats`, which lists the chat to them, to their search and to their
        // streams, with nothing to delete it: the authoritative row was gone, so a retry found
        // no member to remove. Once the coordinator has the batch in its batchlog, both deletions
        // are applied, eventually, whatever fails after; before that, neither is, and a retry
        // finds the member still in. Removals are rare: the batchlog's writes cost little.
        //
        // Only a membership that is there ends: a leaving recorded for someone who was not a
        // member would replay the chat to them on resume, and a repeated removal would move their
        // leaving ahead of later ones. Either row counts: the user's row outlives the
        // authoritative one when a removal stopped half-way. With neither there, nothing is
        // written, so a join that raced this read is kept, as if it came after the removal.
        let listed = self.user_chat_role_written(chat, user).await?.is_some();
        if !listed && self.member_role(chat, user).await?.is_none() {
            return Ok(());
        }
        self.record_left_chat(chat, user).await?;
        let mut batch = Batch::new(BatchType::Logged);
        batch.append_statement(self.statements.delete_chat_member.clone());
        batch.append_statement(self.statements.delete_user_chat.clone());
        self.session
            .batch(&batch, ((chat.0, user.0), (user.0, chat.0)))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn forget_left_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        // The user's row is read before the authoritative one, and deleted only up to the write
        // timestamp of the role read: a join after the check writes its row after that read, so
        // later, and keeps it. (A copy written later than the role survives as a row without a
        // role, which is no membership.)
        let Some(written) = self.user_chat_role_written(chat, user).await? else {
            return Ok(());
        };
        if self.member_role(chat, user).await?.is_some() {
            return Ok(());
        }
        self.record_left_chat(chat, user).await?;
        self.session
            .execute_unpaged(
                &self.statements.delete_user_chat_written,
                (written, user.0, chat.0),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn left_chats_of(
        &self,
        user: UserId,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<LeftChat>, StoreError> {
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let found: Vec<(Uuid, CqlTimestamp)> = rows(
            self.session
                .execute_unpaged(
                    &self.statements.left_chats_of,
                    (user.0, CqlTimestamp(millis(since)), limit),
                )
                .await
                .map_err(unavailable)?,
        )?;
        // Newest first: a chat left more than once is kept at its latest leaving.
        let mut seen = HashSet::new();
        found
            .into_iter()
            .filter(|(chat, _)| seen.insert(*chat))
            .map(|(chat, left_at)| {
                Ok(LeftChat {
                    chat_id: ChatId(chat),
                    left_at: from_millis(left_at.0)?,
                })
            })
            .collect()
    }

    async fn restore_joined_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        if !self.list_as_of_role(chat, user).await? {
            return Ok(());
        }
        self.copy_info_to(chat, user).await
    }

    async fn touch_chat(
        &self,
        chat: ChatId,
        members: &[UserId],
        activity: SignalId,
        latest: Option<&Signal>,
    ) -> Result<(), StoreError> {
        let previous = self.summary_of(chat).await?.map(|(activity, _)| activity);
        if previous.is_some_and(|p| p >= activity) {
            // A newer signal already moved the chat; this one must not move it back.
            return Ok(());
        }
        // The signal's time is the write timestamp of the summaries: concurrent touches settle on
        // the newest, and a refresh of the copy after an edit (written later in time) wins over
        // this one.
        let at = activity.unix_millis().unwrap_or_default() * 1000;
        let copy = latest.map(summary_copy).transpose()?;
        // A member's move is one request: the old activity row, the new one and the member's
        // copy of the summary (in `user_chats`) all have the member as partition key, so an
        // unlogged batch of them is applied as one mutation.
        let batch = {
            use scylla::statement::batch::{Batch, BatchType};
            let mut batch = Batch::new(BatchType::Unlogged);
            if previous.is_some() {
                batch.append_statement(self.statements.delete_user_activity.clone());
            }
            batch.append_statement(self.statements.insert_user_activity.clone());
            batch.append_statement(self.statements.set_user_summary.clone());
            batch
        };
        let (batch, copy_ref) = (&batch, &copy);
        futures::stream::iter(members.iter().copied())
            .map(|member| async move {
                let inserted = (member.0, activity.0, chat.0);
                // No copy is left unset, not written as a null (a tombstone in the member's
                // partition): an older copy left in place names another signal than the
                // activity, which readers already treat as no copy.
                let summary = (
                    at,
                    activity.0,
                    MaybeUnset::from_option(copy_ref.as_deref()),
                    member.0,
                    chat.0,
                );
                match previous {
                    Some(previous) => self
                        .session
                        .batch(batch, ((member.0, previous.0, chat.0), inserted, summary))
                        .await
                        .map(drop),
                    None => self
                        .session
                        .batch(batch, (inserted, summary))
                        .await
                        .map(drop),
                }
                .map_err(unavailable)
            })
            .buffer_unordered(32)
            .try_collect::<Vec<()>>()
            .await?;
        self.session
            .execute_unpaged(
                &self.statements.set_summary,
                (at, activity.0, MaybeUnset::from_option(copy), chat.0),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn untouch_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        if let Some((activity, _)) = self.summary_of(chat).await? {
            self.session
                .execute_unpaged(
                    &self.statements.delete_user_activity,
                    (user.0, activity.0, chat.0),
                )
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// The rows of [`Store::chat_list`]. Checking rows alone would need two of its four reads;
    /// the chat list is what asks for them, so one walk over the rows serves both.
    async fn chats_by_activity(
        &self,
        user: UserId,
        after: Option<ChatActivity>,
        limit: usize,
    ) -> Result<Vec<ChatActivity>, StoreError> {
        let listed = self.chat_list(user, after, limit).await?;
        Ok(listed.into_iter().map(|(row, _)| row).collect())
    }

    async fn chat_entries(
        &self,
        user: UserId,
        chats: &[ChatId],
    ) -> Result<Vec<ChatEntry>, StoreError> {
        if chats.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = chats.iter().map(|c| c.0).collect();
        let mut read = self.read_entries(user, &ids).await?;
        self.entries_from(&mut read, chats.iter().map(|chat| (*chat, None)))
            .await
    }

    /// The activity rows and, from the same round of reads, their entries: the read that checks a
    /// batch of activity rows (the user's rows of `user_chats`: membership and the copy of each
    /// chat's current activity) is one of the two that make the entries, so the page costs one
    /// round of reads after the activity rows instead of two.
    async fn chat_list(
        &self,
        user: UserId,
        after: Option<ChatActivity>,
        limit: usize,
    ) -> Result<Vec<(ChatActivity, Option<ChatEntry>)>, StoreError> {
        let mut found: Vec<(ChatActivity, Option<ChatEntry>)> = Vec::with_capacity(limit);
        let mut listed_chats: HashSet<Uuid> = HashSet::new();
        let mut position = after;
        loop {
            // At most 100: the batch's ids go into `IN` lists, and ScyllaDB refuses more than
            // 100 keys in one by default.
            let want = limit_i32(limit.clamp(16, 100));
            let batch = self.activity_batch(user, position, want).await?;
            let exhausted = batch.len() < want as usize;
            if batch.is_empty() {
                return Ok(found);
            }
            let chat_ids: Vec<Uuid> = batch.iter().map(|(_, chat)| *chat).collect();
            let mut read = self.read_entries(user, &chat_ids).await?;
            let mut listed = Vec::new();
            for (activity, chat) in batch {
                let row = ChatActivity {
                    chat_id: ChatId(chat),
                    activity: SignalId(activity),
                };
                position = Some(row);
                if read.is_stale(chat, activity) {
                    self.drop_activity_row(user, activity, chat).await?;
                    continue;
                }
                // Moves in flight can leave a chat two live rows (two ahead, or one ahead and
                // the current one). The newest, met first, is listed; the other is skipped, not
                // removed, until the summary settles it. Only within one call: a later page
                // may meet the other row while the moves are in flight.
                if !listed_chats.insert(chat) {
                    continue;
                }
                listed.push(row);
                if found.len() + listed.len() == limit {
                    break;
                }
            }
            let mut entries: HashMap<ChatId, ChatEntry> = self
                .entries_from(
                    &mut read,
                    listed.iter().map(|row| (row.chat_id, Some(row.activity))),
                )
                .await?
                .into_iter()
                .map(|entry| (entry.chat.id, entry))
                .collect();
            found.extend(listed.into_iter().map(|row| {
                let entry = entries.remove(&row.chat_id);
                (row, entry)
            }));
            if exhausted || found.len() == limit {
                return Ok(found);
            }
        }
    }

    async fn get_signal(&self, chat: ChatId, id: SignalId) -> Result<Option<Signal>, StoreError> {
        let Some(created) = id.unix_millis() else {
            return Ok(None);
        };
        let result = self
            .session
            .execute_unpaged(
                &self.statements.get_signal,
                (chat.0, signal_bucket(created), id.0),
            )
            .await
            .map_err(unavailable)?;
        result
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<SignalRow>()
            .map_err(corrupt)?
            .map(|row| to_signal(chat, row))
            .transpose()
    }

    async fn edit_signal(
        &self,
        chat: ChatId,
        id: SignalId,
        text: &str,
        edited_at: time::OffsetDateTime,
    ) -> Result<Option<Signal>, StoreError> {
        let Some(before) = self.get_signal(chat, id).await? else {
            return Ok(None);
        };
        if before.deleted {
            return Ok(Some(before));
        }
        let bucket = signal_bucket(created_millis(id)?);
        // Later than the original's write (its creation time), whatever this process's clock says.
        let at = change_timestamp(id)?;
        self.session
            .execute_unpaged(
                &self.statements.edit_text,
                (
                    at,
                    text,
                    CqlTimestamp(millis(edited_at)),
                    chat.0,
                    bucket,
                    id.0,
                ),
            )
            .await
            .map_err(unavailable)?;
        // A deletion that raced this edit may have been written before it (then the edit's text
        // is live again under `deleted`) or after it. Each side reads the other's cell after its
        // own write, so at least one of them sees both and scrubs the text.
        self.scrub_if_deleted(chat, id).await?;
        self.refresh_latest(chat, id).await?;
        self.decorated_signal(chat, id).await
    }

    async fn delete_signal(
        &self,
        chat: ChatId,
        id: SignalId,
    ) -> Result<Option<Signal>, StoreError> {
        let Some(before) = self.get_signal(chat, id).await? else {
            return Ok(None);
        };
        let bucket = signal_bucket(created_millis(id)?);
        self.session
            .execute_unpaged(
                &self.statements.mark_deleted,
                (change_timestamp(id)?, chat.0, bucket, id.0),
            )
            .await
            .map_err(unavailable)?;
        self.scrub_if_deleted(chat, id).await?;
        let tombstone = Signal {
            text: None,
            deleted: true,
            reactions: Default::default(),
            call: None,
            ..before
        };
        if let Some(nonce) = tombstone.nonce.as_deref() {
            match &self.nonce_bucket {
                Some(bucket) => bucket.scrub(&tombstone, nonce).await?,
                None => {
                    self.session
                        .execute_unpaged(
                            &self.statements.scrub_nonce,
                            (chat.0, tombstone.author_id.0, nonce, tombstone.id.0),
                        )
                        .await
                        .map_err(unavailable)?;
                }
            }
        }
        self.refresh_latest(chat, id).await?;
        self.decorated_signal(chat, id).await
    }

    async fn signals_after(
        &self,
        chat: ChatId,
        after: SignalId,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError> {
        let mut out = Vec::with_capacity(limit);
        let mut lower_bucket = signal_bucket(after.unix_millis().unwrap_or(0));
        'buckets: loop {
            let buckets: Vec<(i32,)> = rows(
                self.session
                    .execute_unpaged(
                        &self.statements.buckets_from,
                        (chat.0, lower_bucket, BUCKET_BATCH),
                    )
                    .await
                    .map_err(unavailable)?,
            )?;
            for (bucket,) in &buckets {
                let want = limit_i32(limit - out.len());
                let result = self
                    .session
                    .execute_unpaged(
                        &self.statements.signals_in_bucket_after,
                        (chat.0, *bucket, after.0, want),
                    )
                    .await
                    .map_err(unavailable)?;
                for row in rows::<SignalRow>(result)? {
                    out.push(to_signal(chat, row)?);
                }
                if out.len() >= limit {
                    break 'buckets;
                }
            }
            match buckets.last() {
                Some((last,)) if buckets.len() == BUCKET_BATCH as usize => lower_bucket = last + 1,
                _ => break,
            }
        }
        Ok(out)
    }

    async fn count_unread(
        &self,
        chat: ChatId,
        after: Option<SignalId>,
        through: Option<SignalId>,
        chat_created_at: OffsetDateTime,
        reader: UserId,
        cap: usize,
    ) -> Result<usize, StoreError> {
        const SCAN_PAGE: i32 = 500;
        let after_id = after.map(|a| a.0).unwrap_or(Uuid::nil());
        let mut lower_bucket = after
            .and_then(|a| a.unix_millis())
            .map(signal_bucket)
            .unwrap_or(i32::MIN);
        // The first bucket is almost always the marker's (or, with no marker, the creation's):
        // its first page is read alongside the bucket list instead of after it, and used only if
        // the list does start there. One round trip fewer per count, the same answer.
        let guessed_bucket = match after {
            Some(_) => lower_bucket,
            None => signal_bucket(millis(chat_created_at)),
        };
        let first_want = SCAN_PAGE.min(limit_i32(UNREAD_SCAN_LIMIT));
        let scan = |bucket: i32, from: Uuid, want: i32| async move {
            rows::<(Uuid, Uuid, String, Option<bool>)>(
                self.session
                    .execute_unpaged(
                        &self.statements.unread_in_bucket,
                        (chat.0, bucket, from, want),
                    )
                    .await
                    .map_err(unavailable)?,
            )
        };
        let list = |lower: i32| async move {
            rows::<(i32,)>(
                self.session
                    .execute_unpaged(&self.statements.buckets_from, (chat.0, lower, BUCKET_BATCH))
                    .await
                    .map_err(unavailable)?,
            )
        };
        let (mut buckets, guessed) = futures::try_join!(
            list(lower_bucket),
            scan(guessed_bucket, after_id, first_want)
        )?;
        let mut guessed = Some(guessed);
        let mut count = 0;
        let mut scanned = 0;
        loop {
            for (bucket,) in &buckets {
                let mut from = after_id;
                loop {
                    if scanned >= UNREAD_SCAN_LIMIT {
                        // Too many of the reader's own or deleted signals to count further.
                        return Ok(cap);
                    }
                    let want = SCAN_PAGE.min(limit_i32(UNREAD_SCAN_LIMIT - scanned));
                    let page = match guessed.take() {
                        Some(page) if *bucket == guessed_bucket && from == after_id => page,
                        _ => scan(*bucket, from, want).await?,
                    };
                    scanned += page.len();
                    for (id, author, kind, deleted) in &page {
                        if through.is_some_and(|through| *id > through.0) {
                            return Ok(count);
                        }
                        if *author != reader.0
                            && kind == SignalKind::Message.as_str()
                            && !deleted.unwrap_or(false)
                        {
                            count += 1;
                            if count >= cap {
                                return Ok(cap);
                            }
                        }
                    }
                    match page.last() {
                        Some((last, ..)) if page.len() == want as usize => from = *last,
                        _ => break,
                    }
                }
            }
            match buckets.last() {
                Some((last,)) if buckets.len() == BUCKET_BATCH as usize => lower_bucket = last + 1,
                _ => break,
            }
            buckets = list(lower_bucket).await?;
        }
        Ok(count)
    }

    /// The counts whose signals all lie in one bucket, read together: one read of the newest
    /// signals of every such chat per bucket, and one of the chats' newest buckets (for those
    /// without a marker). A count these rows do not settle is made on its own.
    async fn count_unreads(
        &self,
        queries: &[UnreadQuery],
        reader: UserId,
        cap: usize,
    ) -> Result<Vec<usize>, StoreError> {
        let bucket_of =
            |id: Option<SignalId>| id.and_then(|id| id.unix_millis()).map(signal_bucket);
        // The bucket every signal to count would lie in, when there is one to hope for.
        let hoped: Vec<Option<i32>> = queries
            .iter()
            .map(|q| {
                let through = bucket_of(q.through)?;
                match q.after {
                    Some(_) if bucket_of(q.after) != Some(through) => None,
                    _ => Some(through),
                }
            })
            .collect();
        let mut by_bucket: BTreeMap<i32, Vec<Uuid>> = BTreeMap::new();
        for (query, bucket) in queries.iter().zip(&hoped) {
            if let Some(bucket) = bucket {
                by_bucket.entry(*bucket).or_default().push(query.chat.0);
            }
        }
        let unmarked: Vec<Uuid> = queries
            .iter()
            .zip(&hoped)
            .filter(|(q, bucket)| q.after.is_none() && bucket.is_some())
            .map(|(q, _)| q.chat.0)
            .collect();
        let reads = by_bucket.iter().flat_map(|(bucket, chats)| {
            chats
                .chunks(UNREAD_BATCH_CHATS)
                .map(move |chunk| async move {
                    rows::<(Uuid, Uuid, Uuid, String, Option<bool>)>(
                        self.session
                            .execute_unpaged(&self.statements.newest_in_buckets, (chunk, *bucket))
                            .await
                            .map_err(unavailable)?,
                    )
                    .map(|rows| (*bucket, rows))
                })
        });
        let bucket_lists = unmarked.chunks(UNREAD_BATCH_CHATS).map(|chunk| async move {
            rows::<(Uuid, i32)>(
                self.session
                    .execute_unpaged(&self.statements.newest_buckets_in, (chunk,))
                    .await
                    .map_err(unavailable)?,
            )
        });
        let (read, lists) = futures::try_join!(
            futures::future::try_join_all(reads),
            futures::future::try_join_all(bucket_lists)
        )?;
        // Each chat's newest signals in its bucket, newest first.
        let mut newest: HashMap<(Uuid, i32), Vec<(Uuid, Uuid, String, Option<bool>)>> =
            HashMap::new();
        for (bucket, rows) in read {
            for (chat, id, author, kind, deleted) in rows {
                newest
                    .entry((chat, bucket))
                    .or_default()
                    .push((id, author, kind, deleted));
            }
        }
        let mut buckets: HashMap<Uuid, Vec<i32>> = HashMap::new();
        for (chat, bucket) in lists.into_iter().flatten() {
            buckets.entry(chat).or_default().push(bucket);
        }
        let no_rows = Vec::new();
        futures::future::try_join_all(queries.iter().zip(&hoped).map(|(q, bucket)| {
            let settled = bucket.and_then(|bucket| {
                let rows = newest.get(&(q.chat.0, bucket)).unwrap_or(&no_rows);
                let after = q.after.map(|a| a.0);
                // Every signal after the marker is among the rows read: fewer rows than asked
                // for, or the oldest of them at or before the marker.
                let reached_marker = rows.len() < UNREAD_BATCH_ROWS
                    || after.is_some_and(|after| rows.last().is_some_and(|(id, ..)| *id <= after));
                // Without a marker, also no signal in an earlier bucket.
                let only_bucket = after.is_some()
                    || buckets
                        .get(&q.chat.0)
                        .is_some_and(|b| b.as_slice() == [bucket]);
                let through = q.through.map(|t| t.0);
                let count = rows
                    .iter()
                    .filter(|(id, author, kind, deleted)| {
                        after.is_none_or(|after| *id > after)
                            && through.is_none_or(|through| *id <= through)
                            && *author != reader.0
                            && kind == SignalKind::Message.as_str()
                            && !deleted.unwrap_or(false)
                    })
                    .count();
                if count >= cap {
                    Some(cap)
                } else if reached_marker && only_bucket {
                    Some(count)
                } else {
                    None
                }
            });
            async move {
                match settled {
                    Some(count) => Ok(count),
                    None => {
                        self.count_unread(
                            q.chat,
                            q.after,
                            q.through,
                            q.chat_created_at,
                            reader,
                            cap,
                        )
                        .await
                    }
                }
            }
        }))
        .await
    }

    async fn add_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let claimed = self
            .session
            .execute_unpaged(
                &self.statements.claim_reaction,
                (chat.0, signal.0, emoji, user.0),
            )
            .await
            .map_err(unavailable)?;
        let added = applied(claimed)?;
        // Also when it was there already: a retry repairs a count a failure left behind.
        self.recount(chat, signal, emoji).await?;
        Ok(added)
    }

    async fn remove_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let released = self
            .session
            .execute_unpaged(
                &self.statements.release_reaction,
                (chat.0, signal.0, emoji, user.0),
            )
            .await
            .map_err(unavailable)?;
        let removed = applied(released)?;
        self.recount(chat, signal, emoji).await?;
        Ok(removed)
    }

    async fn has_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.has_reaction,
                (chat.0, signal.0, emoji, user.0),
            )
            .await
            .map_err(unavailable)?;
        Ok(!rows::<(Uuid,)>(result)?.is_empty())
    }

    async fn reaction_counts_of(
        &self,
        chat: ChatId,
        signals: &[SignalId],
    ) -> Result<HashMap<SignalId, BTreeMap<String, i64>>, StoreError> {
        // One range read per history bucket the signals fall in.
        let mut ranges: BTreeMap<i32, (SignalId, SignalId)> = BTreeMap::new();
        for id in signals {
            let bucket = signal_bucket(created_millis(*id)?);
            let range = ranges.entry(bucket).or_insert((*id, *id));
            range.0 = range.0.min(*id);
            range.1 = range.1.max(*id);
        }
        let wanted: HashSet<SignalId> = signals.iter().copied().collect();
        let results =
            futures::future::try_join_all(ranges.into_iter().map(|(bucket, (low, high))| {
                self.session
                    .execute_unpaged(
                        &self.statements.tallies_between,
                        (chat.0, bucket, low.0, high.0),
                    )
                    .map_err(unavailable)
            }))
            .await?;
        let mut counts: HashMap<SignalId, BTreeMap<String, i64>> = HashMap::new();
        for result in results {
            for (signal, emoji, count) in rows::<(Uuid, String, Option<i32>)>(result)? {
                let signal = SignalId(signal);
                let count = i64::from(count.unwrap_or(0));
                if count > 0 && wanted.contains(&signal) {
                    counts.entry(signal).or_default().insert(emoji, count);
                }
            }
        }
        Ok(counts)
    }

    async fn reactions_page(
        &self,
        chat: ChatId,
        signal: SignalId,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        let result = match after {
            Some((emoji, user)) => {
                self.session
                    .execute_unpaged(
                        &self.statements.reactions_after,
                        (chat.0, signal.0, emoji, user.0, limit_i32(limit)),
                    )
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(
                        &self.statements.reactions_first,
                        (chat.0, signal.0, limit_i32(limit)),
                    )
                    .await
            }
        }
        .map_err(unavailable)?;
        Ok(rows::<(String, Uuid)>(result)?
            .into_iter()
            .map(|(emoji, user)| (emoji, UserId(user)))
            .collect())
    }

    async fn put_attachment(&self, attachment: &Attachment) -> Result<(), StoreError> {
        let body = serde_json::to_string(attachment).map_err(corrupt)?;
        // References first: an object is never unreferenced while its attachment is visible.
        for sha in attachment.blobs() {
            self.session
                .execute_unpaged(&self.statements.put_blob_ref, (sha, attachment.id))
                .await
                .map_err(unavailable)?;
        }
        // The metadata's rows together: either one makes the attachment visible, and both come
        // after its references.
        let by_id = self
            .session
            .execute_unpaged(&self.statements.put_attachment, (attachment.id, &body));
        let listed = self.session.execute_unpaged(
            &self.statements.put_chat_attachment,
            (
                attachment.chat_id.0,
                attachment.kind.as_str(),
                attachment.id,
                &body,
            ),
        );
        // Each write is waited for, failed or not: a caller that undoes this write after an
        // error must not race a sibling write still in flight.
        let (by_id, listed) = futures::join!(by_id, listed);
        by_id.map_err(unavailable)?;
        listed.map_err(unavailable)?;
        Ok(())
    }

    async fn update_derived(
        &self,
        id: Uuid,
        chat: ChatId,
        stored_as: AttachmentKind,
        kind: AttachmentKind,
        image: Option<&ImageInfo>,
    ) -> Result<Option<Attachment>, StoreError> {
        self.update_derived_meanwhile(id, chat, stored_as, kind, image, async {})
            .await
    }

    /// A lightweight transaction per attachment (`IF message_id = null`), only for a message
    /// that names attachments: of sends racing for one, Paxos lets one claim through and shows
    /// the others the winner. A claim of a record deleted meanwhile (which the condition, on a
    /// row that is gone, lets through) is taken back: it would only be a lone cell that reads
    /// as nothing. A claim orphaned by a send that stopped (old, its message not stored) is taken
    /// over with `IF message_id = <that holder>`: of takers racing, one condition holds.
    async fn claim_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<Vec<(Uuid, SignalId)>, StoreError> {
        let mut holders = Vec::with_capacity(ids.len());
        for &id in ids {
            if let Some(holder) = self.claim_attachment(chat, id, message).await? {
                holders.push((id, holder));
            }
        }
        Ok(holders)
    }

    async fn release_attachments(
        &self,
        _chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<(), StoreError> {
        for &id in ids {
            self.release_attachment(id, message).await?;
        }
        Ok(())
    }

    async fn list_claimed_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<(), StoreError> {
        self.list_claimed_attachments_meanwhile(chat, ids, message, async {})
            .await
    }

    async fn add_blob_refs(&self, attachment: Uuid, blobs: &[String]) -> Result<(), StoreError> {
        for sha in blobs {
            self.session
                .execute_unpaged(&self.statements.put_blob_ref, (sha, attachment))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn get_attachments(&self, ids: &[Uuid]) -> Result<Vec<Attachment>, StoreError> {
        // A page of history names up to ten attachments per message: a bounded `IN` list at a
        // time, the lists read concurrently.
        let reads = ids.chunks(ATTACHMENTS_PER_READ).map(|chunk| async move {
            let result = self
                .session
                .execute_unpaged(&self.statements.get_attachments, (chunk,))
                .await
                .map_err(unavailable)?;
            rows::<(Option<String>, Option<Uuid>)>(result)
        });
        futures::future::try_join_all(reads)
            .await?
            .into_iter()
            .flatten()
            // A row with a claim's cell and no record is one deleted since (the deletion's
            // tombstone is newer than the record, not always than a late claim's cell).
            .filter_map(|(body, claimed)| body.map(|body| claimed_attachment(&body, claimed)))
            .collect()
    }

    async fn chat_attachments(
        &self,
        chat: ChatId,
        kind: Option<AttachmentKind>,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Attachment>, StoreError> {
        let before = before.unwrap_or(Uuid::max());
        let kinds = match kind {
            Some(kind) => vec![kind],
            None => vec![AttachmentKind::Image, AttachmentKind::File],
        };
        // One partition per kind; every kind is the newest of both, merged.
        let mut found: Vec<Attachment> = Vec::new();
        for kind in kinds {
            let result = self
                .session
                .execute_unpaged(
                    &self.statements.chat_attachments,
                    (chat.0, kind.as_str(), before, limit_i32(limit)),
                )
                .await
                .map_err(unavailable)?;
            for (body, claimed) in rows::<(Option<String>, Option<Uuid>)>(result)? {
                if let Some(body) = body {
                    found.push(claimed_attachment(&body, claimed)?);
                }
            }
        }
        found.sort_by_key(|a| std::cmp::Reverse(a.id));
        found.truncate(limit);
        Ok(found)
    }

    async fn delete_attachments(&self, attachments: &[Attachment]) -> Result<(), StoreError> {
        for attachment in attachments {
            // An image without its pictures may yet be re-filed as a file by their write, which
            // lists it among the files before its record says so: that row goes too (see
            // `update_derived_meanwhile`).
            let pending = attachment.kind == AttachmentKind::Image && attachment.image.is_none();
            let mut kinds = vec![attachment.kind];
            if pending {
                kinds.push(AttachmentKind::File);
            }
            for kind in kinds {
                self.session
                    .execute_unpaged(
                        &self.statements.delete_chat_attachment,
                        (attachment.chat_id.0, kind.as_str(), attachment.id),
                    )
                    .await
                    .map_err(unavailable)?;
            }
            self.session
                .execute_unpaged(&self.statements.delete_attachment, (attachment.id,))
                .await
                .map_err(unavailable)?;
            for sha in attachment.blobs() {
                self.session
                    .execute_unpaged(&self.statements.delete_blob_ref, (sha, attachment.id))
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    async fn blob_referrers(
        &self,
        sha256: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError> {
        // The nil id sorts before every other (`uuid` orders by version first).
        let after = after.unwrap_or(Uuid::nil());
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let result = self
            .session
            .execute_unpaged(&self.statements.blob_referrers, (sha256, after, limit))
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Uuid,)>(result)?
            .into_iter()
            .map(|(id,)| id)
            .collect())
    }

    async fn drop_blob_ref(&self, sha256: &str, attachment: Uuid) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.statements.delete_blob_ref, (sha256, attachment))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn condemn_blob(
        &self,
        sha256: &str,
        run: Uuid,
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.statements.condemn_blob,
                (sha256, run, CqlTimestamp(millis(until))),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn blob_condemned(&self, sha256: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.blob_condemned, (sha256,))
            .await
            .map_err(unavailable)?;
        rows::<(Option<CqlTimestamp>,)>(result)?
            .into_iter()
            .filter_map(|(until,)| until)
            .max_by_key(|until| until.0)
            .map(|until| from_millis(until.0))
            .transpose()
    }

    async fn absolve_blob(&self, sha256: &str, run: Uuid) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.statements.absolve_blob, (sha256, run))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn put_small_object(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let now = CqlTimestamp(millis(OffsetDateTime::now_utc()));
        let size = i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        self.session
            .execute_unpaged(
                &self.statements.put_small_object,
                (small_object_shard(sha256), sha256, bytes, size, now),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn small_object(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.statements.small_object,
                (small_object_shard(sha256), sha256),
            )
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Option<Vec<u8>>,)>(result)?
            .into_iter()
            .next()
            .map(|(bytes,)| bytes.unwrap_or_default()))
    }

    /// Deletes at the write time of the version read: a write after this one (the object made
    /// again by an upload that waited out the collection) has a later time, even when the node
    /// that took it has a clock behind the collector's, and outlives the delete.
    async fn delete_small_object(&self, sha256: &str) -> Result<(), StoreError> {
        let shard = small_object_shard(sha256);
        let result = self
            .session
            .execute_unpaged(&self.statements.small_object_written, (shard, sha256))
            .await
            .map_err(unavailable)?;
        let Some((Some(written),)) = rows::<(Option<i64>,)>(result)?.into_iter().next() else {
            return Ok(());
        };
        self.session
            .execute_unpaged(
                &self.statements.delete_small_object,
                (written, shard, sha256),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Shard after shard in name order, from the shard of `after`: an empty table costs a page
    /// 256 small reads, which only the collector pays.
    async fn small_objects(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SmallObjectInfo>, StoreError> {
        let mut found = Vec::new();
        let first = after.map_or(0, |after| {
            u8::from_str_radix(small_object_shard(after), 16).unwrap_or(0)
        });
        for shard in first..=u8::MAX {
            let want = limit.saturating_sub(found.len());
            if want == 0 {
                break;
            }
            let shard_name = format!("{shard:02x}");
            let want = i32::try_from(want).unwrap_or(i32::MAX);
            let result = match after.filter(|after| small_object_shard(after) == shard_name) {
                Some(after) => {
                    self.session
                        .execute_unpaged(
                            &self.statements.small_objects_after,
                            (shard_name.as_str(), after, want),
                        )
                        .await
                }
                None => {
                    self.session
                        .execute_unpaged(
                            &self.statements.small_objects_first,
                            (shard_name.as_str(), want),
                        )
                        .await
                }
            }
            .map_err(unavailable)?;
            for (sha256, size, stored_at) in
                rows::<(String, Option<i64>, Option<CqlTimestamp>)>(result)?
            {
                found.push(SmallObjectInfo {
                    sha256,
                    size: size.and_then(|s| u64::try_from(s).ok()).unwrap_or(0),
                    stored_at: from_millis(stored_at.map_or(0, |t| t.0))?,
                });
            }
        }
        Ok(found)
    }

    async fn delete_chat(&self, chat: ChatId) -> Result<(), StoreError> {
        self.cql_delete_chat(chat).await
    }

    async fn create_circle(&self, circle: &Circle) -> Result<(), StoreError> {
        self.cql_create_circle(circle).await
    }

    async fn get_circle(&self, id: CircleId) -> Result<Option<Circle>, StoreError> {
        self.cql_get_circle(id).await
    }

    async fn circle_by_code(&self, code: &str) -> Result<Option<CircleId>, StoreError> {
        self.cql_circle_by_code(code).await
    }

    async fn rotate_circle_code(
        &self,
        id: CircleId,
        old: &str,
        new: &str,
    ) -> Result<(), StoreError> {
        self.cql_rotate_circle_code(id, old, new).await
    }

    async fn put_circle_member(
        &self,
        circle: CircleId,
        member: &CircleMember,
        max_members: u32,
    ) -> Result<MemberPut, StoreError> {
        self.cql_put_circle_member(circle, member, max_members)
            .await
    }

    async fn circle_members(&self, circle: CircleId) -> Result<Vec<CircleMember>, StoreError> {
        self.cql_circle_members(circle).await
    }

    async fn remove_circle_member(&self, circle: CircleId, user: UserId) -> Result<(), StoreError> {
        self.cql_remove_circle_member(circle, user).await
    }

    async fn record_circle_removal(
        &self,
        circle: CircleId,
        user: UserId,
        circle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.cql_record_circle_removal(circle, user, circle_expires_at)
            .await
    }

    async fn removed_from_circle(
        &self,
        circle: CircleId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.cql_removed_from_circle(circle, user).await
    }

    async fn add_circle_chat(&self, circle: CircleId, chat: ChatId) -> Result<(), StoreError> {
        self.cql_add_circle_chat(circle, chat).await
    }

    async fn circle_chats(&self, circle: CircleId) -> Result<Vec<ChatId>, StoreError> {
        self.cql_circle_chats(circle).await
    }

    async fn expired_circles(
        &self,
        now: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CircleId>, StoreError> {
        self.cql_expired_circles(now, limit).await
    }

    async fn delete_circle(&self, id: CircleId) -> Result<(), StoreError> {
        self.cql_delete_circle(id).await
    }

    async fn slots(&self, pool: &str) -> Result<Vec<Slot>, StoreError> {
        self.cql_slots(pool).await
    }

    async fn write_slots(&self, pool: &str, writes: &[SlotWrite]) -> Result<bool, StoreError> {
        self.cql_write_slots(pool, writes).await
    }

    async fn advance_marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
        up_to: SignalId,
    ) -> Result<(), StoreError> {
        let at = up_to
            .unix_millis()
            .ok_or_else(|| corrupt("marker is not a time-ordered id"))?
            * 1000;
        let in_chat = self.session.execute_unpaged(
            &self.statements.set_marker,
            (chat.0, kind.as_str(), user.0, up_to.0, at),
        );
        if kind == MarkerKind::Read {
            // The same marker in the user's partition, for the chat list; same timestamp, so
            // both settle on the same newest marker. A failure of either fails the call, and a
            // retry writes both again.
            let in_user = self.session.execute_unpaged(
                &self.statements.set_user_read_marker,
                (user.0, chat.0, up_to.0, at),
            );
            futures::try_join!(in_chat, in_user).map_err(unavailable)?;
        } else {
            in_chat.await.map_err(unavailable)?;
        }
        Ok(())
    }

    async fn marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<SignalId>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.get_marker, (chat.0, kind.as_str(), user.0))
            .await
            .map_err(unavailable)?;
        Ok(result
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Uuid,)>()
            .map_err(corrupt)?
            .map(|(id,)| SignalId(id)))
    }

    async fn create_call(&self, call: &CallRecord) -> Result<Option<CallRecord>, StoreError> {
        self.cql_create_call(call).await
    }

    async fn get_call(&self, id: Uuid) -> Result<Option<CallRecord>, StoreError> {
        self.cql_get_call(id).await
    }

    async fn transition_call(
        &self,
        id: Uuid,
        from: CallStatus,
        to: CallStatus,
    ) -> Result<bool, StoreError> {
        self.cql_transition_call(id, from, to).await
    }

    async fn live_calls(&self, chat: ChatId) -> Result<Vec<CallRecord>, StoreError> {
        self.cql_live_calls(chat).await
    }

    async fn call_participants(&self, id: Uuid) -> Result<Vec<UserId>, StoreError> {
        self.cql_call_participants(id).await
    }

    async fn remove_call_participant(&self, id: Uuid, user: UserId) -> Result<(), StoreError> {
        self.cql_remove_call_participant(id, user).await
    }

    async fn put_call_participant(
        &self,
        id: Uuid,
        user: UserId,
        join: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        self.cql_put_call_participant(id, user, join).await
    }

    async fn call_participant_join(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<Uuid>, StoreError> {
        self.cql_call_participant_join(id, user).await
    }

    async fn pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<PendingCallSignal>, StoreError> {
        self.cql_pending_call_signal(id, user).await
    }

    async fn set_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        pending: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        self.cql_set_pending_call_signal(id, user, pending).await
    }

    async fn forget_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        done: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        self.cql_forget_pending_call_signal(id, user, done).await
    }

    async fn list_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        self.cql_list_call(call).await
    }

    async fn listed_calls_due(
        &self,
        now: OffsetDateTime,
        after: Option<&ListedCall>,
        limit: usize,
    ) -> Result<Vec<ListedCall>, StoreError> {
        self.cql_listed_calls_due(now, after, limit).await
    }

    async fn forget_listed_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        self.cql_forget_listed(call).await
    }

    async fn markers_page(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<(UserId, SignalId)>, StoreError> {
        let result = match after {
            Some(after) => {
                self.session
                    .execute_unpaged(
                        &self.statements.markers_after,
                        (chat.0, kind.as_str(), after.0, limit_i32(limit)),
                    )
                    .await
            }
            None => {
                self.session
                    .execute_unpaged(
                        &self.statements.markers_first,
                        (chat.0, kind.as_str(), limit_i32(limit)),
                    )
                    .await
            }
        }
        .map_err(unavailable)?;
        Ok(rows::<(Uuid, Uuid)>(result)?
            .into_iter()
            .map(|(user, up_to)| (UserId(user), SignalId(up_to)))
            .collect())
    }

    async fn outbox_put(&self, writer: Uuid, entry: &OutboxEntry) -> Result<(), StoreError> {
        outbox::put(&self.session, &self.outbox, writer, entry).await
    }

    async fn outbox_remove(
        &self,
        writer: Uuid,
        bucket: i64,
        ids: &[Uuid],
    ) -> Result<(), StoreError> {
        outbox::remove(&self.session, &self.outbox, writer, bucket, ids).await
    }

    async fn outbox_entries(
        &self,
        writer: Uuid,
        from: i64,
        to: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        outbox::entries(&self.session, &self.outbox, writer, from, to).await
    }

    async fn outbox_heartbeat(
        &self,
        writer: Uuid,
        entries_from_ms: i64,
        seen_ms: i64,
    ) -> Result<(), StoreError> {
        outbox::heartbeat(
            &self.session,
            &self.outbox,
            writer,
            entries_from_ms,
            seen_ms,
        )
        .await
    }

    async fn outbox_writers(&self) -> Result<Vec<OutboxWriter>, StoreError> {
        outbox::writers(&self.session, &self.outbox).await
    }

    async fn outbox_claim(
        &self,
        writer: Uuid,
        sweeper: Uuid,
        claim_ttl_secs: i32,
    ) -> Result<bool, StoreError> {
        outbox::claim(&self.session, &self.outbox, writer, sweeper, claim_ttl_secs).await
    }

    async fn outbox_forget_writer(&self, writer: Uuid) -> Result<(), StoreError> {
        outbox::forget_writer(&self.session, &self.outbox, writer).await
    }
}

/// The reads that make chat entries, for a batch of chats, by chat id.
struct EntryReads {
    chats: HashMap<Uuid, Chat>,
    roles: HashMap<Uuid, MemberRole>,
    summaries: HashMap<Uuid, (Option<Uuid>, Option<Vec<u8>>)>,
    markers: HashMap<Uuid, Uuid>,
}

impl EntryReads {
    /// Whether an activity row of `chat` at `activity` is stale: of a chat the user is no longer
    /// in, or that was removed, or older than the member's copy of the chat's summary (left
    /// behind by a move that raced another). A row newer than the summary is live: a move by a
    /// process from before migration 12, which moved the rows before it wrote the summary.
    fn is_stale(&self, chat: Uuid, activity: Uuid) -> bool {
        !self.roles.contains_key(&chat)
            || !self.chats.contains_key(&chat)
            || self
                .summaries
                .get(&chat)
                .and_then(|(current, _)| *current)
                .is_some_and(|current| current > activity)
    }
}

impl CqlStore {
    /// Up to `want` of `user`'s activity rows after `position`, newest first, as stored (stale
    /// rows included).
    async fn activity_batch(
        &self,
        user: UserId,
        position: Option<ChatActivity>,
        want: i32,
    ) -> Result<Vec<(Uuid, Uuid)>, StoreError> {
        match position {
            None => rows(
                self.session
                    .execute_unpaged(&self.statements.activity_first, (user.0, want))
                    .await
                    .map_err(unavailable)?,
            ),
            Some(p) => {
                let (same, older) = futures::try_join!(
                    self.session
                        .execute_unpaged(
                            &self.statements.activity_same,
                            (user.0, p.activity.0, p.chat_id.0, want),
                        )
                        .map_err(unavailable),
                    self.session
                        .execute_unpaged(
                            &self.statements.activity_older,
                            (user.0, p.activity.0, want),
                        )
                        .map_err(unavailable),
                )?;
                let mut same: Vec<(Uuid, Uuid)> = rows(same)?;
                same.extend(rows::<(Uuid, Uuid)>(older)?);
                same.truncate(usize::try_from(want).unwrap_or(0));
                Ok(same)
            }
        }
    }

    /// Removes an activity row left behind by a concurrent move, or written by a touch that raced
    /// the user's leaving, so it is not read again.
    async fn drop_activity_row(
        &self,
        user: UserId,
        activity: Uuid,
        chat: Uuid,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.statements.delete_user_activity,
                (user.0, activity, chat),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The chats with their summaries, `user`'s roles and `user`'s read markers of `ids`: two
    /// reads in parallel, each `IN` the batch and each of one partition, the user's: their rows
    /// of `user_chats` (role, and copies of the chat's row and summary) and of
    /// `user_read_markers`. A row without copies (written before migration 12, or a member's
    /// whose chat has not been touched since they joined) costs a third read, of `chats`, for the
    /// chats it concerns.
    async fn read_entries(&self, user: UserId, ids: &[Uuid]) -> Result<EntryReads, StoreError> {
        let (own, markers) = futures::try_join!(
            self.session
                .execute_unpaged(&self.statements.user_entries_in, (user.0, ids))
                .map_err(unavailable),
            self.session
                .execute_unpaged(&self.statements.read_markers_in, (user.0, ids))
                .map_err(unavailable),
        )?;
        let mut read = EntryReads {
            chats: HashMap::new(),
            roles: HashMap::new(),
            summaries: HashMap::new(),
            markers: rows::<(Uuid, Uuid)>(markers)?.into_iter().collect(),
        };
        let mut without_copies = Vec::new();
        for (id, role, kind, name, description, created, created_by, activity, latest) in
            rows::<UserChatRow>(own)?
        {
            // A row without a role is a copy written by a change that raced the member's
            // leaving: no membership.
            let Some(role) = role else { continue };
            read.roles.insert(id, parse(&role)?);
            let chat = to_chat((id, kind, name, description, created, created_by))?;
            match (chat, activity) {
                (Some(chat), Some(_)) => {
                    read.chats.insert(id, chat);
                    read.summaries.insert(id, (activity, latest));
                }
                _ => without_copies.push(id),
            }
        }
        if !without_copies.is_empty() {
            let chat_rows = self
                .session
                .execute_unpaged(&self.statements.chats_in, (&without_copies,))
                .await
                .map_err(unavailable)?;
            for (id, kind, name, description, created, created_by, activity, latest) in
                rows::<ListedChatRow>(chat_rows)?
            {
                read.summaries.insert(id, (activity, latest));
                if let Some(chat) = to_chat((id, kind, name, description, created, created_by))? {
                    read.chats.insert(id, chat);
                }
            }
        }
        Ok(read)
    }

    /// The entries of `chats` from `read`, in that order, leaving out chats the user is not a
    /// member of. Each chat's newest signal is the summary's, or the one given with it (an
    /// activity row ahead of the summary). A newest signal without a matching copy costs one read
    /// of that signal.
    async fn entries_from(
        &self,
        read: &mut EntryReads,
        chats: impl Iterator<Item = (ChatId, Option<SignalId>)>,
    ) -> Result<Vec<ChatEntry>, StoreError> {
        let mut entries = Vec::new();
        let mut stale = Vec::new();
        for (id, newest) in chats {
            let (Some(mut chat), Some(role)) = (read.chats.remove(&id.0), read.roles.get(&id.0))
            else {
                continue;
            };
            chat.my_role = Some(*role);
            let (summary_activity, copy) = read
                .summaries
                .get(&id.0)
                .map(|(activity, copy)| (*activity, copy.as_deref()))
                .unwrap_or_default();
            if let Some(activity) = newest.map(|n| n.0).or(summary_activity) {
                match copy.map(read_summary_copy).transpose()? {
                    Some(latest) if latest.id.0 == activity => {
                        chat.latest_signal = Some(Box::new(latest));
                    }
                    // No copy (the chat's creation, or written before copies existed) or one of
                    // an older signal (an edit refresh that raced a newer touch, or a summary
                    // behind the activity row): read the signal.
                    _ => stale.push((entries.len(), SignalId(activity))),
                }
            }
            entries.push(ChatEntry {
                chat,
                read_marker: read.markers.get(&id.0).copied().map(SignalId),
            });
        }
        let refreshed = futures::future::try_join_all(stale.iter().map(|(index, activity)| {
            let chat = entries[*index].chat.id;
            async move { self.decorated_signal(chat, *activity).await }
        }))
        .await?;
        for ((index, _), latest) in stale.into_iter().zip(refreshed) {
            entries[index].chat.latest_signal = latest.map(Box::new);
        }
        Ok(entries)
    }

    /// The chat's row as its members' copies hold it, with the newest write timestamp among its
    /// values. `None` for a chat that does not exist.
    async fn chat_info(&self, chat: ChatId) -> Result<Option<ChatInfo>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.chat_info_written, (chat.0,))
            .await
            .map_err(unavailable)?;
        type Written = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<CqlTimestamp>,
            Option<Uuid>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
            Option<i64>,
        );
        let Some(row) = rows::<Written>(result)?.into_iter().next() else {
            return Ok(None);
        };
        let (
            kind,
            name,
            description,
            created_at,
            created_by,
            kind_at,
            name_at,
            description_at,
            info_at,
        ) = row;
        let (Some(kind), Some(created_at), Some(created_by)) = (kind, created_at, created_by)
        else {
            return Ok(None);
        };
        Ok(Some(ChatInfo {
            kind,
            name,
            description,
            created_at,
            created_by,
            name_written: name_at,
            description_written: description_at,
            written: [kind_at, name_at, description_at, info_at]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(0),
        }))
    }

    /// Writes `user`'s copy of the chat's row: the name and the description each with its own
    /// write time, since a change writes only the one it changes. A copy with both at the newer
    /// one's time would shadow a change of the other made at the same time whose write time is
    /// between theirs, in this member's copy only. An absent one (no write time) is written with
    /// the newest write time of the row, which the change that cleared it wrote `info_at` with.
    async fn write_info_copy(
        &self,
        chat: ChatId,
        user: UserId,
        info: &ChatInfo,
    ) -> Result<(), StoreError> {
        use scylla::statement::batch::{Batch, BatchType};
        let (written, kind, _, _, created_at, created_by, user_id, chat_id) =
            info.copy_values(user, chat, true);
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.append_statement(self.statements.copy_chat_info.clone());
        batch.append_statement(self.statements.copy_chat_name.clone());
        batch.append_statement(self.statements.copy_chat_description.clone());
        let unset = MaybeUnset::<Option<&str>>::Unset;
        self.session
            .batch(
                &batch,
                (
                    (
                        written, kind, unset, unset, created_at, created_by, user_id, chat_id,
                    ),
                    (
                        info.name_written.unwrap_or(written),
                        info.name.as_deref(),
                        user_id,
                        chat_id,
                    ),
                    (
                        info.description_written.unwrap_or(written),
                        info.description.as_deref(),
                        user_id,
                        chat_id,
                    ),
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The write time of the role in `user`'s row of `chat`: `None` when the chat is not listed
    /// to them (no row, or a copy without a role).
    async fn user_chat_role_written(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<i64>, StoreError> {
        Ok(self
            .session
            .execute_unpaged(&self.statements.user_chat_role_written, (user.0, chat.0))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<i64>,)>()
            .map_err(corrupt)?
            .and_then(|(written,)| written))
    }

    /// Writes `user`'s row of `user_chats` (role and `joined_at`) from their row of
    /// `chat_members`, at the write time of the role read: a removal or a change of role written
    /// since is later, and wins over this copy whichever arrives first. Nothing when they are not
    /// a member. Whether they are.
    async fn list_as_of_role(&self, chat: ChatId, user: UserId) -> Result<bool, StoreError> {
        let row = self
            .session
            .execute_unpaged(&self.statements.member_written, (chat.0, user.0))
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(corrupt)?
            .maybe_first_row::<(Option<String>, Option<CqlTimestamp>, Option<i64>)>()
            .map_err(corrupt)?;
        let Some((Some(role), joined_at, Some(written))) = row else {
            return Ok(false);
        };
        let role: MemberRole = parse(&role)?;
        self.session
            .execute_unpaged(
                &self.statements.insert_user_chat_at,
                (
                    user.0,
                    chat.0,
                    role.as_str(),
                    joined_at.unwrap_or(CqlTimestamp(0)),
                    written,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(true)
    }

    /// Records that `user`'s membership of `chat` ended now ([`Store::left_chats_of`]). Every
    /// removal writes it before it deletes the user's row of `user_chats`, which
    /// [`Store::chats_of`] reads: a reader of both in that order finds the chat in one.
    async fn record_left_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        let ttl = i32::try_from(LEFT_CHATS_KEPT.as_secs()).unwrap_or(i32::MAX);
        self.session
            .execute_unpaged(
                &self.statements.insert_left_chat,
                (
                    user.0,
                    CqlTimestamp(millis(OffsetDateTime::now_utc())),
                    chat.0,
                    ttl,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Copies the chat's row into a new member's row, after the membership was written: a rename
    /// either wrote the chat's row before this read (and the copy has the new name) or read the
    /// members after the membership's write (and copies the name to it itself).
    async fn copy_info_to(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        match self.chat_info(chat).await? {
            Some(info) => self.write_info_copy(chat, user, &info).await,
            None => Ok(()),
        }
    }

    /// A new chat's member: the membership and the copy of the chat's row in one write of the
    /// member's row.
    async fn join_with_copy(
        &self,
        chat: ChatId,
        user: UserId,
        role: &str,
        joined: CqlTimestamp,
        info: &ChatInfo,
    ) -> Result<(), StoreError> {
        use scylla::statement::batch::{Batch, BatchType};
        let mut batch = Batch::new(BatchType::Unlogged);
        batch.append_statement(self.statements.insert_user_chat.clone());
        batch.append_statement(self.statements.copy_chat_info.clone());
        self.session
            .batch(
                &batch,
                (
                    (user.0, chat.0, role, joined),
                    info.copy_values(user, chat, false),
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Removes `user`'s copy of their read marker in `chat` (the chat is being removed).
    pub(super) async fn forget_read_marker(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.statements.delete_user_read_marker, (user.0, chat.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The chat's newest signal id and the copy of that signal, as stored.
    async fn summary_of(
        &self,
        chat: ChatId,
    ) -> Result<Option<(SignalId, Option<Vec<u8>>)>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.statements.get_summary, (chat.0,))
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Option<Uuid>, Option<Vec<u8>>)>(result)?
            .into_iter()
            .next()
            .and_then(|(activity, copy)| activity.map(|a| (SignalId(a), copy))))
    }

    /// A signal with its reaction counts.
    async fn decorated_signal(
        &self,
        chat: ChatId,
        id: SignalId,
    ) -> Result<Option<Signal>, StoreError> {
        let ids = [id];
        let (signal, mut counts) = futures::try_join!(
            self.get_signal(chat, id),
            self.reaction_counts_of(chat, &ids)
        )?;
        Ok(signal.map(|mut signal| {
            signal.reactions = counts.remove(&id).unwrap_or_default();
            signal
        }))
    }

    /// After a change to signal `id` (edit, deletion, reaction): if it is still the chat's newest,
    /// rewrites the chat list's copy of it from a fresh read. The write timestamp is the time this
    /// refresh started reading, so of two refreshes the one that read later wins, and a refresh
    /// always wins over the touch that first wrote the copy (whose timestamp is the signal's
    /// creation). A refresh that races a newer signal's touch may leave a copy of this older
    /// signal; readers see its id differ from `activity` and read the newest signal instead.
    async fn refresh_latest(&self, chat: ChatId, id: SignalId) -> Result<(), StoreError> {
        self.refresh_latest_meanwhile(chat, id, Duration::ZERO, async {})
            .await
    }

    /// [`CqlStore::refresh_latest`]. A deletion must win over a refresh that read the signal
    /// before it, also one whose clock is ahead (its copy, written later in time, would show the
    /// deleted text). So each side reads after its writes: a refresh that copied a live signal
    /// reads the signal again, and a refresh that copied a deleted one reads the chat's copy
    /// with its write time; whichever sees the other's write writes the deleted copy again,
    /// later than the live one. A refresh that read the signal live and wrote its copies before
    /// the deletion's mark, is seen by the deletion's refresh, which comes after that mark; one
    /// that wrote later reads the mark. `ahead` and `meanwhile` are for tests: a clock that far
    /// ahead of this one, and a change run after the signal's read and before the copies' write.
    pub async fn refresh_latest_meanwhile(
        &self,
        chat: ChatId,
        id: SignalId,
        ahead: Duration,
        meanwhile: impl Future<Output = ()>,
    ) -> Result<(), StoreError> {
        let ahead = i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX);
        let started = change_timestamp(id)?.saturating_add(ahead);
        let Some((activity, _)) = self.summary_of(chat).await? else {
            return Ok(());
        };
        if activity != id {
            return Ok(());
        }
        let Some(latest) = self.decorated_signal(chat, id).await? else {
            return Ok(());
        };
        meanwhile.await;
        let written = self.write_latest(chat, &latest, started).await;
        if !latest.deleted {
            // Also after a failed write, which may have been applied in part: a retry of the
            // edit finds the message deleted and refreshes nothing.
            if self
                .get_signal(chat, id)
                .await?
                .is_some_and(|now| now.deleted)
                && let Some(now) = self.decorated_signal(chat, id).await?
            {
                self.write_latest(chat, &now, started.saturating_add(1))
                    .await?;
            }
            return written;
        }
        // A deletion whose write failed answers so, and its retry refreshes again.
        written?;
        let result = self
            .session
            .execute_unpaged(&self.statements.latest_written, (chat.0,))
            .await
            .map_err(unavailable)?;
        let written = rows::<(Option<Vec<u8>>, Option<i64>)>(result)?
            .into_iter()
            .next();
        if let Some((Some(copy), Some(at))) = written
            && at > started
        {
            let copied = read_summary_copy(&copy)?;
            if copied.id == id && !copied.deleted {
                self.write_latest(chat, &latest, at.saturating_add(1))
                    .await?;
            }
        }
        Ok(())
    }

    /// Writes `latest` as the chat's copy of its newest signal, and as every member's, with
    /// write timestamp `at`.
    async fn write_latest(&self, chat: ChatId, latest: &Signal, at: i64) -> Result<(), StoreError> {
        let copy = summary_copy(latest)?;
        self.session
            .execute_unpaged(&self.statements.set_latest, (at, &copy, chat.0))
            .await
            .map_err(unavailable)?;
        // And every member's copy, which the chat list reads.
        let members = self.members(chat).await?;
        let copy = &copy;
        futures::stream::iter(members)
            .map(|member| async move {
                self.session
                    .execute_unpaged(
                        &self.statements.set_user_latest,
                        (at, copy, member.user_id.0, chat.0),
                    )
                    .await
                    .map(drop)
                    .map_err(unavailable)
            })
            .buffer_unordered(32)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Counts `emoji` on `signal` again and stores the count in its bucket's tallies
    /// ([`CqlStore::recount_meanwhile`]). Every change of a reaction, and every retry of one, ends
    /// with a recount, so counts converge.
    async fn recount(&self, chat: ChatId, signal: SignalId, emoji: &str) -> Result<(), StoreError> {
        self.recount_meanwhile(chat, signal, emoji, Duration::ZERO, async {})
            .await
    }

    /// The number of `emoji` reactions to `signal`, and its tally as stored with the tally's write
    /// time, read together.
    async fn count_and_tally(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
    ) -> Result<(i32, Option<(i32, i64)>), StoreError> {
        let bucket = signal_bucket(created_millis(signal)?);
        let (counted, tallied) = futures::join!(
            self.session
                .execute_unpaged(&self.statements.recount_reaction, (chat.0, signal.0, emoji)),
            self.session.execute_unpaged(
                &self.statements.tally_written,
                (chat.0, bucket, signal.0, emoji)
            )
        );
        let count = rows::<(i64,)>(counted.map_err(unavailable)?)?
            .into_iter()
            .next()
            .map_or(0, |(count,)| count);
        let tally = rows::<(Option<i32>, Option<i64>)>(tallied.map_err(unavailable)?)?
            .into_iter()
            .next()
            .and_then(|row| match row {
                (Some(count), Some(written)) => Some((count, written)),
                _ => None,
            });
        Ok((i32::try_from(count).unwrap_or(i32::MAX), tally))
    }

    /// Recounts `emoji` on `signal` and writes the count ([`Store::add_reaction`] and
    /// [`Store::remove_reaction`] do, after every change and every retry of one). The write's
    /// timestamp is this process's clock when the count was read (so with clocks in step the
    /// count read last wins), but later than the tally as read: a count written from a clock
    /// ahead of this one does not outlast it. Then the count and the tally are read again, and
    /// until both are what was written (at most [`RECOUNT_ROUNDS`] writes) the new count is
    /// written, later again. So a recount that read before a change and wrote after that change's
    /// own recount, from a clock ahead, sees that its count is stale and writes the new one. A
    /// recount that finds the tally right writes nothing. Left stale, until the next change or
    /// the client's retry: a recount whose rounds all met a change meanwhile, from a clock ahead
    /// of the last change's recount (counted in `confab_reaction_recounts_unsettled_total`); and
    /// one whose read after its write failed, when a recount after the change found the tally
    /// right and wrote nothing. `ahead` and `meanwhile`
    /// are for tests: a clock that far ahead of this one, and a change run after the first count
    /// and before its write.
    pub async fn recount_meanwhile(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        ahead: Duration,
        meanwhile: impl Future<Output = ()>,
    ) -> Result<(), StoreError> {
        let ahead = i64::try_from(ahead.as_micros()).unwrap_or(i64::MAX);
        let bucket = signal_bucket(created_millis(signal)?);
        let mut read_at = change_timestamp(signal)?.saturating_add(ahead);
        let (mut count, mut tally) = self.count_and_tally(chat, signal, emoji).await?;
        meanwhile.await;
        let mut settled = tally.is_some_and(|(held, _)| held == count);
        for _ in 0..RECOUNT_ROUNDS {
            if settled {
                break;
            }
            let at = read_at.max(tally.map_or(i64::MIN, |(_, written)| written.saturating_add(1)));
            self.session
                .execute_unpaged(
                    &self.statements.set_tally,
                    (chat.0, bucket, signal.0, emoji, count, at),
                )
                .await
                .map_err(unavailable)?;
            read_at = change_timestamp(signal)?.saturating_add(ahead);
            let (now, held) = self.count_and_tally(chat, signal, emoji).await?;
            settled = now == count && held.is_some_and(|(held, _)| held == count);
            (count, tally) = (now, held);
        }
        if !settled {
            metrics::counter!("confab_reaction_recounts_unsettled_total").increment(1);
            tracing::warn!(%chat, %signal, "a reaction's count kept changing through every recount; the next change counts it again");
        }
        self.refresh_latest(chat, signal).await
    }

    /// If signal `id` is deleted but has text (an edit that raced the deletion), writes the text
    /// away with the text's own write timestamp: on equal timestamps a deletion wins.
    async fn scrub_if_deleted(&self, chat: ChatId, id: SignalId) -> Result<(), StoreError> {
        let bucket = signal_bucket(created_millis(id)?);
        let result = self
            .session
            .execute_unpaged(&self.statements.signal_text_state, (chat.0, bucket, id.0))
            .await
            .map_err(unavailable)?;
        let state = rows::<(Option<bool>, Option<String>, Option<i64>)>(result)?
            .into_iter()
            .next();
        if let Some((Some(true), Some(_), Some(written))) = state {
            self.session
                .execute_unpaged(&self.statements.scrub_text, (written, chat.0, bucket, id.0))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }
}

/// A chat's row as each member's row of `user_chats` copies it, and the write timestamp the copy
/// is written with: that of the newest value it copies.
/// The values of `copy_chat_info`: write time, kind, name, description, creation time, creator,
/// user, chat.
type CopyValues<'a> = (
    i64,
    &'a str,
    MaybeUnset<Option<&'a str>>,
    MaybeUnset<Option<&'a str>>,
    CqlTimestamp,
    Uuid,
    Uuid,
    Uuid,
);

struct ChatInfo {
    kind: String,
    name: Option<String>,
    description: Option<String>,
    created_at: CqlTimestamp,
    created_by: Uuid,
    written: i64,
    /// The write times of the name and of the description, each its own (a change of one writes
    /// only it): `None` for an absent one, or one not read from the chat's row.
    name_written: Option<i64>,
    description_written: Option<i64>,
}

impl ChatInfo {
    /// The values of `copy_chat_info` for `user`'s row of `chat`. Into a row that may hold an
    /// older copy (`overwrite`), an absent name or description is written as a null, to clear the
    /// older value; into a new member row of a new chat it is left unset, since a null would be a
    /// tombstone in the member's partition, which every read of their whole chat list passes over
    /// until compaction purges it.
    fn copy_values<'a>(&'a self, user: UserId, chat: ChatId, overwrite: bool) -> CopyValues<'a> {
        let value = |v: Option<&'a str>| match (v, overwrite) {
            (None, false) => MaybeUnset::Unset,
            (v, _) => MaybeUnset::Set(v),
        };
        (
            self.written,
            self.kind.as_str(),
            value(self.name.as_deref()),
            value(self.description.as_deref()),
            self.created_at,
            self.created_by,
            user.0,
            chat.0,
        )
    }

    /// The values of `copy_chat_info` that carry `change` into `user`'s row of `chat`: only the
    /// columns it changes, so that a copy of another change, made at the same time, stays.
    fn change_values<'a>(
        &'a self,
        user: UserId,
        chat: ChatId,
        change: InfoChange<'_>,
    ) -> CopyValues<'a> {
        let (written, kind, name, description, created_at, created_by, user, chat) =
            self.copy_values(user, chat, true);
        let only = |changed: bool, value| if changed { value } else { MaybeUnset::Unset };
        (
            written,
            kind,
            only(change.name.is_some(), name),
            only(change.description.is_some(), description),
            created_at,
            created_by,
            user,
            chat,
        )
    }
}

/// The members in rows of `user_id, role, joined_at` of `chat_members`.
fn member_rows(
    result: scylla::response::query_result::QueryResult,
) -> Result<Vec<Member>, StoreError> {
    rows::<(Uuid, String, CqlTimestamp)>(result)?
        .into_iter()
        .map(|(user, role, joined)| {
            Ok(Member {
                user_id: UserId(user),
                role: parse(&role)?,
                joined_at: from_millis(joined.0)?,
            })
        })
        .collect()
}

/// This process's clock, in microseconds since the epoch (a write timestamp).
fn now_micros() -> i64 {
    i64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000)
        .unwrap_or(i64::MAX)
}

/// The columns of `chats`, in the order the statements select them. A row without a kind is no
/// chat: only a summary written by a touch that raced the chat's removal.
type ChatRow = (
    Uuid,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<Uuid>,
);

/// A row of `user_chats` as the chat list reads it: the chat's id, the member's role, then the
/// copies of the chat's row (as in [`ChatRow`]) and of its summary.
type UserChatRow = (
    Uuid,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<Uuid>,
    Option<Uuid>,
    Option<Vec<u8>>,
);

/// A [`ChatRow`] followed by the chat list's summary: the newest signal's id and its copy.
type ListedChatRow = (
    Uuid,
    Option<String>,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<Uuid>,
    Option<Uuid>,
    Option<Vec<u8>>,
);

fn to_chat(row: ChatRow) -> Result<Option<Chat>, StoreError> {
    let (id, Some(kind), name, description, created, created_by) = row else {
        return Ok(None);
    };
    let (Some(created), Some(created_by)) = (created, created_by) else {
        return Err(corrupt(format!("chat {id} has a kind but no creation")));
    };
    Ok(Some(Chat {
        id: ChatId(id),
        kind: parse(&kind)?,
        name,
        description,
        created_at: from_millis(created.0)?,
        created_by: UserId(created_by),
        my_role: None,
        latest_signal: None,
        unread_count: 0,
    }))
}

/// The chat list's copy of a signal: its 16-byte id, then its JSON. The id comes first so that
/// two copies written with the same timestamp (two signals of one millisecond) resolve the same
/// way as their `activity` cells do: the greater id wins both.
fn summary_copy(signal: &Signal) -> Result<Vec<u8>, StoreError> {
    let mut bytes = signal.id.0.as_bytes().to_vec();
    serde_json::to_writer(&mut bytes, signal).map_err(corrupt)?;
    Ok(bytes)
}

fn read_summary_copy(bytes: &[u8]) -> Result<Signal, StoreError> {
    let json = bytes
        .get(16..)
        .ok_or_else(|| corrupt("chat summary copy too short"))?;
    serde_json::from_slice(json).map_err(corrupt)
}

fn created_millis(id: SignalId) -> Result<i64, StoreError> {
    id.unix_millis()
        .ok_or_else(|| corrupt("signal id is not time-ordered"))
}

/// The write timestamp of a change to signal `id` made now: this process's clock in microseconds,
/// but never at or before the signal's creation (the original row's write timestamp), so a change
/// cannot lose to the original, or to a repair re-write of it, through clock skew.
fn change_timestamp(id: SignalId) -> Result<i64, StoreError> {
    Ok(now_micros().max(created_millis(id)? * 1000 + 1))
}

/// The `user_search` partition of a term: its first character.
fn shard(term: &str) -> String {
    term.chars().next().map(String::from).unwrap_or_default()
}

fn limit_i32(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

/// The attachment a `SELECT body, WRITETIME(body)` found, with that write time.
fn written_attachment(
    result: scylla::response::query_result::QueryResult,
) -> Result<Option<(Attachment, i64)>, StoreError> {
    match rows::<(Option<String>, Option<i64>, Option<Uuid>)>(result)?
        .into_iter()
        .next()
    {
        Some((Some(body), Some(written), claimed)) => {
            Ok(Some((claimed_attachment(&body, claimed)?, written)))
        }
        _ => Ok(None),
    }
}

/// An attachment's record (`body`) with the message a send claimed it for in its own cell, if
/// any; records claimed before that cell existed carry it in the body.
fn claimed_attachment(body: &str, claimed: Option<Uuid>) -> Result<Attachment, StoreError> {
    let mut attachment: Attachment = serde_json::from_str(body).map_err(corrupt)?;
    if let Some(message) = claimed {
        attachment.message_id = Some(SignalId(message));
    }
    Ok(attachment)
}

/// The record a `SELECT body, WRITETIME(body), message_id` found, with that write time, as its
/// body is to be written again: a claim held in the record's own cell is left out of the body.
/// Copied there, it would outlive the claim's giving back (the cell is cleared, the body is read
/// when the cell is empty), and the attachment would look held by a message never stored.
fn record_to_rewrite(
    result: scylla::response::query_result::QueryResult,
) -> Result<Option<(Attachment, i64)>, StoreError> {
    match rows::<(Option<String>, Option<i64>, Option<Uuid>)>(result)?
        .into_iter()
        .next()
    {
        Some((Some(body), Some(written), claimed)) => {
            let mut attachment: Attachment = serde_json::from_str(&body).map_err(corrupt)?;
            if claimed.is_some() {
                attachment.message_id = None;
            }
            Ok(Some((attachment, written)))
        }
        _ => Ok(None),
    }
}

/// Every row of an unpaged result, typed.
fn rows<T>(result: scylla::response::query_result::QueryResult) -> Result<Vec<T>, StoreError>
where
    T: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
{
    result
        .into_rows_result()
        .map_err(corrupt)?
        .rows::<T>()
        .map_err(corrupt)?
        .map(|row| row.map_err(corrupt))
        .collect()
}

/// A lightweight transaction's outcome: `None` when applied, else the existing row's `column`
/// (also `None` when that cell is empty: [`lwt_row`] tells the two apart).
fn applied_or_row(
    result: scylla::response::query_result::QueryResult,
    column_name: &str,
) -> Result<Option<CqlValue>, StoreError> {
    lwt_row(result, column_name).map(Option::flatten)
}

/// `None` when a lightweight transaction was applied; else `Some` of the existing row's
/// `column_name` (`Some(None)` when that cell is empty, or there is no row).
fn lwt_row(
    result: scylla::response::query_result::QueryResult,
    column_name: &str,
) -> Result<Option<Option<CqlValue>>, StoreError> {
    Ok(lwt_columns(result, &[column_name])?.map(|mut cells| cells.swap_remove(0)))
}

/// `None` when a lightweight transaction was applied; else `Some` of the existing row's cells
/// named `names`, in that order (all `None` when there is no row: a conditional update of a
/// missing row answers `[applied]` alone).
fn lwt_columns(
    result: scylla::response::query_result::QueryResult,
    names: &[&str],
) -> Result<Option<Vec<Option<CqlValue>>>, StoreError> {
    let result = result.into_rows_result().map_err(corrupt)?;
    let row = result
        .maybe_first_row::<Row>()
        .map_err(corrupt)?
        .ok_or_else(|| corrupt("lightweight transaction returned no row"))?;
    if matches!(column(&row, 0), Some(CqlValue::Boolean(true))) {
        return Ok(None);
    }
    let specs = result.column_specs();
    if specs.len() == 1 {
        return Ok(Some(vec![None; names.len()]));
    }
    names
        .iter()
        .map(|name| {
            let index = specs
                .iter()
                .position(|spec| spec.name() == *name)
                .ok_or_else(|| corrupt(format!("lightweight transaction without {name}")))?;
            Ok(column(&row, index).cloned())
        })
        .collect::<Result<Vec<_>, StoreError>>()
        .map(Some)
}

/// `None` when a lightweight transaction was applied; else `Some` of the existing row's text
/// `column_name`: `Some(None)` when there is no row or the cell is empty.
fn lwt_text(
    result: scylla::response::query_result::QueryResult,
    column_name: &str,
) -> Result<Option<Option<String>>, StoreError> {
    lwt_row(result, column_name)?
        .map(|cell| match cell {
            None | Some(CqlValue::Empty) => Ok(None),
            Some(CqlValue::Text(text)) => Ok(Some(text)),
            Some(other) => Err(corrupt(format!("{column_name} {other:?}"))),
        })
        .transpose()
}

/// Whether a lightweight transaction was applied (its first column, `[applied]`).
fn applied(result: scylla::response::query_result::QueryResult) -> Result<bool, StoreError> {
    let row = result
        .into_rows_result()
        .map_err(corrupt)?
        .maybe_first_row::<Row>()
        .map_err(corrupt)?
        .ok_or_else(|| corrupt("lightweight transaction returned no row"))?;
    Ok(matches!(column(&row, 0), Some(CqlValue::Boolean(true))))
}

#[cfg(test)]
mod tests {
    use super::{qualify, scratch_keyspace, scratch_keyspace_made};

    #[test]
    fn scratch_keyspaces_say_when_they_were_made() {
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        let name = scratch_keyspace();
        assert!(name.len() <= 48, "{name} is too long for a keyspace");
        let made = scratch_keyspace_made(&name).expect("a scratch keyspace's name");
        assert!(
            made >= before && made <= std::time::SystemTime::now(),
            "{name}"
        );
        // Other keyspaces, and the names tests used before, are never taken for scratch ones.
        for other in [
            "confab",
            "t_5f3a9c1e0b2d4f6a8c9e",
            "t_xyzxyzxy_abc",
            "t_0000000a_",
            "system",
        ] {
            assert_eq!(scratch_keyspace_made(other), None, "{other}");
        }
    }

    #[test]
    fn tables_are_qualified_with_the_keyspace() {
        assert_eq!(
            qualify(
                "SELECT a FROM signals WHERE chat_id = ? AND (b) < (?)",
                "ks"
            ),
            "SELECT a FROM ks.signals WHERE chat_id = ? AND (b) < (?)"
        );
        assert_eq!(
            qualify("INSERT INTO users (id) VALUES (?)", "ks"),
            "INSERT INTO ks.users (id) VALUES (?)"
        );
        assert_eq!(
            qualify("UPDATE reaction_counts SET count = count + ?", "k"),
            "UPDATE k.reaction_counts SET count = count + ?"
        );
        assert_eq!(
            qualify("DELETE FROM other.t WHERE x = ?", "ks"),
            "DELETE FROM other.t WHERE x = ?"
        );
    }
}
