use axum::Json;
use axum::extract::State;
use confab_schema::{ChatId, UserId};
use serde::Deserialize;
use utoipa::IntoParams;

use super::responses::{ChatErrors, Limited};
use super::{ApiQuery, Caller};
use crate::domain::Page;
use crate::domain::inputs::{PageLimit, SearchText};
use crate::domain::search::{MessageSearch, SearchHit};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchMessages {
    /// Words to find, 1 to 200 characters with at least one letter or digit: at most 10 words
    /// (runs of letters and digits), each at most 63 bytes. Every word must
    /// match; words of 5 to 8 characters may have one typo and longer ones two; the last word also
    /// matches the start of a word.
    q: String,
    /// Only this chat (the caller must be a member).
    chat_id: Option<ChatId>,
    /// Only messages by this user.
    author_id: Option<UserId>,
    /// Only messages created before this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    before: Option<time::OffsetDateTime>,
    /// Only messages created after this time (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    after: Option<time::OffsetDateTime>,
    /// From a previous page's `next_cursor`, with the same other parameters.
    cursor: Option<String>,
    /// 1 to 100; default 50.
    limit: Option<usize>,
}

/// Messages of the caller's chats that match `q`, best matches first (then newest first). The
/// first 1,000 hits of a query can be paged through.
#[utoipa::path(
    get, operation_id = "search_messages", path = "/v1/search", tag = "signals",
    params(SearchMessages),
    responses(
        (status = 200, description = "OK", body = Page<SearchHit>),
        ChatErrors, Limited,
    ),
    security(("bearer" = []))
)]
pub async fn search(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiQuery(query): ApiQuery<SearchMessages>,
) -> ApiResult<Json<Page<SearchHit>>> {
    state.throttle(Class::Search, caller.id)?;
    let limit = PageLimit::parse(query.limit)?;
    let search = MessageSearch {
        text: SearchText::parse(&query.q)?,
        chat: query.chat_id,
        author: query.author_id,
        before: query.before,
        after: query.after,
    };
    Ok(Json(
        state
            .search_messages(caller.id, search, query.cursor.as_deref(), limit)
            .await?,
    ))
}
