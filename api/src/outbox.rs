//! The event outbox: what makes a stored change's event survive a crash or a long bus outage.
//!
//! Before a change with a durable event is written (a signal sent, edited or deleted; a reaction
//! added or removed; a marker moved; a member added, removed or given a role; a chat created or
//! changed), its api process (the *writer*) records the event it is about to make true in the
//! store's outbox, under its writer id and a ten-second
//! bucket. Once the bus acknowledges the event, the entry is removed; until then the writer retries
//! the publish. A writer records a heartbeat every `bus.outbox_sweep_interval_ms`, with the bucket
//! of its oldest entry that may still be in the store (it keeps them in memory: written and not
//! yet removed, or left in the store on purpose). Another api process (or the same store's next
//! process after a restart) that finds a writer silent for `bus.outbox_silent_after_ms` claims its
//! sweep, publishes every entry it left whose change is stored (read back from the store), removes
//! the entries and forgets the writer. The sweep reads the buckets from that oldest one to one
//! silence after the last heartbeat, not every bucket since the writer started: a writer that ran
//! for weeks leaves a few buckets to read, not every ten seconds of its life, each full of the
//! tombstones of its removals. A writer that stops cleanly with nothing left in the store forgets
//! itself instead ([`Outbox::retire`]): nobody reads its partitions at all.
//!
//! A live writer also looks at its own entries that its requests left behind: an entry whose
//! request ended (failed, or was cancelled) without settling it or handing it to a publish retry,
//! longer than that silence ago, belongs to a change that failed after its entry was written. The
//! change may be stored all the same (a deletion whose later steps failed, a write that timed out
//! and was applied), so if the store holds it, its event is published and the entry removed; if
//! not, the entry stays in the store for the sweep after the writer's death, since the write may
//! still land. An entry whose request is still running is never looked at, however long it runs:
//! that request settles it, or leaves it behind when it ends.
//!
//! Why nothing is lost: an entry exists before the change, and is removed only after the bus took
//! the event, or once the change is known not to be stored: by its own request (a nonce that
//! already has a signal, a reaction that did not change, an edit of a deleted message) or by a
//! silent writer's sweep. Its own writer's sweep waits for its request to end: a sweep that
//! published the change as stored before the request's own write landed, and removed the row,
//! would leave the newer event only in that request's memory. Why nothing is doubled: an entry's
//! envelope id is
//! the event's id (a signal's id for `signal.created`), so a publish by the sweeper that repeats
//! one the writer made before it died is dropped by the log within its duplicate window.
//! Why nothing phantom is published: the sweeper publishes the change as the store holds it, and
//! nothing for a change the store does not hold (the write failed, lost a race, or was undone
//! since: the undoing has its own entry). A late copy routes nobody who left the chat since.
//!
//! A member's removal is finished by its entry too: a removal the store holds is published only
//! once the chat is out of the member's own rows (`Store::forget_left_chat`), which a request that
//! stopped after the authoritative write may have left listing it.
//!
//! Not recorded: the ephemeral events (typing, presence, call signalling), and the pairing
//! events of circles and queues, whose chat a client finds in its chat list after a reset.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use confab_schema::event::{MemberChange, ReactionChange};
use confab_schema::{Chat, Envelope, Event, MemberRole, Signal, SignalId, UserId};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::ApiResult;
use crate::state::ApiState;
use crate::store::{MarkerKind, OutboxEntry, Store, StoreError};

/// The width of an outbox bucket, in milliseconds.
pub const BUCKET_MS: i64 = 10_000;

/// How long a sweep claim holds, in seconds: a sweeper that dies leaves the writer to another.
const CLAIM_TTL_SECS: i32 = 600;

/// How long a writer waits after removing settled entries before it removes the next ones.
/// Under a steady stream of changes the removals of a tenth of a second go in one request; an
/// entry removed that much later costs nothing but, after a crash in between, a copy of its event
/// that the log drops.
const REMOVAL_PACE: Duration = Duration::from_millis(100);

/// How many of its own leftover entries a writer looks at per sweep.
const LEFTOVERS_PER_SWEEP: usize = 64;

/// How many sweeps try to publish one of a writer's own leftovers before leaving its row to the
/// sweep after the writer's death.
const LEFTOVER_ATTEMPTS: u32 = 5;

/// The outbox bucket of a time in milliseconds since the epoch.
pub fn bucket_of(ms: i64) -> i64 {
    ms.div_euclid(BUCKET_MS)
}

/// This process as a writer of outbox entries.
pub struct Outbox {
    writer: Uuid,
    /// The entries that may be in the store, for the heartbeat's oldest bucket.
    retained: Arc<std::sync::Mutex<Retained>>,
    /// Set once the first heartbeat is stored: a writer must be on record before its first entry,
    /// or no sweeper would look for its entries.
    registered: tokio::sync::OnceCell<()>,
    /// Entries settled and not yet removed: gathered while a removal is in flight, so that under
    /// load one request removes many (see [`Outbox::settle`]).
    settled: Arc<std::sync::Mutex<Settled>>,
    /// Every entry written and neither settled nor handed to a publish retry, in the order
    /// written: what this writer's own sweep looks at once its request has ended (see
    /// [`ApiState::sweep_outbox`]). Held in memory, so the sweep never reads the store's
    /// partitions of a live writer, which its removals fill with tombstones. Shared with each
    /// [`Intent`], which marks its entry left behind when its request drops it.
    unsettled: Arc<std::sync::Mutex<BTreeMap<u64, Unsettled>>>,
    next_intent: std::sync::atomic::AtomicU64,
}

/// An entry of this writer's that is not settled yet.
struct Unsettled {
    entry: OutboxEntry,
    /// When it was written (a monotonic clock: a step of the wall clock does not reorder it).
    written: std::time::Instant,
    /// When its request ended without settling it: only then may this writer's sweep look at it.
    left_behind: Option<std::time::Instant>,
    /// Sweeps that failed to publish it.
    failures: u32,
}

/// The entries of this writer that may be in the store.
#[derive(Default)]
struct Retained {
    /// (bucket, id) of each entry written and neither removed nor left to the sweep.
    entries: std::collections::BTreeSet<(i64, Uuid)>,
    /// Those of `entries` whose removal failed: each sweep tries them again.
    unremoved: std::collections::BTreeSet<(i64, Uuid)>,
    /// The oldest bucket of an entry left in the store: its write failed (it may or may not be
    /// there), or it is kept for the sweep after this writer's death.
    left_from: Option<i64>,
    /// The latest start a heartbeat may have recorded, in buckets: no entry is written in an
    /// earlier bucket, even when the wall clock steps back.
    floor: i64,
    /// Set once the writer is retired (see [`Outbox::retire`]): no entry is written after.
    retired: bool,
    /// Woken when the last entry is removed, for [`Outbox::retire`].
    emptied: Arc<tokio::sync::Notify>,
}

impl Retained {
    /// Notes an entry about to be written at `now_ms`, and answers its bucket. The bucket is
    /// taken under the same lock as [`Retained::entries_from_ms`], so a heartbeat never names a
    /// bucket later than an entry it did not see.
    fn write(&mut self, now_ms: i64, id: Uuid) -> Option<i64> {
        if self.retired {
            return None;
        }
        let bucket = bucket_of(now_ms).max(self.floor);
        self.entries.insert((bucket, id));
        Some(bucket)
    }

    /// The entries were removed from the store.
    fn removed(&mut self, bucket: i64, ids: &[Uuid]) {
        for id in ids {
            self.entries.remove(&(bucket, *id));
            self.unremoved.remove(&(bucket, *id));
        }
        if self.entries.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Removing the entries failed: they are tried again, and hold the start until then.
    fn unremoved(&mut self, bucket: i64, ids: &[Uuid]) {
        for id in ids {
            if self.entries.contains(&(bucket, *id)) {
                self.unremoved.insert((bucket, *id));
            }
        }
    }

    /// The entries may stay in the store until the sweep after this writer's death.
    fn left(&mut self, bucket: i64, ids: &[Uuid]) {
        self.removed(bucket, ids);
        self.left_from = Some(self.left_from.map_or(bucket, |from| from.min(bucket)));
    }

    /// Where a sweep of this writer's entries must start, in milliseconds: its oldest entry that
    /// may be in the store, or now, one bucket early. Entries written after this answer go in
    /// that bucket or later (see `floor`).
    fn entries_from_ms(&mut self, now_ms: i64) -> i64 {
        let oldest = self
            .entries
            .first()
            .map(|(bucket, _)| *bucket)
            .into_iter()
            .chain(self.left_from)
            .fold(bucket_of(now_ms), i64::min);
        self.floor = self.floor.max(oldest - 1);
        (oldest - 1) * BUCKET_MS
    }
}

#[derive(Default)]
struct Settled {
    /// (bucket, id) of each entry to remove.
    entries: Vec<(i64, Uuid)>,
    /// Whether a task is removing entries now; it takes what gathers meanwhile.
    removing: bool,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            writer: Uuid::now_v7(),
            retained: Arc::default(),
            registered: tokio::sync::OnceCell::new(),
            settled: Arc::default(),
            unsettled: Arc::default(),
            next_intent: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// An event recorded in the outbox, to be removed once published (or once its change is known
/// not to be stored), held by the request that makes the change. Dropped without being settled
/// or handed to a retry (the request failed, or was cancelled), it marks its entry left behind,
/// for this writer's own sweep.
#[must_use = "an intent left alone stays in the outbox until a sweep"]
pub struct Intent {
    entry: IntentKey,
    /// The writer's unsettled entries; `None` once the intent is settled or handed over.
    unsettled: Option<Arc<std::sync::Mutex<BTreeMap<u64, Unsettled>>>>,
}

/// Which outbox entry an [`Intent`] is, once its request has handed it over.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntentKey {
    bucket: i64,
    id: Uuid,
    /// Its key among the writer's unsettled entries.
    key: u64,
}

impl Intent {
    /// The entry, from a request that settles it or hands it to a retry: no longer left behind
    /// when dropped.
    fn hand_over(mut self) -> IntentKey {
        self.unsettled = None;
        self.entry
    }
}

impl Drop for Intent {
    fn drop(&mut self) {
        if let Some(unsettled) = self.unsettled.take()
            && let Some(entry) = unsettled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_mut(&self.entry.key)
        {
            entry.left_behind = Some(std::time::Instant::now());
        }
    }
}

impl std::fmt::Debug for Intent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.entry.fmt(f)
    }
}

impl Outbox {
    pub fn writer(&self) -> Uuid {
        self.writer
    }

    /// Where a sweep of this writer's entries must start, for its heartbeat (see [`Retained`]).
    pub fn entries_from_ms(&self) -> i64 {
        self.retained_mut()
            .entries_from_ms(confab_runtime::presence::now_ms())
    }

    async fn register(&self, store: &dyn Store) -> Result<(), StoreError> {
        self.registered
            .get_or_try_init(|| async {
                store
                    .outbox_heartbeat(
                        self.writer,
                        self.entries_from_ms(),
                        confab_runtime::presence::now_ms(),
                    )
                    .await
            })
            .await
            .map(|_| ())
    }

    /// Records `envelope` before its change is stored, without a signal's text (see
    /// [`recorded_body`]).
    pub(crate) async fn intend(&self, store: &dyn Store, envelope: &Envelope) -> ApiResult<Intent> {
        self.register(store).await?;
        let body = recorded_body(envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let bucket = self
            .retained_mut()
            .write(confab_runtime::presence::now_ms(), envelope.id)
            .ok_or_else(|| StoreError::Unavailable("shutting down".into()))?;
        let key = IntentKey {
            bucket,
            id: envelope.id,
            key: self
                .next_intent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let entry = OutboxEntry {
            bucket: key.bucket,
            id: key.id,
            envelope: body,
        };
        if let Err(error) = store.outbox_put(self.writer, &entry).await {
            // It may have been written all the same.
            self.left(key.bucket, &[key.id]);
            return Err(error.into());
        }
        self.unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                key.key,
                Unsettled {
                    entry,
                    written: std::time::Instant::now(),
                    left_behind: None,
                    failures: 0,
                },
            );
        Ok(Intent {
            entry: key,
            unsettled: Some(Arc::clone(&self.unsettled)),
        })
    }

    /// Takes `intent` out of what this writer's own sweep looks at, and answers its entry: its
    /// request has handed it to a retry that settles it (see [`Outbox::settle_key`]).
    pub(crate) fn untrack(&self, intent: Intent) -> IntentKey {
        let key = intent.hand_over();
        self.untrack_key(key.key);
        key
    }

    fn untrack_key(&self, key: u64) {
        self.unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    fn removed(&self, bucket: i64, ids: &[Uuid]) {
        self.retained_mut().removed(bucket, ids);
    }

    fn left(&self, bucket: i64, ids: &[Uuid]) {
        self.retained_mut().left(bucket, ids);
    }

    fn retained_mut(&self) -> std::sync::MutexGuard<'_, Retained> {
        self.retained.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On a clean shutdown, once no request is left: waits up to `wait` until nothing this writer
    /// wrote may be in the store (every entry removed, none left on purpose), then refuses any
    /// further entry and forgets the writer, so that no sweep reads its partitions, which hold
    /// nothing but its removals' tombstones. Answers whether it did; otherwise the writer stays,
    /// and the sweep after its silence publishes what it left, as after a crash.
    pub(crate) async fn retire(
        &self,
        store: &dyn Store,
        wait: Duration,
    ) -> Result<bool, StoreError> {
        let deadline = tokio::time::Instant::now() + wait;
        let emptied = Arc::clone(&self.retained_mut().emptied);
        loop {
            // Listening before looking, so a removal between the two is not missed.
            let removed = emptied.notified();
            tokio::pin!(removed);
            removed.as_mut().enable();
            {
                let mut retained = self.retained_mut();
                // Entries left for the sweep stay in the store whatever happens next: no wait
                // can retire this writer.
                if retained.left_from.is_some() {
                    return Ok(false);
                }
                if retained.entries.is_empty() {
                    retained.retired = true;
                    break;
                }
            }
            // The last removals are in flight, at most one removal pace apart.
            if tokio::time::timeout_at(deadline, removed).await.is_err() {
                return Ok(false);
            }
        }
        if self.registered.initialized() {
            store.outbox_forget_writer(self.writer).await?;
        }
        Ok(true)
    }

    /// Tries again to remove the entries whose removal failed.
    async fn remove_again(&self, store: &dyn Store) {
        let unremoved: Vec<(i64, Uuid)> = self
            .retained_mut()
            .unremoved
            .iter()
            .take(LEFTOVERS_PER_SWEEP)
            .copied()
            .collect();
        for bucket in unremoved.chunk_by(|a, b| a.0 == b.0) {
            let ids: Vec<Uuid> = bucket.iter().map(|(_, id)| *id).collect();
            if store
                .outbox_remove(self.writer, bucket[0].0, &ids)
                .await
                .is_ok()
            {
                self.removed(bucket[0].0, &ids);
            }
        }
    }

    /// Removes an entry, in the background: a leftover is only published again by a sweep (and
    /// dropped by the log as a copy), never lost.
    ///
    /// One removal is in flight per process at a time, and the next starts [`REMOVAL_PACE`]
    /// after it: entries settled meanwhile go together, one request per bucket. A lone entry goes
    /// at once, and a steady stream of sends costs the store a few removals a second instead of
    /// one for every send or two.
    pub(crate) fn settle(&self, store: &Arc<dyn Store>, intent: Intent) {
        self.settle_key(store, intent.hand_over());
    }

    /// [`Outbox::settle`], for an entry already handed over by its request.
    pub(crate) fn settle_key(&self, store: &Arc<dyn Store>, intent: IntentKey) {
        self.untrack_key(intent.key);
        {
            let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
            settled.entries.push((intent.bucket, intent.id));
            if settled.removing {
                return;
            }
            settled.removing = true;
        }
        let store = Arc::clone(store);
        let settled = Arc::clone(&self.settled);
        let retained = Arc::clone(&self.retained);
        let writer = self.writer;
        tokio::spawn(async move {
            loop {
                let mut entries = {
                    let mut settled = settled.lock().unwrap_or_else(|e| e.into_inner());
                    if settled.entries.is_empty() {
                        settled.removing = false;
                        return;
                    }
                    std::mem::take(&mut settled.entries)
                };
                entries.sort_unstable();
                for bucket in entries.chunk_by(|a, b| a.0 == b.0) {
                    let ids: Vec<Uuid> = bucket.iter().map(|(_, id)| *id).collect();
                    let removal = store.outbox_remove(writer, bucket[0].0, &ids).await;
                    let mut retained = retained.lock().unwrap_or_else(|e| e.into_inner());
                    match removal {
                        Ok(()) => retained.removed(bucket[0].0, &ids),
                        Err(error) => {
                            retained.unremoved(bucket[0].0, &ids);
                            metrics::counter!("confab_outbox_remove_failures_total").increment(1);
                            tracing::debug!(%error, entries = ids.len(), "outbox entries not removed; a sweep will find them");
                        }
                    }
                }
                tokio::time::sleep(REMOVAL_PACE).await;
            }
        });
    }
}

/// An envelope as its outbox entry keeps it: a signal's event without the signal's text. An entry
/// may wait in the store for the bus for a long time, and the message may be deleted meanwhile
/// (or edited, which makes the text it held no longer the message's): deleted text is kept
/// nowhere. Nothing needs it: a late publish reads the text from the store ([`stored_event`]).
fn recorded_body(envelope: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
    let textless = |signal: &Signal| Signal {
        text: None,
        ..signal.clone()
    };
    let event = match &envelope.event {
        Event::SignalCreated(signal) => Event::SignalCreated(textless(signal)),
        Event::SignalUpdated(signal) => Event::SignalUpdated(textless(signal)),
        Event::SignalDeleted(signal) => Event::SignalDeleted(textless(signal)),
        _ => return serde_json::to_vec(envelope),
    };
    serde_json::to_vec(&Envelope {
        id: envelope.id,
        at: envelope.at,
        chat_id: envelope.chat_id,
        joined: envelope.joined.clone(),
        left: envelope.left.clone(),
        event,
    })
}

/// How the sweeper runs.
#[derive(Clone, Copy, Debug)]
pub struct SweepSettings {
    /// How often to record this writer's heartbeat and look for silent writers.
    pub interval: Duration,
    /// How long a writer may be silent before it is swept.
    pub silent_after: Duration,
}

impl ApiState {
    /// This process's id as a writer of outbox entries.
    pub fn outbox_writer(&self) -> Uuid {
        self.outbox.writer()
    }

    /// See [`Outbox::retire`]: called once the server has drained its requests and stopped its
    /// workers (the outbox sweeper among them, whose heartbeat would record the writer again).
    pub async fn retire_outbox(&self, wait: Duration) -> ApiResult<bool> {
        Ok(self.outbox.retire(&*self.store, wait).await?)
    }

    /// Where a sweep of this process's outbox entries would start now (its heartbeat's value).
    pub fn outbox_entries_from_ms(&self) -> i64 {
        self.outbox.entries_from_ms()
    }

    /// Records this writer alive, then publishes what silent writers left in the outbox, and what
    /// this writer itself left unsettled for longer than one silence. Answers how many events it
    /// published.
    pub async fn sweep_outbox(&self, settings: SweepSettings) -> ApiResult<usize> {
        // This writer's own leftovers do not wait on the other writers' sweep, which may fail.
        let silent_writers = self.sweep_silent_writers(settings).await;
        self.outbox.remove_again(&*self.store).await;
        let own = self.sweep_own_leftovers(settings.silent_after).await;
        Ok(silent_writers? + own)
    }

    /// Records this writer alive, then publishes what silent writers left in the outbox.
    async fn sweep_silent_writers(&self, settings: SweepSettings) -> ApiResult<usize> {
        let now = confab_runtime::presence::now_ms();
        let outbox = &self.outbox;
        self.store
            .outbox_heartbeat(outbox.writer, outbox.entries_from_ms(), now)
            .await?;
        let mut beat_ms = now;
        let silent_after = i64::try_from(settings.silent_after.as_millis()).unwrap_or(i64::MAX);
        let mut published = 0;
        for silent in self.store.outbox_writers().await? {
            if silent.writer == outbox.writer || silent.seen_ms > now - silent_after {
                continue;
            }
            if !self
                .store
                .outbox_claim(silent.writer, outbox.writer, CLAIM_TTL_SECS)
                .await?
            {
                continue;
            }
            // A writer may have written until one silence after its last heartbeat.
            let last = bucket_of(silent.seen_ms.saturating_add(silent_after)).min(bucket_of(now));
            let entries = self
                .store
                .outbox_entries(silent.writer, bucket_of(silent.entries_from_ms), last)
                .await?;
            tracing::info!(writer = %silent.writer, entries = entries.len(), "sweeping the outbox of a silent api process");
            for entry in entries {
                // A long sweep (a backlog after an outage) beats on as it goes: else this writer
                // falls silent to the others, which would sweep its live entries, publishing
                // changes its requests have not finished writing.
                let now = confab_runtime::presence::now_ms();
                if now - beat_ms > silent_after / 4 {
                    // A beat that fails stops no sweep: the next is tried a little later.
                    match self
                        .store
                        .outbox_heartbeat(outbox.writer, outbox.entries_from_ms(), now)
                        .await
                    {
                        Ok(()) => beat_ms = now,
                        Err(error) => {
                            tracing::warn!(%error, "a heartbeat during a sweep failed");
                        }
                    }
                }
                if self.republish(&entry).await? {
                    published += 1;
                }
                self.store
                    .outbox_remove(silent.writer, entry.bucket, &[entry.id])
                    .await?;
            }
            self.store.outbox_forget_writer(silent.writer).await?;
        }
        Ok(published)
    }

    /// This writer's own entries that their requests left behind more than `silent_after` ago
    /// (see the module's documentation), oldest first, at most [`LEFTOVERS_PER_SWEEP`]. An entry
    /// whose request is still running is not looked at.
    /// One whose change the store holds is published and removed. One whose change it does not
    /// hold is no longer looked at, and its row stays for the sweep after this writer's death.
    /// Nothing is tried while the bus is down.
    async fn sweep_own_leftovers(&self, silent_after: Duration) -> usize {
        let outbox = &self.outbox;
        let Some(written_before) = std::time::Instant::now().checked_sub(silent_after) else {
            return 0;
        };
        let leftovers: Vec<(u64, OutboxEntry)> = outbox
            .unsettled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .take_while(|(_, unsettled)| unsettled.written < written_before)
            .filter(|(_, unsettled)| {
                unsettled
                    .left_behind
                    .is_some_and(|left| left < written_before)
            })
            .take(LEFTOVERS_PER_SWEEP)
            .map(|(key, unsettled)| (*key, unsettled.entry.clone()))
            .collect();
        if leftovers.is_empty() || self.bus.check().await.is_err() {
            return 0;
        }
        let mut published = 0;
        for (key, entry) in leftovers {
            match self.republish(&entry).await {
                Ok(true) => {
                    published += 1;
                    match self
                        .store
                        .outbox_remove(outbox.writer, entry.bucket, &[entry.id])
                        .await
                    {
                        Ok(()) => outbox.removed(entry.bucket, &[entry.id]),
                        Err(error) => {
                            outbox.retained_mut().unremoved(entry.bucket, &[entry.id]);
                            tracing::debug!(%error, id = %entry.id, "a published outbox leftover was not removed; a sweep will find it");
                        }
                    }
                }
                // Its change may still be stored (a write that timed out may land): the row stays
                // for the sweep after this writer's death.
                Ok(false) => outbox.left(entry.bucket, &[entry.id]),
                Err(error) => {
                    let given_up = outbox
                        .unsettled
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_mut(&key)
                        .is_some_and(|leftover| {
                            leftover.failures += 1;
                            leftover.failures >= LEFTOVER_ATTEMPTS
                        });
                    if given_up {
                        // Its row stays for the sweep after this writer's death; it no longer
                        // holds up the newer leftovers.
                        outbox.untrack_key(key);
                        outbox.left(entry.bucket, &[entry.id]);
                    }
                    tracing::warn!(%error, id = %entry.id, given_up, "an outbox leftover was not published");
                    continue;
                }
            }
            outbox.untrack_key(key);
        }
        if published > 0 {
            metrics::counter!("confab_outbox_leftovers_published_total")
                .increment(published as u64);
        }
        published
    }

    /// Publishes an entry's event as the store holds its change now; `false` when the change is
    /// not stored (or is superseded) and nothing was published. Fails when the bus refuses, so
    /// the entry stays for the next sweep.
    async fn republish(&self, entry: &OutboxEntry) -> ApiResult<bool> {
        let Ok(envelope) = serde_json::from_slice::<Envelope>(&entry.envelope) else {
            metrics::counter!("confab_outbox_unreadable_total").increment(1);
            tracing::warn!(id = %entry.id, "unreadable outbox entry dropped");
            return Ok(false);
        };
        self.publish_as_stored(envelope).await
    }

    /// Publishes `envelope`'s event as the store holds its change now (see
    /// [`ApiState::republish`]): what a late publish sends, whether a sweep's or a request's
    /// retry, so that it never undoes what was stored and published since (a removal after the
    /// join it announces, a deletion after the edit). `false` when nothing was published. The
    /// store read before the publish may be overtaken by a change published first, so the
    /// publish has the last word checked after it ([`ApiState::have_the_last_word`]).
    pub(crate) async fn publish_as_stored(&self, envelope: Envelope) -> ApiResult<bool> {
        let Some(published) = self.publish_stored(envelope).await? else {
            return Ok(false);
        };
        self.have_the_last_word(published).await;
        Ok(true)
    }

    /// [`ApiState::publish_as_stored`] without the check after it: the envelope published, if
    /// any.
    pub(crate) async fn publish_stored(
        &self,
        mut envelope: Envelope,
    ) -> ApiResult<Option<Envelope>> {
        if !envelope.joined.is_empty() {
            // Whoever left since must not be routed this chat's events again by a late copy.
            let members: HashSet<UserId> = self
                .store
                .members(envelope.chat_id)
                .await?
                .into_iter()
                .map(|member| member.user_id)
                .collect();
            envelope.joined.retain(|user| members.contains(user));
        }
        let held = self.held(&envelope).await?;
        let Some(event) = stored_event(&envelope.event, held) else {
            return Ok(None);
        };
        if let Event::MemberJoined(change) = &event {
            // Likewise an addition may have stopped before it listed the chat in the member's
            // own rows: their streams, searches and chat list would not know the chat.
            self.store
                .restore_joined_chat(envelope.chat_id, change.user_id)
                .await?;
        }
        if let Event::MemberLeft(change) = &event {
            // The removal is stored, but its request may have stopped before it took the chat
            // out of the member's own rows (on CQL a second write, after the conditional one),
            // and no retry can: the member is gone. Done here, before the event, so a failure
            // keeps the entry for the next sweep.
            self.store
                .forget_left_chat(envelope.chat_id, change.user_id)
                .await?;
            // Nor may it have taken back their pushes of the chat (a request withdraws them
            // after its writes): in the background, so that a push queue that fails holds back
            // neither this event, which stops their streams, nor a sweep's other entries.
            self.withdraw_pushes_of_leavers(envelope.chat_id, vec![change.user_id]);
        }
        if let Event::SignalDeleted(deleted) = &event {
            // Nor the deleted message's pushes (its request withdraws them after its publish): a
            // notification showing deleted text must not stay on anyone's screen. Taking the
            // message out of a push again changes nothing.
            self.withdraw_pushes(deleted);
        }
        let event = match event {
            Event::SignalUpdated(mut signal) => {
                self.resolve_attachments(std::slice::from_mut(&mut signal))
                    .await?;
                Event::SignalUpdated(signal)
            }
            other => other,
        };
        let envelope = Envelope { event, ..envelope };
        self.bus
            .publish(&envelope)
            .await
            .map_err(crate::error::ApiError::from)?;
        metrics::counter!("confab_outbox_republished_total").increment(1);
        Ok(Some(envelope))
    }

    /// Sweeps every `settings.interval` until `shutdown`.
    pub fn start_outbox_sweeper(
        self,
        settings: SweepSettings,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(error) = self.sweep_outbox(settings).await {
                    metrics::counter!("confab_outbox_sweep_failures_total").increment(1);
                    tracing::warn!(%error, "outbox sweep failed; trying again");
                }
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(settings.interval) => {}
                }
            }
        })
    }
}

/// What the store holds now of the change an outbox entry's event announces.
#[derive(Debug)]
enum Held {
    /// The signal as stored, if it is.
    Signal(Option<Signal>),
    /// Whether the reaction is stored, and its emoji's count.
    Reaction { stored: bool, count: i64 },
    /// The member's marker of that kind, if any.
    Marker(Option<SignalId>),
    /// The member's role, if they are one.
    Member(Option<MemberRole>),
    /// The chat as stored, if it is.
    Chat(Option<Chat>),
    /// An event no stored change stands behind (never recorded in the outbox).
    Nothing,
}

impl ApiState {
    /// Reads what the store holds of the change `envelope` announces.
    async fn held(&self, envelope: &Envelope) -> ApiResult<Held> {
        let chat = envelope.chat_id;
        Ok(match &envelope.event {
            Event::SignalCreated(signal)
            | Event::SignalUpdated(signal)
            | Event::SignalDeleted(signal) => {
                Held::Signal(self.store.get_signal(signal.chat_id, signal.id).await?)
            }
            Event::ReactionAdded(change) | Event::ReactionRemoved(change) => {
                let stored = self
                    .store
                    .has_reaction(chat, change.signal_id, &change.emoji, change.user_id)
                    .await?;
                let count = self
                    .store
                    .reaction_counts(chat, change.signal_id)
                    .await?
                    .get(&change.emoji)
                    .copied()
                    .unwrap_or(0);
                Held::Reaction { stored, count }
            }
            Event::ReadUpdated(change) => Held::Marker(
                self.store
                    .marker(MarkerKind::Read, chat, change.user_id)
                    .await?,
            ),
            Event::DeliveredUpdated(change) => Held::Marker(
                self.store
                    .marker(MarkerKind::Delivered, chat, change.user_id)
                    .await?,
            ),
            Event::MemberJoined(change)
            | Event::MemberLeft(change)
            | Event::MemberUpdated(change) => {
                Held::Member(self.store.member_role(chat, change.user_id).await?)
            }
            Event::ChatUpdated(_) => Held::Chat(self.store.get_chat(chat).await?),
            _ => Held::Nothing,
        })
    }
}

/// The event to publish for an outbox entry, given what the store holds of its change now:
/// `None` when the change is not stored (the write failed, lost a race, or was undone since,
/// and the undoing has its own event).
fn stored_event(intended: &Event, held: Held) -> Option<Event> {
    match (intended, held) {
        (Event::SignalCreated(sent), Held::Signal(Some(stored))) => {
            // The entry named this signal id: stored means this send won (or was alone). Its
            // text as stored now: an edit since was published first, and a late `created` with
            // the text as sent would undo it for whoever applies events in order (the search
            // index does). The attachments stay as sent, with their metadata.
            Some(Event::SignalCreated(Signal {
                reactions: Default::default(),
                ..if stored.deleted {
                    stored
                } else {
                    Signal {
                        text: stored.text,
                        edited_at: stored.edited_at,
                        ..sent.clone()
                    }
                }
            }))
        }
        // An edit of a message deleted since: the deletion's event tells the truth. An edit whose
        // write has not landed (its writer is alive, only slow to beat): the message holds an
        // older edit, whose own event told it, and this one's id must stay free for the writer's
        // publish of the text it writes (the log keeps the first of an id).
        (Event::SignalUpdated(intended), Held::Signal(Some(stored)))
            if !stored.deleted
                && stored.edited_at.is_some()
                && stored.edited_at >= intended.edited_at =>
        {
            Some(Event::SignalUpdated(stored))
        }
        (Event::SignalDeleted(_), Held::Signal(Some(stored))) if stored.deleted => {
            Some(Event::SignalDeleted(Signal {
                attachments: Vec::new(),
                ..stored
            }))
        }
        (
            Event::ReactionAdded(change),
            Held::Reaction {
                stored: true,
                count,
            },
        ) => Some(Event::ReactionAdded(ReactionChange {
            count,
            ..change.clone()
        })),
        (
            Event::ReactionRemoved(change),
            Held::Reaction {
                stored: false,
                count,
            },
        ) => Some(Event::ReactionRemoved(ReactionChange {
            count,
            ..change.clone()
        })),
        (Event::ReadUpdated(change), Held::Marker(Some(marker))) if marker >= change.up_to => {
            Some(Event::ReadUpdated(change.clone()))
        }
        (Event::DeliveredUpdated(change), Held::Marker(Some(marker))) if marker >= change.up_to => {
            Some(Event::DeliveredUpdated(change.clone()))
        }
        (Event::MemberJoined(change), Held::Member(Some(role))) => {
            Some(Event::MemberJoined(MemberChange {
                role: Some(role),
                ..change.clone()
            }))
        }
        (Event::MemberLeft(change), Held::Member(None)) => Some(Event::MemberLeft(change.clone())),
        (Event::MemberUpdated(change), Held::Member(Some(role))) if change.role == Some(role) => {
            Some(Event::MemberUpdated(change.clone()))
        }
        (Event::ChatUpdated(_), Held::Chat(Some(stored))) => {
            Some(Event::ChatUpdated(Box::new(stored)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use confab_schema::{ChatId, SignalId, SignalKind, UserId};

    use super::*;

    fn signal(text: &str) -> Signal {
        let id = SignalId::new();
        Signal {
            id,
            chat_id: ChatId::new(),
            kind: SignalKind::Message,
            author_id: UserId::from_subject("outbox", "author"),
            created_at: id.created_at().expect("v7"),
            nonce: None,
            text: Some(text.into()),
            reply_to: None,
            attachments: Vec::new(),
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        }
    }

    #[test]
    fn nothing_is_published_for_a_change_that_is_not_stored() {
        let sent = signal("never stored");
        for intended in [
            Event::SignalCreated(sent.clone()),
            Event::SignalUpdated(sent.clone()),
            Event::SignalDeleted(sent.clone()),
        ] {
            assert_eq!(stored_event(&intended, Held::Signal(None)), None);
        }
    }

    #[test]
    fn nothing_is_published_for_a_reaction_marker_or_membership_not_held() {
        let (signal, user) = (SignalId::new(), UserId::from_subject("outbox", "bob"));
        let reaction = ReactionChange {
            signal_id: signal,
            emoji: "👍".into(),
            user_id: user,
            count: 0,
        };
        let absent = || Held::Reaction {
            stored: false,
            count: 0,
        };
        let present = || Held::Reaction {
            stored: true,
            count: 2,
        };
        assert_eq!(
            stored_event(&Event::ReactionAdded(reaction.clone()), absent()),
            None
        );
        assert_eq!(
            stored_event(&Event::ReactionRemoved(reaction.clone()), present()),
            None
        );
        assert_eq!(
            stored_event(&Event::ReactionAdded(reaction.clone()), present()),
            Some(Event::ReactionAdded(ReactionChange {
                count: 2,
                ..reaction
            }))
        );
        let marker = confab_schema::event::MarkerChange {
            user_id: user,
            up_to: SignalId::new(),
        };
        assert_eq!(
            stored_event(
                &Event::ReadUpdated(marker.clone()),
                Held::Marker(Some(signal))
            ),
            None,
            "a marker that never got that far"
        );
        assert_eq!(
            stored_event(&Event::ReadUpdated(marker.clone()), Held::Marker(None)),
            None
        );
        let joined = MemberChange {
            user_id: user,
            role: Some(MemberRole::Member),
        };
        assert_eq!(
            stored_event(&Event::MemberJoined(joined.clone()), Held::Member(None)),
            None
        );
        assert_eq!(
            stored_event(
                &Event::MemberLeft(joined.clone()),
                Held::Member(Some(MemberRole::Member))
            ),
            None
        );
        assert_eq!(
            stored_event(
                &Event::MemberUpdated(joined.clone()),
                Held::Member(Some(MemberRole::Admin))
            ),
            None,
            "a role changed again since"
        );
    }

    /// A live writer slow to beat may be swept while its edit is on its way: the message holds
    /// an older edit, and publishing that under the new edit's id took the id from the writer's
    /// own publish (the log keeps the first of an id), so the new text was never announced.
    #[test]
    fn an_edit_not_landed_yet_is_not_published_with_an_older_edits_text() {
        let first = Signal {
            text: Some("first edit".into()),
            edited_at: Some(time::OffsetDateTime::from_unix_timestamp(1_000).unwrap()),
            ..signal("sent")
        };
        let intended = Event::SignalUpdated(Signal {
            text: None,
            edited_at: Some(time::OffsetDateTime::from_unix_timestamp(2_000).unwrap()),
            ..first.clone()
        });
        assert_eq!(
            stored_event(&intended, Held::Signal(Some(first.clone()))),
            None,
            "the older edit's text published as this edit"
        );
        let landed = Signal {
            text: Some("second edit".into()),
            edited_at: Some(time::OffsetDateTime::from_unix_timestamp(2_000).unwrap()),
            ..first
        };
        assert_eq!(
            stored_event(&intended, Held::Signal(Some(landed.clone()))),
            Some(Event::SignalUpdated(landed))
        );
    }

    #[test]
    fn the_event_tells_what_the_store_holds() {
        let sent = signal("hello");
        assert_eq!(
            stored_event(
                &Event::SignalCreated(sent.clone()),
                Held::Signal(Some(sent.clone()))
            ),
            Some(Event::SignalCreated(sent.clone()))
        );
        let edited = Signal {
            text: Some("hello, edited".into()),
            edited_at: Some(sent.created_at),
            ..sent.clone()
        };
        assert_eq!(
            stored_event(
                &Event::SignalUpdated(sent.clone()),
                Held::Signal(Some(edited.clone()))
            ),
            Some(Event::SignalUpdated(edited.clone()))
        );
        // A send published late, after an edit of it: the text as it is now.
        assert_eq!(
            stored_event(
                &Event::SignalCreated(sent.clone()),
                Held::Signal(Some(edited.clone()))
            ),
            Some(Event::SignalCreated(edited.clone()))
        );
        // The edit did not land (the store holds no edit): nothing to announce.
        assert_eq!(
            stored_event(
                &Event::SignalUpdated(sent.clone()),
                Held::Signal(Some(sent.clone()))
            ),
            None
        );
        let tombstone = Signal {
            text: None,
            deleted: true,
            ..edited.clone()
        };
        // An edit overtaken by a deletion, and a deletion that did not land, announce nothing.
        assert_eq!(
            stored_event(
                &Event::SignalUpdated(sent.clone()),
                Held::Signal(Some(tombstone.clone()))
            ),
            None
        );
        assert_eq!(
            stored_event(
                &Event::SignalDeleted(sent.clone()),
                Held::Signal(Some(edited))
            ),
            None
        );
        assert_eq!(
            stored_event(
                &Event::SignalDeleted(sent),
                Held::Signal(Some(tombstone.clone()))
            ),
            Some(Event::SignalDeleted(tombstone))
        );
    }

    const B: i64 = BUCKET_MS;

    #[test]
    fn a_sweep_starts_at_the_oldest_entry_that_may_be_in_the_store() {
        let now = 1_000 * B + 5;
        assert_eq!(
            Retained::default().entries_from_ms(now),
            999 * B,
            "none: now, one bucket early"
        );
        let mut retained = Retained::default();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        assert_eq!(retained.write(500 * B + 1, a), Some(500));
        assert_eq!(retained.write(700 * B, b), Some(700));
        assert_eq!(retained.write(700 * B + 9, c), Some(700));
        assert_eq!(retained.entries_from_ms(now), 499 * B);
        retained.removed(500, &[a]);
        assert_eq!(
            retained.entries_from_ms(now),
            699 * B,
            "a long-running writer's sweep does not start at its first entry"
        );
        retained.left(700, &[b]);
        retained.removed(700, &[c]);
        assert_eq!(
            retained.entries_from_ms(now),
            699 * B,
            "an entry left in the store holds the start"
        );
        retained.removed(700, &[b]);
        assert_eq!(retained.entries_from_ms(now), 699 * B, "left, not removed");
        let mut fresh = Retained::default();
        fresh.write(800 * B, a);
        fresh.removed(800, &[a]);
        assert_eq!(fresh.entries_from_ms(now), 999 * B, "all removed: now");
    }

    #[test]
    fn a_failed_removal_holds_the_start_until_it_is_removed_again() {
        let mut retained = Retained::default();
        let now = 1_000 * B;
        let id = Uuid::now_v7();
        retained.write(800 * B, id);
        retained.unremoved(800, &[id]);
        assert_eq!(retained.entries_from_ms(now), 799 * B);
        assert_eq!(retained.unremoved.len(), 1, "to be tried again");
        retained.removed(800, &[id]);
        assert!(retained.unremoved.is_empty());
        assert_eq!(
            retained.entries_from_ms(now),
            999 * B,
            "not pinned for good"
        );
    }

    #[test]
    fn an_entry_never_goes_below_a_recorded_start_when_the_clock_steps_back() {
        let mut retained = Retained::default();
        assert_eq!(retained.entries_from_ms(1_000 * B), 999 * B);
        let bucket = retained
            .write(900 * B, Uuid::now_v7())
            .expect("not retired");
        assert_eq!(
            bucket, 999,
            "written where the last heartbeat's sweep starts"
        );
        assert_eq!(
            retained.entries_from_ms(900 * B),
            899 * B,
            "from the clock's bucket now"
        );
    }

    /// An embedded store in a temporary directory (kept as long as the directory).
    fn embedded_store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("store.sqlite3"))
            .expect("store");
        (dir, Arc::new(store))
    }

    /// The wiring of [`Retained`]: an entry holds the sweep's start from its write until its
    /// removal is done.
    #[tokio::test]
    async fn an_entry_holds_the_sweeps_start_until_it_is_removed() {
        let (_dir, store) = embedded_store();
        let outbox = Outbox::default();
        let envelope = Envelope::signal_created(signal("held"));
        let intent = outbox.intend(&*store, &envelope).await.expect("written");
        let bucket = intent.entry.bucket;
        let held = |outbox: &Outbox| {
            outbox
                .retained
                .lock()
                .expect("lock")
                .entries
                .contains(&(bucket, envelope.id))
        };
        assert!(held(&outbox), "written: it holds the start");
        outbox.settle(&store, intent);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while held(&outbox) {
            assert!(std::time::Instant::now() < deadline, "never removed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            store
                .outbox_entries(outbox.writer(), bucket, bucket)
                .await
                .expect("reads"),
            Vec::new(),
            "released only once removed from the store"
        );
        let left_from = outbox.retained.lock().expect("lock").left_from;
        assert_eq!(left_from, None);
    }

    /// A writer retires only once nothing of it may be in the store: then it is forgotten (no
    /// sweep reads its partitions) and writes nothing more.
    #[tokio::test]
    async fn a_writer_retires_once_its_entries_are_removed() {
        let (_dir, store) = embedded_store();
        let outbox = Outbox::default();
        let listed = |writers: Vec<crate::store::OutboxWriter>| {
            writers.iter().any(|w| w.writer == outbox.writer())
        };
        let intent = outbox
            .intend(&*store, &Envelope::signal_created(signal("pending")))
            .await
            .expect("written");
        assert!(listed(store.outbox_writers().await.expect("reads")));

        // An entry is in the store: the writer stays for the sweep after its silence.
        assert!(
            !outbox
                .retire(&*store, Duration::ZERO)
                .await
                .expect("answers")
        );
        assert!(listed(store.outbox_writers().await.expect("reads")));

        outbox.settle(&store, intent);
        assert!(
            outbox
                .retire(&*store, Duration::from_secs(10))
                .await
                .expect("answers"),
            "the entry's removal was done within the wait"
        );
        assert!(!listed(store.outbox_writers().await.expect("reads")));
        assert!(
            outbox
                .intend(&*store, &Envelope::signal_created(signal("late")))
                .await
                .is_err(),
            "a retired writer writes nothing it would not be swept for"
        );
    }
}
