//! The bus conformance suite against the embedded log and against the JetStream log on the NATS
//! server that `infra/up.sh` started (a fresh subject prefix, and so a fresh stream, per case).

mod support;

use std::sync::Arc;
use std::time::Duration;

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

/// A JetStream subscription that has delivered nothing yet, whose consumer the server loses (a
/// NATS restart, or the consumer deleted), comes back without the events logged before it began:
/// the client recreates an ordered consumer that has delivered nothing from the stream's start,
/// and a quiet node would have handed its clients every kept event again as new.
#[tokio::test]
async fn a_recreated_subscription_delivers_only_what_came_after_it() {
    use confab_runtime::bus::conformance::message;
    use confab_schema::ChatId;
    use futures::StreamExt;
    let Some(url) = support::nats_url("bus").await else {
        return;
    };
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let bus = NatsBus::connect(&url, &prefix, LogSettings::default())
        .await
        .expect("connects");
    Bus::check(&bus).await.expect("NATS connection came up");
    let chat = ChatId(uuid::Uuid::new_v4());
    for text in ["old 1", "old 2", "old 3"] {
        bus.publish(&message(chat, text)).await.expect("publishes");
    }
    let mut events = bus.subscribe().await.expect("subscribes");
    let client = async_nats::connect(&url).await.expect("connects");
    let jetstream = async_nats::jetstream::new(client);
    let stream = jetstream
        .get_stream(NatsBus::stream_name(&prefix))
        .await
        .expect("the stream");
    let consumers: Vec<String> = stream
        .consumer_names()
        .map(|name| name.expect("a consumer name"))
        .collect()
        .await;
    assert!(!consumers.is_empty(), "the subscription has a consumer");
    for name in consumers {
        stream.delete_consumer(&name).await.expect("deletes");
    }
    let live = bus
        .publish(&message(chat, "live"))
        .await
        .expect("publishes");
    let first = tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an event after the consumer came back")
        .expect("the subscription goes on");
    assert_eq!(
        first.seq, live,
        "the first event delivered: {:?}",
        first.envelope.event
    );
    jetstream
        .delete_stream(NatsBus::stream_name(&prefix))
        .await
        .ok();
}
