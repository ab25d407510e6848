//! Calls on CQL: `calls` (status changed only by lightweight transaction), `call_participants`,
//! `ringing_calls`, the one-partition list the ring timeout sweeper reads, and `live_calls`, a
//! chat's ringing and active calls.

use confab_schema::call::CallStatus;
use confab_schema::{ChatId, UserId};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::CqlTimestamp;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{CqlStore, applied, corrupt, qualify, rows, unavailable};
use crate::store::{CallRecord, RingingCall, StoreError, from_millis, millis, parse};

/// The partition of `ringing_calls`: there are few ringing calls at any time.
const RINGING_SHARD: i32 = 0;

pub(super) struct CallStatements {
    insert_call: PreparedStatement,
    get_call: PreparedStatement,
    transition: PreparedStatement,
    participants: PreparedStatement,
    add_participant: PreparedStatement,
    remove_participant: PreparedStatement,
    insert_ringing: PreparedStatement,
    ringing_due: PreparedStatement,
    delete_ringing: PreparedStatement,
    insert_live: PreparedStatement,
    live_of_chat: PreparedStatement,
    delete_live: PreparedStatement,
}

impl CallStatements {
    pub(super) async fn prepare(
        session: &Session,
        keyspace: &str,
    ) -> Result<CallStatements, StoreError> {
        let prepare = |cql: &str| {
            let cql = qualify(cql, keyspace);
            async move { session.prepare(cql).await.map_err(unavailable) }
        };
        Ok(CallStatements {
            insert_call: prepare(
                "INSERT INTO calls (id, chat_id, started_by, started_at, ring_until, status) VALUES (?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            get_call: prepare(
                "SELECT chat_id, started_by, started_at, ring_until, status FROM calls WHERE id = ?",
            )
            .await?,
            transition: prepare("UPDATE calls SET status = ? WHERE id = ? IF status = ?").await?,
            participants: prepare("SELECT user_id FROM call_participants WHERE call_id = ?")
                .await?,
            add_participant: prepare(
                "INSERT INTO call_participants (call_id, user_id) VALUES (?, ?)",
            )
            .await?,
            remove_participant: prepare(
                "DELETE FROM call_participants WHERE call_id = ? AND user_id = ?",
            )
            .await?,
            insert_ringing: prepare(
                "INSERT INTO ringing_calls (shard, ring_until, call_id, chat_id) VALUES (?, ?, ?, ?)",
            )
            .await?,
            ringing_due: prepare(
                "SELECT ring_until, call_id, chat_id FROM ringing_calls WHERE shard = ? AND ring_until <= ? LIMIT ?",
            )
            .await?,
            delete_ringing: prepare(
                "DELETE FROM ringing_calls WHERE shard = ? AND ring_until = ? AND call_id = ?",
            )
            .await?,
            insert_live: prepare("INSERT INTO live_calls (chat_id, call_id) VALUES (?, ?)").await?,
            live_of_chat: prepare("SELECT call_id FROM live_calls WHERE chat_id = ?").await?,
            delete_live: prepare("DELETE FROM live_calls WHERE chat_id = ? AND call_id = ?")
                .await?,
        })
    }
}

impl CqlStore {
    pub(super) async fn cql_create_call(&self, call: &CallRecord) -> Result<(), StoreError> {
        let s = &self.calls;
        // Listed as ringing before the call exists: a sweeper that finds it early sees no call
        // ringing past its time and leaves it.
        self.session
            .execute_unpaged(
                &s.insert_ringing,
                (
                    RINGING_SHARD,
                    CqlTimestamp(millis(call.ring_until)),
                    call.id,
                    call.chat_id.0,
                ),
            )
            .await
            .map_err(unavailable)?;
        // Listed as live before the call exists too: a reader skips a row whose call it does not
        // find.
        self.session
            .execute_unpaged(&s.insert_live, (call.chat_id.0, call.id))
            .await
            .map_err(unavailable)?;
        self.session
            .execute_unpaged(&s.add_participant, (call.id, call.started_by.0))
            .await
            .map_err(unavailable)?;
        let result = self
            .session
            .execute_unpaged(
                &s.insert_call,
                (
                    call.id,
                    call.chat_id.0,
                    call.started_by.0,
                    CqlTimestamp(millis(call.started_at)),
                    CqlTimestamp(millis(call.ring_until)),
                    call.status.as_str(),
                ),
            )
            .await
            .map_err(unavailable)?;
        // Not applied only when a retry finds its own earlier write.
        applied(result)?;
        Ok(())
    }

    pub(super) async fn cql_get_call(&self, id: Uuid) -> Result<Option<CallRecord>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.get_call, (id,))
            .await
            .map_err(unavailable)?;
        type Row = (
            Option<Uuid>,
            Option<Uuid>,
            Option<CqlTimestamp>,
            Option<CqlTimestamp>,
            Option<String>,
        );
        let Some(row) = rows::<Row>(result)?.into_iter().next() else {
            return Ok(None);
        };
        let (Some(chat_id), Some(started_by), Some(started_at), Some(ring_until), Some(status)) =
            row
        else {
            return Err(corrupt(format!("call {id} has missing columns")));
        };
        Ok(Some(CallRecord {
            id,
            chat_id: ChatId(chat_id),
            started_by: UserId(started_by),
            started_at: from_millis(started_at.0)?,
            ring_until: from_millis(ring_until.0)?,
            status: parse(&status)?,
        }))
    }

    pub(super) async fn cql_transition_call(
        &self,
        id: Uuid,
        from: CallStatus,
        to: CallStatus,
    ) -> Result<bool, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.transition, (to.as_str(), id, from.as_str()))
            .await
            .map_err(unavailable)?;
        let moved = applied(result)?;
        if moved
            && (from == CallStatus::Ringing || !to.is_live())
            && let Some(call) = self.cql_get_call(id).await?
        {
            if from == CallStatus::Ringing {
                self.cql_forget_ringing(&RingingCall {
                    id,
                    chat_id: call.chat_id,
                    ring_until: call.ring_until,
                })
                .await?;
            }
            if !to.is_live() {
                self.cql_forget_live(call.chat_id, id).await?;
            }
        }
        Ok(moved)
    }

    pub(super) async fn cql_live_calls(&self, chat: ChatId) -> Result<Vec<CallRecord>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.live_of_chat, (chat.0,))
            .await
            .map_err(unavailable)?;
        let mut live = Vec::new();
        for (id,) in rows::<(Uuid,)>(result)? {
            match self.cql_get_call(id).await? {
                Some(call) if call.status.is_live() => live.push(call),
                // A row left by a status change whose removal of it failed.
                Some(_) => self.cql_forget_live(chat, id).await?,
                // Listed before its call was stored.
                None => {}
            }
        }
        Ok(live)
    }

    async fn cql_forget_live(&self, chat: ChatId, id: Uuid) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.calls.delete_live, (chat.0, id))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_call_participants(&self, id: Uuid) -> Result<Vec<UserId>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.participants, (id,))
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Uuid,)>(result)?
            .into_iter()
            .map(|(user,)| UserId(user))
            .collect())
    }

    pub(super) async fn cql_set_call_participant(
        &self,
        id: Uuid,
        user: UserId,
        present: bool,
    ) -> Result<(), StoreError> {
        let statement = if present {
            &self.calls.add_participant
        } else {
            &self.calls.remove_participant
        };
        self.session
            .execute_unpaged(statement, (id, user.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_ringing_calls_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<RingingCall>, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.calls.ringing_due,
                (
                    RINGING_SHARD,
                    CqlTimestamp(millis(now)),
                    i32::try_from(limit).unwrap_or(i32::MAX),
                ),
            )
            .await
            .map_err(unavailable)?;
        rows::<(CqlTimestamp, Uuid, Option<Uuid>)>(result)?
            .into_iter()
            .map(|(ring_until, id, chat_id)| {
                Ok(RingingCall {
                    id,
                    chat_id: ChatId(chat_id.ok_or_else(|| corrupt("ringing call without chat"))?),
                    ring_until: from_millis(ring_until.0)?,
                })
            })
            .collect()
    }

    pub(super) async fn cql_forget_ringing(&self, call: &RingingCall) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.calls.delete_ringing,
                (
                    RINGING_SHARD,
                    CqlTimestamp(millis(call.ring_until)),
                    call.id,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
