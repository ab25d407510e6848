//! Presence: derived from live connections, announced to the users who share a chat, with a
//! custom status, and hidden from everyone else. On the embedded default and on the real stack.

mod support;

use serde_json::{Value, json};
use support::{SseEvent, SseStream, Stack, TestApp, spawn_app};

async fn presence_of(app: &TestApp, token: &str, user: &str) -> reqwest::Response {
    app.get(token, &format!("/v1/users/{user}/presence")).await
}

/// The next presence event about `user` (`user.connected`, `user.disconnected` or
/// `presence.updated`), skipping everything else.
async fn next_presence(stream: &mut SseStream, user: &str) -> SseEvent {
    loop {
        let event = stream.next_event().await;
        if matches!(
            event.event.as_str(),
            "user.connected" | "user.disconnected" | "presence.updated"
        ) && event.data["data"]["user_id"] == user
        {
            return event;
        }
    }
}

async fn presence_follows_connections(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    app.group_chat(&alice, &[&bob_id]).await;

    let offline: Value = presence_of(&app, &alice, &bob_id)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(offline["state"], "offline", "{offline}");

    let mut alices = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let connected = next_presence(&mut alices, &bob_id).await;
    assert_eq!(connected.event, "user.connected");
    assert_eq!(connected.data["data"]["state"], "online");
    assert!(connected.id.is_none(), "presence events are ephemeral");
    let online: Value = presence_of(&app, &alice, &bob_id)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(online["state"], "online");

    // A custom status: away, with a text.
    let set = app
        .http
        .put(app.url("/v1/me/status"))
        .bearer_auth(&bob)
        .json(&json!({"text": "at lunch", "away": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let set: Value = set.json().await.unwrap();
    assert_eq!(set["state"], "away");
    let updated = next_presence(&mut alices, &bob_id).await;
    assert_eq!(updated.event, "presence.updated");
    assert_eq!(updated.data["data"]["state"], "away");
    assert_eq!(updated.data["data"]["status_text"], "at lunch");

    // Bad statuses are 422 problems; nobody outside bob's chats sees his presence.
    for bad in [
        json!({"text": ""}),
        json!({"text": "x".repeat(101)}),
        json!({"away": true, "expires_at": "2001-01-01T00:00:00Z"}),
        json!({"mood": "fine"}),
    ] {
        let response = app
            .http
            .put(app.url("/v1/me/status"))
            .bearer_auth(&bob)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{bad}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(presence_of(&app, &carol, &bob_id).await.status(), 404);
    assert_eq!(
        presence_of(&app, &alice, "not-a-user-id").await.status(),
        400
    );

    // bob's last connection closes: offline, with a last-seen time.
    drop(bobs);
    let after = told_offline(&app, &mut alices, &alice, &bob_id).await;
    assert!(after["last_seen_at"].is_string(), "{after}");
    app.stop().await;
}

/// A status cleared right after it was set (within the interval that holds status events
/// back) is still announced cleared, once that interval is over: otherwise peers would go on
/// seeing it. A status that ends by itself says when.
#[tokio::test]
async fn a_status_cleared_at_once_is_announced_cleared() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    app.group_chat(&alice, &[&bob_id]).await;
    let mut alices = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let _bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    assert_eq!(
        next_presence(&mut alices, &bob_id).await.event,
        "user.connected"
    );

    let set_status = |body: Value| {
        app.http
            .put(app.url("/v1/me/status"))
            .bearer_auth(&bob)
            .json(&body)
            .send()
    };
    let ends = "2999-01-01T00:00:00Z";
    let set = set_status(json!({"text": "in a meeting", "expires_at": ends}))
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    let told = next_presence(&mut alices, &bob_id).await;
    assert_eq!(told.data["data"]["status_text"], "in a meeting");
    assert_eq!(
        told.data["data"]["status_expires_at"], ends,
        "{:?}",
        told.data
    );
    assert_eq!(set_status(json!({})).await.unwrap().status(), 200);
    let cleared = next_presence(&mut alices, &bob_id).await;
    assert_eq!(cleared.event, "presence.updated");
    assert!(
        cleared.data["data"]["status_text"].is_null(),
        "the cleared status is still shown: {:?}",
        cleared.data
    );
    app.stop().await;
}

#[tokio::test]
async fn presence_follows_connections_on_the_embedded_default() {
    Box::pin(presence_follows_connections(Stack::Embedded)).await;
}

#[tokio::test]
async fn presence_follows_connections_on_the_real_stack() {
    if support::real_stack_available("presence_follows_connections_on_the_real_stack").await {
        Box::pin(presence_follows_connections(Stack::Real)).await;
    }
}

/// The next presence event about `user` on `stream` says they went offline, and so does their
/// presence as `reader` reads it now (answered).
async fn told_offline(app: &TestApp, stream: &mut SseStream, reader: &str, user: &str) -> Value {
    let gone = next_presence(stream, user).await;
    assert!(
        matches!(
            gone.event.as_str(),
            "user.disconnected" | "presence.updated"
        ),
        "{gone:?}"
    );
    assert_eq!(gone.data["data"]["state"], "offline", "{gone:?}");
    let read: Value = presence_of(app, reader, user).await.json().await.unwrap();
    assert_eq!(read["state"], "offline", "{read}");
    read
}

/// A logout ends the user's streams from the server's side; the members of their chats are told
/// they went offline, and their presence reads offline, as when they close the streams themselves.
async fn a_logout_takes_the_user_offline(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    app.group_chat(&alice, &[&bob_id]).await;

    let mut alices = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let mut bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let connected = next_presence(&mut alices, &bob_id).await;
    assert_eq!(connected.event, "user.connected");

    let response = app.post(&bob, "/v1/me/logout-all", &json!({})).await;
    assert_eq!(response.status(), 204);
    bobs.ends().await;
    let after = told_offline(&app, &mut alices, &alice, &bob_id).await;
    assert!(after["last_seen_at"].is_string(), "{after}");
    app.stop().await;
}

#[tokio::test]
async fn a_logout_takes_the_user_offline_on_the_embedded_default() {
    Box::pin(a_logout_takes_the_user_offline(Stack::Embedded)).await;
}

#[tokio::test]
async fn a_logout_takes_the_user_offline_on_the_real_stack() {
    if support::real_stack_available("a_logout_takes_the_user_offline_on_the_real_stack").await {
        Box::pin(a_logout_takes_the_user_offline(Stack::Real)).await;
    }
}

/// A request to `/v1/ws` that cannot become a socket opens no stream, so it does not bring its user
/// online, not even for a moment. On worker threads, as a deployment runs: there, the two
/// announcements of a stream that opened and closed at once landed in either order, and could leave
/// its user online with no connection (so that their next real connection announced nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_request_without_an_upgrade_leaves_presence_alone() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    app.group_chat(&alice, &[&bob_id]).await;

    for _ in 0..5 {
        let response = app.get(&bob, "/v1/ws").await;
        assert_eq!(response.status(), 400);
        let problem = response.text().await.unwrap();
        assert!(problem.contains("not-a-websocket"), "{problem}");
    }
    let presence: Value = presence_of(&app, &alice, &bob_id)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(presence["state"], "offline", "{presence}");
    // bob's presence never changed, so his first stream is announced as such: `user.connected`,
    // not a `presence.updated` summing up changes made within the last two seconds.
    let mut alices = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let _bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let connected = next_presence(&mut alices, &bob_id).await;
    assert_eq!(connected.event, "user.connected", "{connected:?}");
    assert_eq!(connected.data["data"]["state"], "online", "{connected:?}");
    app.stop().await;
}
