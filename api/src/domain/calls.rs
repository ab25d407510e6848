//! Calls, signalling only: media goes peer to peer (or through an SFU and the TURN servers), never
//! through confab. A call belongs to a chat; its members start, join, leave and end it, each change
//! written into the chat's history as a `call` signal. Participants exchange WebRTC signalling
//! (offers, answers, ICE candidates) through the bus as ephemeral `call.signal` events, delivered to
//! the target participant's connections only and never stored. A call that rings past its time with
//! nobody answering becomes `missed`, found by [`ApiState::sweep_missed_calls`] in any API process,
//! and its callees get a push as for a message. A participant with no live event stream for the
//! disconnect grace is taken out by the next read of the call ([`ApiState::without_the_gone`]),
//! so a call whose apps were all killed ends.
//!
//! Each change of a call gets its signal once, whatever fails between the change and its signal
//! (a store or bus error, a timeout after a write was made, a process gone):
//! - A signal is written with a nonce naming its change: `call:<call id>:<state>`, and for a join
//!   or leave also the token of that join or leave. Writing it again stores nothing (send parity),
//!   so a change may be finished by whoever comes next.
//! - A change whose signal may be missing is kept until the signal is written. A call starting is
//!   listed for the sweeper at its `started_at` until its `started` is written. A call being ended
//!   is listed for the sweeper (`Store::list_call`) before its status moves, and a missed one stays
//!   in the list it rang in; the sweep writes the `started` of a call listed at its start, and the
//!   `ended` or `missed` signal of a listed call that is over, then forgets the listing. A call
//!   still ringing past its ring time and [`RING_GRACE`] is one the sweep does not know of: its
//!   reader makes it missed. A join or leave is stored as pending, with its token,
//!   before the participant moves (`Store::set_pending_call_signal`); a retry of it (or the
//!   participant's next join or leave) writes the signal, then removes it. A participant is in a
//!   call under one join, whose token their row keeps (`Store::put_call_participant`, a
//!   compare-and-set): joins of one user at once write the `joined` of the one that put them in.
//! - The signals of the whole call (`started`, `ended`, `missed`) are the starter's, whoever made
//!   the change: the nonce is per author, and the sweep knows no other.
//!
//! A signal written again after its nonce expired (`store.nonce_ttl_secs`, an hour by default)
//! would be a second one; nothing is kept that long unless the sweep or the retry cannot run.

use std::time::Duration;

use confab_runtime::presence::{PresenceRecord, now_ms};

use base64::Engine;
use confab_schema::call::{
    Call, CallRelay, CallSignal, CallSignalType, CallState, CallStatus, TurnCredentials,
};
use confab_schema::limits::MAX_CALL_PARTICIPANTS;
use confab_schema::{ChatId, Envelope, Event, MemberRole, User, UserId};
use hmac::{Hmac, Mac};
use time::OffsetDateTime;
use uuid::Uuid;

use super::inputs::{CALL_NONCE_PREFIX, RelayTarget, SignalPayload};
use super::{Outcome, rules};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{CallRecord, ListedCall, PendingCallSignal, StoreError};

/// How long a call rings when no setting says otherwise.
pub const DEFAULT_RING_TIMEOUT: Duration = Duration::from_secs(45);

/// How long a participant may have no live event stream when no setting says otherwise.
pub const DEFAULT_DISCONNECT_GRACE: Duration = Duration::from_secs(120);

/// How many times a start looks for its chat's live call before it gives up: each look after the
/// first follows a live call found to have rung out.
const START_ATTEMPTS: usize = 3;

/// How many listed calls a sweep reads at once (it pages through every one due).
const SWEEP_BATCH: usize = 100;

/// How long after it was due the sweep keeps a listing whose call is not stored: its start failed
/// between listing and storing it (the CQL store lists first), and the call will not come.
const UNSTORED_AFTER: Duration = Duration::from_secs(600);

/// How long past its `ring_until` a call still ringing is taken for ringing. The sweep moves a
/// listed call to missed within a second or so; past this, a call still ringing is one the sweep
/// does not know of (its row landed after its listing was forgotten, a write applied late), and
/// whoever reads it makes it missed ([`ApiState::rung_out`]).
pub const RING_GRACE: Duration = Duration::from_secs(10);

/// How long after it was due the sweep keeps a listing whose call is still live (an end that
/// stopped before the status moved, or an answer that failed to take its call out of the list):
/// as long as the CQL store keeps a row of its list.
const LIVE_LISTING_KEPT: Duration = Duration::from_secs(86_400);

/// How calls behave: the ring timeout, how long a participant may be away, and the TURN servers.
#[derive(Clone, Debug)]
pub struct CallSettings {
    pub ring_timeout: Duration,
    /// How long a participant of an answered call may have no live event stream before the call
    /// counts them gone ([`ApiState::without_the_gone`]).
    pub disconnect_grace: Duration,
    /// `None`: no TURN servers configured (`GET /v1/calls/turn-credentials` answers 404).
    pub turn: Option<TurnSettings>,
}

impl Default for CallSettings {
    fn default() -> Self {
        CallSettings {
            ring_timeout: DEFAULT_RING_TIMEOUT,
            disconnect_grace: DEFAULT_DISCONNECT_GRACE,
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
    /// and a `started` signal goes into the history. A chat has one live call at most: in a chat
    /// that has one (two members starting at once included), the caller joins it instead, as
    /// [`ApiState::join_call`] does.
    pub async fn start_call(&self, caller: &User, chat: ChatId) -> ApiResult<Outcome<Call>> {
        self.require_member(chat, caller.id).await?;
        // Refuse before storing when the `started` signal could not be published.
        self.bus.check().await?;
        // A live call found may have rung out unseen ([`RING_GRACE`]): made missed, it is one no
        // longer, and the start looks again.
        for _ in 0..START_ATTEMPTS {
            let started_at = confab_schema::model::to_millis(OffsetDateTime::now_utc());
            let record = CallRecord {
                id: Uuid::now_v7(),
                chat_id: chat,
                started_by: caller.id,
                started_at,
                ring_until: started_at + self.calls.ring_timeout,
                status: CallStatus::Ringing,
            };
            // Listed at its start until its `started` signal is written, so a start that fails
            // after storing its call is announced by the sweep (see `sweep_listed`).
            let start = ListedCall {
                id: record.id,
                chat_id: chat,
                due: started_at,
            };
            self.store.list_call(&start).await?;
            let Some(live) = self.store.create_call(&record).await? else {
                self.announce_start(&record, &start).await;
                return Ok(Outcome::Created(view(record, vec![caller.id])));
            };
            // This start's call is not stored: its listing has nothing to do (and the sweep
            // forgets the listing of a call never stored in any case).
            if let Err(error) = self.store.forget_listed_call(&start).await {
                tracing::debug!(%error, call = %record.id, "an unstored call's listing is left to the sweep");
            }
            let live = self.rung_out(live).await;
            let live = self.without_the_gone(live, caller.id).await;
            if live.status.is_live() {
                return Ok(Outcome::Existing(self.join_call(caller.id, live.id).await?));
            }
        }
        Err(ApiError::Conflict(
            "the chat's call keeps changing; try again".into(),
        ))
    }

    /// Writes the `started` signal of a call just stored, then forgets the start's listing. The
    /// call exists and rings from before this: an error here would leave the client without the
    /// call it started. What fails is the sweep's to finish: it writes the `started` of a call
    /// listed at its start, then forgets the listing.
    async fn announce_start(&self, record: &CallRecord, start: &ListedCall) {
        match self.record_call_change(record, CallState::Started).await {
            Ok(()) => {
                if let Err(error) = self.store.forget_listed_call(start).await {
                    tracing::debug!(%error, call = %record.id, "a start's listing is left to the sweep");
                }
            }
            Err(error) => {
                tracing::warn!(%error, call = %record.id, "a call's `started` signal is left to the sweep");
            }
        }
    }

    /// A call of a chat the caller is in.
    pub async fn get_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, _) = self.load_call(caller, id).await?;
        let record = self.without_the_gone(record, caller).await;
        let participants = self.present_participants(&record).await?;
        Ok(view(record, participants))
    }

    /// Joins a ringing or active call (members of its chat only); answering a ringing call makes it
    /// active. Joining again changes nothing, but writes the `joined` signal of a join that failed
    /// before it was written; joins of one user at once are one join, with one `joined`.
    pub async fn join_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, _) = self.load_call(caller, id).await?;
        let record = self.without_the_gone(record, caller).await;
        let mut participants = self.present_participants(&record).await?;
        let in_call = participants.contains(&caller);
        let mut pending = self.store.pending_call_signal(id, caller).await?;
        if !in_call && let Some(leave) = pending.filter(|p| p.state == CallState::Left) {
            // The caller's last leave stopped before its signal: that comes first.
            self.record_participant_change(&record, caller, leave)
                .await?;
            self.store
                .forget_pending_call_signal(id, caller, &leave)
                .await?;
            pending = None;
        }
        let unannounced = pending.filter(|p| p.state == CallState::Joined);
        if in_call && record.status.is_live() && unannounced.is_none() {
            return Ok(view(record, participants));
        }
        live(record.status)?;
        if !in_call && participants.len() >= MAX_CALL_PARTICIPANTS {
            return Err(ApiError::Conflict("the call is full".into()));
        }
        self.bus.check().await?;
        // A join whose signal may be missing goes on under its own token, so its signal is one.
        let token = unannounced.map_or_else(Uuid::now_v7, |join| join.token);
        let under = if in_call {
            self.store.call_participant_join(id, caller).await?
        } else {
            self.store
                .set_pending_call_signal(
                    id,
                    caller,
                    &PendingCallSignal {
                        state: CallState::Joined,
                        token,
                    },
                )
                .await?;
            self.store.put_call_participant(id, caller, token).await?
        };
        // The join is the one the participant is in under: of joins of theirs racing (two devices
        // answering at once), one put them in, and every one writes its signal, the same one.
        let join = PendingCallSignal {
            state: CallState::Joined,
            token: under.unwrap_or(token),
        };
        if !in_call && join.token != token {
            // The pending join is theirs too, not this one's (which may have replaced it).
            self.store
                .set_pending_call_signal(id, caller, &join)
                .await?;
        }
        // The pending record this join is finished with: the one it stored, or, for a member in
        // the call already, the one it found.
        let pending_join = unannounced.filter(|_| in_call).unwrap_or(join);
        if !in_call
            && join.token == token
            && self.present_participants(&record).await?.len() > MAX_CALL_PARTICIPANTS
        {
            // Joins at once each read a seat free before any was in. Each reads again after its
            // own write, and one that finds the call over its cap takes itself back out: the
            // last of those that stay to write read after every other's write, so the call
            // never holds more than the cap (and joins at once may all be refused).
            self.store.remove_call_participant(id, caller).await?;
            self.store
                .forget_pending_call_signal(id, caller, &pending_join)
                .await?;
            return Err(ApiError::Conflict("the call is full".into()));
        }
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
            self.store.remove_call_participant(id, caller).await?;
            self.store
                .forget_pending_call_signal(id, caller, &pending_join)
                .await?;
            return Err(call_over());
        }
        self.record_participant_change(&record, caller, join)
            .await?;
        // Only this join's record: a leave of theirs stored since is still to be finished.
        self.store
            .forget_pending_call_signal(id, caller, &pending_join)
            .await?;
        if !in_call {
            participants.push(caller);
        }
        Ok(view(
            CallRecord {
                status: CallStatus::Active,
                ..record
            },
            participants,
        ))
    }

    /// Leaves a call the caller is in. A call nobody is left in ends, and so does a direct chat's
    /// call when either side hangs up. Leaving again after a leave that failed part-way finishes
    /// it.
    pub async fn leave_call(&self, caller: UserId, id: Uuid) -> ApiResult<Call> {
        let (record, _) = self.load_call(caller, id).await?;
        let participants = self.present_participants(&record).await?;
        let in_call = participants.contains(&caller) && record.status.is_live();
        let pending = self.store.pending_call_signal(id, caller).await?;
        let unfinished = pending.is_some_and(|p| p.state == CallState::Left);
        if !in_call && !unfinished {
            return Err(ApiError::Conflict("you are not in this call".into()));
        }
        self.bus.check().await?;
        let direct = self.is_direct(record.chat_id).await?;
        let (participants, status) = self
            .take_out(&record, caller, in_call, pending, direct)
            .await?;
        Ok(view(CallRecord { status, ..record }, participants))
    }

    /// Ends a call for everyone (see [`rules::may_end_call`]). Ending a call that is over answers
    /// it as it is (the sweep writes an `ended` signal its end failed to write).
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
        rules::may_end_call(caller, role, chat.kind, record.started_by)?;
        self.bus.check().await?;
        let status = self.finish(&record).await?;
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
    /// moves once. Also writes the `started` of every call listed at its start, the `missed` or
    /// `ended` signal of every listed call that is over (see the module's documentation), and
    /// forgets the listings of calls never stored. Pages
    /// through every listing due, so no number of listings it leaves holds up the others. Answers
    /// how many calls it made missed; a call it failed to sweep is swept again next time, and the
    /// first such failure is the answer once the others are swept.
    pub async fn sweep_missed_calls(&self, now: OffsetDateTime) -> ApiResult<usize> {
        let mut missed = 0;
        let mut failure = None;
        let mut after = None;
        loop {
            let due = self
                .store
                .listed_calls_due(now, after.as_ref(), SWEEP_BATCH)
                .await?;
            for listing in &due {
                match self.sweep_listed(listing, now).await {
                    Ok(made_missed) => missed += usize::from(made_missed),
                    Err(error) => {
                        tracing::debug!(%error, call = %listing.id, "a listed call was not swept");
                        failure.get_or_insert(error);
                    }
                }
            }
            match due.last() {
                Some(last) if due.len() == SWEEP_BATCH => after = Some(*last),
                _ => break,
            }
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(missed),
        }
    }

    /// Sweeps one listing: a call ringing past its ring time becomes missed, and a call that is
    /// over gets its signal before its listing is forgotten. Answers whether it made the call
    /// missed.
    async fn sweep_listed(&self, listing: &ListedCall, now: OffsetDateTime) -> ApiResult<bool> {
        let Some(record) = self.store.get_call(listing.id).await? else {
            // Listed by a start that failed before it stored its call (or whose write is still on
            // its way): forgotten once the call can no longer come.
            if listing.due + UNSTORED_AFTER <= now {
                self.store.forget_listed_call(listing).await?;
            }
            return Ok(false);
        };
        if self.store.get_chat(record.chat_id).await?.is_none() {
            // Its chat was removed with the call still in it (a start that passed its
            // membership check just before the removal): the call ends with its chat, and
            // nothing more is written into a chat that is gone.
            self.end_without_chat(&record, listing).await?;
            return Ok(false);
        }
        // A start's listing, due at its `started_at`: its `started` signal may be missing, and
        // comes before anything else of the call the sweep writes.
        let start = listing.due == record.started_at;
        if start {
            self.record_call_change(&record, CallState::Started).await?;
        }
        let mut made_missed = false;
        let mut status = record.status;
        if status == CallStatus::Ringing && record.ring_until <= now {
            made_missed = self
                .store
                .transition_call(record.id, CallStatus::Ringing, CallStatus::Missed)
                .await?;
            status = if made_missed {
                CallStatus::Missed
            } else {
                self.current_status(record.id).await?
            };
        }
        match status {
            CallStatus::Missed => self.settle(&record, CallState::Missed, listing).await?,
            CallStatus::Ended => self.settle(&record, CallState::Ended, listing).await?,
            // Still ringing, or an end under way (or one that stopped before the status moved),
            // or an answer that failed to take the call out of the list: looked at again next
            // time.
            CallStatus::Ringing | CallStatus::Active => {
                if (start && listing.due != record.ring_until)
                    || listing.due + LIVE_LISTING_KEPT <= now
                {
                    self.store.forget_listed_call(listing).await?;
                }
            }
        }
        if made_missed {
            metrics::counter!("confab_calls_missed_total").increment(1);
        }
        Ok(made_missed)
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
        let direct = self.is_direct(chat).await?;
        for record in calls {
            let record = self.rung_out(record).await;
            if !record.status.is_live() {
                continue;
            }
            let was_in = self
                .store
                .call_participants(record.id)
                .await?
                .contains(&user);
            let pending = self.store.pending_call_signal(record.id, user).await?;
            if was_in || pending.is_some_and(|p| p.state == CallState::Left) {
                self.take_out(&record, user, was_in, pending, direct)
                    .await?;
            } else if self.present_participants(&record).await?.is_empty() {
                self.finish(&record).await?;
            }
        }
        Ok(())
    }

    /// Takes `user` out of a call (`in_call`: they are in it still) and writes their `left`
    /// signal; then ends the call if nobody is left in it, or, in a direct chat, in any case. The
    /// leave is pending (with its token) from before the participant is taken out until all that
    /// is done, so a retry finds it and finishes it under the same token. A join of theirs whose
    /// signal may be missing (`pending`) is written first. A leave goes under the token of the
    /// join it ends (the call's id for the starter, in under the start, which records no join),
    /// so that leaves of one join at once (two devices hanging up, a reader taking out a
    /// participant gone away) write one `left`. Answers the participants left and the call's
    /// status.
    async fn take_out(
        &self,
        record: &CallRecord,
        user: UserId,
        in_call: bool,
        pending: Option<PendingCallSignal>,
        direct: bool,
    ) -> ApiResult<(Vec<UserId>, CallStatus)> {
        let leave = match pending {
            Some(leave) if leave.state == CallState::Left => leave,
            unannounced => {
                let under = self.store.call_participant_join(record.id, user).await?;
                if let Some(join) = unannounced
                    && in_call
                    && record.status.is_live()
                {
                    // Under the join they are in under (a racing join of theirs may have put them
                    // in, and this pending one be its loser's).
                    let token = under.unwrap_or(join.token);
                    self.record_participant_change(
                        record,
                        user,
                        PendingCallSignal { token, ..join },
                    )
                    .await?;
                }
                match under {
                    Some(join) => PendingCallSignal {
                        state: CallState::Left,
                        token: join,
                    },
                    // In under no join: the starter, or taken out since by a leave of theirs
                    // still under way, whose token is pending.
                    None => match self.store.pending_call_signal(record.id, user).await? {
                        Some(leave) if leave.state == CallState::Left => leave,
                        _ => PendingCallSignal {
                            state: CallState::Left,
                            token: record.id,
                        },
                    },
                }
            }
        };
        if in_call {
            self.store
                .set_pending_call_signal(record.id, user, &leave)
                .await?;
            self.store.remove_call_participant(record.id, user).await?;
        }
        self.record_participant_change(record, user, leave).await?;
        // Who is left is read after this participant is out: of participants leaving at once,
        // the last to read sees nobody, and `finish` ends the call once whoever else tries.
        let participants = self.present_participants(record).await?;
        let status = if record.status.is_live() && (participants.is_empty() || direct) {
            self.finish(record).await?
        } else {
            record.status
        };
        // Only this leave's record: a join of theirs stored since (they came back while this
        // leave was finishing) keeps its own, which its retry needs to write its `joined`.
        self.store
            .forget_pending_call_signal(record.id, user, &leave)
            .await?;
        Ok((participants, status))
    }

    /// `record`, ended if it was answered and everyone still in it is out of the chat: a member
    /// taken out of the chat is taken out of its calls as best it can be (`leave_calls_of_chat`),
    /// and when that failed for the last one in, no leave ended the call. Without this, the call would stay
    /// answered for good, and the chat's next start would join it without ringing anyone. As with
    /// [`ApiState::rung_out`], the repair never fails the read.
    async fn ended_if_nobody_is_in(&self, record: CallRecord) -> CallRecord {
        if record.status != CallStatus::Active {
            return record;
        }
        let ended = async {
            // Nobody stored in it: a leave is under way (it takes its participant out, then
            // reads who is left), and it decides; a join now must find the call going. Only
            // participants stored and all out of the chat are left with no leave to end it.
            let stored = self.store.call_participants(record.id).await?;
            if stored.is_empty()
                || !self
                    .store
                    .members_among(record.chat_id, &stored)
                    .await?
                    .is_empty()
            {
                return Ok(record.status);
            }
            self.finish(&record).await
        };
        match ended.await {
            Ok(status) => CallRecord { status, ..record },
            Err(error) => {
                tracing::debug!(%error, call = %record.id, "an answered call nobody is in was not ended");
                record
            }
        }
    }

    /// `record`, with the participants who went away taken out: those but `here` (the caller,
    /// present by their request) who have had no live event stream for the disconnect grace,
    /// counting from the call's start at the earliest, as the notifiers' presence records show.
    /// Each is taken out as a leave would take them (a `left` signal; a call nobody is left in,
    /// or a direct chat's, ends), under the token of the join the leave ends, so that readers
    /// taking one participant out at once write one `left`. Only an answered call older than the
    /// grace is looked at, so a call's first minutes cost no presence reads; and, as with
    /// [`ApiState::rung_out`], the repair never fails the read, which then shows the call as read.
    async fn without_the_gone(&self, record: CallRecord, here: UserId) -> CallRecord {
        let record = self.ended_if_nobody_is_in(record).await;
        let grace = self.calls.disconnect_grace;
        if record.status != CallStatus::Active
            || OffsetDateTime::now_utc() < record.started_at + grace
        {
            return record;
        }
        match self.take_out_the_gone(&record, here, grace).await {
            Ok(status) => CallRecord { status, ..record },
            Err(error) => {
                tracing::debug!(%error, call = %record.id, "participants gone away were not taken out");
                record
            }
        }
    }

    /// Takes the participants but `here` who went away out of `record`; answers its status after.
    async fn take_out_the_gone(
        &self,
        record: &CallRecord,
        here: UserId,
        grace: Duration,
    ) -> ApiResult<CallStatus> {
        let now = now_ms();
        let started = crate::store::millis(record.started_at);
        let grace = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        // Away for the grace since `since` at the earliest.
        let away = |presence: &PresenceRecord, since: i64| {
            !presence.online(now)
                && now.saturating_sub(presence.last_seen_ms.unwrap_or(since).max(since)) > grace
        };
        let others: Vec<UserId> = self
            .present_participants(record)
            .await?
            .into_iter()
            .filter(|user| *user != here)
            .collect();
        let presence =
            futures::future::try_join_all(others.iter().map(|user| self.presence.get(*user)))
                .await?;
        let mut direct = None;
        let mut status = record.status;
        for (user, presence) in others.into_iter().zip(presence) {
            if !away(&presence, started) {
                continue;
            }
            // Counted from their join too (its token is a time-ordered id), so one who joined a
            // call long under way has the grace to open their stream.
            let join = self.store.call_participant_join(record.id, user).await?;
            if join
                .and_then(millis_of_uuid)
                .is_some_and(|joined| !away(&presence, joined))
            {
                continue;
            }
            if join.is_none()
                && !self
                    .store
                    .call_participants(record.id)
                    .await?
                    .contains(&user)
            {
                // Taken out meanwhile.
                continue;
            }
            let direct = match direct {
                Some(direct) => direct,
                None => *direct.insert(self.is_direct(record.chat_id).await?),
            };
            let pending = self.store.pending_call_signal(record.id, user).await?;
            status = self.take_out(record, user, true, pending, direct).await?.1;
            if !status.is_live() {
                break;
            }
        }
        Ok(status)
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

    /// Ends a live call (once, whoever races), and writes its `ended` signal. The call is listed
    /// for the sweeper before its status moves and until the signal is written, so an end that
    /// fails after the status moved (or whose change timed out after it was made) is finished by
    /// the sweep. Answers the status after.
    async fn finish(&self, record: &CallRecord) -> ApiResult<CallStatus> {
        let listing = ListedCall {
            id: record.id,
            chat_id: record.chat_id,
            due: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
        };
        self.store.list_call(&listing).await?;
        if let Some(from) = self.move_to_ended(record).await? {
            self.settle(record, CallState::Ended, &listing).await?;
            if from == CallStatus::Ringing {
                // Its listing as a ringing call has nothing left to do either.
                self.store
                    .forget_listed_call(&ListedCall {
                        due: record.ring_until,
                        ..listing
                    })
                    .await?;
            }
            return Ok(CallStatus::Ended);
        }
        // Another change moved the status first; its own listing stays until its signal is
        // written.
        self.store.forget_listed_call(&listing).await?;
        self.current_status(record.id).await
    }

    /// Moves a live call's status to ended; answers the status it moved it from, or `None` when
    /// another change ended it first. Tried from the status last read, and a miss reads it again:
    /// the status only moves forward (ringing, active, over), so an answer that moves a ringing
    /// call between two tries does not make the end a no-op, and three tries are enough.
    async fn move_to_ended(&self, record: &CallRecord) -> ApiResult<Option<CallStatus>> {
        let mut from = if record.status.is_live() {
            record.status
        } else {
            CallStatus::Active
        };
        for _ in 0..3 {
            if !from.is_live() {
                break;
            }
            if self
                .store
                .transition_call(record.id, from, CallStatus::Ended)
                .await?
            {
                return Ok(Some(from));
            }
            from = self.current_status(record.id).await?;
        }
        Ok(None)
    }

    /// Ends the live calls of `chat`, about to be removed, each with its `ended` signal, so that
    /// clients ringing or in one hear that it is over. Idempotent.
    pub(crate) async fn end_calls_of_chat(&self, chat: ChatId) -> ApiResult<()> {
        for record in self.store.live_calls(chat).await? {
            self.finish(&record).await?;
        }
        Ok(())
    }

    /// Ends a call whose chat is gone without a signal, and forgets `listing` and the call's
    /// listing as a ringing call.
    async fn end_without_chat(&self, record: &CallRecord, listing: &ListedCall) -> ApiResult<()> {
        self.move_to_ended(record).await?;
        for due in [listing.due, record.ring_until] {
            self.store
                .forget_listed_call(&ListedCall { due, ..*listing })
                .await?;
        }
        Ok(())
    }

    /// Writes the `ended` or `missed` signal of a call that is over, then forgets `listing`.
    async fn settle(
        &self,
        record: &CallRecord,
        state: CallState,
        listing: &ListedCall,
    ) -> ApiResult<()> {
        self.record_call_change(record, state).await?;
        self.store.forget_listed_call(listing).await?;
        Ok(())
    }

    /// Writes the signal of a change of the whole call (`started`, `ended`, `missed`), as the
    /// starter's whoever made it, so that each of its writers writes the same signal.
    async fn record_call_change(&self, record: &CallRecord, state: CallState) -> ApiResult<()> {
        self.record_call_signal(
            record.chat_id,
            record.started_by,
            call_signal(record, state),
            format!("{CALL_NONCE_PREFIX}{}:{state}", record.id),
        )
        .await?;
        Ok(())
    }

    /// Writes the `joined` or `left` signal of a participant's join or leave.
    async fn record_participant_change(
        &self,
        record: &CallRecord,
        user: UserId,
        change: PendingCallSignal,
    ) -> ApiResult<()> {
        self.record_call_signal(
            record.chat_id,
            user,
            call_signal(record, change.state),
            format!(
                "{CALL_NONCE_PREFIX}{}:{}:{}",
                record.id, change.state, change.token
            ),
        )
        .await?;
        Ok(())
    }

    async fn is_direct(&self, chat: ChatId) -> ApiResult<bool> {
        Ok(self
            .store
            .get_chat(chat)
            .await?
            .is_some_and(|chat| chat.kind == confab_schema::ChatKind::Direct))
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
        Ok((self.rung_out(record).await, role))
    }

    /// `record`, made missed when it is still ringing past its ring time and [`RING_GRACE`]: a
    /// call the sweep does not know of (its row landed after the sweep forgot its listing), which
    /// would otherwise ring forever. It is listed for the sweeper and swept there and then, so its
    /// `missed` signal is written (by the sweep, if this fails part-way). The repair never fails
    /// the read: the call is shown missed even when it fails.
    async fn rung_out(&self, record: CallRecord) -> CallRecord {
        let now = OffsetDateTime::now_utc();
        if record.status != CallStatus::Ringing || now < record.ring_until + RING_GRACE {
            return record;
        }
        let listing = ListedCall {
            id: record.id,
            chat_id: record.chat_id,
            due: confab_schema::model::to_millis(now),
        };
        let swept = async {
            self.store.list_call(&listing).await?;
            self.sweep_listed(&listing, now).await?;
            self.current_status(record.id).await
        };
        let status = match swept.await {
            Ok(status) => status,
            Err(error) => {
                tracing::debug!(%error, call = %record.id, "a call rung out was not made missed");
                CallStatus::Missed
            }
        };
        CallRecord { status, ..record }
    }
}

/// When a time-ordered id (UUIDv7) was made, in Unix milliseconds.
fn millis_of_uuid(id: Uuid) -> Option<i64> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    i64::try_from(secs)
        .ok()?
        .checked_mul(1_000)?
        .checked_add(i64::from(nanos / 1_000_000))
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
