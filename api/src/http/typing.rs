use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::ChatId;
use serde::Deserialize;
use utoipa::ToSchema;

use super::responses::{ChatErrors, Invalid, Limited};
use super::{ApiJson, ApiPath, Caller};
use crate::error::ApiResult;
use crate::state::ApiState;

/// No fields yet: `{}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Typing {}

/// Tells the chat's other members the caller is typing: a `typing` event, never stored, that
/// clients show for a few seconds. Call it again while typing; calls closer than two seconds apart
/// publish once. The calls that publish count, across all the caller's chats, against their
/// `typing` rate limit.
#[utoipa::path(
    post, operation_id = "typing", path = "/v1/chats/{chat_id}/typing", tag = "chats",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = Typing,
    responses(
        (status = 204, description = "Published, or throttled"),
        ChatErrors, Invalid, Limited,
    ),
    security(("bearer" = []))
)]
pub async fn typing(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(_): ApiJson<Typing>,
) -> ApiResult<StatusCode> {
    state.typing(caller.id, chat_id).await?;
    Ok(StatusCode::NO_CONTENT)
}
