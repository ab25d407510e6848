use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::{Chat, ChatId, ChatKind, UserId};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::responses::{CallerErrors, ChatErrors, Invalid, Limited};
use super::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::domain::chats::{ChatChange, ChatToCreate};
use crate::domain::inputs::PageLimit;
use crate::domain::{Outcome, Page};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChat {
    kind: ChatKind,
    /// Groups only: 1 to 200 characters, without bidirectional embeddings, overrides or isolates
    /// (U+202A to U+202E, U+2066 to U+2069).
    #[serde(default)]
    name: Option<String>,
    /// Groups only: 1 to 2,000 characters.
    #[serde(default)]
    description: Option<String>,
    /// The other members: one for a direct chat, one or more for a group.
    #[serde(default)]
    members: Vec<UserId>,
}

/// Creates a group (the caller as owner plus the named members) or a direct chat (the caller and
/// exactly one other user; the same pair always gets the same chat back, with 200). Limited per
/// user in the people put into chats, together with adding members (`limits.chats`): a group
/// counts its members other than the caller, a direct chat one; one found again (200) nothing,
/// and a refused request one. A group larger than the whole allowance is created when the
/// allowance is full, and the caller's next request waits until it has refilled to cover it.
#[utoipa::path(
    post, operation_id = "create_chat", path = "/v1/chats", tag = "chats",
    request_body = CreateChat,
    responses(
        (status = 201, description = "Created", body = Chat),
        (status = 200, description = "The existing direct chat of this pair", body = Chat),
        CallerErrors, Limited, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<CreateChat>,
) -> ApiResult<(StatusCode, Json<Chat>)> {
    let chat = ChatToCreate::parse(body.kind, body.name, body.description, body.members)?;
    let cost = chat.people_added(caller.id);
    let created = state.charged(
        Class::Chats,
        caller.id,
        cost,
        state.create_chat(&caller, chat),
    );
    Ok(match created.await? {
        Outcome::Created(chat) => (StatusCode::CREATED, Json(chat)),
        Outcome::Existing(chat) => (StatusCode::OK, Json(chat)),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListChats {
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// The caller's chats, most recent activity first, each with its latest signal and the caller's
/// unread count.
#[utoipa::path(
    get, operation_id = "list_chats", path = "/v1/chats", tag = "chats",
    params(ListChats),
    responses(
        (status = 200, description = "OK", body = Page<Chat>),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiQuery(query): ApiQuery<ListChats>,
) -> ApiResult<Json<Page<Chat>>> {
    let limit = PageLimit::parse(query.limit)?;
    Ok(Json(
        state
            .list_chats(caller.id, query.cursor.as_deref(), limit)
            .await?,
    ))
}

/// One chat (members only).
#[utoipa::path(
    get, operation_id = "get_chat", path = "/v1/chats/{chat_id}", tag = "chats",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    responses(
        (status = 200, description = "OK", body = Chat),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
) -> ApiResult<Json<Chat>> {
    Ok(Json(state.get_chat(caller.id, chat_id).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateChat {
    /// New name, 1 to 200 characters, without bidirectional embeddings, overrides or isolates
    /// (U+202A to U+202E, U+2066 to U+2069).
    #[serde(default)]
    name: Option<String>,
    /// New description, 1 to 2,000 characters; an empty string clears it.
    #[serde(default)]
    description: Option<String>,
}

/// Renames or describes a group (owners and admins). A new name is written into the history as a
/// `renamed` signal.
#[utoipa::path(
    patch, operation_id = "update_chat", path = "/v1/chats/{chat_id}", tag = "chats",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = UpdateChat,
    responses(
        (status = 200, description = "OK", body = Chat),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn update(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<UpdateChat>,
) -> ApiResult<Json<Chat>> {
    let change = ChatChange::parse(body.name, body.description)?;
    Ok(Json(state.update_chat(caller.id, chat_id, change).await?))
}
