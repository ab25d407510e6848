use std::collections::BTreeSet;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::limits::{MAX_CHAT_DESCRIPTION_CHARS, MAX_CHAT_NAME_CHARS, MAX_INITIAL_MEMBERS};
use confab_schema::model::to_millis;
use confab_schema::{Chat, ChatId, ChatKind, MemberRole, UserId};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{ApiJson, ApiPath, ApiState, Caller, require_member};
use crate::error::{ApiError, ApiResult};
use crate::store::NewChat;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateChat {
    kind: ChatKind,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    members: Vec<UserId>,
}

fn check_length(field: &str, value: &Option<String>, max: usize) -> ApiResult<()> {
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

/// Namespace of direct-chat ids: the same pair of users always names the same chat.
const DIRECT_NAMESPACE: Uuid = Uuid::from_u128(0x6c0f_a1b2_4e5d_4c1a_9f00_c0fa_b000_0002);

fn direct_chat_id(a: UserId, b: UserId) -> ChatId {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    ChatId(Uuid::new_v5(
        &DIRECT_NAMESPACE,
        format!("direct|{low}|{high}").as_bytes(),
    ))
}

/// `POST /v1/chats`: a group (the creator plus the named members) or a direct chat (the creator and
/// exactly one other user; the same pair always gets the same chat back).
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
            if let Some(mut existing) = state.store.get_chat(id).await? {
                existing.my_role = Some(MemberRole::Owner);
                return Ok((StatusCode::OK, Json(existing)));
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
    Ok((
        StatusCode::CREATED,
        Json(Chat {
            id: new_chat.id,
            kind: new_chat.kind,
            name: new_chat.name,
            description: new_chat.description,
            created_at: new_chat.created_at,
            created_by: new_chat.created_by,
            my_role: Some(MemberRole::Owner),
            latest_signal: None,
            unread_count: 0,
        }),
    ))
}

/// `GET /v1/chats/{chat_id}`: members only.
pub async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
) -> ApiResult<Json<Chat>> {
    let role = require_member(&state, chat_id, &caller).await?;
    let mut chat = state
        .store
        .get_chat(chat_id)
        .await?
        .ok_or(ApiError::NotFound("no such chat"))?;
    chat.my_role = Some(role);
    chat.latest_signal = state
        .store
        .signals_before(chat_id, None, 1)
        .await?
        .into_iter()
        .next()
        .map(Box::new);
    Ok(Json(chat))
}
