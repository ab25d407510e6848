use axum::Json;
use axum::extract::State;
use confab_runtime::Problem;
use confab_schema::User;
use serde::Deserialize;
use utoipa::IntoParams;

use super::responses::CallerErrors;
use super::{ApiQuery, Caller};
use crate::domain::Page;
use crate::domain::inputs::{PageLimit, UserQuery};
use crate::error::ApiResult;
use crate::state::ApiState;

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
    let limit = PageLimit::parse(query.limit)?;
    let q = UserQuery::parse(&query.q)?;
    Ok(Json(
        state
            .search_users(q, query.cursor.as_deref(), limit)
            .await?,
    ))
}
