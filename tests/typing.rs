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
    // bob listens before the chat exists, so the chat's creation is the first event he sees
    // (opened after it, the stream could start either side of it).
    let mut events = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let created = next_non_presence(&mut events).await;
    assert_eq!(created.event, "chat.updated", "{created:?}");
    assert_eq!(created.data["data"]["id"], chat.as_str());
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

/// `GET /v1/asyncapi.json` describes every event a client can receive: the ones this flow makes
/// (logged and ephemeral) are all in it, with their payload schemas.
#[tokio::test]
async fn the_asyncapi_document_describes_every_event_received() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let mut events = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let signal: Value = app
        .post(
            &bob,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "a"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let id = signal["id"].as_str().unwrap();
    let base = format!("/v1/chats/{chat}/signals/{id}");
    let calls = [
        ("PATCH", base.clone(), json!({"text": "b"}), &bob),
        (
            "PUT",
            format!("{base}/reactions/%F0%9F%91%8D"),
            Value::Null,
            &alice,
        ),
        (
            "DELETE",
            format!("{base}/reactions/%F0%9F%91%8D"),
            Value::Null,
            &alice,
        ),
        (
            "POST",
            format!("/v1/chats/{chat}/read"),
            json!({"up_to": id}),
            &alice,
        ),
        (
            "POST",
            format!("/v1/chats/{chat}/delivered"),
            json!({"up_to": id}),
            &alice,
        ),
        ("POST", format!("/v1/chats/{chat}/typing"), json!({}), &bob),
        (
            "PATCH",
            format!("/v1/chats/{chat}"),
            json!({"name": "renamed"}),
            &alice,
        ),
        (
            "POST",
            format!("/v1/chats/{chat}/members"),
            json!({"user_id": carol_id}),
            &alice,
        ),
        (
            "PATCH",
            format!("/v1/chats/{chat}/members/{carol_id}"),
            json!({"role": "admin"}),
            &alice,
        ),
        (
            "DELETE",
            format!("/v1/chats/{chat}/members/{carol_id}"),
            Value::Null,
            &alice,
        ),
        ("DELETE", base.clone(), Value::Null, &bob),
    ];
    for (method, path, body, token) in calls {
        let mut request = app
            .http
            .request(method.parse().unwrap(), app.url(&path))
            .bearer_auth(token);
        if !body.is_null() {
            request = request.json(&body);
        }
        let status = request.send().await.unwrap().status();
        assert!(status.is_success(), "{method} {path}: {status}");
    }
    drop(bobs);
    let document: Value = app
        .http
        .get(app.url("/v1/asyncapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(document["asyncapi"], "3.0.0");
    let described: Vec<String> = document["channels"]["events"]["messages"]
        .as_object()
        .unwrap()
        .keys()
        .map(|name| {
            document["components"]["messages"][name]["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut received = std::collections::BTreeSet::new();
    loop {
        let event = events.next_event().await;
        received.insert(event.event.clone());
        if event.event == "signal.deleted" {
            break;
        }
    }
    // bob's disconnect, possibly summed up as a presence update after the rate limit.
    let mut gone = events.next_event().await;
    while !gone.event.starts_with("user.") && !gone.event.starts_with("presence.") {
        gone = events.next_event().await;
    }
    received.insert(gone.event);
    assert!(received.len() >= 14, "{received:?}");
    for event_type in &received {
        assert!(
            described.contains(event_type),
            "{event_type} is not in the AsyncAPI document"
        );
    }
    app.stop().await;
}

/// A typing call whose publish failed does not count for the throttle: the client's retry, within
/// the throttle's interval, publishes (it used to answer 204 and publish nothing).
async fn a_typing_whose_publish_failed_is_published_by_its_retry(stack: Stack) {
    use confab_schema::Event;
    use confab_schema::event::EventKind;
    use futures::StreamExt;
    use support::held_store::HeldApi;
    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&api.state, &alice, "typing", &[bob.id]).await;
    let mut ephemeral = confab_runtime::bus::Bus::subscribe_ephemeral(&*api.bus)
        .await
        .unwrap();
    api.bus.fail_next(EventKind::Typing);
    let failed = api.state.typing(alice.id, chat).await;
    assert!(failed.is_err(), "the publish failed: {failed:?}");
    api.state
        .typing(alice.id, chat)
        .await
        .expect("the retry publishes");
    let event = tokio::time::timeout(support::DEADLINE, ephemeral.next())
        .await
        .expect("a typing event before the deadline")
        .expect("the subscription goes on");
    assert!(
        matches!(&event.event, Event::Typing(typing) if typing.user_id == alice.id),
        "{event:?}"
    );
    api.clean_up().await;
}
support::on_both_stacks!(a_typing_whose_publish_failed_is_published_by_its_retry);
