//! The indexer and the reindex on both stacks: the embedded store, log and tantivy index, and
//! Cassandra, JetStream and Meilisearch as `infra/up.sh` started them (a fresh keyspace, subject
//! prefix and index per test).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use confab_api::indexer::{BUS_CHECKPOINT, Indexer, REINDEX_CHECKPOINT, ReindexState, reindex};
use confab_api::store::cql::{self, CqlOptions, CqlStore, SendParity};
use confab_api::store::embedded::EmbeddedStore;
use confab_api::store::{NewChat, Store};
use confab_runtime::bus::{Bus, ChatFilter, EmbeddedBus, LogSettings, NatsBus, ReadError};
use confab_runtime::search::{
    Change, Hits, MeiliSearch, MeiliSettings, Query, Search, SearchError, TantivySearch,
};
use confab_schema::event::Event;
use confab_schema::{ChatId, ChatKind, Envelope, MemberRole, Signal, SignalId, SignalKind, UserId};
use futures::future::BoxFuture;
use time::OffsetDateTime;

const DEADLINE: Duration = Duration::from_secs(20);

struct Parts {
    store: Arc<dyn Store>,
    bus: Arc<dyn Bus>,
    search: Arc<dyn Search>,
    cleanup: Option<BoxFuture<'static, ()>>,
}

impl Parts {
    fn indexer(&self) -> Indexer {
        Indexer {
            store: Arc::clone(&self.store),
            bus: Arc::clone(&self.bus),
            search: Arc::clone(&self.search),
            batch_size: 3,
            batch_wait: Duration::from_millis(10),
            batch_interval: Duration::ZERO,
            changed_lately: Default::default(),
        }
    }

    async fn finish(self) {
        if let Some(cleanup) = self.cleanup {
            cleanup.await;
        }
    }
}

fn required() -> bool {
    std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

async fn embedded(settings: LogSettings) -> Option<Parts> {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = EmbeddedStore::open(&dir.path().join("store.sqlite3")).expect("store");
    let bus = EmbeddedBus::open(&dir.path().join("events.sqlite3"), settings).expect("bus");
    let search = TantivySearch::open(&dir.path().join("search")).expect("index");
    Some(Parts {
        store: Arc::new(store),
        bus: Arc::new(bus),
        search: Arc::new(search),
        cleanup: Some(Box::pin(async move { drop(dir) })),
    })
}

async fn real(settings: LogSettings) -> Option<Parts> {
    let test = "a real-stack indexer test";
    let Some(meili_url) = std::env::var("CONFAB_TEST_MEILI_URL").ok() else {
        assert!(!required(), "CONFAB_TEST_MEILI_URL is not set");
        eprintln!("SKIPPED {test}: CONFAB_TEST_MEILI_URL is not set (no Meilisearch)");
        return None;
    };
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
    let store = CqlStore::connect(&options).await.expect("connects");
    let nats =
        std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bus = NatsBus::connect(&nats, &prefix, settings)
        .await
        .expect("connects");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while Bus::check(&bus).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "NATS never came up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let search = MeiliSearch::new(&MeiliSettings {
        url: meili_url,
        api_key: std::env::var("CONFAB_TEST_MEILI_KEY").ok(),
        index: format!("t_{}", uuid::Uuid::new_v4().simple()),
        timeout: Duration::from_secs(30),
    })
    .expect("client");
    let bus = Arc::new(bus);
    let (cleanup_bus, cleanup_search) = (Arc::clone(&bus), search.clone());
    Some(Parts {
        store: Arc::new(store),
        bus,
        search: Arc::new(search),
        cleanup: Some(Box::pin(async move {
            let _ = cql::drop_keyspace(&options).await;
            let _ = cleanup_bus.delete_stream().await;
            let _ = cleanup_search.delete_index().await;
        })),
    })
}

fn author() -> UserId {
    UserId::from_subject("indexer", "author")
}

async fn chat(store: &dyn Store) -> ChatId {
    let id = ChatId::new();
    store
        .create_chat(&NewChat {
            id,
            kind: ChatKind::Group,
            name: Some("indexed".into()),
            description: None,
            created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            created_by: author(),
            members: vec![(author(), MemberRole::Owner)],
        })
        .await
        .expect("chat");
    id
}

/// Stores a message and, unless `quiet`, logs its event, as the API does.
async fn send(parts: &Parts, chat: ChatId, text: &str, quiet: bool) -> SignalId {
    let id = SignalId::new();
    let signal = Signal {
        id,
        chat_id: chat,
        kind: SignalKind::Message,
        author_id: author(),
        created_at: id.created_at().expect("v7"),
        nonce: None,
        text: Some(text.into()),
        reply_to: None,
        attachments: vec![],
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
        call: None,
    };
    parts.store.insert_signal(&signal).await.expect("stored");
    if !quiet {
        parts
            .bus
            .publish(&Envelope::signal_created(signal))
            .await
            .expect("published");
    }
    id
}

async fn found(parts: &Parts, chats: &[ChatId], text: &str) -> BTreeSet<SignalId> {
    parts
        .search
        .search(&query(text, chats))
        .await
        .expect("searches")
        .hits
        .into_iter()
        .map(|hit| hit.id)
        .collect()
}

/// A query for `text` in `chats`, up to 50 hits.
fn query(text: &str, chats: &[ChatId]) -> Query {
    Query {
        limit: 50,
        ..confab_runtime::search::conformance::query(text, chats)
    }
}

fn set(ids: &[SignalId]) -> BTreeSet<SignalId> {
    ids.iter().copied().collect()
}

/// Created, edited and deleted messages reach the index in batches; the checkpoint follows the log;
/// replaying the log again leaves the same index; events that are not messages change nothing.
async fn follows_the_log(parts: Parts) {
    let indexer = parts.indexer();
    parts.search.prepare().await.expect("prepares");
    let chat = chat(&*parts.store).await;
    let mut sent = Vec::new();
    for i in 0..7 {
        sent.push(send(&parts, chat, &format!("harbour crane {i}"), false).await);
    }
    parts
        .bus
        .publish(&Envelope::new(
            chat,
            Event::ChatUpdated(Box::new(parts.store.get_chat(chat).await.unwrap().unwrap())),
        ))
        .await
        .expect("published");
    indexer.catch_up().await.expect("catches up");
    assert_eq!(found(&parts, &[chat], "harbour").await, set(&sent));
    let last = parts.bus.last_seq().await.expect("last");
    assert_eq!(
        parts
            .search
            .checkpoint(BUS_CHECKPOINT)
            .await
            .expect("reads"),
        Some(last.to_string())
    );

    let edited = parts
        .store
        .edit_signal(
            chat,
            sent[0],
            "lighthouse keeper",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("edits")
        .expect("exists");
    parts
        .bus
        .publish(&Envelope::new(chat, Event::SignalUpdated(edited)))
        .await
        .expect("published");
    let deleted = parts
        .store
        .delete_signal(chat, sent[1])
        .await
        .expect("deletes")
        .expect("exists");
    parts
        .bus
        .publish(&Envelope::new(chat, Event::SignalDeleted(deleted)))
        .await
        .expect("published");
    indexer.catch_up().await.expect("catches up");
    assert_eq!(found(&parts, &[chat], "lighthouse").await, set(&sent[..1]));
    assert_eq!(found(&parts, &[chat], "harbour").await, set(&sent[2..]));

    // At least once: the whole log again changes nothing.
    parts
        .search
        .apply(&[], Some((BUS_CHECKPOINT, "0")))
        .await
        .expect("rewinds");
    indexer.catch_up().await.expect("catches up");
    assert_eq!(found(&parts, &[chat], "lighthouse").await, set(&sent[..1]));
    assert_eq!(found(&parts, &[chat], "harbour").await, set(&sent[2..]));
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_log_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(follows_the_log(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_log_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(follows_the_log(parts)).await;
    }
}

/// Changes two messages of `chat`, and logs the changes' events out of order: `deleted` is edited
/// (to "lighthouse secret") and then deleted, its edit's event logged last; `edited` is edited
/// twice (to "lighthouse keeper", then "beacon keeper"), its first edit's event logged last.
async fn log_changes_out_of_order(
    parts: &Parts,
    chat: ChatId,
    deleted: SignalId,
    edited: SignalId,
) {
    let stale = parts
        .store
        .edit_signal(
            chat,
            deleted,
            "lighthouse secret",
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("edits")
        .expect("exists");
    let tombstone = parts
        .store
        .delete_signal(chat, deleted)
        .await
        .expect("deletes")
        .expect("exists");
    let older = parts
        .store
        .edit_signal(chat, edited, "lighthouse keeper", OffsetDateTime::now_utc())
        .await
        .expect("edits")
        .expect("exists");
    let newer = parts
        .store
        .edit_signal(chat, edited, "beacon keeper", OffsetDateTime::now_utc())
        .await
        .expect("edits")
        .expect("exists");
    for event in [
        Event::SignalDeleted(tombstone),
        Event::SignalUpdated(stale),
        Event::SignalUpdated(newer),
        Event::SignalUpdated(older),
    ] {
        parts
            .bus
            .publish(&Envelope::new(chat, event))
            .await
            .expect("published");
    }
}

/// After [`log_changes_out_of_order`]: the index finds `edited` by its latest text, and nothing by
/// a deleted or replaced one (else it fails saying `undone`).
async fn assert_only_the_latest_texts_found(
    parts: &Parts,
    chat: ChatId,
    edited: SignalId,
    undone: &str,
) {
    assert_eq!(
        found(parts, &[chat], "lighthouse").await,
        set(&[]),
        "{undone}"
    );
    assert_eq!(found(parts, &[chat], "beacon").await, set(&[edited]));
    assert_eq!(found(parts, &[chat], "harbour").await, set(&[]));
}

/// The index holds what the store holds, whatever order the changes' events reach the log in: an
/// edit's event logged after the message's deletion (the edit read its signal back before the
/// deletion landed, and published after it) does not bring the deleted text back into the index,
/// and an older edit's event logged after a newer one does not undo it.
async fn a_late_edit_event_does_not_undo_a_later_change(parts: Parts) {
    let indexer = parts.indexer();
    parts.search.prepare().await.expect("prepares");
    let chat = chat(&*parts.store).await;
    let (deleted, edited) = (
        send(&parts, chat, "harbour crane", false).await,
        send(&parts, chat, "harbour crane", false).await,
    );
    indexer.catch_up().await.expect("catches up");

    log_changes_out_of_order(&parts, chat, deleted, edited).await;
    indexer.catch_up().await.expect("catches up");
    assert_only_the_latest_texts_found(
        &parts,
        chat,
        edited,
        "the index brought back a deleted message's text or an edit undone since",
    )
    .await;
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_edit_event_does_not_undo_a_later_change_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(a_late_edit_event_does_not_undo_a_later_change(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_edit_event_does_not_undo_a_later_change_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(a_late_edit_event_does_not_undo_a_later_change(parts)).await;
    }
}

/// A reindex's replay of the log after its scan indexes what the store holds, as the indexer
/// does: an edit's event logged after the message's deletion, or after a newer edit, while the
/// reindex ran does not bring back the deleted or replaced text.
async fn a_reindex_replay_does_not_undo_a_later_change(parts: Parts) {
    parts.search.prepare().await.expect("prepares");
    let chat = chat(&*parts.store).await;
    let (deleted, edited) = (
        send(&parts, chat, "harbour crane", true).await,
        send(&parts, chat, "harbour crane", true).await,
    );
    // A reindex that noted the log's position, then stopped before its scan: its replay starts
    // here, before the events below.
    parts.search.clear().await.expect("clears");
    let interrupted = ReindexState {
        bus_from: parts.bus.last_seq().await.expect("last"),
        ..ReindexState::default()
    };
    parts
        .search
        .apply(
            &[],
            Some((
                REINDEX_CHECKPOINT,
                &serde_json::to_string(&interrupted).unwrap(),
            )),
        )
        .await
        .expect("records");

    log_changes_out_of_order(&parts, chat, deleted, edited).await;
    let state = reindex(&*parts.store, &*parts.bus, &*parts.search, false, |_| {})
        .await
        .expect("resumes");
    assert!(state.done);
    assert_only_the_latest_texts_found(
        &parts,
        chat,
        edited,
        "the reindex's replay brought back a deleted message's text or an edit undone since",
    )
    .await;
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reindex_replay_does_not_undo_a_later_change_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(a_reindex_replay_does_not_undo_a_later_change(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reindex_replay_does_not_undo_a_later_change_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(a_reindex_replay_does_not_undo_a_later_change(parts)).await;
    }
}

/// A started indexer picks up new events by itself.
async fn runs_in_the_background(parts: Parts) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = parts.indexer().start(shutdown.clone());
    let chat = chat(&*parts.store).await;
    let id = send(&parts, chat, "background worker", false).await;
    wait_found(&parts, &[chat], "background", &set(&[id])).await;
    stop(shutdown, worker).await;
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_the_background_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(runs_in_the_background(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_the_background_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(runs_in_the_background(parts)).await;
    }
}

/// What an [`ObservedSearch`] fails.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Failing {
    Nothing,
    /// Every batch of a reindex's scan.
    Scans,
    /// The second write of checkpoints alone (no changes): in a reindex that starts afresh, the
    /// second of the two checkpoints it writes after clearing the index.
    SecondMark,
}

/// The search engine of `parts`, counting the batches applied to it and failing what `failing`
/// says.
struct ObservedSearch {
    engine: Arc<dyn Search>,
    batches: AtomicUsize,
    marks: AtomicUsize,
    failing: Failing,
}

impl ObservedSearch {
    fn new(engine: &Arc<dyn Search>, failing: Failing) -> ObservedSearch {
        ObservedSearch {
            engine: Arc::clone(engine),
            batches: AtomicUsize::new(0),
            marks: AtomicUsize::new(0),
            failing,
        }
    }
}

#[async_trait::async_trait]
impl Search for ObservedSearch {
    async fn prepare(&self) -> Result<(), SearchError> {
        self.engine.prepare().await
    }
    async fn apply(
        &self,
        changes: &[Change],
        checkpoint: Option<(&str, &str)>,
    ) -> Result<(), SearchError> {
        let scan =
            !changes.is_empty() && checkpoint.is_some_and(|(name, _)| name == REINDEX_CHECKPOINT);
        if self.failing == Failing::Scans && scan {
            return Err(SearchError::Unavailable("gone mid-scan".into()));
        }
        if changes.is_empty() && checkpoint.is_some() {
            let mark = self.marks.fetch_add(1, Ordering::SeqCst) + 1;
            if self.failing == Failing::SecondMark && mark == 2 {
                return Err(SearchError::Unavailable(
                    "gone between two checkpoints".into(),
                ));
            }
        }
        self.batches.fetch_add(1, Ordering::SeqCst);
        self.engine.apply(changes, checkpoint).await
    }
    async fn checkpoint(&self, name: &str) -> Result<Option<String>, SearchError> {
        self.engine.checkpoint(name).await
    }
    async fn search(&self, query: &Query) -> Result<Hits, SearchError> {
        self.engine.search(query).await
    }
    async fn clear(&self) -> Result<(), SearchError> {
        self.engine.clear().await
    }
    async fn check(&self) -> Result<(), SearchError> {
        self.engine.check().await
    }
}

/// Stops a background indexer and waits for it.
async fn stop(shutdown: tokio_util::sync::CancellationToken, worker: tokio::task::JoinHandle<()>) {
    shutdown.cancel();
    tokio::time::timeout(DEADLINE, worker)
        .await
        .expect("stops")
        .expect("joins");
}

/// Waits until a search for `text` in `chats` finds exactly `expected`.
async fn wait_found(parts: &Parts, chats: &[ChatId], text: &str, expected: &BTreeSet<SignalId>) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        // Until the indexer has prepared the index, a search may fail; that is part of the wait.
        if let Ok(found) = parts.search.search(&query(text, chats)).await
            && found.hits.iter().map(|h| h.id).collect::<BTreeSet<_>>() == *expected
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{text:?} never indexed"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Under a steady stream of messages the indexer applies one batch per `batch_interval`, not one
/// whenever the last is done: the engine's cost is mostly per batch.
async fn batches_once_per_interval_under_a_stream(parts: Parts) {
    const INTERVAL: Duration = Duration::from_secs(5);
    const STREAM: usize = 30;
    let counting = Arc::new(ObservedSearch::new(&parts.search, Failing::Nothing));
    let indexer = Indexer {
        store: Arc::clone(&parts.store),
        bus: Arc::clone(&parts.bus),
        search: Arc::clone(&counting) as Arc<dyn Search>,
        batch_size: 500,
        batch_wait: Duration::from_millis(10),
        batch_interval: INTERVAL,
        changed_lately: Default::default(),
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = indexer.start(shutdown.clone());
    let chat = chat(&*parts.store).await;
    let first = send(&parts, chat, "quayside first", false).await;
    wait_found(&parts, &[chat], "first", &set(&[first])).await;
    let before = counting.batches.load(Ordering::SeqCst);

    // Sent one by one, each waking the indexer, within well under one interval.
    let started = tokio::time::Instant::now();
    let mut stream = Vec::new();
    for i in 0..STREAM {
        stream.push(send(&parts, chat, &format!("quayside stream {i}"), false).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sending = started.elapsed();
    wait_found(&parts, &[chat], "stream", &set(&stream)).await;
    let batches = counting.batches.load(Ordering::SeqCst) - before;
    // One batch per interval the sending took, and one more where it straddles an interval's end.
    let allowed = 2 + (sending.as_millis() / INTERVAL.as_millis()) as usize;
    assert!(
        batches <= allowed,
        "{STREAM} messages over {sending:?} took {batches} batches"
    );
    stop(shutdown, worker).await;
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_once_per_interval_under_a_stream_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(batches_once_per_interval_under_a_stream(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_once_per_interval_under_a_stream_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(batches_once_per_interval_under_a_stream(parts)).await;
    }
}

/// A reindex that failed part-way leaves the log's position at its start; the indexer finishes
/// it, rather than follow the log from there and never scan the chats it did not reach.
async fn finishes_an_interrupted_reindex(parts: Parts) {
    parts.search.prepare().await.expect("prepares");
    let (one, two) = (chat(&*parts.store).await, chat(&*parts.store).await);
    // In the store, not in the log: only a scan finds them.
    let a = send(&parts, one, "unscanned history", true).await;
    let b = send(&parts, two, "unscanned history", true).await;
    let failing = ObservedSearch::new(&parts.search, Failing::Scans);
    assert!(
        reindex(&*parts.store, &*parts.bus, &failing, false, |_| {})
            .await
            .is_err(),
        "the scan fails"
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = parts.indexer().start(shutdown.clone());
    wait_found(&parts, &[one, two], "unscanned", &set(&[a, b])).await;
    stop(shutdown, worker).await;
    parts.finish().await;
}

/// A reindex that fails right after clearing the index, between the two checkpoints it writes
/// then (the log position it replays from, and its own progress), leaves what the indexer needs
/// to finish it: it used to write the log position first, so the indexer followed the log from
/// there over an empty index, and history from before it was never searchable again.
async fn finishes_a_reindex_that_failed_at_its_start(parts: Parts) {
    parts.search.prepare().await.expect("prepares");
    let chat_id = chat(&*parts.store).await;
    // In the store, not in the log: only a scan finds it.
    let old = send(&parts, chat_id, "history before the reindex", true).await;
    let failing = ObservedSearch::new(&parts.search, Failing::SecondMark);
    assert!(
        reindex(&*parts.store, &*parts.bus, &failing, true, |_| {})
            .await
            .is_err(),
        "the reindex fails at its start"
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = parts.indexer().start(shutdown.clone());
    wait_found(&parts, &[chat_id], "history", &set(&[old])).await;
    stop(shutdown, worker).await;
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_a_reindex_that_failed_at_its_start_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(finishes_a_reindex_that_failed_at_its_start(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_a_reindex_that_failed_at_its_start_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(finishes_a_reindex_that_failed_at_its_start(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_an_interrupted_reindex_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(finishes_an_interrupted_reindex(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_an_interrupted_reindex_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(finishes_an_interrupted_reindex(parts)).await;
    }
}

/// When the log no longer holds the events after the index's position, the indexer rebuilds the
/// index from the store.
async fn rebuilds_when_the_log_expired(parts: Parts) {
    let indexer = parts.indexer();
    parts.search.prepare().await.expect("prepares");
    let chat = chat(&*parts.store).await;
    let early = send(&parts, chat, "expired event", false).await;
    let first = parts.bus.last_seq().await.expect("last");
    // Wait for retention to drop it, publishing meanwhile as a live deployment does.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut later = Vec::new();
    loop {
        match parts
            .bus
            .read(first - 1, u64::MAX, ChatFilter::All, 100_000)
            .await
        {
            Err(ReadError::Expired(_)) => break,
            Ok(_) => {}
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        later.push(send(&parts, chat, "expired later", false).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    indexer.catch_up().await.expect("catches up");
    assert_eq!(
        found(&parts, &[chat], "expired").await.len(),
        later.len() + 1
    );
    assert!(found(&parts, &[chat], "expired").await.contains(&early));
    let state: ReindexState = serde_json::from_str(
        &parts
            .search
            .checkpoint(REINDEX_CHECKPOINT)
            .await
            .expect("reads")
            .expect("a reindex ran"),
    )
    .expect("decodes");
    assert!(state.done);
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuilds_when_the_log_expired_embedded() {
    let settings = LogSettings {
        retention: Duration::from_secs(1),
        duplicate_window: Duration::from_millis(500),
    };
    if let Some(parts) = embedded(settings).await {
        Box::pin(rebuilds_when_the_log_expired(parts)).await;
    }
}

/// A reindex covers every chat, records its progress, and resumes after the last chat it
/// finished; with `restart` it starts over.
async fn reindex_resumes(parts: Parts) {
    let (one, two) = (chat(&*parts.store).await, chat(&*parts.store).await);
    let a = send(&parts, one, "quiet history", true).await;
    let b = send(&parts, two, "quiet history", true).await;
    let mut reports = 0;
    let state = reindex(&*parts.store, &*parts.bus, &*parts.search, true, |_| {
        reports += 1
    })
    .await
    .expect("reindexes");
    assert!(reports >= 1);
    assert!(state.done && state.chats >= 2);
    assert_eq!(found(&parts, &[one, two], "quiet").await, set(&[a, b]));

    // An interrupted run: the first chat in the store's order was done, then the index was lost.
    let order = parts.store.chat_ids(None, 1_000).await.expect("chats");
    let position = |c: ChatId| order.iter().position(|x| *x == c).expect("listed");
    let (first, second, first_id, second_id) = if position(one) < position(two) {
        (one, two, a, b)
    } else {
        (two, one, b, a)
    };
    parts.search.clear().await.expect("clears");
    let interrupted = ReindexState {
        bus_from: parts.bus.last_seq().await.expect("last"),
        after: Some(first),
        chats: 1,
        messages: 1,
        done: false,
    };
    parts
        .search
        .apply(
            &[],
            Some((
                REINDEX_CHECKPOINT,
                &serde_json::to_string(&interrupted).unwrap(),
            )),
        )
        .await
        .expect("records");
    reindex(&*parts.store, &*parts.bus, &*parts.search, false, |_| {})
        .await
        .expect("resumes");
    assert_eq!(
        found(&parts, &[first, second], "quiet").await,
        set(&[second_id]),
        "chats up to the recorded one are not read again"
    );
    reindex(&*parts.store, &*parts.bus, &*parts.search, true, |_| {})
        .await
        .expect("restarts");
    assert_eq!(
        found(&parts, &[first, second], "quiet").await,
        set(&[first_id, second_id])
    );
    parts.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_resumes_embedded() {
    if let Some(parts) = embedded(LogSettings::default()).await {
        Box::pin(reindex_resumes(parts)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reindex_resumes_real() {
    if let Some(parts) = Box::pin(real(LogSettings::default())).await {
        Box::pin(reindex_resumes(parts)).await;
    }
}
