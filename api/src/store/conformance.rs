//! One behavioural suite every [`Store`] implementation must pass. The tests in `api/tests` run it
//! against the embedded store and against the CQL store on a fresh keyspace.

use std::collections::HashSet;
use std::sync::Arc;

use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, User, UserId};
use time::OffsetDateTime;
use uuid::{Timestamp, Uuid};

use super::{Inserted, NewChat, Store};

/// Runs every check against `store`, which must be empty.
pub async fn test_suite(store: Arc<dyn Store>) {
    store.check().await.expect("store answers");
    users(&*store).await;
    chats_and_members(&*store).await;
    send_parity(&*store).await;
    racing_senders_store_one_signal(Arc::clone(&store)).await;
    history_pages_newest_first_across_buckets(&*store).await;
    chats_do_not_share_history(&*store).await;
}

fn user(name: &str) -> User {
    User {
        id: UserId::from_subject("conformance", &format!("{name}-{}", Uuid::new_v4())),
        username: name.into(),
        display_name: name.to_uppercase(),
        email: Some(format!("{name}@example.com")),
    }
}

async fn chat_with(store: &dyn Store, owner: UserId, others: &[UserId]) -> ChatId {
    let id = ChatId::new();
    let mut members = vec![(owner, MemberRole::Owner)];
    members.extend(others.iter().map(|u| (*u, MemberRole::Member)));
    store
        .create_chat(&NewChat {
            id,
            kind: ChatKind::Group,
            name: Some("test".into()),
            description: None,
            created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            created_by: owner,
            members,
        })
        .await
        .expect("chat created");
    id
}

fn message_at(
    chat: ChatId,
    author: UserId,
    id: SignalId,
    nonce: Option<&str>,
    text: &str,
) -> Signal {
    Signal {
        id,
        chat_id: chat,
        kind: SignalKind::Message,
        author_id: author,
        created_at: id.created_at().unwrap(),
        nonce: nonce.map(str::to_owned),
        text: Some(text.into()),
        reply_to: None,
        attachments: vec![],
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
    }
}

fn message(chat: ChatId, author: UserId, nonce: Option<&str>, text: &str) -> Signal {
    message_at(chat, author, SignalId::new(), nonce, text)
}

async fn users(store: &dyn Store) {
    let mut alice = user("alice");
    assert_eq!(store.get_user(alice.id).await.unwrap(), None);
    store.upsert_user(&alice).await.unwrap();
    assert_eq!(store.get_user(alice.id).await.unwrap(), Some(alice.clone()));
    alice.display_name = "Alice Renamed".into();
    alice.email = None;
    store.upsert_user(&alice).await.unwrap();
    assert_eq!(store.get_user(alice.id).await.unwrap(), Some(alice));
}

async fn chats_and_members(store: &dyn Store) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    assert!(store.get_chat(ChatId::new()).await.unwrap().is_none());
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let stored = store.get_chat(chat).await.unwrap().expect("chat found");
    assert_eq!(stored.id, chat);
    assert_eq!(stored.kind, ChatKind::Group);
    assert_eq!(stored.name.as_deref(), Some("test"));
    assert_eq!(stored.created_by, alice.id);
    assert_eq!(
        store.member_role(chat, alice.id).await.unwrap(),
        Some(MemberRole::Owner)
    );
    assert_eq!(
        store.member_role(chat, bob.id).await.unwrap(),
        Some(MemberRole::Member)
    );
    assert_eq!(store.member_role(chat, carol.id).await.unwrap(), None);
    let members: HashSet<(UserId, MemberRole)> = store
        .members(chat)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    assert_eq!(
        members,
        HashSet::from([(alice.id, MemberRole::Owner), (bob.id, MemberRole::Member)])
    );
}

async fn send_parity(store: &dyn Store) {
    let alice = user("alice");
    let bob = user("bob");
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let first = message(chat, alice.id, Some("n-1"), "hello");
    assert_eq!(
        store.insert_signal(&first).await.unwrap(),
        Inserted::Created(first.clone())
    );

    // Same author, chat and nonce: the first signal back, nothing new stored.
    let retry = message(chat, alice.id, Some("n-1"), "hello (retried)");
    match store.insert_signal(&retry).await.unwrap() {
        Inserted::Existing(existing) => assert_eq!(existing, first),
        other => panic!("expected the existing signal, got {other:?}"),
    }
    // Another author may use the same nonce.
    let bobs = message(chat, bob.id, Some("n-1"), "bob's");
    assert!(matches!(
        store.insert_signal(&bobs).await.unwrap(),
        Inserted::Created(_)
    ));
    // Signals without a nonce are always new.
    let plain = message(chat, alice.id, None, "no nonce");
    assert!(matches!(
        store.insert_signal(&plain).await.unwrap(),
        Inserted::Created(_)
    ));

    let history = store.signals_before(chat, None, 10).await.unwrap();
    assert_eq!(
        history.iter().map(|s| s.id).collect::<Vec<_>>(),
        vec![plain.id, bobs.id, first.id]
    );
    assert_eq!(history[2], first);
}

async fn racing_senders_store_one_signal(store: Arc<dyn Store>) {
    let alice = user("alice");
    let chat = chat_with(&*store, alice.id, &[]).await;
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            let signal = message(chat, alice.id, Some("raced"), &format!("attempt {i}"));
            tokio::spawn(async move { store.insert_signal(&signal).await.unwrap() })
        })
        .collect();
    let mut outcomes = Vec::new();
    for racer in racers {
        outcomes.push(racer.await.unwrap());
    }
    let created = outcomes
        .iter()
        .filter(|o| matches!(o, Inserted::Created(_)))
        .count();
    assert_eq!(
        created, 1,
        "exactly one racer stores the signal: {outcomes:?}"
    );
    let ids: HashSet<SignalId> = outcomes.iter().map(|o| o.signal().id).collect();
    assert_eq!(ids.len(), 1, "every racer gets the same signal back");
    let history = store.signals_before(chat, None, 10).await.unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(Some(history[0].id), ids.into_iter().next());
}

/// A UUIDv7 for a moment `days_ago` days before now, `offset_ms` later.
fn id_days_ago(days_ago: u64, offset_ms: u64) -> SignalId {
    let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
    let secs = now - days_ago * 86_400 + offset_ms / 1000;
    let nanos = ((offset_ms % 1000) * 1_000_000) as u32;
    SignalId(Uuid::new_v7(Timestamp::from_unix(
        uuid::NoContext,
        secs,
        nanos,
    )))
}

async fn history_pages_newest_first_across_buckets(store: &dyn Store) {
    let alice = user("alice");
    let chat = chat_with(store, alice.id, &[]).await;
    assert!(
        store
            .signals_before(chat, None, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Signals over several days with empty days between, inserted out of order.
    let mut ids = Vec::new();
    for (days_ago, count) in [(40u64, 3u64), (3, 2), (0, 4), (1, 1), (20, 2)] {
        for i in 0..count {
            let id = id_days_ago(days_ago, i * 10);
            store
                .insert_signal(&message_at(
                    chat,
                    alice.id,
                    id,
                    None,
                    &format!("{days_ago}/{i}"),
                ))
                .await
                .unwrap();
            ids.push(id);
        }
    }
    ids.sort();
    ids.reverse();

    let everything = store.signals_before(chat, None, 100).await.unwrap();
    assert_eq!(everything.iter().map(|s| s.id).collect::<Vec<_>>(), ids);

    for page_size in [1usize, 2, 3, 5] {
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = store.signals_before(chat, before, page_size).await.unwrap();
            assert!(page.len() <= page_size);
            if page.is_empty() {
                break;
            }
            before = page.last().map(|s| s.id);
            seen.extend(page.into_iter().map(|s| s.id));
        }
        assert_eq!(
            seen, ids,
            "pages of {page_size} walk the whole history once, newest first"
        );
    }

    // A cursor in the middle of a day.
    let middle = ids[5];
    let after_middle = store.signals_before(chat, Some(middle), 3).await.unwrap();
    assert_eq!(
        after_middle.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[6..9].to_vec()
    );
}

async fn chats_do_not_share_history(store: &dyn Store) {
    let alice = user("alice");
    let one = chat_with(store, alice.id, &[]).await;
    let two = chat_with(store, alice.id, &[]).await;
    let signal = message(one, alice.id, Some("same"), "in one");
    store.insert_signal(&signal).await.unwrap();
    // The same nonce in another chat is a different signal.
    let other = message(two, alice.id, Some("same"), "in two");
    assert!(matches!(
        store.insert_signal(&other).await.unwrap(),
        Inserted::Created(_)
    ));
    assert_eq!(
        store.signals_before(one, None, 10).await.unwrap(),
        vec![signal]
    );
    assert_eq!(
        store.signals_before(two, None, 10).await.unwrap(),
        vec![other]
    );
}
