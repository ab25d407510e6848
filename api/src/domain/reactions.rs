//! Emoji reactions to signals.

use confab_schema::event::ReactionChange;
use confab_schema::{ChatId, Envelope, Event, SignalId, UserId};
use serde::Serialize;
use utoipa::ToSchema;

use super::Outcome;
use super::inputs::{Emoji, PageLimit};
use super::paging::{Page, Pager};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// How many different emoji one message takes: every history page and chat-list entry carries
/// each one's count.
pub const MAX_EMOJI_PER_SIGNAL: usize = 20;

/// One reaction: who, with what.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reaction {
    emoji: String,
    user_id: UserId,
}

impl ApiState {
    /// Adds the caller's reaction: `Created`, or `Existing` when it was there (idempotent).
    pub async fn add_reaction(
        &self,
        caller: UserId,
        chat: ChatId,
        signal: SignalId,
        emoji: Emoji,
    ) -> ApiResult<Outcome<ReactionChange>> {
        self.reactable(caller, chat, signal).await?;
        // Two new emoji at once may both pass; the bound is against abuse, not to count exactly.
        let counts = self.store.reaction_counts(chat, signal).await?;
        if counts.len() >= MAX_EMOJI_PER_SIGNAL && !counts.contains_key(emoji.as_str()) {
            return Err(ApiError::Unprocessable(format!(
                "a message takes at most {MAX_EMOJI_PER_SIGNAL} different emoji: react with one \
                 of those"
            )));
        }
        let envelope = Envelope::new(chat, Event::ReactionAdded(intended(caller, signal, &emoji)));
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        let added = self
            .store
            .add_reaction(chat, signal, emoji.as_str(), caller)
            .await?;
        if !added {
            self.forgo(intent);
            let change = self.reaction_change(caller, chat, signal, emoji).await?;
            return Ok(Outcome::Existing(change));
        }
        // Deleted since the check: the deletion came first, and a reaction on it would stay there
        // for all to see. (One stored before a deletion is the deletion's to keep.)
        if self.load_signal(chat, signal).await?.deleted {
            self.store
                .remove_reaction(chat, signal, emoji.as_str(), caller)
                .await?;
            self.forgo(intent);
            return Err(ApiError::Unprocessable(
                "deleted signals take no reactions".into(),
            ));
        }
        let change = self.reaction_change(caller, chat, signal, emoji).await?;
        self.publish_intended(
            Envelope {
                event: Event::ReactionAdded(change.clone()),
                ..envelope
            },
            intent,
        )
        .await;
        Ok(Outcome::Created(change))
    }

    /// Removes the caller's reaction (idempotent), also from a message deleted since.
    pub async fn remove_reaction(
        &self,
        caller: UserId,
        chat: ChatId,
        signal: SignalId,
        emoji: Emoji,
    ) -> ApiResult<ReactionChange> {
        // Also from a deleted message: what its members put on it before, they may take back.
        self.require_member(chat, caller).await?;
        self.load_signal(chat, signal).await?;
        let envelope = Envelope::new(
            chat,
            Event::ReactionRemoved(intended(caller, signal, &emoji)),
        );
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        let removed = self
            .store
            .remove_reaction(chat, signal, emoji.as_str(), caller)
            .await?;
        if !removed {
            self.forgo(intent);
            return self.reaction_change(caller, chat, signal, emoji).await;
        }
        let change = self.reaction_change(caller, chat, signal, emoji).await?;
        self.publish_intended(
            Envelope {
                event: Event::ReactionRemoved(change.clone()),
                ..envelope
            },
            intent,
        )
        .await;
        Ok(change)
    }

    /// Who reacted to a signal, with what (members only).
    pub async fn list_reactions(
        &self,
        caller: UserId,
        chat: ChatId,
        signal: SignalId,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<Reaction>> {
        let pager = Pager::new(self, format!("reactions:{chat}:{signal}"), limit);
        let after = pager.open::<(String, UserId)>(cursor)?;
        self.require_member(chat, caller).await?;
        self.load_signal(chat, signal).await?;
        let fetched = self
            .store
            .reactions_page(chat, signal, after, pager.fetch())
            .await?
            .into_iter()
            .map(|(emoji, user_id)| Reaction { emoji, user_id })
            .collect();
        Ok(pager.page(fetched, |last: &Reaction| {
            (last.emoji.clone(), last.user_id)
        }))
    }

    /// Members react to signals that are not deleted.
    async fn reactable(&self, caller: UserId, chat: ChatId, signal: SignalId) -> ApiResult<()> {
        self.require_member(chat, caller).await?;
        if self.load_signal(chat, signal).await?.deleted {
            return Err(ApiError::Unprocessable(
                "deleted signals take no reactions".into(),
            ));
        }
        Ok(())
    }

    async fn reaction_change(
        &self,
        caller: UserId,
        chat: ChatId,
        signal: SignalId,
        emoji: Emoji,
    ) -> ApiResult<ReactionChange> {
        let count = self
            .store
            .reaction_counts(chat, signal)
            .await?
            .get(emoji.as_str())
            .copied()
            .unwrap_or(0);
        Ok(ReactionChange {
            signal_id: signal,
            count,
            emoji: emoji.into_inner(),
            user_id: caller,
        })
    }
}

/// A reaction change as the outbox records it before the write: a sweep that publishes it reads
/// the count as stored then.
fn intended(caller: UserId, signal: SignalId, emoji: &Emoji) -> ReactionChange {
    ReactionChange {
        signal_id: signal,
        emoji: emoji.as_str().to_owned(),
        user_id: caller,
        count: 0,
    }
}
