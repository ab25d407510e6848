//! A chat's history: sending messages (with send parity), paging, edits and deletions, and the
//! `joined`, `left` and `renamed` signals the server writes.

use std::time::Duration;

use confab_schema::call::{CallSignal, CallState};
use confab_schema::model::to_millis;
use confab_schema::{
    AttachmentRef, ChatId, Envelope, Event, Signal, SignalId, SignalKind, User, UserId,
};
use time::OffsetDateTime;
use uuid::Uuid;

use super::Outcome;
use super::attachments::Claimed;
use super::inputs::{AttachmentIds, MessageText, Nonce, PageLimit};
use super::paging::{Page, Pager};
use super::rules;
use crate::backoff::Backoff;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{Inserted, MarkerKind, StoreError};

/// A message to send, checked.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub nonce: Option<Nonce>,
    /// `None` only for a message of attachments alone.
    pub text: Option<MessageText>,
    pub reply_to: Option<SignalId>,
    pub attachments: AttachmentIds,
}

impl NewMessage {
    /// Checks a message as a client posts it: only `message` signals, text within bounds, a nonce
    /// within bounds (or absent when the message has attachments), `reply_to` a signal id, at most
    /// ten attachments.
    pub fn parse(
        kind: SignalKind,
        text: Option<String>,
        nonce: Option<String>,
        reply_to: Option<SignalId>,
        attachments: Vec<Uuid>,
    ) -> ApiResult<NewMessage> {
        rules::may_post(kind)?;
        let attachments = AttachmentIds::parse(attachments)?;
        let text = match text {
            None if !attachments.is_empty() => None,
            text => Some(MessageText::parse(text.unwrap_or_default())?),
        };
        let nonce = nonce.map(Nonce::parse).transpose()?;
        if reply_to.is_some_and(|r| !r.is_time_ordered()) {
            return Err(ApiError::Unprocessable(
                "reply_to is not a signal id".into(),
            ));
        }
        Ok(NewMessage {
            nonce,
            text,
            reply_to,
            attachments,
        })
    }
}

/// Why [`ApiState::record`] failed, as far as the signal's write goes.
#[derive(Debug)]
enum Unrecorded {
    /// The signal was not written and never will be.
    NotWritten(ApiError),
    /// Its write failed, and may have been made all the same, or be made yet.
    MaybeWritten(ApiError),
}

impl From<Unrecorded> for ApiError {
    fn from(unrecorded: Unrecorded) -> ApiError {
        match unrecorded {
            Unrecorded::NotWritten(error) | Unrecorded::MaybeWritten(error) => error,
        }
    }
}

/// Where a page of history starts.
#[derive(Clone, Copy, Debug)]
pub enum HistoryFrom {
    /// The newest signals, going back.
    Newest,
    /// Signals older than this one, newest first.
    Before(SignalId),
    /// Signals newer than this one, oldest first (catching up).
    After(SignalId),
}

impl HistoryFrom {
    /// From the query's `before` and `after`, which exclude each other.
    pub fn parse(before: Option<SignalId>, after: Option<SignalId>) -> ApiResult<HistoryFrom> {
        match (before, after) {
            (None, None) => Ok(HistoryFrom::Newest),
            (Some(before), None) => Ok(HistoryFrom::Before(before)),
            (None, Some(after)) => Ok(HistoryFrom::After(after)),
            (Some(_), Some(_)) => Err(ApiError::BadRequest(
                "give before or after, not both".into(),
            )),
        }
    }
}

impl ApiState {
    /// Posts a message (members only). `Created` with the stored signal, or, when the author
    /// already sent this nonce to this chat, `Existing` with that signal and nothing stored.
    pub async fn send_message(
        &self,
        caller: &User,
        chat: ChatId,
        message: NewMessage,
    ) -> ApiResult<Outcome<Signal>> {
        // One read gives both the caller's right to post and the event's recipients.
        let members: Vec<UserId> = self
            .members_if_member(chat, caller.id)
            .await?
            .into_iter()
            .map(|m| m.user_id)
            .collect();
        if let Some(reply_to) = message.reply_to
            && self.store.get_signal(chat, reply_to).await?.is_none()
        {
            return Err(ApiError::Unprocessable(
                "reply_to names no signal of this chat".into(),
            ));
        }
        // Refuse before storing when events cannot be published, rather than store a silent message.
        self.bus.check().await?;
        // On a task of its own: a request cancelled (a client gone, a timeout) between the claim
        // of its attachments and the store would leave them held by a message that never exists.
        let state = self.clone();
        let caller = caller.clone();
        tokio::spawn(async move {
            state
                .claim_and_record(&caller, chat, message, members)
                .await
        })
        .await
        .map_err(|error| {
            tracing::error!(%error, "a send panicked");
            ApiError::Store(StoreError::Unavailable("the send stopped".into()))
        })?
    }

    /// Claims the message's attachments for a new signal, then stores and publishes it; gives the
    /// claims back when it is known not to be stored, and never will be.
    async fn claim_and_record(
        &self,
        caller: &User,
        chat: ChatId,
        message: NewMessage,
        members: Vec<UserId>,
    ) -> ApiResult<Outcome<Signal>> {
        let id = SignalId::new();
        // The attachments are claimed before the message is stored and published: of sends that
        // race for one, only the one that holds it stores a message naming it.
        let (attachments, claimed) = match self
            .claim_for_message(
                chat,
                caller.id,
                &message.attachments,
                message.nonce.as_ref().map(|n| n.as_str()),
                id,
            )
            .await?
        {
            Claimed::Attachments(attachments) => (attachments, true),
            // The insert below finds the nonce taken and answers that attempt's message, which
            // holds them. (Were the nonce to expire in between, this message would be stored
            // naming attachments another holds, and shown without them.)
            Claimed::AttemptOf(attachments) => (attachments, false),
            Claimed::RetryOf(sent) => {
                // The first attempt may have stored it and failed before its claim was listed,
                // or before its bookkeeping.
                self.list_claims(&sent).await;
                self.republish_if_recent(&sent).await;
                self.move_chat_and_marker(&sent, members).await;
                return Ok(Outcome::Existing(self.decorate_one(sent).await?));
            }
        };
        let signal = Signal {
            id,
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: caller.id,
            created_at: id.created_at().unwrap_or_else(OffsetDateTime::now_utc),
            nonce: message.nonce.map(Nonce::into_inner),
            text: message.text.map(MessageText::into_inner),
            reply_to: message.reply_to,
            attachments: attachments
                .into_iter()
                .map(super::attachments::shown)
                .map(AttachmentRef::from)
                .collect(),
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        };
        // Its claim may have waited for another send of its attachments (up to `CLAIM_WAIT`):
        // the author may have left, or been removed, meanwhile, and nothing they send after that
        // is stored; the members it goes to are read again too. (Without attachments, the time
        // since the first read is a read or two.)
        let members = if signal.attachments.is_empty() {
            members
        } else {
            match self.members_if_member(chat, caller.id).await {
                Ok(now) => now.into_iter().map(|m| m.user_id).collect(),
                Err(refused) => {
                    if claimed {
                        self.release_claims(&signal).await;
                    }
                    return Err(refused);
                }
            }
        };
        // The name pushes show the other members: never an address.
        let author_name = super::users::name_shown_to_others(caller);
        let recorded = self
            .record(&signal, members.clone(), Some(&author_name))
            .await;
        match recorded {
            Ok(Inserted::Created(created)) => Ok(Outcome::Created(created)),
            Ok(Inserted::Existing(existing)) => {
                // Another attempt of this nonce was stored: this one's claims are not history.
                if claimed {
                    self.release_claims(&signal).await;
                }
                // That attempt's claims may be gone, taken over once orphaned (by this send, among
                // others): its message is history now (this send may have stored it again), so it
                // takes back those still free.
                self.reclaim(&existing).await;
                self.republish_if_recent(&existing).await;
                // Its attempt may have failed after the store, before its bookkeeping.
                self.move_chat_and_marker(&existing, members).await;
                Ok(Outcome::Existing(self.decorate_one(existing).await?))
            }
            Err(Unrecorded::NotWritten(error)) => {
                if claimed {
                    self.release_claims(&signal).await;
                }
                Err(error)
            }
            // The write may have been made, or be made yet (a timeout does not cancel a replica's
            // write): a read that finds no message now proves nothing. The claims stay, so that
            // the message, whenever it appears, holds its attachments. A retry of its nonce
            // answers it once it is stored; if it never is, its claims are taken over once
            // orphaned (`store::CLAIM_ORPHANED_AFTER`).
            Err(Unrecorded::MaybeWritten(error)) => Err(error),
        }
    }

    /// For a signal sent again (the same nonce): the first attempt may have stored it and then
    /// failed to publish its event (a crash, the bus down), so its event is published again.
    /// Within the log's duplicate window a copy is dropped, so this never delivers it twice;
    /// past the window it is not sent again.
    async fn republish_if_recent(&self, existing: &Signal) {
        let age = OffsetDateTime::now_utc() - existing.created_at;
        if !existing.deleted && age < self.republish_window {
            self.publish_again(Envelope::signal_created(existing.clone()))
                .await;
        }
    }

    /// A page of the chat's history (members only): newest first, or oldest first after `after`.
    /// A cursor continues the listing it came from and overrides `from`.
    pub async fn history(
        &self,
        caller: UserId,
        chat: ChatId,
        from: HistoryFrom,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<Signal>> {
        let pager = Pager::new(self, format!("signals:{chat}"), limit);
        // (forward, position): forward pages run oldest first.
        let (forward, position) = match pager.open::<(bool, SignalId)>(cursor)? {
            Some((forward, position)) => (forward, Some(position)),
            None => match from {
                HistoryFrom::Newest => (false, None),
                HistoryFrom::Before(before) => (false, Some(before)),
                HistoryFrom::After(after) => (true, Some(after)),
            },
        };
        self.require_member(chat, caller).await?;
        let fetched = match (forward, position) {
            (true, Some(after)) => self.store.signals_after(chat, after, pager.fetch()).await?,
            (_, before) => {
                self.store
                    .signals_before(chat, before, pager.fetch())
                    .await?
            }
        };
        let page = pager.page(fetched, |last| (forward, last.id));
        // A page that reaches the newest signal covers everything: its push is not needed.
        let reaches_newest = match (forward, position) {
            (false, None) => true,
            (true, _) => page.next_cursor.is_none(),
            (false, Some(_)) => false,
        };
        let newest = page
            .items
            .iter()
            .map(|s| s.id)
            .max()
            .filter(|_| reaches_newest);
        // Only once the page is made: a page that fails (503) shows nothing, and its push must
        // still come.
        let items = self.decorate(page.items).await?;
        if let Some(newest) = newest {
            self.cancel_pushes(caller, chat, newest).await;
        }
        Ok(Page {
            items,
            next_cursor: page.next_cursor,
        })
    }

    /// Edits a message's text (its author only); `edited_at` records when.
    pub async fn edit_message(
        &self,
        caller: UserId,
        chat: ChatId,
        id: SignalId,
        text: MessageText,
    ) -> ApiResult<Signal> {
        self.require_member(chat, caller).await?;
        let signal = self.load_signal(chat, id).await?;
        rules::may_edit(caller, &signal)?;
        let edited_at = to_millis(OffsetDateTime::now_utc());
        // The entry announces the edit, not the text it replaces, which is the message's no more.
        let envelope = Envelope::new(
            chat,
            Event::SignalUpdated(Signal {
                text: Some(text.as_str().to_owned()),
                edited_at: Some(edited_at),
                ..signal
            }),
        );
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        let Some(mut signal) = self
            .store
            .edit_signal(chat, id, text.as_str(), edited_at)
            .await?
        else {
            // Gone (its chat removed meanwhile): there is no change to announce.
            self.forgo(intent);
            return Err(ApiError::NotFound("no such signal"));
        };
        if signal.deleted {
            // Deleted while this edit was on its way: the deletion stands.
            self.forgo(intent);
            return Err(rules::not_editable());
        }
        self.resolve_attachments(std::slice::from_mut(&mut signal))
            .await?;
        let event = Event::SignalUpdated(signal.clone());
        self.publish_intended(Envelope { event, ..envelope }, intent)
            .await;
        Ok(signal)
    }

    /// Deletes a message (its author, or a group's owner or admin): history keeps a tombstone without
    /// text. Deleting it again answers the tombstone, and finishes whatever a deletion that failed
    /// after writing it left undone (the nonce's record, the chat list's copies, the event).
    pub async fn delete_message(
        &self,
        caller: UserId,
        chat: ChatId,
        id: SignalId,
    ) -> ApiResult<Signal> {
        let (role, stored_chat) = self.member_of(chat, caller).await?;
        let signal = self.load_signal(chat, id).await?;
        rules::may_delete(caller, role, stored_chat.kind, &signal)?;
        // Attachments first: a deletion that fails half-way hides them, and its retry (which
        // finds the tombstone) hides them again.
        self.hide_attachments(&signal).await?;
        // A tombstone goes through the whole deletion again: the store's part is idempotent, and
        // the event has the first attempt's id, so the log keeps one within its duplicate window.
        // The entry holds the tombstone: it may wait in the store for the bus long after the
        // deletion, and deleted text is kept nowhere.
        let envelope = Envelope::signal_deleted(signal);
        let intent = self.outbox.intend(&*self.store, &envelope).await?;
        let Some(mut tombstone) = self.store.delete_signal(chat, id).await? else {
            // Gone (its chat removed meanwhile): there is no change to announce.
            self.forgo(intent);
            return Err(ApiError::NotFound("no such signal"));
        };
        // Its attachments are gone: the tombstone names none.
        tombstone.attachments.clear();
        let event = Event::SignalDeleted(tombstone.clone());
        self.publish_intended(Envelope { event, ..envelope }, intent)
            .await;
        self.withdraw_pushes(&tombstone);
        Ok(tombstone)
    }

    /// Writes a `joined`, `left` or `renamed` signal into the history, for the current members,
    /// once the change it tells of is stored. That change has succeeded whatever happens here, and
    /// a retry of its request would find nothing left to do (the member in, or out, the name as
    /// asked) and write no signal, so the signal's write is bookkeeping: it runs on a task of its
    /// own, which the caller waits for and a cancelled request does not stop, and a failure is
    /// retried in the background, never reported as the change's failure. Should the process die
    /// before a retry writes it, the history lacks that signal; the change stands, announced by its
    /// own event.
    pub(crate) async fn record_system_signal(
        &self,
        chat: ChatId,
        kind: SignalKind,
        author: UserId,
        text: Option<String>,
    ) {
        let signal = server_signal(chat, kind, author, text, None, None);
        let state = self.clone();
        let recorded = tokio::spawn(async move {
            if let Err(error) = state.record_for_members(&signal).await {
                tracing::warn!(%error, %chat, kind = kind.as_str(), "writing a system signal failed; retrying in the background");
                state.retry_system_signal(signal);
            }
        });
        if let Err(error) = recorded.await {
            tracing::error!(%error, "writing a system signal panicked");
        }
    }

    /// Writes `signal`, a system signal whose write failed, again in the background, with backoff,
    /// for a little over half a minute: the same signal, so that a write made all the same (one
    /// that timed out) is found and not made twice.
    fn retry_system_signal(&self, signal: Signal) {
        let kind = signal.kind.as_str();
        metrics::counter!("confab_system_signal_retries_total", "kind" => kind).increment(1);
        let state = self.clone();
        tokio::spawn(async move {
            let mut backoff = bookkeeping_backoff();
            while backoff.wait().await {
                match state.store.get_signal(signal.chat_id, signal.id).await {
                    Ok(Some(stored)) => {
                        // Its event may not be out: published again, the log keeps one copy. Its
                        // write failed after the store (a timeout), so nothing after it was done.
                        state
                            .publish_again(Envelope::signal_created(stored.clone()))
                            .await;
                        match state.store.members(stored.chat_id).await {
                            Ok(members) => {
                                let members = members.into_iter().map(|m| m.user_id).collect();
                                state.move_chat_and_marker(&stored, members).await;
                            }
                            Err(error) => {
                                tracing::warn!(%error, chat = %stored.chat_id, "a system signal found stored moved no chat: members unavailable");
                            }
                        }
                        return;
                    }
                    Ok(None) => {}
                    Err(_) => continue,
                }
                if state.record_for_members(&signal).await.is_ok() {
                    return;
                }
            }
            metrics::counter!("confab_system_signal_failures_total", "kind" => kind).increment(1);
            tracing::error!(chat = %signal.chat_id, signal = %signal.id, kind, "writing a system signal gave up; the history lacks it");
        });
    }

    /// Writes a `call` signal into the history, for the current members, with send parity on
    /// `nonce`: a second write with the same author and nonce (within the nonce's time to live)
    /// stores nothing, publishes the first one's event again (the log drops a copy), and answers
    /// that signal.
    pub(crate) async fn record_call_signal(
        &self,
        chat: ChatId,
        author: UserId,
        call: CallSignal,
        nonce: String,
    ) -> ApiResult<Signal> {
        let signal = server_signal(
            chat,
            SignalKind::Call,
            author,
            None,
            Some(call),
            Some(nonce),
        );
        self.record_for_members(&signal).await
    }

    /// Stores and publishes `signal`, a signal the server writes, for the chat's current members.
    async fn record_for_members(&self, signal: &Signal) -> ApiResult<Signal> {
        let members: Vec<UserId> = self
            .store
            .members(signal.chat_id)
            .await?
            .into_iter()
            .map(|m| m.user_id)
            .collect();
        match self.record(signal, members.clone(), None).await? {
            Inserted::Created(created) => Ok(created),
            Inserted::Existing(existing) => {
                self.republish_if_recent(&existing).await;
                // Its first write may have failed after the store, before its bookkeeping.
                self.move_chat_and_marker(&existing, members).await;
                Ok(existing)
            }
        }
    }

    /// A signal of the chat, as 404 when there is none.
    pub(crate) async fn load_signal(&self, chat: ChatId, id: SignalId) -> ApiResult<Signal> {
        self.store
            .get_signal(chat, id)
            .await?
            .ok_or(ApiError::NotFound("no such signal"))
    }

    /// Fills in the reaction counts of a page of one chat's signals: one store round trip per
    /// history bucket.
    pub(crate) async fn decorate(&self, signals: Vec<Signal>) -> ApiResult<Vec<Signal>> {
        if signals.is_empty() {
            return Ok(signals);
        }
        let ids: Vec<(ChatId, SignalId)> = signals.iter().map(|s| (s.chat_id, s.id)).collect();
        let mut counts = self.store.reaction_counts_across(&ids).await?;
        let mut signals = signals;
        self.resolve_attachments(&mut signals).await?;
        Ok(signals
            .into_iter()
            .map(|mut signal| {
                signal.reactions = counts.remove(&signal.id).unwrap_or_default();
                signal
            })
            .collect())
    }

    pub(crate) async fn decorate_one(&self, signal: Signal) -> ApiResult<Signal> {
        let mut decorated = self.decorate(vec![signal]).await?;
        decorated
            .pop()
            .ok_or_else(|| ApiError::Store(StoreError::Corrupt("signal vanished".into())))
    }

    /// Stores `signal` as new history, publishes it, then moves the chat up in its members' lists.
    /// Its event goes to the outbox first: a failed store write leaves the entry for a sweep,
    /// which publishes it only if the write happened after all. `author_name` is the author's
    /// display name when the caller has it at hand (a push shows it); else it is read.
    async fn record(
        &self,
        signal: &Signal,
        members: Vec<UserId>,
        author_name: Option<&str>,
    ) -> Result<Inserted, Unrecorded> {
        let intent = self
            .outbox
            .intend(&*self.store, &Envelope::signal_created(signal.clone()))
            .await
            .map_err(Unrecorded::NotWritten)?;
        let inserted = self
            .store
            .insert_signal(signal)
            .await
            .map_err(|error| match error {
                StoreError::NotWritten(_) => Unrecorded::NotWritten(error.into()),
                error => Unrecorded::MaybeWritten(error.into()),
            })?;
        match &inserted {
            Inserted::Created(created) => {
                // Deliver first: the chat list order and the author's marker are not on the live
                // path.
                self.publish_intended(Envelope::signal_created(created.clone()), intent)
                    .await;
                // On a task of its own: a request cancelled from here on (a client gone, a
                // timeout) must not leave the chat unmoved, the author's marker behind and the
                // pushes unscheduled. The response still waits for it.
                let state = self.clone();
                let (created, author_name) = (created.clone(), author_name.map(str::to_owned));
                let bookkept = tokio::spawn(async move {
                    state
                        .bookkeep(&created, members, author_name.as_deref())
                        .await;
                });
                if let Err(error) = bookkept.await {
                    tracing::error!(%error, "bookkeeping after a send panicked");
                }
            }
            // Another attempt of this nonce stored its own signal; this one's id is not history.
            Inserted::Existing(_) => self.forgo(intent),
        }
        Ok(inserted)
    }

    /// After a signal is stored and published: moves the chat up in its members' lists and the
    /// author's read marker to it, coalesced per chat. The signal is history already, so a failure
    /// here is not the sender's failure: it is retried in the background, and the send succeeds.
    async fn bookkeep(&self, created: &Signal, members: Vec<UserId>, author_name: Option<&str>) {
        self.schedule_pushes(created, &members, author_name).await;
        futures::join!(
            self.move_chat_and_marker(created, members),
            self.list_claims(created)
        );
    }

    /// Moves the chat up to `created` in the lists of `members` and its author's read marker to
    /// it; a failure is retried in the background. Both only ever move forward, so doing it again
    /// for a signal a retry found stored (whose first attempt failed before, or during, its
    /// bookkeeping) changes nothing that was done, and does what was not.
    async fn move_chat_and_marker(&self, created: &Signal, members: Vec<UserId>) {
        let (touched, marked) = futures::join!(
            self.touch(created.clone(), members.clone()),
            self.mark_authors_read(created)
        );
        if touched.is_ok() && marked.is_ok() {
            return;
        }
        for error in [touched.err(), marked.err()].into_iter().flatten() {
            tracing::warn!(%error, chat = %created.chat_id, "bookkeeping after a send failed; retrying in the background");
        }
        let state = self.clone();
        let created = created.clone();
        retry_bookkeeping(created.chat_id, "bookkeeping after a send", move || {
            let (state, created, members) = (state.clone(), created.clone(), members.clone());
            async move {
                let (touched, marked) = futures::join!(
                    state.touch(created.clone(), members),
                    state.mark_authors_read(&created)
                );
                touched.is_ok() && marked.is_ok()
            }
        });
    }

    /// Moves the chat to `created` in its members' lists: one write per burst of a chat.
    async fn touch(&self, created: Signal, members: Vec<UserId>) -> Result<(), StoreError> {
        let chat = created.chat_id;
        self.chat_activity
            .advance(
                chat,
                created.id,
                (members, created),
                |newest, (members, latest)| async move {
                    self.store
                        .touch_chat(chat, &members, newest, Some(&latest))
                        .await
                },
            )
            .await
    }

    /// Writing is reading: the author has seen their own signal. Not a signal the server writes
    /// under their name for what others or time did (a call's `ended` or `missed` is its
    /// starter's, whoever ended it or however long it rang; a `left` may be a removal), nor a
    /// call's `joined`, answered from a notification as often as from the chat: the messages
    /// sent meanwhile stay unread to them, and out of their "seen by".
    async fn mark_authors_read(&self, created: &Signal) -> Result<(), StoreError> {
        let written_by_the_author = match created.kind {
            SignalKind::Message | SignalKind::Joined | SignalKind::Renamed => true,
            SignalKind::Left => false,
            SignalKind::Call => created
                .call
                .as_ref()
                .is_some_and(|call| call.state == CallState::Started),
        };
        if !written_by_the_author {
            return Ok(());
        }
        let (chat, author) = (created.chat_id, created.author_id);
        self.author_markers
            .advance((chat, author), created.id, (), |newest, ()| {
                self.store
                    .advance_marker(MarkerKind::Read, chat, author, newest)
            })
            .await
    }
}

/// The retries of bookkeeping after a change (a system signal; the chat list and the author's
/// marker after a send) in the background: 8, over a little more than half a minute.
fn bookkeeping_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(10), 8)
}

/// Runs `attempt` again in the background, with backoff, until it succeeds or the attempts run
/// out: bookkeeping of a change that is made (a chat's place in lists, a marker), whose failure is
/// not the request's. Counted, and a give-up logged as `what`'s.
pub(crate) fn retry_bookkeeping<Attempt>(
    chat: ChatId,
    what: &'static str,
    attempt: impl Fn() -> Attempt + Send + 'static,
) where
    Attempt: std::future::Future<Output = bool> + Send,
{
    metrics::counter!("confab_bookkeeping_retries_total").increment(1);
    tokio::spawn(async move {
        let mut backoff = bookkeeping_backoff();
        while backoff.wait().await {
            if attempt().await {
                return;
            }
        }
        metrics::counter!("confab_bookkeeping_failures_total").increment(1);
        tracing::error!(%chat, "{what} gave up");
    });
}

/// A signal the server writes, new.
fn server_signal(
    chat: ChatId,
    kind: SignalKind,
    author: UserId,
    text: Option<String>,
    call: Option<CallSignal>,
    nonce: Option<String>,
) -> Signal {
    let id = SignalId::new();
    Signal {
        id,
        chat_id: chat,
        kind,
        author_id: author,
        created_at: id.created_at().unwrap_or_else(OffsetDateTime::now_utc),
        nonce,
        text,
        reply_to: None,
        attachments: Vec::new(),
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
        call,
    }
}
