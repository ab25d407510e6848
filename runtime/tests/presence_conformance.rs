//! Presence's node records against the embedded presence and against JetStream key-value buckets
//! on the NATS server that `infra/up.sh` started (a fresh prefix per case, two connections, as two
//! notifier nodes would hold): a silent node is claimed by one sweeper, once, and its users found.

mod support;

use std::sync::Arc;

use confab_runtime::presence::{
    CLAIM_LAPSES, Change, EmbeddedPresence, NatsPresence, PRESENCE_TTL, Presence, now_ms,
};
use confab_schema::UserId;

struct Nodes {
    first: Arc<dyn Presence>,
    second: Arc<dyn Presence>,
    cleanup: Option<Arc<NatsPresence>>,
}

fn embedded() -> Nodes {
    let shared: Arc<dyn Presence> = Arc::new(EmbeddedPresence::default());
    Nodes {
        first: Arc::clone(&shared),
        second: shared,
        cleanup: None,
    }
}

async fn nats() -> Option<Nodes> {
    let url = support::nats_url("presence").await?;
    let prefix = format!("t{}", uuid::Uuid::new_v4().simple());
    let first = Arc::new(
        NatsPresence::connect(&url, &prefix)
            .await
            .expect("connects"),
    );
    let second = NatsPresence::connect(&url, &prefix)
        .await
        .expect("connects");
    Some(Nodes {
        first: Arc::clone(&first) as Arc<dyn Presence>,
        second: Arc::new(second),
        cleanup: Some(first),
    })
}

async fn a_silent_node_is_claimed_once_and_its_users_found(nodes: Nodes) {
    let (first, second) = (&nodes.first, &nodes.second);
    let now = now_ms();
    let ttl = i64::try_from(PRESENCE_TTL.as_millis()).expect("ms");
    let (held, elsewhere, never) = (
        UserId::from_subject("presence", "held"),
        UserId::from_subject("presence", "elsewhere"),
        UserId::from_subject("presence", "never"),
    );
    first.node_alive("crashed", now).await.expect("recorded");
    first.node_alive("sweeper", now).await.expect("recorded");
    let on = |node: &'static str| -> Change { Box::new(move |record| record.heartbeat(node, now)) };
    first.update(held, on("crashed")).await.expect("held");
    first.update(elsewhere, on("other")).await.expect("held");
    first.update(never, Box::new(|_| {})).await.expect("kept");

    assert_eq!(
        second
            .claim_silent_nodes("sweeper", now + 1_000)
            .await
            .expect("claims"),
        Vec::<String>::new(),
        "a node heard from within the TTL is not silent"
    );
    let later = now + ttl + 1_000;
    let (one, other) = tokio::join!(
        first.claim_silent_nodes("sweeper", later),
        second.claim_silent_nodes("rival", later),
    );
    let (mut one, mut other) = (one.expect("claims"), other.expect("claims"));
    one.retain(|node| node == "crashed");
    other.retain(|node| node == "crashed");
    assert_eq!(
        one.len() + other.len(),
        1,
        "claimed by exactly one of two racing sweepers: {one:?} {other:?}"
    );
    let third = |at: i64| async move {
        let mut claimed = second
            .claim_silent_nodes("third", at)
            .await
            .expect("claims");
        claimed.retain(|node| node == "crashed");
        claimed
    };
    assert!(third(later).await.is_empty(), "a claim holds");
    let lapse = i64::try_from(CLAIM_LAPSES.as_millis()).expect("ms");
    assert_eq!(
        third(later + lapse).await,
        vec!["crashed".to_string()],
        "a claim whose sweeper never finished lapses"
    );
    assert_eq!(
        second.users_on("crashed").await.expect("reads"),
        vec![held],
        "the users whose records name the node"
    );
    second.forget_node("crashed").await.expect("forgets");
    second.forget_node("sweeper").await.expect("forgets");
    assert!(
        first
            .claim_silent_nodes("late", later + ttl)
            .await
            .expect("claims")
            .is_empty(),
        "a forgotten node is nobody's to sweep"
    );
    if let Some(nats) = nodes.cleanup {
        let _ = nats.delete_bucket().await;
    }
}

#[tokio::test]
async fn embedded_a_silent_node_is_claimed_once_and_its_users_found() {
    a_silent_node_is_claimed_once_and_its_users_found(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_a_silent_node_is_claimed_once_and_its_users_found() {
    if let Some(nodes) = nats().await {
        a_silent_node_is_claimed_once_and_its_users_found(nodes).await;
    }
}

/// Many connections of one user at once, on two nodes (a reconnect storm): every update is
/// applied, none refused for contention.
async fn racing_updates_of_one_user_all_apply(nodes: Nodes) {
    const RACERS: usize = 64;
    let user = UserId::from_subject("presence", &uuid::Uuid::new_v4().to_string());
    let now = now_ms();
    futures::future::join_all((0..RACERS).map(|i| {
        let node = if i % 2 == 0 {
            &nodes.first
        } else {
            &nodes.second
        };
        let name = format!("node-{i}");
        async move {
            node.update(user, Box::new(move |record| record.heartbeat(&name, now)))
                .await
                .expect("applied however many race for the record");
        }
    }))
    .await;
    let record = nodes.first.get(user).await.expect("reads");
    assert_eq!(record.nodes.len(), RACERS, "{record:?}");
    if let Some(nats) = nodes.cleanup {
        let _ = nats.delete_bucket().await;
    }
}

#[tokio::test]
async fn embedded_racing_updates_of_one_user_all_apply() {
    racing_updates_of_one_user_all_apply(embedded()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_racing_updates_of_one_user_all_apply() {
    if let Some(nodes) = nats().await {
        racing_updates_of_one_user_all_apply(nodes).await;
    }
}
