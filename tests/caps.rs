//! Stream caps. Per user: a stream beyond the cap takes the place of the user's oldest on the node,
//! which ends telling its client why (`closed` with reason `replaced` over SSE, close code 4009
//! over WebSocket), so connections that died unnoticed never lock their user out. Per node: a new
//! stream is refused with a problem before it opens; closing a stream frees its place. On the
//! embedded default and on the real stack.

mod support;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{DEADLINE, SseStream, Stack, TestApp};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A socket of `token`'s user, once its `ready` frame came.
async fn socket(app: &TestApp, token: &str) -> Ws {
    let mut request = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "confab.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "ready");
    ws
}

/// The next text frame, or `{"type": "closed", "code", "reason"}` for the close frame.
async fn next_frame(ws: &mut Ws) -> Value {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return serde_json::from_str::<Value>(&text).unwrap(),
                Message::Close(frame) => {
                    return json!({
                        "type": "closed",
                        "code": frame.as_ref().map(|f| u16::from(f.code)),
                        "reason": frame.map(|f| f.reason.to_string()),
                    });
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a frame before the deadline")
}

/// The text of the next message the socket carries (other events skipped).
async fn next_message_on_socket(ws: &mut Ws) -> String {
    loop {
        let frame = next_frame(ws).await;
        assert_ne!(frame["type"], "closed", "the socket closed: {frame}");
        if frame["type"] == "event" && frame["event"] == "signal.created" {
            return frame["data"]["text"].as_str().unwrap().to_owned();
        }
    }
}

/// The text of the next message the SSE stream carries (other events skipped).
async fn next_message(stream: &mut SseStream) -> String {
    stream.next_of("signal.created").await.data["data"]["text"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The stream was replaced: its last event says so, and then it ends.
async fn replaced(stream: &mut SseStream) {
    let closed = stream.next_of("closed").await;
    assert_eq!(
        closed.data,
        json!({"type": "closed", "data": {"reason": "replaced"}})
    );
    assert_eq!(
        closed.id, None,
        "a closing event is no position to resume from"
    );
    stream.ends().await;
}

/// The socket was replaced: it closes with code 4009, reason `replaced`.
async fn socket_replaced(ws: &mut Ws) {
    loop {
        let frame = next_frame(ws).await;
        if frame["type"] == "closed" {
            assert_eq!(frame["code"], 4009, "{frame}");
            assert_eq!(frame["reason"], "replaced", "{frame}");
            return;
        }
    }
}

async fn streams_are_capped_per_user_and_per_node(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.notifier.max_connections_per_user = 2;
    config.notifier.max_connections = 4;
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let dave = app.token("dave").await;
    let chat = app.group_chat(&carol, &[&app.me(&bob).await]).await;
    let open = |token: &str| app.http.get(app.url("/v1/events")).bearer_auth(token);
    let say = |text: &'static str| {
        let (app, carol, chat) = (&app, &carol, &chat);
        async move {
            let response = app
                .post(
                    carol,
                    &format!("/v1/chats/{chat}/signals"),
                    &json!({"kind": "message", "text": text}),
                )
                .await;
            assert_eq!(response.status(), 201, "{text} sent");
        }
    };

    let mut first = SseStream::open(open(&bob)).await;
    let mut second = SseStream::open(open(&bob)).await;
    let mut carols = SseStream::open(open(&carol)).await;
    // Bob's third stream opens, in the place of his first.
    let mut third = SseStream::open(open(&bob)).await;
    replaced(&mut first).await;
    say("one").await;
    for stream in [&mut second, &mut third, &mut carols] {
        assert_eq!(next_message(stream).await, "one");
    }

    // A socket takes a place as a stream does: here the oldest, an SSE stream's.
    let mut socket_one = socket(&app, &bob).await;
    replaced(&mut second).await;
    say("two").await;
    assert_eq!(next_message_on_socket(&mut socket_one).await, "two");
    assert_eq!(next_message(&mut third).await, "two");
    assert_eq!(next_message(&mut carols).await, "two");
    // And a socket is replaced like a stream: it closes saying why.
    let mut socket_two = socket(&app, &bob).await;
    replaced(&mut third).await;
    let mut socket_three = socket(&app, &bob).await;
    socket_replaced(&mut socket_one).await;
    say("three").await;
    assert_eq!(next_message_on_socket(&mut socket_two).await, "three");
    assert_eq!(next_message_on_socket(&mut socket_three).await, "three");
    assert_eq!(next_message(&mut carols).await, "three");

    // The node holds four streams at most: bob's two, carol's, alice's.
    let alices = SseStream::open(open(&alice)).await;
    let full = open(&dave).send().await.unwrap();
    assert_eq!(full.status(), 503);
    assert_eq!(full.headers()["content-type"], "application/problem+json");
    let problem: Value = full.json().await.unwrap();
    assert!(problem["type"].as_str().unwrap().ends_with("node-full"));
    // The same cap over WebSocket, refused before the upgrade.
    let mut request = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {dave}").parse().unwrap());
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503);
        }
        other => panic!("the upgrade should be refused: {:?}", other.map(|_| ())),
    }
    // A stream of a user at their own cap takes a place already counted: it opens on a full node.
    let mut fourth = SseStream::open(open(&bob)).await;
    socket_replaced(&mut socket_two).await;
    say("four").await;
    assert_eq!(next_message(&mut fourth).await, "four");
    assert_eq!(next_message_on_socket(&mut socket_three).await, "four");

    // Closing one frees its place (the server notices the closed stream on its next write).
    drop(alices);
    let deadline = tokio::time::Instant::now() + DEADLINE;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_user_and_per_node_on_the_embedded_default() {
    Box::pin(streams_are_capped_per_user_and_per_node(Stack::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_user_and_per_node_on_the_real_stack() {
    if !support::real_stack_available("streams_are_capped_per_user_and_per_node_on_the_real_stack")
        .await
    {
        return;
    }
    Box::pin(streams_are_capped_per_user_and_per_node(Stack::Real)).await;
}
