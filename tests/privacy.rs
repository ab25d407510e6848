//! Privacy: a user's e-mail address is shown to that user only and found only whole; a chat's
//! views list its members, not people who left. On the embedded default and on the real stack.

mod support;

use support::on_both_stacks;

use serde_json::{Value, json};
use support::{Stack, TestApp, spawn_app};

async fn search(app: &TestApp, token: &str, q: &str) -> Vec<Value> {
    let response = app
        .http
        .get(app.url("/v1/users"))
        .query(&[("q", q)])
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    page["items"].as_array().unwrap().clone()
}

async fn emails_are_shown_to_their_owner_only_and_found_whole(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let me: Value = app.get(&alice, "/v1/me").await.json().await.unwrap();
    let email = me["email"]
        .as_str()
        .expect("alice has an address")
        .to_owned();
    let alice_id = me["id"].as_str().unwrap().to_owned();
    app.me(&bob).await;

    // Another user finds alice by name, without her address.
    let found = search(&app, &bob, "alice").await;
    let entry = found
        .iter()
        .find(|u| u["id"] == alice_id.as_str())
        .expect("alice is found by her name");
    assert!(entry["email"].is_null(), "{entry}");
    assert!(
        !serde_json::to_string(&found).unwrap().contains(&email),
        "no address of another user in {found:?}"
    );
    // Her own entry shows it to her.
    let own = search(&app, &alice, "alice").await;
    let entry = own.iter().find(|u| u["id"] == alice_id.as_str()).unwrap();
    assert_eq!(entry["email"], email.as_str());

    // The whole address finds her (in any case); a part of it finds no one.
    let whole = search(&app, &bob, &email.to_uppercase()).await;
    assert_eq!(whole.len(), 1, "{whole:?}");
    assert_eq!(whole[0]["id"], alice_id.as_str());
    assert!(whole[0]["email"].is_null());
    let part = &email[..email.len() - 3];
    assert!(
        search(&app, &bob, part).await.is_empty(),
        "a part of an address, {part}, finds no one"
    );
    app.stop().await;
}
on_both_stacks!(emails_are_shown_to_their_owner_only_and_found_whole);

async fn views_leave_out_former_members(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id, &carol_id]).await;
    let sent: Value = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "nonce": "v-1", "text": "seen?"}),
        )
        .await
        .json()
        .await
        .unwrap();
    let signal = sent["id"].as_str().unwrap();
    for reader in [&bob, &carol] {
        let read = app
            .post(
                reader,
                &format!("/v1/chats/{chat}/read"),
                &json!({"up_to": signal}),
            )
            .await;
        assert_eq!(read.status(), 200);
    }
    let views = |token: String| {
        let app = &app;
        let path = format!("/v1/chats/{chat}/signals/{signal}/views");
        async move {
            let page: Value = app.get(&token, &path).await.json().await.unwrap();
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["user_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let before = views(alice.clone()).await;
    assert!(before.contains(&bob_id) && before.contains(&carol_id));

    let removed = app
        .http
        .delete(app.url(&format!("/v1/chats/{chat}/members/{bob_id}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    let after = views(alice.clone()).await;
    assert!(
        !after.contains(&bob_id),
        "a former member's marker: {after:?}"
    );
    assert!(after.contains(&carol_id));
    app.stop().await;
}
on_both_stacks!(views_leave_out_former_members);
