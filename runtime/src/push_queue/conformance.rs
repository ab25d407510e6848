//! One behavioural suite for every [`PushQueue`], split into cases so one failure does not hide the
//! rest. `runtime/tests/push_queue_conformance.rs` runs each case against the JetStream queue and
//! the embedded one through [`push_queue_conformance_tests!`](crate::push_queue_conformance_tests).
//!
//! Due times are real times: the JetStream queue hands a ticket back until its due time passes on
//! the clock, so the cases wait on the clock too (by condition, with a deadline).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use confab_schema::{ChatId, SignalId, UserId};

use super::{Cancelled, PendingPush, PushKind, PushMessage, PushQueue};
use crate::presence::now_ms;

const DEADLINE: Duration = Duration::from_secs(15);
const HOUR_MS: i64 = 3_600_000;

/// Two handles on one queue (two connections, or the same file opened twice): what one schedules
/// the other can claim, as two notifier nodes would.
pub struct Fixture {
    pub first: Arc<dyn PushQueue>,
    pub second: Arc<dyn PushQueue>,
}

fn user() -> UserId {
    UserId::from_subject("push-conformance", &uuid::Uuid::new_v4().to_string())
}

fn message(text: &str) -> PushMessage {
    PushMessage {
        signal: SignalId::new(),
        author: UserId::from_subject("push-conformance", "author"),
        author_name: "Author".into(),
        preview: Some(text.into()),
    }
}

/// Schedules `message` for `user` in `chat`, due at `due_ms` and expiring an hour later.
async fn schedule(
    queue: &dyn PushQueue,
    user: UserId,
    chat: ChatId,
    message: &PushMessage,
    due_ms: i64,
) {
    queue
        .schedule(user, chat, message, due_ms, due_ms + HOUR_MS)
        .await
        .expect("schedules");
}

/// Claims from `queue` until `wanted` pushes came, or the deadline; answers what was claimed.
async fn claim(queue: &dyn PushQueue, wanted: usize) -> Vec<PendingPush> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut claimed = Vec::new();
    while claimed.len() < wanted && tokio::time::Instant::now() < deadline {
        let mut round = queue.claim_due(now_ms(), 64).await.expect("claims").pushes;
        if round.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        claimed.append(&mut round);
    }
    claimed
}

/// Claims for a while and expects nothing.
/// Schedules a push of `message` due now, claims it and remembers it as sent: what a sender does
/// with it.
async fn sent_push(
    queue: &dyn PushQueue,
    user: UserId,
    chat: ChatId,
    message: &PushMessage,
) -> PendingPush {
    schedule(queue, user, chat, message, now_ms()).await;
    let claimed = claim(queue, 1).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    queue.sent(&claimed[0], now_ms()).await.expect("remembers");
    claimed.into_iter().next().expect("claimed")
}

async fn nothing_claimed(queue: &dyn PushQueue, for_ms: u64) {
    let until = tokio::time::Instant::now() + Duration::from_millis(for_ms);
    while tokio::time::Instant::now() < until {
        let claimed = queue.claim_due(now_ms(), 64).await.expect("claims").pushes;
        assert!(claimed.is_empty(), "nothing is due: {claimed:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A due push is claimed once, by one handle, with what it was scheduled with.
pub async fn a_due_push_is_claimed_once(fixture: Fixture) {
    let (alice, chat) = (user(), ChatId::new());
    let hello = message("hello");
    let now = now_ms();
    schedule(&*fixture.first, alice, chat, &hello, now).await;
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1, "claimed: {claimed:?}");
    let push = &claimed[0];
    assert_eq!((push.user, push.chat), (alice, chat));
    assert_eq!(push.kind, PushKind::Messages);
    assert_eq!(push.newest, hello.signal);
    assert_eq!(push.author_name, "Author");
    assert_eq!(push.preview.as_deref(), Some("hello"));
    assert_eq!(push.count, 1);
    nothing_claimed(&*fixture.first, 200).await;
    nothing_claimed(&*fixture.second, 50).await;
}

/// Nothing is claimed before its due time; then it is.
pub async fn nothing_is_claimed_before_it_is_due(fixture: Fixture) {
    let (alice, chat) = (user(), ChatId::new());
    let due = now_ms() + 700;
    schedule(&*fixture.first, alice, chat, &message("later"), due).await;
    nothing_claimed(&*fixture.first, 300).await;
    let claimed = claim(&*fixture.first, 1).await;
    assert_eq!(claimed.len(), 1);
    assert!(now_ms() >= due, "claimed before its due time");
}

/// A handle that lets go (a node shutting down) leaves nothing it held behind: a push it looked at
/// before its due time is claimed by the other handle once due, not after a redelivery timeout.
pub async fn a_released_handle_leaves_nothing_behind(fixture: Fixture) {
    let (alice, chat) = (user(), ChatId::new());
    let due = now_ms() + 1_000;
    schedule(&*fixture.first, alice, chat, &message("soon"), due).await;
    // The first handle looks before it is due (and may keep what it saw), then lets go.
    nothing_claimed(&*fixture.first, 200).await;
    fixture.first.release().await;
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(
        claimed.len(),
        1,
        "the other handle claims it within {DEADLINE:?}"
    );
    assert_eq!((claimed[0].user, claimed[0].chat), (alice, chat));
    assert!(now_ms() >= due, "claimed before its due time");
}

/// Due pushes queued behind many that are not due yet are reached without waiting: a claim that
/// looked at a full batch says more may be claimable, however few pushes it took, and claiming
/// while it says so finds them.
pub async fn due_pushes_behind_later_ones_are_claimed_at_once(fixture: Fixture) {
    let now = now_ms();
    let later = futures::future::join_all((0..300).map(|_| {
        let queue = Arc::clone(&fixture.first);
        async move {
            queue
                .schedule(
                    user(),
                    ChatId::new(),
                    &message("later"),
                    now + HOUR_MS,
                    now + 2 * HOUR_MS,
                )
                .await
        }
    }))
    .await;
    assert!(later.iter().all(Result::is_ok), "schedules");
    let due_users: Vec<UserId> = (0..5).map(|_| user()).collect();
    for user in &due_users {
        schedule(&*fixture.first, *user, ChatId::new(), &message("due"), now).await;
    }
    let mut got = Vec::new();
    for _ in 0..32 {
        let claimed = fixture
            .second
            .claim_due(now_ms(), 64)
            .await
            .expect("claims");
        got.extend(claimed.pushes.iter().map(|push| push.user));
        if !claimed.more {
            break;
        }
    }
    let mut wanted = due_users.clone();
    got.sort();
    wanted.sort();
    assert_eq!(
        got, wanted,
        "the due pushes, before any claim said the queue was drained"
    );
}

/// Messages of one chat in the window become one push announcing all, due when the first was,
/// showing the newest; other chats and users have their own.
pub async fn a_burst_collapses_into_one_push(fixture: Fixture) {
    let (alice, bob, chat, other) = (user(), user(), ChatId::new(), ChatId::new());
    let due = now_ms() + 300;
    let burst: Vec<PushMessage> = (0..3).map(|i| message(&format!("m{i}"))).collect();
    for m in &burst {
        fixture
            .first
            .schedule(alice, chat, m, due + 5_000, due + HOUR_MS)
            .await
            .expect("schedules");
    }
    // The first one's due time stands: the later ones asked for a later one.
    schedule(&*fixture.first, alice, other, &message("elsewhere"), due).await;
    schedule(&*fixture.first, bob, chat, &message("to bob"), due).await;
    let claimed = claim(&*fixture.second, 2).await;
    assert_eq!(claimed.len(), 2, "the other chat's and bob's: {claimed:?}");
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1);
    let push = &claimed[0];
    assert_eq!((push.user, push.chat, push.count), (alice, chat, 3));
    assert_eq!(push.newest, burst[2].signal);
    assert_eq!(push.preview.as_deref(), Some("m2"));
}

/// Many messages into one chat at once, from two nodes (a busy group): every one is scheduled,
/// none refused for contention, and they collapse into one push that counts them all.
pub async fn a_concurrent_burst_collapses_into_one_push(fixture: Fixture) {
    const BURST: usize = 64;
    let (alice, chat) = (user(), ChatId::new());
    let due = now_ms() + 300;
    let burst: Vec<PushMessage> = (0..BURST).map(|i| message(&format!("m{i}"))).collect();
    let newest = burst.iter().map(|m| m.signal).max().unwrap();
    futures::future::join_all(burst.iter().enumerate().map(|(i, m)| {
        let queue = if i % 2 == 0 {
            &fixture.first
        } else {
            &fixture.second
        };
        async move {
            schedule(&**queue, alice, chat, m, due).await;
        }
    }))
    .await;
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!((claimed[0].user, claimed[0].chat), (alice, chat));
    assert_eq!(claimed[0].count, BURST as u32);
    assert_eq!(claimed[0].newest, newest);
    nothing_claimed(&*fixture.first, 300).await;
}

/// A cancel drops a pending push only when what was read covers everything it announces.
pub async fn a_cancel_covers_only_what_was_read(fixture: Fixture) {
    let (alice, chat) = (user(), ChatId::new());
    let (one, two) = (message("one"), message("two"));
    let due = now_ms() + 400;
    let queue = &*fixture.first;
    schedule(queue, alice, chat, &one, due).await;
    assert_eq!(
        queue
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Pending
    );
    assert_eq!(
        queue
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Nothing,
        "cancelling is idempotent"
    );
    schedule(queue, alice, chat, &one, due).await;
    schedule(queue, alice, chat, &two, due).await;
    assert_eq!(
        queue
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Nothing,
        "the second message was not read"
    );
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].newest, claimed[0].count), (two.signal, 2));
    nothing_claimed(&*fixture.second, 200).await;
}

/// Schedules into one entry from two handles in turn (a chat's messages sent through two api
/// processes): each handle finds the entry changed by the other since its own last write, and
/// every message is counted.
pub async fn schedules_from_handles_in_turn_count_every_message(fixture: Fixture) {
    const MESSAGES: usize = 12;
    let (alice, chat) = (user(), ChatId::new());
    let due = now_ms() + 300;
    let messages: Vec<PushMessage> = (0..MESSAGES).map(|i| message(&format!("m{i}"))).collect();
    for (i, m) in messages.iter().enumerate() {
        let queue = if i % 3 == 0 {
            &fixture.second
        } else {
            &fixture.first
        };
        schedule(&**queue, alice, chat, m, due).await;
    }
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(claimed[0].count, MESSAGES as u32);
    assert_eq!(claimed[0].newest, messages[MESSAGES - 1].signal);
    nothing_claimed(&*fixture.first, 200).await;
}

/// A handle schedules into an entry that another handle claimed, then one that another handle
/// cancelled, since its own last write: each time a new push starts, counting only what came
/// after, and it is claimed in its turn (its ticket was put out).
pub async fn a_schedule_after_a_claim_or_a_cancel_starts_a_new_push(fixture: Fixture) {
    let (alice, chat) = (user(), ChatId::new());
    let (first, second, third, fourth) = (
        message("first"),
        message("second"),
        message("third"),
        message("fourth"),
    );
    let queue = &*fixture.first;
    schedule(queue, alice, chat, &first, now_ms()).await;
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!((claimed[0].newest, claimed[0].count), (first.signal, 1));

    let due = now_ms() + 400;
    schedule(queue, alice, chat, &second, due).await;
    assert_eq!(
        fixture
            .second
            .cancel(alice, chat, second.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Pending
    );
    schedule(queue, alice, chat, &third, due).await;
    schedule(queue, alice, chat, &fourth, due).await;
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!(
        (claimed[0].newest, claimed[0].count),
        (fourth.signal, 2),
        "only what came after the cancel"
    );
    nothing_claimed(&*fixture.first, 200).await;
}

/// Two handles claiming at once share the due pushes: each is claimed exactly once.
pub async fn claimers_share_without_doubles(fixture: Fixture) {
    let now = now_ms();
    let mut scheduled = Vec::new();
    for _ in 0..60 {
        let (u, c) = (user(), ChatId::new());
        schedule(&*fixture.first, u, c, &message("x"), now).await;
        scheduled.push((u, c));
    }
    let (a, b) = tokio::join!(claim(&*fixture.first, 30), claim(&*fixture.second, 30));
    let mut rest = claim(&*fixture.first, 60usize.saturating_sub(a.len() + b.len())).await;
    let mut seen: HashMap<(UserId, ChatId), usize> = HashMap::new();
    for push in a.iter().chain(&b).chain(&rest) {
        *seen.entry((push.user, push.chat)).or_default() += 1;
    }
    assert!(
        seen.values().all(|n| *n == 1),
        "a push was claimed twice: {seen:?}"
    );
    assert_eq!(seen.len(), scheduled.len(), "every push was claimed");
    rest.clear();
    nothing_claimed(&*fixture.second, 100).await;
}

/// Two handles writing at once (as two notifier processes on one queue do) never fail with a
/// busy or locked queue: every schedule, cancel and claim succeeds.
pub async fn racing_handles_never_fail(fixture: Fixture) {
    let now = now_ms();
    let race = |queue: Arc<dyn PushQueue>| async move {
        for _ in 0..100 {
            let (u, c) = (user(), ChatId::new());
            let sent = message("race");
            schedule(&*queue, u, c, &sent, now).await;
            queue
                .claim_due(now_ms(), 8)
                .await
                .expect("claims while the other handle writes");
            queue
                .cancel(u, c, sent.signal, now_ms())
                .await
                .expect("cancels while the other handle writes");
        }
    };
    tokio::join!(
        race(Arc::clone(&fixture.first)),
        race(Arc::clone(&fixture.second)),
        race(Arc::clone(&fixture.first)),
        race(Arc::clone(&fixture.second)),
    );
}

/// A deleted message is taken out of the pending push that announces it as its newest: the push
/// still announces the others, counted without it, and keeps nothing of the deleted message but
/// its id (no author's name, no text). Deleting a push's only message drops the push; deleting
/// any other message leaves a push as it is. A sent push is withdrawn when it announced the
/// deleted message, not when it announced an older one.
pub async fn a_deleted_message_is_taken_out_of_its_push(fixture: Fixture) {
    let alice = user();
    let (burst, lone, untouched, sent) =
        (ChatId::new(), ChatId::new(), ChatId::new(), ChatId::new());
    let (first, second) = (message("first"), message("second secret"));
    let (older, newer) = (message("older"), message("newer"));
    let only = message("only secret");
    let due = now_ms() + 500;
    schedule(&*fixture.first, alice, burst, &first, due).await;
    schedule(&*fixture.first, alice, burst, &second, due).await;
    schedule(&*fixture.first, alice, lone, &only, due).await;
    schedule(&*fixture.first, alice, untouched, &older, due).await;
    schedule(&*fixture.first, alice, untouched, &newer, due).await;
    let deleted = |chat: ChatId, message: &PushMessage| {
        let queue = Arc::clone(&fixture.second);
        let signal = message.signal;
        async move {
            queue
                .message_deleted(alice, chat, signal, now_ms())
                .await
                .expect("takes it out")
        }
    };
    assert_eq!(deleted(burst, &second).await, Cancelled::Narrowed);
    assert_eq!(
        deleted(burst, &second).await,
        Cancelled::Nothing,
        "taken out once"
    );
    assert_eq!(deleted(lone, &only).await, Cancelled::Pending);
    assert_eq!(deleted(untouched, &older).await, Cancelled::Nothing);

    let claimed: HashMap<ChatId, PendingPush> = claim(&*fixture.first, 2)
        .await
        .into_iter()
        .map(|push| (push.chat, push))
        .collect();
    assert_eq!(claimed.len(), 2, "claimed: {claimed:?}");
    let narrowed = &claimed[&burst];
    assert_eq!(narrowed.kind, PushKind::Messages);
    assert!(narrowed.newest_deleted, "{narrowed:?}");
    assert_eq!(narrowed.newest, second.signal, "where its messages end");
    assert_eq!(narrowed.count, 1, "the deleted message not counted");
    assert_eq!(narrowed.author_name, "");
    assert_eq!(
        narrowed.preview.as_deref(),
        Some(""),
        "previews allowed, no text kept"
    );
    let kept = &claimed[&untouched];
    assert!(!kept.newest_deleted);
    assert_eq!((kept.newest, kept.count), (newer.signal, 2));
    assert_eq!(kept.preview.as_deref(), Some("newer"));
    nothing_claimed(&*fixture.second, 200).await;

    // Sent announcing `newer`: deleting an older message leaves it, deleting `newer` withdraws it.
    schedule(&*fixture.first, alice, sent, &newer, now_ms()).await;
    let claimed = claim(&*fixture.first, 1).await;
    assert_eq!(claimed.len(), 1);
    fixture
        .first
        .sent(&claimed[0], now_ms())
        .await
        .expect("remembers");
    assert_eq!(deleted(sent, &older).await, Cancelled::Nothing);
    assert_eq!(deleted(sent, &newer).await, Cancelled::Withdrawn);
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].kind, PushKind::Withdrawal);
    assert_eq!(claimed[0].newest, newer.signal);

    // Sent announcing `first`, then `second` pending: deleting `first` leaves the pending push,
    // which will replace the notification; deleting `second` too drops it, and the notification
    // that shows `first` is withdrawn, as nothing replaces it now.
    let twice = ChatId::new();
    schedule(&*fixture.first, alice, twice, &first, now_ms()).await;
    let claimed = claim(&*fixture.first, 1).await;
    assert_eq!(claimed.len(), 1);
    fixture
        .first
        .sent(&claimed[0], now_ms())
        .await
        .expect("remembers");
    schedule(&*fixture.first, alice, twice, &second, now_ms() + 60_000).await;
    assert_eq!(deleted(twice, &first).await, Cancelled::Nothing);
    assert_eq!(deleted(twice, &second).await, Cancelled::Pending);
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(
        claimed.len(),
        1,
        "the notification that shows a deleted message stays"
    );
    assert_eq!(claimed[0].kind, PushKind::Withdrawal);
    assert_eq!(claimed[0].newest, first.signal);
}

/// A push that was sent and is then read is withdrawn, once; one that a newer push will replace
/// is not.
pub async fn reading_a_sent_push_withdraws_it(fixture: Fixture) {
    let (alice, chat) = (user(), ChatId::new());
    let (one, two) = (message("one"), message("two"));
    let queue = &*fixture.first;
    sent_push(queue, alice, chat, &one).await;

    // Read up to it: the notification is taken away.
    assert_eq!(
        fixture
            .second
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Withdrawn
    );
    assert_eq!(
        queue
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Nothing,
        "withdrawn once"
    );
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].kind, PushKind::Withdrawal);
    assert_eq!(claimed[0].newest, one.signal);
    queue.sent(&claimed[0], now_ms()).await.expect("remembers");
    assert_eq!(
        queue
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Nothing,
        "a withdrawal is not withdrawn"
    );

    // Sent, then a newer message pending: reading the first leaves the newer one to replace it.
    sent_push(queue, alice, chat, &one).await;
    let due = now_ms() + 300;
    schedule(queue, alice, chat, &two, due).await;
    assert_eq!(
        queue
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Nothing
    );
    let claimed = claim(queue, 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].kind, claimed[0].newest),
        (PushKind::Messages, two.signal)
    );
}

/// A push sent while the withdrawal of the one before it waits (its message was read after the
/// push was claimed, before it was remembered) is withdrawn by a read that covers it: the waiting
/// withdrawal is widened to it, rather than the read finding a withdrawal on its way and leaving
/// the newer notification on the devices.
pub async fn a_waiting_withdrawal_is_widened_by_a_later_read(fixture: Fixture) {
    a_waiting_withdrawal_is_widened(fixture, Covering::Read).await;
}

/// As [`a_waiting_withdrawal_is_widened_by_a_later_read`], for the deletion of the newer push's
/// message: the notification would otherwise keep showing a deleted message.
pub async fn a_waiting_withdrawal_is_widened_by_a_deletion(fixture: Fixture) {
    a_waiting_withdrawal_is_widened(fixture, Covering::Deletion).await;
}

/// What covers the newer push of [`a_waiting_withdrawal_is_widened`].
enum Covering {
    Read,
    Deletion,
}

async fn a_waiting_withdrawal_is_widened(fixture: Fixture, by: Covering) {
    let (alice, chat) = (user(), ChatId::new());
    let (one, two) = (message("one"), message("two"));
    let queue = &*fixture.first;
    sent_push(queue, alice, chat, &one).await;
    schedule(queue, alice, chat, &two, now_ms()).await;
    let newer = claim(queue, 1).await;
    assert_eq!(newer.len(), 1);
    // Read up to the first while the second is on its way: the first is to be withdrawn.
    assert_eq!(
        fixture
            .second
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Withdrawn
    );
    queue.sent(&newer[0], now_ms()).await.expect("remembers");
    // The second covered before that withdrawal went out: one withdrawal covers both.
    let covered = match by {
        Covering::Read => fixture.second.cancel(alice, chat, two.signal, now_ms()),
        Covering::Deletion => fixture
            .second
            .message_deleted(alice, chat, two.signal, now_ms()),
    };
    assert_eq!(
        covered.await.expect("covers"),
        Cancelled::Withdrawn,
        "the notification of the second push stays on the devices"
    );
    let claimed = claim(&*fixture.second, 1).await;
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].kind, claimed[0].newest),
        (PushKind::Withdrawal, two.signal)
    );
    nothing_claimed(queue, 200).await;
    assert_eq!(
        queue
            .cancel(alice, chat, two.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Nothing,
        "withdrawn once"
    );
}

/// A withdrawal waiting to go out takes second place to a push of a newer message, whose
/// notification would replace the one it takes away. Should that push be dropped before it goes
/// (its message read), the withdrawal still goes: the old notification, of a message read, would
/// otherwise stay on the devices for good.
pub async fn a_replaced_withdrawal_goes_when_the_push_is_read(fixture: Fixture) {
    a_replaced_withdrawal_goes(fixture, Dropping::Read).await;
}

/// As [`a_replaced_withdrawal_goes_when_the_push_is_read`], for a push dropped by a mute.
pub async fn a_replaced_withdrawal_goes_when_the_chat_is_muted(fixture: Fixture) {
    a_replaced_withdrawal_goes(fixture, Dropping::Mute).await;
}

/// As [`a_replaced_withdrawal_goes_when_the_push_is_read`], for a push whose message is deleted.
pub async fn a_replaced_withdrawal_goes_when_the_message_is_deleted(fixture: Fixture) {
    a_replaced_withdrawal_goes(fixture, Dropping::Deletion).await;
}

/// What drops the push of [`a_replaced_withdrawal_goes`].
enum Dropping {
    Read,
    Mute,
    Deletion,
}

async fn a_replaced_withdrawal_goes(fixture: Fixture, by: Dropping) {
    let (alice, chat) = (user(), ChatId::new());
    let (one, two) = (message("one"), message("two"));
    let queue = &*fixture.first;
    sent_push(queue, alice, chat, &one).await;
    assert_eq!(
        fixture
            .second
            .cancel(alice, chat, one.signal, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Withdrawn
    );
    // Before the withdrawal is claimed, a newer message: its push, due later, takes its place.
    schedule(queue, alice, chat, &two, now_ms() + HOUR_MS).await;
    let second = &*fixture.second;
    match by {
        Dropping::Read => {
            second
                .cancel(alice, chat, two.signal, now_ms())
                .await
                .expect("cancels");
        }
        Dropping::Mute => {
            assert!(second.drop_pending(alice, chat).await.expect("drops"));
        }
        Dropping::Deletion => {
            second
                .message_deleted(alice, chat, two.signal, now_ms())
                .await
                .expect("takes it out");
        }
    }
    let claimed: Vec<(PushKind, SignalId)> = claim(queue, 1)
        .await
        .into_iter()
        .map(|push| (push.kind, push.newest))
        .collect();
    assert_eq!(
        claimed,
        [(PushKind::Withdrawal, one.signal)],
        "the first notification is taken away"
    );
    nothing_claimed(&*fixture.second, 200).await;
}

/// A mute drops the user's pending push of that chat, and previews turned off take the text off
/// each of their pending pushes, which still go out; another user's pushes, and a withdrawal on
/// its way, are left as they were. Made through one handle, the changes are what the other claims.
pub async fn settings_changes_reach_pending_pushes(fixture: Fixture) {
    let (alice, bob) = (user(), user());
    let (muted, private, withdrawn) = (ChatId::new(), ChatId::new(), ChatId::new());
    let queue = &*fixture.first;
    // A sent push of `withdrawn`, read since: its withdrawal waits to be claimed.
    let sent = sent_push(queue, alice, withdrawn, &message("read")).await;
    let due = now_ms() + 400;
    schedule(queue, alice, muted, &message("muted"), due).await;
    schedule(queue, alice, private, &message("private"), due).await;
    schedule(queue, bob, private, &message("bob's"), due).await;
    assert_eq!(
        fixture
            .second
            .cancel(alice, withdrawn, sent.newest, now_ms())
            .await
            .expect("cancels"),
        Cancelled::Withdrawn
    );

    let second = &*fixture.second;
    assert!(second.drop_pending(alice, muted).await.expect("drops"));
    assert!(
        !second.drop_pending(alice, muted).await.expect("drops"),
        "dropped once"
    );
    assert!(
        !second.drop_pending(alice, withdrawn).await.expect("drops"),
        "a withdrawal is not dropped"
    );
    assert_eq!(second.drop_previews(alice).await.expect("drops"), 1);
    assert_eq!(
        second.drop_previews(alice).await.expect("drops"),
        0,
        "nothing left to change"
    );

    let mut claimed: Vec<(UserId, ChatId, PushKind, Option<String>)> = claim(queue, 3)
        .await
        .into_iter()
        .map(|push| (push.user, push.chat, push.kind, push.preview))
        .collect();
    claimed.sort_by_key(|(user, chat, ..)| (*user, *chat));
    let mut expected = vec![
        (alice, private, PushKind::Messages, None),
        (alice, withdrawn, PushKind::Withdrawal, None),
        (bob, private, PushKind::Messages, Some("bob's".to_owned())),
    ];
    expected.sort_by_key(|(user, chat, ..)| (*user, *chat));
    assert_eq!(claimed, expected);
    nothing_claimed(&*fixture.second, 300).await;
}

/// Runs every case against the queues `$make` opens (an `async fn() -> Option<Fixture>`; `None`
/// skips, for a backend that is not reachable).
#[macro_export]
macro_rules! push_queue_conformance_tests {
    ($module:ident, $make:path) => {
        mod $module {
            use $crate::push_queue::conformance as suite;

            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        if let Some(fixture) = $make().await {
                            suite::$case(fixture).await;
                        }
                    }
                };
            }

            case!(a_due_push_is_claimed_once);
            case!(nothing_is_claimed_before_it_is_due);
            case!(a_released_handle_leaves_nothing_behind);
            case!(due_pushes_behind_later_ones_are_claimed_at_once);
            case!(a_burst_collapses_into_one_push);
            case!(a_concurrent_burst_collapses_into_one_push);
            case!(a_cancel_covers_only_what_was_read);
            case!(schedules_from_handles_in_turn_count_every_message);
            case!(a_schedule_after_a_claim_or_a_cancel_starts_a_new_push);
            case!(claimers_share_without_doubles);
            case!(racing_handles_never_fail);
            case!(reading_a_sent_push_withdraws_it);
            case!(a_waiting_withdrawal_is_widened_by_a_later_read);
            case!(a_waiting_withdrawal_is_widened_by_a_deletion);
            case!(a_deleted_message_is_taken_out_of_its_push);
            case!(settings_changes_reach_pending_pushes);
            case!(a_replaced_withdrawal_goes_when_the_push_is_read);
            case!(a_replaced_withdrawal_goes_when_the_chat_is_muted);
            case!(a_replaced_withdrawal_goes_when_the_message_is_deleted);
        }
    };
}
