//! Scheduling and cancelling delayed pushes, by what each recipient chose: a muted chat gets none,
//! the delay is the chat's, else the user's, else the server's, and the text is previewed only for
//! those who allow it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use confab_runtime::push_queue::{Cancelled, PushMessage, preview};
use confab_schema::call::CallState;
use confab_schema::settings::{ChatSettings, UserSettings};
use confab_schema::{ChatId, Signal, SignalId, SignalKind, UserId};
use futures::StreamExt;
use time::OffsetDateTime;

use crate::backoff::Backoff;
use crate::error::ApiResult;
use crate::state::ApiState;
use crate::store::StoreError;

/// Retries of a leaver's withdrawal while the store or the queue fails: waits of 250 ms
/// doubling up to 8 s, about half a minute in all.
const LEAVER_FIRST_RETRY: Duration = Duration::from_millis(250);
const LEAVER_LONGEST_RETRY: Duration = Duration::from_secs(8);
const LEAVER_RETRIES: u32 = 8;

/// Chats with more members than this are fanned out in the background, one pass in flight per
/// chat, the messages sent meanwhile announced by the next pass (see `schedule_pushes`).
const SCHEDULED_IN_LINE_MEMBERS: usize = 1_000;

/// How many settings a [`PushSettingsCache`] holds of each kind (users' own; members' of chats,
/// counted per member) before it starts again empty, as the provisioning cache does.
const CACHED_SETTINGS_MAX: usize = 65_536;

/// Members' push settings as last read, per chat (every member's settings for it) and per user,
/// reused for the chat's next messages within `push.settings_cache_ms`: a burst into a chat reads
/// them once per that time, not twice per message. A change made through this process drops its
/// entry at once; one made through another api process applies here once the entry is older than
/// that. Only chats scheduled in line (up to [`SCHEDULED_IN_LINE_MEMBERS`]) are cached: a large
/// chat's pass is in the background and one per burst already.
#[derive(Default)]
pub(crate) struct PushSettingsCache {
    inner: Mutex<CachedSettings>,
}

#[derive(Default)]
struct CachedSettings {
    /// Bumped by every change: a read that started before one is not kept.
    generation: u64,
    /// Each entry with the time its read started.
    chats: HashMap<ChatId, (Instant, Arc<HashMap<UserId, ChatSettings>>)>,
    /// The members' settings held in `chats` (a chat without any counts as one).
    chat_weight: usize,
    users: HashMap<UserId, (Instant, UserSettings)>,
}

/// What a chat's entry counts towards [`CACHED_SETTINGS_MAX`].
fn weight(settings: &HashMap<UserId, ChatSettings>) -> usize {
    settings.len().max(1)
}

impl CachedSettings {
    fn remove_chat(&mut self, chat: ChatId) {
        if let Some((_, settings)) = self.chats.remove(&chat) {
            self.chat_weight -= weight(&settings);
        }
    }
}

impl PushSettingsCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, CachedSettings> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The generation a read starts at: pass it to `keep_*` with what the read found.
    fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Every member's settings for `chat`, if read within `ttl`.
    fn chat(&self, chat: ChatId, ttl: Duration) -> Option<Arc<HashMap<UserId, ChatSettings>>> {
        let cached = self.lock();
        let (read_at, settings) = cached.chats.get(&chat)?;
        (read_at.elapsed() < ttl).then(|| Arc::clone(settings))
    }

    fn keep_chat(
        &self,
        chat: ChatId,
        settings: Arc<HashMap<UserId, ChatSettings>>,
        (generation, read_at): (u64, Instant),
    ) {
        let adding = weight(&settings);
        let mut cached = self.lock();
        if cached.generation == generation && adding <= CACHED_SETTINGS_MAX {
            cached.remove_chat(chat);
            if cached.chat_weight + adding > CACHED_SETTINGS_MAX {
                cached.chats.clear();
                cached.chat_weight = 0;
            }
            cached.chat_weight += adding;
            cached.chats.insert(chat, (read_at, settings));
        }
    }

    /// The settings of those of `users` read within `ttl`, and the others.
    fn users(
        &self,
        users: &[UserId],
        ttl: Duration,
    ) -> (HashMap<UserId, UserSettings>, Vec<UserId>) {
        let cached = self.lock();
        let mut found = HashMap::with_capacity(users.len());
        let mut missing = Vec::new();
        for user in users {
            match cached.users.get(user) {
                Some((read_at, settings)) if read_at.elapsed() < ttl => {
                    found.insert(*user, settings.clone());
                }
                _ => missing.push(*user),
            }
        }
        (found, missing)
    }

    fn keep_users<'a>(
        &self,
        users: impl IntoIterator<Item = (UserId, &'a UserSettings)>,
        (generation, read_at): (u64, Instant),
    ) {
        let mut cached = self.lock();
        if cached.generation == generation {
            for (user, settings) in users {
                if cached.users.len() >= CACHED_SETTINGS_MAX {
                    cached.users.clear();
                }
                cached.users.insert(user, (read_at, settings.clone()));
            }
        }
    }

    /// Called once `chat`'s settings of a member changed in the store.
    pub(crate) fn forget_chat(&self, chat: ChatId) {
        let mut cached = self.lock();
        cached.generation += 1;
        cached.remove_chat(chat);
    }

    /// Called once `user`'s own settings changed in the store.
    pub(crate) fn forget_user(&self, user: UserId) {
        let mut cached = self.lock();
        cached.generation += 1;
        cached.users.remove(&user);
    }
}

impl ApiState {
    /// Schedules a push of `created` for each member but its author who has not muted the chat,
    /// due after their delay. Part of the bookkeeping after a send: a failure is logged and
    /// counted, never the sender's failure.
    ///
    /// It completes before the send answers, so a fetch that follows the answer always finds the
    /// push to cancel. The members' settings are two reads (the chat's partition, and the users'
    /// in batches), skipped while cached (see [`PushSettingsCache`]); the author's name is the
    /// caller's when given, else a third read. The recipients are scheduled concurrently.
    pub(crate) async fn schedule_pushes(
        &self,
        created: &Signal,
        members: &[UserId],
        author_name: Option<&str>,
    ) {
        if self.push_queue.is_none() {
            return;
        }
        // Messages, and calls nobody answered; the other call signals do not ring anyone's phone.
        let missed_call = created
            .call
            .as_ref()
            .is_some_and(|call| call.state == CallState::Missed);
        if created.kind != SignalKind::Message && !missed_call {
            return;
        }
        if members.len() > SCHEDULED_IN_LINE_MEMBERS {
            // One queue entry per recipient is too much work to finish before the send answers,
            // and to repeat for each message of a burst: a large chat is fanned out in the
            // background, one pass in flight per chat; the messages sent during a pass ride on
            // the next one, which announces the newest (a recipient's push then counts passes,
            // not messages). A pass reads the members itself: the sends waiting for it hold
            // their message only, not a list of tens of thousands each while a slow pass runs.
            let state = self.clone();
            let passes = Arc::clone(&self.large_chat_pushes);
            let created = created.clone();
            tokio::spawn(async move {
                let fanned = passes
                    .advance(
                        created.chat_id,
                        created.id,
                        created,
                        |_, created| async move {
                            metrics::counter!("confab_pushes_large_chat_passes_total").increment(1);
                            match state.store.members(created.chat_id).await {
                                Ok(members) => {
                                    // Those who were sent it: not a member added since.
                                    let members: Vec<UserId> = members
                                        .into_iter()
                                        .filter(|member| member.joined_at <= created.created_at)
                                        .map(|member| member.user_id)
                                        .collect();
                                    state.schedule_for(&created, &members, None, false).await;
                                }
                                Err(error) => {
                                    metrics::counter!("confab_pushes_schedule_failures_total")
                                        .increment(1);
                                    tracing::warn!(%error, chat = %created.chat_id, "a large chat's members unavailable; no pushes scheduled");
                                }
                            }
                            Ok::<(), std::convert::Infallible>(())
                        },
                    )
                    .await;
                let Ok(()) = fanned;
            });
            return;
        }
        self.schedule_for(created, members, author_name, true).await;
    }

    /// Schedules a push of `created` for each of `members` but its author who has not muted the
    /// chat (one queue entry per recipient, collapsed per chat). `cached`: the members' settings
    /// may come from (and go to) the [`PushSettingsCache`].
    async fn schedule_for(
        &self,
        created: &Signal,
        members: &[UserId],
        author_name: Option<&str>,
        cached: bool,
    ) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        let recipients: Vec<UserId> = members
            .iter()
            .copied()
            .filter(|m| *m != created.author_id)
            .collect();
        if recipients.is_empty() {
            return;
        }
        let (chat_settings, user_settings, author_name) = futures::join!(
            self.push_chat_settings(created.chat_id, cached),
            self.push_user_settings(&recipients, cached),
            async {
                match author_name {
                    Some(name) => name.to_owned(),
                    None => match self.store.get_user(created.author_id).await {
                        Ok(Some(user)) => super::users::name_shown_to_others(&user),
                        _ => String::new(),
                    },
                }
            },
        );
        // Without their settings, a muted recipient might be woken: better no push than that.
        let (chat_settings, user_settings) = match (chat_settings, user_settings) {
            (Ok(chats), Ok(users)) => (chats, users),
            (Err(error), _) | (_, Err(error)) => {
                metrics::counter!("confab_pushes_schedule_failures_total")
                    .increment(recipients.len() as u64);
                tracing::warn!(%error, "push settings unavailable; no pushes scheduled");
                return;
            }
        };
        let text_preview = created.text.as_deref().map(preview);
        let now = OffsetDateTime::now_utc();
        let now_ms = confab_runtime::presence::now_ms();
        let default_delay = u32::try_from(self.push.delay.as_millis()).unwrap_or(u32::MAX);
        let ttl = i64::try_from(self.push.ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let default_user = UserSettings::default();
        futures::stream::iter(recipients)
            .for_each_concurrent(64, |member| {
                let chat = chat_settings.get(&member);
                let user = user_settings.get(&member).unwrap_or(&default_user);
                let muted = chat.is_some_and(|chat| chat.muted_at(now));
                let delay = chat
                    .and_then(|chat| chat.push_delay_ms)
                    .or(user.push_delay_ms)
                    .unwrap_or(default_delay);
                let message = PushMessage {
                    signal: created.id,
                    author: created.author_id,
                    author_name: author_name.clone(),
                    preview: text_preview.clone().filter(|_| user.push_previews),
                };
                async move {
                    if muted {
                        metrics::counter!("confab_pushes_muted_total").increment(1);
                        return;
                    }
                    let due = now_ms + i64::from(delay);
                    match queue
                        .schedule(member, created.chat_id, &message, due, due + ttl)
                        .await
                    {
                        Ok(()) => metrics::counter!("confab_pushes_scheduled_total").increment(1),
                        Err(error) => {
                            metrics::counter!("confab_pushes_schedule_failures_total").increment(1);
                            tracing::warn!(%error, "push not scheduled");
                        }
                    }
                }
            })
            .await;
    }

    /// How long cached settings stay usable: zero (never) when not `cached`.
    fn settings_cache_ttl(&self, cached: bool) -> Duration {
        if cached {
            self.push.settings_cache
        } else {
            Duration::ZERO
        }
    }

    /// Every member's settings for `chat`: cached, or read.
    async fn push_chat_settings(
        &self,
        chat: ChatId,
        cached: bool,
    ) -> Result<Arc<HashMap<UserId, ChatSettings>>, StoreError> {
        let ttl = self.settings_cache_ttl(cached);
        let read = async {
            let settings = self.store.chat_settings_of(chat).await?;
            Ok::<_, StoreError>(Arc::new(settings.into_iter().collect()))
        };
        if ttl.is_zero() {
            return read.await;
        }
        if let Some(cached) = self.push_settings.chat(chat, ttl) {
            return Ok(cached);
        }
        let started = (self.push_settings.generation(), Instant::now());
        let read = read.await?;
        self.push_settings
            .keep_chat(chat, Arc::clone(&read), started);
        Ok(read)
    }

    /// The settings of each of `users` (the defaults for those who saved none): cached, or read.
    async fn push_user_settings(
        &self,
        users: &[UserId],
        cached: bool,
    ) -> Result<HashMap<UserId, UserSettings>, StoreError> {
        let ttl = self.settings_cache_ttl(cached);
        // Without the cache (a large chat's pass), its recipients are not looked up in it: that
        // would hold the cache's lock over every one of them.
        let (mut found, missing) = if ttl.is_zero() {
            (HashMap::new(), users.to_vec())
        } else {
            self.push_settings.users(users, ttl)
        };
        if missing.is_empty() {
            return Ok(found);
        }
        let started = (self.push_settings.generation(), Instant::now());
        let mut read: HashMap<UserId, UserSettings> = self
            .store
            .user_settings(&missing)
            .await?
            .into_iter()
            .collect();
        for user in &missing {
            read.entry(*user).or_default();
        }
        if !ttl.is_zero() {
            self.push_settings.keep_users(
                read.iter().map(|(user, settings)| (*user, settings)),
                started,
            );
        }
        found.extend(read);
        Ok(found)
    }

    /// Takes a deleted message out of its chat's members' pushes: a pending push whose newest
    /// message it was keeps announcing the other messages of its burst (the sender announces the
    /// newest of them still there), or is dropped when it announced that one alone; a push
    /// already sent announcing it is withdrawn from their devices, so its preview leaves their
    /// lock screens. (The sender also looks at the message before a claimed push goes out.) On a
    /// task of its own, so that a deletion's answer waits for no member's queue and a cancelled
    /// request still takes them all.
    ///
    /// The author is left out, as the push was never theirs. A pending push announcing other
    /// messages only is left alone: the deleted one is not what it shows.
    pub(crate) fn withdraw_pushes(&self, deleted: &Signal) {
        if self.push_queue.is_none() || deleted.kind != SignalKind::Message {
            return;
        }
        let state = self.clone();
        let (chat, id, author) = (deleted.chat_id, deleted.id, deleted.author_id);
        tokio::spawn(async move {
            let members = match state.store.members(chat).await {
                Ok(members) => members,
                Err(error) => {
                    tracing::warn!(%error, "a deleted message's pushes were not withdrawn");
                    return;
                }
            };
            futures::stream::iter(members.into_iter().filter(|m| m.user_id != author))
                .for_each_concurrent(64, |member| {
                    let state = &state;
                    async move { state.take_deleted_from_push(member.user_id, chat, id).await }
                })
                .await;
        });
    }

    /// Takes the deleted message `deleted` out of `user`'s push of `chat` (see
    /// [`Self::withdraw_pushes`]).
    async fn take_deleted_from_push(&self, user: UserId, chat: ChatId, deleted: SignalId) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        let taken_back = queue
            .message_deleted(user, chat, deleted, confab_runtime::presence::now_ms())
            .await;
        count_cancelled(taken_back, "a deleted message's push not taken back");
    }

    /// Drops `user`'s pending push of `chat`, which they just muted: the sender does not read
    /// settings (that would be two reads per push), so a push scheduled before the mute is taken
    /// back here. A failure is logged, never the settings' failure.
    pub(crate) async fn drop_muted_push(&self, user: UserId, chat: ChatId) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        match queue.drop_pending(user, chat).await {
            Ok(true) => metrics::counter!("confab_pushes_muted_total").increment(1),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "a muted chat's pending push was not dropped"),
        }
    }

    /// Takes the text off `user`'s pending pushes, now that they turned previews off: scheduled
    /// before, those carry it, and the sender does not read settings. A failure is logged, never
    /// the settings' failure.
    pub(crate) async fn drop_push_previews(&self, user: UserId) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        if let Err(error) = queue.drop_previews(user).await {
            tracing::warn!(%error, "pending pushes not stripped of their previews");
        }
    }

    /// Takes back the pushes of `chat` of each of `users`, who are out of it now (removed, left,
    /// or the chat is gone): a pending one is dropped (the sender's last look would drop it too)
    /// and a notification sent is withdrawn from their devices, so nothing of the chat stays on
    /// their lock screens. Called once the membership is written: the sender looks at the
    /// membership again after it remembers a push, so this or that look sees the other. On a
    /// task of its own, so that the removal's answer waits for no queue, and retried there while
    /// the store or the queue fails. A removal cut short before this is finished by the late
    /// publish of its `member.left` (`ApiState::publish_stored`), which calls this as well.
    pub(crate) fn withdraw_pushes_of_leavers(&self, chat: ChatId, users: Vec<UserId>) {
        if self.push_queue.is_none() || users.is_empty() {
            return;
        }
        let state = self.clone();
        tokio::spawn(async move {
            futures::stream::iter(users)
                .for_each_concurrent(16, |user| {
                    let state = &state;
                    async move {
                        let mut backoff = Backoff::new(
                            LEAVER_FIRST_RETRY,
                            LEAVER_LONGEST_RETRY,
                            LEAVER_RETRIES,
                        );
                        loop {
                            match state.withdraw_leaver(chat, user).await {
                                Ok(()) => return,
                                Err(error) if !backoff.wait().await => {
                                    metrics::counter!("confab_pushes_leavers_unwithdrawn_total")
                                        .increment(1);
                                    tracing::warn!(%error, %chat, %user, "a leaver's pushes were not withdrawn: every retry failed");
                                    return;
                                }
                                Err(error) => {
                                    tracing::debug!(%error, "a leaver's pushes not withdrawn yet; retrying");
                                }
                            }
                        }
                    }
                })
                .await;
        });
    }

    /// Takes back `user`'s pushes of `chat` unless they are a member of it (again): see
    /// [`ApiState::withdraw_pushes_of_leavers`]. Fails when the membership or the queue could not
    /// be read, so that the caller tries again.
    async fn withdraw_leaver(&self, chat: ChatId, user: UserId) -> ApiResult<()> {
        let Some(queue) = &self.push_queue else {
            return Ok(());
        };
        // Only what was sent before they were found out of the chat: should they be added back
        // right after, the pushes of the messages sent since are theirs. Up to this millisecond,
        // or the chat's newest message if a clock ahead of this one stamped it later; both known
        // before the membership is read.
        let now = newest_id_at(confab_runtime::presence::now_ms());
        let newest = self.store.signals_before(chat, None, 1).await?;
        let up_to = newest.first().map_or(now, |signal| signal.id.max(now));
        if self.store.member_role(chat, user).await?.is_some() {
            return Ok(());
        }
        let cancelled = queue
            .cancel(user, chat, up_to, confab_runtime::presence::now_ms())
            .await?;
        count(cancelled);
        Ok(())
    }

    /// Cancels `user`'s pending push of `chat` when it announces nothing newer than `up_to`: they
    /// fetched, read or received that far. A push already sent that announced nothing newer is
    /// withdrawn from their devices.
    pub(crate) async fn cancel_pushes(&self, user: UserId, chat: ChatId, up_to: SignalId) {
        let Some(queue) = &self.push_queue else {
            return;
        };
        let cancelled = queue
            .cancel(user, chat, up_to, confab_runtime::presence::now_ms())
            .await;
        count_cancelled(cancelled, "push not cancelled");
    }
}

/// The greatest signal id made at `ms` (Unix milliseconds): every UUIDv7 of that millisecond or
/// earlier sorts at or below it, every later one above.
fn newest_id_at(ms: i64) -> SignalId {
    let ms = u128::from(u64::try_from(ms).unwrap_or(0) & ((1 << 48) - 1));
    SignalId(uuid::Uuid::from_u128((ms << 80) | ((1u128 << 80) - 1)))
}

/// Counts what a cancel or a deletion did to a push; logs its failure as `failed`.
fn count_cancelled<E: std::fmt::Display>(result: Result<Cancelled, E>, failed: &'static str) {
    match result {
        Ok(cancelled) => count(cancelled),
        Err(error) => tracing::warn!(%error, "{failed}"),
    }
}

/// Counts what a cancel or a deletion did to a push.
fn count(cancelled: Cancelled) {
    match cancelled {
        Cancelled::Pending => metrics::counter!("confab_pushes_cancelled_total").increment(1),
        Cancelled::Withdrawn => metrics::counter!("confab_pushes_withdrawn_total").increment(1),
        Cancelled::Narrowed | Cancelled::Nothing => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(600);

    #[test]
    fn the_newest_id_at_a_time_covers_that_millisecond_and_nothing_later() {
        let ms: i64 = 1_796_000_000_123;
        let made_at = |ms: i64| {
            let ts = uuid::Timestamp::from_unix(
                uuid::NoContext,
                (ms / 1000) as u64,
                ((ms % 1000) * 1_000_000) as u32,
            );
            SignalId(uuid::Uuid::new_v7(ts))
        };
        for _ in 0..100 {
            assert!(made_at(ms) <= newest_id_at(ms));
            assert!(made_at(ms - 1) <= newest_id_at(ms));
            assert!(made_at(ms + 1) > newest_id_at(ms));
        }
    }

    fn muted() -> Arc<HashMap<UserId, ChatSettings>> {
        let settings = ChatSettings {
            muted: true,
            ..Default::default()
        };
        Arc::new(HashMap::from([(
            UserId::from_subject("test", "bob"),
            settings,
        )]))
    }

    #[test]
    fn cached_settings_are_reused_until_they_are_stale_or_changed() {
        let cache = PushSettingsCache::default();
        let chat = ChatId::new();
        let started = (cache.generation(), Instant::now());
        cache.keep_chat(chat, muted(), started);
        assert_eq!(cache.chat(chat, LONG), Some(muted()));
        assert_eq!(cache.chat(chat, Duration::ZERO), None, "stale");
        cache.forget_chat(chat);
        assert_eq!(cache.chat(chat, LONG), None, "changed");

        let bob = UserId::from_subject("test", "bob");
        let carol = UserId::from_subject("test", "carol");
        let started = (cache.generation(), Instant::now());
        cache.keep_users([(bob, &UserSettings::default())], started);
        let (found, missing) = cache.users(&[bob, carol], LONG);
        assert_eq!(found.keys().collect::<Vec<_>>(), [&bob]);
        assert_eq!(missing, [carol]);
        cache.forget_user(bob);
        assert_eq!(cache.users(&[bob], LONG).1, [bob]);
    }

    #[test]
    fn the_chats_held_stay_within_the_bound() {
        let cache = PushSettingsCache::default();
        let first = ChatId::new();
        for chat in std::iter::once(first).chain((0..CACHED_SETTINGS_MAX).map(|_| ChatId::new())) {
            let started = (cache.generation(), Instant::now());
            cache.keep_chat(chat, muted(), started);
        }
        cache.forget_chat(first);
        let held = cache.lock();
        assert!(held.chats.len() <= CACHED_SETTINGS_MAX);
        assert_eq!(
            held.chat_weight,
            held.chats.values().map(|(_, s)| weight(s)).sum::<usize>()
        );
    }

    #[test]
    fn a_read_that_started_before_a_change_is_not_kept() {
        let cache = PushSettingsCache::default();
        let chat = ChatId::new();
        let bob = UserId::from_subject("test", "bob");
        let started = (cache.generation(), Instant::now());
        // The change lands while the read is in flight; what the read found may predate it.
        cache.forget_chat(chat);
        cache.forget_user(bob);
        cache.keep_chat(chat, muted(), started);
        cache.keep_users([(bob, &UserSettings::default())], started);
        assert_eq!(cache.chat(chat, LONG), None);
        assert_eq!(cache.users(&[bob], LONG).1, [bob]);
    }
}
