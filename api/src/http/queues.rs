use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::circle::PairingStatus;

use super::circles::status_code;
use super::responses::{ChatErrors, CircleErrors, Invalid, Limited};
use super::{ApiPath, Caller};
use crate::domain::inputs::queue_kind;
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

/// Joins a matching queue (`vent` is matched with `listen`, `talk` with `talk`, oldest first).
/// Matched users get a new direct chat and `queue.matched`. Joining while matched ends the match
/// first (`queue.unmatched`). A waiting user with no live event stream for
/// `queues.disconnect_grace_ms` is taken out. Joins and leaves are limited per user
/// (`limits.queue`).
#[utoipa::path(
    post, operation_id = "join_queue", path = "/v1/queues/{kind}/join", tag = "queues",
    params(("kind" = String, Path, description = "`vent`, `listen` or `talk`")),
    responses(
        (status = 200, description = "Matched", body = PairingStatus),
        (status = 202, description = "Waiting", body = PairingStatus),
        ChatErrors, Limited, Invalid, CircleErrors,
    ),
    security(("bearer" = []))
)]
pub async fn join(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(kind): ApiPath<String>,
) -> ApiResult<(StatusCode, Json<PairingStatus>)> {
    state.throttle(Class::Queue, caller.id)?;
    let kind = queue_kind(&kind)?;
    let status = state.join_queue(caller.id, kind).await?;
    Ok((status_code(&status), Json(status)))
}

/// The caller's place in a queue: waiting, or matched (until the match ends); 404 when they are not
/// in it.
#[utoipa::path(
    get, operation_id = "queue_status", path = "/v1/queues/{kind}", tag = "queues",
    params(("kind" = String, Path, description = "`vent`, `listen` or `talk`")),
    responses((status = 200, description = "OK", body = PairingStatus), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn status(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(kind): ApiPath<String>,
) -> ApiResult<Json<PairingStatus>> {
    let kind = queue_kind(&kind)?;
    Ok(Json(state.queue_status(caller.id, kind).await?))
}

/// Leaves a queue, or ends the caller's match for both (`queue.unmatched`; both leave its chat,
/// which is removed with its messages). A match also ends when either user has had no live event
/// stream for `queues.disconnect_grace_ms`. Nothing happens when the caller is not in the queue.
/// A leave ends what it finds: when a match took the caller's wait before the leave could, the
/// match stands (both were told with `queue.matched`) and the answer is 409 with the problem type
/// `matched`; a leave again ends the match.
#[utoipa::path(
    delete, operation_id = "leave_queue", path = "/v1/queues/{kind}", tag = "queues",
    params(("kind" = String, Path, description = "`vent`, `listen` or `talk`")),
    responses((status = 204, description = "Left"), ChatErrors, Limited, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn leave(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(kind): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.throttle(Class::Queue, caller.id)?;
    let kind = queue_kind(&kind)?;
    state.leave_queue(caller.id, kind).await?;
    Ok(StatusCode::NO_CONTENT)
}
