//! The event outbox on CQL: entries partitioned by (writer, ten seconds), so a live writer's deletes
//! are never read; heartbeats; sweep claims by lightweight transaction.

use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlValue;
use uuid::Uuid;

use super::{applied_or_row, corrupt, qualify, rows, unavailable};
use crate::store::{OutboxEntry, OutboxWriter, StoreError};

/// How many buckets one `IN` query reads.
const BUCKETS_PER_QUERY: i64 = 64;

/// How many entries one batch removes: about 60 bytes of key each, under Cassandra's 5 KiB
/// batch size warning.
const REMOVALS_PER_BATCH: usize = 64;

pub(super) struct OutboxStatements {
    put: PreparedStatement,
    remove: PreparedStatement,
    entries: PreparedStatement,
    heartbeat: PreparedStatement,
    writers: PreparedStatement,
    claim: PreparedStatement,
    forget_writer: PreparedStatement,
}

impl OutboxStatements {
    pub(super) async fn prepare(
        session: &Session,
        keyspace: &str,
    ) -> Result<OutboxStatements, StoreError> {
        let prepare = |cql: &str| {
            let cql = qualify(cql, keyspace);
            async move { session.prepare(cql).await.map_err(unavailable) }
        };
        Ok(OutboxStatements {
            put: prepare(
                "INSERT INTO event_outbox (writer, bucket, id, envelope) VALUES (?, ?, ?, ?)",
            )
            .await?,
            remove: prepare("DELETE FROM event_outbox WHERE writer = ? AND bucket = ? AND id = ?")
                .await?,
            entries: prepare(
                "SELECT bucket, id, envelope FROM event_outbox WHERE writer = ? AND bucket IN ?",
            )
            .await?,
            heartbeat: prepare(
                "INSERT INTO outbox_writers (writer, started_ms, seen_ms) VALUES (?, ?, ?)",
            )
            .await?,
            writers: prepare("SELECT writer, started_ms, seen_ms FROM outbox_writers").await?,
            claim: prepare(
                "INSERT INTO outbox_sweeps (writer, sweeper) VALUES (?, ?) IF NOT EXISTS USING TTL ?",
            )
            .await?,
            forget_writer: prepare("DELETE FROM outbox_writers WHERE writer = ?").await?,
        })
    }
}

pub(super) async fn put(
    session: &Session,
    statements: &OutboxStatements,
    writer: Uuid,
    entry: &OutboxEntry,
) -> Result<(), StoreError> {
    session
        .execute_unpaged(
            &statements.put,
            (writer, entry.bucket, entry.id, entry.envelope.as_slice()),
        )
        .await
        .map_err(unavailable)?;
    Ok(())
}

pub(super) async fn remove(
    session: &Session,
    statements: &OutboxStatements,
    writer: Uuid,
    bucket: i64,
    ids: &[Uuid],
) -> Result<(), StoreError> {
    use scylla::statement::batch::{Batch, BatchType};
    // The entries of a bucket share a partition: an unlogged batch of their deletions is one
    // mutation of it, however many there are (kept well under the batch size warning).
    for chunk in ids.chunks(REMOVALS_PER_BATCH) {
        if let [id] = chunk {
            session
                .execute_unpaged(&statements.remove, (writer, bucket, *id))
                .await
                .map_err(unavailable)?;
            continue;
        }
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in chunk {
            batch.append_statement(statements.remove.clone());
        }
        let values: Vec<(Uuid, i64, Uuid)> = chunk.iter().map(|id| (writer, bucket, *id)).collect();
        session.batch(&batch, values).await.map_err(unavailable)?;
    }
    Ok(())
}

pub(super) async fn entries(
    session: &Session,
    statements: &OutboxStatements,
    writer: Uuid,
    from: i64,
    to: i64,
) -> Result<Vec<OutboxEntry>, StoreError> {
    let mut found = Vec::new();
    let mut start = from;
    while start <= to {
        let end = (start + BUCKETS_PER_QUERY - 1).min(to);
        let buckets: Vec<i64> = (start..=end).collect();
        let result = session
            .execute_unpaged(&statements.entries, (writer, buckets))
            .await
            .map_err(unavailable)?;
        found.extend(rows::<(i64, Uuid, Vec<u8>)>(result)?.into_iter().map(
            |(bucket, id, envelope)| OutboxEntry {
                bucket,
                id,
                envelope,
            },
        ));
        start = end + 1;
    }
    Ok(found)
}

pub(super) async fn heartbeat(
    session: &Session,
    statements: &OutboxStatements,
    writer: Uuid,
    entries_from_ms: i64,
    seen_ms: i64,
) -> Result<(), StoreError> {
    // The column keeps its first name: it held the writer's start, the earliest its entries
    // could be.
    session
        .execute_unpaged(&statements.heartbeat, (writer, entries_from_ms, seen_ms))
        .await
        .map_err(unavailable)?;
    Ok(())
}

pub(super) async fn writers(
    session: &Session,
    statements: &OutboxStatements,
) -> Result<Vec<OutboxWriter>, StoreError> {
    // One small row per live api process (and per dead one until it is swept).
    let result = session
        .execute_unpaged(&statements.writers, ())
        .await
        .map_err(unavailable)?;
    Ok(rows::<(Uuid, Option<i64>, Option<i64>)>(result)?
        .into_iter()
        .map(|(writer, entries_from_ms, seen_ms)| OutboxWriter {
            writer,
            entries_from_ms: entries_from_ms.unwrap_or(0),
            seen_ms: seen_ms.unwrap_or(0),
        })
        .collect())
}

pub(super) async fn claim(
    session: &Session,
    statements: &OutboxStatements,
    writer: Uuid,
    sweeper: Uuid,
    claim_ttl_secs: i32,
) -> Result<bool, StoreError> {
    let result = session
        .execute_unpaged(&statements.claim, (writer, sweeper, claim_ttl_secs))
        .await
        .map_err(unavailable)?;
    match applied_or_row(result, "sweeper")? {
        None => Ok(true),
        Some(CqlValue::Uuid(holder)) => Ok(holder == sweeper),
        Some(other) => Err(corrupt(format!("outbox sweep claim holds {other:?}"))),
    }
}

pub(super) async fn forget_writer(
    session: &Session,
    statements: &OutboxStatements,
    writer: Uuid,
) -> Result<(), StoreError> {
    session
        .execute_unpaged(&statements.forget_writer, (writer,))
        .await
        .map_err(unavailable)?;
    Ok(())
}
