//! Calls, signalling only: media goes peer to peer (or through an SFU and the TURN servers), never
//! through confab. A call belongs to a chat; its members start, join, leave and end it, each change
//! written into the chat's history as a `call` signal. Participants exchange WebRTC signalling
//! (offers, answers, ICE candidates) through the bus as ephemeral `call.signal` events, delivered to
//! the target participant's connections only and never stored. A call that rings past its time with
//! nobody answering becomes `missed`, found by [`ApiState::sweep_missed_calls`] in any API process,
//! and its callees get a push as for a message.

use std::time::Duration;

use base64::Engine;
use confab_schema::call::{
    Call, CallRelay, CallSignal, CallSignalType, CallState, CallStatus, TurnCredentials,
};
use confab_schema::limits::MAX_CALL_PARTICIPANTS;
use confab_schema::{ChatId, Envelope, Event, MemberRole, User, UserId};
use hmac::{Hmac, Mac};
use time::OffsetDateTime;
use uuid::Uuid;

use super::inputs::{RelayTarget, SignalPayload};
use super::rules;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{CallRecord, StoreError};

/// How long a call rings when no setting says otherwise.
pub const DEFAULT_RING_TIMEOUT: Duration = Duration::from_secs(45);

/// How many ringing calls one sweep takes on.
const SWEEP_BATCH: usize = 100;

/// How calls behave: the ring timeout and the TURN servers.
#[derive(Clone, Debug)]
pub struct CallSettings {
    pub ring_timeout: Duration,
    /// `None`: no TURN servers configured (`GET /v1/calls/turn-credentials` answers 404).
    pub turn: Option<TurnSettings>,
}

impl Default for CallSettings {
    fn default() -> Self {
        CallSettings {
            ring_timeout: DEFAULT_RING_TIMEOUT,
            turn: None,
        }
    }
}

/// coturn's shared-secret authentication (`use-auth-secret`, `static-auth-secret`).
#[derive(Clone)]
pub struct TurnSettings {
    pub secret: String,
    pub uris: Vec<String>,
    pub ttl: Duration,
}

impl std::fmt::Debug for TurnSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TurnSettings")
            .field("uris", &self.uris)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// The TURN password of `username`: base64(HMAC-SHA1(secret, username)), as coturn computes it.
pub fn turn_password(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes a key of any length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

impl ApiState {
    /// Starts a call in `chat` (members only): it rings the other members until the ring timeout,
    /// and a `started` signal goes into the history.
    pub async fn start_call(&self, caller: &User, chat: ChatId) -> ApiResult<Call> {
        self.require_member(chat, caller.id).await?;
        // Refuse before storing when the `started` signal could not be published.
        self.bus.check().await?;
        let started_at = confab_schema::model::to_millis(OffsetDateTime::now_utc());
        let record = CallRecord {
            id: Uuid::now_v7(),
            chat_id: chat,
            started_by: caller.id,
            started_at,
            ring_until: started_at + self.calls.ring_timeout,
            status: CallStatus::Ringing,
        };
        self.store.create_call(&record).await?;
        self.record_call_signal(chat, caller.id, call_signal(&record, CallState::Started))
            .await?;
        Ok(view(record, vec![caller.id]))
    }

    /// A call of a chat the caller is in.
    pub async fn get_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, _) = self.load_call(caller, id).await?;
        let participants = self.present_participants(&record).await?;
        Ok(view(record, participants))
    }

    /// Joins a ringing or active call (members of its chat only); answering a ringing call makes it
    /// active. Joining again changes nothing.
    pub async fn join_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, _) = self.load_call(caller, id).await?;
        let mut participants = self.present_participants(&record).await?;
        if participants.contains(&caller) && record.status.is_live() {
            return Ok(view(record, participants));
        }
        live(record.status)?;
        if participants.len() >= MAX_CALL_PARTICIPANTS {
            return Err(ApiError::Conflict("the call is full".into()));
        }
        self.bus.check().await?;
        self.store.set_call_participant(id, caller, true).await?;
        // An answer and the ring timeout race on the ringing status; exactly one moves it. Else
        // the status is read again after the participant is in: a last leave that ended the call
        // since it was read above did not see this participant, so the join is undone.
        let answered = record.status == CallStatus::Ringing
            && self
                .store
                .transition_call(id, CallStatus::Ringing, CallStatus::Active)
                .await?;
        let status = if answered {
            CallStatus::Active
        } else {
            self.current_status(id).await?
        };
        if !status.is_live() {
            // Missed or ended while this answer was on its way.
            self.store.set_call_participant(id, caller, false).await?;
            return Err(call_over());
        }
        self.record_call_signal(
            record.chat_id,
            caller,
            call_signal(&record, CallState::Joined),
        )
        .await?;
        participants.push(caller);
        Ok(view(
            CallRecord {
                status: CallStatus::Active,
                ..record
            },
            participants,
        ))
    }

    /// Leaves a call the caller is in. A call nobody is left in ends, and so does a direct chat's
    /// call when either side hangs up.
    pub async fn leave_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, _) = self.load_call(caller, id).await?;
        let participants = self.present_participants(&record).await?;
        if !participants.contains(&caller) || !record.status.is_live() {
            return Err(ApiError::Conflict("you are not in this call".into()));
        }
        self.bus.check().await?;
        self.store.set_call_participant(id, caller, false).await?;
        self.record_call_signal(
            record.chat_id,
            caller,
            call_signal(&record, CallState::Left),
        )
        .await?;
        // Who is left is read after this participant is out: of participants leaving at once,
        // the last to read sees nobody, and `finish` ends the call once whoever else tries.
        let participants = self.present_participants(&record).await?;
        let direct = self
            .store
            .get_chat(record.chat_id)
            .await?
            .is_some_and(|chat| chat.kind == confab_schema::ChatKind::Direct);
        let status = if participants.is_empty() || direct {
            self.finish(&record, caller).await?
        } else {
            record.status
        };
        Ok(view(CallRecord { status, ..record }, participants))
    }

    /// Ends a call for everyone (see [`rules::may_end_call`]). Ending a call that is over answers
    /// it as it is.
    pub async fn end_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, role) = self.load_call(caller, id).await?;
        let participants = self.present_participants(&record).await?;
        if !record.status.is_live() {
            return Ok(view(record, participants));
        }
        let chat = self
            .store
            .get_chat(record.chat_id)
            .await?
            .ok_or(ApiError::NotFound("no such call"))?;
        rules::may_end_call(
            caller,
            role,
            chat.kind,
            record.started_by,
            participants.contains(&caller),
        )?;
        self.bus.check().await?;
        let status = self.finish(&record, caller).await?;
        Ok(view(CallRecord { status, ..record }, participants))
    }

    /// Relays a WebRTC signalling message from the caller to one participant of the call, or to
    /// every other one: ephemeral `call.signal` events to their connections only. Answers how many
    /// participants it went to.
    pub async fn relay_call_signal(
        &self,
        caller: UserId,
        id: Uuid,
        to: RelayTarget,
        kind: CallSignalType,
        payload: SignalPayload,
    ) -> ApiResult<usize> {
        let (record, _) = self.load_call(caller, id).await?;
        if !record.status.is_live() {
            return Err(call_over());
        }
        let participants = self.present_participants(&record).await?;
        let targets: Vec<UserId> = match to {
            RelayTarget::User(user) => {
                rules::may_relay(caller, &participants, user)?;
                vec![user]
            }
            RelayTarget::All => {
                if !participants.contains(&caller) {
                    return Err(ApiError::Forbidden("you are not in this call"));
                }
                participants
                    .iter()
                    .copied()
                    .filter(|p| *p != caller)
                    .collect()
            }
        };
        let payload = payload.into_inner();
        for target in &targets {
            let envelope = Envelope::new(
                record.chat_id,
                Event::CallSignal(CallRelay {
                    call_id: id,
                    chat_id: record.chat_id,
                    from: caller,
                    to: *target,
                    kind,
                    payload: payload.clone(),
                }),
            );
            self.bus.publish_ephemeral(&envelope).await?;
        }
        metrics::counter!("confab_call_signals_relayed_total").increment(targets.len() as u64);
        Ok(targets.len())
    }

    /// Short-lived TURN credentials for the caller in coturn's shared-secret scheme; 404 when no
    /// TURN servers are configured.
    pub fn turn_credentials(&self, caller: UserId) -> ApiResult<TurnCredentials> {
        let turn = self
            .calls
            .turn
            .as_ref()
            .ok_or(ApiError::NotFound("no TURN servers are configured"))?;
        let ttl = turn.ttl.as_secs();
        let expiry = OffsetDateTime::now_utc().unix_timestamp() + i64::try_from(ttl).unwrap_or(0);
        let username = format!("{expiry}:{caller}");
        Ok(TurnCredentials {
            password: turn_password(&turn.secret, &username),
            username,
            ttl,
            uris: turn.uris.clone(),
        })
    }

    /// Makes every call still ringing past its ring time `missed`: a `missed` signal (whose push
    /// reaches the callees as a message's does). Safe in several processes at once: the status
    /// moves once. Answers how many calls it made missed.
    pub async fn sweep_missed_calls(&self, now: OffsetDateTime) -> ApiResult<usize> {
        let due = self.store.listed_calls_due(now, None, SWEEP_BATCH).await?;
        let mut missed = 0;
        for ringing in due {
            let Some(record) = self.store.get_call(ringing.id).await? else {
                // Listed before its call was stored; the call comes, or its listing expires.
                continue;
            };
            if record.status != CallStatus::Ringing {
                self.store.forget_listed_call(&ringing).await?;
                continue;
            }
            if !self
                .store
                .transition_call(record.id, CallStatus::Ringing, CallStatus::Missed)
                .await?
            {
                continue;
            }
            self.record_call_signal(
                record.chat_id,
                record.started_by,
                call_signal(&record, CallState::Missed),
            )
            .await?;
            metrics::counter!("confab_calls_missed_total").increment(1);
            missed += 1;
        }
        Ok(missed)
    }

    /// Runs [`ApiState::sweep_missed_calls`] every `every` until `shutdown`.
    pub fn start_call_sweeper(
        &self,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if let Err(error) = state.sweep_missed_calls(OffsetDateTime::now_utc()).await {
                    tracing::warn!(%error, "sweeping ringing calls failed");
                }
            }
        })
    }

    /// Takes `user`, who left `chat` or was taken out of it, out of the chat's live calls: a
    /// `left` signal for each call they were in, and the call ends when no member of the chat is
    /// left in it, or, in a direct chat, when they were in it. Idempotent, so a retry finishes
    /// what a failed run left.
    pub(crate) async fn leave_calls_of_chat(&self, chat: ChatId, user: UserId) -> ApiResult<()> {
        let calls = self.store.live_calls(chat).await?;
        if calls.is_empty() {
            return Ok(());
        }
        let direct = self
            .store
            .get_chat(chat)
            .await?
            .is_some_and(|chat| chat.kind == confab_schema::ChatKind::Direct);
        for record in calls {
            let was_in = self
                .store
                .call_participants(record.id)
                .await?
                .contains(&user);
            if was_in {
                self.store
                    .set_call_participant(record.id, user, false)
                    .await?;
                self.record_call_signal(chat, user, call_signal(&record, CallState::Left))
                    .await?;
            }
            if (direct && was_in) || self.present_participants(&record).await?.is_empty() {
                self.finish(&record, user).await?;
            }
        }
        Ok(())
    }

    /// The participants of a call who are members of its chat. A member who leaves the chat
    /// leaves its calls ([`ApiState::leave_calls_of_chat`]); this keeps one whose leaving failed
    /// part-way, or raced a join, from being relayed to, filling the call or keeping it going.
    async fn present_participants(&self, record: &CallRecord) -> ApiResult<Vec<UserId>> {
        let participants = self.store.call_participants(record.id).await?;
        let roles = futures::future::try_join_all(
            participants
                .iter()
                .map(|user| self.store.member_role(record.chat_id, *user)),
        )
        .await?;
        Ok(participants
            .into_iter()
            .zip(roles)
            .filter_map(|(user, role)| role.map(|_| user))
            .collect())
    }

    /// Ends a live call (once, whoever races): an `ended` signal. Answers its status after.
    async fn finish(&self, record: &CallRecord, caller: UserId) -> ApiResult<CallStatus> {
        for from in [CallStatus::Active, CallStatus::Ringing] {
            if self
                .store
                .transition_call(record.id, from, CallStatus::Ended)
                .await?
            {
                self.record_call_signal(
                    record.chat_id,
                    caller,
                    call_signal(record, CallState::Ended),
                )
                .await?;
                return Ok(CallStatus::Ended);
            }
        }
        self.current_status(record.id).await
    }

    async fn current_status(&self, id: Uuid) -> ApiResult<CallStatus> {
        Ok(self
            .store
            .get_call(id)
            .await?
            .ok_or(ApiError::Store(StoreError::Corrupt("call vanished".into())))?
            .status)
    }

    /// The call and the caller's role in its chat; 404 for anyone outside the chat, so a call id
    /// tells them nothing.
    async fn load_call(&self, caller: UserId, id: Uuid) -> ApiResult<(CallRecord, MemberRole)> {
        let record = self
            .store
            .get_call(id)
            .await?
            .ok_or(ApiError::NotFound("no such call"))?;
        let role = self
            .store
            .member_role(record.chat_id, caller)
            .await?
            .ok_or(ApiError::NotFound("no such call"))?;
        Ok((record, role))
    }
}

fn call_signal(record: &CallRecord, state: CallState) -> CallSignal {
    CallSignal {
        call_id: record.id,
        state,
    }
}

fn live(status: CallStatus) -> ApiResult<()> {
    if status.is_live() {
        Ok(())
    } else {
        Err(call_over())
    }
}

fn call_over() -> ApiError {
    ApiError::Conflict("the call is over".into())
}

fn view(record: CallRecord, participants: Vec<UserId>) -> Call {
    Call {
        id: record.id,
        chat_id: record.chat_id,
        started_by: record.started_by,
        started_at: record.started_at,
        ring_until: record.ring_until,
        status: record.status,
        participants,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expected values were computed independently: RFC 2202's HMAC-SHA1 test case 2
    /// (effcdf6a…259a7c79, in base64), and
    /// `echo -n 1700000000:alice | openssl dgst -sha1 -hmac north-secret -binary | base64`
    /// (Python's `base64.b64encode(hmac.new(b"north-secret", b"1700000000:alice",
    /// hashlib.sha1).digest())` gives the same).
    #[test]
    fn turn_passwords_are_coturns_hmac_sha1() {
        assert_eq!(
            turn_password("Jefe", "what do ya want for nothing?"),
            "7/zfauXrL6LSdBbV8YTfnCWafHk="
        );
        assert_eq!(
            turn_password("north-secret", "1700000000:alice"),
            "g+jb180fcj+xlpA/2mP60OdIgU0="
        );
    }
}
