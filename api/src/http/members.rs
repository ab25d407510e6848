use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::event::MemberChange;
use confab_schema::model::to_millis;
use confab_schema::{ChatId, ChatKind, Event, Member, MemberRole, SignalKind, UserId};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};

use super::responses::{ChatErrors, Invalid};
use super::signals::append_system_signal;
use super::{
    ApiJson, ApiPath, ApiQuery, ApiState, Caller, Page, member_of, page_limit, require_member,
};
use crate::error::{ApiError, ApiResult};

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
    let limit = page_limit(query.limit)?;
    let list = format!("members:{chat_id}");
    let after = match &query.cursor {
        Some(cursor) => Some(state.open_cursor::<UserId>(&list, cursor)?),
        None => None,
    };
    require_member(&state, chat_id, caller.id).await?;
    let mut items = state.store.members_page(chat_id, after, limit + 1).await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|m| state.cursor(&list, m.user_id))
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    user_id: UserId,
    /// Default `member`. Only owners add owners.
    #[serde(default)]
    role: Option<MemberRole>,
}

/// Adds a member to a group (owners and admins). Written into the history as `joined`.
#[utoipa::path(
    post, operation_id = "add_member", path = "/v1/chats/{chat_id}/members", tag = "members",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = AddMember,
    responses(
        (status = 201, description = "Added", body = Member),
        (status = 200, description = "Already a member", body = Member),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn add(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AddMember>,
) -> ApiResult<(StatusCode, Json<Member>)> {
    let (my_role, chat) = member_of(&state, chat_id, caller.id).await?;
    if chat.kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "a direct chat takes no new members".into(),
        ));
    }
    if !my_role.is_admin() {
        return Err(ApiError::Forbidden("only owners and admins add members"));
    }
    let role = body.role.unwrap_or(MemberRole::Member);
    if role == MemberRole::Owner && my_role != MemberRole::Owner {
        return Err(ApiError::Forbidden("only owners make owners"));
    }
    if state.store.get_user(body.user_id).await?.is_none() {
        return Err(ApiError::Unprocessable(format!(
            "unknown user {}",
            body.user_id
        )));
    }
    if let Some(existing) = state
        .store
        .members(chat_id)
        .await?
        .into_iter()
        .find(|m| m.user_id == body.user_id)
    {
        return Ok((StatusCode::OK, Json(existing)));
    }
    let member = Member {
        user_id: body.user_id,
        role,
        joined_at: to_millis(OffsetDateTime::now_utc()),
    };
    state.store.put_member(chat_id, &member).await?;
    append_system_signal(&state, chat_id, SignalKind::Joined, body.user_id, None).await?;
    state
        .publish_to_members(
            chat_id,
            Event::MemberJoined(MemberChange {
                user_id: member.user_id,
                role: Some(role),
            }),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(member)))
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
    let (my_role, chat) = member_of(&state, chat_id, caller.id).await?;
    if chat.kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "members of a direct chat cannot leave or be removed".into(),
        ));
    }
    let members = state.store.members(chat_id).await?;
    let Some(target) = members.iter().find(|m| m.user_id == user_id) else {
        return Err(ApiError::NotFound("no such member"));
    };
    if user_id != caller.id {
        let allowed = match my_role {
            MemberRole::Owner => true,
            MemberRole::Admin => target.role == MemberRole::Member,
            MemberRole::Member => false,
        };
        if !allowed {
            return Err(ApiError::Forbidden(
                "owners remove anyone, admins remove members",
            ));
        }
    }
    let owners = members
        .iter()
        .filter(|m| m.role == MemberRole::Owner)
        .count();
    if target.role == MemberRole::Owner && owners == 1 && members.len() > 1 {
        return Err(ApiError::Unprocessable(
            "the last owner hands over ownership before leaving".into(),
        ));
    }
    state.store.remove_member(chat_id, user_id).await?;
    state.store.untouch_chat(chat_id, user_id).await?;
    append_system_signal(&state, chat_id, SignalKind::Left, user_id, None).await?;
    let mut recipients: Vec<UserId> = members.iter().map(|m| m.user_id).collect();
    if !recipients.contains(&user_id) {
        recipients.push(user_id);
    }
    state
        .publish(
            chat_id,
            recipients,
            Event::MemberLeft(MemberChange {
                user_id,
                role: None,
            }),
        )
        .await;
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
    let (my_role, chat) = member_of(&state, chat_id, caller.id).await?;
    if chat.kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "roles in a direct chat do not change".into(),
        ));
    }
    let members = state.store.members(chat_id).await?;
    let Some(target) = members.iter().find(|m| m.user_id == user_id).cloned() else {
        return Err(ApiError::NotFound("no such member"));
    };
    let allowed = match my_role {
        MemberRole::Owner => true,
        MemberRole::Admin => target.role != MemberRole::Owner && body.role != MemberRole::Owner,
        MemberRole::Member => false,
    };
    if !allowed {
        return Err(ApiError::Forbidden(
            "owners change any role; admins move members and admins",
        ));
    }
    let owners = members
        .iter()
        .filter(|m| m.role == MemberRole::Owner)
        .count();
    if target.role == MemberRole::Owner && body.role != MemberRole::Owner && owners == 1 {
        return Err(ApiError::Unprocessable(
            "a chat keeps at least one owner".into(),
        ));
    }
    if target.role == body.role {
        return Ok(Json(target));
    }
    let updated = Member {
        role: body.role,
        ..target
    };
    state.store.put_member(chat_id, &updated).await?;
    state
        .publish_to_members(
            chat_id,
            Event::MemberUpdated(MemberChange {
                user_id,
                role: Some(body.role),
            }),
        )
        .await?;
    Ok(Json(updated))
}
