//! The push queue conformance suite against the embedded queue (one file opened twice) and against
//! the JetStream queue on the NATS server that `infra/up.sh` started (a fresh prefix per case,
//! two connections).

mod support;

use std::sync::Arc;

use confab_runtime::push_queue::conformance::Fixture;
use confab_runtime::push_queue::{EmbeddedPushQueue, NatsPushQueue};
use confab_runtime::push_queue_conformance_tests;

async fn embedded() -> Option<Fixture> {
    // The file outlives the case; the OS cleans its temp directory.
    let path = tempfile::tempdir()
        .expect("temp dir")
        .keep()
        .join("push.sqlite3");
    Some(Fixture {
        first: Arc::new(EmbeddedPushQueue::open(&path).expect("opens")),
        second: Arc::new(EmbeddedPushQueue::open(&path).expect("opens again")),
    })
}

async fn nats() -> Option<Fixture> {
    let url = support::nats_url("push queue").await?;
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let first = NatsPushQueue::connect(&url, &prefix)
        .await
        .expect("connects");
    let second = NatsPushQueue::connect(&url, &prefix)
        .await
        .expect("connects");
    Some(Fixture {
        first: Arc::new(first),
        second: Arc::new(second),
    })
}

push_queue_conformance_tests!(embedded_queue, super::embedded);
push_queue_conformance_tests!(jetstream_queue, super::nats);

/// A JetStream queue of its own for a case that counts its writes, with the URL and prefix.
async fn jetstream_queue() -> Option<(Arc<NatsPushQueue>, String, String)> {
    let url = support::nats_url("push queue").await?;
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let queue = NatsPushQueue::connect(&url, &prefix)
        .await
        .expect("connects");
    Some((Arc::new(queue), url, prefix))
}

/// The `i`th message of a burst by `author`.
fn burst_message(author: confab_schema::UserId, i: u32) -> confab_runtime::push_queue::PushMessage {
    confab_runtime::push_queue::PushMessage {
        signal: confab_schema::SignalId::new(),
        author,
        author_name: "author".into(),
        preview: Some(format!("m{i}")),
    }
}

/// A stream of schedules of one entry (a busy chat, one recipient) that once overlapped writes the
/// entry about once per pace for as long as it lasts, not once per message, and the push still
/// counts every message. Each schedule returns once a write has carried it, about a pace at most:
/// one that a write took along does not wait for the pace again. On JetStream only: the embedded
/// queue writes its entry in a local transaction.
#[tokio::test]
async fn jetstream_a_stream_of_schedules_writes_an_entry_about_once_per_pace() {
    use confab_runtime::push_queue::{PendingPush, PushQueue};
    use confab_schema::{ChatId, UserId};

    const MESSAGES: u32 = 500;
    const AT_ONCE: u32 = 3;
    const EVERY: std::time::Duration = std::time::Duration::from_millis(2);
    const PACE: std::time::Duration = std::time::Duration::from_millis(50);
    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let (user, chat) = (UserId::from_subject("pace", "reader"), ChatId::new());
    let author = UserId::from_subject("pace", "author");
    let due = confab_runtime::presence::now_ms() + 600_000;
    let started = tokio::time::Instant::now();
    // Three schedules at once, then one every 2 ms for a second, each on its own without waiting
    // for the others, as the sends of a busy chat are. A write takes less than 2 ms here, so
    // after the first three they no longer overlap by themselves.
    let schedules: Vec<_> = (0..MESSAGES)
        .map(|i| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                tokio::time::sleep_until(started + EVERY * i.saturating_sub(AT_ONCE - 1)).await;
                let asked = tokio::time::Instant::now();
                queue
                    .schedule(user, chat, &burst_message(author, i), due, due + 600_000)
                    .await
                    .expect("scheduled");
                asked.elapsed()
            })
        })
        .collect();
    let mut slowest = std::time::Duration::ZERO;
    for schedule in schedules {
        slowest = slowest.max(schedule.await.expect("ran"));
    }
    let elapsed = started.elapsed();

    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    let bucket = context
        .get_key_value(format!("{prefix}_push"))
        .await
        .expect("the bucket");
    let entry = bucket
        .entry(format!("{user}.{chat}"))
        .await
        .expect("reads")
        .expect("the pending push");
    let push: PendingPush = serde_json::from_slice(&entry.value).expect("a pending push");
    assert_eq!(push.count, MESSAGES, "every message counted");
    // Every write of the entry is a revision of the bucket, which holds nothing else.
    let writes = entry.revision;
    let paced = u64::try_from(elapsed.as_millis() / PACE.as_millis()).unwrap_or(u64::MAX) + 3;
    assert!(
        writes <= paced,
        "{writes} writes for {MESSAGES} messages in {elapsed:?} at a pace of {PACE:?}"
    );
    assert!(
        slowest < PACE * 3,
        "the slowest of {MESSAGES} schedules took {slowest:?} at a pace of {PACE:?}"
    );
    queue.delete_bucket().await.expect("cleans up");
}

/// A schedule of one entry does not wait for another entry's pace, also when the two take their
/// turns at the same lock: while a busy chat's entry is paced, a lone schedule of another entry
/// on its lock is written at once. On JetStream only, where the pace is.
#[tokio::test]
async fn jetstream_a_paced_entry_does_not_hold_back_another_entry_on_its_lock() {
    use confab_runtime::kv_bucket::EntryTurns;
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};
    use std::sync::atomic::{AtomicBool, Ordering};

    const LONE_SCHEDULES: u32 = 20;
    const PACE: std::time::Duration = std::time::Duration::from_millis(50);
    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let busy = (UserId::from_subject("pace", "reader"), ChatId::new());
    let busy_key = format!("{}.{}", busy.0, busy.1);
    let quiet_user = UserId::from_subject("pace", "other reader");
    let quiet_chat = std::iter::repeat_with(ChatId::new)
        .find(|chat| EntryTurns::share_a_lock(&busy_key, &format!("{quiet_user}.{chat}")))
        .expect("a chat whose entry shares the busy entry's lock");
    let author = UserId::from_subject("pace", "author");
    let due = confab_runtime::presence::now_ms() + 600_000;
    let message = move |i: u32| burst_message(author, i);

    // The busy entry: three schedules at once, then one every 2 ms until the lone ones are done.
    let done = Arc::new(AtomicBool::new(false));
    let burst = {
        let (queue, done) = (Arc::clone(&queue), Arc::clone(&done));
        tokio::spawn(async move {
            let mut sends = tokio::task::JoinSet::new();
            let mut every = tokio::time::interval(std::time::Duration::from_millis(2));
            let mut i = 0;
            while !done.load(Ordering::Relaxed) {
                if i >= 3 {
                    every.tick().await;
                }
                let (queue, message) = (Arc::clone(&queue), message(i));
                sends.spawn(async move {
                    queue
                        .schedule(busy.0, busy.1, &message, due, due + 600_000)
                        .await
                        .expect("scheduled");
                });
                i += 1;
            }
            sends.join_all().await;
            i
        })
    };
    // Until the busy entry's writes are paced: the burst has written it once and queued more.
    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        // The queue creates its bucket with its first schedule.
        if let Ok(bucket) = context.get_key_value(format!("{prefix}_push")).await
            && let Ok(Some(entry)) = bucket.entry(busy_key.clone()).await
            && entry.revision >= 2
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the busy entry is written"
        );
        tokio::task::yield_now().await;
    }

    // One lone schedule after another of the quiet entry. Each waiting out the busy entry's pace
    // would take about half a pace on average.
    let started = tokio::time::Instant::now();
    let lone = async {
        for i in 0..LONE_SCHEDULES {
            queue
                .schedule(quiet_user, quiet_chat, &message(i), due, due + 600_000)
                .await
                .expect("scheduled");
        }
    };
    let finished = tokio::time::timeout(std::time::Duration::from_secs(10), lone).await;
    let elapsed = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let busy_schedules = burst.await.expect("ran");
    assert!(
        finished.is_ok(),
        "{LONE_SCHEDULES} lone schedules not done in {elapsed:?} beside a paced entry"
    );
    assert!(
        elapsed < PACE * LONE_SCHEDULES / 5,
        "{LONE_SCHEDULES} lone schedules took {elapsed:?} beside a paced entry ({busy_schedules} schedules)"
    );
    queue.delete_bucket().await.expect("cleans up");
}

/// A ticket that cannot be claimed costs only itself: the pushes the other tickets of the same
/// claim took come back to the caller. Here the ticket names a key the bucket refuses (not one
/// the queue writes, but anyone who may publish on the subject can); it used to fail the whole
/// claim after the other tickets' entries were deleted, losing their pushes. On JetStream only,
/// where a claim looks at a batch of tickets at once.
#[tokio::test]
async fn jetstream_a_bad_ticket_loses_no_other_push() {
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};
    use std::collections::HashSet;

    const PUSHES: u32 = 40;
    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let author = UserId::from_subject("poison", "author");
    let now = confab_runtime::presence::now_ms();
    let mut expected = HashSet::new();
    for i in 0..PUSHES / 2 {
        let (user, chat) = (
            UserId::from_subject("poison", &format!("r{i}")),
            ChatId::new(),
        );
        queue
            .schedule(user, chat, &burst_message(author, i), now, now + 600_000)
            .await
            .expect("scheduled");
        expected.insert((user, chat));
    }
    // Between the valid tickets, so that the claim that meets it has claimed others already.
    let client = async_nats::connect(&url).await.expect("connects");
    let context = async_nats::jetstream::new(client);
    context
        .publish(format!("{prefix}.push.due"), "not a key 0".into())
        .await
        .expect("published")
        .await
        .expect("stored");
    for i in PUSHES / 2..PUSHES {
        let (user, chat) = (
            UserId::from_subject("poison", &format!("r{i}")),
            ChatId::new(),
        );
        queue
            .schedule(user, chat, &burst_message(author, i), now, now + 600_000)
            .await
            .expect("scheduled");
        expected.insert((user, chat));
    }

    let mut claimed = HashSet::new();
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while claimed.len() < expected.len() && tokio::time::Instant::now() < deadline {
        match queue
            .claim_due(confab_runtime::presence::now_ms(), 256)
            .await
        {
            Ok(batch) => {
                for push in batch.pushes {
                    assert!(
                        claimed.insert((push.user, push.chat)),
                        "a push claimed twice"
                    );
                }
            }
            Err(error) => errors.push(error.to_string()),
        }
    }
    assert_eq!(
        claimed, expected,
        "every valid push is claimed once the bad ticket is met; claims failed with {errors:?}"
    );
    queue.delete_bucket().await.expect("cleans up");
}

/// Pushes not due for a long time take no place among the ticket consumer's unacknowledged
/// messages, whose number the server caps: were they fetched and handed back with a delay, as
/// many of them as the cap would stop every due push behind them. The ones not yet due wait on
/// the stream, aside, and a push due now is still claimed. On JetStream only: the embedded queue
/// reads its due entries by an index.
#[tokio::test]
async fn jetstream_pushes_not_yet_due_are_not_held_unacknowledged() {
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};

    const LATER: u32 = 40;
    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let author = UserId::from_subject("later", "author");
    let now = confab_runtime::presence::now_ms();
    for i in 0..LATER {
        let user = UserId::from_subject("later", &format!("reader-{i}"));
        let due = now + 600_000;
        queue
            .schedule(
                user,
                ChatId::new(),
                &burst_message(author, i),
                due,
                due + 600_000,
            )
            .await
            .expect("scheduled");
    }
    let soon = UserId::from_subject("later", "due-now");
    let soon_chat = ChatId::new();
    queue
        .schedule(
            soon,
            soon_chat,
            &burst_message(author, 0),
            now,
            now + 600_000,
        )
        .await
        .expect("scheduled");

    // Claims until the push due now comes, as a node's loop does.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut claimed = Vec::new();
    while claimed.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the push due now was never claimed"
        );
        let batch = queue
            .claim_due(confab_runtime::presence::now_ms(), 100)
            .await
            .expect("claims");
        claimed.extend(batch.pushes);
        if claimed.is_empty() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert_eq!(claimed.len(), 1, "only the push due now: {claimed:?}");
    assert_eq!((claimed[0].user, claimed[0].chat), (soon, soon_chat));

    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    let mut stream = context
        .get_stream(format!("{prefix}_push_due"))
        .await
        .expect("the ticket stream");
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("senders").await.expect("the consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(
        info.num_ack_pending, 0,
        "tickets of pushes due in ten minutes held unacknowledged"
    );
    let stream_info = stream.info().await.expect("stream info");
    assert_eq!(
        stream_info.state.messages,
        u64::from(LATER),
        "one ticket waiting per push not yet due"
    );
    queue.delete_bucket().await.expect("cleans up");
}

/// A ticket due a few seconds from now waits aside and comes when due: the push is claimed then,
/// and not before. On JetStream only, where tickets wait on a schedule.
#[tokio::test]
async fn jetstream_a_push_due_in_a_few_seconds_is_claimed_when_due() {
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};

    let Some((queue, _url, _prefix)) = jetstream_queue().await else {
        return;
    };
    let (user, chat) = (UserId::from_subject("soon", "reader"), ChatId::new());
    let due = confab_runtime::presence::now_ms() + 5_000;
    queue
        .schedule(
            user,
            chat,
            &burst_message(UserId::from_subject("soon", "author"), 0),
            due,
            due + 600_000,
        )
        .await
        .expect("scheduled");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the push due in five seconds was not claimed in thirty"
        );
        let now = confab_runtime::presence::now_ms();
        let batch = queue.claim_due(now, 10).await.expect("claims");
        if let Some(push) = batch.pushes.first() {
            assert!(now >= due, "claimed {} ms before it was due", due - now);
            assert_eq!((push.user, push.chat), (user, chat));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    queue.delete_bucket().await.expect("cleans up");
}

/// A ticket stream and consumer made by an older version (one subject, no schedules, a consumer
/// of the whole stream) are brought up to date in place: a push due later waits aside, and one
/// due now is claimed. On JetStream only.
#[tokio::test]
async fn jetstream_an_older_ticket_stream_is_brought_up_to_date() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use async_nats::jetstream::stream::{Config, RetentionPolicy, StorageType};
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};

    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    let stream = context
        .create_stream(Config {
            name: format!("{prefix}_push_due"),
            subjects: vec![format!("{prefix}.push.due")],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .expect("the older stream");
    stream
        .create_consumer(pull::Config {
            durable_name: Some("senders".into()),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .expect("the older consumer");

    let author = UserId::from_subject("older", "author");
    let now = confab_runtime::presence::now_ms();
    let later = now + 600_000;
    queue
        .schedule(
            UserId::from_subject("older", "later"),
            ChatId::new(),
            &burst_message(author, 0),
            later,
            later + 600_000,
        )
        .await
        .expect("scheduled");
    let (user, chat) = (UserId::from_subject("older", "now"), ChatId::new());
    queue
        .schedule(user, chat, &burst_message(author, 1), now, now + 600_000)
        .await
        .expect("scheduled");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let claimed = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the push due now was never claimed"
        );
        let batch = queue
            .claim_due(confab_runtime::presence::now_ms(), 10)
            .await
            .expect("claims");
        if !batch.pushes.is_empty() {
            break batch.pushes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(claimed.len(), 1, "only the push due now: {claimed:?}");
    assert_eq!((claimed[0].user, claimed[0].chat), (user, chat));
    let mut stream = context
        .get_stream(format!("{prefix}_push_due"))
        .await
        .expect("the stream");
    assert!(
        stream
            .info()
            .await
            .expect("info")
            .config
            .allow_message_schedules
    );
    let mut consumer: async_nats::jetstream::consumer::PullConsumer =
        stream.get_consumer("senders").await.expect("the consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!(info.config.filter_subject, format!("{prefix}.push.due"));
    assert_eq!(
        info.num_ack_pending, 0,
        "the later push's ticket waits aside"
    );
    queue.delete_bucket().await.expect("cleans up");
}

/// An entry left without a ticket (its process killed between writing the entry and its ticket,
/// or the entry's create landing while its acknowledgement was lost) does not silence the chat
/// for ever: the next message of the chat joins it and puts a ticket out for it, and the push,
/// long overdue, is claimed with both messages. On JetStream only: the embedded queue finds due
/// entries by an index of due times, with nothing beside the entry to lose.
#[tokio::test]
async fn jetstream_an_entry_left_without_a_ticket_is_claimed_after_the_next_message() {
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};

    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let author = UserId::from_subject("ticketless", "author");
    let now = confab_runtime::presence::now_ms();
    // Another chat's push, due much later, makes the queue create its bucket and stream.
    queue
        .schedule(
            UserId::from_subject("ticketless", "other"),
            ChatId::new(),
            &burst_message(author, 0),
            now + 600_000,
            now + 1_200_000,
        )
        .await
        .expect("scheduled");
    // The entry as a crash left it, its first message an hour old: in the bucket, no ticket.
    let (user, chat) = (UserId::from_subject("ticketless", "reader"), ChatId::new());
    let first = burst_message(author, 1);
    let due = now - 3_600_000;
    let entry = serde_json::json!({
        "user": user,
        "chat": chat,
        "kind": "messages",
        "newest": first.signal,
        "author": author,
        "author_name": "author",
        "preview": "m1",
        "count": 1,
        "due_ms": due,
        "expires_ms": now + 3_600_000,
    });
    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    let bucket = context
        .get_key_value(format!("{prefix}_push"))
        .await
        .expect("the bucket");
    bucket
        .create(
            format!("{user}.{chat}"),
            serde_json::to_vec(&entry).expect("encodes").into(),
        )
        .await
        .expect("the entry without a ticket");

    let second = burst_message(author, 2);
    queue
        .schedule(user, chat, &second, now + 300, now + 3_600_000)
        .await
        .expect("scheduled");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let claimed = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the push of an entry left without a ticket was never claimed"
        );
        let batch = queue
            .claim_due(confab_runtime::presence::now_ms(), 10)
            .await
            .expect("claims");
        if !batch.pushes.is_empty() {
            break batch.pushes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        claimed.len(),
        1,
        "only the ticketless entry's push: {claimed:?}"
    );
    let push = &claimed[0];
    assert_eq!((push.user, push.chat), (user, chat));
    assert_eq!(push.newest, second.signal);
    assert_eq!(push.count, 2, "both messages announced");
    queue.delete_bucket().await.expect("cleans up");
}

/// A ticket that comes before its entry (published first, as every ticket is, and taken by a
/// node before the entry's create landed, which an entry due at once allows) is not dropped for
/// finding nothing: it comes back shortly, finds the entry, and the push is claimed. On JetStream
/// only, where the tickets are.
#[tokio::test]
async fn jetstream_a_ticket_that_comes_before_its_entry_still_claims_it() {
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};

    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let author = UserId::from_subject("early", "author");
    let now = confab_runtime::presence::now_ms();
    // Another chat's push, due much later, makes the queue create its bucket and stream.
    queue
        .schedule(
            UserId::from_subject("early", "other"),
            ChatId::new(),
            &burst_message(author, 0),
            now + 600_000,
            now + 1_200_000,
        )
        .await
        .expect("scheduled");
    let (user, chat) = (UserId::from_subject("early", "reader"), ChatId::new());
    let key = format!("{user}.{chat}");
    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    // The ticket as the queue publishes it (key, due time, published), the entry not yet there.
    context
        .publish(
            format!("{prefix}.push.due"),
            format!("{key} {now} {now}").into(),
        )
        .await
        .expect("published")
        .await
        .expect("stored");
    // Claims until the ticket was taken (and found no entry).
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = context
        .get_stream(format!("{prefix}_push_due"))
        .await
        .expect("the ticket stream")
        .get_consumer("senders")
        .await
        .expect("the consumer");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let batch = queue
            .claim_due(confab_runtime::presence::now_ms(), 10)
            .await
            .expect("claims");
        assert!(batch.pushes.is_empty(), "nothing to claim yet");
        if consumer
            .info()
            .await
            .expect("consumer info")
            .delivered
            .consumer_sequence
            >= 1
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ticket was never taken"
        );
    }

    let message = burst_message(author, 1);
    let entry = serde_json::json!({
        "user": user,
        "chat": chat,
        "kind": "messages",
        "newest": message.signal,
        "author": author,
        "author_name": "author",
        "preview": "m1",
        "count": 1,
        "due_ms": now,
        "expires_ms": now + 3_600_000,
    });
    context
        .get_key_value(format!("{prefix}_push"))
        .await
        .expect("the bucket")
        .create(key, serde_json::to_vec(&entry).expect("encodes").into())
        .await
        .expect("the entry, after its ticket");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let claimed = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the entry whose ticket came first was never claimed"
        );
        let batch = queue
            .claim_due(confab_runtime::presence::now_ms(), 10)
            .await
            .expect("claims");
        if !batch.pushes.is_empty() {
            break batch.pushes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert_eq!((claimed[0].user, claimed[0].chat), (user, chat));
    assert_eq!(claimed[0].newest, message.signal);
    queue.delete_bucket().await.expect("cleans up");
}

/// A read whose withdrawal cannot be queued (the ticket stream is gone for a moment) leaves the
/// sent push's record where it was, so that the next read withdraws the notification; it used to
/// delete the record first, and the notification then stayed for good. On JetStream only: the
/// embedded queue deletes the record and queues the withdrawal in one transaction.
#[tokio::test]
async fn jetstream_a_withdrawal_that_cannot_be_queued_keeps_its_record() {
    use confab_runtime::push_queue::{Cancelled, PushKind, PushQueue};
    use confab_schema::{ChatId, UserId};

    let Some((queue, url, prefix)) = jetstream_queue().await else {
        return;
    };
    let (user, chat) = (UserId::from_subject("withdraw", "reader"), ChatId::new());
    let author = UserId::from_subject("withdraw", "author");
    let now = confab_runtime::presence::now_ms();
    queue
        .schedule(user, chat, &burst_message(author, 0), now, now + 600_000)
        .await
        .expect("scheduled");
    let push = claim_one(&*queue, "the push").await;
    queue
        .sent(&push, confab_runtime::presence::now_ms())
        .await
        .expect("remembers");

    let client = async_nats::connect(&url).await.expect("connects");
    let context = async_nats::jetstream::new(client);
    let tickets = format!("{}_push_due", prefix.replace(['.', '-'], "_"));
    context.delete_stream(&tickets).await.expect("deleted");
    assert!(
        queue
            .cancel(user, chat, push.newest, confab_runtime::presence::now_ms())
            .await
            .is_err(),
        "a withdrawal without its ticket is not queued"
    );

    // The stream is back (another node made it); the next read withdraws the notification.
    let other = NatsPushQueue::connect(&url, &prefix)
        .await
        .expect("connects");
    assert_eq!(
        other
            .cancel(user, chat, push.newest, confab_runtime::presence::now_ms())
            .await
            .expect("cancels"),
        Cancelled::Withdrawn,
        "the sent push's record outlived the failed withdrawal"
    );
    let withdrawal = claim_one(&other, "the withdrawal").await;
    assert_eq!(withdrawal.kind, PushKind::Withdrawal);
    assert_eq!((withdrawal.user, withdrawal.chat), (user, chat));
    other.delete_bucket().await.expect("cleans up");
}

/// The next push `queue` claims, waited for up to 10 s; `what` names it when none comes.
async fn claim_one(
    queue: &dyn confab_runtime::push_queue::PushQueue,
    what: &str,
) -> confab_runtime::push_queue::PendingPush {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut batch = queue
            .claim_due(confab_runtime::presence::now_ms(), 16)
            .await
            .expect("claims");
        if let Some(push) = batch.pushes.pop() {
            return push;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} was never claimed"
        );
    }
}

/// The pending bucket ages out what it holds, a bucket made by an earlier version (without an
/// age) too once a queue opens it: every claim and cancel leaves a delete marker, one per user
/// and chat that ever had a push, which would otherwise stay for good. On JetStream only.
#[tokio::test]
async fn jetstream_pending_entries_and_their_delete_markers_age_out() {
    use async_nats::jetstream::kv;
    use confab_runtime::push_queue::PENDING_MAX_AGE;
    use confab_runtime::push_queue::PushQueue;
    use confab_schema::{ChatId, UserId};

    let Some(url) = support::nats_url("push queue").await else {
        return;
    };
    let context = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connects"));
    for made_before in [false, true] {
        let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
        if made_before {
            context
                .create_key_value(kv::Config {
                    bucket: format!("{prefix}_push"),
                    history: 1,
                    ..Default::default()
                })
                .await
                .expect("the earlier bucket");
        }
        let queue = NatsPushQueue::connect(&url, &prefix)
            .await
            .expect("connects");
        let now = confab_runtime::presence::now_ms();
        queue
            .schedule(
                UserId::from_subject("aged", "user"),
                ChatId::new(),
                &burst_message(UserId::from_subject("aged", "author"), 0),
                now + 600_000,
                now + 1_200_000,
            )
            .await
            .expect("scheduled");
        let stream = context
            .get_stream(format!("KV_{prefix}_push"))
            .await
            .expect("the bucket's stream");
        assert_eq!(
            stream.cached_info().config.max_age,
            PENDING_MAX_AGE,
            "made before: {made_before}"
        );
        let _ = context.delete_key_value(format!("{prefix}_push")).await;
    }
}
