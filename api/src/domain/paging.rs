//! One way to page every list: a signed cursor names the list it belongs to and the position to go
//! on from; a page is `limit + 1` items fetched, `limit` returned, and a cursor when more follow.
//! A list whose items are filtered from a larger scan may stop a page short after a bounded scan
//! ([`Pager::stopped_at`]): fewer items, and a cursor past what it read.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::inputs::PageLimit;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// A page of a list: `{"items": [...], "next_cursor": "…" | null}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Opaque; pass back as `?cursor=` for the next page. `null` on the last page.
    pub next_cursor: Option<String>,
}

/// What every cursor carries: which list it belongs to, so it cannot be replayed elsewhere.
#[derive(Serialize, Deserialize)]
struct Cursor<P> {
    /// The list: e.g. `signals:<chat id>`.
    l: String,
    p: P,
}

/// Paging through one named list (e.g. `signals:<chat id>`), whose positions are `P`.
pub struct Pager<'a> {
    state: &'a ApiState,
    list: String,
    pub limit: usize,
}

impl<'a> Pager<'a> {
    pub fn new(state: &'a ApiState, list: String, limit: PageLimit) -> Pager<'a> {
        Pager {
            state,
            list,
            limit: limit.get(),
        }
    }

    /// How many items to fetch: one more than the page, to know whether another page follows.
    pub fn fetch(&self) -> usize {
        self.limit + 1
    }

    /// The position a client's cursor carries; 400 for a forged cursor or one of another list.
    pub fn open<P: DeserializeOwned>(&self, cursor: Option<&str>) -> ApiResult<Option<P>> {
        let Some(cursor) = cursor else {
            return Ok(None);
        };
        let cursor: Cursor<P> = self
            .state
            .cursors
            .open(cursor)
            .map_err(|_| ApiError::BadRequest("invalid cursor".into()))?;
        if cursor.l != self.list {
            return Err(ApiError::BadRequest(
                "cursor belongs to another list".into(),
            ));
        }
        Ok(Some(cursor.p))
    }

    /// A cursor that continues this list after `position`.
    pub fn cursor<P: Serialize>(&self, position: P) -> String {
        self.state.cursors.sign(&Cursor {
            l: self.list.clone(),
            p: position,
        })
    }

    /// A page whose reading stopped before it filled (fewer than `limit` items, perhaps none),
    /// at `position`: the cursor goes on from there, past what was read and left out.
    pub fn stopped_at<T, P: Serialize>(&self, items: Vec<T>, position: Option<P>) -> Page<T> {
        Page {
            items,
            next_cursor: position.map(|position| self.cursor(position)),
        }
    }

    /// The page of `fetched` (up to [`Pager::fetch`] items), with a cursor after its last item
    /// when more follow.
    pub fn page<T, P: Serialize>(
        &self,
        mut fetched: Vec<T>,
        position: impl Fn(&T) -> P,
    ) -> Page<T> {
        let next_cursor = if fetched.len() > self.limit {
            fetched.truncate(self.limit);
            fetched.last().map(|last| self.cursor(position(last)))
        } else {
            None
        };
        Page {
            items: fetched,
            next_cursor,
        }
    }
}
