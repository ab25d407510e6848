//! An image's thumbnail and preview are made in the background once its upload has answered, and
//! their metadata is written at the end. Here the store holds that write until the test lets it
//! go, so that a deletion of the image's message, or a send that claims the image, comes in
//! between: a deleted image must not come back (by id, in its chat's lists, or through its objects'
//! references), and a claim must stay. On the embedded store and on the CQL store.

mod support;

use support::on_both_stacks;

use std::sync::Arc;
use std::time::Duration;

use confab_api::store::{CLAIM_ORPHANED_AFTER, Store};
use confab_api::{ApiState, routes};
use confab_runtime::blobs::Blobs;
use confab_runtime::bus::{Bus, ChatFilter, EmbeddedBus};
use confab_runtime::config::Config;
use confab_runtime::identity::DevIdentity;
use confab_schema::{AttachmentRef, ChatId, Event, Signal, SignalId, SignalKind, UserId};
use serde_json::{Value, json};
use support::held_store::{Held, HeldStore};
use support::{DEADLINE, Stack};
use time::OffsetDateTime;
use uuid::Uuid;

/// The API on a [`HeldStore`] (the embedded one, or CQL on a fresh keyspace), over HTTP.
struct Harness {
    store: Arc<HeldStore>,
    blobs: Arc<dyn Blobs>,
    bus: Arc<dyn Bus>,
    config: Config,
    stack: Stack,
    http: reqwest::Client,
    base: String,
    alice: String,
    bob: String,
    bob_id: String,
    chat: String,
    /// Requests whose handling the server dropped before it answered (a client gone).
    dropped: Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
}

/// Counts a request's handling dropped before it answered, when dropped so.
struct Unanswered {
    dropped: Arc<std::sync::atomic::AtomicUsize>,
    answered: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if !self.answered {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Harness {
    async fn start(stack: Stack) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let config = support::config_for(stack, dir.path().to_path_buf());
        let inner = confab::open_store(&config, true).await.unwrap();
        let blobs = confab::open_blobs(&config, Arc::clone(&inner)).unwrap();
        let store = Arc::new(HeldStore::new(inner));
        store.hold(Held::Pictures);
        let identity = Arc::new(DevIdentity::open(dir.path()).unwrap());
        let alice = identity.mint("alice", Duration::from_secs(600));
        let bob = identity.mint("bob", Duration::from_secs(600));
        let bus = Arc::new(
            EmbeddedBus::open(&dir.path().join("events.sqlite3"), Default::default()).unwrap(),
        );
        let bus: Arc<dyn Bus> = bus;
        let state = ApiState::new(
            Arc::clone(&store) as Arc<dyn Store>,
            Arc::clone(&bus),
            identity,
            &confab_runtime::signed::Keyring::random(),
        )
        .with_attachments(confab::attachment_settings(&config, Arc::clone(&blobs)));
        let (router, _) = routes(state);
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&dropped);
        let router = router.layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let dropped = Arc::clone(&counted);
                async move {
                    let mut unanswered = Unanswered {
                        dropped,
                        answered: false,
                    };
                    let response = next.run(request).await;
                    unanswered.answered = true;
                    drop(unanswered);
                    response
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router).await });
        let mut harness = Harness {
            store,
            blobs,
            bus,
            config,
            stack,
            http: reqwest::Client::new(),
            base,
            alice,
            bob,
            bob_id: String::new(),
            chat: String::new(),
            dropped,
            _dir: dir,
        };
        let bob_id = harness.json(&harness.bob, "/v1/me").await["id"].clone();
        harness.bob_id = bob_id.as_str().unwrap().to_owned();
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

    /// Whether the storage holds the object `name`.
    async fn holds_object(&self, name: &confab_runtime::blobs::BlobName) -> bool {
        self.blobs
            .list(None, 1000)
            .await
            .unwrap()
            .into_iter()
            .any(|object| object.name == *name)
    }

    /// The upload of `bytes` to the chat, named `name`, by `token`'s user.
    fn upload_request(
        &self,
        token: &str,
        name: &str,
        content_type: &str,
        bytes: Vec<u8>,
    ) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}/v1/chats/{}/attachments", self.base, self.chat))
            .query(&[("name", name)])
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(bytes)
    }

    /// Alice's upload of `bytes` to the chat, as answered.
    async fn upload(&self, name: &str, content_type: &str, bytes: Vec<u8>) -> Value {
        let response = self
            .upload_request(&self.alice, name, content_type, bytes)
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

    /// Attachment `id` as the chat lists it, once its pictures are stored (or it was re-filed as
    /// a plain file).
    async fn pictured(&self, id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let listed = self
                .json(
                    &self.alice,
                    &format!("/v1/chats/{}/attachments?limit=100", self.chat),
                )
                .await;
            let found = listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|a| a["id"] == id)
                .cloned()
                .unwrap();
            if !found["image"].is_null() || found["kind"] == "file" {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no thumbnail in time: {found}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn stop(self) {
        if self.stack == Stack::Real {
            Box::pin(support::clean_up_real(&self.config)).await;
        }
    }
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

/// The message is deleted while the send that carried it is still recording in the chat's lists
/// that its attachment was sent in it: that write, which read the attachment before the deletion,
/// must not bring it back (by id, or in its chat's lists).
async fn a_claim_does_not_bring_back_a_deleted_attachment(stack: Stack) {
    let harness = Arc::new(Harness::start(stack).await);
    harness.store.hold(Held::ClaimListed);
    let photo = harness.upload("photo.png", "image/png", png(8, 8)).await;
    let id = photo["id"].as_str().unwrap().to_owned();
    // The image's pictures are held too (the harness holds them): the first write at the gate is
    // theirs, the second the send's listing of its claim.
    harness.store.gate.arrived(1).await;
    let sending = {
        let harness = Arc::clone(&harness);
        let photo = photo.clone();
        tokio::spawn(async move { harness.send(&[&photo["id"]]).await })
    };
    harness.store.gate.arrived(2).await;
    // Stored and published before its claim is listed: the history has it.
    let history = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/signals?limit=1", harness.chat),
        )
        .await;
    let message = history["items"][0]["id"].as_str().unwrap().to_owned();
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
    assert_eq!(
        harness.get(&format!("/v1/attachments/{id}")).await.status(),
        404
    );
    harness.store.gate.release(2).await;
    assert_eq!(sending.await.unwrap(), message);

    assert_eq!(
        harness.get(&format!("/v1/attachments/{id}")).await.status(),
        404,
        "the deleted message's attachment came back"
    );
    for kind in [None, Some("image"), Some("file")] {
        let listed = harness.listed(kind).await;
        assert!(
            !listed.contains(&photo["id"]),
            "listed again among {kind:?}: {listed:?}"
        );
    }
    Arc::into_inner(harness)
        .expect("the send is done")
        .stop()
        .await;
}
on_both_stacks!(a_claim_does_not_bring_back_a_deleted_attachment);

/// A harness whose claims wait at the gate, and a photo uploaded there (its id too), once its
/// pictures' write, held as well, has reached the gate: the next arrivals are claims.
async fn a_photo_with_claims_held(stack: Stack) -> (Arc<Harness>, Value, String) {
    let harness = Arc::new(Harness::start(stack).await);
    harness.store.hold(Held::Claim);
    let photo = harness.upload("photo.png", "image/png", png(8, 8)).await;
    let id = photo["id"].as_str().unwrap().to_owned();
    harness.store.gate.arrived(1).await;
    (harness, photo, id)
}

/// The author of a message with an attachment leaves the chat while the message's claim waits
/// (as it does for another send of the attachment): the message is refused (403), not stored,
/// and its claim is given back.
async fn a_message_whose_author_left_while_it_claimed_is_refused(stack: Stack) {
    let (harness, photo, photo_id) = a_photo_with_claims_held(stack).await;
    let me = harness.json(&harness.alice, "/v1/me").await;
    let members = format!("{}/v1/chats/{}/members", harness.base, harness.chat);
    // Bob owns the chat too, so that alice may leave it.
    let bob = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/members", harness.chat),
        )
        .await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["user_id"] != me["id"])
        .unwrap()["user_id"]
        .clone();
    let promoted = harness
        .http
        .patch(format!("{members}/{}", bob.as_str().unwrap()))
        .bearer_auth(&harness.alice)
        .json(&json!({"role": "owner"}))
        .send()
        .await
        .unwrap();
    assert_eq!(promoted.status(), 200);
    let sending = {
        let harness = Arc::clone(&harness);
        tokio::spawn(async move {
            harness
                .send_json(
                    &format!("/v1/chats/{}/signals", harness.chat),
                    &json!({"kind": "message", "text": "sent while leaving",
                            "attachments": [photo["id"]]}),
                )
                .await
                .status()
                .as_u16()
        })
    };
    harness.store.gate.arrived(2).await;
    let left = harness
        .http
        .delete(format!("{members}/{}", me["id"].as_str().unwrap()))
        .bearer_auth(&harness.alice)
        .send()
        .await
        .unwrap();
    assert_eq!(left.status(), 204);
    harness.store.gate.release(2).await;
    assert_eq!(
        sending.await.unwrap(),
        403,
        "a message stored after its author left"
    );
    // Its claim was given back: a new claim of the photo takes it.
    harness.store.lift(Held::Claim);
    let chat = ChatId(harness.chat.parse().unwrap());
    let photo_id: Uuid = photo_id.parse().unwrap();
    let claimer = SignalId::new();
    let holders = harness
        .store
        .claim_attachments(chat, &[photo_id], claimer)
        .await
        .unwrap();
    assert_eq!(
        holders,
        [(photo_id, claimer)],
        "the refused send kept its claim"
    );
    Arc::into_inner(harness)
        .expect("the send is done")
        .stop()
        .await;
}
on_both_stacks!(a_message_whose_author_left_while_it_claimed_is_refused);

/// Two messages name one attachment at once: both pass the send's check before either claims it.
/// One takes it and answers 201 with the attachment; the other is refused with 409 and stores and
/// publishes nothing, so no answer, event or history ever shows an attachment on a message that
/// does not own it.
async fn two_messages_that_name_one_attachment_at_once_one_is_refused(stack: Stack) {
    let (harness, photo, id) = a_photo_with_claims_held(stack).await;
    let send = |nonce: &'static str| {
        let harness = Arc::clone(&harness);
        let photo = photo.clone();
        tokio::spawn(async move {
            let sent = harness
                .send_json(
                    &format!("/v1/chats/{}/signals", harness.chat),
                    &json!({"kind": "message", "text": nonce, "nonce": nonce,
                            "attachments": [photo["id"]]}),
                )
                .await;
            let status = sent.status().as_u16();
            let content_type = sent.headers()["content-type"].to_str().unwrap().to_owned();
            (status, content_type, sent.json::<Value>().await.unwrap())
        })
    };
    let first = send("first");
    harness.store.gate.arrived(2).await;
    let second = send("second");
    harness.store.gate.arrived(3).await;
    harness.store.gate.release(3).await;
    let mut answers = vec![first.await.unwrap(), second.await.unwrap()];
    answers.sort_by_key(|(status, _, _)| *status);
    let statuses: Vec<u16> = answers.iter().map(|(status, _, _)| *status).collect();
    assert_eq!(statuses, [201, 409], "{answers:?}");
    let (_, _, taker) = &answers[0];
    let taker_id = taker["id"].as_str().unwrap();
    assert_eq!(taker["attachments"][0]["id"], id.as_str(), "{taker}");
    assert_eq!(taker["attachments"][0]["message_id"], taker_id, "{taker}");
    let (_, content_type, refusal) = &answers[1];
    assert_eq!(content_type, "application/problem+json", "{refusal}");

    let history = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/signals?limit=10", harness.chat),
        )
        .await;
    let messages: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "message")
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [taker_id],
        "the refused send stored a message: {history}"
    );
    let published: Vec<Value> = harness
        .bus
        .read(0, u64::MAX, ChatFilter::All, 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|logged| match logged.envelope.event {
            Event::SignalCreated(signal) if signal.kind == SignalKind::Message => {
                Some(serde_json::to_value(signal).unwrap())
            }
            _ => None,
        })
        .collect();
    assert_eq!(published.len(), 1, "{published:?}");
    assert_eq!(published[0]["id"], taker_id);
    assert_eq!(published[0]["attachments"][0]["message_id"], taker_id);
    let listed = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await;
    assert_eq!(listed["items"][0]["message_id"], taker_id, "{listed}");
    Arc::into_inner(harness)
        .expect("the sends are done")
        .stop()
        .await;
}
on_both_stacks!(two_messages_that_name_one_attachment_at_once_one_is_refused);

/// Two attempts of one message (the same nonce) naming an attachment race: both pass the send's
/// check before either claims it. They answer one message, 201 and then 200, which carries the
/// attachment; a later retry answers it again, and nothing else is stored.
async fn attempts_of_one_message_race_to_one_answer(stack: Stack) {
    let (harness, _, id) = a_photo_with_claims_held(stack).await;
    let body = json!({"kind": "message", "text": "once", "nonce": "n-1", "attachments": [id]});
    let attempt = || {
        let harness = Arc::clone(&harness);
        let body = body.clone();
        tokio::spawn(async move {
            let sent = harness
                .send_json(&format!("/v1/chats/{}/signals", harness.chat), &body)
                .await;
            (sent.status().as_u16(), sent.json::<Value>().await.unwrap())
        })
    };
    let first = attempt();
    harness.store.gate.arrived(2).await;
    let second = attempt();
    harness.store.gate.arrived(3).await;
    harness.store.gate.release(3).await;
    let mut answers = vec![first.await.unwrap(), second.await.unwrap()];
    answers.sort_by_key(|(status, _)| *status);
    let statuses: Vec<u16> = answers.iter().map(|(status, _)| *status).collect();
    assert_eq!(statuses, [200, 201], "{answers:?}");
    let message = answers[1].1["id"].as_str().unwrap().to_owned();
    for (_, answer) in &answers {
        assert_eq!(answer["id"], message.as_str(), "{answers:?}");
        assert_eq!(answer["attachments"][0]["id"], id.as_str(), "{answer}");
        assert_eq!(answer["attachments"][0]["message_id"], message.as_str());
    }
    let again = harness
        .send_json(&format!("/v1/chats/{}/signals", harness.chat), &body)
        .await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], message.as_str());
    assert_eq!(again["attachments"][0]["message_id"], message.as_str());

    let history = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/signals?limit=10", harness.chat),
        )
        .await;
    let messages: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "message")
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(messages, [message.as_str()], "{history}");
    let listed = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await;
    assert_eq!(
        listed["items"][0]["message_id"],
        message.as_str(),
        "{listed}"
    );
    Arc::into_inner(harness)
        .expect("the sends are done")
        .stop()
        .await;
}
on_both_stacks!(attempts_of_one_message_race_to_one_answer);

/// A send whose store write fails gives its attachment back when the store says its message was
/// not stored and never will be, so that another message may carry it; one whose write was made
/// all the same keeps it, and its retry (the same nonce) answers that message.
async fn a_failed_send_gives_its_attachment_back_only_when_not_stored(stack: Stack) {
    let harness = Harness::start(stack).await;
    // Nothing here waits on the image's pictures.
    harness.store.lift(Held::Pictures);
    let photo = harness.upload("photo.png", "image/png", png(8, 8)).await;
    let id = photo["id"].as_str().unwrap().to_owned();
    let signals = format!("/v1/chats/{}/signals", harness.chat);
    let with_nonce = |nonce: &str| json!({"kind": "message", "nonce": nonce, "attachments": [id]});

    harness.store.refuse_next(Held::MessageInserted);
    let failed = harness.send_json(&signals, &with_nonce("lost")).await;
    assert_eq!(failed.status(), 503);
    let got = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await["items"][0]
        .clone();
    assert!(got["message_id"].is_null(), "still held: {got}");

    harness.store.fail_next_after(Held::MessageInserted);
    let failed = harness.send_json(&signals, &with_nonce("made")).await;
    assert_eq!(failed.status(), 503);
    let retried = harness.send_json(&signals, &with_nonce("made")).await;
    assert_eq!(retried.status(), 200);
    let retried: Value = retried.json().await.unwrap();
    let message = retried["id"].as_str().unwrap();
    assert_eq!(retried["attachments"][0]["id"], id.as_str(), "{retried}");
    assert_eq!(
        retried["attachments"][0]["message_id"], message,
        "{retried}"
    );
    let got = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await["items"][0]
        .clone();
    assert_eq!(got["message_id"], message, "{got}");

    let other = harness.send_json(&signals, &with_nonce("other")).await;
    assert_eq!(other.status(), 422, "an upload goes in one message");
    let history = harness
        .json(&harness.alice, &format!("{signals}?limit=10"))
        .await;
    let messages: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "message")
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(messages, [message], "{history}");
    harness.stop().await;
}
on_both_stacks!(a_failed_send_gives_its_attachment_back_only_when_not_stored);

/// A send stopped (a crash, a kill) between the claim of its attachment and the store write of
/// its message leaves the attachment held by a message that never exists. Once that claim is
/// older than any live send takes to store its message, a send naming the attachment takes it
/// over: the client's retry of the very send that stopped (its nonce) answers 201 with the
/// attachment. Were the stopped send's write to land after all, its message would not carry it.
async fn a_claim_left_by_a_stopped_send_is_taken_over(stack: Stack) {
    let harness = Harness::start(stack).await;
    // Nothing here waits on the image's pictures.
    harness.store.lift(Held::Pictures);
    let photo = harness.upload("photo.png", "image/png", png(8, 8)).await;
    let id: Uuid = photo["id"].as_str().unwrap().parse().unwrap();
    let chat: ChatId = harness.chat.parse().unwrap();
    let alice: UserId = harness.json(&harness.alice, "/v1/me").await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let made_long_ago = OffsetDateTime::now_utc() - CLAIM_ORPHANED_AFTER - Duration::from_secs(60);
    let stopped = SignalId::made_at(made_long_ago);
    let claimed = harness
        .store
        .inner
        .claim_attachments(chat, &[id], stopped)
        .await
        .unwrap();
    assert_eq!(claimed, [(id, stopped)]);

    let signals = format!("/v1/chats/{}/signals", harness.chat);
    let retried = harness
        .send_json(
            &signals,
            &json!({"kind": "message", "text": "again", "nonce": "stopped",
                    "attachments": [id]}),
        )
        .await;
    let status = retried.status();
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(status, 201, "{retried}");
    let message = retried["id"].as_str().unwrap().to_owned();
    assert_eq!(retried["attachments"][0]["id"], id.to_string(), "{retried}");
    assert_eq!(retried["attachments"][0]["message_id"], message.as_str());

    // The stopped send's write lands after all.
    let attachment = harness.store.inner.get_attachments(&[id]).await.unwrap();
    let late = Signal {
        id: stopped,
        chat_id: chat,
        kind: SignalKind::Message,
        author_id: alice,
        created_at: made_long_ago,
        nonce: None,
        text: Some("late".into()),
        reply_to: None,
        attachments: attachment.into_iter().map(AttachmentRef::from).collect(),
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
        call: None,
    };
    harness.store.inner.insert_signal(&late).await.unwrap();
    let history = harness
        .json(&harness.alice, &format!("{signals}?limit=10"))
        .await;
    let carried: Vec<(&str, usize)> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "message")
        .map(|s| {
            let attachments = s["attachments"].as_array().map_or(0, Vec::len);
            (s["id"].as_str().unwrap(), attachments)
        })
        .collect();
    let stopped = stopped.to_string();
    assert_eq!(
        carried,
        [(message.as_str(), 1), (stopped.as_str(), 0)],
        "{history}"
    );
    let listed = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await;
    assert_eq!(
        listed["items"][0]["message_id"],
        message.as_str(),
        "{listed}"
    );
    harness.stop().await;
}
on_both_stacks!(a_claim_left_by_a_stopped_send_is_taken_over);

/// A send whose store write failed without saying whether it was made (a timeout: the write may
/// be applied all the same, later) keeps its attachment, since its message may yet appear naming
/// it: another message cannot take it meanwhile. Once the write has landed, the client's retry
/// (the same nonce) answers that message, carrying the attachment, and nothing else is stored.
async fn a_send_whose_write_may_land_later_keeps_its_attachment(stack: Stack) {
    let harness = Harness::start(stack).await;
    // Nothing here waits on the image's pictures.
    harness.store.lift(Held::Pictures);
    let photo = harness.upload("photo.png", "image/png", png(8, 8)).await;
    let id = photo["id"].as_str().unwrap().to_owned();
    let signals = format!("/v1/chats/{}/signals", harness.chat);
    let body = json!({"kind": "message", "text": "slow", "nonce": "slow", "attachments": [id]});

    harness.store.fail_next_and_land_later();
    let failed = harness.send_json(&signals, &body).await;
    assert_eq!(failed.status(), 503);
    let other = harness
        .send_json(&signals, &json!({"kind": "message", "attachments": [id]}))
        .await;
    let status = other.status();
    let other: Value = other.json().await.unwrap();
    assert_eq!(
        status, 409,
        "taken from a message that may yet appear: {other}"
    );

    harness.store.land_late_messages().await;
    let retried = harness.send_json(&signals, &body).await;
    let status = retried.status();
    let retried: Value = retried.json().await.unwrap();
    assert_eq!(status, 200, "{retried}");
    let message = retried["id"].as_str().unwrap();
    assert_eq!(retried["attachments"][0]["id"], id.as_str(), "{retried}");
    assert_eq!(
        retried["attachments"][0]["message_id"], message,
        "{retried}"
    );
    let history = harness
        .json(&harness.alice, &format!("{signals}?limit=10"))
        .await;
    let messages: Vec<(&str, &Value)> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "message")
        .map(|s| (s["id"].as_str().unwrap(), &s["attachments"][0]["id"]))
        .collect();
    assert_eq!(messages, [(message, &json!(id))], "{history}");
    let listed = harness
        .json(
            &harness.alice,
            &format!("/v1/chats/{}/attachments", harness.chat),
        )
        .await;
    assert_eq!(listed["items"][0]["message_id"], message, "{listed}");
    harness.stop().await;
}
on_both_stacks!(a_send_whose_write_may_land_later_keeps_its_attachment);

/// The write of an image's pictures fails once (the store was briefly unavailable): they are made
/// again, and the image gets its thumbnail and preview.
async fn pictures_whose_write_failed_are_made_again(stack: Stack) {
    let harness = Harness::start(stack).await;
    harness.store.lift(Held::Pictures);
    harness.store.fail_next(Held::Pictures);
    let photo = harness.upload("photo.png", "image/png", png(64, 48)).await;
    let id = photo["id"].as_str().unwrap();

    let done = harness.pictured(id).await;
    assert_eq!(done["kind"], "image", "{done}");
    assert_eq!(done["image"]["width"], 64, "{done}");
    let thumbnail = &done["image"]["thumbnail"];
    assert!(thumbnail.is_object(), "{done}");
    assert!(done["image"]["preview"].is_object(), "{done}");
    let got = harness
        .get(&format!("/v1/attachments/{id}/thumbnail"))
        .await;
    assert_eq!(got.status(), 200);
    let bytes = got.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, thumbnail["size"].as_u64().unwrap());
    let preview = harness.get(&format!("/v1/attachments/{id}/preview")).await;
    assert_eq!(preview.status(), 200);
    harness.stop().await;
}
on_both_stacks!(pictures_whose_write_failed_are_made_again);

/// The write of an image's pictures fails, and its message is deleted before the next attempt
/// writes them: that attempt does not bring the image back, and leaves no reference that keeps its
/// objects (its pictures' included) from the collector.
async fn pictures_made_again_do_not_bring_back_a_deleted_image(stack: Stack) {
    let harness = Harness::start(stack).await;
    harness.store.lift(Held::Pictures);
    harness.store.fail_next(Held::Pictures);
    harness.store.hold_next(Held::Pictures);
    let photo = harness.upload("photo.png", "image/png", png(64, 48)).await;
    let id = photo["id"].as_str().unwrap();
    let message = harness.send(&[&photo["id"]]).await;
    // The first attempt failed; the next one waits to write the pictures.
    harness.store.gate.arrived(1).await;
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
    harness.store.gate.release(1).await;

    assert_eq!(
        harness.get(&format!("/v1/attachments/{id}")).await.status(),
        404,
        "the deleted image came back"
    );
    for kind in [None, Some("image"), Some("file")] {
        let listed = harness.listed(kind).await;
        assert!(
            !listed.contains(&photo["id"]),
            "listed again among {kind:?}: {listed:?}"
        );
    }
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
on_both_stacks!(pictures_made_again_do_not_bring_back_a_deleted_image);

/// An upload whose record could not be written answers 503 and keeps nothing: no record, no
/// reference, and not the object its bytes were written to, which nothing else names. The same
/// bytes uploaded again are stored.
async fn an_upload_whose_record_failed_keeps_no_object(stack: Stack) {
    use confab_runtime::blobs::BlobName;
    let harness = Harness::start(stack).await;
    // Larger than what the store keeps in its rows, so that the bytes go to the storage.
    let bytes: Vec<u8> = (0..8192).flat_map(|_| *Uuid::new_v4().as_bytes()).collect();
    let name = BlobName::of(&bytes);
    let upload = || {
        harness
            .upload_request(
                &harness.alice,
                "data.bin",
                "application/octet-stream",
                bytes.clone(),
            )
            .send()
    };
    harness.store.fail_next(Held::AttachmentPut);
    let failed = upload().await.unwrap();
    assert_eq!(failed.status(), 503);
    let stored = || async { harness.holds_object(&name).await };
    assert!(
        !stored().await,
        "the failed upload's object stayed in the storage"
    );
    assert!(!harness.store.blob_referenced(name.as_str()).await.unwrap());
    assert!(harness.listed(None).await.is_empty());

    let again = upload().await.unwrap();
    assert_eq!(again.status(), 201);
    assert!(stored().await, "stored when uploaded again");
    harness.stop().await;
}
on_both_stacks!(an_upload_whose_record_failed_keeps_no_object);

/// A client that goes away once its whole body is sent, while the upload is being recorded: the
/// upload is finished all the same (a change runs to completion), never left halfway (a staging
/// object, a reference without its record).
async fn an_upload_whose_client_left_after_its_body_is_finished(stack: Stack) {
    let harness = Harness::start(stack).await;
    harness.store.hold_next(Held::BlobRefsAdded);
    // Larger than what the store keeps in its rows, so that the bytes go to the storage.
    let bytes: Vec<u8> = (0..8192).flat_map(|_| *Uuid::new_v4().as_bytes()).collect();
    let name = confab_runtime::blobs::BlobName::of(&bytes);
    let request = harness
        .upload_request(
            &harness.alice,
            "left.bin",
            "application/octet-stream",
            bytes,
        )
        .send();
    let client = tokio::spawn(request);
    // The whole body was read: the upload waits to write its reference.
    harness.store.gate.arrived(1).await;
    client.abort();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while harness.dropped.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server never saw the client go"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The request's handling was dropped; the upload, on a task of its own, goes on.
    harness.store.gate.release(1).await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while harness.listed(None).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload was left halfway: referenced {}, staging objects {}",
            harness.store.blob_referenced(name.as_str()).await.unwrap(),
            harness.blobs.sweep_staging(Duration::ZERO).await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = harness.holds_object(&name).await;
    assert!(stored, "listed without its object");
    assert_eq!(
        harness.blobs.sweep_staging(Duration::ZERO).await.unwrap(),
        0,
        "a staging object was left"
    );
    harness.stop().await;
}
on_both_stacks!(an_upload_whose_client_left_after_its_body_is_finished);

/// Bob's upload has its body read and its record's write held when Alice removes him from the
/// chat: the upload is refused and leaves nothing. Membership was checked only as an upload
/// began, and a large one takes hours: it was recorded all the same, listed to the chat and
/// downloadable by every member, uploaded by someone no longer in it.
async fn an_upload_whose_uploader_left_meanwhile_is_not_recorded(stack: Stack) {
    let harness = Harness::start(stack).await;
    harness.store.hold_next(Held::AttachmentPut);
    // Larger than what the store keeps in its rows, so that the bytes go to the storage.
    let bytes: Vec<u8> = (0..8192).flat_map(|_| *Uuid::new_v4().as_bytes()).collect();
    let name = confab_runtime::blobs::BlobName::of(&bytes);
    let upload = tokio::spawn(
        harness
            .upload_request(&harness.bob, "late.bin", "application/octet-stream", bytes)
            .send(),
    );
    harness.store.gate.arrived(1).await;
    let removed = harness
        .http
        .delete(format!(
            "{}/v1/chats/{}/members/{}",
            harness.base, harness.chat, harness.bob_id
        ))
        .bearer_auth(&harness.alice)
        .send()
        .await
        .unwrap();
    assert!(removed.status().is_success(), "{}", removed.status());
    harness.store.gate.release(1).await;
    let answered = upload.await.unwrap().unwrap();
    let status = answered.status();
    assert!(
        status.is_client_error(),
        "{status}: {}",
        answered.text().await.unwrap()
    );
    assert!(
        harness.listed(None).await.is_empty(),
        "the chat lists the upload of a member removed while it was recorded"
    );
    assert!(!harness.store.blob_referenced(name.as_str()).await.unwrap());
    let stored = harness.holds_object(&name).await;
    assert!(!stored, "the refused upload's object stayed in the storage");
    harness.stop().await;
}
on_both_stacks!(an_upload_whose_uploader_left_meanwhile_is_not_recorded);

/// The same image uploaded again gets the pictures made for the first upload instead of a decode
/// of its own: its bytes are stored once, and a decode of a large image costs hundreds of
/// megabytes and a core for a while, so uploads of one image, free in storage, queued them
/// without end. Shown with a second API whose pixel limit refuses to decode it: its upload of
/// the same bytes has the first's pictures, where a decode would keep it as a plain file.
async fn an_image_uploaded_again_has_the_pictures_made_before(stack: Stack) {
    use confab_api::domain::inputs::{AttachmentName, DeclaredType};

    use futures::StreamExt;
    use support::held_store::HeldApi;

    let api = HeldApi::new(stack).await;
    let blobs = confab::open_blobs(&api.config, Arc::clone(&api.store) as Arc<dyn Store>).unwrap();
    let state = api
        .state
        .clone()
        .with_attachments(confab::attachment_settings(&api.config, Arc::clone(&blobs)));
    let mut strict = api.config.clone();
    strict.attachments.max_image_pixels = 1;
    let strict = api
        .state
        .clone()
        .with_attachments(confab::attachment_settings(&strict, Arc::clone(&blobs)));
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&state, &alice, "again", &[bob.id]).await;
    let picture = png(64, 48);
    let upload = |state: &ApiState| {
        let body = futures::stream::once({
            let bytes = bytes::Bytes::from(picture.clone());
            async move { Ok(bytes) }
        })
        .boxed();
        let state = state.clone();
        let alice = alice.clone();
        let length = picture.len() as u64;
        async move {
            state
                .upload_attachment(
                    &alice,
                    chat,
                    AttachmentName::parse(Some("again.png".into())).unwrap(),
                    DeclaredType::parse(Some("image/png")).unwrap(),
                    Some(length),
                    None,
                    body,
                )
                .await
                .expect("uploaded")
        }
    };
    // Once its pictures are made, or it was kept as a plain file.
    let settled = async |id: Uuid| {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let stored = api.store.get_attachments(&[id]).await.unwrap();
            let stored = stored.into_iter().next().expect("the upload is stored");
            if stored.image.is_some() || stored.kind == confab_schema::AttachmentKind::File {
                return stored;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no pictures in time"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let first = settled(upload(&state).await.id).await;
    assert!(
        first.image.is_some(),
        "the first upload's pictures: {first:?}"
    );
    let again = settled(upload(&strict).await.id).await;
    assert_eq!(
        again.image, first.image,
        "the image uploaded again was decoded again (and refused by the pixel limit)"
    );
    assert_eq!(again.kind, confab_schema::AttachmentKind::Image);
    api.clean_up().await;
}
on_both_stacks!(an_image_uploaded_again_has_the_pictures_made_before);
