//! One behavioural suite for every [`Search`] engine, split into cases so one failure does not hide
//! the rest. `runtime/tests/search_conformance.rs` runs each case against tantivy and against the
//! Meilisearch server `infra/up.sh` started (a fresh index per case) through
//! [`search_conformance_tests!`](crate::search_conformance_tests).

use std::collections::HashSet;
use std::sync::Arc;

use confab_schema::{ChatId, SignalId, UserId};
use futures::future::BoxFuture;
use time::{Duration, OffsetDateTime};

use super::{Change, Document, Hits, MAX_HITS, Query, Search};

/// An empty index, and how to remove it afterwards.
pub struct Fixture {
    pub search: Arc<dyn Search>,
    pub cleanup: Option<BoxFuture<'static, ()>>,
}

impl Fixture {
    pub async fn finish(self) {
        if let Some(cleanup) = self.cleanup {
            cleanup.await;
        }
    }
}

fn author(name: &str) -> UserId {
    UserId::from_subject("conformance", name)
}

/// A message of `chat` by `by`, created `age` ago.
fn message(chat: ChatId, by: &str, text: &str, age: Duration) -> Document {
    let created_at = OffsetDateTime::now_utc() - age;
    Document {
        id: SignalId::new(),
        chat_id: chat,
        author_id: author(by),
        created_at: confab_schema::model::to_millis(created_at),
        text: text.into(),
    }
}

/// A query for `text` in `chats`, the first 20 hits.
pub fn query(text: &str, chats: &[ChatId]) -> Query {
    Query {
        text: text.into(),
        chats: chats.to_vec(),
        author: None,
        before: None,
        after: None,
        offset: 0,
        limit: 20,
    }
}

async fn index(search: &dyn Search, documents: &[Document]) {
    let changes: Vec<Change> = documents.iter().cloned().map(Change::Upsert).collect();
    search.apply(&changes, None).await.expect("applies");
}

async fn ids(search: &dyn Search, query: &Query) -> HashSet<SignalId> {
    hits(search, query)
        .await
        .hits
        .iter()
        .map(|h| h.id)
        .collect()
}

async fn hits(search: &dyn Search, query: &Query) -> Hits {
    search.search(query).await.expect("searches")
}

fn set(documents: &[&Document]) -> HashSet<SignalId> {
    documents.iter().map(|d| d.id).collect()
}

/// Every word must match; a hit names its signal and chat and marks the matched words.
pub async fn finds_messages_by_their_words(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    search.prepare().await.expect("prepares again");
    let chat = ChatId::new();
    let a = message(chat, "ann", "the quarterly report is ready", Duration::ZERO);
    let b = message(chat, "bob", "report the bug tomorrow", Duration::ZERO);
    let c = message(chat, "ann", "lunch anyone?", Duration::ZERO);
    index(search, &[a.clone(), b.clone(), c.clone()]).await;

    assert_eq!(ids(search, &query("report", &[chat])).await, set(&[&a, &b]));
    assert_eq!(
        ids(search, &query("quarterly report", &[chat])).await,
        set(&[&a]),
        "every word must match"
    );
    let found = hits(search, &query("lunch", &[chat])).await;
    assert_eq!(found.hits.len(), 1);
    assert_eq!(found.hits[0].id, c.id);
    assert_eq!(found.hits[0].chat_id, chat);
    assert!(
        found.hits[0].highlight.contains("<mark>lunch</mark>"),
        "{}",
        found.hits[0].highlight
    );
    assert!(!found.more);
    assert!(ids(search, &query("dinner", &[chat])).await.is_empty());
    fixture.finish().await;
}

/// Case and diacritics do not matter.
pub async fn ignores_case_and_diacritics(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    let a = message(chat, "ann", "Meet me at the Café Über", Duration::ZERO);
    index(search, std::slice::from_ref(&a)).await;
    for q in ["cafe", "CAFÉ", "uber", "café über"] {
        assert_eq!(ids(search, &query(q, &[chat])).await, set(&[&a]), "{q}");
    }
    fixture.finish().await;
}

/// Words of 5 to 8 characters may have one typo, longer ones two, shorter ones none.
pub async fn tolerates_typos_by_word_length(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    let a = message(
        chat,
        "ann",
        "wonderful weather for a picnic by the lake",
        Duration::ZERO,
    );
    index(search, std::slice::from_ref(&a)).await;
    for q in [
        "wonderfull weather", // 10 characters: up to two typos
        "wondrful weather",   // 8 characters: one typo
        "weahter picnic",     // a transposition is one typo
        "picnci lake",
    ] {
        assert_eq!(ids(search, &query(q, &[chat])).await, set(&[&a]), "{q}");
    }
    for q in [
        "lkae picnic",  // 4 characters: no typo allowed
        "wxathxr lake", // 7 characters, two typos
        "picnic beach", // a word that is not there
    ] {
        assert!(ids(search, &query(q, &[chat])).await.is_empty(), "{q}");
    }
    fixture.finish().await;
}

/// The last word also matches as the start of a word.
pub async fn matches_the_last_word_as_a_prefix(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    let a = message(chat, "ann", "happy anniversary everyone", Duration::ZERO);
    let b = message(chat, "bob", "deployment finished", Duration::ZERO);
    index(search, &[a.clone(), b.clone()]).await;
    assert_eq!(ids(search, &query("annivers", &[chat])).await, set(&[&a]));
    assert_eq!(ids(search, &query("happy ann", &[chat])).await, set(&[&a]));
    assert_eq!(ids(search, &query("deploy", &[chat])).await, set(&[&b]));
    let found = hits(search, &query("deploy", &[chat])).await;
    assert!(
        found.hits[0].highlight.contains("<mark>"),
        "{}",
        found.hits[0].highlight
    );
    fixture.finish().await;
}

/// Hits come only from the chats the query names; the author and time filters narrow them.
pub async fn filters_by_chat_author_and_time(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let (mine, other, third) = (ChatId::new(), ChatId::new(), ChatId::new());
    let old = message(mine, "ann", "budget draft", Duration::hours(48));
    let recent = message(mine, "bob", "budget final", Duration::minutes(5));
    let elsewhere = message(other, "ann", "budget secret", Duration::minutes(5));
    index(search, &[old.clone(), recent.clone(), elsewhere.clone()]).await;

    assert_eq!(
        ids(search, &query("budget", &[mine])).await,
        set(&[&old, &recent])
    );
    assert_eq!(
        ids(search, &query("budget", &[mine, other])).await,
        set(&[&old, &recent, &elsewhere])
    );
    assert!(ids(search, &query("budget", &[third])).await.is_empty());
    assert!(
        ids(search, &query("budget", &[])).await.is_empty(),
        "no chats, no hits"
    );
    let mut by_ann = query("budget", &[mine, other]);
    by_ann.author = Some(author("ann"));
    assert_eq!(ids(search, &by_ann).await, set(&[&old, &elsewhere]));
    let mut before = query("budget", &[mine]);
    before.before = Some(OffsetDateTime::now_utc() - Duration::hours(1));
    assert_eq!(ids(search, &before).await, set(&[&old]));
    let mut after = query("budget", &[mine]);
    after.after = Some(OffsetDateTime::now_utc() - Duration::hours(1));
    assert_eq!(ids(search, &after).await, set(&[&recent]));
    let mut between = after.clone();
    between.before = Some(OffsetDateTime::now_utc() - Duration::minutes(30));
    assert!(ids(search, &between).await.is_empty());
    fixture.finish().await;
}

/// Pages are full until the last, never overlap, and together hold every hit; other chats' hits
/// never shorten a page.
pub async fn pages_are_full_and_disjoint(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let (mine, other) = (ChatId::new(), ChatId::new());
    let mut documents = Vec::new();
    for i in 0..25 {
        documents.push(message(
            mine,
            "ann",
            &format!("standup notes {i}"),
            Duration::minutes(i),
        ));
        documents.push(message(
            other,
            "bob",
            &format!("standup notes {i}"),
            Duration::minutes(i),
        ));
    }
    index(search, &documents).await;
    let mut seen = HashSet::new();
    let mut q = query("standup", &[mine]);
    q.limit = 10;
    for (offset, expected, more) in [(0, 10, true), (10, 10, true), (20, 5, false)] {
        q.offset = offset;
        let page = hits(search, &q).await;
        assert_eq!(page.hits.len(), expected, "page at {offset}");
        assert_eq!(page.more, more, "more after {offset}");
        for hit in page.hits {
            assert_eq!(hit.chat_id, mine);
            assert!(seen.insert(hit.id), "hit repeated across pages");
        }
    }
    assert_eq!(seen.len(), 25);
    q.offset = MAX_HITS;
    assert!(hits(search, &q).await.hits.is_empty());
    fixture.finish().await;
}

/// A member of 20,000 chats gets every hit of theirs, in the engine's order (best first, then
/// newest first) across the whole list of chats, on full and disjoint pages, and none of another
/// chat. A `chat_id IN [...]` filter of that many chats took Meilisearch about 20 s.
pub async fn a_member_of_many_chats_gets_every_hit_in_order(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chats: Vec<ChatId> = (0..20_000).map(|_| ChatId::new()).collect();
    let others: Vec<ChatId> = (0..5).map(|_| ChatId::new()).collect();
    // Spread over the whole list, so any split of it into parts holds hits in several parts;
    // every exact match is newer than every one with a typo, so best first is not newest first.
    let spread = |i: usize| chats[(i * 7_919) % chats.len()];
    let mut exact = Vec::new();
    let mut typo = Vec::new();
    let mut elsewhere = Vec::new();
    for i in 0..30 {
        let age = Duration::minutes(i64::try_from(i).expect("small"));
        exact.push(message(spread(i), "ann", "quarterly retro notes", age));
        typo.push(message(
            spread(i + 30),
            "bob",
            "quartely retro notes",
            Duration::hours(1) + age,
        ));
        elsewhere.push(message(
            others[i % others.len()],
            "eve",
            "quarterly retro notes",
            age,
        ));
    }
    let documents: Vec<Document> = exact
        .iter()
        .chain(&typo)
        .chain(&elsewhere)
        .cloned()
        .collect();
    index(search, &documents).await;
    // Best first: every exact match before every typo; newest first within each.
    let expected: Vec<SignalId> = exact.iter().chain(&typo).map(|d| d.id).collect();

    let mut q = query("quarterly retro", &chats);
    q.limit = 7;
    let mut found = Vec::new();
    loop {
        let page = hits(search, &q).await;
        let more = found.len() + page.hits.len() < expected.len();
        assert_eq!(page.more, more, "more after offset {}", q.offset);
        if more {
            assert_eq!(
                page.hits.len(),
                q.limit,
                "a short page at offset {}",
                q.offset
            );
        }
        for hit in &page.hits {
            assert!(
                !others.contains(&hit.chat_id),
                "a hit of a chat not asked for"
            );
        }
        found.extend(page.hits.iter().map(|h| h.id));
        if !page.more {
            break;
        }
        q.offset += q.limit;
    }
    assert_eq!(
        found, expected,
        "every hit once, best first, then newest first"
    );
    fixture.finish().await;
}

/// An edit replaces a document's text, a removal drops it; applying the same changes again (at
/// least once delivery) leaves the same index, and the last change of a batch wins.
pub async fn edits_and_removals_apply_idempotently(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    let original = message(chat, "ann", "meeting on tuesday", Duration::ZERO);
    let mut edited = original.clone();
    edited.text = "meeting on thursday".into();
    let other = message(chat, "ann", "meeting notes", Duration::ZERO);
    let batch = vec![
        Change::Upsert(original.clone()),
        Change::Upsert(other.clone()),
        Change::Upsert(edited.clone()),
    ];
    for _ in 0..2 {
        search.apply(&batch, None).await.expect("applies");
        assert!(ids(search, &query("tuesday", &[chat])).await.is_empty());
        assert_eq!(
            ids(search, &query("thursday", &[chat])).await,
            set(&[&edited])
        );
        assert_eq!(
            ids(search, &query("meeting", &[chat])).await,
            set(&[&edited, &other])
        );
    }
    let removal = vec![Change::Remove(edited.id), Change::Remove(SignalId::new())];
    for _ in 0..2 {
        search.apply(&removal, None).await.expect("applies");
        assert_eq!(
            ids(search, &query("meeting", &[chat])).await,
            set(&[&other])
        );
    }
    // Created and deleted within one batch: gone.
    let brief = message(chat, "ann", "meeting cancelled", Duration::ZERO);
    search
        .apply(
            &[Change::Upsert(brief.clone()), Change::Remove(brief.id)],
            None,
        )
        .await
        .expect("applies");
    assert!(ids(search, &query("cancelled", &[chat])).await.is_empty());
    fixture.finish().await;
}

/// Checkpoints are set with the changes they account for and survive until the index is cleared.
pub async fn keeps_checkpoints(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    assert_eq!(search.checkpoint("bus").await.expect("reads"), None);
    let chat = ChatId::new();
    let a = message(chat, "ann", "checkpoint test", Duration::ZERO);
    search
        .apply(&[Change::Upsert(a.clone())], Some(("bus", "42")))
        .await
        .expect("applies");
    assert_eq!(
        search.checkpoint("bus").await.expect("reads").as_deref(),
        Some("42")
    );
    search
        .apply(&[], Some(("reindex", "{\"after\":null}")))
        .await
        .expect("applies");
    assert_eq!(
        search.checkpoint("bus").await.expect("reads").as_deref(),
        Some("42")
    );
    assert_eq!(
        search
            .checkpoint("reindex")
            .await
            .expect("reads")
            .as_deref(),
        Some("{\"after\":null}")
    );
    assert!(
        ids(search, &query("checkpoint", &[chat])).await.len() == 1,
        "checkpoints are not hits"
    );
    search.clear().await.expect("clears");
    assert_eq!(search.checkpoint("bus").await.expect("reads"), None);
    assert!(ids(search, &query("checkpoint", &[chat])).await.is_empty());
    fixture.finish().await;
}

/// A highlight is HTML: the text escaped, matches in `<mark>`, a long text cropped around them.
pub async fn highlights_are_escaped_and_cropped(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    let html = message(
        chat,
        "ann",
        "<script>alert(1)</script> & the invoice",
        Duration::ZERO,
    );
    let filler = |n: usize| {
        (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let long = message(
        chat,
        "ann",
        &format!("{} needle {}", filler(60), filler(60)),
        Duration::ZERO,
    );
    index(search, &[html.clone(), long.clone()]).await;
    let found = hits(search, &query("invoice", &[chat])).await;
    let highlight = &found.hits[0].highlight;
    assert!(!highlight.contains("<script>"), "{highlight}");
    assert!(highlight.contains("&lt;script&gt;"), "{highlight}");
    assert!(highlight.contains("&amp;"), "{highlight}");
    assert!(highlight.contains("<mark>invoice</mark>"), "{highlight}");
    let found = hits(search, &query("needle", &[chat])).await;
    let highlight = &found.hits[0].highlight;
    assert!(highlight.contains("<mark>needle</mark>"), "{highlight}");
    assert!(
        highlight.starts_with('…') && highlight.ends_with('…'),
        "{highlight}"
    );
    assert!(
        highlight.split_whitespace().count() < 40,
        "cropped: {highlight}"
    );
    fixture.finish().await;
}

/// A query with no letter or digit finds nothing (it is not a "match everything" query).
pub async fn a_query_without_words_finds_nothing(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    index(
        search,
        &[message(chat, "ann", "anything at all", Duration::ZERO)],
    )
    .await;
    for q in ["", "   ", "!!!", "-- ,"] {
        assert!(ids(search, &query(q, &[chat])).await.is_empty(), "{q:?}");
    }
    fixture.finish().await;
}

/// Query syntax is not an operator: a word after `-` must match like any other (it does not
/// exclude, and a query of excluded words alone is not "everything else"), and words in quotes
/// match as words, not as a phrase.
pub async fn minus_signs_and_quotes_are_not_operators(fixture: Fixture) {
    let search = &*fixture.search;
    search.prepare().await.expect("prepares");
    let chat = ChatId::new();
    let a = message(chat, "ann", "the report is ready", Duration::ZERO);
    let b = message(chat, "bob", "a bug report", Duration::ZERO);
    index(search, &[a.clone(), b.clone()]).await;
    assert!(
        ids(search, &query("-zzz", &[chat])).await.is_empty(),
        "a word after a minus sign must match"
    );
    assert_eq!(
        ids(search, &query("-report", &[chat])).await,
        set(&[&a, &b])
    );
    assert_eq!(
        ids(search, &query("bug -report", &[chat])).await,
        set(&[&b])
    );
    assert_eq!(
        ids(search, &query("\"ready report\"", &[chat])).await,
        set(&[&a]),
        "quoted words match in any order"
    );
    fixture.finish().await;
}

/// Runs every case of the search conformance suite against the engine `$make` opens (an
/// `async fn() -> Option<Fixture>`; `None` skips, as when Meilisearch is not running).
#[macro_export]
macro_rules! search_conformance_tests {
    ($module:ident, $make:path) => {
        mod $module {
            use $crate::search::conformance as suite;

            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        if let Some(fixture) = $make().await {
                            suite::$case(fixture).await;
                        }
                    }
                };
            }

            case!(finds_messages_by_their_words);
            case!(ignores_case_and_diacritics);
            case!(tolerates_typos_by_word_length);
            case!(matches_the_last_word_as_a_prefix);
            case!(filters_by_chat_author_and_time);
            case!(pages_are_full_and_disjoint);
            case!(a_member_of_many_chats_gets_every_hit_in_order);
            case!(edits_and_removals_apply_idempotently);
            case!(keeps_checkpoints);
            case!(highlights_are_escaped_and_cropped);
            case!(a_query_without_words_finds_nothing);
            case!(minus_signs_and_quotes_are_not_operators);
        }
    };
}
