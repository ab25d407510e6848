//! Direct chats and groups, and the chat list.

use std::collections::BTreeSet;

use confab_schema::limits::MAX_INITIAL_MEMBERS;
use confab_schema::model::to_millis;
use confab_schema::{
    Chat, ChatId, ChatKind, Envelope, Event, MemberRole, SignalId, SignalKind, User, UserId,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::Outcome;
use super::inputs::{ChatDescription, ChatName, DescriptionChange, PageLimit};
use super::paging::{Page, Pager};
use super::rules;
use super::signals::retry_bookkeeping;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{
    ChatActivity, ChatEntry, InfoChange, NewChat, StoreError, UNREAD_CAP, UnreadQuery,
};

/// A chat to create, checked.
#[derive(Clone, Debug)]
pub enum ChatToCreate {
    /// A group: the caller as owner, and the named members.
    Group {
        name: ChatName,
        description: Option<ChatDescription>,
        members: Vec<UserId>,
    },
    /// The direct chat of the caller and one other user.
    Direct { with: Vec<UserId> },
}

impl ChatToCreate {
    /// Checks a creation as a client posts it.
    pub fn parse(
        kind: ChatKind,
        name: Option<String>,
        description: Option<String>,
        members: Vec<UserId>,
    ) -> ApiResult<ChatToCreate> {
        let name = name.map(ChatName::parse).transpose()?;
        let description = description.map(ChatDescription::parse).transpose()?;
        if members.len() > MAX_INITIAL_MEMBERS {
            return Err(ApiError::Unprocessable(format!(
                "at most {MAX_INITIAL_MEMBERS} members can be named at creation"
            )));
        }
        match kind {
            ChatKind::Group => Ok(ChatToCreate::Group {
                name: name.ok_or_else(|| ApiError::Unprocessable("a group needs a name".into()))?,
                description,
                members,
            }),
            ChatKind::Direct => {
                if name.is_some() || description.is_some() {
                    return Err(ApiError::Unprocessable(
                        "a direct chat has no name or description".into(),
                    ));
                }
                Ok(ChatToCreate::Direct { with: members })
            }
        }
    }
}

impl ChatToCreate {
    /// The people the creation puts into a chat besides `creator`, what it costs of the
    /// creator's allowance (`limits.chats`): one for a direct chat, the other members named
    /// (each once) for a group, at least one.
    pub fn people_added(&self, creator: UserId) -> u32 {
        match self {
            ChatToCreate::Group { members, .. } => {
                let others: BTreeSet<UserId> =
                    members.iter().copied().filter(|m| *m != creator).collect();
                u32::try_from(others.len()).unwrap_or(u32::MAX).max(1)
            }
            ChatToCreate::Direct { .. } => 1,
        }
    }
}

/// A change to a group, checked: at least one of the two.
#[derive(Clone, Debug)]
pub struct ChatChange {
    pub name: Option<ChatName>,
    pub description: Option<DescriptionChange>,
}

impl ChatChange {
    pub fn parse(name: Option<String>, description: Option<String>) -> ApiResult<ChatChange> {
        let name = name.map(ChatName::parse).transpose()?;
        let description = description.map(DescriptionChange::parse).transpose()?;
        if name.is_none() && description.is_none() {
            return Err(ApiError::Unprocessable(
                "give a name or a description".into(),
            ));
        }
        Ok(ChatChange { name, description })
    }
}

/// Namespace of direct-chat ids: the same pair of users always names the same chat, without a
/// lightweight transaction (concurrent creations write the same rows).
const DIRECT_NAMESPACE: Uuid = Uuid::from_u128(0x6c0f_a1b2_4e5d_4c1a_9f00_c0fa_b000_0002);

fn direct_chat_id(a: UserId, b: UserId) -> ChatId {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    ChatId(Uuid::new_v5(
        &DIRECT_NAMESPACE,
        format!("direct|{low}|{high}").as_bytes(),
    ))
}

impl ApiState {
    /// Creates a group, or a direct chat (the same pair always gets the same chat back, as
    /// `Existing`).
    pub async fn create_chat(&self, caller: &User, chat: ChatToCreate) -> ApiResult<Outcome<Chat>> {
        let named = match &chat {
            ChatToCreate::Group { members, .. } => members,
            ChatToCreate::Direct { with } => with,
        };
        let others: BTreeSet<UserId> = named.iter().copied().filter(|m| *m != caller.id).collect();
        for member in &others {
            if self.store.get_user(*member).await?.is_none() {
                return Err(ApiError::Unprocessable(format!("unknown user {member}")));
            }
        }
        let (id, kind, name, description, members) = match chat {
            ChatToCreate::Group {
                name, description, ..
            } => {
                if others.is_empty() {
                    return Err(ApiError::Unprocessable(
                        "a group needs at least one other member".into(),
                    ));
                }
                let mut members = vec![(caller.id, MemberRole::Owner)];
                members.extend(others.iter().map(|m| (*m, MemberRole::Member)));
                (
                    ChatId::new(),
                    ChatKind::Group,
                    Some(name.into_inner()),
                    description.map(ChatDescription::into_inner),
                    members,
                )
            }
            ChatToCreate::Direct { .. } => {
                let [other] = others.iter().copied().collect::<Vec<_>>()[..] else {
                    return Err(ApiError::Unprocessable(
                        "a direct chat has exactly one other member".into(),
                    ));
                };
                let id = direct_chat_id(caller.id, other);
                if self.store.get_chat(id).await?.is_some() {
                    self.require_member(id, caller.id).await?;
                    return Ok(Outcome::Existing(self.chat_view(id, caller.id).await?));
                }
                (
                    id,
                    ChatKind::Direct,
                    None,
                    None,
                    vec![(caller.id, MemberRole::Owner), (other, MemberRole::Owner)],
                )
            }
        };
        let new_chat = NewChat {
            id,
            kind,
            name,
            description,
            created_at: to_millis(OffsetDateTime::now_utc()),
            created_by: caller.id,
            members,
        };
        let member_ids: Vec<UserId> = new_chat.members.iter().map(|(m, _)| *m).collect();
        let chat = Chat {
            id: new_chat.id,
            kind: new_chat.kind,
            name: new_chat.name.clone(),
            description: new_chat.description.clone(),
            created_at: new_chat.created_at,
            created_by: new_chat.created_by,
            my_role: Some(MemberRole::Owner),
            latest_signal: None,
            unread_count: 0,
        };
        // The members start receiving the chat's events with this one.
        let envelope = Envelope::new(
            id,
            Event::ChatUpdated(Box::new(Chat {
                my_role: None,
                ..chat.clone()
            })),
        )
        .joining(member_ids.clone());
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        self.store.create_chat(&new_chat).await?;
        // The chat exists from here: listing it is bookkeeping, and its failure fails no creation
        // (a retry would make a second group, or find the direct chat made and never list it).
        let listed_at = SignalId::new();
        if let Err(error) = self
            .store
            .touch_chat(id, &member_ids, listed_at, None)
            .await
        {
            self.list_new_chat_later(id, member_ids, listed_at, error);
        }
        self.publish_intended(envelope, intent).await;
        Ok(Outcome::Created(chat))
    }

    /// Retries, in the background, putting a new chat into its members' lists (at `listed_at`, so
    /// that a message sent meanwhile keeps its later place).
    fn list_new_chat_later(
        &self,
        chat: ChatId,
        members: Vec<UserId>,
        listed_at: SignalId,
        error: StoreError,
    ) {
        tracing::warn!(%error, %chat, "listing a new chat failed; retrying in the background");
        let state = self.clone();
        retry_bookkeeping(chat, "listing a new chat", move || {
            let (state, members) = (state.clone(), members.clone());
            async move {
                state
                    .store
                    .touch_chat(chat, &members, listed_at, None)
                    .await
                    .is_ok()
            }
        });
    }

    /// The caller's chats, most recent activity first, each with its latest signal and the
    /// caller's unread count. See `docs/ARCHITECTURE.md` ("What a page costs").
    pub async fn list_chats(
        &self,
        caller: UserId,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<Chat>> {
        let pager = Pager::new(self, format!("chats:{caller}"), limit);
        let after = pager
            .open::<(ChatId, SignalId)>(cursor)?
            .map(|(chat_id, activity)| ChatActivity { chat_id, activity });
        let rows = self.store.chat_list(caller, after, pager.fetch()).await?;
        let page = pager.page(rows, |(last, _)| (last.chat_id, last.activity));
        let entries = page.items.into_iter().filter_map(|(_, entry)| entry);
        Ok(Page {
            items: self.views_of(entries.collect(), caller).await?,
            next_cursor: page.next_cursor,
        })
    }

    /// One chat (members only).
    pub async fn get_chat(&self, caller: UserId, chat: ChatId) -> ApiResult<Chat> {
        self.member_of(chat, caller).await?;
        self.chat_view(chat, caller).await
    }

    /// Renames or describes a group (owners and admins). A new name is written into the history
    /// as a `renamed` signal.
    pub async fn update_chat(
        &self,
        caller: UserId,
        chat_id: ChatId,
        change: ChatChange,
    ) -> ApiResult<Chat> {
        let (role, chat) = self.member_of(chat_id, caller).await?;
        rules::may_change_chat(role, chat.kind)?;
        let name = change.name.map(ChatName::into_inner);
        let description = change.description.map(|change| match change {
            DescriptionChange::Clear => None,
            DescriptionChange::Set(description) => Some(description.into_inner()),
        });
        let envelope = Envelope::new(chat_id, Event::ChatUpdated(Box::new(chat.clone())));
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        // Only what the request changes: a change of the other field made meanwhile stays.
        let stored_change = InfoChange {
            name: name.as_deref().map(Some),
            description: description.as_ref().map(Option::as_deref),
        };
        self.store.update_chat(chat_id, stored_change).await?;
        if name.is_some() && name != chat.name {
            self.record_system_signal(chat_id, SignalKind::Renamed, caller, name.clone())
                .await;
        }
        let Some(updated) = self.store.get_chat(chat_id).await? else {
            // Gone (removed meanwhile): there is no change to announce.
            self.forgo(intent);
            return Err(ApiError::NotFound("no such chat"));
        };
        self.publish_intended(
            Envelope {
                event: Event::ChatUpdated(Box::new(updated.clone())),
                ..envelope
            },
            intent,
        )
        .await;
        self.chat_view(chat_id, caller).await
    }

    /// The chats as `caller` sees them: their role, the latest signal and their unread count, in
    /// the order given (chats they are not in are left out). A constant number of store round
    /// trips for the entries, then one bounded count per chat that has signals past the caller's
    /// read marker.
    async fn chat_views(&self, chats: &[ChatId], caller: UserId) -> ApiResult<Vec<Chat>> {
        let entries = self.store.chat_entries(caller, chats).await?;
        self.views_of(entries, caller).await
    }

    /// The chats of `entries` with their unread counts (one bounded count per chat with signals
    /// past the caller's read marker, in parallel) and the attachments of their newest signals.
    async fn views_of(&self, entries: Vec<ChatEntry>, caller: UserId) -> ApiResult<Vec<Chat>> {
        // One bounded count per chat with signals past the caller's marker, asked together,
        // each up to the newest signal shown with it so the two agree.
        let queries: Vec<UnreadQuery> = entries
            .iter()
            .filter(|entry| entry.may_have_unread())
            .map(|entry| UnreadQuery {
                chat: entry.chat.id,
                after: entry.read_marker,
                through: entry.chat.latest_signal.as_ref().map(|latest| latest.id),
                chat_created_at: entry.chat.created_at,
            })
            .collect();
        let mut counted = self
            .store
            .count_unreads(&queries, caller, UNREAD_CAP)
            .await?
            .into_iter();
        let counts: Vec<usize> = entries
            .iter()
            .map(|entry| {
                if entry.may_have_unread() {
                    counted.next().unwrap_or(0)
                } else {
                    0
                }
            })
            .collect();
        let mut chats: Vec<Chat> = entries
            .into_iter()
            .zip(counts)
            .map(|(entry, unread)| Chat {
                unread_count: unread as u64,
                ..entry.chat
            })
            .collect();
        // The newest signals' attachments, in one read for the page (none when none has any).
        let mut latest: Vec<confab_schema::Signal> = chats
            .iter()
            .filter_map(|c| c.latest_signal.as_deref().cloned())
            .collect();
        if latest.iter().any(|s| !s.attachments.is_empty()) {
            self.resolve_attachments(&mut latest).await?;
            let mut latest = latest.into_iter();
            for chat in chats.iter_mut().filter(|c| c.latest_signal.is_some()) {
                chat.latest_signal = latest.next().map(Box::new);
            }
        }
        Ok(chats)
    }

    async fn chat_view(&self, chat: ChatId, caller: UserId) -> ApiResult<Chat> {
        self.chat_views(&[chat], caller)
            .await?
            .into_iter()
            .next()
            .ok_or(ApiError::NotFound("no such chat"))
    }
}
