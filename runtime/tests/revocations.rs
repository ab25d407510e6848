//! The revocations bucket on the NATS server that `infra/up.sh` started (a fresh prefix, and so a
//! fresh bucket, per case): a watch that is lost and made again announces only the revocations it
//! missed, a bucket made by an older version takes the current age limit, and each revocation in it
//! lasts its own time.

mod support;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use confab_runtime::kv_bucket::KvBucket;
use confab_runtime::revocation::{Keep, Lasting, Revocation, Revocations};
use confab_schema::UserId;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(20);

/// Waits until `revocations` watches its bucket, failing after the deadline.
async fn watched(revocations: &Revocations) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while revocations.check().is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never watching the revocations bucket"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next revocation `announced`, within the deadline.
async fn next(announced: &mut tokio::sync::broadcast::Receiver<Revocation>) -> Revocation {
    tokio::time::timeout(DEADLINE, announced.recv())
        .await
        .expect("announced before the deadline")
        .expect("announced")
}

fn session_of(user: &str, session: &str) -> Revocation {
    Revocation {
        user: Some(UserId::from_subject("revocations", user)),
        session: Some(session.into()),
        before: time::OffsetDateTime::now_utc().unix_timestamp(),
    }
}

/// Revocations on the bucket of `prefix`, once every record already there is read (as a process
/// does before it says it is ready).
async fn started(
    url: &str,
    prefix: &str,
    keep: Keep,
    shutdown: &CancellationToken,
) -> Arc<Revocations> {
    let revocations = Revocations::nats(url, prefix, keep, shutdown.clone())
        .await
        .unwrap();
    watched(&revocations).await;
    revocations
}

#[tokio::test]
async fn a_watch_made_again_announces_only_what_it_missed() {
    let Some(url) = support::nats_url("revocations").await else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let shutdown = CancellationToken::new();
    let ttl = Duration::from_secs(3600);
    let watcher = Revocations::nats(&url, &prefix, ttl, shutdown.clone())
        .await
        .expect("connects");
    let elsewhere = Revocations::nats(&url, &prefix, ttl, shutdown.clone())
        .await
        .expect("connects");
    watched(&watcher).await;
    let mut announced = watcher.subscribe();

    let (first, second) = (session_of("alice", "s1"), session_of("bob", "s2"));
    for revocation in [&first, &second] {
        elsewhere.revoke(revocation.clone()).await.expect("revoked");
    }
    assert_eq!(next(&mut announced).await, first);
    assert_eq!(next(&mut announced).await, second);

    watcher.watch_again();
    watched(&watcher).await;
    let missed = session_of("carol", "s3");
    elsewhere.revoke(missed.clone()).await.expect("revoked");
    assert_eq!(
        next(&mut announced).await,
        missed,
        "the watch made again announced a revocation it had announced before"
    );
    assert!(watcher.is_revoked(UserId::from_subject("revocations", "alice"), Some("s1"), 0));

    shutdown.cancel();
    Revocations::delete_nats_bucket(&url, &prefix)
        .await
        .expect("cleaned up");
}

#[tokio::test]
async fn a_bucket_made_with_another_age_limit_takes_the_current_one() {
    let Some(url) = support::nats_url("revocations").await else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bucket = format!("{prefix}_revocations");
    let client = async_nats::connect(&url).await.expect("connects");
    let context = jetstream::new(client);
    // As an older version made it: a day, whatever the configuration said.
    context
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            description: "confab: ended sessions".into(),
            history: 1,
            max_age: Duration::from_secs(24 * 3600),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("created");
    let kept = session_of("alice", "kept");
    let shutdown = CancellationToken::new();
    let ttl = Duration::from_secs(30 * 24 * 3600);

    let revocations = Revocations::nats(&url, &prefix, ttl, shutdown.clone())
        .await
        .expect("connects");
    watched(&revocations).await;
    let status = context
        .get_key_value(&bucket)
        .await
        .expect("the bucket is there")
        .status()
        .await
        .expect("its status");
    assert_eq!(status.max_age(), ttl, "the bucket's age limit");
    assert_eq!(status.history(), 1);
    // What it held stays.
    revocations.revoke(kept.clone()).await.expect("revoked");
    let again = Revocations::nats(&url, &prefix, ttl, shutdown.clone())
        .await
        .expect("connects");
    watched(&again).await;
    assert!(again.is_revoked(
        UserId::from_subject("revocations", "alice"),
        Some("kept"),
        0
    ));

    shutdown.cancel();
    Revocations::delete_nats_bucket(&url, &prefix)
        .await
        .expect("cleaned up");
}

/// A bucket made by an earlier version (one age limit for every record, no time to live of their
/// own) is changed when opened: a revocation that lasts a token's lifetime is gone from it after
/// that, while one that lasts a session's stays, and a process started later reads only the latter.
#[tokio::test]
async fn each_revocation_in_the_bucket_lasts_its_own_time() {
    let Some(url) = support::nats_url("revocations").await else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bucket_name = format!("{prefix}_revocations");
    let earlier = KvBucket::connect(
        &url,
        "confab-test",
        kv::Config {
            bucket: bucket_name.clone(),
            history: 1,
            max_age: Duration::from_secs(60),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    earlier.store().await.unwrap();

    let keep = Keep {
        tokens: Duration::from_secs(1),
        sessions: Duration::from_secs(3600),
    };
    let shutdown = CancellationToken::new();
    let alice = UserId::from_subject("i", &prefix);
    let at = time::OffsetDateTime::now_utc().unix_timestamp();
    let ended = |session: &str| Revocation {
        user: Some(alice),
        session: Some(session.to_owned()),
        before: at,
    };
    let first = started(&url, &prefix, keep, &shutdown).await;
    first
        .revoke_lasting(ended("ended-at-the-provider"), Lasting::Tokens)
        .await
        .unwrap();
    first
        .revoke_lasting(ended("ended-in-confab"), Lasting::Session)
        .await
        .unwrap();
    drop(first);

    let stream = earlier
        .context()
        .get_stream(format!("KV_{bucket_name}"))
        .await
        .unwrap();
    let config = &stream.cached_info().config;
    assert!(config.allow_message_ttl, "{config:?}");
    assert!(config.max_age >= Duration::from_secs(3600), "{config:?}");

    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let later = started(&url, &prefix, keep, &shutdown).await;
        assert!(
            later.is_revoked(alice, Some("ended-in-confab"), at + 1),
            "a session ended in confab alone is kept for a session's lifetime"
        );
        if !later.is_revoked(alice, Some("ended-at-the-provider"), at + 1) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a revocation lasting a token's lifetime (1s) is still read {}s after",
            time::OffsetDateTime::now_utc().unix_timestamp() - at
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shutdown.cancel();
    let _ = jetstream::new(async_nats::connect(&url).await.unwrap())
        .delete_key_value(&bucket_name)
        .await;
}

/// A session ended in confab (kept for a session's lifetime) and then at the provider (a
/// back-channel logout, kept for a token's): the second does not cut the first's record short, so
/// a process started after a token's lifetime still refuses the session.
#[tokio::test]
async fn a_later_revocation_of_a_session_does_not_shorten_its_record() {
    let Some(url) = support::nats_url("revocations").await else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let keep = Keep {
        tokens: Duration::from_secs(1),
        sessions: Duration::from_secs(3600),
    };
    let shutdown = CancellationToken::new();
    let alice = UserId::from_subject("i", &prefix);
    let at = time::OffsetDateTime::now_utc().unix_timestamp();
    let ended = |session: &str| Revocation {
        user: Some(alice),
        session: Some(session.to_owned()),
        before: at,
    };
    let first = started(&url, &prefix, keep, &shutdown).await;
    first
        .revoke_lasting(ended("everywhere"), Lasting::Session)
        .await
        .unwrap();
    first
        .revoke_lasting(ended("everywhere"), Lasting::Tokens)
        .await
        .unwrap();
    // Written after both, kept for a token's lifetime: once it is gone, so would be a record
    // the second one cut short.
    first
        .revoke_lasting(ended("marker"), Lasting::Tokens)
        .await
        .unwrap();
    drop(first);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let later = started(&url, &prefix, keep, &shutdown).await;
        let marked = later.is_revoked(alice, Some("marker"), at + 1);
        assert!(
            later.is_revoked(alice, Some("everywhere"), at + 1),
            "the session's record was cut short (marker still there: {marked})"
        );
        if !marked {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a revocation lasting a token's lifetime (1s) is still read"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shutdown.cancel();
    let _ = jetstream::new(async_nats::connect(&url).await.unwrap())
        .delete_key_value(format!("{prefix}_revocations"))
        .await;
}
