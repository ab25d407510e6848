//! The push queue conformance suite against the embedded queue (one file opened twice) and against
//! the JetStream queue on the NATS server that `infra/up.sh` started (a fresh prefix per case,
//! two connections).

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
    let url =
        std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = url.trim_start_matches("nats://").to_owned();
    if tokio::net::TcpStream::connect(&address).await.is_err() {
        let required = std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "NATS is not reachable at {address}; infra/up.sh starts it"
        );
        eprintln!(
            "SKIPPED a NATS push queue case: NATS is not reachable at {address}; run infra/up.sh"
        );
        return None;
    }
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
