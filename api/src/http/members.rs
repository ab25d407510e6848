use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::{ChatId, Member, MemberRole, UserId};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::responses::{ChatErrors, Invalid, Limited};
use super::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::domain::inputs::PageLimit;
use crate::domain::{Outcome, Page};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListMembers {
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// The chat's members (members only).
#[utoipa::path(
    get, operation_id = "list_members", path = "/v1/chats/{chat_id}/members", tag = "members",
    params(("chat_id" = ChatId, Path, description = "The chat"), ListMembers),
    responses(
        (status = 200, description = "OK", body = Page<Member>),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiQuery(query): ApiQuery<ListMembers>,
) -> ApiResult<Json<Page<Member>>> {
    let limit = PageLimit::parse(query.limit)?;
    Ok(Json(
        state
            .list_members(caller.id, chat_id, query.cursor.as_deref(), limit)
            .await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    user_id: UserId,
    /// Default `member`. Only owners add owners.
    #[serde(default)]
    role: Option<MemberRole>,
}

/// Adds a member to a group (owners and admins). Written into the history as `joined`. Limited
/// per user in the people put into chats, together with creating chats (`limits.chats`): each
/// addition counts one, and so does a refused request; one already a member (200) nothing.
#[utoipa::path(
    post, operation_id = "add_member", path = "/v1/chats/{chat_id}/members", tag = "members",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = AddMember,
    responses(
        (status = 201, description = "Added", body = Member),
        (status = 200, description = "Already a member", body = Member),
        ChatErrors, Limited, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn add(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AddMember>,
) -> ApiResult<(StatusCode, Json<Member>)> {
    let added = state.add_member(caller.id, chat_id, body.user_id, body.role);
    Ok(
        match state.charged(Class::Chats, caller.id, 1, added).await? {
            Outcome::Created(member) => (StatusCode::CREATED, Json(member)),
            Outcome::Existing(member) => (StatusCode::OK, Json(member)),
        },
    )
}

/// Removes a member (owners remove anyone, admins remove members), or leaves (anyone, themselves).
/// The last owner hands over ownership before leaving. Written into the history as `left`.
#[utoipa::path(
    delete, operation_id = "remove_member", path = "/v1/chats/{chat_id}/members/{user_id}", tag = "members",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("user_id" = UserId, Path, description = "The member")),
    responses(
        (status = 204, description = "Removed"),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, user_id)): ApiPath<(ChatId, UserId)>,
) -> ApiResult<StatusCode> {
    state.remove_member(caller.id, chat_id, user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRole {
    role: MemberRole,
}

/// Changes a member's role. Owners change any role (a chat keeps at least one owner); admins move
/// members and admins between `member` and `admin`.
#[utoipa::path(
    patch, operation_id = "set_member_role", path = "/v1/chats/{chat_id}/members/{user_id}", tag = "members",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("user_id" = UserId, Path, description = "The member")),
    request_body = SetRole,
    responses(
        (status = 200, description = "OK", body = Member),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn set_role(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, user_id)): ApiPath<(ChatId, UserId)>,
    ApiJson(body): ApiJson<SetRole>,
) -> ApiResult<Json<Member>> {
    Ok(Json(
        state
            .set_role(caller.id, chat_id, user_id, body.role)
            .await?,
    ))
}
