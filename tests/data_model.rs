//! Chats, members and signals through the HTTP API, on the embedded default and on the real stack:
//! every operation, its event, and each rule's refusal.

mod support;

use serde_json::{Value, json};
use support::{SseStream, Stack, TestApp, spawn_app};

async fn status_of(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

async fn patch(app: &TestApp, token: &str, path: &str, body: &Value) -> reqwest::Response {
    app.http
        .patch(app.url(path))
        .bearer_auth(token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn put(app: &TestApp, token: &str, path: &str) -> reqwest::Response {
    app.http
        .put(app.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn send(app: &TestApp, token: &str, chat: &str, text: &str) -> Value {
    let (status, body) = status_of(
        app.post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body
}

/// All items of a paged list, following `next_cursor`.
async fn all_pages(app: &TestApp, token: &str, path: &str, limit: usize) -> Vec<Value> {
    let mut items = Vec::new();
    let separator = if path.contains('?') { '&' } else { '?' };
    let mut url = format!("{path}{separator}limit={limit}");
    loop {
        let (status, page) = status_of(app.get(token, &url).await).await;
        assert_eq!(status, 200, "{url}: {page}");
        let batch = page["items"].as_array().unwrap();
        assert!(batch.len() <= limit);
        items.extend(batch.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(cursor) => url = format!("{path}{separator}limit={limit}&cursor={cursor}"),
            None => return items,
        }
    }
}

fn texts(signals: &[Value]) -> Vec<String> {
    signals
        .iter()
        .map(|s| s["text"].as_str().unwrap_or("").to_owned())
        .collect()
}

async fn data_model(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob, carol, dave) = (
        app.token("alice").await,
        app.token("bob").await,
        app.token("carol").await,
        app.token("dave").await,
    );
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let dave_id = app.me(&dave).await;

    // Users: found by a prefix of their user name or display name, each once.
    let found = all_pages(&app, &alice, "/v1/users?q=bo", 10).await;
    assert!(
        found.iter().any(|u| u["id"] == bob_id.as_str()),
        "{found:?}"
    );
    assert!(found.iter().all(|u| u["id"] != alice_id.as_str()));
    let by_display = all_pages(&app, &alice, "/v1/users?q=CAROL", 10).await;
    assert!(by_display.iter().any(|u| u["id"] == carol_id.as_str()));

    // A group; bob listens.
    let chat = app.group_chat(&alice, &[&bob_id, &carol_id]).await;
    let mut bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    // Racing retries of one nonce store one signal: one 201, the rest 200 with the same signal.
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, token) = (
                app.http.clone(),
                app.url(&format!("/v1/chats/{chat}/signals")),
                alice.clone(),
            );
            tokio::spawn(async move {
                let response = http
                    .post(url)
                    .bearer_auth(token)
                    .json(&json!({"kind": "message", "nonce": "raced", "text": "once"}))
                    .send()
                    .await
                    .unwrap();
                (
                    response.status().as_u16(),
                    response.json::<Value>().await.unwrap(),
                )
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    assert_eq!(
        outcomes.iter().filter(|(status, _)| *status == 201).count(),
        1,
        "{outcomes:?}"
    );
    assert!(
        outcomes
            .iter()
            .all(|(status, body)| (*status == 200 || *status == 201)
                && body["id"] == outcomes[0].1["id"])
    );
    let raced = outcomes[0].1["id"].clone();
    let (_, deleted) = status_of(
        app.delete(
            &alice,
            &format!("/v1/chats/{chat}/signals/{}", raced.as_str().unwrap()),
        )
        .await,
    )
    .await;
    assert_eq!(deleted["deleted"], true);

    let first = send(&app, &alice, &chat, "one").await;
    send(&app, &alice, &chat, "two").await;
    let third = send(&app, &carol, &chat, "three").await;
    bobs.next_of("signal.created").await;

    // bob's chat list: the group, its latest signal and his unread count.
    let chats = all_pages(&app, &bob, "/v1/chats", 10).await;
    let listed = chats
        .iter()
        .find(|c| c["id"] == chat.as_str())
        .expect("listed");
    assert_eq!(listed["latest_signal"]["text"], "three");
    assert_eq!(listed["unread_count"], 3);
    assert_eq!(listed["my_role"], "member");
    // Reading moves the marker forward, never back; unread counts follow.
    let (status, _) = status_of(
        app.post(
            &bob,
            &format!("/v1/chats/{chat}/read"),
            &json!({"up_to": first["id"]}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        bobs.next_of("read.updated").await.data["data"]["up_to"],
        first["id"]
    );
    let (_, view) = status_of(app.get(&bob, &format!("/v1/chats/{chat}")).await).await;
    assert_eq!(view["unread_count"], 2);
    app.post(
        &bob,
        &format!("/v1/chats/{chat}/read"),
        &json!({"up_to": third["id"]}),
    )
    .await;
    let (_, back) = status_of(
        app.post(
            &bob,
            &format!("/v1/chats/{chat}/read"),
            &json!({"up_to": first["id"]}),
        )
        .await,
    )
    .await;
    assert_eq!(back["up_to"], third["id"], "markers never move back");
    let (_, view) = status_of(app.get(&bob, &format!("/v1/chats/{chat}")).await).await;
    assert_eq!(view["unread_count"], 0);
    // Who has seen the first message.
    let seen = all_pages(
        &app,
        &alice,
        &format!(
            "/v1/chats/{chat}/signals/{}/views",
            first["id"].as_str().unwrap()
        ),
        1,
    )
    .await;
    let seen: Vec<&str> = seen
        .iter()
        .map(|s| s["user_id"].as_str().unwrap())
        .collect();
    // alice wrote it, bob read it, carol wrote after it.
    assert_eq!(seen.len(), 3, "{seen:?}");
    for user in [&alice_id, &bob_id, &carol_id] {
        assert!(seen.contains(&user.as_str()));
    }
    // Delivery acknowledgements are their own marker.
    app.post(
        &bob,
        &format!("/v1/chats/{chat}/delivered"),
        &json!({"up_to": first["id"]}),
    )
    .await;
    let delivered = all_pages(
        &app,
        &alice,
        &format!(
            "/v1/chats/{chat}/signals/{}/deliveries",
            first["id"].as_str().unwrap()
        ),
        10,
    )
    .await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0]["user_id"], bob_id.as_str());

    // Most recent activity first: a newer chat comes before, then a message moves the older up.
    let newer = app.group_chat(&alice, &[&bob_id]).await;
    let order: Vec<Value> = all_pages(&app, &bob, "/v1/chats", 1)
        .await
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(order[..2], [json!(newer), json!(chat)]);
    send(&app, &alice, &chat, "four").await;
    let order: Vec<Value> = all_pages(&app, &bob, "/v1/chats", 1)
        .await
        .iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(order[..2], [json!(chat), json!(newer)]);

    // Edits: the author only.
    let signal_path = format!("/v1/chats/{chat}/signals/{}", first["id"].as_str().unwrap());
    assert_eq!(
        patch(&app, &bob, &signal_path, &json!({"text": "hijack"}))
            .await
            .status(),
        403
    );
    let (status, edited) =
        status_of(patch(&app, &alice, &signal_path, &json!({"text": "one, edited"})).await).await;
    assert_eq!(status, 200);
    assert_eq!(edited["text"], "one, edited");
    assert!(edited["edited_at"].is_string());
    assert_eq!(
        bobs.next_of("signal.updated").await.data["data"]["text"],
        "one, edited"
    );

    // Reactions: idempotent per user and emoji, counted, listed.
    let thumbs = format!("{signal_path}/reactions/%F0%9F%91%8D");
    assert_eq!(put(&app, &bob, &thumbs).await.status(), 201);
    assert_eq!(put(&app, &bob, &thumbs).await.status(), 200);
    let (_, added) = status_of(put(&app, &carol, &thumbs).await).await;
    assert_eq!(added["count"], 2);
    assert_eq!(
        bobs.next_of("reaction.added").await.data["data"]["emoji"],
        "👍"
    );
    let history = all_pages(&app, &bob, &format!("/v1/chats/{chat}/signals"), 50).await;
    let reacted = history.iter().find(|s| s["id"] == first["id"]).unwrap();
    assert_eq!(reacted["reactions"]["👍"], 2);
    let who = all_pages(&app, &bob, &format!("{signal_path}/reactions"), 1).await;
    assert_eq!(who.len(), 2, "{who:?}");
    let (_, removed) = status_of(app.delete(&bob, &thumbs).await).await;
    assert_eq!(removed["count"], 1);
    assert_eq!(
        bobs.next_of("reaction.removed").await.data["data"]["count"],
        1
    );
    assert_eq!(
        put(&app, &bob, &format!("{signal_path}/reactions/thumbsup"))
            .await
            .status(),
        400
    );

    // Deletion: the author or an admin; history keeps a tombstone without text.
    let carols = format!("/v1/chats/{chat}/signals/{}", third["id"].as_str().unwrap());
    assert_eq!(app.delete(&bob, &carols).await.status(), 403);
    let (status, tombstone) = status_of(app.delete(&alice, &carols).await).await;
    assert_eq!(status, 200, "the owner deletes");
    assert_eq!(tombstone["deleted"], true);
    assert_eq!(tombstone["text"], Value::Null);
    assert_eq!(
        bobs.next_of("signal.deleted").await.data["data"]["id"],
        third["id"]
    );
    assert_eq!(
        patch(&app, &carol, &carols, &json!({"text": "undo"}))
            .await
            .status(),
        422
    );

    // Forward paging from the first message, oldest first.
    let forward = all_pages(
        &app,
        &bob,
        &format!(
            "/v1/chats/{chat}/signals?after={}",
            first["id"].as_str().unwrap()
        ),
        1,
    )
    .await;
    assert_eq!(texts(&forward), ["two", "", "four"]);

    // Renaming: owners and admins; written into history.
    assert_eq!(
        patch(
            &app,
            &bob,
            &format!("/v1/chats/{chat}"),
            &json!({"name": "mine"})
        )
        .await
        .status(),
        403
    );
    let (status, renamed) = status_of(
        patch(
            &app,
            &alice,
            &format!("/v1/chats/{chat}"),
            &json!({"name": "renamed", "description": "about"}),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(renamed["name"], "renamed");
    assert_eq!(renamed["description"], "about");
    assert_eq!(
        bobs.next_of("chat.updated").await.data["data"]["name"],
        "renamed"
    );

    // Members: admins add; joins and leaves go into history.
    let members_path = format!("/v1/chats/{chat}/members");
    assert_eq!(
        app.post(&bob, &members_path, &json!({"user_id": dave_id}))
            .await
            .status(),
        403
    );
    assert_eq!(
        app.post(&alice, &members_path, &json!({"user_id": dave_id}))
            .await
            .status(),
        201
    );
    assert_eq!(
        app.post(&alice, &members_path, &json!({"user_id": dave_id}))
            .await
            .status(),
        200
    );
    assert_eq!(
        bobs.next_of("member.joined").await.data["data"]["user_id"],
        dave_id.as_str()
    );
    let members = all_pages(&app, &dave, &members_path, 2).await;
    assert_eq!(members.len(), 4);
    // Roles: alice makes bob an admin; an admin cannot touch the owner.
    let bob_member = format!("{members_path}/{bob_id}");
    let (status, promoted) =
        status_of(patch(&app, &alice, &bob_member, &json!({"role": "admin"})).await).await;
    assert_eq!(status, 200);
    assert_eq!(promoted["role"], "admin");
    assert_eq!(
        patch(
            &app,
            &bob,
            &format!("{members_path}/{alice_id}"),
            &json!({"role": "member"})
        )
        .await
        .status(),
        403
    );
    assert_eq!(
        patch(
            &app,
            &bob,
            &format!("{members_path}/{dave_id}"),
            &json!({"role": "owner"})
        )
        .await
        .status(),
        403
    );
    assert_eq!(
        patch(
            &app,
            &carol,
            &format!("{members_path}/{dave_id}"),
            &json!({"role": "admin"})
        )
        .await
        .status(),
        403
    );
    // Removal: the admin removes a member; a member cannot remove others; anyone leaves.
    assert_eq!(
        app.delete(&carol, &format!("{members_path}/{dave_id}"))
            .await
            .status(),
        403
    );
    assert_eq!(
        app.delete(&bob, &format!("{members_path}/{alice_id}"))
            .await
            .status(),
        403
    );
    assert_eq!(
        app.delete(&bob, &format!("{members_path}/{dave_id}"))
            .await
            .status(),
        204
    );
    assert_eq!(
        bobs.next_of("member.left").await.data["data"]["user_id"],
        dave_id.as_str()
    );
    assert_eq!(
        app.get(&dave, &format!("/v1/chats/{chat}/signals"))
            .await
            .status(),
        403,
        "removed members read nothing"
    );
    assert_eq!(
        app.delete(&carol, &format!("{members_path}/{carol_id}"))
            .await
            .status(),
        204
    );
    // The last owner hands over first.
    assert_eq!(
        app.delete(&alice, &format!("{members_path}/{alice_id}"))
            .await
            .status(),
        422
    );
    assert_eq!(
        patch(
            &app,
            &alice,
            &format!("{members_path}/{alice_id}"),
            &json!({"role": "member"})
        )
        .await
        .status(),
        422
    );
    assert_eq!(
        patch(&app, &alice, &bob_member, &json!({"role": "owner"}))
            .await
            .status(),
        200
    );
    assert_eq!(
        app.delete(&alice, &format!("{members_path}/{alice_id}"))
            .await
            .status(),
        204
    );

    let history = all_pages(&app, &bob, &format!("/v1/chats/{chat}/signals"), 100).await;
    let kinds: Vec<&str> = history
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[..4], ["left", "left", "left", "joined"], "{kinds:?}");
    assert!(kinds.contains(&"renamed"));
    assert_eq!(history[3]["author_id"], dave_id.as_str());

    // Direct chats take no new members and cannot be left.
    let (_, direct) = status_of(
        app.post(
            &bob,
            "/v1/chats",
            &json!({"kind": "direct", "members": [carol_id]}),
        )
        .await,
    )
    .await;
    let direct = direct["id"].as_str().unwrap().to_owned();
    assert_eq!(
        app.post(
            &bob,
            &format!("/v1/chats/{direct}/members"),
            &json!({"user_id": dave_id})
        )
        .await
        .status(),
        422
    );
    assert_eq!(
        app.delete(&bob, &format!("/v1/chats/{direct}/members/{bob_id}"))
            .await
            .status(),
        422
    );
    assert_eq!(
        patch(
            &app,
            &bob,
            &format!("/v1/chats/{direct}"),
            &json!({"name": "x"})
        )
        .await
        .status(),
        422
    );
    // Nobody moderates a direct chat: each of its two owners deletes only their own messages.
    let carols = send(&app, &carol, &direct, "mine to take back").await;
    let carols_id = carols["id"].as_str().unwrap();
    let carols = format!("/v1/chats/{direct}/signals/{carols_id}");
    assert_eq!(app.delete(&bob, &carols).await.status(), 403);
    let history = all_pages(&app, &bob, &format!("/v1/chats/{direct}/signals"), 50).await;
    let kept = history.iter().find(|s| s["id"] == carols_id).unwrap();
    assert_eq!(kept["text"], "mine to take back", "{kept}");
    assert_eq!(app.delete(&carol, &carols).await.status(), 200);

    app.stop().await;
}

/// Many messages into one chat at once: the chat-list position and the author's read marker are
/// written once per burst, not once per message, and must still end on the newest message.
async fn burst_into_one_chat(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let quiet = app.group_chat(&alice, &[&bob_id]).await;
    let busy = app.group_chat(&alice, &[&bob_id]).await;
    send(&app, &alice, &quiet, "later than the busy chat's creation").await;

    const BURST: usize = 40;
    let path = format!("/v1/chats/{busy}/signals");
    let posts = (0..BURST).map(|i| {
        let (app, alice, path) = (&app, &alice, &path);
        async move {
            let body = json!({"kind": "message", "nonce": format!("burst-{i}"), "text": format!("burst {i}")});
            app.post(alice, path, &body).await
        }
    });
    let mut ids = Vec::new();
    for response in futures::future::join_all(posts).await {
        let (status, body) = status_of(response).await;
        assert_eq!(status, 201, "{body}");
        ids.push(body["id"].as_str().unwrap().to_owned());
    }
    // Time-ordered ids: the greatest is the newest.
    let newest = ids.iter().max().unwrap().clone();

    // Right after the last response: bob's list has the busy chat first, on its newest message.
    let chats = all_pages(&app, &bob, "/v1/chats", 10).await;
    assert_eq!(chats[0]["id"], busy.as_str(), "{chats:?}");
    assert_eq!(chats[0]["latest_signal"]["id"], newest.as_str());
    assert_eq!(chats[0]["unread_count"], BURST);
    assert_eq!(chats[1]["id"], quiet.as_str());
    // alice has read everything she wrote.
    let (_, view) = status_of(app.get(&alice, &format!("/v1/chats/{busy}")).await).await;
    assert_eq!(view["unread_count"], 0, "{view}");

    app.stop().await;
}

/// A user's profile: whole for themself, without the e-mail address for someone they chat with,
/// and no profile at all for a stranger.
async fn profiles_are_for_people_who_chat(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    app.group_chat(&alice, &[&bob_id]).await;
    let path = format!("/v1/users/{bob_id}");

    let (status, own) = status_of(app.get(&bob, &path).await).await;
    assert_eq!(status, 200);
    let me: Value = app.get(&bob, "/v1/me").await.json().await.unwrap();
    assert_eq!(own, me, "their own profile, e-mail included");
    assert!(own["email"].is_string(), "{own}");

    let (status, seen) = status_of(app.get(&alice, &path).await).await;
    assert_eq!(status, 200);
    assert_eq!(seen["username"], "bob");
    assert!(seen["email"].is_null(), "no e-mail for others: {seen}");

    let (status, problem) = status_of(app.get(&carol, &path).await).await;
    assert_eq!((status, problem["status"].as_u64()), (404, Some(404)));
    let (status, _) = status_of(app.get(&alice, "/v1/users/not-an-id").await).await;
    assert_eq!(status, 400);
    app.stop().await;
}

#[tokio::test]
async fn profiles_are_for_people_who_chat_on_the_embedded_default() {
    Box::pin(profiles_are_for_people_who_chat(Stack::Embedded)).await;
}

#[tokio::test]
async fn profiles_are_for_people_who_chat_on_the_real_stack() {
    if !support::real_stack_available("profiles_are_for_people_who_chat_on_the_real_stack").await {
        return;
    }
    Box::pin(profiles_are_for_people_who_chat(Stack::Real)).await;
}

#[tokio::test]
async fn burst_into_one_chat_on_the_embedded_default() {
    Box::pin(burst_into_one_chat(Stack::Embedded)).await;
}

#[tokio::test]
async fn burst_into_one_chat_on_the_real_stack() {
    if !support::real_stack_available("burst_into_one_chat_on_the_real_stack").await {
        return;
    }
    Box::pin(burst_into_one_chat(Stack::Real)).await;
}

#[tokio::test]
async fn data_model_on_the_embedded_default() {
    Box::pin(data_model(Stack::Embedded)).await;
}

#[tokio::test]
async fn data_model_on_the_real_stack() {
    if !support::real_stack_available("data_model_on_the_real_stack").await {
        return;
    }
    Box::pin(data_model(Stack::Real)).await;
}

#[tokio::test]
async fn openapi_is_served_and_lists_every_route() {
    let app = spawn_app(Stack::Embedded).await;
    let (status, doc) = status_of(
        app.http
            .get(app.url("/v1/openapi.json"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let serialized = doc.to_string();
    // Every reference resolves.
    for (index, _) in serialized.match_indices("\"$ref\":\"#/components/schemas/") {
        let rest = &serialized[index + "\"$ref\":\"#/components/schemas/".len()..];
        let name = &rest[..rest.find('"').unwrap()];
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "dangling reference to {name}"
        );
    }
    // Enums are documented by their wire names, as they are served.
    for (schema, names) in [
        ("ChatKind", json!(["direct", "group"])),
        ("MemberRole", json!(["owner", "admin", "member"])),
    ] {
        assert_eq!(
            doc["components"]["schemas"][schema]["enum"], names,
            "{schema}"
        );
    }
    // A JSON body without a JSON content type is refused with a documented 415.
    assert!(doc["paths"]["/v1/chats"]["post"]["responses"]["415"].is_object());
    // Every documented operation is routed (never the not-found or wrong-method fallback)...
    let token = app.token("alice").await;
    let id = uuid::Uuid::now_v7();
    let mut operations = Vec::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            let concrete = path
                .replace("{chat_id}", &id.to_string())
                .replace("{signal_id}", &id.to_string())
                .replace("{user_id}", &id.to_string())
                .replace("{attachment_id}", &id.to_string())
                .replace("{circle_id}", &id.to_string())
                .replace("{kind}", "talk")
                .replace("{call_id}", &id.to_string())
                .replace("{emoji}", "%F0%9F%91%8D");
            let request = app
                .http
                .request(method.to_uppercase().parse().unwrap(), app.url(&concrete))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .body("{}");
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let streaming = response
                .headers()
                .get("content-type")
                .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
            // An event stream never ends: its status and type are the answer.
            let body: Value = if streaming {
                Value::Null
            } else {
                response.json().await.unwrap_or(Value::Null)
            };
            let fallback = body["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("/method-not-allowed"))
                || body["detail"] == "no such resource";
            assert!(
                !fallback && status != 500,
                "{method} {path} answered {status} {body}"
            );
            operations.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    // ...and every route is documented.
    for expected in [
        "GET /v1/me",
        "GET /v1/users",
        "POST /v1/chats",
        "GET /v1/chats",
        "GET /v1/chats/{chat_id}",
        "PATCH /v1/chats/{chat_id}",
        "GET /v1/chats/{chat_id}/members",
        "POST /v1/chats/{chat_id}/members",
        "DELETE /v1/chats/{chat_id}/members/{user_id}",
        "PATCH /v1/chats/{chat_id}/members/{user_id}",
        "POST /v1/chats/{chat_id}/signals",
        "GET /v1/chats/{chat_id}/signals",
        "PATCH /v1/chats/{chat_id}/signals/{signal_id}",
        "DELETE /v1/chats/{chat_id}/signals/{signal_id}",
        "PUT /v1/chats/{chat_id}/signals/{signal_id}/reactions/{emoji}",
        "DELETE /v1/chats/{chat_id}/signals/{signal_id}/reactions/{emoji}",
        "GET /v1/chats/{chat_id}/signals/{signal_id}/reactions",
        "POST /v1/chats/{chat_id}/read",
        "POST /v1/chats/{chat_id}/delivered",
        "GET /v1/chats/{chat_id}/signals/{signal_id}/views",
        "GET /v1/chats/{chat_id}/signals/{signal_id}/deliveries",
        "GET /v1/events",
        "POST /v1/events/ticket",
        "GET /v1/ws",
        "POST /v1/chats/{chat_id}/typing",
        "PUT /v1/me/status",
        "GET /v1/users/{user_id}/presence",
        "POST /v1/devices",
        "GET /v1/devices",
        "DELETE /v1/devices/{device_id}",
        "GET /v1/push/vapid-public-key",
        "GET /v1/search",
        "GET /v1/me/settings",
        "PUT /v1/me/settings",
        "GET /v1/chats/{chat_id}/settings",
        "PUT /v1/chats/{chat_id}/settings",
        "POST /v1/chats/{chat_id}/attachments",
        "GET /v1/chats/{chat_id}/attachments",
        "GET /v1/attachments/{attachment_id}",
        "GET /v1/attachments/{attachment_id}/thumbnail",
        "GET /v1/attachments/{attachment_id}/preview",
        "POST /v1/me/logout-all",
        "POST /v1/auth/backchannel-logout",
        "POST /v1/circles",
        "GET /v1/circles/{circle_id}",
        "POST /v1/circles/join",
        "POST /v1/circles/{circle_id}/access-code",
        "GET /v1/circles/{circle_id}/members",
        "DELETE /v1/circles/{circle_id}/members/{user_id}",
        "POST /v1/circles/{circle_id}/pair",
        "DELETE /v1/circles/{circle_id}/pair",
        "POST /v1/queues/{kind}/join",
        "GET /v1/queues/{kind}",
        "DELETE /v1/queues/{kind}",
        "POST /v1/chats/{chat_id}/calls",
        "GET /v1/calls/turn-credentials",
        "GET /v1/calls/{call_id}",
        "POST /v1/calls/{call_id}/join",
        "POST /v1/calls/{call_id}/leave",
        "POST /v1/calls/{call_id}/end",
        "POST /v1/calls/{call_id}/signal",
    ] {
        assert!(
            operations.iter().any(|o| o == expected),
            "{expected} is not documented"
        );
    }
    assert_eq!(operations.len(), 62, "{operations:?}");
    app.stop().await;
}
