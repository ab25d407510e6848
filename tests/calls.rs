//! Calls, signalling only: a call's states are history (`call` signals), WebRTC signalling reaches
//! the participant it names over SSE and WebSocket and nobody else (not the chat's other members,
//! not outsiders), bad signalling gets 4xx problems over HTTP and over the socket, a call nobody
//! answers becomes `missed` (also when the process that started it is gone), participants with no
//! live stream past the disconnect grace are taken out (and a call left empty ends), and TURN credentials
//! follow coturn's shared-secret scheme. On the embedded default and on the real stack.

mod support;

use support::on_both_stacks;

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{DEADLINE, SseEvent, SseStream, Stack, TestApp};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(app: &TestApp, token: &str) -> Ws {
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
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

async fn next_frame(ws: &mut Ws) -> Value {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return serde_json::from_str::<Value>(&text).unwrap(),
                Message::Close(frame) => panic!("socket closed: {frame:?}"),
                _ => continue,
            }
        }
    })
    .await
    .expect("a frame before the deadline")
}

/// Sends a request frame and returns its response frame (events in between are skipped).
async fn request(ws: &mut Ws, id: &str, method: &str, path: &str, body: Value) -> Value {
    ws.send(Message::Text(
        json!({"type": "request", "id": id, "method": method, "path": path, "body": body})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    loop {
        let frame = next_frame(ws).await;
        if frame["type"] == "response" && frame["id"] == id {
            return frame;
        }
        assert_ne!(frame["type"], "error", "{frame}");
    }
}

/// The next WebSocket event of type `name`.
async fn next_ws_event(ws: &mut Ws, name: &str) -> Value {
    loop {
        let frame = next_frame(ws).await;
        if frame["type"] == "event" && frame["event"] == name {
            return frame;
        }
    }
}

/// Every SSE event up to the `signal.created` of `sentinel` (a signal id), which must come.
async fn events_until(stream: &mut SseStream, sentinel: &str) -> Vec<SseEvent> {
    let mut seen = Vec::new();
    loop {
        let event = stream.next_event().await;
        let done = event.event == "signal.created" && event.data["data"]["id"] == sentinel;
        seen.push(event);
        if done {
            return seen;
        }
    }
}

async fn send_message(app: &TestApp, token: &str, chat: &str, text: &str) -> String {
    let sent = app
        .post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    sent.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn json_of(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    response.json().await.unwrap()
}

/// A problem response with `status`.
async fn problem(response: reqwest::Response, status: u16, what: &str) {
    assert_eq!(response.status(), status, "{what}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
}

/// The `call` signals of a chat's history, oldest first: (state, call id, author).
async fn call_history(app: &TestApp, token: &str, chat: &str) -> Vec<(String, String, String)> {
    let history = json_of(
        app.get(token, &format!("/v1/chats/{chat}/signals")).await,
        200,
    )
    .await;
    let mut calls: Vec<(String, String, String)> = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "call")
        .map(|s| {
            assert!(s["text"].is_null(), "a call signal has no text: {s}");
            (
                s["call"]["state"].as_str().unwrap().to_owned(),
                s["call"]["call_id"].as_str().unwrap().to_owned(),
                s["author_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    calls.reverse();
    calls
}

async fn signalling_reaches_the_named_participant_only(stack: Stack) {
    let app = support::spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let dave = app.token("dave").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    app.me(&dave).await;
    let chat = app.group_chat(&alice, &[&bob_id, &carol_id]).await;
    // Dave's chat (with carol, not with the callers), for a sentinel on his stream.
    let daves = app.group_chat(&dave, &[&carol_id]).await;
    let mut bob_sse = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let mut alice_sse =
        SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let mut carol_sse =
        SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&carol)).await;
    let mut dave_sse =
        SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&dave)).await;
    let mut bob_ws = connect(&app, &bob).await;

    // Only members start a call; it rings with its starter in it.
    problem(
        app.post(&dave, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        403,
        "an outsider starts no call",
    )
    .await;
    let call = json_of(
        app.post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let call_id = call["id"].as_str().unwrap().to_owned();
    assert_eq!(call["status"], "ringing");
    assert_eq!(call["participants"], json!([alice_id]));
    let started = bob_sse.next_of("signal.created").await;
    assert_eq!(started.data["data"]["kind"], "call");
    assert_eq!(
        started.data["data"]["call"],
        json!({"call_id": call_id, "state": "started"})
    );

    // An outsider learns nothing about the call.
    for (method, path) in [
        ("GET", format!("/v1/calls/{call_id}")),
        ("POST", format!("/v1/calls/{call_id}/join")),
        ("POST", format!("/v1/calls/{call_id}/end")),
    ] {
        let response = app
            .http
            .request(method.parse().unwrap(), app.url(&path))
            .bearer_auth(&dave)
            .send()
            .await
            .unwrap();
        problem(response, 404, &path).await;
    }
    let signal_path = format!("/v1/calls/{call_id}/signal");
    problem(
        app.post(
            &dave,
            &signal_path,
            &json!({"to": alice_id, "type": "offer", "payload": {"sdp": "v=0"}}),
        )
        .await,
        404,
        "an outsider signals nobody",
    )
    .await;

    // Bob answers (over the socket, as a request frame): the call is active.
    let joined = request(
        &mut bob_ws,
        "join",
        "POST",
        &format!("/v1/calls/{call_id}/join"),
        Value::Null,
    )
    .await;
    assert_eq!(joined["status"], 200, "{joined}");
    assert_eq!(joined["body"]["status"], "active");
    let joined_again = json_of(
        app.post(&bob, &format!("/v1/calls/{call_id}/join"), &json!({}))
            .await,
        200,
    )
    .await;
    assert_eq!(
        joined_again["participants"].as_array().unwrap().len(),
        2,
        "joining twice changes nothing"
    );

    // Alice's offer to bob, over HTTP: on bob's SSE stream and socket, from alice.
    let offer = json!({"type": "offer", "sdp": "v=0\r\no=alice 1 1 IN IP4 0.0.0.0\r\n"});
    let relayed = app
        .post(
            &alice,
            &signal_path,
            &json!({"to": bob_id, "type": "offer", "payload": offer}),
        )
        .await;
    assert_eq!(relayed.status(), 204);
    let on_sse = bob_sse.next_of("call.signal").await;
    assert!(on_sse.id.is_none(), "signalling is ephemeral: no id");
    assert_eq!(
        on_sse.data["data"],
        json!({"call_id": call_id, "chat_id": chat, "from": alice_id, "to": bob_id, "type": "offer", "payload": offer})
    );
    let on_ws = next_ws_event(&mut bob_ws, "call.signal").await;
    assert!(on_ws.get("id").is_none_or(Value::is_null));
    assert_eq!(on_ws["data"]["payload"], offer);

    // Bob's answer, as a request frame on his socket: to alice only.
    let answered = request(
        &mut bob_ws,
        "answer",
        "POST",
        &signal_path,
        json!({"to": alice_id, "type": "answer", "payload": {"type": "answer", "sdp": "v=0"}}),
    )
    .await;
    assert_eq!(answered["status"], 204, "{answered}");
    let answer = alice_sse.next_of("call.signal").await;
    assert_eq!(answer.data["data"]["type"], "answer");
    assert_eq!(answer.data["data"]["from"], bob_id.as_str());
    // ICE to everyone else in the call: bob.
    let ice =
        json!({"candidate": "candidate:1 1 udp 2122260223 10.0.0.1 54321 typ host", "sdpMid": "0"});
    let to_all = app
        .post(
            &alice,
            &signal_path,
            &json!({"to": "all", "type": "ice", "payload": ice}),
        )
        .await;
    assert_eq!(to_all.status(), 204);
    assert_eq!(
        bob_sse.next_of("call.signal").await.data["data"]["payload"],
        ice
    );

    // A member who is not in the call neither sends nor receives signalling.
    problem(
        app.post(
            &carol,
            &signal_path,
            &json!({"to": alice_id, "type": "offer", "payload": {"sdp": "v=0"}}),
        )
        .await,
        403,
        "carol is not in the call",
    )
    .await;
    problem(
        app.post(
            &alice,
            &signal_path,
            &json!({"to": carol_id, "type": "offer", "payload": {"sdp": "v=0"}}),
        )
        .await,
        422,
        "carol is not a target",
    )
    .await;

    // Bad signalling: clear 4xx problems, over HTTP and over the socket.
    let too_large = json!({"sdp": "a".repeat(40 * 1024)});
    for (body, status, what) in [
        (
            json!({"to": bob_id, "type": "sdp", "payload": {}}),
            422,
            "unknown type",
        ),
        (
            json!({"to": "someone", "type": "offer", "payload": {}}),
            422,
            "bad target",
        ),
        (
            json!({"to": bob_id, "type": "offer", "payload": 7}),
            422,
            "payload not an object",
        ),
        (
            json!({"to": bob_id, "type": "offer"}),
            422,
            "missing payload",
        ),
        (
            json!({"to": bob_id, "type": "offer", "payload": {}, "extra": 1}),
            422,
            "unknown field",
        ),
        (
            json!({"to": bob_id, "type": "offer", "payload": too_large}),
            413,
            "payload too large",
        ),
        (
            json!({"to": alice_id, "type": "offer", "payload": {}}),
            422,
            "to oneself",
        ),
    ] {
        problem(app.post(&alice, &signal_path, &body).await, status, what).await;
    }
    let malformed = app
        .http
        .post(app.url(&signal_path))
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body("{\"to\":")
        .send()
        .await
        .unwrap();
    problem(malformed, 400, "malformed JSON").await;
    problem(
        app.post(
            &alice,
            &format!("/v1/calls/{}/signal", uuid::Uuid::now_v7()),
            &json!({"to": bob_id, "type": "offer", "payload": {}}),
        )
        .await,
        404,
        "no such call",
    )
    .await;
    problem(
        app.post(
            &alice,
            "/v1/calls/not-a-call/signal",
            &json!({"to": bob_id, "type": "offer", "payload": {}}),
        )
        .await,
        400,
        "malformed call id",
    )
    .await;
    let bad_frame = request(
        &mut bob_ws,
        "bad",
        "POST",
        &signal_path,
        json!({"to": alice_id, "type": "candidate", "payload": {}}),
    )
    .await;
    assert_eq!(bad_frame["status"], 422, "{bad_frame}");
    assert_eq!(bad_frame["body"]["status"], 422);

    // A client's nonce cannot be the one the server writes the call's end under (parity would
    // answer with this message, and the end would never be history).
    problem(
        app.post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "mine", "nonce": format!("call:{call_id}:ended")}),
        )
        .await,
        422,
        "a nonce of the server's call signals",
    )
    .await;

    // Bob leaves, alice ends it; then it takes no signalling and no one joins it.
    let left = json_of(
        app.post(&bob, &format!("/v1/calls/{call_id}/leave"), &json!({}))
            .await,
        200,
    )
    .await;
    assert_eq!(left["participants"], json!([alice_id]));
    assert_eq!(left["status"], "active");
    problem(
        app.post(&carol, &format!("/v1/calls/{call_id}/end"), &json!({}))
            .await,
        403,
        "a member who did not start a group call does not end it",
    )
    .await;
    let ended = json_of(
        app.post(&alice, &format!("/v1/calls/{call_id}/end"), &json!({}))
            .await,
        200,
    )
    .await;
    assert_eq!(ended["status"], "ended");
    problem(
        app.post(
            &alice,
            &signal_path,
            &json!({"to": bob_id, "type": "ice", "payload": {}}),
        )
        .await,
        409,
        "the call is over",
    )
    .await;
    problem(
        app.post(&carol, &format!("/v1/calls/{call_id}/join"), &json!({}))
            .await,
        409,
        "an ended call is not joined",
    )
    .await;

    // Its states are history, in order, with the call's id.
    assert_eq!(
        call_history(&app, &carol, &chat).await,
        [
            ("started", &alice_id),
            ("joined", &bob_id),
            ("left", &bob_id),
            ("ended", &alice_id)
        ]
        .map(|(state, author)| (state.to_owned(), call_id.clone(), author.clone()))
    );

    // Carol (a member) and dave (an outsider) never got any signalling: their streams, read up to
    // a later message, hold none.
    let sentinel = send_message(&app, &alice, &chat, "after the call").await;
    let carols = events_until(&mut carol_sse, &sentinel).await;
    assert!(
        carols.iter().all(|e| e.event != "call.signal"),
        "{carols:?}"
    );
    assert!(
        carols
            .iter()
            .any(|e| e.data["data"]["call"]["state"] == "ended"),
        "members see the call's states"
    );
    let daves_sentinel = send_message(&app, &dave, &daves, "mine").await;
    let seen = events_until(&mut dave_sse, &daves_sentinel).await;
    assert!(
        seen.iter()
            .all(|e| e.event != "call.signal" && e.data["data"]["chat_id"] != chat.as_str()),
        "{seen:?}"
    );
    // Signalling is never replayed: a resumed stream from the start has call signals, no relay.
    let mut resumed = SseStream::open(
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(&bob)
            .header("Last-Event-ID", "1"),
    )
    .await;
    let replayed = events_until(&mut resumed, &sentinel).await;
    assert!(replayed.iter().all(|e| e.event != "call.signal"));
    drop(bob_sse);
    app.stop().await;
}

#[tokio::test]
async fn signalling_reaches_the_named_participant_only_on_the_embedded_default() {
    Box::pin(signalling_reaches_the_named_participant_only(
        Stack::Embedded,
    ))
    .await;
}

#[tokio::test]
async fn signalling_reaches_the_named_participant_only_on_the_real_stack() {
    if support::real_stack_available(
        "signalling_reaches_the_named_participant_only_on_the_real_stack",
    )
    .await
    {
        Box::pin(signalling_reaches_the_named_participant_only(Stack::Real)).await;
    }
}

/// Polls the call until its status is `status`.
async fn wait_for_status(app: &TestApp, token: &str, call_id: &str, status: &str) -> Value {
    let path = format!("/v1/calls/{call_id}");
    poll(
        &format!("the call becoming {status}"),
        || {
            let path = path.clone();
            async move { json_of(app.get(token, &path).await, 200).await }
        },
        |call| call["status"] == status,
    )
    .await
}

/// Reads `read` every 50 ms until `done` holds for what it read, and answers that; past the
/// deadline, fails saying `what` never happened and what was read last.
async fn poll<T: std::fmt::Debug, F: std::future::Future<Output = T>>(
    what: &str,
    mut read: impl FnMut() -> F,
    done: impl Fn(&T) -> bool,
) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let last = read().await;
        if done(&last) {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} never happened: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn unanswered_calls_are_missed(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.calls.ring_timeout_secs = 1;
    let app = support::spawn_with(stack, config.clone(), data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let mut bob_sse = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;

    // Nobody answers: missed, written by the sweeper, and it can no longer be answered.
    let unanswered = json_of(
        app.post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let unanswered_id = unanswered["id"].as_str().unwrap().to_owned();
    let missed = wait_for_status(&app, &bob, &unanswered_id, "missed").await;
    assert_eq!(missed["participants"], json!([alice_id]));
    let event = loop {
        let event = bob_sse.next_of("signal.created").await;
        if event.data["data"]["call"]["state"] == "missed" {
            break event;
        }
    };
    assert_eq!(event.data["data"]["author_id"], alice_id.as_str());
    problem(
        app.post(&bob, &format!("/v1/calls/{unanswered_id}/join"), &json!({}))
            .await,
        409,
        "a missed call is not answered",
    )
    .await;

    // Answered in time: never missed, whatever the sweeper does after the ring time.
    let answered = json_of(
        app.post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let answered_id = answered["id"].as_str().unwrap().to_owned();
    json_of(
        app.post(&bob, &format!("/v1/calls/{answered_id}/join"), &json!({}))
            .await,
        200,
    )
    .await;
    // A third call (in a chat of its own: the first has its live call), started once the answered
    // one's ring time has passed: when it is missed, the sweeper has been past the answered call's
    // ring time too.
    let ring_until = time::OffsetDateTime::parse(
        answered["ring_until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while time::OffsetDateTime::now_utc() <= ring_until {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let marker_chat = app.group_chat(&alice, &[&bob_id]).await;
    let marker = json_of(
        app.post(
            &alice,
            &format!("/v1/chats/{marker_chat}/calls"),
            &json!({}),
        )
        .await,
        201,
    )
    .await;
    wait_for_status(&app, &bob, marker["id"].as_str().unwrap(), "missed").await;
    wait_for_status(&app, &bob, &answered_id, "active").await;

    let history = call_history(&app, &bob, &chat).await;
    let states_of = |id: &str| -> Vec<String> {
        history
            .iter()
            .filter(|(_, call, _)| call == id)
            .map(|(state, _, _)| state.clone())
            .collect()
    };
    assert_eq!(states_of(&unanswered_id), ["started", "missed"]);
    assert_eq!(states_of(&answered_id), ["started", "joined"]);
    // Over, so the chat can ring again.
    json_of(
        app.post(&alice, &format!("/v1/calls/{answered_id}/end"), &json!({}))
            .await,
        200,
    )
    .await;

    // The ring timeout outlives the process that started the call: a call left ringing by a
    // process that stopped before its ring time is made missed by the next process.
    drop(bob_sse);
    let data = app.stop_keeping_state().await;
    config.calls.ring_timeout_secs = 5;
    let starter = support::spawn_with(stack, config.clone(), data).await;
    let ringing = json_of(
        starter
            .post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let ringing_id = ringing["id"].as_str().unwrap().to_owned();
    let ring_until = time::OffsetDateTime::parse(
        ringing["ring_until"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let data = starter.stop_keeping_state().await;
    assert!(
        time::OffsetDateTime::now_utc() < ring_until,
        "the starting process stopped before the ring time, so it cannot have swept the call"
    );
    let next = support::spawn_with(stack, config, data).await;
    wait_for_status(&next, &bob, &ringing_id, "missed").await;
    // The sweep marks the call missed, then writes its `missed` signal: wait for that too.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let states = states_of_now(&next, &bob, &chat, &ringing_id).await;
        if states == ["started", "missed"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the history never showed the call missed: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    next.stop().await;
}

async fn states_of_now(app: &TestApp, token: &str, chat: &str, call_id: &str) -> Vec<String> {
    call_history(app, token, chat)
        .await
        .into_iter()
        .filter(|(_, call, _)| call == call_id)
        .map(|(state, _, _)| state)
        .collect()
}

#[tokio::test]
async fn unanswered_calls_are_missed_on_the_embedded_default() {
    Box::pin(unanswered_calls_are_missed(Stack::Embedded)).await;
}

#[tokio::test]
async fn unanswered_calls_are_missed_on_the_real_stack() {
    if support::real_stack_available("unanswered_calls_are_missed_on_the_real_stack").await {
        Box::pin(unanswered_calls_are_missed(Stack::Real)).await;
    }
}

/// The one called in a direct chat declines a ringing call: it ends for both, with an `ended` in
/// the history, instead of ringing on for the ring time and then being missed. Nobody else is
/// in a direct chat to end it.
async fn a_direct_call_is_declined_by_the_one_called(stack: Stack) {
    let app = support::spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let direct = json_of(
        app.post(
            &alice,
            "/v1/chats",
            &json!({"kind": "direct", "members": [bob_id]}),
        )
        .await,
        201,
    )
    .await;
    let chat = direct["id"].as_str().unwrap().to_owned();
    let call = json_of(
        app.post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let call_id = call["id"].as_str().unwrap().to_owned();
    assert_eq!(call["status"], "ringing");
    let declined = json_of(
        app.post(&bob, &format!("/v1/calls/{call_id}/end"), &json!({}))
            .await,
        200,
    )
    .await;
    assert_eq!(declined["status"], "ended", "{declined}");
    assert_eq!(
        states_of_now(&app, &alice, &chat, &call_id).await,
        ["started", "ended"]
    );
    app.stop().await;
}

#[tokio::test]
async fn a_direct_call_is_declined_by_the_one_called_on_the_embedded_default() {
    Box::pin(a_direct_call_is_declined_by_the_one_called(Stack::Embedded)).await;
}

#[tokio::test]
async fn a_direct_call_is_declined_by_the_one_called_on_the_real_stack() {
    if support::real_stack_available(
        "a_direct_call_is_declined_by_the_one_called_on_the_real_stack",
    )
    .await
    {
        Box::pin(a_direct_call_is_declined_by_the_one_called(Stack::Real)).await;
    }
}

async fn turn_credentials(stack: Stack) {
    // Not configured: a 404 problem.
    let bare = support::spawn_app(stack).await;
    let alice = bare.token("alice").await;
    problem(
        bare.get(&alice, "/v1/calls/turn-credentials").await,
        404,
        "no TURN servers",
    )
    .await;
    bare.stop().await;

    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.calls.turn_secret = Some("north-secret".into());
    config.calls.turn_uris =
        "turn:turn.example.org:3478?transport=udp, turns:turn.example.org:5349".into();
    config.calls.turn_ttl_secs = 600;
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let alice_id = app.me(&alice).await;
    problem(
        app.http
            .get(app.url("/v1/calls/turn-credentials"))
            .send()
            .await
            .unwrap(),
        401,
        "without a token",
    )
    .await;
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    let credentials = json_of(app.get(&alice, "/v1/calls/turn-credentials").await, 200).await;
    let after = time::OffsetDateTime::now_utc().unix_timestamp();
    assert_eq!(credentials["ttl"], 600);
    assert_eq!(
        credentials["uris"],
        json!([
            "turn:turn.example.org:3478?transport=udp",
            "turns:turn.example.org:5349"
        ])
    );
    let username = credentials["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, alice_id);
    let expiry: i64 = expiry.parse().unwrap();
    assert!((before + 600..=after + 600).contains(&expiry), "{expiry}");
    // The password is what coturn computes from the shared secret: checked here with an HMAC-SHA1
    // of this test's own (RFC 2104 over SHA-1 from the `sha1` crate's digest, not confab's code).
    assert_eq!(
        credentials["password"],
        hmac_sha1_base64(b"north-secret", username.as_bytes())
    );
    app.stop().await;
}

/// RFC 2104 HMAC over SHA-1, in base64: an implementation independent of the server's.
fn hmac_sha1_base64(key: &[u8], message: &[u8]) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..20].copy_from_slice(&sha1::Sha1::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = sha1::Sha1::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    let outer = sha1::Sha1::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    base64::engine::general_purpose::STANDARD.encode(outer)
}

#[test]
fn the_tests_hmac_matches_a_known_vector() {
    // RFC 2202, HMAC-SHA1 test case 2: effcdf6ae5eb2fa2d27416d5f184df9c259a7c79.
    assert_eq!(
        hmac_sha1_base64(b"Jefe", b"what do ya want for nothing?"),
        "7/zfauXrL6LSdBbV8YTfnCWafHk="
    );
}

#[tokio::test]
async fn turn_credentials_on_the_embedded_default() {
    Box::pin(turn_credentials(Stack::Embedded)).await;
}

#[tokio::test]
async fn turn_credentials_on_the_real_stack() {
    if support::real_stack_available("turn_credentials_on_the_real_stack").await {
        Box::pin(turn_credentials(Stack::Real)).await;
    }
}

/// The participants of a call as its members see them, sorted.
async fn participants_of(app: &TestApp, token: &str, call_id: &str) -> (String, Vec<String>) {
    let call = json_of(app.get(token, &format!("/v1/calls/{call_id}")).await, 200).await;
    let mut participants: Vec<String> = call["participants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    participants.sort();
    (call["status"].as_str().unwrap().to_owned(), participants)
}

async fn remove(app: &TestApp, token: &str, chat: &str, user: &str) {
    let removed = app
        .http
        .delete(app.url(&format!("/v1/chats/{chat}/members/{user}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
}

/// A member removed from a chat, or who leaves it, leaves its calls: out of the participants
/// (a `left` signal), no longer reached by signalling, and a call nobody is left in ends.
async fn members_who_leave_the_chat_leave_its_calls(stack: Stack) {
    let app = support::spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id, &carol_id]).await;
    // Carol's own chat with alice, for a sentinel on her stream once she is out of the first.
    let carols = app.group_chat(&carol, &[&alice_id]).await;
    let mut carol_sse =
        SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&carol)).await;

    let call = json_of(
        app.post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let call_id = call["id"].as_str().unwrap().to_owned();
    for token in [&bob, &carol] {
        json_of(
            app.post(token, &format!("/v1/calls/{call_id}/join"), &json!({}))
                .await,
            200,
        )
        .await;
    }

    // Removed from the chat: out of the call.
    remove(&app, &alice, &chat, &carol_id).await;
    let mut expected = vec![alice_id.clone(), bob_id.clone()];
    expected.sort();
    assert_eq!(
        participants_of(&app, &alice, &call_id).await,
        ("active".to_owned(), expected),
        "the removed member is out of the call"
    );
    let signal_path = format!("/v1/calls/{call_id}/signal");
    problem(
        app.post(
            &alice,
            &signal_path,
            &json!({"to": carol_id, "type": "offer", "payload": {"sdp": "v=0"}}),
        )
        .await,
        422,
        "a removed member is no target",
    )
    .await;
    let ice = json!({"candidate": "candidate:1 1 udp 2122260223 10.0.0.1 54321 typ host"});
    let to_all = app
        .post(
            &alice,
            &signal_path,
            &json!({"to": "all", "type": "ice", "payload": ice}),
        )
        .await;
    assert_eq!(to_all.status(), 204);
    let sentinel = send_message(&app, &alice, &carols, "after the removal").await;
    let seen = events_until(&mut carol_sse, &sentinel).await;
    assert!(
        seen.iter().all(|e| e.event != "call.signal"),
        "the removed member gets no signalling: {seen:?}"
    );
    assert!(
        call_history(&app, &alice, &chat).await.contains(&(
            "left".to_owned(),
            call_id.clone(),
            carol_id.clone()
        )),
        "her leaving the call is history"
    );

    // A call whose last participant leaves the chat ends (the first one over before, as a chat
    // has one live call at most).
    json_of(
        app.post(&alice, &format!("/v1/calls/{call_id}/end"), &json!({}))
            .await,
        200,
    )
    .await;
    let second = json_of(
        app.post(&bob, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let second_id = second["id"].as_str().unwrap().to_owned();
    remove(&app, &bob, &chat, &bob_id).await;
    assert_eq!(
        participants_of(&app, &alice, &second_id).await,
        ("ended".to_owned(), Vec::new()),
        "a call nobody is left in ends"
    );
    assert_eq!(
        states_of_now(&app, &alice, &chat, &second_id).await,
        ["started", "left", "ended"]
    );
    app.stop().await;
}

/// Polls `user`'s presence, as `token` sees it, until it is `state`.
async fn wait_for_presence(app: &TestApp, token: &str, user: &str, state: &str) {
    let path = format!("/v1/users/{user}/presence");
    poll(
        &format!("{user} becoming {state}"),
        || {
            let path = path.clone();
            async move { json_of(app.get(token, &path).await, 200).await }
        },
        |presence| presence["state"] == state,
    )
    .await;
}

/// Polls the call, as `token` sees it, until `done` holds for its status and participants.
async fn wait_for_call(
    app: &TestApp,
    token: &str,
    call_id: &str,
    what: &str,
    done: impl Fn(&str, &[String]) -> bool,
) -> (String, Vec<String>) {
    poll(
        what,
        || participants_of(app, token, call_id),
        |(status, participants)| done(status, participants),
    )
    .await
}

/// A participant whose app went away without leaving (killed, its network gone) has no live event
/// stream: past the disconnect grace, reading the call takes them out with a `left` signal, and
/// a call nobody is left in ends, so the chat can ring again. Before, such a call stayed active
/// for good, and every later start in the chat joined it and rang nobody.
async fn participants_gone_away_are_taken_out_of_the_call(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.calls.disconnect_grace_secs = 1;
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id, &carol_id]).await;
    let bob_sse = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let carol_sse = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&carol)).await;
    for user in [&bob_id, &carol_id] {
        wait_for_presence(&app, &alice, user, "online").await;
    }

    // Alice starts the call over HTTP and has no stream: once the grace has passed, she is gone.
    let call = json_of(
        app.post(&alice, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    let call_id = call["id"].as_str().unwrap().to_owned();
    for token in [&bob, &carol] {
        json_of(
            app.post(token, &format!("/v1/calls/{call_id}/join"), &json!({}))
                .await,
            200,
        )
        .await;
    }
    let mut connected = vec![bob_id.clone(), carol_id.clone()];
    connected.sort();
    let (status, participants) = wait_for_call(&app, &bob, &call_id, "alice taken out", |_, p| {
        !p.contains(&alice_id)
    })
    .await;
    assert_eq!(
        (status.as_str(), participants),
        ("active", connected),
        "those with a stream stay in the call"
    );

    // Both others go away too: the call ends when someone else next reads it.
    drop((bob_sse, carol_sse));
    for user in [&bob_id, &carol_id] {
        wait_for_presence(&app, &alice, user, "offline").await;
    }
    // Bob reads the call without a stream: he is there, by his request; carol is taken out.
    let (status, participants) = wait_for_call(&app, &bob, &call_id, "carol taken out", |_, p| {
        !p.contains(&carol_id)
    })
    .await;
    assert_eq!(
        (status.as_str(), participants),
        ("active", vec![bob_id.clone()]),
        "the reader stays in"
    );
    let (_, participants) = wait_for_call(&app, &alice, &call_id, "the call's end", |status, _| {
        status == "ended"
    })
    .await;
    assert!(participants.is_empty(), "{participants:?}");
    let history = call_history(&app, &alice, &chat).await;
    let of_call: Vec<(&str, &str)> = history
        .iter()
        .filter(|(_, call, _)| *call == call_id)
        .map(|(state, _, author)| (state.as_str(), author.as_str()))
        .collect();
    for user in [&alice_id, &bob_id, &carol_id] {
        assert_eq!(
            of_call
                .iter()
                .filter(|(state, author)| *state == "left" && author == user)
                .count(),
            1,
            "one `left` for {user}: {of_call:?}"
        );
    }
    assert_eq!(
        of_call
            .iter()
            .filter(|(state, _)| *state == "ended")
            .count(),
        1,
        "{of_call:?}"
    );
    // The chat rings again: a new call, not the abandoned one.
    let next = json_of(
        app.post(&bob, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
    )
    .await;
    assert_ne!(next["id"], call["id"]);
    app.stop().await;
}

on_both_stacks!(participants_gone_away_are_taken_out_of_the_call);

#[tokio::test]
async fn members_who_leave_the_chat_leave_its_calls_on_the_embedded_default() {
    Box::pin(members_who_leave_the_chat_leave_its_calls(Stack::Embedded)).await;
}

#[tokio::test]
async fn members_who_leave_the_chat_leave_its_calls_on_the_real_stack() {
    if support::real_stack_available("members_who_leave_the_chat_leave_its_calls_on_the_real_stack")
        .await
    {
        Box::pin(members_who_leave_the_chat_leave_its_calls(Stack::Real)).await;
    }
}
