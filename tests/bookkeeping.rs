//! A send whose signal is stored and published succeeds, even when the writes that follow it (the
//! chat's place in its members' lists, the author's read marker) fail: they are retried in the
//! background and catch up. The store here is the real embedded store, wrapped
//! (`support::held_store`) so that those two writes, and the others a test names, fail or wait on
//! demand.
//!
//! Also: a deletion that fails after its tombstone is written is finished by its retry, and so is
//! the end of a circle pairing that fails part-way; a removal applied despite its error is
//! finished by its own request; a match whose chat fails leaves both waiting. An edit published
//! after the message's deletion is followed by the deletion again. A new chat whose listing fails
//! is made all the same, and listed in the background.

mod support;

use std::sync::Arc;
use std::time::Duration;

use confab_api::store::Store;
use confab_api::store::embedded::EmbeddedStore;
use confab_api::{ApiState, routes};
use confab_runtime::bus::{Bus, EmbeddedBus};
use confab_runtime::identity::DevIdentity;
use confab_schema::event::LoggedEvent;
use confab_schema::{ChatId, Event, SignalId, SignalKind, User, UserId};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::{Value, json};
use support::held_store::{Held, HeldStore};

/// A server on the embedded store, wrapped so that the writes a test names fail or wait, and the
/// embedded bus, with a group chat of alice and bob; the outbox sweeper runs when `sweep` is set.
struct FlakyServer {
    _dir: tempfile::TempDir,
    store: Arc<HeldStore>,
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
        let store = Arc::new(HeldStore::new(Arc::new(
            EmbeddedStore::open(&dir.path().join("store.sqlite3")).unwrap(),
        )));
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

    /// Makes the bookkeeping writes after a send (the chat's place in its members' lists, the
    /// author's read marker) fail, every one, until [`FlakyServer::bookkeeping_recovers`].
    fn bookkeeping_fails(&self) {
        self.store.fail_every(Held::ChatTouched);
        self.store.fail_every(Held::MarkerAdvanced);
    }

    /// Lets the bookkeeping writes after a send be made again.
    fn bookkeeping_recovers(&self) {
        self.store.lift(Held::ChatTouched);
        self.store.lift(Held::MarkerAdvanced);
    }

    /// Carol, a new user, added to the chat by alice; the addition as answered.
    async fn add_carol(&self) -> (User, reqwest::Response) {
        let carol = User {
            id: UserId(uuid::Uuid::now_v7()),
            username: "carol".into(),
            display_name: "Carol".into(),
            email: None,
        };
        self.store.upsert_user(&carol).await.unwrap();
        let added = self
            .http
            .post(format!("{}/v1/chats/{}/members", self.base, self.chat))
            .bearer_auth(&self.alice)
            .json(&json!({ "user_id": carol.id }))
            .send()
            .await
            .unwrap();
        (carol, added)
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

    server.bookkeeping_fails();
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
    server.bookkeeping_recovers();
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

/// A send whose message was stored although the store answered a failure (a write that timed
/// out after it was applied) answers 503, with nothing after the store done: no chat moved, no
/// marker. Its retry finds the message and answers it, and does that bookkeeping then: the chat
/// shows the message at the top of bob's list, and alice's read marker reaches it.
#[tokio::test]
async fn a_retry_that_finds_its_message_stored_does_its_bookkeeping() {
    let server = FlakyServer::start(false).await;
    let chat = &server.chat;
    server.store.fail_next_after(Held::MessageInserted);
    let first = server.send("r-1", "stored, answered 503").await;
    assert_eq!(first.status(), 503, "the store answered a failure");
    let retried = server.send("r-1", "stored, answered 503").await;
    assert_eq!(retried.status(), 200, "the retry finds the message");
    let sent: Value = retried.json().await.unwrap();

    let chats = server.get(&server.bob, "/v1/chats").await;
    let entry = chats["items"]
        .as_array()
        .expect("a page of chats")
        .iter()
        .find(|c| c["id"] == chat.as_str())
        .expect("the chat is listed")
        .clone();
    assert_eq!(
        entry["latest_signal"]["id"], sent["id"],
        "the chat shows the message: {entry}"
    );
    let views = server
        .get(
            &server.bob,
            &format!(
                "/v1/chats/{chat}/signals/{}/views",
                sent["id"].as_str().unwrap()
            ),
        )
        .await;
    assert_eq!(
        views["items"],
        json!([{"user_id": sent["author_id"], "up_to": sent["id"]}]),
        "alice's marker reaches her message"
    );
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
        self.store.fail_every_after(Held::SignalDeleted);
        let failed = self.delete().await;
        assert_eq!(failed.status(), 503, "the deletion did not finish");
        self.store.lift(Held::SignalDeleted);
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
    deletion.store.fail_every(Held::SignalDeleted);
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

    message.store.hold(Held::SignalEdited);
    let second = tokio::spawn(message.edit("two"));
    message.store.gate.arrived(1).await;
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

    message.store.lift(Held::SignalEdited);
    message.store.gate.release(1).await;
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

    message.store.hold_after(Held::SignalEdited);
    let state = message.state.clone();
    let edit = tokio::spawn(async move {
        let text = confab_api::domain::inputs::MessageText::parse("cut short".into()).unwrap();
        state.edit_message(alice, chat, id, text).await
    });
    message.store.gate.arrived(1).await;
    edit.abort();
    assert!(edit.await.unwrap_err().is_cancelled());
    message.store.lift(Held::SignalEdited);

    assert_eq!(message.state.sweep_outbox(SWEEP_OWN_NOW).await.unwrap(), 1);
    assert_eq!(message.updated_text(&mut events).await, "cut short");
    assert_eq!(
        message.outbox_rows("signal.updated").await,
        Vec::<Value>::new()
    );
}

/// An edit whose write is made and read back, and whose publish waits while the message is deleted
/// and its deletion published: the edit's `signal.updated` reaches the log after the
/// `signal.deleted`, and clients applying the log in order would show its text on a deleted
/// message. The deletion must be the message's last word in the log.
#[tokio::test]
async fn an_edit_published_after_the_deletion_leaves_the_deletion_last() {
    let message = SentMessage::start(false).await;
    let alice: UserId =
        serde_json::from_value(message.get(&message.alice, "/v1/me").await["id"].clone()).unwrap();
    let chat: ChatId = serde_json::from_value(json!(message.chat)).unwrap();
    let id: SignalId = serde_json::from_value(json!(message.id)).unwrap();

    message.store.hold_after(Held::SignalEdited);
    let state = message.state.clone();
    let edit = tokio::spawn(async move {
        let text = confab_api::domain::inputs::MessageText::parse("too late".into()).unwrap();
        state.edit_message(alice, chat, id, text).await
    });
    message.store.gate.arrived(1).await;
    message.store.lift(Held::SignalEdited);
    assert_eq!(message.delete().await.status(), 200);
    message.store.gate.release(1).await;
    edit.await
        .unwrap()
        .expect("the edit was stored before the deletion");

    let last = message.bus.last_seq().await.unwrap();
    let chats = std::collections::HashSet::from([chat]);
    let states: Vec<(u64, &'static str, Option<String>)> = message
        .bus
        .read(
            0,
            last,
            confab_runtime::bus::ChatFilter::Only(&chats),
            1_000,
        )
        .await
        .unwrap()
        .into_iter()
        .filter_map(|logged| match logged.envelope.event {
            Event::SignalCreated(signal) if signal.id == id => {
                Some((logged.seq, "created", signal.text))
            }
            Event::SignalUpdated(signal) if signal.id == id => {
                Some((logged.seq, "updated", signal.text))
            }
            Event::SignalDeleted(signal) if signal.id == id => {
                Some((logged.seq, "deleted", signal.text))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        states.last().map(|(_, kind, _)| *kind),
        Some("deleted"),
        "the message's last event is not its deletion: {states:?}"
    );
    assert_eq!(message.state.publishes_retrying(), 0);
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

    server.store.hold(Held::MarkerAdvanced);
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
    server.store.gate.arrived(1).await;
    send.abort();
    assert!(send.await.unwrap_err().is_cancelled());
    server.store.lift(Held::MarkerAdvanced);
    server.store.gate.release(1).await;

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
    server.store.fail_every(Held::ChatUntouched);
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
    server.store.fail_every_after(Held::MemberChanged);
    removal_succeeds_and_is_announced(&server, &mut events, bob).await;
}

/// A change of role whose write was applied but answered with an error (a timeout) is a change
/// of role: it succeeds and `member.updated` goes out at once. It used to answer 503, and its
/// retry found the role set and answered without an event, which then waited for the outbox's
/// sweep (not running here), while every other member's client showed the old role.
#[tokio::test]
async fn a_role_change_applied_despite_its_error_is_finished_at_once() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let bob: UserId =
        serde_json::from_value(server.get(&server.bob, "/v1/me").await["id"].clone()).unwrap();
    server.store.fail_every_after(Held::MemberChanged);
    let changed = server
        .http
        .patch(format!(
            "{}/v1/chats/{}/members/{bob}",
            server.base, server.chat
        ))
        .bearer_auth(&server.alice)
        .json(&json!({"role": "admin"}))
        .send()
        .await
        .unwrap();
    assert!(changed.status().is_success(), "{}", changed.status());
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(logged) = events.next().await {
            if let Event::MemberUpdated(change) = &logged.envelope.event
                && change.user_id == bob
            {
                assert_eq!(change.role, Some(confab_schema::MemberRole::Admin));
                return;
            }
        }
        panic!("the event stream ended");
    })
    .await
    .expect("no member.updated event in time");
}

/// A removal publishes `member.left` before the `left` signal's bookkeeping (the chat's place in
/// each member's list), which in a large group takes a while: until the
/// event, the removed member's open streams still route the chat, and everything sent meanwhile
/// reached them.
#[tokio::test]
async fn a_removal_stops_the_members_streams_before_its_bookkeeping() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let bob: UserId =
        serde_json::from_value(server.get(&server.bob, "/v1/me").await["id"].clone()).unwrap();
    server.store.hold(Held::ChatTouched);
    let removing = {
        let (http, url, alice) = (
            server.http.clone(),
            format!("{}/v1/chats/{}/members/{bob}", server.base, server.chat),
            server.alice.clone(),
        );
        tokio::spawn(async move { http.delete(url).bearer_auth(alice).send().await.unwrap() })
    };
    server.store.gate.arrived(1).await;
    // The `left` signal's place in the members' lists is held: `member.left` is out already.
    member_left(&mut events, bob).await;
    server.store.lift(Held::ChatTouched);
    server.store.gate.release(1).await;
    assert!(removing.await.unwrap().status().is_success());
}

/// The signals of `kind` in the chat's history, once there is one (waiting for a write made in
/// the background).
async fn written_signals(server: &FlakyServer, kind: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let history = server
            .get(&server.alice, &format!("/v1/chats/{}/signals", server.chat))
            .await;
        let written: Vec<Value> = history["items"]
            .as_array()
            .expect("a page of history")
            .iter()
            .filter(|signal| signal["kind"] == kind)
            .cloned()
            .collect();
        if !written.is_empty() {
            return written;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `{kind}` signal was ever written: {history}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An addition stored and announced has succeeded, even when the write of its `joined` signal
/// fails: the signal is written all the same, once. It used to answer 503, and the retry found the
/// member in (200) and wrote nothing, so the history never told of the join.
#[tokio::test]
async fn an_addition_whose_joined_signal_fails_succeeds_and_writes_it() {
    let server = FlakyServer::start(false).await;
    server
        .store
        .fail_next(Held::SystemSignal(SignalKind::Joined));
    let (carol, added) = server.add_carol().await;
    assert_eq!(
        added.status(),
        201,
        "carol is in and `member.joined` is out: the addition succeeded"
    );
    let joined = written_signals(&server, "joined").await;
    assert_eq!(joined.len(), 1, "{joined:?}");
    assert_eq!(joined[0]["author_id"], json!(carol.id));
}

/// An addition whose `joined` signal was stored although the store answered a failure (a write
/// that timed out after it was applied): its background retry finds the signal, and does the
/// bookkeeping its first write did not (here: the joiner's read marker reaches it).
#[tokio::test]
async fn a_joined_signal_found_stored_by_its_retry_gets_its_bookkeeping() {
    let server = FlakyServer::start(false).await;
    server
        .store
        .fail_next_after(Held::SystemSignal(SignalKind::Joined));
    let (carol, added) = server.add_carol().await;
    assert_eq!(added.status(), 201);
    let joined = written_signals(&server, "joined").await;
    assert_eq!(joined.len(), 1, "{joined:?}");
    let views_path = format!(
        "/v1/chats/{}/signals/{}/views",
        server.chat,
        joined[0]["id"].as_str().unwrap()
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let views = server.get(&server.alice, &views_path).await;
        if views["items"]
            .as_array()
            .is_some_and(|seen| seen.iter().any(|v| v["user_id"] == json!(carol.id)))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "carol's marker never reached her joined signal: {views}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Likewise a removal, whose `left` signal used to be given up at its first failure.
#[tokio::test]
async fn a_removal_whose_left_signal_fails_writes_it_all_the_same() {
    let server = FlakyServer::start(false).await;
    let mut events = server.bus.subscribe().await.unwrap();
    let bob: UserId =
        serde_json::from_value(server.get(&server.bob, "/v1/me").await["id"].clone()).unwrap();
    server.store.fail_next(Held::SystemSignal(SignalKind::Left));
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
    member_left(&mut events, bob).await;
    let left = written_signals(&server, "left").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["author_id"], json!(bob));
}

/// And a rename: stored, it has succeeded, and its `renamed` signal is written all the same.
/// Its retry would find the name unchanged and write none.
#[tokio::test]
async fn a_rename_whose_renamed_signal_fails_succeeds_and_writes_it() {
    let server = FlakyServer::start(false).await;
    server
        .store
        .fail_next(Held::SystemSignal(SignalKind::Renamed));
    let renamed = server
        .http
        .patch(format!("{}/v1/chats/{}", server.base, server.chat))
        .bearer_auth(&server.alice)
        .json(&json!({ "name": "steady" }))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), 200, "the chat is renamed");
    let signals = written_signals(&server, "renamed").await;
    assert_eq!(signals.len(), 1, "{signals:?}");
    assert_eq!(signals[0]["text"], "steady");
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

    server.store.fail_every(Held::ChatUntouched);
    let unpair = || {
        server
            .http
            .delete(format!("{}{pair}", server.base))
            .bearer_auth(server.alice.clone())
            .send()
    };
    let failed = unpair().await.unwrap();
    assert_eq!(failed.status(), 503);
    server.store.lift(Held::ChatUntouched);
    let retried = unpair().await.unwrap();
    assert!(retried.status().is_success(), "{}", retried.status());
    for (who, token) in [("alice", &server.alice), ("bob", &server.bob)] {
        assert_eq!(
            status_of(token).await,
            404,
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
    server.bookkeeping_fails();
    let failed = join(&server.bob, "listen").await.unwrap();
    assert_eq!(failed.status(), 503);
    server.bookkeeping_recovers();
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

/// A new chat whose place in its members' lists fails to be written is made all the same: the
/// creation answers it (a retry would make a second group), and the list catches up in the
/// background, so the chat does not stay out of its members' lists until someone writes in it.
#[tokio::test]
async fn a_new_chat_whose_listing_failed_is_listed_all_the_same() {
    use confab_api::domain::Outcome;
    use confab_api::domain::chats::ChatToCreate;
    use confab_api::domain::inputs::PageLimit;
    use confab_schema::ChatKind;
    let api = support::held_store::HeldApi::new(support::Stack::Embedded).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    api.store.fail_next(Held::ChatTouched);
    let chat =
        ChatToCreate::parse(ChatKind::Group, Some("new".into()), None, vec![bob.id]).unwrap();
    let made = api.state.create_chat(&alice, chat).await;
    let Ok(Outcome::Created(chat)) = made else {
        panic!("the chat is made, its listing failed: {made:?}");
    };
    tokio::time::timeout(support::DEADLINE, async {
        loop {
            let listed = api
                .state
                .list_chats(bob.id, None, PageLimit::parse(None).unwrap())
                .await
                .unwrap();
            if listed.items.iter().any(|listed| listed.id == chat.id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the chat is in bob's list before the deadline");
    api.clean_up().await;
}
