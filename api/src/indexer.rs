//! Keeps the search index in step with the history.
//!
//! [`Indexer`] reads the event log after the index's `bus` checkpoint, a batch at a time, turns
//! `signal.created`/`signal.updated` into upserts and `signal.deleted` into removals, and applies
//! each batch with the checkpoint moved past it: at least once (a batch that fails is read again),
//! idempotent (documents are keyed by signal id, and a batch leaves the last state of each), and
//! never on the send path (it runs in a task of its own; the send path only appends to the log). A
//! subscription to the log only wakes it up; the log itself is the source. When the log no longer
//! holds the events after the checkpoint (retention) or never issued it (a new log), it rebuilds the
//! index from the store ([`reindex`]).
//!
//! [`reindex`] scans every chat's history into the index, recording after each batch the last chat
//! done, so an interrupted run resumes. It notes the log's position before it starts and, once the
//! scan is done, replays the log from there: a change made during the scan may have been read
//! before it was made, and the replay applies it after. Both index an edited message as the store
//! holds it when its event is read, not as the event carries it, and so the replay does every new
//! one; the indexer takes a new message's event as it carries it while it is fresh (`changes_of`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_runtime::bus::{Bus, BusError, ChatFilter, ReadError};
use confab_runtime::search::{Change, Search, SearchError};
use confab_schema::{ChatId, Event, LoggedEvent, Signal, SignalId};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// The checkpoint holding the last event sequence applied.
pub const BUS_CHECKPOINT: &str = "bus";
/// The checkpoint holding a reindex's progress ([`ReindexState`]).
pub const REINDEX_CHECKPOINT: &str = "reindex";

/// Signals read from the store per request during a reindex.
const HISTORY_PAGE: usize = 500;
/// Messages read back from the store per request when their events are indexed.
const READ_BACK_BATCH: usize = 200;
/// How often the indexer looks at the log when no event woke it.
const POLL: Duration = Duration::from_secs(1);
/// How old a new message's event may be and still be indexed as it carries it. A send publishes
/// its event as it stores the message, so the live path meets it well within this; one published
/// late (by the outbox's sweep, which waits out `bus.outbox_silent_after_ms`, 30 s by default) or
/// read again (a catch-up after a restart, a rewind) is older, and is read back from the store.
const FRESH_FOR: Duration = Duration::from_secs(5);
/// How long the indexer remembers a message it saw deleted or edited, against a new message's
/// event that comes after it while still fresh: well past [`FRESH_FOR`], clocks a little apart.
const CHANGED_MEMORY: Duration = Duration::from_secs(60);
/// The most messages remembered as deleted or edited; beyond it, every new message's event is
/// read back until the memory drains.
const CHANGED_MEMORY_MAX: usize = 100_000;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Search(#[from] SearchError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("event log: {0}")]
    Log(String),
}

/// How far a reindex got.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReindexState {
    /// The log's last sequence when the reindex started: replayed from there once the scan ends.
    pub bus_from: u64,
    /// The last chat whose history is in the index (chats in the store's order).
    pub after: Option<ChatId>,
    pub chats: u64,
    pub messages: u64,
    pub done: bool,
}

impl ReindexState {
    async fn load(search: &dyn Search) -> Result<Option<ReindexState>, IndexError> {
        Ok(search
            .checkpoint(REINDEX_CHECKPOINT)
            .await?
            .and_then(|value| serde_json::from_str(&value).ok()))
    }

    fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Reads the event log into the search index.
#[derive(Clone)]
pub struct Indexer {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub search: Arc<dyn Search>,
    /// The most events per batch.
    pub batch_size: usize,
    /// How long to wait for more events before applying a batch.
    pub batch_wait: Duration,
    /// The least time from the start of one batch to the start of the next while events keep
    /// coming. A search engine's cost is mostly per batch, and grows with the index (Meilisearch
    /// spent about 90 ms of CPU on a batch of 25 messages into an index of 10,000, 170 ms into one
    /// of 200,000, and 0.1 to 0.25 ms per message more), so under a steady stream the indexer
    /// sends one large batch per interval instead of a small one whenever the last is done. After
    /// a quiet interval, the first event waits only `batch_wait`.
    pub batch_interval: Duration,
    /// The messages this indexer saw deleted or edited lately (see `changes_of`).
    pub changed_lately: ChangedLately,
}

/// The messages an indexer saw deleted or edited lately, with when it saw each, and when it began
/// to remember. A new message's event that is fresh and comes after one of these (published late,
/// after the deletion or edit) is read back from the store like a stale one.
#[derive(Clone)]
pub struct ChangedLately(Arc<std::sync::Mutex<Remembered>>);

struct Remembered {
    since: time::OffsetDateTime,
    seen: std::collections::HashMap<SignalId, Instant>,
}

impl Default for ChangedLately {
    fn default() -> Self {
        ChangedLately(Arc::new(std::sync::Mutex::new(Remembered {
            since: time::OffsetDateTime::now_utc(),
            seen: std::collections::HashMap::new(),
        })))
    }
}

impl ChangedLately {
    fn lock(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets what is older than [`CHANGED_MEMORY`].
    fn prune(&self) {
        self.lock()
            .seen
            .retain(|_, seen| seen.elapsed() < CHANGED_MEMORY);
    }

    fn note(&self, id: SignalId) {
        self.lock().seen.insert(id, Instant::now());
    }

    /// Whether a new message's event sent at `at`, read now, may be indexed as it carries it:
    /// fresh, sent since this memory began (a deletion before that was seen by no one here), of
    /// a message not seen deleted or edited, and the memory not full (then something may have
    /// been left out).
    fn as_carried(&self, id: SignalId, at: time::OffsetDateTime) -> bool {
        let remembered = self.lock();
        let age = time::OffsetDateTime::now_utc() - at;
        age < FRESH_FOR
            && at >= remembered.since
            && remembered.seen.len() < CHANGED_MEMORY_MAX
            && !remembered.seen.contains_key(&id)
    }
}

impl Indexer {
    /// Runs until `shutdown`: prepares the index, then follows the log.
    pub fn start(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = self.run() => {}
            }
        })
    }

    async fn run(&self) {
        let mut backoff = Duration::from_millis(100);
        while let Err(error) = self.search.prepare().await {
            metrics::counter!("confab_search_index_failures_total").increment(1);
            tracing::warn!(%error, "search index not prepared; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        let mut wakeups = None;
        let mut last_batch: Option<Instant> = None;
        // Looked at on start and after every failure, which may have been a reindex's.
        let mut reindex_checked = false;
        backoff = Duration::from_millis(100);
        loop {
            if wakeups.is_none() {
                wakeups = self.bus.subscribe().await.ok();
            }
            if !reindex_checked {
                if let Err(error) = self.finish_reindex().await {
                    metrics::counter!("confab_search_index_failures_total").increment(1);
                    tracing::warn!(%error, "an unfinished reindex failed again; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
                reindex_checked = true;
            }
            let started = Instant::now();
            match self.catch_up().await {
                Ok(applied) => {
                    backoff = Duration::from_millis(100);
                    if applied > 0 {
                        last_batch = Some(started);
                    }
                }
                Err(error) => {
                    metrics::counter!("confab_search_index_failures_total").increment(1);
                    tracing::warn!(%error, "indexing failed; retrying");
                    reindex_checked = false;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
            // Wait for an event (or the next poll), then a little longer so one batch takes a
            // burst.
            let (woken, ended) = match wakeups.as_mut() {
                Some(stream) => match tokio::time::timeout(POLL, stream.next()).await {
                    Ok(Some(_)) => (true, false),
                    Ok(None) => (false, true),
                    Err(_) => (false, false),
                },
                None => {
                    tokio::time::sleep(POLL).await;
                    (false, false)
                }
            };
            if ended {
                wakeups = None;
            }
            if woken {
                let wait = match last_batch {
                    Some(at) => self
                        .batch_wait
                        .max(self.batch_interval.saturating_sub(at.elapsed())),
                    None => self.batch_wait,
                };
                tokio::time::sleep(wait).await;
                if let Some(stream) = wakeups.as_mut() {
                    while let Some(Some(_)) = futures::FutureExt::now_or_never(stream.next()) {}
                }
            }
        }
    }

    /// Applies every event after the index's checkpoint up to the log's end as of the call, in
    /// batches, and returns how many batches it applied. It does not chase events appended
    /// meanwhile: under a steady stream it would apply a small batch as soon as the last is done,
    /// where [`Indexer::run`] paces them. Falls back to [`reindex`] when the log cannot replay
    /// from the checkpoint.
    pub async fn catch_up(&self) -> Result<usize, IndexError> {
        let mut position = self.position().await?;
        let end = self.bus.last_seq().await?;
        let mut batches = 0;
        while position != end {
            let up_to = end.min(position.saturating_add(self.batch_size as u64));
            let read = if position > end {
                Err(ReadError::Unknown(position))
            } else {
                self.bus
                    .read(position, up_to, ChatFilter::All, self.batch_size)
                    .await
            };
            match read {
                Ok(events) => {
                    let changes =
                        changes_of(&*self.store, &events, Some(&self.changed_lately)).await?;
                    self.search
                        .apply(&changes, Some((BUS_CHECKPOINT, &up_to.to_string())))
                        .await?;
                    metrics::counter!("confab_search_indexed_events_total")
                        .increment(events.len() as u64);
                    metrics::gauge!("confab_search_indexed_position").set(up_to as f64);
                    position = up_to;
                    batches += 1;
                }
                Err(ReadError::Expired(_) | ReadError::Unknown(_)) => {
                    tracing::warn!(
                        position,
                        end,
                        "the event log cannot replay from the index's position; rebuilding the \
                         index from the store"
                    );
                    metrics::counter!("confab_search_reindex_total").increment(1);
                    // The rebuild replays the log to its end, which is past `end`.
                    reindex(&*self.store, &*self.bus, &*self.search, false, |_| {}).await?;
                    return Ok(batches + 1);
                }
                Err(ReadError::TooMany(n)) => {
                    return Err(IndexError::Log(format!("more than {n} events in a batch")));
                }
                Err(ReadError::Bus(error)) => return Err(error.into()),
            }
        }
        Ok(batches)
    }

    /// Finishes a reindex that stopped part-way (it failed, or its process died). It set the log
    /// position at its start, so following the log from there would never scan the chats it did
    /// not reach. An indexer that starts while `confab reindex` runs elsewhere joins it: the same
    /// idempotent work twice.
    async fn finish_reindex(&self) -> Result<(), IndexError> {
        if ReindexState::load(&*self.search)
            .await?
            .is_some_and(|state| !state.done)
        {
            tracing::warn!("finishing a reindex that stopped part-way");
            metrics::counter!("confab_search_reindex_total").increment(1);
            reindex(&*self.store, &*self.bus, &*self.search, false, |_| {}).await?;
        }
        Ok(())
    }

    async fn position(&self) -> Result<u64, IndexError> {
        Ok(self
            .search
            .checkpoint(BUS_CHECKPOINT)
            .await?
            .and_then(|value| value.parse().ok())
            .unwrap_or(0))
    }
}

/// What `events` change in the index, for the indexer and a reindex's replay alike. An edited
/// message is indexed as the store holds it now, not as its event carries it: an edit reads its
/// signal back after its write and publishes that, so its event may reach the log after a later
/// edit's or the message's deletion, and would bring back what they replaced (deleted text, kept
/// nowhere else). A new message's event is taken as it is while fresh (the live path: a send
/// publishes it as it stores the message, so a batch of new messages costs no store read); one
/// that may be stale is read back too: older than [`FRESH_FOR`] (published late by the outbox's
/// sweep, or read again), or of a message `changed_lately` saw deleted or edited before it. With
/// no `changed_lately` (a reindex's replay) every one is read back. At most one store read per
/// batch, for the messages read back.
async fn changes_of(
    store: &dyn Store,
    events: &[LoggedEvent],
    changed_lately: Option<&ChangedLately>,
) -> Result<Vec<Change>, IndexError> {
    if let Some(changed) = changed_lately {
        changed.prune();
    }
    // Each message once, however many of its events the batch holds; in the log's order, so that
    // a deletion or edit earlier in the batch counts against a new message's event after it.
    let mut read_back: std::collections::HashSet<(ChatId, SignalId)> =
        std::collections::HashSet::new();
    for event in events {
        match (&event.envelope.event, changed_lately) {
            (Event::SignalUpdated(signal), changed) => {
                read_back.insert((signal.chat_id, signal.id));
                if let Some(changed) = changed {
                    changed.note(signal.id);
                }
            }
            (Event::SignalDeleted(signal), Some(changed)) => changed.note(signal.id),
            (Event::SignalCreated(signal), Some(changed))
                if changed.as_carried(signal.id, event.envelope.at) => {}
            (Event::SignalCreated(signal), _) => {
                read_back.insert((signal.chat_id, signal.id));
            }
            _ => {}
        }
    }
    let messages: Vec<(ChatId, SignalId)> = read_back.into_iter().collect();
    let read: std::collections::HashSet<SignalId> = messages.iter().map(|(_, id)| *id).collect();
    let mut current: std::collections::HashMap<SignalId, Signal> =
        std::collections::HashMap::with_capacity(messages.len());
    // A bounded number of reads at once: a reindex replays the log a thousand events at a time.
    for some in messages.chunks(READ_BACK_BATCH) {
        current.extend(
            store
                .get_signals(some)
                .await?
                .into_iter()
                .flatten()
                .map(|signal| (signal.id, signal)),
        );
    }
    Ok(events
        .iter()
        .filter_map(|event| match &event.envelope.event {
            Event::SignalCreated(signal) | Event::SignalUpdated(signal)
                if read.contains(&signal.id) =>
            {
                Some(match current.get(&signal.id) {
                    Some(now) => Change::of_signal(now),
                    // Gone from the store: gone from the index.
                    None => Change::Remove(signal.id),
                })
            }
            _ => Change::of_event(&event.envelope),
        })
        .collect())
}

/// Progress of a [`reindex`], reported after each batch.
#[derive(Clone, Debug)]
pub struct ReindexProgress {
    pub chats: u64,
    pub messages: u64,
    pub elapsed: Duration,
}

/// Rebuilds the index from the store. Resumes an unfinished reindex unless `restart`; otherwise
/// (or with nothing to resume) clears the index first. Safe to run beside running indexers.
pub async fn reindex(
    store: &dyn Store,
    bus: &dyn Bus,
    search: &dyn Search,
    restart: bool,
    mut progress: impl FnMut(&ReindexProgress),
) -> Result<ReindexState, IndexError> {
    let started = Instant::now();
    search.prepare().await?;
    let mut state = match ReindexState::load(search).await? {
        Some(state) if !state.done && !restart => {
            tracing::info!(chats = state.chats, "resuming the reindex");
            state
        }
        _ => {
            let state = ReindexState {
                bus_from: bus.last_seq().await?,
                ..ReindexState::default()
            };
            search.clear().await?;
            // The reindex's own progress first: from the moment the index is cleared until it is
            // done, an unfinished reindex is on record, so whoever finds it finishes it
            // (`finish_reindex`). Written the other way round, a failure between the two left an
            // empty index whose log position said it was up to date.
            search
                .apply(&[], Some((REINDEX_CHECKPOINT, &state.encode())))
                .await?;
            // Then the log position, so a running indexer follows the log from here meanwhile.
            search
                .apply(&[], Some((BUS_CHECKPOINT, &state.bus_from.to_string())))
                .await?;
            state
        }
    };
    let mut batch: Vec<Change> = Vec::new();
    loop {
        let chats = store.chat_ids(state.after, 100).await?;
        let Some(&last_chat) = chats.last() else {
            break;
        };
        for chat in chats {
            let mut before = None;
            loop {
                let page = store.signals_before(chat, before, HISTORY_PAGE).await?;
                let Some(oldest) = page.last() else {
                    break;
                };
                before = Some(oldest.id);
                let full = page.len() == HISTORY_PAGE;
                state.messages += page.iter().filter(|s| s.text.is_some()).count() as u64;
                batch.extend(page.iter().map(Change::of_signal));
                if !full {
                    break;
                }
                if batch.len() >= HISTORY_PAGE * 4 {
                    // A long history: apply what was read, without moving past the chat.
                    search.apply(&batch, None).await?;
                    batch.clear();
                }
            }
            state.chats += 1;
            state.after = Some(chat);
            if batch.len() >= HISTORY_PAGE || chat == last_chat {
                search
                    .apply(&batch, Some((REINDEX_CHECKPOINT, &state.encode())))
                    .await?;
                batch.clear();
                progress(&ReindexProgress {
                    chats: state.chats,
                    messages: state.messages,
                    elapsed: started.elapsed(),
                });
            }
        }
    }
    // Replay what changed while the scan ran, then hand over to the indexers.
    let last = bus.last_seq().await?;
    let mut position = state.bus_from;
    while position < last {
        let up_to = last.min(position + 1_000);
        match bus.read(position, up_to, ChatFilter::All, 1_000).await {
            Ok(events) => {
                let changes = changes_of(store, &events, None).await?;
                search.apply(&changes, None).await?;
                position = up_to;
            }
            Err(ReadError::Expired(_) | ReadError::Unknown(_)) => {
                tracing::warn!(
                    from = state.bus_from,
                    "the event log no longer holds the changes made during the reindex; changes \
                     made while it ran may be missing until edited again"
                );
                position = last;
            }
            Err(ReadError::TooMany(n)) => {
                return Err(IndexError::Log(format!("more than {n} events in a batch")));
            }
            Err(ReadError::Bus(error)) => return Err(error.into()),
        }
    }
    search
        .apply(&[], Some((BUS_CHECKPOINT, &position.to_string())))
        .await?;
    state.done = true;
    search
        .apply(&[], Some((REINDEX_CHECKPOINT, &state.encode())))
        .await?;
    progress(&ReindexProgress {
        chats: state.chats,
        messages: state.messages,
        elapsed: started.elapsed(),
    });
    Ok(state)
}
