use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::limits::{DEFAULT_PAGE_SIZE, MAX_NONCE_BYTES, MAX_PAGE_SIZE, MAX_TEXT_CHARS};
use confab_schema::{ChatId, Envelope, Event, Signal, SignalId, SignalKind};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{ApiJson, ApiPath, ApiQuery, ApiState, Caller, require_member};
use crate::error::{ApiError, ApiResult};
use crate::store::Inserted;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSignal {
    kind: SignalKind,
    #[serde(default)]
    nonce: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    reply_to: Option<SignalId>,
    #[serde(default)]
    attachments: Vec<Uuid>,
}

/// `POST /v1/chats/{chat_id}/signals`: members post messages. 201 with the stored signal; a retry
/// with the same nonce answers 200 with the signal stored the first time.
pub async fn create(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiJson(body): ApiJson<CreateSignal>,
) -> ApiResult<(StatusCode, Json<Signal>)> {
    if body.kind != SignalKind::Message {
        return Err(ApiError::Unprocessable(format!(
            "signals of kind `{}` are written by the server, not posted",
            body.kind
        )));
    }
    let text = body.text.unwrap_or_default();
    let chars = text.chars().count();
    if text.trim().is_empty() || chars > MAX_TEXT_CHARS {
        return Err(ApiError::Unprocessable(format!(
            "text must be 1 to {MAX_TEXT_CHARS} characters"
        )));
    }
    if let Some(nonce) = &body.nonce
        && (nonce.is_empty() || nonce.len() > MAX_NONCE_BYTES)
    {
        return Err(ApiError::Unprocessable(format!(
            "nonce must be 1 to {MAX_NONCE_BYTES} bytes"
        )));
    }
    if body.reply_to.is_some_and(|r| !r.is_time_ordered()) {
        return Err(ApiError::Unprocessable(
            "reply_to is not a signal id".into(),
        ));
    }
    if !body.attachments.is_empty() {
        return Err(ApiError::Unprocessable(
            "attachments are not accepted yet".into(),
        ));
    }
    // One read gives both the caller's right to post and the event's recipients.
    let members = state.store.members(chat_id).await?;
    if !members.iter().any(|m| m.user_id == caller.id) {
        return Err(match state.store.get_chat(chat_id).await? {
            Some(_) => ApiError::Forbidden("you are not a member of this chat"),
            None => ApiError::NotFound("no such chat"),
        });
    }
    // Refuse before storing when events cannot be published, rather than store a silent message.
    state.bus.check().await?;

    let id = SignalId::new();
    let signal = Signal {
        id,
        chat_id,
        kind: SignalKind::Message,
        author_id: caller.id,
        created_at: id
            .created_at()
            .unwrap_or_else(time::OffsetDateTime::now_utc),
        nonce: body.nonce,
        text: Some(text),
        reply_to: body.reply_to,
        attachments: body.attachments,
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
    };
    match state.store.insert_signal(&signal).await? {
        Inserted::Existing(existing) => Ok((StatusCode::OK, Json(existing))),
        Inserted::Created(created) => {
            let recipients = state
                .store
                .members(chat_id)
                .await?
                .into_iter()
                .map(|m| m.user_id)
                .collect();
            let envelope =
                Envelope::new(chat_id, recipients, Event::SignalCreated(created.clone()));
            if let Err(error) = state.bus.publish(&envelope).await {
                // Stored is stored: history has it even if live delivery missed it.
                tracing::warn!(%error, signal = %created.id, "event not published");
                metrics::counter!("confab_events_unpublished_total").increment(1);
            } else {
                metrics::counter!("confab_events_published_total", "type" => "signal.created")
                    .increment(1);
            }
            Ok((StatusCode::CREATED, Json(created)))
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSignals {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    before: Option<SignalId>,
}

/// What a history cursor carries: the chat it belongs to and the last signal returned.
#[derive(Serialize, Deserialize)]
struct Cursor {
    c: ChatId,
    b: SignalId,
}

#[derive(Debug, Serialize)]
pub struct Page<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

/// `GET /v1/chats/{chat_id}/signals?limit=&cursor=&before=`: members read history, newest first.
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
    ApiQuery(query): ApiQuery<ListSignals>,
) -> ApiResult<Json<Page<Signal>>> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE_SIZE}"
        )));
    }
    let before = match (query.cursor, query.before) {
        (Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give cursor or before, not both".into(),
            ));
        }
        (Some(cursor), None) => {
            let cursor: Cursor = state
                .cursors
                .open(&cursor)
                .map_err(|_| ApiError::BadRequest("invalid cursor".into()))?;
            if cursor.c != chat_id {
                return Err(ApiError::BadRequest(
                    "cursor belongs to another chat".into(),
                ));
            }
            Some(cursor.b)
        }
        (None, before) => before,
    };
    require_member(&state, chat_id, &caller).await?;
    let mut items = state
        .store
        .signals_before(chat_id, before, limit + 1)
        .await?;
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|last| {
            state.cursors.sign(&Cursor {
                c: chat_id,
                b: last.id,
            })
        })
    } else {
        None
    };
    Ok(Json(Page { items, next_cursor }))
}
