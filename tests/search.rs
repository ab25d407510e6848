//! Message search through `GET /v1/search` on both stacks: tantivy on the embedded default,
//! Meilisearch on the real stack. Indexing runs from the event log in the background, so each check
//! waits (with a deadline) for the index to reach what it expects.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use support::held_store::HeldStore;
use support::{DEADLINE, Stack, TestApp, on_both_stacks, spawn_app};

async fn search(app: &TestApp, token: &str, query: &[(&str, &str)]) -> reqwest::Response {
    app.http
        .get(app.url("/v1/search"))
        .query(query)
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

async fn page(app: &TestApp, token: &str, query: &[(&str, &str)]) -> Value {
    let response = search(app, token, query).await;
    assert_eq!(response.status(), 200, "search {query:?}");
    response.json().await.unwrap()
}

fn ids(page: &Value) -> BTreeSet<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["signal"]["id"].as_str().unwrap().to_owned())
        .collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until the search answers exactly `expected`, and returns that page.
async fn wait_for(
    app: &TestApp,
    token: &str,
    query: &[(&str, &str)],
    expected: &BTreeSet<String>,
) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let found = page(app, token, query).await;
        if &ids(&found) == expected {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "search {query:?} still answers {:?}, not {expected:?}",
            ids(&found)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post(app: &TestApp, token: &str, chat: &str, text: &str) -> String {
    let response = app
        .post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn assert_problem(response: reqwest::Response, status: u16) {
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status);
}

/// Found in the caller's chats only, with typos and prefixes and filters; edits, deletions and
/// leaving a chat show in the results.
async fn finds_what_the_caller_may_read(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob, carol) = (
        app.token("alice").await,
        app.token("bob").await,
        app.token("carol").await,
    );
    let (alice_id, bob_id) = (app.me(&alice).await, app.me(&bob).await);
    app.me(&carol).await;
    let ours = app.group_chat(&alice, &[&bob_id]).await;
    let dave_id = app.me(&app.token("dave").await).await;
    let theirs = app.group_chat(&carol, &[&dave_id]).await;
    // Words unique to this test, so a shared index (none here: one index per app) cannot interfere.
    let report = post(
        &app,
        &alice,
        &ours,
        "the quarterly report is ready <b>now</b>",
    )
    .await;
    let lunch = post(&app, &bob, &ours, "lunch at noon anyone").await;
    let secret = post(&app, &carol, &theirs, "quarterly report secret").await;

    let found = wait_for(&app, &alice, &[("q", "quarterly")], &set(&[&report])).await;
    let item = &found["items"][0];
    assert_eq!(item["chat_id"], ours.as_str());
    assert_eq!(
        item["signal"]["text"],
        "the quarterly report is ready <b>now</b>"
    );
    let highlight = item["highlight"].as_str().unwrap();
    assert!(highlight.contains("<mark>quarterly</mark>"), "{highlight}");
    assert!(highlight.contains("&lt;b&gt;"), "escaped: {highlight}");
    assert!(found["next_cursor"].is_null());
    // Carol finds only her own chat's message with the same word.
    wait_for(&app, &carol, &[("q", "quarterly")], &set(&[&secret])).await;
    // Typos and prefixes.
    wait_for(&app, &alice, &[("q", "quartelry")], &set(&[&report])).await;
    wait_for(&app, &alice, &[("q", "quart")], &set(&[&report])).await;
    wait_for(&app, &alice, &[("q", "lunch noon")], &set(&[&lunch])).await;
    // Filters.
    let by_bob = [("q", "report"), ("author_id", bob_id.as_str())];
    assert_eq!(ids(&page(&app, &alice, &by_bob).await), set(&[]));
    let by_alice = [("q", "report"), ("author_id", alice_id.as_str())];
    assert_eq!(ids(&page(&app, &alice, &by_alice).await), set(&[&report]));
    let later = (time::OffsetDateTime::now_utc() + time::Duration::hours(1))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(
        ids(&page(&app, &alice, &[("q", "report"), ("after", &later)]).await),
        set(&[])
    );
    assert_eq!(
        ids(&page(&app, &alice, &[("q", "report"), ("before", &later)]).await),
        set(&[&report])
    );
    assert_eq!(
        ids(&page(&app, &alice, &[("q", "report"), ("chat_id", &ours)]).await),
        set(&[&report])
    );
    // A chat filter on a chat the caller is not in, or one that does not exist.
    assert_problem(
        search(&app, &alice, &[("q", "report"), ("chat_id", &theirs)]).await,
        403,
    )
    .await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_problem(
        search(&app, &alice, &[("q", "report"), ("chat_id", &unknown)]).await,
        404,
    )
    .await;

    // An edit replaces the text in the index; a deletion removes it.
    let path = format!("/v1/chats/{ours}/signals/{report}");
    let edited = app
        .http
        .patch(app.url(&path))
        .bearer_auth(&alice)
        .json(&json!({"text": "the annual report is ready"}))
        .send()
        .await
        .unwrap();
    assert_eq!(edited.status(), 200);
    wait_for(&app, &alice, &[("q", "annual")], &set(&[&report])).await;
    wait_for(&app, &alice, &[("q", "quarterly")], &set(&[])).await;
    let deleted = app
        .http
        .delete(app.url(&path))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    wait_for(&app, &alice, &[("q", "annual")], &set(&[])).await;

    // Bob leaves: his results lose the chat at once.
    wait_for(&app, &bob, &[("q", "lunch")], &set(&[&lunch])).await;
    let left = app
        .http
        .delete(app.url(&format!("/v1/chats/{ours}/members/{bob_id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert!(left.status().is_success());
    assert_eq!(ids(&page(&app, &bob, &[("q", "lunch")]).await), set(&[]));
    assert_problem(
        search(&app, &bob, &[("q", "lunch"), ("chat_id", &ours)]).await,
        403,
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn finds_what_the_caller_may_read_on_the_embedded_default() {
    Box::pin(finds_what_the_caller_may_read(Stack::Embedded)).await;
}

#[tokio::test]
async fn finds_what_the_caller_may_read_on_the_real_stack() {
    let test = "finds_what_the_caller_may_read_on_the_real_stack";
    if !support::real_stack_available(test).await || !support::meilisearch_available(test).await {
        return;
    }
    Box::pin(finds_what_the_caller_may_read(Stack::Real)).await;
}

/// A message edited while the index does not have the edit yet (its indexer a batch behind,
/// failing, or having missed it; here, none runs) is not found by the words it no longer holds,
/// and no highlight shows them.
async fn an_edit_the_index_has_not_seen_hides_the_old_text(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    let app = support::spawn_with(stack, config.clone(), data).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let id = post(&app, &alice, &chat, "the vault code is hunter").await;
    wait_for(&app, &alice, &[("q", "hunter")], &set(&[&id])).await;
    let data = app.stop_keeping_state().await;

    config.search.indexer = false;
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let edited = app
        .http
        .patch(app.url(&format!("/v1/chats/{chat}/signals/{id}")))
        .bearer_auth(&alice)
        .json(&json!({"text": "the vault code was rotated"}))
        .send()
        .await
        .unwrap();
    assert_eq!(edited.status(), 200);
    let found = page(&app, &alice, &[("q", "hunter")]).await;
    assert_eq!(ids(&found), set(&[]), "found by its old text: {found}");
    assert!(!found.to_string().contains("hunter"), "{found}");
    app.stop().await;
}

#[tokio::test]
async fn an_edit_the_index_has_not_seen_hides_the_old_text_on_the_embedded_default() {
    Box::pin(an_edit_the_index_has_not_seen_hides_the_old_text(
        Stack::Embedded,
    ))
    .await;
}

#[tokio::test]
async fn an_edit_the_index_has_not_seen_hides_the_old_text_on_the_real_stack() {
    let test = "an_edit_the_index_has_not_seen_hides_the_old_text_on_the_real_stack";
    if !support::real_stack_available(test).await || !support::meilisearch_available(test).await {
        return;
    }
    Box::pin(an_edit_the_index_has_not_seen_hides_the_old_text(
        Stack::Real,
    ))
    .await;
}

/// Pages are full until the last and continue through signed cursors bound to their query.
async fn pages_through_cursors(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    app.me(&alice).await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let mut sent = BTreeSet::new();
    for i in 0..7 {
        sent.insert(post(&app, &alice, &chat, &format!("standup note {i}")).await);
    }
    wait_for(&app, &alice, &[("q", "standup"), ("limit", "50")], &sent).await;
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    loop {
        let mut query = vec![("q", "standup"), ("limit", "3")];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor));
        }
        let found = page(&app, &alice, &query).await;
        sizes.push(found["items"].as_array().unwrap().len());
        for id in ids(&found) {
            assert!(seen.insert(id), "a hit repeated across pages");
        }
        match found["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(sizes, vec![3, 3, 1]);
    assert_eq!(seen, sent);
    // A cursor belongs to its query.
    let first = page(&app, &alice, &[("q", "standup"), ("limit", "3")]).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    assert_problem(
        search(&app, &alice, &[("q", "note"), ("cursor", cursor)]).await,
        400,
    )
    .await;
    app.stop().await;
}

#[tokio::test]
async fn pages_through_cursors_on_the_embedded_default() {
    Box::pin(pages_through_cursors(Stack::Embedded)).await;
}

#[tokio::test]
async fn pages_through_cursors_on_the_real_stack() {
    let test = "pages_through_cursors_on_the_real_stack";
    if !support::real_stack_available(test).await || !support::meilisearch_available(test).await {
        return;
    }
    Box::pin(pages_through_cursors(Stack::Real)).await;
}

/// Malformed searches are 400 problems, before any engine is asked.
async fn bad_searches_are_problems(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    app.me(&alice).await;
    let long = "a".repeat(201);
    for query in [
        vec![],
        vec![("q", "")],
        vec![("q", "   ")],
        vec![("q", "!?")],
        vec![("q", long.as_str())],
        vec![("q", "hello"), ("limit", "0")],
        vec![("q", "hello"), ("limit", "101")],
        vec![("q", "hello"), ("cursor", "garbage")],
        vec![("q", "hello"), ("before", "yesterday")],
        vec![("q", "hello"), ("chat_id", "not-a-chat")],
        vec![("q", "hello"), ("author_id", "nobody")],
        vec![("q", "hello"), ("sort", "newest")],
    ] {
        let response = search(&app, &alice, &query).await;
        assert_eq!(response.status(), 400, "{query:?}");
        assert_problem(response, 400).await;
    }
    let anonymous = app
        .http
        .get(app.url("/v1/search?q=hello"))
        .send()
        .await
        .unwrap();
    assert_problem(anonymous, 401).await;
    app.stop().await;
}

#[tokio::test]
async fn bad_searches_are_problems_on_the_embedded_default() {
    Box::pin(bad_searches_are_problems(Stack::Embedded)).await;
}

#[tokio::test]
async fn bad_searches_are_problems_on_the_real_stack() {
    let test = "bad_searches_are_problems_on_the_real_stack";
    if !support::real_stack_available(test).await || !support::meilisearch_available(test).await {
        return;
    }
    Box::pin(bad_searches_are_problems(Stack::Real)).await;
}

/// With Meilisearch unreachable, search answers 503 and sending goes on; once it is back, the
/// indexer catches up with what was sent meanwhile.
#[tokio::test]
async fn meilisearch_down_fails_search_not_sending() {
    let test = "meilisearch_down_fails_search_not_sending";
    if !support::real_stack_available(test).await || !support::meilisearch_available(test).await {
        return;
    }
    let target = support::meili_url()
        .unwrap()
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let relay = support::Relay::start(target.clone()).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Real, data.path().to_path_buf());
    config.search.meili_url = format!("http://{}", relay.addr);
    config.search.request_timeout_ms = 2_000;
    let app = Box::pin(support::spawn_with(Stack::Real, config, data)).await;
    let alice = app.token("alice").await;
    app.me(&alice).await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let before = post(&app, &alice, &chat, "before the outage").await;
    wait_for(&app, &alice, &[("q", "outage")], &set(&[&before])).await;

    relay.cut();
    let during = post(&app, &alice, &chat, "during the outage").await;
    let response = search(&app, &alice, &[("q", "outage")]).await;
    assert_eq!(response.status(), 503);
    assert_problem(response, 503).await;

    let _back = support::Relay::start_at(relay.addr, target).await;
    wait_for(&app, &alice, &[("q", "outage")], &set(&[&before, &during])).await;
    app.stop().await;
}

/// `confab reindex` rebuilds a lost embedded index from the store, with no indexer running.
#[tokio::test]
async fn reindex_rebuilds_the_index_from_the_store() {
    let outer = tempfile::tempdir().unwrap();
    let data_dir = outer.path().join("data");
    let config = support::config_for(Stack::Embedded, data_dir.clone());
    let app = support::spawn_with(
        Stack::Embedded,
        config.clone(),
        tempfile::tempdir().unwrap(),
    )
    .await;
    let alice = app.token("alice").await;
    app.me(&alice).await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let kept = post(&app, &alice, &chat, "rebuilt from history").await;
    let gone = post(&app, &alice, &chat, "rebuilt then deleted").await;
    let deleted = app
        .http
        .delete(app.url(&format!("/v1/chats/{chat}/signals/{gone}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert!(deleted.status().is_success());
    wait_for(&app, &alice, &[("q", "rebuilt")], &set(&[&kept])).await;
    app.stop().await;
    std::fs::remove_dir_all(data_dir.join("search")).unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .arg("reindex")
        .current_dir(outer.path())
        .env("CONFAB_DATA_DIR", &data_dir)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "reindex: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("reindexed 1 chats"), "{stdout}");
    assert!(String::from_utf8_lossy(&output.stderr).contains("100%"));

    let mut config = config;
    config.search.indexer = false;
    let app = support::spawn_with(Stack::Embedded, config, tempfile::tempdir().unwrap()).await;
    let alice = app.token("alice").await;
    assert_eq!(
        ids(&page(&app, &alice, &[("q", "rebuilt")]).await),
        set(&[&kept])
    );
    app.stop().await;
}

/// The live indexer on `stack`'s store (behind a [`HeldStore`] that counts signal reads), log and
/// search engine, with the chat it indexes; what it made is removed by `clean_up`.
struct LiveIndexer {
    config: confab_runtime::config::Config,
    store: std::sync::Arc<HeldStore>,
    bus: std::sync::Arc<dyn confab_runtime::bus::Bus>,
    search: std::sync::Arc<dyn confab_runtime::search::Search>,
    chat: confab_schema::ChatId,
    _data: tempfile::TempDir,
}

impl LiveIndexer {
    async fn new(stack: Stack) -> LiveIndexer {
        use confab_api::store::Store;
        let data = tempfile::tempdir().unwrap();
        let config = support::config_for(stack, data.path().to_path_buf());
        let store = std::sync::Arc::new(HeldStore::new(
            confab::open_store(&config, true).await.unwrap(),
        ));
        let bus = confab::open_bus(&config).await.unwrap();
        let search = confab::open_search(&config)
            .unwrap()
            .expect("a search engine");
        search.prepare().await.unwrap();
        let chat = confab_schema::ChatId::new();
        store
            .create_chat(&confab_api::store::NewChat {
                id: chat,
                kind: confab_schema::ChatKind::Group,
                name: Some("indexed".into()),
                description: None,
                created_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
                created_by: author(),
                members: vec![(author(), confab_schema::MemberRole::Owner)],
            })
            .await
            .unwrap();
        LiveIndexer {
            config,
            store,
            bus,
            search,
            chat,
            _data: data,
        }
    }

    /// An indexer of its own memory, as a process starts one.
    fn indexer(&self) -> confab_api::indexer::Indexer {
        confab_api::indexer::Indexer {
            store: std::sync::Arc::clone(&self.store)
                as std::sync::Arc<dyn confab_api::store::Store>,
            bus: std::sync::Arc::clone(&self.bus),
            search: std::sync::Arc::clone(&self.search),
            batch_size: 100,
            batch_wait: Duration::from_millis(10),
            batch_interval: Duration::ZERO,
            changed_lately: Default::default(),
        }
    }

    /// Stores a message of the chat, as a send does; its `signal.created`, not yet published.
    async fn store_message(&self, text: &str) -> confab_schema::Envelope {
        use confab_api::store::Store;
        let id = confab_schema::SignalId::new();
        let signal = confab_schema::Signal {
            id,
            chat_id: self.chat,
            kind: confab_schema::SignalKind::Message,
            author_id: author(),
            created_at: id.created_at().unwrap(),
            nonce: None,
            text: Some(text.into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        };
        self.store.insert_signal(&signal).await.unwrap();
        confab_schema::Envelope::signal_created(signal)
    }

    async fn publish(&self, envelope: &confab_schema::Envelope) {
        self.bus.publish(envelope).await.unwrap();
    }

    /// Deletes the message of `created` and publishes its `signal.deleted`.
    async fn delete(&self, created: &confab_schema::Envelope) {
        use confab_api::store::Store;
        let confab_schema::event::Event::SignalCreated(signal) = &created.event else {
            panic!("not a new message: {created:?}");
        };
        let tombstone = self
            .store
            .delete_signal(self.chat, signal.id)
            .await
            .unwrap()
            .expect("stored");
        self.publish(&confab_schema::Envelope::new(
            self.chat,
            confab_schema::event::Event::SignalDeleted(tombstone),
        ))
        .await;
    }

    async fn found(&self, text: &str) -> usize {
        let query = confab_runtime::search::Query {
            limit: 100,
            ..confab_runtime::search::conformance::query(text, &[self.chat])
        };
        self.search.search(&query).await.unwrap().hits.len()
    }

    fn signal_reads(&self) -> usize {
        self.store
            .reads
            .signals
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn clean_up(self) {
        if self.config.search.backend == confab_runtime::config::SearchBackend::Meilisearch
            || self.config.store.backend == confab_runtime::config::StoreBackend::Cql
        {
            Box::pin(support::clean_up_real(&self.config)).await;
        }
    }
}

fn author() -> confab_schema::UserId {
    confab_schema::UserId::from_subject("indexer", "author")
}

/// A batch of new messages, their events fresh on the log as a send publishes them, is indexed
/// as the events carry them: no signal is read back from the store (on CQL each would be a read).
async fn live_new_messages_are_indexed_without_a_store_read(stack: Stack) {
    const MESSAGES: usize = 20;
    let live = LiveIndexer::new(stack).await;
    // Started before the sends, as a process's indexer is.
    let indexer = live.indexer();
    for i in 0..MESSAGES {
        let created = live.store_message(&format!("harbour crane {i}")).await;
        live.publish(&created).await;
    }
    indexer.catch_up().await.unwrap();
    let (found, reads) = (live.found("harbour").await, live.signal_reads());
    assert_eq!(
        (found, reads),
        (MESSAGES, 0),
        "(messages indexed, signals read from the store)"
    );
    live.clean_up().await;
}

on_both_stacks!(live_new_messages_are_indexed_without_a_store_read);

/// A new message's event that reaches the log after the message's deletion (published late)
/// leaves it out of the index: fresh, after a deletion the indexer saw; and old, as the outbox's
/// sweep publishes it, read by an indexer that never saw the deletion (started after it).
async fn a_late_new_message_event_after_its_deletion_stays_out(stack: Stack) {
    let live = LiveIndexer::new(stack).await;
    let indexer = live.indexer();
    let fresh = live.store_message("lighthouse fresh").await;
    live.delete(&fresh).await;
    live.publish(&fresh).await;
    indexer.catch_up().await.unwrap();
    assert_eq!(live.found("lighthouse").await, 0, "a fresh late event");

    let mut swept = live.store_message("lighthouse swept").await;
    live.delete(&swept).await;
    indexer.catch_up().await.unwrap();
    // The sweep publishes the envelope written before the send's store write, a while ago.
    swept.at -= time::Duration::minutes(1);
    live.publish(&swept).await;
    live.indexer().catch_up().await.unwrap();
    assert_eq!(live.found("lighthouse").await, 0, "an old late event");
    live.clean_up().await;
}

on_both_stacks!(a_late_new_message_event_after_its_deletion_stays_out);
