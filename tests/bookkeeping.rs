//! A send whose signal is stored and published succeeds, even when the writes that follow it (the
//! chat's place in its members' lists, the author's read marker) fail: they are retried in the
//! background and catch up. The store here is the real embedded store, wrapped so that those two
//! writes fail on demand.
//!
//! Also: a deletion that fails after its tombstone is written is finished by its retry, and so is
//! the end of a circle pairing that fails part-way; a removal applied despite its error is
//! finished by its own request; a match whose chat fails leaves both waiting.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use confab_api::store::embedded::EmbeddedStore;
use confab_api::store::{
    CallRecord, ChatActivity, ChatEntry, Inserted, ListedCall, MarkerKind, MemberPut, NewChat,
    OutboxEntry, OutboxWriter, PendingCallSignal, Slot, SlotWrite, SmallObjectInfo, Store,
    StoreError,
};
use confab_api::{ApiState, routes};
use confab_runtime::bus::{Bus, EmbeddedBus};
use confab_runtime::identity::DevIdentity;
use confab_schema::call::CallStatus;
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::event::LoggedEvent;
use confab_schema::{
    Chat, ChatId, CircleId, Event, Member, MemberRole, Signal, SignalId, User, UserId,
};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use time::OffsetDateTime;

/// The embedded store, whose bookkeeping writes fail while `failing` is set, and whose deletions
/// fail after writing the tombstone while `failing_after_delete` is set, or without writing it
/// while `failing_before_delete` is. An edit waits at `edits` while it is closed, a marker's
/// advance at `markers`.
struct FlakyBookkeeping {
    inner: EmbeddedStore,
    failing: AtomicBool,
    failing_after_delete: AtomicBool,
    failing_before_delete: AtomicBool,
    /// Taking a chat out of a leaving member's list fails.
    failing_untouch: AtomicBool,
    /// A membership change fails after it was written.
    failing_after_member_change: AtomicBool,
    edits: StoreGate,
    markers: StoreGate,
}

/// Holds one kind of write in the store, before or after it, until the test lets it go.
#[derive(Default)]
struct StoreGate {
    /// Writes wait before they are done.
    before_write: AtomicBool,
    /// Writes wait after they are done.
    after_write: AtomicBool,
    /// Notified when a write starts to wait.
    reached: tokio::sync::Notify,
    /// Lets a waiting write go on.
    released: tokio::sync::Notify,
}

impl StoreGate {
    async fn pass(&self, closed: &AtomicBool) {
        if closed.load(Ordering::SeqCst) {
            self.reached.notify_one();
            self.released.notified().await;
        }
    }

    /// Waits until a write waits at the gate.
    async fn reached(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.reached.notified())
            .await
            .expect("the write reached the store");
    }
}

impl FlakyBookkeeping {
    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("injected failure".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for FlakyBookkeeping {
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
    ) -> Result<(), StoreError> {
        self.inner.put_attachment(attachment).await
    }
    async fn claim_attachments(
        &self,
        chat: ChatId,
        ids: &[uuid::Uuid],
        message: SignalId,
    ) -> Result<(), StoreError> {
        self.inner.claim_attachments(chat, ids, message).await
    }
    async fn update_derived(
        &self,
        id: uuid::Uuid,
        chat: ChatId,
        stored_as: confab_schema::AttachmentKind,
        kind: confab_schema::AttachmentKind,
        image: Option<&confab_schema::attachment::ImageInfo>,
    ) -> Result<Option<confab_schema::Attachment>, StoreError> {
        self.inner
            .update_derived(id, chat, stored_as, kind, image)
            .await
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
    async fn restore_joined_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        self.inner.restore_joined_chat(chat, user).await
    }
    async fn change_member(
        &self,
        chat: ChatId,
        change: &confab_api::store::GuardedChange,
    ) -> Result<bool, StoreError> {
        let changed = self.inner.change_member(chat, change).await?;
        if self.failing_after_member_change.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected failure after the write".into(),
            ));
        }
        Ok(changed)
    }
    async fn touch_chat(
        &self,
        chat: ChatId,
        members: &[UserId],
        activity: SignalId,
        latest: Option<&Signal>,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.inner.touch_chat(chat, members, activity, latest).await
    }
    async fn untouch_chat(&self, chat: ChatId, user: UserId) -> Result<(), StoreError> {
        if self.failing_untouch.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected failure".into()));
        }
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
        self.edits.pass(&self.edits.before_write).await;
        let edited = self.inner.edit_signal(chat, id, text, edited_at).await;
        self.edits.pass(&self.edits.after_write).await;
        edited
    }
    async fn delete_signal(
        &self,
        chat: ChatId,
        id: SignalId,
    ) -> Result<Option<Signal>, StoreError> {
        if self.failing_before_delete.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected failure before the tombstone".into(),
            ));
        }
        let deleted = self.inner.delete_signal(chat, id).await?;
        if self.failing_after_delete.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable(
                "injected failure after the tombstone".into(),
            ));
        }
        Ok(deleted)
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
        self.check()?;
        self.markers.pass(&self.markers.before_write).await;
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
        self.inner.set_call_participant(id, user, present).await
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
        pending: Option<&PendingCallSignal>,
    ) -> Result<(), StoreError> {
        self.inner.set_pending_call_signal(id, user, pending).await
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

/// A server on the flaky store and the embedded bus, with a group chat of alice and bob; the
/// outbox sweeper runs when `sweep` is set.
struct FlakyServer {
    _dir: tempfile::TempDir,
    store: Arc<FlakyBookkeeping>,
    bus: Arc<EmbeddedBus>,
    state: ApiState,
    http: reqwest::Client,
    base: String,
    alice: String,
    bob: String,
    chat: String,
    _sweeper: Option<tokio_util::sync::DropGuard>,
}

impl FlakyServer {
    async fn start(sweep: bool) -> FlakyServer {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(FlakyBookkeeping {
            inner: EmbeddedStore::open(&dir.path().join("store.sqlite3")).unwrap(),
            failing: AtomicBool::new(false),
            failing_after_delete: AtomicBool::new(false),
            failing_before_delete: AtomicBool::new(false),
            failing_untouch: AtomicBool::new(false),
            failing_after_member_change: AtomicBool::new(false),
            edits: StoreGate::default(),
            markers: StoreGate::default(),
        });
        let identity = Arc::new(DevIdentity::open(dir.path()).unwrap());
        let (alice, bob) = (
            identity.mint("alice", Duration::from_secs(600)),
            identity.mint("bob", Duration::from_secs(600)),
        );
        let bus = Arc::new(
            EmbeddedBus::open(&dir.path().join("events.sqlite3"), Default::default()).unwrap(),
        );
        let state = ApiState::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&bus) as Arc<dyn Bus>,
            identity,
            &confab_runtime::signed::Keyring::random(),
        );
        let sweeper = sweep.then(|| {
            let shutdown = tokio_util::sync::CancellationToken::new();
            // A short silence: each sweep looks at the entries this process left unsettled for
            // a fifth of a second, long after a request here has ended.
            let settings = confab_api::outbox::SweepSettings {
                interval: Duration::from_millis(100),
                silent_after: Duration::from_millis(200),
            };
            drop(
                state
                    .clone()
                    .start_outbox_sweeper(settings, shutdown.clone()),
            );
            shutdown.drop_guard()
        });
        let (router, _) = routes(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });

        let mut server = FlakyServer {
            _dir: dir,
            store,
            bus,
            state,
            http: reqwest::Client::new(),
            base,
            alice,
            bob,
            chat: String::new(),
            _sweeper: sweeper,
        };
        let bob_id = server.get(&server.bob, "/v1/me").await["id"].clone();
        let chat: Value = server
            .http
            .post(format!("{}/v1/chats", server.base))
            .bearer_auth(&server.alice)
            .json(&json!({"kind": "group", "name": "flaky", "members": [bob_id]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        server.chat = chat["id"].as_str().unwrap().to_owned();
        server
    }

    async fn get(&self, token: &str, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Alice's message to the chat, as sent.
    async fn send(&self, nonce: &str, text: &str) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/chats/{}/signals", self.base, self.chat))
            .bearer_auth(&self.alice)
            .json(&json!({"kind": "message", "nonce": nonce, "text": text}))
            .send()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_stored_send_succeeds_when_bookkeeping_fails_and_catches_up() {
    let server = FlakyServer::start(false).await;
    let chat = &server.chat;

    server.store.failing.store(true, Ordering::SeqCst);
    let sent = server.send("n-1", "stored, then the store hiccups").await;
    assert_eq!(
        sent.status(),
        201,
        "the signal is stored and published: the send succeeded"
    );
    let sent: Value = sent.json().await.unwrap();
    let history = server
        .get(&server.bob, &format!("/v1/chats/{chat}/signals"))
        .await;
    assert_eq!(history["items"][0]["id"], sent["id"]);

    let views_path = format!(
        "/v1/chats/{chat}/signals/{}/views",
        sent["id"].as_str().unwrap()
    );
    let views = server.get(&server.bob, &views_path).await;
    assert_eq!(
        views["items"],
        json!([]),
        "the author's marker did not move yet"
    );

    // Once the store answers again, the background retry moves alice's read marker.
    server.store.failing.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let views = server.get(&server.bob, &views_path).await;
        if views["items"]
            .as_array()
            .is_some_and(|seen| !seen.is_empty())
        {
            assert_eq!(views["items"][0]["user_id"], sent["author_id"]);
            assert_eq!(views["items"][0]["up_to"], sent["id"]);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bookkeeping never caught up: {views}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A [`FlakyServer`] with alice's message, to edit or delete.
struct SentMessage {
    server: FlakyServer,
    url: String,
    id: String,
}

impl std::ops::Deref for SentMessage {
    type Target = FlakyServer;
    fn deref(&self) -> &FlakyServer {
        &self.server
    }
}

impl SentMessage {
    async fn start(sweep: bool) -> SentMessage {
        let server = FlakyServer::start(sweep).await;
        let sent: Value = server.send("d-1", "soon gone").await.json().await.unwrap();
        let id = sent["id"].as_str().unwrap().to_owned();
        SentMessage {
            url: format!("{}/v1/chats/{}/signals/{id}", server.base, server.chat),
            id,
            server,
        }
    }

    async fn delete(&self) -> reqwest::Response {
        self.http
            .delete(&self.url)
            .bearer_auth(&self.alice)
            .send()
            .await
            .unwrap()
    }

    /// Alice's edit of the message, to `text`.
    fn edit(&self, text: &str) -> impl Future<Output = reqwest::Response> + Send + 'static {
        let request = self
            .http
            .patch(&self.url)
            .bearer_auth(&self.alice)
            .json(&json!({ "text": text }));
        async move { request.send().await.unwrap() }
    }

    /// The outbox rows this process holds for events of `kind`, as JSON.
    async fn outbox_rows(&self, kind: &str) -> Vec<Value> {
        let now_bucket = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms());
        self.store
            .outbox_entries(self.state.outbox_writer(), now_bucket - 2, now_bucket)
            .await
            .unwrap()
            .iter()
            .map(|row| serde_json::from_slice(&row.envelope).unwrap())
            .filter(|envelope: &Value| envelope["type"] == kind)
            .collect()
    }

    /// The text of the next `signal.updated` event of the message.
    async fn updated_text(&self, events: &mut BoxStream<'static, LoggedEvent>) -> String {
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(logged) = events.next().await {
                if let Event::SignalUpdated(signal) = &logged.envelope.event
                    && signal.id.to_string() == self.id
                {
                    return signal.text.clone().unwrap_or_default();
                }
            }
            panic!("the event stream ended");
        })
        .await
        .expect("no signal.updated event")
    }

    /// Deletes with the store failing after it wrote the tombstone: 503.
    async fn delete_failing_after_the_tombstone(&self) {
        self.store
            .failing_after_delete
            .store(true, Ordering::SeqCst);
        let failed = self.delete().await;
        assert_eq!(failed.status(), 503, "the deletion did not finish");
        self.store
            .failing_after_delete
            .store(false, Ordering::SeqCst);
    }

    /// The sequence of the `signal.deleted` event of the message, once one is logged.
    async fn deleted_event(
        &self,
        events: &mut BoxStream<'static, LoggedEvent>,
        within: Duration,
    ) -> u64 {
        tokio::time::timeout(within, async {
            while let Some(logged) = events.next().await {
                if let Event::SignalDeleted(signal) = &logged.envelope.event
                    && signal.id.to_string() == self.id
                {
                    return logged.seq;
                }
            }
            panic!("the event stream ended");
        })
        .await
        .expect("no signal.deleted event")
    }
}

#[tokio::test]
async fn a_deletion_that_failed_after_its_tombstone_is_finished_by_its_retry() {
    let deletion = SentMessage::start(false).await;
    let mut events = deletion.bus.subscribe().await.unwrap();
    deletion.delete_failing_after_the_tombstone().await;

    let retried = deletion.delete().await;
    assert_eq!(retried.status(), 200);
    let tombstone: Value = retried.json().await.unwrap();
    assert_eq!(tombstone["deleted"], true);
    assert!(
        tombstone.get("text").is_none_or(Value::is_null),
        "{tombstone}"
    );
    // The retry published the deletion that the failed attempt never did.
    let deleted_seq = deletion
        .deleted_event(&mut events, Duration::from_secs(10))
        .await;

    // Deleting once more answers the tombstone and adds nothing to the log: the event has the
    // same id, within the log's duplicate window.
    assert_eq!(deletion.delete().await.status(), 200);
    assert_eq!(deletion.bus.last_seq().await.unwrap(), deleted_seq);
}

#[tokio::test]
async fn a_deletion_that_failed_after_its_tombstone_is_published_without_a_retry() {
    let deletion = SentMessage::start(true).await;
    let mut events = deletion.bus.subscribe().await.unwrap();
    deletion.delete_failing_after_the_tombstone().await;
    // Nobody retries: the process's own sweep finds the entry the failed attempt left, sees the
    // tombstone stored, and publishes the deletion.
    deletion
        .deleted_event(&mut events, Duration::from_secs(30))
        .await;
}

#[tokio::test]
async fn a_process_keeps_the_outbox_row_of_a_deletion_that_was_not_stored() {
    let deletion = SentMessage::start(false).await;
    deletion
        .store
        .failing_before_delete
        .store(true, Ordering::SeqCst);
    assert_eq!(deletion.delete().await.status(), 503);
    let before = deletion.bus.last_seq().await.unwrap();

    // The process's own sweep finds the entry, and the message not deleted: nothing to publish,
    // and the row stays, for the sweep after this process's death (the write might yet land).
    assert_eq!(deletion.state.sweep_outbox(SWEEP_OWN_NOW).await.unwrap(), 0);
    assert_eq!(deletion.bus.last_seq().await.unwrap(), before);
    let rows = deletion.outbox_rows("signal.deleted").await;
    assert_eq!(rows.len(), 1, "the deletion's row stays: {rows:?}");
}

/// The sweep of a process's own leftovers, looking at every entry at once.
const SWEEP_OWN_NOW: confab_api::outbox::SweepSettings = confab_api::outbox::SweepSettings {
    interval: Duration::from_millis(100),
    silent_after: Duration::ZERO,
};

/// An edit whose request is still running, however long, is its request's to publish: the
/// process's own sweep must not publish the message as stored before that edit and remove the
/// edit's row, or a publish failure and a crash after it would lose the edit's event.
#[tokio::test]
async fn a_process_does_not_sweep_the_outbox_row_of_a_running_edit() {
    let message = SentMessage::start(false).await;
    let mut events = message.bus.subscribe().await.unwrap();
    assert_eq!(message.edit("one").await.status(), 200);
    assert_eq!(message.updated_text(&mut events).await, "one");

    message
        .store
        .edits
        .before_write
        .store(true, Ordering::SeqCst);
    let second = tokio::spawn(message.edit("two"));
    message.store.edits.reached().await;
    // The newest row is the running edit's (envelope ids grow with time).
    let running = message
        .outbox_rows("signal.updated")
        .await
        .into_iter()
        .map(|row| row["id"].as_str().unwrap().to_owned())
        .max()
        .expect("the running edit's row");
    let before = message.bus.last_seq().await.unwrap();
    assert_eq!(
        message.state.sweep_outbox(SWEEP_OWN_NOW).await.unwrap(),
        0,
        "the sweep published for an edit still running"
    );
    assert_eq!(message.bus.last_seq().await.unwrap(), before);
    let rows = message.outbox_rows("signal.updated").await;
    assert!(
        rows.iter().any(|row| row["id"] == running.as_str()),
        "the running edit's row stays: {rows:?}"
    );

    message
        .store
        .edits
        .before_write
        .store(false, Ordering::SeqCst);
    message.store.edits.released.notify_one();
    assert_eq!(second.await.unwrap().status(), 200);
    assert_eq!(message.updated_text(&mut events).await, "two");
}

/// An edit whose request is cancelled after its write (a client gone, a timeout) leaves its row
/// behind; the process's own sweep finds the edit stored and publishes it.
#[tokio::test]
async fn a_cancelled_edit_is_published_by_its_process_own_sweep() {
    let message = SentMessage::start(false).await;
    let mut events = message.bus.subscribe().await.unwrap();
    let alice: UserId =
        serde_json::from_value(message.get(&message.alice, "/v1/me").await["id"].clone()).unwrap();
    let chat: ChatId = serde_json::from_value(json!(message.chat)).unwrap();
    let id: SignalId = serde_json::from_value(json!(message.id)).unwrap();

    message
        .store
        .edits
        .after_write
        .store(true, Ordering::SeqCst);
    let state = message.state.clone();
    let edit = tokio::spawn(async move {
        let text = confab_api::domain::inputs::MessageText::parse("cut short".into()).unwrap();
        state.edit_message(alice, chat, id, text).await
    });
    message.store.edits.reached().await;
    edit.abort();
    assert!(edit.await.unwrap_err().is_cancelled());
    message
        .store
        .edits
        .after_write
        .store(false, Ordering::SeqCst);

    assert_eq!(message.state.sweep_outbox(SWEEP_OWN_NOW).await.unwrap(), 1);
    assert_eq!(message.updated_text(&mut events).await, "cut short");
    assert_eq!(
        message.outbox_rows("signal.updated").await,
        Vec::<Value>::new()
    );
}

/// A send whose request is cancelled once its signal is stored (a client gone, a timeout) still
/// does its bookkeeping: the author's read marker moves to it, as do the chat list and the pushes,
/// which run beside it.
#[tokio::test]
async fn a_cancelled_send_still_moves_the_authors_marker() {
    let server = FlakyServer::start(false).await;
    let alice_id: UserId =
        serde_json::from_value(server.get(&server.alice, "/v1/me").await["id"].clone()).unwrap();
    let alice = server
        .store
        .inner
        .get_user(alice_id)
        .await
        .unwrap()
        .unwrap();
    let chat: ChatId = serde_json::from_value(json!(server.chat)).unwrap();

    server
        .store
        .markers
        .before_write
        .store(true, Ordering::SeqCst);
    let state = server.state.clone();
    let send = tokio::spawn(async move {
        let message = confab_api::domain::signals::NewMessage {
            nonce: None,
            text: Some(confab_api::domain::inputs::MessageText::parse("and gone".into()).unwrap()),
            reply_to: None,
            attachments: Default::default(),
        };
        state.send_message(&alice, chat, message).await
    });
    server.store.markers.reached().await;
    send.abort();
    assert!(send.await.unwrap_err().is_cancelled());
    server
        .store
        .markers
        .before_write
        .store(false, Ordering::SeqCst);
    server.store.markers.released.notify_one();

    let history = server
        .get(&server.bob, &format!("/v1/chats/{chat}/signals"))
        .await;
    let sent = history["items"][0]["id"].as_str().unwrap().to_owned();
    let views_path = format!("/v1/chats/{chat}/signals/{sent}/views");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let views = server.get(&server.bob, &views_path).await;
        if views["items"]
            .as_array()
            .is_some_and(|seen| !seen.is_empty())
        {
            assert_eq!(views["items"][0]["user_id"], json!(alice_id));
            assert_eq!(views["items"][0]["up_to"], json!(sent));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the author's marker never moved: {views}"
        );
        tokio::task::yield_now().await;
    }
}

/// Alice removes `bob`: the request succeeds, `member.left` is published and the history ends
/// with `left`.
async fn removal_succeeds_and_is_announced(
    server: &FlakyServer,
    events: &mut BoxStream<'static, LoggedEvent>,
    bob: UserId,
) {
    let removed = server
        .http
        .delete(format!(
            "{}/v1/chats/{}/members/{bob}",
            server.base, server.chat
        ))
        .bearer_auth(&server.alice)
        .send()
        .await
        .unwrap();
    assert!(removed.status().is_success(), "{}", removed.status());
    member_left(events, bob).await;
    let history = server
        .get(&server.alice, &format!("/v1/chats/{}/signals", server.chat))
        .await;
    assert_eq!(history["items"][0]["kind"], "left", "{history}");
}

/// Waits for `user`'s `member.left` on `events`.
async fn member_left(events: &mut BoxStream<'static, LoggedEvent>, user: UserId) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(logged) = events.next().await {
            if let Event::MemberLeft(change) = &logged.envelope.event
                && change.user_id == user
            {
                return;
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("no member.left event in time");
}

/// A removal stored in full whose clean-up of the chat list fails still succeeds, and publishes
/// `member.left` at once: the member is out, and their open streams must stop routing the chat
/// now, not when the outbox's sweep (not running here) finds the event unpublished.
#[tokio::test]
async fn a_removal_whose_clean_up_fails_still_publishes_member_left() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let bob: UserId =
        serde_json::from_value(server.get(&server.bob, "/v1/me").await["id"].clone()).unwrap();
    server.store.failing_untouch.store(true, Ordering::SeqCst);
    removal_succeeds_and_is_announced(&server, &mut events, bob).await;
}

/// A removal whose write was applied but answered with an error (a timeout, a later step of it
/// failing) is a removal: it succeeds, and `member.left` goes out at once, not when the outbox's
/// sweep (not running here) finds its entry seconds later. It used to answer 503, and its retry
/// 404 ("no such member"), while the member's streams kept routing the chat.
#[tokio::test]
async fn a_removal_applied_despite_its_error_is_finished_at_once() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let bob: UserId =
        serde_json::from_value(server.get(&server.bob, "/v1/me").await["id"].clone()).unwrap();
    server
        .store
        .failing_after_member_change
        .store(true, Ordering::SeqCst);
    removal_succeeds_and_is_announced(&server, &mut events, bob).await;
}

/// A removal publishes `member.left` before the `left` signal's bookkeeping (the chat's place in
/// each member's list, the author's marker), which in a large group takes a while: until the
/// event, the removed member's open streams still route the chat, and everything sent meanwhile
/// reached them.
#[tokio::test]
async fn a_removal_stops_the_members_streams_before_its_bookkeeping() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let bob: UserId =
        serde_json::from_value(server.get(&server.bob, "/v1/me").await["id"].clone()).unwrap();
    server
        .store
        .markers
        .before_write
        .store(true, Ordering::SeqCst);
    let removing = {
        let (http, url, alice) = (
            server.http.clone(),
            format!("{}/v1/chats/{}/members/{bob}", server.base, server.chat),
            server.alice.clone(),
        );
        tokio::spawn(async move { http.delete(url).bearer_auth(alice).send().await.unwrap() })
    };
    server.store.markers.reached().await;
    // The `left` signal's marker is held: `member.left` is out already.
    member_left(&mut events, bob).await;
    server
        .store
        .markers
        .before_write
        .store(false, Ordering::SeqCst);
    server.store.markers.released.notify_one();
    assert!(removing.await.unwrap().status().is_success());
}

/// Ending a circle pairing whose clean-up fails part-way is finished by its retry: both are out of
/// the pairing's chat. (The pairing used to be ended first, so the retry found none and left the
/// partner, or both, in the chat.)
#[tokio::test]
async fn an_unpairing_that_fails_part_way_is_finished_by_its_retry() {
    let server = FlakyServer::start(false).await;
    let post = |token: &str, path: &str, body: Value| {
        server
            .http
            .post(format!("{}{path}", server.base))
            .bearer_auth(token.to_owned())
            .json(&body)
            .send()
    };
    let circle: Value = post(
        &server.alice,
        "/v1/circles",
        json!({"name": "flaky circle"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let id = circle["id"].as_str().unwrap();
    let joined = post(
        &server.bob,
        "/v1/circles/join",
        json!({"access_code": circle["access_code"], "display_name": "Bob"}),
    )
    .await
    .unwrap();
    assert!(joined.status().is_success(), "{}", joined.status());
    let pair = format!("/v1/circles/{id}/pair");
    let waiting = post(&server.alice, &pair, json!({})).await.unwrap();
    assert!(waiting.status().is_success(), "{}", waiting.status());
    let paired: Value = post(&server.bob, &pair, json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat = paired["chat_id"]
        .as_str()
        .expect("paired with a chat")
        .to_owned();
    let members_path = format!("/v1/chats/{chat}/members");
    let status_of = async |token: &str| {
        server
            .http
            .get(format!("{}{members_path}", server.base))
            .bearer_auth(token.to_owned())
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(status_of(&server.bob).await, 200);

    server.store.failing_untouch.store(true, Ordering::SeqCst);
    let unpair = || {
        server
            .http
            .delete(format!("{}{pair}", server.base))
            .bearer_auth(server.alice.clone())
            .send()
    };
    let failed = unpair().await.unwrap();
    assert_eq!(failed.status(), 503);
    server.store.failing_untouch.store(false, Ordering::SeqCst);
    let retried = unpair().await.unwrap();
    assert!(retried.status().is_success(), "{}", retried.status());
    for (who, token) in [("alice", &server.alice), ("bob", &server.bob)] {
        assert_eq!(
            status_of(token).await,
            403,
            "{who} is out of the pairing's chat"
        );
    }
}

/// A queue match whose chat cannot be opened puts both back to waiting, so nobody is left matched
/// to a chat that was never opened; the next join matches them.
#[tokio::test]
async fn a_match_whose_chat_fails_leaves_both_waiting() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let join = |token: &str, kind: &str| {
        server
            .http
            .post(format!("{}/v1/queues/{kind}/join", server.base))
            .bearer_auth(token.to_owned())
            .send()
    };
    let waiting = join(&server.alice, "vent").await.unwrap();
    assert!(waiting.status().is_success(), "{}", waiting.status());
    server.store.failing.store(true, Ordering::SeqCst);
    let failed = join(&server.bob, "listen").await.unwrap();
    assert_eq!(failed.status(), 503);
    server.store.failing.store(false, Ordering::SeqCst);
    for (who, token, kind) in [
        ("alice", &server.alice, "vent"),
        ("bob", &server.bob, "listen"),
    ] {
        let status = server.get(token, &format!("/v1/queues/{kind}")).await;
        assert_eq!(status["state"], "waiting", "{who}: {status}");
    }
    let matched: Value = join(&server.bob, "listen")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(matched["state"], "paired", "{matched}");
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(logged) = events.next().await {
            if let Event::QueueMatched(matched) = &logged.envelope.event {
                return matched.chat.id;
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("no queue.matched event");
}
