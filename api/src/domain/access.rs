//! Membership, checked against the store: only members read or post. The other rules are in
//! [`super::rules`].

use confab_schema::{Chat, ChatId, ChatKind, Member, MemberRole, UserId};

use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

impl ApiState {
    /// 404 unless `caller` is `user` or shares a chat with them: what one user may see of
    /// another (their profile, their presence) is for people they chat with.
    pub async fn require_shared_chat(&self, caller: UserId, user: UserId) -> ApiResult<()> {
        if caller == user {
            return Ok(());
        }
        let (mine, theirs) =
            futures::try_join!(self.store.chats_of(caller), self.store.chats_of(user))?;
        let mine: std::collections::HashSet<_> = mine.into_iter().collect();
        if theirs.iter().any(|chat| mine.contains(chat)) {
            Ok(())
        } else {
            Err(ApiError::NotFound("no such user"))
        }
    }

    /// The caller's role in `chat`: 404 when the chat does not exist (or is a direct chat of
    /// others), 403 when it does but the caller is not in it.
    pub async fn require_member(&self, chat: ChatId, caller: UserId) -> ApiResult<MemberRole> {
        match self.store.member_role(chat, caller).await? {
            Some(role) => Ok(role),
            None => Err(self.not_member(chat).await),
        }
    }

    /// The caller's role and the chat, with the refusals of [`ApiState::require_member`].
    pub async fn member_of(&self, chat: ChatId, caller: UserId) -> ApiResult<(MemberRole, Chat)> {
        let role = self.require_member(chat, caller).await?;
        let chat = self
            .store
            .get_chat(chat)
            .await?
            .ok_or(ApiError::NotFound("no such chat"))?;
        Ok((role, chat))
    }

    /// Every member of `chat`, if the caller is one (one read for both), with the refusals of
    /// [`ApiState::require_member`].
    pub async fn members_if_member(&self, chat: ChatId, caller: UserId) -> ApiResult<Vec<Member>> {
        let members = self.store.members(chat).await?;
        if !members.iter().any(|m| m.user_id == caller) {
            return Err(self.not_member(chat).await);
        }
        Ok(members)
    }

    /// The refusal for a non-member: 404 for an unknown chat, and for a direct chat, else 403. A
    /// direct chat's id is derived from its two users' ids, which others can learn: a 403 would
    /// tell anyone that the two talk in private.
    pub(crate) async fn not_member(&self, chat: ChatId) -> ApiError {
        match self.store.get_chat(chat).await {
            Ok(Some(chat)) if chat.kind != ChatKind::Direct => {
                ApiError::Forbidden("you are not a member of this chat")
            }
            Ok(_) => ApiError::NotFound("no such chat"),
            Err(error) => error.into(),
        }
    }
}
