//! Matching queues: `vent` is matched with `listen`, `talk` with `talk`, oldest first, into a new
//! direct chat announced to both with `queue.matched`. A match lasts until one of the two leaves the
//! queue, joins it again, or has had no live connection (SSE or WebSocket, as the notifiers'
//! presence records show) for `queues.disconnect_grace_ms`: then both leave its chat, which is
//! removed with its messages, and `queue.unmatched` tells them. A waiting user gone for as long is
//! taken out of the queue by the sweep.

use confab_runtime::presence::now_ms;
use confab_schema::circle::{
    PairingStatus, QueueKind, QueueMatch, QueueMatchMember, QueueUnmatching,
};
use confab_schema::{Chat, Envelope, Event, UserId};

use super::circles::pairing_status;
use super::pairing::{
    ATTEMPTS, Eligibility, Leaving, contended, left_unclosed, matched_meanwhile, pair_chat,
    pairing_announcement, pairing_event,
};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{Slot, SlotState, SlotWrite};

/// The pool a queue's users wait in: `vent` and `listen` share one, so they can be matched.
pub fn queue_pool(kind: QueueKind) -> &'static str {
    match kind {
        QueueKind::Vent | QueueKind::Listen => "queue:vent-listen",
        QueueKind::Talk => "queue:talk",
    }
}

const POOLS: [&str; 2] = ["queue:vent-listen", "queue:talk"];

fn kind_of(kind: &str) -> Option<QueueKind> {
    kind.parse().ok()
}

/// The `queue.matched` of a match into `chat` of `members` (each with their queue), named as
/// [`pairing_announcement`] names it, so its maker and an end that announces it again publish
/// one event.
fn match_announcement(chat: Chat, members: [(UserId, Option<QueueKind>); 2]) -> Envelope {
    let users = members.map(|(user, _)| user);
    let mut members = members.to_vec();
    members.sort_by_key(|(user, _)| *user);
    let members = members
        .into_iter()
        .filter_map(|(user_id, kind)| {
            Some(QueueMatchMember {
                user_id,
                kind: kind?,
            })
        })
        .collect();
    pairing_announcement(
        chat.id,
        Event::QueueMatched(Box::new(QueueMatch { chat, members })),
        users,
    )
}

impl ApiState {
    /// Puts the caller in the `kind` queue and matches whoever can be matched. Joining while
    /// matched (in this pool) ends the match first. 409 when they wait in the other queue of the
    /// same pool, or when their wait or match ended before the join could answer it.
    pub async fn join_queue(&self, caller: UserId, kind: QueueKind) -> ApiResult<PairingStatus> {
        let pool = queue_pool(kind);
        if let Some(mine) = self.slot_of(pool, caller).await? {
            if mine.state == SlotState::Waiting && mine.kind != kind.as_str() {
                return Err(ApiError::Conflict(format!(
                    "you are waiting in the {} queue; leave it first",
                    mine.kind
                )));
            }
            if left_unclosed(&mine).is_some() {
                // Entering would forget the chat of a match whose end stopped half-way.
                self.end_match(pool, caller, Some(&mine)).await?;
            }
        }
        let mut entered = false;
        for _ in 0..ATTEMPTS {
            let mine = self.enter_pool(pool, caller, kind.as_str()).await?;
            if mine.state != SlotState::Paired {
                entered = true;
                break;
            }
            self.end_match(pool, caller, Some(&mine)).await?;
        }
        if !entered {
            return Err(contended());
        }
        let pairs = self
            .match_pool(pool, None, Eligibility::Counterparts)
            .await?;
        for pair in pairs {
            let members =
                [&pair.first, &pair.second].map(|slot| (slot.user_id, kind_of(&slot.kind)));
            self.publish(match_announcement(pair.chat, members)).await;
        }
        // Out of the queue now: a match made and ended before it was announced (the partner
        // left meanwhile), or a leave of the caller's own. Joining again begins a new wait.
        self.queue_status(caller, kind)
            .await
            .map_err(|error| match error {
                ApiError::NotFound(_) => {
                    ApiError::Conflict("your wait ended meanwhile; try again".into())
                }
                error => error,
            })
    }

    /// The caller's place in the `kind` queue: waiting, or matched (until the match ends); 404
    /// when they are not in it.
    pub async fn queue_status(&self, caller: UserId, kind: QueueKind) -> ApiResult<PairingStatus> {
        self.slot_of(queue_pool(kind), caller)
            .await?
            .filter(|slot| slot.kind == kind.as_str())
            .as_ref()
            .and_then(pairing_status)
            .ok_or(ApiError::NotFound("you are not in this queue"))
    }

    /// Takes the caller out of the `kind` queue, ending their match if they are matched (nothing
    /// when they are not in it). A leave ends what it read: a match made after it read the caller
    /// waiting took the wait first, and stands (409 `matched`; the partner was told of it already,
    /// and a leave again ends it).
    pub async fn leave_queue(&self, caller: UserId, kind: QueueKind) -> ApiResult<()> {
        let pool = queue_pool(kind);
        let Some(mine) = self.slot_of(pool, caller).await? else {
            return Ok(());
        };
        // A match of either queue of the pool whose end stopped half-way (this is its retry, or
        // the partner's) is finished.
        if left_unclosed(&mine).is_some() {
            self.end_match(pool, caller, Some(&mine)).await?;
        }
        if mine.kind != kind.as_str() {
            return Ok(());
        }
        if mine.state == SlotState::Paired {
            // Nothing when it ended meanwhile; its slot, idle now, goes below.
            self.end_match(pool, caller, Some(&mine)).await?;
        }
        match self.leave_pool(pool, caller, kind.as_str()).await? {
            Leaving::Left => Ok(()),
            Leaving::Paired => Err(matched_meanwhile()),
        }
    }

    /// Ends `user`'s match as `seen` (nothing when their slot changed since): both leave its
    /// chat, the chat is removed, and `queue.unmatched` tells both, after the match's
    /// `queue.matched` if that may not be in the log yet. Answers whether it ended it.
    async fn end_match(&self, pool: &str, user: UserId, seen: Option<&Slot>) -> ApiResult<bool> {
        let Some(ended) = self.end_pair(pool, user, seen, true).await? else {
            return Ok(false);
        };
        let (chat, partner) = (ended.chat, ended.partner);
        let mut events = Vec::with_capacity(2);
        if self.may_be_unannounced(ended.slot.since) {
            let kind = kind_of(&ended.slot.kind);
            let members = [(user, kind), (partner, kind.map(|kind| kind.counterpart()))];
            let chat = pair_chat(chat, [user, partner], ended.slot.since);
            events.push(match_announcement(chat, members));
        }
        events.push(
            pairing_event(
                chat,
                Event::QueueUnmatched(QueueUnmatching {
                    chat_id: chat,
                    by: user,
                }),
            )
            .leaving(vec![user, partner]),
        );
        self.publish_in_order(events).await;
        Ok(true)
    }

    /// Whether `user` has had no live connection for longer than the grace period, counting from
    /// `since` at the earliest.
    async fn gone_away(&self, user: UserId, since: i64, now: i64, grace: i64) -> ApiResult<bool> {
        let record = self.presence.get(user).await?;
        Ok(!record.online(now) && now - record.last_seen_ms.unwrap_or(since).max(since) > grace)
    }

    /// Takes out of the queues every waiting user with no live connection for the grace period,
    /// ends every match one of whose users has had none for as long, and removes the slots left
    /// idle by an ended match. Answers how many waits and matches ended. A slot that fails is
    /// logged and looked at again by the next sweep.
    pub async fn sweep_queues(&self) -> ApiResult<usize> {
        let grace = i64::try_from(self.circles.queue_grace.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let mut removed = 0;
        for pool in POOLS {
            for slot in self.store.slots(pool).await? {
                match self.sweep_slot(pool, &slot, now, grace).await {
                    Ok(true) => removed += 1,
                    Ok(false) => {}
                    Err(error) => {
                        tracing::warn!(%error, pool, user = %slot.user_id, "queue slot not swept");
                    }
                }
            }
        }
        Ok(removed)
    }

    /// One slot of the queue sweep: `true` when a wait or a match ended.
    async fn sweep_slot(&self, pool: &str, slot: &Slot, now: i64, grace: i64) -> ApiResult<bool> {
        let since = slot.since.unix_timestamp_nanos() / 1_000_000;
        let since = i64::try_from(since).unwrap_or_default();
        match slot.state {
            // A match ends when either of the two went away; the other is told.
            SlotState::Paired => {
                if !self.gone_away(slot.user_id, since, now, grace).await? {
                    return Ok(false);
                }
                self.end_match(pool, slot.user_id, Some(slot)).await
            }
            SlotState::Idle | SlotState::Waiting => {
                let gone = if slot.state == SlotState::Idle {
                    now - since > grace
                } else {
                    self.gone_away(slot.user_id, since, now, grace).await?
                };
                if !gone {
                    return Ok(false);
                }
                if left_unclosed(slot).is_some() {
                    // A match whose end stopped half-way is finished first; the slot goes with
                    // the next sweep.
                    return self.end_match(pool, slot.user_id, Some(slot)).await;
                }
                let write = SlotWrite::Delete {
                    user: slot.user_id,
                    expected: slot.version,
                };
                // A lost race means the slot changed (matched, left): it is looked at again by
                // the next sweep.
                Ok(self.store.write_slots(pool, &[write]).await?
                    && slot.state == SlotState::Waiting)
            }
        }
    }

    /// Runs the sweeps of expired circles and of the queues until `shutdown`. Every API process
    /// runs it; the removals are idempotent and the queue's are conditional.
    pub fn start_sweeps(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let state = self.clone();
        tokio::spawn(async move {
            let mut circles = tokio::time::interval(state.circles.sweep_interval);
            let mut queues = tokio::time::interval(state.circles.queue_sweep_interval);
            circles.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            queues.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = circles.tick() => {
                        if let Err(error) = state.sweep_expired_circles().await {
                            tracing::warn!(%error, "expired circles not removed yet");
                        }
                    }
                    _ = queues.tick() => {
                        if let Err(error) = state.sweep_queues().await {
                            tracing::warn!(%error, "queues not swept");
                        }
                    }
                }
            }
        })
    }
}
