//! Racing changes to one call settle to a consistent state: the last participants leaving at once
//! end the call (one of them sees nobody left), and an answer racing the last leave of an active
//! call is refused rather than joining a call that is over. The interleavings are forced by a
//! store that holds one participant write until the test lets it go. On the embedded default and
//! on the real stack (the CQL store and NATS).

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use confab_api::ApiState;
use confab_api::domain::chats::ChatToCreate;
use confab_api::error::ApiError;
use confab_api::store::{
    CallRecord, ChatActivity, ChatEntry, Inserted, MarkerKind, MemberPut, NewChat, OutboxEntry,
    OutboxWriter, RingingCall, Slot, SlotWrite, SmallObjectInfo, Store, StoreError,
};
use confab_runtime::identity::DevIdentity;
use confab_schema::call::{CallState, CallStatus};
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::{
    Chat, ChatId, ChatKind, CircleId, Member, MemberRole, Signal, SignalId, SignalKind, User,
    UserId,
};
use support::{DEADLINE, Stack};
use time::OffsetDateTime;

/// A store that holds the next write of one kind to `call_participants` (an addition or a
/// removal) before it is done, until the test lets it go.
struct GatedCalls {
    inner: Arc<dyn Store>,
    /// `Some(present)`: the next write putting a participant in (`true`) or taking one out
    /// (`false`) waits. Taken by that write, so one write waits.
    hold: Mutex<Option<bool>>,
    /// Notified when the held write starts to wait.
    reached: tokio::sync::Notify,
    /// Lets the held write go on.
    released: tokio::sync::Notify,
}

impl GatedCalls {
    /// Holds the next participant write of kind `present`.
    fn hold_next(&self, present: bool) {
        *self.hold.lock().unwrap() = Some(present);
    }

    /// Waits until the held write waits.
    async fn reached(&self) {
        tokio::time::timeout(DEADLINE, self.reached.notified())
            .await
            .expect("the write reached the store");
    }

    fn release(&self) {
        self.released.notify_one();
    }
}

#[async_trait]
impl Store for GatedCalls {
    async fn check(&self) -> Result<(), StoreError> {
        self.inner.check().await
    }
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.inner.upsert_user(user).await
    }
    async fn get_user(&self, id: UserId) -> Result<Option<User>, StoreError> {
        self.inner.get_user(id).await
    }
    async fn user_terms(
        &self,
        prefix: &str,
        after: Option<(String, UserId)>,
        limit: usize,
    ) -> Result<Vec<(String, UserId)>, StoreError> {
        self.inner.user_terms(prefix, after, limit).await
    }
    async fn create_chat(&self, chat: &NewChat) -> Result<(), StoreError> {
        self.inner.create_chat(chat).await
    }
    async fn get_chat(&self, id: ChatId) -> Result<Option<Chat>, StoreError> {
        self.inner.get_chat(id).await
    }
    async fn update_chat(
        &self,
        id: ChatId,
        name: Option<&str>,
        description: Option<&str>,
    ) -> Result<(), StoreError> {
        self.inner.update_chat(id, name, description).await
    }
    async fn member_role(
        &self,
        chat: ChatId,
        user: UserId,
    ) -> Result<Option<MemberRole>, StoreError> {
        self.inner.member_role(chat, user).await
    }
    async fn members(&self, chat: ChatId) -> Result<Vec<Member>, StoreError> {
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
        stored_as: Option<confab_schema::AttachmentKind>,
    ) -> Result<(), StoreError> {
        self.inner.put_attachment(attachment, stored_as).await
    }
    async fn add_blob_refs(
        &self,
        attachment: uuid::Uuid,
        blobs: &[String],
    ) -> Result<(), StoreError> {
        self.inner.add_blob_refs(attachment, blobs).await
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
    async fn blob_referenced(&self, sha256: &str) -> Result<bool, StoreError> {
        self.inner.blob_referenced(sha256).await
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
        self.inner.put_device(device).await
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
        self.inner.delete_device(user, id).await
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
        self.inner.remove_member(chat, user).await
    }
    async fn forget_left_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.inner.forget_left_chat(chat, user).await
    }
    async fn change_member(
        &self,
        chat: ChatId,
        change: &confab_api::store::GuardedChange,
    ) -> Result<bool, StoreError> {
        self.inner.change_member(chat, change).await
    }
    async fn touch_chat(
        &self,
        chat: ChatId,
        members: &[UserId],
        activity: SignalId,
        latest: Option<&Signal>,
    ) -> Result<(), StoreError> {
        self.inner.touch_chat(chat, members, activity, latest).await
    }
    async fn untouch_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.inner.untouch_chat(chat, user).await
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
        self.inner.insert_signal(signal).await
    }
    async fn get_signal(&self, chat: ChatId, id: SignalId) -> Result<Option<Signal>, StoreError> {
        self.inner.get_signal(chat, id).await
    }
    async fn edit_signal(
        &self,
        chat: ChatId,
        id: SignalId,
        text: &str,
        edited_at: OffsetDateTime,
    ) -> Result<Option<Signal>, StoreError> {
        self.inner.edit_signal(chat, id, text, edited_at).await
    }
    async fn delete_signal(
        &self,
        chat: ChatId,
        id: SignalId,
    ) -> Result<Option<Signal>, StoreError> {
        self.inner.delete_signal(chat, id).await
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
        self.inner.add_reaction(chat, signal, emoji, user).await
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
        self.inner.reaction_counts_of(chat, signals).await
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
        self.inner.advance_marker(kind, chat, user, up_to).await
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
        self.inner.markers_page(kind, chat, after, limit).await
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
        self.inner
            .put_circle_member(circle, member, max_members)
            .await
    }
    async fn circle_members(&self, circle: CircleId) -> Result<Vec<CircleMember>, StoreError> {
        self.inner.circle_members(circle).await
    }
    async fn remove_circle_member(&self, circle: CircleId, user: UserId) -> Result<(), StoreError> {
        self.inner.remove_circle_member(circle, user).await
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
        self.inner.delete_circle(id).await
    }
    async fn slots(&self, pool: &str) -> Result<Vec<Slot>, StoreError> {
        self.inner.slots(pool).await
    }
    async fn write_slots(&self, pool: &str, writes: &[SlotWrite]) -> Result<bool, StoreError> {
        self.inner.write_slots(pool, writes).await
    }
    async fn create_call(&self, call: &CallRecord) -> Result<(), StoreError> {
        self.inner.create_call(call).await
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
        self.inner.transition_call(id, from, to).await
    }
    async fn live_calls(&self, chat: ChatId) -> Result<Vec<CallRecord>, StoreError> {
        self.inner.live_calls(chat).await
    }
    async fn call_participants(&self, id: uuid::Uuid) -> Result<Vec<UserId>, StoreError> {
        self.inner.call_participants(id).await
    }
    async fn set_call_participant(
        &self,
        id: uuid::Uuid,
        user: UserId,
        present: bool,
    ) -> Result<(), StoreError> {
        let held = {
            let mut hold = self.hold.lock().unwrap();
            if *hold == Some(present) {
                *hold = None;
                true
            } else {
                false
            }
        };
        if held {
            self.reached.notify_one();
            self.released.notified().await;
        }
        self.inner.set_call_participant(id, user, present).await
    }
    async fn ringing_calls_due(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<RingingCall>, StoreError> {
        self.inner.ringing_calls_due(now, limit).await
    }
    async fn forget_ringing_call(&self, call: &RingingCall) -> Result<(), StoreError> {
        self.inner.forget_ringing_call(call).await
    }
}
macro_rules! on_both_stacks {
    ($name:ident) => {
        mod $name {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                Box::pin(super::$name(Stack::Embedded)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() {
                if !support::real_stack_available(concat!(stringify!($name), "::real")).await {
                    return;
                }
                Box::pin(super::$name(Stack::Real)).await;
            }
        }
    };
}

/// The API's operations on the gated store over `stack`'s store and bus.
struct Setup {
    _dir: tempfile::TempDir,
    config: confab_runtime::config::Config,
    store: Arc<GatedCalls>,
    state: ApiState,
}

impl Setup {
    async fn new(stack: Stack) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let config = support::config_for(stack, dir.path().to_path_buf());
        let store = Arc::new(GatedCalls {
            inner: confab::open_store(&config, true).await.unwrap(),
            hold: Mutex::new(None),
            reached: tokio::sync::Notify::new(),
            released: tokio::sync::Notify::new(),
        });
        let bus = confab::open_bus(&config).await.unwrap();
        let identity = Arc::new(DevIdentity::open(dir.path()).unwrap());
        let state = ApiState::new(
            Arc::clone(&store) as Arc<dyn Store>,
            bus,
            identity,
            &confab_runtime::signed::Keyring::random(),
        );
        Setup {
            _dir: dir,
            config,
            store,
            state,
        }
    }

    async fn user(&self, name: &str) -> User {
        let user = User {
            id: UserId(uuid::Uuid::now_v7()),
            username: name.to_owned(),
            display_name: name.to_owned(),
            email: None,
        };
        self.store.upsert_user(&user).await.unwrap();
        user
    }

    async fn group(&self, owner: &User, members: &[&User]) -> ChatId {
        let chat = ChatToCreate::parse(
            ChatKind::Group,
            Some("call".into()),
            None,
            members.iter().map(|m| m.id).collect(),
        )
        .unwrap();
        match self.state.create_chat(owner, chat).await.unwrap() {
            confab_api::domain::Outcome::Created(chat)
            | confab_api::domain::Outcome::Existing(chat) => chat.id,
        }
    }

    /// The states of call `id` in `chat`'s history, oldest first, with their authors.
    async fn call_history(&self, chat: ChatId, id: uuid::Uuid) -> Vec<(CallState, UserId)> {
        let mut history: Vec<(CallState, UserId)> = self
            .store
            .signals_before(chat, None, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.kind == SignalKind::Call)
            .filter_map(|s| {
                let call = s.call?;
                (call.call_id == id).then_some((call.state, s.author_id))
            })
            .collect();
        history.reverse();
        history
    }

    async fn clean_up(self) {
        if self.config.store.backend == confab_runtime::config::StoreBackend::Cql {
            Box::pin(support::clean_up_real(&self.config)).await;
        }
    }
}

/// The last two participants leave at once: the call ends, once. The first leave is held at its
/// removal while the second runs through, so each reads the other as present before its own
/// removal.
async fn the_last_participants_leaving_at_once_end_the_call(stack: Stack) {
    let setup = Setup::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = setup.state.start_call(&alice, chat).await.unwrap();
    let joined = setup.state.join_call(bob.id, call.id).await.unwrap();
    assert_eq!(joined.status, CallStatus::Active);

    setup.store.hold_next(false);
    let first = tokio::spawn({
        let state = setup.state.clone();
        async move { state.leave_call(alice.id, call.id).await }
    });
    setup.store.reached().await;
    setup.state.leave_call(bob.id, call.id).await.unwrap();
    setup.store.release();
    tokio::time::timeout(DEADLINE, first)
        .await
        .expect("the held leave ends")
        .unwrap()
        .unwrap();

    let after = setup.store.get_call(call.id).await.unwrap().unwrap();
    assert_eq!(
        after.status,
        CallStatus::Ended,
        "a call nobody is left in ends"
    );
    assert!(
        setup
            .store
            .call_participants(call.id)
            .await
            .unwrap()
            .is_empty()
    );
    let ended = setup
        .call_history(chat, call.id)
        .await
        .into_iter()
        .filter(|(state, _)| *state == CallState::Ended)
        .count();
    assert_eq!(ended, 1, "one `ended` signal");
    setup.clean_up().await;
}

on_both_stacks!(the_last_participants_leaving_at_once_end_the_call);

/// An answer racing the last leave of an active call: held before it puts its participant in
/// while the last participant leaves and the call ends, it is refused (409) and takes its
/// participant back out, so the call stays ended with nobody in it.
async fn a_join_racing_the_last_leave_is_refused(stack: Stack) {
    let setup = Setup::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let carol = setup.user("carol").await;
    let chat = setup.group(&alice, &[&bob, &carol]).await;
    let call = setup.state.start_call(&alice, chat).await.unwrap();
    setup.state.join_call(bob.id, call.id).await.unwrap();
    setup.state.leave_call(bob.id, call.id).await.unwrap();

    setup.store.hold_next(true);
    let join = tokio::spawn({
        let state = setup.state.clone();
        async move { state.join_call(carol.id, call.id).await }
    });
    setup.store.reached().await;
    let left = setup.state.leave_call(alice.id, call.id).await.unwrap();
    assert_eq!(left.status, CallStatus::Ended);
    setup.store.release();
    let joined = tokio::time::timeout(DEADLINE, join)
        .await
        .expect("the held join ends")
        .unwrap();
    assert!(
        matches!(joined, Err(ApiError::Conflict(_))),
        "a join of a call that ended while it was on its way: {joined:?}"
    );
    let after = setup.store.get_call(call.id).await.unwrap().unwrap();
    assert_eq!(after.status, CallStatus::Ended);
    assert!(
        setup
            .store
            .call_participants(call.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !setup
            .call_history(chat, call.id)
            .await
            .contains(&(CallState::Joined, carol.id)),
        "no `joined` for the refused answer"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_join_racing_the_last_leave_is_refused);
