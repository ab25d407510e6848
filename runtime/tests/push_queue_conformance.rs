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
