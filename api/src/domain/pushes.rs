//! Scheduling and cancelling delayed pushes, by what each recipient chose: a muted chat gets none,
//! the delay is the chat's, else the user's, else the server's, and the text is previewed only for
//! those who allow it.

use std::collections::HashMap;
use std::sync::Arc;

use confab_runtime::push_queue::{Cancelled, PushMessage};
use confab_schema::call::CallState;
use confab_schema::settings::{ChatSettings, UserSettings};
use confab_schema::{ChatId, Signal, SignalId, SignalKind, UserId};
use futures::StreamExt;
use time::OffsetDateTime;

use crate::state::ApiState;

/// Chats with more members than this are fanned out in the background, one pass in flight per
/// chat, the messages sent meanwhile announced by the next pass (see `schedule_pushes`).
const SCHEDULED_IN_LINE_MEMBERS: usize = 1_000;

/// How much of a message a push previews, in characters.
const PREVIEW_CHARS: usize = 120;

/// The preview of `text`: its first [`PREVIEW_CHARS`] characters, an ellipsis when cut.
fn preview(text: &str) -> String {
    let mut chars = text.chars();
    let mut cut: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() {
        cut.push('…');
    }
    cut
}

impl ApiState {
    /// Schedules a push of `created` for each member but its author who has not muted the chat,
    /// due after their delay. Part of the bookkeeping after a send: a failure is logged and
    /// counted, never the sender's failure.
    ///
    /// It completes before the send answers, so a fetch that follows the answer always finds the
    /// push to cancel. The members' settings are two reads (the chat's partition, and the users'
    /// in batches); the recipients are scheduled concurrently.
    pub(crate) async fn schedule_pushes(&self, created: &Signal, members: &[UserId]) {
        if self.push_queue.is_none() {
            return;
        }
        // Messages, and calls nobody answered; the other call signals do not ring anyone's phone.
        let missed_call = created
            .call
            .as_ref()
            .is_some_and(|call| call.state == CallState::Missed);
        if created.kind != SignalKind::Message && !missed_call {
            return;
        }
        if members.len() > SCHEDULED_IN_LINE_MEMBERS {
            // One queue entry per recipient is too much work to finish before the send answers,
            // and to repeat for each message of a burst: a large chat is fanned out in the
            // background, one pass in flight per chat; the messages sent during a pass ride on
            // the next one, which announces the newest (a recipient's push then counts passes,
            // not messages).
            let state = self.clone();
            let passes = Arc::clone(&self.large_chat_pushes);
            let (created, members) = (created.clone(), members.to_vec());
            tokio::spawn(async move {
                let fanned = passes
                    .advance(
                        created.chat_id,
                        created.id,
                        (members, created),
                        |_, (members, created)| async move {
                            metrics::counter!("confab_pushes_large_chat_passes_total").increment(1);
                            state.schedule_for(&created, &members).await;
                            Ok::<(), std::convert::Infallible>(())
                        },
                    )
                    .await;
                let Ok(()) = fanned;
            });
            return;
        }
        self.schedule_for(created, members).await;
    }

    /// Schedules a push of `created` for each of `members` but its author who has not muted the
    /// chat (one queue entry per recipient, collapsed per chat).
    async fn schedule_for(&self, created: &Signal, members: &[UserId]) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        let recipients: Vec<UserId> = members
            .iter()
            .copied()
            .filter(|m| *m != created.author_id)
            .collect();
        if recipients.is_empty() {
            return;
        }
        let (chat_settings, user_settings, author) = futures::join!(
            self.store.chat_settings_of(created.chat_id),
            self.store.user_settings(&recipients),
            self.store.get_user(created.author_id),
        );
        // Without their settings, a muted recipient might be woken: better no push than that.
        let (chat_settings, user_settings) = match (chat_settings, user_settings) {
            (Ok(chats), Ok(users)) => (
                chats.into_iter().collect::<HashMap<UserId, ChatSettings>>(),
                users.into_iter().collect::<HashMap<UserId, UserSettings>>(),
            ),
            (Err(error), _) | (_, Err(error)) => {
                metrics::counter!("confab_pushes_schedule_failures_total")
                    .increment(recipients.len() as u64);
                tracing::warn!(%error, "push settings unavailable; no pushes scheduled");
                return;
            }
        };
        let author_name = match author {
            Ok(Some(user)) => user.display_name,
            _ => String::new(),
        };
        let text_preview = created.text.as_deref().map(preview);
        let now = OffsetDateTime::now_utc();
        let now_ms = confab_runtime::presence::now_ms();
        let default_delay = u32::try_from(self.push.delay.as_millis()).unwrap_or(u32::MAX);
        let ttl = i64::try_from(self.push.ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let default_user = UserSettings::default();
        futures::stream::iter(recipients)
            .for_each_concurrent(64, |member| {
                let chat = chat_settings.get(&member);
                let user = user_settings.get(&member).unwrap_or(&default_user);
                let muted = chat.is_some_and(|chat| chat.muted_at(now));
                let delay = chat
                    .and_then(|chat| chat.push_delay_ms)
                    .or(user.push_delay_ms)
                    .unwrap_or(default_delay);
                let message = PushMessage {
                    signal: created.id,
                    author: created.author_id,
                    author_name: author_name.clone(),
                    preview: text_preview.clone().filter(|_| user.push_previews),
                };
                async move {
                    if muted {
                        metrics::counter!("confab_pushes_muted_total").increment(1);
                        return;
                    }
                    let due = now_ms + i64::from(delay);
                    match queue
                        .schedule(member, created.chat_id, &message, due, due + ttl)
                        .await
                    {
                        Ok(()) => metrics::counter!("confab_pushes_scheduled_total").increment(1),
                        Err(error) => {
                            metrics::counter!("confab_pushes_schedule_failures_total").increment(1);
                            tracing::warn!(%error, "push not scheduled");
                        }
                    }
                }
            })
            .await;
    }

    /// Cancels `user`'s pending push of `chat` when it announces nothing newer than `up_to`: they
    /// fetched, read or received that far. A push already sent that announced nothing newer is
    /// withdrawn from their devices.
    pub(crate) async fn cancel_pushes(&self, user: UserId, chat: ChatId, up_to: SignalId) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        match queue
            .cancel(user, chat, up_to, confab_runtime::presence::now_ms())
            .await
        {
            Ok(Cancelled::Pending) => {
                metrics::counter!("confab_pushes_cancelled_total").increment(1)
            }
            Ok(Cancelled::Withdrawn) => {
                metrics::counter!("confab_pushes_withdrawn_total").increment(1);
            }
            Ok(Cancelled::Nothing) => {}
            Err(error) => tracing::warn!(%error, "push not cancelled"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preview_is_cut_on_a_character() {
        assert_eq!(preview("short"), "short");
        let long = "é".repeat(200);
        let cut = preview(&long);
        assert_eq!(cut.chars().count(), PREVIEW_CHARS + 1);
        assert!(cut.ends_with('…'));
    }
}
