//! The signal store: users, chats, members and chat history. [`Store`] is the seam; [`cql::CqlStore`]
//! (ScyllaDB in production, Cassandra in CI) and [`embedded::EmbeddedStore`] (SQLite) implement it,
//! and [`conformance::test_suite`] holds both to the same behaviour.
//!
//! Invariant: only the API writes to the store, and it checks every input before calling it.

pub mod conformance;
pub mod cql;
pub mod embedded;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_runtime::blobs::{BlobError, BlobInfo, BlobName, SmallObjects};
use confab_runtime::telemetry::ReadinessCheck;
use confab_schema::attachment::ImageInfo;
use confab_schema::call::{CallSignal, CallState, CallStatus};
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::push::Device;
use confab_schema::settings::{ChatSettings, UserSettings};
use confab_schema::{
    Attachment, AttachmentKind, Chat, ChatId, ChatKind, CircleId, DeviceId, Member, MemberRole,
    Signal, SignalId, SignalKind, User, UserId,
};
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or did not answer in time. A write that fails so may
    /// have been made all the same, or be made yet: a timeout does not cancel a replica's write.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The write was not made and never will be: the database refused it, or rolled it back.
    #[error("store unavailable: {0}")]
    NotWritten(String),
    /// A stored row could not be read back (written by a newer version, or damaged).
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
}

/// A chat to create, with its first members (the creator among them).
#[derive(Clone, Debug)]
pub struct NewChat {
    pub id: ChatId,
    pub kind: ChatKind,
    pub name: Option<String>,
    pub description: Option<String>,
    pub created_at: OffsetDateTime,
    pub created_by: UserId,
    pub members: Vec<(UserId, MemberRole)>,
}

/// The outcome of [`Store::insert_signal`].
#[derive(Clone, Debug, PartialEq)]
pub enum Inserted {
    /// Stored now.
    Created(Signal),
    /// The author already sent a signal with this nonce to this chat; that one, unchanged.
    Existing(Signal),
}

impl Inserted {
    pub fn signal(&self) -> &Signal {
        match self {
            Inserted::Created(signal) | Inserted::Existing(signal) => signal,
        }
    }
}

/// A change to one member of a chat, with the state it was decided on: see
/// [`Store::change_member`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuardedChange {
    pub write: MemberWrite,
    /// Members whose role must be unchanged for the write to apply (the caller, the target of a
    /// re-role or removal, another owner who keeps the chat owned), each once.
    pub expect: Vec<(UserId, MemberRole)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberWrite {
    /// A new member; applies only if they are not one.
    Add(Member),
    /// A member's new role.
    SetRole(UserId, MemberRole),
    Remove(UserId),
}

impl MemberWrite {
    /// The member the write is about.
    pub fn user(&self) -> UserId {
        match self {
            MemberWrite::Add(member) => member.user_id,
            MemberWrite::SetRole(user, _) | MemberWrite::Remove(user) => *user,
        }
    }
}

/// Which marker: how far a member has read, or how far their client has acknowledged delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MarkerKind {
    Read,
    Delivered,
}

impl MarkerKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            MarkerKind::Read => "read",
            MarkerKind::Delivered => "delivered",
        }
    }
}

/// A call as stored: its chat, who started it, until when it rings, and its status. Its
/// participants are kept apart ([`Store::call_participants`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallRecord {
    pub id: Uuid,
    pub chat_id: ChatId,
    pub started_by: UserId,
    pub started_at: OffsetDateTime,
    pub ring_until: OffsetDateTime,
    pub status: CallStatus,
}

/// A call in the sweeper's list ([`Store::listed_calls_due`]), due at `due`. A call is listed
/// at its start (`due`: its `started_at`) until its `started` signal is written, a ringing call
/// until its ring ends (`due`: its `ring_until`), a call being ended from before its status moves
/// (`due`: when its end began), and a call that a reader found still ringing long past its ring
/// time (`due`: when it was read; the reader sweeps it there and then); all but the first stay
/// until the call's `missed` or `ended` signal is written. A call may be listed more than once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListedCall {
    pub id: Uuid,
    pub chat_id: ChatId,
    pub due: OffsetDateTime,
}

/// A participant's join or leave whose `joined` or `left` signal may not be written yet: stored
/// before the change, removed once its signal is written. `token` names the change, for its
/// signal's nonce, so that a retry of the change writes the same signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingCallSignal {
    pub state: CallState,
    pub token: Uuid,
}

/// What a signal keeps in its `text` column. A `call` signal keeps its call there as
/// `<state>:<call id>` (both stores), so calls need no column of their own in the history.
pub(crate) fn stored_text(signal: &Signal) -> Option<String> {
    match &signal.call {
        Some(call) => Some(format!("{}:{}", call.state, call.call_id.as_hyphenated())),
        None => signal.text.clone(),
    }
}

/// The text and call of a stored signal of `kind`, from its `text` column (see [`stored_text`]).
pub(crate) fn text_and_call(
    kind: SignalKind,
    text: Option<String>,
) -> Result<(Option<String>, Option<CallSignal>), StoreError> {
    if kind != SignalKind::Call {
        return Ok((text, None));
    }
    let Some(text) = text else {
        // A deleted call signal keeps nothing.
        return Ok((None, None));
    };
    let (state, id) = text
        .split_once(':')
        .ok_or_else(|| StoreError::Corrupt(format!("call signal text `{text}`")))?;
    Ok((
        None,
        Some(CallSignal {
            call_id: parse(id)?,
            state: parse(state)?,
        }),
    ))
}

/// A change of a chat's name and description ([`Store::update_chat`]). A field left `None` is
/// kept as stored; `Some(None)` clears it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InfoChange<'a> {
    pub name: Option<Option<&'a str>>,
    pub description: Option<Option<&'a str>>,
}

impl<'a> InfoChange<'a> {
    /// Both fields set (or cleared) to these.
    pub fn both(name: Option<&'a str>, description: Option<&'a str>) -> InfoChange<'a> {
        InfoChange {
            name: Some(name),
            description: Some(description),
        }
    }
}

/// How long a nonce protects against a repeated send when no setting says otherwise. Retries come
/// within seconds or minutes; an hour also covers a client that lost a response and came back later.
pub const DEFAULT_NONCE_TTL: Duration = Duration::from_secs(3_600);

/// How old (by the time its id carries) a message's claim on an attachment must be before a new
/// claim takes it over when the message was not stored ([`Store::claim_attachments`]): its send
/// stopped (a crash, a kill) between the claim and the store write. A live send, from the id it
/// makes to its message stored, waits at most a few seconds on another send's claim and then
/// makes a handful of writes in a row (the outbox entry, the nonce, the signal's rows), each
/// given up after the store's request timeout (5 s by default): it has stored its message or
/// failed well within this, even with a request timeout a few times the default (a deployment
/// that sets it near this should raise this too). The rest is margin for the clocks of the
/// processes, since the age is read from an id another process's clock made. A
/// message that is stored later all the same (its write landed long after it timed out) no
/// longer carries an attachment taken over meanwhile.
pub const CLAIM_ORPHANED_AFTER: Duration = Duration::from_secs(120);

/// Whether a claim held by `holder`, a message not stored, is old enough to be taken over
/// ([`CLAIM_ORPHANED_AFTER`]). An id without a time (not one this API makes) never is.
pub fn claim_orphaned(holder: SignalId, now: OffsetDateTime) -> bool {
    holder
        .created_at()
        .is_some_and(|made| now - made > CLAIM_ORPHANED_AFTER)
}

/// How long the end of a membership is kept for [`Store::left_chats_of`]: a day longer than the
/// log may keep events, so a resume finds every leaving whose events it can still replay, whatever
/// the clocks of the processes that wrote and read it.
pub const LEFT_CHATS_KEPT: Duration =
    Duration::from_secs(confab_runtime::bus::MAX_RETENTION.as_secs() + 24 * 3600);

/// A chat a user stopped being a member of, and when ([`Store::left_chats_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeftChat {
    pub chat_id: ChatId,
    /// When the store recorded the leaving, by the clock of the process that wrote it.
    pub left_at: OffsetDateTime,
}

/// Unread counts stop counting here; clients show "100+".
pub const UNREAD_CAP: usize = 100;

/// An unread count scans at most this many signals after the reader's marker. A chat with more
/// signals than that after the marker (own messages and deletions do not count as unread) reports
/// [`UNREAD_CAP`], so the scan never grows with the history.
pub const UNREAD_SCAN_LIMIT: usize = 1_000;

/// One chat as a member sees it in their list, read in a constant number of store round trips per
/// page (see `Store::chat_entries`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChatEntry {
    /// The chat with `my_role` and `latest_signal` (with its reaction counts) filled in;
    /// `unread_count` is left to [`Store::count_unread`].
    pub chat: Chat,
    /// The member's read marker.
    pub read_marker: Option<SignalId>,
}

impl ChatEntry {
    /// Whether the newest signal is past the member's read marker (only then can anything be
    /// unread, and only then is an unread count worth a scan).
    pub fn may_have_unread(&self) -> bool {
        match (&self.chat.latest_signal, self.read_marker) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(latest), Some(marker)) => latest.id > marker,
        }
    }
}

/// One unread count of [`Store::count_unreads`]: the arguments of [`Store::count_unread`] that
/// differ per chat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnreadQuery {
    pub chat: ChatId,
    pub after: Option<SignalId>,
    pub through: Option<SignalId>,
    pub chat_created_at: OffsetDateTime,
}

/// A chat in a user's activity order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChatActivity {
    pub chat_id: ChatId,
    /// The newest signal's id (or, before the first signal, a time-ordered id of the creation).
    pub activity: SignalId,
}

/// Where a user stands in a pairing pool (a circle's lobby, or the matching queues).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotState {
    /// In the pool but not waiting (a circle member between pairings).
    Idle,
    Waiting,
    Paired,
}

impl SlotState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SlotState::Idle => "idle",
            SlotState::Waiting => "waiting",
            SlotState::Paired => "paired",
        }
    }

    pub fn parse(value: &str) -> Result<SlotState, StoreError> {
        match value {
            "idle" => Ok(SlotState::Idle),
            "waiting" => Ok(SlotState::Waiting),
            "paired" => Ok(SlotState::Paired),
            other => Err(StoreError::Corrupt(format!("unknown slot state {other}"))),
        }
    }
}

/// One user's row in a pairing pool. Every change goes through [`Store::write_slots`], conditional
/// on `version`, so two processes never both change the same row from the same state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub user_id: UserId,
    /// The queue the user joined (empty in a circle's lobby).
    pub kind: String,
    pub state: SlotState,
    /// Since when the user waits, or is paired.
    pub since: OffsetDateTime,
    pub partner: Option<UserId>,
    pub chat: Option<ChatId>,
    /// The partner of the user's last pairing in this pool.
    pub previous: Option<UserId>,
    pub version: i64,
}

/// A conditional change of one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotWrite {
    /// Adds the slot if the user has none in the pool.
    Create(Slot),
    /// Replaces the user's slot if its version is still `expected` (`slot.version` is the new one).
    Replace { expected: i64, slot: Slot },
    /// Removes the user's slot if its version is still `expected`.
    Delete { user: UserId, expected: i64 },
}

/// A small object as listed: its name, its size and when it was last stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmallObjectInfo {
    pub sha256: String,
    pub size: u64,
    pub stored_at: OffsetDateTime,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Whether the store answers now.
    async fn check(&self) -> Result<(), StoreError>;

    // Users.

    /// Creates or refreshes a user's profile and its search terms.
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError>;
    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError>;
    /// Search-term rows `(term, user)` with `term` starting with `prefix` (lower-case), after `after`
    /// in (term, user) order. May include rows of terms a user no longer has; [`search_users`] skips
    /// them.
    async fn user_terms(
        &self,
        prefix: &str,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError>;
    /// Up to `limit` users with `address` (lower-case) among their [`address_terms`]: an exact
    /// match, never a prefix. May include users who no longer have it; [`search_users`] skips them.
    async fn users_by_address(
        &self,
        address: &str,
        limit: usize,
    ) -> Result<Vec<UserId>, StoreError>;

    // Chats and membership.

    /// Creates a chat and its members. The chat becomes visible only once its members are stored.
    async fn create_chat(&self, chat: &NewChat) -> Result<(), StoreError>;
    /// A chat as stored (`my_role`, `latest_signal` and `unread_count` left empty).
    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError>;
    /// Changes the chat's name, description or both, leaving the other as it is: two changes
    /// made at once, one of the name and one of the description, both stay.
    async fn update_chat(&self, id: ChatId, change: InfoChange<'_>) -> Result<(), StoreError>;
    async fn member_role(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<MemberRole>, StoreError>;
    /// Every member of `chat`.
    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError>;
    /// Every chat `user` is a member of, in no particular order (what a notifier routes by).
    async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, StoreError>;
    /// Every chat's id, a page at a time, in the store's own order (token order on CQL): the last
    /// id of a page, as `after`, gives the next. For rebuilding what is derived from the history
    /// (`confab reindex`); a chat created meanwhile may or may not appear.
    async fn chat_ids(
        &self,
        after: Option<ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, StoreError>;

    /// Records that `user` has signed in with the identity provider's session `session` (a
    /// token's `sid`), kept until `ttl` from now (a session recorded again is kept until `ttl` from
    /// then). Logging out everywhere ends each recorded session by its id, which also refuses the
    /// tokens a device renews in it after the logout.
    async fn record_session(
        &self,
        user: UserId,
        session: &str,
        ttl: Duration,
    ) -> Result<(), StoreError>;
    /// The sessions recorded for `user` that have not expired, in no particular order.
    async fn sessions_of(&self, user: UserId) -> Result<Vec<String>, StoreError>;
    /// Forgets `sessions` of `user`, once a logout everywhere has ended them: their revocations
    /// refuse them from then on, and the next logout need not end them again. Sessions not
    /// recorded are no error.
    async fn forget_sessions(&self, user: UserId, sessions: &[String]) -> Result<(), StoreError>;

    /// Stores `device` (a new one, or one registered again, perhaps by another user: it then
    /// moves to `device.user_id`). Answers the device as it was before, if any.
    async fn put_device(&self, device: &Device) -> Result<Option<Device>, StoreError>;
    /// `user`'s devices.
    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, StoreError>;
    /// Removes `user`'s device `id`; false when they have none with that id.
    async fn delete_device(&self, user: UserId, id: DeviceId) -> Result<bool, StoreError>;
    /// The settings of those of `users` who saved any (the others use the defaults).
    async fn user_settings(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, UserSettings)>, StoreError>;
    async fn put_user_settings(
        &self,
        user: UserId,
        settings: &UserSettings,
    ) -> Result<(), StoreError>;
    /// `user`'s settings for `chat`, if they saved any.
    async fn chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<ChatSettings>, StoreError>;
    /// Every saved member setting of `chat` (one partition: what a send reads for its pushes).
    async fn chat_settings_of(
        &self,
        chat: ChatId,
    ) -> Result<Vec<(UserId, ChatSettings)>, StoreError>;
    async fn put_chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
        settings: &ChatSettings,
    ) -> Result<(), StoreError>;
    /// Those of `users` who are members of `chat`, in no particular order: one read of the
    /// chat's members per 100 users asked (ScyllaDB refuses more keys than that in one `IN`).
    async fn members_among(
        &self,
        chat: ChatId,
        users: &[UserId],
    ) -> Result<Vec<Member>, StoreError>;
    /// Members of `chat` after `after`, in user-id order.
    async fn members_page(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError>;
    /// Adds or re-roles a member.
    async fn put_member(&self, chat: ChatId, member: &Member) -> Result<(), StoreError>;
    /// Applies `change` to `chat`'s members atomically with its checks: only if every member of
    /// `change.expect` still has the role given there and, for an addition, the user is not a
    /// member. False (and nothing written) otherwise. Racing changes of one chat are serialized,
    /// across processes: this is how membership's check-then-act stays correct.
    async fn change_member(&self, chat: ChatId, change: &GuardedChange)
    -> Result<bool, StoreError>;
    /// Removes `user` from `chat` without conditions, recording their leaving
    /// ([`Store::left_chats_of`]) only if they were a member: removing a non-member, or removing
    /// again, ends nothing.
    async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<(), StoreError>;
    /// Finishes a removal of `user` from `chat` that stopped after its authoritative write: if
    /// they are not a member, records the chat among those they left ([`Store::left_chats_of`])
    /// and takes it out of what lists it to them (on CQL, their row of `user_chats`, which their
    /// chat list, search and streams read). Takes nothing written after it looked: a user who
    /// joins again meanwhile keeps the chat.
    async fn forget_left_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError>;
    /// The chats `user` stopped being a member of (they left or were removed, or the chat was
    /// removed) at or after `since`: those of their `limit` most recent endings, newest first,
    /// each once, with the time of its latest ending. Every removal of a member (a change of members, [`Store::remove_member`],
    /// [`Store::forget_left_chat`], [`Store::delete_chat`]) records its ending before the chat
    /// stops being listed to them by [`Store::chats_of`], so a read of `chats_of` and then of this
    /// finds a chat the user was in when the first began in one of the two. Kept
    /// [`LEFT_CHATS_KEPT`]. For a resumed event stream, which replays a chat the user left up to
    /// their leaving.
    async fn left_chats_of(
        &self,
        user: UserId,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<LeftChat>, StoreError>;
    /// Finishes an addition of `user` to `chat` that stopped after its authoritative write: if
    /// they are a member, lists the chat to them again (on CQL, their row of `user_chats`, as of
    /// the role's write, so a removal or a change of role since wins over it). Without it the
    /// member would be a member that none of their streams, searches or chat lists knows of.
    async fn restore_joined_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError>;

    // Activity.

    /// Moves `chat` to `activity` in the activity order of each of `members`, and records `latest`
    /// (the signal whose id is `activity`; `None` when the chat was just created) as its newest.
    async fn touch_chat(
        &self,
        chat: ChatId,
        members: &[UserId],
        activity: SignalId,
        latest: Option<&Signal>,
    ) -> Result<(), StoreError>;
    /// Takes `chat` out of `user`'s activity order (they left).
    async fn untouch_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError>;
    /// `user`'s chats, most recent activity first, after `after`. Rows left behind by a concurrent
    /// move, or by a touch that raced the user's leaving, are skipped and removed.
    async fn chats_by_activity(
        &self,
        user: UserId,
        after: Option<ChatActivity>,
        limit: usize,
    ) -> Result<Vec<ChatActivity>, StoreError>;

    /// The entries of `chats` as `user` sees them, in the order given; chats `user` is not a member
    /// of are left out. A constant number of store round trips, whatever the number of chats.
    async fn chat_entries(
        &self,
        user: UserId,
        chats: &[ChatId],
    ) -> Result<Vec<ChatEntry>, StoreError>;
    /// A page of `user`'s chat list: [`Store::chats_by_activity`], each row with its
    /// [`Store::chat_entries`] entry (`None` for a chat the user left between the two reads).
    /// A store may read both in fewer round trips than the two calls.
    async fn chat_list(
        &self,
        user: UserId,
        after: Option<ChatActivity>,
        limit: usize,
    ) -> Result<Vec<(ChatActivity, Option<ChatEntry>)>, StoreError> {
        let rows = self.chats_by_activity(user, after, limit).await?;
        let ids: Vec<ChatId> = rows.iter().map(|row| row.chat_id).collect();
        let mut entries: HashMap<ChatId, ChatEntry> = self
            .chat_entries(user, &ids)
            .await?
            .into_iter()
            .map(|entry| (entry.chat.id, entry))
            .collect();
        Ok(rows
            .into_iter()
            .map(|row| {
                let entry = entries.remove(&row.chat_id);
                (row, entry)
            })
            .collect())
    }

    // Signals.

    /// Stores `signal` unless its author already stored one with the same nonce in the same chat, in
    /// which case that one is returned. Holds when two requests race. A store that knows a failed
    /// call wrote nothing, and never will, says so ([`StoreError::NotWritten`]).
    async fn insert_signal(&self, signal: &Signal) -> Result<Inserted, StoreError>;
    /// The id of the signal `author`'s `nonce` in `chat` is recorded for by
    /// [`Store::insert_signal`], while the nonce lives: a stored signal, or, on a store that
    /// records the nonce before it writes the signal, one whose write failed after that (an
    /// insert of any signal with this nonce then writes it). `None` when no signal holds it.
    async fn nonce_holder(
        &self,
        chat: ChatId,
        author: UserId,
        nonce: &str,
    ) -> Result<Option<SignalId>, StoreError>;
    async fn get_signal(&self, chat: ChatId, id: SignalId) -> Result<Option<Signal>, StoreError>;
    /// Signals of any chats (search hits), in the order asked, `None` for those not stored. The
    /// default reads them concurrently; a store that can read them in one round trip does.
    async fn get_signals(
        &self,
        ids: &[(ChatId, SignalId)],
    ) -> Result<Vec<Option<Signal>>, StoreError> {
        futures::future::try_join_all(ids.iter().map(|&(chat, id)| self.get_signal(chat, id))).await
    }
    /// Sets a message's text and `edited_at`, unless it is deleted. Returns the signal as stored
    /// afterwards (a tombstone if it was deleted, before or concurrently), or `None` if there is no
    /// such signal. An edit never undoes a deletion and never loses to the original text, whatever
    /// the clocks of the processes involved.
    async fn edit_signal(
        &self,
        chat: ChatId,
        id: SignalId,
        text: &str,
        edited_at: OffsetDateTime,
    ) -> Result<Option<Signal>, StoreError>;
    /// Turns a signal into a tombstone: `deleted`, no text, here and in the send-parity record.
    /// Idempotent. Returns the tombstone, or `None` if there is no such signal.
    async fn delete_signal(&self, chat: ChatId, id: SignalId)
    -> Result<Option<Signal>, StoreError>;
    /// Up to `limit` signals of `chat` older than `before` (or the newest), newest first.
    async fn signals_before(
        &self,
        chat: ChatId,
        before: Option<SignalId>,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError>;
    /// Up to `limit` signals of `chat` newer than `after`, oldest first.
    async fn signals_after(
        &self,
        chat: ChatId,
        after: SignalId,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError>;
    /// How many messages (not deleted, not by `reader`) `chat` has after `after` (all when `None`)
    /// and up to `through` (the newest signal the caller shows with the count; all when `None`),
    /// counting at most `cap` and scanning at most [`UNREAD_SCAN_LIMIT`] signals (beyond which it
    /// answers `cap`). `chat_created_at` says where the chat's signals are expected to
    /// begin: a store may use it to start reading before it knows, never to change the answer.
    async fn count_unread(
        &self,
        chat: ChatId,
        after: Option<SignalId>,
        through: Option<SignalId>,
        chat_created_at: OffsetDateTime,
        reader: UserId,
        cap: usize,
    ) -> Result<usize, StoreError>;

    /// [`Store::count_unread`] for each of `queries`, in their order. A store may answer them
    /// together in fewer round trips than one count each; the answers are the same.
    async fn count_unreads(
        &self,
        queries: &[UnreadQuery],
        reader: UserId,
        cap: usize,
    ) -> Result<Vec<usize>, StoreError> {
        futures::future::try_join_all(
            queries.iter().map(|q| {
                self.count_unread(q.chat, q.after, q.through, q.chat_created_at, reader, cap)
            }),
        )
        .await
    }

    // Reactions.

    /// Adds `user`'s `emoji` reaction; `false` when it was already there. Either way the count of
    /// that emoji is brought up to date, so a retry repairs a count that a failure left behind.
    async fn add_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError>;
    /// Removes it; `false` when it was not there. Either way the count is brought up to date.
    async fn remove_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError>;
    /// Whether `user`'s `emoji` reaction to `signal` is stored.
    async fn has_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError>;
    /// Emoji → count, for counts above zero.
    async fn reaction_counts(
        &self,
        chat: ChatId,
        signal: SignalId,
    ) -> Result<BTreeMap<String, i64>, StoreError> {
        Ok(self
            .reaction_counts_of(chat, &[signal])
            .await?
            .remove(&signal)
            .unwrap_or_default())
    }
    /// The reaction counts of several signals of `chat` (a page of history): one store round trip
    /// per history bucket the signals fall in. Signals without reactions are absent.
    async fn reaction_counts_of(
        &self,
        chat: ChatId,
        signals: &[SignalId],
    ) -> Result<HashMap<SignalId, BTreeMap<String, i64>>, StoreError>;
    /// The reaction counts of signals of any chats (search hits): [`Store::reaction_counts_of`]
    /// once per chat, concurrently, unless the store can do better. Signals without reactions are
    /// absent.
    async fn reaction_counts_across(
        &self,
        signals: &[(ChatId, SignalId)],
    ) -> Result<HashMap<SignalId, BTreeMap<String, i64>>, StoreError> {
        let mut by_chat: BTreeMap<ChatId, Vec<SignalId>> = BTreeMap::new();
        for &(chat, id) in signals {
            by_chat.entry(chat).or_default().push(id);
        }
        let counts = futures::future::try_join_all(
            by_chat
                .iter()
                .map(|(chat, ids)| self.reaction_counts_of(*chat, ids)),
        )
        .await?;
        Ok(counts.into_iter().flatten().collect())
    }
    /// Who reacted with what, in (emoji, user) order after `after`.
    async fn reactions_page(
        &self,
        chat: ChatId,
        signal: SignalId,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError>;

    // Attachments.

    /// Stores an attachment's metadata: by id, in its chat's list, and a reference to each object
    /// it uses ([`Attachment::blobs`]). Written again (the message it was sent in), it keeps its
    /// kind: only [`Store::update_derived`] moves an attachment to another kind's list.
    async fn put_attachment(&self, attachment: &Attachment) -> Result<(), StoreError>;
    /// Records what making the pictures of image `id` of `chat`, stored as `stored_as`, found: its
    /// `kind` (an image that cannot be decoded becomes a file, and moves to that kind's list) and
    /// `image`. Only those change: the rest of the record stays as stored, the message it was
    /// sent in (`message_id`) included. An attachment removed before or during this call stays
    /// removed, by id and from its chat's lists. The objects `image` names are referenced
    /// already ([`Store::add_blob_refs`]). Answers the attachment as stored after the write, or
    /// `None` when it is gone.
    async fn update_derived(
        &self,
        id: Uuid,
        chat: ChatId,
        stored_as: AttachmentKind,
        kind: AttachmentKind,
        image: Option<&ImageInfo>,
    ) -> Result<Option<Attachment>, StoreError>;
    /// Claims for `message`, before it is stored or published, each attachment of `ids` that is
    /// `chat`'s and that no message holds yet, or that a message made longer ago than
    /// [`CLAIM_ORPHANED_AFTER`] and not stored holds (its send stopped between its claim and its
    /// store write; the claim is taken over from that holder alone, and that message, stored
    /// later all the same, does not carry the attachment): of sends racing for one attachment
    /// exactly one claim succeeds. Answers, for each of `ids` that exists and is `chat`'s, the message that
    /// holds it after the call (`message` when this claim took it, or took it before). Only the
    /// record's `message_id` changes (pictures stored meanwhile by [`Store::update_derived`]
    /// stay); the chat's lists learn it from [`Store::list_claimed_attachments`] once the message
    /// is stored. An attachment removed before or during this call stays removed.
    async fn claim_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<Vec<(Uuid, SignalId)>, StoreError>;
    /// Gives up the claims `message` holds on the attachments `ids` of `chat` (it was not stored:
    /// refused, or another attempt of its nonce was stored): each becomes free to send again.
    /// Claims another message holds stay. Idempotent.
    async fn release_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<(), StoreError>;
    /// Records in `chat`'s lists of attachments that `message`, just stored, was sent with those
    /// of `ids` it holds ([`Store::claim_attachments`]); nothing else of them changes, and one
    /// removed before or during this call stays removed, by id and from its chat's lists.
    async fn list_claimed_attachments(
        &self,
        chat: ChatId,
        ids: &[Uuid],
        message: SignalId,
    ) -> Result<(), StoreError>;
    /// References the objects `blobs` from `attachment` before the attachment (or its new
    /// pictures) is stored: what an upload writes before it makes its objects.
    async fn add_blob_refs(&self, attachment: Uuid, blobs: &[String]) -> Result<(), StoreError>;
    /// The attachments of `ids` that exist, in no particular order.
    async fn get_attachments(&self, ids: &[Uuid]) -> Result<Vec<Attachment>, StoreError>;
    /// Up to `limit` attachments of `chat` older than `before` (or the newest), newest first, of
    /// `kind` (or every kind).
    async fn chat_attachments(
        &self,
        chat: ChatId,
        kind: Option<AttachmentKind>,
        before: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Attachment>, StoreError>;
    /// Removes attachments (their message was deleted, or their upload failed): their metadata,
    /// their place in the chat's lists (the other kind's too for an image whose pictures are not
    /// stored yet: [`Store::update_derived`] may still re-file it) and their references to
    /// objects. Idempotent.
    async fn delete_attachments(&self, attachments: &[Attachment]) -> Result<(), StoreError>;
    /// Up to `limit` of the attachments that reference the object `sha256`
    /// ([`Store::add_blob_refs`], [`Store::put_attachment`]), those after `after` (or from the
    /// first), in the store's order of ids: the same order page after page.
    async fn blob_referrers(
        &self,
        sha256: &str,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Vec<Uuid>, StoreError>;
    /// Whether any attachment references the object `sha256`, orphaned references included (the
    /// collector tells those apart).
    async fn blob_referenced(&self, sha256: &str) -> Result<bool, StoreError> {
        Ok(!self.blob_referrers(sha256, None, 1).await?.is_empty())
    }
    /// Removes `attachment`'s reference to the object `sha256` (the collector found it orphaned:
    /// an upload that never finished, or a picture its record does not name). Idempotent.
    async fn drop_blob_ref(&self, sha256: &str, attachment: Uuid) -> Result<(), StoreError>;
    /// Marks the object `sha256` as about to be removed by the collector's run `run`, until
    /// `until`. Each run has a mark of its own.
    async fn condemn_blob(
        &self,
        sha256: &str,
        run: Uuid,
        until: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Until when a collector may remove `sha256` (the latest end of its marks), if it is marked.
    async fn blob_condemned(&self, sha256: &str) -> Result<Option<OffsetDateTime>, StoreError>;
    /// Removes run `run`'s mark, leaving other runs' marks.
    async fn absolve_blob(&self, sha256: &str, run: Uuid) -> Result<(), StoreError>;

    /// Stores the bytes of a small object named `sha256` (their hash) in the store itself
    /// (`attachments.inline_bytes`, see `InlineBlobs`); storing it again changes nothing but its
    /// time.
    async fn put_small_object(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError>;
    /// The bytes of the small object `sha256`, or `None`.
    async fn small_object(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Removes the small object `sha256` as it is stored now; removing a missing one is not an
    /// error. A write of it after this call survives it, whatever the clocks of the nodes that
    /// take the two (the collector deletes only objects older than its minimum age, and the
    /// clocks are assumed closer than that).
    async fn delete_small_object(&self, sha256: &str) -> Result<(), StoreError>;
    /// Up to `limit` small objects named after `after`, in name order; fewer only when there
    /// are no more.
    async fn small_objects(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SmallObjectInfo>, StoreError>;

    /// Removes a chat and everything in it: members (and their places in chat lists), history,
    /// reactions, markers, settings and attachment metadata. Idempotent.
    async fn delete_chat(&self, chat: ChatId) -> Result<(), StoreError>;

    // Circles and pairing pools.

    /// Stores a new circle, its access code (`access_code`, always set in the store) and its expiry.
    async fn create_circle(&self, circle: &Circle) -> Result<(), StoreError>;
    async fn get_circle(&self, id: CircleId) -> Result<Option<Circle>, StoreError>;
    /// The circle an access code opens.
    async fn circle_by_code(&self, code: &str) -> Result<Option<CircleId>, StoreError>;
    /// Replaces the circle's access code `old` with `new` (the old one stops working).
    async fn rotate_circle_code(
        &self,
        id: CircleId,
        old: &str,
        new: &str,
    ) -> Result<(), StoreError>;
    /// Adds a member while the circle has fewer than `max_members` (racing joins never take it
    /// past that), or renames one already there (whatever the count).
    async fn put_circle_member(
        &self,
        circle: CircleId,
        member: &CircleMember,
        max_members: u32,
    ) -> Result<MemberPut, StoreError>;
    /// Every member of the circle (one partition).
    async fn circle_members(&self, circle: CircleId) -> Result<Vec<CircleMember>, StoreError>;
    async fn remove_circle_member(&self, circle: CircleId, user: UserId) -> Result<(), StoreError>;
    /// Records that the circle's owner removed `user`, who may not join it again. Kept until
    /// [`Store::delete_circle`] (CQL also lets the row expire a while after `circle_expires_at`,
    /// should a removal race the sweep). Idempotent.
    async fn record_circle_removal(
        &self,
        circle: CircleId,
        user: UserId,
        circle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError>;
    /// Whether the circle's owner removed `user` ([`Store::record_circle_removal`]).
    async fn removed_from_circle(&self, circle: CircleId, user: UserId)
    -> Result<bool, StoreError>;
    /// Records a chat made for a pairing of the circle, so that it goes with the circle.
    async fn add_circle_chat(&self, circle: CircleId, chat: ChatId) -> Result<(), StoreError>;
    async fn circle_chats(&self, circle: CircleId) -> Result<Vec<ChatId>, StoreError>;
    /// Up to `limit` circles that expired at or before `now`, oldest first.
    async fn expired_circles(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CircleId>, StoreError>;
    /// Removes a circle's own rows: the circle, its code, members, removals, chat list, lobby
    /// and expiry entry (its chats are removed with [`Store::delete_chat`] first). Idempotent.
    async fn delete_circle(&self, id: CircleId) -> Result<(), StoreError>;
    /// Every slot of a pairing pool (one partition).
    async fn slots(&self, pool: &str) -> Result<Vec<Slot>, StoreError>;
    /// Applies every write, or none: `false` when any condition fails. All in one pool, at once
    /// (a lightweight-transaction batch on one partition in CQL; a transaction on SQLite), so two
    /// racing processes never both pair the same user.
    async fn write_slots(&self, pool: &str, writes: &[SlotWrite]) -> Result<bool, StoreError>;

    // Markers.

    /// Moves `user`'s marker forward to `up_to`; never back.
    async fn advance_marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
        up_to: SignalId,
    ) -> Result<(), StoreError>;
    async fn marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<SignalId>, StoreError>;
    // Calls.

    /// Stores a new call with its starter as its first participant, listed for the sweeper at
    /// its `ring_until` (see [`ListedCall`]), unless its chat has a live (ringing or active) call
    /// already: then stores nothing and answers that call. Of starts racing in one chat, in any
    /// processes, one stores its call and the others answer it (a lightweight transaction on
    /// CQL, a transaction on SQLite). A call of the chat that is over, or that was never stored
    /// and whose ring time has passed, does not count. Storing the same call again answers
    /// `None` as the first write did.
    async fn create_call(&self, call: &CallRecord) -> Result<Option<CallRecord>, StoreError>;
    async fn get_call(&self, id: Uuid) -> Result<Option<CallRecord>, StoreError>;
    /// Moves call `id` from `from` to `to`; `false` when it was not in `from` (another change won).
    /// Linearizable: of racing transitions out of one status, exactly one succeeds. An answer
    /// (`ringing` to `active`) also takes the call's listing at its `ring_until` out of the
    /// sweeper's list; a call that is missed or ended stays listed until its signal is written
    /// ([`Store::forget_listed_call`]).
    async fn transition_call(
        &self,
        id: Uuid,
        from: CallStatus,
        to: CallStatus,
    ) -> Result<bool, StoreError>;
    /// The ringing and active calls of `chat` (a member who leaves the chat leaves these).
    async fn live_calls(&self, chat: ChatId) -> Result<Vec<CallRecord>, StoreError>;
    /// Who is in call `id` now.
    async fn call_participants(&self, id: Uuid) -> Result<Vec<UserId>, StoreError>;
    /// Takes `user` out of call `id` (nothing when they are not in it). Participants are put in
    /// by the start (the starter) and by [`Store::put_call_participant`] only.
    async fn remove_call_participant(&self, id: Uuid, user: UserId) -> Result<(), StoreError>;
    /// Puts `user` in call `id` under the join `join` unless they are in it already: a
    /// compare-and-set on their participant row (a lightweight transaction on CQL), so of joins of
    /// one user racing, in any processes, one puts them in and the others learn its join. Answers
    /// the join they are in under: `join` when this one put them in, the one that did otherwise,
    /// `None` when they are in under no recorded join (the starter, put in by the start).
    async fn put_call_participant(
        &self,
        id: Uuid,
        user: UserId,
        join: Uuid,
    ) -> Result<Option<Uuid>, StoreError>;
    /// The join `user` is in call `id` under ([`Store::put_call_participant`]); `None` when they
    /// are not in it, or are in under no recorded join.
    async fn call_participant_join(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<Uuid>, StoreError>;
    /// The join or leave of `user` in call `id` whose signal may not be written yet, if any.
    async fn pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
    ) -> Result<Option<PendingCallSignal>, StoreError>;
    /// Stores, in place of any other, the join or leave of `user` in call `id` whose signal may
    /// not be written yet.
    async fn set_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        pending: &PendingCallSignal,
    ) -> Result<(), StoreError>;
    /// Removes the pending join or leave of `user` in call `id` if it is still `done` (same state
    /// and token): a change of theirs stored since (a join while their leave was finishing) keeps
    /// its record, which its retry needs.
    async fn forget_pending_call_signal(
        &self,
        id: Uuid,
        user: UserId,
        done: &PendingCallSignal,
    ) -> Result<(), StoreError>;
    /// Lists a call for the sweeper, due at `call.due`.
    async fn list_call(&self, call: &ListedCall) -> Result<(), StoreError>;
    /// Up to `limit` listings of the sweeper's list due at or before `now`, in order (by `due`,
    /// then by call id), after `after` when given: a sweep pages past the listings it leaves.
    /// May list calls whose status moved since, and calls never stored (on CQL a start lists its
    /// call before it stores it, and may fail in between): the sweeper reads each call.
    async fn listed_calls_due(
        &self,
        now: OffsetDateTime,
        after: Option<&ListedCall>,
        limit: usize,
    ) -> Result<Vec<ListedCall>, StoreError>;
    /// Takes one listing of a call out of the sweeper's list.
    async fn forget_listed_call(&self, call: &ListedCall) -> Result<(), StoreError>;

    /// Markers of `chat` after user `after`, in user-id order.
    async fn markers_page(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<(UserId, SignalId)>, StoreError>;

    // The event outbox: see `crate::outbox`.

    /// Records an event its writer is about to make true, before the change is stored.
    async fn outbox_put(&self, writer: Uuid, entry: &OutboxEntry) -> Result<(), StoreError>;
    /// Forgets entries of one bucket: their events are published, or their changes were not
    /// stored. One request for all of them where the store allows it.
    async fn outbox_remove(
        &self,
        writer: Uuid,
        bucket: i64,
        ids: &[Uuid],
    ) -> Result<(), StoreError>;
    /// The writer's entries in the buckets `from..=to`.
    async fn outbox_entries(
        &self,
        writer: Uuid,
        from: i64,
        to: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError>;
    /// Records that `writer` is alive at `seen_ms`, and that its entries not yet removed are in
    /// the buckets from `entries_from_ms` on.
    async fn outbox_heartbeat(
        &self,
        writer: Uuid,
        entries_from_ms: i64,
        seen_ms: i64,
    ) -> Result<(), StoreError>;
    /// Every writer with a heartbeat on record.
    async fn outbox_writers(&self) -> Result<Vec<OutboxWriter>, StoreError>;
    /// Claims the sweep of a silent `writer` for `sweeper`: `true` when the claim is (or already
    /// was) `sweeper`'s. A claim lapses after `claim_ttl_secs`, so a sweeper that dies mid-way
    /// leaves the writer to another.
    async fn outbox_claim(
        &self,
        writer: Uuid,
        sweeper: Uuid,
        claim_ttl_secs: i32,
    ) -> Result<bool, StoreError>;
    /// Forgets a swept writer's heartbeat (a writer still alive writes it again).
    async fn outbox_forget_writer(&self, writer: Uuid) -> Result<(), StoreError>;
}

/// An event in the outbox, as its writer recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// When it was written, in outbox buckets (`crate::outbox::bucket_of`).
    pub bucket: i64,
    /// The envelope's id.
    pub id: Uuid,
    /// The envelope, as JSON.
    pub envelope: Vec<u8>,
}

/// A writer of outbox entries (one api process) and its last heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutboxWriter {
    pub writer: Uuid,
    /// Where a sweep of its entries starts: none of its entries still in the store was written
    /// before. Stored in the column `started_ms`, its first meaning (the writer's start).
    pub entries_from_ms: i64,
    pub seen_ms: i64,
}

/// Whether a user name or display name is, or looks like, an e-mail address. Such a name is as
/// private as the address: with an identity provider that uses the address as the user name (and
/// the user name as the display name when there is none), it *is* the address.
pub fn looks_like_address(name: &str) -> bool {
    name.contains('@')
}

fn normalised(term: &str) -> String {
    term.trim().to_lowercase()
}

/// The lower-cased terms a user is found by from a prefix: their user name and display name, but
/// neither when it is, or looks like, an e-mail address (those are [`address_terms`]).
pub fn search_terms(user: &User) -> Vec<String> {
    let email = user.email.as_deref().map(normalised);
    let mut terms: Vec<String> = [&user.username, &user.display_name]
        .into_iter()
        .map(|t| normalised(t))
        .filter(|t| !t.is_empty() && !looks_like_address(t) && email.as_ref() != Some(t))
        .collect();
    terms.sort();
    terms.dedup();
    terms
}

/// The lower-cased terms a user is found by only whole: their e-mail address (one the identity
/// provider verified), and a user name that is, or looks like, an address (a provider that signs
/// users in by address). Not a display name that looks like one: users choose it, and anybody
/// could pass for an address's owner by it. Kept apart from [`search_terms`] (in the store's table
/// of addresses, [`Store::users_by_address`]), where no prefix scan reaches them.
pub fn address_terms(user: &User) -> Vec<String> {
    let email = user.email.as_deref().map(normalised);
    let mut terms: Vec<String> = [&user.username]
        .into_iter()
        .map(|t| normalised(t))
        .filter(|t| looks_like_address(t) || email.as_ref() == Some(t))
        .chain(email.clone())
        .filter(|t| !t.is_empty())
        .collect();
    terms.sort();
    terms.dedup();
    terms
}

/// The address terms an earlier version may have written for `user` as stored: also their
/// display name when it looks like an address. What a write of the user takes out, when they
/// are not among the terms now.
pub fn address_terms_written_before(user: &User) -> Vec<String> {
    let mut terms = address_terms(user);
    let display = normalised(&user.display_name);
    if looks_like_address(&display) && !terms.contains(&display) {
        terms.push(display);
    }
    terms
}

/// The smallest of `user`'s prefix terms that `query` begins.
fn smallest_match(user: &User, query: &str) -> Option<String> {
    search_terms(user)
        .into_iter()
        .find(|term| term.starts_with(query))
}

/// The (term, user) position a user-search page stopped at.
pub type UserSearchPosition = (String, UserId);

/// A user search reads search terms this many at a time (at least; a page of more reads its size).
const USER_SCAN: usize = 32;

/// A user-search page reads at most this many batches of search terms, and reads the user of each
/// row: where few of the rows under a prefix are users' current terms, a page stops short (even
/// empty) with a cursor where its scan stopped, rather than reading every row under the prefix in
/// one request.
pub const USER_SCAN_BATCHES: usize = 3;

/// The most rows of search terms one user-search page reads (and so the most users it reads): with
/// the largest page, [`USER_SCAN_BATCHES`] batches of it.
pub const fn user_scan_rows(limit: usize) -> usize {
    let batch = if limit > USER_SCAN { limit } else { USER_SCAN };
    batch * USER_SCAN_BATCHES
}

/// Users whose user name or display name starts with `query` (case-insensitive), each once,
/// ordered by their smallest matching term, after `after`; or, when `query` is (or looks like) an
/// address, the users whose e-mail address (or address-like name) is `query`, whole. A part of an
/// address finds no one, and costs no more than a query nothing matches.
///
/// Returns the page and, when more may follow, the position to continue from. A page reads at
/// most [`user_scan_rows`] rows and their users: it may hold fewer than `limit` (even none) and
/// still have a position, where its scan stopped.
pub async fn search_users(
    store: &dyn Store,
    query: &str,
    after: Option<UserSearchPosition>,
    limit: usize,
) -> Result<(Vec<User>, Option<UserSearchPosition>), StoreError> {
    let query = normalised(query);
    if query.is_empty() || limit == 0 {
        return Ok((Vec::new(), None));
    }
    if looks_like_address(&query) {
        // No prefix term holds an '@': an address is looked up whole, on one page.
        if after.is_some() {
            return Ok((Vec::new(), None));
        }
        return Ok((users_at_address(store, &query, limit).await?, None));
    }
    let batch_size = limit.max(USER_SCAN);
    let mut after = after;
    let mut found = Vec::with_capacity(limit);
    for _ in 0..USER_SCAN_BATCHES {
        let batch = store.user_terms(&query, after.clone(), batch_size).await?;
        let exhausted = batch.len() < batch_size;
        let batch_end = batch.last().cloned();
        // Rows of an address (written before addresses had a table of their own) are skipped
        // unread: they are never a match.
        let rows: Vec<(String, UserId)> = batch
            .into_iter()
            .filter(|(term, _)| !looks_like_address(term))
            .collect();
        let ids: Vec<UserId> = rows.iter().map(|(_, user_id)| *user_id).collect();
        let users: Vec<Option<User>> = futures::stream::iter(ids)
            .map(|user_id| store.get_user(user_id))
            .buffered(USER_READS_IN_FLIGHT)
            .try_collect()
            .await?;
        for ((term, user_id), user) in rows.into_iter().zip(users) {
            let Some(user) = user else {
                continue;
            };
            // Each user appears once, at their smallest matching term; rows of old terms are stale.
            if smallest_match(&user, &query).as_ref() != Some(&term) {
                continue;
            }
            found.push(user);
            if found.len() == limit {
                return Ok((found, Some((term, user_id))));
            }
        }
        if exhausted {
            return Ok((found, None));
        }
        after = batch_end.or(after);
    }
    // Out of reads before the page filled: every row up to `after` has been looked at.
    Ok((found, after))
}

/// How many users a user search reads at once.
const USER_READS_IN_FLIGHT: usize = 16;

/// The users (at most `limit`) whose e-mail address, or address-like name, is `address`.
async fn users_at_address(
    store: &dyn Store,
    address: &str,
    limit: usize,
) -> Result<Vec<User>, StoreError> {
    let ids = store.users_by_address(address, limit).await?;
    let users: Vec<Option<User>> = futures::stream::iter(ids)
        .map(|id| store.get_user(id))
        .buffered(USER_READS_IN_FLIGHT)
        .try_collect()
        .await?;
    // A row of an address the user no longer has is stale.
    Ok(users
        .into_iter()
        .flatten()
        .filter(|user| address_terms(user).iter().any(|a| a == address))
        .collect())
}

/// What [`Store::put_circle_member`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberPut {
    Added,
    /// Already a member: renamed.
    Renamed,
    /// Not a member, and the circle is full.
    Full,
}

/// The pairing pool of a circle's lobby.
pub fn circle_pool(circle: CircleId) -> String {
    format!("circle:{circle}")
}

/// Readiness of a [`Store`].
pub struct StoreReadiness(pub Arc<dyn Store>);

impl ReadinessCheck for StoreReadiness {
    fn name(&self) -> &'static str {
        "store"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

/// The store's table of small objects, as [`InlineBlobs`](confab_runtime::blobs::InlineBlobs)
/// uses it.
pub struct StoreSmallObjects(pub Arc<dyn Store>);

fn blob_error(error: StoreError) -> BlobError {
    BlobError::Unavailable(error.to_string())
}

#[async_trait]
impl SmallObjects for StoreSmallObjects {
    async fn put(&self, name: &BlobName, bytes: bytes::Bytes) -> Result<(), BlobError> {
        self.0
            .put_small_object(name.as_str(), &bytes)
            .await
            .map_err(blob_error)
    }

    async fn get(&self, name: &BlobName) -> Result<Option<bytes::Bytes>, BlobError> {
        let found = self
            .0
            .small_object(name.as_str())
            .await
            .map_err(blob_error)?;
        Ok(found.map(bytes::Bytes::from))
    }

    async fn delete(&self, name: &BlobName) -> Result<(), BlobError> {
        self.0
            .delete_small_object(name.as_str())
            .await
            .map_err(blob_error)
    }

    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError> {
        let mut found = Vec::new();
        let mut after = after.map(|a| a.as_str().to_owned());
        while found.len() < limit {
            let want = limit - found.len();
            let page = self
                .0
                .small_objects(after.as_deref(), want)
                .await
                .map_err(blob_error)?;
            let full = page.len() >= want;
            after = page.last().map(|object| object.sha256.clone());
            // A row whose name is not a hash is left out (and the table asked on), as S3 leaves
            // out keys that are not object names: one bad row must not stop every collection.
            found.extend(page.into_iter().filter_map(|object| {
                match BlobName::parse(&object.sha256) {
                    Some(name) => Some(BlobInfo {
                        name,
                        size: object.size,
                        modified: object.stored_at,
                    }),
                    None => {
                        tracing::warn!(name = %object.sha256, "a small object whose name is not a hash");
                        None
                    }
                }
            }));
            if !full {
                break;
            }
        }
        Ok(found)
    }
}

/// Time as whole milliseconds since the epoch, the precision both stores keep.
pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

pub(crate) fn from_millis(ms: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

pub(crate) fn created_at(id: SignalId) -> Result<OffsetDateTime, StoreError> {
    id.created_at()
        .ok_or_else(|| StoreError::Corrupt(format!("signal id {id} is not time-ordered")))
}

pub(crate) fn parse<T: std::str::FromStr>(value: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e: T::Err| StoreError::Corrupt(e.to_string()))
}
