//! Delayed push, on both stacks, to a Web Push receiver in this test that holds a real subscription
//! key pair: it decrypts every payload per RFC 8291 (its own implementation, not the server's) and
//! verifies the VAPID JWT per RFC 8292, so it proves the bytes a browser's push service would get.
//! With a delay of a few hundred milliseconds: an unfetched message gives exactly one push per
//! device; three messages give one collapsed push; a fetched one gives none; a 410 removes the
//! device. The recipient's settings are kept (mute, delay, previews), and reading a chat whose
//! push was sent withdraws it from every device. The real binary killed with SIGKILL while pushes
//! are pending, and started again, sends each of them exactly once.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes128Gcm, Nonce};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_runtime::vapid::VapidKeys;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Verifier;
use p256::elliptic_curve::sec1::ToSec1Point;
use serde_json::{Value, json};
use sha2::Sha256;
use support::{ConfabProcess, DEADLINE, Stack, TestApp, on_both_stacks};

/// A browser's side of one subscription: its key pair and auth secret.
struct Subscription {
    secret: p256::SecretKey,
    auth: [u8; 16],
}

impl Subscription {
    fn new(seed: u8) -> Subscription {
        let mut scalar = [seed; 32];
        scalar[0] = 1;
        Subscription {
            secret: p256::SecretKey::from_slice(&scalar).unwrap(),
            auth: [seed; 16],
        }
    }

    fn public(&self) -> Vec<u8> {
        self.secret
            .public_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    }

    /// RFC 8291 decryption of an `aes128gcm` body with one record.
    fn decrypt(&self, body: &[u8]) -> Vec<u8> {
        let hkdf = |salt: &[u8], ikm: &[u8], info: &[u8], len: usize| {
            let mut extract = <Hmac<Sha256> as Mac>::new_from_slice(salt).unwrap();
            extract.update(ikm);
            let prk = extract.finalize().into_bytes();
            let mut expand = <Hmac<Sha256> as Mac>::new_from_slice(&prk).unwrap();
            expand.update(info);
            expand.update(&[1]);
            expand.finalize().into_bytes()[..len].to_vec()
        };
        let salt = &body[..16];
        let record_size = u32::from_be_bytes(body[16..20].try_into().unwrap());
        assert!(record_size >= 18);
        let id_len = body[20] as usize;
        let sender_public = &body[21..21 + id_len];
        let sealed = &body[21 + id_len..];
        let sender = p256::PublicKey::from_sec1_bytes(sender_public).unwrap();
        let shared =
            p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), sender.as_affine());
        let mut info = b"WebPush: info\0".to_vec();
        info.extend_from_slice(&self.public());
        info.extend_from_slice(sender_public);
        let ikm = hkdf(&self.auth, shared.raw_secret_bytes(), &info, 32);
        let key = hkdf(salt, &ikm, b"Content-Encoding: aes128gcm\0", 16);
        let nonce = hkdf(salt, &ikm, b"Content-Encoding: nonce\0", 12);
        let mut plain = Aes128Gcm::new_from_slice(&key)
            .unwrap()
            .decrypt(Nonce::from_slice(&nonce), sealed)
            .expect("the payload decrypts with the subscription's keys");
        // Strip the padding and the last-record delimiter.
        while plain.last() == Some(&0) {
            plain.pop();
        }
        assert_eq!(plain.pop(), Some(2), "one record, the last");
        plain
    }
}

/// A push as the receiver saw it: decrypted and verified.
#[derive(Debug, Clone)]
struct Received {
    device: String,
    payload: Value,
    topic: Option<String>,
}

#[derive(Clone)]
struct Receiver {
    origin: String,
    vapid_public: String,
    subscriptions: Arc<HashMap<String, Subscription>>,
    received: Arc<Mutex<Vec<Received>>>,
    /// Devices whose endpoint answers 410 Gone.
    gone: Arc<Mutex<Vec<String>>>,
    /// When set, each push waits for a permit before it is taken.
    gate: Arc<Mutex<Option<Arc<tokio::sync::Semaphore>>>>,
    /// Pushes waiting at the gate.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

async fn receive(
    State(receiver): State<Receiver>,
    Path(device): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if receiver.gone.lock().unwrap().contains(&device) {
        return StatusCode::GONE;
    }
    let gate = receiver.gate.lock().unwrap().clone();
    if let Some(gate) = gate {
        receiver
            .waiting
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _permit = gate.acquire().await.expect("the gate stays open");
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    assert_eq!(header("content-encoding").as_deref(), Some("aes128gcm"));
    assert!(header("ttl").unwrap().parse::<u64>().unwrap() > 0);
    // RFC 8292: `vapid t=<JWT>, k=<key>`, the JWT signed by that key for this origin.
    let authorization = header("authorization").expect("a VAPID authorization");
    let (token, key) = authorization
        .strip_prefix("vapid t=")
        .and_then(|rest| rest.split_once(", k="))
        .expect("vapid t=…, k=…");
    assert_eq!(key, receiver.vapid_public);
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let claims: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(signed.split_once('.').unwrap().1)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], receiver.origin.as_str());
    assert!(claims["exp"].as_i64().unwrap() > time::OffsetDateTime::now_utc().unix_timestamp());
    assert!(
        claims["exp"].as_i64().unwrap()
            <= time::OffsetDateTime::now_utc().unix_timestamp() + 86_400
    );
    p256::ecdsa::VerifyingKey::from_sec1_bytes(&URL_SAFE_NO_PAD.decode(key).unwrap())
        .unwrap()
        .verify(
            signed.as_bytes(),
            &p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap())
                .unwrap(),
        )
        .expect("the VAPID signature verifies");
    let subscription = &receiver.subscriptions[&device];
    let payload: Value = serde_json::from_slice(&subscription.decrypt(&body)).unwrap();
    receiver.received.lock().unwrap().push(Received {
        device,
        payload,
        topic: header("topic"),
    });
    StatusCode::CREATED
}

async fn start_receiver(vapid_public: &str, devices: &[&str]) -> Receiver {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", listener.local_addr().unwrap());
    let receiver = Receiver {
        origin,
        vapid_public: vapid_public.to_owned(),
        subscriptions: Arc::new(
            devices
                .iter()
                .enumerate()
                .map(|(i, d)| ((*d).to_owned(), Subscription::new(i as u8 + 7)))
                .collect(),
        ),
        received: Arc::default(),
        gone: Arc::default(),
        gate: Arc::default(),
        waiting: Arc::default(),
    };
    let router = axum::Router::new()
        .route("/push/{device}", axum::routing::post(receive))
        .with_state(receiver.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    receiver
}

/// An app whose pushes are delayed 300 ms, and `bob` with one device, `device`, that `alice` can
/// reach.
struct BobsDevice {
    app: TestApp,
    receiver: Receiver,
    alice: String,
    bob: String,
    bob_id: String,
}

async fn bobs_device(stack: Stack, device: &str) -> BobsDevice {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &[device]).await;
    let data = tempfile::tempdir().unwrap();
    let config = push_config(stack, &data, &keys, 300);
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    receiver.register(&app, &bob, &[device]).await;
    BobsDevice {
        app,
        receiver,
        alice,
        bob,
        bob_id,
    }
}

/// A configuration for `stack` whose pushes go out after `delay_ms`, signed with `keys`, to
/// endpoints on loopback (the receivers here).
fn push_config(
    stack: Stack,
    data: &tempfile::TempDir,
    keys: &VapidKeys,
    delay_ms: u64,
) -> confab_runtime::config::Config {
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.push.vapid_public_key = Some(keys.public_key.clone());
    config.push.vapid_private_key = Some(keys.private_key.clone());
    config.push.allow_insecure_endpoints = true;
    config.push.delay_ms = Some(delay_ms);
    config
}

impl Receiver {
    /// Registers `devices` of this receiver as the devices of the user of `token`.
    async fn register(&self, app: &TestApp, token: &str, devices: &[&str]) {
        for device in devices {
            let registered = app
                .post(token, "/v1/devices", &self.registration(device))
                .await;
            assert_eq!(registered.status(), 201);
        }
    }

    fn registration(&self, device: &str) -> Value {
        let subscription = &self.subscriptions[device];
        json!({
            "platform": "webpush",
            "endpoint": format!("{}/push/{device}", self.origin),
            "keys": {
                "p256dh": URL_SAFE_NO_PAD.encode(subscription.public()),
                "auth": URL_SAFE_NO_PAD.encode(subscription.auth),
            }
        })
    }

    /// Waits until a message push for `chat` reaches `device`, and returns it.
    async fn next_for(&self, device: &str, chat: &str) -> Received {
        self.next_of("messages", device, chat).await
    }

    /// Waits until a push of `kind` (`messages`, `withdrawn`) for `chat` reaches `device`.
    async fn next_of(&self, kind: &str, device: &str, chat: &str) -> Received {
        self.next_within(DEADLINE, kind, device, chat).await
    }

    /// Waits up to `wait` until a push of `kind` for `chat` reaches `device`.
    async fn next_within(&self, wait: Duration, kind: &str, device: &str, chat: &str) -> Received {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(push) = self.received.lock().unwrap().iter().find(|p| {
                p.device == device && p.payload["chat_id"] == chat && p.payload["type"] == kind
            }) {
                return push.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {kind} push for {chat} reached {device}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn count_for(&self, chat: &str) -> usize {
        self.received
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.payload["chat_id"] == chat)
            .count()
    }
}

/// Mutes `chat` for the user of `token`; returns the settings as stored.
async fn mute(app: &TestApp, token: &str, chat: &str) -> Value {
    let muted = app
        .put(
            token,
            &format!("/v1/chats/{chat}/settings"),
            &json!({"muted": true}),
        )
        .await;
    assert_eq!(muted.status(), 200);
    muted.json().await.unwrap()
}

async fn send(app: &TestApp, token: &str, chat: &str, text: &str) -> String {
    let response = app
        .post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn delayed_push(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["laptop", "phone"]).await;
    let data = tempfile::tempdir().unwrap();
    let config = push_config(stack, &data, &keys, 300);
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    receiver.register(&app, &bob, &["laptop", "phone"]).await;
    let (first, burst, fetched, later) = (
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
    );

    // Unfetched: one push per device, none to the author.
    let signal = send(&app, &alice, &first, "hello").await;
    for device in ["laptop", "phone"] {
        let push = receiver.next_for(device, &first).await;
        assert_eq!(push.payload["signal_id"], signal.as_str());
        assert_eq!(push.payload["author_id"], alice_id.as_str());
        assert_eq!(push.payload["count"], 1);
        assert!(push.topic.is_some(), "a topic collapses a chat's pushes");
    }

    // Three messages in the window: one push each device, announcing three. The window of this
    // chat is bob's own setting, long enough for three sends on a slow machine.
    delay_in(&app, &bob, &burst, 2_000).await;
    for i in 0..3 {
        send(&app, &alice, &burst, &format!("burst {i}")).await;
    }
    let collapsed = receiver.next_for("laptop", &burst).await;
    assert_eq!(collapsed.payload["count"], 3);

    // Fetched before its delay: no push. A later message in another chat, due after it, shows
    // the queue has moved past it.
    send(&app, &alice, &fetched, "read at once").await;
    let history = app.get(&bob, &format!("/v1/chats/{fetched}/signals")).await;
    assert_eq!(history.status(), 200);
    send(&app, &alice, &later, "after").await;
    receiver.next_for("laptop", &later).await;
    receiver.next_for("phone", &later).await;
    assert_eq!(
        receiver.count_for(&fetched),
        0,
        "the fetched message was not pushed"
    );
    assert_eq!(
        receiver.count_for(&first),
        2,
        "exactly one push per device, never twice"
    );

    // A 410 from the push service: the device is gone.
    receiver.gone.lock().unwrap().push("phone".into());
    send(&app, &alice, &first, "to a gone phone").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let devices: Value = app.get(&bob, "/v1/devices").await.json().await.unwrap();
        if devices["items"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gone device was never removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}

/// Settings changed while a push waits apply to it when it comes due: a chat muted meanwhile
/// gets no push, and with previews turned off meanwhile the push says who, not what. (The
/// settings are read when the push is scheduled, and a delay may be up to a day.) The pushes
/// wait with no sender at all: an API process alone schedules them and takes the changes, and
/// the sender starts only after them, so no delay has to outlast the changes.
async fn settings_changed_while_a_push_waits(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["phone"]).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = push_config(stack, &data, &keys, 300);
    // The API process alone signs in with the embedded stack's dev tokens too, and migrates no
    // keyspace: that is done first, as `confab migrate` would.
    config.identity.allow_dev_in_distributed_roles = true;
    drop(confab::open_store(&config, true).await.unwrap());
    let api = support::spawn_role_with(stack, confab::Role::Api, config.clone(), data).await;
    let alice = api.token("alice").await;
    let bob = api.token("bob").await;
    let bob_id = api.me(&bob).await;
    receiver.register(&api, &bob, &["phone"]).await;
    let (muted, private) = (
        api.group_chat(&alice, &[&bob_id]).await,
        api.group_chat(&alice, &[&bob_id]).await,
    );
    send(&api, &alice, &muted, "muted while it waited").await;
    send(&api, &alice, &private, "a secret while it waited").await;
    mute(&api, &bob, &muted).await;
    let no_previews = api
        .put(&bob, "/v1/me/settings", &json!({"push_previews": false}))
        .await;
    assert_eq!(no_previews.status(), 200);
    let data = api.stop_keeping_state().await;

    // The sender, from here on: both pushes are due.
    let app = support::spawn_with(stack, config.clone(), data).await;
    let push = receiver.next_for("phone", &private).await;
    // Whatever it sent is sent once it stopped; what it did not claim is still queued.
    let data = app.stop_keeping_state().await;
    let queue = confab::open_push_queue(&config).await.unwrap();
    let left = queue
        .claim_due(confab_runtime::presence::now_ms(), 256)
        .await
        .unwrap()
        .pushes;
    // All looked at before any fails, so a failure tells of all.
    let (previewed, pushed_muted, queued_muted) = (
        push.payload.get("preview").cloned(),
        receiver.count_for(&muted),
        left.iter().filter(|p| p.chat.to_string() == muted).count(),
    );
    assert_eq!(
        (previewed, pushed_muted, queued_muted),
        (None, 0, 0),
        "(the preview of a push after previews were turned off, pushes of a chat muted while \
         they waited: sent, left in the queue)"
    );
    if stack == Stack::Real {
        Box::pin(support::clean_up_real(&config)).await;
    }
    drop(data);
}

on_both_stacks!(settings_changed_while_a_push_waits);

/// A chat of more members than are scheduled before the send answers is fanned out in the
/// background: an unread message still reaches each device, and so does a later one; one read
/// before its push was due rings nothing, whenever the background pass reached the reader.
async fn a_large_chat_is_pushed(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["laptop", "phone"]).await;
    let data = tempfile::tempdir().unwrap();
    // A delay that the read below surely beats, while the background passes schedule 2,400
    // pushes on a busy machine: a push due before the read is processed is (rightly) sent and
    // then withdrawn, which is not what this test is about.
    let config = push_config(stack, &data, &keys, 5_000);
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    receiver.register(&app, &bob, &["laptop", "phone"]).await;
    let pushed = app.group_chat(&alice, &[&bob_id]).await;
    let read = app.group_chat(&alice, &[&bob_id]).await;
    // 1,200 more members each, written straight to the store.
    let store = confab::open_store(&app.config, false).await.unwrap();
    let joined_at = confab_schema::model::to_millis(time::OffsetDateTime::now_utc());
    for chat in [&pushed, &read] {
        let chat_id: confab_schema::ChatId = chat.parse().unwrap();
        futures::stream::iter(0..1_200)
            .map(|i| {
                let store = Arc::clone(&store);
                async move {
                    store
                        .put_member(
                            chat_id,
                            &confab_schema::Member {
                                user_id: confab_schema::UserId::from_subject(
                                    "large-push",
                                    &format!("member-{i}"),
                                ),
                                role: confab_schema::MemberRole::Member,
                                joined_at,
                            },
                        )
                        .await
                }
            })
            .buffer_unordered(64)
            .for_each(|written| async move { written.expect("member written") })
            .await;
    }

    let signal = send(&app, &alice, &pushed, "to twelve hundred").await;
    let seen = send(&app, &alice, &read, "read at once").await;
    let marked = app
        .post(
            &bob,
            &format!("/v1/chats/{read}/read"),
            &json!({"up_to": seen}),
        )
        .await;
    assert_eq!(marked.status(), 200);
    for device in ["laptop", "phone"] {
        let push = receiver.next_for(device, &pushed).await;
        assert_eq!(push.payload["signal_id"], signal.as_str());
    }
    let later = send(&app, &alice, &pushed, "and later").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !receiver
        .received
        .lock()
        .unwrap()
        .iter()
        .any(|p| p.payload["signal_id"] == later.as_str())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the later message was never pushed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Due seconds after it was read, long before the later message's push came.
    assert_eq!(
        receiver.count_for(&read),
        0,
        "the message read in time was not pushed"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_large_chat_is_pushed_on_the_embedded_default() {
    a_large_chat_is_pushed(Stack::Embedded).await;
}

#[tokio::test]
async fn a_large_chat_is_pushed_on_the_real_stack() {
    if support::real_stack_available("a_large_chat_is_pushed_on_the_real_stack").await {
        Box::pin(a_large_chat_is_pushed(Stack::Real)).await;
    }
}

async fn settings_and_withdrawal(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["laptop", "phone"]).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = push_config(stack, &data, &keys, 300);
    // Settings once read stay cached for the whole test, so each change below applies only if
    // making it drops the cached copy.
    config.push.settings_cache_ms = Some(600_000);
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    let alice_name: Value = app.get(&alice, "/v1/me").await.json().await.unwrap();
    receiver.register(&app, &bob, &["laptop", "phone"]).await;
    let mut chats = Vec::new();
    for _ in 0..9 {
        chats.push(app.group_chat(&alice, &[&bob_id]).await);
    }
    let [
        muted,
        slow,
        private,
        read_elsewhere,
        delivered,
        withdrawn,
        answered,
        later,
        muted_later,
    ] = <[String; 9]>::try_from(chats).unwrap();

    // Settings: the defaults, then what bob chose; refused when out of range, unknown, or not his.
    let defaults: Value = app.get(&bob, "/v1/me/settings").await.json().await.unwrap();
    assert_eq!(
        defaults,
        json!({"push_delay_ms": null, "push_previews": true, "auto_load_images": true, "low_quality_previews": false})
    );
    let muted_now = mute(&app, &bob, &muted).await;
    assert_eq!(muted_now["muted"], true);
    let one_day = app
        .put(
            &bob,
            &format!("/v1/chats/{slow}/settings"),
            &json!({"push_delay_ms": 86_400_000}),
        )
        .await;
    assert_eq!(one_day.status(), 200);
    let stored: Value = app
        .get(&bob, &format!("/v1/chats/{slow}/settings"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(stored["push_delay_ms"], 86_400_000);
    for (path, body) in [
        (
            format!("/v1/chats/{slow}/settings"),
            json!({"push_delay_ms": 86_400_001}),
        ),
        ("/v1/me/settings".to_owned(), json!({"push_delay_ms": -1})),
        ("/v1/me/settings".to_owned(), json!({"bogus": true})),
        (
            format!("/v1/chats/{slow}/settings"),
            json!({"muted_until": "tomorrow"}),
        ),
    ] {
        let refused = app.put(&bob, &path, &body).await;
        assert!(
            refused.status().is_client_error(),
            "{path} {body}: {}",
            refused.status()
        );
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
    }
    let not_his = app
        .put(
            &carol,
            &format!("/v1/chats/{muted}/settings"),
            &json!({"muted": false}),
        )
        .await;
    assert!(
        [403, 404].contains(&not_his.status().as_u16()),
        "a non-member changed a chat's settings: {}",
        not_his.status()
    );

    // Sent, then read on another device: the notification is withdrawn from both devices, with
    // the topic that replaces it.
    let hello = send(&app, &alice, &withdrawn, "hello there").await;
    for device in ["laptop", "phone"] {
        let push = receiver.next_of("messages", device, &withdrawn).await;
        assert_eq!(push.payload["preview"], "hello there");
        assert_eq!(push.payload["author_name"], alice_name["display_name"]);
    }
    let read = app
        .post(
            &bob,
            &format!("/v1/chats/{withdrawn}/read"),
            &json!({"up_to": hello}),
        )
        .await;
    assert_eq!(read.status(), 200);
    for device in ["laptop", "phone"] {
        let pushed = receiver.next_of("messages", device, &withdrawn).await;
        let withdrawal = receiver.next_of("withdrawn", device, &withdrawn).await;
        assert_eq!(withdrawal.payload["up_to"], hello.as_str());
        assert_eq!(
            withdrawal.topic, pushed.topic,
            "the withdrawal replaces the push"
        );
    }

    // Sent, then answered from another device, which moves bob's read marker past it without
    // looking for the push; then read up to the answer, a marker that is already there: the
    // notification is withdrawn all the same.
    let asked = send(&app, &alice, &answered, "are you there?").await;
    for device in ["laptop", "phone"] {
        receiver.next_of("messages", device, &answered).await;
    }
    let answer = send(&app, &bob, &answered, "yes").await;
    let read = app
        .post(
            &bob,
            &format!("/v1/chats/{answered}/read"),
            &json!({"up_to": answer}),
        )
        .await;
    assert_eq!(read.status(), 200);
    for device in ["laptop", "phone"] {
        let withdrawal = receiver.next_of("withdrawn", device, &answered).await;
        assert_eq!(withdrawal.payload["up_to"], asked.as_str());
    }

    // Read, or acknowledged as delivered, before the delay: nothing is sent.
    let early = send(&app, &alice, &read_elsewhere, "read at once").await;
    let read = app
        .post(
            &bob,
            &format!("/v1/chats/{read_elsewhere}/read"),
            &json!({"up_to": early}),
        )
        .await;
    assert_eq!(read.status(), 200);
    let live = send(&app, &alice, &delivered, "received live").await;
    let acknowledged = app
        .post(
            &bob,
            &format!("/v1/chats/{delivered}/delivered"),
            &json!({"up_to": live}),
        )
        .await;
    assert_eq!(acknowledged.status(), 200);

    // Muted, or delayed for a day: nothing now.
    send(&app, &alice, &muted, "muted").await;
    send(&app, &alice, &slow, "slow").await;

    // Muted after a push: the next message is not pushed, although the chat's settings were read
    // (and cached) for the first.
    send(&app, &alice, &muted_later, "before the mute").await;
    for device in ["laptop", "phone"] {
        receiver.next_of("messages", device, &muted_later).await;
    }
    mute(&app, &bob, &muted_later).await;
    send(&app, &alice, &muted_later, "after the mute").await;

    // Previews off: the push says who, not what.
    let no_previews = app
        .put(&bob, "/v1/me/settings", &json!({"push_previews": false}))
        .await;
    assert_eq!(no_previews.status(), 200);
    send(&app, &alice, &private, "a secret").await;
    let push = receiver.next_of("messages", "laptop", &private).await;
    assert!(push.payload.get("preview").is_none(), "{}", push.payload);
    assert_eq!(push.payload["author_name"], alice_name["display_name"]);

    // A message sent after all of them, with the default delay, arrives; none of those did.
    send(&app, &alice, &later, "after").await;
    receiver.next_of("messages", "laptop", &later).await;
    receiver.next_of("messages", "phone", &later).await;
    assert_eq!(
        receiver.count_for(&muted_later),
        2,
        "a push after the chat was muted"
    );
    for (chat, what) in [
        (&muted, "muted"),
        (&slow, "delayed a day"),
        (&read_elsewhere, "read before its delay"),
        (&delivered, "delivered before its delay"),
    ] {
        assert_eq!(receiver.count_for(chat), 0, "a push for a chat {what}");
    }
    app.stop().await;
}

#[tokio::test]
async fn settings_mute_previews_and_withdrawal_on_the_embedded_default() {
    Box::pin(settings_and_withdrawal(Stack::Embedded)).await;
}

#[tokio::test]
async fn settings_mute_previews_and_withdrawal_on_the_real_stack() {
    if support::real_stack_available("settings_mute_previews_and_withdrawal_on_the_real_stack")
        .await
    {
        Box::pin(settings_and_withdrawal(Stack::Real)).await;
    }
}

#[tokio::test]
async fn delayed_push_on_the_embedded_default() {
    Box::pin(delayed_push(Stack::Embedded)).await;
}

#[tokio::test]
async fn delayed_push_on_the_real_stack() {
    if support::real_stack_available("delayed_push_on_the_real_stack").await {
        Box::pin(delayed_push(Stack::Real)).await;
    }
}

/// A push shows the message as it is when the push goes out: a message deleted before its push
/// rings nothing, an edited one is previewed as edited, and a deleted message whose push was sent
/// already has it withdrawn from the devices.
async fn deleted_and_edited_messages(stack: Stack) {
    let BobsDevice {
        app,
        receiver,
        alice,
        bob,
        bob_id,
    } = bobs_device(stack, "laptop").await;
    let (deleted, edited, sent, later) = (
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
    );
    let message = |chat: &str, id: &str| format!("{}/v1/chats/{chat}/signals/{id}", app.base);
    // Bob's window for the edited chat: long enough for the edit on a slow machine.
    delay_in(&app, &bob, &edited, 2_000).await;

    let secret = send(&app, &alice, &deleted, "deleted secret").await;
    let removed = app
        .http
        .delete(message(&deleted, &secret))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    let typo = send(&app, &alice, &edited, "edited secret").await;
    let fixed = app
        .http
        .patch(message(&edited, &typo))
        .bearer_auth(&alice)
        .json(&json!({"text": "as edited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fixed.status(), 200);
    let push = receiver.next_for("laptop", &edited).await;
    assert_eq!(push.payload["preview"], "as edited", "{}", push.payload);

    // Sent, then deleted: withdrawn.
    let shown = send(&app, &alice, &sent, "shown secret").await;
    let push = receiver.next_for("laptop", &sent).await;
    assert_eq!(push.payload["preview"], "shown secret");
    let removed = app
        .http
        .delete(message(&sent, &shown))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);
    let withdrawn = receiver.next_of("withdrawn", "laptop", &sent).await;
    assert_eq!(withdrawn.payload["up_to"], shown.as_str());

    // A message sent after all of them, with the same delay, arrives; the deleted one did not.
    send(&app, &alice, &later, "after").await;
    receiver.next_for("laptop", &later).await;
    assert_eq!(
        receiver.count_for(&deleted),
        0,
        "a push for a message deleted before it was due"
    );
    app.stop().await;
}

#[tokio::test]
async fn deleted_and_edited_messages_on_the_embedded_default() {
    Box::pin(deleted_and_edited_messages(Stack::Embedded)).await;
}

#[tokio::test]
async fn deleted_and_edited_messages_on_the_real_stack() {
    if support::real_stack_available("deleted_and_edited_messages_on_the_real_stack").await {
        Box::pin(deleted_and_edited_messages(Stack::Real)).await;
    }
}

/// Deleting the newest message of a burst before its push is due leaves the push of the others:
/// it announces the newest message still there (its id, author and text), counts only what is
/// left, and nothing of the deleted one reaches the device.
async fn a_deleted_newest_message_leaves_the_push_of_the_others(stack: Stack) {
    let BobsDevice {
        app,
        receiver,
        alice,
        bob,
        bob_id,
    } = bobs_device(stack, "laptop").await;
    let alice_id = app.me(&alice).await;
    let (burst, later) = (
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
    );
    // Bob's window for the burst: long enough for the deletion on a slow machine.
    delay_in(&app, &bob, &burst, 2_000).await;
    let kept = send(&app, &alice, &burst, "still here").await;
    let deleted = send(&app, &alice, &burst, "deleted secret").await;
    let removed = app
        .http
        .delete(format!("{}/v1/chats/{burst}/signals/{deleted}", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 200);

    let push = receiver.next_for("laptop", &burst).await;
    assert_eq!(push.payload["signal_id"], kept.as_str(), "{}", push.payload);
    assert_eq!(
        push.payload["author_id"],
        alice_id.as_str(),
        "{}",
        push.payload
    );
    assert_eq!(push.payload["preview"], "still here", "{}", push.payload);
    assert_eq!(push.payload["count"], 1, "{}", push.payload);
    // A message sent after, with a shorter delay, arrives; the burst rang once.
    send(&app, &alice, &later, "after").await;
    receiver.next_for("laptop", &later).await;
    assert_eq!(receiver.count_for(&burst), 1, "one push for the burst");
    for received in receiver.received.lock().unwrap().iter() {
        let text = received.payload.to_string();
        assert!(
            !text.contains(&deleted) && !text.contains("deleted secret"),
            "the deleted message reached a device: {text}"
        );
    }
    app.stop().await;
}

on_both_stacks!(a_deleted_newest_message_leaves_the_push_of_the_others);

/// A call nobody answers rings out into a `missed` signal, and that signal is pushed to the
/// callees (not to the caller) as a message is; the call's other signals push nothing.
async fn missed_calls_are_pushed(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["bobs", "alices"]).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = push_config(stack, &data, &keys, 200);
    config.calls.ring_timeout_secs = 1;
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    for (token, device) in [(&bob, "bobs"), (&alice, "alices")] {
        let registered = app
            .post(token, "/v1/devices", &receiver.registration(device))
            .await;
        assert_eq!(registered.status(), 201);
    }
    let (missed, answered) = (
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
    );
    let call = app
        .post(&alice, &format!("/v1/chats/{missed}/calls"), &json!({}))
        .await;
    assert_eq!(call.status(), 201);
    let call: Value = call.json().await.unwrap();
    // An answered call in another chat: its signals push nothing.
    let other: Value = app
        .post(&alice, &format!("/v1/chats/{answered}/calls"), &json!({}))
        .await
        .json()
        .await
        .unwrap();
    let joined = app
        .post(
            &bob,
            &format!("/v1/calls/{}/join", other["id"].as_str().unwrap()),
            &json!({}),
        )
        .await;
    assert_eq!(joined.status(), 200);

    let push = receiver.next_for("bobs", &missed).await;
    let history: Value = app
        .get(&bob, &format!("/v1/chats/{missed}/signals"))
        .await
        .json()
        .await
        .unwrap();
    let newest = &history["items"][0];
    assert_eq!(newest["call"]["state"], "missed");
    assert_eq!(newest["call"]["call_id"], call["id"]);
    assert_eq!(push.payload["signal_id"], newest["id"]);
    assert_eq!(push.payload["author_id"], alice_id.as_str());
    // A later message to alice in a third chat, pushed after the missed call's: by then the
    // caller's own missed call would have been pushed to her, had it been.
    let later = app.group_chat(&bob, &[&alice_id]).await;
    send(&app, &bob, &later, "call me back").await;
    receiver.next_for("alices", &later).await;
    // Bob's fetch of the history withdraws the push he got; besides that, one push, his.
    let pushes: Vec<Received> = receiver
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.payload["chat_id"] == missed.as_str() && p.payload["type"] == "messages")
        .cloned()
        .collect();
    assert_eq!(pushes.len(), 1, "the callee only, once");
    assert_eq!(pushes[0].device, "bobs");
    assert_eq!(
        receiver.count_for(&answered),
        0,
        "an answered call rings no phone"
    );
    app.stop().await;
}

#[tokio::test]
async fn missed_calls_are_pushed_on_the_embedded_default() {
    Box::pin(missed_calls_are_pushed(Stack::Embedded)).await;
}

#[tokio::test]
async fn missed_calls_are_pushed_on_the_real_stack() {
    if support::real_stack_available("missed_calls_are_pushed_on_the_real_stack").await {
        Box::pin(missed_calls_are_pushed(Stack::Real)).await;
    }
}

/// Sets `user`'s push delay in `chat`.
async fn delay_in(app: &TestApp, token: &str, chat: &str, delay_ms: u64) {
    let set = app
        .put(
            token,
            &format!("/v1/chats/{chat}/settings"),
            &json!({"push_delay_ms": delay_ms}),
        )
        .await;
    assert_eq!(set.status(), 200);
}

/// Logging out everywhere removes the user's push devices: none is listed when they sign in
/// again, and a message sent after the logout rings none of them (a later push to another user,
/// due well after it, shows the queue has moved past it).
async fn logout_all_removes_push_devices(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["laptop", "phone", "carols"]).await;
    let data = tempfile::tempdir().unwrap();
    let config = push_config(stack, &data, &keys, 300);
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    receiver.register(&app, &bob, &["laptop", "phone"]).await;
    receiver.register(&app, &carol, &["carols"]).await;
    let (bobs, carols) = (
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&carol_id]).await,
    );
    delay_in(&app, &carol, &carols, 1_500).await;

    let logout = app.post(&bob, "/v1/me/logout-all", &json!({})).await;
    assert_eq!(logout.status(), 204);
    // Tokens issued in the logout's second are refused: sign in again in the next one.
    let now = || time::OffsetDateTime::now_utc().unix_timestamp();
    let logged_out_at = now();
    while now() <= logged_out_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = app.token("bob").await;
    let devices = app.get(&again, "/v1/devices").await;
    assert_eq!(devices.status(), 200);
    let devices: Value = devices.json().await.unwrap();
    assert_eq!(
        devices["items"],
        json!([]),
        "devices registered before logging out everywhere"
    );

    send(&app, &alice, &bobs, "after the logout").await;
    send(&app, &alice, &carols, "to carol").await;
    receiver.next_for("carols", &carols).await;
    assert_eq!(
        receiver.count_for(&bobs),
        0,
        "a device of a user who logged out everywhere was pushed"
    );
    app.stop().await;
}

on_both_stacks!(logout_all_removes_push_devices);

/// A member removed from a chat while a push of it waits for them gets nothing of that chat: not
/// the push, and not the text the message was edited to after they lost access. (The removal's
/// `left` signal moves their marker past the message; should that bookkeeping fail, the sender's
/// membership check stops the push: `push::tests` in the notifier.) A notification of the chat
/// they already had is withdrawn from their devices when they are removed.
async fn removed_members_get_no_push(stack: Stack) {
    let BobsDevice {
        app,
        receiver,
        alice,
        bob,
        bob_id,
    } = bobs_device(stack, "phone").await;

    let notified = app.group_chat(&alice, &[&bob_id]).await;
    delay_in(&app, &bob, &notified, 0).await;
    let shown = send(&app, &alice, &notified, "seen on the lock screen").await;
    let pushed = receiver.next_for("phone", &notified).await;
    assert_eq!(pushed.payload["signal_id"], shown.as_str());
    let removed = app
        .http
        .delete(format!("{}/v1/chats/{notified}/members/{bob_id}", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204, "{}", removed.text().await.unwrap());
    let withdrawn = receiver.next_of("withdrawn", "phone", &notified).await;
    assert_eq!(withdrawn.payload["up_to"], shown.as_str());
    let (left, later) = (
        app.group_chat(&alice, &[&bob_id]).await,
        app.group_chat(&alice, &[&bob_id]).await,
    );
    // The removal and the edit happen within the first window; the later chat's push comes due
    // a second after the first one.
    delay_in(&app, &bob, &left, 2_000).await;
    delay_in(&app, &bob, &later, 3_000).await;

    let message = send(&app, &alice, &left, "before the removal").await;
    let removed = app
        .http
        .delete(format!("{}/v1/chats/{left}/members/{bob_id}", app.base))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204, "{}", removed.text().await.unwrap());
    let edited = app
        .http
        .patch(format!("{}/v1/chats/{left}/signals/{message}", app.base))
        .bearer_auth(&alice)
        .json(&json!({"text": "written after bob was removed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(edited.status(), 200);
    send(&app, &alice, &later, "still a member here").await;

    receiver.next_for("phone", &later).await;
    let leaked: Vec<Value> = receiver
        .received
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.payload["chat_id"] == left.as_str())
        .map(|p| p.payload.clone())
        .collect();
    assert!(
        leaked.is_empty(),
        "a removed member was pushed the chat he left: {leaked:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn removed_members_get_no_push_on_the_embedded_default() {
    Box::pin(removed_members_get_no_push(Stack::Embedded)).await;
}

#[tokio::test]
async fn removed_members_get_no_push_on_the_real_stack() {
    if support::real_stack_available("removed_members_get_no_push_on_the_real_stack").await {
        Box::pin(removed_members_get_no_push(Stack::Real)).await;
    }
}

/// A pairing that ends takes its chat's notification off the partners' devices, whether one of
/// them leaves it or the circle expires (which ends its pairings and removes its chats): the
/// partners are out of the chat, as a removed member is.
async fn ended_pairings_withdraw_their_pushes(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["phone"]).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = push_config(stack, &data, &keys, 300);
    config.circles.sweep_interval_ms = 100;
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    receiver.register(&app, &bob, &["phone"]).await;
    // The first pairing bob leaves; the second ends as its circle expires, half a minute after
    // it was made.
    const TTL: Duration = Duration::from_secs(30);
    for expires in [false, true] {
        let ttl_hours = if expires {
            TTL.as_secs_f64() / 3600.0
        } else {
            1.0
        };
        let made = tokio::time::Instant::now();
        let created = app
            .post(
                &alice,
                "/v1/circles",
                &json!({"name": "pairs", "ttl_hours": ttl_hours, "display_name": "Al"}),
            )
            .await;
        assert_eq!(created.status(), 201);
        let circle: Value = created.json().await.unwrap();
        let joined = app
            .post(
                &bob,
                "/v1/circles/join",
                &json!({"access_code": circle["access_code"], "display_name": "Bo"}),
            )
            .await;
        assert_eq!(joined.status(), 201);
        let pair = format!("/v1/circles/{}/pair", circle["id"].as_str().unwrap());
        assert_eq!(app.post(&alice, &pair, &json!({})).await.status(), 202);
        let paired = app.post(&bob, &pair, &json!({})).await;
        assert_eq!(paired.status(), 200);
        let paired: Value = paired.json().await.unwrap();
        let chat = paired["chat_id"].as_str().unwrap().to_owned();
        let shown = send(&app, &alice, &chat, "from the pairing").await;
        let pushed = receiver.next_for("phone", &chat).await;
        assert_eq!(pushed.payload["signal_id"], shown.as_str());
        assert!(
            !expires || made.elapsed() < TTL,
            "the circle may have expired before the pairing and its push: the host is too slow"
        );
        if !expires {
            assert_eq!(app.delete(&bob, &pair).await.status(), 204);
        }
        let withdrawn = receiver
            .next_within(DEADLINE + TTL, "withdrawn", "phone", &chat)
            .await;
        assert_eq!(
            withdrawn.payload["up_to"],
            shown.as_str(),
            "expired circle: {expires}"
        );
    }
    app.stop().await;
}

on_both_stacks!(ended_pairings_withdraw_their_pushes);

/// A node that shuts down while the pushes it claimed wait for a slow push service sends them
/// before it stops: claimed, they are out of the queue, and no other node would. What it had not
/// claimed yet is sent by the node started after it; each push arrives exactly once.
async fn a_shutdown_sends_what_it_claimed(stack: Stack) {
    // More than the pushes a node sends at once, so that some wait in its hands.
    const CHATS: usize = 80;
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["phone"]).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = push_config(stack, &data, &keys, 300);
    // Alice makes far more chats at once than her rate limit lets a person do.
    config.limits.chats = confab_runtime::config::RateLimit::OFF;
    let app = support::spawn_with(stack, config.clone(), data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    receiver.register(&app, &bob, &["phone"]).await;
    let mut chats = Vec::new();
    for _ in 0..CHATS {
        chats.push(app.group_chat(&alice, &[&bob_id]).await);
    }
    // The push service answers nothing until the node is shutting down.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    *receiver.gate.lock().unwrap() = Some(Arc::clone(&gate));
    for chat in &chats {
        send(&app, &alice, chat, "pending").await;
    }
    // Until the node sends as many as it may at once, and holds the rest it claimed.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while receiver.waiting.load(std::sync::atomic::Ordering::SeqCst) < 64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pushes did not reach the push service"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.begin_shutdown();
    gate.add_permits(CHATS * 4);
    let data = app.stop_keeping_state().await;
    let again = support::spawn_with(stack, config, data).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let missing = chats.iter().filter(|c| receiver.count_for(c) == 0).count();
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of {CHATS} pushes were lost by the shutdown"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for chat in &chats {
        assert_eq!(receiver.count_for(chat), 1, "one push per chat");
    }
    again.stop().await;
}

#[tokio::test]
async fn a_shutdown_sends_what_it_claimed_on_the_embedded_default() {
    Box::pin(a_shutdown_sends_what_it_claimed(Stack::Embedded)).await;
}

#[tokio::test]
async fn a_shutdown_sends_what_it_claimed_on_the_real_stack() {
    if support::real_stack_available("a_shutdown_sends_what_it_claimed_on_the_real_stack").await {
        Box::pin(a_shutdown_sends_what_it_claimed(Stack::Real)).await;
    }
}

/// A loopback address no one listens on now.
async fn free_address() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().to_string()
}

/// Pushes pending when the process that sends them is killed (SIGKILL) are sent once it is
/// started again: each exactly once. On the real stack two notifiers then share the work, still
/// with no push sent twice.
async fn pushes_survive_a_killed_sender(stack: Stack) {
    let keys = VapidKeys::generate();
    let receiver = start_receiver(&keys.public_key, &["laptop"]).await;
    let dir = tempfile::tempdir().unwrap();
    // Long enough to kill the sender before anything is due, even on a slow machine.
    let delay_ms = 3_000;
    let mut env: Vec<(String, String)> = vec![
        ("CONFAB_DATA_DIR".into(), dir.path().display().to_string()),
        ("CONFAB_SECRET_KEY".into(), support::secret()),
        ("CONFAB_PUSH__DELAY_MS".into(), delay_ms.to_string()),
        (
            "CONFAB_PUSH__ALLOW_INSECURE_ENDPOINTS".into(),
            "true".into(),
        ),
        (
            "CONFAB_PUSH__VAPID_PUBLIC_KEY".into(),
            keys.public_key.clone(),
        ),
        (
            "CONFAB_PUSH__VAPID_PRIVATE_KEY".into(),
            keys.private_key.clone(),
        ),
        // The API keeps its address across the restart (on the embedded default `serve` is
        // the API too).
        ("CONFAB_API__LISTEN".into(), free_address().await),
        ("CONFAB_NOTIFIER__LISTEN".into(), "127.0.0.1:0".into()),
        ("CONFAB_WS_PLEXER__LISTEN".into(), "127.0.0.1:0".into()),
    ];
    if stack == Stack::Real {
        env.extend([
            ("CONFAB_STORE__BACKEND".into(), "cql".into()),
            (
                "CONFAB_STORE__CQL_CONTACT_POINTS".into(),
                support::cql_contact_points(),
            ),
            ("CONFAB_STORE__KEYSPACE".into(), support::scratch_keyspace()),
            ("CONFAB_BUS__BACKEND".into(), "nats".into()),
            ("CONFAB_BUS__NATS_URL".into(), support::nats_url()),
            ("CONFAB_BUS__SUBJECT_PREFIX".into(), support::unique("push")),
            ("CONFAB_IDENTITY__MODE".into(), "oidc".into()),
            ("CONFAB_IDENTITY__ISSUER_URL".into(), support::oidc_issuer()),
            ("CONFAB_IDENTITY__CLIENT_IDS".into(), support::oidc_client()),
        ]);
        let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .arg("migrate")
            .current_dir(dir.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .await
            .unwrap();
        assert!(
            migrate.status.success(),
            "{}",
            String::from_utf8_lossy(&migrate.stderr)
        );
    }
    // On the embedded default one `serve` process does everything; on the real stack the sender
    // is the `notifier`, and the API stays up.
    let sender_role = if stack == Stack::Real {
        "notifier"
    } else {
        "serve"
    };
    let api = if stack == Stack::Real {
        Some(ConfabProcess::start(&["api"], &env, dir.path()).await)
    } else {
        None
    };
    let mut sender = ConfabProcess::start(&[sender_role], &env, dir.path()).await;
    let base = api
        .as_ref()
        .map_or(sender.base.clone(), |api| api.base.clone());
    support::wait_ready(&base).await;
    support::wait_ready(&sender.base).await;
    let token = |user: &str| {
        let user = user.to_owned();
        let data = dir.path().to_path_buf();
        async move {
            match stack {
                Stack::Embedded => confab_runtime::identity::DevIdentity::open(&data)
                    .unwrap()
                    .mint(&user, Duration::from_secs(600)),
                Stack::Real => support::keycloak_token(&user, &user).await,
            }
        }
    };
    let (alice, bob) = (token("alice").await, token("bob").await);
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, token: &str, path: &str, body: Value| {
        http.request(method, format!("{base}{path}"))
            .bearer_auth(token)
            .json(&body)
            .send()
    };
    let bob_id: Value = call(reqwest::Method::GET, &bob, "/v1/me", json!({}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let registered = call(
        reqwest::Method::POST,
        &bob,
        "/v1/devices",
        receiver.registration("laptop"),
    )
    .await
    .unwrap();
    assert_eq!(registered.status(), 201);
    let mut chats = Vec::new();
    for _ in 0..4 {
        let chat: Value = call(
            reqwest::Method::POST,
            &alice,
            "/v1/chats",
            json!({"kind": "group", "name": "restart", "members": [bob_id["id"]]}),
        )
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        chats.push(chat["id"].as_str().unwrap().to_owned());
    }
    let sent_at = tokio::time::Instant::now();
    for chat in &chats {
        let posted = call(
            reqwest::Method::POST,
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            json!({"kind": "message", "text": "before the crash"}),
        )
        .await
        .unwrap();
        assert_eq!(posted.status(), 201);
    }
    sender.child.start_kill().unwrap();
    let _ = sender.child.wait().await;
    assert!(
        sent_at.elapsed() < Duration::from_millis(delay_ms),
        "the sender died before anything was due (else this proves nothing)"
    );
    assert_eq!(receiver.received.lock().unwrap().len(), 0);

    let restarted = ConfabProcess::start(&[sender_role], &env, dir.path()).await;
    // On the real stack no request reaches the notifiers before they send: what they recorded
    // meanwhile must still be on /metrics at the end.
    if stack == Stack::Embedded {
        support::wait_ready(&restarted.base).await;
    }
    let second = if stack == Stack::Real {
        Some(ConfabProcess::start(&["notifier"], &env, dir.path()).await)
    } else {
        None
    };
    // A ticket the killed node held (it holds one from two seconds before its due time, so on a
    // slow machine the kill can come after that) comes back only after the push queue's ack wait.
    let after_the_ack_wait = confab_runtime::push_queue::NatsPushQueue::ACK_WAIT + DEADLINE;
    for chat in &chats {
        receiver
            .next_within(after_the_ack_wait, "messages", "laptop", chat)
            .await;
    }
    // One more message, sent after the restart: once it arrives, a duplicate of the earlier ones
    // would have too.
    let extra: Value = call(
        reqwest::Method::POST,
        &alice,
        "/v1/chats",
        json!({"kind": "group", "name": "after", "members": [bob_id["id"]]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let extra = extra["id"].as_str().unwrap().to_owned();
    let posted = call(
        reqwest::Method::POST,
        &alice,
        &format!("/v1/chats/{extra}/signals"),
        json!({"kind": "message", "text": "after the restart"}),
    )
    .await
    .unwrap();
    assert_eq!(posted.status(), 201);
    receiver.next_for("laptop", &extra).await;
    for chat in &chats {
        assert_eq!(receiver.count_for(chat), 1, "exactly one push for {chat}");
    }

    // What happened is on /metrics: scheduled by the API, sent (with provider latency) by the
    // senders.
    let metrics = |base: String| async move {
        reqwest::get(format!("{base}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let api_metrics = metrics(base.clone()).await;
    assert!(
        api_metrics.contains("confab_pushes_scheduled_total"),
        "{api_metrics}"
    );
    let mut sender_metrics = metrics(restarted.base.clone()).await;
    if let Some(second) = &second {
        sender_metrics.push_str(&metrics(second.base.clone()).await);
    }
    for name in ["confab_pushes_sent_total", "confab_push_provider_seconds"] {
        assert!(
            sender_metrics.contains(name),
            "{name} missing: {sender_metrics}"
        );
    }
    restarted.terminate().await;
    if let Some(second) = second {
        second.terminate().await;
    }
    if let Some(api) = api {
        api.terminate().await;
    }
}

#[tokio::test]
async fn pushes_survive_a_killed_sender_on_the_embedded_default() {
    Box::pin(pushes_survive_a_killed_sender(Stack::Embedded)).await;
}

#[tokio::test]
async fn pushes_survive_a_killed_notifier_on_the_real_stack() {
    if support::real_stack_available("pushes_survive_a_killed_notifier_on_the_real_stack").await {
        Box::pin(pushes_survive_a_killed_sender(Stack::Real)).await;
    }
}

/// Bob's page of the newest messages fails (a store read, 503) after its signals were read: he
/// saw nothing, so the push of what it would have shown still comes. The page used to cancel the
/// push before it was made, and the message then reached him neither way.
async fn a_failed_history_page_cancels_no_push(stack: Stack) {
    use confab_api::domain::inputs::PageLimit;
    use confab_api::domain::signals::HistoryFrom;
    use confab_runtime::push_queue::{Cancelled, EmbeddedPushQueue, PushQueue};

    use support::held_store::{Held, HeldApi};

    let api = HeldApi::new(stack).await;
    let dir = tempfile::tempdir().unwrap();
    let queue: Arc<dyn PushQueue> =
        Arc::new(EmbeddedPushQueue::open(&dir.path().join("pushes.sqlite3")).unwrap());
    let state = api.state.clone().with_push_queue(Arc::clone(&queue));
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&state, &alice, "pushed", &[bob.id]).await;
    let sent = support::held_store::message(&state, &alice, chat, "are you there?").await;

    api.store.fail_next(Held::ReactionCountsRead);
    let page = state
        .history(
            bob.id,
            chat,
            HistoryFrom::Newest,
            None,
            PageLimit::parse(None).unwrap(),
        )
        .await;
    assert!(page.is_err(), "the page was to fail: {page:?}");
    let now_ms = confab_runtime::presence::now_ms();
    assert_eq!(
        queue.cancel(bob.id, chat, sent, now_ms).await.unwrap(),
        Cancelled::Pending,
        "the failed page cancelled bob's push"
    );
    api.clean_up().await;
}
on_both_stacks!(a_failed_history_page_cancels_no_push);
