//! Typing indicators: ephemeral events, never stored nor replayed, throttled per user and chat.

use std::time::{Duration, Instant};

use confab_schema::event::TypingChange;
use confab_schema::{ChatId, Envelope, Event, UserId};

use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

/// A user's typing in a chat is published at most this often; clients renew it while typing.
pub const TYPING_THROTTLE: Duration = Duration::from_secs(2);
/// How long a client shows a typing indicator without a renewal.
pub const TYPING_SHOWN_FOR: Duration = Duration::from_secs(6);
/// The throttle forgets (user, chat) pairs idle this long, once it holds many.
const FORGET_AFTER: Duration = Duration::from_secs(60);
const FORGET_WHEN_OVER: usize = 10_000;

impl ApiState {
    /// Tells the chat's other members the caller is typing (members only). A call within
    /// [`TYPING_THROTTLE`] of the last published one publishes nothing and succeeds.
    pub async fn typing(&self, caller: UserId, chat: ChatId) -> ApiResult<()> {
        self.require_member(chat, caller).await?;
        let now = Instant::now();
        {
            let Ok(mut last) = self.typing.lock() else {
                return Ok(());
            };
            if last
                .get(&(caller, chat))
                .is_some_and(|at| now.duration_since(*at) < TYPING_THROTTLE)
            {
                metrics::counter!("confab_typing_throttled_total").increment(1);
                return Ok(());
            }
            // Only what publishes counts against the user's allowance: a client calls on every
            // keystroke, and the calls the throttle above holds back cost nothing.
            self.throttle(Class::Typing, caller)?;
            last.insert((caller, chat), now);
            if last.len() > FORGET_WHEN_OVER {
                last.retain(|_, at| now.duration_since(*at) < FORGET_AFTER);
            }
        }
        let envelope = Envelope::new(
            chat,
            Event::Typing(TypingChange {
                user_id: caller,
                expires_in_ms: u64::try_from(TYPING_SHOWN_FOR.as_millis()).unwrap_or(6_000),
            }),
        );
        if let Err(error) = self.bus.publish_ephemeral(&envelope).await {
            // Not published: the client's retry must be, not throttled as if it had been.
            if let Ok(mut last) = self.typing.lock()
                && last.get(&(caller, chat)) == Some(&now)
            {
                last.remove(&(caller, chat));
            }
            return Err(error.into());
        }
        Ok(())
    }
}
