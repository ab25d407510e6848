//! The store conformance suite against both implementations: the embedded store, and the CQL store
//! on a keyspace of the Cassandra that `infra/up.sh` started (send parity through a JetStream bucket
//! on its NATS, and through the lightweight transaction). One test per case and implementation.

use std::sync::Arc;
use std::time::Duration;

use confab_api::store::conformance::{chat_with, message};
use confab_api::store::cql::{self, CqlOptions, CqlStore, SendParity};
use confab_api::store::embedded::EmbeddedStore;
use confab_api::store::{InfoChange, Store};

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
    confab_api::store::cql::scratch_keyspace()
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

/// A session of its own on the test's keyspace, for statements the store never makes (rows as an
/// older build wrote them, a table taken away).
async fn keyspace_session(options: &CqlOptions) -> scylla::client::session::Session {
    scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(&options.contact_points)
        .use_keyspace(&options.keyspace, false)
        .build()
        .await
        .expect("connects")
}

/// A session on `options`' keyspace, created with the schema as migrations before `version` left
/// it (their statements, and the columns migration 11 adds); `None` (after a loud line) when no
/// CQL store answers and the tests may skip.
async fn keyspace_as_before(
    options: &CqlOptions,
    version: i32,
    test: &str,
) -> Option<scylla::client::session::Session> {
    use scylla::client::session_builder::SessionBuilder;
    let session = match SessionBuilder::new()
        .known_nodes(&options.contact_points)
        .build()
        .await
    {
        Ok(session) => session,
        Err(error) if !services_required() => {
            eprintln!("SKIPPED {test}: no CQL store reachable ({error})");
            return None;
        }
        Err(error) => panic!("CQL store unreachable: {error}"),
    };
    let run = |cql: String| {
        let session = &session;
        async move { session.query_unpaged(cql, ()).await.expect("CQL runs") }
    };
    run(format!(
        "CREATE KEYSPACE {} WITH replication = {}",
        options.keyspace, options.replication
    ))
    .await;
    session
        .use_keyspace(&options.keyspace, false)
        .await
        .expect("uses");
    run(
        "CREATE TABLE schema_migrations (version int PRIMARY KEY, name text, applied_at timestamp)"
            .into(),
    )
    .await;
    for migration in cql::CQL_MIGRATIONS.iter().filter(|m| m.version < version) {
        for statement in migration.statements() {
            run(statement).await;
        }
        if migration.version == 11 {
            run("ALTER TABLE chats ADD activity uuid".into()).await;
            run("ALTER TABLE chats ADD latest blob".into()).await;
        }
        run(format!(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ({}, '{}', toTimestamp(now()))",
            migration.version, migration.name
        ))
        .await;
    }
    session.await_schema_agreement().await.expect("agrees");
    Some(session)
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
/// the nonce has expired. Fails if that takes far longer than `ttl`. Returns the first signal and
/// the new one.
async fn nonce_expires(
    store: &dyn Store,
    ttl: Duration,
) -> (confab_schema::Signal, confab_schema::Signal) {
    use confab_api::store::Inserted;
    use confab_schema::UserId;
    let author = UserId::from_subject("t", &uuid::Uuid::new_v4().to_string());
    let chat = chat_with(store, author, &[]).await;
    let send = || message(chat, author, Some("expiring"), "hi");
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
                return (first, second);
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

/// Deleting a message leaves the record of its nonce alone once the nonce has expired and been
/// sent again: a retry of the later message still answers that message. Checked within `ttl` of
/// the later message (else its nonce may have expired too).
async fn a_deletion_spares_its_nonce_sent_again(
    store: &dyn Store,
    ttl: Duration,
) -> confab_schema::Signal {
    use confab_api::store::Inserted;
    let (first, second) = nonce_expires(store, ttl).await;
    let started = tokio::time::Instant::now();
    let (chat, author) = (second.chat_id, second.author_id);
    let nonce = second.nonce.clone().expect("sent with a nonce");
    store.delete_signal(chat, first.id).await.unwrap();
    let holder = store.nonce_holder(chat, author, &nonce).await.unwrap();
    let retry = message(chat, author, Some(&nonce), "hi");
    let answered = store.insert_signal(&retry).await.unwrap();
    assert!(
        started.elapsed() < ttl,
        "too slow to tell: the later nonce may have expired too ({:?})",
        started.elapsed()
    );
    assert_eq!(
        holder,
        Some(second.id),
        "the deletion of the first message took the nonce's record from the second"
    );
    let Inserted::Existing(answered) = answered else {
        panic!("the retry stored a third message: {answered:?}");
    };
    assert_eq!(answered.id, second.id, "the retry answered {answered:?}");
    assert!(!answered.deleted, "the retry answered {answered:?}");
    assert_eq!(answered.text, second.text);
    second
}

#[tokio::test]
async fn embedded_a_deletion_spares_its_nonce_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ttl = Duration::from_secs(2);
    let store =
        EmbeddedStore::open_with_nonce_ttl(&dir.path().join("store.sqlite3"), ttl).expect("opens");
    a_deletion_spares_its_nonce_sent_again(&store, ttl).await;
}

/// As above, on CQL with either parity; with the lightweight transaction's, the record also keeps
/// the later message's text (a retry of it writes it from there if its own write never happened).
#[tokio::test]
async fn cql_a_deletion_spares_its_nonce_sent_again() {
    let ttl = Duration::from_secs(2);
    let keyspace = fresh_keyspace();
    let bucket = format!("{keyspace}_nonces");
    for parity in [
        SendParity::JetStream {
            nats_url: nats_url(),
            bucket: bucket.clone(),
        },
        SendParity::Lwt,
    ] {
        let options = cql_options(&keyspace, parity.clone(), ttl);
        if !migrated(&options, "cql_a_deletion_spares_its_nonce_sent_again").await {
            return;
        }
        let store = CqlStore::connect(&options).await.expect("connects");
        let second = a_deletion_spares_its_nonce_sent_again(&store, ttl).await;
        if parity == SendParity::Lwt {
            let result = store
                .session()
                .query_unpaged(
                    store.qualify(
                        "SELECT text FROM signal_nonces WHERE chat_id = ? AND author_id = ? AND nonce = ?",
                    ),
                    (second.chat_id.0, second.author_id.0, second.nonce.as_deref()),
                )
                .await
                .unwrap()
                .into_rows_result()
                .unwrap();
            let texts: Vec<Option<String>> = result
                .rows::<(Option<String>,)>()
                .unwrap()
                .map(|row| row.unwrap().0)
                .collect();
            assert_eq!(
                texts,
                vec![second.text.clone()],
                "the deletion of the first message cleared the second's record"
            );
        }
    }
    cql::drop_keyspace(&cql_options(
        &keyspace,
        SendParity::JetStream {
            nats_url: nats_url(),
            bucket,
        },
        ttl,
    ))
    .await
    .expect("drops keyspace");
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

/// With the lightweight transaction's parity, a send whose nonce was claimed but whose row was
/// never written (here the row's day could not be written; a process stopped in between does the
/// same) is written by its retry as it was sent: a call signal keeps its call, and a message of
/// attachments only is not taken for a deleted one.
#[tokio::test]
async fn cql_lwt_a_retry_writes_the_claimed_signal_as_it_was_sent() {
    use confab_api::store::Inserted;
    use confab_schema::call::{CallSignal, CallState};
    use confab_schema::{AttachmentRef, Signal, SignalId, SignalKind, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_lwt_a_retry_writes_the_claimed_signal_as_it_was_sent",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let alice = UserId::from_subject("t", "alice");
    let chat = chat_with(&store, alice, &[]).await;
    let mut call = message(chat, alice, Some("call:started"), "");
    call.kind = SignalKind::Call;
    call.text = None;
    call.call = Some(CallSignal {
        call_id: uuid::Uuid::now_v7(),
        state: CallState::Started,
    });
    let mut photos = message(chat, alice, Some("photos"), "");
    photos.text = None;
    photos.attachments = vec![AttachmentRef::Id(uuid::Uuid::now_v7())];

    // Each claims its nonce, then fails before its row.
    let keyspace = &options.keyspace;
    let run = |cql: String| store.session().query_unpaged(cql, ());
    run(format!("DROP TABLE {keyspace}.signal_buckets"))
        .await
        .expect("drops");
    store
        .session()
        .await_schema_agreement()
        .await
        .expect("agrees");
    for sent in [&call, &photos] {
        assert!(
            store.insert_signal(sent).await.is_err(),
            "written without its day"
        );
    }
    run(format!(
        "CREATE TABLE {keyspace}.signal_buckets (chat_id uuid, bucket int, \
         PRIMARY KEY (chat_id, bucket)) WITH CLUSTERING ORDER BY (bucket DESC)"
    ))
    .await
    .expect("creates");
    store
        .session()
        .await_schema_agreement()
        .await
        .expect("agrees");

    for sent in [&call, &photos] {
        let retry = Signal {
            id: SignalId::new(),
            ..sent.clone()
        };
        let Inserted::Existing(answered) = store.insert_signal(&retry).await.expect("retried")
        else {
            panic!("the retry stored a second signal for {:?}", sent.nonce);
        };
        let stored = store
            .get_signal(chat, sent.id)
            .await
            .expect("reads")
            .expect("the claimed signal is written by the retry");
        for (what, signal) in [("answered", &answered), ("stored", &stored)] {
            assert_eq!(signal.id, sent.id, "{what}");
            assert!(!signal.deleted, "{what} as deleted: {signal:?}");
            assert_eq!(signal.call, sent.call, "{what}");
            assert_eq!(signal.text, sent.text, "{what}");
            assert_eq!(
                signal
                    .attachments
                    .iter()
                    .map(AttachmentRef::id)
                    .collect::<Vec<_>>(),
                sent.attachments
                    .iter()
                    .map(AttachmentRef::id)
                    .collect::<Vec<_>>(),
                "{what}"
            );
        }
    }
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A failure between writing a reaction and writing its count (here: the reaction row written
/// directly, as if the process died right after it) is repaired when the client retries.
#[tokio::test]
async fn cql_reaction_count_is_repaired_by_a_retry() {
    use confab_schema::UserId;
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(&options, "cql_reaction_count_is_repaired_by_a_retry").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, bob) = (
        UserId::from_subject("t", "alice"),
        UserId::from_subject("t", "bob"),
    );
    let chat = chat_with(&store, alice, &[bob]).await;
    let signal = message(chat, alice, None, "react");
    let id = signal.id;
    store.insert_signal(&signal).await.unwrap();
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

/// The deletion of an image's message arrives between the reads and the writes that store what
/// making its pictures found: the attachment stays removed, by id and from both lists, whether the
/// image keeps its kind or is re-filed as a file (which lists it among the files).
#[tokio::test]
async fn cql_pictures_stored_across_a_deletion_do_not_bring_it_back() {
    use confab_schema::attachment::ImageInfo;
    use confab_schema::{Attachment, AttachmentKind, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_pictures_stored_across_a_deletion_do_not_bring_it_back",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let alice = UserId::from_subject("t", "alice");
    let chat = chat_with(&store, alice, &[]).await;
    let image = ImageInfo {
        width: 4,
        height: 3,
        thumbnail: None,
        preview: None,
    };
    for kind in [AttachmentKind::Image, AttachmentKind::File] {
        let photo = Attachment {
            id: uuid::Uuid::now_v7(),
            chat_id: chat,
            name: "photo.png".into(),
            size: 3,
            content_type: "image/png".into(),
            sha256: format!("{:0>64}", format!("{:x}", uuid::Uuid::new_v4().as_u128())),
            kind: AttachmentKind::Image,
            created_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
            uploader: alice,
            image: None,
            message_id: None,
        };
        store.put_attachment(&photo).await.expect("puts");
        let pictures = (kind == AttachmentKind::Image).then_some(&image);
        let stored = store
            .update_derived_meanwhile(
                photo.id,
                chat,
                AttachmentKind::Image,
                kind,
                pictures,
                async {
                    store
                        .delete_attachments(std::slice::from_ref(&photo))
                        .await
                        .expect("deletes");
                },
            )
            .await
            .expect("writes");
        assert_eq!(stored, None, "{kind:?}");
        assert!(
            store
                .get_attachments(&[photo.id])
                .await
                .expect("gets")
                .is_empty(),
            "back by id ({kind:?})"
        );
        for listed in [
            None,
            Some(AttachmentKind::Image),
            Some(AttachmentKind::File),
        ] {
            let rows = store
                .chat_attachments(chat, listed, None, 100)
                .await
                .expect("lists");
            assert!(
                rows.iter().all(|a| a.id != photo.id),
                "listed again among {listed:?} ({kind:?})"
            );
        }
    }
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// An addition of a member, and a change of a member's role, each race a removal of that member
/// that arrives between the change's conditional batch and its write of the member's row of
/// `user_chats`: the removal wins, and the chat is neither among the member's chats nor in their
/// chat list, even after a message sent to the members as they were before the removal. (The
/// embedded store makes each change in one transaction, with no second row to write after it:
/// nothing can arrive in between there.)
#[tokio::test]
async fn cql_a_removal_after_an_addition_or_a_change_of_role_wins() {
    use confab_api::store::{GuardedChange, MemberWrite};
    use confab_schema::{ChatId, Member, MemberRole, SignalId, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_a_removal_after_an_addition_or_a_change_of_role_wins",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (owner, admin) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = chat_with(&store, owner, &[admin]).await;
    let promote = GuardedChange {
        write: MemberWrite::SetRole(admin, MemberRole::Admin),
        expect: vec![(owner, MemberRole::Owner), (admin, MemberRole::Member)],
    };
    assert!(store.change_member(chat, &promote).await.expect("promotes"));
    let remove = |user: UserId, role: MemberRole| GuardedChange {
        write: MemberWrite::Remove(user),
        expect: vec![(owner, MemberRole::Owner), (user, role)],
    };
    let not_listed = |user: UserId, case: &'static str| {
        let store = &store;
        async move {
            assert_eq!(store.member_role(chat, user).await.expect("reads"), None);
            // A message sent to the members as read before the removal moves the chat for them.
            store
                .touch_chat(chat, &[owner, admin, user], SignalId::new(), None)
                .await
                .expect("touches");
            let chats: Vec<ChatId> = store.chats_of(user).await.expect("lists");
            assert!(
                !chats.contains(&chat),
                "{case}: among the chats of {chats:?}"
            );
            let entries = store.chat_entries(user, &[chat]).await.expect("reads");
            assert!(entries.is_empty(), "{case}: an entry of {entries:?}");
            let list = store.chat_list(user, None, 50).await.expect("lists");
            assert!(
                list.iter().all(|(row, _)| row.chat_id != chat),
                "{case}: in the chat list {list:?}"
            );
        }
    };

    // The admin adds x; the owner removes x after the addition's batch.
    let x = UserId(uuid::Uuid::new_v4());
    let add = GuardedChange {
        write: MemberWrite::Add(Member {
            user_id: x,
            role: MemberRole::Member,
            joined_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
        }),
        expect: vec![(admin, MemberRole::Admin)],
    };
    let added = store
        .change_member_meanwhile(chat, &add, async {
            let removal = remove(x, MemberRole::Member);
            let removed = store.change_member(chat, &removal).await;
            assert!(removed.expect("removes"), "x is removed");
        })
        .await
        .expect("adds");
    assert!(added, "x is added");
    not_listed(x, "added, then removed").await;

    // The owner makes y an admin; the owner removes y after the change's batch.
    let y = UserId(uuid::Uuid::new_v4());
    let add = GuardedChange {
        write: MemberWrite::Add(Member {
            user_id: y,
            role: MemberRole::Member,
            joined_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
        }),
        expect: vec![(owner, MemberRole::Owner)],
    };
    assert!(store.change_member(chat, &add).await.expect("adds"));
    assert!(store.chats_of(y).await.expect("lists").contains(&chat));
    let promote = GuardedChange {
        write: MemberWrite::SetRole(y, MemberRole::Admin),
        expect: vec![(owner, MemberRole::Owner), (y, MemberRole::Member)],
    };
    let promoted = store
        .change_member_meanwhile(chat, &promote, async {
            let removal = remove(y, MemberRole::Admin);
            let removed = store.change_member(chat, &removal).await;
            assert!(removed.expect("removes"), "y is removed");
        })
        .await
        .expect("promotes");
    assert!(promoted, "y is made an admin");
    not_listed(y, "made an admin, then removed").await;
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A sent message's claim on its attachments, as it is copied to the chat's lists, races a
/// deletion of its message, and the write of an image's pictures that re-files it as a file: the
/// deleted attachment does not come back, and the re-filed one is listed once, among the files, as
/// sent in its message, whichever of the claim's and the pictures' writes comes first.
#[tokio::test]
async fn cql_claims_racing_deletions_and_pictures() {
    use confab_schema::{Attachment, AttachmentKind, SignalId, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(&options, "cql_claims_racing_deletions_and_pictures").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let alice = UserId::from_subject("t", "alice");
    let chat = chat_with(&store, alice, &[]).await;
    let upload = |name: &str| Attachment {
        id: uuid::Uuid::now_v7(),
        chat_id: chat,
        name: name.into(),
        size: 3,
        content_type: "image/png".into(),
        sha256: format!("{:0>64}", format!("{:x}", uuid::Uuid::new_v4().as_u128())),
        kind: AttachmentKind::Image,
        created_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
        uploader: alice,
        image: None,
        message_id: None,
    };
    let listed = |kind| {
        let store = &store;
        async move {
            store
                .chat_attachments(chat, Some(kind), None, 100)
                .await
                .expect("lists")
        }
    };

    // Deleted between the claim's read and its write.
    let gone = upload("gone.png");
    store.put_attachment(&gone).await.expect("puts");
    let gone_message = SignalId::new();
    store
        .claim_attachments(chat, &[gone.id], gone_message)
        .await
        .expect("claims");
    store
        .list_claimed_attachments_meanwhile(chat, &[gone.id], gone_message, async {
            store
                .delete_attachments(std::slice::from_ref(&gone))
                .await
                .expect("deletes");
        })
        .await
        .expect("claims");
    assert!(
        store
            .get_attachments(&[gone.id])
            .await
            .expect("gets")
            .is_empty()
    );
    for kind in [AttachmentKind::Image, AttachmentKind::File] {
        assert!(
            listed(kind).await.iter().all(|a| a.id != gone.id),
            "listed again among {kind:?}"
        );
    }

    // Re-filed between the claim's read and its write; then claimed between the pictures' read
    // and their write.
    let first = upload("first.png");
    let second = upload("second.png");
    for a in [&first, &second] {
        store.put_attachment(a).await.expect("puts");
    }
    let refile = |a: &Attachment| {
        store.update_derived(
            a.id,
            chat,
            AttachmentKind::Image,
            AttachmentKind::File,
            None,
        )
    };
    let first_message = SignalId::new();
    store
        .claim_attachments(chat, &[first.id], first_message)
        .await
        .expect("claims");
    store
        .list_claimed_attachments_meanwhile(chat, &[first.id], first_message, async {
            refile(&first).await.expect("re-files").expect("is there");
        })
        .await
        .expect("claims");
    let second_message = SignalId::new();
    store
        .update_derived_meanwhile(
            second.id,
            chat,
            AttachmentKind::Image,
            AttachmentKind::File,
            None,
            async {
                store
                    .claim_attachments(chat, &[second.id], second_message)
                    .await
                    .expect("claims");
                store
                    .list_claimed_attachments(chat, &[second.id], second_message)
                    .await
                    .expect("lists the claim");
            },
        )
        .await
        .expect("re-files")
        .expect("is there");
    let expected = [
        Attachment {
            kind: AttachmentKind::File,
            message_id: Some(second_message),
            ..second
        },
        Attachment {
            kind: AttachmentKind::File,
            message_id: Some(first_message),
            ..first
        },
    ];
    assert_eq!(listed(AttachmentKind::File).await, expected);
    assert!(listed(AttachmentKind::Image).await.is_empty());
    let mut by_id = store
        .get_attachments(&[first.id, second.id])
        .await
        .expect("gets");
    by_id.sort_by_key(|a| std::cmp::Reverse(a.id));
    assert_eq!(by_id, expected);

    // The migration that added the claims' columns runs again whole (as after a failure before
    // it was recorded) without failing on the columns it added.
    CqlStore::connect(&options)
        .await
        .expect("connects")
        .session()
        .query_unpaged(
            format!(
                "DELETE FROM {}.schema_migrations WHERE version = 16",
                options.keyspace
            ),
            &[],
        )
        .await
        .expect("forgets the migration");
    assert_eq!(cql::migrate(&options).await.expect("migrates"), vec![16]);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A deletion leaves no text in the send-parity record: neither in the JetStream bucket nor in the
/// lightweight transaction's table.
#[tokio::test]
async fn cql_deletion_scrubs_the_nonce_record() {
    use confab_schema::UserId;
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
        let chat = chat_with(&store, alice, &[]).await;
        let secret = format!("secret {}", uuid::Uuid::new_v4());
        let signal = message(chat, alice, Some("scrub-me"), &secret);
        let id = signal.id;
        store.insert_signal(&signal).await.unwrap();
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

/// Migration 11 moves the chat list's summaries into `chats` and copies read markers into the
/// user's partition: a keyspace written by the build before it lists the same chat with the same
/// newest signal and read marker after `migrate`, and writes made since win over the copies.
#[tokio::test]
async fn cql_migration_11_keeps_summaries_and_read_markers() {
    use confab_api::store::MarkerKind;
    use confab_schema::{ChatId, SignalId, UserId};

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    let Some(session) = keyspace_as_before(
        &options,
        11,
        "cql_migration_11_keeps_summaries_and_read_markers",
    )
    .await
    else {
        return;
    };
    let run = |cql: String| {
        let session = &session;
        async move { session.query_unpaged(cql, ()).await.expect("CQL runs") }
    };

    // A group of two as the build before stored it: the reader has read the first of two
    // messages (and acknowledged delivery of both, a marker of another kind).
    let (author, reader) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = ChatId::new();
    let first = SignalId::new();
    let newest = message(chat, author, None, "the second");
    let second = newest.id;
    let at = |id: SignalId| id.unix_millis().expect("time-ordered") * 1000;
    let mut copy = second.0.as_bytes().to_vec();
    copy.extend(serde_json::to_vec(&newest).expect("serializes"));
    let copy_hex: String = copy.iter().map(|b| format!("{b:02x}")).collect();
    run(format!(
        "INSERT INTO chats (id, kind, name, created_at, created_by) VALUES ({}, 'group', 'before', toTimestamp(now()), {})",
        chat.0, author.0
    ))
    .await;
    for (user, role) in [(author, "owner"), (reader, "member")] {
        run(format!(
            "INSERT INTO user_chats (user_id, chat_id, role, joined_at) VALUES ({}, {}, '{role}', toTimestamp(now()))",
            user.0, chat.0
        ))
        .await;
        run(format!(
            "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES ({}, {}, '{role}', toTimestamp(now()))",
            chat.0, user.0
        ))
        .await;
        run(format!(
            "INSERT INTO chat_activity_by_user (user_id, activity, chat_id) VALUES ({}, {}, {})",
            user.0, second.0, chat.0
        ))
        .await;
    }
    run(format!(
        "INSERT INTO chat_summaries (chat_id, activity, latest) VALUES ({}, {}, 0x{copy_hex}) USING TIMESTAMP {}",
        chat.0,
        second.0,
        at(second)
    ))
    .await;
    for (kind, up_to) in [("read", first), ("delivered", second)] {
        run(format!(
            "INSERT INTO markers (chat_id, kind, user_id, up_to) VALUES ({}, '{kind}', {}, {}) USING TIMESTAMP {}",
            chat.0,
            reader.0,
            up_to.0,
            at(up_to)
        ))
        .await;
    }

    assert_eq!(
        cql::migrate(&options).await.expect("migrates"),
        vec![11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    );
    let store = CqlStore::connect(&options).await.expect("connects");
    let listed = store.chat_list(reader, None, 10).await.expect("lists");
    assert_eq!(listed.len(), 1, "the chat is listed once: {listed:?}");
    let entry = listed[0].1.as_ref().expect("an entry");
    assert_eq!(entry.chat.name.as_deref(), Some("before"));
    let latest = entry
        .chat
        .latest_signal
        .as_deref()
        .expect("a newest signal");
    assert_eq!(
        (latest.id, latest.text.as_deref()),
        (second, Some("the second"))
    );
    assert_eq!(
        entry.read_marker,
        Some(first),
        "the read marker, not delivery's"
    );

    // Written since the copies: the newer marker wins; an older one does not move it back.
    store
        .advance_marker(MarkerKind::Read, chat, reader, second)
        .await
        .expect("marks");
    store
        .advance_marker(MarkerKind::Read, chat, reader, first)
        .await
        .expect("marks");
    let listed = store.chat_list(reader, None, 10).await.expect("lists");
    assert_eq!(
        listed[0].1.as_ref().expect("an entry").read_marker,
        Some(second)
    );
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// Migration 12 copies every chat's row and summary into its members' rows of `user_chats`, with
/// the originals' write timestamps: a change written since is kept when the migration runs
/// again. A member's row without copies (as the build before wrote it) is listed from the
/// chat's own row.
#[tokio::test]
async fn cql_migration_12_copies_chats_into_member_rows() {
    use confab_schema::{ChatId, SignalId, UserId};

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    let Some(session) = keyspace_as_before(
        &options,
        12,
        "cql_migration_12_copies_chats_into_member_rows",
    )
    .await
    else {
        return;
    };
    let run = |cql: String| {
        let session = &session;
        async move { session.query_unpaged(cql, ()).await.expect("CQL runs") }
    };
    // A group of two as the build before stored it: the summary in the chat's row, the members'
    // rows with their roles only.
    let (author, reader) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = ChatId::new();
    let first = SignalId::new();
    let newest = message(chat, author, None, "the second");
    let second = newest.id;
    let at = |id: SignalId| id.unix_millis().expect("time-ordered") * 1000;
    let mut copy = second.0.as_bytes().to_vec();
    copy.extend(serde_json::to_vec(&newest).expect("serializes"));
    let copy_hex: String = copy.iter().map(|b| format!("{b:02x}")).collect();
    run(format!(
        "INSERT INTO chats (id, kind, name, description, created_at, created_by) \
         VALUES ({}, 'group', 'before', 'about', toTimestamp(now()), {})",
        chat.0, author.0
    ))
    .await;
    run(format!(
        "UPDATE chats USING TIMESTAMP {} SET activity = {}, latest = 0x{copy_hex} WHERE id = {}",
        at(second),
        second.0,
        chat.0
    ))
    .await;
    let join_as_before = |user: UserId, role: &'static str| {
        let run = &run;
        async move {
            run(format!(
                "INSERT INTO user_chats (user_id, chat_id, role, joined_at) VALUES ({}, {}, '{role}', toTimestamp(now()))",
                user.0, chat.0
            ))
            .await;
            run(format!(
                "INSERT INTO chat_members (chat_id, user_id, role, joined_at) VALUES ({}, {}, '{role}', toTimestamp(now()))",
                chat.0, user.0
            ))
            .await;
            run(format!(
                "INSERT INTO chat_activity_by_user (user_id, activity, chat_id) VALUES ({}, {}, {})",
                user.0, second.0, chat.0
            ))
            .await;
        }
    };
    join_as_before(author, "owner").await;
    join_as_before(reader, "member").await;
    run(format!(
        "INSERT INTO user_read_markers (user_id, chat_id, up_to) VALUES ({}, {}, {}) USING TIMESTAMP {}",
        reader.0,
        chat.0,
        first.0,
        at(first)
    ))
    .await;

    assert_eq!(
        cql::migrate(&options).await.expect("migrates"),
        vec![12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    );
    type Copies = (
        Option<String>,
        Option<String>,
        Option<String>,
        Option<uuid::Uuid>,
        Option<uuid::Uuid>,
        Option<Vec<u8>>,
    );
    let copies = |user: UserId| {
        let session = &session;
        async move {
            session
                .query_unpaged(
                    "SELECT kind, name, description, created_by, activity, latest FROM user_chats \
                     WHERE user_id = ? AND chat_id = ?",
                    (user.0, chat.0),
                )
                .await
                .expect("reads")
                .into_rows_result()
                .expect("rows")
                .first_row::<Copies>()
                .expect("a row")
        }
    };
    for user in [author, reader] {
        assert_eq!(
            copies(user).await,
            (
                Some("group".into()),
                Some("before".into()),
                Some("about".into()),
                Some(author.0),
                Some(second.0),
                Some(copy.clone())
            ),
            "the copies in {user:?}'s row"
        );
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let shown = |user: UserId| {
        let store = &store;
        async move {
            let listed = store.chat_list(user, None, 10).await.expect("lists");
            assert_eq!(listed.len(), 1, "the chat is listed once: {listed:?}");
            let entry = listed[0].1.clone().expect("an entry");
            (
                entry.chat.name,
                entry.chat.description,
                entry.chat.latest_signal.and_then(|s| s.text),
                entry.read_marker,
            )
        }
    };
    assert_eq!(
        shown(reader).await,
        (
            Some("before".into()),
            Some("about".into()),
            Some("the second".into()),
            Some(first)
        )
    );

    // Renamed since; then a member joins as the build before joined them (a row without copies),
    // and is listed from the chat's row.
    store
        .update_chat(chat, InfoChange::both(Some("after"), None))
        .await
        .expect("renames");
    let late = UserId(uuid::Uuid::new_v4());
    join_as_before(late, "member").await;
    let renamed = (
        Some("after".to_owned()),
        None,
        Some("the second".to_owned()),
    );
    let without_marker = |shown: (_, _, _, Option<SignalId>)| (shown.0, shown.1, shown.2);
    assert_eq!(
        without_marker(shown(late).await),
        renamed,
        "from the chat's row"
    );

    // Run again (as after a failure before it was recorded): the rename stays, and the late
    // member's row gets its copies.
    run(format!(
        "DELETE FROM {}.schema_migrations WHERE version = 12",
        options.keyspace
    ))
    .await;
    assert_eq!(cql::migrate(&options).await.expect("migrates"), vec![12]);
    for user in [author, reader, late] {
        assert_eq!(without_marker(shown(user).await), renamed, "{user:?}");
        assert_eq!(copies(user).await.1.as_deref(), Some("after"), "{user:?}");
    }
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A new member's copy of the chat carries the name and the description each at its own write
/// time: a change of the description made at the same time as a rename, whose write time is
/// older than the rename's and whose writes land after the copy, shows in the new member's list
/// too (a copy of both at the rename's time shadowed it there, and only there).
#[tokio::test]
async fn cql_a_copy_keeps_each_columns_own_write_time() {
    use confab_schema::{Member, MemberRole, SignalId, UserId};

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(&options, "cql_a_copy_keeps_each_columns_own_write_time").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, late) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = chat_with(&store, alice, &[]).await;
    store
        .update_chat(chat, InfoChange::both(Some("before"), Some("about")))
        .await
        .expect("names");
    let session = store.session();
    let written = async |column: &str| -> i64 {
        let (at,): (i64,) = session
            .query_unpaged(
                format!(
                    "SELECT WRITETIME({column}) FROM {}.chats WHERE id = ?",
                    options.keyspace
                ),
                (chat.0,),
            )
            .await
            .expect("reads")
            .into_rows_result()
            .expect("rows")
            .first_row()
            .expect("a row");
        at
    };
    let described_at = written("description").await;
    let renamed = InfoChange {
        name: Some(Some("after")),
        description: None,
    };
    store.update_chat(chat, renamed).await.expect("renames");
    let renamed_at = written("name").await;
    assert!(renamed_at > described_at + 1);
    // The new member's copy, read after the rename and before the other change's write.
    store
        .put_member(
            chat,
            &Member {
                user_id: late,
                role: MemberRole::Member,
                joined_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
            },
        )
        .await
        .expect("adds");
    store
        .touch_chat(chat, &[alice, late], SignalId::new(), None)
        .await
        .expect("touches");
    // The change of the description, timed between the two, landing now: the chat's row and the
    // members' copies (the new member among them), as `update_chat` writes them.
    let between = described_at + 1;
    for (table, key) in [
        ("chats", "id = ?"),
        ("user_chats", "user_id = ? AND chat_id = ?"),
    ] {
        let cql = format!(
            "UPDATE {}.{table} USING TIMESTAMP ? SET description = ? WHERE {key}",
            options.keyspace
        );
        let written = if table == "chats" {
            session
                .query_unpaged(cql, (between, "new about", chat.0))
                .await
        } else {
            session
                .query_unpaged(cql, (between, "new about", late.0, chat.0))
                .await
        };
        written.expect("writes");
    }
    let entries = store.chat_entries(late, &[chat]).await.expect("entries");
    assert_eq!(
        (
            entries[0].chat.name.as_deref(),
            entries[0].chat.description.as_deref()
        ),
        (Some("after"), Some("new about")),
        "the new member's list"
    );
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A rename that clears the name and the description leaves values without write timestamps. A
/// member who joins after it still gets a copy newer than any earlier rename's, so that rename's
/// copy arriving late (a slow fan-out) does not bring the old name back.
#[tokio::test]
async fn cql_a_cleared_name_is_not_undone_by_an_older_copy() {
    use confab_schema::{Member, MemberRole, SignalId, UserId};

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_a_cleared_name_is_not_undone_by_an_older_copy",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, late) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = chat_with(&store, alice, &[]).await;
    store
        .update_chat(chat, InfoChange::both(Some("named"), Some("about")))
        .await
        .expect("renames");
    let session = store.session();
    let (named_at,): (i64,) = session
        .query_unpaged(
            format!(
                "SELECT WRITETIME(name) FROM {}.chats WHERE id = ?",
                options.keyspace
            ),
            (chat.0,),
        )
        .await
        .expect("reads")
        .into_rows_result()
        .expect("rows")
        .first_row()
        .expect("a row");
    store
        .update_chat(chat, InfoChange::both(None, None))
        .await
        .expect("clears");
    store
        .put_member(
            chat,
            &Member {
                user_id: late,
                role: MemberRole::Member,
                joined_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
            },
        )
        .await
        .expect("adds");
    store
        .touch_chat(chat, &[alice, late], SignalId::new(), None)
        .await
        .expect("touches");
    // The first rename's copy for the new member, arriving last.
    session
        .query_unpaged(
            format!(
                "UPDATE {}.user_chats USING TIMESTAMP ? SET name = ?, description = ? \
                 WHERE user_id = ? AND chat_id = ?",
                options.keyspace
            ),
            (named_at, "named", "about", late.0, chat.0),
        )
        .await
        .expect("writes");
    for user in [alice, late] {
        let entries = store.chat_entries(user, &[chat]).await.expect("entries");
        assert_eq!(
            (
                entries[0].chat.name.clone(),
                entries[0].chat.description.clone()
            ),
            (None, None),
            "{user:?}"
        );
    }
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A touch of a process from before migration 12 moved the members' activity rows before it wrote
/// the chat's summary. A chat list read in between (or after a touch that failed there) lists the
/// chat at its new activity with its newest signal, and does not remove the row as if a move had
/// left it behind; a row older than the summary is removed.
#[tokio::test]
async fn cql_an_activity_row_ahead_of_the_summary_stays_listed() {
    use confab_schema::UserId;

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_an_activity_row_ahead_of_the_summary_stays_listed",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, bob) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = chat_with(&store, alice, &[bob]).await;
    let first = message(chat, alice, None, "first");
    store.insert_signal(&first).await.expect("stores");
    store
        .touch_chat(chat, &[alice, bob], first.id, Some(&first))
        .await
        .expect("touches");
    let second = message(chat, alice, None, "second");
    store.insert_signal(&second).await.expect("stores");
    // The second touch's move of bob's row, without its summary.
    let activity_rows = format!("{}.chat_activity_by_user", options.keyspace);
    let session = store.session();
    session
        .query_unpaged(
            format!(
                "DELETE FROM {activity_rows} WHERE user_id = ? AND activity = ? AND chat_id = ?"
            ),
            (bob.0, first.id.0, chat.0),
        )
        .await
        .expect("deletes");
    let insert_row =
        format!("INSERT INTO {activity_rows} (user_id, activity, chat_id) VALUES (?, ?, ?)");
    session
        .query_unpaged(insert_row.clone(), (bob.0, second.id.0, chat.0))
        .await
        .expect("inserts");
    let listed_newest = |listed: &[(
        confab_api::store::ChatActivity,
        Option<confab_api::store::ChatEntry>,
    )]| {
        listed
            .iter()
            .map(|(row, entry)| {
                (
                    row.activity,
                    entry
                        .as_ref()
                        .and_then(|e| e.chat.latest_signal.as_ref())
                        .map(|s| s.id),
                )
            })
            .collect::<Vec<_>>()
    };
    for read in ["first read", "second read (the row was not removed)"] {
        let listed = store.chat_list(bob, None, 10).await.expect("lists");
        assert_eq!(
            listed_newest(&listed),
            vec![(second.id, Some(second.id))],
            "{read}"
        );
    }
    // A second move in flight from the same summary leaves the current row beside the one
    // ahead: the chat is still listed once, at its newest.
    session
        .query_unpaged(insert_row.clone(), (bob.0, first.id.0, chat.0))
        .await
        .expect("inserts");
    let listed = store.chat_list(bob, None, 10).await.expect("lists");
    assert_eq!(
        listed_newest(&listed),
        vec![(second.id, Some(second.id))],
        "a current row beside one ahead"
    );
    // The touch completes: the same.
    store
        .touch_chat(chat, &[alice, bob], second.id, Some(&second))
        .await
        .expect("touches");
    let listed = store.chat_list(bob, None, 10).await.expect("lists");
    assert_eq!(listed_newest(&listed), vec![(second.id, Some(second.id))]);
    // A row behind the summary (a move that raced another) is skipped and removed.
    session
        .query_unpaged(insert_row, (bob.0, first.id.0, chat.0))
        .await
        .expect("inserts");
    let listed = store.chat_list(bob, None, 10).await.expect("lists");
    assert_eq!(listed_newest(&listed), vec![(second.id, Some(second.id))]);
    let left: Vec<(uuid::Uuid,)> = session
        .query_unpaged(
            format!("SELECT activity FROM {activity_rows} WHERE user_id = ?"),
            (bob.0,),
        )
        .await
        .expect("reads")
        .into_rows_result()
        .expect("rows")
        .rows::<(uuid::Uuid,)>()
        .expect("typed")
        .collect::<Result<_, _>>()
        .expect("rows");
    assert_eq!(left, vec![(second.id.0,)]);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// Removing a chat removes its members' activity rows and their copies of their read markers on
/// the CQL store itself, not only from what a chat list shows (which skips such rows anyway).
#[tokio::test]
async fn cql_removing_a_chat_leaves_no_rows_in_its_members_partitions() {
    use confab_api::store::MarkerKind;
    use confab_schema::UserId;

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_removing_a_chat_leaves_no_rows_in_its_members_partitions",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, bob) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = chat_with(&store, alice, &[bob]).await;
    let signal = message(chat, alice, None, "soon gone");
    let id = signal.id;
    store.insert_signal(&signal).await.expect("stores");
    store
        .touch_chat(chat, &[alice, bob], id, Some(&signal))
        .await
        .expect("touches");
    store
        .advance_marker(MarkerKind::Read, chat, bob, id)
        .await
        .expect("marks");
    store.delete_chat(chat).await.expect("removes");
    let session = store.session();
    let ks = &options.keyspace;
    for user in [alice, bob] {
        for table in ["chat_activity_by_user", "user_read_markers"] {
            let found = session
                .query_unpaged(
                    format!("SELECT chat_id FROM {ks}.{table} WHERE user_id = ?"),
                    (user.0,),
                )
                .await
                .expect("reads")
                .into_rows_result()
                .expect("rows")
                .rows_num();
            assert_eq!(found, 0, "{table} of {user:?}");
        }
    }
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// The tombstone cells a read of `cql` (one bound value, `key`) passed over, from the query's
/// trace: Cassandra traces each read as "Read N live rows and M tombstone cells".
async fn tombstones_read(store: &CqlStore, cql: &str, key: uuid::Uuid) -> u64 {
    let session = store.session();
    let mut statement = scylla::statement::Statement::new(store.qualify(cql));
    statement.set_tracing(true);
    let traced = session
        .query_unpaged(statement, (key,))
        .await
        .expect("reads")
        .tracing_id()
        .expect("a trace");
    // Trace events are written in the background: wait for the read's, with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(info) = session.get_tracing_info(&traced).await {
            let counts = info.events.iter().find_map(|event| {
                let activity = event.activity.as_deref()?;
                let rest = activity.strip_prefix("Read ")?;
                let (_live, rest) = rest.split_once(" live rows and ")?;
                let (tombstones, _) = rest.split_once(" tombstone cells")?;
                tombstones.parse::<u64>().ok()
            });
            if let Some(tombstones) = counts {
                return tombstones;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no read event in the trace of {cql}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A new chat without a name or a description writes no null cells: each would be a tombstone in
/// every member's partition of `user_chats`, which each read of their whole chat list passes over
/// until compaction purges it (after `gc_grace_seconds`), and past 100,000 of which Cassandra
/// refuses the read.
#[tokio::test]
async fn cql_a_new_chat_leaves_no_tombstones() {
    use confab_api::store::NewChat;
    use confab_schema::{ChatId, ChatKind, MemberRole, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(&options, "cql_a_new_chat_leaves_no_tombstones").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (alice, bob) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    let chat = ChatId::new();
    store
        .create_chat(&NewChat {
            id: chat,
            kind: ChatKind::Direct,
            name: None,
            description: None,
            created_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
            created_by: alice,
            members: vec![(alice, MemberRole::Owner), (bob, MemberRole::Member)],
        })
        .await
        .expect("creates");
    // As a new chat is put in its members' lists, before any message.
    store
        .touch_chat(chat, &[alice, bob], confab_schema::SignalId::new(), None)
        .await
        .expect("touches");
    store
        .insert_signal(&message(chat, alice, None, "hello"))
        .await
        .expect("sends");
    for user in [alice, bob] {
        assert_eq!(
            tombstones_read(&store, "SELECT * FROM user_chats WHERE user_id = ?", user.0).await,
            0,
            "tombstones in a member's row of user_chats"
        );
    }
    assert_eq!(
        tombstones_read(&store, "SELECT * FROM chats WHERE id = ?", chat.0).await,
        0,
        "tombstones in the chat's row"
    );
    let listed = store.chats_of(alice).await.expect("lists");
    assert_eq!(listed.len(), 1);
    let chat_read = store.get_chat(chat).await.expect("reads").expect("a chat");
    assert_eq!((chat_read.name, chat_read.description), (None, None));
}

/// Keyspaces that test runs left behind (made over the given age ago) are dropped; a fresh one,
/// and any keyspace not named as a scratch one, stay.
#[tokio::test]
async fn stale_scratch_keyspaces_are_dropped() {
    let fresh = cql::scratch_keyspace();
    let options = cql_options(&fresh, SendParity::Lwt, Duration::from_secs(600));
    if !migrated(&options, "stale_scratch_keyspaces_are_dropped").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let session = store.session();
    let stale = format!(
        "t_00000001_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    );
    let other = format!("kept_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    for keyspace in [&stale, &other] {
        session
            .query_unpaged(
                format!(
                    "CREATE KEYSPACE {keyspace} WITH replication = {}",
                    options.replication
                ),
                (),
            )
            .await
            .expect("creates");
    }
    let dropped = cql::drop_stale_scratch_keyspaces(&options, Duration::from_secs(3600))
        .await
        .expect("drops");
    assert!(dropped >= 1, "dropped {dropped}");
    let names: Vec<String> = session
        .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
        .await
        .expect("reads")
        .into_rows_result()
        .expect("rows")
        .rows::<(String,)>()
        .expect("typed")
        .map(|row| row.expect("a name").0)
        .collect();
    assert!(!names.contains(&stale), "{stale} was kept");
    assert!(names.contains(&fresh), "{fresh} was dropped");
    assert!(names.contains(&other), "{other} was dropped");
    session
        .query_unpaged(format!("DROP KEYSPACE {other}"), ())
        .await
        .expect("drops");
    cql::drop_keyspace(&options).await.expect("drops");
}

/// A circle's seat count cannot drift from its members: the count kept in a table of its own
/// (as circles kept it before) is one ahead of the members here, as a join that failed between
/// taking its seat and writing its member row left it. The circle, with a seat free by its
/// members, still takes a member, and is full at its members' count. (Joins and removals now
/// write the count and the member row in one conditional batch.)
#[tokio::test]
async fn cql_a_circle_with_a_seat_free_takes_a_member_whatever_a_failed_join_left() {
    use confab_api::store::MemberPut;
    use confab_schema::circle::{Circle, CircleMember};
    use confab_schema::{CircleId, UserId};
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_a_circle_with_a_seat_free_takes_a_member_whatever_a_failed_join_left",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let now = time::OffsetDateTime::now_utc();
    let member = |name: &str| CircleMember {
        user_id: UserId::from_subject("t", name),
        display_name: name.to_owned(),
        joined_at: now,
    };
    let circle = Circle {
        id: CircleId::new(),
        name: "three".into(),
        description: None,
        rules: None,
        owner_id: UserId::from_subject("t", "owner"),
        access_code: Some("seats-code".into()),
        max_members: 3,
        created_at: confab_schema::model::to_millis(now),
        expires_at: confab_schema::model::to_millis(now + time::Duration::hours(1)),
    };
    store.create_circle(&circle).await.unwrap();
    for name in ["owner", "x"] {
        let put = store.put_circle_member(circle.id, &member(name), 3).await;
        assert_eq!(put.unwrap(), MemberPut::Added, "{name}");
    }
    // A third join took a seat in the old count and failed before its member row was written.
    store
        .session()
        .query_unpaged(
            store
                .qualify("INSERT INTO circle_seats (circle_id, taken) VALUES (?, 3) IF NOT EXISTS"),
            (circle.id.0,),
        )
        .await
        .unwrap();
    store
        .session()
        .query_unpaged(
            store.qualify("UPDATE circle_seats SET taken = 3 WHERE circle_id = ? IF taken = 2"),
            (circle.id.0,),
        )
        .await
        .unwrap();
    let put = store.put_circle_member(circle.id, &member("y"), 3).await;
    assert_eq!(
        put.unwrap(),
        MemberPut::Added,
        "two members of three, and y was refused"
    );
    let put = store.put_circle_member(circle.id, &member("z"), 3).await;
    assert_eq!(put.unwrap(), MemberPut::Full, "three members of three");
    // Removed twice (a retry): one seat comes free, and z takes it.
    let x = UserId::from_subject("t", "x");
    store.remove_circle_member(circle.id, x).await.unwrap();
    store.remove_circle_member(circle.id, x).await.unwrap();
    let put = store.put_circle_member(circle.id, &member("z"), 3).await;
    assert_eq!(put.unwrap(), MemberPut::Added, "x's seat is free");
    let put = store.put_circle_member(circle.id, &member("w"), 3).await;
    assert_eq!(put.unwrap(), MemberPut::Full, "one seat came free");
    assert_eq!(store.circle_members(circle.id).await.unwrap().len(), 3);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// Migration 23 moves addresses out of the prefix-scanned `user_search`: a user's address (and a
/// user name that is one) is found whole from `user_addresses`, and no row of an address is left
/// under any prefix, not even one of an address the user had before.
#[tokio::test]
async fn cql_migration_23_moves_addresses_out_of_user_search() {
    use confab_schema::UserId;

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    // Migrated whole, then given rows as the build before wrote them, and migration 23 forgotten:
    // its run then is the one an upgrade makes (it is safe to run again).
    if !migrated(
        &options,
        "cql_migration_23_moves_addresses_out_of_user_search",
    )
    .await
    {
        return;
    }
    let session = keyspace_session(&options).await;
    let run = |cql: String| {
        let session = &session;
        async move { session.query_unpaged(cql, ()).await.expect("CQL runs") }
    };
    // Users and their terms as the build before wrote them: the address among the terms, and a
    // row of the address the boss had before.
    let (boss, dora) = (UserId(uuid::Uuid::new_v4()), UserId(uuid::Uuid::new_v4()));
    for (id, username, display_name, email) in [
        (boss, "boss", "The Boss", "CEO@Corp.example"),
        (
            dora,
            "dora@corp.example",
            "dora@corp.example",
            "dora@corp.example",
        ),
    ] {
        run(format!(
            "INSERT INTO users (id, username, display_name, email, updated_at) \
             VALUES ({}, '{username}', '{display_name}', '{email}', toTimestamp(now()))",
            id.0
        ))
        .await;
        for term in [username, display_name, email] {
            let term = term.to_lowercase();
            let shard = &term[..1];
            run(format!(
                "INSERT INTO user_search (shard, term, user_id) VALUES ('{shard}', '{term}', {})",
                id.0
            ))
            .await;
        }
    }
    run(format!(
        "INSERT INTO user_search (shard, term, user_id) VALUES ('c', 'chief@corp.example', {})",
        boss.0
    ))
    .await;
    run("DELETE FROM schema_migrations WHERE version = 23".into()).await;

    assert_eq!(cql::migrate(&options).await.expect("migrates"), vec![23]);
    let store = CqlStore::connect(&options).await.expect("connects");
    for prefix in ["ceo", "chief", "c", "dora", "d"] {
        let rows = store.user_terms(prefix, None, 50).await.expect("reads");
        assert!(rows.is_empty(), "{prefix} reaches {rows:?}");
    }
    assert_eq!(
        store.user_terms("b", None, 50).await.expect("reads"),
        vec![("boss".to_owned(), boss)]
    );
    assert_eq!(
        store
            .users_by_address("ceo@corp.example", 10)
            .await
            .expect("reads"),
        vec![boss]
    );
    assert_eq!(
        store
            .users_by_address("dora@corp.example", 10)
            .await
            .expect("reads"),
        vec![dora]
    );
    // Applied once: a second run has nothing to do.
    assert!(cql::migrate(&options).await.expect("migrates").is_empty());
    drop(store);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A user written by a process of the build before migration 23 (during a rolling upgrade, after
/// the migration's scan) has no row in `user_addresses`; their next sign-in, which writes the same
/// profile again, gives them one, so they are found by their address.
#[tokio::test]
async fn cql_a_user_written_without_an_address_row_gets_one_at_the_next_write() {
    use confab_schema::{User, UserId};

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_a_user_written_without_an_address_row_gets_one_at_the_next_write",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let erin = User {
        id: UserId(uuid::Uuid::new_v4()),
        username: "erin".into(),
        display_name: "Erin".into(),
        email: Some("erin@corp.example".into()),
    };
    store.upsert_user(&erin).await.expect("writes");
    // As the build before writes a user: its row, and no row of its address.
    let session = keyspace_session(&options).await;
    session
        .query_unpaged(
            format!(
                "DELETE FROM user_addresses WHERE address = 'erin@corp.example' AND user_id = {}",
                erin.id.0
            ),
            (),
        )
        .await
        .expect("CQL runs");
    assert!(
        store
            .users_by_address("erin@corp.example", 10)
            .await
            .expect("reads")
            .is_empty(),
        "the address row is gone, as an old process leaves it"
    );

    store.upsert_user(&erin).await.expect("writes again");
    assert_eq!(
        store
            .users_by_address("erin@corp.example", 10)
            .await
            .expect("reads"),
        vec![erin.id],
        "found by the address after the next write of the same profile"
    );
    drop(store);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A display name that looks like an address was written as an address row by the build
/// before; no longer one, the row goes at the user's next write, or it would stay for good (and
/// take a place among the rows a search by that address reads).
#[tokio::test]
async fn cql_an_address_row_of_a_display_name_goes_at_the_next_write() {
    use confab_schema::{User, UserId};

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_an_address_row_of_a_display_name_goes_at_the_next_write",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let frank = User {
        id: UserId(uuid::Uuid::new_v4()),
        username: "frank".into(),
        display_name: "ceo@corp.example".into(),
        email: None,
    };
    store.upsert_user(&frank).await.expect("writes");
    // As the build before wrote it: a row of the display name.
    let session = keyspace_session(&options).await;
    session
        .query_unpaged(
            format!(
                "INSERT INTO user_addresses (address, user_id) VALUES ('ceo@corp.example', {})",
                frank.id.0
            ),
            (),
        )
        .await
        .expect("CQL runs");
    store.upsert_user(&frank).await.expect("writes again");
    let rows = session
        .query_unpaged(
            "SELECT user_id FROM user_addresses WHERE address = 'ceo@corp.example'",
            (),
        )
        .await
        .expect("CQL runs")
        .into_rows_result()
        .expect("rows")
        .rows_num();
    assert_eq!(rows, 0, "the display name's address row stays");
    drop(store);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A send whose nonce could not be claimed wrote nothing of its signal, and nothing of it will be
/// written later: the store says so ([`StoreError::NotWritten`]), so the send gives its
/// attachments back at once, and the client's retry is not refused while they wait to be taken
/// over as a stopped send's.
#[tokio::test]
async fn cql_a_send_that_failed_before_its_nonce_was_won_wrote_nothing() {
    use confab_api::store::StoreError;
    use confab_schema::UserId;

    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_a_send_that_failed_before_its_nonce_was_won_wrote_nothing",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let alice = UserId(uuid::Uuid::new_v4());
    let chat = chat_with(&store, alice, &[]).await;
    // The nonces' table gone: every claim of a nonce fails, before any write of the signal.
    let session = keyspace_session(&options).await;
    session
        .query_unpaged("DROP TABLE signal_nonces", ())
        .await
        .expect("CQL runs");

    let signal = message(chat, alice, Some("n-1"), "hello");
    let inserted = store.insert_signal(&signal).await;
    assert!(
        matches!(inserted, Err(StoreError::NotWritten(_))),
        "a failed claim of the nonce answered {inserted:?}"
    );
    assert_eq!(
        store.get_signal(chat, signal.id).await.expect("reads"),
        None,
        "nothing of the signal was written"
    );
    drop(store);
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// A reaction's tally written from a clock ahead of the others' does not outlast the counts
/// written after it. A stale count written with a timestamp a minute ahead (a recount that read
/// long ago, on a process whose clock runs ahead) gives way to the next change's count; and a
/// recount that read before a change and writes after that change's own recount, from a clock a
/// minute ahead, sees that its count is stale and writes the new one. (The embedded store counts
/// in the same transaction as the change.)
#[tokio::test]
async fn cql_reaction_counts_converge_whatever_the_clocks() {
    use confab_schema::UserId;
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(&options, "cql_reaction_counts_converge_whatever_the_clocks").await {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let (owner, bob, carol) = (
        UserId(uuid::Uuid::new_v4()),
        UserId(uuid::Uuid::new_v4()),
        UserId(uuid::Uuid::new_v4()),
    );
    let chat = chat_with(&store, owner, &[bob, carol]).await;
    let signal = message(chat, owner, None, "react to me");
    store.insert_signal(&signal).await.expect("inserts");
    let thumbs = "\u{1F44D}";
    let count = || async {
        store
            .reaction_counts(chat, signal.id)
            .await
            .expect("reads")
            .get(thumbs)
            .copied()
    };
    assert!(
        store
            .add_reaction(chat, signal.id, thumbs, owner)
            .await
            .expect("reacts")
    );
    assert_eq!(count().await, Some(1));

    // A count of 7 written a minute ahead of this clock.
    let session = keyspace_session(&options).await;
    let ahead =
        (time::OffsetDateTime::now_utc() + Duration::from_secs(60)).unix_timestamp_nanos() / 1_000;
    let ahead = i64::try_from(ahead).unwrap();
    let bucket = cql::signal_bucket(signal.id.unix_millis().expect("time-ordered"));
    // A tally as a recount elsewhere would write it: `count` with write timestamp `at`.
    let write_tally = |count: i32, at: i64| {
        let session = &session;
        async move {
            session
                .query_unpaged(
                    "INSERT INTO reaction_tallies (chat_id, bucket, signal_id, emoji, count) \
                     VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?",
                    (chat.0, bucket, signal.id.0, thumbs, count, at),
                )
                .await
                .expect("writes a tally");
        }
    };
    write_tally(7, ahead).await;
    assert_eq!(count().await, Some(7));
    assert!(
        store
            .add_reaction(chat, signal.id, thumbs, bob)
            .await
            .expect("reacts")
    );
    assert_eq!(
        count().await,
        Some(2),
        "the count after the change, not the one from a clock ahead"
    );

    // A tally left wrong (5) by a failure, just after bob's count (written 1 µs after the stale
    // one); then a recount from a clock a minute ahead reads 2 (and the time, later than any of
    // those), carol's reaction is added and counted (3), and the first recount writes its 2.
    write_tally(5, ahead + 2).await;
    store
        .recount_meanwhile(chat, signal.id, thumbs, Duration::from_secs(60), async {
            assert!(
                store
                    .add_reaction(chat, signal.id, thumbs, carol)
                    .await
                    .expect("reacts")
            );
        })
        .await
        .expect("recounts");
    assert_eq!(
        count().await,
        Some(3),
        "the stale recount wrote the count it found after its write"
    );
    // And a removal after all this counts from the right number.
    assert!(
        store
            .remove_reaction(chat, signal.id, thumbs, owner)
            .await
            .expect("unreacts")
    );
    assert_eq!(count().await, Some(2));
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}

/// The chat list's copies of a chat's newest message show its deletion, also when a refresh of
/// them (an edit's, a reaction's) on a process whose clock is ahead read the message before the
/// deletion: whether it wrote its copies before the deletion (its write is later in time than the
/// deletion's), or after the deletion was done.
#[tokio::test]
async fn cql_a_refresh_from_a_clock_ahead_does_not_bring_back_a_deleted_message() {
    use confab_schema::UserId;
    let options = cql_options(&fresh_keyspace(), SendParity::Lwt, Duration::from_secs(60));
    if !migrated(
        &options,
        "cql_a_refresh_from_a_clock_ahead_does_not_bring_back_a_deleted_message",
    )
    .await
    {
        return;
    }
    let store = CqlStore::connect(&options).await.expect("connects");
    let alice = UserId::from_subject("t", &uuid::Uuid::new_v4().to_string());
    let bob = UserId::from_subject("t", &uuid::Uuid::new_v4().to_string());
    let ahead = Duration::from_secs(5);
    for meanwhile in ["the deletion between the read and the write", "none"] {
        let chat = chat_with(&store, alice, &[bob]).await;
        let secret = format!("secret {}", uuid::Uuid::new_v4());
        let sent = message(chat, alice, None, &secret);
        store.insert_signal(&sent).await.unwrap();
        store
            .touch_chat(chat, &[alice, bob], sent.id, Some(&sent))
            .await
            .unwrap();
        if meanwhile == "none" {
            // The refresh is done, then the deletion, from a clock behind it.
            store
                .refresh_latest_meanwhile(chat, sent.id, ahead, async {})
                .await
                .unwrap();
            store.delete_signal(chat, sent.id).await.unwrap();
        } else {
            store
                .refresh_latest_meanwhile(chat, sent.id, ahead, async {
                    store.delete_signal(chat, sent.id).await.unwrap();
                })
                .await
                .unwrap();
        }
        let entry = store.chat_entries(bob, &[chat]).await.unwrap();
        let shown = entry[0]
            .chat
            .latest_signal
            .clone()
            .expect("a latest message");
        assert!(
            shown.deleted && shown.text.is_none(),
            "{meanwhile}: bob's chat list shows {shown:?}"
        );
    }
    cql::drop_keyspace(&options).await.expect("drops keyspace");
}
