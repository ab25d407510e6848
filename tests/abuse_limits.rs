//! Abuse limits: rate limits per user and class (over HTTP and WebSocket request frames) and per
//! address without a login, answered 429 with `Retry-After`; CORS for configured origins only; body
//! size limits; header and slow-body timeouts.

mod support;

use support::on_both_stacks;

use std::time::Duration;

use confab_runtime::config::{Config, RateLimit};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{DEADLINE, Stack, TestApp};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn spawn(stack: Stack, configure: impl FnOnce(&mut Config)) -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    configure(&mut config);
    support::spawn_with(stack, config, data).await
}

/// Asserts a 429 problem with a `Retry-After` of at least a second; answers the body.
async fn assert_limited(response: reqwest::Response) -> Value {
    assert_eq!(response.status(), 429);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["type"]
            .as_str()
            .unwrap()
            .ends_with("too-many-requests")
    );
    assert_eq!(problem["retry_after"], retry_after);
    problem
}

fn message(nonce: &str) -> Value {
    json!({"kind": "message", "nonce": nonce, "text": "hello"})
}

async fn rate_limits_are_per_user_and_class_over_http_and_websocket(stack: Stack) {
    // Three sends and two searches, then one token every 100 s.
    let app = spawn(stack, |config| {
        config.limits.send = RateLimit::new(0.01, 3);
        config.limits.search = RateLimit::new(0.01, 2);
    })
    .await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let signals = format!("/v1/chats/{chat}/signals");
    for i in 0..3 {
        let sent = app.post(&bob, &signals, &message(&format!("b{i}"))).await;
        assert_eq!(sent.status(), 201);
    }
    let problem = assert_limited(app.post(&bob, &signals, &message("b3")).await).await;
    assert!(problem["detail"].as_str().unwrap().contains("messages"));
    // Another user has their own allowance; another class is not touched.
    assert_eq!(
        app.post(&alice, &signals, &message("a0")).await.status(),
        201
    );
    assert_eq!(app.get(&bob, &signals).await.status(), 200);
    for _ in 0..2 {
        assert_eq!(app.get(&bob, "/v1/users?q=al").await.status(), 200);
    }
    assert_limited(app.get(&bob, "/v1/users?q=al").await).await;

    // A WebSocket request frame meets the same limit, and says when to retry in its body.
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "confab.v1".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "request", "id": "s", "method": "POST", "path": signals,
               "body": message("ws")})
        .to_string()
        .into(),
    ))
    .await
    .unwrap();
    let response = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Message::Text(text) = ws.next().await.unwrap().unwrap() {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "response" {
                    return frame;
                }
            }
        }
    })
    .await
    .expect("a response frame");
    assert_eq!(response["status"], 429, "{response}");
    assert!(response["body"]["retry_after"].as_u64().unwrap() >= 1);
    app.stop().await;
}
on_both_stacks!(rate_limits_are_per_user_and_class_over_http_and_websocket);

/// Queue joins and leaves, and circle joins by access code, have limits of their own: a user who
/// joins and leaves a queue over and over, or tries access codes, is answered 429 once past them.
/// A code that opens nothing counts as much as one that opens a circle; reading one's place in a
/// queue is not counted; another user has their own allowance.
async fn queue_and_circle_joins_are_rate_limited(stack: Stack) {
    let app = spawn(stack, |config| {
        config.limits.queue = RateLimit::new(0.01, 3);
        config.limits.circle_join = RateLimit::new(0.01, 2);
    })
    .await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let join = "/v1/queues/talk/join";
    assert_eq!(app.post(&alice, join, &json!({})).await.status(), 202);
    assert_eq!(app.delete(&alice, "/v1/queues/talk").await.status(), 204);
    assert_eq!(app.post(&alice, join, &json!({})).await.status(), 202);
    let problem = assert_limited(app.delete(&alice, "/v1/queues/talk").await).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("queue"),
        "{problem}"
    );
    assert_limited(app.post(&alice, "/v1/queues/vent/join", &json!({})).await).await;
    let status = app.get(&alice, "/v1/queues/talk").await;
    assert_eq!(status.status(), 200);
    let status: Value = status.json().await.unwrap();
    assert_eq!(status["state"], "waiting", "{status}");
    assert_eq!(app.post(&bob, join, &json!({})).await.status(), 200);

    let created = app
        .post(&alice, "/v1/circles", &json!({"name": "few"}))
        .await;
    assert_eq!(created.status(), 201);
    let circle: Value = created.json().await.unwrap();
    let code = circle["access_code"].as_str().unwrap();
    let join_with = |code: &str| json!({"access_code": code, "display_name": "Bob"});
    for wrong in ["23456789ABCD", "23456789ABCE"] {
        let tried = app.post(&bob, "/v1/circles/join", &join_with(wrong)).await;
        assert_eq!(tried.status(), 404);
    }
    let problem = assert_limited(app.post(&bob, "/v1/circles/join", &join_with(code)).await).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("circle joins"),
        "{problem}"
    );
    let carol = app.token("carol").await;
    let joined = app.post(&carol, "/v1/circles/join", &join_with(code)).await;
    assert_eq!(joined.status(), 201);
    app.stop().await;
}
on_both_stacks!(queue_and_circle_joins_are_rate_limited);

/// Sends `request` until it is answered 429, at most `most` times; answers how many went through
/// before, with the refusal's problem.
async fn until_limited<F, Fut>(most: usize, mut request: F) -> (usize, Value)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = reqwest::Response>,
{
    for done in 0..most {
        let response = request(done).await;
        if response.status() == 429 {
            return (done, assert_limited(response).await);
        }
        assert!(
            response.status().is_success(),
            "{}: {}",
            response.status(),
            response.text().await.unwrap()
        );
    }
    panic!("still not limited after {most} requests");
}

/// People put into chats and calls started are limited per user with the default limits: each
/// of them reaches others (a chat's members get its messages, calls and pushes; a call rings every
/// member and pushes to each who misses it), so one user must not flood thousands with them. A
/// person making a few chats, adding a few members or calling a few times in a row is never
/// refused; another user has their own allowance.
async fn chats_members_and_calls_are_rate_limited(stack: Stack) {
    let app = spawn(stack, |_| {}).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let dave = app.token("dave").await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let dave_id = app.me(&dave).await;

    // Three people a group: the default allowance is a few hundred people, then a few a minute.
    let group = json!({"kind": "group", "name": "many", "members": [bob_id, carol_id, dave_id]});
    let (made, problem) = until_limited(400, |_| app.post(&alice, "/v1/chats", &group)).await;
    assert!(
        (60..150).contains(&made),
        "refused after {made} chats of three: {problem}"
    );
    assert!(
        problem["detail"].as_str().unwrap().contains("chats"),
        "{problem}"
    );
    assert_eq!(
        app.post(&carol, "/v1/chats", &group).await.status(),
        201,
        "carol has her own allowance"
    );

    // Calls have their own allowance: alice, refused chats, still calls.
    let chat = app.group_chat(&bob, &[&carol_id]).await;
    let (calls, no_body) = (format!("/v1/chats/{chat}/calls"), json!({}));
    let alice_id = app.me(&alice).await;
    let members = format!("/v1/chats/{chat}/members");
    assert_eq!(
        app.post(&bob, &members, &json!({"user_id": alice_id}))
            .await
            .status(),
        201
    );
    let (started, problem) = until_limited(200, |_| app.post(&alice, &calls, &no_body)).await;
    assert!(started >= 5, "refused after {started} calls: {problem}");
    assert!(
        problem["detail"].as_str().unwrap().contains("calls"),
        "{problem}"
    );
    assert_eq!(app.post(&carol, &calls, &no_body).await.status(), 200);
    app.stop().await;
}
on_both_stacks!(chats_members_and_calls_are_rate_limited);

/// A user (and chat) id no one has.
const NOBODY: &str = "00000000-0000-4000-8000-00000000b0d1";

/// The chats allowance counts the people a user puts into chats, not requests: a new group costs
/// its members other than the creator, a new direct chat one, an addition one. A request that
/// changes nothing (a direct chat found again, a member added again) and one refused (by a rule,
/// or by the limit itself) cost nothing.
async fn the_chats_allowance_counts_people_put_into_chats(stack: Stack) {
    // Four people each, and one more every 1,000 s: nothing flows in while the test runs.
    let app = spawn(stack, |config| {
        config.limits.chats = RateLimit::new(0.001, 4);
    })
    .await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let dave = app.token("dave").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let dave_id = app.me(&dave).await;
    let group = |members: &[&str]| json!({"kind": "group", "name": "team", "members": members});

    // A group of three others costs three; a group of two more is then refused, and one of one
    // fits (the refusal took nothing). The creator named, or a member named twice, is not counted.
    let made = app
        .post(&alice, "/v1/chats", &group(&[&bob_id, &carol_id, &dave_id]))
        .await;
    assert_eq!(made.status(), 201);
    let problem = assert_limited(
        app.post(&alice, "/v1/chats", &group(&[&bob_id, &carol_id]))
            .await,
    )
    .await;
    assert!(
        problem["detail"].as_str().unwrap().contains("chats"),
        "{problem}"
    );
    let made = app
        .post(&alice, "/v1/chats", &group(&[&bob_id, &bob_id, &alice_id]))
        .await;
    assert_eq!(made.status(), 201);
    assert_limited(app.post(&alice, "/v1/chats", &group(&[&carol_id])).await).await;

    // A direct chat costs one, and finding it again nothing.
    let direct = json!({"kind": "direct", "members": [carol_id]});
    assert_eq!(app.post(&bob, "/v1/chats", &direct).await.status(), 201);
    for _ in 0..6 {
        assert_eq!(app.post(&bob, "/v1/chats", &direct).await.status(), 200);
    }
    // Adding a member costs one each, and adding one again nothing.
    let chat = app.group_chat(&bob, &[&carol_id]).await;
    let members = format!("/v1/chats/{chat}/members");
    for _ in 0..6 {
        let again = app
            .post(&bob, &members, &json!({"user_id": carol_id}))
            .await;
        assert_eq!(again.status(), 200);
    }
    for user in [&dave_id, &alice_id] {
        let added = app.post(&bob, &members, &json!({"user_id": user})).await;
        assert_eq!(added.status(), 201);
    }
    // 1 + 1 + 2 = 4: the next addition is refused, the repeats cost nothing.
    assert_eq!(
        app.delete(&bob, &format!("{members}/{dave_id}"))
            .await
            .status(),
        204
    );
    assert_limited(app.post(&bob, &members, &json!({"user_id": dave_id})).await).await;

    // A refused request costs one, as a request, not the people it named: a member who may not
    // add (403), a chat that does not exist (404), a group of two naming an unknown user (422).
    let no_chat = format!("/v1/chats/{NOBODY}/members");
    let refused = app
        .post(&carol, &members, &json!({"user_id": dave_id}))
        .await;
    assert_eq!(refused.status(), 403);
    let refused = app
        .post(&carol, &no_chat, &json!({"user_id": bob_id}))
        .await;
    assert_eq!(refused.status(), 404);
    let refused = app
        .post(&carol, "/v1/chats", &group(&[&bob_id, NOBODY]))
        .await;
    assert_eq!(refused.status(), 422);
    // carol's fourth is there, and only it.
    let direct = json!({"kind": "direct", "members": [dave_id]});
    assert_eq!(app.post(&carol, "/v1/chats", &direct).await.status(), 201);
    assert_limited(app.post(&carol, "/v1/chats", &group(&[&bob_id])).await).await;
    app.stop().await;
}
on_both_stacks!(the_chats_allowance_counts_people_put_into_chats);

/// A group may start with more people than the allowance holds: it is made when the allowance is
/// full, and leaves its creator in debt, so their next chat waits until the allowance has refilled
/// to cover it. When the allowance is not full, such a group waits until it is.
async fn a_group_larger_than_the_allowance_is_made_and_leaves_a_debt(stack: Stack) {
    // Two people each, one more every 1,000 s.
    let app = spawn(stack, |config| {
        config.limits.chats = RateLimit::new(0.001, 2);
    })
    .await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let dave = app.token("dave").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let dave_id = app.me(&dave).await;
    let group = |members: &[&str]| json!({"kind": "group", "name": "team", "members": members});

    let made = app
        .post(&alice, "/v1/chats", &group(&[&bob_id, &carol_id, &dave_id]))
        .await;
    assert_eq!(made.status(), 201);
    // Three taken from two: one person in debt, and one more to cover: 2,000 s.
    let direct = json!({"kind": "direct", "members": [bob_id]});
    let problem = assert_limited(app.post(&alice, "/v1/chats", &direct).await).await;
    let wait = problem["retry_after"].as_u64().unwrap();
    assert!((1_990..=2_000).contains(&wait), "{problem}");

    // bob, one person short of full, waits for it (1,000 s) before a group of three.
    assert_eq!(
        app.post(&bob, "/v1/chats", &group(&[&alice_id]))
            .await
            .status(),
        201
    );
    let problem = assert_limited(
        app.post(&bob, "/v1/chats", &group(&[&alice_id, &carol_id, &dave_id]))
            .await,
    )
    .await;
    let wait = problem["retry_after"].as_u64().unwrap();
    assert!((990..=1_000).contains(&wait), "{problem}");
    // The refused group took nothing: the last person bob has still goes.
    assert_eq!(
        app.post(&bob, "/v1/chats", &group(&[&carol_id]))
            .await
            .status(),
        201
    );
    assert_limited(app.post(&bob, "/v1/chats", &group(&[&dave_id])).await).await;
    app.stop().await;
}
on_both_stacks!(a_group_larger_than_the_allowance_is_made_and_leaves_a_debt);

/// Listing who has read or received a signal has a limit of its own, views and deliveries
/// counted together (each page reads up to a thousand markers of a large chat); another user has
/// their own allowance.
async fn views_and_deliveries_are_rate_limited(stack: Stack) {
    let app = spawn(stack, |config| {
        config.limits.receipts = RateLimit::new(0.01, 3);
    })
    .await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let signals = format!("/v1/chats/{chat}/signals");
    let sent = app.post(&alice, &signals, &message("m")).await;
    assert_eq!(sent.status(), 201);
    let sent: Value = sent.json().await.unwrap();
    let signal = format!("{signals}/{}", sent["id"].as_str().unwrap());
    let (views, deliveries) = (format!("{signal}/views"), format!("{signal}/deliveries"));
    for path in [&views, &deliveries, &views] {
        assert_eq!(app.get(&bob, path).await.status(), 200, "{path}");
    }
    let problem = assert_limited(app.get(&bob, &deliveries).await).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("views"),
        "{problem}"
    );
    assert_limited(app.get(&bob, &views).await).await;
    // Other reads are not counted, and alice has her own allowance.
    assert_eq!(app.get(&bob, &signals).await.status(), 200);
    assert_eq!(app.get(&alice, &views).await.status(), 200);
    app.stop().await;
}
on_both_stacks!(views_and_deliveries_are_rate_limited);

/// Read and delivery markers have a limit of their own, counted together (each move is a store
/// write and, in a group, an event to every member), and so do typing notices across all of a
/// user's chats (each is an event to every member; the two-second throttle is per chat only),
/// counted only when they publish.
async fn markers_and_typing_are_rate_limited(stack: Stack) {
    let app = spawn(stack, |config| {
        config.limits.marks = RateLimit::new(0.01, 3);
        config.limits.typing = RateLimit::new(0.01, 2);
    })
    .await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let other = app.group_chat(&alice, &[&bob_id]).await;
    let third = app.group_chat(&alice, &[&bob_id]).await;
    let signals = format!("/v1/chats/{chat}/signals");
    let sent = app.post(&alice, &signals, &message("m")).await;
    assert_eq!(sent.status(), 201);
    let sent: Value = sent.json().await.unwrap();
    let up_to = json!({"up_to": sent["id"]});
    let (read, delivered) = (
        format!("/v1/chats/{chat}/read"),
        format!("/v1/chats/{chat}/delivered"),
    );
    for path in [&delivered, &read, &read] {
        assert_eq!(app.post(&bob, path, &up_to).await.status(), 200, "{path}");
    }
    let problem = assert_limited(app.post(&bob, &delivered, &up_to).await).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("markers"),
        "{problem}"
    );
    assert_limited(app.post(&bob, &read, &up_to).await).await;
    // Typing is not counted with markers, and is limited across chats. Calls the per-chat
    // throttle holds back (closer than two seconds in one chat) publish nothing and count nothing.
    let typing = |chat: &str| format!("/v1/chats/{chat}/typing");
    for chat in [&chat, &chat, &other] {
        let typed = app.post(&bob, &typing(chat), &json!({})).await;
        assert_eq!(typed.status(), 204);
    }
    let problem = assert_limited(app.post(&bob, &typing(&third), &json!({})).await).await;
    assert!(
        problem["detail"].as_str().unwrap().contains("typing"),
        "{problem}"
    );
    // Other requests are not counted, and alice has her own allowances.
    assert_eq!(app.post(&bob, &signals, &message("b")).await.status(), 201);
    assert_eq!(app.post(&alice, &read, &up_to).await.status(), 200);
    assert_eq!(
        app.post(&alice, &typing(&chat), &json!({})).await.status(),
        204
    );
    app.stop().await;
}
on_both_stacks!(markers_and_typing_are_rate_limited);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_login_are_limited_per_address() {
    let app = spawn(Stack::Embedded, |config| {
        config.limits.public = RateLimit::new(0.01, 3);
    })
    .await;
    let alice = app.token("alice").await;
    // spawn_with's readiness probes are not counted.
    for _ in 0..3 {
        let response = app
            .http
            .get(app.url("/v1/openapi.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_limited(
        app.http
            .get(app.url("/v1/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_limited(app.http.get(app.url("/v1/me")).send().await.unwrap()).await;
    // Probes and signed-in calls are not limited per address.
    for path in ["/health", "/ready"] {
        assert_eq!(
            app.http.get(app.url(path)).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(app.get(&alice, "/v1/me").await.status(), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_token_does_not_verify_are_limited_per_address() {
    let app = spawn(Stack::Embedded, |config| {
        config.limits.public = RateLimit::new(0.01, 3);
    })
    .await;
    let alice = app.token("alice").await;
    // Any Authorization header at all must not buy its way past the address's allowance.
    for attempt in 0..3 {
        let response = app
            .http
            .get(app.url("/v1/me"))
            .bearer_auth("garbage")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "attempt {attempt}");
    }
    let problem = assert_limited(
        app.http
            .get(app.url("/v1/me"))
            .bearer_auth("garbage")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(problem["detail"].as_str().unwrap().contains("address"));
    // A route that ignores the header is no way around it either.
    assert_limited(
        app.http
            .get(app.url("/v1/openapi.json"))
            .header("authorization", "Basic Zm9vOmJhcg==")
            .send()
            .await
            .unwrap(),
    )
    .await;
    // A token that verifies keeps its user's own limits, from the same address.
    for _ in 0..5 {
        assert_eq!(app.get(&alice, "/v1/me").await.status(), 200);
    }
    app.stop().await;
}

/// A browser opens its event streams with a ticket, not a header: those are a signed-in user's
/// requests, not counted per address (behind a proxy every browser would share its bucket, and a
/// burst of reconnects would be refused). A ticket that does not verify is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_with_a_ticket_are_not_limited_per_address() {
    let app = spawn(Stack::Embedded, |config| {
        config.limits.public = RateLimit::new(0.01, 3);
    })
    .await;
    let alice = app.token("alice").await;
    let issued = app
        .http
        .post(app.url("/v1/events/ticket"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(issued.status(), 200);
    let ticket = issued.json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned();
    let open = |ticket: &str| {
        app.http
            .get(app.url("/v1/events"))
            .query(&[("ticket", ticket)])
            .send()
    };
    let mut streams = Vec::new();
    for attempt in 0..5 {
        let stream = open(&ticket).await.unwrap();
        assert_eq!(stream.status(), 200, "stream {attempt}");
        streams.push(stream);
    }
    drop(streams);
    for attempt in 0..3 {
        assert_eq!(
            open("forged").await.unwrap().status(),
            401,
            "attempt {attempt}"
        );
    }
    assert_limited(open("forged").await.unwrap()).await;
    app.stop().await;
}

/// Behind a proxy every client has the proxy's address: only a trusted proxy's `X-Forwarded-For`
/// says whose allowance a request takes, and only its own entry, not what the client wrote left
/// of it. From any other peer the header changes nothing. IPv6 clients share their /64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_trusted_proxies_each_forwarded_client_has_its_own_allowance() {
    let app = spawn(Stack::Embedded, |config| {
        config.limits.public = RateLimit::new(0.01, 2);
        config.limits.trusted_proxies = "127.0.0.0/8, ::1".into();
    })
    .await;
    let from = |forwarded_for: &str| {
        app.http
            .get(app.url("/v1/openapi.json"))
            .header("x-forwarded-for", forwarded_for)
            .send()
    };
    for attempt in 0..2 {
        assert_eq!(
            from("203.0.113.5").await.unwrap().status(),
            200,
            "attempt {attempt}"
        );
    }
    assert_limited(from("203.0.113.5").await.unwrap()).await;
    // A client that writes other addresses before its own is still itself.
    assert_limited(from("198.51.100.1, 203.0.113.5").await.unwrap()).await;
    // Another client behind the same proxy has its own allowance.
    assert_eq!(from("203.0.113.6").await.unwrap().status(), 200);
    assert_eq!(
        from("198.51.100.1, 203.0.113.6").await.unwrap().status(),
        200
    );
    assert_limited(from("203.0.113.6").await.unwrap()).await;
    // Another address of the same IPv6 /64 is the same client; the next /64 is another.
    for attempt in 0..2 {
        assert_eq!(
            from("2001:db8:1:2::1").await.unwrap().status(),
            200,
            "attempt {attempt}"
        );
    }
    assert_limited(from("2001:db8:1:2:ffff::9").await.unwrap()).await;
    assert_eq!(from("2001:db8:1:3::1").await.unwrap().status(), 200);
    app.stop().await;

    // Without trusted proxies the peer's address counts, whatever the header says.
    let app = spawn(Stack::Embedded, |config| {
        config.limits.public = RateLimit::new(0.01, 2);
    })
    .await;
    for (attempt, forwarded_for) in ["203.0.113.1", "203.0.113.2"].into_iter().enumerate() {
        let response = app
            .http
            .get(app.url("/v1/openapi.json"))
            .header("x-forwarded-for", forwarded_for)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "attempt {attempt}");
    }
    assert_limited(
        app.http
            .get(app.url("/v1/openapi.json"))
            .header("x-forwarded-for", "203.0.113.3")
            .send()
            .await
            .unwrap(),
    )
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_configured_origins_only() {
    let allowed = "https://app.example.com";
    let app = spawn(Stack::Embedded, |config| {
        config.limits.cors_origins = format!("{allowed}, https://other.example.com");
    })
    .await;
    let alice = app.token("alice").await;
    for (path, method) in [
        ("/v1/chats", "POST"),
        ("/v1/events/ticket", "POST"),
        ("/v1/events", "GET"),
        ("/v1/ws", "GET"),
    ] {
        let preflight = |origin: &'static str| {
            app.http
                .request(reqwest::Method::OPTIONS, app.url(path))
                .header("origin", origin)
                .header("access-control-request-method", method)
                .header(
                    "access-control-request-headers",
                    "authorization,content-type",
                )
                .send()
        };
        let response = preflight(allowed).await.unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        assert_eq!(
            response.headers()["access-control-allow-origin"],
            allowed,
            "{path}"
        );
        let headers = response.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .to_lowercase();
        assert!(headers.contains("authorization") && headers.contains("content-type"));
        assert!(
            response.headers()["access-control-allow-methods"]
                .to_str()
                .unwrap()
                .contains(method)
        );
        let refused = preflight("https://evil.example.com").await.unwrap();
        assert!(
            refused
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{path}: another origin gets no CORS headers"
        );
    }
    // The real request from the allowed origin carries the header, and exposes Retry-After.
    let response = app
        .http
        .get(app.url("/v1/me"))
        .bearer_auth(&alice)
        .header("origin", allowed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], allowed);
    app.stop().await;

    // No origins configured (the default): no CORS headers at all.
    let app = spawn(Stack::Embedded, |_| {}).await;
    let response = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/v1/chats"))
        .header("origin", allowed)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_limited_and_refused_with_a_problem() {
    let app = spawn(Stack::Embedded, |config| {
        config.limits.body_bytes = 4 * 1024;
    })
    .await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let big = json!({"kind": "message", "nonce": "big", "text": "x".repeat(5 * 1024)});
    for path in [
        format!("/v1/chats/{chat}/signals"),
        "/v1/chats".to_owned(),
        "/v1/events/ticket".to_owned(),
    ] {
        let response = app.post(&alice, &path, &big).await;
        assert_eq!(response.status(), 413, "{path}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    // Over the WebSocket too: the frame's body goes through the same routes.
    app.stop().await;

    // The default is 64 KiB: a 100 KiB message body is refused before it is parsed.
    let app = spawn(Stack::Embedded, |_| {}).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let huge = json!({"kind": "message", "nonce": "huge", "text": "x".repeat(100 * 1024)});
    let response = app
        .post(&alice, &format!("/v1/chats/{chat}/signals"), &huge)
        .await;
    assert_eq!(response.status(), 413);
    app.stop().await;
}

/// A refusal that comes before an upload's body is read (no login, not a member, storage down)
/// still reaches the client: the edge reads the rest of the body after answering, so a client
/// still sending is not cut off with a reset instead of the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_uploads_get_their_answer_while_still_sending() {
    let app = spawn(Stack::Embedded, |_| {}).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let carol = app.token("carol").await;
    let body = vec![7u8; 24 * 1024 * 1024];
    for (who, token, status) in [
        ("no login", "not-a-token", 401),
        ("not a member", carol.as_str(), 403),
    ] {
        let response = app
            .http
            .post(app.url(&format!("/v1/chats/{chat}/attachments")))
            .query(&[("name", "f.bin")])
            .bearer_auth(token)
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|error| panic!("{who}: no answer: {error:?}"));
        assert_eq!(response.status(), status, "{who}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{who}"
        );
    }
    app.stop().await;
}

/// Reads what the server sends until it closes the connection; panics after the deadline.
async fn read_until_closed(tcp: &mut tokio::net::TcpStream) -> String {
    let mut received = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut received))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    let app = spawn(Stack::Embedded, |config| {
        config.limits.header_timeout_secs = 1;
        config.limits.body_idle_timeout_secs = 1;
        config.limits.request_timeout_secs = 2;
    })
    .await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let addr = app.base.trim_start_matches("http://").to_owned();

    // Headers that never end: the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    read_until_closed(&mut tcp).await;
    assert!(started.elapsed() < Duration::from_secs(10));

    let head = |length: usize| {
        format!(
            "POST /v1/chats/{chat}/signals HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
        )
    };
    let body = message("slow").to_string();

    // A body that stops arriving: a 400 problem once it has stalled for the idle timeout.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(head(body.len()).as_bytes()).await.unwrap();
    tcp.write_all(&body.as_bytes()[..5]).await.unwrap();
    let answer = read_until_closed(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("application/problem+json"));

    // A body that trickles in, never stalling long: 408 once the request takes too long.
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tcp.write_all(head(body.len()).as_bytes()).await.unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let trickle = tokio::spawn(async move {
        for byte in body.into_bytes() {
            if writer.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut received = Vec::new();
    tokio::time::timeout(DEADLINE, reader.read_to_end(&mut received))
        .await
        .expect("an answer before the deadline")
        .ok();
    let answer = String::from_utf8_lossy(&received);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request-timeout"));
    trickle.abort();
    app.stop().await;
}

/// Stream opens and resumes are limited per user (`limits.stream_opens`), with the default limit:
/// each reads the user's chats from the store, and a resume scans the log after its id, so a loop
/// of `resume` frames or of `GET /v1/events?last_event_id=` must not cost that without end. A
/// client reconnecting its streams is never refused; past the burst a `resume` frame gets an error
/// frame (the socket keeps its stream) and an open over HTTP a 429; another user has their own
/// allowance.
async fn stream_opens_and_resumes_are_rate_limited(stack: Stack) {
    let app = spawn(stack, |_| {}).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let ready: Value = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Message::Text(text) = ws.next().await.unwrap().unwrap() {
                return serde_json::from_str(&text).unwrap();
            }
        }
    })
    .await
    .expect("a frame before the deadline");
    assert_eq!(ready["type"], "ready", "{ready}");
    let last_id = ready["id"].as_str().unwrap().to_owned();
    let resume = json!({"type": "resume", "last_event_id": last_id}).to_string();
    let mut resumed = 0;
    let refused = loop {
        assert!(resumed < 200, "still not limited after {resumed} resumes");
        ws.send(Message::Text(resume.clone().into())).await.unwrap();
        let answer = tokio::time::timeout(DEADLINE, async {
            loop {
                if let Message::Text(text) = ws.next().await.unwrap().unwrap() {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] == "ready" || frame["type"] == "error" {
                        return frame;
                    }
                }
            }
        })
        .await
        .expect("an answer to the resume");
        if answer["type"] == "error" {
            break answer;
        }
        resumed += 1;
    };
    // The socket's own open and 63 resumes at least: a client reconnecting all its streams a
    // node holds at most (32), twice, is not refused.
    assert!(resumed >= 63, "refused after {resumed} resumes: {refused}");
    assert_eq!(refused["problem"]["status"], 429, "{refused}");
    assert!(
        refused["problem"]["type"]
            .as_str()
            .unwrap()
            .ends_with("too-many-requests"),
        "{refused}"
    );
    assert!(refused["problem"]["retry_after"].as_u64().unwrap() >= 1);
    // The refused resume left the socket its stream.
    app.post(
        &alice,
        &format!("/v1/chats/{chat}/signals"),
        &message("live"),
    )
    .await;
    tokio::time::timeout(DEADLINE, async {
        loop {
            if let Message::Text(text) = ws.next().await.unwrap().unwrap() {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["event"] == "signal.created" {
                    return;
                }
            }
        }
    })
    .await
    .expect("the socket's stream goes on");

    // Over HTTP, the same allowance: a stream open is refused with a 429 problem.
    let events = app.url("/v1/events");
    let (opened, problem) = until_limited(10, |_| {
        let open = app
            .http
            .get(&events)
            .bearer_auth(&bob)
            .query(&[("last_event_id", last_id.as_str())])
            .send();
        async move { open.await.unwrap() }
    })
    .await;
    assert!(opened <= 2, "{opened} opens after the limit was reached");
    assert!(
        problem["detail"].as_str().unwrap().contains("stream"),
        "{problem}"
    );
    let alices = app
        .http
        .get(&events)
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(alices.status(), 200);
    drop(ws);
    app.stop().await;
}
on_both_stacks!(stream_opens_and_resumes_are_rate_limited);
