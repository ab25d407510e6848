//! Attachments: files uploaded to a chat, stored once per distinct content (named by SHA-256), and
//! referred to by messages.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::{ChatId, UserId};

/// Longest attachment file name, in bytes.
pub const MAX_ATTACHMENT_NAME_BYTES: usize = 255;
/// Most attachments one message refers to.
pub const MAX_ATTACHMENTS_PER_MESSAGE: usize = 10;
/// The longest side of a thumbnail, in pixels.
pub const THUMBNAIL_SIZE: u32 = 320;
/// The longest side of a low-quality preview, in pixels.
pub const PREVIEW_SIZE: u32 = 32;

/// Whether an attachment shows as an image (PNG, JPEG, WebP or GIF whose bytes say so) or as a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentKind {
    Image,
    File,
}

impl AttachmentKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttachmentKind::Image => "image",
            AttachmentKind::File => "file",
        }
    }
}

/// A smaller picture made from an image: its bytes are served at
/// `/v1/attachments/{id}/thumbnail` or `/v1/attachments/{id}/preview`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Derivative {
    /// SHA-256 of its bytes, lower-case hex: its id and its `ETag`.
    pub sha256: String,
    pub size: u64,
    pub width: u32,
    pub height: u32,
    pub content_type: String,
}

/// What an image attachment adds: its dimensions, and its thumbnail and preview once made (they
/// are made after the upload answers; an image that cannot be decoded gets neither).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImageInfo {
    pub width: u32,
    pub height: u32,
    /// Up to 320 px on its longest side, WebP or PNG, without metadata (EXIF, GPS).
    #[serde(default)]
    pub thumbnail: Option<Derivative>,
    /// Up to 32 px on its longest side, a few hundred bytes: to show while the rest loads.
    #[serde(default)]
    pub preview: Option<Derivative>,
}

/// An uploaded file's metadata. The bytes are at `GET /v1/attachments/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attachment {
    pub id: Uuid,
    pub chat_id: ChatId,
    /// The file name given at upload.
    pub name: String,
    pub size: u64,
    pub content_type: String,
    /// SHA-256 of the bytes, lower-case hex (also the download's `ETag`).
    pub sha256: String,
    pub kind: AttachmentKind,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub uploader: UserId,
    /// Set for images: dimensions, thumbnail and preview.
    #[serde(default)]
    pub image: Option<ImageInfo>,
    /// The message it was sent in, once sent: an upload goes in one message (deleting that
    /// message hides it, which must not take it from another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<crate::SignalId>,
}

impl Attachment {
    /// Every object this attachment uses: its bytes, thumbnail and preview.
    pub fn blobs(&self) -> Vec<&str> {
        let mut blobs = vec![self.sha256.as_str()];
        if let Some(image) = &self.image {
            blobs.extend(image.thumbnail.iter().map(|d| d.sha256.as_str()));
            blobs.extend(image.preview.iter().map(|d| d.sha256.as_str()));
        }
        blobs
    }
}

/// An attachment as a signal carries it: its metadata, or only its id where it was not looked up
/// (stores keep ids; the API fills in the metadata of every signal it answers or publishes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum AttachmentRef {
    Full(Box<Attachment>),
    Id(Uuid),
}

impl AttachmentRef {
    pub fn id(&self) -> Uuid {
        match self {
            AttachmentRef::Full(attachment) => attachment.id,
            AttachmentRef::Id(id) => *id,
        }
    }
}

impl From<Uuid> for AttachmentRef {
    fn from(id: Uuid) -> AttachmentRef {
        AttachmentRef::Id(id)
    }
}

impl From<Attachment> for AttachmentRef {
    fn from(attachment: Attachment) -> AttachmentRef {
        AttachmentRef::Full(Box::new(attachment))
    }
}
