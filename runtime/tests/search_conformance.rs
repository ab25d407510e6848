//! The search conformance suite against a tantivy index in a temporary directory and against the
//! Meilisearch server `infra/up.sh` started (`CONFAB_TEST_MEILI_URL`, `CONFAB_TEST_MEILI_KEY`), a
//! fresh index per case, deleted after it.

use std::sync::Arc;
use std::time::Duration;

use confab_runtime::config::SearchConfig;
use confab_runtime::search::conformance::Fixture;
use confab_runtime::search::{MeiliSearch, MeiliSettings, TantivySearch};
use confab_runtime::search_conformance_tests;

async fn tantivy() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("temp dir");
    let search = TantivySearch::open(dir.path()).expect("opens");
    Some(Fixture {
        search: Arc::new(search),
        cleanup: Some(Box::pin(async move { drop(dir) })),
    })
}

async fn meilisearch() -> Option<Fixture> {
    let required = std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
    let Ok(url) = std::env::var("CONFAB_TEST_MEILI_URL") else {
        assert!(
            !required,
            "CONFAB_TEST_MEILI_URL is not set; infra/up.sh starts Meilisearch when its binary is \
             there"
        );
        eprintln!(
            "SKIPPED a Meilisearch search case: CONFAB_TEST_MEILI_URL is not set (no Meilisearch \
             binary: see infra/README.md)"
        );
        return None;
    };
    let search = MeiliSearch::new(&MeiliSettings {
        url,
        api_key: std::env::var("CONFAB_TEST_MEILI_KEY").ok(),
        index: format!("t_{}", uuid::Uuid::new_v4().simple()),
        // What a deployment gets by default, so a search too slow for one fails here.
        timeout: Duration::from_millis(SearchConfig::default().request_timeout_ms),
    })
    .expect("client");
    if let Err(error) = confab_runtime::search::Search::check(&search).await {
        assert!(!required, "Meilisearch does not answer: {error}");
        eprintln!("SKIPPED a Meilisearch search case: Meilisearch does not answer: {error}");
        return None;
    }
    let cleanup = search.clone();
    Some(Fixture {
        search: Arc::new(search),
        cleanup: Some(Box::pin(async move {
            let _ = cleanup.delete_index().await;
        })),
    })
}

search_conformance_tests!(tantivy_index, super::tantivy);
search_conformance_tests!(meilisearch_index, super::meilisearch);
