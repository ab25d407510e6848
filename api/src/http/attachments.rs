//! Attachments: upload (the raw body, streamed), download (streamed, with ranges, or a redirect to
//! a presigned URL), a chat's list.

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use confab_schema::{Attachment, AttachmentKind, ChatId};
use futures::TryStreamExt;
use serde::Deserialize;
use utoipa::IntoParams;
use uuid::Uuid;

use super::responses::{ChatErrors, Invalid, Limited, UploadErrors};
use super::{ApiPath, ApiQuery, Caller};
use crate::domain::Page;
use crate::domain::attachments::{Download, Span, Variant};
use crate::domain::inputs::{AttachmentName, DeclaredDigest, DeclaredType, PageLimit};
use crate::error::{ApiError, ApiResult};
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct UploadQuery {
    /// The file name: 1 to 255 bytes, without path separators, control characters or
    /// bidirectional formatting characters (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to
    /// U+2069); else 400.
    name: Option<String>,
}

/// Uploads a file to a chat (members only). The body is the file's bytes, with its
/// `Content-Type`; it is streamed to storage and hashed on the way. The same bytes uploaded again
/// are stored once. Images (PNG, JPEG, WebP, GIF) get a thumbnail and a preview shortly after.
/// A client that declares the body's SHA-256 in `Content-Digest` has it written once, straight
/// to its content address (faster on S3), and refused with 400 `digest-mismatch` if the body
/// does not match.
#[utoipa::path(
    post, operation_id = "upload_attachment", path = "/v1/chats/{chat_id}/attachments", tag = "attachments",
    params(
        ("chat_id" = ChatId, Path, description = "The chat"),
        UploadQuery,
        ("Content-Digest" = Option<String>, Header, description = "The body's SHA-256 (RFC 9530): `sha-256=:<base64>:`"),
    ),
    request_body(content = Vec<u8>, description = "The file's bytes", content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = Attachment),
        ChatErrors, Limited, UploadErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn upload(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Attachment>)> {
    state.throttle(Class::Upload, caller.id)?;
    let name = AttachmentName::parse(query.name)?;
    let declared = DeclaredType::parse(
        headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap_or("invalid")),
    )?;
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let digest = headers
        .get("content-digest")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::BadRequest("Content-Digest must be visible ASCII".into()))
        })
        .transpose()?;
    let digest = DeclaredDigest::parse(digest)?;
    let chunks = Box::pin(body.into_data_stream().map_err(std::io::Error::other));
    let attachment = state
        .upload_attachment(&caller, chat_id, name, declared, length, digest, chunks)
        .await?;
    Ok((StatusCode::CREATED, Json(attachment)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListAttachments {
    /// 1 to 100; default 50.
    limit: Option<usize>,
    /// From a previous page's `next_cursor`.
    cursor: Option<String>,
    /// `image` or `file`; default both.
    kind: Option<AttachmentKind>,
}

/// A chat's attachments (members only), newest first. Attachments of deleted messages are gone.
#[utoipa::path(
    get, operation_id = "list_attachments", path = "/v1/chats/{chat_id}/attachments", tag = "attachments",
    params(("chat_id" = ChatId, Path, description = "The chat"), ListAttachments),
    responses(
        (status = 200, description = "OK", body = Page<Attachment>),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiQuery(query): ApiQuery<ListAttachments>,
) -> ApiResult<Json<Page<Attachment>>> {
    let limit = PageLimit::parse(query.limit)?;
    Ok(Json(
        state
            .list_attachments(
                caller.id,
                chat_id,
                query.kind,
                query.cursor.as_deref(),
                limit,
            )
            .await?,
    ))
}

/// An attachment's bytes (members of its chat only; 404 for anyone else). Supports one `Range`
/// and `If-None-Match` (the `ETag` is the SHA-256). Files other than images are served as
/// downloads (`Content-Disposition: attachment`, `X-Content-Type-Options: nosniff`). With
/// `attachments.presigned_redirect`, a 307 to a short-lived presigned URL instead.
#[utoipa::path(
    get, operation_id = "download_attachment", path = "/v1/attachments/{attachment_id}", tag = "attachments",
    params(("attachment_id" = Uuid, Path, description = "The attachment")),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 206, description = "The range asked for", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 304, description = "Not modified"),
        (status = 307, description = "Redirect to a presigned URL"),
        (status = 416, description = "No byte of the range exists"),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn download(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(state, caller.id, id, Variant::Original, &headers).await
}

/// An image attachment's thumbnail (at most 320 px on its longest side), once made.
#[utoipa::path(
    get, operation_id = "download_thumbnail", path = "/v1/attachments/{attachment_id}/thumbnail", tag = "attachments",
    params(("attachment_id" = Uuid, Path, description = "The attachment")),
    responses(
        (status = 200, description = "The picture", content_type = "image/jpeg", body = Vec<u8>),
        (status = 304, description = "Not modified"),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn thumbnail(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(state, caller.id, id, Variant::Thumbnail, &headers).await
}

/// An image attachment's low-quality preview (at most 32 px), once made.
#[utoipa::path(
    get, operation_id = "download_preview", path = "/v1/attachments/{attachment_id}/preview", tag = "attachments",
    params(("attachment_id" = Uuid, Path, description = "The attachment")),
    responses(
        (status = 200, description = "The picture", content_type = "image/jpeg", body = Vec<u8>),
        (status = 304, description = "Not modified"),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn preview(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(id): ApiPath<Uuid>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(state, caller.id, id, Variant::Preview, &headers).await
}

async fn serve(
    state: ApiState,
    caller: confab_schema::UserId,
    id: Uuid,
    variant: Variant,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let download = state
        .download(
            caller,
            id,
            variant,
            text(header::RANGE),
            text(header::IF_NONE_MATCH),
        )
        .await?;
    // The bytes under an id never change, so an answer may be kept for a while; not a redirect,
    // whose presigned URL expires (`attachments.presigned_ttl_secs`) long before, and which a
    // browser must ask for again each time (which checks the membership again, too).
    let mut cache_control = "private, max-age=3600";
    let mut response = match download {
        Download::Redirect(url) => {
            cache_control = "no-store";
            let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
            if let Ok(location) = HeaderValue::from_str(&url) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            response
        }
        Download::NotModified { sha256 } => {
            let mut response = StatusCode::NOT_MODIFIED.into_response();
            set(&mut response, header::ETAG, &format!("\"{sha256}\""));
            response
        }
        Download::Unsatisfiable { size } => {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            set(
                &mut response,
                header::CONTENT_RANGE,
                &format!("bytes */{size}"),
            );
            response
        }
        Download::Bytes {
            read,
            span,
            size,
            sha256,
            content_type,
            disposition,
        } => {
            let len = read.len;
            let mut response = Body::from_stream(read.chunks).into_response();
            if let Span::Part(start, end) = span {
                *response.status_mut() = StatusCode::PARTIAL_CONTENT;
                set(
                    &mut response,
                    header::CONTENT_RANGE,
                    &format!("bytes {start}-{end}/{size}"),
                );
            }
            set(&mut response, header::CONTENT_LENGTH, &len.to_string());
            set(&mut response, header::CONTENT_TYPE, &content_type);
            set(&mut response, header::CONTENT_DISPOSITION, &disposition);
            set(&mut response, header::ETAG, &format!("\"{sha256}\""));
            set(&mut response, header::ACCEPT_RANGES, "bytes");
            // Nothing the file holds may run in the app's origin, whatever a browser guesses.
            set(
                &mut response,
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; sandbox",
            );
            response
        }
    };
    set(&mut response, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(&mut response, header::CACHE_CONTROL, cache_control);
    Ok(response)
}

fn set(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, value);
    }
}
