//! Pairing pools, shared by circles' lobbies and the matching queues.
//!
//! A pool is a set of [`Slot`]s, one per user, read whole and changed only by conditional writes
//! ([`Store::write_slots`](crate::store::Store::write_slots)) that name the version they read. A
//! pairing replaces both users' slots in one conditional write, so of two processes that race to
//! pair the same user, exactly one succeeds; the other reads the pool again and tries another pair.
//!
//! Fairness: the oldest waiter who has any eligible partner is paired first, with a partner drawn at
//! random among the eligible ones. A waiter is passed over only while no one else waiting may be
//! paired with them.

use std::collections::HashMap;

use confab_schema::circle::{CircleMember, QueueKind};
use confab_schema::model::to_millis;
use confab_schema::{
    Chat, ChatId, ChatKind, CircleId, Envelope, Event, MemberRole, SignalId, UserId,
};
use rand::Rng;
use rand::seq::IndexedRandom;
use time::OffsetDateTime;

use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{NewChat, Slot, SlotState, SlotWrite};

/// How often an operation reads a pool again after losing a race before it gives up (409).
pub(crate) const ATTEMPTS: usize = 32;

/// The version of a slot a user gets anew (after leaving, or being swept). Random, not 0: a
/// change read from the slot before it went (a match, a sweep) names that one's version, and must
/// not apply to the new one because it climbed back to the same number.
fn fresh_version() -> i64 {
    rand::random::<i64>() & (i64::MAX >> 1)
}

pub(crate) fn contended() -> ApiError {
    ApiError::Conflict("too many changes at once; try again".into())
}

/// A slot's next version out of a wait or a pairing: idle, the partner remembered as the previous
/// one (a pairing set it). Out of a pairing it still names the pairing's chat, until the end that
/// wrote it has closed the chat (see [`ApiState::end_pair`]).
fn idle(slot: &Slot) -> Slot {
    Slot {
        state: SlotState::Idle,
        partner: None,
        version: slot.version + 1,
        ..slot.clone()
    }
}

/// The chat and partner of an ended pairing whose chat `slot` still names: its end stopped (or
/// is still) between its slot write and its second close, and whoever changes the slot next
/// finishes it.
pub(crate) fn left_unclosed(slot: &Slot) -> Option<(ChatId, UserId)> {
    match (slot.state, slot.chat, slot.previous) {
        (SlotState::Idle, Some(chat), Some(partner)) => Some((chat, partner)),
        _ => None,
    }
}

/// What a leave of a pool did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Leaving {
    /// The user no longer waits (or never did).
    Left,
    /// A pairing took the user's slot before the leave could.
    Paired,
}

/// The answer to a leave whose wait a match took first.
pub(crate) fn matched_meanwhile() -> ApiError {
    ApiError::Matched(
        "you were matched before your leave took effect: the match stands; leave again to end it",
    )
}

/// Two users just paired, and the chat made for them.
#[derive(Clone, Debug)]
pub(crate) struct Pair {
    pub first: Slot,
    pub second: Slot,
    pub chat: Chat,
}

/// A pairing an end ended.
#[derive(Clone, Debug)]
pub(crate) struct Ended {
    pub chat: ChatId,
    pub partner: UserId,
    /// The ender's slot as it was paired: its queue, and when the pairing was made.
    pub slot: Slot,
}

/// The two users of a pairing in the order its chat and its announcement name them (by id, so
/// that an end names them as the maker did).
pub(crate) fn in_pair_order(mut pair: [UserId; 2]) -> [UserId; 2] {
    pair.sort();
    pair
}

/// The chat of a pairing as its announcement carries it, from the pairing alone (its chat's id,
/// its users, and when it was made, which is when the chat counts as created), so that an end
/// can announce the pairing again as its maker did.
pub(crate) fn pair_chat(id: ChatId, pair: [UserId; 2], made: OffsetDateTime) -> Chat {
    let [creator, _] = in_pair_order(pair);
    Chat {
        id,
        kind: ChatKind::Direct,
        name: None,
        description: None,
        created_at: to_millis(made),
        created_by: creator,
        my_role: None,
        latest_signal: None,
        unread_count: 0,
    }
}

/// An event of a pairing (its announcement or its end) on its chat. Its id is named after the
/// chat and the event's type: a chat is one pairing's, which is announced once and ends once, so
/// the log keeps one copy of each however many are published within its duplicate window (an
/// end that announces the pairing again, see [`ApiState::may_be_unannounced`]; an end finished
/// twice, see [`ApiState::end_pair`]).
pub(crate) fn pairing_event(chat: ChatId, event: Event) -> Envelope {
    let id = uuid::Uuid::new_v5(&chat.as_uuid(), event.kind().as_str().as_bytes());
    Envelope {
        id,
        ..Envelope::new(chat, event)
    }
}

/// The announcement of a pairing (`circle.paired`, `queue.matched`), with which its users start
/// receiving its chat's events.
pub(crate) fn pairing_announcement(chat: ChatId, event: Event, pair: [UserId; 2]) -> Envelope {
    pairing_event(chat, event).joining(in_pair_order(pair).to_vec())
}

/// Who may be paired with whom in a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Eligibility {
    /// Anyone but the partner of either one's previous pairing (a circle's lobby).
    NotPrevious,
    /// Users of counterpart queues: `vent` with `listen`, `talk` with `talk` (and a kind that is
    /// no queue with another such).
    Counterparts,
}

impl Eligibility {
    /// Whether `a` and `b` may be paired, asked both ways round.
    fn allows(self, a: &Slot, b: &Slot) -> bool {
        match self {
            Eligibility::NotPrevious => {
                a.previous != Some(b.user_id) && b.previous != Some(a.user_id)
            }
            Eligibility::Counterparts => {
                let wants =
                    |a: &Slot, b: &Slot| queue_of(a).map(|k| k.counterpart()) == queue_of(b);
                wants(a, b) && wants(b, a)
            }
        }
    }

    /// The index of the first of `waiting` with an eligible partner after them, in one pass
    /// (and hashing) over the waiters: asking each about every later one cost the square of
    /// their number when nobody could be paired (a queue of venters and no listener).
    fn first_with_partner(self, waiting: &[&Slot]) -> Option<usize> {
        match self {
            Eligibility::NotPrevious => first_with_partner_not_previous(waiting),
            Eligibility::Counterparts => first_with_partner_by_queue(waiting),
        }
    }
}

fn queue_of(slot: &Slot) -> Option<QueueKind> {
    slot.kind.parse().ok()
}

/// [`Eligibility::first_with_partner`] for counterpart queues: whether two may be paired depends
/// on their queues alone, so it is enough to know, for each queue, where its last waiter is.
fn first_with_partner_by_queue(waiting: &[&Slot]) -> Option<usize> {
    let queues: Vec<Option<QueueKind>> = waiting.iter().map(|slot| queue_of(slot)).collect();
    // A handful of queues (and `None` for a kind that is none): a list beats a map.
    let mut last_of: Vec<(Option<QueueKind>, usize)> = Vec::new();
    for (at, queue) in queues.iter().enumerate() {
        match last_of.iter_mut().find(|(known, _)| known == queue) {
            Some((_, last)) => *last = at,
            None => last_of.push((*queue, at)),
        }
    }
    let wants = |a: Option<QueueKind>, b: Option<QueueKind>| a.map(|k| k.counterpart()) == b;
    queues.iter().enumerate().position(|(at, mine)| {
        last_of
            .iter()
            .any(|(theirs, last)| *last > at && wants(*mine, *theirs) && wants(*theirs, *mine))
    })
}

/// [`Eligibility::first_with_partner`] for a circle's lobby: a waiter may be paired with everyone
/// after them but the partner of their previous pairing and those whose previous partner they
/// were, so, from the last waiter back, it counts those.
fn first_with_partner_not_previous(waiting: &[&Slot]) -> Option<usize> {
    let mut has_partner = vec![false; waiting.len()];
    // Of the waiters after the one looked at: each one's previous partner, and how many had
    // each user as theirs.
    let mut previous_of_later: HashMap<UserId, Option<UserId>> = HashMap::new();
    let mut partnered_later: HashMap<UserId, usize> = HashMap::new();
    for (at, slot) in waiting.iter().enumerate().rev() {
        let later = waiting.len() - at - 1;
        let mut excluded = partnered_later.get(&slot.user_id).copied().unwrap_or(0);
        if let Some(previous) = slot.previous
            && let Some(their_previous) = previous_of_later.get(&previous)
            && *their_previous != Some(slot.user_id)
        {
            // Their previous partner waits after them, not counted above.
            excluded += 1;
        }
        has_partner[at] = later > excluded;
        previous_of_later.insert(slot.user_id, slot.previous);
        if let Some(previous) = slot.previous {
            *partnered_later.entry(previous).or_default() += 1;
        }
    }
    has_partner.iter().position(|&has| has)
}

/// The next pair of `waiting` (in the order they are served): the first with any eligible partner
/// after them, and a partner drawn with `rng` among those eligible after them.
fn pick_pair<'a>(
    waiting: &[&'a Slot],
    eligibility: Eligibility,
    rng: &mut impl Rng,
) -> Option<(&'a Slot, &'a Slot)> {
    let at = eligibility.first_with_partner(waiting)?;
    let first = waiting[at];
    let candidates: Vec<&Slot> = waiting[at + 1..]
        .iter()
        .copied()
        .filter(|other| eligibility.allows(first, other))
        .collect();
    let second = *candidates.choose(rng)?;
    Some((first, second))
}

/// The circle a pool is the lobby of, as an entry read it.
pub(crate) struct Lobby<'a> {
    pub id: CircleId,
    pub expires_at: OffsetDateTime,
    /// Its members, read after the entry was written.
    pub members: &'a [CircleMember],
}

impl Lobby<'_> {
    fn admits(&self, user: UserId) -> bool {
        self.members.iter().any(|member| member.user_id == user)
    }

    fn expired(&self) -> bool {
        self.expires_at <= OffsetDateTime::now_utc()
    }
}

impl ApiState {
    /// Puts `user` in `pool` as waiting for a partner (`kind`: the queue, or empty in a circle).
    /// A user already waiting keeps their place; a user already paired stays paired (answered as
    /// such: whoever wants a new partner ends the pairing first, so its chat is closed).
    pub(crate) async fn enter_pool(&self, pool: &str, user: UserId, kind: &str) -> ApiResult<Slot> {
        for _ in 0..ATTEMPTS {
            let mine = self.slot_of(pool, user).await?;
            let now = OffsetDateTime::now_utc();
            let (write, entered) = match &mine {
                Some(slot) if slot.state != SlotState::Idle => return Ok(slot.clone()),
                Some(slot) => {
                    let entered = Slot {
                        kind: kind.to_owned(),
                        state: SlotState::Waiting,
                        since: now,
                        partner: None,
                        chat: None,
                        version: slot.version + 1,
                        ..slot.clone()
                    };
                    let write = SlotWrite::Replace {
                        expected: slot.version,
                        slot: entered.clone(),
                    };
                    (write, entered)
                }
                None => {
                    let entered = Slot {
                        user_id: user,
                        kind: kind.to_owned(),
                        state: SlotState::Waiting,
                        since: now,
                        partner: None,
                        chat: None,
                        previous: None,
                        version: fresh_version(),
                    };
                    (SlotWrite::Create(entered.clone()), entered)
                }
            };
            if self.store.write_slots(pool, &[write]).await? {
                return Ok(entered);
            }
        }
        Err(contended())
    }

    pub(crate) async fn slot_of(&self, pool: &str, user: UserId) -> ApiResult<Option<Slot>> {
        Ok(self
            .store
            .slots(pool)
            .await?
            .into_iter()
            .find(|s| s.user_id == user))
    }

    /// Pairs the waiting users of `pool` two by two (see the module's fairness rule) while any two
    /// may be paired, each pair into a new direct chat; answers the pairs this call made. In a
    /// circle's `lobby`, only its members are paired (a removal that stopped half-way may have
    /// left a slot), each chat is recorded as the circle's before the pairing is written, so it
    /// goes when the circle does, and a pairing made as the circle expired is undone: the sweep
    /// of the expired circle may have read the circle's chats before it.
    pub(crate) async fn match_pool(
        &self,
        pool: &str,
        lobby: Option<Lobby<'_>>,
        eligibility: Eligibility,
    ) -> ApiResult<Vec<Pair>> {
        let circle = lobby.as_ref().map(|lobby| lobby.id);
        let mut made = Vec::new();
        for _ in 0..ATTEMPTS {
            let slots = self.store.slots(pool).await?;
            let mut waiting: Vec<&Slot> = slots
                .iter()
                .filter(|s| s.state == SlotState::Waiting)
                .filter(|s| lobby.as_ref().is_none_or(|lobby| lobby.admits(s.user_id)))
                .collect();
            waiting.sort_by_key(|s| (s.since, s.user_id));
            let Some((first, second)) = pick_pair(&waiting, eligibility, &mut rand::rng()) else {
                return Ok(made);
            };
            let (first, second) = (first.clone(), second.clone());
            let chat = ChatId::new();
            if let Some(circle) = circle {
                self.store.add_circle_chat(circle, chat).await?;
            }
            // Also when the chat counts as created (see `pair_chat`), as the store keeps it.
            let now = to_millis(OffsetDateTime::now_utc());
            let paired = |me: &Slot, partner: &Slot| Slot {
                state: SlotState::Paired,
                since: now,
                partner: Some(partner.user_id),
                chat: Some(chat),
                previous: Some(partner.user_id),
                version: me.version + 1,
                ..me.clone()
            };
            let (a, b) = (paired(&first, &second), paired(&second, &first));
            let writes = [
                SlotWrite::Replace {
                    expected: first.version,
                    slot: a.clone(),
                },
                SlotWrite::Replace {
                    expected: second.version,
                    slot: b.clone(),
                },
            ];
            if self.store.write_slots(pool, &writes).await? {
                let opened = self.open_pair_chat(chat, [a.user_id, b.user_id], now).await;
                let standing = match opened {
                    Ok(opened) => self
                        .pair_stands(pool, chat, [&a, &b])
                        .await
                        .map(|stands| stands.then_some(opened)),
                    Err(error) => Err(error),
                };
                // Every write of the making came before the circle's end if this reads it
                // later, and so before its sweep started: the sweep sees the chat and ends it.
                // Otherwise the chat goes here, with nobody told of it.
                let expired = lobby.as_ref().is_some_and(Lobby::expired);
                let standing = match standing {
                    Ok(Some(_)) | Ok(None) if expired => {
                        // The slots first, back as they were: paired, they would be ended, and
                        // so announced, by the sweep.
                        self.unpair_unopened(pool, chat, [(&first, &a), (&second, &b)])
                            .await;
                        let closed = self
                            .close_pair_chat(chat, [a.user_id, b.user_id], true)
                            .await;
                        if let Err(error) = closed {
                            if made.is_empty() {
                                return Err(error);
                            }
                            tracing::warn!(%error, "the chat of a pair made as its circle expired stays");
                        }
                        return Ok(made);
                    }
                    standing => standing,
                };
                match standing {
                    Ok(Some(chat)) => made.push(Pair {
                        first: a,
                        second: b,
                        chat,
                    }),
                    Ok(None) => {
                        // Ended while its chat was made: nobody is told of it, and the slots
                        // name it no more, so no later end would close it.
                        let closed = self
                            .close_pair_chat(chat, [a.user_id, b.user_id], circle.is_none())
                            .await;
                        if let Err(error) = closed {
                            if made.is_empty() {
                                return Err(error);
                            }
                            tracing::warn!(%error, "the chat of a pair ended meanwhile stays");
                            return Ok(made);
                        }
                    }
                    Err(error) => {
                        self.unpair_unopened(pool, chat, [(&first, &a), (&second, &b)])
                            .await;
                        // The pairs made before are real: their users are told.
                        if made.is_empty() {
                            return Err(error);
                        }
                        tracing::warn!(%error, "a pair's chat could not be opened; both wait again");
                        return Ok(made);
                    }
                }
            }
        }
        Ok(made)
    }

    /// Puts a pair whose chat could not be opened back to waiting, as they were before (`before`,
    /// `paired`: each one's slot before and after the pairing), and takes them out of what was
    /// opened of the chat. Left paired, both would be matched to a chat that was never opened,
    /// and nobody would tell them. Best effort: a failure here is logged.
    async fn unpair_unopened(&self, pool: &str, chat: ChatId, pair: [(&Slot, &Slot); 2]) {
        let writes = pair.map(|(before, paired)| SlotWrite::Replace {
            expected: paired.version,
            slot: Slot {
                version: paired.version + 1,
                ..before.clone()
            },
        });
        match self.store.write_slots(pool, &writes).await {
            Ok(true) => {}
            Ok(false) => tracing::warn!("a pair whose chat failed changed meanwhile"),
            Err(error) => tracing::warn!(%error, "a pair whose chat failed was not put back"),
        }
        for (_, paired) in pair {
            let user = paired.user_id;
            let (removed, untouched) = futures::join!(
                self.store.remove_member(chat, user),
                self.store.untouch_chat(chat, user)
            );
            if let Err(error) = removed.and(untouched) {
                tracing::warn!(%error, "a pair's unopened chat keeps a member");
            }
        }
    }

    /// Whether both slots of a pairing still name its `chat`, read after the chat was made. An end
    /// of the pairing that raced with the making may have closed the chat before it existed; it
    /// closes it again after its slot write (see [`ApiState::end_pair`]), and this read decides
    /// which of the two sees the whole chat:
    ///
    /// - the end's slot write comes before this read: the read finds the pairing gone, and the
    ///   maker closes the chat it just made (and tells nobody of it);
    /// - it comes after: the chat was whole before it, so the end's close after its write
    ///   closes it (the pairing is announced, and its end follows).
    ///
    /// Either way a close runs after the last write of the making. A process that stops in
    /// between leaves what it did before: a maker stopped before this read leaves the pairing on
    /// record, naming the chat (its id is written before the chat is made), for an end to close;
    /// an end stopped between its slot write and its close after it, while the maker's read came
    /// first, leaves the chat named by both idle slots, for the next end of either to close (see
    /// [`ApiState::end_pair`]).
    async fn pair_stands(&self, pool: &str, chat: ChatId, pair: [&Slot; 2]) -> ApiResult<bool> {
        let slots = self.store.slots(pool).await?;
        Ok(pair.iter().all(|paired| {
            slots.iter().any(|slot| {
                slot.user_id == paired.user_id
                    && slot.state == SlotState::Paired
                    && slot.chat == Some(chat)
            })
        }))
    }

    /// The direct chat of a new pairing made at `made`: both members owners, as in any direct
    /// chat, so it takes no one else and cannot be renamed.
    async fn open_pair_chat(
        &self,
        id: ChatId,
        pair: [UserId; 2],
        made: OffsetDateTime,
    ) -> ApiResult<Chat> {
        let chat = pair_chat(id, pair, made);
        let new_chat = NewChat {
            id,
            kind: ChatKind::Direct,
            name: None,
            description: None,
            created_at: chat.created_at,
            created_by: chat.created_by,
            members: in_pair_order(pair)
                .map(|user| (user, MemberRole::Owner))
                .to_vec(),
        };
        self.store.create_chat(&new_chat).await?;
        self.store
            .touch_chat(id, &pair, SignalId::new(), None)
            .await?;
        Ok(chat)
    }

    /// Whether the announcement of a pairing made at `made` may not be in the log yet: its maker
    /// publishes it after its last read of the pool (see `pair_stands`), so an end may be written
    /// and announced first, and a `queue.unmatched` before its `queue.matched` would tell both of
    /// a pairing that is over. Until the log's duplicate window has passed since, an end publishes
    /// the announcement again (the same id: the log keeps whichever copy comes first) before its
    /// own event. Past it, the maker's publish was long done.
    pub(crate) fn may_be_unannounced(&self, made: OffsetDateTime) -> bool {
        OffsetDateTime::now_utc() - made < self.republish_window
    }

    /// Takes `user`'s slot of `kind` out of `pool` while it is waiting or idle, retrying lost
    /// races (a slot of another kind is not theirs to take). A slot a pairing claimed meanwhile is
    /// answered, not taken: a pairing ends only by ending it (its chat closed, both told), and a
    /// removed slot would leave the partner paired, in a chat nothing closes.
    pub(crate) async fn leave_pool(
        &self,
        pool: &str,
        user: UserId,
        kind: &str,
    ) -> ApiResult<Leaving> {
        for _ in 0..ATTEMPTS {
            let Some(mine) = self.slot_of(pool, user).await? else {
                return Ok(Leaving::Left);
            };
            if mine.kind != kind {
                return Ok(Leaving::Left);
            }
            if mine.state == SlotState::Paired {
                return Ok(Leaving::Paired);
            }
            let write = SlotWrite::Delete {
                user,
                expected: mine.version,
            };
            if self.store.write_slots(pool, &[write]).await? {
                return Ok(Leaving::Left);
            }
        }
        Err(contended())
    }

    /// Ends `user`'s wait in `pool` (their slot stays, idle, remembering their last partner),
    /// retrying lost races; like [`ApiState::leave_pool`], a slot a pairing claimed meanwhile is
    /// answered, not ended.
    pub(crate) async fn stop_waiting(&self, pool: &str, user: UserId) -> ApiResult<Leaving> {
        for _ in 0..ATTEMPTS {
            let Some(mine) = self.slot_of(pool, user).await? else {
                return Ok(Leaving::Left);
            };
            match mine.state {
                SlotState::Idle => return Ok(Leaving::Left),
                SlotState::Paired => return Ok(Leaving::Paired),
                SlotState::Waiting => {}
            }
            let write = SlotWrite::Replace {
                expected: mine.version,
                slot: idle(&mine),
            };
            if self.store.write_slots(pool, &[write]).await? {
                return Ok(Leaving::Left);
            }
        }
        Err(contended())
    }

    /// Ends `user`'s wait or pairing in `pool` for both partners, and answers the pairing that
    /// ended, for the caller to announce (`None`: a wait, nothing, or a pairing someone else ended
    /// meanwhile). Both leave the pairing's chat (and its calls), which is removed too when
    /// `remove_chat`, before the pairing ends: a failure in between leaves the pairing on record,
    /// and a retry finds its chat and finishes. The other way round, a retry found no pairing and
    /// left them in the chat. The chat is closed once more after the pairing ends: the pairing
    /// may still be making it, and the first close may have come before the chat (see
    /// `pair_stands`). Until that second close is done the two idle slots still name the chat,
    /// so an end that stopped in between (a crash, a failed close) is finished by the next end of
    /// either slot: a retry, or the user's next change, which reads the slot first (the end is
    /// answered again, for its event to be published, once: the event's id is the chat's). With
    /// `seen`, only that slot of the user's ends (nothing when it changed since).
    pub(crate) async fn end_pair(
        &self,
        pool: &str,
        user: UserId,
        seen: Option<&Slot>,
        remove_chat: bool,
    ) -> ApiResult<Option<Ended>> {
        let before = match seen {
            Some(slot) => Some(slot.clone()),
            None => self.slot_of(pool, user).await?,
        };
        if let Some(before) = &before
            && let Some((chat, partner)) = left_unclosed(before)
        {
            self.close_pair_chat(chat, [user, partner], remove_chat)
                .await?;
            self.forget_closed_chat(pool, chat).await;
            return Ok(Some(Ended {
                chat,
                partner,
                slot: before.clone(),
            }));
        }
        if let Some((SlotState::Paired, Some(chat), Some(partner))) = before
            .as_ref()
            .map(|slot| (slot.state, slot.chat, slot.partner))
        {
            self.close_pair_chat(chat, [user, partner], remove_chat)
                .await?;
        }
        let expected = seen.map(|slot| slot.version);
        let Some(ended) = self.end_pairing(pool, user, expected).await? else {
            return Ok(None);
        };
        let (Some(chat), Some(partner)) = (ended.chat, ended.partner) else {
            return Ok(None);
        };
        // Also the chat of a pairing made between the read and the end (another call ended the
        // first one).
        self.close_pair_chat(chat, [user, partner], remove_chat)
            .await?;
        self.forget_closed_chat(pool, chat).await;
        Ok(Some(Ended {
            chat,
            partner,
            slot: ended,
        }))
    }

    /// Clears `chat`, closed now, from the idle slots of `pool` that still name it. Best effort:
    /// a slot that changed meanwhile names it no more (a change out of idle starts from no chat),
    /// and one left naming it costs its next change a close of a closed chat, nothing else.
    async fn forget_closed_chat(&self, pool: &str, chat: ChatId) {
        for _ in 0..ATTEMPTS {
            let slots = match self.store.slots(pool).await {
                Ok(slots) => slots,
                Err(error) => {
                    tracing::warn!(%error, %chat, "a closed pairing chat is still named");
                    return;
                }
            };
            let writes: Vec<SlotWrite> = slots
                .iter()
                .filter(|slot| slot.state == SlotState::Idle && slot.chat == Some(chat))
                .map(|slot| SlotWrite::Replace {
                    expected: slot.version,
                    slot: Slot {
                        chat: None,
                        version: slot.version + 1,
                        ..slot.clone()
                    },
                })
                .collect();
            if writes.is_empty() {
                return;
            }
            match self.store.write_slots(pool, &writes).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(%error, %chat, "a closed pairing chat is still named");
                    return;
                }
            }
        }
    }

    /// Takes both of a pair out of its chat, and so out of its calls; with `remove`, removes the
    /// chat and its messages too (the search index is told). Idempotent.
    async fn close_pair_chat(
        &self,
        chat: ChatId,
        pair: [UserId; 2],
        remove: bool,
    ) -> ApiResult<()> {
        for member in pair {
            self.store.remove_member(chat, member).await?;
            self.store.untouch_chat(chat, member).await?;
        }
        self.withdraw_pushes_of_leavers(chat, pair.to_vec());
        for member in pair {
            self.leave_calls_of_chat(chat, member).await?;
        }
        if remove {
            self.forget_history(chat).await?;
            self.store.delete_chat(chat).await?;
        }
        Ok(())
    }

    /// Ends `user`'s wait or pairing in `pool`, for both partners (their slots go back to idle, the
    /// partner remembered as the previous one). Answers the pairing that ended, if one did. With
    /// `expected`, only while the user's slot is still at that version.
    async fn end_pairing(
        &self,
        pool: &str,
        user: UserId,
        expected: Option<i64>,
    ) -> ApiResult<Option<Slot>> {
        for _ in 0..ATTEMPTS {
            let slots = self.store.slots(pool).await?;
            let Some(mine) = slots.iter().find(|s| s.user_id == user) else {
                return Ok(None);
            };
            if expected.is_some_and(|version| version != mine.version) {
                return Ok(None);
            }
            let mut writes = Vec::with_capacity(2);
            match mine.state {
                SlotState::Idle => return Ok(None),
                SlotState::Waiting | SlotState::Paired => writes.push(SlotWrite::Replace {
                    expected: mine.version,
                    slot: idle(mine),
                }),
            }
            if mine.state == SlotState::Paired
                && let Some(partner) = slots.iter().find(|s| {
                    Some(s.user_id) == mine.partner
                        && s.state == SlotState::Paired
                        && s.chat == mine.chat
                })
            {
                writes.push(SlotWrite::Replace {
                    expected: partner.version,
                    slot: idle(partner),
                });
            }
            if self.store.write_slots(pool, &writes).await? {
                return Ok((mine.state == SlotState::Paired).then(|| mine.clone()));
            }
        }
        Err(contended())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use uuid::Uuid;

    use super::*;

    /// The pick as first written, for comparison: each waiter in turn, every later one asked.
    fn pick_by_asking_everyone<'a>(
        waiting: &[&'a Slot],
        eligible: impl Fn(&Slot, &Slot) -> bool,
        rng: &mut impl Rng,
    ) -> Option<(&'a Slot, &'a Slot)> {
        waiting.iter().enumerate().find_map(|(i, first)| {
            let first: &Slot = first;
            let candidates: Vec<&Slot> = waiting[i + 1..]
                .iter()
                .copied()
                .filter(|other| eligible(first, other) && eligible(other, first))
                .collect();
            let second = *candidates.choose(rng)?;
            Some((first, second))
        })
    }

    /// The predicates `match_pool` was called with before the rules had names.
    fn as_first_written(eligibility: Eligibility) -> fn(&Slot, &Slot) -> bool {
        match eligibility {
            Eligibility::NotPrevious => |a, b| a.previous != Some(b.user_id),
            Eligibility::Counterparts => |a, b| {
                let kind_of = |kind: &str| kind.parse::<QueueKind>().ok();
                kind_of(&a.kind).map(|k| k.counterpart()) == kind_of(&b.kind)
            },
        }
    }

    fn user(n: u64) -> UserId {
        UserId(Uuid::from_u128(u128::from(n) + 1))
    }

    /// User `n`, waiting since second `n` in `kind`, last paired with user `previous`.
    fn waiter(n: u64, kind: &str, previous: Option<u64>) -> Slot {
        Slot {
            user_id: user(n),
            kind: kind.to_owned(),
            state: SlotState::Waiting,
            since: OffsetDateTime::UNIX_EPOCH + Duration::from_secs(n),
            partner: None,
            chat: None,
            previous: previous.map(user),
            version: 0,
        }
    }

    fn pair_of(pair: Option<(&Slot, &Slot)>) -> Option<(UserId, UserId)> {
        pair.map(|(first, second)| (first.user_id, second.user_id))
    }

    /// Asserts that `pick_pair` picks as the first pick did from `slots`, whatever the draw.
    fn picks_as_before(slots: &[Slot], eligibility: Eligibility) {
        let waiting: Vec<&Slot> = slots.iter().collect();
        for seed in 0..16 {
            let picked = pick_pair(&waiting, eligibility, &mut StdRng::seed_from_u64(seed));
            let before = pick_by_asking_everyone(
                &waiting,
                as_first_written(eligibility),
                &mut StdRng::seed_from_u64(seed),
            );
            assert_eq!(
                pair_of(picked),
                pair_of(before),
                "{eligibility:?}, seed {seed}, {slots:?}"
            );
        }
    }

    fn queue(kinds: &[&str]) -> Vec<Slot> {
        kinds
            .iter()
            .enumerate()
            .map(|(n, kind)| waiter(n as u64, kind, None))
            .collect()
    }

    #[test]
    fn queue_pairs_are_the_ones_picked_before() {
        for kinds in [
            &[][..],
            &["vent"],
            &["vent", "vent", "vent", "listen", "listen"],
            &["listen", "listen", "listen"],
            &["vent", "listen"],
            &["listen", "vent", "vent", "vent"],
            &["talk", "vent", "talk", "talk", "listen"],
            &["vent", "vent", "talk"],
            // Kinds that are no queue's are only ever paired with each other.
            &["", "vent", "x", "listen"],
            &["vent", "", "vent"],
        ] {
            picks_as_before(&queue(kinds), Eligibility::Counterparts);
        }
        let talk = queue(&["talk", "talk", "talk", "talk"]);
        let waiting: Vec<&Slot> = talk.iter().collect();
        let (first, _) = pick_pair(&waiting, Eligibility::Counterparts, &mut rand::rng()).unwrap();
        assert_eq!(first.user_id, user(0), "the oldest waiter goes first");
    }

    #[test]
    fn circle_pairs_are_the_ones_picked_before() {
        for previous in [
            &[][..],
            &[None],
            &[None, None, None],
            // 0 and 1 were partners, 2 was 0's: 0 has nobody, 1 goes with 2.
            &[Some(1), Some(0), Some(0)],
            // Everyone was 0's partner in turn, 0 last with 3.
            &[Some(3), Some(0), Some(0), Some(0), None],
            &[Some(1), Some(0)],
            &[Some(2), Some(2), Some(0), Some(1), Some(9)],
        ] {
            let slots: Vec<Slot> = previous
                .iter()
                .enumerate()
                .map(|(n, previous)| waiter(n as u64, "", *previous))
                .collect();
            picks_as_before(&slots, Eligibility::NotPrevious);
        }
    }

    #[test]
    fn random_pools_pair_as_before() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..400 {
            let size = rng.random_range(0..12u64);
            let slots: Vec<Slot> = (0..size)
                .map(|n| {
                    let kind = ["vent", "listen", "talk", "", "x"][rng.random_range(0..5)];
                    let previous = rng
                        .random_bool(0.6)
                        .then(|| rng.random_range(0..size.max(1)));
                    waiter(n, kind, previous)
                })
                .collect();
            picks_as_before(&slots, Eligibility::Counterparts);
            picks_as_before(&slots, Eligibility::NotPrevious);
        }
    }

    /// 40,000 waiting to vent and nobody to listen: asking each of them about every later one
    /// took 800 million checks on every join. The answer comes within seconds (a fraction of one
    /// when each is looked at a bounded number of times), and a listener who comes last is paired
    /// with the oldest.
    #[test]
    fn a_large_pool_without_a_pair_is_settled_in_one_pass() {
        let mut slots: Vec<Slot> = (0..40_000).map(|n| waiter(n, "vent", None)).collect();
        let (answered, answer) = mpsc::channel();
        std::thread::spawn(move || {
            let waiting: Vec<&Slot> = slots.iter().collect();
            let alone = pair_of(pick_pair(
                &waiting,
                Eligibility::Counterparts,
                &mut rand::rng(),
            ));
            slots.push(waiter(40_000, "listen", None));
            let waiting: Vec<&Slot> = slots.iter().collect();
            let with_listener = pair_of(pick_pair(
                &waiting,
                Eligibility::Counterparts,
                &mut rand::rng(),
            ));
            let _ = answered.send((alone, with_listener));
        });
        let (alone, with_listener) = answer
            .recv_timeout(Duration::from_secs(5))
            .expect("a pool of 40,000 settled within 5 s");
        assert_eq!(alone, None);
        assert_eq!(with_listener, Some((user(0), user(40_000))));
    }
}
