//! The event outbox on both stacks: an api process whose events the bus refused, and which then
//! went silent (crashed), has them published by another process's sweep, exactly once each, and
//! nothing for a change that was never stored.
//!
//! The refusing bus wraps the real one (the embedded log, or JetStream as `infra/up.sh` started it)
//! and only refuses appends: it is how a NATS outage looks to the api between its readiness check
//! and its publish.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use confab_api::domain::Outcome;
use confab_api::domain::signals::NewMessage;
use confab_api::outbox::SweepSettings;
use confab_api::state::ApiState;
use confab_api::store::cql::{self, CqlOptions, CqlStore, SendParity};
use confab_api::store::embedded::EmbeddedStore;
use confab_api::store::{NewChat, Store};
use confab_runtime::bus::{
    Bus, BusError, ChatFilter, EmbeddedBus, LogSettings, NatsBus, ReadError,
};
use confab_runtime::identity::{DevIdentity, Identity};
use confab_schema::event::{Event, LoggedEvent};
use confab_schema::{
    ChatId, ChatKind, Envelope, MemberRole, Signal, SignalId, SignalKind, User, UserId,
};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use time::OffsetDateTime;

const DEADLINE: Duration = Duration::from_secs(20);

fn required() -> bool {
    std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A bus whose appends fail while `refusing` is set (from the start): the log stays as it was.
struct RefusingBus(Arc<dyn Bus>, AtomicBool);

impl RefusingBus {
    fn new(bus: &Arc<dyn Bus>) -> RefusingBus {
        RefusingBus(Arc::clone(bus), AtomicBool::new(true))
    }
}

#[async_trait]
impl Bus for RefusingBus {
    async fn publish(&self, envelope: &Envelope) -> Result<u64, BusError> {
        if self.1.load(Ordering::SeqCst) {
            return Err(BusError::Unavailable("refused for the test".into()));
        }
        self.0.publish(envelope).await
    }
    async fn subscribe(&self) -> Result<BoxStream<'static, LoggedEvent>, BusError> {
        self.0.subscribe().await
    }
    async fn last_seq(&self) -> Result<u64, BusError> {
        self.0.last_seq().await
    }
    async fn read(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        limit: usize,
    ) -> Result<Vec<LoggedEvent>, ReadError> {
        self.0.read(after, up_to, chats, limit).await
    }
    async fn read_page(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        max: usize,
        max_scan: usize,
    ) -> Result<confab_runtime::bus::Page, ReadError> {
        self.0.read_page(after, up_to, chats, max, max_scan).await
    }
    async fn appended_at(&self, seq: u64) -> Result<Option<time::OffsetDateTime>, BusError> {
        self.0.appended_at(seq).await
    }
    async fn publish_ephemeral(&self, envelope: &Envelope) -> Result<(), BusError> {
        self.0.publish_ephemeral(envelope).await
    }
    async fn subscribe_ephemeral(&self) -> Result<BoxStream<'static, Envelope>, BusError> {
        self.0.subscribe_ephemeral().await
    }
    async fn check(&self) -> Result<(), BusError> {
        self.0.check().await
    }
}

struct Parts {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    identity: Arc<dyn Identity>,
    cleanup: Option<BoxFuture<'static, ()>>,
    _dir: tempfile::TempDir,
}

async fn embedded() -> Option<Parts> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.sqlite3")).expect("store");
    let bus =
        EmbeddedBus::open(&dir.path().join("events.sqlite3"), LogSettings::default()).expect("bus");
    let identity = DevIdentity::open(dir.path()).expect("identity");
    Some(Parts {
        store: Arc::new(store),
        bus: Arc::new(bus),
        identity: Arc::new(identity),
        cleanup: None,
        _dir: dir,
    })
}

/// A fresh keyspace on the test CQL store, migrated; `None` (said loudly) when there is none
/// and the suite may skip.
async fn fresh_keyspace(test: &str) -> Option<CqlOptions> {
    let options = CqlOptions {
        contact_points: vec![
            std::env::var("CONFAB_TEST_CQL_CONTACT_POINTS")
                .unwrap_or_else(|_| "127.0.0.1:9042".into()),
        ],
        keyspace: confab_api::store::cql::scratch_keyspace(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        request_timeout: Duration::from_secs(20),
        nonce_ttl: Duration::from_secs(600),
        parity: SendParity::Lwt,
    };
    if let Err(error) = cql::migrate(&options).await {
        assert!(!required(), "CQL store unreachable: {error}");
        eprintln!("SKIPPED {test}: no CQL store reachable ({error}); run infra/up.sh");
        return None;
    }
    Some(options)
}

async fn real() -> Option<Parts> {
    let options = fresh_keyspace("a real-stack outbox test").await?;
    let store = CqlStore::connect(&options).await.expect("connects");
    let nats =
        std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bus = Arc::new(
        NatsBus::connect(&nats, &prefix, LogSettings::default())
            .await
            .expect("connects"),
    );
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while Bus::check(&*bus).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "NATS never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let identity = DevIdentity::open(dir.path()).expect("identity");
    let cleanup_bus = Arc::clone(&bus);
    Some(Parts {
        store: Arc::new(store),
        bus,
        identity: Arc::new(identity),
        cleanup: Some(Box::pin(async move {
            let _ = cql::drop_keyspace(&options).await;
            let _ = cleanup_bus.delete_stream().await;
        })),
        _dir: dir,
    })
}

fn user(name: &str) -> User {
    User {
        id: UserId::from_subject("outbox", name),
        username: name.into(),
        display_name: name.into(),
        email: None,
    }
}

async fn chat(store: &dyn Store, owner: &User) -> ChatId {
    store.upsert_user(owner).await.expect("user");
    let id = ChatId::new();
    store
        .create_chat(&NewChat {
            id,
            kind: ChatKind::Group,
            name: Some("outbox".into()),
            description: None,
            created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            created_by: owner.id,
            members: vec![(owner.id, MemberRole::Owner)],
        })
        .await
        .expect("chat");
    id
}

/// Every logged event of `chat` so far.
async fn logged(bus: &dyn Bus, chat: ChatId) -> Vec<Envelope> {
    let last = bus.last_seq().await.expect("last seq");
    bus.read(0, last, ChatFilter::All, 10_000)
        .await
        .expect("reads the log")
        .into_iter()
        .map(|e| e.envelope)
        .filter(|e| e.chat_id == chat)
        .collect()
}

/// Reads the log until `wanted` holds, or the deadline.
async fn logged_until(
    bus: &dyn Bus,
    chat: ChatId,
    wanted: impl Fn(&[Envelope]) -> bool,
) -> Vec<Envelope> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let events = logged(bus, chat).await;
        if wanted(&events) || tokio::time::Instant::now() >= deadline {
            return events;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `state`'s outbox entries, written from the bucket `first` on, are all removed.
async fn outbox_emptied(store: &dyn Store, state: &ApiState, first: i64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let last = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms());
        let left = store
            .outbox_entries(state.outbox_writer(), first, last)
            .await
            .expect("reads the outbox");
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} outbox entries left",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Records `doomed` alive until now, as its heartbeat loop would have kept it until it died, with
/// the oldest bucket its heartbeat names. A sweep reads a silent writer's entries from there up to
/// one silence allowance after its last heartbeat; these tests' doomed processes run no loop and
/// are swept with no allowance, so without this an entry written in a later ten-second bucket
/// than the first heartbeat would be out of reach.
async fn alive_until_now(store: &dyn Store, doomed: &ApiState) {
    store
        .outbox_heartbeat(
            doomed.outbox_writer(),
            doomed.outbox_entries_from_ms(),
            confab_runtime::presence::now_ms(),
        )
        .await
        .expect("a heartbeat");
}

/// An API process on `parts`' store, publishing to `bus`.
fn state_on(parts: &Parts, bus: Arc<dyn Bus>) -> ApiState {
    ApiState::new(
        Arc::clone(&parts.store),
        bus,
        Arc::clone(&parts.identity),
        &confab_runtime::signed::Keyring::random(),
    )
}

/// A chat of alice's with bob in it, alice's message `text` in it, and bob sent a push of it
/// through `queue` (made by hand: the process answered, with no push queue of its own, schedules
/// none). Answers that process, bob, the chat and the message.
async fn bob_was_pushed(
    parts: &Parts,
    queue: &dyn confab_runtime::push_queue::PushQueue,
    text: &str,
) -> (ApiState, User, User, ChatId, confab_schema::Signal) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat(&*parts.store, &alice).await;
    parts.store.upsert_user(&bob).await.expect("user");
    let survivor = state_on(parts, Arc::clone(&parts.bus));
    survivor
        .add_member(alice.id, chat, bob.id, None)
        .await
        .expect("adds bob");
    let message = NewMessage::parse(
        SignalKind::Message,
        Some(text.into()),
        Some("n-pushed".into()),
        None,
        Vec::new(),
    )
    .expect("a valid message");
    let (Outcome::Created(sent) | Outcome::Existing(sent)) = survivor
        .send_message(&alice, chat, message)
        .await
        .expect("sent");
    support::sent_a_push(queue, bob.id, chat, &sent).await;
    (survivor, alice, bob, chat, sent)
}

const SWEEP_NOW: SweepSettings = SweepSettings {
    interval: Duration::from_millis(100),
    silent_after: Duration::ZERO,
};

async fn a_silent_writers_events_are_published_by_a_sweep(parts: Parts) {
    let alice = user("alice");
    let chat = chat(&*parts.store, &alice).await;
    let refused: Arc<dyn Bus> = Arc::new(RefusingBus::new(&parts.bus));
    // The process that crashes: it stores, but the bus refuses its appends.
    let doomed = state_on(&parts, refused);
    let message = |text: &str, nonce: &str| {
        NewMessage::parse(
            SignalKind::Message,
            Some(text.into()),
            Some(nonce.into()),
            None,
            Vec::new(),
        )
        .expect("a valid message")
    };
    let signal_of = |outcome: Outcome<Signal>| match outcome {
        Outcome::Created(signal) | Outcome::Existing(signal) => signal,
    };
    let sent = doomed
        .send_message(&alice, chat, message("one", "n-1"))
        .await
        .expect("stored although the bus refused");
    let edited = doomed
        .send_message(&alice, chat, message("two", "n-2"))
        .await
        .expect("stored");
    let (sent, edited) = (signal_of(sent), signal_of(edited));
    doomed
        .edit_message(
            alice.id,
            chat,
            edited.id,
            confab_api::domain::inputs::MessageText::parse("two, edited".into()).expect("text"),
        )
        .await
        .expect("edited");
    // A retry of the first send finds it stored; its own attempt leaves nothing behind.
    doomed
        .send_message(&alice, chat, message("one", "n-1"))
        .await
        .expect("answers the stored signal");
    assert!(
        logged(&*parts.bus, chat).await.is_empty(),
        "the refusing bus logged nothing"
    );
    alive_until_now(&*parts.store, &doomed).await;

    // Another process, with the bus working: the first finds nothing to do while `doomed` is
    // within its silence allowance, then sweeps it.
    let survivor = state_on(&parts, Arc::clone(&parts.bus));
    let patient = SweepSettings {
        silent_after: Duration::from_secs(3600),
        ..SWEEP_NOW
    };
    assert_eq!(
        survivor.sweep_outbox(patient).await.expect("sweeps"),
        0,
        "a writer heard from lately is left alone"
    );
    let published = survivor.sweep_outbox(SWEEP_NOW).await.expect("sweeps");
    assert_eq!(published, 3, "the two sends and the edit");
    let events = logged_until(&*parts.bus, chat, |events| events.len() >= 3).await;
    let created: Vec<SignalId> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::SignalCreated(s) => Some(s.id),
            _ => None,
        })
        .collect();
    assert_eq!(
        created.iter().copied().collect::<HashSet<_>>(),
        HashSet::from([sent.id, edited.id]),
        "each stored message once: {events:?}"
    );
    assert_eq!(created.len(), 2, "no message twice: {events:?}");
    let updates: Vec<_> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::SignalUpdated(s) => Some((s.id, s.text.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        updates,
        vec![(edited.id, Some("two, edited".to_string()))],
        "the edit, as stored"
    );

    // Swept once: a second sweep publishes nothing more.
    assert_eq!(survivor.sweep_outbox(SWEEP_NOW).await.expect("sweeps"), 0);
    assert_eq!(logged(&*parts.bus, chat).await.len(), events.len());
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

/// An event as the test compares it: what it says, not its id or time.
fn described(event: &Event) -> Option<String> {
    Some(match event {
        Event::ReactionAdded(c) => format!(
            "reaction.added {} by {} count {}",
            c.emoji, c.user_id, c.count
        ),
        Event::ReactionRemoved(c) => {
            format!(
                "reaction.removed {} by {} count {}",
                c.emoji, c.user_id, c.count
            )
        }
        Event::ReadUpdated(c) => format!("read.updated {} to {}", c.user_id, c.up_to),
        Event::DeliveredUpdated(c) => format!("delivered.updated {} to {}", c.user_id, c.up_to),
        Event::MemberJoined(c) => format!("member.joined {} as {:?}", c.user_id, c.role),
        Event::MemberLeft(c) => format!("member.left {}", c.user_id),
        Event::MemberUpdated(c) => format!("member.updated {} as {:?}", c.user_id, c.role),
        Event::ChatUpdated(chat) => format!("chat.updated {:?}", chat.name),
        _ => return None,
    })
}

async fn a_silent_writers_reactions_markers_and_membership_are_published_by_a_sweep(parts: Parts) {
    use confab_api::domain::chats::ChatChange;
    use confab_api::domain::inputs::Emoji;
    use confab_api::store::MarkerKind;

    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let chat = chat(&*parts.store, &alice).await;
    for member in [&bob, &carol] {
        parts.store.upsert_user(member).await.expect("user");
    }
    let survivor = state_on(&parts, Arc::clone(&parts.bus));
    let message = NewMessage::parse(
        SignalKind::Message,
        Some("react to me".into()),
        Some("n-react".into()),
        None,
        Vec::new(),
    )
    .expect("a valid message");
    let (Outcome::Created(sent) | Outcome::Existing(sent)) = survivor
        .send_message(&alice, chat, message)
        .await
        .expect("sent");

    // The process that crashes: every change is stored, every event refused.
    let doomed = state_on(&parts, Arc::new(RefusingBus::new(&parts.bus)));
    let emoji = |e: &str| Emoji::parse(e.into()).expect("an emoji");
    doomed
        .add_member(alice.id, chat, bob.id, None)
        .await
        .expect("adds bob");
    doomed
        .add_member(alice.id, chat, carol.id, None)
        .await
        .expect("adds carol");
    doomed
        .set_role(alice.id, chat, bob.id, MemberRole::Admin)
        .await
        .expect("promotes bob");
    doomed
        .remove_member(alice.id, chat, carol.id)
        .await
        .expect("removes carol");
    doomed
        .add_reaction(bob.id, chat, sent.id, emoji("👍"))
        .await
        .expect("reacts");
    doomed
        .add_reaction(alice.id, chat, sent.id, emoji("🎉"))
        .await
        .expect("reacts");
    doomed
        .remove_reaction(alice.id, chat, sent.id, emoji("🎉"))
        .await
        .expect("takes it back");
    // Joining marked bob read up to his `joined`: a newer message to mark.
    let newer = NewMessage::parse(
        SignalKind::Message,
        Some("read me".into()),
        Some("n-read".into()),
        None,
        Vec::new(),
    )
    .expect("a valid message");
    let (Outcome::Created(newer) | Outcome::Existing(newer)) = survivor
        .send_message(&alice, chat, newer)
        .await
        .expect("sent");
    doomed
        .mark(MarkerKind::Read, bob.id, chat, newer.id)
        .await
        .expect("marks read");
    doomed
        .update_chat(
            alice.id,
            chat,
            ChatChange::parse(Some("renamed".into()), None).expect("a change"),
        )
        .await
        .expect("renames");
    alive_until_now(&*parts.store, &doomed).await;
    let before = logged(&*parts.bus, chat).await;
    assert_eq!(
        before.len(),
        2,
        "only the messages sent through the working bus: {before:?}"
    );

    let published = survivor.sweep_outbox(SWEEP_NOW).await.expect("sweeps");
    let events = logged_until(&*parts.bus, chat, |events| events.len() > published).await;
    let mut told: Vec<String> = events.iter().filter_map(|e| described(&e.event)).collect();
    told.sort();
    let mut expected = vec![
        // Joined, then promoted: the join tells the role as stored now.
        format!("member.joined {} as Some(Admin)", bob.id),
        format!("member.updated {} as Some(Admin)", bob.id),
        // Carol joined and left: only her leaving is announced (she must not be routed again).
        format!("member.left {}", carol.id),
        format!("reaction.added 👍 by {} count 1", bob.id),
        // Added and taken back: the removal alone, with the count as stored.
        format!("reaction.removed 🎉 by {} count 0", alice.id),
        format!("read.updated {} to {}", bob.id, newer.id),
        "chat.updated Some(\"renamed\")".to_string(),
    ];
    expected.sort();
    assert_eq!(told, expected, "{events:?}");
    let ids: HashSet<uuid::Uuid> = events.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), events.len(), "no event twice: {events:?}");
    let joining: Vec<&Envelope> = events
        .iter()
        .filter(|e| e.joined.contains(&carol.id))
        .collect();
    assert!(
        joining.is_empty(),
        "carol left: nothing routes her in again: {joining:?}"
    );

    assert_eq!(survivor.sweep_outbox(SWEEP_NOW).await.expect("sweeps"), 0);
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_silent_writers_reactions_markers_and_membership_are_published_by_a_sweep() {
    if let Some(parts) = embedded().await {
        Box::pin(a_silent_writers_reactions_markers_and_membership_are_published_by_a_sweep(parts))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_silent_writers_reactions_markers_and_membership_are_published_by_a_sweep() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_silent_writers_reactions_markers_and_membership_are_published_by_a_sweep(parts))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_silent_writers_events_are_published_by_a_sweep() {
    if let Some(parts) = embedded().await {
        Box::pin(a_silent_writers_events_are_published_by_a_sweep(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_silent_writers_events_are_published_by_a_sweep() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_silent_writers_events_are_published_by_a_sweep(parts)).await;
    }
}

/// A removal whose process died after its write, before it took back the member's pushes (a
/// request does that in the background): the notification the member had of the chat stayed on
/// their devices for good. The sweep that publishes the removal's `member.left` now withdraws it
/// as well, in the background and tried again while the push queue fails, which holds back
/// neither the event nor the sweep.
async fn a_removal_cut_short_has_its_pushes_withdrawn_by_the_sweep(parts: Parts) {
    use confab_runtime::push_queue::{EmbeddedPushQueue, PushKind, PushQueue};
    use std::sync::atomic::AtomicU32;

    let queue = Arc::new(support::FailingCancels {
        inner: EmbeddedPushQueue::open(&parts._dir.path().join("pushes.sqlite3"))
            .expect("push queue"),
        failures: AtomicU32::new(0),
    });
    let (survivor, alice, bob, chat, sent) =
        bob_was_pushed(&parts, &*queue, "on bob's lock screen").await;

    // The process that dies: no push queue of its own (its background withdrawal never ran),
    // and its event refused.
    let doomed = state_on(&parts, Arc::new(RefusingBus::new(&parts.bus)));
    doomed
        .remove_member(alice.id, chat, bob.id)
        .await
        .expect("removes bob");
    alive_until_now(&*parts.store, &doomed).await;
    assert!(
        queue
            .claim_due(confab_runtime::presence::now_ms(), 10)
            .await
            .expect("claims")
            .pushes
            .is_empty(),
        "nothing was withdrawn before the sweep"
    );

    let survivor = survivor.with_push_queue(Arc::clone(&queue) as Arc<dyn PushQueue>);
    queue.failures.store(2, Ordering::SeqCst);
    assert!(survivor.sweep_outbox(SWEEP_NOW).await.expect("sweeps") >= 1);
    let events = logged_until(&*parts.bus, chat, |events| {
        events
            .iter()
            .any(|e| matches!(&e.event, Event::MemberLeft(change) if change.user_id == bob.id))
    })
    .await;
    assert!(
        events
            .iter()
            .any(|e| matches!(&e.event, Event::MemberLeft(change) if change.user_id == bob.id)),
        "the sweep published no `member.left` while the push queue failed"
    );
    let due = support::due_within_the_deadline(&*queue).await;
    assert_eq!(
        due.iter()
            .map(|p| (p.kind, p.user, p.chat, p.newest))
            .collect::<Vec<_>>(),
        vec![(PushKind::Withdrawal, bob.id, chat, sent.id)],
        "the notification of the chat bob was removed from stays on his devices"
    );
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_removal_cut_short_has_its_pushes_withdrawn_by_the_sweep() {
    if let Some(parts) = embedded().await {
        Box::pin(a_removal_cut_short_has_its_pushes_withdrawn_by_the_sweep(
            parts,
        ))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_removal_cut_short_has_its_pushes_withdrawn_by_the_sweep() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_removal_cut_short_has_its_pushes_withdrawn_by_the_sweep(
            parts,
        ))
        .await;
    }
}

/// A deletion whose process died after its write, before it took the message out of the pushes
/// (a request does that after its publish): a notification showing the deleted text stayed on
/// the members' devices for good. The sweep that publishes the deletion now takes it out as well.
async fn a_deletion_cut_short_has_its_pushes_withdrawn_by_the_sweep(parts: Parts) {
    use confab_runtime::push_queue::{EmbeddedPushQueue, PushKind, PushQueue};

    let queue: Arc<dyn PushQueue> = Arc::new(
        EmbeddedPushQueue::open(&parts._dir.path().join("pushes.sqlite3")).expect("push queue"),
    );
    let (survivor, alice, bob, chat, sent) = bob_was_pushed(&parts, &*queue, "regretted").await;

    // The process that dies: no push queue of its own, and its event refused.
    let doomed = state_on(&parts, Arc::new(RefusingBus::new(&parts.bus)));
    doomed
        .delete_message(alice.id, chat, sent.id)
        .await
        .expect("deletes");
    alive_until_now(&*parts.store, &doomed).await;

    let survivor = survivor.with_push_queue(Arc::clone(&queue));
    assert!(survivor.sweep_outbox(SWEEP_NOW).await.expect("sweeps") >= 1);
    logged_until(&*parts.bus, chat, |events| {
        events
            .iter()
            .any(|e| matches!(&e.event, Event::SignalDeleted(deleted) if deleted.id == sent.id))
    })
    .await;
    let due = support::due_within_the_deadline(&*queue).await;
    assert_eq!(
        due.iter()
            .map(|p| (p.kind, p.user, p.chat, p.newest))
            .collect::<Vec<_>>(),
        vec![(PushKind::Withdrawal, bob.id, chat, sent.id)],
        "the notification of the deleted message stays on bob's devices"
    );
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_deletion_cut_short_has_its_pushes_withdrawn_by_the_sweep() {
    if let Some(parts) = embedded().await {
        Box::pin(a_deletion_cut_short_has_its_pushes_withdrawn_by_the_sweep(
            parts,
        ))
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_deletion_cut_short_has_its_pushes_withdrawn_by_the_sweep() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_deletion_cut_short_has_its_pushes_withdrawn_by_the_sweep(
            parts,
        ))
        .await;
    }
}

/// A process whose bus refused its events retries them in the background. When the bus takes
/// them again, a retry publishes the change as the store holds it then: a member removed (by
/// another process) since their join is not routed the chat again by a late `member.joined`, and
/// an edit of a message deleted since does not bring its text back after `signal.deleted`.
async fn a_late_retry_never_undoes_a_later_change(parts: Parts) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat(&*parts.store, &alice).await;
    parts.store.upsert_user(&bob).await.expect("user");
    let new_state = |bus: Arc<dyn Bus>| state_on(&parts, bus);
    let working = new_state(Arc::clone(&parts.bus));
    let refusing = Arc::new(RefusingBus::new(&parts.bus));
    let cut_off = new_state(Arc::clone(&refusing) as Arc<dyn Bus>);
    let (Outcome::Created(sent) | Outcome::Existing(sent)) = working
        .send_message(
            &alice,
            chat,
            NewMessage::parse(
                SignalKind::Message,
                Some("before".into()),
                Some("n-late".into()),
                None,
                Vec::new(),
            )
            .expect("a valid message"),
        )
        .await
        .expect("sent");

    // Stored by the process cut off from the bus; its events wait in its retries.
    cut_off
        .add_member(alice.id, chat, bob.id, None)
        .await
        .expect("adds bob");
    cut_off
        .edit_message(
            alice.id,
            chat,
            sent.id,
            confab_api::domain::inputs::MessageText::parse("secret edit".into()).expect("text"),
        )
        .await
        .expect("edits");
    // Undone by the other process, whose events go out at once.
    working
        .remove_member(alice.id, chat, bob.id)
        .await
        .expect("removes bob");
    working
        .delete_message(alice.id, chat, sent.id)
        .await
        .expect("deletes");

    refusing.1.store(false, Ordering::SeqCst);
    // The retries are done once the cut-off process's entries are gone.
    let first = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms() - 600_000);
    outbox_emptied(&*parts.store, &cut_off, first).await;

    let events = logged(&*parts.bus, chat).await;
    let left_at = events
        .iter()
        .position(|e| matches!(&e.event, Event::MemberLeft(change) if change.user_id == bob.id))
        .expect("bob's member.left");
    assert!(
        events[left_at..]
            .iter()
            .all(|e| !e.joined.contains(&bob.id)),
        "bob routed the chat again after he left: {events:?}"
    );
    let deleted_at = events
        .iter()
        .position(|e| matches!(&e.event, Event::SignalDeleted(s) if s.id == sent.id))
        .expect("the deletion");
    assert!(
        events[deleted_at..].iter().all(|e| !matches!(
            &e.event,
            Event::SignalUpdated(s) if s.id == sent.id
        )),
        "an edit published after the deletion: {events:?}"
    );
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_late_retry_never_undoes_a_later_change() {
    if let Some(parts) = embedded().await {
        Box::pin(a_late_retry_never_undoes_a_later_change(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_late_retry_never_undoes_a_later_change() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_late_retry_never_undoes_a_later_change(parts)).await;
    }
}

/// A send retried with its nonce publishes its message's event again, in case the first attempt
/// could not (here it could not: its process is cut off from the bus for good, as if dead). When
/// the bus refuses that copy too, it is retried in the background; by the time the bus takes it
/// the message may be deleted, and the copy must not bring its text back after `signal.deleted`:
/// the retry publishes the message as the store holds it then.
async fn a_retried_sends_late_copy_never_brings_a_deleted_message_back(parts: Parts) {
    let alice = user("alice");
    let chat = chat(&*parts.store, &alice).await;
    let new_state = |bus: Arc<dyn Bus>| state_on(&parts, bus);
    let working = new_state(Arc::clone(&parts.bus));
    let refusing = Arc::new(RefusingBus::new(&parts.bus));
    let cut_off = new_state(Arc::clone(&refusing) as Arc<dyn Bus>);
    let dead = new_state(Arc::new(RefusingBus::new(&parts.bus)) as Arc<dyn Bus>);
    let message = || {
        NewMessage::parse(
            SignalKind::Message,
            Some("the secret".into()),
            Some("n-again".into()),
            None,
            Vec::new(),
        )
        .expect("a valid message")
    };
    let Outcome::Created(sent) = dead
        .send_message(&alice, chat, message())
        .await
        .expect("sent")
    else {
        panic!("the first send stores the message");
    };
    // The retry reaches the process cut off from the bus: its copy of the event waits in a retry.
    let Outcome::Existing(again) = cut_off
        .send_message(&alice, chat, message())
        .await
        .expect("sent again")
    else {
        panic!("a retry of the nonce answers the stored message");
    };
    assert_eq!(again.id, sent.id);
    assert_eq!(cut_off.publishes_retrying(), 1, "the copy is being retried");
    working
        .delete_message(alice.id, chat, sent.id)
        .await
        .expect("deletes");

    refusing.1.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while cut_off.publishes_retrying() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the copy is still being retried"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let events = logged(&*parts.bus, chat).await;
    let deleted_at = events
        .iter()
        .position(|e| matches!(&e.event, Event::SignalDeleted(s) if s.id == sent.id))
        .expect("the deletion");
    assert!(
        events[deleted_at..].iter().all(|e| !matches!(
            &e.event,
            Event::SignalCreated(s) | Event::SignalUpdated(s)
                if s.id == sent.id && s.text.is_some()
        )),
        "the deleted message's text published after its deletion: {events:?}"
    );
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_retried_sends_late_copy_never_brings_a_deleted_message_back() {
    if let Some(parts) = embedded().await {
        Box::pin(a_retried_sends_late_copy_never_brings_a_deleted_message_back(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_retried_sends_late_copy_never_brings_a_deleted_message_back() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_retried_sends_late_copy_never_brings_a_deleted_message_back(parts)).await;
    }
}

/// A writer whose events the bus takes leaves nothing in the outbox: a burst of sends is removed
/// in a few requests, and every entry goes.
async fn a_working_writers_outbox_empties_after_a_burst(parts: Parts) {
    let alice = user("alice");
    let chat = chat(&*parts.store, &alice).await;
    let state = state_on(&parts, Arc::clone(&parts.bus));
    let first = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms());
    let sends = (0..60).map(|i| {
        let message = NewMessage::parse(
            SignalKind::Message,
            Some(format!("burst {i}")),
            Some(format!("burst-{i}")),
            None,
            Vec::new(),
        )
        .expect("a valid message");
        state.send_message(&alice, chat, message)
    });
    for sent in futures::future::join_all(sends).await {
        assert!(matches!(sent, Ok(Outcome::Created(_))), "{sent:?}");
    }
    let events = logged_until(&*parts.bus, chat, |events| events.len() >= 60).await;
    assert_eq!(events.len(), 60, "every send published");
    outbox_emptied(&*parts.store, &state, first).await;
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_working_writers_outbox_empties_after_a_burst() {
    if let Some(parts) = embedded().await {
        Box::pin(a_working_writers_outbox_empties_after_a_burst(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_working_writers_outbox_empties_after_a_burst() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_working_writers_outbox_empties_after_a_burst(parts)).await;
    }
}

/// The rows `writer` holds in the outbox, written since `first` (a bucket), as JSON text.
async fn outbox_rows(store: &dyn Store, writer: &ApiState, first: i64) -> Vec<String> {
    let last = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms());
    store
        .outbox_entries(writer.outbox_writer(), first, last)
        .await
        .expect("reads the outbox")
        .into_iter()
        .map(|row| String::from_utf8(row.envelope).expect("JSON is UTF-8"))
        .collect()
}

/// Deleted text is kept nowhere: not by the outbox rows of a process whose bus refused its
/// events (neither the deletion's own row nor those of the send and the edit before it, which
/// wait for the bus too), nor by what a sweep publishes from them. A deletion tried again writes
/// its row under the same id, so the log keeps one `signal.deleted`.
async fn a_deleted_messages_text_is_kept_nowhere_in_the_outbox(parts: Parts) {
    let alice = user("alice");
    let chat = chat(&*parts.store, &alice).await;
    let new_state = |bus: Arc<dyn Bus>| state_on(&parts, bus);
    let working = new_state(Arc::clone(&parts.bus));
    let cut_off = new_state(Arc::new(RefusingBus::new(&parts.bus)) as Arc<dyn Bus>);
    let first = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms()) - 1;
    let message = |text: &str, nonce: &str| {
        NewMessage::parse(
            SignalKind::Message,
            Some(text.into()),
            Some(nonce.into()),
            None,
            Vec::new(),
        )
        .expect("a valid message")
    };
    let (Outcome::Created(published) | Outcome::Existing(published)) = working
        .send_message(&alice, chat, message("before the edit", "n-edited"))
        .await
        .expect("sent");
    let (Outcome::Created(unpublished) | Outcome::Existing(unpublished)) = cut_off
        .send_message(&alice, chat, message("never announced", "n-cut-off"))
        .await
        .expect("stored although the bus refused");

    cut_off
        .edit_message(
            alice.id,
            chat,
            published.id,
            confab_api::domain::inputs::MessageText::parse("after the edit".into()).expect("text"),
        )
        .await
        .expect("edits");

    for id in [published.id, unpublished.id, published.id] {
        let tombstone = cut_off
            .delete_message(alice.id, chat, id)
            .await
            .expect("deletes");
        assert!(tombstone.deleted && tombstone.text.is_none());
    }
    let rows = outbox_rows(&*parts.store, &cut_off, first).await;
    let deletions = rows
        .iter()
        .filter(|row| row.contains("signal.deleted"))
        .count();
    assert!(
        deletions >= 2,
        "the deletions' rows wait for the bus: {rows:?}"
    );
    for text in ["before the edit", "after the edit", "never announced"] {
        assert!(
            rows.iter().all(|row| !row.contains(text)),
            "an outbox row keeps the deleted text {text:?}: {rows:?}"
        );
    }

    // The process dies; another one publishes what it left, as the store holds it.
    let before_sweep = logged(&*parts.bus, chat).await.len();
    alive_until_now(&*parts.store, &cut_off).await;
    assert!(working.sweep_outbox(SWEEP_NOW).await.expect("sweeps") >= 2);
    let events = logged_until(&*parts.bus, chat, |events| {
        events
            .iter()
            .filter(|e| matches!(e.event, Event::SignalDeleted(_)))
            .count()
            >= 2
    })
    .await;
    for id in [published.id, unpublished.id] {
        let deleted: Vec<&Envelope> = events
            .iter()
            .filter(|e| matches!(&e.event, Event::SignalDeleted(s) if s.id == id))
            .collect();
        assert_eq!(
            deleted.len(),
            1,
            "one signal.deleted per message: {events:?}"
        );
        assert_eq!(
            deleted[0].id,
            uuid::Uuid::new_v5(&id.as_uuid(), b"signal.deleted"),
            "every attempt's event has one id"
        );
    }
    let swept = serde_json::to_string(&events[before_sweep..]).expect("JSON");
    for text in ["before the edit", "after the edit", "never announced"] {
        assert!(
            !swept.contains(text),
            "a swept event keeps the deleted text {text:?}: {swept}"
        );
    }
    assert_eq!(
        outbox_rows(&*parts.store, &cut_off, first).await,
        Vec::<String>::new(),
        "the sweep removed every row"
    );
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_deleted_messages_text_is_kept_nowhere_in_the_outbox() {
    if let Some(parts) = embedded().await {
        Box::pin(a_deleted_messages_text_is_kept_nowhere_in_the_outbox(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_deleted_messages_text_is_kept_nowhere_in_the_outbox() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(a_deleted_messages_text_is_kept_nowhere_in_the_outbox(parts)).await;
    }
}

/// An edit's outbox row does not keep the text the edit replaces: the row waits for the bus, and
/// the old text is not the message's any more.
async fn an_edits_outbox_row_keeps_not_the_text_it_replaces(parts: Parts) {
    let alice = user("alice");
    let chat = chat(&*parts.store, &alice).await;
    let working = state_on(&parts, Arc::clone(&parts.bus));
    let cut_off = state_on(&parts, Arc::new(RefusingBus::new(&parts.bus)));
    let first = confab_api::outbox::bucket_of(confab_runtime::presence::now_ms()) - 1;
    let message = NewMessage::parse(
        SignalKind::Message,
        Some("before the edit".into()),
        Some("n-edit".into()),
        None,
        Vec::new(),
    )
    .expect("a valid message");
    let (Outcome::Created(sent) | Outcome::Existing(sent)) = working
        .send_message(&alice, chat, message)
        .await
        .expect("sent");
    let edited = cut_off
        .edit_message(
            alice.id,
            chat,
            sent.id,
            confab_api::domain::inputs::MessageText::parse("after the edit".into()).expect("text"),
        )
        .await
        .expect("edits");
    assert_eq!(edited.text.as_deref(), Some("after the edit"));
    let rows = outbox_rows(&*parts.store, &cut_off, first).await;
    assert!(
        rows.iter().any(|row| row.contains("signal.updated")),
        "the edit's row waits for the bus: {rows:?}"
    );
    assert!(
        rows.iter().all(|row| !row.contains("before the edit")),
        "an outbox row keeps the text the edit replaced: {rows:?}"
    );

    // Its sweep publishes the edit as stored.
    alive_until_now(&*parts.store, &cut_off).await;
    assert_eq!(working.sweep_outbox(SWEEP_NOW).await.expect("sweeps"), 1);
    let events = logged_until(&*parts.bus, chat, |events| events.len() >= 2).await;
    let updates: Vec<Option<String>> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::SignalUpdated(s) if s.id == sent.id => Some(s.text.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(updates, vec![Some("after the edit".to_string())]);
    if let Some(cleanup) = parts.cleanup {
        cleanup.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_an_edits_outbox_row_keeps_not_the_text_it_replaces() {
    if let Some(parts) = embedded().await {
        Box::pin(an_edits_outbox_row_keeps_not_the_text_it_replaces(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_an_edits_outbox_row_keeps_not_the_text_it_replaces() {
    if let Some(parts) = Box::pin(real()).await {
        Box::pin(an_edits_outbox_row_keeps_not_the_text_it_replaces(parts)).await;
    }
}

/// A removal whose process stopped after the authoritative write (the conditional batch on
/// `chat_members`), before the second one took the chat out of the member's own row of
/// `user_chats`: the row still lists the chat to the member, so their search covers it and their
/// new streams route it. No retry finishes that (the member is gone, so a retry is refused), and
/// the request may have answered 503, or nothing at all. Its outbox entry, written before the
/// change, is what finishes it: the sweep that publishes `member.left` takes the chat out of the
/// member's row first. CQL only: the embedded store removes the one row in one statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_a_removal_cut_short_is_finished_by_the_sweep() {
    use confab_api::domain::chats::ChatToCreate;
    use confab_api::domain::inputs::{ChatName, PageLimit, SearchText};
    use confab_api::domain::search::MessageSearch;
    use confab_api::indexer::Indexer;
    use confab_api::store::OutboxEntry;
    use confab_runtime::search::{Search, TantivySearch};
    use confab_schema::event::MemberChange;

    let Some(options) = fresh_keyspace("real_a_removal_cut_short_is_finished_by_the_sweep").await
    else {
        return;
    };
    let cql = Arc::new(CqlStore::connect(&options).await.expect("connects"));
    let store: Arc<dyn Store> = Arc::clone(&cql) as Arc<dyn Store>;
    let dir = tempfile::tempdir().expect("temp dir");
    let bus: Arc<dyn Bus> = Arc::new(
        EmbeddedBus::open(&dir.path().join("events.sqlite3"), LogSettings::default()).expect("bus"),
    );
    let search: Arc<dyn Search> =
        Arc::new(TantivySearch::open(&dir.path().join("search")).expect("index"));
    search.prepare().await.expect("index prepared");
    let indexer = Indexer {
        store: Arc::clone(&store),
        bus: Arc::clone(&bus),
        search: Arc::clone(&search),
        batch_size: 100,
        batch_wait: Duration::from_millis(10),
        batch_interval: Duration::ZERO,
        changed_lately: Default::default(),
    };
    let state = ApiState::new(
        Arc::clone(&store),
        Arc::clone(&bus),
        Arc::new(DevIdentity::open(dir.path()).expect("identity")),
        &confab_runtime::signed::Keyring::random(),
    )
    .with_search(Arc::clone(&search));

    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        store.upsert_user(u).await.expect("user");
    }
    let chat = match state
        .create_chat(
            &alice,
            ChatToCreate::Group {
                name: ChatName::parse("cut short".into()).expect("name"),
                description: None,
                members: vec![bob.id],
            },
        )
        .await
        .expect("chat")
    {
        Outcome::Created(chat) | Outcome::Existing(chat) => chat.id,
    };

    // The removal, cut short: its outbox entry is written (by a process that then went silent),
    // and so is the authoritative deletion; bob's own rows are as they were.
    let writer = uuid::Uuid::new_v4();
    let now = confab_runtime::presence::now_ms();
    store
        .outbox_heartbeat(writer, now, now)
        .await
        .expect("a heartbeat");
    let left = Envelope::new(
        chat,
        Event::MemberLeft(MemberChange {
            user_id: bob.id,
            role: None,
        }),
    )
    .leaving(vec![bob.id]);
    store
        .outbox_put(
            writer,
            &OutboxEntry {
                bucket: confab_api::outbox::bucket_of(now),
                id: left.id,
                envelope: serde_json::to_vec(&left).expect("json"),
            },
        )
        .await
        .expect("the entry");
    cql.session()
        .query_unpaged(
            cql.qualify("DELETE FROM chat_members WHERE chat_id = ? AND user_id = ?"),
            (chat.0, bob.id.0),
        )
        .await
        .expect("the authoritative deletion");
    assert_eq!(store.member_role(chat, bob.id).await.expect("reads"), None);
    assert!(
        store.chats_of(bob.id).await.expect("reads").contains(&chat),
        "bob's own row is left as the removal left it"
    );

    // Alice writes after bob is out.
    let after = NewMessage::parse(
        SignalKind::Message,
        Some("pomegranate after the removal".into()),
        Some("after".into()),
        None,
        Vec::new(),
    )
    .expect("a valid message");
    state.send_message(&alice, chat, after).await.expect("sent");
    indexer.catch_up().await.expect("indexed");
    let searching = |user: UserId| {
        let state = state.clone();
        async move {
            let query = MessageSearch {
                text: SearchText::parse("pomegranate").expect("text"),
                chat: None,
                author: None,
                before: None,
                after: None,
            };
            state
                .search_messages(user, query, None, PageLimit::parse(None).expect("limit"))
                .await
                .expect("searches")
                .items
                .len()
        }
    };
    assert_eq!(searching(alice.id).await, 1, "the message is indexed");

    assert!(
        state.sweep_outbox(SWEEP_NOW).await.expect("sweeps") >= 1,
        "`member.left` published"
    );
    assert_eq!(
        searching(bob.id).await,
        0,
        "bob, removed, still finds a message written after his removal"
    );
    let listed = state
        .list_chats(bob.id, None, PageLimit::parse(None).expect("limit"))
        .await
        .expect("lists");
    assert!(
        listed.items.iter().all(|c| c.id != chat),
        "bob's chat list still shows the chat he was removed from"
    );
    assert!(
        !store.chats_of(bob.id).await.expect("reads").contains(&chat),
        "bob's streams would still route the chat"
    );
    assert!(
        store
            .chats_of(alice.id)
            .await
            .expect("reads")
            .contains(&chat),
        "alice is still in"
    );
    let _ = cql::drop_keyspace(&options).await;
}

/// An addition whose request stopped after the authoritative write (the conditional batch on
/// `chat_members`), before the second one listed the chat in the member's own row of
/// `user_chats`: the member is a member, but none of their streams, searches or chat lists knows
/// the chat, and a retry only found them a member already. A retry now lists it again, and so
/// does the sweep that publishes the addition's `member.joined`. CQL only: the embedded store
/// adds the one row in one statement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_an_addition_cut_short_is_finished_by_its_retry_and_the_sweep() {
    use confab_api::store::OutboxEntry;
    use confab_schema::event::MemberChange;

    let Some(options) =
        fresh_keyspace("real_an_addition_cut_short_is_finished_by_its_retry_and_the_sweep").await
    else {
        return;
    };
    let cql = Arc::new(CqlStore::connect(&options).await.expect("connects"));
    let store: Arc<dyn Store> = Arc::clone(&cql) as Arc<dyn Store>;
    let dir = tempfile::tempdir().expect("temp dir");
    let bus: Arc<dyn Bus> = Arc::new(
        EmbeddedBus::open(&dir.path().join("events.sqlite3"), LogSettings::default()).expect("bus"),
    );
    let state = ApiState::new(
        Arc::clone(&store),
        Arc::clone(&bus),
        Arc::new(DevIdentity::open(dir.path()).expect("identity")),
        &confab_runtime::signed::Keyring::random(),
    );
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    for u in [&bob, &carol] {
        store.upsert_user(u).await.expect("user");
    }
    let chat = chat(&*store, &alice).await;
    // The authoritative write alone, as an addition cut short leaves it.
    let cut_short = |member: UserId| {
        let (cql, store) = (Arc::clone(&cql), Arc::clone(&store));
        async move {
            cql.session()
                .query_unpaged(
                    cql.qualify(
                        "INSERT INTO chat_members (chat_id, user_id, role, joined_at) \
                         VALUES (?, ?, 'member', toTimestamp(now()))",
                    ),
                    (chat.0, member.0),
                )
                .await
                .expect("the authoritative write");
            assert!(
                store
                    .member_role(chat, member)
                    .await
                    .expect("reads")
                    .is_some()
            );
            assert!(
                !store.chats_of(member).await.expect("reads").contains(&chat),
                "the member's own row was never written"
            );
        }
    };

    // The retry of the request lists the chat to bob.
    cut_short(bob.id).await;
    assert!(matches!(
        state
            .add_member(alice.id, chat, bob.id, None)
            .await
            .expect("the retry"),
        Outcome::Existing(_)
    ));
    assert!(
        store.chats_of(bob.id).await.expect("reads").contains(&chat),
        "the retry listed the chat to bob"
    );

    // Carol's addition was made by a process that then went silent with its `member.joined`
    // unpublished: the sweep lists the chat to her before it publishes the event.
    cut_short(carol.id).await;
    let writer = uuid::Uuid::new_v4();
    let now = confab_runtime::presence::now_ms();
    store
        .outbox_heartbeat(writer, now, now)
        .await
        .expect("a heartbeat");
    let joined = Envelope::new(
        chat,
        Event::MemberJoined(MemberChange {
            user_id: carol.id,
            role: Some(MemberRole::Member),
        }),
    )
    .joining(vec![carol.id]);
    store
        .outbox_put(
            writer,
            &OutboxEntry {
                bucket: confab_api::outbox::bucket_of(now),
                id: joined.id,
                envelope: serde_json::to_vec(&joined).expect("json"),
            },
        )
        .await
        .expect("the entry");
    assert_eq!(state.sweep_outbox(SWEEP_NOW).await.expect("sweeps"), 1);
    assert!(
        store
            .chats_of(carol.id)
            .await
            .expect("reads")
            .contains(&chat),
        "the sweep listed the chat to carol"
    );
    assert!(
        logged(&*bus, chat)
            .await
            .iter()
            .any(|e| e.joined.contains(&carol.id)),
        "member.joined is published"
    );
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}
