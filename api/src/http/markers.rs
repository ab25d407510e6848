use axum::Json;
use axum::extract::State;
use confab_schema::{ChatId, SignalId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::responses::{ChatErrors, Invalid, Limited};
use super::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::domain::Page;
use crate::domain::inputs::PageLimit;
use crate::domain::markers::Seen;
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;
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

/// Moves the caller's read marker forward (never back). Unread counts follow from it. Counted,
/// with delivery markers, against the caller's `marks` rate limit.
#[utoipa::path(
    post, operation_id = "mark_read", path = "/v1/chats/{chat_id}/read", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = AdvanceMarker,
    responses(
        (status = 200, description = "OK", body = MarkerState),
        ChatErrors, Invalid, Limited,
    ),
    security(("bearer" = []))
)]
pub async fn read(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AdvanceMarker>,
) -> ApiResult<Json<MarkerState>> {
    state.throttle(Class::Marks, caller.id)?;
    let up_to = state
        .mark(MarkerKind::Read, caller.id, chat_id, body.up_to)
        .await?;
    Ok(Json(MarkerState { up_to }))
}

/// Moves the caller's delivery marker forward (a client acknowledges what it has received).
/// Counted, with read markers, against the caller's `marks` rate limit.
#[utoipa::path(
    post, operation_id = "mark_delivered", path = "/v1/chats/{chat_id}/delivered", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = AdvanceMarker,
    responses(
        (status = 200, description = "OK", body = MarkerState),
        ChatErrors, Invalid, Limited,
    ),
    security(("bearer" = []))
)]
pub async fn delivered(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<AdvanceMarker>,
) -> ApiResult<Json<MarkerState>> {
    state.throttle(Class::Marks, caller.id)?;
    let up_to = state
        .mark(MarkerKind::Delivered, caller.id, chat_id, body.up_to)
        .await?;
    Ok(Json(MarkerState { up_to }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListMarked {
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// Who has read the signal (members only). A page may hold fewer than `limit` members, even
/// none, and still have a `next_cursor`: each page reads a bounded part of a large chat's markers.
/// Counted, with deliveries, against the caller's `receipts` rate limit.
#[utoipa::path(
    get, operation_id = "list_views", path = "/v1/chats/{chat_id}/signals/{signal_id}/views", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal"), ListMarked),
    responses(
        (status = 200, description = "OK", body = Page<Seen>),
        ChatErrors, Limited,
    ),
    security(("bearer" = []))
)]
pub async fn views(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
    ApiQuery(query): ApiQuery<ListMarked>,
) -> ApiResult<Json<Page<Seen>>> {
    reached(state, MarkerKind::Read, caller, chat_id, signal_id, query).await
}

/// Whose clients have acknowledged delivery of the signal (members only). Paged and limited as
/// the views are.
#[utoipa::path(
    get, operation_id = "list_deliveries", path = "/v1/chats/{chat_id}/signals/{signal_id}/deliveries", tag = "markers",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal"), ListMarked),
    responses(
        (status = 200, description = "OK", body = Page<Seen>),
        ChatErrors, Limited,
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
        state,
        MarkerKind::Delivered,
        caller,
        chat_id,
        signal_id,
        query,
    )
    .await
}

async fn reached(
    state: ApiState,
    kind: MarkerKind,
    caller: confab_schema::User,
    chat_id: ChatId,
    signal_id: SignalId,
    query: ListMarked,
) -> ApiResult<Json<Page<Seen>>> {
    state.throttle(Class::Receipts, caller.id)?;
    let limit = PageLimit::parse(query.limit)?;
    Ok(Json(
        state
            .list_reached(
                kind,
                caller.id,
                chat_id,
                signal_id,
                query.cursor.as_deref(),
                limit,
            )
            .await?,
    ))
}
