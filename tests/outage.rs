//! Failure of a dependency: when NATS or the CQL store goes away, posts answer 503 (problem+json),
//! nothing is half-written, and `/ready` names the dependency that is down. The services are reached
//! through a TCP relay the test cuts, so the shared services stay up for other tests.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{DEADLINE, Relay, Stack, spawn_with};

async fn wait_until_not_ready(app: &support::TestApp, dependency: &str) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let response = app.http.get(app.url("/ready")).send().await.unwrap();
        if response.status() == 503 {
            let body: Value = response.json().await.unwrap();
            if body["checks"][dependency]["status"] == "down" {
                return body;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{dependency} never reported down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn nats_down_means_503_and_not_ready() {
    if !support::real_stack_available("nats_down_means_503_and_not_ready").await {
        return;
    }
    let relay = Relay::start(support::nats_url().trim_start_matches("nats://").to_owned()).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Real, data.path().to_path_buf());
    config.bus.nats_url = format!("nats://{}", relay.addr);
    let app = spawn_with(Stack::Real, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let path = format!("/v1/chats/{chat}/signals");
    assert_eq!(
        app.post(&alice, &path, &json!({"kind": "message", "text": "before"}))
            .await
            .status(),
        201
    );

    relay.cut();
    let ready = wait_until_not_ready(&app, "bus").await;
    assert_eq!(ready["checks"]["store"]["status"], "up", "{ready}");
    let refused = app
        .post(&alice, &path, &json!({"kind": "message", "text": "during"}))
        .await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    // Refused before storing: history has only the first message.
    let history: Value = app.get(&bob, &path).await.json().await.unwrap();
    let texts: Vec<&str> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["before"]);
    app.stop().await;
}

#[tokio::test]
async fn store_down_means_503_and_not_ready() {
    if !support::real_stack_available("store_down_means_503_and_not_ready").await {
        return;
    }
    let relay = Relay::start(support::cql_contact_points()).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Real, data.path().to_path_buf());
    config.store.cql_contact_points = relay.addr.to_string();
    config.store.request_timeout_ms = 2_000;
    let app = spawn_with(Stack::Real, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let path = format!("/v1/chats/{chat}/signals");

    relay.cut();
    let ready = wait_until_not_ready(&app, "store").await;
    assert_eq!(ready["checks"]["bus"]["status"], "up", "{ready}");
    let refused = app
        .post(&alice, &path, &json!({"kind": "message", "text": "during"}))
        .await;
    assert_eq!(refused.status(), 503);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let read = app.get(&bob, &path).await;
    assert_eq!(read.status(), 503);
    app.stop().await;
}
