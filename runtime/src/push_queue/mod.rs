//! Pushes waiting for their delay: one entry per (user, chat), due when the first unfetched message
//! of that chat's burst has waited the delay, collapsing later messages into it. Cancelling is
//! deleting that entry when what the user fetched or read covers it; sending is claiming a due entry
//! with compare-and-delete, so of several notifier nodes exactly one sends it.
//!
//! A push that was sent is remembered per (user, chat) for a while; when the user later reads that
//! far, a withdrawal is queued in its place, so the notification vanishes from their devices.
//!
//! [`NatsPushQueue`] keeps the entries in JetStream (a key-value bucket and a work queue of due
//! tickets), so they survive a restart of any node and of NATS; [`EmbeddedPushQueue`] in a SQLite
//! file of its own. Both pass [`conformance`].

pub mod conformance;
mod embedded;
mod nats;

use async_trait::async_trait;
use confab_schema::{ChatId, SignalId, UserId};
use serde::{Deserialize, Serialize};

use crate::bus::BusError;

pub use embedded::EmbeddedPushQueue;
pub use nats::{NatsPushQueue, OutageLog, PENDING_MAX_AGE};

/// How much of a message a push previews, in characters.
pub const PREVIEW_CHARS: usize = 120;

/// The preview of `text`: its first [`PREVIEW_CHARS`] characters, an ellipsis when cut.
pub fn preview(text: &str) -> String {
    let mut chars = text.chars();
    let mut cut: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() {
        cut.push('…');
    }
    cut
}

/// What a queued push does on the user's devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushKind {
    /// Announces new messages of the chat.
    #[default]
    Messages,
    /// Takes the chat's notification away: the user has read what it announced.
    Withdrawal,
}

/// What one claim took.
#[derive(Debug, Default)]
pub struct Claimed {
    /// The due pushes, each claimed by this caller only.
    pub pushes: Vec<PendingPush>,
    /// More may be claimable right away.
    pub more: bool,
}

/// The message a push is scheduled for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushMessage {
    pub signal: SignalId,
    pub author: UserId,
    /// The author's display name, shown on the notification.
    pub author_name: String,
    /// A preview of the text, when the recipient's settings allow one.
    pub preview: Option<String>,
}

/// A push waiting for its due time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingPush {
    pub user: UserId,
    pub chat: ChatId,
    #[serde(default)]
    pub kind: PushKind,
    /// The newest message it announces (a withdrawal: the newest one it takes away).
    pub newest: SignalId,
    /// Who sent the newest one.
    pub author: UserId,
    #[serde(default)]
    pub author_name: String,
    /// The newest message's text, cut (see [`preview`]). With `newest_deleted`, `Some` of nothing:
    /// the recipient allows previews, and the text is to be the message's the sender announces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// Messages it announces (collapsed), the deleted newest one (`newest_deleted`) not counted.
    pub count: u32,
    /// The newest message was deleted while it waited: `newest` only says where the messages it
    /// announces end, and nothing else of that message is kept (no author's name, no text). The
    /// sender announces the newest of the others still there, or nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub newest_deleted: bool,
    /// When it is due (Unix ms).
    pub due_ms: i64,
    /// When it must no longer be sent (Unix ms).
    pub expires_ms: i64,
    /// The withdrawal this push took the place of: it was to go out when a new message came, and
    /// the new notification would replace the one it took away. Should this push be dropped
    /// instead (read, muted, its message deleted), the withdrawal goes out after all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<ReplacedWithdrawal>,
}

/// What a push keeps of the withdrawal it took the place of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplacedWithdrawal {
    /// The newest message the withdrawn notification announced.
    pub newest: SignalId,
    pub author: UserId,
}

impl PendingPush {
    /// `pending` with one more message joined in: it keeps its due time and announces the newest
    /// message. A new push when nothing was pending, or only a withdrawal (the new notification
    /// replaces the one it would take away).
    fn joined(
        pending: Option<PendingPush>,
        user: UserId,
        chat: ChatId,
        message: &PushMessage,
        due_ms: i64,
        expires_ms: i64,
    ) -> PendingPush {
        match pending {
            Some(mut push) if push.kind == PushKind::Messages => {
                if message.signal > push.newest {
                    push.newest = message.signal;
                    push.newest_deleted = false;
                    push.author = message.author;
                    push.author_name.clone_from(&message.author_name);
                    push.preview.clone_from(&message.preview);
                }
                push.count = push.count.saturating_add(1);
                push.expires_ms = push.expires_ms.max(expires_ms);
                push
            }
            _ => PendingPush {
                replaced: pending
                    .filter(|push| push.kind == PushKind::Withdrawal)
                    .map(|withdrawal| ReplacedWithdrawal {
                        newest: withdrawal.newest,
                        author: withdrawal.author,
                    }),
                user,
                chat,
                kind: PushKind::Messages,
                newest: message.signal,
                author: message.author,
                author_name: message.author_name.clone(),
                preview: message.preview.clone(),
                count: 1,
                newest_deleted: false,
                due_ms,
                expires_ms,
            },
        }
    }

    /// What the deletion of `deleted` makes of this pending push: one whose newest message it was
    /// keeps announcing the others (the sender announces the newest of them still there), with
    /// nothing of the deleted one but its id, as the place where they end; one that announced it
    /// alone is dropped. Any other is left as it is: the deleted message is not what it shows.
    fn after_deletion(mut self, deleted: SignalId) -> AfterDeletion {
        if self.kind != PushKind::Messages || self.newest != deleted || self.newest_deleted {
            return AfterDeletion::Untouched;
        }
        if self.count <= 1 {
            return AfterDeletion::Dropped(self);
        }
        self.newest_deleted = true;
        self.count -= 1;
        self.author_name.clear();
        if let Some(text) = self.preview.as_mut() {
            text.clear();
        }
        AfterDeletion::Narrowed(self)
    }

    /// What is left of this push when it is dropped before it goes out: the withdrawal it took
    /// the place of, due at `now_ms`, or nothing.
    pub fn dropped(&self, now_ms: i64) -> Option<PendingPush> {
        let replaced = self.replaced?;
        Some(PendingPush::withdrawal(
            self.user,
            self.chat,
            replaced.newest,
            replaced.author,
            now_ms,
        ))
    }

    /// The withdrawal of a push that announced up to `newest`, due at `now_ms`.
    fn withdrawal(
        user: UserId,
        chat: ChatId,
        newest: SignalId,
        author: UserId,
        now_ms: i64,
    ) -> PendingPush {
        PendingPush {
            user,
            chat,
            kind: PushKind::Withdrawal,
            newest,
            author,
            author_name: String::new(),
            preview: None,
            count: 0,
            newest_deleted: false,
            due_ms: now_ms,
            expires_ms: now_ms + WITHDRAWAL_TTL_MS,
            replaced: None,
        }
    }
}

/// What a message's deletion makes of a pending push (see [`PendingPush::after_deletion`]).
enum AfterDeletion {
    Untouched,
    /// It announced the deleted message alone, and goes (as itself).
    Dropped(PendingPush),
    /// Announcing the others, written back as this.
    Narrowed(PendingPush),
}

/// How long a sent push is remembered for its withdrawal: a week, after which a notification
/// still on a device is left alone.
pub const SENT_MEMORY_MS: i64 = 7 * 24 * 3600 * 1000;

/// How long a withdrawal may wait for its push service before it is dropped.
pub const WITHDRAWAL_TTL_MS: i64 = 3600 * 1000;

/// What is remembered of a push that was sent, so that reading it withdraws it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SentPush {
    newest: SignalId,
    author: UserId,
    /// After this it is forgotten, and nothing is withdrawn.
    forget_ms: i64,
}

impl SentPush {
    /// What to remember of `push`, sent at `now_ms`; nothing of a withdrawal.
    fn of(push: &PendingPush, now_ms: i64) -> Option<SentPush> {
        (push.kind == PushKind::Messages).then(|| SentPush {
            newest: push.newest,
            author: push.author,
            forget_ms: now_ms + SENT_MEMORY_MS,
        })
    }
}

/// What a cancel did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancelled {
    /// Nothing pending or sent was covered.
    Nothing,
    /// A pending push was dropped before it was sent.
    Pending,
    /// A sent push was covered: its withdrawal is queued.
    Withdrawn,
    /// The pending push's newest message was taken out of it (deleted); it still announces the
    /// others.
    Narrowed,
}

#[async_trait]
pub trait PushQueue: Send + Sync + 'static {
    /// Schedules a push for `user` about `message` in `chat`, due at `due_ms` unless one is
    /// pending for that chat already (then it announces one more message, and stays due when it
    /// was).
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        message: &PushMessage,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError>;
    /// Cancels `user`'s pending push of `chat` if it announces nothing newer than `up_to`, and
    /// queues the withdrawal of a sent one that announced nothing newer.
    async fn cancel(
        &self,
        user: UserId,
        chat: ChatId,
        up_to: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError>;
    /// Takes the deleted message `deleted` out of `user`'s push of `chat`: a pending push whose
    /// newest message it was still announces the others (nothing of the deleted one stays in it
    /// but its id), or is dropped when it announced that one alone; a push sent announcing it is
    /// withdrawn, unless a push is pending (that one replaces the notification); a withdrawal
    /// waiting to go out is widened to it. A pending push announcing other messages only, older
    /// or newer, is left as it is.
    async fn message_deleted(
        &self,
        user: UserId,
        chat: ChatId,
        deleted: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError>;
    /// Drops `user`'s pending push of `chat`, whatever it announces: they muted the chat while it
    /// waited. A pending withdrawal stays (it takes a notification away), and nothing sent is
    /// withdrawn. Says whether a push was dropped.
    async fn drop_pending(&self, user: UserId, chat: ChatId) -> Result<bool, BusError>;
    /// Takes the preview off every pending push of `user`: they turned previews off while those
    /// waited, and the pushes still go, saying who wrote, not what. Says how many changed.
    async fn drop_previews(&self, user: UserId) -> Result<usize, BusError>;
    /// Claims up to `limit` pushes due at `now_ms`: each is handed to one caller only. Says
    /// whether more may be claimable at once (a full batch was looked at), so that a caller
    /// claims again without waiting: fewer than `limit` pushes do not mean the queue is drained.
    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Claimed, BusError>;
    /// Remembers that `push` reached at least one device at `now_ms`, for [`SENT_MEMORY_MS`].
    async fn sent(&self, push: &PendingPush, now_ms: i64) -> Result<(), BusError>;
    /// Hands back whatever this handle holds without having claimed it (a node shutting down), so
    /// that another handle can claim it when due rather than after a timeout.
    async fn release(&self) {}
}

fn key(user: UserId, chat: ChatId) -> String {
    format!("{user}.{chat}")
}

/// What every key of `user`'s entries starts with.
fn user_prefix(user: UserId) -> String {
    format!("{user}.")
}

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("push queue: {error}"))
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
