//! Scale-out, with the real binary: two `api`, two `notifier` and two `ws-plexer` processes on one
//! NATS and one Cassandra. A client of one notifier gets what was posted through either API; when
//! a notifier is killed with SIGKILL while a client streams from it, the client resumes on the
//! other with the last id it saw and loses and duplicates nothing.

mod support;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{ConfabProcess, DEADLINE, SseStream};
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
    let dir = tempfile::tempdir().unwrap();
    let keyspace = support::unique("scale_");
    let prefix = support::unique("scale");
    let env: Vec<(String, String)> = [
        ("CONFAB_STORE__BACKEND", "cql".to_owned()),
        (
            "CONFAB_STORE__CQL_CONTACT_POINTS",
            support::cql_contact_points(),
        ),
        ("CONFAB_STORE__KEYSPACE", keyspace.clone()),
        ("CONFAB_BUS__BACKEND", "nats".to_owned()),
        ("CONFAB_BUS__NATS_URL", support::nats_url()),
        ("CONFAB_BUS__SUBJECT_PREFIX", prefix.clone()),
        ("CONFAB_IDENTITY__MODE", "oidc".to_owned()),
        ("CONFAB_IDENTITY__ISSUER_URL", support::oidc_issuer()),
        ("CONFAB_IDENTITY__CLIENT_IDS", support::oidc_client()),
        ("CONFAB_SECRET_KEY", support::secret()),
        ("CONFAB_API__LISTEN", "127.0.0.1:0".to_owned()),
        ("CONFAB_NOTIFIER__LISTEN", "127.0.0.1:0".to_owned()),
        ("CONFAB_WS_PLEXER__LISTEN", "127.0.0.1:0".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("migrate")
        .current_dir(dir.path())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );

    let api_a = ConfabProcess::start(&["api"], &env, dir.path()).await;
    let api_b = ConfabProcess::start(&["api"], &env, dir.path()).await;
    let notifier_a = ConfabProcess::start(&["notifier"], &env, dir.path()).await;
    let notifier_b = ConfabProcess::start(&["notifier"], &env, dir.path()).await;
    let plexer_a = ConfabProcess::start(&["ws-plexer"], &env, dir.path()).await;
    let mut plexer_env = env.clone();
    plexer_env.push(("CONFAB_WS_PLEXER__API_URL".into(), api_b.base.clone()));
    let plexer_b = ConfabProcess::start(&["ws-plexer"], &plexer_env, dir.path()).await;
    for process in [
        &api_a,
        &api_b,
        &notifier_a,
        &notifier_b,
        &plexer_a,
        &plexer_b,
    ] {
        support::wait_ready(&process.base).await;
    }
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
    let options = confab_api::store::cql::CqlOptions {
        contact_points: vec![support::cql_contact_points()],
        keyspace: keyspace.clone(),
        replication: String::new(),
        request_timeout: std::time::Duration::from_secs(20),
        nonce_ttl: std::time::Duration::from_secs(60),
        parity: confab_api::store::cql::SendParity::JetStream {
            nats_url: support::nats_url(),
            bucket: format!("{keyspace}_nonces"),
        },
    };
    let _ = confab_api::store::cql::drop_keyspace(&options).await;
    if let Ok(bus) = confab_runtime::bus::NatsBus::connect(
        &support::nats_url(),
        &prefix,
        confab_runtime::bus::LogSettings::default(),
    )
    .await
    {
        let _ = bus.delete_stream().await;
    }
}
