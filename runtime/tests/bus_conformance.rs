//! The bus conformance suite against the embedded log and against the JetStream log on the NATS
//! server that `infra/up.sh` started (a fresh subject prefix, and so a fresh stream, per case).

mod support;

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
    let url = support::nats_url("bus").await?;
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bus = NatsBus::connect(&url, &prefix, settings)
        .await
        .expect("connects");
    let isolated = NatsBus::connect(&url, &format!("{prefix}x"), settings)
        .await
        .expect("connects");
    // A check waits for the connection under way (see the case below).
    for bus in [&bus, &isolated] {
        Bus::check(bus).await.expect("NATS connection came up");
    }
    Some(Fixture {
        bus: Arc::new(bus),
        isolated: Arc::new(isolated),
    })
}

bus_conformance_tests!(embedded_log, super::embedded);
bus_conformance_tests!(jetstream_log, super::nats);

/// A check made as soon as the bus is made, while its connection is still under way, waits for it
/// instead of answering that the bus is down (a process's first requests, or a test's, would be
/// refused for nothing).
#[tokio::test]
async fn a_check_right_after_connecting_waits_for_the_connection() {
    let Some(url) = support::nats_url("bus").await else {
        return;
    };
    for _ in 0..5 {
        let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
        let bus = NatsBus::connect(&url, &prefix, LogSettings::default())
            .await
            .expect("connects");
        let checked = Bus::check(&bus).await;
        assert!(checked.is_ok(), "{checked:?}");
    }
}
