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

/// A stream of schedules of one entry (a busy chat, one recipient) that once overlapped writes the
/// entry about once per pace from then on, not once per message, and the push still counts every
/// message. On JetStream only: the embedded queue writes its entry in a local transaction.
#[tokio::test]
async fn jetstream_a_stream_of_schedules_writes_an_entry_about_once_per_pace() {
    use confab_runtime::push_queue::{PendingPush, PushMessage, PushQueue};
    use confab_schema::{ChatId, SignalId, UserId};

    const MESSAGES: u32 = 103;
    const AT_ONCE: u32 = 3;
    const EVERY: std::time::Duration = std::time::Duration::from_millis(2);
    let Some(url) = support::nats_url("push queue").await else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let queue = Arc::new(
        NatsPushQueue::connect(&url, &prefix)
            .await
            .expect("connects"),
    );
    let (user, chat) = (UserId::from_subject("pace", "reader"), ChatId::new());
    let author = UserId::from_subject("pace", "author");
    let due = confab_runtime::presence::now_ms() + 600_000;
    let started = tokio::time::Instant::now();
    // Three schedules at once, then one every 2 ms for 200 ms, each on its own without waiting
    // for the others, as the sends of a busy chat are. A write takes less than 2 ms here, so
    // after the first three they no longer overlap by themselves.
    let schedules: Vec<_> = (0..MESSAGES)
        .map(|i| {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                tokio::time::sleep_until(started + EVERY * i.saturating_sub(AT_ONCE - 1)).await;
                let message = PushMessage {
                    signal: SignalId::new(),
                    author,
                    author_name: "author".into(),
                    preview: Some(format!("m{i}")),
                };
                queue
                    .schedule(user, chat, &message, due, due + 600_000)
                    .await
                    .expect("scheduled");
            })
        })
        .collect();
    for schedule in schedules {
        schedule.await.expect("ran");
    }

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
    let elapsed = started.elapsed();
    let paced = u64::try_from(elapsed.as_millis() / 50).unwrap_or(u64::MAX) + 3;
    assert!(
        writes <= paced,
        "{writes} writes for {MESSAGES} messages in {elapsed:?} at a pace of 50 ms"
    );
    queue.delete_bucket().await.expect("cleans up");
}
