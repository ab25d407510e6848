//! Privacy: a user's e-mail address is shown to that user only and found only whole; a chat's
//! views list its members, not people who left. On the embedded default and on the real stack.

mod support;

use support::on_both_stacks;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use confab_api::Page;
use confab_api::domain::inputs::{PageLimit, UserQuery};
use confab_api::store::Store;
use confab_api::store::conformance::chat_with;
use confab_schema::{User, UserId};
use futures::StreamExt;
use serde_json::{Value, json};
use support::held_store::HeldApi;
use support::{Stack, TestApp, spawn_app};
use uuid::Uuid;

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

/// A direct chat's id is derived from its two users' ids, which others can learn: to anyone
/// outside it, it answers as a chat that does not exist, so nobody learns who talks in private.
async fn a_direct_chat_of_others_is_not_found(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let carol = app.token("carol").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let created = app
        .post(
            &alice,
            "/v1/chats",
            &json!({"kind": "direct", "members": [bob_id]}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let direct = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let unknown = Uuid::now_v7().to_string();
    for path in ["", "/signals", "/members"] {
        let of_others = app.get(&carol, &format!("/v1/chats/{direct}{path}")).await;
        let of_nobody = app.get(&carol, &format!("/v1/chats/{unknown}{path}")).await;
        assert_eq!(
            (of_others.status(), of_nobody.status()),
            (404.try_into().unwrap(), 404.try_into().unwrap()),
            "{path}"
        );
        assert_eq!(
            of_others.json::<Value>().await.unwrap()["detail"],
            of_nobody.json::<Value>().await.unwrap()["detail"],
            "{path}"
        );
    }
    // A group carol is not in still says so.
    let group = app.group_chat(&alice, &[&bob_id]).await;
    assert_eq!(
        app.get(&carol, &format!("/v1/chats/{group}"))
            .await
            .status(),
        403
    );
    app.stop().await;
}

on_both_stacks!(a_direct_chat_of_others_is_not_found);

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

/// The most users (and rows of search terms) one page of a user search may read, whatever the
/// query and however many rows lie under it: three batches of the largest page.
const MOST_READ_PER_SEARCH_PAGE: usize = 3 * 101;

/// A user search by `viewer`, on the domain (its reads counted by `api.store`).
async fn search_as(
    api: &HeldApi,
    viewer: UserId,
    q: &str,
    cursor: Option<&str>,
    limit: usize,
) -> Page<User> {
    api.state
        .search_users(
            viewer,
            UserQuery::parse(q).unwrap(),
            cursor,
            PageLimit::parse(Some(limit)).unwrap(),
        )
        .await
        .unwrap()
}

/// (users read, rows of search terms read) so far.
fn user_reads(api: &HeldApi) -> (usize, usize) {
    (
        api.store.reads.users.load(Ordering::SeqCst),
        api.store.reads.user_term_rows.load(Ordering::SeqCst),
    )
}

/// A part of another user's address finds no one and reads nothing of theirs: no row of it, and
/// not their profile (a read that would show in the time the search takes, letting the address be
/// guessed a character at a time).
async fn a_part_of_an_address_reads_nothing_of_it(stack: Stack) {
    let api = HeldApi::new(stack).await;
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let searcher = api.user(&format!("searcher-{tag}")).await;
    let address = format!("ceo.{tag}@corp.example");
    let boss = User {
        id: UserId(Uuid::now_v7()),
        username: format!("boss-{tag}"),
        display_name: "The Boss".into(),
        email: Some(address.clone()),
    };
    api.store.upsert_user(&boss).await.unwrap();

    for part in [
        format!("ceo.{tag}"),
        format!("ceo.{tag}@"),
        format!("ceo.{tag}@corp.exampl"),
    ] {
        let before = user_reads(&api);
        let page = search_as(&api, searcher.id, &part, None, 10).await;
        let after = user_reads(&api);
        assert!(page.items.is_empty(), "{part} finds {:?}", page.items);
        assert_eq!(
            (after.0 - before.0, after.1 - before.1),
            (0, 0),
            "{part} read (users, rows of terms) of an address"
        );
    }
    // The whole address finds them, without it.
    let page = search_as(&api, searcher.id, &address.to_uppercase(), None, 10).await;
    assert_eq!(page.items.len(), 1, "{:?}", page.items);
    assert_eq!(page.items[0].id, boss.id);
    assert_eq!(page.items[0].email, None);
    api.clean_up().await;
}
on_both_stacks!(a_part_of_an_address_reads_nothing_of_it);

/// A query that begins thousands of addresses (none of which it may find) costs a page no more
/// than a bounded number of reads: 2,000 users whose addresses begin `j<tag>`.
async fn a_prefix_of_thousands_of_addresses_reads_a_bounded_number_of_rows(stack: Stack) {
    let api = HeldApi::new(stack).await;
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let searcher = api.user(&format!("searcher-{tag}")).await;
    let store = Arc::clone(&api.store);
    futures::stream::iter(0..2000)
        .map(|i| {
            let store = Arc::clone(&store);
            let tag = tag.clone();
            async move {
                let user = User {
                    id: UserId(Uuid::now_v7()),
                    username: format!("u{tag}-{i}"),
                    display_name: format!("User {i}"),
                    email: Some(format!("j{tag}.{i}@corp.example")),
                };
                store.upsert_user(&user).await.unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;

    let mut cursor: Option<String> = None;
    for page_number in 0.. {
        assert!(page_number < 100, "the pages never ended");
        let before = user_reads(&api);
        let page = search_as(&api, searcher.id, &format!("j{tag}"), cursor.as_deref(), 10).await;
        let after = user_reads(&api);
        assert!(
            after.0 - before.0 <= MOST_READ_PER_SEARCH_PAGE
                && after.1 - before.1 <= MOST_READ_PER_SEARCH_PAGE,
            "page {page_number} read {} users and {} rows of terms",
            after.0 - before.0,
            after.1 - before.1
        );
        assert!(
            page.items.is_empty(),
            "a prefix of addresses finds {:?}",
            page.items
        );
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    api.clean_up().await;
}
on_both_stacks!(a_prefix_of_thousands_of_addresses_reads_a_bounded_number_of_rows);

/// A user name that is an address (an identity provider that uses the address as the user name,
/// and so as the display name when there is no name) is as private as the address: shown to its
/// owner only, in searches and in the profile, and found only whole.
async fn an_address_for_a_user_name_is_shown_to_its_owner_only(stack: Stack) {
    let api = HeldApi::new(stack).await;
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let searcher = api.user(&format!("searcher-{tag}")).await;
    let address = format!("dora.{tag}@corp.example");
    let dora = User {
        id: UserId(Uuid::now_v7()),
        username: address.clone(),
        display_name: address.clone(),
        email: Some(address.clone()),
    };
    // An address-like user name with a name of its own, and no address on record.
    let erin = User {
        id: UserId(Uuid::now_v7()),
        username: format!("erin.{tag}@elsewhere.example"),
        display_name: format!("Erin {tag}"),
        email: None,
    };
    for user in [&dora, &erin] {
        api.store.upsert_user(user).await.unwrap();
    }
    let store: Arc<dyn Store> = Arc::clone(&api.store) as Arc<dyn Store>;
    chat_with(&*store, searcher.id, &[dora.id, erin.id]).await;

    for part in [format!("dora.{tag}"), format!("erin.{tag}")] {
        let page = search_as(&api, searcher.id, &part, None, 10).await;
        assert!(page.items.is_empty(), "{part} finds {:?}", page.items);
    }
    let whole = search_as(&api, searcher.id, &address, None, 10).await;
    assert_eq!(whole.items.len(), 1, "{:?}", whole.items);
    let profile = api.state.user_profile(searcher.id, dora.id).await.unwrap();
    for shown in [&whole.items[0], &profile] {
        assert_eq!(shown.id, dora.id);
        let json = serde_json::to_string(shown).unwrap();
        assert!(!json.contains('@'), "another user sees {json}");
        assert!(!shown.username.is_empty() && !shown.display_name.is_empty());
    }
    // Erin is shown by her name; found by it, and by her whole user name.
    let by_name = search_as(&api, searcher.id, &format!("erin {tag}"), None, 10).await;
    let by_user_name = search_as(&api, searcher.id, &erin.username, None, 10).await;
    for page in [&by_name, &by_user_name] {
        assert_eq!(page.items.len(), 1, "{:?}", page.items);
        assert_eq!(page.items[0].id, erin.id);
        assert_eq!(page.items[0].username, erin.display_name);
        assert_eq!(page.items[0].display_name, erin.display_name);
    }
    // Dora sees herself as she is.
    let own = search_as(&api, dora.id, &address, None, 10).await;
    assert_eq!(own.items, vec![dora.clone()]);
    assert_eq!(
        api.state.user_profile(dora.id, dora.id).await.unwrap(),
        dora
    );
    api.clean_up().await;
}
on_both_stacks!(an_address_for_a_user_name_is_shown_to_its_owner_only);
