//! Racing membership changes settle to a valid state: a chat with members always keeps an owner,
//! and racing additions of one user add them once, with one `joined` signal. Many concurrent
//! requests, on the embedded default and on the real stack. An addition whose `member.joined`
//! reaches the log after a later removal's `member.left` is followed by another `member.left`;
//! and a reaction whose event reaches the log after another's is followed by the stored count,
//! and one that reaches the store after its message's deletion does not stay on it. A rename and a
//! new description made at once both stay, and of two renames the log ends with the stored
//! name. A message sent after a removal whose `member.left` is retried comes after it in the log.

mod support;

use support::on_both_stacks;

use confab_api::domain::Outcome;
use confab_api::domain::chats::ChatToCreate;
use confab_schema::event::EventKind;
use confab_schema::{ChatKind, Envelope, Event, UserId};
use serde_json::{Value, json};
use support::held_store::HeldApi;
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

/// Whether the user is a member after `envelope`, by what it says of them; `None` when it says
/// nothing of them.
fn membership_after(envelope: &Envelope, user: UserId) -> Option<bool> {
    match &envelope.event {
        Event::MemberJoined(change) | Event::MemberUpdated(change) if change.user_id == user => {
            Some(true)
        }
        Event::MemberLeft(change) if change.user_id == user => Some(false),
        _ => None,
    }
}

/// An addition's store change is applied, and its `member.joined` held on its way to the log
/// while a removal of the same user runs through, `member.left` and all. The log then has the
/// join after the leaving; the addition's last word for that user must still be that they left,
/// as the store has it, or their open streams would be routed the chat's messages again.
async fn a_removal_racing_an_additions_publish_has_the_last_word(stack: Stack) {
    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let carol = api.user("carol").await;
    let chat = support::held_store::group(&api.state, &alice, "racing", &[bob.id]).await;

    api.bus.hold_next(EventKind::MemberJoined);
    let addition = tokio::spawn({
        let state = api.state.clone();
        async move { state.add_member(alice.id, chat, carol.id, None).await }
    });
    api.bus.gate.arrived(1).await;
    api.state
        .remove_member(alice.id, chat, carol.id)
        .await
        .expect("carol is removed while her addition's event waits");
    api.bus.gate.release(1).await;
    let added = addition.await.unwrap();
    assert!(matches!(added, Ok(Outcome::Created(_))), "{added:?}");

    let events = api.bus.events_of(chat).await;
    let changes: Vec<(u64, bool)> = events
        .iter()
        .filter_map(|logged| Some((logged.seq, membership_after(&logged.envelope, carol.id)?)))
        .collect();
    assert_eq!(
        changes.last().map(|(_, member)| *member),
        Some(false),
        "the last word on carol in the log has her a member: {changes:?}"
    );
    let routed_last = events
        .iter()
        .rev()
        .find(|logged| {
            logged.envelope.joined.contains(&carol.id) || logged.envelope.left.contains(&carol.id)
        })
        .expect("the log routes carol in and out");
    assert!(
        routed_last.envelope.left.contains(&carol.id),
        "the last event routing carol takes her in: {routed_last:?}"
    );
    assert_eq!(api.state.publishes_retrying(), 0);
    api.clean_up().await;
}
on_both_stacks!(a_removal_racing_an_additions_publish_has_the_last_word);

/// Bob's removal is stored and its `member.left` fails to publish (a bus timeout), so it is
/// retried in the background; Alice sends a message at once. Until `member.left` is in the log,
/// Bob's open streams route the chat: the message must come after it, or it reaches the member
/// just removed. It used to be published at once, and the retry of `member.left` after it.
async fn a_message_after_a_removal_whose_event_is_retried_comes_after_it(stack: Stack) {
    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&api.state, &alice, "removing", &[bob.id]).await;

    api.bus.fail_next(EventKind::MemberLeft);
    api.state
        .remove_member(alice.id, chat, bob.id)
        .await
        .expect("bob is removed though his member.left is not published yet");
    let sent = support::held_store::message(&api.state, &alice, chat, "not for bob").await;

    let deadline = tokio::time::Instant::now() + support::DEADLINE;
    let (left_at, sent_at) = loop {
        let events = api.bus.events_of(chat).await;
        let left_at = events.iter().position(|logged| {
            matches!(&logged.envelope.event, Event::MemberLeft(change) if change.user_id == bob.id)
        });
        let sent_at = events.iter().position(|logged| {
            matches!(&logged.envelope.event, Event::SignalCreated(signal) if signal.id == sent)
        });
        if let (Some(left_at), Some(sent_at)) = (left_at, sent_at) {
            break (left_at, sent_at);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "member.left and the message not both in the log: {events:?}"
        );
        tokio::task::yield_now().await;
    };
    assert!(
        left_at < sent_at,
        "the message sent after bob's removal is in the log before his member.left \
         ({sent_at} before {left_at}): his streams were routed it"
    );
    let deadline = tokio::time::Instant::now() + support::DEADLINE;
    while api.state.publishes_retrying() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a publish still retrying"
        );
        tokio::task::yield_now().await;
    }
    api.clean_up().await;
}
on_both_stacks!(a_message_after_a_removal_whose_event_is_retried_comes_after_it);

/// Alice's reaction is stored and counted (1), and its `reaction.added` held on its way to the
/// log while Bob's reaction with the same emoji runs through (counted 2, published). The log then
/// says 1 last; clients set the count from the events, so the last word must be the stored 2.
async fn racing_reactions_leave_the_stored_count_last_in_the_log(stack: Stack) {
    use confab_api::domain::inputs::Emoji;

    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&api.state, &alice, "reacting", &[bob.id]).await;
    let message = support::held_store::message(&api.state, &alice, chat, "react to me").await;
    let thumbs = || Emoji::parse("👍".into()).unwrap();

    api.bus.hold_next(EventKind::ReactionAdded);
    let alices = tokio::spawn({
        let state = api.state.clone();
        async move { state.add_reaction(alice.id, chat, message, thumbs()).await }
    });
    api.bus.gate.arrived(1).await;
    api.state
        .add_reaction(bob.id, chat, message, thumbs())
        .await
        .expect("bob reacts while alice's event waits");
    api.bus.gate.release(1).await;
    alices.await.unwrap().expect("alice reacts");

    let counts: Vec<i64> = api
        .bus
        .events_of(chat)
        .await
        .iter()
        .filter_map(|logged| match &logged.envelope.event {
            Event::ReactionAdded(change) | Event::ReactionRemoved(change) => Some(change.count),
            _ => None,
        })
        .collect();
    assert_eq!(
        counts.last(),
        Some(&2),
        "the log's last count of 👍 is not the stored one: {counts:?}"
    );
    assert_eq!(api.state.publishes_retrying(), 0);
    api.clean_up().await;
}
on_both_stacks!(racing_reactions_leave_the_stored_count_last_in_the_log);

/// Bob's reaction passes its check while the message is there, and reaches the store (held until
/// then) only after Alice deleted the message: it does not stay on the deleted message (nothing
/// could take it off), and Bob is told the message is gone. A reaction made before the deletion
/// can still be taken back.
async fn a_reaction_racing_its_messages_deletion_does_not_stay_on_it(stack: Stack) {
    use confab_api::domain::inputs::Emoji;

    use confab_api::error::ApiError;
    use confab_api::store::Store;
    use support::held_store::Held;
    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&api.state, &alice, "deleting", &[bob.id]).await;
    let message = support::held_store::message(&api.state, &alice, chat, "soon gone").await;
    let emoji = |e: &str| Emoji::parse(e.into()).unwrap();
    api.state
        .add_reaction(alice.id, chat, message, emoji("🎉"))
        .await
        .expect("alice reacts before the deletion");

    api.store.hold_next(Held::ReactionAdded);
    let bobs = tokio::spawn({
        let state = api.state.clone();
        async move { state.add_reaction(bob.id, chat, message, emoji("👍")).await }
    });
    api.store.gate.arrived(1).await;
    api.state
        .delete_message(alice.id, chat, message)
        .await
        .expect("alice deletes it while bob's reaction waits");
    api.store.gate.release(1).await;
    let reacted = bobs.await.unwrap();
    assert!(
        matches!(reacted, Err(ApiError::Unprocessable(_))),
        "a reaction on a deleted message: {reacted:?}"
    );
    assert!(
        !api.store
            .has_reaction(chat, message, "👍", bob.id)
            .await
            .unwrap(),
        "bob's reaction stays on the deleted message"
    );
    api.state
        .remove_reaction(alice.id, chat, message, emoji("🎉"))
        .await
        .expect("a reaction made before the deletion is taken back");
    assert!(
        !api.store
            .has_reaction(chat, message, "🎉", alice.id)
            .await
            .unwrap()
    );
    api.clean_up().await;
}
on_both_stacks!(a_reaction_racing_its_messages_deletion_does_not_stay_on_it);

/// A rename and a change of the description at the same time (two devices, or two admins) both
/// stay: the rename, held until the other change is made, does not write back the description it
/// read before.
async fn a_rename_racing_a_new_description_keeps_both(stack: Stack) {
    use confab_api::domain::chats::ChatChange;
    use support::held_store::Held;
    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = ChatToCreate::parse(
        ChatKind::Group,
        Some("before".into()),
        Some("old".into()),
        vec![bob.id],
    )
    .unwrap();
    let chat = match api.state.create_chat(&alice, chat).await.unwrap() {
        Outcome::Created(chat) | Outcome::Existing(chat) => chat.id,
    };
    api.store.hold_next(Held::ChatUpdated);
    let rename = tokio::spawn({
        let state = api.state.clone();
        async move {
            let change = ChatChange::parse(Some("after".into()), None).unwrap();
            state.update_chat(alice.id, chat, change).await
        }
    });
    api.store.gate.arrived(1).await;
    let change = ChatChange::parse(None, Some("new".into())).unwrap();
    api.state
        .update_chat(alice.id, chat, change)
        .await
        .expect("describes while the rename waits");
    api.store.gate.release(1).await;
    rename.await.unwrap().expect("renames");
    for reader in [alice.id, bob.id] {
        let shown = api.state.get_chat(reader, chat).await.unwrap();
        assert_eq!(
            (shown.name.as_deref(), shown.description.as_deref()),
            (Some("after"), Some("new")),
            "as {reader:?} sees it"
        );
    }
    api.clean_up().await;
}
on_both_stacks!(a_rename_racing_a_new_description_keeps_both);

/// Alice's rename to "first" is stored and read back, and its `chat.updated` held on its way to
/// the log while her rename to "second" runs through, event and all. The log then ends saying
/// "first"; clients show a chat's name from the events, so its last word must be the stored one.
async fn racing_renames_leave_the_stored_name_last_in_the_log(stack: Stack) {
    use confab_api::domain::chats::ChatChange;
    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&api.state, &alice, "before", &[bob.id]).await;
    let rename = |name: &str| ChatChange::parse(Some(name.into()), None).unwrap();

    api.bus.hold_next(EventKind::ChatUpdated);
    let first = tokio::spawn({
        let state = api.state.clone();
        let change = rename("first");
        async move { state.update_chat(alice.id, chat, change).await }
    });
    api.bus.gate.arrived(1).await;
    api.state
        .update_chat(alice.id, chat, rename("second"))
        .await
        .expect("renames again while the first rename's event waits");
    api.bus.gate.release(1).await;
    first.await.unwrap().expect("renames");

    let names: Vec<Option<String>> = api
        .bus
        .events_of(chat)
        .await
        .iter()
        .filter_map(|logged| match &logged.envelope.event {
            Event::ChatUpdated(updated) => Some(updated.name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        names.last(),
        Some(&Some("second".to_owned())),
        "the log's last name of the chat is not the stored one: {names:?}"
    );
    assert_eq!(api.state.publishes_retrying(), 0);
    api.clean_up().await;
}
on_both_stacks!(racing_renames_leave_the_stored_name_last_in_the_log);
