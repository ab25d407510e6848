use axum::Json;
use axum::extract::State;
use confab_runtime::Problem;
use confab_schema::event::UserPresence;
use confab_schema::{User, UserId};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::responses::{CallerErrors, Invalid, Limited};
use super::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::domain::Page;
use crate::domain::inputs::{PageLimit, UserQuery};
use crate::domain::presence::StatusChange;
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetStatus {
    /// 1 to 100 characters; absent for none.
    text: Option<String>,
    /// Show as `away` while connected.
    away: Option<bool>,
    /// When the status stops applying; absent for never.
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires_at: Option<time::OffsetDateTime>,
}

/// Sets the caller's custom status (`{}` clears it). Members of the caller's chats get a
/// `presence.updated` event.
#[utoipa::path(
    put, operation_id = "set_status", path = "/v1/me/status", tag = "users",
    request_body = SetStatus,
    responses(
        (status = 200, description = "The caller's presence after the change", body = UserPresence),
        CallerErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn set_status(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<SetStatus>,
) -> ApiResult<Json<UserPresence>> {
    let change = StatusChange::parse(body.text, body.away, body.expires_at)?;
    Ok(Json(state.set_status(caller.id, change).await?))
}

/// A user's presence (`online`, `away` or `offline`), last-seen time and status text: for the
/// caller and the users who share a chat with them.
#[utoipa::path(
    get, operation_id = "user_presence", path = "/v1/users/{user_id}/presence", tag = "users",
    params(("user_id" = UserId, Path, description = "The user")),
    responses(
        (status = 200, description = "OK", body = UserPresence),
        (status = 404, description = "No such user, or none sharing a chat with the caller", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn presence(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(user_id): ApiPath<UserId>,
) -> ApiResult<Json<UserPresence>> {
    Ok(Json(state.presence_of(caller.id, user_id).await?))
}

/// A user's profile: for the caller and the users who share a chat with them (the e-mail address
/// only in the caller's own).
#[utoipa::path(
    get, operation_id = "get_user", path = "/v1/users/{user_id}", tag = "users",
    params(("user_id" = UserId, Path, description = "The user")),
    responses(
        (status = 200, description = "OK", body = User),
        (status = 404, description = "No such user, or none sharing a chat with the caller", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(user_id): ApiPath<UserId>,
) -> ApiResult<Json<User>> {
    Ok(Json(state.user_profile(caller.id, user_id).await?))
}

/// The caller, as provisioned from their token.
#[utoipa::path(
    get, operation_id = "me", path = "/v1/me", tag = "users",
    responses(
        (status = 200, description = "OK", body = User),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "A dependency is unavailable", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
pub async fn me(Caller(user): Caller) -> Json<User> {
    Json(user)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchUsers {
    /// Prefix of a user name or display name, or a whole e-mail address (case-insensitive), 1 to 64
    /// characters. A query with an `@` is an address, matched whole only; a name that is (or looks
    /// like) an address is found only whole too.
    q: String,
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// Users whose user name or display name starts with `q`, or whose e-mail address is `q`, each
/// once. Each user's `email` is shown to that user only (`null` for others). A page reads a bounded
/// number of rows: it may hold fewer than `limit` (even none) and still have a `next_cursor`.
#[utoipa::path(
    get, operation_id = "search_users", path = "/v1/users", tag = "users",
    params(SearchUsers),
    responses(
        (status = 200, description = "OK", body = Page<User>),
        CallerErrors, Limited,
    ),
    security(("bearer" = []))
)]
pub async fn search(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiQuery(query): ApiQuery<SearchUsers>,
) -> ApiResult<Json<Page<User>>> {
    state.throttle(Class::Search, caller.id)?;
    let limit = PageLimit::parse(query.limit)?;
    let q = UserQuery::parse(&query.q)?;
    Ok(Json(
        state
            .search_users(caller.id, q, query.cursor.as_deref(), limit)
            .await?,
    ))
}
