//! [`CachedBlobs`]: small objects kept in memory in front of another [`Blobs`].
//!
//! Objects are named by the SHA-256 of their bytes and never change, so a cached copy can never be
//! stale: the only question is which ones to keep. A chat attachment is read by every member soon
//! after it is sent, and thumbnails on every scroll, so the cache keeps what was just written or
//! read again, up to a byte budget, and drops the least recently used first. Only objects up to a
//! size limit are kept; larger ones stream from the storage as before. Readers that miss the same
//! object at the same time share one read from the storage, which streams to the first of them
//! as it arrives (a cold read is not held back until the whole object is in).
//!
//! An object's first read from the storage is passed through as it is, neither copied nor hashed
//! nor kept, unless [`CacheLimits::keeps_first_reads`]: keeping costs a copy and a hash of the
//! whole object on the reader's path (measured in `docs/BENCHMARKS.md`), which only pays when the
//! object is read again, and an object read once (an attachment opened by its
//! one recipient on this node) would push out ones read often. A second read of an object, or a
//! read while its first is still streaming (a picture fetched by a whole group at once), is made
//! as a shared read and kept (a "doorkeeper" in front of the LRU, as in TinyLFU).
//!
//! A copy enters the cache only with its hash checked: a declared upload is checked by the storage
//! before it is made, a staged upload is named by the hash of the very bytes copied, and an object
//! read on a miss is hashed here before it is kept.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::{BlobError, BlobInfo, BlobName, BlobRead, Blobs, ByteChunks, Presentation, Staged};

/// How much a [`CachedBlobs`] keeps.
#[derive(Clone, Copy, Debug)]
pub struct CacheLimits {
    /// The bytes of all kept objects together.
    pub total_bytes: usize,
    /// The largest object kept.
    pub object_bytes: usize,
    /// Whether an object read from the storage is kept from its first read on, rather than from
    /// its second (see the module's documentation).
    pub keeps_first_reads: bool,
}

/// How many names of objects read once [`CachedBlobs`] remembers; it forgets them all when it
/// reaches this many (then an object read a second time is passed through once more). At about
/// 100 bytes a name, 1.6 MB at most.
const READ_ONCE_NAMES: usize = 16_384;

/// A [`Blobs`] that keeps small objects in memory (see the module's documentation).
pub struct CachedBlobs {
    inner: Arc<dyn Blobs>,
    limits: CacheLimits,
    kept: Arc<Mutex<Lru>>,
    /// Reads of objects not held, in flight: readers of the same object wait for one read
    /// from the storage instead of each making their own (a picture sent to a large group is
    /// fetched by every member at once).
    filling: Arc<Mutex<HashMap<BlobName, Arc<Fill>>>>,
    /// Objects read from the storage once and passed through, not kept (at most
    /// [`READ_ONCE_NAMES`]): their next miss keeps them.
    read_once: Mutex<HashSet<BlobName>>,
    /// Whole reads made from the storage on misses (tests).
    fills: AtomicU64,
    /// How long a shared read may go without a chunk from the storage ([`FILL_IDLE`]), and
    /// how long it may take in all ([`FILL_WHOLE`]).
    fill_idle: Duration,
    fill_whole: Duration,
}

/// How long a shared read of a small object may wait for the storage's next chunk before it
/// ends: the readers waiting for it then read on their own, and new misses start a new read,
/// rather than all waiting for a storage connection that stopped sending.
pub const FILL_IDLE: Duration = Duration::from_secs(20);

/// How long a shared read of a small object (at most `object_bytes`) may take in all, however
/// often the storage sends a little: the same end as [`FILL_IDLE`] for a connection that
/// trickles.
pub const FILL_WHOLE: Duration = Duration::from_secs(60);

/// One read of an object from the storage, shared by the misses that wait for it: `None` while it
/// is under way; then its bytes when it was small enough to keep and read whole, `Some(Ok(None))`
/// when each waiting reader is to read on its own (too large, or the storage's read failed or
/// ended short), or the storage's error.
type Fill = tokio::sync::watch::Sender<Option<Result<Option<Bytes>, SharedError>>>;

/// A [`BlobError`] of a shared read, for each of its readers.
#[derive(Clone, Debug)]
enum SharedError {
    NotFound,
    Unavailable(String),
}

impl From<&BlobError> for SharedError {
    fn from(error: &BlobError) -> Self {
        match error {
            BlobError::NotFound => SharedError::NotFound,
            other => SharedError::Unavailable(other.to_string()),
        }
    }
}

impl From<SharedError> for BlobError {
    fn from(error: SharedError) -> Self {
        match error {
            SharedError::NotFound => BlobError::NotFound,
            SharedError::Unavailable(message) => BlobError::Unavailable(message),
        }
    }
}

/// Objects by name, and their names by when they were last used.
#[derive(Default)]
struct Lru {
    objects: HashMap<BlobName, (Bytes, u64)>,
    by_use: BTreeMap<u64, BlobName>,
    held: usize,
    clock: u64,
}

impl Lru {
    fn get(&mut self, name: &BlobName) -> Option<Bytes> {
        let (bytes, used) = self.objects.get_mut(name)?;
        self.by_use.remove(used);
        self.clock += 1;
        *used = self.clock;
        self.by_use.insert(self.clock, name.clone());
        Some(bytes.clone())
    }

    fn insert(&mut self, name: BlobName, bytes: Bytes, limits: CacheLimits) {
        if bytes.len() > limits.object_bytes || bytes.len() > limits.total_bytes {
            return;
        }
        if self.get(&name).is_some() {
            return;
        }
        self.clock += 1;
        self.held += bytes.len();
        self.by_use.insert(self.clock, name.clone());
        self.objects.insert(name, (bytes, self.clock));
        while self.held > limits.total_bytes {
            let Some((_, oldest)) = self.by_use.pop_first() else {
                break;
            };
            if let Some((bytes, _)) = self.objects.remove(&oldest) {
                self.held -= bytes.len();
            }
        }
    }

    fn remove(&mut self, name: &BlobName) {
        if let Some((bytes, used)) = self.objects.remove(name) {
            self.by_use.remove(&used);
            self.held -= bytes.len();
        }
    }
}

impl CachedBlobs {
    pub fn new(inner: Arc<dyn Blobs>, limits: CacheLimits) -> CachedBlobs {
        CachedBlobs {
            inner,
            limits,
            kept: Arc::new(Mutex::new(Lru::default())),
            filling: Arc::new(Mutex::new(HashMap::new())),
            read_once: Mutex::new(HashSet::new()),
            fills: AtomicU64::new(0),
            fill_idle: FILL_IDLE,
            fill_whole: FILL_WHOLE,
        }
    }

    /// Ends a shared read after `idle` without a chunk from the storage, or after `whole` in
    /// all, instead of [`FILL_IDLE`] and [`FILL_WHOLE`].
    pub fn with_fill_limits(mut self, idle: Duration, whole: Duration) -> CachedBlobs {
        self.fill_idle = idle;
        self.fill_whole = whole;
        self
    }

    fn lru(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding the lock leaves the map consistent enough to keep serving: every
        // method either finishes its change or makes none that matters.
        self.kept
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lookup(&self, name: &BlobName) -> Option<Bytes> {
        let found = self.lru().get(name);
        let outcome = if found.is_some() { "hit" } else { "miss" };
        metrics::counter!("confab_blob_cache_lookups_total", "outcome" => outcome).increment(1);
        found
    }

    fn keep(&self, name: BlobName, bytes: Bytes) {
        self.lru().insert(name, bytes, self.limits);
    }

    /// Whether `name` is held now (tests).
    pub fn holds(&self, name: &BlobName) -> bool {
        self.lru().objects.contains_key(name)
    }

    /// Bytes held now (tests).
    pub fn held_bytes(&self) -> usize {
        self.lru().held
    }

    /// Whole reads made from the storage on misses so far (tests).
    pub fn fills(&self) -> u64 {
        self.fills.load(Ordering::Relaxed)
    }

    /// A read of `name` from the storage on a miss, shared with every other miss of it meanwhile.
    /// The reader that makes it gets the bytes as they arrive (a cold read is not held back
    /// until the whole object is in), while a copy is made and hashed on the way; a small object
    /// is kept once whole and true to its name, and the readers that waited get it from memory.
    /// A large one is only streamed, and every other reader makes its own read, as does each
    /// waiting reader when the storage's read failed before the end. The storage's read of a
    /// small object goes at the storage's pace, not the first reader's. `size` is the object's,
    /// when the caller knows it. An object's first read, with none in flight, is passed through
    /// instead (unless [`CacheLimits::keeps_first_reads`]).
    async fn fill(&self, name: &BlobName, size: Option<u64>) -> Result<BlobRead, BlobError> {
        let (fill, first) = {
            let mut filling = self
                .filling
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match filling.get(name) {
                Some(fill) => (Some(Arc::clone(fill)), false),
                // An object known to be too large to keep is not remembered: its reads are
                // never kept anyway.
                None if !self.limits.keeps_first_reads
                    && size.is_none_or(|size| size <= self.limits.object_bytes as u64)
                    && self.first_read(name) =>
                {
                    (None, true)
                }
                None => {
                    let fill = Arc::new(Fill::new(None));
                    filling.insert(name.clone(), Arc::clone(&fill));
                    (Some(fill), true)
                }
            }
        };
        let Some(fill) = fill else {
            metrics::counter!("confab_blob_cache_first_reads_total").increment(1);
            return self.read_underneath(name, size).await;
        };
        if !first {
            let mut outcome = fill.subscribe();
            let shared = outcome
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|outcome| outcome.clone());
            return match shared {
                Some(Ok(Some(bytes))) => Ok(whole(bytes)),
                Some(Err(error)) => Err(error.into()),
                _ => self.read_underneath(name, size).await,
            };
        }
        self.fills.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("confab_blob_cache_fills_total").increment(1);
        let mut ending = FillEnding {
            name: name.clone(),
            fill,
            filling: Arc::clone(&self.filling),
            ended: false,
        };
        let read = match self.read_underneath(name, size).await {
            Ok(read) => read,
            Err(error) => {
                ending.end(Err(SharedError::from(&error)));
                return Err(error);
            }
        };
        if read.len > self.limits.object_bytes as u64 {
            ending.end(Ok(None));
            return Ok(read);
        }
        let mut copy = FillCopy {
            name: name.clone(),
            len: read.len,
            bytes: BytesMut::with_capacity(read.len as usize),
            hash: Sha256::new(),
            kept: Arc::clone(&self.kept),
            limits: self.limits,
            ending,
        };
        // The storage's read is drained by a task of its own, not by this reader's client: the
        // readers waiting for the copy must not wait for a slow (or hostile) first reader that
        // takes a byte at a time. What the first reader has not taken yet waits in the channel,
        // at most the object, which is small (at most `object_bytes`); a first reader gone
        // mid-way leaves the copy to be made for the others.
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut from_storage = read.chunks;
        let idle = self.fill_idle;
        let ends_at = tokio::time::Instant::now() + self.fill_whole;
        tokio::spawn(async move {
            loop {
                let next_by = (tokio::time::Instant::now() + idle).min(ends_at);
                let chunk = match tokio::time::timeout_at(next_by, from_storage.next()).await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => return,
                    Err(_) => {
                        // The storage stopped sending, or trickles: nobody waits on this read any
                        // longer.
                        metrics::counter!("confab_blob_cache_fills_stalled_total").increment(1);
                        copy.ending.end(Ok(None));
                        let _ = sender.send(Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the storage stopped sending",
                        )));
                        return;
                    }
                };
                let failed = match &chunk {
                    Ok(chunk) => {
                        copy.extend(chunk);
                        false
                    }
                    Err(_) => {
                        copy.ending.end(Ok(None));
                        true
                    }
                };
                // The first reader may be gone: the copy goes on for the others.
                let _ = sender.send(chunk);
                if failed {
                    return;
                }
            }
        });
        Ok(BlobRead {
            chunks: tokio_stream::wrappers::UnboundedReceiverStream::new(receiver).boxed(),
            len: read.len,
        })
    }

    /// Whether this is the first miss of `name` remembered: it is remembered from now on.
    fn first_read(&self, name: &BlobName) -> bool {
        let mut read_once = self
            .read_once
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if read_once.remove(name) {
            return false;
        }
        if read_once.len() >= READ_ONCE_NAMES {
            read_once.clear();
        }
        read_once.insert(name.clone());
        true
    }

    async fn read_underneath(
        &self,
        name: &BlobName,
        size: Option<u64>,
    ) -> Result<BlobRead, BlobError> {
        match size {
            Some(size) => self.inner.get_sized(name, size, None).await,
            None => self.inner.get(name, None).await,
        }
    }
}

/// The end of a shared read ([`CachedBlobs::fill`]): out of the reads in flight, its outcome
/// handed to the readers waiting for it. Dropped before it ended (the storage's read ended
/// short), it tells them to read on their own.
struct FillEnding {
    name: BlobName,
    fill: Arc<Fill>,
    filling: Arc<Mutex<HashMap<BlobName, Arc<Fill>>>>,
    ended: bool,
}

impl FillEnding {
    fn end(&mut self, outcome: Result<Option<Bytes>, SharedError>) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        {
            // Out of the map first: the next miss (after an eviction) starts a new read.
            let mut filling = self
                .filling
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if filling
                .get(&self.name)
                .is_some_and(|f| Arc::ptr_eq(f, &self.fill))
            {
                filling.remove(&self.name);
            }
        }
        self.fill.send_replace(Some(outcome));
    }
}

impl Drop for FillEnding {
    fn drop(&mut self) {
        self.end(Ok(None));
    }
}

/// The copy of a small object a shared read makes while it streams to its first reader: kept,
/// and handed to the waiting readers, once all of it came and it hashes to its name.
struct FillCopy {
    name: BlobName,
    len: u64,
    bytes: BytesMut,
    hash: Sha256,
    kept: Arc<Mutex<Lru>>,
    limits: CacheLimits,
    ending: FillEnding,
}

impl FillCopy {
    fn extend(&mut self, chunk: &Bytes) {
        if self.ending.ended {
            return;
        }
        if self.bytes.len() as u64 + chunk.len() as u64 > self.len {
            tracing::warn!(object = %self.name, "an object is longer than its length; not cached");
            self.ending.end(Ok(None));
            return;
        }
        self.bytes.extend_from_slice(chunk);
        self.hash.update(chunk);
        if self.bytes.len() as u64 == self.len {
            let bytes = std::mem::take(&mut self.bytes).freeze();
            let digest: [u8; 32] = std::mem::take(&mut self.hash).finalize().into();
            if BlobName::from_digest(digest) == self.name {
                self.kept
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .insert(self.name.clone(), bytes.clone(), self.limits);
                self.ending.end(Ok(Some(bytes)));
            } else {
                tracing::warn!(object = %self.name, "an object's bytes do not hash to its name; not cached");
                self.ending.end(Ok(None));
            }
        }
    }
}

/// All of `bytes` as one read.
fn whole(bytes: Bytes) -> BlobRead {
    let len = bytes.len() as u64;
    BlobRead {
        chunks: futures::stream::once(std::future::ready(Ok(bytes))).boxed(),
        len,
    }
}

/// The bytes `range` of `bytes` as a read, or `None` when the range lies outside them.
pub(super) fn read_of(bytes: Bytes, range: Option<(u64, u64)>) -> Option<BlobRead> {
    let slice = match range {
        None => bytes,
        Some((start, end)) => {
            let start = usize::try_from(start).ok()?;
            let end = usize::try_from(end).ok()?;
            if start > end || end >= bytes.len() {
                return None;
            }
            bytes.slice(start..=end)
        }
    };
    let len = slice.len() as u64;
    Some(BlobRead {
        chunks: futures::stream::once(async move { Ok(slice) }).boxed(),
        len,
    })
}

/// Passes `body` through while copying it, until it is longer than `limit`.
fn copying(body: ByteChunks, limit: usize) -> (ByteChunks, Arc<Mutex<Option<BytesMut>>>) {
    let copy = Arc::new(Mutex::new(Some(BytesMut::new())));
    let sink = Arc::clone(&copy);
    let body = body
        .inspect(move |chunk| {
            let Ok(chunk) = chunk else { return };
            let mut sink = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(buffer) = sink.as_mut() {
                if buffer.len() + chunk.len() > limit {
                    *sink = None;
                } else {
                    buffer.extend_from_slice(chunk);
                }
            }
        })
        .boxed();
    (body, copy)
}

#[async_trait]
impl Blobs for CachedBlobs {
    async fn check(&self) -> Result<(), BlobError> {
        self.inner.check().await
    }

    async fn stage(
        &self,
        body: ByteChunks,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<Staged, BlobError> {
        let (body, copy) = copying(body, self.limits.object_bytes);
        let staged = self.inner.stage(body, length, max_bytes).await?;
        // `staged.name` is the hash of exactly the bytes copied, so the copy is right for that
        // name whether or not this upload is committed: objects never change under their name.
        let copied = copy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(bytes) = copied
            && bytes.len() as u64 == staged.size
        {
            self.keep(staged.name.clone(), Bytes::copy_from_slice(&bytes));
        }
        Ok(staged)
    }

    async fn commit(&self, staged: &Staged) -> Result<(), BlobError> {
        self.inner.commit(staged).await
    }

    async fn discard(&self, staged: &Staged) -> Result<(), BlobError> {
        self.inner.discard(staged).await
    }

    async fn put_declared(
        &self,
        body: ByteChunks,
        expected: &BlobName,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<u64, BlobError> {
        let (body, copy) = copying(body, self.limits.object_bytes);
        let size = self
            .inner
            .put_declared(body, expected, length, max_bytes)
            .await?;
        // The storage made (or found) the object only once the body hashed to `expected`.
        let copied = copy
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(bytes) = copied
            && bytes.len() as u64 == size
        {
            // A copy, not the growing buffer itself: that may hold up to twice its length.
            self.keep(expected.clone(), Bytes::copy_from_slice(&bytes));
        }
        Ok(size)
    }

    async fn put(&self, bytes: Bytes) -> Result<BlobName, BlobError> {
        let name = self.inner.put(bytes.clone()).await?;
        self.keep(name.clone(), Bytes::copy_from_slice(&bytes));
        Ok(name)
    }

    async fn size(&self, name: &BlobName) -> Result<Option<u64>, BlobError> {
        if let Some(bytes) = self.lru().get(name) {
            return Ok(Some(bytes.len() as u64));
        }
        self.inner.size(name).await
    }

    async fn get(&self, name: &BlobName, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        if let Some(read) = self.lookup(name).and_then(|bytes| read_of(bytes, range)) {
            return Ok(read);
        }
        match range {
            Some(_) => self.inner.get(name, range).await,
            None => self.fill(name, None).await,
        }
    }

    async fn get_sized(
        &self,
        name: &BlobName,
        size: u64,
        range: Option<(u64, u64)>,
    ) -> Result<BlobRead, BlobError> {
        if let Some(read) = self.lookup(name).and_then(|bytes| read_of(bytes, range)) {
            return Ok(read);
        }
        match range {
            Some(_) => self.inner.get_sized(name, size, range).await,
            None => self.fill(name, Some(size)).await,
        }
    }

    async fn presign(
        &self,
        name: &BlobName,
        ttl: Duration,
        presentation: &Presentation,
    ) -> Result<Option<String>, BlobError> {
        self.inner.presign(name, ttl, presentation).await
    }

    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError> {
        self.inner.list(after, limit).await
    }

    async fn delete(&self, name: &BlobName) -> Result<(), BlobError> {
        self.lru().remove(name);
        let deleted = self.inner.delete(name).await;
        // Again after: a read that missed before the deletion may have kept it meanwhile. (Its
        // bytes would still be right; objects never change under their name.)
        self.lru().remove(name);
        deleted
    }

    async fn sweep_staging(&self, age: Duration) -> Result<u64, BlobError> {
        self.inner.sweep_staging(age).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blobs::LocalBlobs;

    /// Limits that keep an object from its first read on, for the tests of the shared read.
    fn limits(total_bytes: usize, object_bytes: usize) -> CacheLimits {
        CacheLimits {
            total_bytes,
            object_bytes,
            keeps_first_reads: true,
        }
    }

    fn body(bytes: &[u8]) -> ByteChunks {
        let chunks: Vec<Result<Bytes, std::io::Error>> = bytes
            .chunks(100)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(chunks).boxed()
    }

    async fn read_all(read: BlobRead) -> Vec<u8> {
        let mut all = Vec::new();
        let mut chunks = read.chunks;
        while let Some(chunk) = chunks.next().await {
            all.extend_from_slice(&chunk.expect("reads"));
        }
        all
    }

    /// A cache over a directory whose files the test can remove behind its back.
    fn cached(dir: &std::path::Path, limits: CacheLimits) -> CachedBlobs {
        CachedBlobs::new(Arc::new(LocalBlobs::open(dir).expect("opens")), limits)
    }

    /// Removes the object from the storage underneath only.
    async fn remove_underneath(dir: &std::path::Path, name: &BlobName) {
        LocalBlobs::open(dir)
            .expect("opens")
            .delete(name)
            .await
            .expect("deletes");
    }

    #[tokio::test]
    async fn a_declared_upload_is_served_from_memory_afterwards_whole_and_in_parts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = cached(dir.path(), limits(10_000, 5_000));
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let name = BlobName::of(&bytes);
        let size = blobs
            .put_declared(body(&bytes), &name, None, 1 << 20)
            .await
            .expect("stored");
        assert_eq!(size, 3000);
        remove_underneath(dir.path(), &name).await;
        let whole = blobs.get(&name, None).await.expect("served from memory");
        assert_eq!(whole.len, 3000);
        assert_eq!(read_all(whole).await, bytes);
        let part = blobs.get(&name, Some((10, 19))).await.expect("a part");
        assert_eq!(part.len, 10);
        assert_eq!(read_all(part).await, bytes[10..=19]);
        // A range past the end is the storage's to answer (here: the object is gone there).
        assert!(matches!(
            blobs.get(&name, Some((10, 3000))).await,
            Err(BlobError::NotFound)
        ));
        blobs.delete(&name).await.expect("deletes");
        assert!(matches!(
            blobs.get(&name, None).await,
            Err(BlobError::NotFound)
        ));
    }

    #[tokio::test]
    async fn a_staged_upload_is_served_from_memory_once_committed_and_a_large_one_is_not_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = cached(dir.path(), limits(10_000, 5_000));
        let bytes: Vec<u8> = (0..4000u32).map(|i| (i % 241) as u8).collect();
        let staged = blobs
            .stage(body(&bytes), None, 1 << 20)
            .await
            .expect("staged");
        assert_eq!(staged.name, BlobName::of(&bytes));
        blobs.commit(&staged).await.expect("committed");
        remove_underneath(dir.path(), &staged.name).await;
        let whole = blobs
            .get(&staged.name, None)
            .await
            .expect("served from memory");
        assert_eq!(read_all(whole).await, bytes);
        let large = vec![9u8; 6000];
        let staged = blobs
            .stage(body(&large), None, 1 << 20)
            .await
            .expect("staged");
        blobs.commit(&staged).await.expect("committed");
        assert!(!blobs.holds(&staged.name), "larger than the object limit");
        assert_eq!(blobs.held_bytes(), 4000);
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_object_share_one_read_from_the_storage() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let small: Vec<u8> = (0..3000u32).map(|i| (i % 239) as u8).collect();
        let large = vec![5u8; 6000];
        let small_name = storage.put(Bytes::from(small.clone())).await.expect("put");
        let large_name = storage.put(Bytes::from(large.clone())).await.expect("put");
        let blobs = cached(dir.path(), limits(10_000, 5_000));
        let reads =
            futures::future::join_all((0..16).map(|_| async {
                read_all(blobs.get(&small_name, None).await.expect("reads")).await
            }))
            .await;
        assert!(reads.iter().all(|read| *read == small));
        assert_eq!(
            blobs.fills(),
            1,
            "sixteen readers, one read from the storage"
        );
        assert!(blobs.holds(&small_name));
        // Too large to keep: every reader gets the whole object, streamed.
        let reads =
            futures::future::join_all((0..4).map(|_| async {
                read_all(blobs.get(&large_name, None).await.expect("reads")).await
            }))
            .await;
        assert!(reads.iter().all(|read| *read == large));
        assert!(!blobs.holds(&large_name));
        // Missing: every reader is told so.
        let missing = BlobName::of(b"never stored");
        let answers = futures::future::join_all((0..4).map(|_| blobs.get(&missing, None))).await;
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(BlobError::NotFound)))
        );
        // Nothing stays in flight.
        assert!(blobs.filling.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_mismatched_or_oversized_upload_is_not_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let blobs = cached(dir.path(), limits(10_000, 5_000));
        let bytes = vec![7u8; 2000];
        let wrong = BlobName::of(b"something else");
        assert!(matches!(
            blobs
                .put_declared(body(&bytes), &wrong, None, 1 << 20)
                .await,
            Err(BlobError::Mismatch(_))
        ));
        assert!(!blobs.holds(&wrong) && !blobs.holds(&BlobName::of(&bytes)));
        let large = vec![8u8; 6000];
        let name = BlobName::of(&large);
        blobs
            .put_declared(body(&large), &name, None, 1 << 20)
            .await
            .expect("stored");
        assert!(!blobs.holds(&name), "larger than the object limit");
        assert_eq!(blobs.held_bytes(), 0);
        let read = blobs.get(&name, None).await.expect("streams from storage");
        assert_eq!(read_all(read).await, large);
        assert!(!blobs.holds(&name));
    }

    /// The local storage, except that the reads it answers give their first 100 bytes at once
    /// and the rest only once the test lets them go (a storage still sending).
    struct Trickling {
        inner: LocalBlobs,
        rest: tokio::sync::watch::Sender<bool>,
        /// With `Some`, the rest comes a byte at a time at that pace instead, without waiting
        /// for `rest` (a storage connection that trickles).
        drip: Option<Duration>,
    }

    #[async_trait]
    impl Blobs for Trickling {
        async fn check(&self) -> Result<(), BlobError> {
            self.inner.check().await
        }
        async fn stage(
            &self,
            body: ByteChunks,
            length: Option<u64>,
            max_bytes: u64,
        ) -> Result<Staged, BlobError> {
            self.inner.stage(body, length, max_bytes).await
        }
        async fn commit(&self, staged: &Staged) -> Result<(), BlobError> {
            self.inner.commit(staged).await
        }
        async fn discard(&self, staged: &Staged) -> Result<(), BlobError> {
            self.inner.discard(staged).await
        }
        async fn put(&self, bytes: Bytes) -> Result<BlobName, BlobError> {
            self.inner.put(bytes).await
        }
        async fn size(&self, name: &BlobName) -> Result<Option<u64>, BlobError> {
            self.inner.size(name).await
        }
        async fn get(
            &self,
            name: &BlobName,
            range: Option<(u64, u64)>,
        ) -> Result<BlobRead, BlobError> {
            let read = self.inner.get(name, range).await?;
            let bytes = read_all(read).await;
            let first = Bytes::copy_from_slice(&bytes[..100]);
            let rest = Bytes::copy_from_slice(&bytes[100..]);
            let first = futures::stream::once(async move { Ok(first) });
            let chunks = match self.drip {
                Some(every) => first
                    .chain(futures::stream::unfold(rest, move |rest| async move {
                        if rest.is_empty() {
                            return None;
                        }
                        // The storage's pace, not a wait for the test.
                        tokio::time::sleep(every).await;
                        Some((Ok(rest.slice(..1)), rest.slice(1..)))
                    }))
                    .boxed(),
                None => {
                    let mut go = self.rest.subscribe();
                    first
                        .chain(futures::stream::once(async move {
                            go.wait_for(|go| *go).await.expect("the test is running");
                            Ok(rest)
                        }))
                        .boxed()
                }
            };
            Ok(BlobRead {
                chunks,
                len: bytes.len() as u64,
            })
        }
        async fn presign(
            &self,
            name: &BlobName,
            ttl: Duration,
            presentation: &Presentation,
        ) -> Result<Option<String>, BlobError> {
            self.inner.presign(name, ttl, presentation).await
        }
        async fn list(
            &self,
            after: Option<&BlobName>,
            limit: usize,
        ) -> Result<Vec<BlobInfo>, BlobError> {
            self.inner.list(after, limit).await
        }
        async fn delete(&self, name: &BlobName) -> Result<(), BlobError> {
            self.inner.delete(name).await
        }
        async fn sweep_staging(&self, age: Duration) -> Result<u64, BlobError> {
            self.inner.sweep_staging(age).await
        }
    }

    #[tokio::test]
    async fn a_miss_streams_to_its_reader_before_the_whole_object_is_in() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 233) as u8).collect();
        let name = storage.put(Bytes::from(bytes.clone())).await.expect("put");
        let trickling = Arc::new(Trickling {
            inner: storage,
            rest: tokio::sync::watch::Sender::new(false),
            drip: None,
        });
        let blobs = CachedBlobs::new(
            Arc::clone(&trickling) as Arc<dyn Blobs>,
            limits(10_000, 5_000),
        );
        let deadline = Duration::from_secs(10);
        let mut first = tokio::time::timeout(deadline, blobs.get(&name, None))
            .await
            .expect("a cold read answers before the storage has sent it all")
            .expect("reads");
        assert_eq!(first.len, 3000);
        let head = tokio::time::timeout(deadline, first.chunks.next())
            .await
            .expect("its first bytes are passed on as they come")
            .expect("a chunk")
            .expect("reads");
        assert_eq!(head[..], bytes[..100]);
        // A second reader meanwhile waits for the same read, and is not told to make its own.
        let second = tokio::spawn({
            let blobs = Arc::new(blobs);
            let name = name.clone();
            let waiting = Arc::clone(&blobs);
            async move {
                let read = waiting.get(&name, None).await.expect("reads");
                (read_all(read).await, waiting.fills())
            }
        });
        trickling.rest.send_replace(true);
        let mut all = head.to_vec();
        all.extend_from_slice(&read_all(first).await);
        assert_eq!(all, bytes);
        let (seen, fills) = tokio::time::timeout(deadline, second)
            .await
            .expect("the waiting reader gets the object")
            .expect("joins");
        assert_eq!(seen, bytes);
        assert_eq!(fills, 1, "two readers, one read from the storage");
    }

    #[tokio::test]
    async fn a_miss_whose_reader_goes_away_mid_way_is_still_kept_for_the_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 227) as u8).collect();
        let name = storage.put(Bytes::from(bytes.clone())).await.expect("put");
        let trickling = Arc::new(Trickling {
            inner: storage,
            rest: tokio::sync::watch::Sender::new(false),
            drip: None,
        });
        let blobs = Arc::new(CachedBlobs::new(
            Arc::clone(&trickling) as Arc<dyn Blobs>,
            limits(10_000, 5_000),
        ));
        let mut gone = blobs.get(&name, None).await.expect("reads");
        gone.chunks.next().await.expect("a chunk").expect("reads");
        drop(gone);
        assert!(!blobs.holds(&name), "a part of an object was kept");
        let waiting = tokio::spawn({
            let blobs = Arc::clone(&blobs);
            let name = name.clone();
            async move { read_all(blobs.get(&name, None).await.expect("reads")).await }
        });
        trickling.rest.send_replace(true);
        let seen = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the waiting reader gets the object")
            .expect("joins");
        assert_eq!(seen, bytes);
        assert!(blobs.holds(&name));
        assert_eq!(
            blobs.fills(),
            1,
            "the read the first reader left served the others"
        );
        assert!(blobs.filling.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn a_storage_read_that_stalls_leaves_no_read_to_wait_on() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 211) as u8).collect();
        let name = storage.put(Bytes::from(bytes.clone())).await.expect("put");
        let trickling = Arc::new(Trickling {
            inner: storage,
            rest: tokio::sync::watch::Sender::new(false),
            drip: None,
        });
        let blobs = CachedBlobs::new(
            Arc::clone(&trickling) as Arc<dyn Blobs>,
            limits(10_000, 5_000),
        )
        .with_fill_limits(Duration::from_millis(200), Duration::from_secs(60));
        let mut first = blobs.get(&name, None).await.expect("reads");
        first.chunks.next().await.expect("a chunk").expect("reads");
        // The storage sends nothing more.
        let ended = tokio::time::timeout(Duration::from_secs(10), first.chunks.next())
            .await
            .expect("a read the storage stopped sending ends")
            .expect("with an error");
        assert!(ended.is_err());
        assert!(
            blobs.filling.lock().expect("lock").is_empty(),
            "no stalled read is left for new misses to wait on"
        );
        trickling.rest.send_replace(true);
        let again = blobs.get(&name, None).await.expect("reads");
        assert_eq!(read_all(again).await, bytes);
        assert_eq!(blobs.fills(), 2);
        assert!(blobs.holds(&name));
    }

    #[tokio::test]
    async fn a_storage_read_that_trickles_ends_in_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 199) as u8).collect();
        let name = storage.put(Bytes::from(bytes)).await.expect("put");
        let dripping = Trickling {
            inner: storage,
            rest: tokio::sync::watch::Sender::new(false),
            drip: Some(Duration::from_millis(50)),
        };
        let blobs = CachedBlobs::new(Arc::new(dripping) as Arc<dyn Blobs>, limits(10_000, 5_000))
            .with_fill_limits(Duration::from_secs(1), Duration::from_millis(500));
        let mut first = blobs.get(&name, None).await.expect("reads");
        // Whole, the object would take 145 s to arrive.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match first.chunks.next().await {
                    Some(Ok(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("a read the storage trickles ends");
        assert!(
            matches!(ended, Some(Err(_))),
            "it ends short, with an error"
        );
        assert!(
            blobs.filling.lock().expect("lock").is_empty(),
            "no trickling read is left for new misses to wait on"
        );
    }

    #[tokio::test]
    async fn a_slow_first_reader_does_not_hold_up_the_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let bytes: Vec<u8> = (0..3000u32).map(|i| (i % 229) as u8).collect();
        let name = storage.put(Bytes::from(bytes.clone())).await.expect("put");
        let blobs = cached(dir.path(), limits(10_000, 5_000));
        // The first reader's client takes nothing (a slow link, or a reader holding back on
        // purpose): its read stays open, unpolled.
        let first = blobs.get(&name, None).await.expect("reads");
        let second = tokio::time::timeout(Duration::from_secs(10), async {
            read_all(blobs.get(&name, None).await.expect("reads")).await
        })
        .await
        .expect("a second reader is not held up by the first one's pace");
        assert_eq!(second, bytes);
        assert_eq!(blobs.fills(), 1);
        assert_eq!(read_all(first).await, bytes);
    }

    #[tokio::test]
    async fn an_object_is_kept_from_its_second_read_or_a_read_while_its_first_streams() {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = LocalBlobs::open(dir.path()).expect("opens");
        let read_twice: Vec<u8> = (0..3000u32).map(|i| (i % 223) as u8).collect();
        let read_together: Vec<u8> = (0..3000u32).map(|i| (i % 197) as u8).collect();
        let read_twice_name = storage
            .put(Bytes::from(read_twice.clone()))
            .await
            .expect("put");
        let together_name = storage
            .put(Bytes::from(read_together.clone()))
            .await
            .expect("put");
        let trickling = Arc::new(Trickling {
            inner: storage,
            rest: tokio::sync::watch::Sender::new(true),
            drip: None,
        });
        let blobs = Arc::new(CachedBlobs::new(
            Arc::clone(&trickling) as Arc<dyn Blobs>,
            CacheLimits {
                keeps_first_reads: false,
                ..limits(10_000, 5_000)
            },
        ));
        let first = blobs.get(&read_twice_name, None).await.expect("reads");
        assert_eq!(read_all(first).await, read_twice);
        assert!(
            !blobs.holds(&read_twice_name),
            "an object read once is passed through, not kept"
        );
        assert_eq!(blobs.fills(), 0);
        let second = blobs
            .get_sized(&read_twice_name, 3000, None)
            .await
            .expect("reads");
        assert_eq!(read_all(second).await, read_twice);
        assert!(blobs.holds(&read_twice_name), "its second read keeps it");
        assert_eq!(blobs.fills(), 1);

        // Readers that come while an object's first read still streams share one read, which
        // keeps it.
        trickling.rest.send_replace(false);
        let mut first = blobs.get(&together_name, None).await.expect("reads");
        let head = first.chunks.next().await.expect("a chunk").expect("reads");
        let others: Vec<_> = (0..4)
            .map(|_| {
                let blobs = Arc::clone(&blobs);
                let name = together_name.clone();
                tokio::spawn(
                    async move { read_all(blobs.get(&name, None).await.expect("reads")).await },
                )
            })
            .collect();
        // All four are in before the first read's rest comes: one reads, three wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = blobs
                .filling
                .lock()
                .expect("lock")
                .get(&together_name)
                .map(|fill| fill.receiver_count());
            if waiting == Some(3) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the readers never joined one read: {waiting:?} waiting"
            );
            tokio::task::yield_now().await;
        }
        trickling.rest.send_replace(true);
        let mut all = head.to_vec();
        all.extend_from_slice(&read_all(first).await);
        assert_eq!(all, read_together);
        for other in others {
            let seen = tokio::time::timeout(Duration::from_secs(10), other)
                .await
                .expect("every reader gets the object")
                .expect("joins");
            assert_eq!(seen, read_together);
        }
        assert!(blobs.holds(&together_name));
        assert_eq!(
            blobs.fills(),
            2,
            "the four readers behind the first shared one read"
        );

        // An object known to be too large to keep takes no place among the names read once.
        let large = vec![9u8; 6000];
        let large_name = trickling
            .inner
            .put(Bytes::from(large.clone()))
            .await
            .expect("put");
        let read = blobs
            .get_sized(&large_name, 6000, None)
            .await
            .expect("reads");
        assert_eq!(read_all(read).await, large);
        assert!(
            !blobs.read_once.lock().expect("lock").contains(&large_name),
            "a name that can never be kept was remembered"
        );
    }

    #[tokio::test]
    async fn a_miss_is_kept_and_the_least_recently_used_goes_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = LocalBlobs::open(dir.path()).expect("opens");
        let mut names = Vec::new();
        for i in 0..3u8 {
            names.push(plain.put(Bytes::from(vec![i; 400])).await.expect("put"));
        }
        let blobs = cached(dir.path(), limits(1000, 1000));
        for name in &names[..2] {
            read_all(blobs.get(name, None).await.expect("reads")).await;
        }
        assert!(blobs.holds(&names[0]) && blobs.holds(&names[1]));
        // Using the first makes the second the least recently used: the third pushes it out.
        read_all(blobs.get(&names[0], None).await.expect("reads")).await;
        read_all(blobs.get(&names[2], None).await.expect("reads")).await;
        assert!(blobs.holds(&names[0]) && blobs.holds(&names[2]));
        assert!(!blobs.holds(&names[1]));
        assert_eq!(blobs.held_bytes(), 800);
        remove_underneath(dir.path(), &names[0]).await;
        let kept = blobs.get(&names[0], None).await.expect("from memory");
        assert_eq!(read_all(kept).await, vec![0u8; 400]);
    }

    #[tokio::test]
    async fn bytes_that_do_not_match_their_name_are_served_but_never_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = LocalBlobs::open(dir.path()).expect("opens");
        let name = plain
            .put(Bytes::from_static(b"original"))
            .await
            .expect("put");
        let path = plain.path(&name);
        tokio::fs::write(&path, b"tampered")
            .await
            .expect("overwrites");
        let blobs = cached(dir.path(), limits(1000, 1000));
        let read = blobs.get(&name, None).await.expect("reads");
        assert_eq!(read_all(read).await, b"tampered");
        assert!(!blobs.holds(&name));
    }
}
