//! The store conformance suite against both implementations: the embedded store, and the CQL store
//! on a keyspace of the Cassandra that `infra/up.sh` started (send parity through a JetStream bucket
//! on its NATS, and through the lightweight transaction). One test per case and implementation.

use std::sync::Arc;
use std::time::Duration;

use confab_api::store::Store;
use confab_api::store::cql::{self, CqlOptions, CqlStore, SendParity};
use confab_api::store::embedded::EmbeddedStore;

/// Whether a missing service fails the test (CI) or skips it loudly (a developer without infra/).
fn services_required() -> bool {
    std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

fn nats_url() -> String {
    std::env::var("CONFAB_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn cql_options(keyspace: &str, parity: SendParity, nonce_ttl: Duration) -> CqlOptions {
    CqlOptions {
        contact_points: vec![
            std::env::var("CONFAB_TEST_CQL_CONTACT_POINTS")
                .unwrap_or_else(|_| "127.0.0.1:9042".into()),
        ],
        keyspace: keyspace.to_owned(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        request_timeout: Duration::from_secs(20),
        nonce_ttl,
        parity,
    }
}

fn fresh_keyspace() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..20])
}

/// Migrates `options`' keyspace; `false` (after a loud line) when no CQL store answers and the
/// tests may skip.
async fn migrated(options: &CqlOptions, test: &str) -> bool {
    match cql::migrate(options).await {
        Ok(_) => true,
        Err(error) if !services_required() => {
            eprintln!("SKIPPED {test}: no CQL store reachable ({error}); run infra/up.sh");
            false
        }
        Err(error) => panic!("CQL store unreachable: {error}"),
    }
}

/// One keyspace per test binary and parity mode, migrated once; cases share it (each makes its own
/// users and chats).
async fn shared_cql_store(parity: &str) -> Option<Arc<dyn Store>> {
    static KEYSPACES: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    static MIGRATED: tokio::sync::Mutex<Vec<String>> = tokio::sync::Mutex::const_new(Vec::new());
    let (jetstream, lwt) = KEYSPACES.get_or_init(|| (fresh_keyspace(), fresh_keyspace()));
    let (keyspace, parity) = match parity {
        "jetstream" => (
            jetstream.clone(),
            SendParity::JetStream {
                nats_url: nats_url(),
                bucket: format!("{jetstream}_nonces"),
            },
        ),
        _ => (lwt.clone(), SendParity::Lwt),
    };
    let options = cql_options(&keyspace, parity, Duration::from_secs(600));
    {
        let mut migrated_keyspaces = MIGRATED.lock().await;
        if !migrated_keyspaces.contains(&keyspace) {
            if !migrated(&options, "cql store conformance").await {
                return None;
            }
            migrated_keyspaces.push(keyspace);
        }
    }
    Some(Arc::new(
        CqlStore::connect(&options).await.expect("connects"),
    ))
}

mod embedded {
    use super::*;

    async fn open() -> Option<Arc<dyn Store>> {
        // Leaked on purpose: the file outlives the test's store.
        let dir = Box::leak(Box::new(tempfile::tempdir().expect("tempdir")));
        Some(Arc::new(
            EmbeddedStore::open(&dir.path().join("store.sqlite3")).expect("opens"),
        ))
    }

    confab_api::store_conformance_tests!(open());
}

mod cql_with_jetstream_parity {
    use super::*;
    confab_api::store_conformance_tests!(shared_cql_store("jetstream"));
}

mod cql_with_lwt_parity {
    use super::*;
    confab_api::store_conformance_tests!(shared_cql_store("lwt"));
}

#[tokio::test]
async fn embedded_store_reopens_with_its_data() {
    use confab_schema::{User, UserId};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("store.sqlite3");
    let user = User {
        id: UserId::from_subject("t", "persist"),
        username: "persist".into(),
        display_name: "Persist".into(),
        email: None,
    };
    EmbeddedStore::open(&path)
        .expect("opens")
        .upsert_user(&user)
        .await
        .expect("stored");
    let reopened = EmbeddedStore::open(&path).expect("reopens");
    assert_eq!(reopened.get_user(user.id).await.expect("reads"), Some(user));
}

#[tokio::test]
async fn cql_migrations_apply_once() {
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    match cql::migrate(&options).await {
        Ok(applied) => assert_eq!(applied.len(), cql::CQL_MIGRATIONS.len()),
        Err(error) if !services_required() => {
            eprintln!("SKIPPED cql_migrations_apply_once: no CQL store reachable ({error})");
            return;
        }
        Err(error) => panic!("CQL store unreachable: {error}"),
    }
    // Migrating again applies nothing and breaks nothing.
    assert_eq!(
        cql::migrate(&options).await.expect("re-migrates"),
        Vec::<i32>::new()
    );
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// Sends with one nonce until the store stores a new signal instead of answering with the first:
/// the nonce has expired. Fails if that takes far longer than `ttl`.
async fn nonce_expires(store: &dyn Store, ttl: Duration) {
    use confab_api::store::{Inserted, NewChat};
    use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, UserId};
    let author = UserId::from_subject("t", &uuid::Uuid::new_v4().to_string());
    let chat = ChatId::new();
    store
        .create_chat(&NewChat {
            id: chat,
            kind: ChatKind::Group,
            name: Some("ttl".into()),
            description: None,
            created_at: time::OffsetDateTime::now_utc(),
            created_by: author,
            members: vec![(author, MemberRole::Owner)],
        })
        .await
        .unwrap();
    let send = || {
        let id = SignalId::new();
        Signal {
            id,
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: author,
            created_at: id.created_at().unwrap(),
            nonce: Some("expiring".into()),
            text: Some("hi".into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        }
    };
    let first = send();
    assert!(matches!(
        store.insert_signal(&first).await.unwrap(),
        Inserted::Created(_)
    ));
    assert!(matches!(
        store.insert_signal(&send()).await.unwrap(),
        Inserted::Existing(s) if s.id == first.id
    ));
    let deadline = tokio::time::Instant::now() + ttl * 20 + Duration::from_secs(5);
    loop {
        match store.insert_signal(&send()).await.unwrap() {
            Inserted::Created(second) => {
                assert_ne!(second.id, first.id);
                return;
            }
            Inserted::Existing(existing) => assert_eq!(existing.id, first.id),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the nonce never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn embedded_nonces_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = Duration::from_secs(1);
    let store =
        EmbeddedStore::open_with_nonce_ttl(&dir.path().join("store.sqlite3"), ttl).expect("opens");
    nonce_expires(&store, ttl).await;
}

#[tokio::test]
async fn cql_nonces_expire_with_either_parity() {
    let ttl = Duration::from_secs(1);
    let keyspace = fresh_keyspace();
    for parity in [
        SendParity::JetStream {
            nats_url: nats_url(),
            bucket: format!("{keyspace}_nonces"),
        },
        SendParity::Lwt,
    ] {
        let options = cql_options(&keyspace, parity, ttl);
        if !migrated(&options, "cql_nonces_expire_with_either_parity").await {
            return;
        }
        let store = CqlStore::connect(&options).await.expect("connects");
        nonce_expires(&store, ttl).await;
        cql::drop_keyspace(&options).await.expect("drops keyspace");
    }
}

/// A failure between writing a reaction and writing its count (here: the reaction row written
/// directly, as if the process died right after it) is repaired when the client retries.
#[tokio::test]
async fn cql_reaction_count_is_repaired_by_a_retry() {
    use confab_api::store::NewChat;
    use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(&options, "cql_reaction_count_is_repaired_by_a_retry").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, bob) = (
        UserId::from_subject("t", "alice"),
        UserId::from_subject("t", "bob"),
    );
    let chat = ChatId::new();
    store
        .create_chat(&NewChat {
            id: chat,
            kind: ChatKind::Group,
            name: Some("reactions".into()),
            description: None,
            created_at: time::OffsetDateTime::now_utc(),
            created_by: alice,
            members: vec![(alice, MemberRole::Owner), (bob, MemberRole::Member)],
        })
        .await
        .unwrap();
    let id = SignalId::new();
    store
        .insert_signal(&Signal {
            id,
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: alice,
            created_at: id.created_at().unwrap(),
            nonce: None,
            text: Some("react".into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        })
        .await
        .unwrap();
    store.add_reaction(chat, id, "👍", alice).await.unwrap();
    // Bob's reaction row lands; the count write after it never happens.
    store
        .session()
        .query_unpaged(
            store.qualify(
                "INSERT INTO reactions (chat_id, signal_id, emoji, user_id) VALUES (?, ?, ?, ?)",
            ),
            (chat.0, id.0, "👍", bob.0),
        )
        .await
        .unwrap();
    assert_eq!(
        store.reaction_counts(chat, id).await.unwrap().get("👍"),
        Some(&1),
        "the count is behind after the failure"
    );
    // The client did not get an answer and retries.
    let added = store.add_reaction(chat, id, "👍", bob).await.unwrap();
    assert!(!added, "the reaction was already there");
    assert_eq!(
        store.reaction_counts(chat, id).await.unwrap().get("👍"),
        Some(&2),
        "the retry repaired the count"
    );
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A deletion leaves no text in the send-parity record: neither in the JetStream bucket nor in the
/// lightweight transaction's table.
#[tokio::test]
async fn cql_deletion_scrubs_the_nonce_record() {
    use confab_api::store::NewChat;
    use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, UserId};
    let keyspace = fresh_keyspace();
    let bucket = format!("{keyspace}_nonces");
    for parity in [
        SendParity::JetStream {
            nats_url: nats_url(),
            bucket: bucket.clone(),
        },
        SendParity::Lwt,
    ] {
        let options = cql_options(&keyspace, parity.clone(), Duration::from_secs(600));
        if !migrated(&options, "cql_deletion_scrubs_the_nonce_record").await {
            return;
        }
        let store = CqlStore::connect(&options).await.expect("connects");
        let alice = UserId::from_subject("t", &uuid::Uuid::new_v4().to_string());
        let chat = ChatId::new();
        store
            .create_chat(&NewChat {
                id: chat,
                kind: ChatKind::Group,
                name: Some("scrub".into()),
                description: None,
                created_at: time::OffsetDateTime::now_utc(),
                created_by: alice,
                members: vec![(alice, MemberRole::Owner)],
            })
            .await
            .unwrap();
        let id = SignalId::new();
        let secret = format!("secret {id}");
        store
            .insert_signal(&Signal {
                id,
                chat_id: chat,
                kind: SignalKind::Message,
                author_id: alice,
                created_at: id.created_at().unwrap(),
                nonce: Some("scrub-me".into()),
                text: Some(secret.clone()),
                reply_to: None,
                attachments: vec![],
                edited_at: None,
                deleted: false,
                reactions: Default::default(),
                call: None,
            })
            .await
            .unwrap();
        let record = || async {
            match &parity {
                SendParity::JetStream { nats_url, bucket } => {
                    let client = async_nats::connect(nats_url.as_str()).await.unwrap();
                    let kv = async_nats::jetstream::new(client)
                        .get_key_value(bucket)
                        .await
                        .unwrap();
                    let mut keys = kv.keys().await.unwrap();
                    let mut values = Vec::new();
                    while let Some(key) = futures::StreamExt::next(&mut keys).await {
                        if let Some(value) = kv.get(key.unwrap()).await.unwrap() {
                            values.push(String::from_utf8_lossy(&value).into_owned());
                        }
                    }
                    values.join("\n")
                }
                SendParity::Lwt => {
                    let rows = store
                        .session()
                        .query_unpaged(store.qualify("SELECT text FROM signal_nonces"), ())
                        .await
                        .unwrap()
                        .into_rows_result()
                        .unwrap();
                    rows.rows::<(Option<String>,)>()
                        .unwrap()
                        .filter_map(|row| row.unwrap().0)
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            }
        };
        assert!(
            record().await.contains(&secret),
            "the record holds the send"
        );
        store.delete_signal(chat, id).await.unwrap();
        assert!(
            !record().await.contains(&secret),
            "deleted text stayed in the nonce record ({parity:?})"
        );
    }
    cql::drop_keyspace(&cql_options(
        &keyspace,
        SendParity::JetStream {
            nats_url: nats_url(),
            bucket,
        },
        Duration::from_secs(600),
    ))
    .await
    .expect("drops keyspace and bucket");
}
