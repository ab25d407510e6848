//! Circles: groups joined with an access code, whose members are paired at random into direct
//! chats, and which expire with everything in them.
//!
//! Who may do what: anyone creates a circle (and owns it); anyone with its access code joins it;
//! members list the members, wait in the lobby and end their own pairing; only the owner sees and
//! rotates the access code and removes members; members leave, but the owner cannot (the circle
//! ends when it expires). A member the owner removed cannot join again, with any code: there is
//! no undoing it for the circle's life (a member who left by themself may come back). An expired
//! circle answers 410 until the sweep has removed it, then 404.

use std::time::Duration;

use confab_schema::circle::{
    Circle, CircleMember, CirclePairing, CircleUnpairing, PairedMember, PairingState, PairingStatus,
};
use confab_schema::{Chat, ChatId, CircleId, Envelope, Event, User, UserId};
use time::OffsetDateTime;

use super::inputs::{
    AccessCode, BidiRule, ChatDescription, ChatName, CircleDisplayName, CircleRules, CircleTtl,
};
use super::pairing::{
    ATTEMPTS, Eligibility, Leaving, Lobby, Pair, contended, in_pair_order, left_unclosed,
    matched_meanwhile, pair_chat, pairing_announcement, pairing_event,
};
use super::{Outcome, users};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{MemberPut, Slot, SlotState, circle_pool, looks_like_address};

/// How many expired circles a sweep reads at once.
pub const EXPIRED_BATCH: usize = 100;

/// Why a join of someone the owner removed is refused.
const REMOVED_BY_OWNER: &str = "you were removed from this circle by its owner";

/// How circles and queues behave (`circles.*` and `queues.*` in the configuration).
#[derive(Clone, Debug)]
pub struct CircleSettings {
    pub default_ttl_hours: f64,
    pub max_ttl_hours: f64,
    pub max_members: u32,
    pub sweep_interval: Duration,
    pub queue_grace: Duration,
    pub queue_sweep_interval: Duration,
}

impl Default for CircleSettings {
    fn default() -> Self {
        let circles = confab_runtime::config::CirclesConfig::default();
        let queues = confab_runtime::config::QueuesConfig::default();
        CircleSettings::from_config(&circles, &queues)
    }
}

impl CircleSettings {
    pub fn from_config(
        circles: &confab_runtime::config::CirclesConfig,
        queues: &confab_runtime::config::QueuesConfig,
    ) -> CircleSettings {
        CircleSettings {
            default_ttl_hours: circles.default_ttl_hours,
            max_ttl_hours: circles.max_ttl_hours,
            max_members: circles.max_members,
            sweep_interval: Duration::from_millis(circles.sweep_interval_ms.max(10)),
            queue_grace: Duration::from_millis(queues.disconnect_grace_ms),
            queue_sweep_interval: Duration::from_millis(queues.sweep_interval_ms.max(10)),
        }
    }
}

/// A circle to create, checked.
#[derive(Clone, Debug)]
pub struct NewCircle {
    pub name: ChatName,
    pub description: Option<ChatDescription>,
    pub rules: Option<CircleRules>,
    pub ttl: CircleTtl,
    pub max_members: u32,
    /// The owner's name in the circle (default: their display name).
    pub display_name: Option<CircleDisplayName>,
}

impl NewCircle {
    pub fn parse(
        settings: &CircleSettings,
        name: String,
        description: Option<String>,
        rules: Option<String>,
        ttl_hours: Option<f64>,
        max_members: Option<u32>,
        display_name: Option<String>,
    ) -> ApiResult<NewCircle> {
        let max_members = max_members.unwrap_or(settings.max_members);
        if !(2..=settings.max_members).contains(&max_members) {
            return Err(ApiError::Unprocessable(format!(
                "max_members must be 2 to {}",
                settings.max_members
            )));
        }
        Ok(NewCircle {
            name: ChatName::parse(name)?,
            description: description.map(ChatDescription::parse).transpose()?,
            rules: rules.map(CircleRules::parse).transpose()?,
            ttl: CircleTtl::parse(
                ttl_hours,
                settings.default_ttl_hours,
                settings.max_ttl_hours,
            )?,
            max_members,
            display_name: display_name.map(CircleDisplayName::parse).transpose()?,
        })
    }
}

/// How a member sees a circle: the access code is the owner's only.
fn view(mut circle: Circle, caller: UserId) -> Circle {
    if circle.owner_id != caller {
        circle.access_code = None;
    }
    circle
}

/// What a slot tells its user: nothing when idle.
pub(crate) fn pairing_status(slot: &Slot) -> Option<PairingStatus> {
    let state = match slot.state {
        SlotState::Idle => return None,
        SlotState::Waiting => PairingState::Waiting,
        SlotState::Paired => PairingState::Paired,
    };
    Some(PairingStatus {
        state,
        since: slot.since,
        chat_id: slot.chat,
        partner_id: slot.partner,
        kind: slot.kind.parse().ok(),
    })
}

/// What other members see of `member`'s name in the circle: the name as stored without
/// bidirectional embeddings, overrides or isolates, unless it is (or looks like) an e-mail
/// address, or nothing is left, then [`users::neutral_name`]. A name given now has neither an `@`
/// nor those characters ([`CircleDisplayName`]), but rows stored before may: an owner's name
/// defaulted to their display name, which is their address when the identity provider uses it as
/// the user name and sends no name. Applied where names are shown rather than rewritten in the
/// store, so it holds for every row, also one an older process writes while a new one runs.
pub(crate) fn circle_name_shown_to_others(member: &CircleMember) -> String {
    let name = BidiRule::HumanName.without_refused(&member.display_name);
    if looks_like_address(&name) || name.trim().is_empty() {
        users::neutral_name(member.user_id)
    } else {
        name
    }
}

/// The `circle.paired` of a pairing of `pair` into `chat`, each under their name among `members`,
/// named as [`pairing_announcement`] names it, so its maker and an end that announces it again
/// publish one event.
fn pairing_announcement_of_circle(
    id: CircleId,
    members: &[CircleMember],
    chat: Chat,
    pair: [UserId; 2],
) -> Envelope {
    let name_of = |user: UserId| {
        members
            .iter()
            .find(|m| m.user_id == user)
            .map_or_else(|| users::neutral_name(user), circle_name_shown_to_others)
    };
    let chat_id = chat.id;
    let event = Event::CirclePaired(Box::new(CirclePairing {
        circle_id: id,
        members: in_pair_order(pair)
            .iter()
            .map(|user| PairedMember {
                user_id: *user,
                display_name: name_of(*user),
            })
            .collect(),
        chat,
    }));
    pairing_announcement(chat_id, event, pair)
}

impl ApiState {
    /// Creates a circle with a fresh access code; the caller owns it and is its first member.
    pub async fn create_circle(&self, caller: &User, new: NewCircle) -> ApiResult<Circle> {
        let now = confab_schema::model::to_millis(OffsetDateTime::now_utc());
        let circle = Circle {
            id: CircleId::new(),
            name: new.name.into_inner(),
            description: new.description.map(ChatDescription::into_inner),
            rules: new.rules.map(CircleRules::into_inner),
            owner_id: caller.id,
            access_code: Some(AccessCode::generate().as_str().to_owned()),
            max_members: new.max_members,
            created_at: now,
            expires_at: confab_schema::model::to_millis(now + new.ttl.duration()),
        };
        self.store.create_circle(&circle).await?;
        let display_name = new
            .display_name
            .map(CircleDisplayName::into_inner)
            // Other members see it: never an address.
            .unwrap_or_else(|| users::name_shown_to_others(caller));
        self.store
            .put_circle_member(
                circle.id,
                &CircleMember {
                    user_id: caller.id,
                    display_name,
                    joined_at: now,
                },
                circle.max_members,
            )
            .await?;
        Ok(circle)
    }

    /// The circle, unless it is unknown (404) or expired (410).
    async fn live_circle(&self, id: CircleId) -> ApiResult<Circle> {
        let circle = self
            .store
            .get_circle(id)
            .await?
            .ok_or(ApiError::NotFound("no such circle"))?;
        if circle.expires_at <= OffsetDateTime::now_utc() {
            return Err(ApiError::Gone("this circle has expired"));
        }
        Ok(circle)
    }

    /// The circle and its members, if the caller is one (403 otherwise).
    async fn circle_as_member(
        &self,
        id: CircleId,
        caller: UserId,
    ) -> ApiResult<(Circle, Vec<CircleMember>)> {
        let circle = self.live_circle(id).await?;
        let members = self.store.circle_members(id).await?;
        if !members.iter().any(|m| m.user_id == caller) {
            return Err(ApiError::Forbidden("you are not a member of this circle"));
        }
        Ok((circle, members))
    }

    /// One circle (members only).
    pub async fn get_circle(&self, caller: UserId, id: CircleId) -> ApiResult<Circle> {
        let (circle, _) = self.circle_as_member(id, caller).await?;
        Ok(view(circle, caller))
    }

    /// Joins the circle `code` opens under `display_name` (a member joining again is renamed):
    /// 404 for a code that opens nothing, 410 when the circle expired, 409 when it is full, 403
    /// for someone the owner removed. A removal racing the join is read again after the join's
    /// own write (the removal is recorded before the member row goes): either the removal
    /// deletes the row this join wrote, or this join sees the removal and takes itself out.
    pub async fn join_circle(
        &self,
        caller: UserId,
        code: AccessCode,
        display_name: CircleDisplayName,
    ) -> ApiResult<Outcome<Circle>> {
        let id = self
            .store
            .circle_by_code(code.as_str())
            .await?
            .ok_or(ApiError::NotFound("no circle has this access code"))?;
        let circle = self.live_circle(id).await?;
        if circle.access_code.as_deref() != Some(code.as_str()) {
            // A code rotated away whose row a concurrent rotation has not removed yet.
            return Err(ApiError::NotFound("no circle has this access code"));
        }
        if self.store.removed_from_circle(id, caller).await? {
            // A join that failed after its member row was written, before the check below took
            // it out again, left the row (and perhaps a wait): its retry takes them out.
            self.store.remove_circle_member(id, caller).await?;
            return match self
                .finish_removal(
                    id,
                    caller,
                    circle.owner_id,
                    ApiError::Forbidden(REMOVED_BY_OWNER),
                )
                .await
            {
                Ok(()) => Err(ApiError::Forbidden(REMOVED_BY_OWNER)),
                Err(refused) => Err(refused),
            };
        }
        let member = CircleMember {
            user_id: caller,
            display_name: display_name.into_inner(),
            joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
        };
        // The store counts the seats: racing joins never take the circle past its size.
        let put = self
            .store
            .put_circle_member(id, &member, circle.max_members)
            .await?;
        if put != MemberPut::Full && self.store.removed_from_circle(id, caller).await? {
            // Removed since the check above: out again, with any wait begun meanwhile (a lobby
            // entry that read the row this join wrote).
            self.store.remove_circle_member(id, caller).await?;
            self.leave_lobby(id, caller, circle.owner_id).await?;
            return Err(ApiError::Forbidden(REMOVED_BY_OWNER));
        }
        let circle = view(circle, caller);
        match put {
            MemberPut::Added => Ok(Outcome::Created(circle)),
            MemberPut::Renamed => Ok(Outcome::Existing(circle)),
            MemberPut::Full => Err(ApiError::Conflict("this circle is full".into())),
        }
    }

    /// Gives the circle a new access code (the owner only); the old one stops working.
    pub async fn rotate_circle_code(&self, caller: UserId, id: CircleId) -> ApiResult<Circle> {
        let (mut circle, _) = self.circle_as_member(id, caller).await?;
        if circle.owner_id != caller {
            return Err(ApiError::Forbidden(
                "only the circle's owner changes its access code",
            ));
        }
        let new = AccessCode::generate();
        let old = circle.access_code.clone().unwrap_or_default();
        self.store
            .rotate_circle_code(id, &old, new.as_str())
            .await?;
        circle.access_code = Some(new.as_str().to_owned());
        Ok(circle)
    }

    /// The circle's members under their circle names (members only).
    pub async fn circle_members(
        &self,
        caller: UserId,
        id: CircleId,
    ) -> ApiResult<Vec<CircleMember>> {
        let (_, mut members) = self.circle_as_member(id, caller).await?;
        members.sort_by_key(|m| (m.joined_at, m.user_id));
        for member in members.iter_mut().filter(|m| m.user_id != caller) {
            member.display_name = circle_name_shown_to_others(member);
        }
        Ok(members)
    }

    /// Removes `user` from the circle: themself (leaving), or anyone by the owner. A removal by
    /// the owner is recorded first, so the user cannot join again (see [`Self::join_circle`] for
    /// a join racing it); leaving is not recorded. The member row goes next, then their wait or
    /// pairing ends: an entry into the lobby racing the removal reads the membership again after
    /// its own write, so either it sees the removal (and takes itself out), or its slot is there
    /// for this removal to end. A removal that failed after its member row went left the slot: a
    /// retry finds it and finishes the removal (its record was written before the row went).
    pub async fn remove_circle_member(
        &self,
        caller: UserId,
        id: CircleId,
        user: UserId,
    ) -> ApiResult<()> {
        let (circle, members) = match self.circle_as_member(id, caller).await {
            Ok(found) => found,
            Err(not_member) if caller == user => {
                return self.finish_removal(id, user, user, not_member).await;
            }
            Err(refused) => return Err(refused),
        };
        if caller != user && circle.owner_id != caller {
            return Err(ApiError::Forbidden(
                "only the circle's owner removes others",
            ));
        }
        if user == circle.owner_id {
            return Err(ApiError::Unprocessable(
                "the owner stays in the circle until it expires".into(),
            ));
        }
        if !members.iter().any(|m| m.user_id == user) {
            return self
                .finish_removal(id, user, caller, ApiError::NotFound("no such member"))
                .await;
        }
        if caller != user {
            self.store
                .record_circle_removal(id, user, circle.expires_at)
                .await?;
        }
        self.store.remove_circle_member(id, user).await?;
        self.leave_lobby(id, user, caller).await
    }

    /// For a removal of `user`, no longer a member: their slot in the lobby, if one is left (a
    /// removal that failed after the member row went), is taken out; else `refusal`.
    async fn finish_removal(
        &self,
        id: CircleId,
        user: UserId,
        by: UserId,
        refusal: ApiError,
    ) -> ApiResult<()> {
        if self.slot_of(&circle_pool(id), user).await?.is_none() {
            return Err(refusal);
        }
        self.leave_lobby(id, user, by).await
    }

    /// Ends `user`'s wait or pairing in the circle (`by`: who ended it) and takes them out of the
    /// lobby. A pairing made between the two (an entry of theirs that passed its membership check
    /// before a removal, then someone's match) ends too: its slot is never just taken away.
    async fn leave_lobby(&self, id: CircleId, user: UserId, by: UserId) -> ApiResult<()> {
        let pool = circle_pool(id);
        for _ in 0..ATTEMPTS {
            self.end_circle_pairing(id, &pool, user, Some(by), None)
                .await?;
            match self.leave_pool(&pool, user, "").await? {
                Leaving::Left => return Ok(()),
                // Ended on the next turn.
                Leaving::Paired => {}
            }
        }
        Err(contended())
    }

    /// Puts the caller in the circle's lobby and pairs whoever can be paired. Answers the caller's
    /// place: waiting, or paired (with the chat and partner).
    pub async fn enter_circle_lobby(
        &self,
        caller: UserId,
        id: CircleId,
    ) -> ApiResult<PairingStatus> {
        let (circle, _) = self.circle_as_member(id, caller).await?;
        let pool = circle_pool(id);
        if let Some(mine) = self.slot_of(&pool, caller).await?
            && left_unclosed(&mine).is_some()
        {
            // Entering would forget the chat of a pairing whose end stopped half-way.
            self.end_circle_pairing(id, &pool, caller, Some(caller), Some(&mine))
                .await?;
        }
        let mine = self.enter_pool(&pool, caller, "").await?;
        // Removed since the check above? The removal deletes the member row before it looks for
        // a slot, so a removal this read misses finds the slot written above.
        let members = self.store.circle_members(id).await?;
        if !members.iter().any(|m| m.user_id == caller) {
            self.leave_lobby(id, caller, caller).await?;
            return Err(ApiError::Forbidden("you are not a member of this circle"));
        }
        if mine.state == SlotState::Waiting {
            // Never with the partner of one's previous pairing in this circle.
            let pairs = self
                .match_pool(
                    &pool,
                    Some(Lobby {
                        id,
                        expires_at: circle.expires_at,
                        members: &members,
                    }),
                    Eligibility::NotPrevious,
                )
                .await?;
            for pair in pairs {
                self.announce_circle_pair(id, &members, pair).await;
            }
        }
        if circle.expires_at <= OffsetDateTime::now_utc() {
            // Expired meanwhile: a pairing made now was undone (see `match_pool`).
            return Err(ApiError::Gone("this circle has expired"));
        }
        let mine = self.slot_of(&pool, caller).await?;
        mine.as_ref()
            .and_then(pairing_status)
            .ok_or_else(|| ApiError::Conflict("your wait ended meanwhile; try again".into()))
    }

    /// Leaves the lobby, or ends the caller's pairing for both (`circle.unpaired`). Like a queue's
    /// leave, it ends what it read: a pairing made after it read the caller waiting stands (409
    /// `matched`).
    pub async fn leave_circle_lobby(&self, caller: UserId, id: CircleId) -> ApiResult<()> {
        self.circle_as_member(id, caller).await?;
        let pool = circle_pool(id);
        let Some(mine) = self.slot_of(&pool, caller).await? else {
            return Ok(());
        };
        // Also a pairing whose end stopped half-way (this is its retry, or the partner's).
        if mine.state == SlotState::Paired || left_unclosed(&mine).is_some() {
            // Nothing when it ended meanwhile.
            self.end_circle_pairing(id, &pool, caller, Some(caller), Some(&mine))
                .await?;
        }
        match self.stop_waiting(&pool, caller).await? {
            Leaving::Left => Ok(()),
            Leaving::Paired => Err(matched_meanwhile()),
        }
    }

    /// Ends `user`'s wait or pairing (with `seen`, only that slot of theirs: nothing when it
    /// changed since); a pairing's chat is closed for both with `circle.unpaired` (it stays, with
    /// its messages, until the circle goes), after the pairing's `circle.paired` if that may not
    /// be in the log yet. `by`: who ended it, `None` for the circle's expiry. Answers the chat of
    /// the pairing that ended, if one did.
    async fn end_circle_pairing(
        &self,
        id: CircleId,
        pool: &str,
        user: UserId,
        by: Option<UserId>,
        seen: Option<&Slot>,
    ) -> ApiResult<Option<ChatId>> {
        let Some(ended) = self.end_pair(pool, user, seen, false).await? else {
            return Ok(None);
        };
        let (chat, partner) = (ended.chat, ended.partner);
        let mut events = Vec::with_capacity(2);
        if self.may_be_unannounced(ended.slot.since) {
            // The pairing is over already: its announcement names whom it can.
            let members = self.store.circle_members(id).await.unwrap_or_else(|error| {
                tracing::warn!(%error, circle = %id, "a pairing announced again without names");
                Vec::new()
            });
            let chat = pair_chat(chat, [user, partner], ended.slot.since);
            events.push(pairing_announcement_of_circle(
                id,
                &members,
                chat,
                [user, partner],
            ));
        }
        events.push(
            pairing_event(
                chat,
                Event::CircleUnpaired(CircleUnpairing {
                    circle_id: id,
                    chat_id: chat,
                    by,
                }),
            )
            .leaving(vec![user, partner]),
        );
        self.publish_in_order(events).await;
        Ok(Some(chat))
    }

    /// Ends every pairing still standing in an expired circle's lobby (also one whose end stopped
    /// half-way) as its members' leave would: both leave its chat with `circle.unpaired`, so their
    /// open streams stop routing a chat that is about to be removed, and a resume replays the end.
    /// Removed silently, the chat would stay in their clients' lists, and in their streams'
    /// routing, with nothing left to tell them it is gone.
    async fn end_pairings_of_expired_circle(&self, id: CircleId) -> ApiResult<()> {
        let pool = circle_pool(id);
        let mut ended = std::collections::HashSet::new();
        for slot in self.store.slots(&pool).await? {
            let chat = match (slot.state, left_unclosed(&slot)) {
                (SlotState::Paired, _) => slot.chat,
                (_, Some((chat, _))) => Some(chat),
                _ => None,
            };
            // The partner's slot was ended with this one's.
            if chat.is_none_or(|chat| ended.contains(&chat)) {
                continue;
            }
            if let Some(chat) = self
                .end_circle_pairing(id, &pool, slot.user_id, None, Some(&slot))
                .await?
            {
                ended.insert(chat);
            }
        }
        Ok(())
    }

    async fn announce_circle_pair(&self, id: CircleId, members: &[CircleMember], pair: Pair) {
        let users = [pair.first.user_id, pair.second.user_id];
        // The two start receiving the chat's events with this one.
        self.publish(pairing_announcement_of_circle(
            id, members, pair.chat, users,
        ))
        .await;
    }

    /// Publishes `signal.deleted` for every message of `chat` that is about to be removed, so the
    /// search index drops them too.
    pub(crate) async fn forget_history(&self, chat: ChatId) -> ApiResult<()> {
        const PAGE: usize = 100;
        let mut before = None;
        loop {
            let page = self.store.signals_before(chat, before, PAGE).await?;
            before = page.last().map(|s| s.id);
            let done = page.len() < PAGE;
            for signal in page.into_iter().filter(|s| !s.deleted) {
                self.publish(Envelope::signal_deleted(signal)).await;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Removes the circles that expired, with their chats, [`EXPIRED_BATCH`] at a time for at
    /// most one sweep interval; answers how many.
    pub async fn sweep_expired_circles(&self) -> ApiResult<usize> {
        self.sweep_expired_circles_in(EXPIRED_BATCH, self.circles.sweep_interval)
            .await
    }

    /// Removes the circles that expired, with their chats, reading them `batch` at a time while a
    /// full batch comes back and `budget` is not spent (what is left goes with the next sweep). A
    /// circle whose removal fails is logged and left for the next sweep, and the others go on.
    /// Answers how many were removed.
    pub async fn sweep_expired_circles_in(
        &self,
        batch: usize,
        budget: Duration,
    ) -> ApiResult<usize> {
        let started = std::time::Instant::now();
        let now = OffsetDateTime::now_utc();
        // Still listed as due (their expiry entry goes last), so each read asks for as many more.
        let mut failed = std::collections::HashSet::new();
        let mut removed = 0;
        loop {
            let limit = batch.max(1) + failed.len();
            let due = self.store.expired_circles(now, limit).await?;
            let full = due.len() >= limit;
            for circle in due {
                if failed.contains(&circle) {
                    continue;
                }
                match self.remove_expired_circle(circle).await {
                    Ok(()) => removed += 1,
                    Err(error) => {
                        tracing::warn!(%error, %circle, "expired circle not removed yet");
                        failed.insert(circle);
                    }
                }
            }
            if !full || started.elapsed() >= budget {
                return Ok(removed);
            }
        }
    }

    /// Ends an expired circle's pairings (both members leave each chat, and are told), removes
    /// its chats (their calls end first, and their messages leave the search index), then its own
    /// rows, the expiry entry last. Idempotent.
    async fn remove_expired_circle(&self, circle: CircleId) -> ApiResult<()> {
        self.end_pairings_of_expired_circle(circle).await?;
        for chat in self.store.circle_chats(circle).await? {
            // For the withdrawal of their pushes afterwards, which is not worth failing the
            // removal for.
            let members = self.store.members(chat).await.unwrap_or_else(|error| {
                tracing::warn!(%error, %chat, "an expired circle's chat's members unread; their pushes stay");
                Vec::new()
            });
            self.end_calls_of_chat(chat).await?;
            self.forget_history(chat).await?;
            self.store.delete_chat(chat).await?;
            self.withdraw_pushes_of_leavers(chat, members.into_iter().map(|m| m.user_id).collect());
        }
        self.store.delete_circle(circle).await?;
        tracing::info!(%circle, "expired circle removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circle_names_stored_before_their_rules_are_shown_to_others_without_what_they_refuse() {
        let member = |display_name: &str| CircleMember {
            user_id: UserId(uuid::Uuid::from_u128(
                0x1234_5678_9abc_def0_1234_5678_9abc_def0,
            )),
            display_name: display_name.into(),
            joined_at: OffsetDateTime::UNIX_EPOCH,
        };
        // The old default for an owner whose user name is their address.
        assert_eq!(
            circle_name_shown_to_others(&member("dora@corp.example")),
            "user-12345678"
        );
        assert_eq!(
            circle_name_shown_to_others(&member("Bob\u{202E}ecila")),
            "Bobecila"
        );
        assert_eq!(
            circle_name_shown_to_others(&member("\u{2067}\u{2069}")),
            "user-12345678"
        );
        assert_eq!(
            circle_name_shown_to_others(&member("שלום\u{200F}")),
            "שלום\u{200F}"
        );
    }
}
