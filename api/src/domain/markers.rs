//! Read and delivery markers, and who has reached a signal.

use std::collections::HashSet;

use confab_schema::event::MarkerChange;
use confab_schema::{ChatId, Envelope, Event, SignalId, UserId};
use serde::Serialize;
use utoipa::ToSchema;

use super::inputs::PageLimit;
use super::paging::{Page, Pager};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::MarkerKind;

/// A member whose marker has reached the signal.
#[derive(Debug, Serialize, ToSchema)]
pub struct Seen {
    user_id: UserId,
    up_to: SignalId,
}

/// Markers are read this many at a time while filling a page.
const SCAN: usize = 200;

/// A page reads at most this many batches of markers ([`SCAN`] each), whatever the chat's size:
/// where few members have reached the signal, a page stops short (even empty) with a cursor where
/// its scan stopped, rather than reading every marker of the chat in one request.
const SCAN_BATCHES: usize = 5;

impl ApiState {
    /// Moves the caller's marker forward to `up_to` (never back); answers the marker after.
    pub async fn mark(
        &self,
        kind: MarkerKind,
        caller: UserId,
        chat: ChatId,
        up_to: SignalId,
    ) -> ApiResult<Option<SignalId>> {
        self.require_member(chat, caller).await?;
        if self.store.get_signal(chat, up_to).await?.is_none() {
            return Err(ApiError::Unprocessable(
                "up_to names no signal of this chat".into(),
            ));
        }
        let before = self.store.marker(kind, chat, caller).await?;
        if kind == MarkerKind::Read && before == Some(up_to) {
            // The same mark again, maybe the retry of one whose write failed part-way: a store
            // may keep a read marker in more than one place (on CQL it is also copied into the
            // reader's own partition, for their chat list's unread counts), and the read above
            // sees only the first. Written again, so no half stays; the write is idempotent. A
            // failure changes nothing of what this mark answers.
            if let Err(error) = self.store.advance_marker(kind, chat, caller, up_to).await {
                tracing::warn!(%error, %chat, "a read marker repeated was not written again");
            }
        }
        if let Some(reached) = before.filter(|b| *b >= up_to) {
            // Markers only move forward; an older one changes nothing. Its pushes are looked for
            // all the same: the move that got the marker there may have failed to (its request
            // is answered all the same, and a retry ends here), or not looked for them at all
            // (the author's own marker, moved by their send).
            // In the background: most marks repeat one already made (a client marks on every
            // open of a chat), and their answer does not wait for the push queue.
            if self.push_queue.is_some() {
                let state = self.clone();
                tokio::spawn(async move { state.cancel_pushes(caller, chat, reached).await });
            }
            return Ok(before);
        }
        let change = MarkerChange {
            user_id: caller,
            up_to,
        };
        let event = match kind {
            MarkerKind::Read => Event::ReadUpdated(change),
            MarkerKind::Delivered => Event::DeliveredUpdated(change),
        };
        let envelope = Envelope::new(chat, event);
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        self.store.advance_marker(kind, chat, caller, up_to).await?;
        // Read after the write: a mark further on that ran at once (another device) may have
        // landed between the read above and this write, and the store kept it. Answering and
        // announcing this one's `up_to` would show the marker going back.
        // A failed read leaves it at this mark's own: the move is made and is answered so.
        let reached = match self.store.marker(kind, chat, caller).await {
            Ok(stored) => stored.map_or(up_to, |stored| stored.max(up_to)),
            Err(error) => {
                tracing::debug!(%error, %chat, "a marker was not read again after its move");
                up_to
            }
        };
        // Read or received up to there (on any device): no push for it.
        self.cancel_pushes(caller, chat, reached).await;
        let change = MarkerChange {
            user_id: caller,
            up_to: reached,
        };
        let event = match kind {
            MarkerKind::Read => Event::ReadUpdated(change),
            MarkerKind::Delivered => Event::DeliveredUpdated(change),
        };
        self.publish_intended(Envelope { event, ..envelope }, intent)
            .await;
        Ok(Some(reached))
    }

    /// Members whose `kind` marker has reached `signal` (members only); ex-members are left out.
    /// Each page costs a bounded number of reads: up to [`SCAN_BATCHES`] batches of markers, and
    /// for each one read of which of its users who reached the signal are members. A page may
    /// hold fewer than `limit` (even none) and still have a cursor: the next one goes on where
    /// this one's scan stopped.
    pub async fn list_reached(
        &self,
        kind: MarkerKind,
        caller: UserId,
        chat: ChatId,
        signal: SignalId,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<Seen>> {
        let pager = Pager::new(self, format!("{}:{chat}:{signal}", kind.as_str()), limit);
        let mut after = pager.open::<UserId>(cursor)?;
        self.require_member(chat, caller).await?;
        self.load_signal(chat, signal).await?;
        let mut reached = Vec::new();
        for _ in 0..SCAN_BATCHES {
            let batch = self.store.markers_page(kind, chat, after, SCAN).await?;
            let exhausted = batch.len() < SCAN;
            let reaching: Vec<UserId> = batch
                .iter()
                .filter(|(_, up_to)| *up_to >= signal)
                .map(|(user_id, _)| *user_id)
                .collect();
            // Ex-members' markers stay in the store; only current members are listed, and only
            // those who were members when the signal was sent: a member's `joined` moves their
            // marker past the history before it, which they were never sent.
            let sent_at = signal.created_at();
            let members: HashSet<UserId> = if reaching.is_empty() {
                HashSet::new()
            } else {
                self.store
                    .members_among(chat, &reaching)
                    .await?
                    .into_iter()
                    .filter(|member| sent_at.is_none_or(|at| member.joined_at <= at))
                    .map(|member| member.user_id)
                    .collect()
            };
            for (user_id, up_to) in batch {
                after = Some(user_id);
                if up_to >= signal && members.contains(&user_id) {
                    reached.push(Seen { user_id, up_to });
                    if reached.len() == pager.fetch() {
                        return Ok(pager.page(reached, |last| last.user_id));
                    }
                }
            }
            if exhausted {
                return Ok(pager.page(reached, |last| last.user_id));
            }
        }
        // Out of reads before the page filled: every marker up to `after` has been looked at.
        Ok(pager.stopped_at(reached, after))
    }
}
