//! Presence as the API serves it: a user's state (from the notifiers' heartbeats) and custom
//! status, visible to the users who share a chat with them.

use std::time::{Duration, Instant};

use confab_runtime::presence::{CustomStatus, now_ms};
use confab_schema::event::UserPresence;
use confab_schema::{Envelope, Event, UserId};
use time::OffsetDateTime;

use super::inputs::StatusText;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// A user's status changes are announced at most this often (the record itself always changes).
const STATUS_EVENT_INTERVAL: Duration = Duration::from_secs(2);
/// A status change is announced in at most this many of the user's chats.
const MAX_STATUS_FANOUT: usize = 1_000;

/// A custom status to set, checked: no text and not away clears it.
#[derive(Clone, Debug)]
pub struct StatusChange {
    pub text: Option<StatusText>,
    pub away: bool,
    pub expires_at: Option<OffsetDateTime>,
}

impl StatusChange {
    pub fn parse(
        text: Option<String>,
        away: Option<bool>,
        expires_at: Option<OffsetDateTime>,
    ) -> ApiResult<StatusChange> {
        if expires_at.is_some_and(|at| at <= OffsetDateTime::now_utc()) {
            return Err(ApiError::Unprocessable("expires_at is in the past".into()));
        }
        Ok(StatusChange {
            text: text.map(StatusText::parse).transpose()?,
            away: away.unwrap_or(false),
            expires_at,
        })
    }
}

impl ApiState {
    /// Sets (or clears) the caller's custom status, and tells the members of their chats.
    pub async fn set_status(
        &self,
        caller: UserId,
        change: StatusChange,
    ) -> ApiResult<UserPresence> {
        let status = (change.text.is_some() || change.away).then(|| CustomStatus {
            text: change.text.map(StatusText::into_inner),
            away: change.away,
            expires_at_ms: change
                .expires_at
                .map(|at| i64::try_from(at.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)),
        });
        let (_, after) = self
            .presence
            .update(
                caller,
                Box::new(move |record| record.status = status.clone()),
            )
            .await?;
        let view = after.view(caller, now_ms());
        match self.status_announcement(caller) {
            StatusAnnouncement::Now => self.announce_status(caller, view.clone()).await?,
            StatusAnnouncement::After(wait) => {
                // One more, once the interval is over, of the status as it is then: without it,
                // a status cleared right after it was set would stay shown to everyone.
                let state = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    if let Ok(mut last) = state.status_events.lock() {
                        last.insert(caller, (Instant::now(), false));
                    }
                    let announced = match state.presence.get(caller).await {
                        Ok(record) => {
                            state
                                .announce_status(caller, record.view(caller, now_ms()))
                                .await
                        }
                        Err(error) => Err(error.into()),
                    };
                    if let Err(error) = announced {
                        tracing::debug!(%error, "a status change not announced");
                    }
                });
            }
            StatusAnnouncement::Coming => {}
        }
        Ok(view)
    }

    /// Tells the members of `caller`'s chats (the first [`MAX_STATUS_FANOUT`]) their presence.
    async fn announce_status(&self, caller: UserId, view: UserPresence) -> ApiResult<()> {
        let chats = self.store.chats_of(caller).await?;
        for chat in chats.into_iter().take(MAX_STATUS_FANOUT) {
            self.bus
                .publish_ephemeral(&Envelope::new(chat, Event::PresenceUpdated(view.clone())))
                .await?;
        }
        Ok(())
    }

    /// A user's presence, for themselves and for users who share a chat with them; anyone else is
    /// told there is no such user.
    pub async fn presence_of(&self, caller: UserId, user: UserId) -> ApiResult<UserPresence> {
        self.require_shared_chat(caller, user).await?;
        Ok(self.presence.get(user).await?.view(user, now_ms()))
    }

    /// When `caller`'s status change is announced: at once, at most once per
    /// [`STATUS_EVENT_INTERVAL`]; else once that interval is over (one announcement for all the
    /// changes within it), or by the one already coming.
    fn status_announcement(&self, caller: UserId) -> StatusAnnouncement {
        let now = Instant::now();
        let Ok(mut last) = self.status_events.lock() else {
            return StatusAnnouncement::Coming;
        };
        let answer = match last.get(&caller).copied() {
            // Coming, unless its task never came (a runtime stopping, say): then at once.
            Some((at, true)) if now.duration_since(at) < STATUS_EVENT_INTERVAL * 2 => {
                return StatusAnnouncement::Coming;
            }
            Some((at, false)) if now.duration_since(at) < STATUS_EVENT_INTERVAL => {
                let wait = STATUS_EVENT_INTERVAL - now.duration_since(at);
                last.insert(caller, (at, true));
                StatusAnnouncement::After(wait)
            }
            _ => {
                last.insert(caller, (now, false));
                StatusAnnouncement::Now
            }
        };
        if last.len() > 100_000 {
            last.retain(|_, (at, _)| now.duration_since(*at) < STATUS_EVENT_INTERVAL * 2);
        }
        answer
    }
}

/// When a status change is announced (see [`ApiState::status_announcement`]).
enum StatusAnnouncement {
    Now,
    After(Duration),
    Coming,
}
