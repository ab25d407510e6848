//! Publishing the event of every change.
//!
//! Every request that changes something runs in a task of its own (`http::run_changes_to_completion`),
//! so a client that disconnects after its change is stored cannot stop the event from being
//! published. A
//! publish that fails is retried in the background with backoff, and counted; the log drops a copy
//! of an event id it already holds, so a retry that races a slow first attempt publishes once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_schema::event::{MarkerChange, MemberChange, ReactionChange};
use confab_schema::{ChatId, Envelope, Event};
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::error::ApiResult;
use crate::outbox::Intent;
use crate::state::ApiState;
use crate::store::MarkerKind;

/// How long a failed publish is retried: the bus may be down for a while.
const RETRY_ATTEMPTS: u32 = 12;
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

/// How many corrections one publish is followed by at most ([`ApiState::have_the_last_word`]):
/// one each time the change's subject changed again while the last was on its way.
const LAST_WORD_ROUNDS: usize = 4;

impl ApiState {
    /// Appends `envelope` to the event log. The change it describes is stored already, so a failed
    /// publish does not fail the request: it is retried in the background until the bus takes it.
    pub(crate) async fn publish(&self, envelope: Envelope) {
        self.publish_in_order(vec![envelope]).await;
    }

    /// Appends `envelopes` to the event log in their order, as [`ApiState::publish`] appends one:
    /// from the first that fails on, they are retried in the background one after another, so
    /// none overtakes one before it.
    pub(crate) async fn publish_in_order(&self, envelopes: Vec<Envelope>) {
        let mut envelopes = envelopes.into_iter();
        while let Some(envelope) = envelopes.next() {
            let kind = envelope.event.kind().as_str();
            let published = match self.leaves_published_before(&envelope).await {
                Ok(()) => self.bus.publish(&envelope).await.map_err(Into::into),
                Err(error) => Err(error),
            };
            match published {
                Ok(_) => {
                    metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
                }
                Err(error) => {
                    tracing::warn!(%error, event = kind, chat = %envelope.chat_id, "event not published yet; retrying in the background");
                    let bus = Arc::clone(&self.bus);
                    let failed = std::iter::once(envelope).chain(envelopes).collect();
                    let retrying = self.retrying_publishes.start();
                    tokio::spawn(async move {
                        retry_in_order(bus, failed).await;
                        drop(retrying);
                    });
                    return;
                }
            }
        }
    }

    /// Appends `envelope`, recorded in the outbox as `intent` before its change was stored, and
    /// then removes the entry. A failed publish is retried in the background for as long as the
    /// process lives (the entry keeps it for a sweep if the process dies first). Each retry
    /// publishes the change as the store holds it then, as a sweep does, or nothing when it was
    /// undone or superseded since: a late copy of the envelope as it was would route a member
    /// removed since back into the chat, or show an edit's text after the message's deletion.
    /// Once published, the change is read again ([`ApiState::have_the_last_word`]).
    pub(crate) async fn publish_intended(&self, envelope: Envelope, intent: Intent) {
        self.publish_then_as_stored(envelope, Some(intent)).await;
    }

    /// Appends `envelope` again, whose change is stored and announced once already (a retried
    /// send publishes its signal's event again in case its first attempt could not): as
    /// [`ApiState::publish_intended`] does, with no outbox entry behind it, so its retries stop
    /// after [`RETRY_ATTEMPTS`]. Each attempt, the first too, publishes the change as the store
    /// holds it then: the message as sent, retried after its deletion, would bring its text back.
    pub(crate) async fn publish_again(&self, envelope: Envelope) {
        self.publish_then_as_stored(envelope, None).await;
    }

    async fn publish_then_as_stored(&self, envelope: Envelope, intent: Option<Intent>) {
        let kind = envelope.event.kind().as_str();
        // A change just made is published as it is; a copy of one made earlier, as the store
        // holds it now (deleted, say, since it was read).
        // `Some(false)`: taken, with nothing to publish (the change undone since); `None`: refused.
        // Not before a removal of this chat still on its way: its members' streams would be
        // routed this event.
        let published = match self.leaves_published_before(&envelope).await {
            Err(_) => None,
            Ok(()) => match intent {
                Some(_) => self.bus.publish(&envelope).await.ok().map(|_| true),
                None => self.publish_as_stored(envelope.clone()).await.ok(),
            },
        };
        if let Some(published) = published {
            if published {
                metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
            }
            if let Some(intent) = intent {
                self.outbox.settle(&self.store, intent);
                // A send's own event needs no check: nobody knows the message before it is
                // published. (`publish_as_stored` checks its own publish.)
                if !matches!(envelope.event, Event::SignalCreated(_)) {
                    self.have_the_last_word(envelope).await;
                }
            }
            return;
        }
        tracing::warn!(event = kind, chat = %envelope.chat_id, "event not published yet; retrying in the background");
        metrics::counter!("confab_events_publish_retries_total", "type" => kind).increment(1);
        // The retry below settles it: this process's own sweep need not look at it.
        let intent = intent.map(|intent| self.outbox.untrack(intent));
        // Until it is out, a removal keeps the chat's later events of this process back.
        let leaving = self.pending_leaves.add(&envelope);
        let state = self.clone();
        let retrying = self.retrying_publishes.start();
        tokio::spawn(async move {
            let _retrying = retrying;
            let _leaving = leaving;
            // With an outbox entry behind it, for as long as the process lives.
            let mut backoff = match intent {
                Some(_) => Backoff::without_end(FIRST_RETRY, LONGEST_RETRY),
                None => Backoff::new(FIRST_RETRY, LONGEST_RETRY, RETRY_ATTEMPTS),
            };
            while backoff.wait().await {
                let attempt = match state.leaves_published_before(&envelope).await {
                    Ok(()) => state.publish_as_stored(envelope.clone()).await,
                    Err(error) => Err(error),
                };
                match attempt {
                    Ok(published) => {
                        if published {
                            metrics::counter!("confab_events_published_total", "type" => kind)
                                .increment(1);
                        }
                        if let Some(intent) = intent {
                            state.outbox.settle_key(&state.store, intent);
                        }
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(%error, event = kind, "event still not published");
                    }
                }
            }
            metrics::counter!("confab_events_unpublished_total", "type" => kind).increment(1);
            tracing::warn!(event = kind, chat = %envelope.chat_id, id = %envelope.id, "event not published again: the bus refused every retry");
        });
    }

    /// After `published` is in the log: reads its change's subject again (a member's role, a
    /// message) and, while the store holds something else than the last event published of it
    /// says, publishes what it holds as a fresh event, so that the chat's log ends with the stored
    /// state. A change's event goes out after its write, and the read it was made from (a
    /// request's own, or a retry's or sweep's read of the store) can be overtaken: a removal
    /// written and published between an addition's write and its `member.joined`, a deletion
    /// published before an edit's `signal.updated`. If the read after the publish still finds
    /// what was published, any change after it is written after that publish, so its own event
    /// comes later in the log; if it does not, the change that made the difference may have been
    /// published first, and the correction follows both. No lock across processes.
    pub(crate) async fn have_the_last_word(&self, published: Envelope) {
        let mut published = published;
        for _ in 0..LAST_WORD_ROUNDS {
            let correction = match self.correction_of(&published).await {
                Ok(Some(correction)) => correction,
                Ok(None) => return,
                Err(error) => {
                    metrics::counter!("confab_events_unchecked_total").increment(1);
                    tracing::warn!(%error, chat = %published.chat_id, id = %published.id, "an event's change not read again after its publish");
                    return;
                }
            };
            let kind = correction.event.kind().as_str();
            metrics::counter!("confab_events_corrections_total", "type" => kind).increment(1);
            match self.publish_stored(correction.clone()).await {
                Ok(Some(correction)) => published = correction,
                // Changed again since it was read: that change's event comes after this one.
                Ok(None) => return,
                Err(error) => {
                    // Retried in the background, as the store holds it then, as a late copy is.
                    tracing::warn!(%error, event = kind, chat = %correction.chat_id, "a correction not published yet; retrying in the background");
                    let state = self.clone();
                    let retrying = self.retrying_publishes.start();
                    tokio::spawn(async move {
                        let _retrying = retrying;
                        let mut backoff = Backoff::new(FIRST_RETRY, LONGEST_RETRY, RETRY_ATTEMPTS);
                        while backoff.wait().await {
                            if state.publish_stored(correction.clone()).await.is_ok() {
                                return;
                            }
                        }
                        metrics::counter!("confab_events_unpublished_total", "type" => kind)
                            .increment(1);
                        tracing::warn!(event = kind, chat = %correction.chat_id, "a correction not published: the bus refused every retry");
                    });
                    return;
                }
            }
        }
    }

    /// The event that tells what the store holds now of the change `published` announced, when
    /// that is no longer what it says: a member gone, back or in another role; a message deleted
    /// or edited again; a reaction taken back, or its emoji's count changed by another; a chat
    /// renamed or described again. `None` when the store holds what it says, or for events of other kinds.
    async fn correction_of(&self, published: &Envelope) -> ApiResult<Option<Envelope>> {
        let chat = published.chat_id;
        Ok(match &published.event {
            Event::MemberJoined(change)
            | Event::MemberUpdated(change)
            | Event::MemberLeft(change) => {
                let said = match &published.event {
                    Event::MemberLeft(_) => None,
                    _ => change.role,
                };
                let user = change.user_id;
                let held = self.store.member_role(chat, user).await?;
                let change = MemberChange {
                    user_id: user,
                    role: held,
                };
                match (said, held) {
                    (said, held) if said == held => None,
                    (_, None) => {
                        Some(Envelope::new(chat, Event::MemberLeft(change)).leaving(vec![user]))
                    }
                    (None, Some(_)) => {
                        Some(Envelope::new(chat, Event::MemberJoined(change)).joining(vec![user]))
                    }
                    (Some(_), Some(_)) => Some(Envelope::new(chat, Event::MemberUpdated(change))),
                }
            }
            // A marker only moves forward: one further on than the event says was moved by a
            // mark whose event may have come first (two devices marking at once).
            Event::ReadUpdated(said) | Event::DeliveredUpdated(said) => {
                let kind = match &published.event {
                    Event::ReadUpdated(_) => MarkerKind::Read,
                    _ => MarkerKind::Delivered,
                };
                let held = self.store.marker(kind, chat, said.user_id).await?;
                held.filter(|held| *held > said.up_to).map(|up_to| {
                    let change = MarkerChange {
                        user_id: said.user_id,
                        up_to,
                    };
                    Envelope::new(
                        chat,
                        match kind {
                            MarkerKind::Read => Event::ReadUpdated(change),
                            MarkerKind::Delivered => Event::DeliveredUpdated(change),
                        },
                    )
                })
            }
            // Clients set an emoji's count from the events: one counted before another
            // reaction's event was published says too little or too much after it.
            Event::ReactionAdded(said) | Event::ReactionRemoved(said) => {
                let added = matches!(published.event, Event::ReactionAdded(_));
                let stored = self
                    .store
                    .has_reaction(chat, said.signal_id, &said.emoji, said.user_id)
                    .await?;
                let count = self
                    .store
                    .reaction_counts(chat, said.signal_id)
                    .await?
                    .get(&said.emoji)
                    .copied()
                    .unwrap_or(0);
                (stored != added || count != said.count).then(|| {
                    let change = ReactionChange {
                        count,
                        ..said.clone()
                    };
                    Envelope::new(
                        chat,
                        if stored {
                            Event::ReactionAdded(change)
                        } else {
                            Event::ReactionRemoved(change)
                        },
                    )
                })
            }
            // A chat's name and description, as clients show them from the events: a change
            // read back before another's write can be published after that one's event.
            Event::ChatUpdated(said) => match self.store.get_chat(chat).await? {
                Some(held) if held.name != said.name || held.description != said.description => {
                    Some(Envelope::new(chat, Event::ChatUpdated(Box::new(held))))
                }
                // Gone with its removal, which has its own event; or as said.
                _ => None,
            },
            Event::SignalCreated(said) | Event::SignalUpdated(said) if !said.deleted => {
                match self.store.get_signal(said.chat_id, said.id).await? {
                    // Gone with its chat, whose removal has its own event.
                    None => None,
                    // A deletion is final: nothing after it in the log shows the message again.
                    Some(held) if held.deleted => {
                        Some(Envelope::new(chat, Event::SignalDeleted(held)))
                    }
                    Some(held) if held.text != said.text || held.edited_at != said.edited_at => {
                        Some(Envelope::new(chat, Event::SignalUpdated(held)))
                    }
                    Some(_) => None,
                }
            }
            _ => None,
        })
    }

    /// Removes an outbox entry whose change was not stored (or whose event another request
    /// publishes).
    pub(crate) fn forgo(&self, intent: Intent) {
        self.outbox.settle(&self.store, intent);
    }

    /// Publishes, as the store holds them, the events taking members out of `next`'s chat that
    /// this process is still retrying (but `next` itself), so that `next` comes after them in
    /// the log: a message sent after a removal whose `member.left` failed to publish would
    /// otherwise reach the removed member's open streams, which route the chat until that event.
    /// `Err` while one is still refused: `next` must wait too. The log keeps one copy of each
    /// (same id) when its own retry publishes it as well.
    ///
    /// Tried at most once per [`FIRST_RETRY`] per chat, whatever the number of events waiting:
    /// each try reads the store (and finishes the removal's bookkeeping), and while the bus is
    /// down every event of a busy chat and each of their retries would try again.
    async fn leaves_published_before(&self, next: &Envelope) -> ApiResult<()> {
        let leaves = self
            .pending_leaves
            .to_try(next.chat_id, next.id, FIRST_RETRY)
            .map_err(|()| {
                crate::error::ApiError::Bus(confab_runtime::bus::BusError::Unavailable(
                    "a removal of the chat is still being published".into(),
                ))
            })?;
        for leave in leaves {
            let id = leave.id;
            self.publish_as_stored(leave).await?;
            self.pending_leaves.published(next.chat_id, id);
        }
        Ok(())
    }
}

/// The events taking members out of a chat (`member.left`, a deletion of the chat: an envelope
/// with `left`) whose publish failed and is being retried, by chat. Every later event of the chat
/// this process publishes first publishes these ([`ApiState::leaves_published_before`]). Only
/// this process's: another one publishing to the chat meanwhile does not know of them.
#[derive(Clone, Debug, Default)]
pub(crate) struct PendingLeaves(Arc<Mutex<HashMap<ChatId, PendingOfChat>>>);

/// A chat's pending leaves, oldest first, and when a later event last tried them.
#[derive(Debug, Default)]
struct PendingOfChat {
    leaves: Vec<Envelope>,
    tried: Option<std::time::Instant>,
}

impl PendingLeaves {
    /// Records `envelope` when it takes members out of its chat, until the guard returned is
    /// dropped (its retry ended) or it is [`PendingLeaves::published`].
    fn add(&self, envelope: &Envelope) -> Option<PendingLeave> {
        if envelope.left.is_empty() {
            return None;
        }
        self.lock()
            .entry(envelope.chat_id)
            .or_default()
            .leaves
            .push(envelope.clone());
        Some(PendingLeave {
            leaves: self.clone(),
            chat: envelope.chat_id,
            id: envelope.id,
        })
    }

    /// The pending leaves of `chat` other than `except`, oldest first, to be tried now; `Err`
    /// when a later event of the chat tried them less than `gap` ago (they are still pending:
    /// that try failed, or is under way).
    fn to_try(&self, chat: ChatId, except: Uuid, gap: Duration) -> Result<Vec<Envelope>, ()> {
        let mut leaves = self.lock();
        let Some(pending) = leaves.get_mut(&chat) else {
            return Ok(Vec::new());
        };
        let others: Vec<Envelope> = pending
            .leaves
            .iter()
            .filter(|leave| leave.id != except)
            .cloned()
            .collect();
        if others.is_empty() {
            return Ok(others);
        }
        let now = std::time::Instant::now();
        if pending
            .tried
            .is_some_and(|tried| now.duration_since(tried) < gap)
        {
            return Err(());
        }
        pending.tried = Some(now);
        Ok(others)
    }

    /// Forgets the leave `id` of `chat`: it is in the log (or there was nothing left to publish).
    fn published(&self, chat: ChatId, id: Uuid) {
        let mut leaves = self.lock();
        if let Some(pending) = leaves.get_mut(&chat) {
            pending.leaves.retain(|leave| leave.id != id);
            if pending.leaves.is_empty() {
                leaves.remove(&chat);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChatId, PendingOfChat>> {
        // A panic while the map is held leaves it whole: each change is one call.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A leave recorded in [`PendingLeaves`], forgotten when dropped.
struct PendingLeave {
    leaves: PendingLeaves,
    chat: ChatId,
    id: Uuid,
}

impl Drop for PendingLeave {
    fn drop(&mut self) {
        self.leaves.published(self.chat, self.id);
    }
}

/// The publishes being retried in the background, counted (`confab_events_publishes_retrying`):
/// what a process shutting down, or a test, can wait for.
#[derive(Clone, Debug, Default)]
pub(crate) struct RetryingPublishes(Arc<AtomicUsize>);

impl RetryingPublishes {
    /// Counts one more until the guard returned is dropped.
    fn start(&self) -> RetryingPublish {
        let now = self.0.fetch_add(1, Ordering::SeqCst) + 1;
        metrics::gauge!("confab_events_publishes_retrying").set(now as f64);
        RetryingPublish(Arc::clone(&self.0))
    }

    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// One publish being retried; see [`RetryingPublishes`].
struct RetryingPublish(Arc<AtomicUsize>);

impl Drop for RetryingPublish {
    fn drop(&mut self) {
        let now = self.0.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("confab_events_publishes_retrying").set(now as f64);
    }
}

impl ApiState {
    /// How many publishes this process is retrying in the background now.
    pub fn publishes_retrying(&self) -> usize {
        self.retrying_publishes.count()
    }
}

/// Publishes `envelopes` in their order, the first of which failed once: each is tried until the
/// bus takes it or [`RETRY_ATTEMPTS`] retries are spent, then the next (one given up on is
/// counted, and the next goes all the same).
async fn retry_in_order(bus: Arc<dyn confab_runtime::bus::Bus>, envelopes: Vec<Envelope>) {
    for (index, envelope) in envelopes.into_iter().enumerate() {
        let kind = envelope.event.kind().as_str();
        // Each one after the first has not been tried yet.
        if index > 0 && bus.publish(&envelope).await.is_ok() {
            metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
            continue;
        }
        metrics::counter!("confab_events_publish_retries_total", "type" => kind).increment(1);
        let mut backoff = Backoff::new(FIRST_RETRY, LONGEST_RETRY, RETRY_ATTEMPTS);
        let mut published = false;
        while backoff.wait().await {
            if bus.publish(&envelope).await.is_ok() {
                published = true;
                break;
            }
        }
        if published {
            metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
        } else {
            metrics::counter!("confab_events_unpublished_total", "type" => kind).increment(1);
            tracing::error!(event = kind, chat = %envelope.chat_id, id = %envelope.id, "event not published: the bus refused every retry");
        }
    }
}
