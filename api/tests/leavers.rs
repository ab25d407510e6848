//! A member taken out of a chat keeps no notification of it: the pushes they were sent are
//! withdrawn from their devices after the removal, in the background, and that is tried again
//! while the push queue fails. (A removal cut short before it is finished by the outbox sweep:
//! `outbox.rs`.)

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use confab_api::domain::Outcome;
use confab_api::domain::chats::ChatToCreate;
use confab_api::domain::inputs::ChatName;
use confab_api::domain::signals::NewMessage;
use confab_api::state::ApiState;
use confab_api::store::Store;
use confab_api::store::embedded::EmbeddedStore;
use confab_runtime::bus::{EmbeddedBus, LogSettings};
use confab_runtime::identity::DevIdentity;
use confab_runtime::push_queue::{EmbeddedPushQueue, PushKind, PushQueue};
use confab_schema::{SignalKind, User, UserId};
use support::FailingCancels;

fn user(name: &str) -> User {
    User {
        id: UserId::from_subject("leavers", name),
        username: name.into(),
        display_name: name.into(),
        email: None,
    }
}

/// Before: the background withdrawal tried once, logged its failure and gave up, and the
/// notification of the chat stayed on the removed member's devices for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_members_pushes_are_withdrawn_after_the_queue_failed_at_first() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(EmbeddedStore::open(&dir.path().join("store.sqlite3")).expect("store"));
    let bus = Arc::new(
        EmbeddedBus::open(&dir.path().join("events.sqlite3"), LogSettings::default()).expect("bus"),
    );
    let queue = Arc::new(FailingCancels {
        inner: EmbeddedPushQueue::open(&dir.path().join("pushes.sqlite3")).expect("push queue"),
        failures: AtomicU32::new(0),
    });
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        store.upsert_user(u).await.expect("user");
    }
    // Its sends schedule no push: the one bob was sent is made below, by hand.
    let state = ApiState::new(
        Arc::clone(&store),
        bus,
        Arc::new(DevIdentity::open(dir.path()).expect("identity")),
        &confab_runtime::signed::Keyring::random(),
    );
    let (Outcome::Created(chat) | Outcome::Existing(chat)) = state
        .create_chat(
            &alice,
            ChatToCreate::Group {
                name: ChatName::parse("leavers".into()).expect("name"),
                description: None,
                members: vec![bob.id],
            },
        )
        .await
        .expect("chat");
    let message = NewMessage::parse(
        SignalKind::Message,
        Some("on bob's lock screen".into()),
        Some("n-pushed".into()),
        None,
        Vec::new(),
    )
    .expect("a valid message");
    let (Outcome::Created(sent) | Outcome::Existing(sent)) = state
        .send_message(&alice, chat.id, message)
        .await
        .expect("sent");
    support::sent_a_push(&*queue, bob.id, chat.id, &sent).await;

    let state = state.with_push_queue(Arc::clone(&queue) as Arc<dyn PushQueue>);
    queue.failures.store(2, Ordering::SeqCst);
    state
        .remove_member(alice.id, chat.id, bob.id)
        .await
        .expect("removes bob");

    let withdrawn = support::due_within_the_deadline(&*queue).await;
    assert_eq!(
        withdrawn
            .iter()
            .map(|p| (p.kind, p.user, p.chat, p.newest))
            .collect::<Vec<_>>(),
        vec![(PushKind::Withdrawal, bob.id, chat.id, sent.id)]
    );
}
