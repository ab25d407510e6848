use axum::Json;
use axum::extract::State;
use confab_runtime::Problem;
use confab_schema::{User, UserId};
use serde::Deserialize;
use utoipa::IntoParams;

use super::responses::CallerErrors;
use super::{ApiQuery, ApiState, Caller, Page, page_limit};
use crate::error::{ApiError, ApiResult};
use crate::store::search_users;

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

/// Longest search prefix.
const MAX_QUERY_CHARS: usize = 64;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchUsers {
    /// Prefix of a user name, display name or e-mail address (case-insensitive), 1 to 64 characters.
    q: String,
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// Users whose user name, display name or e-mail address starts with `q`, each once.
#[utoipa::path(
    get, operation_id = "search_users", path = "/v1/users", tag = "users",
    params(SearchUsers),
    responses(
        (status = 200, description = "OK", body = Page<User>),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn search(
    State(state): State<ApiState>,
    Caller(_caller): Caller,
    ApiQuery(query): ApiQuery<SearchUsers>,
) -> ApiResult<Json<Page<User>>> {
    let limit = page_limit(query.limit)?;
    let q = query.q.trim().to_lowercase();
    let chars = q.chars().count();
    if chars == 0 || chars > MAX_QUERY_CHARS {
        return Err(ApiError::BadRequest(format!(
            "q must be 1 to {MAX_QUERY_CHARS} characters"
        )));
    }
    let list = format!("users:{q}");
    let after = match &query.cursor {
        Some(cursor) => Some(state.open_cursor::<(String, UserId)>(&list, cursor)?),
        None => None,
    };
    let (items, next) = search_users(&*state.store, &q, after, limit).await?;
    Ok(Json(Page {
        items,
        next_cursor: next.map(|position| state.cursor(&list, position)),
    }))
}
