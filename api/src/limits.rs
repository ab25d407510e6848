//! Rate limits per user and class of request, checked by the handlers of the classes' endpoints
//! (and so by WebSocket request frames, which go through the same handlers). In memory, per
//! process.

use confab_runtime::config::LimitsConfig;
use confab_runtime::limits::KeyedLimit;
use confab_schema::UserId;

use crate::error::ApiResult;
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
    /// Creating chats and adding members to them.
    Chats,
    /// Starting calls.
    Calls,
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
            chats: KeyedLimit::new("chats created and members added", config.chats),
            calls: KeyedLimit::new("calls started", config.calls),
        }
    }

    /// No limits.
    pub fn off() -> RateLimits {
        RateLimits::new(&LimitsConfig::default().without_rate_limits())
    }
}

impl ApiState {
    /// Takes one request of `class` from `user`'s allowance, or refuses with 429.
    pub fn throttle(&self, class: Class, user: UserId) -> ApiResult<()> {
        let limits = &self.rate_limits;
        let limit = match class {
            Class::Send => &limits.send,
            Class::Edit => &limits.edit,
            Class::React => &limits.react,
            Class::Search => &limits.search,
            Class::Receipts => &limits.receipts,
            Class::Upload => &limits.upload,
            Class::Queue => &limits.queue,
            Class::CircleJoin => &limits.circle_join,
            Class::Chats => &limits.chats,
            Class::Calls => &limits.calls,
        };
        limit.check(&user).map_err(|limited| {
            metrics::counter!("confab_rate_limited_total", "class" => format!("{class:?}"))
                .increment(1);
            limited.into()
        })
    }
}
