//! Refusals: every bad request gets a 4xx `application/problem+json`, never a panic or a 500, and
//! stores nothing. Run on the embedded default; the token checks also run against Keycloak.

mod support;

use serde_json::{Value, json};
use support::{Stack, TestApp, spawn_app};

async fn assert_problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status().as_u16(), status, "status");
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/problem+json")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
    assert!(body["type"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(body["title"].as_str().is_some_and(|t| !t.is_empty()));
    body
}

/// A valid token with its payload altered (the signature no longer matches).
fn forged(token: &str) -> String {
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
    claims["preferred_username"] = json!("mallory");
    claims["sub"] = json!("mallory");
    format!(
        "{}.{}.{}",
        parts[0],
        engine.encode(serde_json::to_vec(&claims).unwrap()),
        parts[2]
    )
}

async fn bad_tokens_are_401(app: &TestApp, foreign_token: &str) {
    let alice = app.token("alice").await;
    let no_token = app.http.get(app.url("/v1/me")).send().await.unwrap();
    assert_eq!(no_token.headers()["www-authenticate"], "Bearer");
    assert_problem(no_token, 401).await;
    assert_problem(app.get("garbage", "/v1/me").await, 401).await;
    assert_problem(app.get(&forged(&alice), "/v1/me").await, 401).await;
    assert_problem(app.get(foreign_token, "/v1/me").await, 401).await;
    let basic = app
        .http
        .get(app.url("/v1/me"))
        .basic_auth("alice", Some("alice"))
        .send()
        .await
        .unwrap();
    assert_problem(basic, 401).await;
    // Streams refuse the same tokens, and forged or foreign tickets.
    let sse = app
        .http
        .get(app.url("/v1/events"))
        .bearer_auth(forged(&alice))
        .send()
        .await
        .unwrap();
    assert_problem(sse, 401).await;
    let sse = app
        .http
        .get(app.url("/v1/events?ticket=abc.def"))
        .send()
        .await
        .unwrap();
    assert_problem(sse, 401).await;
    let ticket = app
        .http
        .post(app.url("/v1/events/ticket"))
        .send()
        .await
        .unwrap();
    assert_problem(ticket, 401).await;
    let ws = app.http.get(app.url("/v1/ws")).send().await.unwrap();
    assert_problem(ws, 401).await;
    assert_eq!(app.get(&alice, "/v1/me").await.status(), 200);
}

#[tokio::test]
async fn bad_tokens_are_refused_on_the_embedded_default() {
    let app = spawn_app(Stack::Embedded).await;
    // A dev token from another installation (another key).
    let elsewhere = tempfile::tempdir().unwrap();
    let foreign = confab_runtime::identity::DevIdentity::open(elsewhere.path())
        .unwrap()
        .mint("alice", std::time::Duration::from_secs(60));
    bad_tokens_are_401(&app, &foreign).await;
    let expired = confab_runtime::identity::DevIdentity::open(&app.config.data_dir)
        .unwrap()
        .mint_until(
            "alice",
            time::OffsetDateTime::now_utc().unix_timestamp() - 60,
        );
    let body = assert_problem(app.get(&expired, "/v1/me").await, 401).await;
    assert!(body["detail"].as_str().unwrap().contains("expired"));
    app.stop().await;
}

#[tokio::test]
async fn bad_tokens_are_refused_by_keycloak_verification() {
    if !support::real_stack_available("bad_tokens_are_refused_by_keycloak_verification").await {
        return;
    }
    let app = spawn_app(Stack::Real).await;
    // A genuine Keycloak token, but from another realm (another issuer and keys).
    let issuer = support::oidc_issuer();
    let master = issuer.rsplit_once("/realms/").unwrap().0.to_owned() + "/realms/master";
    let foreign = support::keycloak_token_at(&master, "admin-cli", "admin", "admin").await;
    bad_tokens_are_401(&app, &foreign).await;
    // A dev token is not a Keycloak token.
    let dev = confab_runtime::identity::DevIdentity::open(&app.config.data_dir)
        .unwrap()
        .mint("alice", std::time::Duration::from_secs(60));
    assert_problem(app.get(&dev, "/v1/me").await, 401).await;
    app.stop().await;
}

#[tokio::test]
async fn only_members_read_and_post() {
    let app = spawn_app(Stack::Embedded).await;
    let (alice, bob, carol) = (
        app.token("alice").await,
        app.token("bob").await,
        app.token("carol").await,
    );
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let signals = format!("/v1/chats/{chat}/signals");

    assert_problem(app.get(&carol, &signals).await, 403).await;
    assert_problem(app.get(&carol, &format!("/v1/chats/{chat}")).await, 403).await;
    let post = app
        .post(
            &carol,
            &signals,
            &json!({"kind": "message", "text": "let me in"}),
        )
        .await;
    assert_problem(post, 403).await;
    // Members can.
    assert_eq!(app.get(&bob, &signals).await.status(), 200);
    assert_eq!(
        app.get(&bob, &format!("/v1/chats/{chat}")).await.status(),
        200
    );
    // carol's refused post stored nothing.
    let history: Value = app.get(&alice, &signals).await.json().await.unwrap();
    assert_eq!(history["items"], json!([]));

    let unknown = uuid::Uuid::now_v7();
    assert_problem(
        app.get(&alice, &format!("/v1/chats/{unknown}/signals"))
            .await,
        404,
    )
    .await;
    assert_problem(
        app.post(
            &alice,
            &format!("/v1/chats/{unknown}/signals"),
            &json!({"kind": "message", "text": "x"}),
        )
        .await,
        404,
    )
    .await;
    assert_problem(app.get(&alice, "/v1/chats/not-a-uuid/signals").await, 400).await;
    app.stop().await;
}

#[tokio::test]
async fn malformed_and_invalid_content_is_refused() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let signals = app.url(&format!("/v1/chats/{chat}/signals"));

    let raw = |body: &'static str| {
        app.http
            .post(&signals)
            .bearer_auth(&alice)
            .header("content-type", "application/json")
            .body(body)
    };
    assert_problem(
        raw("{\"kind\": \"message\", \"text\": ")
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert_problem(raw("not json").send().await.unwrap(), 400).await;
    let no_type = app
        .http
        .post(&signals)
        .bearer_auth(&alice)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_problem(no_type, 415).await;

    let signals_path = format!("/v1/chats/{chat}/signals");
    let post = |body: Value| {
        let (app, alice, path) = (&app, &alice, &signals_path);
        async move { app.post(alice, path, &body).await }
    };
    for body in [
        json!({"kind": "sticker", "text": "x"}),
        json!({"kind": "joined", "text": "x"}),
        json!({"text": "x"}),
        json!({"kind": "message"}),
        json!({"kind": "message", "text": ""}),
        json!({"kind": "message", "text": "   \n"}),
        json!({"kind": "message", "text": "x".repeat(4001)}),
        json!({"kind": "message", "text": "x", "nonce": ""}),
        json!({"kind": "message", "text": "x", "nonce": "n".repeat(129)}),
        json!({"kind": "message", "text": "x", "reply_to": "nope"}),
        json!({"kind": "message", "text": "x", "surprise": true}),
        json!({"kind": "message", "text": 42}),
    ] {
        let response = post(body.clone()).await;
        let status = response.status().as_u16();
        assert!(status == 422 || status == 400, "{body} answered {status}");
        assert_problem(response, status).await;
    }
    // The limits themselves are allowed: 4,000 characters (not bytes) and a 128-byte nonce.
    let longest =
        post(json!({"kind": "message", "text": "é".repeat(4000), "nonce": "n".repeat(128)})).await;
    assert_eq!(longest.status(), 201);
    let history: Value = app
        .get(&alice, &format!("/v1/chats/{chat}/signals"))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(
        history["items"].as_array().unwrap().len(),
        1,
        "refused posts stored nothing"
    );

    // Chats.
    for body in [
        json!({"kind": "group", "members": [bob_id]}),
        json!({"kind": "group", "name": "x", "members": []}),
        json!({"kind": "group", "name": "", "members": [bob_id]}),
        json!({"kind": "group", "name": "x".repeat(201), "members": [bob_id]}),
        json!({"kind": "group", "name": "x", "members": [uuid::Uuid::new_v4()]}),
        json!({"kind": "group", "name": "x", "members": ["not-an-id"]}),
        json!({"kind": "channel", "name": "x", "members": [bob_id]}),
        json!({"kind": "direct", "members": []}),
    ] {
        let response = app.post(&alice, "/v1/chats", &body).await;
        let status = response.status().as_u16();
        assert!(status == 422 || status == 400, "{body} answered {status}");
        assert_problem(response, status).await;
    }

    // Paging parameters.
    let path = format!("/v1/chats/{chat}/signals");
    for query in [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=x",
        "cursor=garbage",
        "before=x",
        "cursor=a.b",
    ] {
        assert_problem(app.get(&alice, &format!("{path}?{query}")).await, 400).await;
    }

    // Unknown routes and methods.
    assert_problem(app.get(&alice, "/v1/nothing-here").await, 404).await;
    let wrong_method = app
        .http
        .delete(app.url("/v1/me"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_problem(wrong_method, 405).await;
    app.stop().await;
}

/// A message takes at most 20 different emoji (every page carries each one's count), and an
/// emoji that looks like another (an invisible tag after it) is not one: 422 and 400, and the
/// reactions it has are untouched.
#[tokio::test]
async fn reactions_are_bounded_per_message() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let sent: Value = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "react to me"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let reactions = format!(
        "/v1/chats/{chat}/signals/{}/reactions",
        sent["id"].as_str().unwrap()
    );
    let react = |token: &str, emoji: String| {
        let url = app.url(&format!("{reactions}/{}", urlencoding(&emoji)));
        app.http.put(url).bearer_auth(token.to_owned()).send()
    };
    // 😀 to 😓: twenty different emoji.
    for code in 0x1F600..0x1F614 {
        let emoji = char::from_u32(code).unwrap().to_string();
        assert_eq!(react(&alice, emoji).await.unwrap().status(), 201);
    }
    let one_more = char::from_u32(0x1F614).unwrap().to_string();
    assert_problem(react(&bob, one_more).await.unwrap(), 422).await;
    // One of those twenty, by another member: it is counted again.
    let again = char::from_u32(0x1F600).unwrap().to_string();
    assert_eq!(react(&bob, again).await.unwrap().status(), 201);
    assert_problem(react(&bob, "😀\u{E0041}".into()).await.unwrap(), 400).await;

    let listed: Value = app
        .http
        .get(app.url(&format!("{reactions}?limit=100")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 21, "{listed}");
    app.stop().await;
}

/// `text` percent-encoded for a path segment.
fn urlencoding(text: &str) -> String {
    text.bytes().map(|b| format!("%{b:02X}")).collect()
}

#[tokio::test]
async fn history_pages_with_opaque_cursors() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let other_chat = app.group_chat(&alice, &[&bob_id]).await;
    for i in 0..7 {
        let response = app
            .post(
                &alice,
                &format!("/v1/chats/{chat}/signals"),
                &json!({"kind": "message", "text": format!("m{i}")}),
            )
            .await;
        assert_eq!(response.status(), 201);
    }
    let mut texts = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/chats/{chat}/signals?limit=3&cursor={c}"),
            None => format!("/v1/chats/{chat}/signals?limit=3"),
        };
        let page: Value = app.get(&bob, &path).await.json().await.unwrap();
        texts.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["text"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => {
                // A cursor is bound to its chat and cannot be altered.
                assert_problem(
                    app.get(
                        &bob,
                        &format!("/v1/chats/{other_chat}/signals?cursor={next}"),
                    )
                    .await,
                    400,
                )
                .await;
                let mut tampered = next.to_owned();
                tampered.insert(2, 'x');
                assert_problem(
                    app.get(&bob, &format!("/v1/chats/{chat}/signals?cursor={tampered}"))
                        .await,
                    400,
                )
                .await;
                cursor = Some(next.to_owned());
            }
            None => break,
        }
    }
    assert_eq!(texts, ["m6", "m5", "m4", "m3", "m2", "m1", "m0"]);
    app.stop().await;
}

#[tokio::test]
async fn direct_chats_are_one_per_pair() {
    let app = spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let first = app
        .post(
            &alice,
            "/v1/chats",
            &json!({"kind": "direct", "members": [bob_id]}),
        )
        .await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let second = app
        .post(
            &bob,
            "/v1/chats",
            &json!({"kind": "direct", "members": [alice_id]}),
        )
        .await;
    assert_eq!(second.status(), 200);
    let second: Value = second.json().await.unwrap();
    assert_eq!(first["id"], second["id"]);
    assert_eq!(first["kind"], "direct");
    app.stop().await;
}
