//! Calls on CQL: `calls` (status changed only by lightweight transaction), `call_participants`
//! (written by lightweight transactions only), `ringing_calls`, the one-partition list the sweeper
//! reads (calls starting until their `started` is written, ringing calls, calls being ended and
//! calls a reader found rung out until their signal is written: see [`ListedCall`]),
//! `live_calls`, a chat's ringing and active
//! calls, `chat_calls`, a chat's one live call (written by lightweight transactions only), and
//! `pending_call_signals`, the joins and leaves whose signal may not be written yet.

use confab_schema::call::CallStatus;
use confab_schema::{ChatId, UserId};
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{CqlStore, applied, corrupt, lwt_columns, lwt_row, qualify, rows, unavailable};
use crate::store::{
    CallRecord, ListedCall, PendingCallSignal, StoreError, from_millis, millis, parse,
};

/// The partition of `ringing_calls`: there are few ringing calls at any time.
const RINGING_SHARD: i32 = 0;

/// How many times a start looks at its chat's live call before it gives up: each look after the
/// first follows another start's taking over a claim of a call that is over.
const CLAIM_ATTEMPTS: usize = 5;

pub(super) struct CallStatements {
    insert_call: PreparedStatement,
    get_call: PreparedStatement,
    transition: PreparedStatement,
    participants: PreparedStatement,
    add_participant: PreparedStatement,
    put_participant: PreparedStatement,
    participant_join: PreparedStatement,
    remove_participant: PreparedStatement,
    insert_ringing: PreparedStatement,
    ringing_due: PreparedStatement,
    ringing_due_after: PreparedStatement,
    delete_ringing: PreparedStatement,
    pending: PreparedStatement,
    insert_pending: PreparedStatement,
    pending_written: PreparedStatement,
    delete_pending_written: PreparedStatement,
    insert_live: PreparedStatement,
    live_of_chat: PreparedStatement,
    delete_live: PreparedStatement,
    claim_chat: PreparedStatement,
    replace_chat_claim: PreparedStatement,
    release_chat_claim: PreparedStatement,
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
            // Every write of `call_participants` is a lightweight transaction: a plain write's
            // timestamp (the coordinator's clock) may order before an earlier Paxos write's (its
            // ballot's), so a plain leave could fail to shadow the join before it, or shadow a
            // join after it.
            add_participant: prepare(
                "INSERT INTO call_participants (call_id, user_id) VALUES (?, ?) IF NOT EXISTS",
            )
            .await?,
            // A lightweight transaction: see `cql_put_call_participant`.
            put_participant: prepare(
                "INSERT INTO call_participants (call_id, user_id, join_id) VALUES (?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            participant_join: prepare(
                "SELECT join_id FROM call_participants WHERE call_id = ? AND user_id = ?",
            )
            .await?,
            remove_participant: prepare(
                "DELETE FROM call_participants WHERE call_id = ? AND user_id = ? IF EXISTS",
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
            // Both bounds as tuples: a tuple bound and a plain one on the clustering columns do not
            // mix on every CQL store.
            ringing_due_after: prepare(
                "SELECT ring_until, call_id, chat_id FROM ringing_calls WHERE shard = ? AND (ring_until, call_id) > (?, ?) AND (ring_until) <= (?) LIMIT ?",
            )
            .await?,
            delete_ringing: prepare(
                "DELETE FROM ringing_calls WHERE shard = ? AND ring_until = ? AND call_id = ?",
            )
            .await?,
            pending: prepare(
                "SELECT state, change_id FROM pending_call_signals WHERE call_id = ? AND user_id = ?",
            )
            .await?,
            insert_pending: prepare(
                "INSERT INTO pending_call_signals (call_id, user_id, state, change_id) VALUES (?, ?, ?, ?)",
            )
            .await?,
            pending_written: prepare(
                "SELECT state, change_id, WRITETIME(change_id) FROM pending_call_signals WHERE call_id = ? AND user_id = ?",
            )
            .await?,
            // With the timestamp of the record it removes: a record written after it stays.
            delete_pending_written: prepare(
                "DELETE FROM pending_call_signals USING TIMESTAMP ? WHERE call_id = ? AND user_id = ?",
            )
            .await?,
            insert_live: prepare("INSERT INTO live_calls (chat_id, call_id) VALUES (?, ?)").await?,
            live_of_chat: prepare("SELECT call_id FROM live_calls WHERE chat_id = ?").await?,
            delete_live: prepare("DELETE FROM live_calls WHERE chat_id = ? AND call_id = ?")
                .await?,
            claim_chat: prepare(
                "INSERT INTO chat_calls (chat_id, call_id, started_by, started_at, ring_until) VALUES (?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            replace_chat_claim: prepare(
                "UPDATE chat_calls SET call_id = ?, started_by = ?, started_at = ?, ring_until = ? WHERE chat_id = ? IF call_id = ?",
            )
            .await?,
            release_chat_claim: prepare("DELETE FROM chat_calls WHERE chat_id = ? IF call_id = ?")
                .await?,
        })
    }
}

impl CqlStore {
    /// The chat's live call is claimed first (`chat_calls`, by lightweight transaction): of
    /// starts racing in one chat one claims it, and the others answer its call, storing it from
    /// its claim when it is not stored yet (its start is between its writes, or stopped there:
    /// every write of the call is idempotent). A claim whose call is over, or was never stored and
    /// rang out, is taken over, conditional on the call it names.
    pub(super) async fn cql_create_call(
        &self,
        call: &CallRecord,
    ) -> Result<Option<CallRecord>, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            let Some(claimed) = self.cql_claim_chat(call).await? else {
                self.cql_store_call(call).await?;
                return Ok(None);
            };
            if claimed.id == call.id {
                // A retry of this start, whose claim was made.
                self.cql_store_call(call).await?;
                return Ok(None);
            }
            let stale = match self.cql_get_call(claimed.id).await? {
                Some(live) if live.status.is_live() => return Ok(Some(live)),
                Some(_) => true,
                None => claimed.ring_until <= OffsetDateTime::now_utc(),
            };
            if !stale {
                self.cql_store_call(&claimed).await?;
                return Ok(Some(claimed));
            }
            if self.cql_replace_chat_claim(call, claimed.id).await? {
                self.cql_store_call(call).await?;
                return Ok(None);
            }
            // Another start took the claim over first: look again.
        }
        Err(StoreError::Unavailable(format!(
            "the live call of chat {} kept changing",
            call.chat_id.0
        )))
    }

    /// Claims `call`'s chat for it; `None` when claimed, else the call the claim names.
    async fn cql_claim_chat(&self, call: &CallRecord) -> Result<Option<CallRecord>, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.calls.claim_chat,
                (
                    call.chat_id.0,
                    call.id,
                    call.started_by.0,
                    CqlTimestamp(millis(call.started_at)),
                    CqlTimestamp(millis(call.ring_until)),
                ),
            )
            .await
            .map_err(unavailable)?;
        let Some(cells) = lwt_columns(
            result,
            &["call_id", "started_by", "started_at", "ring_until"],
        )?
        else {
            return Ok(None);
        };
        let [
            Some(CqlValue::Uuid(id)),
            Some(CqlValue::Uuid(started_by)),
            Some(CqlValue::Timestamp(started_at)),
            Some(CqlValue::Timestamp(ring_until)),
        ] = cells.as_slice()
        else {
            return Err(corrupt(format!("chat call claim {cells:?}")));
        };
        let (id, started_by, started_at, ring_until) = (*id, *started_by, *started_at, *ring_until);
        Ok(Some(CallRecord {
            id,
            chat_id: call.chat_id,
            started_by: UserId(started_by),
            started_at: from_millis(started_at.0)?,
            ring_until: from_millis(ring_until.0)?,
            status: CallStatus::Ringing,
        }))
    }

    /// Claims `call`'s chat in place of call `stale`; `false` when the claim names another call.
    async fn cql_replace_chat_claim(
        &self,
        call: &CallRecord,
        stale: Uuid,
    ) -> Result<bool, StoreError> {
        let result = self
            .session
            .execute_unpaged(
                &self.calls.replace_chat_claim,
                (
                    call.id,
                    call.started_by.0,
                    CqlTimestamp(millis(call.started_at)),
                    CqlTimestamp(millis(call.ring_until)),
                    call.chat_id.0,
                    stale,
                ),
            )
            .await
            .map_err(unavailable)?;
        applied(result)
    }

    /// Takes call `id`'s claim of `chat` away, if it still holds it.
    async fn cql_release_chat_claim(&self, chat: ChatId, id: Uuid) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.calls.release_chat_claim, (chat.0, id))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Stores a call whose chat it claimed (or whose claim it found): every write idempotent, so
    /// a retry of it, or another start storing it from its claim, writes the same.
    async fn cql_store_call(&self, call: &CallRecord) -> Result<(), StoreError> {
        let s = &self.calls;
        // Listed for the sweeper before the call exists: a sweeper that finds the listing early
        // sees no call ringing past its time and leaves it, and one that finds it long after (the
        // call's write failed) forgets it.
        self.cql_list_call(&ListedCall {
            id: call.id,
            chat_id: call.chat_id,
            due: call.ring_until,
        })
        .await?;
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
        // Not applied when a retry, or another start storing it from its claim, finds the call
        // stored.
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
        let answered = from == CallStatus::Ringing && to.is_live();
        if moved
            && (answered || !to.is_live())
            && let Some(call) = self.cql_get_call(id).await?
        {
            // A call that is missed or ended stays in the sweeper's list until its signal is
            // written; an answered one leaves it.
            if answered {
                self.cql_forget_listed(&ListedCall {
                    id,
                    chat_id: call.chat_id,
                    due: call.ring_until,
                })
                .await?;
            }
            if !to.is_live() {
                self.cql_forget_live(call.chat_id, id).await?;
                // Left in place when this fails: the next start finds the call over and takes the
                // claim over.
                self.cql_release_chat_claim(call.chat_id, id).await?;
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

    pub(super) async fn cql_remove_call_participant(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.calls.remove_participant, (id, user.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Of joins of one user racing, in any processes, the first lightweight transaction puts the
    /// row in; the others are not applied and read (serially, through the same transaction) the
    /// join that did. A plain read could miss a racing join's write still on its way, and a plain
    /// write would let each join believe it put the participant in.
    pub(super) async fn cql_put_call_participant(
        &self,
        id: Uuid,
        user: UserId,
        join: Uuid,
    ) -> Result<Option<Uuid>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.put_participant, (id, user.0, join))
            .await
            .map_err(unavailable)?;
        match lwt_row(result, "join_id")? {
            None => Ok(Some(join)),
            Some(Some(CqlValue::Uuid(existing))) => Ok(Some(existing)),
            Some(None | Some(CqlValue::Empty)) => Ok(None),
            Some(Some(other)) => Err(corrupt(format!("participant join {other:?}"))),
        }
    }

    pub(super) async fn cql_call_participant_join(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<Uuid>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.participant_join, (id, user.0))
            .await
            .map_err(unavailable)?;
        Ok(rows::<(Option<Uuid>,)>(result)?
            .into_iter()
            .next()
            .and_then(|(join,)| join))
    }

    pub(super) async fn cql_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<PendingCallSignal>, StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.pending, (id, user.0))
            .await
            .map_err(unavailable)?;
        let Some((state, token)) = rows::<(Option<String>, Option<Uuid>)>(result)?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let (Some(state), Some(token)) = (state, token) else {
            return Err(corrupt(format!(
                "pending call signal of {id} has missing columns"
            )));
        };
        Ok(Some(PendingCallSignal {
            state: parse(&state)?,
            token,
        }))
    }

    pub(super) async fn cql_set_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        pending: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.calls.insert_pending,
                (id, user.0, pending.state.as_str(), pending.token),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_forget_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        done: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        let result = self
            .session
            .execute_unpaged(&self.calls.pending_written, (id, user.0))
            .await
            .map_err(unavailable)?;
        type Written = (Option<String>, Option<Uuid>, Option<i64>);
        let Some((Some(state), Some(token), Some(written))) =
            rows::<Written>(result)?.into_iter().next()
        else {
            return Ok(());
        };
        if token != done.token || state != done.state.as_str() {
            return Ok(());
        }
        self.session
            .execute_unpaged(&self.calls.delete_pending_written, (written, id, user.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_list_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.calls.insert_ringing,
                (
                    RINGING_SHARD,
                    CqlTimestamp(millis(call.due)),
                    call.id,
                    call.chat_id.0,
                ),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_listed_calls_due(
        &self,
        now: OffsetDateTime,
        after: Option<&ListedCall>,
        limit: usize,
    ) -> Result<Vec<ListedCall>, StoreError> {
        let s = &self.calls;
        let now = CqlTimestamp(millis(now));
        let limit = i32::try_from(limit).unwrap_or(i32::MAX);
        let result = match after {
            None => {
                self.session
                    .execute_unpaged(&s.ringing_due, (RINGING_SHARD, now, limit))
                    .await
            }
            Some(after) => {
                self.session
                    .execute_unpaged(
                        &s.ringing_due_after,
                        (
                            RINGING_SHARD,
                            CqlTimestamp(millis(after.due)),
                            after.id,
                            now,
                            limit,
                        ),
                    )
                    .await
            }
        }
        .map_err(unavailable)?;
        rows::<(CqlTimestamp, Uuid, Option<Uuid>)>(result)?
            .into_iter()
            .map(|(due, id, chat_id)| {
                Ok(ListedCall {
                    id,
                    chat_id: ChatId(chat_id.ok_or_else(|| corrupt("listed call without chat"))?),
                    due: from_millis(due.0)?,
                })
            })
            .collect()
    }

    pub(super) async fn cql_forget_listed(&self, call: &ListedCall) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(
                &self.calls.delete_ringing,
                (RINGING_SHARD, CqlTimestamp(millis(call.due)), call.id),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
