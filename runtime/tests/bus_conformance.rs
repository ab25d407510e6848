//! The bus conformance suite against the embedded bus and against the NATS server that
//! `infra/up.sh` started (two subject prefixes on one server).

use confab_runtime::bus::conformance::test_suite;
use confab_runtime::bus::{Bus, EmbeddedBus, NatsBus};

#[tokio::test]
async fn embedded_bus_conforms() {
    test_suite(&EmbeddedBus::new(1024), &EmbeddedBus::new(1024)).await;
}

#[tokio::test]
async fn nats_bus_conforms() {
    let url =
        std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let address = url.trim_start_matches("nats://").to_owned();
    if tokio::net::TcpStream::connect(&address).await.is_err() {
        let required = std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "NATS is not reachable at {address}; infra/up.sh starts it"
        );
        eprintln!("SKIPPED nats_bus_conforms: NATS is not reachable at {address}; run infra/up.sh");
        return;
    }
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bus = NatsBus::connect(&url, &prefix).await.expect("connects");
    let isolated = NatsBus::connect(&url, &format!("{prefix}x"))
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
    test_suite(&bus, &isolated).await;
}
