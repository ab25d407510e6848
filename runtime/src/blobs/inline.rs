//! Small objects kept in the store's rows instead of the bucket ([`InlineBlobs`]).
//!
//! A body of a few KiB costs SeaweedFS (or any S3 gateway) a request, a needle in a volume and a
//! filer entry, and costs a reader a round trip to the gateway on top of the store reads it makes
//! anyway (the attachment's metadata, the caller's membership). So bodies up to a limit live in a
//! [`SmallObjects`] table of the store, under the same content-addressed names, and everything
//! else goes to the storage behind. To the rest of confab it is one [`Blobs`]: the same names, the
//! same references, marks and collector, one listing in name order (an object in both places is
//! listed once), and a deletion removes it from both. Garage and SeaweedFS's filer keep small
//! files in their metadata for the same reason.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::{
    BlobError, BlobInfo, BlobName, BlobRead, Blobs, ByteChunks, HEAD_BYTES, Presentation, Staged,
};

/// A table of small objects by name: the store's side of [`InlineBlobs`].
#[async_trait]
pub trait SmallObjects: Send + Sync + 'static {
    /// Stores `bytes` under `name` (their hash); storing it again changes nothing.
    async fn put(&self, name: &BlobName, bytes: Bytes) -> Result<(), BlobError>;
    /// The bytes of `name`, or `None`.
    async fn get(&self, name: &BlobName) -> Result<Option<Bytes>, BlobError>;
    /// Removes `name`; removing a missing one is not an error.
    async fn delete(&self, name: &BlobName) -> Result<(), BlobError>;
    /// Up to `limit` objects after `after`, in name order; fewer only when there are no more.
    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError>;
}

/// Bodies up to `up_to` bytes in a [`SmallObjects`] table, larger ones in `inner`. With `up_to`
/// 0 nothing new goes to the table, but what it holds (from before the limit changed) is still
/// read, listed and deleted.
pub struct InlineBlobs {
    small: Arc<dyn SmallObjects>,
    inner: Arc<dyn Blobs>,
    up_to: usize,
}

/// A body read up to the inline limit: whole, or its first chunks and the rest.
enum Taken {
    Small(Bytes),
    Large(ByteChunks),
}

impl InlineBlobs {
    pub fn new(small: Arc<dyn SmallObjects>, inner: Arc<dyn Blobs>, up_to: usize) -> InlineBlobs {
        InlineBlobs {
            small,
            inner,
            up_to,
        }
    }

    /// Reads `body` until it ends or passes the limit. A small body over `max_bytes` is refused
    /// here, as the storage would refuse it.
    async fn take(
        &self,
        mut body: ByteChunks,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<Taken, BlobError> {
        if self.up_to == 0 || length.is_some_and(|length| length > self.up_to as u64) {
            return Ok(Taken::Large(body));
        }
        let mut read: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        while len <= self.up_to {
            match body.next().await {
                Some(Ok(chunk)) => {
                    len += chunk.len();
                    read.push(chunk);
                }
                Some(Err(error)) => return Err(BlobError::Body(error.to_string())),
                None => {
                    if len as u64 > max_bytes {
                        return Err(BlobError::TooLarge(max_bytes));
                    }
                    if length.is_some_and(|length| length != len as u64) {
                        return Err(BlobError::Body(format!(
                            "the body of {len} bytes is not as long as its Content-Length"
                        )));
                    }
                    let mut whole = BytesMut::with_capacity(len);
                    for chunk in read {
                        whole.extend_from_slice(&chunk);
                    }
                    return Ok(Taken::Small(whole.freeze()));
                }
            }
        }
        let first = futures::stream::iter(read.into_iter().map(Ok));
        Ok(Taken::Large(first.chain(body).boxed()))
    }

    /// Whether an object of `size` bytes is kept in the table when it is stored now (never with
    /// a limit of 0: the table is then only read, listed and emptied).
    fn holds(&self, size: u64) -> bool {
        self.up_to > 0 && size <= self.up_to as u64
    }
}

/// The bytes `range` of `bytes` as a read (the cache's slicing); a range outside them is the
/// storage's failure, as the domain only asks for ranges it resolved against the size.
fn read_of(bytes: Bytes, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
    let len = bytes.len();
    super::cache::read_of(bytes, range).ok_or_else(|| {
        BlobError::Unavailable(format!("{range:?} lies outside an object of {len} bytes"))
    })
}

#[async_trait]
impl Blobs for InlineBlobs {
    async fn check(&self) -> Result<(), BlobError> {
        self.inner.check().await
    }

    async fn stage(
        &self,
        body: ByteChunks,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<Staged, BlobError> {
        match self.take(body, length, max_bytes).await? {
            Taken::Small(bytes) => Ok(Staged {
                // Nothing is written until the commit: the bytes wait in the `Staged` itself.
                key: String::new(),
                size: bytes.len() as u64,
                name: BlobName::of(&bytes),
                head: bytes[..bytes.len().min(HEAD_BYTES)].to_vec(),
                held: Some(bytes),
                held_budget: None,
            }),
            Taken::Large(body) => self.inner.stage(body, length, max_bytes).await,
        }
    }

    async fn commit(&self, staged: &Staged) -> Result<(), BlobError> {
        match &staged.held {
            // Held by this layer: what it takes is exactly what it holds. A larger body the
            // storage below holds is its own to write.
            Some(bytes) if self.holds(staged.size) => {
                self.small.put(&staged.name, bytes.clone()).await
            }
            _ => self.inner.commit(staged).await,
        }
    }

    async fn discard(&self, staged: &Staged) -> Result<(), BlobError> {
        match staged.held {
            Some(_) if self.holds(staged.size) => Ok(()),
            _ => self.inner.discard(staged).await,
        }
    }

    async fn put_declared(
        &self,
        body: ByteChunks,
        expected: &BlobName,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<u64, BlobError> {
        match self.take(body, length, max_bytes).await? {
            Taken::Small(bytes) => {
                let name = BlobName::of(&bytes);
                if name != *expected {
                    return Err(BlobError::Mismatch(name));
                }
                let size = bytes.len() as u64;
                // Written again when it exists: a write costs the store what the check would.
                self.small.put(&name, bytes).await?;
                Ok(size)
            }
            Taken::Large(body) => {
                self.inner
                    .put_declared(body, expected, length, max_bytes)
                    .await
            }
        }
    }

    async fn put(&self, bytes: Bytes) -> Result<BlobName, BlobError> {
        if !self.holds(bytes.len() as u64) {
            return self.inner.put(bytes).await;
        }
        let name = BlobName::of(&bytes);
        self.small.put(&name, bytes).await?;
        Ok(name)
    }

    async fn size(&self, name: &BlobName) -> Result<Option<u64>, BlobError> {
        if let Some(bytes) = self.small.get(name).await? {
            return Ok(Some(bytes.len() as u64));
        }
        self.inner.size(name).await
    }

    async fn get(&self, name: &BlobName, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        match self.small.get(name).await? {
            Some(bytes) => read_of(bytes, range),
            None => self.inner.get(name, range).await,
        }
    }

    /// Asks only the place an object of `size` is stored in now, and the other one if it is not
    /// there (stored before the limit changed).
    async fn get_sized(
        &self,
        name: &BlobName,
        size: u64,
        range: Option<(u64, u64)>,
    ) -> Result<BlobRead, BlobError> {
        if self.holds(size) {
            return self.get(name, range).await;
        }
        match self.inner.get(name, range).await {
            Err(BlobError::NotFound) => match self.small.get(name).await? {
                Some(bytes) => read_of(bytes, range),
                None => Err(BlobError::NotFound),
            },
            other => other,
        }
    }

    /// No URL for an object in the table: its reader gets the bytes from confab.
    async fn presign(
        &self,
        name: &BlobName,
        ttl: Duration,
        presentation: &Presentation,
    ) -> Result<Option<String>, BlobError> {
        if self.small.get(name).await?.is_some() {
            return Ok(None);
        }
        self.inner.presign(name, ttl, presentation).await
    }

    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError> {
        let (small, stored) =
            futures::try_join!(self.small.list(after, limit), self.inner.list(after, limit))?;
        // A full page may have more after it: names past its last one are not known to be
        // complete, and the next page starts after the last name answered. (A shorter page is
        // the end of its side.)
        let cut = [&small, &stored]
            .into_iter()
            .filter(|page| page.len() >= limit)
            .filter_map(|page| page.last())
            .map(|last| last.name.clone())
            .min();
        let mut merged: Vec<BlobInfo> = small
            .into_iter()
            .chain(stored)
            .filter(|object| cut.as_ref().is_none_or(|cut| object.name <= *cut))
            .collect();
        merged.sort_by(|a, b| a.name.cmp(&b.name));
        merged.dedup_by(|later, earlier| later.name == earlier.name);
        merged.truncate(limit);
        Ok(merged)
    }

    async fn delete(&self, name: &BlobName) -> Result<(), BlobError> {
        futures::try_join!(self.small.delete(name), self.inner.delete(name))?;
        Ok(())
    }

    /// Small bodies are never staged anywhere but in memory.
    async fn sweep_staging(&self, age: Duration) -> Result<u64, BlobError> {
        self.inner.sweep_staging(age).await
    }
}
