//! The error responses of the API's OpenAPI description, declared once. Every error is an
//! `application/problem+json` body (see `crate::error`, the one place errors become HTTP). A handler
//! lists its success responses and then the groups below that apply to it.

use confab_runtime::Problem;
use utoipa::IntoResponses;

/// Every authenticated call: malformed input, a missing or invalid token, and the store or the bus
/// being down.
#[allow(dead_code)] // Variants exist for the OpenAPI description only.
#[derive(IntoResponses)]
pub(crate) enum CallerErrors {
    #[response(
        status = 400,
        description = "Malformed request",
        content_type = "application/problem+json"
    )]
    Malformed(Problem),
    #[response(
        status = 401,
        description = "Missing or invalid token",
        content_type = "application/problem+json"
    )]
    Unauthenticated(Problem),
    #[response(
        status = 503,
        description = "A dependency is unavailable",
        content_type = "application/problem+json"
    )]
    Unavailable(Problem),
}

/// Calls on one chat or something in it: the [`CallerErrors`], plus refusals to non-members and
/// unknown chats.
#[allow(dead_code)] // Variants exist for the OpenAPI description only.
#[derive(IntoResponses)]
pub(crate) enum ChatErrors {
    #[response(
        status = 400,
        description = "Malformed request",
        content_type = "application/problem+json"
    )]
    Malformed(Problem),
    #[response(
        status = 401,
        description = "Missing or invalid token",
        content_type = "application/problem+json"
    )]
    Unauthenticated(Problem),
    #[response(
        status = 403,
        description = "Not allowed",
        content_type = "application/problem+json"
    )]
    Forbidden(Problem),
    #[response(
        status = 404,
        description = "Not found",
        content_type = "application/problem+json"
    )]
    NotFound(Problem),
    #[response(
        status = 503,
        description = "A dependency is unavailable",
        content_type = "application/problem+json"
    )]
    Unavailable(Problem),
}

/// Content that is well-formed but breaks a rule (lengths, kinds, roles, the last owner…).
#[allow(dead_code)] // Exists for the OpenAPI description only.
#[derive(IntoResponses)]
#[response(
    status = 422,
    description = "Invalid content",
    content_type = "application/problem+json"
)]
pub(crate) struct Invalid(Problem);

/// Uploads: a body over the size limit, or slower than the time limit, or a type that
/// contradicts the bytes.
#[allow(dead_code)] // Variants exist for the OpenAPI description only.
#[derive(IntoResponses)]
pub(crate) enum UploadErrors {
    #[response(
        status = 413,
        description = "The body is larger than attachments.max_bytes; nothing was kept",
        content_type = "application/problem+json"
    )]
    TooLarge(Problem),
    #[response(
        status = 408,
        description = "The upload took longer than attachments.upload_timeout_secs; nothing was kept",
        content_type = "application/problem+json"
    )]
    TimedOut(Problem),
    #[response(
        status = 415,
        description = "The declared type is malformed or contradicts the file's contents",
        content_type = "application/problem+json"
    )]
    Unsupported(Problem),
}

/// Calls limited per user and class (`limits.*`): too many in a short time.
#[allow(dead_code)] // Exists for the OpenAPI description only.
#[derive(IntoResponses)]
#[response(
    status = 429,
    description = "Over a rate limit; the `Retry-After` header (and `retry_after` in the body) says how many seconds to wait",
    content_type = "application/problem+json"
)]
pub(crate) struct Limited(Problem);

/// What a circle or a matching queue adds to the [`ChatErrors`] (listed beside them and
/// [`Invalid`]): conflicts (a full circle, another queue) and expired circles.
#[allow(dead_code)] // Variants exist for the OpenAPI description only.
#[derive(IntoResponses)]
pub(crate) enum CircleErrors {
    #[response(
        status = 409,
        description = "Conflicts with the current state (a full circle, already in another queue; type `matched`: a leave found the wait taken by a match, which stands)",
        content_type = "application/problem+json"
    )]
    Conflict(Problem),
    #[response(
        status = 410,
        description = "The circle has expired",
        content_type = "application/problem+json"
    )]
    Gone(Problem),
}
/// The target's state does not allow the request now (a call that is over or full).
#[allow(dead_code)] // Exists for the OpenAPI description only.
#[derive(IntoResponses)]
#[response(
    status = 409,
    description = "Not possible in the current state",
    content_type = "application/problem+json"
)]
pub(crate) struct Conflict(Problem);

/// A signalling payload over its size limit.
#[allow(dead_code)] // Exists for the OpenAPI description only.
#[derive(IntoResponses)]
#[response(
    status = 413,
    description = "The payload is larger than the limit",
    content_type = "application/problem+json"
)]
pub(crate) struct TooLarge(Problem);
