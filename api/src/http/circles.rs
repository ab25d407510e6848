use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_runtime::Problem;
use confab_schema::circle::{Circle, CircleMember, PairingState, PairingStatus};
use confab_schema::{CircleId, UserId};
use serde::Deserialize;
use utoipa::ToSchema;

use super::responses::{CallerErrors, ChatErrors, CircleErrors, Invalid, Limited};
use super::{ApiJson, ApiPath, Caller};
use crate::domain::Outcome;
use crate::domain::circles::NewCircle;
use crate::domain::inputs::{AccessCode, CircleDisplayName};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCircle {
    /// 1 to 200 characters, without bidirectional embeddings, overrides or isolates (U+202A to
    /// U+202E, U+2066 to U+2069).
    name: String,
    description: Option<String>,
    /// 1 to 4,000 characters.
    rules: Option<String>,
    /// How long the circle lives, in hours (fractions allowed); default `circles.default_ttl_hours`
    /// (72), at most `circles.max_ttl_hours`.
    ttl_hours: Option<f64>,
    /// Default and most: `circles.max_members` (200).
    max_members: Option<u32>,
    /// The owner's name in the circle, as for joining; default their display name as other users
    /// see it (never an address).
    display_name: Option<String>,
}

/// Creates a circle; the caller owns it and gets its access code.
#[utoipa::path(
    post, operation_id = "create_circle", path = "/v1/circles", tag = "circles",
    request_body = CreateCircle,
    responses((status = 201, description = "Created", body = Circle), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<CreateCircle>,
) -> ApiResult<(StatusCode, Json<Circle>)> {
    let new = NewCircle::parse(
        &state.circles,
        body.name,
        body.description,
        body.rules,
        body.ttl_hours,
        body.max_members,
        body.display_name,
    )?;
    Ok((
        StatusCode::CREATED,
        Json(state.create_circle(&caller, new).await?),
    ))
}

/// One circle (members only; the access code is shown to the owner).
#[utoipa::path(
    get, operation_id = "get_circle", path = "/v1/circles/{circle_id}", tag = "circles",
    params(("circle_id" = CircleId, Path, description = "The circle")),
    responses((status = 200, description = "OK", body = Circle), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(circle_id): ApiPath<CircleId>,
) -> ApiResult<Json<Circle>> {
    Ok(Json(state.get_circle(caller.id, circle_id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinCircle {
    access_code: String,
    /// The caller's name in this circle, which every member sees: 1 to 64 characters, without `@`
    /// (others are never shown an e-mail address) and without bidirectional embeddings, overrides
    /// or isolates (U+202A to U+202E, U+2066 to U+2069); the marks U+200E, U+200F, U+061C are
    /// allowed.
    display_name: String,
}

/// Joins the circle an access code opens (again: changes the caller's name in it). 404 for a code
/// that opens nothing, 409 when the circle is full, 410 when it expired, 403 for a user the owner
/// removed from it (for the circle's life, whatever its code; one who left may join again).
/// Limited per user (`limits.circle_join`), every try counted.
#[utoipa::path(
    post, operation_id = "join_circle", path = "/v1/circles/join", tag = "circles",
    request_body = JoinCircle,
    responses(
        (status = 201, description = "Joined", body = Circle),
        (status = 200, description = "Already a member (renamed)", body = Circle),
        CallerErrors,
        (status = 403, description = "The circle's owner removed the caller from it: they cannot join it again", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No circle has this access code", body = Problem, content_type = "application/problem+json"),
        Limited, Invalid, CircleErrors,
    ),
    security(("bearer" = []))
)]
pub async fn join(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<JoinCircle>,
) -> ApiResult<(StatusCode, Json<Circle>)> {
    // Before the code is looked at: a code that opens nothing counts too.
    state.throttle(Class::CircleJoin, caller.id)?;
    let code = AccessCode::parse(&body.access_code)?;
    let name = CircleDisplayName::parse(body.display_name)?;
    Ok(match state.join_circle(caller.id, code, name).await? {
        Outcome::Created(circle) => (StatusCode::CREATED, Json(circle)),
        Outcome::Existing(circle) => (StatusCode::OK, Json(circle)),
    })
}

/// Gives the circle a new access code (the owner only); the old one stops working.
#[utoipa::path(
    post, operation_id = "rotate_circle_code", path = "/v1/circles/{circle_id}/access-code", tag = "circles",
    params(("circle_id" = CircleId, Path, description = "The circle")),
    responses((status = 200, description = "The circle with its new code", body = Circle), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn rotate_code(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(circle_id): ApiPath<CircleId>,
) -> ApiResult<Json<Circle>> {
    Ok(Json(state.rotate_circle_code(caller.id, circle_id).await?))
}

/// The circle's members under their circle names, in joining order (members only).
#[utoipa::path(
    get, operation_id = "list_circle_members", path = "/v1/circles/{circle_id}/members", tag = "circles",
    params(("circle_id" = CircleId, Path, description = "The circle")),
    responses((status = 200, description = "OK", body = Vec<CircleMember>), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn members(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(circle_id): ApiPath<CircleId>,
) -> ApiResult<Json<Vec<CircleMember>>> {
    Ok(Json(state.circle_members(caller.id, circle_id).await?))
}

/// Leaves the circle (the caller's own id), or removes a member (the owner). A wait or pairing of
/// theirs ends first. A member the owner removed cannot join the circle again (its join answers
/// 403); one who left may.
#[utoipa::path(
    delete, operation_id = "remove_circle_member", path = "/v1/circles/{circle_id}/members/{user_id}", tag = "circles",
    params(
        ("circle_id" = CircleId, Path, description = "The circle"),
        ("user_id" = UserId, Path, description = "The member"),
    ),
    responses((status = 204, description = "Removed"), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn remove_member(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((circle_id, user_id)): ApiPath<(CircleId, UserId)>,
) -> ApiResult<StatusCode> {
    state
        .remove_circle_member(caller.id, circle_id, user_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Waits in the circle's lobby. When another member may be paired with the caller (never the
/// partner of their previous pairing here), the two get a new direct chat and `circle.paired`.
#[utoipa::path(
    post, operation_id = "enter_circle_lobby", path = "/v1/circles/{circle_id}/pair", tag = "circles",
    params(("circle_id" = CircleId, Path, description = "The circle")),
    responses(
        (status = 200, description = "Paired", body = PairingStatus),
        (status = 202, description = "Waiting", body = PairingStatus),
        ChatErrors, Invalid, CircleErrors,
    ),
    security(("bearer" = []))
)]
pub async fn pair(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(circle_id): ApiPath<CircleId>,
) -> ApiResult<(StatusCode, Json<PairingStatus>)> {
    let status = state.enter_circle_lobby(caller.id, circle_id).await?;
    Ok((status_code(&status), Json(status)))
}

/// Leaves the lobby, or ends the caller's pairing for both (`circle.unpaired`; both leave its chat).
/// When a pairing took the caller's wait before the leave could, the pairing stands (both were
/// told with `circle.paired`) and the answer is 409 with the problem type `matched`; a leave again
/// ends it.
#[utoipa::path(
    delete, operation_id = "leave_circle_lobby", path = "/v1/circles/{circle_id}/pair", tag = "circles",
    params(("circle_id" = CircleId, Path, description = "The circle")),
    responses((status = 204, description = "Done"), ChatErrors, Invalid, CircleErrors),
    security(("bearer" = []))
)]
pub async fn unpair(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(circle_id): ApiPath<CircleId>,
) -> ApiResult<StatusCode> {
    state.leave_circle_lobby(caller.id, circle_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// 200 when paired, 202 while waiting.
pub(super) fn status_code(status: &PairingStatus) -> StatusCode {
    match status.state {
        PairingState::Paired => StatusCode::OK,
        PairingState::Waiting => StatusCode::ACCEPTED,
    }
}
