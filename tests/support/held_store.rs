//! A store that passes every call on to another, except the writes a test names: those wait at a
//! gate (before or after they are made) until the test lets them go, or fail (before or after they
//! are made), once, a number of times, or until the test lifts the rule. The tests of races
//! between requests play their interleaving with it, and the tests of writes that fail part-way
//! (the bookkeeping after a send, deletions, removals) make them fail where they choose, on any
//! store (the embedded one, or CQL). A bus that holds the publishing of the events a test names
//! plays the races between announcements likewise.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use confab_api::store::{
    CallRecord, ChatActivity, ChatEntry, InfoChange, Inserted, LeftChat, ListedCall, MarkerKind,
    MemberPut, NewChat, OutboxEntry, OutboxWriter, PendingCallSignal, Slot, SlotWrite,
    SmallObjectInfo, Store, StoreError,
};
use confab_runtime::bus::{Bus, BusError, ChatFilter, Page, ReadError};
use confab_schema::call::{CallState, CallStatus};
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::event::EventKind;
use confab_schema::{
    Chat, ChatId, CircleId, Envelope, LoggedEvent, Member, MemberRole, Signal, SignalId,
    SignalKind, User, UserId,
};
use futures::stream::BoxStream;
use time::OffsetDateTime;
use tokio::sync::watch;

use super::DEADLINE;

/// A kind of write a [`HeldStore`] can hold or fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// A chat's place moved in its members' lists (`Store::touch_chat`).
    ChatTouched,
    /// A chat taken out of a member's list (`Store::untouch_chat`).
    ChatUntouched,
    /// A read or delivery marker moved (`Store::advance_marker`).
    MarkerAdvanced,
    /// A guarded membership change (`Store::change_member`).
    MemberChanged,
    /// A message's text edited (`Store::edit_signal`).
    SignalEdited,
    /// A signal deleted, its tombstone written (`Store::delete_signal`).
    SignalDeleted,
    /// A participant put into a call by a join (`true`, `Store::put_call_participant`) or taken
    /// out of it (`false`, `Store::remove_call_participant`).
    CallParticipant(bool),
    /// What making an image's pictures found (`Store::update_derived`).
    Pictures,
    /// A message's claim on its attachments, before it is stored (`Store::claim_attachments`).
    Claim,
    /// A stored message's claim copied to its chat's lists (`Store::list_claimed_attachments`).
    ClaimListed,
    /// A `message` signal stored (`Store::insert_signal`).
    MessageInserted,
    /// A `call` signal of this state stored (`Store::insert_signal`).
    CallSignal(CallState),
    /// A signal the server writes of this kind (`joined`, `left`, `renamed`) stored
    /// (`Store::insert_signal`).
    SystemSignal(SignalKind),
    /// A call's status moved to this one (`Store::transition_call`).
    CallStatus(CallStatus),
    /// A call stored (`Store::create_call`). Failing it leaves what a CQL store's start that
    /// failed after its first write leaves: the call listed for the sweeper, and not stored.
    CallCreated,
    /// A join or leave of this state kept as pending before its participant moves
    /// (`Store::set_pending_call_signal` with one).
    PendingCallSignal(CallState),
    /// A conditional write of a pairing pool's slots (`Store::write_slots`).
    Slots,
    /// A chat made with its members (`Store::create_chat`).
    ChatCreated,
    /// A member added to a circle, or renamed in it (`Store::put_circle_member`).
    CircleMemberPut,
    /// A circle's own rows removed (`Store::delete_circle`).
    CircleDeleted,
    /// A push device removed (`Store::delete_device`).
    DeviceRemoved,
    /// A member taken out of a chat (`Store::remove_member`).
    MemberRemoved,
    /// A push device stored (`Store::put_device`).
    DevicePut,
    /// The sessions recorded for a user read (`Store::sessions_of`).
    SessionsRead,
    /// An upload's attachment record written (`Store::put_attachment`).
    AttachmentPut,
    /// An upload's references to its objects written (`Store::add_blob_refs`).
    BlobRefsAdded,
    /// A reaction stored (`Store::add_reaction`).
    ReactionAdded,
    /// A chat's name or description changed (`Store::update_chat`).
    ChatUpdated,
    /// Reaction counts of signals read (`Store::reaction_counts_of`), as a page of history is
    /// made.
    ReactionCountsRead,
}

/// What a [`HeldStore`] does with a write it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// It is made as it comes (a rule ahead of another, for the write after it).
    Pass,
    /// It waits at the gate.
    Hold,
    /// It is made, then waits at the gate.
    HoldAfter,
    /// It is not made, and fails.
    Fail,
    /// It is made, and fails all the same (a write that timed out after it was applied).
    FailAfter,
    /// It is not made, and fails saying it never will be (a write refused, or rolled back).
    Refuse,
    /// It fails, and is made later, when the test lands it (a write that timed out before it
    /// was applied, and was applied all the same). Messages only.
    FailThenLand,
}

/// The writes of one kind a [`HeldStore`] does something to, and how many more (`None`: every
/// one, until the rule is lifted).
#[derive(Debug)]
struct Rule {
    kind: Held,
    fault: Fault,
    left: Option<usize>,
}

/// Where held writes wait: how many arrived, whether it is open, how many were done after it
/// opened.
pub struct Gate {
    arrived: watch::Sender<usize>,
    open: watch::Sender<bool>,
    done: watch::Sender<usize>,
}

impl Gate {
    fn new() -> Gate {
        Gate {
            arrived: watch::Sender::new(0),
            open: watch::Sender::new(false),
            done: watch::Sender::new(0),
        }
    }

    async fn pass<T>(&self, write: impl Future<Output = T>) -> T {
        self.arrived.send_modify(|n| *n += 1);
        let mut open = self.open.subscribe();
        open.wait_for(|open| *open).await.expect("the gate is kept");
        let written = write.await;
        self.done.send_modify(|n| *n += 1);
        written
    }

    /// Writes that wait after they are made: `write` is done before it waits, and counts as done
    /// once the gate lets it go.
    async fn pass_after<T>(&self, write: impl Future<Output = T>) -> T {
        let written = write.await;
        self.pass(async { written }).await
    }

    /// Waits until `n` writes wait at the gate.
    pub async fn arrived(&self, n: usize) {
        let mut arrived = self.arrived.subscribe();
        tokio::time::timeout(DEADLINE, arrived.wait_for(|a| *a >= n))
            .await
            .expect("the held writes reached the store in time")
            .unwrap();
    }

    /// Makes the writes held from now on wait again (the counts go on).
    pub fn close(&self) {
        self.open.send_replace(false);
    }

    /// Lets the writes go on, and waits until `n` of them are done.
    pub async fn release(&self, n: usize) {
        self.open.send_replace(true);
        let mut done = self.done.subscribe();
        tokio::time::timeout(DEADLINE, done.wait_for(|d| *d >= n))
            .await
            .expect("the held writes were done in time")
            .unwrap();
    }
}

/// Reads a [`HeldStore`] counts, for tests of how much a request reads.
#[derive(Debug, Default)]
pub struct ReadCounts {
    /// Calls of `Store::markers_page`.
    pub marker_pages: AtomicUsize,
    /// Markers those calls answered.
    pub markers: AtomicUsize,
    /// Calls of `Store::members` (every member of a chat).
    pub whole_member_lists: AtomicUsize,
    /// Signals read one by one (`Store::get_signal`, which `Store::get_signals` reads through
    /// here): on CQL each is a read of its own.
    pub signals: AtomicUsize,
    /// Users read one by one (`Store::get_user`).
    pub users: AtomicUsize,
    /// Rows of search terms read (`Store::user_terms`).
    pub user_term_rows: AtomicUsize,
}

impl ReadCounts {
    /// The counts so far: marker pages, markers, whole member lists.
    pub fn now(&self) -> (usize, usize, usize) {
        (
            self.marker_pages.load(Ordering::SeqCst),
            self.markers.load(Ordering::SeqCst),
            self.whole_member_lists.load(Ordering::SeqCst),
        )
    }
}

/// Passes every call on to `inner`; the writes its rules name wait at `gate` or fail.
pub struct HeldStore {
    pub inner: Arc<dyn Store>,
    rules: Mutex<Vec<Rule>>,
    /// Messages whose write failed and is still to be made ([`HeldStore::land_late_messages`]).
    late_messages: Mutex<Vec<Signal>>,
    pub gate: Gate,
    pub reads: ReadCounts,
}

impl HeldStore {
    pub fn new(inner: Arc<dyn Store>) -> HeldStore {
        HeldStore {
            inner,
            rules: Mutex::new(Vec::new()),
            late_messages: Mutex::new(Vec::new()),
            gate: Gate::new(),
            reads: ReadCounts::default(),
        }
    }

    fn rule(&self, kind: Held, fault: Fault, left: Option<usize>) {
        self.rules.lock().unwrap().push(Rule { kind, fault, left });
    }

    /// Holds every write of kind `held`.
    pub fn hold(&self, held: Held) {
        self.rule(held, Fault::Hold, None);
    }

    /// Lets the next write of kind `held` be made as it comes: with a rule after this one, that
    /// rule meets the write after it.
    pub fn pass_next(&self, held: Held) {
        self.rule(held, Fault::Pass, Some(1));
    }

    /// Holds the next write of kind `held` only.
    pub fn hold_next(&self, held: Held) {
        self.rule(held, Fault::Hold, Some(1));
    }

    /// Makes every write of kind `held`, then holds it.
    pub fn hold_after(&self, held: Held) {
        self.rule(held, Fault::HoldAfter, None);
    }

    /// Fails every write of kind `held` without making it, until [`HeldStore::lift`].
    pub fn fail_every(&self, held: Held) {
        self.rule(held, Fault::Fail, None);
    }

    /// Makes every write of kind `held`, then fails it, until [`HeldStore::lift`].
    pub fn fail_every_after(&self, held: Held) {
        self.rule(held, Fault::FailAfter, None);
    }

    /// Drops the rules for writes of kind `held`: the next ones are made as they come (those
    /// already held still wait for the gate).
    pub fn lift(&self, held: Held) {
        self.rules.lock().unwrap().retain(|rule| rule.kind != held);
    }

    /// Fails the next `times` writes of kind `held` without making them.
    pub fn fail(&self, held: Held, times: usize) {
        self.rule(held, Fault::Fail, Some(times));
    }

    /// Fails the next write of kind `held` without making it.
    pub fn fail_next(&self, held: Held) {
        self.fail(held, 1);
    }

    /// Makes the next write of kind `held`, then fails it: a write that timed out after it was
    /// applied.
    pub fn fail_next_after(&self, held: Held) {
        self.rule(held, Fault::FailAfter, Some(1));
    }

    /// Fails the next write of kind `held` without making it, saying that it never will be.
    pub fn refuse_next(&self, held: Held) {
        self.rule(held, Fault::Refuse, Some(1));
    }

    /// Fails the next message's write without making it; [`HeldStore::land_late_messages`] makes
    /// it later: a write that timed out and was applied all the same.
    pub fn fail_next_and_land_later(&self) {
        self.rule(Held::MessageInserted, Fault::FailThenLand, Some(1));
    }

    /// Makes the messages' writes that failed to be made later, as they were sent.
    pub async fn land_late_messages(&self) {
        let late = std::mem::take(&mut *self.late_messages.lock().unwrap());
        for message in late {
            self.inner
                .insert_signal(&message)
                .await
                .expect("the late write is made");
        }
    }

    /// What to do with a write of kind `write`: the first rule naming it, one use of it taken.
    fn fault(&self, write: Held) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        let at = rules.iter().position(|rule| rule.kind == write)?;
        let fault = rules[at].fault;
        match &mut rules[at].left {
            Some(1) => {
                rules.remove(at);
            }
            Some(n) => *n -= 1,
            None => {}
        }
        Some(fault)
    }

    /// Whether the rule the next write of kind `write` meets does `fault`.
    fn next_fault_is(&self, write: Held, fault: Fault) -> bool {
        let rules = self.rules.lock().unwrap();
        rules
            .iter()
            .find(|rule| rule.kind == write)
            .is_some_and(|rule| rule.fault == fault)
    }

    fn failure(&self, write: Held) -> StoreError {
        StoreError::Unavailable(format!("{write:?} failed on purpose"))
    }

    async fn through<T>(
        &self,
        write: Held,
        done: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match self.fault(write) {
            None | Some(Fault::Pass) => done.await,
            Some(Fault::Hold) => self.gate.pass(done).await,
            Some(Fault::HoldAfter) => self.gate.pass_after(done).await,
            Some(Fault::Fail) => Err(self.failure(write)),
            Some(Fault::FailAfter) => {
                done.await?;
                Err(self.failure(write))
            }
            Some(Fault::Refuse) => Err(StoreError::NotWritten(format!(
                "{write:?} refused on purpose"
            ))),
            Some(Fault::FailThenLand) => {
                unreachable!("{write:?}: only a message's write lands later")
            }
        }
    }
}

#[async_trait]
impl Store for HeldStore {
    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.inner.upsert_user(user).await
    }
    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.reads.users.fetch_add(1, Ordering::SeqCst);
        self.inner.get_user(id).await
    }
    async fn user_terms(
        &self,
        prefix: &str,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        let rows = self.inner.user_terms(prefix, after, limit).await?;
        self.reads
            .user_term_rows
            .fetch_add(rows.len(), Ordering::SeqCst);
        Ok(rows)
    }
    async fn users_by_address(
        &self,
        address: &str,
        limit: usize,
    ) -> Result<Vec<UserId>, StoreError> {
        self.inner.users_by_address(address, limit).await
    }
    async fn create_chat(&self, chat: &NewChat) -> Result<(), StoreError> {
        self.through(Held::ChatCreated, self.inner.create_chat(chat))
            .await
    }
    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        self.inner.get_chat(id).await
    }
    async fn update_chat(&self, id: ChatId, change: InfoChange<'_>) -> Result<(), StoreError> {
        self.through(Held::ChatUpdated, self.inner.update_chat(id, change))
            .await
    }
    async fn member_role(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<MemberRole>, StoreError> {
        self.inner.member_role(chat, user).await
    }
    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError> {
        self.reads.whole_member_lists.fetch_add(1, Ordering::SeqCst);
        self.inner.members(chat).await
    }
    async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, StoreError> {
        self.inner.chats_of(user).await
    }
    async fn chat_ids(
        &self,
        after: Option<ChatId>,
        limit: usize,
    ) -> Result<Vec<ChatId>, StoreError> {
        self.inner.chat_ids(after, limit).await
    }
    async fn put_attachment(
        &self,
        attachment: &confab_schema::Attachment,
    ) -> Result<(), StoreError> {
        self.through(Held::AttachmentPut, self.inner.put_attachment(attachment))
            .await
    }
    async fn claim_attachments(
        &self,
        chat: ChatId,
        ids: &[uuid::Uuid],
        message: SignalId,
    ) -> Result<Vec<(uuid::Uuid, SignalId)>, StoreError> {
        self.through(
            Held::Claim,
            self.inner.claim_attachments(chat, ids, message),
        )
        .await
    }
    async fn release_attachments(
        &self,
        chat: ChatId,
        ids: &[uuid::Uuid],
        message: SignalId,
    ) -> Result<(), StoreError> {
        self.inner.release_attachments(chat, ids, message).await
    }
    async fn list_claimed_attachments(
        &self,
        chat: ChatId,
        ids: &[uuid::Uuid],
        message: SignalId,
    ) -> Result<(), StoreError> {
        self.through(
            Held::ClaimListed,
            self.inner.list_claimed_attachments(chat, ids, message),
        )
        .await
    }
    async fn update_derived(
        &self,
        id: uuid::Uuid,
        chat: ChatId,
        stored_as: confab_schema::AttachmentKind,
        kind: confab_schema::AttachmentKind,
        image: Option<&confab_schema::attachment::ImageInfo>,
    ) -> Result<Option<confab_schema::Attachment>, StoreError> {
        self.through(
            Held::Pictures,
            self.inner.update_derived(id, chat, stored_as, kind, image),
        )
        .await
    }
    async fn add_blob_refs(
        &self,
        attachment: uuid::Uuid,
        blobs: &[String],
    ) -> Result<(), StoreError> {
        self.through(
            Held::BlobRefsAdded,
            self.inner.add_blob_refs(attachment, blobs),
        )
        .await
    }
    async fn get_attachments(
        &self,
        ids: &[uuid::Uuid],
    ) -> Result<Vec<confab_schema::Attachment>, StoreError> {
        self.inner.get_attachments(ids).await
    }
    async fn chat_attachments(
        &self,
        chat: ChatId,
        kind: Option<confab_schema::AttachmentKind>,
        before: Option<uuid::Uuid>,
        limit: usize,
    ) -> Result<Vec<confab_schema::Attachment>, StoreError> {
        self.inner.chat_attachments(chat, kind, before, limit).await
    }
    async fn delete_attachments(
        &self,
        attachments: &[confab_schema::Attachment],
    ) -> Result<(), StoreError> {
        self.inner.delete_attachments(attachments).await
    }
    async fn blob_referrers(
        &self,
        sha256: &str,
        after: Option<uuid::Uuid>,
        limit: usize,
    ) -> Result<Vec<uuid::Uuid>, StoreError> {
        self.inner.blob_referrers(sha256, after, limit).await
    }
    async fn drop_blob_ref(&self, sha256: &str, attachment: uuid::Uuid) -> Result<(), StoreError> {
        self.inner.drop_blob_ref(sha256, attachment).await
    }
    async fn condemn_blob(
        &self,
        sha256: &str,
        run: uuid::Uuid,
        until: time::OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.inner.condemn_blob(sha256, run, until).await
    }
    async fn blob_condemned(
        &self,
        sha256: &str,
    ) -> Result<Option<time::OffsetDateTime>, StoreError> {
        self.inner.blob_condemned(sha256).await
    }
    async fn absolve_blob(&self, sha256: &str, run: uuid::Uuid) -> Result<(), StoreError> {
        self.inner.absolve_blob(sha256, run).await
    }
    async fn put_small_object(&self, sha256: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.put_small_object(sha256, bytes).await
    }
    async fn small_object(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.small_object(sha256).await
    }
    async fn delete_small_object(&self, sha256: &str) -> Result<(), StoreError> {
        self.inner.delete_small_object(sha256).await
    }
    async fn small_objects(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SmallObjectInfo>, StoreError> {
        self.inner.small_objects(after, limit).await
    }
    async fn put_device(
        &self,
        device: &confab_schema::push::Device,
    ) -> Result<Option<confab_schema::push::Device>, StoreError> {
        self.through(Held::DevicePut, self.inner.put_device(device))
            .await
    }
    async fn record_session(
        &self,
        user: UserId,
        session: &str,
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        self.inner.record_session(user, session, ttl).await
    }
    async fn sessions_of(&self, user: UserId) -> Result<Vec<String>, StoreError> {
        self.through(Held::SessionsRead, self.inner.sessions_of(user))
            .await
    }
    async fn forget_sessions(&self, user: UserId, sessions: &[String]) -> Result<(), StoreError> {
        self.inner.forget_sessions(user, sessions).await
    }
    async fn devices_of(
        &self,
        user: UserId,
    ) -> Result<Vec<confab_schema::push::Device>, StoreError> {
        self.inner.devices_of(user).await
    }
    async fn delete_device(
        &self,
        user: UserId,
        id: confab_schema::DeviceId,
    ) -> Result<bool, StoreError> {
        self.through(Held::DeviceRemoved, self.inner.delete_device(user, id))
            .await
    }
    async fn user_settings(
        &self,
        users: &[UserId],
    ) -> Result<Vec<(UserId, confab_schema::settings::UserSettings)>, StoreError> {
        self.inner.user_settings(users).await
    }
    async fn put_user_settings(
        &self,
        user: UserId,
        settings: &confab_schema::settings::UserSettings,
    ) -> Result<(), StoreError> {
        self.inner.put_user_settings(user, settings).await
    }
    async fn chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<confab_schema::settings::ChatSettings>, StoreError> {
        self.inner.chat_settings(chat, user).await
    }
    async fn chat_settings_of(
        &self,
        chat: ChatId,
    ) -> Result<Vec<(UserId, confab_schema::settings::ChatSettings)>, StoreError> {
        self.inner.chat_settings_of(chat).await
    }
    async fn put_chat_settings(
        &self,
        chat: ChatId,
        user: UserId,
        settings: &confab_schema::settings::ChatSettings,
    ) -> Result<(), StoreError> {
        self.inner.put_chat_settings(chat, user, settings).await
    }
    async fn members_among(
        &self,
        chat: ChatId,
        users: &[UserId],
    ) -> Result<Vec<Member>, StoreError> {
        self.inner.members_among(chat, users).await
    }
    async fn members_page(
        &self,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<Member>, StoreError> {
        self.inner.members_page(chat, after, limit).await
    }
    async fn put_member(&self, chat: ChatId, member: &Member) -> Result<(), StoreError> {
        self.inner.put_member(chat, member).await
    }
    async fn remove_member(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.through(Held::MemberRemoved, self.inner.remove_member(chat, user))
            .await
    }
    async fn forget_left_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.inner.forget_left_chat(chat, user).await
    }
    async fn left_chats_of(
        &self,
        user: UserId,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<LeftChat>, StoreError> {
        self.inner.left_chats_of(user, since, limit).await
    }
    async fn restore_joined_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.inner.restore_joined_chat(chat, user).await
    }
    async fn change_member(
        &self,
        chat: ChatId,
        change: &confab_api::store::GuardedChange,
    ) -> Result<bool, StoreError> {
        self.through(Held::MemberChanged, self.inner.change_member(chat, change))
            .await
    }
    async fn touch_chat(
        &self,
        chat: ChatId,
        members: &[UserId],
        activity: SignalId,
        latest: Option<&Signal>,
    ) -> Result<(), StoreError> {
        self.through(
            Held::ChatTouched,
            self.inner.touch_chat(chat, members, activity, latest),
        )
        .await
    }
    async fn untouch_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.through(Held::ChatUntouched, self.inner.untouch_chat(chat, user))
            .await
    }
    async fn chats_by_activity(
        &self,
        user: UserId,
        after: Option<ChatActivity>,
        limit: usize,
    ) -> Result<Vec<ChatActivity>, StoreError> {
        self.inner.chats_by_activity(user, after, limit).await
    }
    async fn chat_entries(
        &self,
        user: UserId,
        chats: &[ChatId],
    ) -> Result<Vec<ChatEntry>, StoreError> {
        self.inner.chat_entries(user, chats).await
    }
    async fn insert_signal(&self, signal: &Signal) -> Result<Inserted, StoreError> {
        match &signal.call {
            Some(call) => {
                self.through(
                    Held::CallSignal(call.state),
                    self.inner.insert_signal(signal),
                )
                .await
            }
            None if signal.kind == SignalKind::Message => {
                if self.next_fault_is(Held::MessageInserted, Fault::FailThenLand) {
                    self.fault(Held::MessageInserted);
                    self.late_messages.lock().unwrap().push(signal.clone());
                    return Err(self.failure(Held::MessageInserted));
                }
                self.through(Held::MessageInserted, self.inner.insert_signal(signal))
                    .await
            }
            None => {
                self.through(
                    Held::SystemSignal(signal.kind),
                    self.inner.insert_signal(signal),
                )
                .await
            }
        }
    }
    async fn nonce_holder(
        &self,
        chat: ChatId,
        author: UserId,
        nonce: &str,
    ) -> Result<Option<SignalId>, StoreError> {
        self.inner.nonce_holder(chat, author, nonce).await
    }
    async fn get_signal(&self, chat: ChatId, id: SignalId) -> Result<Option<Signal>, StoreError> {
        self.reads
            .signals
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.get_signal(chat, id).await
    }
    async fn edit_signal(
        &self,
        chat: ChatId,
        id: SignalId,
        text: &str,
        edited_at: OffsetDateTime,
    ) -> Result<Option<Signal>, StoreError> {
        self.through(
            Held::SignalEdited,
            self.inner.edit_signal(chat, id, text, edited_at),
        )
        .await
    }
    async fn delete_signal(
        &self,
        chat: ChatId,
        id: SignalId,
    ) -> Result<Option<Signal>, StoreError> {
        self.through(Held::SignalDeleted, self.inner.delete_signal(chat, id))
            .await
    }
    async fn signals_before(
        &self,
        chat: ChatId,
        before: Option<SignalId>,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError> {
        self.inner.signals_before(chat, before, limit).await
    }
    async fn signals_after(
        &self,
        chat: ChatId,
        after: SignalId,
        limit: usize,
    ) -> Result<Vec<Signal>, StoreError> {
        self.inner.signals_after(chat, after, limit).await
    }
    async fn count_unread(
        &self,
        chat: ChatId,
        after: Option<SignalId>,
        through: Option<SignalId>,
        chat_created_at: OffsetDateTime,
        reader: UserId,
        cap: usize,
    ) -> Result<usize, StoreError> {
        self.inner
            .count_unread(chat, after, through, chat_created_at, reader, cap)
            .await
    }
    async fn add_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.through(
            Held::ReactionAdded,
            self.inner.add_reaction(chat, signal, emoji, user),
        )
        .await
    }
    async fn remove_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.inner.remove_reaction(chat, signal, emoji, user).await
    }
    async fn has_reaction(
        &self,
        chat: ChatId,
        signal: SignalId,
        emoji: &str,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.inner.has_reaction(chat, signal, emoji, user).await
    }
    async fn reaction_counts_of(
        &self,
        chat: ChatId,
        signals: &[SignalId],
    ) -> Result<HashMap<SignalId, BTreeMap<String, i64>>, StoreError> {
        self.through(
            Held::ReactionCountsRead,
            self.inner.reaction_counts_of(chat, signals),
        )
        .await
    }
    async fn reactions_page(
        &self,
        chat: ChatId,
        signal: SignalId,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        self.inner.reactions_page(chat, signal, after, limit).await
    }
    async fn advance_marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
        up_to: SignalId,
    ) -> Result<(), StoreError> {
        self.through(
            Held::MarkerAdvanced,
            self.inner.advance_marker(kind, chat, user, up_to),
        )
        .await
    }
    async fn marker(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<SignalId>, StoreError> {
        self.inner.marker(kind, chat, user).await
    }
    async fn markers_page(
        &self,
        kind: MarkerKind,
        chat: ChatId,
        after: Option<UserId>,
        limit: usize,
    ) -> Result<Vec<(UserId, SignalId)>, StoreError> {
        let page = self.inner.markers_page(kind, chat, after, limit).await?;
        self.reads.marker_pages.fetch_add(1, Ordering::SeqCst);
        self.reads.markers.fetch_add(page.len(), Ordering::SeqCst);
        Ok(page)
    }
    async fn outbox_put(&self, writer: uuid::Uuid, entry: &OutboxEntry) -> Result<(), StoreError> {
        self.inner.outbox_put(writer, entry).await
    }
    async fn outbox_remove(
        &self,
        writer: uuid::Uuid,
        bucket: i64,
        ids: &[uuid::Uuid],
    ) -> Result<(), StoreError> {
        self.inner.outbox_remove(writer, bucket, ids).await
    }
    async fn outbox_entries(
        &self,
        writer: uuid::Uuid,
        from: i64,
        to: i64,
    ) -> Result<Vec<OutboxEntry>, StoreError> {
        self.inner.outbox_entries(writer, from, to).await
    }
    async fn outbox_heartbeat(
        &self,
        writer: uuid::Uuid,
        entries_from_ms: i64,
        seen_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner
            .outbox_heartbeat(writer, entries_from_ms, seen_ms)
            .await
    }
    async fn outbox_writers(&self) -> Result<Vec<OutboxWriter>, StoreError> {
        self.inner.outbox_writers().await
    }
    async fn outbox_claim(
        &self,
        writer: uuid::Uuid,
        sweeper: uuid::Uuid,
        claim_ttl_secs: i32,
    ) -> Result<bool, StoreError> {
        self.inner
            .outbox_claim(writer, sweeper, claim_ttl_secs)
            .await
    }
    async fn outbox_forget_writer(&self, writer: uuid::Uuid) -> Result<(), StoreError> {
        self.inner.outbox_forget_writer(writer).await
    }
    async fn delete_chat(&self, chat: ChatId) -> Result<(), StoreError> {
        self.inner.delete_chat(chat).await
    }
    async fn create_circle(&self, circle: &Circle) -> Result<(), StoreError> {
        self.inner.create_circle(circle).await
    }
    async fn get_circle(&self, id: CircleId) -> Result<Option<Circle>, StoreError> {
        self.inner.get_circle(id).await
    }
    async fn circle_by_code(&self, code: &str) -> Result<Option<CircleId>, StoreError> {
        self.inner.circle_by_code(code).await
    }
    async fn rotate_circle_code(
        &self,
        id: CircleId,
        old: &str,
        new: &str,
    ) -> Result<(), StoreError> {
        self.inner.rotate_circle_code(id, old, new).await
    }
    async fn put_circle_member(
        &self,
        circle: CircleId,
        member: &CircleMember,
        max_members: u32,
    ) -> Result<MemberPut, StoreError> {
        self.through(
            Held::CircleMemberPut,
            self.inner.put_circle_member(circle, member, max_members),
        )
        .await
    }
    async fn circle_members(&self, circle: CircleId) -> Result<Vec<CircleMember>, StoreError> {
        self.inner.circle_members(circle).await
    }
    async fn remove_circle_member(&self, circle: CircleId, user: UserId) -> Result<(), StoreError> {
        self.inner.remove_circle_member(circle, user).await
    }
    async fn record_circle_removal(
        &self,
        circle: CircleId,
        user: UserId,
        circle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.inner
            .record_circle_removal(circle, user, circle_expires_at)
            .await
    }
    async fn removed_from_circle(
        &self,
        circle: CircleId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        self.inner.removed_from_circle(circle, user).await
    }
    async fn add_circle_chat(&self, circle: CircleId, chat: ChatId) -> Result<(), StoreError> {
        self.inner.add_circle_chat(circle, chat).await
    }
    async fn circle_chats(&self, circle: CircleId) -> Result<Vec<ChatId>, StoreError> {
        self.inner.circle_chats(circle).await
    }
    async fn expired_circles(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CircleId>, StoreError> {
        self.inner.expired_circles(now, limit).await
    }
    async fn delete_circle(&self, id: CircleId) -> Result<(), StoreError> {
        self.through(Held::CircleDeleted, self.inner.delete_circle(id))
            .await
    }
    async fn slots(&self, pool: &str) -> Result<Vec<Slot>, StoreError> {
        self.inner.slots(pool).await
    }
    async fn write_slots(&self, pool: &str, writes: &[SlotWrite]) -> Result<bool, StoreError> {
        self.through(Held::Slots, self.inner.write_slots(pool, writes))
            .await
    }
    async fn create_call(&self, call: &CallRecord) -> Result<Option<CallRecord>, StoreError> {
        match self.fault(Held::CallCreated) {
            Some(Fault::Fail) => {
                self.inner
                    .list_call(&ListedCall {
                        id: call.id,
                        chat_id: call.chat_id,
                        due: call.ring_until,
                    })
                    .await?;
                Err(self.failure(Held::CallCreated))
            }
            Some(Fault::FailAfter) => {
                self.inner.create_call(call).await?;
                Err(self.failure(Held::CallCreated))
            }
            Some(Fault::Hold) => self.gate.pass(self.inner.create_call(call)).await,
            Some(Fault::HoldAfter) => self.gate.pass_after(self.inner.create_call(call)).await,
            Some(fault @ (Fault::Refuse | Fault::FailThenLand)) => {
                unreachable!("a call's start is not made to fail with {fault:?}")
            }
            None | Some(Fault::Pass) => self.inner.create_call(call).await,
        }
    }
    async fn get_call(&self, id: uuid::Uuid) -> Result<Option<CallRecord>, StoreError> {
        self.inner.get_call(id).await
    }
    async fn transition_call(
        &self,
        id: uuid::Uuid,
        from: CallStatus,
        to: CallStatus,
    ) -> Result<bool, StoreError> {
        self.through(
            Held::CallStatus(to),
            self.inner.transition_call(id, from, to),
        )
        .await
    }
    async fn live_calls(&self, chat: ChatId) -> Result<Vec<CallRecord>, StoreError> {
        self.inner.live_calls(chat).await
    }
    async fn call_participants(&self, id: uuid::Uuid) -> Result<Vec<UserId>, StoreError> {
        self.inner.call_participants(id).await
    }
    async fn remove_call_participant(
        &self,
        id: uuid::Uuid,
        user: UserId,
    ) -> Result<(), StoreError> {
        self.through(
            Held::CallParticipant(false),
            self.inner.remove_call_participant(id, user),
        )
        .await
    }
    async fn put_call_participant(
        &self,
        id: uuid::Uuid,
        user: UserId,
        join: uuid::Uuid,
    ) -> Result<Option<uuid::Uuid>, StoreError> {
        self.through(
            Held::CallParticipant(true),
            self.inner.put_call_participant(id, user, join),
        )
        .await
    }
    async fn call_participant_join(
        &self,
        id: uuid::Uuid,
        user: UserId,
    ) -> Result<Option<uuid::Uuid>, StoreError> {
        self.inner.call_participant_join(id, user).await
    }
    async fn pending_call_signal(
        &self,
        id: uuid::Uuid,
        user: UserId,
    ) -> Result<Option<PendingCallSignal>, StoreError> {
        self.inner.pending_call_signal(id, user).await
    }
    async fn set_pending_call_signal(
        &self,
        id: uuid::Uuid,
        user: UserId,
        pending: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        self.through(
            Held::PendingCallSignal(pending.state),
            self.inner.set_pending_call_signal(id, user, pending),
        )
        .await
    }
    async fn forget_pending_call_signal(
        &self,
        id: uuid::Uuid,
        user: UserId,
        done: &PendingCallSignal,
    ) -> Result<(), StoreError> {
        self.inner.forget_pending_call_signal(id, user, done).await
    }
    async fn list_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        self.inner.list_call(call).await
    }
    async fn listed_calls_due(
        &self,
        now: OffsetDateTime,
        after: Option<&ListedCall>,
        limit: usize,
    ) -> Result<Vec<ListedCall>, StoreError> {
        self.inner.listed_calls_due(now, after, limit).await
    }
    async fn forget_listed_call(&self, call: &ListedCall) -> Result<(), StoreError> {
        self.inner.forget_listed_call(call).await
    }
}

/// Passes every call on to `inner`, except the publishing of the next event of a kind a test
/// names: it waits at `gate` until the test lets it go.
pub struct HeldBus {
    pub inner: Arc<dyn Bus>,
    held: Mutex<Vec<EventKind>>,
    /// Kinds of events whose next publishing (logged or ephemeral) fails, once each.
    failing: Mutex<Vec<EventKind>>,
    pub gate: Gate,
}

impl HeldBus {
    pub fn new(inner: Arc<dyn Bus>) -> HeldBus {
        HeldBus {
            inner,
            held: Mutex::new(Vec::new()),
            failing: Mutex::new(Vec::new()),
            gate: Gate::new(),
        }
    }

    /// Holds the next publishing of an event of kind `kind`.
    pub fn hold_next(&self, kind: EventKind) {
        self.held.lock().unwrap().push(kind);
    }

    /// Fails the next publishing of an event of kind `kind` (not made).
    pub fn fail_next(&self, kind: EventKind) {
        self.failing.lock().unwrap().push(kind);
    }

    /// Whether this publishing of `envelope` is one to fail (and forgets the rule).
    fn fails(&self, envelope: &Envelope) -> bool {
        let mut failing = self.failing.lock().unwrap();
        let kind = envelope.event.kind();
        failing
            .iter()
            .position(|k| *k == kind)
            .map(|at| failing.remove(at))
            .is_some()
    }

    /// Every logged event of `chat`, in the log's order.
    pub async fn events_of(&self, chat: ChatId) -> Vec<LoggedEvent> {
        let last = self.inner.last_seq().await.unwrap();
        let chats = std::collections::HashSet::from([chat]);
        self.inner
            .read(0, last, ChatFilter::Only(&chats), 1_000)
            .await
            .unwrap()
    }
}

#[async_trait]
impl Bus for HeldBus {
    async fn publish(&self, envelope: &Envelope) -> Result<u64, BusError> {
        if self.fails(envelope) {
            return Err(BusError::Unavailable("failed on purpose".into()));
        }
        let held = {
            let mut held = self.held.lock().unwrap();
            let kind = envelope.event.kind();
            held.iter()
                .position(|k| *k == kind)
                .map(|at| held.remove(at))
                .is_some()
        };
        if held {
            self.gate.pass(self.inner.publish(envelope)).await
        } else {
            self.inner.publish(envelope).await
        }
    }
    async fn subscribe(&self) -> Result<BoxStream<'static, LoggedEvent>, BusError> {
        self.inner.subscribe().await
    }
    async fn last_seq(&self) -> Result<u64, BusError> {
        self.inner.last_seq().await
    }
    async fn read_page(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        max: usize,
        max_scan: usize,
    ) -> Result<Page, ReadError> {
        self.inner
            .read_page(after, up_to, chats, max, max_scan)
            .await
    }
    async fn appended_at(&self, seq: u64) -> Result<Option<OffsetDateTime>, BusError> {
        self.inner.appended_at(seq).await
    }
    async fn publish_ephemeral(&self, envelope: &Envelope) -> Result<(), BusError> {
        if self.fails(envelope) {
            return Err(BusError::Unavailable("failed on purpose".into()));
        }
        self.inner.publish_ephemeral(envelope).await
    }
    async fn subscribe_ephemeral(&self) -> Result<BoxStream<'static, Envelope>, BusError> {
        self.inner.subscribe_ephemeral().await
    }
    async fn check(&self) -> Result<(), BusError> {
        self.inner.check().await
    }
}

/// The API's operations without HTTP, on `stack`'s store and bus behind a [`HeldStore`]: for the
/// tests that play an interleaving of operations (each test file adds its own helpers).
pub struct HeldApi {
    _dir: tempfile::TempDir,
    pub config: confab_runtime::config::Config,
    pub store: Arc<HeldStore>,
    /// The store `store` passes its calls to: another [`HeldStore`], with rules and a gate of its
    /// own, for the tests that hold two writes in turn (a gate opens once).
    pub under: Arc<HeldStore>,
    pub bus: Arc<HeldBus>,
    pub state: confab_api::ApiState,
}

impl HeldApi {
    pub async fn new(stack: super::Stack) -> HeldApi {
        let dir = tempfile::tempdir().unwrap();
        let config = super::config_for(stack, dir.path().to_path_buf());
        let under = Arc::new(HeldStore::new(
            confab::open_store(&config, true).await.unwrap(),
        ));
        let store = Arc::new(HeldStore::new(Arc::clone(&under) as Arc<dyn Store>));
        let bus = Arc::new(HeldBus::new(confab::open_bus(&config).await.unwrap()));
        let identity = Arc::new(confab_runtime::identity::DevIdentity::open(dir.path()).unwrap());
        let state = confab_api::ApiState::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&bus) as Arc<dyn Bus>,
            identity,
            &confab_runtime::signed::Keyring::random(),
        )
        .with_republish_window(config.log_settings().duplicate_window);
        HeldApi {
            _dir: dir,
            config,
            store,
            under,
            bus,
            state,
        }
    }

    /// A user stored as the identity provider's first sign-in would.
    pub async fn user(&self, name: &str) -> User {
        let user = User {
            id: UserId(uuid::Uuid::now_v7()),
            username: name.to_owned(),
            display_name: name.to_owned(),
            email: None,
        };
        self.store.upsert_user(&user).await.unwrap();
        user
    }

    /// Drops what it made on the real services.
    pub async fn clean_up(self) {
        if self.config.store.backend == confab_runtime::config::StoreBackend::Cql {
            Box::pin(super::clean_up_real(&self.config)).await;
        }
    }
}

/// A group of `owner`'s named `name` with `members`, made through `state`'s operation.
pub async fn group(
    state: &confab_api::ApiState,
    owner: &User,
    name: &str,
    members: &[UserId],
) -> ChatId {
    use confab_api::domain::Outcome;
    use confab_api::domain::chats::ChatToCreate;
    let chat = ChatToCreate::parse(
        confab_schema::ChatKind::Group,
        Some(name.into()),
        None,
        members.to_vec(),
    )
    .unwrap();
    match state.create_chat(owner, chat).await.unwrap() {
        Outcome::Created(chat) | Outcome::Existing(chat) => chat.id,
    }
}

/// `author`'s message `text` in `chat`, sent through `state`'s operation: its id.
pub async fn message(
    state: &confab_api::ApiState,
    author: &User,
    chat: ChatId,
    text: &str,
) -> confab_schema::SignalId {
    use confab_api::domain::Outcome;
    use confab_api::domain::inputs::MessageText;
    use confab_api::domain::signals::NewMessage;
    let message = NewMessage {
        nonce: None,
        text: Some(MessageText::parse(text.into()).unwrap()),
        reply_to: None,
        attachments: Default::default(),
    };
    match state.send_message(author, chat, message).await.unwrap() {
        Outcome::Created(signal) | Outcome::Existing(signal) => signal.id,
    }
}
