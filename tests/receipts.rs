//! Who has read or received a signal (`/views`, `/deliveries`): pages of a large chat list every
//! current member who reached the signal exactly once, and each page costs a bounded number of
//! reads whatever the chat's size (a chat where few reached the signal answers short pages, each
//! with a cursor where its scan stopped).

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use confab_api::domain::inputs::PageLimit;
use confab_api::store::conformance::{chat_with, message};
use confab_api::store::{MarkerKind, Store};
use confab_schema::Event;
use confab_schema::event::EventKind;
use confab_schema::{ChatId, Member, MemberRole, SignalId, UserId};
use futures::StreamExt;
use serde_json::Value;
use support::held_store::{Gate, Held, HeldApi};
use support::{Stack, on_both_stacks, spawn_app};

/// Most marker rows one page may read (five reads of two hundred).
const MARKERS_PER_PAGE: usize = 1000;

/// Adds `users` to `chat` as members since `joined_at`.
async fn add_members(
    store: &Arc<dyn Store>,
    chat: ChatId,
    users: &[UserId],
    joined_at: time::OffsetDateTime,
) {
    let joined_at = confab_schema::model::to_millis(joined_at);
    futures::stream::iter(users.to_vec())
        .map(|user_id| {
            let store = Arc::clone(store);
            async move {
                let member = Member {
                    user_id,
                    role: MemberRole::Member,
                    joined_at,
                };
                store.put_member(chat, &member).await
            }
        })
        .buffer_unordered(64)
        .for_each(|written| async move { written.expect("member written") })
        .await;
}

async fn mark_all(
    store: &Arc<dyn Store>,
    kind: MarkerKind,
    chat: ChatId,
    marks: Vec<(UserId, SignalId)>,
) {
    futures::stream::iter(marks)
        .map(|(user, up_to)| {
            let store = Arc::clone(store);
            async move { store.advance_marker(kind, chat, user, up_to).await }
        })
        .buffer_unordered(64)
        .for_each(|written| async move { written.expect("marker written") })
        .await;
}

/// Every user id of every page of `path` (`?limit=` given), following the cursors; each page at
/// most `limit` long.
async fn every_page(app: &support::TestApp, token: &str, path: &str, limit: usize) -> Vec<String> {
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let url = match &cursor {
            Some(cursor) => format!("{path}?limit={limit}&cursor={cursor}"),
            None => format!("{path}?limit={limit}"),
        };
        let response = app.get(token, &url).await;
        assert_eq!(response.status(), 200, "{url}");
        let page: Value = response.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit, "{page}");
        listed.extend(
            items
                .iter()
                .map(|seen| seen["user_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return listed,
        }
    }
    panic!("{path} never ended");
}

fn each_once(listed: Vec<String>) -> HashSet<String> {
    let count = listed.len();
    let set: HashSet<String> = listed.into_iter().collect();
    assert_eq!(set.len(), count, "a member listed twice");
    set
}

/// A chat of 2,400 more members: nearly all have read the older message only, three have read
/// the newer one, and three who read it left. Pages of either message's views list each current
/// member who reached it exactly once: the newer one's pages are mostly short (or empty), each
/// with a cursor on.
async fn views_of_a_large_chat_page_each_member_once(stack: Stack) {
    let app = spawn_app(stack).await;
    // Members since before the messages: views list those a message was sent to.
    let joined_at = time::OffsetDateTime::now_utc();
    let alice = app.token("alice").await;
    let alice_id = app.me(&alice).await;
    let bob = app.token("bob").await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let signals = format!("/v1/chats/{chat}/signals");
    let mut sent = Vec::new();
    for text in ["older", "newer"] {
        let response = app
            .post(
                &alice,
                &signals,
                &serde_json::json!({"kind": "message", "text": text}),
            )
            .await;
        assert_eq!(response.status(), 201);
        let signal: Value = response.json().await.unwrap();
        sent.push(signal["id"].as_str().unwrap().parse::<SignalId>().unwrap());
    }
    let (older, newer) = (sent[0], sent[1]);

    let store = confab::open_store(&app.config, false).await.unwrap();
    let chat_id: ChatId = chat.parse().unwrap();
    let members: Vec<UserId> = (0..2400)
        .map(|i| UserId::from_subject("receipts", &format!("{chat}-{i}")))
        .collect();
    add_members(&store, chat_id, &members, joined_at).await;
    let reached_newer = |i: usize| i.is_multiple_of(800);
    let leaves = |i: usize| i % 800 == 1;
    let reads = members
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let up_to = if reached_newer(i) || leaves(i) {
                newer
            } else {
                older
            };
            (*user, up_to)
        })
        .collect();
    mark_all(&store, MarkerKind::Read, chat_id, reads).await;
    let delivered = members.iter().take(5).map(|user| (*user, newer)).collect();
    mark_all(&store, MarkerKind::Delivered, chat_id, delivered).await;
    for (i, user) in members.iter().enumerate() {
        if leaves(i) {
            store.remove_member(chat_id, *user).await.unwrap();
        }
    }

    let current: Vec<(usize, String)> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| !leaves(*i))
        .map(|(i, user)| (i, user.to_string()))
        .collect();
    // The sender's read marker follows their sends.
    let mut newer_readers: HashSet<String> = current
        .iter()
        .filter(|(i, _)| reached_newer(*i))
        .map(|(_, user)| user.clone())
        .collect();
    newer_readers.insert(alice_id.clone());
    let mut older_readers: HashSet<String> = current.iter().map(|(_, user)| user.clone()).collect();
    older_readers.insert(alice_id);

    let newer_views = format!("{signals}/{newer}/views");
    assert_eq!(
        each_once(every_page(&app, &bob, &newer_views, 2).await),
        newer_readers
    );
    let older_views = format!("{signals}/{older}/views");
    assert_eq!(
        each_once(every_page(&app, &bob, &older_views, 100).await),
        older_readers
    );
    let deliveries = format!("{signals}/{newer}/deliveries");
    assert_eq!(
        each_once(every_page(&app, &bob, &deliveries, 3).await),
        members
            .iter()
            .take(5)
            .enumerate()
            .filter(|(i, _)| !leaves(*i))
            .map(|(_, user)| user.to_string())
            .collect::<HashSet<_>>()
    );
    drop(store);
    app.stop().await;
}
on_both_stacks!(views_of_a_large_chat_page_each_member_once);

/// A page of views reads a bounded number of markers and never the chat's whole member list,
/// whatever the chat's size: here 3,000 members whose markers are all before the signal, so no
/// page fills, and the pages stop where their scan did.
async fn a_page_of_views_reads_a_bounded_number_of_markers(stack: Stack) {
    let api = HeldApi::new(stack).await;
    let store: Arc<dyn Store> = Arc::clone(&api.store) as Arc<dyn Store>;
    let owner = api.user("owner").await;
    let chat = chat_with(&*store, owner.id, &[]).await;
    let members: Vec<UserId> = (0..3000)
        .map(|i| UserId::from_subject("receipts", &format!("{chat}-{i}")))
        .collect();
    add_members(&store, chat, &members, time::OffsetDateTime::now_utc()).await;
    let before = message(chat, owner.id, None, "before");
    store.insert_signal(&before).await.unwrap();
    let signal = message(chat, owner.id, None, "seen by few");
    store.insert_signal(&signal).await.unwrap();
    let marks = members.iter().map(|user| (*user, before.id)).collect();
    mark_all(&store, MarkerKind::Read, chat, marks).await;
    store
        .advance_marker(MarkerKind::Read, chat, owner.id, signal.id)
        .await
        .unwrap();

    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    for page_number in 0.. {
        assert!(page_number < 100, "the pages never ended");
        let (pages_before, markers_before, lists_before) = api.store.reads.now();
        let page = api
            .state
            .list_reached(
                MarkerKind::Read,
                owner.id,
                chat,
                signal.id,
                cursor.as_deref(),
                PageLimit::parse(Some(10)).unwrap(),
            )
            .await
            .unwrap();
        let (pages_after, markers_after, lists_after) = api.store.reads.now();
        assert!(
            markers_after - markers_before <= MARKERS_PER_PAGE,
            "page {page_number} read {} markers in {} reads",
            markers_after - markers_before,
            pages_after - pages_before
        );
        assert_eq!(
            lists_after - lists_before,
            0,
            "page {page_number} read the chat's whole member list"
        );
        let page = serde_json::to_value(&page).unwrap();
        listed.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|seen| seen["user_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(listed, vec![owner.id.to_string()]);
    api.clean_up().await;
}
on_both_stacks!(a_page_of_views_reads_a_bounded_number_of_markers);

/// A member with two signals to mark, `earlier` and `later`, on a store and bus that can hold a
/// write or a publish (two devices marking at once).
struct TwoMarks {
    api: HeldApi,
    reader: UserId,
    chat: ChatId,
    earlier: SignalId,
    later: SignalId,
}

impl TwoMarks {
    async fn new(stack: Stack) -> TwoMarks {
        let api = HeldApi::new(stack).await;
        let store: Arc<dyn Store> = Arc::clone(&api.store) as Arc<dyn Store>;
        let owner = api.user("owner").await;
        let reader = api.user("reader").await.id;
        let chat = chat_with(&*store, owner.id, &[reader]).await;
        let earlier = message(chat, owner.id, None, "earlier");
        store.insert_signal(&earlier).await.unwrap();
        let later = message(chat, owner.id, None, "later");
        store.insert_signal(&later).await.unwrap();
        TwoMarks {
            api,
            reader,
            chat,
            earlier: earlier.id,
            later: later.id,
        }
    }

    /// Marks `earlier`, which the hold the caller set stops at `gate`; marks `later` meanwhile,
    /// then lets the first go on. Answers what each mark answered, the earlier's first.
    async fn race(&self, gate: &Gate) -> (Option<SignalId>, Option<SignalId>) {
        let held = tokio::spawn({
            let state = self.api.state.clone();
            let (reader, chat, earlier) = (self.reader, self.chat, self.earlier);
            async move { state.mark(MarkerKind::Read, reader, chat, earlier).await }
        });
        gate.arrived(1).await;
        let further = self
            .api
            .state
            .mark(MarkerKind::Read, self.reader, self.chat, self.later)
            .await
            .unwrap();
        gate.release(1).await;
        let answered = tokio::time::timeout(support::DEADLINE, held)
            .await
            .expect("the held mark ends")
            .unwrap()
            .unwrap();
        (answered, further)
    }
}

/// Two marks of one member at once (two devices), the one further on landing between the other's
/// read of the marker and its write: both answer the marker where the store keeps it, the further
/// one, never the earlier signal, which would show the marker going back.
async fn marks_at_once_answer_the_furthest(stack: Stack) {
    let marks = TwoMarks::new(stack).await;
    marks.api.store.hold_next(Held::MarkerAdvanced);
    let (answered, further) = marks.race(&marks.api.store.gate).await;
    assert_eq!(further, Some(marks.later));
    assert_eq!(
        answered,
        Some(marks.later),
        "the held mark answered its own, earlier signal"
    );
    let stored = marks
        .api
        .store
        .marker(MarkerKind::Read, marks.chat, marks.reader)
        .await
        .unwrap();
    assert_eq!(stored, Some(marks.later));
    marks.api.clean_up().await;
}

on_both_stacks!(marks_at_once_answer_the_furthest);

/// The race a read before the publish cannot close: the earlier mark has read the marker (its
/// own) and its event is held on its way to the log while the further mark runs through and is
/// published. The earlier event lands last; its read after publishing finds the marker further
/// on and publishes that, so the chat's log ends with the marker where the store keeps it.
async fn the_log_ends_with_the_furthest_mark(stack: Stack) {
    let marks = TwoMarks::new(stack).await;
    marks.api.bus.hold_next(EventKind::ReadUpdated);
    marks.race(&marks.api.bus.gate).await;
    let logged: Vec<SignalId> = marks
        .api
        .bus
        .events_of(marks.chat)
        .await
        .into_iter()
        .filter_map(|logged| match logged.envelope.event {
            Event::ReadUpdated(change) if change.user_id == marks.reader => Some(change.up_to),
            _ => None,
        })
        .collect();
    assert_eq!(
        logged.last(),
        Some(&marks.later),
        "the log ends with the earlier mark: {logged:?} (earlier {}, later {})",
        marks.earlier,
        marks.later
    );
    marks.api.clean_up().await;
}

on_both_stacks!(the_log_ends_with_the_furthest_mark);

/// A member added after a message is not among those who saw it: their `joined` moves their read
/// marker past the history before it (so it does not count as unread to them), but they were never
/// sent that message. Views list the members a message was sent to who reached it.
async fn a_member_added_later_has_not_seen_what_came_before(stack: Stack) {
    use confab_api::domain::Outcome;

    use confab_api::domain::inputs::MessageText;
    use confab_api::domain::signals::NewMessage;

    let api = HeldApi::new(stack).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let carol = api.user("carol").await;
    let chat = support::held_store::group(&api.state, &alice, "views", &[bob.id]).await;
    let send = |text: &str| NewMessage {
        nonce: None,
        text: Some(MessageText::parse(text.into()).unwrap()),
        reply_to: None,
        attachments: Default::default(),
    };
    let before = match api
        .state
        .send_message(&bob, chat, send("before carol"))
        .await
    {
        Ok(Outcome::Created(signal) | Outcome::Existing(signal)) => signal.id,
        other => panic!("{other:?}"),
    };
    api.state
        .add_member(alice.id, chat, carol.id, Some(MemberRole::Member))
        .await
        .expect("adds carol");
    let after = match api.state.send_message(&carol, chat, send("hello")).await {
        Ok(Outcome::Created(signal) | Outcome::Existing(signal)) => signal.id,
        other => panic!("{other:?}"),
    };
    let viewers = async |signal: SignalId| -> HashSet<UserId> {
        let page = api
            .state
            .list_reached(
                MarkerKind::Read,
                alice.id,
                chat,
                signal,
                None,
                PageLimit::parse(Some(50)).unwrap(),
            )
            .await
            .unwrap();
        let page = serde_json::to_value(&page).unwrap();
        page["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|seen| serde_json::from_value(seen["user_id"].clone()).unwrap())
            .collect()
    };
    // Carol's marker moves with her own message (in the background, after the send).
    tokio::time::timeout(support::DEADLINE, async {
        while !viewers(after).await.contains(&carol.id) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("carol's marker reaches her own message");
    assert!(
        !viewers(before).await.contains(&carol.id),
        "carol was not a member when bob's message was sent"
    );
    assert!(viewers(before).await.contains(&bob.id), "bob wrote it");
    api.clean_up().await;
}
on_both_stacks!(a_member_added_later_has_not_seen_what_came_before);

/// On CQL a read marker is written twice: in the chat, and in the reader's own partition for
/// their chat list's unread counts. A mark whose second write failed answered 503, and its retry
/// found the chat's marker there already and answered without writing again: the chat list
/// counted the message unread until a further mark. The retry now writes the marker again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cql_the_retry_of_a_half_written_mark_writes_the_readers_copy() {
    use confab_api::store::cql::{CqlOptions, CqlStore};

    let name = "cql_the_retry_of_a_half_written_mark_writes_the_readers_copy";
    if !support::real_stack_available(name).await {
        return;
    }
    let api = HeldApi::new(Stack::Real).await;
    let alice = api.user("alice").await;
    let bob = api.user("bob").await;
    let chat = support::held_store::group(&api.state, &alice, "halves", &[bob.id]).await;
    let sent = support::held_store::message(&api.state, &alice, chat, "read me").await;
    let unread = async || {
        let listed = api
            .state
            .list_chats(bob.id, None, PageLimit::parse(None).unwrap())
            .await
            .unwrap();
        listed
            .items
            .iter()
            .find(|listed| listed.id == chat)
            .expect("the chat is in bob's list")
            .unread_count
    };
    // The half of bob's mark that landed: the chat's marker, as the store writes it.
    let options = CqlOptions::from_config(&api.config);
    let store = CqlStore::connect(&options).await.unwrap();
    let at = sent.unix_millis().unwrap() * 1000;
    store
        .session()
        .query_unpaged(
            format!(
                "INSERT INTO {}.markers (chat_id, kind, user_id, up_to) VALUES (?, ?, ?, ?) \
                 USING TIMESTAMP ?",
                options.keyspace
            ),
            (chat.0, MarkerKind::Read.as_str(), bob.id.0, sent.0, at),
        )
        .await
        .unwrap();
    assert!(unread().await >= 1, "the half-written mark counts as read");

    let marked = api
        .state
        .mark(MarkerKind::Read, bob.id, chat, sent)
        .await
        .unwrap();
    assert_eq!(marked, Some(sent));
    assert_eq!(
        unread().await,
        0,
        "bob's chat list still counts what his retried mark read"
    );
    api.clean_up().await;
}
