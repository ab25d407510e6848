//! One behavioural suite every [`Store`] implementation must pass. The tests in `api/tests` run it
//! against the embedded store and against the CQL store on a fresh keyspace.

use std::collections::HashSet;
use std::sync::Arc;

use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, User, UserId};
use time::OffsetDateTime;
use uuid::{Timestamp, Uuid};

use super::{ChatActivity, Inserted, MarkerKind, NewChat, Store, search_users};
use confab_schema::Member;

/// Runs every check against `store`, which must be empty.
pub async fn test_suite(store: Arc<dyn Store>) {
    store.check().await.expect("store answers");
    users(&*store).await;
    chats_and_members(&*store).await;
    send_parity(&*store).await;
    racing_senders_store_one_signal(Arc::clone(&store)).await;
    history_pages_newest_first_across_buckets(&*store).await;
    chats_do_not_share_history(&*store).await;
    user_search(&*store).await;
    membership_changes(&*store).await;
    activity_orders_chats(&*store).await;
    edits_tombstones_and_forward_paging(&*store).await;
    reactions_count_once_per_user(&*store).await;
    markers_move_forward_only(&*store).await;
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

async fn user_search(store: &dyn Store) {
    let tag = &Uuid::new_v4().simple().to_string()[..8];
    let make = |username: String, display: String, email: Option<String>| User {
        id: UserId::from_subject("conformance", &username),
        username,
        display_name: display,
        email,
    };
    // Matches `q{tag}` by user name, display name and e-mail, and one user by all three.
    let by_name = make(format!("q{tag}-ann"), "Ann".into(), None);
    let by_display = make(format!("x{tag}-bea"), format!("Q{tag} Bea"), None);
    let by_email = make(
        format!("y{tag}-cy"),
        "Cy".into(),
        Some(format!("q{tag}-cy@example.com")),
    );
    let by_all = make(
        format!("q{tag}-dee"),
        format!("Q{tag}-Dee"),
        Some(format!("q{tag}-dee@example.com")),
    );
    let unrelated = make(
        format!("z{tag}-eve"),
        "Eve".into(),
        Some(format!("eve{tag}@example.com")),
    );
    for user in [&by_name, &by_display, &by_email, &by_all, &unrelated] {
        store.upsert_user(user).await.unwrap();
    }
    let prefix = format!("Q{tag}");
    let (all, _) = search_users(store, &prefix, None, 50).await.unwrap();
    let ids: HashSet<UserId> = all.iter().map(|u| u.id).collect();
    assert_eq!(all.len(), 4, "each matching user once: {all:?}");
    assert_eq!(
        ids,
        HashSet::from([by_name.id, by_display.id, by_email.id, by_all.id])
    );

    // Pages of one walk the same users, each once.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let (page, next) = search_users(store, &prefix, after, 1).await.unwrap();
        paged.extend(page.into_iter().map(|u| u.id));
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(paged, all.iter().map(|u| u.id).collect::<Vec<_>>());

    // A changed profile is found by its new terms only.
    let mut renamed = by_name.clone();
    renamed.username = format!("r{tag}-ann");
    store.upsert_user(&renamed).await.unwrap();
    let (after_rename, _) = search_users(store, &prefix, None, 50).await.unwrap();
    assert!(!after_rename.iter().any(|u| u.id == by_name.id));
    let (found, _) = search_users(store, &format!("r{tag}"), None, 50)
        .await
        .unwrap();
    assert_eq!(found, vec![renamed]);
    assert!(
        search_users(store, &format!("nothing{tag}"), None, 50)
            .await
            .unwrap()
            .0
            .is_empty()
    );
}

async fn membership_changes(store: &dyn Store) {
    let owner = user("owner");
    let others: Vec<User> = (0..7).map(|i| user(&format!("m{i}"))).collect();
    let chat = chat_with(
        store,
        owner.id,
        &others.iter().map(|u| u.id).collect::<Vec<_>>(),
    )
    .await;

    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.members_page(chat, after, 3).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|m| m.user_id);
        paged.extend(page.into_iter().map(|m| m.user_id));
    }
    assert_eq!(paged.len(), 8);
    assert_eq!(
        paged.iter().collect::<HashSet<_>>().len(),
        8,
        "no member twice"
    );

    let newcomer = user("newcomer");
    let member = Member {
        user_id: newcomer.id,
        role: MemberRole::Member,
        joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
    };
    store.put_member(chat, &member).await.unwrap();
    assert_eq!(
        store.member_role(chat, newcomer.id).await.unwrap(),
        Some(MemberRole::Member)
    );
    store
        .put_member(
            chat,
            &Member {
                role: MemberRole::Admin,
                ..member.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        store.member_role(chat, newcomer.id).await.unwrap(),
        Some(MemberRole::Admin)
    );
    store.remove_member(chat, newcomer.id).await.unwrap();
    assert_eq!(store.member_role(chat, newcomer.id).await.unwrap(), None);
    assert_eq!(store.members(chat).await.unwrap().len(), 8);

    store
        .update_chat(chat, Some("renamed"), Some("about"))
        .await
        .unwrap();
    let updated = store.get_chat(chat).await.unwrap().unwrap();
    assert_eq!(updated.name.as_deref(), Some("renamed"));
    assert_eq!(updated.description.as_deref(), Some("about"));
}

async fn activity_orders_chats(store: &dyn Store) {
    let alice = user("alice");
    let bob = user("bob");
    let mut chats = Vec::new();
    for _ in 0..5 {
        let chat = chat_with(store, alice.id, &[bob.id]).await;
        store
            .touch_chat(chat, &[alice.id, bob.id], SignalId::new())
            .await
            .unwrap();
        chats.push(chat);
    }
    let order = |list: Vec<ChatActivity>| list.into_iter().map(|a| a.chat_id).collect::<Vec<_>>();
    let newest_first: Vec<ChatId> = chats.iter().rev().copied().collect();
    assert_eq!(
        order(store.chats_by_activity(alice.id, None, 10).await.unwrap()),
        newest_first
    );

    // A new signal in the oldest chat moves it to the front, for every member.
    let moved = SignalId::new();
    store
        .touch_chat(chats[0], &[alice.id, bob.id], moved)
        .await
        .unwrap();
    // An older activity arriving late does not move it back.
    store
        .touch_chat(chats[0], &[alice.id, bob.id], id_days_ago(1, 0))
        .await
        .unwrap();
    let mut expected = vec![chats[0]];
    expected.extend(chats[1..].iter().rev());
    for member in [alice.id, bob.id] {
        let listed = store.chats_by_activity(member, None, 10).await.unwrap();
        assert_eq!(listed[0].activity, moved);
        assert_eq!(order(listed), expected);
    }

    // Paging, two at a time.
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store.chats_by_activity(alice.id, after, 2).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().copied();
        paged.extend(page.into_iter().map(|a| a.chat_id));
    }
    assert_eq!(paged, expected);

    // Leaving takes the chat out of the leaver's list only.
    store.remove_member(chats[2], bob.id).await.unwrap();
    store.untouch_chat(chats[2], bob.id).await.unwrap();
    assert!(!order(store.chats_by_activity(bob.id, None, 10).await.unwrap()).contains(&chats[2]));
    assert!(order(store.chats_by_activity(alice.id, None, 10).await.unwrap()).contains(&chats[2]));
}

async fn edits_tombstones_and_forward_paging(store: &dyn Store) {
    let alice = user("alice");
    let bob = user("bob");
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let mut ids = Vec::new();
    for (days_ago, i) in [(9u64, 0u64), (9, 1), (4, 0), (0, 0), (0, 1)] {
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
    ids.sort();
    assert!(
        store
            .get_signal(chat, SignalId::new())
            .await
            .unwrap()
            .is_none()
    );

    // Forward from the oldest, across buckets, oldest first.
    let forward = store.signals_after(chat, ids[0], 10).await.unwrap();
    assert_eq!(
        forward.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[1..].to_vec()
    );
    let two = store.signals_after(chat, ids[1], 2).await.unwrap();
    assert_eq!(
        two.iter().map(|s| s.id).collect::<Vec<_>>(),
        ids[2..4].to_vec()
    );

    // An edit keeps the id and records when.
    let mut edited = store.get_signal(chat, ids[2]).await.unwrap().unwrap();
    edited.text = Some("edited".into());
    edited.edited_at = Some(confab_schema::model::to_millis(OffsetDateTime::now_utc()));
    store.update_signal(&edited).await.unwrap();
    assert_eq!(
        store.get_signal(chat, ids[2]).await.unwrap().unwrap(),
        edited
    );

    // A tombstone has no text, in history too.
    let mut deleted = store.get_signal(chat, ids[3]).await.unwrap().unwrap();
    deleted.deleted = true;
    deleted.text = None;
    store.update_signal(&deleted).await.unwrap();
    let history = store.signals_before(chat, None, 10).await.unwrap();
    let tombstone = history.iter().find(|s| s.id == ids[3]).unwrap();
    assert!(tombstone.deleted);
    assert_eq!(tombstone.text, None);

    // Unread: bob has read up to ids[1]; of the 3 after it, one is deleted.
    assert_eq!(
        store
            .count_unread(chat, Some(ids[1]), bob.id, 100)
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        store.count_unread(chat, None, bob.id, 100).await.unwrap(),
        4
    );
    assert_eq!(
        store.count_unread(chat, None, bob.id, 3).await.unwrap(),
        3,
        "capped"
    );
    // Alice wrote them all: nothing is unread for her.
    assert_eq!(
        store.count_unread(chat, None, alice.id, 100).await.unwrap(),
        0
    );
}

async fn reactions_count_once_per_user(store: &dyn Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let signal = message(chat, alice.id, None, "react to me");
    store.insert_signal(&signal).await.unwrap();
    assert!(
        store
            .reaction_counts(chat, signal.id)
            .await
            .unwrap()
            .is_empty()
    );

    assert!(
        store
            .add_reaction(chat, signal.id, "👍", alice.id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .add_reaction(chat, signal.id, "👍", alice.id)
            .await
            .unwrap(),
        "idempotent"
    );
    assert!(
        store
            .add_reaction(chat, signal.id, "👍", bob.id)
            .await
            .unwrap()
    );
    assert!(
        store
            .add_reaction(chat, signal.id, "🎉", bob.id)
            .await
            .unwrap()
    );
    let counts = store.reaction_counts(chat, signal.id).await.unwrap();
    assert_eq!(
        counts,
        [("🎉".to_owned(), 1), ("👍".to_owned(), 2)]
            .into_iter()
            .collect()
    );

    let mut who = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .reactions_page(chat, signal.id, after, 2)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        who.extend(page);
    }
    assert_eq!(who.len(), 3);
    assert_eq!(who.iter().collect::<HashSet<_>>().len(), 3);

    assert!(
        store
            .remove_reaction(chat, signal.id, "👍", alice.id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .remove_reaction(chat, signal.id, "👍", alice.id)
            .await
            .unwrap(),
        "idempotent"
    );
    assert!(
        store
            .remove_reaction(chat, signal.id, "🎉", bob.id)
            .await
            .unwrap()
    );
    let counts = store.reaction_counts(chat, signal.id).await.unwrap();
    assert_eq!(
        counts,
        [("👍".to_owned(), 1)].into_iter().collect(),
        "zero counts are not listed"
    );
}

async fn markers_move_forward_only(store: &dyn Store) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let older = id_days_ago(2, 0);
    let newer = SignalId::new();
    assert_eq!(
        store.marker(MarkerKind::Read, chat, bob.id).await.unwrap(),
        None
    );
    store
        .advance_marker(MarkerKind::Read, chat, bob.id, newer)
        .await
        .unwrap();
    store
        .advance_marker(MarkerKind::Read, chat, bob.id, older)
        .await
        .unwrap();
    assert_eq!(
        store.marker(MarkerKind::Read, chat, bob.id).await.unwrap(),
        Some(newer)
    );
    // Delivery is a separate marker.
    assert_eq!(
        store
            .marker(MarkerKind::Delivered, chat, bob.id)
            .await
            .unwrap(),
        None
    );
    store
        .advance_marker(MarkerKind::Delivered, chat, bob.id, older)
        .await
        .unwrap();
    store
        .advance_marker(MarkerKind::Read, chat, alice.id, older)
        .await
        .unwrap();

    let mut read = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .markers_page(MarkerKind::Read, chat, after, 1)
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().map(|(u, _)| *u);
        read.extend(page);
    }
    let read: HashSet<(UserId, SignalId)> = read.into_iter().collect();
    assert_eq!(read, HashSet::from([(bob.id, newer), (alice.id, older)]));
}
