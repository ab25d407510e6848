//! Who is in a chat, and their roles.

use confab_schema::event::MemberChange;
use confab_schema::model::to_millis;
use confab_schema::{Chat, ChatId, Envelope, Event, Member, MemberRole, SignalKind, UserId};
use time::OffsetDateTime;

use super::Outcome;
use super::inputs::PageLimit;
use super::paging::{Page, Pager};
use super::rules;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{GuardedChange, MemberWrite, StoreError};

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
    /// `Existing` when they are a member already: of racing additions of one user, one adds them
    /// and writes one `joined`.
    pub async fn add_member(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user: UserId,
        role: Option<MemberRole>,
    ) -> ApiResult<Outcome<Member>> {
        let role = role.unwrap_or(MemberRole::Member);
        let mut checked_user = false;
        for _ in 0..MEMBERSHIP_ATTEMPTS {
            let (members, my_role, chat) = self.members_for_change(chat_id, caller).await?;
            rules::may_add_member(my_role, chat.kind, role)?;
            if !checked_user {
                if self.store.get_user(user).await?.is_none() {
                    return Err(ApiError::Unprocessable(format!("unknown user {user}")));
                }
                checked_user = true;
            }
            if let Some(existing) = members.iter().find(|m| m.user_id == user) {
                // Perhaps the retry of an addition that stopped after its authoritative write:
                // the chat is listed to the member again.
                self.store.restore_joined_chat(chat_id, user).await?;
                return Ok(Outcome::Existing(existing.clone()));
            }
            let member = Member {
                user_id: user,
                role,
                joined_at: to_millis(OffsetDateTime::now_utc()),
            };
            let change = guarded(caller, my_role, MemberWrite::Add(member.clone()), &members);
            // The new member receives the chat's events from this one on, `joined` signal
            // included.
            let envelope = Envelope::new(
                chat_id,
                Event::MemberJoined(MemberChange {
                    user_id: user,
                    role: Some(role),
                }),
            )
            .joining(vec![user]);
            let intent = self.outbox.intend(&*self.store, &envelope).await?;
            let applied = match self.store.change_member(chat_id, &change).await {
                Ok(applied) => applied,
                Err(error) => self.added_all_the_same(chat_id, user, error).await?,
            };
            if !applied {
                self.forgo(intent);
                continue;
            }
            self.publish_intended(envelope, intent).await;
            self.record_system_signal(chat_id, SignalKind::Joined, user, None)
                .await;
            return Ok(Outcome::Created(member));
        }
        Err(contended())
    }

    /// Removes a member (owners remove anyone, admins remove members), or leaves (anyone,
    /// themselves). Written into the history as `left`. Racing changes cannot leave a chat with
    /// members and no owner.
    pub async fn remove_member(
        &self,
        caller: UserId,
        chat_id: ChatId,
        user: UserId,
    ) -> ApiResult<()> {
        for _ in 0..MEMBERSHIP_ATTEMPTS {
            let (members, my_role, chat) = self.members_for_change(chat_id, caller).await?;
            rules::members_can_leave(chat.kind)?;
            let Some(target) = members.iter().find(|m| m.user_id == user) else {
                return Err(ApiError::NotFound("no such member"));
            };
            rules::may_remove_member(caller, my_role, chat.kind, target, &members)?;
            let change = guarded(caller, my_role, MemberWrite::Remove(user), &members);
            // The last event of this chat the member who left receives.
            let envelope = Envelope::new(
                chat_id,
                Event::MemberLeft(MemberChange {
                    user_id: user,
                    role: None,
                }),
            )
            .leaving(vec![user]);
            let intent = self.outbox.intend(&*self.store, &envelope).await?;
            let applied = match self.store.change_member(chat_id, &change).await {
                Ok(applied) => applied,
                Err(error) => self.removed_all_the_same(chat_id, user, error).await?,
            };
            if !applied {
                self.forgo(intent);
                continue;
            }
            // The member is out once the store says so, and `member.left` goes out at once: it
            // stops the member's streams routing the chat, so nothing sent from now on reaches
            // them. What follows is bookkeeping (the `left` signal waits for the chat's place in
            // every member's list), and a failure of it fails no removal, which a retry could
            // not redo ("no such member").
            self.publish_intended(envelope, intent).await;
            self.withdraw_pushes_of_leavers(chat_id, vec![user]);
            if let Err(error) = self.store.untouch_chat(chat_id, user).await {
                tracing::warn!(%error, chat = %chat_id, %user, "taking a chat out of a leaving member's list failed; readers skip it");
            }
            self.record_system_signal(chat_id, SignalKind::Left, user, None)
                .await;
            // Out of the chat, out of its calls. Should this fail, calls count the chat's members
            // only, so the member neither receives their signalling nor keeps them going.
            if let Err(error) = self.leave_calls_of_chat(chat_id, user).await {
                tracing::warn!(%error, chat = %chat_id, %user, "taking a leaving member out of the chat's calls failed");
            }
            return Ok(());
        }
        Err(contended())
    }

    /// After an addition's write failed: `Ok(true)` when `user` is a member all the same (the
    /// write was applied and a later step of it failed, or it timed out), once the chat is listed
    /// to them again; else the write's `error`. Without this, the member's own rows would not list
    /// the chat (on CQL, a second write after the conditional one), so none of their streams,
    /// searches or chat lists would know it, and a retry would only find them a member.
    async fn added_all_the_same(
        &self,
        chat_id: ChatId,
        user: UserId,
        error: StoreError,
    ) -> ApiResult<bool> {
        match self.store.member_role(chat_id, user).await {
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => return Err(error.into()),
        }
        tracing::warn!(%error, chat = %chat_id, %user, "an addition's write failed after the member was in; finishing it");
        self.store.restore_joined_chat(chat_id, user).await?;
        Ok(true)
    }

    /// After a removal's write failed: `Ok(true)` when `user` is out of `chat` all the same (the
    /// write was applied and a later step of it failed, or it timed out), once the chat is out of
    /// their own rows too; else the write's `error`. The removal then finishes as one that
    /// succeeded: `member.left` goes out now, so the member's open streams stop routing the chat,
    /// instead of when the outbox's sweep finds the entry left behind, seconds later, while a
    /// retry of the request would only hear that there is no such member.
    async fn removed_all_the_same(
        &self,
        chat_id: ChatId,
        user: UserId,
        error: StoreError,
    ) -> ApiResult<bool> {
        match self.store.member_role(chat_id, user).await {
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Err(error.into()),
        }
        tracing::warn!(%error, chat = %chat_id, %user, "a removal's write failed after the member was out; finishing it");
        self.store.forget_left_chat(chat_id, user).await?;
        Ok(true)
    }

    /// After a change of role's write failed: `Ok(true)` when `user` has `role` all the same (the
    /// write was applied and a later step of it failed, or it timed out), once their own row of
    /// the chat says so too; else the write's `error`. The change then finishes as one that
    /// succeeded, with its `member.updated` now: a retry of the request would find the role set
    /// and answer without it, leaving the event to the outbox's sweep.
    async fn role_set_all_the_same(
        &self,
        chat_id: ChatId,
        user: UserId,
        role: MemberRole,
        error: StoreError,
    ) -> ApiResult<bool> {
        match self.store.member_role(chat_id, user).await {
            Ok(Some(now)) if now == role => {}
            Ok(_) | Err(_) => return Err(error.into()),
        }
        tracing::warn!(%error, chat = %chat_id, %user, "a change of role's write failed after it was made; finishing it");
        self.store.restore_joined_chat(chat_id, user).await?;
        Ok(true)
    }

    /// The members of a chat the caller is in, the caller's role among them and the chat, for a
    /// change to decide on.
    async fn members_for_change(
        &self,
        chat_id: ChatId,
        caller: UserId,
    ) -> ApiResult<(Vec<Member>, MemberRole, Chat)> {
        let members = self.members_if_member(chat_id, caller).await?;
        let my_role = members
            .iter()
            .find(|m| m.user_id == caller)
            .map(|m| m.role)
            .ok_or(ApiError::Forbidden("you are not a member of this chat"))?;
        let chat = self
            .store
            .get_chat(chat_id)
            .await?
            .ok_or(ApiError::NotFound("no such chat"))?;
        Ok((members, my_role, chat))
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
        for _ in 0..MEMBERSHIP_ATTEMPTS {
            let (members, my_role, chat) = self.members_for_change(chat_id, caller).await?;
            rules::roles_can_change(chat.kind)?;
            let Some(target) = members.iter().find(|m| m.user_id == user).cloned() else {
                return Err(ApiError::NotFound("no such member"));
            };
            rules::may_set_role(my_role, chat.kind, &target, role, &members)?;
            if target.role == role {
                return Ok(target);
            }
            let change = guarded(caller, my_role, MemberWrite::SetRole(user, role), &members);
            let envelope = Envelope::new(
                chat_id,
                Event::MemberUpdated(MemberChange {
                    user_id: user,
                    role: Some(role),
                }),
            );
            let intent = self.outbox.intend(&*self.store, &envelope).await?;
            let applied = match self.store.change_member(chat_id, &change).await {
                Ok(applied) => applied,
                Err(error) => {
                    self.role_set_all_the_same(chat_id, user, role, error)
                        .await?
                }
            };
            if !applied {
                self.forgo(intent);
                continue;
            }
            self.publish_intended(envelope, intent).await;
            return Ok(Member { role, ..target });
        }
        Err(contended())
    }
}

/// How many times a membership change that lost a race to another decides again, on a fresh read.
const MEMBERSHIP_ATTEMPTS: usize = 16;

/// `write`, applied only if what it was decided on still holds: the caller's role (they may have
/// lost the right to make it), the target's role, and, when it takes an owner away, that another
/// owner is still one (so racing changes never leave members without an owner).
fn guarded(
    caller: UserId,
    caller_role: MemberRole,
    write: MemberWrite,
    members: &[Member],
) -> GuardedChange {
    let target = write.user();
    let mut expect = vec![(caller, caller_role)];
    let target_role = members.iter().find(|m| m.user_id == target).map(|m| m.role);
    if let Some(role) = target_role
        && target != caller
    {
        expect.push((target, role));
    }
    let takes_an_owner = target_role == Some(MemberRole::Owner)
        && match &write {
            MemberWrite::Remove(_) => true,
            MemberWrite::SetRole(_, role) => *role != MemberRole::Owner,
            MemberWrite::Add(_) => false,
        };
    if takes_an_owner
        && let Some(other) = members
            .iter()
            .find(|m| m.role == MemberRole::Owner && m.user_id != target)
        && !expect.iter().any(|(user, _)| *user == other.user_id)
    {
        expect.push((other.user_id, MemberRole::Owner));
    }
    GuardedChange { write, expect }
}

/// The answer when a change kept losing races to others.
fn contended() -> ApiError {
    ApiError::Store(StoreError::Unavailable(
        "the chat's members kept changing; try again".into(),
    ))
}
