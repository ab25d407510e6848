//! The walking skeleton's flow, in-process (`spawn_app`), on the embedded default and on the real
//! stack: a message from alice reaches bob over SSE (bearer and ticket) and WebSocket, and his
//! history.

mod support;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{DEADLINE, SseStream, Stack, spawn_app};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_ws(base: &str, token: Option<&str>, ticket: Option<&str>) -> Ws {
    let mut url = format!("{}/v1/ws", base.replacen("http://", "ws://", 1));
    if let Some(ticket) = ticket {
        url = format!("{url}?ticket={ticket}");
    }
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("WebSocket upgrade");
    let ready = next_ws_json(&mut ws).await;
    assert_eq!(ready["type"], "ready");
    ws
}

/// The next `event` frame of type `name`, skipping other events.
async fn next_ws_event(ws: &mut Ws, name: &str) -> Value {
    loop {
        let frame = next_ws_json(ws).await;
        if frame["type"] != "event" || frame["event"] == name {
            return frame;
        }
    }
}

async fn next_ws_json(ws: &mut Ws) -> Value {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                tokio_tungstenite::tungstenite::Message::Text(text) => {
                    return serde_json::from_str::<Value>(&text).unwrap();
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a frame before the deadline")
}

async fn message_reaches_bob(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;

    // 2. The caller, provisioned from the token's claims.
    let me = app.get(&alice, "/v1/me").await;
    assert_eq!(me.status(), 200);
    let me: Value = me.json().await.unwrap();
    assert_eq!(me["username"], "alice");
    assert!(
        me["display_name"]
            .as_str()
            .is_some_and(|n| n.starts_with("Alice")),
        "{me}"
    );
    assert!(
        me["email"]
            .as_str()
            .is_some_and(|e| e.starts_with("alice@")),
        "{me}"
    );
    assert!(me["id"].as_str().unwrap().parse::<uuid::Uuid>().is_ok());
    let bob_id = app.me(&bob).await;

    // 3. A group chat with bob.
    let chat = app.group_chat(&alice, &[&bob_id]).await;

    // 4. bob listens: SSE with his bearer token, SSE with a ticket, and a WebSocket.
    let mut sse = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let ticket: Value = app
        .http
        .post(app.url("/v1/events/ticket"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = ticket["ticket"].as_str().unwrap().to_owned();
    let mut sse_by_ticket = SseStream::open(
        app.http
            .get(app.url(&format!("/v1/events?ticket={ticket}"))),
    )
    .await;
    let mut ws = open_ws(&app.base, Some(&bob), None).await;
    let mut ws_by_ticket = open_ws(&app.base, None, Some(&ticket)).await;

    // 5. alice sends.
    let sent = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "nonce": "n-1", "text": "hi"}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let sent: Value = sent.json().await.unwrap();
    assert_eq!(sent["text"], "hi");
    assert_eq!(sent["nonce"], "n-1");
    assert_eq!(sent["kind"], "message");
    assert_eq!(sent["chat_id"], chat.as_str());
    assert_eq!(sent["author_id"], me["id"]);
    let id: uuid::Uuid = sent["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.get_version_num(), 7, "signal ids are time-ordered");
    let created_at = time::OffsetDateTime::parse(
        sent["created_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!((time::OffsetDateTime::now_utc() - created_at).abs() < time::Duration::minutes(1));

    // The same nonce again: the same signal, nothing new stored or delivered.
    let again = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "nonce": "n-1", "text": "hi"}),
        )
        .await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().await.unwrap(), sent);

    // 6. Delivered on every stream, as `signal.created` with an id.
    for stream in [&mut sse, &mut sse_by_ticket] {
        let event = stream.next_of("signal.created").await;
        assert_eq!(event.event, "signal.created");
        assert!(event.id.as_deref().is_some_and(|id| !id.is_empty()));
        assert_eq!(event.data["type"], "signal.created");
        assert_eq!(event.data["data"], sent);
    }
    for socket in [&mut ws, &mut ws_by_ticket] {
        let frame = next_ws_event(socket, "signal.created").await;
        assert_eq!(frame["type"], "event");
        assert_eq!(frame["event"], "signal.created");
        assert_eq!(frame["data"], sent);
    }

    // The retry was not delivered: the next event is the next message.
    let second = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "nonce": "n-2", "text": "second"}),
        )
        .await;
    assert_eq!(second.status(), 201);
    assert_eq!(
        sse.next_of("signal.created").await.data["data"]["text"],
        "second"
    );
    assert_eq!(
        next_ws_event(&mut ws, "signal.created").await["data"]["text"],
        "second"
    );

    // 7. bob's history: newest first, the retry stored nothing.
    let history = app
        .get(&bob, &format!("/v1/chats/{chat}/signals?limit=50"))
        .await;
    assert_eq!(history.status(), 200);
    let history: Value = history.json().await.unwrap();
    let items = history["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(items[0]["text"], "second");
    assert_eq!(items[1], sent);
    assert_eq!(history["next_cursor"], Value::Null);

    // A WebSocket frame the socket cannot serve gets a problem frame, not a dropped connection.
    futures::SinkExt::send(
        &mut ws,
        tokio_tungstenite::tungstenite::Message::Text("{\"call\":1}".into()),
    )
    .await
    .unwrap();
    let error = next_ws_json(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["problem"]["status"], 400);

    app.stop().await;
}

#[tokio::test]
async fn message_reaches_bob_on_the_embedded_default() {
    Box::pin(message_reaches_bob(Stack::Embedded)).await;
}

#[tokio::test]
async fn message_reaches_bob_on_the_real_stack() {
    if !support::real_stack_available("message_reaches_bob_on_the_real_stack").await {
        return;
    }
    Box::pin(message_reaches_bob(Stack::Real)).await;
}

#[tokio::test]
async fn events_reach_only_members() {
    let app = spawn_app(Stack::Embedded).await;
    let (alice, bob, carol) = (
        app.token("alice").await,
        app.token("bob").await,
        app.token("carol").await,
    );
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let mut carols = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&carol)).await;
    let mut bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let private = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "just us"}),
        )
        .await;
    assert_eq!(private.status(), 201);
    assert_eq!(
        bobs.next_of("signal.created").await.data["data"]["text"],
        "just us"
    );

    // carol's first event is from a chat she is in, not the private one.
    let carol_id = app.me(&carol).await;
    let hers = app.group_chat(&alice, &[&carol_id]).await;
    let visible = app
        .post(
            &alice,
            &format!("/v1/chats/{hers}/signals"),
            &json!({"kind": "message", "text": "for carol"}),
        )
        .await;
    assert_eq!(visible.status(), 201);
    // (The first event she gets is the new chat itself.)
    let event = carols.next_of("signal.created").await;
    assert_eq!(event.data["data"]["text"], "for carol");
    app.stop().await;
}
