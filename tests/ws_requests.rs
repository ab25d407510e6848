//! The ws-plexer carries the API: request frames are answered exactly as the HTTP API answers the
//! same call (status, body, authorization), tokens are refreshed over the socket, and bad frames get
//! a clear error while the socket stays up. On the embedded default and on the real stack. A
//! separate `confab ws-plexer`, calling its API over HTTP, answers as `confab serve` does in
//! process: no body over the relay limit, and redirects passed on, not followed.

mod support;

use confab::Role;
use confab_ws_plexer::api::MAX_RESPONSE_BYTES;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{DEADLINE, Stack, TestApp, spawn_app};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, token: Option<&str>, query: &str) -> Ws {
    connect_to(&app.base, token, query).await
}

/// A socket of the server at `base` (confab serve, or a ws-plexer of its own).
async fn connect_to(base: &str, token: Option<&str>, query: &str) -> Ws {
    let url = format!("{}/v1/ws{query}", base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    if let Some(token) = token {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "confab.v1".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "confab.v1",
        "the server speaks the versioned subprotocol"
    );
    assert_eq!(next(&mut ws).await["type"], "ready");
    ws
}

async fn next(ws: &mut Ws) -> Value {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return serde_json::from_str::<Value>(&text).unwrap(),
                Message::Close(frame) => {
                    return json!({"type": "closed", "code": frame.as_ref().map(|f| u16::from(f.code)), "reason": frame.map(|f| f.reason.to_string())});
                }
                _ => continue,
            }
        }
    })
    .await
    .expect("a frame before the deadline")
}

/// Sends `frame` and returns the response frame with `id` (events in between are skipped).
async fn call(ws: &mut Ws, frame: Value) -> Value {
    let id = frame["id"].clone();
    ws.send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    loop {
        let reply = next(ws).await;
        if reply["type"] == "response" && reply["id"] == id || reply["type"] == "error" {
            return reply;
        }
    }
}

async fn the_socket_carries_the_api(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let mut ws = connect(&app, Some(&bob), "").await;

    // A request is answered as over HTTP, and its event arrives on the same socket (before or
    // after the response).
    ws.send(Message::Text(
        json!({"type": "request", "id": "r1", "method": "POST",
               "path": format!("/v1/chats/{chat}/signals"),
               "body": {"kind": "message", "text": "over the socket", "nonce": "ws-1"}})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    let (mut sent, mut event) = (Value::Null, Value::Null);
    while sent.is_null() || event.is_null() {
        let frame = next(&mut ws).await;
        if frame["type"] == "response" {
            sent = frame;
        } else if frame["event"] == "signal.created" {
            event = frame;
        }
    }
    assert_eq!(sent["id"], "r1");
    assert_eq!(sent["status"], 201, "{sent}");
    assert_eq!(sent["body"]["text"], "over the socket");
    let signal_id = sent["body"]["id"].clone();
    assert_eq!(event["data"]["id"], signal_id);
    // A retry of the nonce: 200 with the same signal, as over HTTP.
    let again = call(
        &mut ws,
        json!({"type": "request", "id": 2, "method": "POST",
               "path": format!("/v1/chats/{chat}/signals"),
               "body": {"kind": "message", "text": "over the socket", "nonce": "ws-1"}}),
    )
    .await;
    assert_eq!(again["status"], 200);
    assert_eq!(again["id"], 2);
    assert_eq!(again["body"]["id"], signal_id);

    // Same authorization and errors as HTTP: carol, not a member, over both.
    let mut carols = connect(&app, Some(&carol), "").await;
    for (method, path, body) in [
        ("GET", format!("/v1/chats/{chat}/signals"), None),
        (
            "POST",
            format!("/v1/chats/{chat}/signals"),
            Some(json!({"kind": "message", "text": "intruder"})),
        ),
        (
            "POST",
            format!("/v1/chats/{chat}/signals"),
            Some(json!({"kind": "message", "text": ""})),
        ),
        ("GET", "/v1/chats/not-a-uuid".to_owned(), None),
        ("DELETE", "/v1/nowhere".to_owned(), None),
    ] {
        let mut http = app
            .http
            .request(method.parse().unwrap(), app.url(&path))
            .bearer_auth(&carol);
        if let Some(body) = &body {
            http = http.json(body);
        }
        let http = http.send().await.unwrap();
        let http_status = http.status().as_u16();
        let http_body: Value = http.json().await.unwrap_or(Value::Null);
        let mut frame = json!({"type": "request", "id": "same", "method": method, "path": path});
        if let Some(body) = body {
            frame["body"] = body;
        }
        let over_ws = call(&mut carols, frame).await;
        assert_eq!(over_ws["status"], http_status, "{method} {path}: {over_ws}");
        assert_eq!(
            over_ws["body"]["type"], http_body["type"],
            "{method} {path}"
        );
    }

    // Bad frames: a clear error, and the socket stays up.
    for bad in [
        "not json".to_owned(),
        json!({"type": "teleport"}).to_string(),
        json!({"type": "request", "id": {"nested": 1}, "method": "GET", "path": "/v1/me"})
            .to_string(),
    ] {
        ws.send(Message::Text(bad.clone().into())).await.unwrap();
        let reply = next(&mut ws).await;
        assert_eq!(reply["type"], "error", "{bad}: {reply}");
        assert!(
            reply["problem"]["type"]
                .as_str()
                .unwrap()
                .ends_with("bad-frame")
        );
    }
    // A request frame that cannot be read whole, but whose id can: its answer carries that id, so
    // the client's call settles.
    for (id, unreadable) in [
        (
            json!(5),
            json!({"type": "request", "id": 5, "path": "/v1/me"}),
        ),
        (
            json!("typed"),
            json!({"type": "request", "id": "typed", "method": 7, "path": "/v1/me"}),
        ),
        (
            json!(6),
            json!({"type": "request", "id": 6, "method": "GET", "path": "/v1/me", "extra": 1}),
        ),
    ] {
        ws.send(Message::Text(unreadable.to_string().into()))
            .await
            .unwrap();
        let reply = next(&mut ws).await;
        assert_eq!(reply["type"], "response", "{unreadable}: {reply}");
        assert_eq!(reply["id"], id, "{unreadable}: {reply}");
        assert_eq!(reply["status"], 400, "{unreadable}: {reply}");
        assert!(
            reply["body"]["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("bad-frame")),
            "{unreadable}: {reply}"
        );
    }
    for (method, path) in [("TRACE", "/v1/me"), ("GET", "/v1/events"), ("GET", "me")] {
        let reply = call(
            &mut ws,
            json!({"type": "request", "id": "bad", "method": method, "path": path}),
        )
        .await;
        assert_eq!(reply["status"], 400, "{method} {path}: {reply}");
    }
    let me = call(
        &mut ws,
        json!({"type": "request", "id": "me", "method": "GET", "path": "/v1/me"}),
    )
    .await;
    assert_eq!(me["status"], 200);
    assert_eq!(me["body"]["id"], bob_id.as_str());

    // A fresh token of the same user is accepted; another user's closes the socket.
    let fresh = app.token("bob").await;
    ws.send(Message::Text(
        json!({"type": "auth", "token": fresh}).to_string().into(),
    ))
    .await
    .unwrap();
    let accepted = loop {
        let frame = next(&mut ws).await;
        if frame["type"] != "event" {
            break frame;
        }
    };
    assert_eq!(accepted["type"], "auth", "{accepted}");
    assert!(accepted["expires_at"].is_string());
    ws.send(Message::Text(
        json!({"type": "auth", "token": alice}).to_string().into(),
    ))
    .await
    .unwrap();
    let closed = loop {
        let frame = next(&mut ws).await;
        if frame["type"] != "event" {
            break frame;
        }
    };
    assert_eq!(closed["type"], "closed");
    assert_eq!(closed["code"], 4003);

    // A socket opened with a ticket calls the API after an auth frame.
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
    let mut by_ticket = connect(
        &app,
        None,
        &format!("?ticket={}", ticket["ticket"].as_str().unwrap()),
    )
    .await;
    let refused = call(
        &mut by_ticket,
        json!({"type": "request", "id": 1, "method": "GET", "path": "/v1/me"}),
    )
    .await;
    assert_eq!(refused["status"], 401);
    by_ticket
        .send(Message::Text(
            json!({"type": "auth", "token": bob}).to_string().into(),
        ))
        .await
        .unwrap();
    assert_eq!(next(&mut by_ticket).await["type"], "auth");
    let allowed = call(
        &mut by_ticket,
        json!({"type": "request", "id": 2, "method": "GET", "path": "/v1/me"}),
    )
    .await;
    assert_eq!(allowed["status"], 200);

    // A frame over the limit closes the socket with a reason.
    let huge = json!({"type": "request", "id": 1, "method": "POST", "path": "/v1/me",
                      "body": {"x": "y".repeat(100_000)}})
    .to_string();
    let _ = by_ticket.send(Message::Text(huge.into())).await;
    let closed = next(&mut by_ticket).await;
    assert_eq!(closed["type"], "closed", "{closed}");
    assert_eq!(closed["code"], 1009);
    app.stop().await;
}

#[tokio::test]
async fn the_socket_carries_the_api_on_the_embedded_default() {
    Box::pin(the_socket_carries_the_api(Stack::Embedded)).await;
}

#[tokio::test]
async fn the_socket_carries_the_api_on_the_real_stack() {
    if support::real_stack_available("the_socket_carries_the_api_on_the_real_stack").await {
        Box::pin(the_socket_carries_the_api(Stack::Real)).await;
    }
}

/// Each `auth` frame costs a signature check: a socket may send a few tokens that do not verify
/// in ten minutes (each answered with an error frame, the socket kept), and is closed after that,
/// as HTTP requests with such tokens are limited per address.
#[tokio::test]
async fn a_socket_sending_tokens_that_do_not_verify_is_closed() {
    let app = spawn_app(Stack::Embedded).await;
    let bob = app.token("bob").await;
    let mut ws = connect(&app, Some(&bob), "").await;
    let refused = |i: usize| {
        Message::Text(
            json!({"type": "auth", "token": format!("forged.{i}.token")})
                .to_string()
                .into(),
        )
    };
    for i in 0..5 {
        ws.send(refused(i)).await.unwrap();
        let reply = next(&mut ws).await;
        assert_eq!(reply["type"], "error", "refusal {i}: {reply}");
    }
    // Still open, and still bob's.
    let me = call(
        &mut ws,
        json!({"type": "request", "id": "me", "method": "GET", "path": "/v1/me"}),
    )
    .await;
    assert_eq!(me["status"], 200, "{me}");
    ws.send(refused(5)).await.unwrap();
    let closed = next(&mut ws).await;
    assert_eq!(closed["type"], "closed", "{closed}");
    assert_eq!(closed["code"], 4029, "{closed}");
    app.stop().await;
}

/// Requests beyond the in-flight limit are answered 429, never dropped: every id gets exactly one
/// response.
#[tokio::test]
async fn every_request_is_answered_once_within_the_in_flight_limit() {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Embedded, data.path().to_path_buf());
    config.ws_plexer.max_in_flight = 2;
    let app = support::spawn_with(Stack::Embedded, config, data).await;
    let alice = app.token("alice").await;
    let mut ws = connect(&app, Some(&alice), "").await;
    let count = 200;
    let frames: Vec<Message> = (0..count)
        .map(|i| {
            Message::Text(
                json!({"type": "request", "id": i, "method": "GET", "path": "/v1/me"})
                    .to_string()
                    .into(),
            )
        })
        .collect();
    ws.send_all(&mut futures::stream::iter(frames.into_iter().map(Ok)))
        .await
        .unwrap();
    let mut answered = vec![0; count];
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..count {
        let reply = next(&mut ws).await;
        assert_eq!(reply["type"], "response", "{reply}");
        answered[reply["id"].as_u64().unwrap() as usize] += 1;
        *statuses
            .entry(reply["status"].as_u64().unwrap())
            .or_insert(0) += 1;
    }
    assert!(answered.iter().all(|n| *n == 1), "each id answered once");
    assert!(
        statuses.keys().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    app.stop().await;
}

/// `confab ws-plexer` in this process, on the configuration of an app (its keyspace, bus and
/// identity), sending the API calls its sockets carry to that app over HTTP.
struct Plexer {
    base: String,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Plexer {
    async fn start(app: &TestApp) -> Plexer {
        let mut config = app.config.clone();
        config.ws_plexer.api_url = app.base.clone();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let mut server = tokio::spawn(confab::run(
            Role::WsPlexer,
            config,
            listener,
            shutdown.clone(),
        ));
        tokio::select! {
            () = support::wait_ready(&base) => {}
            ended = &mut server => panic!("the ws-plexer at {base} stopped before it was ready: {ended:?}"),
        }
        Plexer {
            base,
            shutdown,
            server,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.server)
            .await
            .expect("the ws-plexer drains within the deadline")
            .unwrap()
            .unwrap();
    }
}

/// confab on the real stack (its attachments on S3) with a separate ws-plexer in front of its API.
async fn serve_with_a_plexer(presigned_redirect: bool) -> (TestApp, Plexer) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Real, data.path().to_path_buf());
    config.attachments.presigned_redirect = presigned_redirect;
    let app = support::spawn_with(Stack::Real, config, data).await;
    let plexer = Plexer::start(&app).await;
    (app, plexer)
}

/// Uploads `body` as a text file to `chat` and returns the attachment's id.
async fn upload_text(app: &TestApp, token: &str, chat: &str, name: &str, body: Vec<u8>) -> String {
    let response = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments")))
        .query(&[("name", name)])
        .bearer_auth(token)
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{name}");
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A body that is not JSON (an attachment's bytes), at the relay limit or over it, is refused by a
/// separate ws-plexer as in process (the same error frame) with `not-json`, for the client to
/// fetch it over HTTP, without being read past its first chunk (a JSON body over the limit is
/// refused with `response-too-large`: the unit tests of `relayable_body`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_plexer_relays_no_body_over_the_limit() {
    if !support::real_stack_available("a_separate_plexer_relays_no_body_over_the_limit").await {
        return;
    }
    let (app, plexer) = serve_with_a_plexer(false).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let at_limit = upload_text(
        &app,
        &alice,
        &chat,
        "at.txt",
        vec![b'a'; MAX_RESPONSE_BYTES],
    )
    .await;
    let over_limit = upload_text(
        &app,
        &alice,
        &chat,
        "over.txt",
        vec![b'b'; MAX_RESPONSE_BYTES + 1],
    )
    .await;
    // Over HTTP the API serves it: the limit is the socket's.
    let served = app
        .get(&alice, &format!("/v1/attachments/{over_limit}"))
        .await;
    assert_eq!(served.status(), 200);
    assert_eq!(served.bytes().await.unwrap().len(), MAX_RESPONSE_BYTES + 1);

    let mut in_process = connect_to(&app.base, Some(&alice), "").await;
    let mut over_http = connect_to(&plexer.base, Some(&alice), "").await;
    let get = |id: &str| {
        let path = format!("/v1/attachments/{id}");
        json!({"type": "request", "id": "get", "method": "GET", "path": path})
    };
    let not_json = call(&mut over_http, get(&at_limit)).await;
    assert_eq!(
        not_json["status"], 406,
        "at the limit, over HTTP: {not_json}"
    );
    assert!(
        not_json["body"]["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("not-json")),
        "{not_json}"
    );
    assert_eq!(
        not_json,
        call(&mut in_process, get(&at_limit)).await,
        "at the limit: the same answer in process"
    );
    let refused = call(&mut over_http, get(&over_limit)).await;
    assert_eq!(
        refused["status"], 406,
        "over the limit, over HTTP: an error, not the body"
    );
    assert!(
        refused["body"]["type"]
            .as_str()
            .is_some_and(|t| t.ends_with("not-json")),
        "{}",
        refused["body"]
    );
    assert_eq!(
        refused,
        call(&mut in_process, get(&over_limit)).await,
        "the same answer in process"
    );
    plexer.stop().await;
    app.stop().await;
}

/// A presigned redirect is answered by a separate ws-plexer as in process (the 307 itself), not
/// followed to the bucket and relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_plexer_passes_redirects_on() {
    if !support::real_stack_available("a_separate_plexer_passes_redirects_on").await {
        return;
    }
    let (app, plexer) = serve_with_a_plexer(true).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    // Larger than the memory cache keeps, so it is redirected.
    let size = app.config.attachments.cache_object_bytes + 1;
    let redirected = upload_text(&app, &alice, &chat, "big.txt", vec![b'r'; size]).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let over_http = no_redirects
        .get(app.url(&format!("/v1/attachments/{redirected}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(over_http.status(), 307, "the API redirects");

    let mut in_process = connect_to(&app.base, Some(&alice), "").await;
    let mut through_plexer = connect_to(&plexer.base, Some(&alice), "").await;
    let get = json!({"type": "request", "id": "get", "method": "GET",
                     "path": format!("/v1/attachments/{redirected}")});
    let passed_on = call(&mut through_plexer, get.clone()).await;
    assert_eq!(
        passed_on["status"], 307,
        "the redirect itself, not what it points to"
    );
    assert_eq!(
        passed_on,
        call(&mut in_process, get).await,
        "the same answer in process"
    );
    plexer.stop().await;
    app.stop().await;
}

/// A path with a dot segment (`..`, `.`, percent-encoded in any case) is refused as a bad frame
/// by both ways of calling the API: over HTTP, the URL parser would remove it and send the call,
/// with the user's token, to a path outside `/v1/` (`/v1/../metrics` is `/metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_segment_never_takes_a_request_out_of_v1() {
    if !support::real_stack_available("a_dot_segment_never_takes_a_request_out_of_v1").await {
        return;
    }
    let (app, plexer) = serve_with_a_plexer(false).await;
    let alice = app.token("alice").await;
    let mut in_process = connect_to(&app.base, Some(&alice), "").await;
    let mut over_http = connect_to(&plexer.base, Some(&alice), "").await;
    for path in [
        "/v1/../metrics",
        "/v1/%2e%2e/metrics",
        "/v1/%2E%2e/metrics",
        "/v1/./me",
        "/v1/chats/..",
        "/v1/.%2E/metrics",
        "/v1\\..\\metrics",
        "/v1/..\\metrics",
    ] {
        let get = json!({"type": "request", "id": "dots", "method": "GET", "path": path});
        for (caller, ws) in [
            ("in process", &mut in_process),
            ("over HTTP", &mut over_http),
        ] {
            let answer = call(ws, get.clone()).await;
            assert_eq!(answer["status"], 400, "{path} {caller}: {answer}");
            assert!(
                answer["body"]["type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("bad-frame")),
                "{path} {caller}: {answer}"
            );
        }
    }
    // A path without one still goes through.
    let me = json!({"type": "request", "id": "me", "method": "GET", "path": "/v1/me"});
    assert_eq!(call(&mut over_http, me.clone()).await["status"], 200);
    assert_eq!(call(&mut in_process, me).await["status"], 200);
    plexer.stop().await;
    app.stop().await;
}
