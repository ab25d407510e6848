//! The bus conformance suite against the embedded log and against the JetStream log on the NATS
//! server that `infra/up.sh` started (a fresh subject prefix, and so a fresh stream, per case).

use std::sync::Arc;

use confab_runtime::bus::conformance::Fixture;
use confab_runtime::bus::{Bus, EmbeddedBus, LogSettings, NatsBus};
use confab_runtime::bus_conformance_tests;

async fn embedded(settings: LogSettings) -> Option<Fixture> {
    // The files outlive the case; the OS cleans its temp directory.
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let bus = EmbeddedBus::open(&dir.join("one.sqlite3"), settings).expect("opens");
    let isolated = EmbeddedBus::open(&dir.join("two.sqlite3"), settings).expect("opens");
    Some(Fixture {
        bus: Arc::new(bus),
        isolated: Arc::new(isolated),
    })
}

async fn nats(settings: LogSettings) -> Option<Fixture> {
    let url =
        std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = url.trim_start_matches("nats://").to_owned();
    if tokio::net::TcpStream::connect(&address).await.is_err() {
        let required = std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "NATS is not reachable at {address}; infra/up.sh starts it"
        );
        eprintln!("SKIPPED a NATS bus case: NATS is not reachable at {address}; run infra/up.sh");
        return None;
    }
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bus = NatsBus::connect(&url, &prefix, settings)
        .await
        .expect("connects");
    let isolated = NatsBus::connect(&url, &format!("{prefix}x"), settings)
        .await
        .expect("connects");
    // retry_on_initial_connect returns before the connection is up; wait for it.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while Bus::check(&bus).await.is_err() || Bus::check(&isolated).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "NATS connection never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Some(Fixture {
        bus: Arc::new(bus),
        isolated: Arc::new(isolated),
    })
}

bus_conformance_tests!(embedded_log, super::embedded);
bus_conformance_tests!(jetstream_log, super::nats);
