//! Attachment bytes: the [`Blobs`] trait, content-addressed objects named by their SHA-256.
//! [`S3Blobs`] stores them in an S3 bucket (SeaweedFS's S3 gateway in production, path-style
//! requests to a configured endpoint); [`LocalBlobs`] in a directory (`confab serve`).
//! [`CachedBlobs`] keeps small objects in memory in front of either. [`conformance`] holds all of
//! them to the same behaviour.
//!
//! An upload is staged first (streamed to a staging object while its hash is computed, never held
//! whole in memory), then committed under its hash: the same bytes uploaded twice are one object.
//! An upload whose hash the client declared goes straight to its object instead
//! ([`Blobs::put_declared`]), made only once the streamed hash is found to match.

mod cache;
pub mod conformance;
mod inline;
mod local;
mod s3;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

/// The S3 SDK, for tools that talk to the bucket directly (`confab bench-attachments`).
pub use aws_sdk_s3 as s3_sdk;
pub use cache::{CacheLimits, CachedBlobs};
pub use inline::{InlineBlobs, SmallObjects};
pub use local::LocalBlobs;
pub use s3::{DEFAULT_PART_BYTES, S3Blobs, S3Settings};

use crate::telemetry::ReadinessCheck;

/// A body as it arrives: chunks, or the error that cut it short (the client went away).
pub type ByteChunks = BoxStream<'static, Result<Bytes, std::io::Error>>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The storage cannot be reached or failed.
    #[error("blob storage unavailable: {0}")]
    Unavailable(String),
    /// The body is longer than the limit it was staged with; nothing was kept.
    #[error("the body is larger than {0} bytes")]
    TooLarge(u64),
    /// The body ended with an error (the client went away); nothing was kept.
    #[error("the body was cut short: {0}")]
    Body(String),
    /// No object by that name.
    #[error("no such object")]
    NotFound,
    /// The body's SHA-256 is not the one declared for it; nothing was kept.
    #[error("the body's SHA-256 is {0}, not the one declared")]
    Mismatch(BlobName),
}

/// The name of a content-addressed object: the lower-case hex SHA-256 of its bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobName(String);

impl BlobName {
    /// Parses a 64-character lower-case hex digest.
    pub fn parse(hex: &str) -> Option<BlobName> {
        (hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| BlobName(hex.to_owned()))
    }

    /// The name of `bytes`.
    pub fn of(bytes: &[u8]) -> BlobName {
        BlobName::from_digest(Sha256::digest(bytes).into())
    }

    pub fn from_digest(digest: [u8; 32]) -> BlobName {
        use std::fmt::Write;
        let mut hex = String::with_capacity(64);
        for byte in digest {
            let _ = write!(hex, "{byte:02x}");
        }
        BlobName(hex)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 bytes of the digest.
    pub fn digest(&self) -> [u8; 32] {
        let mut digest = [0u8; 32];
        for (byte, pair) in digest.iter_mut().zip(self.0.as_bytes().chunks_exact(2)) {
            let nibble = |c: u8| match c {
                b'0'..=b'9' => c - b'0',
                _ => c - b'a' + 10,
            };
            *byte = nibble(pair[0]) << 4 | nibble(pair[1]);
        }
        digest
    }
}

impl std::fmt::Display for BlobName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many leading bytes of a staged body are kept to check its type (magic numbers).
pub const HEAD_BYTES: usize = 64;

/// A body streamed to a staging object: its size, its hash and its first bytes.
#[derive(Clone, Debug)]
pub struct Staged {
    /// The staging object (implementation-defined).
    pub(crate) key: String,
    pub size: u64,
    pub name: BlobName,
    /// Up to [`HEAD_BYTES`] first bytes.
    pub head: Vec<u8>,
    /// The whole body, for a body small enough that [`InlineBlobs`] (or [`S3Blobs`], up to a
    /// part) holds it in memory until the commit instead of staging it.
    pub(crate) held: Option<Bytes>,
    /// The share of the storage's memory budget that `held` takes, given back when the last
    /// clone of this is dropped.
    pub(crate) held_budget: Option<Arc<tokio::sync::OwnedSemaphorePermit>>,
}

/// An object as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub name: BlobName,
    pub size: u64,
    pub modified: OffsetDateTime,
}

/// Bytes of an object being read: `range` of `size`.
pub struct BlobRead {
    pub chunks: ByteChunks,
    /// How many bytes `chunks` yields.
    pub len: u64,
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRead").field("len", &self.len).finish()
    }
}

/// How a presigned URL should present the object.
#[derive(Clone, Debug)]
pub struct Presentation {
    pub content_type: String,
    pub content_disposition: Option<String>,
}

#[async_trait]
pub trait Blobs: Send + Sync + 'static {
    /// Whether the storage answers now.
    async fn check(&self) -> Result<(), BlobError>;

    /// Streams `body` to a new staging object, computing its SHA-256 on the way; more than
    /// `max_bytes` bytes is [`BlobError::TooLarge`]. On any error nothing is left behind.
    /// `length` is the body's length when the client gave it (`Content-Length`); a body of
    /// another length is [`BlobError::Body`].
    async fn stage(
        &self,
        body: ByteChunks,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<Staged, BlobError>;

    /// Makes the staged bytes the object named by their hash and removes the staging object. When
    /// the object exists already, the staging object is only removed.
    async fn commit(&self, staged: &Staged) -> Result<(), BlobError>;

    /// Removes a staging object (an upload refused or failed after staging).
    async fn discard(&self, staged: &Staged) -> Result<(), BlobError>;

    /// Streams `body` to the object named `expected`, hashing it on the way, and makes the object
    /// only if the body's hash is `expected` ([`BlobError::Mismatch`] otherwise; more than
    /// `max_bytes` is [`BlobError::TooLarge`]; either way nothing is kept). An object that exists
    /// already may be written again, but the body is always read and checked: naming an object is
    /// not proof of holding its bytes. `length` as for [`Blobs::stage`]. Answers the body's size. This default stages and commits;
    /// a storage where a commit copies bytes writes once instead.
    async fn put_declared(
        &self,
        body: ByteChunks,
        expected: &BlobName,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<u64, BlobError> {
        let staged = self.stage(body, length, max_bytes).await?;
        if staged.name != *expected {
            self.discard(&staged).await?;
            return Err(BlobError::Mismatch(staged.name));
        }
        self.commit(&staged).await?;
        Ok(staged.size)
    }

    /// Stores small bytes (a thumbnail) under their hash; answers the name.
    async fn put(&self, bytes: Bytes) -> Result<BlobName, BlobError>;

    /// The size of an object, or `None`.
    async fn size(&self, name: &BlobName) -> Result<Option<u64>, BlobError>;

    /// The bytes `range` (start, inclusive end) of an object, or all of them.
    async fn get(&self, name: &BlobName, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError>;

    /// [`Blobs::get`] of an object whose size the caller knows (from its metadata), which tells a
    /// storage with more than one place ([`InlineBlobs`]) where to look first.
    async fn get_sized(
        &self,
        name: &BlobName,
        size: u64,
        range: Option<(u64, u64)>,
    ) -> Result<BlobRead, BlobError> {
        let _ = size;
        self.get(name, range).await
    }

    /// A URL that reads the object without credentials for `ttl`, presented as asked; `None` when
    /// the storage has no such URLs (a local directory).
    async fn presign(
        &self,
        name: &BlobName,
        ttl: Duration,
        presentation: &Presentation,
    ) -> Result<Option<String>, BlobError>;

    /// Up to `limit` objects after `after`, in name order; fewer only when there are no more.
    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError>;

    /// Removes an object; removing a missing one is not an error.
    async fn delete(&self, name: &BlobName) -> Result<(), BlobError>;

    /// Removes staging objects (and unfinished multipart uploads) older than `age`: what a process
    /// that died mid-upload left. Answers how many.
    async fn sweep_staging(&self, age: Duration) -> Result<u64, BlobError>;
}

/// `body`, cut short with an error (a [`BlobError::Body`] where it is read) once it is found
/// longer or shorter than `length`, when that is given.
pub(crate) fn of_length(body: ByteChunks, length: Option<u64>) -> ByteChunks {
    let Some(length) = length else {
        return body;
    };
    futures::stream::unfold(
        (body, 0u64, false),
        move |(mut body, seen, ended)| async move {
            if ended {
                return None;
            }
            match body.next().await {
                Some(Ok(chunk)) => {
                    let seen = seen + chunk.len() as u64;
                    if seen > length {
                        let error =
                            std::io::Error::other("the body is longer than its Content-Length");
                        return Some((Err(error), (body, seen, true)));
                    }
                    Some((Ok(chunk), (body, seen, false)))
                }
                Some(Err(error)) => Some((Err(error), (body, seen, true))),
                None if seen < length => {
                    let error = std::io::Error::other("the body ended before its Content-Length");
                    Some((Err(error), (body, seen, true)))
                }
                None => None,
            }
        },
    )
    .boxed()
}

/// Hashes a body while counting it and keeping its first bytes.
pub(crate) struct Hashing {
    hasher: Sha256,
    pub(crate) size: u64,
    pub(crate) head: Vec<u8>,
    max_bytes: u64,
}

impl Hashing {
    pub(crate) fn new(max_bytes: u64) -> Hashing {
        Hashing {
            hasher: Sha256::new(),
            size: 0,
            head: Vec::with_capacity(HEAD_BYTES),
            max_bytes,
        }
    }

    /// Takes in a chunk; [`BlobError::TooLarge`] once past the limit.
    pub(crate) fn update(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        self.size += chunk.len() as u64;
        if self.size > self.max_bytes {
            return Err(BlobError::TooLarge(self.max_bytes));
        }
        if self.head.len() < HEAD_BYTES {
            let take = (HEAD_BYTES - self.head.len()).min(chunk.len());
            self.head.extend_from_slice(&chunk[..take]);
        }
        self.hasher.update(chunk);
        Ok(())
    }

    /// The name of what was taken in so far.
    pub(crate) fn name(&self) -> BlobName {
        BlobName::from_digest(self.hasher.clone().finalize().into())
    }

    pub(crate) fn finish(self, key: String) -> Staged {
        Staged {
            key,
            size: self.size,
            name: BlobName::from_digest(self.hasher.finalize().into()),
            head: self.head,
            held: None,
            held_budget: None,
        }
    }
}

/// Readiness of a [`Blobs`].
pub struct BlobsReadiness(pub std::sync::Arc<dyn Blobs>);

impl ReadinessCheck for BlobsReadiness {
    fn name(&self) -> &'static str {
        "blobs"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}
