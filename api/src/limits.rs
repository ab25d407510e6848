//! Rate limits per user and class of request, checked by the handlers of the classes' endpoints
//! (and so by WebSocket request frames, which go through the same handlers). In memory, per
//! process.

use std::future::Future;

use confab_runtime::Problem;
use confab_runtime::config::LimitsConfig;
use confab_runtime::limits::{KeyedLimit, Taken};
use confab_schema::UserId;

use crate::domain::Outcome;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// The classes of requests limited per user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Sending messages.
    Send,
    /// Editing and deleting signals.
    Edit,
    /// Adding and removing reactions.
    React,
    /// Searching messages and users.
    Search,
    /// Listing who has read or received a signal.
    Receipts,
    /// Uploading attachments.
    Upload,
    /// Joining and leaving the matching queues.
    Queue,
    /// Joining circles by access code.
    CircleJoin,
    /// Putting people into chats: creating chats and adding members, counted in the people
    /// added (see [`ApiState::charged`]).
    Chats,
    /// Starting calls.
    Calls,
    /// Moving read and delivery markers.
    Marks,
    /// Typing notices.
    Typing,
}

/// A token bucket per user for each [`Class`].
#[derive(Debug)]
pub struct RateLimits {
    send: KeyedLimit<UserId>,
    edit: KeyedLimit<UserId>,
    react: KeyedLimit<UserId>,
    search: KeyedLimit<UserId>,
    receipts: KeyedLimit<UserId>,
    upload: KeyedLimit<UserId>,
    queue: KeyedLimit<UserId>,
    circle_join: KeyedLimit<UserId>,
    chats: KeyedLimit<UserId>,
    calls: KeyedLimit<UserId>,
    marks: KeyedLimit<UserId>,
    typing: KeyedLimit<UserId>,
}

impl RateLimits {
    pub fn new(config: &LimitsConfig) -> RateLimits {
        RateLimits {
            send: KeyedLimit::new("messages sent", config.send),
            edit: KeyedLimit::new("edits and deletions", config.edit),
            react: KeyedLimit::new("reactions", config.react),
            search: KeyedLimit::new("searches", config.search),
            receipts: KeyedLimit::new("views and deliveries listed", config.receipts),
            upload: KeyedLimit::new("uploads", config.upload),
            queue: KeyedLimit::new("queue joins and leaves", config.queue),
            circle_join: KeyedLimit::new("circle joins", config.circle_join),
            chats: KeyedLimit::new("people added to chats", config.chats),
            calls: KeyedLimit::new("calls started", config.calls),
            marks: KeyedLimit::new("read and delivery markers moved", config.marks),
            typing: KeyedLimit::new("typing notices", config.typing),
        }
    }

    /// No limits.
    pub fn off() -> RateLimits {
        RateLimits::new(&LimitsConfig::default().without_rate_limits())
    }
}

impl RateLimits {
    fn limit(&self, class: Class) -> &KeyedLimit<UserId> {
        match class {
            Class::Send => &self.send,
            Class::Edit => &self.edit,
            Class::React => &self.react,
            Class::Search => &self.search,
            Class::Receipts => &self.receipts,
            Class::Upload => &self.upload,
            Class::Queue => &self.queue,
            Class::CircleJoin => &self.circle_join,
            Class::Chats => &self.chats,
            Class::Calls => &self.calls,
            Class::Marks => &self.marks,
            Class::Typing => &self.typing,
        }
    }
}

impl ApiState {
    /// Takes one request of `class` from `user`'s allowance, or refuses with 429.
    pub fn throttle(&self, class: Class, user: UserId) -> ApiResult<()> {
        drop(self.take(class, user, 1)?);
        Ok(())
    }

    /// Runs `change`, a creation that costs `cost` of `user`'s allowance of `class` (the people
    /// it puts into chats, say), taken before it runs: over the allowance, it does not run and
    /// is refused with 429. The cost is given back when the change finds what it would make there
    /// already ([`Outcome::Existing`]), and all of it but one token when it is refused (a 4xx
    /// answer: the domain refuses before it writes, but after its reads), so that only what is
    /// done is counted, and a refusal as one request. It is kept when the change
    /// fails otherwise (a 5xx may come after some writes, and its retry finds them `Existing`),
    /// and when the request is dropped while the change runs (it may have been made).
    pub async fn charged<T>(
        &self,
        class: Class,
        user: UserId,
        cost: u32,
        change: impl Future<Output = ApiResult<Outcome<T>>>,
    ) -> ApiResult<Outcome<T>> {
        let taken = self.take(class, user, cost)?;
        let outcome = change.await;
        let limit = self.rate_limits.limit(class);
        match &outcome {
            Ok(Outcome::Created(_)) => drop(taken),
            Ok(Outcome::Existing(_)) => limit.give_back(taken),
            // One token kept: a refusal may come after a read per person named (a group of 999
            // people and one unknown user), which must not be free to repeat.
            Err(error) if is_refusal(error) => limit.give_back_all_but_one(taken),
            Err(_) => drop(taken),
        }
        outcome
    }

    fn take(&self, class: Class, user: UserId, cost: u32) -> ApiResult<Taken<UserId>> {
        self.rate_limits
            .limit(class)
            .take(&user, cost)
            .map_err(|limited| {
                metrics::counter!("confab_rate_limited_total", "class" => format!("{class:?}"))
                    .increment(1);
                limited.into()
            })
    }
}

/// Whether `error` refuses the request (a 4xx), as opposed to failing it (5xx).
fn is_refusal(error: &ApiError) -> bool {
    Problem::from(error).status < 500
}
