//! Who is in a chat, and their roles.

use confab_schema::event::MemberChange;
use confab_schema::model::to_millis;
use confab_schema::{ChatId, Envelope, Event, Member, MemberRole, SignalKind, UserId};
use time::OffsetDateTime;

use super::Outcome;
use super::inputs::PageLimit;
use super::paging::{Page, Pager};
use super::rules;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

impl ApiState {
    /// The chat's members (members only).
    pub async fn list_members(
        &self,
        caller: UserId,
        chat: ChatId,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<Member>> {
        let pager = Pager::new(self, format!("members:{chat}"), limit);
        let after = pager.open::<UserId>(cursor)?;
        self.require_member(chat, caller).await?;
        let fetched = self.store.members_page(chat, after, pager.fetch()).await?;
        Ok(pager.page(fetched, |last| last.user_id))
    }

    /// Adds a member to a group (owners and admins), written into the history as `joined`.
    /// `Existing` when they are a member already.
    pub async fn add_member(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user: UserId,
        role: Option<MemberRole>,
    ) -> ApiResult<Outcome<Member>> {
        let (my_role, chat) = self.member_of(chat_id, caller).await?;
        let role = role.unwrap_or(MemberRole::Member);
        rules::may_add_member(my_role, chat.kind, role)?;
        if self.store.get_user(user).await?.is_none() {
            return Err(ApiError::Unprocessable(format!("unknown user {user}")));
        }
        if let Some(existing) = self
            .store
            .members(chat_id)
            .await?
            .into_iter()
            .find(|m| m.user_id == user)
        {
            return Ok(Outcome::Existing(existing));
        }
        let member = Member {
            user_id: user,
            role,
            joined_at: to_millis(OffsetDateTime::now_utc()),
        };
        self.store.put_member(chat_id, &member).await?;
        // The new member receives the chat's events from this one on, `joined` signal included.
        self.publish(
            Envelope::new(
                chat_id,
                Event::MemberJoined(MemberChange {
                    user_id: user,
                    role: Some(role),
                }),
            )
            .joining(vec![user]),
        )
        .await;
        self.record_system_signal(chat_id, SignalKind::Joined, user, None)
            .await?;
        Ok(Outcome::Created(member))
    }

    /// Removes a member (owners remove anyone, admins remove members), or leaves (anyone,
    /// themselves). Written into the history as `left`.
    pub async fn remove_member(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user: UserId,
    ) -> ApiResult<()> {
        let (my_role, chat) = self.member_of(chat_id, caller).await?;
        rules::members_can_leave(chat.kind)?;
        let members = self.store.members(chat_id).await?;
        let Some(target) = members.iter().find(|m| m.user_id == user) else {
            return Err(ApiError::NotFound("no such member"));
        };
        rules::may_remove_member(caller, my_role, chat.kind, target, &members)?;
        self.store.remove_member(chat_id, user).await?;
        self.store.untouch_chat(chat_id, user).await?;
        self.record_system_signal(chat_id, SignalKind::Left, user, None)
            .await?;
        // The last event of this chat the member who left receives.
        self.publish(
            Envelope::new(
                chat_id,
                Event::MemberLeft(MemberChange {
                    user_id: user,
                    role: None,
                }),
            )
            .leaving(vec![user]),
        )
        .await;
        Ok(())
    }

    /// Changes a member's role. Owners change any role (a chat keeps at least one owner); admins
    /// move members and admins between `member` and `admin`.
    pub async fn set_role(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user: UserId,
        role: MemberRole,
    ) -> ApiResult<Member> {
        let (my_role, chat) = self.member_of(chat_id, caller).await?;
        rules::roles_can_change(chat.kind)?;
        let members = self.store.members(chat_id).await?;
        let Some(target) = members.iter().find(|m| m.user_id == user).cloned() else {
            return Err(ApiError::NotFound("no such member"));
        };
        rules::may_set_role(my_role, chat.kind, &target, role, &members)?;
        if target.role == role {
            return Ok(target);
        }
        let updated = Member { role, ..target };
        self.store.put_member(chat_id, &updated).await?;
        self.publish(Envelope::new(
            chat_id,
            Event::MemberUpdated(MemberChange {
                user_id: user,
                role: Some(role),
            }),
        ))
        .await;
        Ok(updated)
    }
}
