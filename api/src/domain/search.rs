//! Message search over the caller's chats. The engine is given the caller's chats as a filter, so
//! it never returns a hit of another chat and a page is full whenever more hits exist; the hits'
//! signals are then read from the store, so they show the current text and reactions.

use confab_runtime::search::{Query, Search};
use std::collections::HashMap;

use confab_schema::{ChatId, Signal, SignalId, SignalKind, UserId};
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::inputs::{PageLimit, SearchText};
use super::paging::{Page, Pager};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// A message found.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchHit {
    pub signal: Signal,
    pub chat_id: ChatId,
    /// The text around the matches, as HTML: escaped, matched words in `<mark>…</mark>`, `…` where
    /// it is cropped.
    pub highlight: String,
}

/// What to search for, and where.
#[derive(Clone, Debug)]
pub struct MessageSearch {
    pub text: SearchText,
    /// Only this chat (the caller must be a member).
    pub chat: Option<ChatId>,
    pub author: Option<UserId>,
    pub before: Option<OffsetDateTime>,
    pub after: Option<OffsetDateTime>,
}

impl MessageSearch {
    /// The list a cursor of this search belongs to: the caller and every parameter, hashed.
    fn list(&self, caller: UserId) -> String {
        let mut hash = Sha256::new();
        for part in [
            caller.to_string(),
            self.text.as_str().to_owned(),
            format!("{:?}", self.chat),
            format!("{:?}", self.author),
            format!("{:?}", self.before.map(|t| t.unix_timestamp_nanos())),
            format!("{:?}", self.after.map(|t| t.unix_timestamp_nanos())),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        let digest = hash.finalize();
        let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        format!("search:{hex}")
    }
}

impl ApiState {
    fn search_engine(&self) -> ApiResult<&dyn Search> {
        self.search.as_deref().ok_or(ApiError::SearchDisabled)
    }

    /// A page of the messages matching `search` in the caller's chats, best first.
    pub async fn search_messages(
        &self,
        caller: UserId,
        search: MessageSearch,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<SearchHit>> {
        let engine = self.search_engine()?;
        let pager = Pager::new(self, search.list(caller), limit);
        let offset: usize = pager.open(cursor)?.unwrap_or(0);
        let chats = match search.chat {
            Some(chat) => {
                self.require_member(chat, caller).await?;
                vec![chat]
            }
            None => self.store.chats_of(caller).await?,
        };
        let found = engine
            .search(&Query {
                text: search.text.as_str().to_owned(),
                chats,
                author: search.author,
                before: search.before,
                after: search.after,
                offset,
                limit: pager.limit,
            })
            .await?;
        let next_cursor = found.more.then(|| pager.cursor(offset + found.hits.len()));
        // The hits' signals in one read and their reactions in another, whatever chats they are in.
        let ids: Vec<(ChatId, SignalId)> = found.hits.iter().map(|h| (h.chat_id, h.id)).collect();
        let stored = self.store.get_signals(&ids).await?;
        // Deleted since it was indexed: left out (the indexer removes it shortly).
        let live: Vec<Signal> = stored
            .into_iter()
            .flatten()
            .filter(|s| !s.deleted)
            .collect();
        let mut decorated: HashMap<SignalId, Signal> = self
            .decorate(live)
            .await?
            .into_iter()
            .map(|s| (s.id, s))
            .collect();
        // Edited since it was indexed: left out too, until the indexer has its new text (its old
        // words must not find it, nor its highlight show them).
        let items = found
            .hits
            .into_iter()
            .filter_map(|hit| {
                let signal = decorated.remove(&hit.id)?;
                // Only messages: an index written before renames were left out still has them.
                (signal.kind == SignalKind::Message
                    && hit.indexed_from(signal.text.as_deref().unwrap_or("")))
                .then_some((hit, signal))
            })
            .map(|(hit, signal)| SearchHit {
                signal,
                chat_id: hit.chat_id,
                highlight: hit.highlight,
            })
            .collect();
        Ok(Page { items, next_cursor })
    }
}
