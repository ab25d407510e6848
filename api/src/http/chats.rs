use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::limits::{MAX_CHAT_DESCRIPTION_CHARS, MAX_CHAT_NAME_CHARS, MAX_INITIAL_MEMBERS};
use confab_schema::model::to_millis;
use confab_schema::{
    Chat, ChatId, ChatKind, Event, MemberRole, SignalId, SignalKind, User, UserId,
};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::responses::{CallerErrors, ChatErrors, Invalid};
use super::signals::append_system_signal;
use super::{
    ApiJson, ApiPath, ApiQuery, ApiState, Caller, Page, member_of, page_limit, require_member,
};
use crate::error::{ApiError, ApiResult};
use crate::store::{ChatActivity, NewChat, UNREAD_CAP};

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateChat {
    kind: ChatKind,
    /// Groups only: 1 to 200 characters.
    #[serde(default)]
    name: Option<String>,
    /// Groups only: 1 to 2,000 characters.
    #[serde(default)]
    description: Option<String>,
    /// The other members: one for a direct chat, one or more for a group.
    #[serde(default)]
    members: Vec<UserId>,
}

pub(crate) fn check_length(field: &str, value: &Option<String>, max: usize) -> ApiResult<()> {
    if let Some(value) = value {
        let chars = value.chars().count();
        if value.trim().is_empty() || chars > max {
            return Err(ApiError::Unprocessable(format!(
                "{field} must be 1 to {max} characters"
            )));
        }
    }
    Ok(())
}

/// Namespace of direct-chat ids: the same pair of users always names the same chat, without a
/// lightweight transaction (concurrent creations write the same rows).
const DIRECT_NAMESPACE: Uuid = Uuid::from_u128(0x6c0f_a1b2_4e5d_4c1a_9f00_c0fa_b000_0002);

fn direct_chat_id(a: UserId, b: UserId) -> ChatId {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    ChatId(Uuid::new_v5(
        &DIRECT_NAMESPACE,
        format!("direct|{low}|{high}").as_bytes(),
    ))
}

/// The chats as `caller` sees them: their role, the latest signal and their unread count. A
/// constant number of store round trips for the entries, then one bounded count per chat that has
/// signals past the caller's read marker.
pub(crate) async fn chat_views(
    state: &ApiState,
    chats: &[ChatId],
    caller: &User,
) -> ApiResult<Vec<Chat>> {
    let entries = state.store.chat_entries(caller.id, chats).await?;
    let counts = futures::future::try_join_all(entries.iter().map(|entry| async move {
        if !entry.may_have_unread() {
            return Ok(0);
        }
        state
            .store
            .count_unread(entry.chat.id, entry.read_marker, caller.id, UNREAD_CAP)
            .await
    }))
    .await?;
    Ok(entries
        .into_iter()
        .zip(counts)
        .map(|(entry, unread)| Chat {
            unread_count: unread as u64,
            ..entry.chat
        })
        .collect())
}

/// One chat as `caller` sees it.
pub(crate) async fn chat_view(state: &ApiState, chat: ChatId, caller: &User) -> ApiResult<Chat> {
    chat_views(state, &[chat], caller)
        .await?
        .into_iter()
        .next()
        .ok_or(ApiError::NotFound("no such chat"))
}

/// Creates a group (the caller as owner plus the named members) or a direct chat (the caller and
/// exactly one other user; the same pair always gets the same chat back, with 200).
#[utoipa::path(
    post, operation_id = "create_chat", path = "/v1/chats", tag = "chats",
    request_body = CreateChat,
    responses(
        (status = 201, description = "Created", body = Chat),
        (status = 200, description = "The existing direct chat of this pair", body = Chat),
        CallerErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<CreateChat>,
) -> ApiResult<(StatusCode, Json<Chat>)> {
    check_length("name", &body.name, MAX_CHAT_NAME_CHARS)?;
    check_length("description", &body.description, MAX_CHAT_DESCRIPTION_CHARS)?;
    if body.members.len() > MAX_INITIAL_MEMBERS {
        return Err(ApiError::Unprocessable(format!(
            "at most {MAX_INITIAL_MEMBERS} members can be named at creation"
        )));
    }
    let others: BTreeSet<UserId> = body
        .members
        .iter()
        .copied()
        .filter(|m| *m != caller.id)
        .collect();
    for member in &others {
        if state.store.get_user(*member).await?.is_none() {
            return Err(ApiError::Unprocessable(format!("unknown user {member}")));
        }
    }
    let (id, members) = match body.kind {
        ChatKind::Group => {
            if body.name.is_none() {
                return Err(ApiError::Unprocessable("a group needs a name".into()));
            }
            if others.is_empty() {
                return Err(ApiError::Unprocessable(
                    "a group needs at least one other member".into(),
                ));
            }
            let mut members = vec![(caller.id, MemberRole::Owner)];
            members.extend(others.iter().map(|m| (*m, MemberRole::Member)));
            (ChatId::new(), members)
        }
        ChatKind::Direct => {
            if body.name.is_some() || body.description.is_some() {
                return Err(ApiError::Unprocessable(
                    "a direct chat has no name or description".into(),
                ));
            }
            let [other] = others.iter().copied().collect::<Vec<_>>()[..] else {
                return Err(ApiError::Unprocessable(
                    "a direct chat has exactly one other member".into(),
                ));
            };
            let id = direct_chat_id(caller.id, other);
            if let Some(existing) = state.store.get_chat(id).await? {
                require_member(&state, existing.id, caller.id).await?;
                return Ok((StatusCode::OK, Json(chat_view(&state, id, &caller).await?)));
            }
            (
                id,
                vec![(caller.id, MemberRole::Owner), (other, MemberRole::Owner)],
            )
        }
    };
    let new_chat = NewChat {
        id,
        kind: body.kind,
        name: body.name,
        description: body.description,
        created_at: to_millis(OffsetDateTime::now_utc()),
        created_by: caller.id,
        members,
    };
    state.store.create_chat(&new_chat).await?;
    let member_ids: Vec<UserId> = new_chat.members.iter().map(|(m, _)| *m).collect();
    state
        .store
        .touch_chat(id, &member_ids, SignalId::new(), None)
        .await?;
    let chat = Chat {
        id: new_chat.id,
        kind: new_chat.kind,
        name: new_chat.name,
        description: new_chat.description,
        created_at: new_chat.created_at,
        created_by: new_chat.created_by,
        my_role: Some(MemberRole::Owner),
        latest_signal: None,
        unread_count: 0,
    };
    state
        .publish(
            id,
            member_ids,
            Event::ChatUpdated(Box::new(Chat {
                my_role: None,
                ..chat.clone()
            })),
        )
        .await;
    Ok((StatusCode::CREATED, Json(chat)))
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
    let limit = page_limit(query.limit)?;
    let list = format!("chats:{}", caller.id);
    let after = match &query.cursor {
        Some(cursor) => {
            let (chat_id, activity) = state.open_cursor::<(ChatId, SignalId)>(&list, cursor)?;
            Some(ChatActivity { chat_id, activity })
        }
        None => None,
    };
    let rows = state
        .store
        .chats_by_activity(caller.id, after, limit + 1)
        .await?;
    let more = rows.len() > limit;
    let rows = &rows[..rows.len().min(limit)];
    let ids: Vec<ChatId> = rows.iter().map(|row| row.chat_id).collect();
    let items = chat_views(&state, &ids, &caller).await?;
    let next_cursor = match rows.last() {
        Some(last) if more => Some(state.cursor(&list, (last.chat_id, last.activity))),
        _ => None,
    };
    Ok(Json(Page { items, next_cursor }))
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
    member_of(&state, chat_id, caller.id).await?;
    Ok(Json(chat_view(&state, chat_id, &caller).await?))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateChat {
    /// New name, 1 to 200 characters.
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
    check_length("name", &body.name, MAX_CHAT_NAME_CHARS)?;
    if body
        .description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_CHAT_DESCRIPTION_CHARS)
    {
        return Err(ApiError::Unprocessable(format!(
            "description must be at most {MAX_CHAT_DESCRIPTION_CHARS} characters"
        )));
    }
    if body.name.is_none() && body.description.is_none() {
        return Err(ApiError::Unprocessable(
            "give a name or a description".into(),
        ));
    }
    let (role, chat) = member_of(&state, chat_id, caller.id).await?;
    if chat.kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "a direct chat has no name or description".into(),
        ));
    }
    if !role.is_admin() {
        return Err(ApiError::Forbidden("only owners and admins change a chat"));
    }
    let name = body.name.clone().or(chat.name.clone());
    let description = match body.description {
        Some(d) if d.trim().is_empty() => None,
        Some(d) => Some(d),
        None => chat.description.clone(),
    };
    state
        .store
        .update_chat(chat_id, name.as_deref(), description.as_deref())
        .await?;
    if body.name.is_some() && name != chat.name {
        append_system_signal(
            &state,
            chat_id,
            SignalKind::Renamed,
            caller.id,
            name.clone(),
        )
        .await?;
    }
    let updated = state
        .store
        .get_chat(chat_id)
        .await?
        .ok_or(ApiError::NotFound("no such chat"))?;
    state
        .publish_to_members(chat_id, Event::ChatUpdated(Box::new(updated.clone())))
        .await?;
    Ok(Json(chat_view(&state, updated.id, &caller).await?))
}
