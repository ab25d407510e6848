use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::limits::{MAX_NONCE_BYTES, MAX_TEXT_CHARS};
use confab_schema::model::to_millis;
use confab_schema::{ChatId, Event, Signal, SignalId, SignalKind, UserId};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::responses::{ChatErrors, Invalid};
use super::{
    ApiJson, ApiPath, ApiQuery, ApiState, Caller, Page, not_member, page_limit, require_member,
};
use crate::error::{ApiError, ApiResult};
use crate::store::{Inserted, MarkerKind};

/// Fills in each signal's reaction counts: one store round trip per history bucket.
pub(crate) async fn decorate(state: &ApiState, signals: Vec<Signal>) -> ApiResult<Vec<Signal>> {
    let Some(chat) = signals.first().map(|s| s.chat_id) else {
        return Ok(signals);
    };
    let ids: Vec<SignalId> = signals.iter().map(|s| s.id).collect();
    let mut counts = state.store.reaction_counts_of(chat, &ids).await?;
    Ok(signals
        .into_iter()
        .map(|mut signal| {
            signal.reactions = counts.remove(&signal.id).unwrap_or_default();
            signal
        })
        .collect())
}

/// Fills in one signal's reaction counts.
pub(crate) async fn decorate_one(state: &ApiState, mut signal: Signal) -> ApiResult<Signal> {
    signal.reactions = state
        .store
        .reaction_counts(signal.chat_id, signal.id)
        .await?;
    Ok(signal)
}

fn check_text(text: Option<&str>) -> ApiResult<String> {
    let text = text.unwrap_or_default();
    if text.trim().is_empty() || text.chars().count() > MAX_TEXT_CHARS {
        return Err(ApiError::Unprocessable(format!(
            "text must be 1 to {MAX_TEXT_CHARS} characters"
        )));
    }
    Ok(text.to_owned())
}

/// Stores `signal` as new history: moves the chat up in its members' lists, and publishes it.
async fn record(state: &ApiState, signal: &Signal, members: Vec<UserId>) -> ApiResult<Inserted> {
    let inserted = state.store.insert_signal(signal).await?;
    if let Inserted::Created(created) = &inserted {
        // Deliver first: the chat list order and the author's marker are not on the live path.
        state
            .publish(
                created.chat_id,
                members.clone(),
                Event::SignalCreated(created.clone()),
            )
            .await;
        bookkeep(state, created, members).await;
    }
    Ok(inserted)
}

/// After a signal is stored and published: moves the chat up in its members' lists and the author's
/// read marker to it, coalesced per chat. The signal is history already, so a failure here is not
/// the sender's failure: it is retried in the background, and the send still succeeds.
async fn bookkeep(state: &ApiState, created: &Signal, members: Vec<UserId>) {
    let touched = touch(state, created.clone(), members.clone()).await;
    let marked = mark_authors_read(state, created).await;
    if touched.is_ok() && marked.is_ok() {
        return;
    }
    for error in [touched.err(), marked.err()].into_iter().flatten() {
        tracing::warn!(%error, chat = %created.chat_id, "bookkeeping after a send failed; retrying in the background");
    }
    metrics::counter!("confab_bookkeeping_retries_total").increment(1);
    let state = state.clone();
    let created = created.clone();
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_millis(200);
        for _ in 0..8 {
            tokio::time::sleep(delay).await;
            let touched = touch(&state, created.clone(), members.clone()).await;
            let marked = mark_authors_read(&state, &created).await;
            if touched.is_ok() && marked.is_ok() {
                return;
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(10));
        }
        metrics::counter!("confab_bookkeeping_failures_total").increment(1);
        tracing::error!(chat = %created.chat_id, signal = %created.id, "bookkeeping after a send gave up");
    });
}

/// Moves the chat to `created` in its members' lists (one write per burst of a chat).
async fn touch(
    state: &ApiState,
    created: Signal,
    members: Vec<UserId>,
) -> Result<(), crate::store::StoreError> {
    let chat = created.chat_id;
    state
        .chat_activity
        .advance(
            chat,
            created.id,
            (members, created),
            |newest, (members, latest)| async move {
                state
                    .store
                    .touch_chat(chat, &members, newest, Some(&latest))
                    .await
            },
        )
        .await
}

/// Writing is reading: the author has seen their own signal.
async fn mark_authors_read(
    state: &ApiState,
    created: &Signal,
) -> Result<(), crate::store::StoreError> {
    let (chat, author) = (created.chat_id, created.author_id);
    state
        .author_markers
        .advance((chat, author), created.id, (), |newest, ()| {
            state
                .store
                .advance_marker(MarkerKind::Read, chat, author, newest)
        })
        .await
}

/// Writes a `joined`, `left` or `renamed` signal into the history, for the current members.
pub(crate) async fn append_system_signal(
    state: &ApiState,
    chat: ChatId,
    kind: SignalKind,
    author: UserId,
    text: Option<String>,
) -> ApiResult<Signal> {
    let id = SignalId::new();
    let signal = Signal {
        id,
        chat_id: chat,
        kind,
        author_id: author,
        created_at: id.created_at().unwrap_or_else(OffsetDateTime::now_utc),
        nonce: None,
        text,
        reply_to: None,
        attachments: Vec::new(),
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
    };
    let members = state
        .store
        .members(chat)
        .await?
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    Ok(record(state, &signal, members).await?.signal().clone())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSignal {
    /// Clients post `message`; the server writes the other kinds.
    kind: SignalKind,
    /// Send parity: the same author, chat and nonce give back the same signal. 1 to 128 bytes.
    #[serde(default)]
    nonce: Option<String>,
    /// 1 to 4,000 characters.
    #[serde(default)]
    text: Option<String>,
    /// A signal of the same chat this one answers.
    #[serde(default)]
    reply_to: Option<SignalId>,
    /// Attachment ids (uploaded separately).
    #[serde(default)]
    attachments: Vec<Uuid>,
}

/// Posts a message (members only). 201 with the stored signal; a retry with the same nonce answers
/// 200 with the signal stored the first time and stores nothing.
#[utoipa::path(
    post, operation_id = "create_signal", path = "/v1/chats/{chat_id}/signals", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = CreateSignal,
    responses(
        (status = 201, description = "Stored", body = Signal),
        (status = 200, description = "Already stored with this nonce", body = Signal),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
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
    let text = check_text(body.text.as_deref())?;
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
    let members: Vec<UserId> = state
        .store
        .members(chat_id)
        .await?
        .into_iter()
        .map(|m| m.user_id)
        .collect();
    if !members.contains(&caller.id) {
        return Err(not_member(&state, chat_id).await);
    }
    if let Some(reply_to) = body.reply_to
        && state.store.get_signal(chat_id, reply_to).await?.is_none()
    {
        return Err(ApiError::Unprocessable(
            "reply_to names no signal of this chat".into(),
        ));
    }
    // Refuse before storing when events cannot be published, rather than store a silent message.
    state.bus.check().await?;

    let id = SignalId::new();
    let signal = Signal {
        id,
        chat_id,
        kind: SignalKind::Message,
        author_id: caller.id,
        created_at: id.created_at().unwrap_or_else(OffsetDateTime::now_utc),
        nonce: body.nonce,
        text: Some(text),
        reply_to: body.reply_to,
        attachments: body.attachments,
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
    };
    match record(&state, &signal, members).await? {
        Inserted::Existing(existing) => {
            let existing = decorate_one(&state, existing).await?;
            Ok((StatusCode::OK, Json(existing)))
        }
        Inserted::Created(created) => Ok((StatusCode::CREATED, Json(created))),
    }
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
    let limit = page_limit(query.limit)?;
    let list = format!("signals:{chat_id}");
    // (forward, position): forward pages run oldest first.
    // A cursor continues the listing it came from (clients may resend the first page's
    // `before`/`after` with it); without one, `before` and `after` are exclusive.
    let (forward, position) = match (query.cursor, query.before, query.after) {
        (Some(cursor), _, _) => {
            let (forward, position) = state.open_cursor::<(bool, SignalId)>(&list, &cursor)?;
            (forward, Some(position))
        }
        (None, before, None) => (false, before),
        (None, None, Some(after)) => (true, Some(after)),
        (None, Some(_), Some(_)) => {
            return Err(ApiError::BadRequest(
                "give before or after, not both".into(),
            ));
        }
    };
    require_member(&state, chat_id, caller.id).await?;
    let mut items = match (forward, position) {
        (true, Some(after)) => state.store.signals_after(chat_id, after, limit + 1).await?,
        (_, before) => {
            state
                .store
                .signals_before(chat_id, before, limit + 1)
                .await?
        }
    };
    let next_cursor = if items.len() > limit {
        items.truncate(limit);
        items
            .last()
            .map(|last| state.cursor(&list, (forward, last.id)))
    } else {
        None
    };
    Ok(Json(Page {
        items: decorate(&state, items).await?,
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EditSignal {
    /// The new text, 1 to 4,000 characters.
    text: String,
}

/// Loads a signal of the chat, as 404 when there is none.
async fn load(state: &ApiState, chat: ChatId, id: SignalId) -> ApiResult<Signal> {
    state
        .store
        .get_signal(chat, id)
        .await?
        .ok_or(ApiError::NotFound("no such signal"))
}

/// Edits a message's text (its author only); `edited_at` records when.
#[utoipa::path(
    patch, operation_id = "edit_signal", path = "/v1/chats/{chat_id}/signals/{signal_id}", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal")),
    request_body = EditSignal,
    responses(
        (status = 200, description = "OK", body = Signal),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn edit(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
    ApiJson(body): ApiJson<EditSignal>,
) -> ApiResult<Json<Signal>> {
    let text = check_text(Some(&body.text))?;
    require_member(&state, chat_id, caller.id).await?;
    let signal = load(&state, chat_id, signal_id).await?;
    if signal.author_id != caller.id {
        return Err(ApiError::Forbidden("only the author edits a signal"));
    }
    let not_editable =
        || ApiError::Unprocessable("only messages that are not deleted can be edited".into());
    if signal.kind != SignalKind::Message || signal.deleted {
        return Err(not_editable());
    }
    let signal = state
        .store
        .edit_signal(
            chat_id,
            signal_id,
            &text,
            to_millis(OffsetDateTime::now_utc()),
        )
        .await?
        .ok_or(ApiError::NotFound("no such signal"))?;
    if signal.deleted {
        // Deleted while this edit was on its way: the deletion stands.
        return Err(not_editable());
    }
    state
        .publish_to_members(chat_id, Event::SignalUpdated(signal.clone()))
        .await?;
    Ok(Json(signal))
}

/// Deletes a message (its author, or an owner or admin): history keeps a tombstone without text.
#[utoipa::path(
    delete, operation_id = "delete_signal", path = "/v1/chats/{chat_id}/signals/{signal_id}", tag = "signals",
    params(("chat_id" = ChatId, Path, description = "The chat"), ("signal_id" = SignalId, Path, description = "The signal")),
    responses(
        (status = 200, description = "The tombstone", body = Signal),
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn delete(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id)): ApiPath<(ChatId, SignalId)>,
) -> ApiResult<Json<Signal>> {
    let role = require_member(&state, chat_id, caller.id).await?;
    let signal = load(&state, chat_id, signal_id).await?;
    if signal.author_id != caller.id && !role.is_admin() {
        return Err(ApiError::Forbidden(
            "only the author or an admin deletes a signal",
        ));
    }
    if signal.kind != SignalKind::Message {
        return Err(ApiError::Unprocessable(
            "only messages can be deleted".into(),
        ));
    }
    if signal.deleted {
        return Ok(Json(decorate_one(&state, signal).await?));
    }
    let signal = state
        .store
        .delete_signal(chat_id, signal_id)
        .await?
        .ok_or(ApiError::NotFound("no such signal"))?;
    state
        .publish_to_members(chat_id, Event::SignalDeleted(signal.clone()))
        .await?;
    Ok(Json(signal))
}
