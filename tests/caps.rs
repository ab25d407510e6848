//! Stream caps: per user and per node, answered with a problem before any stream opens; closing a
//! stream frees its place.

mod support;

use serde_json::Value;
use support::{SseStream, Stack};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn streams_are_capped_per_user_and_per_node() {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Embedded, data.path().to_path_buf());
    config.notifier.max_connections_per_user = 2;
    config.notifier.max_connections = 3;
    let app = support::spawn_with(Stack::Embedded, config, data).await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let dave = app.token("dave").await;
    let open = |token: &str| app.http.get(app.url("/v1/events")).bearer_auth(token);

    let first = SseStream::open(open(&bob)).await;
    let _second = SseStream::open(open(&bob)).await;
    let refused = open(&bob).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = refused.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("too-many-connections")
    );
    // The same cap over WebSocket, refused before the upgrade.
    let mut request = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 429);
        }
        other => panic!("the upgrade should be refused: {:?}", other.map(|_| ())),
    }

    // The node holds three streams at most.
    let _third = SseStream::open(open(&carol)).await;
    let full = open(&dave).send().await.unwrap();
    assert_eq!(full.status(), 503);
    let problem: Value = full.json().await.unwrap();
    assert!(problem["type"].as_str().unwrap().ends_with("node-full"));

    // Closing one frees its place (the server notices the closed stream on its next write).
    drop(first);
    let deadline = tokio::time::Instant::now() + support::DEADLINE;
    loop {
        let response = open(&dave).send().await.unwrap();
        if response.status() == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed stream's place was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    app.stop().await;
}
