//! The API's errors and their one mapping to HTTP problem responses (also used for WebSocket error
//! frames, through [`Problem`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use confab_runtime::Problem;
use confab_runtime::blobs::BlobError;
use confab_runtime::bus::BusError;
use confab_runtime::identity::AuthError;
use confab_runtime::limits::Limited;
use confab_runtime::search::SearchError;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    /// The request is malformed (syntax, bad id, bad cursor, parameter out of range).
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but its content breaks a rule.
    #[error("{0}")]
    Unprocessable(String),
    /// The request conflicts with the current state (already in another queue, joining a call
    /// that is over…).
    #[error("{0}")]
    Conflict(String),
    /// A leave of a queue or a circle's lobby found the caller's wait taken by a match (or
    /// pairing) made meanwhile: the match stands, and a leave again ends it.
    #[error("{0}")]
    Matched(&'static str),
    /// The thing existed and has expired.
    #[error("{0}")]
    Gone(&'static str),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request took longer than it may (an upload past `attachments.upload_timeout_secs`).
    #[error("{0}")]
    TimedOut(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Search(#[from] SearchError),
    /// This process has no search engine.
    #[error("search is not enabled")]
    SearchDisabled,
    #[error(transparent)]
    Blobs(#[from] BlobError),
    /// Over a rate limit.
    #[error(transparent)]
    Limited(#[from] Limited),
}

impl From<&ApiError> for Problem {
    fn from(error: &ApiError) -> Problem {
        match error {
            ApiError::Auth(auth) => Problem::from(auth),
            ApiError::Forbidden(why) => Problem::new(StatusCode::FORBIDDEN, "forbidden", *why),
            ApiError::NotFound(what) => Problem::new(StatusCode::NOT_FOUND, "not-found", *what),
            ApiError::BadRequest(why) => {
                Problem::new(StatusCode::BAD_REQUEST, "bad-request", why.clone())
            }
            ApiError::Unprocessable(why) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-content",
                why.clone(),
            ),
            ApiError::Conflict(why) => Problem::new(StatusCode::CONFLICT, "conflict", why.clone()),
            ApiError::Matched(why) => Problem::new(StatusCode::CONFLICT, "matched", *why),
            ApiError::Gone(what) => Problem::new(StatusCode::GONE, "gone", *what),
            ApiError::UnsupportedMediaType(why) => Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                why.clone(),
            ),
            ApiError::PayloadTooLarge(why) => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                why.clone(),
            ),
            ApiError::TimedOut(why) => {
                Problem::new(StatusCode::REQUEST_TIMEOUT, "request-timeout", why.clone())
            }
            ApiError::Store(StoreError::Unavailable(_) | StoreError::NotWritten(_)) => {
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store-unavailable",
                    "the signal store is unavailable; try again",
                )
            }
            ApiError::Store(StoreError::Corrupt(_)) => Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "store-corrupt",
                "stored data could not be read",
            ),
            ApiError::Bus(_) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus-unavailable",
                "the event bus is unavailable; try again",
            ),
            ApiError::Search(_) | ApiError::SearchDisabled => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "search-unavailable",
                "search is unavailable; try again",
            ),
            ApiError::Blobs(BlobError::Unavailable(_)) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "blobs-unavailable",
                "attachment storage is unavailable; try again",
            ),
            ApiError::Blobs(BlobError::TooLarge(max)) => Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                format!("an attachment is at most {max} bytes"),
            ),
            ApiError::Blobs(BlobError::Body(why)) => {
                Problem::new(StatusCode::BAD_REQUEST, "bad-request", why.clone())
            }
            ApiError::Limited(limited) => Problem::from(limited),
            ApiError::Blobs(BlobError::Mismatch(actual)) => Problem::new(
                StatusCode::BAD_REQUEST,
                "digest-mismatch",
                format!(
                    "the body's SHA-256 ({actual}) is not the one its Content-Digest declares; nothing was stored"
                ),
            ),
            ApiError::Blobs(BlobError::NotFound) => {
                Problem::new(StatusCode::NOT_FOUND, "not-found", "no such attachment")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match &self {
            ApiError::Auth(auth) => return auth.clone().into_response(),
            ApiError::Store(error) => tracing::warn!(%error, "store error"),
            ApiError::Bus(error) => tracing::warn!(%error, "bus error"),
            ApiError::Search(error) => tracing::warn!(%error, "search error"),
            ApiError::Blobs(error @ BlobError::Unavailable(_)) => {
                tracing::warn!(%error, "blob storage error")
            }
            _ => {}
        }
        Problem::from(&self).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
