//! Attachments: uploads streamed into content-addressed objects ([`Blobs`]), their metadata in the
//! store, downloads, a chat's list, and the collector of unreferenced objects.
//!
//! Objects and references (see "Attachments" in ARCHITECTURE.md): an upload writes its
//! references (store) before it makes its object (blobs) and then checks the collector's mark; the
//! collector writes its mark before it checks for references and then removes the object. Of an
//! upload and a collection of the same object, at least one sees the other's write: either the
//! collector sees the reference and keeps the object, or the upload sees the mark, waits for the
//! collection to end and writes the object again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use confab_runtime::blobs::{
    BlobError, BlobName, BlobRead, Blobs, ByteChunks, HEAD_BYTES, Presentation,
};
use confab_schema::attachment::{Derivative, ImageInfo};
use confab_schema::{
    Attachment, AttachmentKind, AttachmentRef, ChatId, Signal, SignalId, User, UserId,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::inputs::{
    AttachmentIds, AttachmentName, BidiRule, DeclaredDigest, DeclaredType, PageLimit,
};
use super::paging::{Page, Pager};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{Store, StoreError};

/// How attachments are stored and served.
#[derive(Clone)]
pub struct AttachmentSettings {
    pub blobs: Arc<dyn Blobs>,
    /// The largest upload, in bytes.
    pub max_bytes: u64,
    /// Answer downloads with a redirect to a presigned URL where the storage has them.
    pub presigned_redirect: bool,
    /// Bodies up to this size are served even with `presigned_redirect`: they are kept in
    /// memory, and a redirect's second round trip would cost more than it saves.
    pub served_up_to: u64,
    pub presigned_ttl: Duration,
    /// Images with more pixels than this are kept as plain files.
    pub max_image_pixels: u64,
    /// How long an upload's body may take to arrive (at most [`MAX_UPLOAD_TIME`]).
    pub upload_time: Duration,
}

/// How long the collector's mark on an object holds: it removes the object only well within it.
pub const CONDEMN_LEASE: Duration = Duration::from_secs(30);
/// Margins against clock differences between the collector and an upload's process.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// Image formats recognised by their magic numbers, and the types that name them.
const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/gif", "image/webp"];

/// The media type the first bytes of a file show, when they show one this API cares about.
pub fn sniff(head: &[u8]) -> Option<&'static str> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some("image/jpeg")
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some("image/webp")
    } else if head.starts_with(b"%PDF-") {
        Some("application/pdf")
    } else {
        None
    }
}

/// The type to store for a body whose first bytes are `head`, declared as `declared`; an error when
/// the two contradict each other (an "image" that is not that image, an image declared as
/// something else).
pub fn resolve_type(declared: &DeclaredType, head: &[u8]) -> ApiResult<(String, AttachmentKind)> {
    let sniffed = sniff(head);
    let declared_str = declared.as_str();
    let claims_known = IMAGE_TYPES.contains(&declared_str) || declared_str == "application/pdf";
    let contradiction = match sniffed {
        Some(actual) => !declared.is_generic() && declared_str != actual,
        None => claims_known,
    };
    if contradiction {
        return Err(ApiError::UnsupportedMediaType(format!(
            "the declared type {declared_str} does not match the file's contents{}",
            sniffed.map(|s| format!(" ({s})")).unwrap_or_default()
        )));
    }
    let content_type = sniffed.unwrap_or(declared_str).to_owned();
    let kind = if IMAGE_TYPES.contains(&content_type.as_str()) {
        AttachmentKind::Image
    } else {
        AttachmentKind::File
    };
    Ok((content_type, kind))
}

/// A range of a download, resolved against its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Span {
    Whole,
    /// Inclusive.
    Part(u64, u64),
    /// No byte of the range exists (416).
    Unsatisfiable,
}

/// Resolves a `Range` header against `size`: one `bytes=` range (`a-b`, `a-`, `-n`); anything
/// else (several ranges, another unit, a malformed value) is ignored and the whole file served,
/// as RFC 9110 allows.
pub fn resolve_range(header: Option<&str>, size: u64) -> Span {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Span::Whole;
    };
    if spec.contains(',') {
        return Span::Whole;
    }
    let Some((start, end)) = spec.trim().split_once('-') else {
        return Span::Whole;
    };
    let (start, end) = (start.trim(), end.trim());
    let parsed = match (start.is_empty(), end.is_empty()) {
        (true, false) => end.parse::<u64>().ok().map(|n| {
            if n == 0 || size == 0 {
                None
            } else {
                Some((size.saturating_sub(n), size - 1))
            }
        }),
        (false, _) => start.parse::<u64>().ok().and_then(|s| {
            let e = if end.is_empty() {
                Some(u64::MAX)
            } else {
                end.parse::<u64>().ok()
            };
            e.filter(|e| *e >= s).map(|e| {
                if s >= size {
                    None
                } else {
                    Some((s, e.min(size - 1)))
                }
            })
        }),
        (true, true) => None,
    };
    match parsed {
        None => Span::Whole,
        Some(None) => Span::Unsatisfiable,
        Some(Some((0, e))) if e + 1 == size => Span::Whole,
        Some(Some((s, e))) => Span::Part(s, e),
    }
}

/// What a download serves: the attachment (or one of its pictures) and where its bytes are.
#[derive(Debug)]
pub enum Download {
    /// Stream `read` (the `span` of `size` bytes).
    Bytes {
        read: BlobRead,
        span: Span,
        size: u64,
        sha256: String,
        content_type: String,
        disposition: String,
    },
    /// Redirect to a presigned URL.
    Redirect(String),
    /// The client's copy (`If-None-Match`) is current.
    NotModified { sha256: String },
    /// No byte of the range exists.
    Unsatisfiable { size: u64 },
}

/// Which bytes of an attachment to download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Original,
    Thumbnail,
    Preview,
}

/// A file name as clients are shown it: a name stored before uploads refused them may hold
/// control or bidirectional formatting characters ([`AttachmentName`]), which become `_`, so it
/// cannot be made to show another extension ("invoice\u{202E}fdp.exe" as "invoiceexe.pdf").
fn file_name_shown(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_control() || BidiRule::FileName.refuses(c) {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// `attachment` as clients are shown it: its name as [`file_name_shown`] makes it. Every record
/// the API answers or publishes goes through it.
pub(crate) fn shown(mut attachment: Attachment) -> Attachment {
    attachment.name = file_name_shown(&attachment.name);
    attachment
}

/// `Content-Disposition` for `name`: inline for images, else a download. The header holds ASCII
/// only: `filename` a fallback with `_` for anything else, `filename*` the name percent-encoded
/// as UTF-8 (RFC 6266, RFC 8187), so no name can break the header; and the name is the one
/// [`file_name_shown`] makes, so the one a client saves the file under shows what it is.
fn disposition(inline: bool, name: &str) -> String {
    let name = file_name_shown(name);
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

impl ApiState {
    fn attachment_settings(&self) -> ApiResult<&AttachmentSettings> {
        self.attachments
            .as_ref()
            .ok_or(ApiError::Blobs(BlobError::Unavailable(
                "attachments are not configured".into(),
            )))
    }

    /// Stores an upload to `chat` (members only). Its type is checked against its first bytes
    /// before anything is written. With a declared digest the body is streamed straight to its
    /// content-addressed object, made only if the hash matches; without one it is streamed to
    /// staging while hashed, then committed under its hash. On any failure nothing is kept.
    /// Images get their thumbnail and preview in the background.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_attachment(
        &self,
        caller: &User,
        chat: ChatId,
        name: AttachmentName,
        declared: DeclaredType,
        declared_length: Option<u64>,
        digest: Option<DeclaredDigest>,
        body: ByteChunks,
    ) -> ApiResult<Attachment> {
        let settings = self.attachment_settings()?.clone();
        if declared_length.is_some_and(|n| n > settings.max_bytes) {
            self.require_member(chat, caller.id).await?;
            return Err(too_large(settings.max_bytes));
        }
        let until = tokio::time::Instant::now() + settings.upload_time;
        let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let uploaded = self
            .upload_within(
                caller,
                chat,
                (name, declared, declared_length, digest),
                within(body, until, settings.upload_time, Arc::clone(&cut)),
                &settings,
            )
            .await;
        match uploaded {
            // The body was cut at the deadline, not by the client.
            Err(ApiError::Blobs(BlobError::Body(_)))
                if cut.load(std::sync::atomic::Ordering::Relaxed) =>
            {
                Err(ApiError::TimedOut(format!(
                    "an upload may take at most {} s; nothing was kept",
                    settings.upload_time.as_secs()
                )))
            }
            uploaded => uploaded,
        }
    }

    /// [`ApiState::upload_attachment`] with a body cut at its deadline.
    async fn upload_within(
        &self,
        caller: &User,
        chat: ChatId,
        (name, declared, declared_length, digest): (
            AttachmentName,
            DeclaredType,
            Option<u64>,
            Option<DeclaredDigest>,
        ),
        body: ByteChunks,
        settings: &AttachmentSettings,
    ) -> ApiResult<Attachment> {
        // The membership check does not wait for the body's first bytes, nor they for it; a
        // refusal still comes before any complaint about the body.
        let (member, peeked) =
            futures::join!(self.require_member(chat, caller.id), peek(body, HEAD_BYTES));
        member?;
        let (head, body) = peeked?;
        if head.is_empty() {
            return Err(ApiError::BadRequest("the body is empty".into()));
        }
        let (content_type, kind) = resolve_type(&declared, &head)?;
        let upload = Upload {
            id: Uuid::now_v7(),
            chat,
            name: name.into_inner(),
            content_type,
            kind,
        };
        let attachment = match digest {
            Some(digest) => {
                let object = digest.name();
                let blobs = Arc::clone(&settings.blobs);
                let max = settings.max_bytes;
                self.record_upload(caller, upload, object, async move {
                    blobs.put_declared(body, object, declared_length, max).await
                })
                .await?
            }
            None => {
                let staged = settings
                    .blobs
                    .stage(body, declared_length, settings.max_bytes)
                    .await?;
                let blobs = Arc::clone(&settings.blobs);
                let committed = {
                    let staged = staged.clone();
                    async move {
                        blobs.commit(&staged).await?;
                        Ok(staged.size)
                    }
                };
                match self
                    .record_upload(caller, upload, &staged.name, committed)
                    .await
                {
                    Ok(attachment) => attachment,
                    Err(error) => {
                        if let Err(discard) = settings.blobs.discard(&staged).await {
                            tracing::warn!(error = %discard, "discarding a staged upload failed; the collector sweeps it");
                        }
                        return Err(error);
                    }
                }
            }
        };
        if attachment.kind == AttachmentKind::Image {
            self.spawn_derivatives(attachment.clone());
        }
        Ok(attachment)
    }

    /// Records an upload whose object `make` writes (answering its size): the reference first,
    /// then the object (see the module's documentation), then the metadata, so that a listed
    /// attachment always has its bytes. On failure the reference and metadata are removed.
    async fn record_upload(
        &self,
        caller: &User,
        upload: Upload,
        object: &BlobName,
        make: impl Future<Output = Result<u64, BlobError>>,
    ) -> ApiResult<Attachment> {
        let mut attachment = Attachment {
            id: upload.id,
            chat_id: upload.chat,
            name: upload.name,
            size: 0,
            content_type: upload.content_type,
            sha256: object.to_string(),
            kind: upload.kind,
            created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            uploader: caller.id,
            image: None,
            message_id: None,
        };
        let mut made = false;
        let committed = async {
            self.store
                .add_blob_refs(attachment.id, std::slice::from_ref(&attachment.sha256))
                .await?;
            wait_out_collection(self.store.as_ref(), object).await?;
            attachment.size = make.await?;
            made = true;
            in_time(attachment.id)?;
            self.store.put_attachment(&attachment).await?;
            // Membership was checked as the upload began, and a large body takes hours: the
            // uploader may have left since, or the chat been deleted (its attachments with it).
            // Read after the record's write, so that a removal or deletion that passed before it
            // landed is seen too; the record and object are then taken out below. Only on that
            // answer: a read that fails keeps an upload that may have taken hours.
            match self.store.member_role(attachment.chat_id, caller.id).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(self.not_member(attachment.chat_id).await),
                Err(error) => {
                    tracing::warn!(%error, attachment = %attachment.id, "an upload's uploader not checked again: kept");
                }
            }
            Ok::<(), ApiError>(())
        }
        .await;
        if let Err(error) = committed {
            if let Err(undo) = self
                .store
                .delete_attachments(std::slice::from_ref(&attachment))
                .await
            {
                tracing::error!(error = %undo, attachment = %attachment.id, "removing the record of a failed upload failed");
            } else if made {
                // The object was written for this upload: unless another upload or record names
                // the same bytes, it goes too, the way the collector removes one.
                let blobs = Arc::clone(&self.attachment_settings()?.blobs);
                let removal = remove_unreferenced(
                    self.store.as_ref(),
                    blobs.as_ref(),
                    object,
                    Uuid::new_v4(),
                    &mut Collected::default(),
                )
                .await;
                if let Err(undo) = removal {
                    tracing::warn!(error = %undo, attachment = %attachment.id, "removing the object of a failed upload failed; the collector removes it");
                }
            }
            return Err(error);
        }
        metrics::counter!("confab_attachments_uploaded_total").increment(1);
        metrics::counter!("confab_attachments_uploaded_bytes_total").increment(attachment.size);
        Ok(attachment)
    }

    /// Claims the attachments `ids` of `chat` uploaded by `author` for `message`, a message not
    /// stored yet, so that no message is stored or published naming an attachment it does not
    /// hold. 422 for an attachment that is not such an upload, or that was sent in another
    /// message before this send began; 409 for one another send claimed while this one was being
    /// made. A retry of the message that took them (the same `nonce`) claims nothing and answers
    /// that message. Whoever gets `Claimed::Attachments` must store `message`, or give the claims
    /// back ([`ApiState::release_claims`]).
    pub(crate) async fn claim_for_message(
        &self,
        chat: ChatId,
        author: UserId,
        ids: &AttachmentIds,
        nonce: Option<&str>,
        message: SignalId,
    ) -> ApiResult<Claimed> {
        if ids.is_empty() {
            return Ok(Claimed::Attachments(Vec::new()));
        }
        let ids = ids.as_slice();
        let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
        'claim: loop {
            let attachments = match self.uploads_for_message(chat, author, ids, nonce).await? {
                Checked::Unsent(attachments) => attachments,
                Checked::RetryOf(sent) => return Ok(Claimed::RetryOf(sent)),
            };
            let holders = self.store.claim_attachments(chat, ids, message).await?;
            let holder_of = |id: &Uuid| holders.iter().find(|(a, _)| a == id).map(|(_, h)| *h);
            let Some(&contended) = ids.iter().find(|id| holder_of(id) != Some(message)) else {
                return Ok(Claimed::Attachments(
                    attachments
                        .into_iter()
                        .map(|attachment| Attachment {
                            message_id: Some(message),
                            ..attachment
                        })
                        .collect(),
                ));
            };
            // Nothing of this message is stored: what it took goes back.
            self.store.release_attachments(chat, ids, message).await?;
            let Some(holder) = holder_of(&contended) else {
                return Err(not_an_upload(contended));
            };
            // Another send holds it. Only a retry of that send (its nonce) may still answer; that
            // is known once the other send is stored, or it gives the attachment back.
            let Some(nonce) = nonce else {
                return Err(taken_meanwhile(contended));
            };
            // Or by the nonce's record, which a store may write before the signal: an attempt
            // whose signal write failed after it (and may never be made) holds them, and this
            // send's insert, finding the nonce taken, writes that attempt's message.
            if self.store.nonce_holder(chat, author, nonce).await? == Some(holder) {
                return Ok(Claimed::AttemptOf(attachments));
            }
            loop {
                if let Some(sent) = self.store.get_signal(chat, holder).await? {
                    if sent.author_id == author && sent.nonce.as_deref() == Some(nonce) {
                        return Ok(Claimed::RetryOf(sent));
                    }
                    return Err(taken_meanwhile(contended));
                }
                // A holder made longer ago than the wait is a send that stopped before storing
                // its message, or whose store write failed: nothing will come of waiting for it
                // but reads. Once its claim is older than `CLAIM_ORPHANED_AFTER`, the claim above
                // takes it over.
                if holder
                    .created_at()
                    .is_none_or(|made| OffsetDateTime::now_utc() - made > CLAIM_WAIT)
                {
                    return Err(taken_meanwhile(contended));
                }
                let held_now = self
                    .store
                    .get_attachments(&[contended])
                    .await?
                    .pop()
                    .and_then(|a| a.message_id);
                if held_now != Some(holder) {
                    continue 'claim;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(taken_meanwhile(contended));
                }
                tokio::time::sleep(CLAIM_POLL).await;
            }
        }
    }

    /// The attachments `ids` of `chat` uploaded by `author`, for a message: 422 for any other, and
    /// for one sent in another message already, unless this is a retry of that message (the same
    /// `nonce`). One claimed by a send not stored yet is left to the claim.
    async fn uploads_for_message(
        &self,
        chat: ChatId,
        author: UserId,
        ids: &[Uuid],
        nonce: Option<&str>,
    ) -> ApiResult<Checked> {
        let found = self.store.get_attachments(ids).await?;
        let mut attachments = Vec::with_capacity(ids.len());
        for id in ids {
            let attachment = found
                .iter()
                .find(|a| a.id == *id && a.chat_id == chat && a.uploader == author)
                .cloned()
                .ok_or_else(|| not_an_upload(*id))?;
            if let Some(sent_in) = attachment.message_id
                && let Some(sent) = self.store.get_signal(chat, sent_in).await?
            {
                if nonce.is_some() && sent.author_id == author && sent.nonce.as_deref() == nonce {
                    return Ok(Checked::RetryOf(sent));
                }
                return Err(ApiError::Unprocessable(format!(
                    "attachment {id} was sent in another message; upload it again to send it \
                     again"
                )));
            }
            attachments.push(attachment);
        }
        Ok(Checked::Unsent(attachments))
    }

    /// Gives back the claims of `message`, which was not stored, on the attachments it names.
    /// A failure is logged: the attachments then stay claimed by a message that does not exist,
    /// until a send takes the claims over ([`crate::store::CLAIM_ORPHANED_AFTER`]).
    pub(crate) async fn release_claims(&self, message: &Signal) {
        let ids: Vec<Uuid> = message.attachments.iter().map(AttachmentRef::id).collect();
        if ids.is_empty() {
            return;
        }
        let released = self
            .store
            .release_attachments(message.chat_id, &ids, message.id)
            .await;
        if let Err(error) = released {
            tracing::warn!(%error, message = %message.id, "giving back the attachments of a message not stored failed");
        }
    }

    /// Claims for `sent`, a stored message, those of its attachments no message holds: it gave
    /// them back when its store write failed, and was stored all the same. A failure is logged.
    pub(crate) async fn reclaim(&self, sent: &Signal) {
        let ids: Vec<Uuid> = sent.attachments.iter().map(AttachmentRef::id).collect();
        if ids.is_empty() {
            return;
        }
        match self
            .store
            .claim_attachments(sent.chat_id, &ids, sent.id)
            .await
        {
            Ok(holders) if holders.iter().any(|(_, holder)| *holder == sent.id) => {
                self.list_claims(sent).await;
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(%error, message = %sent.id, "claiming the attachments of a message stored again failed");
            }
        }
    }

    /// Records in the chat's lists that the attachments of `sent`, a message just stored (and
    /// holding them), were sent in it. The message is history already, so a failure is logged:
    /// the attachments' own records name the message all the same.
    pub(crate) async fn list_claims(&self, sent: &Signal) {
        let ids: Vec<Uuid> = sent.attachments.iter().map(AttachmentRef::id).collect();
        if ids.is_empty() {
            return;
        }
        let listed = self
            .store
            .list_claimed_attachments(sent.chat_id, &ids, sent.id)
            .await;
        if let Err(error) = listed {
            tracing::warn!(%error, message = %sent.id, "recording in the chat's lists which message took its attachments failed");
        }
    }

    /// Fills in the metadata of the attachments of `signals` (one store read for all); attachments
    /// that are gone (their message was deleted), or that another message took, are left out.
    pub(crate) async fn resolve_attachments(&self, signals: &mut [Signal]) -> ApiResult<()> {
        let ids: Vec<Uuid> = signals
            .iter()
            .flat_map(|s| s.attachments.iter().map(AttachmentRef::id))
            .collect();
        if ids.is_empty() {
            return Ok(());
        }
        let found = self.store.get_attachments(&ids).await?;
        for signal in signals {
            let chat = signal.chat_id;
            signal.attachments = signal
                .attachments
                .iter()
                .filter_map(|r| {
                    found
                        .iter()
                        // Once a message's claim is recorded, it alone carries the attachment:
                        // two sends that named it at once both passed the check before either
                        // claimed it, and only one claim is kept.
                        .find(|a| {
                            a.id == r.id()
                                && a.chat_id == chat
                                && a.message_id.is_none_or(|m| m == signal.id)
                        })
                        .cloned()
                        .map(shown)
                        .map(AttachmentRef::from)
                })
                .collect();
        }
        Ok(())
    }

    /// Hides the attachments of a deleted message from everyone: their records go, and with them
    /// their references to objects (the collector removes objects no longer referenced).
    pub(crate) async fn hide_attachments(&self, signal: &Signal) -> ApiResult<()> {
        let ids: Vec<Uuid> = signal.attachments.iter().map(AttachmentRef::id).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let found: Vec<Attachment> = self
            .store
            .get_attachments(&ids)
            .await?
            .into_iter()
            // Not one another message took (this one named it before the other claimed it, as
            // a retry may): hiding it would take it from that message.
            .filter(|a| a.chat_id == signal.chat_id && a.message_id.is_none_or(|m| m == signal.id))
            .collect();
        self.store.delete_attachments(&found).await?;
        Ok(())
    }

    /// An attachment, if `caller` may see it (a member of its chat): else 404, so ids of other
    /// chats reveal nothing.
    pub async fn attachment(&self, caller: UserId, id: Uuid) -> ApiResult<Attachment> {
        let attachment = self.attachment_record(id).await?;
        if self
            .store
            .member_role(attachment.chat_id, caller)
            .await?
            .is_none()
        {
            return Err(ApiError::NotFound("no such attachment"));
        }
        Ok(attachment)
    }

    /// The metadata of attachment `id`, whoever asks (404 when there is none).
    async fn attachment_record(&self, id: Uuid) -> ApiResult<Attachment> {
        self.store
            .get_attachments(&[id])
            .await?
            .pop()
            .map(shown)
            .ok_or(ApiError::NotFound("no such attachment"))
    }

    /// What `GET /v1/attachments/{id}` serves. The membership check and the storage read go
    /// out together once the metadata is known, instead of one after the other: nothing is
    /// answered, and no byte of the read is looked at, before the check has passed, and a
    /// non-member's read is dropped unread.
    pub async fn download(
        &self,
        caller: UserId,
        id: Uuid,
        variant: Variant,
        range: Option<&str>,
        if_none_match: Option<&str>,
    ) -> ApiResult<Download> {
        let settings = self.attachment_settings()?.clone();
        let attachment = self.attachment_record(id).await?;
        let served = Served::of(&attachment, variant, range);
        let read_early = async {
            match &served {
                Ok(served) if !served.is_current(if_none_match) && !served.redirects(&settings) => {
                    Some(read_span(&settings.blobs, &served.name, served.size, served.span).await)
                }
                _ => None,
            }
        };
        let (role, early_read) = futures::join!(
            self.store.member_role(attachment.chat_id, caller),
            read_early
        );
        if role?.is_none() {
            return Err(ApiError::NotFound("no such attachment"));
        }
        let served = served?;
        if served.is_current(if_none_match) {
            return Ok(Download::NotModified {
                sha256: served.sha256,
            });
        }
        let disposition = disposition(served.inline, &attachment.name);
        if served.redirects(&settings) {
            let presentation = Presentation {
                content_type: served.content_type.clone(),
                content_disposition: Some(disposition.clone()),
            };
            if let Some(url) = settings
                .blobs
                .presign(&served.name, settings.presigned_ttl, &presentation)
                .await?
            {
                return Ok(Download::Redirect(url));
            }
        }
        let read = match early_read {
            Some(read) => read,
            None => read_span(&settings.blobs, &served.name, served.size, served.span).await,
        };
        let Some(read) = read? else {
            return Ok(Download::Unsatisfiable { size: served.size });
        };
        Ok(Download::Bytes {
            read,
            span: served.span,
            size: served.size,
            sha256: served.sha256,
            content_type: served.content_type,
            disposition,
        })
    }

    /// A page of a chat's attachments (members only), newest first, of one kind or all.
    pub async fn list_attachments(
        &self,
        caller: UserId,
        chat: ChatId,
        kind: Option<AttachmentKind>,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<Attachment>> {
        let list = format!(
            "attachments:{chat}:{}",
            kind.map(|k| k.as_str()).unwrap_or("all")
        );
        let pager = Pager::new(self, list, limit);
        let before = pager.open::<Uuid>(cursor)?;
        self.require_member(chat, caller).await?;
        let fetched: Vec<Attachment> = self
            .store
            .chat_attachments(chat, kind, before, pager.fetch())
            .await?
            .into_iter()
            .map(shown)
            .collect();
        Ok(pager.page(fetched, |last| last.id))
    }

    /// Makes an image's thumbnail and preview off the request path, at most two at a time. An
    /// image that cannot be decoded, or is too large, becomes a plain file.
    ///
    /// An attempt that fails because the store or the storage was unavailable is made again,
    /// after a backoff ([`DERIVATIVE_ATTEMPTS`] in all), without holding a place among the two
    /// meanwhile. Attempts are idempotent: objects are content-addressed, references are a set,
    /// and [`Store::update_derived`] writes only the kind and the pictures, and never brings back
    /// an attachment deleted since; an attempt that finds it deleted drops the references it
    /// wrote, those of an attempt before it included (they name the same objects). Not covered:
    /// a process that stops while attempts remain leaves the image without pictures for good,
    /// and so does a last attempt that fails; the references to its pictures that a failed
    /// attempt wrote are orphans, which the collector drops a day after the upload began
    /// ([`ORPHANED_AFTER`]).
    fn spawn_derivatives(&self, attachment: Attachment) {
        let state = self.clone();
        tokio::spawn(async move {
            let mut backoff = DERIVATIVE_FIRST_BACKOFF;
            for attempt in 1..=DERIVATIVE_ATTEMPTS {
                let made = {
                    let Ok(_permit) = state.image_work.acquire().await else {
                        return;
                    };
                    state.make_derivatives(attachment.clone()).await
                };
                let Err(error) = made else {
                    return;
                };
                if attempt < DERIVATIVE_ATTEMPTS && may_pass(&error) {
                    metrics::counter!("confab_attachment_derivative_retries_total").increment(1);
                    tracing::info!(%error, attachment = %attachment.id, attempt, "making an image's thumbnail failed; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(DERIVATIVE_MAX_BACKOFF);
                    continue;
                }
                metrics::counter!("confab_attachment_derivative_failures_total").increment(1);
                tracing::warn!(%error, attachment = %attachment.id, attempt, "making an image's thumbnail failed");
                return;
            }
        });
    }

    async fn make_derivatives(&self, attachment: Attachment) -> ApiResult<()> {
        let settings = self.attachment_settings()?.clone();
        let name = BlobName::parse(&attachment.sha256)
            .ok_or_else(|| ApiError::BadRequest("bad hash".into()))?;
        let mut updated = attachment.clone();
        if let Some(image) = self
            .pictures_made_before(&attachment, settings.blobs.as_ref())
            .await?
        {
            metrics::counter!("confab_attachment_pictures_reused_total").increment(1);
            updated.image = Some(image);
            in_time(attachment.id)?;
            return self.store_derived(&updated, attachment.kind).await;
        }
        let made = if attachment.size > MAX_IMAGE_BYTES {
            Err("too many bytes to decode".to_owned())
        } else {
            let bytes = read_all(&settings.blobs, &name, attachment.size).await?;
            let max_pixels = settings.max_image_pixels;
            tokio::task::spawn_blocking(move || crate::images::derive(&bytes, max_pixels))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
        };
        match made {
            Ok(made) => {
                let mut thumbnail = made.thumbnail.derivative;
                let mut preview = made.preview.derivative;
                thumbnail.sha256 = BlobName::of(&made.thumbnail.bytes).to_string();
                preview.sha256 = BlobName::of(&made.preview.bytes).to_string();
                // References first, then the objects, then the metadata that names them.
                let names = vec![thumbnail.sha256.clone(), preview.sha256.clone()];
                updated.image = Some(ImageInfo {
                    width: made.width,
                    height: made.height,
                    thumbnail: Some(thumbnail),
                    preview: Some(preview),
                });
                in_time(attachment.id)?;
                self.store.add_blob_refs(attachment.id, &names).await?;
                for bytes in [made.thumbnail.bytes, made.preview.bytes] {
                    let name = BlobName::of(&bytes);
                    wait_out_collection(self.store.as_ref(), &name).await?;
                    settings.blobs.put(Bytes::from(bytes)).await?;
                }
                in_time(attachment.id)?;
                self.store_derived(&updated, attachment.kind).await?;
            }
            Err(why) => {
                tracing::info!(attachment = %attachment.id, %why, "an image is kept as a plain file");
                updated.kind = AttachmentKind::File;
                self.store_derived(&updated, attachment.kind).await?;
            }
        }
        Ok(())
    }

    /// The pictures another attachment of the same bytes has, once `attachment` references their
    /// objects and they are still there: the same image uploaded again (its bytes stored once)
    /// is not decoded again. Each decode of a large image costs hundreds of megabytes and a
    /// core for a while, and uploads of one image, free in storage, would otherwise queue them
    /// without end. `None` when no such attachment has its pictures yet (its own decode may be
    /// running), or an object of them went meanwhile (the collector removed it with its last
    /// attachment): the caller makes them, under the same names.
    async fn pictures_made_before(
        &self,
        attachment: &Attachment,
        blobs: &dyn Blobs,
    ) -> ApiResult<Option<ImageInfo>> {
        let others: Vec<Uuid> = self
            .store
            .blob_referrers(&attachment.sha256, None, SAME_BYTES_LOOKED_AT)
            .await?
            .into_iter()
            .filter(|id| *id != attachment.id)
            .collect();
        if others.is_empty() {
            return Ok(None);
        }
        let Some(image) = self
            .store
            .get_attachments(&others)
            .await?
            .into_iter()
            .filter(|other| other.sha256 == attachment.sha256)
            .find_map(|other| {
                other
                    .image
                    .filter(|image| image.thumbnail.is_some() && image.preview.is_some())
            })
        else {
            return Ok(None);
        };
        let names: Vec<String> = [&image.thumbnail, &image.preview]
            .into_iter()
            .flatten()
            .map(|picture| picture.sha256.clone())
            .collect();
        // References first, as for pictures made here: from then on the collector keeps them.
        in_time(attachment.id)?;
        self.store.add_blob_refs(attachment.id, &names).await?;
        for name in &names {
            let Some(name) = BlobName::parse(name) else {
                return Ok(None);
            };
            // A run of the collector that marked it before the reference landed may remove it.
            wait_out_collection(self.store.as_ref(), &name).await?;
            if blobs.size(&name).await?.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(image))
    }

    /// Stores what making an image's pictures found (`derived`'s kind and pictures), unless its
    /// message was deleted meanwhile: then only the references go. The store writes those fields
    /// alone, over the record as it is (the message it was sent in meanwhile stays), and never
    /// brings back a deleted attachment ([`Store::update_derived`]).
    async fn store_derived(
        &self,
        derived: &Attachment,
        stored_as: AttachmentKind,
    ) -> ApiResult<()> {
        let stored = self
            .store
            .update_derived(
                derived.id,
                derived.chat_id,
                stored_as,
                derived.kind,
                derived.image.as_ref(),
            )
            .await?;
        if stored.is_none() {
            self.store
                .delete_attachments(std::slice::from_ref(derived))
                .await?;
        }
        Ok(())
    }
}

/// What a send's claim on its attachments came to.
pub(crate) enum Claimed {
    /// The message holds them (their records say so, and these copies too).
    Attachments(Vec<Attachment>),
    /// The send is a retry of this stored message, which holds them.
    RetryOf(Signal),
    /// The send is a retry of an attempt of its nonce whose message the store has the nonce's
    /// record of but may not have written; that attempt holds these attachments (its message
    /// does), and storing this send's message answers with it.
    AttemptOf(Vec<Attachment>),
}

/// What checking a message's attachments found.
enum Checked {
    Unsent(Vec<Attachment>),
    RetryOf(Signal),
}

/// How long a send with a nonce waits on another send that claimed one of its attachments and is
/// not stored yet: it may be an attempt of the same nonce, whose message is then the answer.
const CLAIM_WAIT: Duration = Duration::from_secs(5);
const CLAIM_POLL: Duration = Duration::from_millis(20);

fn not_an_upload(id: Uuid) -> ApiError {
    ApiError::Unprocessable(format!(
        "attachment {id} is not one of your uploads to this chat"
    ))
}

fn taken_meanwhile(id: Uuid) -> ApiError {
    ApiError::Conflict(format!(
        "attachment {id} was taken by another message sent at the same time; upload it again to \
         send it again"
    ))
}

/// Images of more bytes than this are not decoded (kept as plain files).
const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// The whole of a (bounded) object in memory, for decoding.
/// The object a download serves: the original or one of its pictures.
struct Served {
    name: BlobName,
    sha256: String,
    size: u64,
    content_type: String,
    inline: bool,
    /// The bytes asked for (`Range`), resolved against the size.
    span: Span,
}

impl Served {
    fn of(attachment: &Attachment, variant: Variant, range: Option<&str>) -> ApiResult<Self> {
        let (sha256, size, content_type, inline) = match variant {
            Variant::Original => (
                attachment.sha256.clone(),
                attachment.size,
                attachment.content_type.clone(),
                attachment.kind == AttachmentKind::Image,
            ),
            Variant::Thumbnail | Variant::Preview => {
                let image = attachment.image.as_ref();
                let derivative = match variant {
                    Variant::Thumbnail => image.and_then(|i| i.thumbnail.as_ref()),
                    _ => image.and_then(|i| i.preview.as_ref()),
                }
                .ok_or(ApiError::NotFound("this attachment has no such picture"))?;
                (
                    derivative.sha256.clone(),
                    derivative.size,
                    derivative.content_type.clone(),
                    true,
                )
            }
        };
        let name = BlobName::parse(&sha256)
            .ok_or_else(|| ApiError::Store(crate::store::StoreError::Corrupt("bad hash".into())))?;
        Ok(Self {
            name,
            sha256,
            size,
            content_type,
            inline,
            span: resolve_range(range, size),
        })
    }

    /// Whether the client's copy (`If-None-Match`) is this object. The comparison is weak (RFC
    /// 9110, 13.1.2): `W/"…"` names the same copy as `"…"`.
    fn is_current(&self, if_none_match: Option<&str>) -> bool {
        let etag = format!("\"{}\"", self.sha256);
        if_none_match.is_some_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag)
        })
    }

    /// Whether this download is answered with a presigned URL, where the storage makes one.
    fn redirects(&self, settings: &AttachmentSettings) -> bool {
        settings.presigned_redirect && self.size > settings.served_up_to
    }
}

/// The bytes of `span` of `name`, or `None` when no byte of the range exists.
async fn read_span(
    blobs: &Arc<dyn Blobs>,
    name: &BlobName,
    size: u64,
    span: Span,
) -> ApiResult<Option<BlobRead>> {
    let range = match span {
        Span::Unsatisfiable => return Ok(None),
        Span::Whole => None,
        Span::Part(start, end) => Some((start, end)),
    };
    blobs
        .get_sized(name, size, range)
        .await
        .map(Some)
        .map_err(|e| match e {
            BlobError::NotFound => ApiError::NotFound("the attachment's bytes are gone"),
            other => ApiError::Blobs(other),
        })
}

/// Attempts at an image's pictures, at most (`spawn_derivatives`).
const DERIVATIVE_ATTEMPTS: u32 = 6;
/// The wait before the second attempt; it doubles for each attempt after, up to the most.
const DERIVATIVE_FIRST_BACKOFF: Duration = Duration::from_millis(500);
const DERIVATIVE_MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Whether an attempt that failed with `error` may pass if made again: the store or the storage
/// was unavailable, not what was read.
fn may_pass(error: &ApiError) -> bool {
    matches!(
        error,
        ApiError::Store(StoreError::Unavailable(_) | StoreError::NotWritten(_))
            | ApiError::Blobs(BlobError::Unavailable(_))
    )
}

async fn read_all(blobs: &Arc<dyn Blobs>, name: &BlobName, size: u64) -> ApiResult<Vec<u8>> {
    use futures::StreamExt;
    let mut read = blobs.get_sized(name, size, None).await?;
    let mut bytes = Vec::with_capacity(usize::try_from(read.len).unwrap_or(0));
    while let Some(chunk) = read.chunks.next().await {
        bytes.extend_from_slice(&chunk.map_err(|e| BlobError::Unavailable(e.to_string()))?);
    }
    Ok(bytes)
}

/// What an upload is, known before its bytes are stored.
struct Upload {
    id: Uuid,
    chat: ChatId,
    name: String,
    content_type: String,
    kind: AttachmentKind,
}

/// Reads the first `want` bytes of `body` (fewer if it is shorter), and answers them with the
/// whole body, those bytes included, to stream on.
async fn peek(mut body: ByteChunks, want: usize) -> ApiResult<(Vec<u8>, ByteChunks)> {
    use futures::StreamExt;
    let mut read: Vec<Bytes> = Vec::new();
    let mut head = Vec::with_capacity(want);
    while head.len() < want {
        match body.next().await {
            Some(Ok(chunk)) => {
                let take = (want - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
                read.push(chunk);
            }
            Some(Err(error)) => return Err(ApiError::Blobs(BlobError::Body(error.to_string()))),
            None => break,
        }
    }
    let again = futures::stream::iter(read.into_iter().map(Ok)).chain(body);
    Ok((head, Box::pin(again)))
}

fn too_large(max: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!("an attachment is at most {max} bytes"))
}

/// Waits while the collector holds a mark on `name` (a collection of it may be under way), up to
/// the mark's end and a margin. Called after the caller's reference is stored: a collection that
/// starts later sees the reference, so once this returns the object may be written and stays.
async fn wait_out_collection(store: &dyn Store, name: &BlobName) -> ApiResult<()> {
    let deadline = tokio::time::Instant::now() + CONDEMN_LEASE + LEASE_MARGIN * 2;
    loop {
        let Some(until) = store.blob_condemned(name.as_str()).await? else {
            return Ok(());
        };
        if OffsetDateTime::now_utc() > until + LEASE_MARGIN {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::Blobs(BlobError::Unavailable(
                "an object stayed marked for collection".into(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long after an upload began its reference to an object may stand without a record naming
/// the object: longer than an upload may take ([`MAX_UPLOAD_TIME`]) and than its pictures'
/// attempts after it. A reference older than this that no record names is an orphan: its upload
/// stopped with its process (or a removal stopped halfway, or a picture's last attempt failed),
/// and no one will ever write that record.
pub const ORPHANED_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How many other attachments of an image's bytes are looked at for pictures made already
/// ([`ApiState::pictures_made_before`]).
const SAME_BYTES_LOOKED_AT: usize = 16;
/// The longest `attachments.upload_timeout_secs` may give an upload's body, well within
/// [`ORPHANED_AFTER`].
pub const MAX_UPLOAD_TIME: Duration =
    Duration::from_secs(confab_runtime::config::MAX_UPLOAD_TIMEOUT_SECS);
/// How many references to one object the collector reads at a time.
const REFERRERS_PAGE: usize = 20;
/// The latest, after its upload began, that an upload or its pictures' attempt writes a record
/// naming an object ([`in_time`]): well within [`ORPHANED_AFTER`], whatever held it up (a
/// storage request that hung, a queue of images), so that no reference the collector takes for
/// an orphan has a record still to come.
const LAST_RECORD_WRITE: Duration = Duration::from_secs(22 * 3600);
// An upload ends before its last record write, which comes before its references are orphans.
const _: () = assert!(
    MAX_UPLOAD_TIME.as_secs() < LAST_RECORD_WRITE.as_secs()
        && LAST_RECORD_WRITE.as_secs() < ORPHANED_AFTER.as_secs()
);

/// How long ago the upload that made attachment `id` began (a UUIDv7 carries the time); `None`
/// for an id without a time.
fn upload_age(id: Uuid, now: OffsetDateTime) -> Option<time::Duration> {
    let (secs, nanos) = id.get_timestamp()?.to_unix();
    let began = OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    Some(now - (began + Duration::from_nanos(u64::from(nanos))))
}

/// Refuses to write a record naming objects for attachment `id` later than
/// [`LAST_RECORD_WRITE`] after its upload began: by then the collector may have dropped the
/// references.
fn in_time(id: Uuid) -> ApiResult<()> {
    match upload_age(id, OffsetDateTime::now_utc()) {
        Some(age) if age > LAST_RECORD_WRITE => Err(ApiError::TimedOut(format!(
            "attachment {id} began {} h ago, too long to be recorded now; nothing was kept",
            age.whole_hours()
        ))),
        _ => Ok(()),
    }
}

/// `body`, failing once `until` has passed (and then setting `cut`): an upload cannot take
/// longer than `limit` however steadily it trickles in.
fn within(
    body: ByteChunks,
    until: tokio::time::Instant,
    limit: Duration,
    cut: Arc<std::sync::atomic::AtomicBool>,
) -> ByteChunks {
    use futures::StreamExt;
    let deadline = Box::pin(tokio::time::sleep_until(until));
    futures::stream::unfold(Some((body, deadline)), move |state| {
        let cut = Arc::clone(&cut);
        async move {
            let (mut body, mut deadline) = state?;
            tokio::select! {
                biased;
                () = &mut deadline => {
                    cut.store(true, std::sync::atomic::Ordering::Relaxed);
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("the upload took longer than {} s", limit.as_secs()),
                        )),
                        None,
                    ))
                }
                chunk = body.next() => chunk.map(|chunk| (chunk, Some((body, deadline)))),
            }
        }
    })
    // Polled again after its end, it ends again.
    .fuse()
    .boxed()
}

/// Whether the object `name` is in use: an attachment record names it, or an upload (or its
/// pictures' attempt) that began within [`ORPHANED_AFTER`] references it and may still write
/// that record. The references it finds orphaned are dropped on the way (counted in `done`).
///
/// An orphan never comes back to life: its attachment's record does not exist and never will, or
/// exists and does not name the object and never will: an upload and its pictures' attempts
/// write no record naming an object later than [`LAST_RECORD_WRITE`] after the upload began
/// ([`in_time`]), and the body of an upload is cut after `attachments.upload_timeout_secs`, at
/// most [`MAX_UPLOAD_TIME`].
async fn referenced(store: &dyn Store, name: &BlobName, done: &mut Collected) -> ApiResult<bool> {
    let now = OffsetDateTime::now_utc();
    let mut after = None;
    loop {
        let referrers = store
            .blob_referrers(name.as_str(), after, REFERRERS_PAGE)
            .await?;
        let Some(&last) = referrers.last() else {
            return Ok(false);
        };
        after = Some(last);
        // An id without a time in it is not an upload's: it is kept, whatever it is.
        let recent = |id: &Uuid| upload_age(*id, now).is_none_or(|age| age < ORPHANED_AFTER);
        if referrers.iter().any(recent) {
            return Ok(true);
        }
        let records = store.get_attachments(&referrers).await?;
        if records
            .iter()
            .any(|record| record.blobs().contains(&name.as_str()))
        {
            return Ok(true);
        }
        for orphan in &referrers {
            store.drop_blob_ref(name.as_str(), *orphan).await?;
            done.orphans_dropped += 1;
        }
        if referrers.len() < REFERRERS_PAGE {
            return Ok(false);
        }
    }
}

/// What one run of the collector did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub scanned: u64,
    pub removed: u64,
    pub removed_bytes: u64,
    /// References to objects dropped as orphans (see [`ORPHANED_AFTER`]).
    pub orphans_dropped: u64,
    /// Staging objects (and unfinished multipart uploads) older than a day, removed.
    pub swept: u64,
}

/// Removes every object no attachment references, reporting progress after each object. Never
/// removes a referenced one, even while an upload of the same bytes runs (see the module's
/// documentation). Objects modified within `min_age` are left for a later run.
pub async fn collect_garbage(
    store: &dyn Store,
    blobs: &dyn Blobs,
    min_age: Duration,
    mut progress: impl FnMut(&Collected),
) -> ApiResult<Collected> {
    let mut done = Collected::default();
    let mut after: Option<BlobName> = None;
    // This run's marks: it lifts only its own, never those of a run beside it.
    let run = Uuid::new_v4();
    loop {
        let page = blobs.list(after.as_ref(), 1000).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.name.clone());
        for object in page {
            done.scanned += 1;
            let young = OffsetDateTime::now_utc() - object.modified < min_age;
            if !young && remove_unreferenced(store, blobs, &object.name, run, &mut done).await? {
                done.removed += 1;
                done.removed_bytes += object.size;
            }
            progress(&done);
        }
    }
    done.swept = blobs.sweep_staging(Duration::from_secs(24 * 3600)).await?;
    progress(&done);
    Ok(done)
}

/// Removes object `name` if nothing references it (see [`referenced`]), under a mark of
/// collector run `run`: `true` when it was removed.
async fn remove_unreferenced(
    store: &dyn Store,
    blobs: &dyn Blobs,
    name: &BlobName,
    run: Uuid,
    done: &mut Collected,
) -> ApiResult<bool> {
    if referenced(store, name, done).await? {
        return Ok(false);
    }
    let until = OffsetDateTime::now_utc() + CONDEMN_LEASE;
    store.condemn_blob(name.as_str(), run, until).await?;
    // After the mark: an upload that wrote its reference before it saw no mark is seen here; one
    // that writes it later sees the mark and waits.
    let still_referenced = referenced(store, name, done).await?;
    let left = until - OffsetDateTime::now_utc() - LEASE_MARGIN;
    let mut removed = false;
    if !still_referenced && left.is_positive() {
        // Within the mark, less the margin an upload waits beyond it: a removal (and the storage
        // client's retries) still running after that could remove an object written again
        // meanwhile.
        let remaining = Duration::try_from(left).unwrap_or_default();
        match tokio::time::timeout(remaining, blobs.delete(name)).await {
            Ok(deleted) => deleted?,
            Err(_) => {
                return Err(ApiError::Blobs(BlobError::Unavailable(format!(
                    "removing an object took longer than {} s",
                    remaining.as_secs()
                ))));
            }
        }
        removed = true;
    }
    store.absolve_blob(name.as_str(), run).await?;
    Ok(removed)
}

/// A made picture: its bytes and description (the hash is filled in by the caller).
#[derive(Debug)]
pub struct Made {
    pub bytes: Vec<u8>,
    pub derivative: Derivative,
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;
    use uuid::Uuid;

    use super::{disposition, file_name_shown, in_time};
    use crate::error::ApiError;

    /// The id of an attachment whose upload began `hours` ago.
    fn began_hours_ago(hours: i64) -> Uuid {
        let at = OffsetDateTime::now_utc() - time::Duration::hours(hours);
        let secs = u64::try_from(at.unix_timestamp()).unwrap();
        Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            secs,
            at.nanosecond(),
        ))
    }

    /// A record naming objects is written only well before the collector takes the upload's
    /// references for orphans: not 23 hours after the upload began, still 21 hours after, and
    /// always for an id that carries no time (written before ids were UUIDv7).
    #[test]
    fn records_are_written_only_well_before_references_are_orphans() {
        assert!(
            matches!(in_time(began_hours_ago(23)), Err(ApiError::TimedOut(_))),
            "a record written 23 hours after its upload began"
        );
        assert!(in_time(began_hours_ago(21)).is_ok());
        assert!(in_time(Uuid::new_v4()).is_ok());
    }

    #[test]
    fn dispositions_carry_ascii_only_and_no_bidi_controls() {
        assert_eq!(
            disposition(false, "report (1).pdf"),
            "attachment; filename=\"report (1).pdf\"; filename*=UTF-8''report%20%281%29.pdf"
        );
        assert_eq!(
            disposition(true, "фото.jpg"),
            "inline; filename=\"____.jpg\"; filename*=UTF-8''%D1%84%D0%BE%D1%82%D0%BE.jpg"
        );
        // A name stored before uploads refused such characters: the override shows in neither
        // form (U+202E is E2 80 AE in UTF-8), nor does a line break.
        for name in ["invoice\u{202E}fdp.exe", "a\u{200F}b\r\nc.txt"] {
            let header = disposition(false, name);
            assert!(header.is_ascii(), "{header}");
            assert!(!header.contains("%E2%80"), "{header}");
            assert!(!header.contains(['\r', '\n']), "{header}");
            assert!(axum::http::HeaderValue::from_str(&header).is_ok());
        }
        assert_eq!(
            disposition(false, "invoice\u{202E}fdp.exe"),
            "attachment; filename=\"invoice_fdp.exe\"; filename*=UTF-8''invoice_fdp.exe"
        );
        assert_eq!(file_name_shown("invoice\u{202E}fdp.exe"), "invoice_fdp.exe");
        assert_eq!(file_name_shown("фото (1).jpg"), "фото (1).jpg");
    }
}
