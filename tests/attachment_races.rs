//! An image's thumbnail and preview are made in the background once its upload has answered, and
//! their metadata is written at the end. Here the store holds that write until the test lets it
//! go, so that a deletion of the image's message, or a send that claims the image, comes in
//! between: a deleted image must not come back (by id, in its chat's lists, or through its objects'
//! references), and a claim must stay. On the embedded store and on the CQL store.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use confab_api::store::{
    CallRecord, ChatActivity, ChatEntry, Inserted, MarkerKind, MemberPut, NewChat, OutboxEntry,
    OutboxWriter, RingingCall, Slot, SlotWrite, SmallObjectInfo, Store, StoreError,
};
use confab_api::{ApiState, routes};
use confab_runtime::blobs::Blobs;
use confab_runtime::bus::{Bus, EmbeddedBus};
use confab_runtime::config::Config;
use confab_runtime::identity::DevIdentity;
use confab_schema::call::CallStatus;
use confab_schema::circle::{Circle, CircleMember};
use confab_schema::{Chat, ChatId, CircleId, Member, MemberRole, Signal, SignalId, User, UserId};
use serde_json::{Value, json};
use support::{DEADLINE, Stack};
use time::OffsetDateTime;
use tokio::sync::watch;

/// The write that ends an image's processing, held until the test opens the gate: how many
/// arrived, whether the gate is open, how many were done after it opened.
struct Gate {
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

    /// Waits until `n` writes wait at the gate.
    async fn arrived(&self, n: usize) {
        let mut arrived = self.arrived.subscribe();
        tokio::time::timeout(DEADLINE, arrived.wait_for(|a| *a >= n))
            .await
            .expect("the pictures' writes reached the store in time")
            .unwrap();
    }

    /// Lets the writes go on, and waits until `n` of them are done.
    async fn release(&self, n: usize) {
        self.open.send_replace(true);
        let mut done = self.done.subscribe();
        tokio::time::timeout(DEADLINE, done.wait_for(|d| *d >= n))
            .await
            .expect("the pictures' writes were done in time")
            .unwrap();
    }
}

/// A store whose writes of an image's pictures wait at `gate`.
struct Holding {
    inner: Arc<dyn Store>,
    gate: Gate,
}

#[async_trait]
impl Store for Holding {
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
    async fn update_derived(
        &self,
        id: uuid::Uuid,
        chat: ChatId,
        stored_as: confab_schema::AttachmentKind,
        kind: confab_schema::AttachmentKind,
        image: Option<&confab_schema::attachment::ImageInfo>,
    ) -> Result<Option<confab_schema::Attachment>, StoreError> {
        self.gate
            .pass(self.inner.update_derived(id, chat, stored_as, kind, image))
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
        until: time::OffsetDateTime,
    ) -> Result<(), StoreError> {
        self.inner.condemn_blob(sha256, until).await
    }
    async fn blob_condemned(
        &self,
        sha256: &str,
    ) -> Result<Option<time::OffsetDateTime>, StoreError> {
        self.inner.blob_condemned(sha256).await
    }
    async fn absolve_blob(&self, sha256: &str) -> Result<(), StoreError> {
        self.inner.absolve_blob(sha256).await
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

/// The API on a [`Holding`] store (the embedded one, or CQL on a fresh keyspace), over HTTP.
struct Harness {
    store: Arc<Holding>,
    blobs: Arc<dyn Blobs>,
    config: Config,
    stack: Stack,
    http: reqwest::Client,
    base: String,
    alice: String,
    chat: String,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start(stack: Stack) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let config = support::config_for(stack, dir.path().to_path_buf());
        let inner = confab::open_store(&config, true).await.unwrap();
        let blobs = confab::open_blobs(&config, Arc::clone(&inner)).unwrap();
        let store = Arc::new(Holding {
            inner,
            gate: Gate::new(),
        });
        let identity = Arc::new(DevIdentity::open(dir.path()).unwrap());
        let alice = identity.mint("alice", Duration::from_secs(600));
        let bob = identity.mint("bob", Duration::from_secs(600));
        let bus = Arc::new(
            EmbeddedBus::open(&dir.path().join("events.sqlite3"), Default::default()).unwrap(),
        );
        let state = ApiState::new(
            Arc::clone(&store) as Arc<dyn Store>,
            bus as Arc<dyn Bus>,
            identity,
            &confab_runtime::signed::Keyring::random(),
        )
        .with_attachments(confab::attachment_settings(&config, Arc::clone(&blobs)));
        let (router, _) = routes(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let mut harness = Harness {
            store,
            blobs,
            config,
            stack,
            http: reqwest::Client::new(),
            base,
            alice,
            chat: String::new(),
            _dir: dir,
        };
        let bob_id = harness.json(&bob, "/v1/me").await["id"].clone();
        let chat = harness
            .send_json(
                "/v1/chats",
                &json!({"kind": "group", "name": "pictures", "members": [bob_id]}),
            )
            .await;
        assert_eq!(chat.status(), 201);
        harness.chat = chat.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        harness
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.alice)
            .send()
            .await
            .unwrap()
    }

    async fn json(&self, token: &str, path: &str) -> Value {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        response.json().await.unwrap()
    }

    async fn send_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.alice)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Alice's upload of `bytes` to the chat, as answered.
    async fn upload(&self, name: &str, content_type: &str, bytes: Vec<u8>) -> Value {
        let response = self
            .http
            .post(format!("{}/v1/chats/{}/attachments", self.base, self.chat))
            .query(&[("name", name)])
            .bearer_auth(&self.alice)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "{name}");
        let uploaded: Value = response.json().await.unwrap();
        assert_eq!(uploaded["kind"], "image");
        uploaded
    }

    /// Alice's message carrying `attachments`: its id.
    async fn send(&self, attachments: &[&Value]) -> String {
        let sent = self
            .send_json(
                &format!("/v1/chats/{}/signals", self.chat),
                &json!({"kind": "message", "text": "look", "attachments": attachments}),
            )
            .await;
        assert_eq!(sent.status(), 201);
        sent.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// The ids the chat lists among its attachments of `kind` (`None`: all).
    async fn listed(&self, kind: Option<&str>) -> Vec<Value> {
        let query = kind.map(|k| format!("&kind={k}")).unwrap_or_default();
        let listed = self
            .json(
                &self.alice,
                &format!("/v1/chats/{}/attachments?limit=100{query}", self.chat),
            )
            .await;
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].clone())
            .collect()
    }

    async fn stop(self) {
        if self.stack == Stack::Real {
            Box::pin(support::clean_up_real(&self.config)).await;
        }
    }
}

/// Runs `$body(stack)` as one test per stack.
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

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 256) as u8])
    }));
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// The message of two images is deleted while their pictures are being stored: one that gets a
/// thumbnail, and one that cannot be decoded and is re-filed as a plain file. Neither comes back,
/// and nothing keeps their objects from the collector.
async fn a_deleted_image_stays_deleted(stack: Stack) {
    let harness = Harness::start(stack).await;
    let photo = harness.upload("photo.png", "image/png", png(64, 48)).await;
    let broken = harness
        .upload("broken.png", "image/png", png(50, 50)[..60].to_vec())
        .await;
    harness.store.gate.arrived(2).await;
    let message = harness.send(&[&photo["id"], &broken["id"]]).await;
    let deleted = harness
        .http
        .delete(format!(
            "{}/v1/chats/{}/signals/{message}",
            harness.base, harness.chat
        ))
        .bearer_auth(&harness.alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    harness.store.gate.release(2).await;

    for attachment in [&photo, &broken] {
        let id = attachment["id"].as_str().unwrap();
        let got = harness.get(&format!("/v1/attachments/{id}")).await;
        assert_eq!(got.status(), 404, "{} came back", attachment["name"]);
        let thumbnail = harness
            .get(&format!("/v1/attachments/{id}/thumbnail"))
            .await;
        assert_eq!(thumbnail.status(), 404);
    }
    for kind in [None, Some("image"), Some("file")] {
        let listed = harness.listed(kind).await;
        assert!(
            !listed.contains(&photo["id"]) && !listed.contains(&broken["id"]),
            "listed again among {kind:?}: {listed:?}"
        );
    }
    // No reference is left behind: the collector removes every object, pictures included (once
    // the processing, which drops its pictures' references after its write, has ended).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        confab_api::domain::attachments::collect_garbage(
            harness.store.inner.as_ref(),
            harness.blobs.as_ref(),
            Duration::ZERO,
            |_| {},
        )
        .await
        .unwrap();
        let left = harness.blobs.list(None, 100).await.unwrap();
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "objects kept: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    harness.stop().await;
}
on_both_stacks!(a_deleted_image_stays_deleted);

/// The image is sent in a message while its pictures are being stored: the message it was sent
/// in stays recorded (so another message cannot take it), and the pictures are stored too.
async fn a_claim_made_meanwhile_stays(stack: Stack) {
    let harness = Harness::start(stack).await;
    let photo = harness.upload("photo.png", "image/png", png(64, 48)).await;
    harness.store.gate.arrived(1).await;
    let message = harness.send(&[&photo["id"]]).await;
    harness.store.gate.release(1).await;

    let id = photo["id"].as_str().unwrap();
    let listed = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await;
    let stored = &listed["items"][0];
    assert_eq!(stored["id"], id);
    assert_eq!(stored["message_id"], message.as_str(), "{stored}");
    assert_eq!(stored["image"]["width"], 64, "{stored}");
    assert!(stored["image"]["thumbnail"].is_object(), "{stored}");
    let again = harness
        .send_json(
            &format!("/v1/chats/{}/signals", harness.chat),
            &json!({"kind": "message", "attachments": [id]}),
        )
        .await;
    assert_eq!(again.status(), 422, "an upload goes in one message");
    harness.stop().await;
}
on_both_stacks!(a_claim_made_meanwhile_stays);
