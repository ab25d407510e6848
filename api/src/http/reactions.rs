use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::event::ReactionChange;
use confab_schema::{ChatId, SignalId};
use serde::Deserialize;
use utoipa::IntoParams;

use super::responses::{ChatErrors, Invalid, Limited};
use super::{ApiPath, ApiQuery, Caller};
use crate::domain::inputs::{Emoji, PageLimit};
use crate::domain::reactions::Reaction;
use crate::domain::{Outcome, Page};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

/// Adds the caller's reaction (idempotent: 201 when added, 200 when it was there).
#[utoipa::path(
    put, operation_id = "add_reaction", path = "/v1/chats/{chat_id}/signals/{signal_id}/reactions/{emoji}", tag = "reactions",
    params(
        ("chat_id" = ChatId, Path, description = "The chat"),
        ("signal_id" = SignalId, Path, description = "The signal"),
        ("emoji" = String, Path, description = "One emoji, percent-encoded"),
    ),
    responses(
        (status = 201, description = "Added", body = ReactionChange),
        (status = 200, description = "Already there", body = ReactionChange),
        ChatErrors, Limited, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn add(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id, emoji)): ApiPath<(ChatId, SignalId, String)>,
) -> ApiResult<(StatusCode, Json<ReactionChange>)> {
    state.throttle(Class::React, caller.id)?;
    let emoji = Emoji::parse(emoji)?;
    Ok(
        match state
            .add_reaction(caller.id, chat_id, signal_id, emoji)
            .await?
        {
            Outcome::Created(change) => (StatusCode::CREATED, Json(change)),
            Outcome::Existing(change) => (StatusCode::OK, Json(change)),
        },
    )
}

/// Removes the caller's reaction (idempotent).
#[utoipa::path(
    delete, operation_id = "remove_reaction", path = "/v1/chats/{chat_id}/signals/{signal_id}/reactions/{emoji}", tag = "reactions",
    params(
        ("chat_id" = ChatId, Path, description = "The chat"),
        ("signal_id" = SignalId, Path, description = "The signal"),
        ("emoji" = String, Path, description = "One emoji, percent-encoded"),
    ),
    responses(
        (status = 200, description = "OK", body = ReactionChange),
        ChatErrors, Limited, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id, emoji)): ApiPath<(ChatId, SignalId, String)>,
) -> ApiResult<Json<ReactionChange>> {
    state.throttle(Class::React, caller.id)?;
    let emoji = Emoji::parse_stored(emoji)?;
    Ok(Json(
        state
            .remove_reaction(caller.id, chat_id, signal_id, emoji)
            .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListReactions {
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// Who reacted to a signal, with what (members only).
#[utoipa::path(
    get, operation_id = "list_reactions", path = "/v1/chats/{chat_id}/signals/{signal_id}/reactions", tag = "reactions",
    params(
        ("chat_id" = ChatId, Path, description = "The chat"),
        ("signal_id" = SignalId, Path, description = "The signal"),
        ListReactions,
    ),
    responses(
        (status = 200, description = "OK", body = Page<Reaction>),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
    ApiQuery(query): ApiQuery<ListReactions>,
) -> ApiResult<Json<Page<Reaction>>> {
    let limit = PageLimit::parse(query.limit)?;
    Ok(Json(
        state
            .list_reactions(
                caller.id,
                chat_id,
                signal_id,
                query.cursor.as_deref(),
                limit,
            )
            .await?,
    ))
}
