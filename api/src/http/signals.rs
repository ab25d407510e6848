use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::{ChatId, Signal, SignalId, SignalKind};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::responses::{ChatErrors, Conflict, Invalid, Limited};
use super::{ApiJson, ApiPath, ApiQuery, Caller};
use crate::domain::inputs::{MessageText, PageLimit};
use crate::domain::signals::{HistoryFrom, NewMessage};
use crate::domain::{Outcome, Page};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSignal {
    /// Clients post `message`; the server writes the other kinds.
    kind: SignalKind,
    /// Send parity: the same author, chat and nonce give back the same signal. 1 to 128 bytes, not
    /// beginning with `call:` (kept for the server's call signals).
    #[serde(default)]
    nonce: Option<String>,
    /// 1 to 4,000 characters; may be left out when the message has attachments.
    #[serde(default)]
    text: Option<String>,
    /// A signal of the same chat this one answers.
    #[serde(default)]
    reply_to: Option<SignalId>,
    /// Up to 10 ids of the caller's uploads to this chat (`POST /v1/chats/{id}/attachments`);
    /// the signal carries their metadata.
    #[serde(default)]
    attachments: Vec<Uuid>,
}

/// Posts a message (members only). 201 with the stored signal; a retry with the same nonce answers
/// 200 with the signal stored the first time and stores nothing. 409 when another message sent at
/// the same time took one of its attachments: nothing is stored.
#[utoipa::path(
    post, operation_id = "create_signal", path = "/v1/chats/{chat_id}/signals", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = CreateSignal,
    responses(
        (status = 201, description = "Stored", body = Signal),
        (status = 200, description = "Already stored with this nonce", body = Signal),
        ChatErrors, Limited, Invalid, Conflict,
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<CreateSignal>,
) -> ApiResult<(StatusCode, Json<Signal>)> {
    state.throttle(Class::Send, caller.id)?;
    let message = NewMessage::parse(
        body.kind,
        body.text,
        body.nonce,
        body.reply_to,
        body.attachments,
    )?;
    Ok(match state.send_message(&caller, chat_id, message).await? {
        Outcome::Created(signal) => (StatusCode::CREATED, Json(signal)),
        Outcome::Existing(signal) => (StatusCode::OK, Json(signal)),
    })
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListSignals {
    /// 1 to 100; default 50.
    limit: Option<usize>,
    /// From a previous page's `next_cursor`; it overrides `before` and `after`.
    cursor: Option<String>,
    /// Signals older than this one, newest first (the default direction).
    before: Option<SignalId>,
    /// Signals newer than this one, oldest first (catching up).
    after: Option<SignalId>,
}

/// The chat's history (members only): newest first, or oldest first after `after`.
#[utoipa::path(
    get, operation_id = "list_signals", path = "/v1/chats/{chat_id}/signals", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat"), ListSignals),
    responses(
        (status = 200, description = "OK", body = Page<Signal>),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiQuery(query): ApiQuery<ListSignals>,
) -> ApiResult<Json<Page<Signal>>> {
    let limit = PageLimit::parse(query.limit)?;
    // A cursor continues the listing it came from (clients may resend the first page's
    // `before`/`after` with it); without one, `before` and `after` exclude each other.
    let from = match query.cursor {
        Some(_) => HistoryFrom::Newest,
        None => HistoryFrom::parse(query.before, query.after)?,
    };
    let page = state
        .history(caller.id, chat_id, from, query.cursor.as_deref(), limit)
        .await?;
    Ok(Json(page))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditSignal {
    /// The new text, 1 to 4,000 characters.
    text: String,
}

/// Edits a message's text (its author only); `edited_at` records when.
#[utoipa::path(
    patch, operation_id = "edit_signal", path = "/v1/chats/{chat_id}/signals/{signal_id}", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal")),
    request_body = EditSignal,
    responses(
        (status = 200, description = "OK", body = Signal),
        ChatErrors, Limited, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn edit(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
    ApiJson(body): ApiJson<EditSignal>,
) -> ApiResult<Json<Signal>> {
    state.throttle(Class::Edit, caller.id)?;
    let text = MessageText::parse(body.text)?;
    Ok(Json(
        state
            .edit_message(caller.id, chat_id, signal_id, text)
            .await?,
    ))
}

/// Deletes a message (its author, or a group's owner or admin; in a direct chat only its author): history keeps a tombstone without text.
#[utoipa::path(
    delete, operation_id = "delete_signal", path = "/v1/chats/{chat_id}/signals/{signal_id}", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal")),
    responses(
        (status = 200, description = "The tombstone", body = Signal),
        ChatErrors, Limited, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
) -> ApiResult<Json<Signal>> {
    state.throttle(Class::Edit, caller.id)?;
    Ok(Json(
        state.delete_message(caller.id, chat_id, signal_id).await?,
    ))
}
