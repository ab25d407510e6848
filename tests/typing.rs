//! Typing indicators: delivered live to the chat's members, throttled, never stored nor replayed,
//! and refused to non-members. On the embedded default and on the real stack.

mod support;

use serde_json::{Value, json};
use support::{SseEvent, SseStream, Stack, spawn_app};

/// The next event that is not about presence (connections come and go during the test).
async fn next_non_presence(stream: &mut SseStream) -> SseEvent {
    loop {
        let event = stream.next_event().await;
        if !event.event.starts_with("user.") && !event.event.starts_with("presence.") {
            return event;
        }
    }
}

async fn typing_is_live_only(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let mut events = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let path = format!("/v1/chats/{chat}/typing");

    let first = app.post(&alice, &path, &json!({})).await;
    assert_eq!(first.status(), 204);
    let typing = next_non_presence(&mut events).await;
    assert_eq!(typing.event, "typing");
    assert_eq!(typing.data["data"]["user_id"], alice_id.as_str());
    assert!(typing.data["data"]["expires_in_ms"].as_u64().unwrap() > 0);
    assert!(typing.id.is_none(), "an ephemeral event has no id");

    // Within the throttle: accepted, not published again. The next event is the message.
    assert_eq!(app.post(&alice, &path, &json!({})).await.status(), 204);
    let sent = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "typed"}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let next = next_non_presence(&mut events).await;
    assert_eq!(next.event, "signal.created", "{next:?}");
    let last_id = next.id.clone().unwrap();

    // Not a member: refused as any chat operation is; bad bodies are 4xx.
    let refused = app.post(&carol, &path, &json!({})).await;
    assert_eq!(refused.status(), 403);
    let bad = app.post(&alice, &path, &json!({"typing": "yes"})).await;
    assert_eq!(bad.status(), 422);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");

    // Never replayed: resuming from before the typing event gives the message only.
    let history: Value = app
        .get(&bob, &format!("/v1/chats/{chat}/signals"))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        history["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["kind"] != "typing"),
        "typing is not history"
    );
    drop(events);
    let before: u64 = last_id.parse::<u64>().unwrap() - 1;
    let mut resumed = SseStream::open(
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(&bob)
            .header("Last-Event-ID", before.to_string()),
    )
    .await;
    let replayed = next_non_presence(&mut resumed).await;
    assert_eq!(replayed.event, "signal.created");
    assert_eq!(replayed.id.as_deref(), Some(last_id.as_str()));
    app.stop().await;
}

#[tokio::test]
async fn typing_is_live_only_on_the_embedded_default() {
    Box::pin(typing_is_live_only(Stack::Embedded)).await;
}

#[tokio::test]
async fn typing_is_live_only_on_the_real_stack() {
    if support::real_stack_available("typing_is_live_only_on_the_real_stack").await {
        Box::pin(typing_is_live_only(Stack::Real)).await;
    }
}
