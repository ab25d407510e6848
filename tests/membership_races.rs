//! Racing membership changes settle to a valid state: a chat with members always keeps an owner,
//! and racing additions of one user add them once, with one `joined` signal. Many concurrent
//! requests, on the embedded default and on the real stack.

mod support;

use support::on_both_stacks;

use serde_json::{Value, json};
use support::{Stack, TestApp, spawn_app};

async fn members(app: &TestApp, token: &str, chat: &str) -> Vec<Value> {
    let response = app
        .get(token, &format!("/v1/chats/{chat}/members?limit=100"))
        .await;
    assert_eq!(response.status(), 200);
    let page: Value = response.json().await.unwrap();
    page["items"].as_array().unwrap().clone()
}

async fn a_chat_always_keeps_an_owner(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    for round in 0..6 {
        let chat = app.group_chat(&alice, &[&bob_id, &carol_id]).await;
        let promoted = app
            .http
            .patch(app.url(&format!("/v1/chats/{chat}/members/{bob_id}")))
            .bearer_auth(&alice)
            .json(&json!({"role": "owner"}))
            .send()
            .await
            .unwrap();
        assert_eq!(promoted.status(), 200);
        // Both owners leave and demote each other, all at once.
        let member_url = |user: &str| app.url(&format!("/v1/chats/{chat}/members/{user}"));
        let leave =
            |token: &str, user: &str| app.http.delete(member_url(user)).bearer_auth(token).send();
        let demote = |token: &str, user: &str| {
            app.http
                .patch(member_url(user))
                .bearer_auth(token)
                .json(&json!({"role": "member"}))
                .send()
        };
        let (a, b, c, d) = tokio::join!(
            leave(&alice, &alice_id),
            leave(&bob, &bob_id),
            demote(&alice, &bob_id),
            demote(&bob, &alice_id),
        );
        for response in [a, b, c, d] {
            let status = response.unwrap().status();
            assert!(
                status.is_success() || [403, 404, 422].contains(&status.as_u16()),
                "round {round}: {status}"
            );
        }
        let now = members(&app, &carol, &chat).await;
        let owners = now.iter().filter(|m| m["role"] == "owner").count();
        assert!(owners >= 1, "round {round}: no owner left among {now:?}");
    }
    app.stop().await;
}
on_both_stacks!(a_chat_always_keeps_an_owner);

async fn racing_additions_add_once(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&bob).await;
    let carol_id = app.me(&carol).await;
    for round in 0..3 {
        let chat = app.group_chat(&alice, &[&bob_id]).await;
        let promoted = app
            .http
            .patch(app.url(&format!("/v1/chats/{chat}/members/{bob_id}")))
            .bearer_auth(&alice)
            .json(&json!({"role": "admin"}))
            .send()
            .await
            .unwrap();
        assert_eq!(promoted.status(), 200);
        let path = format!("/v1/chats/{chat}/members");
        let body = json!({"user_id": carol_id});
        let adds = (0..8).map(|i| {
            let token = if i % 2 == 0 { &alice } else { &bob };
            app.post(token, &path, &body)
        });
        let statuses: Vec<u16> = futures::future::join_all(adds)
            .await
            .into_iter()
            .map(|r| r.status().as_u16())
            .collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            1,
            "round {round}: one addition creates: {statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| [200, 201].contains(s)),
            "{statuses:?}"
        );
        let now = members(&app, &alice, &chat).await;
        assert_eq!(
            now.iter()
                .filter(|m| m["user_id"] == carol_id.as_str())
                .count(),
            1
        );
        let history: Value = app
            .get(&alice, &format!("/v1/chats/{chat}/signals?limit=50"))
            .await
            .json()
            .await
            .unwrap();
        let joins = history["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["kind"] == "joined" && s["author_id"] == carol_id.as_str())
            .count();
        assert_eq!(joins, 1, "round {round}: one joined signal: {history}");
    }
    app.stop().await;
}
on_both_stacks!(racing_additions_add_once);
