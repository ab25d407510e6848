//! Matching queues: `vent` is matched with `listen`, `talk` with `talk`, oldest first, into a new
//! direct chat announced to both with `queue.matched`. A waiting user whose last live connection
//! (SSE or WebSocket, as the notifiers' presence records show) closed more than
//! `queues.disconnect_grace_ms` ago is taken out of the queue by the sweep.

use confab_runtime::presence::now_ms;
use confab_schema::circle::{PairingStatus, QueueKind, QueueMatch, QueueMatchMember};
use confab_schema::{Envelope, Event, UserId};

use super::circles::pairing_status;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{SlotState, SlotWrite};

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

impl ApiState {
    /// Puts the caller in the `kind` queue (again, after a match) and matches whoever can be
    /// matched. 409 when they wait in the other queue of the same pool.
    pub async fn join_queue(&self, caller: UserId, kind: QueueKind) -> ApiResult<PairingStatus> {
        let pool = queue_pool(kind);
        if let Some(mine) = self.slot_of(pool, caller).await?
            && mine.state == SlotState::Waiting
            && mine.kind != kind.as_str()
        {
            return Err(ApiError::Conflict(format!(
                "you are waiting in the {} queue; leave it first",
                mine.kind
            )));
        }
        self.enter_pool(pool, caller, kind.as_str(), true).await?;
        let pairs = self
            .match_pool(pool, None, |a, b| {
                kind_of(&a.kind).map(|k| k.counterpart()) == kind_of(&b.kind)
            })
            .await?;
        for pair in pairs {
            let members = [&pair.first, &pair.second]
                .iter()
                .filter_map(|slot| {
                    Some(QueueMatchMember {
                        user_id: slot.user_id,
                        kind: kind_of(&slot.kind)?,
                    })
                })
                .collect();
            let users = vec![pair.first.user_id, pair.second.user_id];
            self.publish(
                Envelope::new(
                    pair.chat.id,
                    Event::QueueMatched(Box::new(QueueMatch {
                        chat: pair.chat.clone(),
                        members,
                    })),
                )
                .joining(users),
            )
            .await;
        }
        self.queue_status(caller, kind).await
    }

    /// The caller's place in the `kind` queue: waiting, or matched (for a while after the match);
    /// 404 when they are not in it.
    pub async fn queue_status(&self, caller: UserId, kind: QueueKind) -> ApiResult<PairingStatus> {
        self.slot_of(queue_pool(kind), caller)
            .await?
            .filter(|slot| slot.kind == kind.as_str())
            .as_ref()
            .and_then(pairing_status)
            .ok_or(ApiError::NotFound("you are not in this queue"))
    }

    /// Takes the caller out of the `kind` queue (nothing when they are not in it).
    pub async fn leave_queue(&self, caller: UserId, kind: QueueKind) -> ApiResult<()> {
        let pool = queue_pool(kind);
        match self.slot_of(pool, caller).await? {
            Some(slot) if slot.kind == kind.as_str() => {
                self.leave_pool(pool, caller).await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Takes out of the queues every waiting user with no live connection for the grace period,
    /// and every match older than it. Answers how many slots went.
    pub async fn sweep_queues(&self) -> ApiResult<usize> {
        let grace = i64::try_from(self.circles.queue_grace.as_millis()).unwrap_or(i64::MAX);
        let now = now_ms();
        let mut removed = 0;
        for pool in POOLS {
            for slot in self.store.slots(pool).await? {
                let since = slot.since.unix_timestamp_nanos() / 1_000_000;
                let since = i64::try_from(since).unwrap_or_default();
                let gone = match slot.state {
                    SlotState::Paired | SlotState::Idle => now - since > grace,
                    SlotState::Waiting => {
                        let record = self.presence.get(slot.user_id).await?;
                        !record.online(now)
                            && now - record.last_seen_ms.unwrap_or(since).max(since) > grace
                    }
                };
                if gone {
                    let write = SlotWrite::Delete {
                        user: slot.user_id,
                        expected: slot.version,
                    };
                    // A lost race means the slot changed (matched, left): it is looked at again
                    // by the next sweep.
                    if self.store.write_slots(pool, &[write]).await? {
                        removed += 1;
                    }
                }
            }
        }
        Ok(removed)
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
