//! A chat of 50,000 members works: events name no recipients, so a message's event stays small
//! whatever the chat's size (an envelope listing every member passed NATS's 1 MiB payload limit at
//! about 27,000 members, and every publish failed).

mod support;

use std::time::Duration;

use confab_schema::{ChatId, Member, MemberRole, UserId};
use futures::StreamExt;
use serde_json::{Value, json};
use support::{SseStream, Stack, spawn_app};

const MEMBERS: usize = 50_000;

async fn a_chat_of_50_000_members(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;

    // The members are written straight to the store: 50,000 API calls would test nothing more.
    let store = confab::open_store(&app.config, false).await.unwrap();
    let chat_id: ChatId = chat.parse().unwrap();
    let joined_at = confab_schema::model::to_millis(time::OffsetDateTime::now_utc());
    futures::stream::iter(0..MEMBERS)
        .map(|i| {
            let store = std::sync::Arc::clone(&store);
            async move {
                store
                    .put_member(
                        chat_id,
                        &Member {
                            user_id: UserId::from_subject("large-chat", &format!("member-{i}")),
                            role: MemberRole::Member,
                            joined_at,
                        },
                    )
                    .await
            }
        })
        .buffer_unordered(64)
        .for_each(|written| async move { written.expect("member written") })
        .await;

    let mut events = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let sent = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "to fifty thousand"}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let created = events.next_of("signal.created").await;
    assert_eq!(created.data["data"]["text"], "to fifty thousand");

    let members = app
        .get(&alice, &format!("/v1/chats/{chat}/members?limit=1"))
        .await;
    assert_eq!(members.status(), 200);
    assert!(
        members.json::<Value>().await.unwrap()["next_cursor"].is_string(),
        "the chat has more members than one page"
    );
    drop(store);
    tokio::time::timeout(Duration::from_secs(60), app.stop())
        .await
        .expect("stops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_of_50_000_members_on_the_embedded_default() {
    Box::pin(a_chat_of_50_000_members(Stack::Embedded)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_of_50_000_members_on_the_real_stack() {
    if support::real_stack_available("a_chat_of_50_000_members_on_the_real_stack").await {
        Box::pin(a_chat_of_50_000_members(Stack::Real)).await;
    }
}
