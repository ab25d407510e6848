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
//! before it was made, and the replay applies it after. Both index a message as the store holds it
//! when its event is read, not as the event carries it (`changes_of`).

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
                    let changes = changes_of(&*self.store, &events).await?;
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

/// What `events` change in the index, for the indexer and a reindex's replay alike. A message is
/// indexed as the store holds it now, not as its event carries it: an edit reads its signal back
/// after its write and publishes that, and a new message's event may be published late (the
/// outbox's sweep publishes one whose request failed after the write), so either event may reach
/// the log after a later edit's or the message's deletion, and would bring back what they
/// replaced (deleted text, kept nowhere else). One store read per batch, for its new and edited
/// messages.
async fn changes_of(store: &dyn Store, events: &[LoggedEvent]) -> Result<Vec<Change>, IndexError> {
    // Each message once, however many of its events the batch holds.
    let messages: Vec<(ChatId, SignalId)> = events
        .iter()
        .filter_map(|event| match &event.envelope.event {
            Event::SignalCreated(signal) | Event::SignalUpdated(signal) => {
                Some((signal.chat_id, signal.id))
            }
            _ => None,
        })
        .collect::<std::collections::HashSet<_>>()
        .into_iter()
        .collect();
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
            Event::SignalCreated(signal) | Event::SignalUpdated(signal) => {
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
                let changes = changes_of(store, &events).await?;
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
