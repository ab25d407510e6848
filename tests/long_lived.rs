//! Long-lived streams: a browser's `EventSource` reconnects with the URL it was given, so a ticket
//! keeps working for reconnects until the token it came from expires (a WebSocket's does not: no
//! browser reconnects a socket by itself); and no stream or socket outlives its token.

mod support;

use std::time::Duration;

use confab_runtime::identity::DevIdentity;
use futures::StreamExt;
use serde_json::{Value, json};
use support::{DEADLINE, SseStream, Stack};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// A ticket for `token`'s user, as `POST /v1/events/ticket` answers it.
async fn issue_ticket(app: &support::TestApp, token: &str) -> Value {
    let issued = app.post(token, "/v1/events/ticket", &json!({})).await;
    assert_eq!(issued.status(), 200);
    issued.json().await.unwrap()
}

/// Waits until `issued`, a ticket, is past its own lifetime.
async fn outlive(issued: &Value) {
    let expires_at = time::OffsetDateTime::parse(
        issued["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while time::OffsetDateTime::now_utc() <= expires_at + Duration::from_secs(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the ticket outlived the deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_ticket_reconnects_its_stream_after_it_expired() {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Embedded, data.path().to_path_buf());
    config.notifier.ticket_ttl_secs = 1;
    let app = support::spawn_with(Stack::Embedded, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let issued = issue_ticket(&app, &bob).await;
    let ticket = issued["ticket"].as_str().unwrap().to_owned();
    let url = app.url(&format!("/v1/events?ticket={ticket}"));
    let mut stream = SseStream::open(app.http.get(&url)).await;
    let sent = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "before"}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let seen = stream.next_of("signal.created").await;
    drop(stream);

    // Wait until the ticket's own lifetime is over.
    outlive(&issued).await;
    // A new stream with it is refused; a reconnect (with a last event id) is not.
    assert_eq!(app.http.get(&url).send().await.unwrap().status(), 401);
    app.post(
        &alice,
        &format!("/v1/chats/{chat}/signals"),
        &json!({"kind": "message", "text": "while away"}),
    )
    .await;
    let mut resumed = SseStream::open(
        app.http
            .get(&url)
            .header("Last-Event-ID", seen.id.clone().unwrap()),
    )
    .await;
    let missed = resumed.next_of("signal.created").await;
    assert_eq!(missed.data["data"]["text"], "while away");
    app.stop().await;
}

/// A ticket opens a WebSocket within its own lifetime only, with or without a last event id: a
/// browser never reconnects a socket by itself (the client asks for a fresh ticket each time), so
/// the longer life that `EventSource` reconnects need would only let a ticket read from a logged
/// URL open the user's events until their token expired.
#[tokio::test]
async fn an_expired_ticket_opens_no_websocket_even_to_resume() {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Embedded, data.path().to_path_buf());
    config.notifier.ticket_ttl_secs = 1;
    let app = support::spawn_with(Stack::Embedded, config, data).await;
    let bob = app.token("bob").await;
    let issued = issue_ticket(&app, &bob).await;
    let ticket = issued["ticket"].as_str().unwrap().to_owned();
    let open = |last_event_id: Option<&str>| {
        let mut url = format!(
            "{}/v1/ws?ticket={ticket}",
            app.base.replacen("http://", "ws://", 1)
        );
        if let Some(id) = last_event_id {
            url.push_str(&format!("&last_event_id={id}"));
        }
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", "confab.v1".parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    // Within its lifetime it opens one.
    let (socket, _) = open(None).await.expect("a fresh ticket opens a socket");
    drop(socket);

    outlive(&issued).await;
    for last_event_id in [None, Some("1")] {
        match open(last_event_id).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 401, "last_event_id {last_event_id:?}");
            }
            Err(error) => panic!("{error}"),
            Ok(_) => panic!("an expired ticket opened a socket (last_event_id {last_event_id:?})"),
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn streams_and_sockets_end_when_their_token_expires() {
    let app = support::spawn_app(Stack::Embedded).await;
    let short = DevIdentity::open(&app.config.data_dir)
        .unwrap()
        .mint("bob", Duration::from_secs(2));
    app.me(&short).await;
    let opened = tokio::time::Instant::now();

    // SSE: the stream ends.
    let response = app
        .http
        .get(app.url("/v1/events"))
        .bearer_auth(&short)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    // WebSocket: closed with 4001.
    let mut request = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {short}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();

    tokio::time::timeout(DEADLINE, async {
        while let Some(chunk) = body.next().await {
            if chunk.is_err() {
                break;
            }
        }
    })
    .await
    .expect("the stream ends when the token expires");
    let close = tokio::time::timeout(DEADLINE, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    })
    .await
    .expect("the socket closes when the token expires")
    .expect("with a close frame");
    assert_eq!(u16::from(close.code), 4001);
    assert_eq!(close.reason.as_str(), "token expired");
    assert!(
        opened.elapsed() >= Duration::from_secs(1),
        "not before the token's expiry"
    );
    app.stop().await;
}

/// A ticket lasts `notifier.ticket_ttl_secs` (60 s here), or less: never past the token it came
/// from, so a stream opened with it ends when that token expires, as one opened with the token.
#[tokio::test]
async fn a_stream_opened_with_a_ticket_ends_when_its_token_expires() {
    let app = support::spawn_app(Stack::Embedded).await;
    assert!(app.config.notifier.ticket_ttl_secs >= 60);
    let short = DevIdentity::open(&app.config.data_dir)
        .unwrap()
        .mint("bob", Duration::from_secs(2));
    app.me(&short).await;
    let issued = issue_ticket(&app, &short).await;
    let ticket = issued["ticket"].as_str().unwrap();
    SseStream::open(
        app.http
            .get(app.url(&format!("/v1/events?ticket={ticket}"))),
    )
    .await
    .ends()
    .await;
    app.stop().await;
}
