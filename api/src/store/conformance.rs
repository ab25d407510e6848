//! One behavioural suite every [`Store`] implementation must pass. The tests in `api/tests` run it
//! against the embedded store and against the CQL store on a fresh keyspace, one test per case
//! ([`store_conformance_tests!`](crate::store_conformance_tests)).

use std::collections::HashSet;

use futures::StreamExt;
use std::sync::Arc;
use std::time::Duration;

use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, User, UserId};
use time::OffsetDateTime;
use uuid::{Timestamp, Uuid};

use super::{
    CLAIM_ORPHANED_AFTER, ChatActivity, InfoChange, Inserted, MarkerKind, MemberPut, NewChat, Slot,
    SlotState, SlotWrite, SmallObjectInfo, Store, UNREAD_CAP, UNREAD_SCAN_LIMIT, circle_pool,
    search_users,
};
use confab_schema::CircleId;
use confab_schema::Member;
use confab_schema::circle::{Circle, CircleMember};

/// The cases, one test each, so that one failure does not hide the others. Every case makes its own
/// users and chats, so cases may share one store and run concurrently.
#[macro_export]
macro_rules! store_conformance_tests {
    // `$open` is an async block giving `Option<Arc<dyn Store>>` (`None`: skip, the store is not
    // reachable and the suite was told it may skip).
    ($open:expr) => {
        $crate::store_conformance_tests!(@cases $open;
            users,
            chats_and_members,
            send_parity,
            a_nonce_names_its_signal,
            racing_senders_store_one_signal,
            deleted_text_is_kept_nowhere,
            history_pages_newest_first_across_buckets,
            chats_do_not_share_history,
            user_search,
            addresses_are_never_prefix_terms,
            membership_changes,
            members_among_answers_members_only,
            guarded_member_changes_serialize,
            chats_of_a_user,
            a_direct_chat_made_twice_is_one_chat,
            forgetting_a_left_chat_spares_members,
            left_chats_are_listed_newest_first,
            removing_a_non_member_ends_nothing,
            every_chat_id_pages_once,
            devices_belong_to_one_user,
            racing_registrations_leave_one_owner,
            sessions_are_recorded_per_user_until_they_expire,
            settings_are_per_user_and_per_chat,
            activity_orders_chats,
            activity_of_a_leaver_does_not_come_back,
            edits_tombstones_and_forward_paging,
            an_edit_never_undoes_a_delete,
            an_edit_wins_over_the_original_whatever_the_clocks,
            reactions_count_once_per_user,
            reaction_counts_of_a_page,
            signals_and_counts_across_chats,
            chat_entries_show_role_latest_and_marker,
            a_rename_shows_in_every_members_entry,
            a_change_of_one_field_keeps_the_other,
            the_chat_list_is_the_activity_order_with_entries,
            unread_counts_are_capped_and_the_scan_bounded,
            unread_counts_asked_together_are_the_counts_alone,
            markers_move_forward_only,
            attachments_page_newest_first_by_kind,
            a_page_of_attachments_is_read_at_once,
            attachments_reference_their_objects,
            an_objects_referrers_page_and_drop,
            a_message_claims_its_chats_unclaimed_attachments,
            racing_claims_leave_one_holder_and_a_release_frees,
            a_claim_given_back_after_pictures_frees_the_attachment,
            an_orphaned_claim_is_taken_over,
            pictures_change_only_an_attachment_that_exists,
            the_collectors_marks,
            small_objects_by_name,
            signals_keep_their_attachment_ids,
            the_outbox_keeps_each_writers_entries,
            circles_codes_members_and_expiry,
            racing_joins_never_overfill_a_circle,
            an_owners_removals_last_as_long_as_the_circle,
            slot_writes_are_all_or_nothing,
            racing_pairings_pair_each_user_once,
            deleting_a_chat_removes_everything,
            call_signals_keep_their_call,
            calls_move_once_and_ring_until_answered,
            a_chats_live_calls,
            the_sweepers_list_pages_and_keeps_calls_until_forgotten,
            pending_call_signals_replace_each_other,
            call_participants_leave_and_join_again
        );
    };
    (@cases $open:expr; $($case:ident),+) => {
        $(
            #[tokio::test]
            async fn $case() {
                if let Some(store) = $open.await {
                    $crate::store::conformance::$case(store).await;
                }
            }
        )+
    };
}

fn user(name: &str) -> User {
    User {
        id: UserId::from_subject("conformance", &format!("{name}-{}", Uuid::new_v4())),
        username: name.into(),
        display_name: name.to_uppercase(),
        email: Some(format!("{name}@example.com")),
    }
}

/// A new group of `owner` and `others` (members); also for store tests outside the suite.
pub async fn chat_with(store: &dyn Store, owner: UserId, others: &[UserId]) -> ChatId {
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
        call: None,
    }
}

/// Inserts `signals`, sixteen at a time.
async fn insert_all(store: &Arc<dyn Store>, signals: Vec<Signal>) {
    futures::stream::iter(signals)
        .map(|signal| {
            let store = Arc::clone(store);
            async move { store.insert_signal(&signal).await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
}

/// A message of `author` in `chat` with a fresh time-ordered id; also for store tests outside
/// the suite.
pub fn message(chat: ChatId, author: UserId, nonce: Option<&str>, text: &str) -> Signal {
    message_at(chat, author, SignalId::new(), nonce, text)
}

pub async fn users(store: Arc<dyn Store>) {
    let store = &*store;
    let mut alice = user("alice");
    assert_eq!(store.get_user(alice.id).await.unwrap(), None);
    store.upsert_user(&alice).await.unwrap();
    assert_eq!(store.get_user(alice.id).await.unwrap(), Some(alice.clone()));
    alice.display_name = "Alice Renamed".into();
    alice.email = None;
    store.upsert_user(&alice).await.unwrap();
    assert_eq!(store.get_user(alice.id).await.unwrap(), Some(alice));
}

pub async fn chats_and_members(store: Arc<dyn Store>) {
    let store = &*store;
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

pub async fn send_parity(store: Arc<dyn Store>) {
    let store = &*store;
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

pub async fn racing_senders_store_one_signal(store: Arc<dyn Store>) {
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

/// The signal a nonce is recorded for can be asked for by the nonce: by its author, in its chat.
pub async fn a_nonce_names_its_signal(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat_with(store.as_ref(), alice.id, &[bob.id]).await;
    let other = chat_with(store.as_ref(), alice.id, &[bob.id]).await;
    assert_eq!(
        store.nonce_holder(chat, alice.id, "n").await.unwrap(),
        None,
        "not sent yet"
    );
    let sent = message(chat, alice.id, Some("n"), "hello");
    store.insert_signal(&sent).await.unwrap();
    assert_eq!(
        store.nonce_holder(chat, alice.id, "n").await.unwrap(),
        Some(sent.id)
    );
    let again = message(chat, alice.id, Some("n"), "hello again");
    store.insert_signal(&again).await.unwrap();
    assert_eq!(
        store.nonce_holder(chat, alice.id, "n").await.unwrap(),
        Some(sent.id),
        "the first signal keeps it"
    );
    for (chat, author, nonce) in [
        (chat, bob.id, "n"),
        (other, alice.id, "n"),
        (chat, alice.id, "m"),
    ] {
        assert_eq!(
            store.nonce_holder(chat, author, nonce).await.unwrap(),
            None,
            "{author:?} {nonce} in {chat:?}"
        );
    }
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

pub async fn history_pages_newest_first_across_buckets(store: Arc<dyn Store>) {
    let store = &*store;
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

pub async fn chats_do_not_share_history(store: Arc<dyn Store>) {
    let store = &*store;
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

pub async fn user_search(store: Arc<dyn Store>) {
    let store = &*store;
    let tag = &Uuid::new_v4().simple().to_string()[..8];
    let make = |username: String, display: String, email: Option<String>| User {
        id: UserId::from_subject("conformance", &username),
        username,
        display_name: display,
        email,
    };
    // Matches `q{tag}` by user name and display name, one user by both; `by_email`'s address
    // begins with it too, but an address is found only whole.
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
    assert_eq!(all.len(), 3, "each matching user once: {all:?}");
    assert_eq!(ids, HashSet::from([by_name.id, by_display.id, by_all.id]));

    // An e-mail address is found whole (in any case), never by a part of it.
    let address = format!("Q{tag}-CY@example.com");
    let (whole, _) = search_users(store, &address, None, 50).await.unwrap();
    assert_eq!(whole, vec![by_email.clone()]);
    for part in [format!("q{tag}-cy"), format!("q{tag}-cy@example.co")] {
        let (found, _) = search_users(store, &part, None, 50).await.unwrap();
        assert!(found.is_empty(), "{part} finds {found:?}");
    }

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

/// An e-mail address, and a user name or display name that is or looks like one, are never among
/// the terms a prefix scan reads: a part of an address finds no row at all (not even one a search
/// would then skip, which would cost a read and show in the time it takes).
pub async fn addresses_are_never_prefix_terms(store: Arc<dyn Store>) {
    let store = &*store;
    let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let with_address = User {
        id: UserId(Uuid::now_v7()),
        username: format!("b{tag}-boss"),
        display_name: "The Boss".into(),
        email: Some(format!("C{tag}.ceo@corp.example")),
    };
    // An identity provider that uses the address as the user name (and as the display name when
    // there is no name).
    let named_by_address = User {
        id: UserId(Uuid::now_v7()),
        username: format!("d{tag}.dora@corp.example"),
        display_name: format!("d{tag}.dora@corp.example"),
        email: Some(format!("d{tag}.dora@corp.example")),
    };
    let address_like_name = User {
        id: UserId(Uuid::now_v7()),
        username: format!("e{tag}.erin@elsewhere.example"),
        display_name: format!("E{tag} Erin"),
        email: None,
    };
    // A display name that looks like someone's address: users choose it.
    let posing = User {
        id: UserId(Uuid::now_v7()),
        username: format!("f{tag}-frank"),
        display_name: format!("g{tag}.ceo@corp.example"),
        email: None,
    };
    for user in [
        &with_address,
        &named_by_address,
        &address_like_name,
        &posing,
    ] {
        store.upsert_user(user).await.unwrap();
    }
    assert_eq!(
        store
            .users_by_address(&format!("g{tag}.ceo@corp.example"), 10)
            .await
            .unwrap(),
        Vec::<UserId>::new(),
        "found by a display name that looks like an address"
    );
    for prefix in [
        format!("c{tag}"),
        format!("c{tag}.ceo@corp"),
        format!("d{tag}"),
        format!("d{tag}.dora@"),
        format!("e{tag}.erin"),
    ] {
        let rows = store.user_terms(&prefix, None, 50).await.unwrap();
        assert!(rows.is_empty(), "{prefix} reaches the rows {rows:?}");
    }
    // The names that are not addresses are still there.
    let rows = store
        .user_terms(&format!("b{tag}"), None, 50)
        .await
        .unwrap();
    assert_eq!(rows, vec![(format!("b{tag}-boss"), with_address.id)]);
    let rows = store
        .user_terms(&format!("e{tag}"), None, 50)
        .await
        .unwrap();
    assert_eq!(rows, vec![(format!("e{tag} erin"), address_like_name.id)]);

    // The addresses are found whole, lower-cased, and by nothing less.
    for (address, user) in [
        (format!("c{tag}.ceo@corp.example"), &with_address),
        (format!("d{tag}.dora@corp.example"), &named_by_address),
        (format!("e{tag}.erin@elsewhere.example"), &address_like_name),
    ] {
        let found = store.users_by_address(&address, 10).await.unwrap();
        assert_eq!(found, vec![user.id], "{address}");
        let part = &address[..address.len() - 1];
        let found = store.users_by_address(part, 10).await.unwrap();
        assert!(found.is_empty(), "{part} finds {found:?}");
    }
    // A changed address replaces the old one.
    let moved = User {
        email: Some(format!("c{tag}.chair@corp.example")),
        ..with_address.clone()
    };
    store.upsert_user(&moved).await.unwrap();
    let old = format!("c{tag}.ceo@corp.example");
    assert!(store.users_by_address(&old, 10).await.unwrap().is_empty());
    let new = format!("c{tag}.chair@corp.example");
    assert_eq!(
        store.users_by_address(&new, 10).await.unwrap(),
        vec![with_address.id]
    );
    assert!(
        store
            .user_terms(&format!("c{tag}"), None, 50)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn membership_changes(store: Arc<dyn Store>) {
    let store = &*store;
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
        .update_chat(chat, InfoChange::both(Some("renamed"), Some("about")))
        .await
        .unwrap();
    let updated = store.get_chat(chat).await.unwrap().unwrap();
    assert_eq!(updated.name.as_deref(), Some("renamed"));
    assert_eq!(updated.description.as_deref(), Some("about"));
}

/// Membership changes checked against what they were decided on: racing ones apply one at a time,
/// and one whose checks no longer hold writes nothing.
pub async fn members_among_answers_members_only(store: Arc<dyn Store>) {
    let store = &*store;
    let owner = user("owner");
    let members: Vec<UserId> = (0..3).map(|i| user(&format!("m{i}")).id).collect();
    let chat = chat_with(store, owner.id, &members).await;
    // More users than one `IN` takes, members among them at both ends.
    let strangers: Vec<UserId> = (0..250).map(|i| user(&format!("s{i}")).id).collect();
    let mut asked = vec![members[0], owner.id];
    asked.extend(&strangers);
    asked.extend(&members[1..]);
    let found = store.members_among(chat, &asked).await.unwrap();
    let all = store.members(chat).await.unwrap();
    for member in &found {
        assert!(all.contains(member), "{member:?} as the chat holds it");
    }
    let found: HashSet<UserId> = found.into_iter().map(|m| m.user_id).collect();
    let mut expected: HashSet<UserId> = members.iter().copied().collect();
    expected.insert(owner.id);
    assert_eq!(found, expected);

    store.remove_member(chat, members[1]).await.unwrap();
    let found = store.members_among(chat, &members).await.unwrap();
    assert_eq!(
        found.into_iter().map(|m| m.user_id).collect::<HashSet<_>>(),
        HashSet::from([members[0], members[2]]),
        "an ex-member is not among them"
    );
    assert!(store.members_among(chat, &[]).await.unwrap().is_empty());
}

pub async fn guarded_member_changes_serialize(store: Arc<dyn Store>) {
    use super::{GuardedChange, MemberWrite};
    let owner = user("owner");
    let second = user("second");
    let chat = chat_with(&*store, owner.id, &[second.id]).await;
    let now = || confab_schema::model::to_millis(OffsetDateTime::now_utc());
    // A change whose expectation fails writes nothing.
    let stale = GuardedChange {
        write: MemberWrite::SetRole(second.id, MemberRole::Admin),
        expect: vec![
            (owner.id, MemberRole::Admin),
            (second.id, MemberRole::Member),
        ],
    };
    assert!(!store.change_member(chat, &stale).await.unwrap());
    assert_eq!(
        store.member_role(chat, second.id).await.unwrap(),
        Some(MemberRole::Member)
    );
    let promote = GuardedChange {
        write: MemberWrite::SetRole(second.id, MemberRole::Owner),
        expect: vec![
            (owner.id, MemberRole::Owner),
            (second.id, MemberRole::Member),
        ],
    };
    assert!(store.change_member(chat, &promote).await.unwrap());

    // The owner leaves (the second owner keeping the chat owned) while demoting the second owner
    // (the owner keeping it owned): one of the two applies, and an owner remains.
    let leave = GuardedChange {
        write: MemberWrite::Remove(owner.id),
        expect: vec![
            (owner.id, MemberRole::Owner),
            (second.id, MemberRole::Owner),
        ],
    };
    let demote = GuardedChange {
        write: MemberWrite::SetRole(second.id, MemberRole::Member),
        expect: vec![
            (owner.id, MemberRole::Owner),
            (second.id, MemberRole::Owner),
        ],
    };
    let (left, demoted) = tokio::join!(
        store.change_member(chat, &leave),
        store.change_member(chat, &demote)
    );
    assert!(
        left.unwrap() ^ demoted.unwrap(),
        "exactly one of two conflicting changes applies"
    );
    let members = store.members(chat).await.unwrap();
    assert!(
        members.iter().any(|m| m.role == MemberRole::Owner),
        "{members:?}"
    );

    // Racing additions of one user: one applies.
    let remaining_owner = members
        .iter()
        .find(|m| m.role == MemberRole::Owner)
        .unwrap()
        .user_id;
    let newcomer = user("newcomer");
    let add = GuardedChange {
        write: MemberWrite::Add(Member {
            user_id: newcomer.id,
            role: MemberRole::Member,
            joined_at: now(),
        }),
        expect: vec![(remaining_owner, MemberRole::Owner)],
    };
    let added = futures::future::join_all((0..8).map(|_| store.change_member(chat, &add))).await;
    let applied = added.into_iter().map(Result::unwrap).filter(|a| *a).count();
    assert_eq!(applied, 1, "one of eight racing additions applies");
    assert_eq!(
        store.member_role(chat, newcomer.id).await.unwrap(),
        Some(MemberRole::Member)
    );
    assert!(store.chats_of(newcomer.id).await.unwrap().contains(&chat));
}

fn device(user: UserId, token: &str) -> confab_schema::push::Device {
    confab_schema::push::Device {
        id: confab_schema::DeviceId::of("fcm", token),
        user_id: user,
        platform: confab_schema::push::Platform::Fcm,
        endpoint: None,
        keys: None,
        token: Some(token.into()),
        topic: None,
        created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
    }
}

/// Devices: two users registering one device at once (one Web Push endpoint in two browser tabs
/// signed in as different users) leave it listed for exactly one of them, who can remove it. The
/// CQL store once left it listed for both, the loser unable to remove it and still sent its
/// pushes; and, when one of them already owned it and registered it again, listed for nobody
/// while `devices` named them (no pushes, missing from their devices).
pub async fn racing_registrations_leave_one_owner(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let users = [alice.id, bob.id];
    let listing_of = move |id| async move {
        let mut listing = Vec::new();
        for user in users {
            if store
                .devices_of(user)
                .await
                .unwrap()
                .iter()
                .any(|d: &confab_schema::push::Device| d.id == id)
            {
                listing.push(user);
            }
        }
        listing
    };
    // Alice owns the device and registers it again (a second tab) while Bob registers it; who
    // starts first alternates, since with two requests at once that decides who writes first.
    for round in 0..20 {
        let token = format!("token-{}", Uuid::new_v4());
        let owned = device(alice.id, &token);
        store.put_device(&owned).await.unwrap();
        let again = confab_schema::push::Device {
            created_at: owned.created_at + Duration::from_millis(1),
            ..owned.clone()
        };
        let his = device(bob.id, &token);
        let (one, other) = if round % 2 == 0 {
            futures::join!(store.put_device(&his), store.put_device(&again))
        } else {
            futures::join!(store.put_device(&again), store.put_device(&his))
        };
        one.unwrap();
        other.unwrap();
        let listing = listing_of(owned.id).await;
        // A third registration answers with the owner `devices` names, and takes the device.
        let owner = store
            .put_device(&device(carol.id, &token))
            .await
            .unwrap()
            .expect("the device was stored")
            .user_id;
        assert_eq!(
            listing,
            vec![owner],
            "round {round}: the owner is {owner} and the device is listed for {listing:?} \
             (alice {}, bob {})",
            alice.id,
            bob.id
        );
        assert!(store.delete_device(carol.id, owned.id).await.unwrap());
    }
    for round in 0..20 {
        let token = format!("token-{}", Uuid::new_v4());
        let (hers, his) = (device(alice.id, &token), device(bob.id, &token));
        let (one, other) = futures::join!(store.put_device(&hers), store.put_device(&his));
        one.unwrap();
        other.unwrap();
        let mut listing = Vec::new();
        for user in [alice.id, bob.id] {
            if store
                .devices_of(user)
                .await
                .unwrap()
                .iter()
                .any(|d| d.id == hers.id)
            {
                listing.push(user);
            }
        }
        assert_eq!(
            listing.len(),
            1,
            "round {round}: the device is listed for {listing:?} (alice {}, bob {})",
            alice.id,
            bob.id
        );
        for user in listing {
            assert!(
                store.delete_device(user, hers.id).await.unwrap(),
                "round {round}: {user} lists the device and cannot remove it"
            );
            assert!(
                !store
                    .devices_of(user)
                    .await
                    .unwrap()
                    .iter()
                    .any(|d| d.id == hers.id),
                "round {round}: still listed after its removal"
            );
        }
    }
}

/// Settings: saved ones are read back, replaced whole, and kept apart per user and per chat.
pub async fn settings_are_per_user_and_per_chat(store: Arc<dyn Store>) {
    use confab_schema::settings::{ChatSettings, UserSettings};
    let store = &*store;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    for u in [&alice, &bob, &carol] {
        store.upsert_user(u).await.unwrap();
    }
    assert!(
        store
            .user_settings(&[alice.id, bob.id])
            .await
            .unwrap()
            .is_empty(),
        "nothing saved yet"
    );
    let quiet = UserSettings {
        push_delay_ms: Some(60_000),
        push_previews: false,
        ..UserSettings::default()
    };
    store.put_user_settings(alice.id, &quiet).await.unwrap();
    let loud = UserSettings {
        push_delay_ms: Some(0),
        ..UserSettings::default()
    };
    store.put_user_settings(bob.id, &loud).await.unwrap();
    store.put_user_settings(bob.id, &quiet).await.unwrap();
    let mut found = store
        .user_settings(&[alice.id, bob.id, carol.id])
        .await
        .unwrap();
    found.sort_by_key(|(user, _)| *user);
    let mut expected = vec![(alice.id, quiet.clone()), (bob.id, quiet.clone())];
    expected.sort_by_key(|(user, _)| *user);
    assert_eq!(found, expected, "the latest of each, none for carol");

    let chat = chat_with(store, alice.id, &[bob.id, carol.id]).await;
    let other = chat_with(store, alice.id, &[bob.id]).await;
    assert_eq!(store.chat_settings(chat, bob.id).await.unwrap(), None);
    let muted = ChatSettings {
        muted: true,
        ..ChatSettings::default()
    };
    store.put_chat_settings(chat, bob.id, &muted).await.unwrap();
    let slow = ChatSettings {
        push_delay_ms: Some(5_000),
        ..ChatSettings::default()
    };
    store
        .put_chat_settings(chat, carol.id, &slow)
        .await
        .unwrap();
    assert_eq!(
        store.chat_settings(chat, bob.id).await.unwrap(),
        Some(muted.clone())
    );
    assert_eq!(store.chat_settings(other, bob.id).await.unwrap(), None);
    let mut of_chat = store.chat_settings_of(chat).await.unwrap();
    of_chat.sort_by_key(|(user, _)| *user);
    let mut expected = vec![(bob.id, muted), (carol.id, slow)];
    expected.sort_by_key(|(user, _)| *user);
    assert_eq!(of_chat, expected);
    assert!(store.chat_settings_of(other).await.unwrap().is_empty());
}

/// Devices: registered again, they are the same device; registered by another user, they move;
/// only their owner deletes them.
pub async fn devices_belong_to_one_user(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob) = (user("alice"), user("bob"));
    let token = format!("token-{}", Uuid::new_v4());
    let phone = device(alice.id, &token);
    assert_eq!(store.put_device(&phone).await.unwrap(), None);
    assert_eq!(
        store.put_device(&phone).await.unwrap(),
        Some(phone.clone()),
        "the same device again"
    );
    let tablet = device(alice.id, &format!("{token}-tablet"));
    store.put_device(&tablet).await.unwrap();
    let mut mine = store.devices_of(alice.id).await.unwrap();
    mine.sort_by_key(|d| d.id);
    let mut expected = vec![phone.clone(), tablet.clone()];
    expected.sort_by_key(|d| d.id);
    assert_eq!(mine, expected);
    assert!(store.devices_of(bob.id).await.unwrap().is_empty());

    // bob registers the phone's token: it is his now.
    let handed_over = device(bob.id, &token);
    let before = store.put_device(&handed_over).await.unwrap();
    assert_eq!(before.map(|d| d.user_id), Some(alice.id));
    assert_eq!(store.devices_of(bob.id).await.unwrap(), vec![handed_over]);
    assert_eq!(
        store.devices_of(alice.id).await.unwrap(),
        vec![tablet.clone()]
    );

    assert!(
        !store.delete_device(bob.id, tablet.id).await.unwrap(),
        "not bob's"
    );
    assert!(store.delete_device(alice.id, tablet.id).await.unwrap());
    assert!(!store.delete_device(alice.id, tablet.id).await.unwrap());
    assert!(store.devices_of(alice.id).await.unwrap().is_empty());
}

/// A user's recorded sessions are theirs alone, recorded once however often they are written, and
/// kept until their time to live from the last write, or until they are forgotten.
pub async fn sessions_are_recorded_per_user_until_they_expire(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let sid = |name: &str| format!("{name}-{}", Uuid::new_v4());
    let (phone, laptop, brief, renewed) =
        (sid("phone"), sid("laptop"), sid("brief"), sid("renewed"));
    let hour = Duration::from_secs(3600);
    let second = Duration::from_secs(1);
    for session in [&phone, &laptop, &phone] {
        store.record_session(alice.id, session, hour).await.unwrap();
    }
    store.record_session(bob.id, &phone, hour).await.unwrap();
    store
        .record_session(alice.id, &brief, second)
        .await
        .unwrap();
    // Written again with a longer time to live: kept for that one.
    store
        .record_session(alice.id, &renewed, second)
        .await
        .unwrap();
    store
        .record_session(alice.id, &renewed, hour)
        .await
        .unwrap();

    let sorted = |mut sessions: Vec<String>| {
        sessions.sort();
        sessions
    };
    let mut expected = vec![
        phone.clone(),
        laptop.clone(),
        brief.clone(),
        renewed.clone(),
    ];
    expected.sort();
    assert_eq!(sorted(store.sessions_of(alice.id).await.unwrap()), expected);
    assert_eq!(
        store.sessions_of(bob.id).await.unwrap(),
        vec![phone.clone()]
    );
    assert!(store.sessions_of(carol.id).await.unwrap().is_empty());

    // The brief one expires; the others stay.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut live = expected.clone();
    live.retain(|s| *s != brief);
    loop {
        let now = sorted(store.sessions_of(alice.id).await.unwrap());
        if now == live {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired session is still listed: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        store.sessions_of(bob.id).await.unwrap(),
        vec![phone.clone()]
    );

    // Forgetting some of a user's sessions (one of them never recorded) leaves the rest, and
    // other users' sessions of the same id.
    store
        .forget_sessions(alice.id, &[phone.clone(), sid("unknown")])
        .await
        .unwrap();
    live.retain(|s| *s != phone);
    assert_eq!(sorted(store.sessions_of(alice.id).await.unwrap()), live);
    assert_eq!(store.sessions_of(bob.id).await.unwrap(), vec![phone]);
    store.forget_sessions(alice.id, &live).await.unwrap();
    assert!(store.sessions_of(alice.id).await.unwrap().is_empty());
    store.forget_sessions(carol.id, &[]).await.unwrap();
}

/// `forget_left_chat` takes nothing from a member, and nothing is listed to a user it was asked
/// about once they are out.
pub async fn forgetting_a_left_chat_spares_members(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        store.upsert_user(u).await.unwrap();
    }
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    store
        .touch_chat(chat, &[alice.id, bob.id], SignalId::new(), None)
        .await
        .unwrap();
    store.forget_left_chat(chat, bob.id).await.unwrap();
    assert_eq!(
        store.member_role(chat, bob.id).await.unwrap(),
        Some(MemberRole::Member)
    );
    assert!(store.chats_of(bob.id).await.unwrap().contains(&chat));
    let listed = store.chats_by_activity(bob.id, None, 10).await.unwrap();
    assert!(listed.iter().any(|a| a.chat_id == chat), "{listed:?}");
    assert_eq!(store.chat_entries(bob.id, &[chat]).await.unwrap().len(), 1);

    store.remove_member(chat, bob.id).await.unwrap();
    store.forget_left_chat(chat, bob.id).await.unwrap();
    assert!(!store.chats_of(bob.id).await.unwrap().contains(&chat));
    assert!(
        store
            .chat_entries(bob.id, &[chat])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.chats_of(alice.id).await.unwrap().contains(&chat));
    // And nobody who was never in: nothing to forget.
    let carol = user("carol");
    store.forget_left_chat(chat, carol.id).await.unwrap();
    assert!(store.chats_of(carol.id).await.unwrap().is_empty());
}

/// Waits until the clock is past `at` (by a millisecond, the precision of a leaving's time), so
/// that what is written next is newer.
async fn clock_past(at: OffsetDateTime) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while OffsetDateTime::now_utc() - at < Duration::from_millis(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "the clock stands still"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The chats a user stopped being a member of, whichever way: what a resumed event stream
/// replays up to the leaving. Newest first, each once, from a time on, at most as many as asked.
pub async fn left_chats_are_listed_newest_first(store: Arc<dyn Store>) {
    use super::{GuardedChange, MemberWrite};
    let store = &*store;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    for u in [&alice, &bob, &carol] {
        store.upsert_user(u).await.unwrap();
    }
    let since = OffsetDateTime::now_utc() - Duration::from_secs(1);
    let left_by = |user: UserId, limit: usize| async move {
        store.left_chats_of(user, since, limit).await.map(|left| {
            left.into_iter()
                .map(|left| left.chat_id)
                .collect::<Vec<_>>()
        })
    };
    let removed = chat_with(store, alice.id, &[bob.id, carol.id]).await;
    let left = chat_with(store, alice.id, &[bob.id]).await;
    let deleted = chat_with(store, alice.id, &[bob.id, carol.id]).await;
    let stayed = chat_with(store, alice.id, &[bob.id]).await;
    assert!(left_by(bob.id, 10).await.unwrap().is_empty());

    // A guarded removal that does not apply ends nothing; one that does, ends bob's membership.
    let mistaken = GuardedChange {
        write: MemberWrite::Remove(carol.id),
        expect: vec![(alice.id, MemberRole::Owner), (carol.id, MemberRole::Admin)],
    };
    assert!(!store.change_member(removed, &mistaken).await.unwrap());
    assert!(left_by(carol.id, 10).await.unwrap().is_empty());
    let removal = GuardedChange {
        write: MemberWrite::Remove(bob.id),
        expect: vec![(alice.id, MemberRole::Owner), (bob.id, MemberRole::Member)],
    };
    assert!(store.change_member(removed, &removal).await.unwrap());
    assert_eq!(left_by(bob.id, 10).await.unwrap(), [removed]);
    clock_past(OffsetDateTime::now_utc()).await;

    // A removal without conditions (a pairing's end), and a chat's removal, for every member.
    store.remove_member(left, bob.id).await.unwrap();
    clock_past(OffsetDateTime::now_utc()).await;
    store.delete_chat(deleted).await.unwrap();
    assert_eq!(left_by(bob.id, 10).await.unwrap(), [deleted, left, removed]);
    assert_eq!(left_by(carol.id, 10).await.unwrap(), [deleted]);
    assert_eq!(left_by(alice.id, 10).await.unwrap(), [deleted]);

    // A chat still listed to its member is not one they left.
    store.forget_left_chat(stayed, bob.id).await.unwrap();
    assert!(!left_by(bob.id, 10).await.unwrap().contains(&stayed));

    // The most recent first, as many as asked, and none from before `since`.
    assert_eq!(left_by(bob.id, 2).await.unwrap(), [deleted, left]);
    let later = OffsetDateTime::now_utc() + Duration::from_secs(60);
    assert!(
        store
            .left_chats_of(bob.id, later, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Left again after joining again: listed once, at its latest leaving.
    clock_past(OffsetDateTime::now_utc()).await;
    let before_leaving_again = OffsetDateTime::now_utc();
    store
        .put_member(
            removed,
            &Member {
                user_id: bob.id,
                role: MemberRole::Member,
                joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            },
        )
        .await
        .unwrap();
    store.remove_member(removed, bob.id).await.unwrap();
    assert_eq!(left_by(bob.id, 10).await.unwrap(), [removed, deleted, left]);
    assert!(!store.chats_of(bob.id).await.unwrap().contains(&removed));
    // Each with the time of its latest leaving, which a resume compares with its position's.
    let times: Vec<OffsetDateTime> = store
        .left_chats_of(bob.id, since, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|left| left.left_at)
        .collect();
    assert!(
        times[0] >= before_leaving_again - Duration::from_millis(1)
            && times[0] <= OffsetDateTime::now_utc(),
        "left again at {}, after {before_leaving_again}",
        times[0]
    );
    assert!(
        times.windows(2).all(|pair| pair[0] >= pair[1]) && times[2] >= since,
        "newest first, none before `since`: {times:?}"
    );
}

/// A removal of someone who is not a member ends no membership: a chat they never were in is not
/// replayed to them as one they left, and a repeated removal (a pairing's end is retried) does not
/// move their leaving ahead of later ones.
pub async fn removing_a_non_member_ends_nothing(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    for u in [&alice, &bob, &carol] {
        store.upsert_user(u).await.unwrap();
    }
    let since = OffsetDateTime::now_utc() - Duration::from_secs(1);
    let left_by = |user: UserId| async move {
        store.left_chats_of(user, since, 10).await.map(|left| {
            left.into_iter()
                .map(|left| left.chat_id)
                .collect::<Vec<_>>()
        })
    };
    let first = chat_with(store, alice.id, &[bob.id]).await;
    let second = chat_with(store, alice.id, &[bob.id]).await;

    store.remove_member(first, carol.id).await.unwrap();
    assert!(
        left_by(carol.id).await.unwrap().is_empty(),
        "carol never was in the chat"
    );

    store.remove_member(first, bob.id).await.unwrap();
    clock_past(OffsetDateTime::now_utc()).await;
    store.remove_member(second, bob.id).await.unwrap();
    clock_past(OffsetDateTime::now_utc()).await;
    store.remove_member(first, bob.id).await.unwrap();
    assert_eq!(
        left_by(bob.id).await.unwrap(),
        [second, first],
        "bob left the first chat before the second"
    );
}

/// A direct chat's id is derived from its two users, so two creations at once make the same chat
/// twice: the second is no error, and there is one chat with both as owners.
pub async fn a_direct_chat_made_twice_is_one_chat(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        store.upsert_user(u).await.unwrap();
    }
    let chat = NewChat {
        id: ChatId::new(),
        kind: ChatKind::Direct,
        name: None,
        description: None,
        created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
        created_by: alice.id,
        members: vec![(alice.id, MemberRole::Owner), (bob.id, MemberRole::Owner)],
    };
    store.create_chat(&chat).await.expect("made");
    store.create_chat(&chat).await.expect("made again");
    assert_eq!(
        store.get_chat(chat.id).await.unwrap().map(|c| c.kind),
        Some(ChatKind::Direct)
    );
    let mut members: Vec<(UserId, MemberRole)> = store
        .members(chat.id)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user_id, m.role))
        .collect();
    members.sort_by_key(|(user, _)| *user);
    let mut expected = chat.members.clone();
    expected.sort_by_key(|(user, _)| *user);
    assert_eq!(members, expected);
}

/// The chats a user is in: what a notifier routes their events by.
pub async fn chats_of_a_user(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        store.upsert_user(u).await.unwrap();
    }
    assert!(store.chats_of(alice.id).await.unwrap().is_empty());
    let mut expected = HashSet::new();
    for _ in 0..3 {
        expected.insert(chat_with(store, alice.id, &[bob.id]).await);
    }
    let bobs_own = chat_with(store, bob.id, &[]).await;
    let found: HashSet<ChatId> = store
        .chats_of(alice.id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(found, expected);
    let left = *expected.iter().next().unwrap();
    store.remove_member(left, alice.id).await.unwrap();
    expected.remove(&left);
    let found: HashSet<ChatId> = store
        .chats_of(alice.id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(found, expected, "a chat left is no longer listed");
    store
        .put_member(
            bobs_own,
            &Member {
                user_id: alice.id,
                role: MemberRole::Member,
                joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            },
        )
        .await
        .unwrap();
    expected.insert(bobs_own);
    let found: HashSet<ChatId> = store
        .chats_of(alice.id)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(found, expected, "a chat joined is listed");
}

pub async fn activity_orders_chats(store: Arc<dyn Store>) {
    let store = &*store;
    let alice = user("alice");
    let bob = user("bob");
    let mut chats = Vec::new();
    for _ in 0..5 {
        let chat = chat_with(store, alice.id, &[bob.id]).await;
        store
            .touch_chat(chat, &[alice.id, bob.id], SignalId::new(), None)
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
        .touch_chat(chats[0], &[alice.id, bob.id], moved, None)
        .await
        .unwrap();
    // An older activity arriving late does not move it back.
    store
        .touch_chat(chats[0], &[alice.id, bob.id], id_days_ago(1, 0), None)
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

pub async fn edits_tombstones_and_forward_paging(store: Arc<dyn Store>) {
    let store = &*store;
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
    let answered = store
        .edit_signal(chat, ids[2], "edited", edited.edited_at.unwrap())
        .await
        .unwrap();
    assert_eq!(answered.as_ref(), Some(&edited));
    assert_eq!(
        store.get_signal(chat, ids[2]).await.unwrap().unwrap(),
        edited
    );
    assert_eq!(
        store
            .edit_signal(chat, SignalId::new(), "x", OffsetDateTime::now_utc())
            .await
            .unwrap(),
        None,
        "no such signal"
    );

    // A tombstone has no text, in history too.
    let deleted = store.delete_signal(chat, ids[3]).await.unwrap().unwrap();
    assert!(deleted.deleted);
    assert_eq!(deleted.text, None);
    assert_eq!(
        store.delete_signal(chat, ids[3]).await.unwrap(),
        Some(deleted),
        "idempotent"
    );
    let history = store.signals_before(chat, None, 10).await.unwrap();
    let tombstone = history.iter().find(|s| s.id == ids[3]).unwrap();
    assert!(tombstone.deleted);
    assert_eq!(tombstone.text, None);

    // Unread: bob has read up to ids[1]; of the 3 after it, one is deleted. Whatever the chat's
    // creation time says (right, or off by days either way, as with skewed clocks), the counts
    // are the same: it is only where a store may start reading.
    let now = OffsetDateTime::now_utc();
    for created_at in [
        ids[0].created_at().unwrap(),
        ids[2].created_at().unwrap(),
        now,
        now - time::Duration::days(30),
        now + time::Duration::days(1),
        OffsetDateTime::UNIX_EPOCH,
    ] {
        let count = |after: Option<SignalId>, reader: UserId, cap: usize| {
            store.count_unread(chat, after, None, created_at, reader, cap)
        };
        let through = |after: Option<SignalId>, through: SignalId| {
            store.count_unread(chat, after, Some(through), created_at, bob.id, 100)
        };
        // Up to a given signal (the newest one a chat list shows), not past it.
        assert_eq!(through(Some(ids[1]), ids[2]).await.unwrap(), 1);
        assert_eq!(through(Some(ids[1]), ids[4]).await.unwrap(), 2);
        assert_eq!(through(Some(ids[2]), ids[2]).await.unwrap(), 0);
        assert_eq!(through(None, ids[2]).await.unwrap(), 3, "{created_at}");
        assert_eq!(count(Some(ids[1]), bob.id, 100).await.unwrap(), 2);
        assert_eq!(count(Some(ids[2]), bob.id, 100).await.unwrap(), 1);
        assert_eq!(count(Some(ids[4]), bob.id, 100).await.unwrap(), 0);
        assert_eq!(count(None, bob.id, 100).await.unwrap(), 4, "{created_at}");
        assert_eq!(count(None, bob.id, 3).await.unwrap(), 3, "capped");
        // Alice wrote them all: nothing is unread for her.
        assert_eq!(count(None, alice.id, 100).await.unwrap(), 0);
    }
}

pub async fn reactions_count_once_per_user(store: Arc<dyn Store>) {
    let store = &*store;
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
    for (emoji, who, held) in [
        ("👍", bob.id, true),
        ("👍", alice.id, false),
        ("🎉", bob.id, false),
        ("🎉", alice.id, false),
    ] {
        assert_eq!(
            store
                .has_reaction(chat, signal.id, emoji, who)
                .await
                .unwrap(),
            held,
            "{emoji} by {who}"
        );
    }
}

pub async fn markers_move_forward_only(store: Arc<dyn Store>) {
    let store = &*store;
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

/// A UUIDv7 for a moment `ms_ahead` milliseconds after now: a signal created by a process whose
/// clock runs ahead of this one's.
fn id_ahead(ms_ahead: u64) -> SignalId {
    let ahead = OffsetDateTime::now_utc() + Duration::from_millis(ms_ahead);
    let nanos = ahead.unix_timestamp_nanos();
    SignalId(Uuid::new_v7(Timestamp::from_unix(
        uuid::NoContext,
        (nanos / 1_000_000_000) as u64,
        (nanos % 1_000_000_000) as u32,
    )))
}

pub async fn deleted_text_is_kept_nowhere(store: Arc<dyn Store>) {
    let alice = user("alice");
    let chat = chat_with(&*store, alice.id, &[]).await;
    let sent = message(chat, alice.id, Some("to-delete"), "a secret");
    store.insert_signal(&sent).await.unwrap();
    let tombstone = store.delete_signal(chat, sent.id).await.unwrap().unwrap();
    assert!(tombstone.deleted && tombstone.text.is_none());
    // A retry of the deleted send gets the tombstone: the nonce record kept no text to answer (or
    // repair) with.
    let retry = message(chat, alice.id, Some("to-delete"), "a secret");
    match store.insert_signal(&retry).await.unwrap() {
        Inserted::Existing(existing) => {
            assert_eq!(existing.id, sent.id);
            assert!(existing.deleted, "{existing:?}");
            assert_eq!(existing.text, None);
        }
        other => panic!("expected the tombstone, got {other:?}"),
    }
    let stored = store.get_signal(chat, sent.id).await.unwrap().unwrap();
    assert!(stored.deleted && stored.text.is_none(), "{stored:?}");
    assert_eq!(store.signals_before(chat, None, 10).await.unwrap().len(), 1);
}

pub async fn an_edit_never_undoes_a_delete(store: Arc<dyn Store>) {
    let alice = user("alice");
    let chat = chat_with(&*store, alice.id, &[]).await;
    // An edit that arrives after the deletion (it read the signal before it was deleted).
    let late = message(chat, alice.id, None, "original");
    store.insert_signal(&late).await.unwrap();
    store.delete_signal(chat, late.id).await.unwrap();
    let answered = store
        .edit_signal(chat, late.id, "edited too late", OffsetDateTime::now_utc())
        .await
        .unwrap()
        .unwrap();
    assert!(answered.deleted && answered.text.is_none(), "{answered:?}");
    let stored = store.get_signal(chat, late.id).await.unwrap().unwrap();
    assert!(stored.deleted && stored.text.is_none(), "{stored:?}");

    // Edits and deletions racing, many times over: every signal ends deleted, without text.
    let mut racing = Vec::new();
    for round in 0..12 {
        let signal = message(chat, alice.id, None, &format!("round {round}"));
        store.insert_signal(&signal).await.unwrap();
        racing.push(signal.id);
    }
    let races = racing.iter().map(|id| {
        let store = Arc::clone(&store);
        let id = *id;
        async move {
            let (edit_store, delete_store) = (Arc::clone(&store), store);
            let edit = tokio::spawn(async move {
                for n in 0..3 {
                    edit_store
                        .edit_signal(chat, id, &format!("edit {n}"), OffsetDateTime::now_utc())
                        .await
                        .unwrap();
                }
            });
            let delete =
                tokio::spawn(async move { delete_store.delete_signal(chat, id).await.unwrap() });
            edit.await.unwrap();
            delete.await.unwrap();
        }
    });
    futures::future::join_all(races).await;
    for id in racing {
        let stored = store.get_signal(chat, id).await.unwrap().unwrap();
        assert!(stored.deleted, "an edit undid a deletion: {stored:?}");
        assert_eq!(stored.text, None, "text survived a deletion: {stored:?}");
    }
    let history = store.signals_before(chat, None, 20).await.unwrap();
    assert!(history.iter().all(|s| s.deleted && s.text.is_none()));
}

pub async fn an_edit_wins_over_the_original_whatever_the_clocks(store: Arc<dyn Store>) {
    let alice = user("alice");
    let chat = chat_with(&*store, alice.id, &[]).await;
    // Sent through a process whose clock is two minutes ahead; edited through one that is right.
    let sent = message_at(chat, alice.id, id_ahead(120_000), Some("skewed"), "first");
    store.insert_signal(&sent).await.unwrap();
    let edited_at = confab_schema::model::to_millis(OffsetDateTime::now_utc());
    store
        .edit_signal(chat, sent.id, "second", edited_at)
        .await
        .unwrap();
    let stored = store.get_signal(chat, sent.id).await.unwrap().unwrap();
    assert_eq!(stored.text.as_deref(), Some("second"), "{stored:?}");
    // A retry of the send re-writes the original (repairing a winner that died): it must not undo
    // the edit either.
    let retry = message(chat, alice.id, Some("skewed"), "first");
    let existing = store.insert_signal(&retry).await.unwrap();
    assert_eq!(existing.signal().text.as_deref(), Some("second"));
    let stored = store.get_signal(chat, sent.id).await.unwrap().unwrap();
    assert_eq!(stored.text.as_deref(), Some("second"));
    assert_eq!(stored.edited_at, Some(edited_at));
}

pub async fn activity_of_a_leaver_does_not_come_back(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let store = &*store;
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    store
        .touch_chat(chat, &[alice.id, bob.id], SignalId::new(), None)
        .await
        .unwrap();
    // Bob leaves while a send that read the members before he left is still moving the chat.
    store.remove_member(chat, bob.id).await.unwrap();
    store.untouch_chat(chat, bob.id).await.unwrap();
    store
        .touch_chat(chat, &[alice.id, bob.id], SignalId::new(), None)
        .await
        .unwrap();
    let listed = |user: UserId| async move {
        store
            .chats_by_activity(user, None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.chat_id)
            .collect::<Vec<_>>()
    };
    assert!(!listed(bob.id).await.contains(&chat));
    assert!(listed(alice.id).await.contains(&chat));
    // Removed for good, not only skipped.
    assert!(!listed(bob.id).await.contains(&chat));
}

pub async fn reaction_counts_of_a_page(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat_with(&*store, alice.id, &[bob.id]).await;
    let mut ids = Vec::new();
    // Across two history buckets.
    for (days_ago, i) in [(3u64, 0u64), (3, 1), (0, 0), (0, 1), (0, 2)] {
        let id = id_days_ago(days_ago, i * 10);
        store
            .insert_signal(&message_at(chat, alice.id, id, None, "m"))
            .await
            .unwrap();
        ids.push(id);
    }
    store
        .add_reaction(chat, ids[0], "👍", bob.id)
        .await
        .unwrap();
    store
        .add_reaction(chat, ids[0], "👍", alice.id)
        .await
        .unwrap();
    store
        .add_reaction(chat, ids[3], "🎉", bob.id)
        .await
        .unwrap();
    store
        .add_reaction(chat, ids[4], "🎉", bob.id)
        .await
        .unwrap();
    store
        .remove_reaction(chat, ids[4], "🎉", bob.id)
        .await
        .unwrap();
    let counts = store.reaction_counts_of(chat, &ids[..4]).await.unwrap();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(
        counts[&ids[0]],
        [("👍".to_owned(), 2)].into_iter().collect()
    );
    assert_eq!(
        counts[&ids[3]],
        [("🎉".to_owned(), 1)].into_iter().collect()
    );
    assert!(
        store
            .reaction_counts_of(chat, &ids[4..])
            .await
            .unwrap()
            .is_empty(),
        "a count back at zero is not listed"
    );
}

/// Search hits: signals of several chats read together, in the order asked, and their counts.
pub async fn signals_and_counts_across_chats(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let first = chat_with(&*store, alice.id, &[bob.id]).await;
    let second = chat_with(&*store, bob.id, &[alice.id]).await;
    let (old, new, other) = (id_days_ago(4, 0), id_days_ago(0, 0), id_days_ago(0, 5));
    for (chat, id, text) in [
        (first, old, "old"),
        (first, new, "new"),
        (second, other, "other"),
    ] {
        store
            .insert_signal(&message_at(chat, alice.id, id, None, text))
            .await
            .unwrap();
    }
    store.add_reaction(first, old, "👍", bob.id).await.unwrap();
    store
        .add_reaction(second, other, "🎉", bob.id)
        .await
        .unwrap();
    store
        .add_reaction(second, other, "🎉", alice.id)
        .await
        .unwrap();

    let missing = id_days_ago(0, 9);
    // `other` asked for in the wrong chat is not found there.
    let asked = [
        (second, other),
        (first, missing),
        (first, old),
        (first, other),
        (first, new),
    ];
    let texts: Vec<Option<String>> = store
        .get_signals(&asked)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.and_then(|s| s.text))
        .collect();
    assert_eq!(
        texts,
        [Some("other"), None, Some("old"), None, Some("new")]
            .map(|t| t.map(str::to_owned))
            .to_vec()
    );
    assert!(store.get_signals(&[]).await.unwrap().is_empty());

    let counts = store
        .reaction_counts_across(&[(first, old), (first, new), (second, other)])
        .await
        .unwrap();
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert_eq!(counts[&old], [("👍".to_owned(), 1)].into_iter().collect());
    assert_eq!(counts[&other], [("🎉".to_owned(), 2)].into_iter().collect());
}

pub async fn the_chat_list_is_the_activity_order_with_entries(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let store = &*store;
    let mut chats = Vec::new();
    for i in 0..6 {
        let chat = chat_with(store, alice.id, &[bob.id]).await;
        let signal = message(chat, alice.id, None, &format!("in {i}"));
        store.insert_signal(&signal).await.unwrap();
        store
            .touch_chat(chat, &[alice.id, bob.id], signal.id, Some(&signal))
            .await
            .unwrap();
        chats.push((chat, signal));
    }
    // Bob has read one chat; a chat without signals (its creation only) is listed too.
    store
        .advance_marker(MarkerKind::Read, chats[1].0, bob.id, chats[1].1.id)
        .await
        .unwrap();
    let empty = chat_with(store, alice.id, &[bob.id]).await;
    store
        .touch_chat(empty, &[alice.id, bob.id], SignalId::new(), None)
        .await
        .unwrap();
    // Rows the list must skip and remove: a chat bob left while a send still moved it, and a row
    // left behind by a move (the chat's newer activity row is the one listed).
    store.remove_member(chats[3].0, bob.id).await.unwrap();
    store.untouch_chat(chats[3].0, bob.id).await.unwrap();
    store
        .touch_chat(chats[3].0, &[alice.id, bob.id], SignalId::new(), None)
        .await
        .unwrap();
    let newer = message(chats[0].0, alice.id, None, "newer");
    store.insert_signal(&newer).await.unwrap();
    store
        .touch_chat(chats[0].0, &[alice.id, bob.id], newer.id, Some(&newer))
        .await
        .unwrap();

    for limit in [1usize, 2, 3, 10] {
        // The list first, while the stale rows may still be there; then the two calls it stands
        // for, which must agree.
        let mut listed = Vec::new();
        let mut after = None;
        loop {
            let page = store.chat_list(bob.id, after, limit).await.unwrap();
            assert!(page.len() <= limit);
            let Some((last, _)) = page.last() else { break };
            after = Some(*last);
            listed.extend(page);
        }
        let rows = store.chats_by_activity(bob.id, None, 100).await.unwrap();
        let ids: Vec<ChatId> = rows.iter().map(|row| row.chat_id).collect();
        let entries = store.chat_entries(bob.id, &ids).await.unwrap();
        assert_eq!(
            listed.iter().map(|(row, _)| *row).collect::<Vec<_>>(),
            rows,
            "limit {limit}"
        );
        assert_eq!(
            listed
                .into_iter()
                .map(|(_, entry)| entry.expect("an entry for every row"))
                .collect::<Vec<_>>(),
            entries,
            "limit {limit}"
        );
        assert_eq!(ids.len(), 6, "five chats with signals and the empty one");
        assert!(!ids.contains(&chats[3].0), "bob left it");
        assert_eq!(ids[0], chats[0].0, "moved to the front");
        assert_eq!(entries[0].chat.latest_signal.as_ref().unwrap().id, newer.id);
        let read = entries.iter().find(|e| e.chat.id == chats[1].0).unwrap();
        assert_eq!(read.read_marker, Some(chats[1].1.id));
        assert_eq!(read.chat.my_role, Some(MemberRole::Member));
    }
}

pub async fn chat_entries_show_role_latest_and_marker(store: Arc<dyn Store>) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let store = &*store;
    let with_bob = chat_with(store, alice.id, &[bob.id]).await;
    let without_bob = chat_with(store, alice.id, &[carol.id]).await;
    let quiet = chat_with(store, alice.id, &[bob.id]).await;
    store
        .touch_chat(quiet, &[alice.id, bob.id], SignalId::new(), None)
        .await
        .unwrap();
    let mut sent = Vec::new();
    for text in ["one", "two"] {
        let signal = message(with_bob, alice.id, None, text);
        store.insert_signal(&signal).await.unwrap();
        store
            .touch_chat(with_bob, &[alice.id, bob.id], signal.id, Some(&signal))
            .await
            .unwrap();
        sent.push(signal);
    }
    store
        .advance_marker(MarkerKind::Read, with_bob, bob.id, sent[0].id)
        .await
        .unwrap();
    let entries = store
        .chat_entries(bob.id, &[quiet, without_bob, with_bob])
        .await
        .unwrap();
    assert_eq!(
        entries.iter().map(|e| e.chat.id).collect::<Vec<_>>(),
        vec![quiet, with_bob],
        "in the order asked, without chats bob is not in"
    );
    let (quiet_entry, entry) = (&entries[0], &entries[1]);
    assert_eq!(quiet_entry.chat.latest_signal, None);
    assert!(!quiet_entry.may_have_unread());
    assert_eq!(entry.chat.my_role, Some(MemberRole::Member));
    assert_eq!(entry.chat.name.as_deref(), Some("test"));
    assert_eq!(entry.read_marker, Some(sent[0].id));
    assert!(entry.may_have_unread());
    assert_eq!(
        entry.chat.latest_signal.as_ref().map(|s| s.id),
        Some(sent[1].id)
    );

    // Edits, reactions and deletion of the latest signal show in the entry.
    store
        .edit_signal(
            with_bob,
            sent[1].id,
            "two, edited",
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    store
        .add_reaction(with_bob, sent[1].id, "👍", bob.id)
        .await
        .unwrap();
    let latest = |entries: Vec<crate::store::ChatEntry>| {
        entries[0].chat.latest_signal.clone().map(|s| *s).unwrap()
    };
    let shown = latest(store.chat_entries(bob.id, &[with_bob]).await.unwrap());
    assert_eq!(shown.text.as_deref(), Some("two, edited"));
    assert_eq!(shown.reactions.get("👍"), Some(&1));
    store.delete_signal(with_bob, sent[1].id).await.unwrap();
    let shown = latest(store.chat_entries(bob.id, &[with_bob]).await.unwrap());
    assert!(shown.deleted && shown.text.is_none(), "{shown:?}");
    // An older signal's change does not replace the latest one.
    store
        .edit_signal(
            with_bob,
            sent[0].id,
            "one, edited",
            OffsetDateTime::now_utc(),
        )
        .await
        .unwrap();
    assert_eq!(
        latest(store.chat_entries(bob.id, &[with_bob]).await.unwrap()).id,
        sent[1].id
    );
    // A chat touched without a copy of its signal (as before copies existed) still shows it.
    let third = message(with_bob, alice.id, None, "three");
    store.insert_signal(&third).await.unwrap();
    store
        .touch_chat(with_bob, &[alice.id, bob.id], third.id, None)
        .await
        .unwrap();
    assert_eq!(
        latest(store.chat_entries(bob.id, &[with_bob]).await.unwrap()).text,
        Some("three".into())
    );
}

/// A change of the name leaves the description as stored, and the other way round, in the chat
/// and in every member's list: two members who change one each at the same time keep both.
pub async fn a_change_of_one_field_keeps_the_other(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let store = &*store;
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let hello = message(chat, alice.id, None, "hello");
    store.insert_signal(&hello).await.unwrap();
    store
        .touch_chat(chat, &[alice.id, bob.id], hello.id, Some(&hello))
        .await
        .unwrap();
    store
        .update_chat(chat, InfoChange::both(Some("before"), Some("about")))
        .await
        .unwrap();
    let shown = async |expected: (Option<&str>, Option<&str>)| {
        let stored = store.get_chat(chat).await.unwrap().unwrap();
        assert_eq!(
            (stored.name.as_deref(), stored.description.as_deref()),
            expected,
            "the chat"
        );
        for reader in [alice.id, bob.id] {
            let listed = store.chat_list(reader, None, 10).await.unwrap();
            let entry = listed[0].1.as_ref().expect("an entry");
            assert_eq!(
                (
                    entry.chat.name.as_deref(),
                    entry.chat.description.as_deref()
                ),
                expected,
                "the list of {reader:?}"
            );
        }
    };
    let renamed = InfoChange {
        name: Some(Some("after")),
        description: None,
    };
    store.update_chat(chat, renamed).await.unwrap();
    shown((Some("after"), Some("about"))).await;
    let described = InfoChange {
        name: None,
        description: Some(Some("new about")),
    };
    store.update_chat(chat, described).await.unwrap();
    shown((Some("after"), Some("new about"))).await;
    let cleared = InfoChange {
        name: None,
        description: Some(None),
    };
    store.update_chat(chat, cleared).await.unwrap();
    shown((Some("after"), None)).await;
}

/// A rename shows in every member's entry and chat list, also in those of a member who joins
/// after it; renamed again, the newest name and description show.
pub async fn a_rename_shows_in_every_members_entry(store: Arc<dyn Store>) {
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let store = &*store;
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let hello = message(chat, alice.id, None, "hello");
    store.insert_signal(&hello).await.unwrap();
    store
        .touch_chat(chat, &[alice.id, bob.id], hello.id, Some(&hello))
        .await
        .unwrap();
    store
        .update_chat(chat, InfoChange::both(Some("renamed"), Some("about")))
        .await
        .unwrap();
    store
        .put_member(
            chat,
            &Member {
                user_id: carol.id,
                role: MemberRole::Member,
                joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            },
        )
        .await
        .unwrap();
    let welcome = message(chat, alice.id, None, "welcome");
    store.insert_signal(&welcome).await.unwrap();
    let everyone = [alice.id, bob.id, carol.id];
    store
        .touch_chat(chat, &everyone, welcome.id, Some(&welcome))
        .await
        .unwrap();
    let shown = |entry: &crate::store::ChatEntry| {
        (
            entry.chat.name.clone(),
            entry.chat.description.clone(),
            entry.chat.latest_signal.as_ref().map(|s| s.id),
        )
    };
    for reader in everyone {
        let entries = store.chat_entries(reader, &[chat]).await.unwrap();
        let expected = (
            Some("renamed".to_owned()),
            Some("about".to_owned()),
            Some(welcome.id),
        );
        assert_eq!(shown(&entries[0]), expected, "entry of {reader:?}");
        let listed = store.chat_list(reader, None, 10).await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let entry = listed[0].1.as_ref().expect("an entry");
        assert_eq!(shown(entry), expected, "list of {reader:?}");
    }
    store
        .update_chat(chat, InfoChange::both(Some("again"), None))
        .await
        .unwrap();
    for reader in everyone {
        let listed = store.chat_list(reader, None, 10).await.unwrap();
        let entry = listed[0].1.as_ref().expect("an entry");
        assert_eq!(
            shown(entry),
            (Some("again".to_owned()), None, Some(welcome.id)),
            "list of {reader:?}"
        );
    }
}

pub async fn unread_counts_are_capped_and_the_scan_bounded(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat_with(&*store, alice.id, &[bob.id]).await;
    // More of bob's own signals than a count scans, then one of alice's.
    let own: Vec<Signal> = (0..UNREAD_SCAN_LIMIT)
        .map(|i| message(chat, bob.id, None, &format!("mine {i}")))
        .collect();
    insert_all(&store, own).await;
    let hers = message(chat, alice.id, None, "hers");
    store.insert_signal(&hers).await.unwrap();
    let created_at = store.get_chat(chat).await.unwrap().unwrap().created_at;
    assert_eq!(
        store
            .count_unread(chat, None, None, created_at, bob.id, UNREAD_CAP)
            .await
            .unwrap(),
        UNREAD_CAP,
        "past the scan limit the count is reported as the cap"
    );
    assert_eq!(
        store
            .count_unread(chat, None, None, created_at, alice.id, UNREAD_CAP)
            .await
            .unwrap(),
        UNREAD_CAP,
        "capped"
    );
    assert_eq!(
        store
            .count_unread(chat, None, None, created_at, alice.id, 5)
            .await
            .unwrap(),
        5
    );
}

/// Counts asked together answer what each asked alone does, whether its signals lie in one
/// bucket or several, with a marker or without, more of them than one read takes, over the cap.
pub async fn unread_counts_asked_together_are_the_counts_alone(store: Arc<dyn Store>) {
    let (alice, bob) = (user("alice"), user("bob"));
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // Ids of signals `days_ago` days back (the `n`th of that second), as if sent then.
    let at = |days_ago: i64, n: u32| {
        let secs = u64::try_from(now - days_ago * 86_400).unwrap();
        SignalId(Uuid::new_v7(Timestamp::from_unix(
            uuid::NoContext,
            secs,
            n * 1_000_000,
        )))
    };
    let insert = |signals: Vec<Signal>| insert_all(&store, signals);
    let mut queries = Vec::new();
    let mut expected = Vec::new();
    let mut ask = |chat: ChatId, after: Option<SignalId>, through: SignalId, unread: usize| {
        queries.push((chat, after, through));
        expected.push(unread);
    };

    // Today only: a marker after the first; bob's own message and a deleted one do not count.
    let today = chat_with(&*store, alice.id, &[bob.id]).await;
    let ids: Vec<SignalId> = (0..6).map(|n| at(0, n)).collect();
    let mut signals: Vec<Signal> = ids
        .iter()
        .map(|id| message_at(today, alice.id, *id, None, "today"))
        .collect();
    signals[2].author_id = bob.id;
    insert(signals).await;
    store.delete_signal(today, ids[3]).await.unwrap();
    ask(today, Some(ids[0]), ids[5], 3);
    ask(today, Some(ids[0]), ids[4], 2);
    ask(today, None, ids[5], 4);
    ask(today, Some(ids[5]), ids[5], 0);

    // Three days back and today: with no marker, or one in the older bucket.
    let days = chat_with(&*store, alice.id, &[bob.id]).await;
    let old = at(3, 0);
    let new: Vec<SignalId> = (0..2).map(|n| at(0, n)).collect();
    let mut signals = vec![message_at(days, alice.id, old, None, "old")];
    signals.extend(
        new.iter()
            .map(|id| message_at(days, alice.id, *id, None, "new")),
    );
    signals.push(message_at(days, alice.id, at(3, 1), None, "old too"));
    insert(signals).await;
    ask(days, None, new[1], 4);
    ask(days, Some(old), new[1], 3);
    ask(days, Some(new[0]), new[1], 1);

    // More than one read takes, with and without a marker, under and over the cap.
    let busy = chat_with(&*store, alice.id, &[bob.id]).await;
    let many: Vec<SignalId> = (0..300).map(|n| at(0, n)).collect();
    insert(
        many.iter()
            .map(|id| message_at(busy, alice.id, *id, None, "busy"))
            .collect(),
    )
    .await;
    ask(busy, None, many[299], UNREAD_CAP);
    ask(busy, Some(many[200]), many[299], 99);
    ask(busy, Some(many[150]), many[299], UNREAD_CAP);
    ask(busy, Some(many[10]), many[60], 50);

    let mut unread_queries = Vec::new();
    for (chat, after, through) in queries {
        let created_at = store.get_chat(chat).await.unwrap().unwrap().created_at;
        unread_queries.push(super::UnreadQuery {
            chat,
            after,
            through: Some(through),
            chat_created_at: created_at,
        });
    }
    let together = store
        .count_unreads(&unread_queries, bob.id, UNREAD_CAP)
        .await
        .unwrap();
    let mut alone = Vec::new();
    for q in &unread_queries {
        alone.push(
            store
                .count_unread(
                    q.chat,
                    q.after,
                    q.through,
                    q.chat_created_at,
                    bob.id,
                    UNREAD_CAP,
                )
                .await
                .unwrap(),
        );
    }
    assert_eq!(alone, expected, "alone");
    assert_eq!(together, expected, "together");
    assert!(
        store
            .count_unreads(&[], bob.id, UNREAD_CAP)
            .await
            .unwrap()
            .is_empty()
    );
}

/// Paging through every chat id gives each chat once, whatever the page size.
pub async fn every_chat_id_pages_once(store: Arc<dyn Store>) {
    let owner = user("scanner");
    store.upsert_user(&owner).await.expect("user");
    let mut mine = HashSet::new();
    for _ in 0..5 {
        mine.insert(chat_with(&*store, owner.id, &[]).await);
    }
    let mut seen = HashSet::new();
    let mut after = None;
    loop {
        let page = store.chat_ids(after, 2).await.expect("a page of chat ids");
        assert!(page.len() <= 2);
        for id in &page {
            assert!(seen.insert(*id), "chat {id} listed twice");
        }
        match page.last() {
            Some(last) if page.len() == 2 => after = Some(*last),
            _ => break,
        }
    }
    assert!(mine.is_subset(&seen), "every chat is listed");
}

fn attachment(
    chat: ChatId,
    uploader: UserId,
    kind: confab_schema::AttachmentKind,
    sha: &str,
) -> confab_schema::Attachment {
    confab_schema::Attachment {
        id: Uuid::now_v7(),
        chat_id: chat,
        name: "file.bin".into(),
        size: 3,
        content_type: "application/octet-stream".into(),
        sha256: sha.into(),
        kind,
        created_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
        uploader,
        image: None,
        message_id: None,
    }
}

fn sha(label: &str) -> String {
    format!(
        "{:0>64}",
        format!("{:x}", Uuid::new_v4().as_u128()) + &label.len().to_string()
    )
}

/// The records of more attachments than one read of some stores may ask for (ScyllaDB takes at
/// most 100 keys in an `IN`): a page of 50 messages names up to 500.
pub async fn a_page_of_attachments_is_read_at_once(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::File;
    let owner = user("uploader");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let records: Vec<_> = (0..250)
        .map(|_| attachment(chat, owner.id, File, &sha("page")))
        .collect();
    futures::stream::iter(&records)
        .map(|record| {
            let store = Arc::clone(&store);
            async move { store.put_attachment(record).await.expect("stored") }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
    let mut made: Vec<Uuid> = records.iter().map(|record| record.id).collect();
    let mut asked = made.clone();
    asked.push(Uuid::now_v7()); // not stored: not answered
    let mut found: Vec<Uuid> = store
        .get_attachments(&asked)
        .await
        .expect("reads them all")
        .into_iter()
        .map(|record| record.id)
        .collect();
    found.sort();
    made.sort();
    assert_eq!(found, made);
}

/// A chat's attachments page newest first, of one kind or both; other chats' are not listed.
pub async fn attachments_page_newest_first_by_kind(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::{File, Image};
    let owner = user("uploader");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let other = chat_with(store.as_ref(), owner.id, &[]).await;
    let mut made = Vec::new();
    for i in 0..7 {
        let kind = if i % 3 == 0 { Image } else { File };
        let a = attachment(chat, owner.id, kind, &sha("a"));
        store.put_attachment(&a).await.expect("puts");
        made.push(a);
    }
    store
        .put_attachment(&attachment(other, owner.id, File, &sha("b")))
        .await
        .expect("puts");
    let newest_first: Vec<Uuid> = made.iter().rev().map(|a| a.id).collect();
    let first = store
        .chat_attachments(chat, None, None, 4)
        .await
        .expect("lists");
    let rest = store
        .chat_attachments(chat, None, Some(first[3].id), 10)
        .await
        .expect("lists on");
    let all: Vec<Uuid> = first.iter().chain(&rest).map(|a| a.id).collect();
    assert_eq!(all, newest_first);
    assert_eq!(first[0], made[6], "the metadata comes back as stored");
    let images: Vec<Uuid> = store
        .chat_attachments(chat, Some(Image), None, 10)
        .await
        .expect("lists images")
        .iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(images, [made[6].id, made[3].id, made[0].id]);
    let files = store
        .chat_attachments(chat, Some(File), None, 10)
        .await
        .expect("lists files");
    assert_eq!(files.len(), 4);
    // A kind that changes (an image that turned out undecodable) moves to the other list.
    let refiled = store
        .update_derived(made[6].id, chat, Image, File, None)
        .await
        .expect("refiles")
        .expect("the image is there");
    let images = store
        .chat_attachments(chat, Some(Image), None, 10)
        .await
        .expect("lists");
    assert_eq!(images.len(), 2);
    let files = store
        .chat_attachments(chat, Some(File), None, 10)
        .await
        .expect("lists");
    assert_eq!(files[0], refiled);
    let got = store
        .get_attachments(&[made[1].id, refiled.id, Uuid::now_v7()])
        .await
        .expect("gets");
    assert_eq!(got.len(), 2);
    store.delete_attachments(&made[..2]).await.expect("deletes");
    assert_eq!(
        store
            .chat_attachments(chat, None, None, 10)
            .await
            .expect("lists")
            .len(),
        5
    );
    assert!(
        store
            .get_attachments(&[made[0].id])
            .await
            .expect("gets")
            .is_empty()
    );
}

/// Each object an attachment uses is referenced while the attachment exists, and no longer after.
pub async fn attachments_reference_their_objects(store: Arc<dyn Store>) {
    let owner = user("referrer");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let shared = sha("shared");
    let first = attachment(
        chat,
        owner.id,
        confab_schema::AttachmentKind::Image,
        &shared,
    );
    let second = attachment(chat, owner.id, confab_schema::AttachmentKind::File, &shared);
    assert!(!store.blob_referenced(&shared).await.expect("reads"));
    // An upload references its object before its metadata is stored.
    store
        .add_blob_refs(first.id, std::slice::from_ref(&shared))
        .await
        .expect("references");
    assert!(store.blob_referenced(&shared).await.expect("reads"));
    assert!(
        store
            .get_attachments(&[first.id])
            .await
            .expect("reads")
            .is_empty()
    );
    store.put_attachment(&first).await.expect("puts");
    store.put_attachment(&second).await.expect("puts");
    let thumb = sha("thumb");
    let mut with_thumbnail = first.clone();
    with_thumbnail.image = Some(confab_schema::attachment::ImageInfo {
        width: 10,
        height: 10,
        thumbnail: Some(confab_schema::attachment::Derivative {
            sha256: thumb.clone(),
            size: 1,
            width: 1,
            height: 1,
            content_type: "image/jpeg".into(),
        }),
        preview: None,
    });
    store
        .put_attachment(&with_thumbnail)
        .await
        .expect("adds the thumbnail");
    assert!(store.blob_referenced(&thumb).await.expect("reads"));
    store
        .delete_attachments(&[with_thumbnail])
        .await
        .expect("deletes");
    assert!(!store.blob_referenced(&thumb).await.expect("reads"));
    assert!(
        store
            .blob_referenced(&shared)
            .await
            .expect("still the other upload's")
    );
    store
        .delete_attachments(std::slice::from_ref(&second))
        .await
        .expect("deletes");
    store
        .delete_attachments(&[second])
        .await
        .expect("again: idempotent");
    assert!(!store.blob_referenced(&shared).await.expect("reads"));
}

/// The references to one object page through in one order, every referrer once, and one
/// dropped goes while the others stay.
pub async fn an_objects_referrers_page_and_drop(store: Arc<dyn Store>) {
    let object = sha("many");
    let other = sha("other");
    // A v4 id among v7 ones: the order is the store's own, whatever the ids' versions.
    let mut referrers: Vec<Uuid> = (0..7).map(|_| Uuid::now_v7()).collect();
    referrers.push(Uuid::new_v4());
    for id in &referrers {
        store
            .add_blob_refs(*id, &[object.clone(), other.clone()])
            .await
            .expect("references");
    }
    let mut paged = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .blob_referrers(&object, after, 3)
            .await
            .expect("reads");
        assert!(page.len() <= 3, "{page:?}");
        let Some(last) = page.last() else { break };
        after = Some(*last);
        paged.extend(page);
    }
    let mut expected = referrers.clone();
    expected.sort();
    let mut got = paged.clone();
    got.sort();
    assert_eq!(got, expected, "every referrer once: {paged:?}");
    for dropped in &referrers[..7] {
        store.drop_blob_ref(&object, *dropped).await.expect("drops");
    }
    store
        .drop_blob_ref(&object, referrers[0])
        .await
        .expect("again: idempotent");
    assert_eq!(
        store
            .blob_referrers(&object, None, 100)
            .await
            .expect("reads"),
        [referrers[7]]
    );
    assert!(store.blob_referenced(&object).await.expect("reads"));
    assert_eq!(
        store
            .blob_referrers(&other, None, 100)
            .await
            .expect("reads")
            .len(),
        8,
        "another object's references stay"
    );
    store
        .drop_blob_ref(&object, referrers[7])
        .await
        .expect("drops");
    assert!(!store.blob_referenced(&object).await.expect("reads"));
}

/// A sent message claims the attachments it names that are its chat's and that no message took
/// yet; nothing else of them changes, and one removed stays removed.
pub async fn a_message_claims_its_chats_unclaimed_attachments(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::{File, Image};
    let owner = user("claimant");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let other = chat_with(store.as_ref(), owner.id, &[]).await;
    let image = confab_schema::attachment::ImageInfo {
        width: 40,
        height: 30,
        thumbnail: None,
        preview: None,
    };
    let photo = attachment(chat, owner.id, Image, &sha("claimed photo"));
    let taken = attachment(chat, owner.id, File, &sha("taken"));
    let elsewhere = attachment(other, owner.id, File, &sha("elsewhere"));
    let gone = attachment(chat, owner.id, File, &sha("gone"));
    for a in [&photo, &taken, &elsewhere, &gone] {
        store.put_attachment(a).await.expect("puts");
    }
    let first = SignalId::new();
    store
        .claim_attachments(chat, &[taken.id], first)
        .await
        .expect("claims");
    store
        .update_derived(photo.id, chat, Image, Image, Some(&image))
        .await
        .expect("writes")
        .expect("the photo is there");
    store
        .delete_attachments(std::slice::from_ref(&gone))
        .await
        .expect("deletes");

    let message = SignalId::new();
    let ids = [
        photo.id,
        taken.id,
        elsewhere.id,
        gone.id,
        uuid::Uuid::now_v7(),
    ];
    let mut holders = store
        .claim_attachments(chat, &ids, message)
        .await
        .expect("claims");
    holders.sort();
    let mut expected = vec![(photo.id, message), (taken.id, first)];
    expected.sort();
    assert_eq!(
        holders, expected,
        "the holder of each of the chat's attachments"
    );
    let mut holders = store
        .claim_attachments(chat, &ids, SignalId::new())
        .await
        .expect("a later message claims nothing");
    holders.sort();
    assert_eq!(holders, expected, "a later message claims nothing");
    for (ids, message) in [(&ids[..], message), (&[taken.id][..], first)] {
        store
            .list_claimed_attachments(chat, ids, message)
            .await
            .expect("lists the claims");
    }

    let photo = confab_schema::Attachment {
        image: Some(image),
        message_id: Some(message),
        ..photo
    };
    let taken = confab_schema::Attachment {
        message_id: Some(first),
        ..taken
    };
    let mut found = store.get_attachments(&ids).await.expect("gets");
    found.sort_by_key(|a| a.id);
    assert_eq!(found, [photo.clone(), taken.clone(), elsewhere.clone()]);
    let listed = store
        .chat_attachments(chat, None, None, 100)
        .await
        .expect("lists");
    assert_eq!(listed, [taken, photo], "newest first, as claimed");
    assert_eq!(
        store
            .chat_attachments(other, None, None, 100)
            .await
            .expect("lists"),
        [elsewhere],
        "another chat's upload is not claimed"
    );
}

/// Sends racing for one attachment claim it at once, before either message is stored: exactly
/// one claim holds, and every claimant is told which. The holder's release frees it for the
/// next claim; another message's release changes nothing; a released claim is never listed.
pub async fn racing_claims_leave_one_holder_and_a_release_frees(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::File;
    let owner = user("racer");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let contested = attachment(chat, owner.id, File, &sha("contested"));
    store.put_attachment(&contested).await.expect("puts");

    let claimants: Vec<SignalId> = (0..8).map(|_| SignalId::new()).collect();
    let claims = futures::future::join_all(claimants.iter().map(|&message| {
        let store = Arc::clone(&store);
        async move {
            store
                .claim_attachments(chat, &[contested.id], message)
                .await
                .expect("claims")
        }
    }))
    .await;
    let holder = claims[0][0].1;
    assert!(claimants.contains(&holder), "{claims:?}");
    for claim in &claims {
        assert_eq!(claim, &[(contested.id, holder)], "one holder for all");
    }
    let held = |store: Arc<dyn Store>| async move {
        store
            .get_attachments(&[contested.id])
            .await
            .expect("gets")
            .pop()
            .expect("is there")
            .message_id
    };
    assert_eq!(held(Arc::clone(&store)).await, Some(holder));

    let loser = *claimants.iter().find(|m| **m != holder).unwrap();
    store
        .release_attachments(chat, &[contested.id], loser)
        .await
        .expect("releases");
    assert_eq!(
        held(Arc::clone(&store)).await,
        Some(holder),
        "a release by a message that does not hold it changes nothing"
    );
    store
        .release_attachments(chat, &[contested.id], holder)
        .await
        .expect("releases");
    store
        .release_attachments(chat, &[contested.id], holder)
        .await
        .expect("releases again");
    assert_eq!(held(Arc::clone(&store)).await, None, "released");
    let listed = store
        .chat_attachments(chat, None, None, 10)
        .await
        .expect("lists");
    assert_eq!(
        listed,
        std::slice::from_ref(&contested),
        "no claim is listed"
    );

    let next = SignalId::new();
    assert_eq!(
        store
            .claim_attachments(chat, &[contested.id], next)
            .await
            .expect("claims"),
        [(contested.id, next)],
        "free again once released"
    );
    store
        .list_claimed_attachments(chat, &[contested.id], next)
        .await
        .expect("lists the claim");
    let sent = confab_schema::Attachment {
        message_id: Some(next),
        ..contested
    };
    assert_eq!(held(Arc::clone(&store)).await, Some(next));
    assert_eq!(
        store
            .chat_attachments(chat, None, None, 10)
            .await
            .expect("lists"),
        [sent]
    );
}

/// What making an image's pictures found is written over the record as stored: the message it
/// was sent in stays, a re-filed image moves to the file list, and an attachment removed before
/// stays removed, by id and from both lists.
/// A claim given back after the attachment's pictures were stored (while it held it) frees the
/// attachment: what the pictures wrote does not keep the message that gave it back.
pub async fn a_claim_given_back_after_pictures_frees_the_attachment(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::Image;
    let owner = user("giver");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let photo = attachment(chat, owner.id, Image, &sha("given back"));
    store.put_attachment(&photo).await.expect("puts");
    let (first, second) = (SignalId::new(), SignalId::new());
    let claimed = store
        .claim_attachments(chat, &[photo.id], first)
        .await
        .expect("claims");
    assert_eq!(claimed, [(photo.id, first)]);
    let image = confab_schema::attachment::ImageInfo {
        width: 8,
        height: 8,
        thumbnail: None,
        preview: None,
    };
    store
        .update_derived(photo.id, chat, Image, Image, Some(&image))
        .await
        .expect("writes")
        .expect("the photo is there");
    store
        .release_attachments(chat, &[photo.id], first)
        .await
        .expect("releases");
    let held = store
        .get_attachments(&[photo.id])
        .await
        .expect("gets")
        .pop()
        .expect("is there");
    assert_eq!(held.message_id, None, "given back");
    assert_eq!(held.image, Some(image), "the pictures stay");
    assert_eq!(
        store
            .claim_attachments(chat, &[photo.id], second)
            .await
            .expect("claims"),
        [(photo.id, second)],
        "another message may take it"
    );

    // A record that names its message in its body alone (as records sent before the claim had a
    // cell of its own do) stays held by it.
    let sent_long_ago = SignalId::new();
    let older = confab_schema::Attachment {
        message_id: Some(sent_long_ago),
        ..attachment(chat, owner.id, Image, &sha("sent long ago"))
    };
    store.put_attachment(&older).await.expect("puts");
    assert_eq!(
        store
            .claim_attachments(chat, &[older.id], second)
            .await
            .expect("claims"),
        [(older.id, sent_long_ago)],
        "held by the message its record names"
    );
}

/// A claim whose message was not stored long after the claim was made (its send stopped between
/// the two) is taken over by the next claim, from that holder alone: of claimants racing for it,
/// exactly one takes it, and every one is told which. A claim not that old (a send still on its
/// way) stays, and so does one whose message is stored, however old.
pub async fn an_orphaned_claim_is_taken_over(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::File;
    let owner = user("orphaner");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let long_ago = OffsetDateTime::now_utc() - CLAIM_ORPHANED_AFTER - Duration::from_secs(60);
    let upload = |name: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let upload = attachment(chat, owner.id, File, &sha(name));
            store.put_attachment(&upload).await.expect("puts");
            upload.id
        }
    };
    let claim = |id: Uuid, message: SignalId| {
        let store = Arc::clone(&store);
        async move {
            store
                .claim_attachments(chat, &[id], message)
                .await
                .expect("claims")
        }
    };
    let held = |id: Uuid| {
        let store = Arc::clone(&store);
        async move {
            store
                .get_attachments(&[id])
                .await
                .expect("gets")
                .pop()
                .expect("is there")
                .message_id
        }
    };

    let orphaned = upload("orphaned").await;
    let stopped = SignalId::made_at(long_ago);
    assert_eq!(claim(orphaned, stopped).await, [(orphaned, stopped)]);
    let taker = SignalId::new();
    assert_eq!(
        claim(orphaned, taker).await,
        [(orphaned, taker)],
        "a claim of a message made long ago and never stored is taken over"
    );
    assert_eq!(held(orphaned).await, Some(taker));
    store
        .release_attachments(chat, &[orphaned], stopped)
        .await
        .expect("releases");
    assert_eq!(
        held(orphaned).await,
        Some(taker),
        "the stopped send has nothing left to give back"
    );
    assert_eq!(
        claim(orphaned, SignalId::new()).await,
        [(orphaned, taker)],
        "the taker's claim is not that old"
    );

    let on_its_way = upload("on its way").await;
    let live = SignalId::new();
    assert_eq!(claim(on_its_way, live).await, [(on_its_way, live)]);
    assert_eq!(
        claim(on_its_way, SignalId::new()).await,
        [(on_its_way, live)],
        "a recent claim stays with its send"
    );

    let sent = upload("sent long ago").await;
    let old_message = message_at(chat, owner.id, SignalId::made_at(long_ago), None, "old");
    assert_eq!(claim(sent, old_message.id).await, [(sent, old_message.id)]);
    store.insert_signal(&old_message).await.expect("stores");
    assert_eq!(
        claim(sent, SignalId::new()).await,
        [(sent, old_message.id)],
        "a stored message keeps its attachment, however old"
    );
    assert_eq!(held(sent).await, Some(old_message.id));

    let contested = upload("contested orphan").await;
    let stopped = SignalId::made_at(long_ago);
    claim(contested, stopped).await;
    let takers: Vec<SignalId> = (0..8).map(|_| SignalId::new()).collect();
    let claims =
        futures::future::join_all(takers.iter().map(|&taker| claim(contested, taker))).await;
    let winner = claims[0][0].1;
    assert!(takers.contains(&winner), "{claims:?}");
    for claim in &claims {
        assert_eq!(claim, &[(contested, winner)], "one taker for all");
    }
    assert_eq!(held(contested).await, Some(winner));
}

pub async fn pictures_change_only_an_attachment_that_exists(store: Arc<dyn Store>) {
    use confab_schema::AttachmentKind::{File, Image};
    let owner = user("photographer");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let image = confab_schema::attachment::ImageInfo {
        width: 40,
        height: 30,
        thumbnail: Some(confab_schema::attachment::Derivative {
            sha256: sha("thumbnail"),
            size: 1,
            width: 4,
            height: 3,
            content_type: "image/jpeg".into(),
        }),
        preview: None,
    };
    let listed = |kind| {
        let store = Arc::clone(&store);
        async move {
            store
                .chat_attachments(chat, kind, None, 100)
                .await
                .expect("lists")
        }
    };

    // Sent in a message before its pictures are stored: both are kept.
    let mut photo = attachment(chat, owner.id, Image, &sha("photo"));
    store.put_attachment(&photo).await.expect("puts");
    let message = SignalId::new();
    photo.message_id = Some(message);
    store
        .claim_attachments(chat, &[photo.id], message)
        .await
        .expect("claims");
    store
        .list_claimed_attachments(chat, &[photo.id], message)
        .await
        .expect("lists the claim");
    let stored = store
        .update_derived(photo.id, chat, Image, Image, Some(&image))
        .await
        .expect("writes")
        .expect("the photo is there");
    let expected = confab_schema::Attachment {
        image: Some(image.clone()),
        ..photo.clone()
    };
    assert_eq!(stored, expected);
    assert_eq!(
        store.get_attachments(&[photo.id]).await.expect("gets"),
        std::slice::from_ref(&expected)
    );
    assert_eq!(listed(Some(Image)).await, [expected]);

    // Re-filed as a file: it moves to the file list, still sent in its message.
    let mut broken = attachment(chat, owner.id, Image, &sha("broken"));
    store.put_attachment(&broken).await.expect("puts");
    let message = SignalId::new();
    broken.message_id = Some(message);
    store
        .claim_attachments(chat, &[broken.id], message)
        .await
        .expect("claims");
    store
        .list_claimed_attachments(chat, &[broken.id], message)
        .await
        .expect("lists the claim");
    let stored = store
        .update_derived(broken.id, chat, Image, File, None)
        .await
        .expect("writes")
        .expect("the file is there");
    let expected = confab_schema::Attachment {
        kind: File,
        ..broken.clone()
    };
    assert_eq!(stored, expected);
    assert!(listed(Some(Image)).await.iter().all(|a| a.id != broken.id));
    assert_eq!(listed(Some(File)).await, [expected]);

    // Removed (its message deleted) before its pictures are stored: it stays removed.
    for kind in [Image, File] {
        let gone = attachment(chat, owner.id, Image, &sha("gone"));
        store.put_attachment(&gone).await.expect("puts");
        store
            .delete_attachments(std::slice::from_ref(&gone))
            .await
            .expect("deletes");
        let pictures = (kind == Image).then_some(&image);
        let stored = store
            .update_derived(gone.id, chat, Image, kind, pictures)
            .await
            .expect("writes");
        assert_eq!(stored, None, "{kind:?}");
        assert!(
            store
                .get_attachments(&[gone.id])
                .await
                .expect("gets")
                .is_empty()
        );
        for listed_kind in [None, Some(Image), Some(File)] {
            assert!(
                listed(listed_kind).await.iter().all(|a| a.id != gone.id),
                "listed again among {listed_kind:?} ({kind:?})"
            );
        }
    }
}

/// The collector's marks on an object: set with their end, read back (the latest end), removed.
/// Two runs of the collector mark the same object: one lifting its mark leaves the other's.
pub async fn the_collectors_marks(store: Arc<dyn Store>) {
    let object = sha("marked");
    assert_eq!(store.blob_condemned(&object).await.expect("reads"), None);
    let at = |secs| {
        confab_schema::model::to_millis(OffsetDateTime::now_utc() + Duration::from_secs(secs))
    };
    let (first, second) = (Uuid::new_v4(), Uuid::new_v4());
    let (first_until, second_until) = (at(40), at(30));
    store
        .condemn_blob(&object, first, first_until)
        .await
        .expect("marks");
    assert_eq!(
        store.blob_condemned(&object).await.expect("reads"),
        Some(first_until)
    );
    store
        .condemn_blob(&object, second, second_until)
        .await
        .expect("marks");
    assert_eq!(
        store.blob_condemned(&object).await.expect("reads"),
        Some(first_until),
        "the latest end holds"
    );
    store.absolve_blob(&object, first).await.expect("unmarks");
    assert_eq!(
        store.blob_condemned(&object).await.expect("reads"),
        Some(second_until),
        "the other run's mark stays"
    );
    store.absolve_blob(&object, second).await.expect("unmarks");
    assert_eq!(store.blob_condemned(&object).await.expect("reads"), None);
}

/// Small objects: stored (twice is once), read back, listed in name order page by page across
/// the CQL store's shards, and deleted. Other cases may share the store, so only this case's
/// names are looked for in the listing.
pub async fn small_objects_by_name(store: Arc<dyn Store>) {
    let started = OffsetDateTime::now_utc() - Duration::from_secs(60);
    let mut mine: Vec<(String, Vec<u8>)> = (0..6u8)
        .map(|i| {
            let bytes: Vec<u8> = Uuid::new_v4()
                .as_bytes()
                .iter()
                .cycle()
                .take(100 * usize::from(i))
                .copied()
                .collect();
            (
                confab_runtime::blobs::BlobName::of(&bytes).to_string(),
                bytes,
            )
        })
        .collect();
    for (name, bytes) in &mine {
        store.put_small_object(name, bytes).await.expect("stores");
    }
    store
        .put_small_object(&mine[1].0, &mine[1].1)
        .await
        .expect("stores again");
    for (name, bytes) in &mine {
        assert_eq!(
            store.small_object(name).await.expect("reads").as_ref(),
            Some(bytes),
            "{name}"
        );
    }
    assert_eq!(store.small_object(&sha("none")).await.expect("reads"), None);

    let listed_all = |store: Arc<dyn Store>| async move {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = store
                .small_objects(after.as_deref(), 2)
                .await
                .expect("lists");
            assert!(page.len() <= 2, "{page:?}");
            let Some(last) = page.last() else { break };
            after = Some(last.sha256.clone());
            all.extend(page);
        }
        all
    };
    let all = listed_all(Arc::clone(&store)).await;
    assert!(
        all.windows(2).all(|w| w[0].sha256 < w[1].sha256),
        "in name order, each once"
    );
    mine.sort();
    let found: Vec<&SmallObjectInfo> = all
        .iter()
        .filter(|o| mine.iter().any(|(name, _)| *name == o.sha256))
        .collect();
    assert_eq!(found.len(), mine.len(), "{found:?}");
    for (object, (name, bytes)) in found.iter().zip(&mine) {
        assert_eq!(object.sha256, *name);
        assert_eq!(object.size, bytes.len() as u64);
        assert!(object.stored_at > started, "{object:?}");
    }

    store
        .delete_small_object(&mine[2].0)
        .await
        .expect("deletes");
    store
        .delete_small_object(&sha("never stored"))
        .await
        .expect("deleting nothing is fine");
    assert_eq!(store.small_object(&mine[2].0).await.expect("reads"), None);
    let all = listed_all(Arc::clone(&store)).await;
    assert!(all.iter().all(|o| o.sha256 != mine[2].0));
    // Made again after its collection (an upload that waited it out): the delete is behind it.
    store
        .put_small_object(&mine[2].0, &mine[2].1)
        .await
        .expect("stores again");
    assert_eq!(
        store
            .small_object(&mine[2].0)
            .await
            .expect("reads")
            .as_ref(),
        Some(&mine[2].1)
    );
    for (name, _) in &mine {
        store.delete_small_object(name).await.expect("deletes");
    }
}

/// A signal stores the ids of its attachments and gives them back.
pub async fn signals_keep_their_attachment_ids(store: Arc<dyn Store>) {
    let owner = user("attacher");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let a = attachment(
        chat,
        owner.id,
        confab_schema::AttachmentKind::File,
        &sha("x"),
    );
    let id = SignalId::new();
    let signal = Signal {
        id,
        chat_id: chat,
        kind: SignalKind::Message,
        author_id: owner.id,
        created_at: id.created_at().expect("v7"),
        nonce: None,
        text: None,
        reply_to: None,
        attachments: vec![a.clone().into(), Uuid::now_v7().into()],
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
        call: None,
    };
    store.insert_signal(&signal).await.expect("stores");
    let stored = store
        .get_signal(chat, id)
        .await
        .expect("reads")
        .expect("there");
    let ids: Vec<Uuid> = stored.attachments.iter().map(|r| r.id()).collect();
    assert_eq!(ids, [a.id, signal.attachments[1].id()]);
    assert!(
        stored
            .attachments
            .iter()
            .all(|r| matches!(r, confab_schema::AttachmentRef::Id(_))),
        "stores keep ids only"
    );
}

pub async fn the_outbox_keeps_each_writers_entries(store: Arc<dyn Store>) {
    use crate::store::OutboxEntry;
    let (writer, other) = (Uuid::now_v7(), Uuid::now_v7());
    let entry = |bucket: i64, body: &str| OutboxEntry {
        bucket,
        id: Uuid::now_v7(),
        envelope: body.as_bytes().to_vec(),
    };
    let (one, two, three) = (entry(100, "one"), entry(100, "two"), entry(107, "three"));
    for e in [&one, &two, &three] {
        store.outbox_put(writer, e).await.expect("puts");
    }
    store
        .outbox_put(other, &entry(100, "someone else's"))
        .await
        .expect("puts");
    let mut found = store.outbox_entries(writer, 90, 110).await.expect("reads");
    found.sort_by_key(|e| (e.bucket, e.id));
    let mut expected = vec![one.clone(), two.clone(), three.clone()];
    expected.sort_by_key(|e| (e.bucket, e.id));
    assert_eq!(found, expected, "a writer's entries, and only its own");
    assert_eq!(
        store.outbox_entries(writer, 101, 106).await.expect("reads"),
        Vec::new(),
        "nothing between the buckets"
    );
    store
        .outbox_remove(writer, one.bucket, &[one.id])
        .await
        .expect("removes");
    let left = store.outbox_entries(writer, 100, 107).await.expect("reads");
    assert_eq!(left.len(), 2);
    assert!(!left.contains(&one), "a removed entry is gone");
    // Many at once, more than one request's worth: those named go, the rest stay.
    let many: Vec<OutboxEntry> = (0..150).map(|i| entry(103, &format!("many {i}"))).collect();
    for e in &many {
        store.outbox_put(writer, e).await.expect("puts");
    }
    let (gone, kept) = many.split_at(140);
    let gone_ids: Vec<Uuid> = gone.iter().map(|e| e.id).collect();
    store
        .outbox_remove(writer, 103, &gone_ids)
        .await
        .expect("removes many");
    let mut left = store.outbox_entries(writer, 103, 103).await.expect("reads");
    left.sort_by_key(|e| e.id);
    let mut kept = kept.to_vec();
    kept.sort_by_key(|e| e.id);
    assert_eq!(left, kept, "exactly the entries not named are left");
    store
        .outbox_remove(writer, 103, &[])
        .await
        .expect("removes none");
    store
        .outbox_remove(writer, 103, &kept.iter().map(|e| e.id).collect::<Vec<_>>())
        .await
        .expect("removes the rest");
    assert_eq!(
        store.outbox_entries(writer, 103, 103).await.expect("reads"),
        Vec::new()
    );

    store
        .outbox_heartbeat(writer, 1_000, 5_000)
        .await
        .expect("beats");
    store
        .outbox_heartbeat(writer, 1_000, 9_000)
        .await
        .expect("beats again");
    let writers = store.outbox_writers().await.expect("lists writers");
    let mine: Vec<_> = writers.iter().filter(|w| w.writer == writer).collect();
    assert_eq!(mine.len(), 1);
    assert_eq!((mine[0].entries_from_ms, mine[0].seen_ms), (1_000, 9_000));

    let (sweeper, rival) = (Uuid::now_v7(), Uuid::now_v7());
    assert!(
        store
            .outbox_claim(writer, sweeper, 60)
            .await
            .expect("claims")
    );
    assert!(
        !store.outbox_claim(writer, rival, 60).await.expect("claims"),
        "one sweeper per writer"
    );
    assert!(
        store
            .outbox_claim(writer, sweeper, 60)
            .await
            .expect("claims"),
        "the holder keeps its claim"
    );
    store.outbox_forget_writer(writer).await.expect("forgets");
    assert!(
        store
            .outbox_writers()
            .await
            .expect("lists writers")
            .iter()
            .all(|w| w.writer != writer)
    );
}

fn circle_of(owner: UserId, code: &str, expires_in: Duration) -> Circle {
    let now = confab_schema::model::to_millis(OffsetDateTime::now_utc());
    Circle {
        id: CircleId::new(),
        name: "circle".into(),
        description: Some("about".into()),
        rules: None,
        owner_id: owner,
        access_code: Some(code.into()),
        max_members: 10,
        created_at: now,
        expires_at: confab_schema::model::to_millis(now + expires_in),
    }
}

/// Twelve users join a circle of five seats at once (one seat is the owner's): four get in, and
/// the circle holds five; a member leaving frees a seat for the next, and leaving twice frees one.
pub async fn racing_joins_never_overfill_a_circle(store: Arc<dyn Store>) {
    let owner = user("seat-owner");
    let circle = circle_of(
        owner.id,
        &format!("S{}", Uuid::new_v4().simple()),
        Duration::from_secs(3_600),
    );
    let circle = Circle {
        max_members: 5,
        ..circle
    };
    store.create_circle(&circle).await.unwrap();
    let member = |user: UserId| CircleMember {
        user_id: user,
        display_name: "someone".into(),
        joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
    };
    assert_eq!(
        store
            .put_circle_member(circle.id, &member(owner.id), 5)
            .await
            .unwrap(),
        MemberPut::Added
    );
    let mut joiners = Vec::new();
    for i in 0..12 {
        joiners.push(user(&format!("seat-{i}")).id);
    }
    let puts = futures::future::join_all(joiners.iter().map(|user| {
        let store = store.clone();
        let member = member(*user);
        async move { store.put_circle_member(circle.id, &member, 5).await }
    }))
    .await;
    let added = puts
        .iter()
        .filter(|p| matches!(p, Ok(MemberPut::Added)))
        .count();
    assert!(
        puts.iter()
            .all(|p| matches!(p, Ok(MemberPut::Added | MemberPut::Full))),
        "{puts:?}"
    );
    assert_eq!(added, 4, "{puts:?}");
    let members = store.circle_members(circle.id).await.unwrap();
    assert_eq!(members.len(), 5);

    let inside = members
        .iter()
        .map(|m| m.user_id)
        .find(|u| *u != owner.id)
        .unwrap();
    let outside = *joiners
        .iter()
        .find(|u| !members.iter().any(|m| m.user_id == **u))
        .unwrap();
    let last = *joiners
        .iter()
        .rfind(|u| !members.iter().any(|m| m.user_id == **u) && **u != outside)
        .unwrap();
    store.remove_circle_member(circle.id, inside).await.unwrap();
    store.remove_circle_member(circle.id, inside).await.unwrap();
    assert_eq!(
        store
            .put_circle_member(circle.id, &member(outside), 5)
            .await
            .unwrap(),
        MemberPut::Added,
        "a seat left free is taken"
    );
    assert_eq!(
        store
            .put_circle_member(circle.id, &member(last), 5)
            .await
            .unwrap(),
        MemberPut::Full,
        "leaving twice frees one seat"
    );
    store.delete_circle(circle.id).await.unwrap();
}

/// The members an owner removed are recorded per circle, once however often, and go with the
/// circle.
pub async fn an_owners_removals_last_as_long_as_the_circle(store: Arc<dyn Store>) {
    let store = &*store;
    let (owner, removed, other) = (user("owner"), user("removed"), user("other"));
    let circle = circle_of(
        owner.id,
        &format!("B{}", Uuid::new_v4().simple()),
        Duration::from_secs(3_600),
    );
    let elsewhere = circle_of(
        owner.id,
        &format!("E{}", Uuid::new_v4().simple()),
        Duration::from_secs(3_600),
    );
    for circle in [&circle, &elsewhere] {
        store.create_circle(circle).await.unwrap();
    }
    assert!(
        !store
            .removed_from_circle(circle.id, removed.id)
            .await
            .unwrap()
    );
    for _ in 0..2 {
        store
            .record_circle_removal(circle.id, removed.id, circle.expires_at)
            .await
            .unwrap();
    }
    assert!(
        store
            .removed_from_circle(circle.id, removed.id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .removed_from_circle(circle.id, other.id)
            .await
            .unwrap()
    );
    assert!(
        !store
            .removed_from_circle(elsewhere.id, removed.id)
            .await
            .unwrap(),
        "a removal is from one circle"
    );
    store.delete_circle(circle.id).await.unwrap();
    assert!(
        !store
            .removed_from_circle(circle.id, removed.id)
            .await
            .unwrap(),
        "a removal goes with its circle"
    );
    store.delete_circle(elsewhere.id).await.unwrap();
}

pub async fn circles_codes_members_and_expiry(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob) = (user("alice"), user("bob"));
    let code = format!("C{}", Uuid::new_v4().simple());
    let circle = circle_of(alice.id, &code, Duration::from_secs(3_600));
    store.create_circle(&circle).await.unwrap();
    assert_eq!(
        store.get_circle(circle.id).await.unwrap(),
        Some(circle.clone())
    );
    assert_eq!(store.circle_by_code(&code).await.unwrap(), Some(circle.id));
    let rotated = format!("R{}", Uuid::new_v4().simple());
    store
        .rotate_circle_code(circle.id, &code, &rotated)
        .await
        .unwrap();
    assert_eq!(store.circle_by_code(&code).await.unwrap(), None);
    assert_eq!(
        store.circle_by_code(&rotated).await.unwrap(),
        Some(circle.id)
    );
    assert_eq!(
        store
            .get_circle(circle.id)
            .await
            .unwrap()
            .unwrap()
            .access_code,
        Some(rotated.clone())
    );

    let joined = confab_schema::model::to_millis(OffsetDateTime::now_utc());
    let mut member = CircleMember {
        user_id: bob.id,
        display_name: "B".into(),
        joined_at: joined,
    };
    assert_eq!(
        store
            .put_circle_member(circle.id, &member, 2)
            .await
            .unwrap(),
        MemberPut::Added
    );
    member.display_name = "Bee".into();
    assert_eq!(
        store
            .put_circle_member(circle.id, &member, 1)
            .await
            .unwrap(),
        MemberPut::Renamed,
        "a member is renamed whatever the count"
    );
    assert_eq!(
        store.circle_members(circle.id).await.unwrap(),
        vec![member.clone()]
    );
    store.remove_circle_member(circle.id, bob.id).await.unwrap();
    assert!(store.circle_members(circle.id).await.unwrap().is_empty());

    // Expiry: a circle expired a moment ago is due; one that expires in an hour is not.
    let gone = circle_of(
        alice.id,
        &format!("G{}", Uuid::new_v4().simple()),
        Duration::ZERO,
    );
    store.create_circle(&gone).await.unwrap();
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    store.add_circle_chat(gone.id, chat).await.unwrap();
    assert_eq!(store.circle_chats(gone.id).await.unwrap(), vec![chat]);
    let due = store
        .expired_circles(OffsetDateTime::now_utc(), 10_000)
        .await
        .unwrap();
    assert!(due.contains(&gone.id), "{due:?}");
    assert!(!due.contains(&circle.id));
    store.put_circle_member(gone.id, &member, 10).await.unwrap();
    store
        .write_slots(
            &circle_pool(gone.id),
            &[SlotWrite::Create(waiting(bob.id, ""))],
        )
        .await
        .unwrap();
    store.delete_circle(gone.id).await.unwrap();
    assert_eq!(store.get_circle(gone.id).await.unwrap(), None);
    assert!(store.circle_members(gone.id).await.unwrap().is_empty());
    assert!(store.circle_chats(gone.id).await.unwrap().is_empty());
    assert!(store.slots(&circle_pool(gone.id)).await.unwrap().is_empty());
    assert_eq!(
        store
            .circle_by_code(gone.access_code.as_deref().unwrap())
            .await
            .unwrap(),
        None
    );
    let due = store
        .expired_circles(OffsetDateTime::now_utc(), 10_000)
        .await
        .unwrap();
    assert!(!due.contains(&gone.id));
    // Idempotent.
    store.delete_circle(gone.id).await.unwrap();
}

fn waiting(user: UserId, kind: &str) -> Slot {
    Slot {
        user_id: user,
        kind: kind.into(),
        state: SlotState::Waiting,
        since: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
        partner: None,
        chat: None,
        previous: None,
        version: 0,
    }
}

pub async fn slot_writes_are_all_or_nothing(store: Arc<dyn Store>) {
    let store = &*store;
    let pool = format!("test:{}", Uuid::new_v4());
    let (a, b) = (user("a").id, user("b").id);
    assert!(
        store
            .write_slots(&pool, &[SlotWrite::Create(waiting(a, "talk"))])
            .await
            .unwrap()
    );
    assert!(
        !store
            .write_slots(&pool, &[SlotWrite::Create(waiting(a, "talk"))])
            .await
            .unwrap(),
        "a second create of one user's slot fails"
    );
    assert!(
        store
            .write_slots(&pool, &[SlotWrite::Create(waiting(b, "talk"))])
            .await
            .unwrap()
    );
    let chat = ChatId::new();
    let paired = |me: UserId, other: UserId, version: i64| Slot {
        state: SlotState::Paired,
        partner: Some(other),
        chat: Some(chat),
        previous: Some(other),
        version,
        ..waiting(me, "talk")
    };
    // One stale condition fails the whole write: neither slot changes.
    let stale = [
        SlotWrite::Replace {
            expected: 0,
            slot: paired(a, b, 1),
        },
        SlotWrite::Replace {
            expected: 7,
            slot: paired(b, a, 8),
        },
    ];
    assert!(!store.write_slots(&pool, &stale).await.unwrap());
    let slots = store.slots(&pool).await.unwrap();
    assert!(
        slots
            .iter()
            .all(|s| s.state == SlotState::Waiting && s.version == 0),
        "{slots:?}"
    );
    let fresh = [
        SlotWrite::Replace {
            expected: 0,
            slot: paired(a, b, 1),
        },
        SlotWrite::Replace {
            expected: 0,
            slot: paired(b, a, 1),
        },
    ];
    assert!(store.write_slots(&pool, &fresh).await.unwrap());
    let mut slots = store.slots(&pool).await.unwrap();
    slots.sort_by_key(|s| s.user_id);
    let mut expected = vec![paired(a, b, 1), paired(b, a, 1)];
    expected.sort_by_key(|s| s.user_id);
    for (got, want) in slots.iter().zip(&expected) {
        assert_eq!(
            (
                got.user_id,
                got.state,
                got.partner,
                got.chat,
                got.previous,
                got.version
            ),
            (
                want.user_id,
                want.state,
                want.partner,
                want.chat,
                want.previous,
                want.version
            )
        );
    }
    assert!(
        !store
            .write_slots(
                &pool,
                &[SlotWrite::Delete {
                    user: a,
                    expected: 0
                }]
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .write_slots(
                &pool,
                &[SlotWrite::Delete {
                    user: a,
                    expected: 1
                }]
            )
            .await
            .unwrap()
    );
    assert_eq!(store.slots(&pool).await.unwrap().len(), 1);
}

/// Racers each try to pair a user of their own choosing from what they read: however they
/// interleave, no user ends up in two pairs.
pub async fn racing_pairings_pair_each_user_once(store: Arc<dyn Store>) {
    let pool = format!("test:{}", Uuid::new_v4());
    let users: Vec<UserId> = (0..6).map(|i| user(&format!("u{i}")).id).collect();
    for u in &users {
        assert!(
            store
                .write_slots(&pool, &[SlotWrite::Create(waiting(*u, ""))])
                .await
                .unwrap()
        );
    }
    let racers: Vec<_> = (0..12)
        .map(|i| {
            let store = Arc::clone(&store);
            let pool = pool.clone();
            let (a, b) = (users[i % 6], users[(i * 5 + 1) % 6]);
            tokio::spawn(async move {
                if a == b {
                    return None;
                }
                let slots = store.slots(&pool).await.unwrap();
                let find = |u: UserId| slots.iter().find(|s| s.user_id == u).cloned().unwrap();
                let (sa, sb) = (find(a), find(b));
                if sa.state != SlotState::Waiting || sb.state != SlotState::Waiting {
                    return None;
                }
                let chat = ChatId::new();
                let pair = |me: &Slot, other: UserId| Slot {
                    state: SlotState::Paired,
                    partner: Some(other),
                    chat: Some(chat),
                    version: me.version + 1,
                    ..me.clone()
                };
                let writes = [
                    SlotWrite::Replace {
                        expected: sa.version,
                        slot: pair(&sa, b),
                    },
                    SlotWrite::Replace {
                        expected: sb.version,
                        slot: pair(&sb, a),
                    },
                ];
                store
                    .write_slots(&pool, &writes)
                    .await
                    .unwrap()
                    .then_some((a, b, chat))
            })
        })
        .collect();
    let mut won = Vec::new();
    for racer in racers {
        if let Some(pair) = racer.await.unwrap() {
            won.push(pair);
        }
    }
    let mut seen = HashSet::new();
    for (a, b, _) in &won {
        assert!(
            seen.insert(*a) && seen.insert(*b),
            "a user paired twice: {won:?}"
        );
    }
    // What is stored agrees with the winners.
    for slot in store.slots(&pool).await.unwrap() {
        let pairing = won
            .iter()
            .find(|(a, b, _)| *a == slot.user_id || *b == slot.user_id);
        match pairing {
            Some((a, b, chat)) => {
                assert_eq!(slot.state, SlotState::Paired);
                assert_eq!(slot.chat, Some(*chat));
                let partner = if *a == slot.user_id { *b } else { *a };
                assert_eq!(slot.partner, Some(partner));
            }
            None => assert_eq!(slot.state, SlotState::Waiting),
        }
    }
}

pub async fn deleting_a_chat_removes_everything(store: Arc<dyn Store>) {
    let store = &*store;
    let (alice, bob) = (user("alice"), user("bob"));
    let chat = chat_with(store, alice.id, &[bob.id]).await;
    let kept = chat_with(store, alice.id, &[bob.id]).await;
    let signal = message(chat, alice.id, Some("n"), "hello");
    store.insert_signal(&signal).await.unwrap();
    store
        .insert_signal(&message(kept, alice.id, None, "kept"))
        .await
        .unwrap();
    store
        .touch_chat(chat, &[alice.id, bob.id], signal.id, Some(&signal))
        .await
        .unwrap();
    store
        .add_reaction(chat, signal.id, "👍", bob.id)
        .await
        .unwrap();
    store
        .advance_marker(MarkerKind::Read, chat, bob.id, signal.id)
        .await
        .unwrap();

    store.delete_chat(chat).await.unwrap();
    assert!(store.get_chat(chat).await.unwrap().is_none());
    assert!(store.members(chat).await.unwrap().is_empty());
    assert!(
        store
            .signals_before(chat, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.get_signal(chat, signal.id).await.unwrap().is_none());
    assert!(
        store
            .reactions_page(chat, signal.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .reaction_counts(chat, signal.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.marker(MarkerKind::Read, chat, bob.id).await.unwrap(),
        None
    );
    for user in [alice.id, bob.id] {
        assert!(!store.chats_of(user).await.unwrap().contains(&chat));
        let listed = store.chats_by_activity(user, None, 100).await.unwrap();
        assert!(listed.iter().all(|a| a.chat_id != chat), "{listed:?}");
    }
    // Other chats keep their history, and removing again is harmless.
    assert_eq!(store.signals_before(kept, None, 10).await.unwrap().len(), 1);
    store.delete_chat(chat).await.unwrap();
}

pub async fn call_signals_keep_their_call(store: Arc<dyn Store>) {
    let owner = user("caller");
    store.upsert_user(&owner).await.expect("user");
    let chat = chat_with(store.as_ref(), owner.id, &[]).await;
    let call_id = Uuid::now_v7();
    let mut ids = Vec::new();
    for state in confab_schema::call::CallState::ALL {
        let id = SignalId::new();
        let signal = Signal {
            kind: SignalKind::Call,
            text: None,
            call: Some(confab_schema::call::CallSignal {
                call_id,
                state: *state,
            }),
            ..message_at(chat, owner.id, id, None, "")
        };
        store.insert_signal(&signal).await.expect("stores");
        assert_eq!(
            store.get_signal(chat, id).await.expect("reads"),
            Some(signal)
        );
        ids.push(id);
    }
    let page = store.signals_before(chat, None, 10).await.expect("reads");
    let states: Vec<_> = page
        .iter()
        .rev()
        .map(|s| s.call.as_ref().map(|c| (c.call_id, c.state)))
        .collect();
    let expected: Vec<_> = confab_schema::call::CallState::ALL
        .iter()
        .map(|state| Some((call_id, *state)))
        .collect();
    assert_eq!(states, expected);
    assert!(
        page.iter().all(|s| s.text.is_none()),
        "no text on a call signal"
    );
}

pub async fn calls_move_once_and_ring_until_answered(store: Arc<dyn Store>) {
    use confab_schema::call::CallStatus;
    let (caller, callee) = (user("ringer"), user("ringee"));
    let chat = chat_with(store.as_ref(), caller.id, &[callee.id]).await;
    let now = confab_schema::model::to_millis(OffsetDateTime::now_utc());
    let call = |ring_until| super::CallRecord {
        id: Uuid::now_v7(),
        chat_id: chat,
        started_by: caller.id,
        started_at: now,
        ring_until,
        status: CallStatus::Ringing,
    };
    // Far in the past, so no other case's calls come before them in the list of ringing calls.
    let early = now - time::Duration::days(1) + time::Duration::milliseconds(1);
    // A chat has one live call at most: each in a chat of its own.
    let in_a_chat = |record: super::CallRecord| {
        let store = Arc::clone(&store);
        async move {
            super::CallRecord {
                chat_id: chat_with(store.as_ref(), caller.id, &[callee.id]).await,
                ..record
            }
        }
    };
    let (answered, unanswered, later) = (
        call(early),
        in_a_chat(call(early + time::Duration::milliseconds(1))).await,
        in_a_chat(call(now + time::Duration::hours(1))).await,
    );
    for record in [&answered, &unanswered, &later] {
        assert_eq!(store.create_call(record).await.expect("call stored"), None);
    }
    assert_eq!(
        store.get_call(answered.id).await.expect("reads"),
        Some(answered.clone())
    );
    assert_eq!(
        store.call_participants(answered.id).await.expect("reads"),
        [caller.id],
        "its starter is in it"
    );
    let due = |store: Arc<dyn Store>| async move {
        store
            .listed_calls_due(now, None, 10_000)
            .await
            .expect("reads")
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<Uuid>>()
    };
    let listed = due(Arc::clone(&store)).await;
    assert!(listed.contains(&answered.id) && listed.contains(&unanswered.id));
    assert!(!listed.contains(&later.id), "still ringing");

    // An answer and the ring timeout race: exactly one moves the call out of `ringing`. Of two
    // joins of the callee, the first puts them in, and the second learns its join.
    let (join, other) = (Uuid::now_v7(), Uuid::now_v7());
    for attempt in [join, other] {
        assert_eq!(
            store
                .put_call_participant(answered.id, callee.id, attempt)
                .await
                .expect("joins"),
            Some(join),
            "the join that put them in"
        );
    }
    assert_eq!(
        store
            .call_participant_join(answered.id, callee.id)
            .await
            .expect("reads"),
        Some(join)
    );
    assert_eq!(
        store
            .call_participant_join(answered.id, caller.id)
            .await
            .expect("reads"),
        None,
        "the starter is in under no join"
    );
    let (a, b) = futures::join!(
        store.transition_call(answered.id, CallStatus::Ringing, CallStatus::Active),
        store.transition_call(answered.id, CallStatus::Ringing, CallStatus::Missed),
    );
    let (a, b) = (a.expect("moves"), b.expect("moves"));
    assert!(a ^ b, "one transition wins: {a} {b}");
    let status = store
        .get_call(answered.id)
        .await
        .expect("reads")
        .expect("there")
        .status;
    assert_eq!(
        status,
        if a {
            CallStatus::Active
        } else {
            CallStatus::Missed
        }
    );
    let mut participants = store.call_participants(answered.id).await.expect("reads");
    participants.sort();
    let mut both = vec![caller.id, callee.id];
    both.sort();
    assert_eq!(participants, both);
    store
        .remove_call_participant(answered.id, caller.id)
        .await
        .expect("leaves");
    assert_eq!(
        store.call_participants(answered.id).await.expect("reads"),
        [callee.id]
    );

    let listed = due(Arc::clone(&store)).await;
    assert_eq!(
        listed.contains(&answered.id),
        b,
        "an answered call leaves the sweeper's list; a missed one stays until its signal"
    );
    assert!(listed.contains(&unanswered.id));
    assert!(
        store
            .transition_call(unanswered.id, CallStatus::Ringing, CallStatus::Missed)
            .await
            .expect("moves")
    );
    assert!(
        !store
            .transition_call(unanswered.id, CallStatus::Ringing, CallStatus::Active)
            .await
            .expect("moves"),
        "a missed call is not answered"
    );
    assert!(
        due(Arc::clone(&store)).await.contains(&unanswered.id),
        "listed until its signal is written"
    );
    store
        .forget_listed_call(&super::ListedCall {
            id: unanswered.id,
            chat_id: chat,
            due: unanswered.ring_until,
        })
        .await
        .expect("forgets");
    assert!(!due(Arc::clone(&store)).await.contains(&unanswered.id));
    assert_eq!(store.get_call(Uuid::now_v7()).await.expect("reads"), None);
}

/// The sweeper's list: a call listed more than once is listed at each time, listings come in
/// order of when they are due and then of call id, a page continues after the listing given, and a
/// listing stays until it is forgotten, whatever its call's status.
pub async fn the_sweepers_list_pages_and_keeps_calls_until_forgotten(store: Arc<dyn Store>) {
    use super::ListedCall;
    let chat = ChatId::new();
    // Days before any other case's listings, so that only this case's are due by `bound`.
    let base = confab_schema::model::to_millis(OffsetDateTime::now_utc()) - time::Duration::days(3);
    let at = |ms: i64| base + time::Duration::milliseconds(ms);
    let (first, second) = (Uuid::now_v7(), Uuid::now_v7());
    let mut listings = vec![
        ListedCall {
            id: first,
            chat_id: chat,
            due: at(0),
        },
        ListedCall {
            id: second,
            chat_id: chat,
            due: at(0),
        },
        ListedCall {
            id: first,
            chat_id: chat,
            due: at(5),
        },
        ListedCall {
            id: Uuid::now_v7(),
            chat_id: chat,
            due: at(7),
        },
        ListedCall {
            id: Uuid::now_v7(),
            chat_id: chat,
            due: at(20),
        },
    ];
    for listing in &listings {
        store.list_call(listing).await.expect("lists");
    }
    let bound = at(10);
    let page = |after: Option<ListedCall>| {
        let store = Arc::clone(&store);
        async move {
            store
                .listed_calls_due(bound, after.as_ref(), 2)
                .await
                .expect("reads")
        }
    };
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let listed = page(after).await;
        assert!(listed.len() <= 2);
        seen.extend(listed.iter().copied());
        match listed.last() {
            Some(last) if listed.len() == 2 => after = Some(*last),
            _ => break,
        }
    }
    listings.pop();
    listings.sort_by_key(|l| (l.due, l.id));
    assert_eq!(seen, listings, "every listing due, in order, each once");

    store
        .forget_listed_call(&listings[0])
        .await
        .expect("forgets");
    let left: Vec<ListedCall> = store
        .listed_calls_due(bound, None, 10)
        .await
        .expect("reads");
    assert_eq!(left, listings[1..], "only that listing is forgotten");
}

/// A participant's pending call signal is one at a time: a new one replaces the last, and it is
/// gone once removed; a removal of one that was replaced since leaves the new one.
pub async fn pending_call_signals_replace_each_other(store: Arc<dyn Store>) {
    use super::PendingCallSignal;
    use confab_schema::call::CallState;
    let (call, user, other) = (Uuid::now_v7(), user("pending").id, user("other").id);
    assert_eq!(
        store.pending_call_signal(call, user).await.expect("reads"),
        None
    );
    let joined = PendingCallSignal {
        state: CallState::Joined,
        token: Uuid::now_v7(),
    };
    let left = PendingCallSignal {
        state: CallState::Left,
        token: Uuid::now_v7(),
    };
    store
        .set_pending_call_signal(call, user, &joined)
        .await
        .expect("stores");
    assert_eq!(
        store.pending_call_signal(call, user).await.expect("reads"),
        Some(joined)
    );
    assert_eq!(
        store.pending_call_signal(call, other).await.expect("reads"),
        None,
        "another participant's is apart"
    );
    store
        .set_pending_call_signal(call, user, &left)
        .await
        .expect("stores");
    assert_eq!(
        store.pending_call_signal(call, user).await.expect("reads"),
        Some(left)
    );
    for replaced in [
        joined,
        PendingCallSignal {
            token: joined.token,
            ..left
        },
    ] {
        store
            .forget_pending_call_signal(call, user, &replaced)
            .await
            .expect("removes nothing");
        assert_eq!(
            store.pending_call_signal(call, user).await.expect("reads"),
            Some(left),
            "{replaced:?} was replaced: the new one stays"
        );
    }
    store
        .forget_pending_call_signal(call, user, &left)
        .await
        .expect("removes");
    assert_eq!(
        store.pending_call_signal(call, user).await.expect("reads"),
        None
    );
}

/// A chat's live calls are its ringing and active ones: a call leaves the list when it is missed or
/// ended, and another chat's calls are not in it.
pub async fn a_chats_live_calls(store: Arc<dyn Store>) {
    use confab_schema::call::CallStatus;
    let (caller, callee) = (user("live-caller"), user("live-callee"));
    let chat = chat_with(store.as_ref(), caller.id, &[callee.id]).await;
    let other = chat_with(store.as_ref(), caller.id, &[callee.id]).await;
    let now = confab_schema::model::to_millis(OffsetDateTime::now_utc());
    let call = |chat_id| super::CallRecord {
        id: Uuid::now_v7(),
        chat_id,
        started_by: caller.id,
        started_at: now,
        ring_until: now + time::Duration::hours(1),
        status: CallStatus::Ringing,
    };
    let live = |store: Arc<dyn Store>| async move {
        let mut live: Vec<(Uuid, CallStatus)> = store
            .live_calls(chat)
            .await
            .expect("reads")
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect();
        live.sort_by_key(|(id, _)| *id);
        live
    };
    let elsewhere = call(other);
    assert_eq!(store.create_call(&elsewhere).await.expect("stored"), None);

    // Missed, then ended after an answer: neither is live, and neither keeps a new call out.
    for to in [CallStatus::Missed, CallStatus::Active] {
        let record = call(chat);
        assert_eq!(store.create_call(&record).await.expect("stored"), None);
        assert_eq!(
            live(Arc::clone(&store)).await,
            [(record.id, CallStatus::Ringing)]
        );
        assert!(
            store
                .transition_call(record.id, CallStatus::Ringing, to)
                .await
                .expect("moves")
        );
        if to == CallStatus::Active {
            assert_eq!(
                live(Arc::clone(&store)).await,
                [(record.id, CallStatus::Active)]
            );
            let second = call(chat);
            assert_eq!(
                store.create_call(&second).await.expect("reads"),
                Some(super::CallRecord {
                    status: CallStatus::Active,
                    ..record.clone()
                }),
                "a chat's live call keeps a second one out"
            );
            assert_eq!(store.get_call(second.id).await.expect("reads"), None);
            assert!(
                store
                    .transition_call(record.id, CallStatus::Active, CallStatus::Ended)
                    .await
                    .expect("moves")
            );
        }
        assert_eq!(live(Arc::clone(&store)).await, []);
    }

    // Starts racing in one chat: one stores its call, the others answer it; storing the
    // winner's call again answers as its first write did.
    let racing: Vec<_> = (0..4).map(|_| call(chat)).collect();
    let answers = futures::future::join_all(racing.iter().map(|record| {
        let store = Arc::clone(&store);
        async move { store.create_call(record).await.expect("answers") }
    }))
    .await;
    let stored: Vec<_> = racing
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(record, _)| record.clone())
        .collect();
    let [winner] = stored.as_slice() else {
        panic!("one of the racing starts stores its call: {answers:?}");
    };
    assert!(
        answers.iter().flatten().all(|live| live == winner),
        "the others answer it: {answers:?}"
    );
    assert_eq!(
        live(Arc::clone(&store)).await,
        [(winner.id, CallStatus::Ringing)]
    );
    assert_eq!(store.create_call(winner).await.expect("stored"), None);
    assert_eq!(
        store.live_calls(other).await.expect("reads"),
        [elsewhere],
        "another chat's call is its own"
    );
}

/// Participants leave and join again, each time under the new join: a leave takes out whatever
/// join they were in under (the starter's, under none, included), and leaves nothing behind that
/// a later join would find. A leave of someone not in the call changes nothing.
pub async fn call_participants_leave_and_join_again(store: Arc<dyn Store>) {
    use confab_schema::call::CallStatus;
    let (caller, callee) = (user("again-caller"), user("again-callee"));
    let chat = chat_with(store.as_ref(), caller.id, &[callee.id]).await;
    let now = confab_schema::model::to_millis(OffsetDateTime::now_utc());
    let call = super::CallRecord {
        id: Uuid::now_v7(),
        chat_id: chat,
        started_by: caller.id,
        started_at: now,
        ring_until: now + time::Duration::hours(1),
        status: CallStatus::Ringing,
    };
    assert_eq!(store.create_call(&call).await.expect("stored"), None);
    let participants = |store: Arc<dyn Store>| async move {
        let mut users = store.call_participants(call.id).await.expect("reads");
        users.sort();
        users
    };
    store
        .remove_call_participant(call.id, callee.id)
        .await
        .expect("a leave of someone not in the call");
    assert_eq!(participants(Arc::clone(&store)).await, [caller.id]);

    for _ in 0..3 {
        let join = Uuid::now_v7();
        assert_eq!(
            store
                .put_call_participant(call.id, callee.id, join)
                .await
                .expect("joins"),
            Some(join),
            "in again under the new join"
        );
        assert_eq!(
            store
                .call_participant_join(call.id, callee.id)
                .await
                .expect("reads"),
            Some(join)
        );
        store
            .remove_call_participant(call.id, callee.id)
            .await
            .expect("leaves");
        assert_eq!(
            store
                .call_participant_join(call.id, callee.id)
                .await
                .expect("reads"),
            None,
            "out"
        );
    }

    // The starter, in under no join, leaves and joins again.
    store
        .remove_call_participant(call.id, caller.id)
        .await
        .expect("leaves");
    assert_eq!(participants(Arc::clone(&store)).await, []);
    let join = Uuid::now_v7();
    assert_eq!(
        store
            .put_call_participant(call.id, caller.id, join)
            .await
            .expect("joins"),
        Some(join)
    );
    assert_eq!(participants(Arc::clone(&store)).await, [caller.id]);
}
