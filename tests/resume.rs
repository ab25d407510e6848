//! Exact resume, on the embedded default and on the real stack: a client that reconnects with the
//! last event id it saw gets exactly the events it missed (in order, none twice): of a chat it
//! left meanwhile, those up to its leaving, and of a chat it joined, those from its joining; an id
//! the server cannot resume from gets a `reset`; a malformed one a 400.

mod support;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{DEADLINE, SseEvent, SseStream, Stack, TestApp, spawn_app};
use tokio_tungstenite::tungstenite::Message;

async fn send(app: &TestApp, token: &str, chat: &str, text: &str) -> String {
    let response = app
        .post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn events_url(app: &TestApp) -> String {
    app.url("/v1/events")
}

/// The `(type, chat, text)` of an event, for comparing sequences of them.
fn describe(event: &SseEvent) -> (String, String, String) {
    let data = &event.data["data"];
    let chat = data["chat_id"].as_str().unwrap_or_default().to_owned();
    let text = data["text"]
        .as_str()
        .or(data["kind"].as_str())
        .or(data["user_id"].as_str())
        .unwrap_or_default()
        .to_owned();
    (event.event.clone(), chat, text)
}

/// Reads events until one is a message with `text`, returning all it read (that one included).
async fn read_until_message(stream: &mut SseStream, text: &str) -> Vec<SseEvent> {
    let mut read = Vec::new();
    loop {
        let event = stream.next_event().await;
        if event.id.is_none() {
            // Ephemeral (presence): not part of what is replayed.
            continue;
        }
        let done = event.event == "signal.created" && event.data["data"]["text"] == text;
        read.push(event);
        if done {
            return read;
        }
    }
}

/// Opens `reader`'s stream, has `sender` send `text` to `chat`, and closes the stream once it
/// has read that message: the id of the last event it read, where a resume of it starts.
async fn last_seen_at(app: &TestApp, reader: &str, sender: &str, chat: &str, text: &str) -> String {
    let mut stream = SseStream::open(app.http.get(events_url(app)).bearer_auth(reader)).await;
    send(app, sender, chat, text).await;
    read_until_message(&mut stream, text)
        .await
        .last()
        .unwrap()
        .id
        .clone()
        .unwrap()
}

/// Has `by` remove `member` from `chat` (themself: they leave it).
async fn remove_member(app: &TestApp, by: &str, chat: &str, member: &str) {
    let removed = app
        .http
        .delete(app.url(&format!("/v1/chats/{chat}/members/{member}")))
        .bearer_auth(by)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
}

fn seq(event: &SseEvent) -> u64 {
    event
        .id
        .as_deref()
        .expect("every event has an id")
        .parse()
        .expect("ids are sequences")
}

async fn resume_replays_exactly_what_was_missed(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;

    let last_seen = last_seen_at(&app, &bob, &alice, &chat, "seen").await;

    // While bob is away: five messages.
    for i in 0..5 {
        send(&app, &alice, &chat, &format!("missed {i}")).await;
    }
    let mut resumed = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", &last_seen),
    )
    .await;
    send(&app, &alice, &chat, "live").await;
    let after = read_until_message(&mut resumed, "live").await;
    let messages: Vec<String> = after
        .iter()
        .filter(|e| e.event == "signal.created")
        .map(|e| e.data["data"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        messages,
        [
            "missed 0", "missed 1", "missed 2", "missed 3", "missed 4", "live"
        ],
        "exactly the missed messages, in order, then the live one"
    );
    let seqs: Vec<u64> = after.iter().map(seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]) && seqs[0] > last_seen.parse::<u64>().unwrap(),
        "ids increase with no repeat: {seqs:?}"
    );

    // The same through the query parameter, from the middle.
    let middle = after[2].id.clone().unwrap();
    let mut by_query = SseStream::open(
        app.http
            .get(format!("{}?last_event_id={middle}", events_url(&app)))
            .bearer_auth(&bob),
    )
    .await;
    let replayed = read_until_message(&mut by_query, "live").await;
    assert_eq!(
        replayed.iter().map(describe).collect::<Vec<_>>(),
        after[3..].iter().map(describe).collect::<Vec<_>>()
    );
    app.stop().await;
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_on_the_embedded_default() {
    Box::pin(resume_replays_exactly_what_was_missed(Stack::Embedded)).await;
}

#[tokio::test]
async fn resume_replays_exactly_what_was_missed_on_the_real_stack() {
    if support::real_stack_available("resume_replays_exactly_what_was_missed_on_the_real_stack")
        .await
    {
        Box::pin(resume_replays_exactly_what_was_missed(Stack::Real)).await;
    }
}

/// A client that dropped before its first event resumes from the `ready` event's id, and gets
/// what was sent meanwhile: a fresh stream states where it starts.
async fn a_fresh_stream_resumes_from_its_ready_id(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    // Events of others before bob connects: the ready id is past them.
    send(&app, &alice, &chat, "before").await;

    let fresh = SseStream::open(app.http.get(events_url(&app)).bearer_auth(&bob)).await;
    let start = fresh
        .ready_id
        .clone()
        .expect("a fresh stream's ready event has an id");
    drop(fresh);
    send(&app, &alice, &chat, "while away").await;
    let mut resumed = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", &start),
    )
    .await;
    assert_eq!(
        resumed.ready_id, None,
        "a resumed stream keeps the client's id"
    );
    send(&app, &alice, &chat, "live").await;
    let messages: Vec<String> = read_until_message(&mut resumed, "live")
        .await
        .iter()
        .filter(|e| e.event == "signal.created")
        .map(|e| e.data["data"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, ["while away", "live"]);
    app.stop().await;
}

#[tokio::test]
async fn a_fresh_stream_resumes_from_its_ready_id_on_the_embedded_default() {
    Box::pin(a_fresh_stream_resumes_from_its_ready_id(Stack::Embedded)).await;
}

#[tokio::test]
async fn a_fresh_stream_resumes_from_its_ready_id_on_the_real_stack() {
    if support::real_stack_available("a_fresh_stream_resumes_from_its_ready_id_on_the_real_stack")
        .await
    {
        Box::pin(a_fresh_stream_resumes_from_its_ready_id(Stack::Real)).await;
    }
}

async fn resume_follows_membership(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let left = app.group_chat(&alice, &[&bob_id]).await;
    let stayed = app.group_chat(&alice, &[&bob_id]).await;
    let carol = app.token("carol").await;
    let carol_id = app.me(&carol).await;
    let joined = app.group_chat(&alice, &[&carol_id]).await;

    let last_seen = last_seen_at(&app, &bob, &alice, &stayed, "before").await;

    send(&app, &alice, &joined, "before bob joined").await;
    send(&app, &alice, &left, "before bob left").await;
    remove_member(&app, &alice, &left, &bob_id).await;
    send(&app, &alice, &left, "after bob left").await;
    let added = app
        .post(
            &alice,
            &format!("/v1/chats/{joined}/members"),
            &json!({"user_id": bob_id}),
        )
        .await;
    assert_eq!(added.status(), 201);
    send(&app, &alice, &joined, "after bob joined").await;
    send(&app, &alice, &stayed, "end").await;

    let mut resumed = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", &last_seen),
    )
    .await;
    let replayed = read_until_message(&mut resumed, "end").await;
    let of_chat = |chat: &str| -> Vec<(String, String, String)> {
        replayed
            .iter()
            .filter(|e| e.data["chat_id"] == chat)
            .map(|e| replayed_as(&e.event, &e.data))
            .collect()
    };
    assert_eq!(
        of_chat(&left),
        [
            (
                "signal.created".to_owned(),
                left.clone(),
                "before bob left".to_owned()
            ),
            ("member.left".to_owned(), left.clone(), bob_id.clone()),
        ],
        "the chat bob left up to his leaving, and nothing after"
    );
    assert_eq!(
        of_chat(&joined),
        [
            ("member.joined".to_owned(), joined.clone(), bob_id.clone()),
            (
                "signal.created".to_owned(),
                joined.clone(),
                "joined".to_owned()
            ),
            (
                "signal.created".to_owned(),
                joined.clone(),
                "after bob joined".to_owned()
            ),
        ],
        "the joined chat from bob's join on"
    );
    assert_eq!(
        of_chat(&stayed),
        [(
            "signal.created".to_owned(),
            stayed.clone(),
            "end".to_owned()
        )],
        "the chat he stayed in"
    );
    assert_eq!(replayed.len(), 6, "nothing of any other chat: {replayed:?}");
    app.stop().await;
}

#[tokio::test]
async fn resume_follows_membership_on_the_embedded_default() {
    Box::pin(resume_follows_membership(Stack::Embedded)).await;
}

#[tokio::test]
async fn resume_follows_membership_on_the_real_stack() {
    if support::real_stack_available("resume_follows_membership_on_the_real_stack").await {
        Box::pin(resume_follows_membership(Stack::Real)).await;
    }
}

/// What a replayed event is, as `(type, chat, what)`: the text of a message, the kind of a system
/// signal, the member a membership change is about. The same for an SSE event's `data` and for a
/// WebSocket frame, which both carry `chat_id` and `data`.
fn replayed_as(kind: &str, event: &Value) -> (String, String, String) {
    let data = &event["data"];
    let what = match kind {
        "signal.created" => match data["kind"].as_str() {
            Some("message") => data["text"].as_str().unwrap_or_default(),
            other => other.unwrap_or_default(),
        },
        _ => data["user_id"].as_str().unwrap_or_default(),
    };
    (
        kind.to_owned(),
        event["chat_id"].as_str().unwrap_or_default().to_owned(),
        what.to_owned(),
    )
}

/// A client away while it was removed from one chat and left another (from another of its
/// devices) learns both when it resumes: each chat's events up to the one that took it out, its
/// own `member.left`, and nothing of the chat after that, as its stream would have delivered had it
/// stayed connected. The chat it is still in goes on as before. Over SSE, and over a WebSocket's
/// `resume` frame.
async fn a_resume_tells_of_the_chats_left_meanwhile(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let removed_from = app.group_chat(&alice, &[&bob_id]).await;
    let left_by_bob = app.group_chat(&alice, &[&bob_id]).await;
    let stayed = app.group_chat(&alice, &[&bob_id]).await;

    let last_seen = last_seen_at(&app, &bob, &alice, &stayed, "seen").await;

    send(&app, &alice, &removed_from, "before the removal").await;
    remove_member(&app, &alice, &removed_from, &bob_id).await;
    send(&app, &alice, &removed_from, "after the removal").await;
    send(&app, &alice, &left_by_bob, "before bob left").await;
    remove_member(&app, &bob, &left_by_bob, &bob_id).await;
    send(&app, &alice, &left_by_bob, "after bob left").await;
    send(&app, &alice, &stayed, "end").await;

    let expected = vec![
        (
            "signal.created".to_owned(),
            removed_from.clone(),
            "before the removal".to_owned(),
        ),
        (
            "member.left".to_owned(),
            removed_from.clone(),
            bob_id.clone(),
        ),
        (
            "signal.created".to_owned(),
            left_by_bob.clone(),
            "before bob left".to_owned(),
        ),
        (
            "member.left".to_owned(),
            left_by_bob.clone(),
            bob_id.clone(),
        ),
        (
            "signal.created".to_owned(),
            stayed.clone(),
            "end".to_owned(),
        ),
    ];

    let mut resumed = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", &last_seen),
    )
    .await;
    let replayed: Vec<_> = read_until_message(&mut resumed, "end")
        .await
        .iter()
        .map(|e| replayed_as(&e.event, &e.data))
        .collect();
    assert_eq!(
        replayed, expected,
        "over SSE: each chat bob left up to his own leaving, then the chat he stayed in"
    );
    // Live from here: the chat he is in, and nothing of the two he is out of.
    send(&app, &alice, &removed_from, "still out").await;
    send(&app, &alice, &left_by_bob, "still gone").await;
    send(&app, &alice, &stayed, "live").await;
    let live: Vec<_> = read_until_message(&mut resumed, "live")
        .await
        .iter()
        .map(|e| replayed_as(&e.event, &e.data))
        .collect();
    assert_eq!(
        live,
        [(
            "signal.created".to_owned(),
            stayed.clone(),
            "live".to_owned()
        )]
    );

    // The same through a WebSocket that resumes with a frame.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let ws_url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let mut request = ws_url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(next_frame(&mut ws).await["type"], "ready");
    ws.send(Message::Text(
        json!({"type": "resume", "last_event_id": last_seen})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    while next_frame(&mut ws).await["type"] != "ready" {}
    let replayed: Vec<_> = until_message(&mut ws, "end")
        .await
        .iter()
        .filter(|f| f["type"] == "event" && f.get("id").is_some())
        .map(|f| replayed_as(f["event"].as_str().unwrap_or_default(), f))
        .collect();
    assert_eq!(
        replayed, expected,
        "over a WebSocket's resume: the same as over SSE"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_resume_tells_of_the_chats_left_meanwhile_on_the_embedded_default() {
    Box::pin(a_resume_tells_of_the_chats_left_meanwhile(Stack::Embedded)).await;
}

#[tokio::test]
async fn a_resume_tells_of_the_chats_left_meanwhile_on_the_real_stack() {
    if support::real_stack_available("a_resume_tells_of_the_chats_left_meanwhile_on_the_real_stack")
        .await
    {
        Box::pin(a_resume_tells_of_the_chats_left_meanwhile(Stack::Real)).await;
    }
}

/// A `member.left` can reach the log twice: a late re-publish of the removal (the outbox's sweep,
/// or a retried publish) that lands after the log's duplicate window is kept as a second copy. A
/// client that resumes from between the two was out of the chat all along: it gets nothing of
/// the chat's messages, however the copy falls in the range, as its stream, routing the chat no
/// more since the first `member.left`, would not have delivered them.
async fn a_late_copy_of_a_leaving_replays_nothing_of_the_chat(stack: Stack) {
    use confab_runtime::bus::ChatFilter;
    use confab_schema::{ChatId, Event};
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let removed_from = app.group_chat(&alice, &[&bob_id]).await;
    let stayed = app.group_chat(&alice, &[&bob_id]).await;

    let mut first = SseStream::open(app.http.get(events_url(&app)).bearer_auth(&bob)).await;
    let removed = app
        .http
        .delete(app.url(&format!("/v1/chats/{removed_from}/members/{bob_id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    send(&app, &alice, &stayed, "seen after the removal").await;
    let seen = read_until_message(&mut first, "seen after the removal").await;
    assert!(
        seen.iter()
            .any(|e| e.event == "member.left" && e.data["chat_id"] == removed_from.as_str()),
        "bob's stream took his removal: {seen:?}"
    );
    let last_seen = seen.last().unwrap().id.clone().unwrap();
    drop(first);

    send(&app, &alice, &removed_from, "after the removal").await;
    // The removal's event as a late re-publish appends it: the same envelope, under an id the
    // log no longer recognises.
    let bus = confab::open_bus(&app.config).await.expect("the log opens");
    let chat: ChatId = removed_from.parse().unwrap();
    let only = std::collections::HashSet::from([chat]);
    let last = bus.last_seq().await.unwrap();
    let removal = bus
        .read(0, last, ChatFilter::Only(&only), 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|logged| logged.envelope)
        .find(|envelope| matches!(envelope.event, Event::MemberLeft(_)))
        .expect("the removal is in the log");
    let mut copy = removal.clone();
    copy.id = uuid::Uuid::now_v7();
    bus.publish(&copy).await.unwrap();
    send(&app, &alice, &removed_from, "after the copy").await;
    send(&app, &alice, &stayed, "end").await;

    let mut resumed = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", &last_seen),
    )
    .await;
    let replayed: Vec<_> = read_until_message(&mut resumed, "end")
        .await
        .iter()
        .map(|e| replayed_as(&e.event, &e.data))
        .collect();
    // The copy itself reaches him, as it would have live (a leaving goes to whom it names): it
    // tells nothing he did not know.
    assert_eq!(
        replayed,
        [
            (
                "member.left".to_owned(),
                removed_from.clone(),
                bob_id.clone()
            ),
            (
                "signal.created".to_owned(),
                stayed.clone(),
                "end".to_owned()
            ),
        ],
        "nothing of the chat bob was removed from before the position he resumed from"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_late_copy_of_a_leaving_replays_nothing_of_the_chat_on_the_embedded_default() {
    Box::pin(a_late_copy_of_a_leaving_replays_nothing_of_the_chat(
        Stack::Embedded,
    ))
    .await;
}

#[tokio::test]
async fn a_late_copy_of_a_leaving_replays_nothing_of_the_chat_on_the_real_stack() {
    if support::real_stack_available(
        "a_late_copy_of_a_leaving_replays_nothing_of_the_chat_on_the_real_stack",
    )
    .await
    {
        Box::pin(a_late_copy_of_a_leaving_replays_nothing_of_the_chat(
            Stack::Real,
        ))
        .await;
    }
}

async fn ids_that_cannot_resume(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;

    // Never issued: a reset, then the stream goes on live.
    let mut stream = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", "987654321987"),
    )
    .await;
    let reset = stream.next_event().await;
    assert_eq!(reset.event, "reset");
    assert_eq!(reset.data["type"], "reset");
    assert_eq!(reset.data["data"]["reason"], "unknown-id");
    // The reset carries the position the stream stands at: a client that resumes from it (before
    // any later event) is not told to reset again.
    let reset_at = reset
        .id
        .clone()
        .unwrap_or_else(|| panic!("a reset has an id: {reset:?}"));
    drop(stream);
    let mut stream = SseStream::open(
        app.http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", &reset_at),
    )
    .await;
    send(&app, &alice, &chat, "after the reset").await;
    let read = read_until_message(&mut stream, "after the reset").await;
    assert_eq!(
        read.iter()
            .map(describe)
            .map(|(kind, ..)| kind)
            .collect::<Vec<_>>(),
        ["signal.created"],
        "resumed from the reset's id: {read:?}"
    );

    for garbage in ["abc", "-1", "1.5", "99999999999999999999999"] {
        let response = app
            .http
            .get(events_url(&app))
            .bearer_auth(&bob)
            .header("Last-Event-ID", garbage)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{garbage}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .ends_with("bad-last-event-id"),
            "{problem}"
        );
    }
    let response = app
        .http
        .get(format!("{}?last_event_id=x1", events_url(&app)))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    app.stop().await;
}

#[tokio::test]
async fn ids_that_cannot_resume_on_the_embedded_default() {
    Box::pin(ids_that_cannot_resume(Stack::Embedded)).await;
}

#[tokio::test]
async fn ids_that_cannot_resume_on_the_real_stack() {
    if support::real_stack_available("ids_that_cannot_resume_on_the_real_stack").await {
        Box::pin(ids_that_cannot_resume(Stack::Real)).await;
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_frame(ws: &mut Ws) -> Value {
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Message::Text(text) = ws.next().await.expect("socket open").expect("frame") {
                return serde_json::from_str::<Value>(&text).unwrap();
            }
        }
    })
    .await
    .expect("a frame before the deadline")
}

async fn until_message(ws: &mut Ws, text: &str) -> Vec<Value> {
    let mut read = Vec::new();
    loop {
        let frame = next_frame(ws).await;
        let done = frame["event"] == "signal.created" && frame["data"]["text"] == text;
        read.push(frame);
        if done {
            return read;
        }
    }
}

async fn websocket_resumes(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let ws_url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let connect = |query: String| {
        let bob = bob.clone();
        let ws_url = ws_url.clone();
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = format!("{ws_url}{query}").into_client_request().unwrap();
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {bob}").parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
            assert_eq!(next_frame(&mut ws).await["type"], "ready");
            ws
        }
    };
    let mut ws = connect(String::new()).await;
    send(&app, &alice, &chat, "one").await;
    let frames = until_message(&mut ws, "one").await;
    let last = frames.last().unwrap()["id"].as_str().unwrap().to_owned();
    drop(ws);
    send(&app, &alice, &chat, "two").await;
    send(&app, &alice, &chat, "three").await;

    // At connect.
    let mut ws = connect(format!("?last_event_id={last}")).await;
    let frames = until_message(&mut ws, "three").await;
    let texts: Vec<&str> = frames
        .iter()
        .filter(|f| f["event"] == "signal.created")
        .map(|f| f["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["two", "three"]);

    // With a frame, on an open socket: the stream restarts after that id.
    ws.send(Message::Text(
        json!({"type": "resume", "last_event_id": last})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut frame = next_frame(&mut ws).await;
    while frame["type"] != "ready" {
        frame = next_frame(&mut ws).await;
    }
    let frames = until_message(&mut ws, "three").await;
    assert_eq!(
        frames
            .iter()
            .filter(|f| f["event"] == "signal.created")
            .count(),
        2
    );

    // A malformed id: an error frame, and the socket stays up.
    ws.send(Message::Text(
        json!({"type": "resume", "last_event_id": "nope"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let error = next_frame(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert!(
        error["problem"]["type"]
            .as_str()
            .unwrap()
            .ends_with("bad-last-event-id")
    );
    send(&app, &alice, &chat, "still here").await;
    until_message(&mut ws, "still here").await;

    // An id the log cannot resume from: a reset with the position the stream now stands at, from
    // which the next resume needs no reset.
    let resume = |id: &str| {
        Message::Text(
            json!({"type": "resume", "last_event_id": id})
                .to_string()
                .into(),
        )
    };
    ws.send(resume("987654321987")).await.unwrap();
    let mut frame = next_frame(&mut ws).await;
    while frame["type"] != "reset" {
        frame = next_frame(&mut ws).await;
    }
    assert_eq!(frame["reason"], "unknown-id");
    let reset_at = frame["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a reset frame has an id: {frame}"))
        .to_owned();
    ws.send(resume(&reset_at)).await.unwrap();
    let mut frame = next_frame(&mut ws).await;
    while frame["type"] != "ready" {
        frame = next_frame(&mut ws).await;
    }
    send(&app, &alice, &chat, "after the reset").await;
    let frames = until_message(&mut ws, "after the reset").await;
    assert!(
        frames.iter().all(|f| f["type"] == "event"),
        "resumed from the reset's id: {frames:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn websocket_resumes_on_the_embedded_default() {
    Box::pin(websocket_resumes(Stack::Embedded)).await;
}

#[tokio::test]
async fn websocket_resumes_on_the_real_stack() {
    if support::real_stack_available("websocket_resumes_on_the_real_stack").await {
        Box::pin(websocket_resumes(Stack::Real)).await;
    }
}

/// The WebSocket path of [`a_fresh_stream_resumes_from_its_ready_id`]: a fresh socket's `ready`
/// frame carries the id it starts after, and a client that dropped before its first event resumes
/// from it and gets what was sent meanwhile.
async fn a_fresh_socket_resumes_from_its_ready_id(stack: Stack) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    // Events of others before bob connects: the ready id is past them.
    send(&app, &alice, &chat, "before").await;
    let ws_url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let connect = |query: String| {
        let bob = bob.clone();
        let ws_url = ws_url.clone();
        async move {
            let mut request = format!("{ws_url}{query}").into_client_request().unwrap();
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {bob}").parse().unwrap());
            let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
            let ready = next_frame(&mut ws).await;
            assert_eq!(ready["type"], "ready", "the first frame: {ready}");
            (ws, ready)
        }
    };

    let (fresh, ready) = connect(String::new()).await;
    let start = ready["id"]
        .as_str()
        .unwrap_or_else(|| panic!("a fresh socket's ready frame has an id: {ready}"))
        .to_owned();
    drop(fresh);
    send(&app, &alice, &chat, "while away").await;
    let (mut resumed, ready) = connect(format!("?last_event_id={start}")).await;
    assert_eq!(
        ready.get("id"),
        None,
        "a resumed socket keeps the client's id: {ready}"
    );
    send(&app, &alice, &chat, "live").await;
    let messages: Vec<String> = until_message(&mut resumed, "live")
        .await
        .iter()
        .filter(|f| f["event"] == "signal.created")
        .map(|f| f["data"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, ["while away", "live"]);
    app.stop().await;
}

#[tokio::test]
async fn a_fresh_socket_resumes_from_its_ready_id_on_the_embedded_default() {
    Box::pin(a_fresh_socket_resumes_from_its_ready_id(Stack::Embedded)).await;
}

#[tokio::test]
async fn a_fresh_socket_resumes_from_its_ready_id_on_the_real_stack() {
    if support::real_stack_available("a_fresh_socket_resumes_from_its_ready_id_on_the_real_stack")
        .await
    {
        Box::pin(a_fresh_socket_resumes_from_its_ready_id(Stack::Real)).await;
    }
}

/// A process stopped cleanly, with nothing left in its outbox, forgets its outbox writer: no other
/// process sweeps it after its silence, reading partitions that hold only its removals'
/// tombstones.
async fn a_clean_shutdown_leaves_no_outbox_writer_to_sweep(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    send(&app, &alice, &chat, "before the shutdown").await;
    let config = app.config.clone();
    let data = app.stop_keeping_state().await;

    let store = confab::open_store(&config, false).await.unwrap();
    let writers = store.outbox_writers().await.unwrap();
    assert!(writers.is_empty(), "left for a sweep: {writers:?}");
    drop(data);
    if stack == Stack::Real {
        Box::pin(support::clean_up_real(&config)).await;
    }
}

#[tokio::test]
async fn a_clean_shutdown_leaves_no_outbox_writer_to_sweep_on_the_embedded_default() {
    Box::pin(a_clean_shutdown_leaves_no_outbox_writer_to_sweep(
        Stack::Embedded,
    ))
    .await;
}

#[tokio::test]
async fn a_clean_shutdown_leaves_no_outbox_writer_to_sweep_on_the_real_stack() {
    if support::real_stack_available(
        "a_clean_shutdown_leaves_no_outbox_writer_to_sweep_on_the_real_stack",
    )
    .await
    {
        Box::pin(a_clean_shutdown_leaves_no_outbox_writer_to_sweep(
            Stack::Real,
        ))
        .await;
    }
}
