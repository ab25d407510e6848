//! Scale-out, with the real binary: two `api`, two `notifier` and two `ws-plexer` processes on one
//! NATS and one Cassandra. A client of one notifier gets what was posted through either API; when
//! a notifier is killed with SIGKILL while a client streams from it, the client resumes on the
//! other with the last id it saw and loses and duplicates nothing. A logout through one API ends
//! streams on every notifier, and members entering a circle's lobby through two APIs at once are
//! paired once each. The users of a notifier killed with SIGKILL go offline for everyone.

mod support;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{DEADLINE, SseStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn post(api: &str, token: &str, chat: &str, text: &str) {
    let response = reqwest::Client::new()
        .post(format!("{api}/v1/chats/{chat}/signals"))
        .bearer_auth(token)
        .json(&json!({"kind": "message", "text": text}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{text}");
}

/// Messages read until `last` (included), as (id, text).
async fn messages_until(stream: &mut SseStream, last: &str) -> Vec<(u64, String)> {
    let mut read = Vec::new();
    loop {
        let event = stream.next_of("signal.created").await;
        let text = event.data["data"]["text"].as_str().unwrap().to_owned();
        let id = event.id.as_deref().unwrap().parse().unwrap();
        let done = text == last;
        read.push((id, text));
        if done {
            return read;
        }
    }
}

#[tokio::test]
async fn two_of_each_service_and_a_notifier_killed_mid_stream() {
    if !support::real_stack_available("two_of_each_service_and_a_notifier_killed_mid_stream").await
    {
        return;
    }
    let deployment = support::Deployment::new("scale").await;
    let api_a = deployment.start("api", &[]).await;
    let api_b = deployment.start("api", &[]).await;
    let notifier_a = deployment.start("notifier", &[]).await;
    let notifier_b = deployment.start("notifier", &[]).await;
    let plexer_a = deployment.start("ws-plexer", &[]).await;
    let plexer_b = deployment
        .start("ws-plexer", &[("CONFAB_WS_PLEXER__API_URL", &api_b.base)])
        .await;
    let http = reqwest::Client::new();
    let alice = support::keycloak_token("alice", "alice").await;
    let bob = support::keycloak_token("bob", "bob").await;
    let bob_id: Value = http
        .get(format!("{}/v1/me", api_b.base))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat: Value = http
        .post(format!("{}/v1/chats", api_a.base))
        .bearer_auth(&alice)
        .json(&json!({"kind": "group", "name": "scale", "members": [bob_id["id"]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let chat = chat["id"].as_str().unwrap().to_owned();

    // Any API to any notifier and any ws-plexer.
    let mut on_b = SseStream::open(
        http.get(format!("{}/v1/events", notifier_b.base))
            .bearer_auth(&bob),
    )
    .await;
    let mut request = format!("{}/v1/ws", plexer_a.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    post(&api_a.base, &alice, &chat, "through api a").await;
    post(&api_b.base, &alice, &chat, "through api b").await;
    let on_b_seen = messages_until(&mut on_b, "through api b").await;
    assert_eq!(
        on_b_seen
            .iter()
            .map(|(_, t)| t.as_str())
            .collect::<Vec<_>>(),
        ["through api a", "through api b"]
    );
    let mut ws_texts = Vec::new();
    while ws_texts.len() < 2 {
        let frame = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame before the deadline")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = frame {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["event"] == "signal.created" {
                ws_texts.push(frame["data"]["text"].as_str().unwrap().to_owned());
            }
        }
    }
    assert_eq!(ws_texts, ["through api a", "through api b"]);

    // An API call over a socket of a separate ws-plexer process goes to its API process.
    let mut request = format!("{}/v1/ws", plexer_b.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {bob}").parse().unwrap());
    let (mut bobs_socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    futures::SinkExt::send(
        &mut bobs_socket,
        Message::Text(
            json!({"type": "request", "id": 7, "method": "POST",
                   "path": format!("/v1/chats/{chat}/signals"),
                   "body": {"kind": "message", "text": "over plexer b"}})
            .to_string()
            .into(),
        ),
    )
    .await
    .unwrap();
    let response = loop {
        let frame = tokio::time::timeout(DEADLINE, bobs_socket.next())
            .await
            .expect("a frame before the deadline")
            .unwrap()
            .unwrap();
        if let Message::Text(text) = frame {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "response" {
                break frame;
            }
        }
    };
    assert_eq!(response["status"], 201, "{response}");
    messages_until(&mut on_b, "over plexer b").await;

    // bob streams from notifier A, sees part of a burst, and A dies.
    let mut on_a = SseStream::open(
        http.get(format!("{}/v1/events", notifier_a.base))
            .bearer_auth(&bob),
    )
    .await;
    let apis = [&api_a.base, &api_b.base];
    for i in 0..6 {
        post(apis[i % 2], &alice, &chat, &format!("burst {i}")).await;
    }
    let seen = messages_until(&mut on_a, "burst 2").await;
    let (last_seen, _) = *seen.last().unwrap();
    let mut notifier_a = notifier_a;
    notifier_a.child.start_kill().unwrap();
    notifier_a.child.wait().await.unwrap();
    for i in 6..10 {
        post(apis[i % 2], &alice, &chat, &format!("burst {i}")).await;
    }

    let mut resumed = SseStream::open(
        http.get(format!("{}/v1/events", notifier_b.base))
            .bearer_auth(&bob)
            .header("Last-Event-ID", last_seen.to_string()),
    )
    .await;
    let rest = messages_until(&mut resumed, "burst 9").await;
    assert_eq!(
        rest.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        [
            "burst 3", "burst 4", "burst 5", "burst 6", "burst 7", "burst 8", "burst 9"
        ],
        "the rest of the burst, once each, in order"
    );
    assert!(rest.iter().all(|(id, _)| *id > last_seen));

    for process in [api_a, api_b, notifier_b, plexer_a, plexer_b] {
        process.terminate().await;
    }
    deployment.clean_up().await;
}

/// A notifier killed with SIGKILL never sees its connections close: another notifier finds it
/// silent and tells the members of its users' chats that they went offline, within the presence
/// TTL and a heartbeat or two.
#[tokio::test]
async fn a_killed_notifiers_users_go_offline_for_everyone() {
    if !support::real_stack_available("a_killed_notifiers_users_go_offline_for_everyone").await {
        return;
    }
    let deployment = support::Deployment::new("offline").await;
    let api = deployment.start("api", &[]).await;
    let doomed = deployment.start("notifier", &[]).await;
    let survivor = deployment.start("notifier", &[]).await;
    let carol = support::keycloak_token("carol", "carol").await;
    let dave = support::keycloak_token("dave", "dave").await;
    let me = |token: &str| {
        let (api, token) = (api.base.clone(), token.to_owned());
        async move {
            let me: Value = get(&api, &token, "/v1/me").await.json().await.unwrap();
            me["id"].as_str().unwrap().to_owned()
        }
    };
    let (carol_id, dave_id) = (me(&carol).await, me(&dave).await);
    let created = post_json(
        &api.base,
        &carol,
        "/v1/chats",
        &json!({"kind": "group", "name": "offline", "members": [dave_id]}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let http = reqwest::Client::new();
    let mut daves = SseStream::open(
        http.get(format!("{}/v1/events", survivor.base))
            .bearer_auth(&dave),
    )
    .await;
    let carols = SseStream::open(
        http.get(format!("{}/v1/events", doomed.base))
            .bearer_auth(&carol),
    )
    .await;
    let about_carol =
        |event: &support::SseEvent| event.data["data"]["user_id"] == carol_id.as_str();
    loop {
        let event = daves.next_event().await;
        if event.event == "user.connected" && about_carol(&event) {
            break;
        }
    }

    let mut doomed = doomed;
    doomed.child.start_kill().unwrap();
    doomed.child.wait().await.unwrap();
    drop(carols);
    let ttl = confab_runtime::presence::PRESENCE_TTL;
    let every = confab_runtime::presence::HEARTBEAT_EVERY;
    let deadline = tokio::time::Instant::now() + ttl + every * 3;
    let offline = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let event = daves
            .next_event_within(left)
            .await
            .expect("carol announced offline within the TTL and a few heartbeats");
        if matches!(
            event.event.as_str(),
            "user.disconnected" | "presence.updated"
        ) && about_carol(&event)
        {
            break event;
        }
    };
    assert_eq!(
        offline.data["data"]["state"], "offline",
        "{:?}",
        offline.data
    );
    let presence: Value = get(&api.base, &dave, &format!("/v1/users/{carol_id}/presence"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(presence["state"], "offline", "{presence}");

    for process in [api, survivor] {
        process.terminate().await;
    }
    deployment.clean_up().await;
}

async fn get(base: &str, token: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn post_json(base: &str, token: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Logging out everywhere through one `confab api` process ends the user's stream on a separate
/// `confab notifier` process at once, and the other API process refuses the old token; nobody
/// else is affected.
#[tokio::test]
async fn a_logout_through_one_api_ends_streams_and_tokens_everywhere() {
    if !support::real_stack_available("a_logout_through_one_api_ends_streams_and_tokens_everywhere")
        .await
    {
        return;
    }
    let deployment = support::Deployment::new("logout").await;
    let api_a = deployment.start("api", &[]).await;
    let api_b = deployment.start("api", &[]).await;
    let notifier = deployment.start("notifier", &[]).await;
    let http = reqwest::Client::new();
    let alice = support::keycloak_token("alice", "alice").await;
    let bob = support::keycloak_token("bob", "bob").await;
    let alice_id = get(&api_b.base, &alice, "/v1/me")
        .await
        .json::<Value>()
        .await
        .unwrap()["id"]
        .clone();
    assert_eq!(get(&api_b.base, &bob, "/v1/me").await.status(), 200);
    let mut alices = SseStream::open(
        http.get(format!("{}/v1/events", notifier.base))
            .bearer_auth(&alice),
    )
    .await;
    let mut bobs = SseStream::open(
        http.get(format!("{}/v1/events", notifier.base))
            .bearer_auth(&bob),
    )
    .await;

    let response = post_json(&api_a.base, &alice, "/v1/me/logout-all", &json!({})).await;
    assert_eq!(response.status(), 204);
    alices.ends().await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = get(&api_b.base, &alice, "/v1/me").await.status();
        if status == 401 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the other API process still accepts the token ({status})"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(get(&api_a.base, &alice, "/v1/me").await.status(), 401);
    // bob's stream and token live on.
    let chat: Value = post_json(
        &api_b.base,
        &bob,
        "/v1/chats",
        &json!({"kind": "group", "name": "after", "members": [alice_id]}),
    )
    .await
    .json()
    .await
    .unwrap();
    post(
        &api_a.base,
        &bob,
        chat["id"].as_str().unwrap(),
        "still here",
    )
    .await;
    messages_until(&mut bobs, "still here").await;

    // A process started afterwards refuses the token from its first request.
    let api_c = deployment.start("api", &[]).await;
    assert_eq!(get(&api_c.base, &alice, "/v1/me").await.status(), 401);
    assert_eq!(get(&api_c.base, &bob, "/v1/me").await.status(), 200);
    drop(bobs);
    for process in [api_a, api_b, api_c, notifier] {
        process.terminate().await;
    }
    deployment.clean_up().await;
}

/// Four members of a circle enter its lobby at once, two through each of two `confab api`
/// processes, round after round: every pairing is agreed by both partners, nobody is in two, and
/// each paired member has exactly the one chat of their pairing.
#[tokio::test]
async fn lobby_entries_racing_through_two_api_processes_pair_nobody_twice() {
    if !support::real_stack_available(
        "lobby_entries_racing_through_two_api_processes_pair_nobody_twice",
    )
    .await
    {
        return;
    }
    let deployment = support::Deployment::new("pairing").await;
    let apis = [
        deployment.start("api", &[]).await,
        deployment.start("api", &[]).await,
    ];
    let names = ["alice", "bob", "carol", "dave"];
    let mut people = Vec::new();
    for name in names {
        let token = support::keycloak_token(name, name).await;
        let me: Value = get(&apis[0].base, &token, "/v1/me")
            .await
            .json()
            .await
            .unwrap();
        people.push((token, me["id"].as_str().unwrap().to_owned()));
    }
    let created = post_json(
        &apis[0].base,
        &people[0].0,
        "/v1/circles",
        &json!({"name": "race"}),
    )
    .await;
    assert_eq!(created.status(), 201);
    let circle: Value = created.json().await.unwrap();
    for (i, (token, _)) in people.iter().enumerate().skip(1) {
        let joined = post_json(
            &apis[i % 2].base,
            token,
            "/v1/circles/join",
            &json!({"access_code": circle["access_code"], "display_name": format!("member {i}")}),
        )
        .await;
        assert_eq!(joined.status(), 201);
    }
    let path = format!("/v1/circles/{}/pair", circle["id"].as_str().unwrap());
    let bases = [apis[0].base.as_str(), apis[1].base.as_str()];
    for round in 0..4 {
        support::race_lobby_round(&bases, &people, &path, round).await;
    }
    let [first, second] = apis;
    first.terminate().await;
    second.terminate().await;
    deployment.clean_up().await;
}
