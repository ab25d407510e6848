use axum::Json;
use confab_schema::User;

use super::Caller;

/// `GET /v1/me`: the caller, as provisioned from their token.
pub async fn me(Caller(user): Caller) -> Json<User> {
    Json(user)
}
