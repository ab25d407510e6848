use axum::Json;
use axum::extract::State;
use confab_schema::event::MarkerChange;
use confab_schema::{ChatId, Event, SignalId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::responses::{ChatErrors, Invalid};
use super::{ApiJson, ApiPath, ApiQuery, ApiState, Caller, Page, page_limit, require_member};
use crate::error::{ApiError, ApiResult};
use crate::store::MarkerKind;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdvanceMarker {
    /// The newest signal seen (or delivered); a signal of this chat.
    up_to: SignalId,
}

/// The caller's marker after the change.
#[derive(Debug, Serialize, ToSchema)]
pub struct MarkerState {
    up_to: Option<SignalId>,
}

async fn advance(
    state: &ApiState,
    kind: MarkerKind,
    chat_id: ChatId,
    caller: UserId,
    up_to: SignalId,
) -> ApiResult<Json<MarkerState>> {
    require_member(state, chat_id, caller).await?;
    if state.store.get_signal(chat_id, up_to).await?.is_none() {
        return Err(ApiError::Unprocessable(
            "up_to names no signal of this chat".into(),
        ));
    }
    let before = state.store.marker(kind, chat_id, caller).await?;
    if before.is_some_and(|b| b >= up_to) {
        // Markers only move forward; an older one changes nothing.
        return Ok(Json(MarkerState { up_to: before }));
    }
    state
        .store
        .advance_marker(kind, chat_id, caller, up_to)
        .await?;
    let change = MarkerChange {
        user_id: caller,
        up_to,
    };
    let event = match kind {
        MarkerKind::Read => Event::ReadUpdated(change),
        MarkerKind::Delivered => Event::DeliveredUpdated(change),
    };
    state.publish_to_members(chat_id, event).await?;
    Ok(Json(MarkerState { up_to: Some(up_to) }))
}

/// Moves the caller's read marker forward (never back). Unread counts follow from it.
#[utoipa::path(
    post, operation_id = "mark_read", path = "/v1/chats/{chat_id}/read", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = AdvanceMarker,
    responses(
        (status = 200, description = "OK", body = MarkerState),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn read(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AdvanceMarker>,
) -> ApiResult<Json<MarkerState>> {
    advance(&state, MarkerKind::Read, chat_id, caller.id, body.up_to).await
}

/// Moves the caller's delivery marker forward (a client acknowledges what it has received).
#[utoipa::path(
    post, operation_id = "mark_delivered", path = "/v1/chats/{chat_id}/delivered", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = AdvanceMarker,
    responses(
        (status = 200, description = "OK", body = MarkerState),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn delivered(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AdvanceMarker>,
) -> ApiResult<Json<MarkerState>> {
    advance(
        &state,
        MarkerKind::Delivered,
        chat_id,
        caller.id,
        body.up_to,
    )
    .await
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListMarked {
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// A member whose marker has reached the signal.
#[derive(Debug, Serialize, ToSchema)]
pub struct Seen {
    user_id: UserId,
    up_to: SignalId,
}

/// Markers are scanned this many at a time while filling a page.
const SCAN: usize = 200;

async fn reached(
    state: &ApiState,
    kind: MarkerKind,
    chat_id: ChatId,
    signal_id: SignalId,
    caller: UserId,
    query: ListMarked,
) -> ApiResult<Json<Page<Seen>>> {
    let limit = page_limit(query.limit)?;
    let list = format!("{}:{chat_id}:{signal_id}", kind.as_str());
    let mut after = match &query.cursor {
        Some(cursor) => Some(state.open_cursor::<UserId>(&list, cursor)?),
        None => None,
    };
    require_member(state, chat_id, caller).await?;
    if state.store.get_signal(chat_id, signal_id).await?.is_none() {
        return Err(ApiError::NotFound("no such signal"));
    }
    let mut items = Vec::new();
    loop {
        let batch = state.store.markers_page(kind, chat_id, after, SCAN).await?;
        let exhausted = batch.len() < SCAN;
        for (user_id, up_to) in batch {
            after = Some(user_id);
            if up_to >= signal_id {
                items.push(Seen { user_id, up_to });
                if items.len() == limit {
                    let next_cursor = Some(state.cursor(&list, user_id));
                    return Ok(Json(Page { items, next_cursor }));
                }
            }
        }
        if exhausted {
            return Ok(Json(Page {
                items,
                next_cursor: None,
            }));
        }
    }
}

/// Who has read the signal (members only).
#[utoipa::path(
    get, operation_id = "list_views", path = "/v1/chats/{chat_id}/signals/{signal_id}/views", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal"), ListMarked),
    responses(
        (status = 200, description = "OK", body = Page<Seen>),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn views(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
    ApiQuery(query): ApiQuery<ListMarked>,
) -> ApiResult<Json<Page<Seen>>> {
    reached(
        &state,
        MarkerKind::Read,
        chat_id,
        signal_id,
        caller.id,
        query,
    )
    .await
}

/// Whose clients have acknowledged delivery of the signal (members only).
#[utoipa::path(
    get, operation_id = "list_deliveries", path = "/v1/chats/{chat_id}/signals/{signal_id}/deliveries", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal"), ListMarked),
    responses(
        (status = 200, description = "OK", body = Page<Seen>),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
    ApiQuery(query): ApiQuery<ListMarked>,
) -> ApiResult<Json<Page<Seen>>> {
    reached(
        &state,
        MarkerKind::Delivered,
        chat_id,
        signal_id,
        caller.id,
        query,
    )
    .await
}
