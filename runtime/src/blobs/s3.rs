//! [`S3Blobs`]: objects in an S3 bucket through `aws-sdk-s3` (SeaweedFS's S3 gateway in production
//! and tests): path-style requests to a configured endpoint, static credentials. Objects are
//! `<prefix>blobs/<name>`, staging objects `<prefix>staging/<uuid>`. A body whose length is known
//! (`Content-Length`) goes up as one PUT streamed as it arrives, whatever its size up to S3's
//! largest PUT, so it is never held; one of unknown length up to a part as one PUT once read, and
//! a longer one as a multipart upload, one part in flight while the next is read, so such an
//! upload holds at most two parts in memory. A declared hash travels as `x-amz-checksum-sha256`,
//! which the storage checks before it keeps anything. A staged upload of known length up to a
//! part is held in memory (within [`HELD_BUDGET_BYTES`] for all of them) and written once, under
//! its name, at the commit. A larger one is staged as an object, and its commit is a server-side
//! copy, so that a gateway which copies bytes (SeaweedFS does) writes it twice; an upload with a
//! declared hash goes straight to its object.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use http_body::Frame;
use time::OffsetDateTime;

use super::{
    BlobError, BlobInfo, BlobName, BlobRead, Blobs, ByteChunks, Hashing, Presentation, Staged,
    of_length,
};

/// Where the bucket is and how to sign for it.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:8333`.
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    /// Prepended to every key (e.g. `confab/`), so one bucket can serve several deployments.
    pub prefix: String,
    /// The size of a multipart upload's parts (at least 5 MiB, S3's minimum).
    pub part_bytes: usize,
}

/// The default part size: 8 MiB.
pub const DEFAULT_PART_BYTES: usize = 8 * 1024 * 1024;

/// The largest body S3 takes in one PUT (5 GiB); a longer one of known length goes up in parts.
const SINGLE_PUT_MAX_BYTES: u64 = 5 * 1024 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct S3Blobs {
    client: Client,
    bucket: String,
    prefix: String,
    part_bytes: usize,
    /// Whether the storage refuses a PUT whose `x-amz-checksum-sha256` is not its body's, found
    /// once by [`S3Blobs::checks_checksums`].
    verifies_checksums: Arc<OnceLock<bool>>,
    /// Whether that question is being asked in the background.
    probing: Arc<AtomicBool>,
    /// The memory that staged bodies held until their commit may take, in KiB, all uploads
    /// together ([`HELD_BUDGET_BYTES`]).
    held_budget: Arc<tokio::sync::Semaphore>,
}

/// How much memory the bodies staged in memory may take together: an upload of known length up
/// to a part is held, hashed, and written once under its name at the commit, instead of written
/// to a staging object and copied (a gateway that copies bytes, as SeaweedFS does, would write it
/// twice). With the budget taken, an upload is staged in the storage as before.
pub const HELD_BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// The budget's unit.
const HELD_BUDGET_UNIT: u64 = 1024;

fn unavailable<E: std::error::Error + 'static, R: std::fmt::Debug>(
    error: SdkError<E, R>,
) -> BlobError {
    BlobError::Unavailable(DisplayErrorContext(&error).to_string())
}

/// Whether the storage refused a request because a checksum was not its body's.
fn is_digest_refusal<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>) -> bool {
    error
        .as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| {
            matches!(
                code,
                "BadDigest" | "InvalidDigest" | "XAmzContentChecksumMismatch"
            )
        })
}

/// `x-amz-checksum-sha256`: the digest in base64.
fn checksum_of(name: &BlobName) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(name.digest())
}

/// Reads the rest of a body only to check it against `expected`, for an object stored already:
/// its size when it matches.
async fn check_only(
    mut body: ByteChunks,
    mut hashing: Hashing,
    expected: &BlobName,
) -> Result<u64, BlobError> {
    while let Some(chunk) = body.next().await {
        hashing.update(&chunk.map_err(|e| BlobError::Body(e.to_string()))?)?;
    }
    let name = hashing.name();
    if name != *expected {
        return Err(BlobError::Mismatch(name));
    }
    Ok(hashing.size)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A body of a known length ([`of_length`] holds it to that) on its way into one request. Each
/// chunk is hashed as it passes; what cut it short (the size limit, a body longer or shorter
/// than its length, the client going away) is kept for the caller, as the SDK's error only says
/// that the body failed.
struct Metered {
    /// In a mutex only because the SDK's bodies must be `Sync`; only the request polls it.
    chunks: Mutex<ByteChunks>,
    remaining: u64,
    hashing: Arc<Mutex<Hashing>>,
    stopped: Arc<Mutex<Option<BlobError>>>,
}

impl Metered {
    fn stop(&mut self, error: BlobError) -> Poll<Option<Result<Frame<Bytes>, BlobError>>> {
        let said = BlobError::Body(error.to_string());
        *lock(&self.stopped) = Some(error);
        Poll::Ready(Some(Err(said)))
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = BlobError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BlobError>>> {
        let this = &mut *self;
        let polled = lock(&this.chunks).poll_next_unpin(cx);
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                this.remaining -= chunk.len() as u64;
                let hashed = lock(&this.hashing).update(&chunk);
                match hashed {
                    Ok(()) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                    Err(error) => this.stop(error),
                }
            }
            Poll::Ready(Some(Err(error))) => this.stop(BlobError::Body(error.to_string())),
            Poll::Ready(None) => Poll::Ready(None),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

impl S3Blobs {
    pub fn new(settings: &S3Settings) -> S3Blobs {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(settings.region.clone()))
            .endpoint_url(&settings.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &settings.access_key,
                &settings.secret_key,
                None,
                None,
                "confab-config",
            ))
            // S3-compatible gateways do not all take the SDK's default trailing checksums.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .build(),
            )
            .retry_config(aws_sdk_s3::config::retry::RetryConfig::standard().with_max_attempts(2))
            .http_client(http)
            .build();
        S3Blobs {
            client: Client::from_conf(config),
            bucket: settings.bucket.clone(),
            prefix: settings.prefix.clone(),
            part_bytes: settings.part_bytes.max(5 * 1024 * 1024),
            verifies_checksums: Arc::new(OnceLock::new()),
            probing: Arc::new(AtomicBool::new(false)),
            held_budget: Arc::new(tokio::sync::Semaphore::new(
                HELD_BUDGET_BYTES / HELD_BUDGET_UNIT as usize,
            )),
        }
    }

    /// The memory the bodies staged in memory may take together ([`HELD_BUDGET_BYTES`] unless
    /// set); 0 stages every upload in the storage.
    pub fn with_held_budget(mut self, bytes: usize) -> S3Blobs {
        self.held_budget = Arc::new(tokio::sync::Semaphore::new(
            bytes / HELD_BUDGET_UNIT as usize,
        ));
        self
    }

    /// Reads a body of `length` (at most a part) whole, hashing it, into a [`Staged`] that holds
    /// it with its share of the budget; `Ok(Err(body))` gives the body back untouched when the
    /// budget is taken.
    async fn hold(
        &self,
        body: ByteChunks,
        length: u64,
        max_bytes: u64,
    ) -> Result<Result<Staged, ByteChunks>, BlobError> {
        let units = u32::try_from(length.div_ceil(HELD_BUDGET_UNIT).max(1)).unwrap_or(u32::MAX);
        let Ok(permit) = Arc::clone(&self.held_budget).try_acquire_many_owned(units) else {
            return Ok(Err(body));
        };
        let mut hashing = Hashing::new(max_bytes);
        let mut whole = BytesMut::with_capacity(usize::try_from(length).unwrap_or(0));
        let mut body = of_length(body, Some(length));
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            hashing.update(&chunk)?;
            whole.extend_from_slice(&chunk);
        }
        let mut staged = hashing.finish(String::new());
        staged.held = Some(whole.freeze());
        staged.held_budget = Some(Arc::new(permit));
        Ok(Ok(staged))
    }

    /// The SDK client, configured as above.
    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    fn object_key(&self, name: &BlobName) -> String {
        format!("{}blobs/{}", self.prefix, name.as_str())
    }

    fn staging_key(&self, key: &str) -> String {
        format!("{}staging/{key}", self.prefix)
    }

    async fn put_bytes(&self, key: &str, bytes: Bytes) -> Result<(), BlobError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Whether the storage checks a PUT's `x-amz-checksum-sha256` and keeps nothing when it is
    /// not the body's (S3, SeaweedFS and MinIO do), asked once with a PUT whose checksum is
    /// wrong and remembered; `false` when it could not be asked (asked again next time). The
    /// readiness check asks it, so that uploads only read the answer.
    pub async fn checks_checksums(&self) -> bool {
        if let Some(known) = self.verifies_checksums.get() {
            return *known;
        }
        let key = self.staging_key(&format!("checksum-probe-{}", uuid::Uuid::new_v4().simple()));
        let probe = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .body(ByteStream::from_static(
                b"does the storage check checksums?",
            ))
            .checksum_sha256(checksum_of(&BlobName::of(b"other bytes")))
            .send()
            .await;
        let known = match probe {
            Ok(_) => {
                tracing::warn!(
                    "the blob storage keeps a PUT whose checksum is wrong; uploads with a declared digest are held whole before their PUT"
                );
                if let Err(error) = self.delete_key(&key).await {
                    tracing::warn!(error = %error, "removing the checksum probe failed; sweep_staging removes it later");
                }
                false
            }
            Err(error) if is_digest_refusal(&error) => true,
            Err(error) => {
                tracing::warn!(error = %DisplayErrorContext(&error), "asking whether the blob storage checks checksums failed; asked again later");
                return false;
            }
        };
        let _ = self.verifies_checksums.set(known);
        known
    }

    /// What [`S3Blobs::checks_checksums`] found, without asking: an upload never waits for the
    /// question. Not known yet, it is asked in the background (once at a time) and the upload
    /// takes the held path.
    fn known_to_check_checksums(&self) -> bool {
        if let Some(known) = self.verifies_checksums.get() {
            return *known;
        }
        if !self.probing.swap(true, Ordering::AcqRel) {
            let blobs = self.clone();
            tokio::spawn(async move {
                blobs.checks_checksums().await;
                blobs.probing.store(false, Ordering::Release);
            });
        }
        false
    }

    /// One PUT of a body of known `length`, sent as it arrives and hashed on the way into
    /// `hashing`. With `checksum`, the storage checks the body against it and keeps nothing
    /// when they differ ([`BlobError::Mismatch`]); it is checked here again after the PUT.
    async fn put_streamed(
        &self,
        key: &str,
        body: ByteChunks,
        length: u64,
        checksum: Option<&BlobName>,
        hashing: Hashing,
    ) -> Result<Hashing, BlobError> {
        let hashing = Arc::new(Mutex::new(hashing));
        let stopped = Arc::new(Mutex::new(None));
        let metered = Metered {
            chunks: Mutex::new(of_length(body, Some(length))),
            remaining: length,
            hashing: Arc::clone(&hashing),
            stopped: Arc::clone(&stopped),
        };
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_length(
                i64::try_from(length).map_err(|_| BlobError::TooLarge(i64::MAX as u64))?,
            )
            .body(ByteStream::from_body_1_x(metered));
        if let Some(expected) = checksum {
            request = request.checksum_sha256(checksum_of(expected));
        }
        let sent = request.send().await;
        let stopped = lock(&stopped).take();
        let hashing = std::mem::replace(&mut *lock(&hashing), Hashing::new(0));
        if let Some(error) = stopped {
            return Err(error);
        }
        let complete = hashing.size == length;
        match (sent, checksum) {
            (Ok(_), None) => Ok(hashing),
            (Ok(_), Some(expected)) => {
                let name = hashing.name();
                if name == *expected {
                    return Ok(hashing);
                }
                // Only a storage that ignores checksums gets here: the probe said it checks them.
                tracing::error!(
                    key,
                    "the blob storage kept a body whose checksum was wrong; removing it"
                );
                self.delete_key(key).await?;
                Err(BlobError::Mismatch(name))
            }
            (Err(error), Some(expected))
                if complete && is_digest_refusal(&error) && hashing.name() != *expected =>
            {
                Err(BlobError::Mismatch(hashing.name()))
            }
            (Err(error), _) => Err(unavailable(error)),
        }
    }

    async fn delete_key(&self, key: &str) -> Result<(), BlobError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Reads `body` into `key`: one PUT when it fits a part, else a multipart upload (aborted on
    /// any error).
    async fn upload(
        &self,
        key: &str,
        mut body: ByteChunks,
        hashing: &mut Hashing,
        expected: Option<&BlobName>,
        first_hashed: bool,
    ) -> Result<(), BlobError> {
        let mut buffer = BytesMut::with_capacity(self.part_bytes.min(1024 * 1024));
        let mut multipart: Option<Multipart> = None;
        // The first chunk was hashed by the caller already.
        let mut hashed = first_hashed;
        loop {
            let chunk = match body.next().await {
                Some(Ok(chunk)) => chunk,
                Some(Err(error)) => {
                    return self
                        .abort(multipart, BlobError::Body(error.to_string()))
                        .await;
                }
                None => break,
            };
            if !std::mem::take(&mut hashed)
                && let Err(error) = hashing.update(&chunk)
            {
                return self.abort(multipart, error).await;
            }
            buffer.extend_from_slice(&chunk);
            while buffer.len() >= self.part_bytes {
                let part = buffer.split_to(self.part_bytes).freeze();
                if multipart.is_none() {
                    match self.start_multipart(key).await {
                        Ok(started) => multipart = Some(started),
                        Err(error) => return Err(error),
                    }
                }
                let Some(upload) = multipart.as_mut() else {
                    unreachable!("started above")
                };
                if let Err(error) = upload.send(self, part).await {
                    return self.abort(multipart, error).await;
                }
            }
        }
        // Nothing becomes visible under `key` before this check: the last part, or the only
        // PUT, is sent after it.
        if let Some(expected) = expected {
            let name = hashing.name();
            if name != *expected {
                return self.abort(multipart, BlobError::Mismatch(name)).await;
            }
        }
        match multipart {
            None => self.put_bytes(key, buffer.freeze()).await,
            Some(mut upload) => {
                let result = async {
                    if !buffer.is_empty() {
                        upload.send(self, buffer.freeze()).await?;
                    }
                    upload.complete(self).await
                }
                .await;
                match result {
                    Ok(()) => Ok(()),
                    Err(error) => self.abort(Some(upload), error).await,
                }
            }
        }
    }

    async fn start_multipart(&self, key: &str) -> Result<Multipart, BlobError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(unavailable)?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| BlobError::Unavailable("no upload id".into()))?
            .to_owned();
        Ok(Multipart {
            key: key.to_owned(),
            upload_id,
            parts: Vec::new(),
            in_flight: None,
        })
    }

    async fn abort<T>(
        &self,
        multipart: Option<Multipart>,
        error: BlobError,
    ) -> Result<T, BlobError> {
        if let Some(mut upload) = multipart {
            if let Some(task) = upload.in_flight.take() {
                task.abort();
            }
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&upload.key)
                .upload_id(&upload.upload_id)
                .send()
                .await;
            if let Err(abort_error) = aborted {
                tracing::warn!(error = %DisplayErrorContext(&abort_error), "aborting a multipart upload failed; sweep_staging removes it later");
            }
        }
        Err(error)
    }
}

/// A multipart upload under way: the parts sent, and the one in flight.
struct Multipart {
    key: String,
    upload_id: String,
    parts: Vec<CompletedPart>,
    in_flight: Option<tokio::task::JoinHandle<Result<CompletedPart, BlobError>>>,
}

impl Multipart {
    /// Waits for the part in flight, then sends `part` in the background.
    async fn send(&mut self, blobs: &S3Blobs, part: Bytes) -> Result<(), BlobError> {
        self.settle().await?;
        let number = i32::try_from(self.parts.len() + 1)
            .map_err(|_| BlobError::Unavailable("too many parts".into()))?;
        let request = blobs
            .client
            .upload_part()
            .bucket(&blobs.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(number)
            .body(ByteStream::from(part));
        self.in_flight = Some(tokio::spawn(async move {
            let sent = request.send().await.map_err(unavailable)?;
            Ok(CompletedPart::builder()
                .set_e_tag(sent.e_tag().map(str::to_owned))
                .part_number(number)
                .build())
        }));
        Ok(())
    }

    async fn settle(&mut self) -> Result<(), BlobError> {
        if let Some(task) = self.in_flight.take() {
            let part = task
                .await
                .map_err(|e| BlobError::Unavailable(e.to_string()))??;
            self.parts.push(part);
        }
        Ok(())
    }

    async fn complete(&mut self, blobs: &S3Blobs) -> Result<(), BlobError> {
        self.settle().await?;
        blobs
            .client
            .complete_multipart_upload()
            .bucket(&blobs.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(std::mem::take(&mut self.parts)))
                    .build(),
            )
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl Blobs for S3Blobs {
    async fn check(&self) -> Result<(), BlobError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(unavailable)?;
        // Off the request path: one PUT the first time, then only the remembered answer.
        self.checks_checksums().await;
        Ok(())
    }

    async fn stage(
        &self,
        body: ByteChunks,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<Staged, BlobError> {
        let body = match length {
            Some(length) if length <= self.part_bytes as u64 => {
                match self.hold(body, length, max_bytes).await? {
                    Ok(held) => return Ok(held),
                    Err(body) => body,
                }
            }
            _ => body,
        };
        let key = uuid::Uuid::new_v4().simple().to_string();
        let mut hashing = Hashing::new(max_bytes);
        match length {
            // A body whose length is known is sent as it arrives, in one PUT as a direct upload
            // would be: nothing held, no part boundaries.
            Some(length) if length <= SINGLE_PUT_MAX_BYTES => {
                hashing = self
                    .put_streamed(&self.staging_key(&key), body, length, None, hashing)
                    .await?;
            }
            _ => {
                let body = of_length(body, length);
                self.upload(&self.staging_key(&key), body, &mut hashing, None, false)
                    .await?;
            }
        }
        Ok(hashing.finish(key))
    }

    async fn commit(&self, staged: &Staged) -> Result<(), BlobError> {
        if let Some(bytes) = &staged.held {
            // Written again when it exists: the same bytes under the same name, for what asking
            // first would cost.
            return self
                .put_bytes(&self.object_key(&staged.name), bytes.clone())
                .await;
        }
        let staging = self.staging_key(&staged.key);
        if self.size(&staged.name).await?.is_none() {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .copy_source(format!("{}/{}", self.bucket, staging))
                .key(self.object_key(&staged.name))
                .send()
                .await
                .map_err(unavailable)?;
        }
        self.delete_key(&staging).await
    }

    async fn discard(&self, staged: &Staged) -> Result<(), BlobError> {
        if staged.held.is_some() {
            return Ok(());
        }
        self.delete_key(&self.staging_key(&staged.key)).await
    }

    async fn put_declared(
        &self,
        body: ByteChunks,
        expected: &BlobName,
        length: Option<u64>,
        max_bytes: u64,
    ) -> Result<u64, BlobError> {
        let mut hashing = Hashing::new(max_bytes);
        // A body whose length is known goes up as it arrives, in one PUT, when the storage
        // checks it against the declared hash: nothing is held, and nothing is kept on a
        // mismatch. Rewriting an object with the same bytes is as good as finding it.
        if let Some(length) = length
            && length <= SINGLE_PUT_MAX_BYTES
            && self.known_to_check_checksums()
        {
            // A body over a part is worth a question first: stored already, it is only read
            // to check it, not written again.
            if length > self.part_bytes as u64 && self.size(expected).await?.is_some() {
                return check_only(of_length(body, Some(length)), hashing, expected).await;
            }
            let hashing = self
                .put_streamed(
                    &self.object_key(expected),
                    body,
                    length,
                    Some(expected),
                    hashing,
                )
                .await?;
            return Ok(hashing.size);
        }
        let mut body = of_length(body, length);
        // A body of one part goes up in one PUT, checked first; rewriting an object with the
        // same bytes costs no more than asking whether it exists.
        let mut first = BytesMut::new();
        let mut ended = true;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| BlobError::Body(e.to_string()))?;
            hashing.update(&chunk)?;
            first.extend_from_slice(&chunk);
            if first.len() >= self.part_bytes {
                ended = false;
                break;
            }
        }
        if ended {
            let name = hashing.name();
            if name != *expected {
                return Err(BlobError::Mismatch(name));
            }
            self.put_bytes(&self.object_key(expected), first.freeze())
                .await?;
            return Ok(hashing.size);
        }
        if self.size(expected).await?.is_some() {
            // Stored already: read the rest only to check it.
            return check_only(body, hashing, expected).await;
        }
        // Racing uploads of the same bytes both complete the same object with the same bytes.
        let rest = futures::stream::once(async move { Ok(first.freeze()) })
            .chain(body)
            .boxed();
        self.upload(
            &self.object_key(expected),
            rest,
            &mut hashing,
            Some(expected),
            true,
        )
        .await?;
        Ok(hashing.size)
    }

    async fn put(&self, bytes: Bytes) -> Result<BlobName, BlobError> {
        let name = BlobName::of(&bytes);
        self.put_bytes(&self.object_key(&name), bytes).await?;
        Ok(name)
    }

    async fn size(&self, name: &BlobName) -> Result<Option<u64>, BlobError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(name))
            .send()
            .await
        {
            Ok(head) => Ok(Some(head.content_length().unwrap_or(0).max(0) as u64)),
            Err(error) if error.as_service_error().is_some_and(|e| e.is_not_found()) => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn get(&self, name: &BlobName, range: Option<(u64, u64)>) -> Result<BlobRead, BlobError> {
        let mut request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(name));
        if let Some((start, end)) = range {
            request = request.range(format!("bytes={start}-{end}"));
        }
        let object = match request.send().await {
            Ok(object) => object,
            Err(error) if error.as_service_error().is_some_and(|e| e.is_no_such_key()) => {
                return Err(BlobError::NotFound);
            }
            Err(error)
                if error
                    .raw_response()
                    .is_some_and(|r| r.status().as_u16() == 404) =>
            {
                return Err(BlobError::NotFound);
            }
            Err(error) => return Err(unavailable(error)),
        };
        // `BlobRead::len` is what callers size responses and buffers by: never a guess.
        let len = object
            .content_length()
            .and_then(|len| u64::try_from(len).ok())
            .ok_or_else(|| BlobError::Unavailable("the object's length was not given".into()))?;
        let chunks = futures::stream::unfold(object.body, |mut body| async move {
            body.next()
                .await
                .map(|chunk| (chunk.map_err(std::io::Error::other), body))
        })
        .boxed();
        Ok(BlobRead { chunks, len })
    }

    async fn presign(
        &self,
        name: &BlobName,
        ttl: Duration,
        presentation: &Presentation,
    ) -> Result<Option<String>, BlobError> {
        let config =
            PresigningConfig::expires_in(ttl).map_err(|e| BlobError::Unavailable(e.to_string()))?;
        let presigned = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(name))
            .response_content_type(&presentation.content_type)
            .set_response_content_disposition(presentation.content_disposition.clone())
            .presigned(config)
            .await
            .map_err(unavailable)?;
        Ok(Some(presigned.uri().to_owned()))
    }

    async fn list(
        &self,
        after: Option<&BlobName>,
        limit: usize,
    ) -> Result<Vec<BlobInfo>, BlobError> {
        let prefix = format!("{}blobs/", self.prefix);
        let mut found = Vec::new();
        let mut start_after = after.map(|a| self.object_key(a));
        // A page of the bucket can hold keys that are no object names (left out here), and at
        // most 1000 keys: asked again until `limit` objects are found or the bucket has no more,
        // so that a shorter answer means the end.
        while found.len() < limit {
            let want = (limit - found.len()).min(1000);
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_start_after(start_after.clone())
                .max_keys(i32::try_from(want).unwrap_or(1000))
                .send()
                .await
                .map_err(unavailable)?;
            found.extend(listed.contents().iter().filter_map(|object| {
                let name = BlobName::parse(object.key()?.strip_prefix(&prefix)?)?;
                let modified = object
                    .last_modified()
                    .and_then(|m| OffsetDateTime::from_unix_timestamp(m.secs()).ok())
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                Some(BlobInfo {
                    name,
                    size: object.size().unwrap_or(0).max(0) as u64,
                    modified,
                })
            }));
            let last_key = listed
                .contents()
                .last()
                .and_then(|o| o.key())
                .map(str::to_owned);
            match last_key {
                Some(key) if listed.is_truncated().unwrap_or(false) => start_after = Some(key),
                _ => break,
            }
        }
        found.truncate(limit);
        Ok(found)
    }

    async fn delete(&self, name: &BlobName) -> Result<(), BlobError> {
        self.delete_key(&self.object_key(name)).await
    }

    async fn sweep_staging(&self, age: Duration) -> Result<u64, BlobError> {
        let prefix = format!("{}staging/", self.prefix);
        let cutoff = OffsetDateTime::now_utc() - age;
        let mut removed = 0;
        let mut token = None;
        loop {
            let listed = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(unavailable)?;
            for object in listed.contents() {
                let old = object
                    .last_modified()
                    .and_then(|m| OffsetDateTime::from_unix_timestamp(m.secs()).ok())
                    .is_some_and(|m| m <= cutoff);
                if let (true, Some(key)) = (old, object.key()) {
                    self.delete_key(key).await?;
                    removed += 1;
                }
            }
            match listed.next_continuation_token() {
                Some(next) if listed.is_truncated() == Some(true) => token = Some(next.to_owned()),
                _ => break,
            }
        }
        // Unfinished multipart uploads to staging, and to objects (uploads with a declared hash).
        let uploads = self
            .client
            .list_multipart_uploads()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .send()
            .await
            .map_err(unavailable)?;
        for upload in uploads.uploads() {
            let old = upload
                .initiated()
                .and_then(|m| OffsetDateTime::from_unix_timestamp(m.secs()).ok())
                .is_some_and(|m| m <= cutoff);
            if let (true, Some(key), Some(id)) = (old, upload.key(), upload.upload_id()) {
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(id)
                    .send()
                    .await
                    .map_err(unavailable)?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}
