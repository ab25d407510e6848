use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::event::ReactionChange;
use confab_schema::{ChatId, Event, SignalId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::responses::{ChatErrors, Invalid};
use super::{ApiPath, ApiQuery, ApiState, Caller, Page, page_limit, require_member};
use crate::error::{ApiError, ApiResult};

/// Longest reaction, in bytes (a family emoji with skin tones is about 35).
const MAX_EMOJI_BYTES: usize = 64;

/// Whether `c` is a pictographic code point that can stand as an emoji.
fn is_pictographic(c: char) -> bool {
    matches!(c as u32,
        0x00A9 | 0x00AE | 0x203C | 0x2049 | 0x2122 | 0x2139 | 0x2194..=0x21AA | 0x231A..=0x23FF
        | 0x24C2 | 0x25AA..=0x25FE | 0x2600..=0x27BF | 0x2934 | 0x2935 | 0x2B00..=0x2BFF | 0x3030
        | 0x303D | 0x3297 | 0x3299 | 0x1F000..=0x1FAFF)
}

/// Whether `c` may join or modify emoji in a sequence.
fn is_emoji_component(c: char) -> bool {
    matches!(c as u32,
        0x200D                    // zero-width joiner
        | 0xFE0F | 0xFE0E         // presentation selectors
        | 0x20E3                  // combining keycap
        | 0x1F3FB..=0x1F3FF       // skin tones
        | 0xE0020..=0xE007F       // tag sequences (subdivision flags)
        | 0x30..=0x39 | 0x23 | 0x2A) // keycap bases 0-9, #, *
}

/// A reaction is one emoji (or emoji sequence) in Unicode form: at least one pictographic
/// character, otherwise only joiners and modifiers.
pub(crate) fn valid_emoji(emoji: &str) -> bool {
    !emoji.is_empty()
        && emoji.len() <= MAX_EMOJI_BYTES
        && emoji.chars().any(|c| is_pictographic(c) || c == '\u{20E3}')
        && emoji
            .chars()
            .all(|c| is_pictographic(c) || is_emoji_component(c))
}

async fn check(
    state: &ApiState,
    chat_id: ChatId,
    signal_id: SignalId,
    emoji: &str,
    caller: UserId,
) -> ApiResult<()> {
    if !valid_emoji(emoji) {
        return Err(ApiError::BadRequest(
            "a reaction is one emoji in Unicode form".into(),
        ));
    }
    require_member(state, chat_id, caller).await?;
    let signal = state
        .store
        .get_signal(chat_id, signal_id)
        .await?
        .ok_or(ApiError::NotFound("no such signal"))?;
    if signal.deleted {
        return Err(ApiError::Unprocessable(
            "deleted signals take no reactions".into(),
        ));
    }
    Ok(())
}

async fn count(
    state: &ApiState,
    chat_id: ChatId,
    signal_id: SignalId,
    emoji: &str,
) -> ApiResult<i64> {
    Ok(state
        .store
        .reaction_counts(chat_id, signal_id)
        .await?
        .get(emoji)
        .copied()
        .unwrap_or(0))
}

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
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn add(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id, emoji)): ApiPath<(ChatId, SignalId, String)>,
) -> ApiResult<(StatusCode, Json<ReactionChange>)> {
    check(&state, chat_id, signal_id, &emoji, caller.id).await?;
    let added = state
        .store
        .add_reaction(chat_id, signal_id, &emoji, caller.id)
        .await?;
    let change = ReactionChange {
        signal_id,
        count: count(&state, chat_id, signal_id, &emoji).await?,
        emoji,
        user_id: caller.id,
    };
    if !added {
        return Ok((StatusCode::OK, Json(change)));
    }
    state
        .publish_to_members(chat_id, Event::ReactionAdded(change.clone()))
        .await?;
    Ok((StatusCode::CREATED, Json(change)))
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
        ChatErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath((chat_id, signal_id, emoji)): ApiPath<(ChatId, SignalId, String)>,
) -> ApiResult<Json<ReactionChange>> {
    check(&state, chat_id, signal_id, &emoji, caller.id).await?;
    let removed = state
        .store
        .remove_reaction(chat_id, signal_id, &emoji, caller.id)
        .await?;
    let change = ReactionChange {
        signal_id,
        count: count(&state, chat_id, signal_id, &emoji).await?,
        emoji,
        user_id: caller.id,
    };
    if removed {
        state
            .publish_to_members(chat_id, Event::ReactionRemoved(change.clone()))
            .await?;
    }
    Ok(Json(change))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListReactions {
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// One reaction: who, with what.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reaction {
    emoji: String,
    user_id: UserId,
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
    let limit = page_limit(query.limit)?;
    let list = format!("reactions:{chat_id}:{signal_id}");
    let after = match &query.cursor {
        Some(cursor) => Some(state.open_cursor::<(String, UserId)>(&list, cursor)?),
        None => None,
    };
    require_member(&state, chat_id, caller.id).await?;
    if state.store.get_signal(chat_id, signal_id).await?.is_none() {
        return Err(ApiError::NotFound("no such signal"));
    }
    let mut rows = state
        .store
        .reactions_page(chat_id, signal_id, after, limit + 1)
        .await?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|last| state.cursor(&list, last.clone()))
    } else {
        None
    };
    Ok(Json(Page {
        items: rows
            .into_iter()
            .map(|(emoji, user_id)| Reaction { emoji, user_id })
            .collect(),
        next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::valid_emoji;

    #[test]
    fn emoji_forms() {
        for ok in [
            "👍",
            "🎉",
            "❤️",
            "👍🏽",
            "👨‍👩‍👧",
            "🇫🇷",
            "1️⃣",
            "#️⃣",
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
        ] {
            assert!(valid_emoji(ok), "{ok}");
        }
        for bad in [
            "",
            "a",
            ":thumbsup:",
            "👍 ",
            "1",
            "👍x",
            "<script>",
            &"👍".repeat(17),
        ] {
            assert!(!valid_emoji(bad), "{bad}");
        }
    }
}
