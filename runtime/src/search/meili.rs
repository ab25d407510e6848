//! The production search engine: one Meilisearch index (`search.index`), documents keyed by
//! signal id. Checkpoints are documents of the same index (`checkpoint-<name>`, no text, so no
//! query finds them), written in the same task as the changes they account for.

use std::time::Duration;

use async_trait::async_trait;
use confab_schema::{ChatId, SignalId};
use meilisearch_sdk::client::Client;
use meilisearch_sdk::errors::{Error, ErrorCode};
use meilisearch_sdk::indexes::Index;
use meilisearch_sdk::search::{FederationOptions, MatchingStrategies, Selectors};
use meilisearch_sdk::settings::Settings;
use meilisearch_sdk::task_info::TaskInfo;
use meilisearch_sdk::tasks::Task;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    CROP_MARKER, CROP_WORDS, Change, Hit, Hits, MARK_END, MARK_START, MAX_HITS, Query, Search,
    SearchError, coalesce, millis, render_highlight, strip_marks,
};

/// Where the index is and how to reach it.
#[derive(Clone, Debug)]
pub struct MeiliSettings {
    pub url: String,
    /// The API key (the master key, or a key with the `documents.*`, `indexes.*`, `settings.*`,
    /// `search` and `tasks.get` actions on the index).
    pub api_key: Option<String>,
    /// The index's uid.
    pub index: String,
    /// How long one request, or waiting for one task, may take.
    pub timeout: Duration,
}

/// A Meilisearch index.
#[derive(Clone)]
pub struct MeiliSearch {
    client: Client,
    index: Index,
    timeout: Duration,
    /// How many chats one part of a search filters on ([`CHATS_PER_PART`]).
    chats_per_part: usize,
}

fn checkpoint_id(name: &str) -> String {
    format!("checkpoint-{name}")
}

fn unavailable(error: impl std::fmt::Display) -> SearchError {
    SearchError::Unavailable(error.to_string())
}

fn classify(error: Error) -> SearchError {
    match error {
        Error::Meilisearch(error) => {
            SearchError::Failed(format!("{:?}: {}", error.error_code, error.error_message))
        }
        Error::ParseError(error) => SearchError::Failed(error.to_string()),
        other => unavailable(other),
    }
}

/// How many chats one part of a search filters on, by default. Meilisearch's cost for a `chat_id IN [...]`
/// filter grows faster than its length (100 chats 3 ms, 1,000 70 ms, 10,000 5.8 s:
/// docs/BENCHMARKS.md), so a search is a federated multi-search of one query per this many chats.
/// Meilisearch merges the parts' hits rule by rule (the merged relevance rules, then the
/// `created_at` sort, then exactness), which is the order one query over all the chats gives.
/// `confab bench-search --part-sizes` measures the alternatives, and checks the page: from about
/// 5,000 chats, one filter over all of them answered a first page without the newest hits.
pub const CHATS_PER_PART: usize = 100;

/// `text` without Meilisearch's query operators: a `-` before a word excludes it and quotes make
/// a phrase, so `-x` alone would list every message but those with `x` (a placeholder search).
/// Here every word must match, as on the embedded engine: quotes become spaces, and a word's
/// leading minus signs are dropped.
fn without_operators(text: &str) -> String {
    let mut plain = String::with_capacity(text.len());
    let mut word_start = true;
    for c in text.chars() {
        match c {
            '"' => {
                plain.push(' ');
                word_start = true;
            }
            '-' if word_start => {}
            c => {
                plain.push(c);
                word_start = c.is_whitespace();
            }
        }
    }
    plain
}

#[derive(Deserialize)]
struct Found {
    id: String,
    chat_id: String,
    #[serde(default)]
    text: String,
}

impl MeiliSearch {
    pub fn new(settings: &MeiliSettings) -> Result<MeiliSearch, SearchError> {
        let client = Client::new(settings.url.trim_end_matches('/'), settings.api_key.clone())
            .map_err(classify)?;
        let index = client.index(&settings.index);
        Ok(MeiliSearch {
            client,
            index,
            timeout: settings.timeout,
            chats_per_part: CHATS_PER_PART,
        })
    }

    /// The same engine with searches split into parts of `chats` chats each (`usize::MAX`: one
    /// query over all of them), for the benchmark that chose [`CHATS_PER_PART`].
    #[must_use]
    pub fn with_chats_per_part(mut self, chats: usize) -> MeiliSearch {
        self.chats_per_part = chats.max(1);
        self
    }

    /// Deletes the index (tests and benchmarks clean up with it).
    pub async fn delete_index(&self) -> Result<(), SearchError> {
        let task = self.call(self.index.clone().delete()).await?;
        self.wait(task).await
    }

    async fn call<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, Error>>,
    ) -> Result<T, SearchError> {
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| unavailable("Meilisearch did not answer in time"))?
            .map_err(classify)
    }

    /// Waits for a task to finish, successfully or not.
    async fn finish(&self, task: TaskInfo) -> Result<Task, SearchError> {
        let uid = task.get_task_uid();
        task.wait_for_completion(
            &self.client,
            Some(Duration::from_millis(5)),
            Some(self.timeout),
        )
        .await
        .map_err(|e| match e {
            Error::Timeout => unavailable(format!("task {uid} did not finish in time")),
            other => classify(other),
        })
    }

    /// A failed task is logged and counted (`confab_search_task_failures_total`).
    fn report(&self, task: Task) -> Result<(), SearchError> {
        match task {
            Task::Failed { content } => {
                let uid = content.task.uid;
                metrics::counter!("confab_search_task_failures_total").increment(1);
                tracing::error!(
                    task = uid,
                    index = %self.index.uid,
                    code = ?content.error.error_code,
                    error = %content.error.error_message,
                    "a Meilisearch task failed"
                );
                Err(SearchError::Failed(format!(
                    "task {uid}: {}",
                    content.error.error_message
                )))
            }
            _ => Ok(()),
        }
    }

    /// Waits for a task and reports its failure.
    async fn wait(&self, task: TaskInfo) -> Result<(), SearchError> {
        let task = self.finish(task).await?;
        self.report(task)
    }
}

#[async_trait]
impl Search for MeiliSearch {
    async fn prepare(&self) -> Result<(), SearchError> {
        let existing =
            tokio::time::timeout(self.timeout, self.client.get_raw_index(&self.index.uid))
                .await
                .map_err(|_| unavailable("Meilisearch did not answer in time"))?;
        match existing {
            Ok(_) => {}
            Err(Error::Meilisearch(error)) if error.error_code == ErrorCode::IndexNotFound => {
                let task = self
                    .call(self.client.create_index(&self.index.uid, Some("id")))
                    .await?;
                match self.finish(task).await? {
                    // Another process created it meanwhile.
                    Task::Failed { content }
                        if content.error.error_code == ErrorCode::IndexAlreadyExists => {}
                    task => self.report(task)?,
                }
            }
            Err(error) => return Err(classify(error)),
        }
        // Applying the same settings again is a no-op task.
        let settings = Settings::new()
            .with_searchable_attributes(["text"])
            .with_filterable_attributes(["chat_id", "author_id", "created_at"])
            .with_sortable_attributes(["created_at"])
            .with_ranking_rules([
                "words",
                "typo",
                "proximity",
                "attribute",
                "sort",
                "exactness",
            ]);
        let task = self.call(self.index.set_settings(&settings)).await?;
        self.wait(task).await
    }

    async fn apply(
        &self,
        changes: &[Change],
        checkpoint: Option<(&str, &str)>,
    ) -> Result<(), SearchError> {
        let mut removed = Vec::new();
        let mut documents = Vec::new();
        for change in coalesce(changes) {
            match change {
                Change::Remove(id) => removed.push(id.to_string()),
                Change::Upsert(document) => documents.push(json!({
                    "id": document.id.to_string(),
                    "chat_id": document.chat_id.to_string(),
                    "author_id": document.author_id.to_string(),
                    "created_at": document.created_ms(),
                    "text": strip_marks(&document.text),
                })),
            }
        }
        if !removed.is_empty() {
            // Its own task first: the checkpoint below must not be written if this one fails.
            let task = self.call(self.index.delete_documents(&removed)).await?;
            self.wait(task).await?;
        }
        if let Some((name, value)) = checkpoint {
            documents.push(json!({"id": checkpoint_id(name), "value": value}));
        }
        if !documents.is_empty() {
            let task = self
                .call(self.index.add_or_replace(&documents, Some("id")))
                .await?;
            self.wait(task).await?;
        }
        Ok(())
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, SearchError> {
        let id = checkpoint_id(name);
        match tokio::time::timeout(self.timeout, self.index.get_document::<Value>(&id)).await {
            Err(_) => Err(unavailable("Meilisearch did not answer in time")),
            Ok(Ok(document)) => Ok(document["value"].as_str().map(str::to_owned)),
            Ok(Err(Error::Meilisearch(error)))
                if matches!(
                    error.error_code,
                    ErrorCode::DocumentNotFound | ErrorCode::IndexNotFound
                ) =>
            {
                Ok(None)
            }
            Ok(Err(error)) => Err(classify(error)),
        }
    }

    async fn search(&self, query: &Query) -> Result<Hits, SearchError> {
        let offset = query.offset.min(MAX_HITS);
        let limit = query.limit.min(MAX_HITS - offset);
        // A query of no word would be a placeholder search (every document): refuse it here too.
        if !query.text.chars().any(char::is_alphanumeric) || query.chats.is_empty() || limit == 0 {
            return Ok(Hits::default());
        }
        // Parts must not share a chat, or a hit would come back once per part holding it.
        let mut chats = query.chats.clone();
        chats.sort_unstable();
        chats.dedup();
        let mut rest = String::new();
        if let Some(author) = query.author {
            rest.push_str(&format!(" AND author_id = \"{author}\""));
        }
        if let Some(before) = query.before {
            rest.push_str(&format!(" AND created_at < {}", millis(before)));
        }
        if let Some(after) = query.after {
            rest.push_str(&format!(" AND created_at > {}", millis(after)));
        }
        // Ids are UUIDs: nothing in them needs quoting.
        let filters: Vec<String> = chats
            .chunks(self.chats_per_part)
            .map(|part| {
                let part: Vec<String> = part.iter().map(|c| format!("\"{c}\"")).collect();
                format!("chat_id IN [{}]{rest}", part.join(", "))
            })
            .collect();
        let (start, end) = (MARK_START.to_string(), MARK_END.to_string());
        let crop = [("text", None)];
        let sort = ["created_at:desc"];
        let text = without_operators(&query.text);
        let mut search = self.client.multi_search();
        for filter in &filters {
            let mut part = self.index.search();
            part.with_query(&text)
                .with_filter(filter)
                .with_sort(&sort)
                .with_matching_strategy(MatchingStrategies::ALL)
                .with_attributes_to_retrieve(Selectors::Some(&["id", "chat_id", "text"]))
                .with_attributes_to_highlight(Selectors::Some(&["text"]))
                .with_attributes_to_crop(Selectors::Some(&crop))
                .with_crop_length(CROP_WORDS)
                .with_crop_marker(CROP_MARKER)
                .with_highlight_pre_tag(&start)
                .with_highlight_post_tag(&end);
            search.with_search_query(part);
        }
        let search = search.with_federation(FederationOptions {
            offset: Some(offset),
            limit: Some(limit + 1),
            ..FederationOptions::default()
        });
        let results = match tokio::time::timeout(self.timeout, search.execute::<Found>()).await {
            Err(_) => return Err(unavailable("Meilisearch did not answer in time")),
            Ok(Ok(results)) => results,
            // Not created yet (no indexer has prepared it): nothing is indexed. Said once per
            // process, since the client's own warning is filtered out by default and an index
            // name that no indexer uses would otherwise go unnoticed.
            Ok(Err(Error::Meilisearch(error))) if error.error_code == ErrorCode::IndexNotFound => {
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(index = %self.index.uid, "the search index does not exist yet: searches find nothing until an indexer creates it");
                });
                return Ok(Hits::default());
            }
            Ok(Err(error)) => return Err(classify(error)),
        };
        let more = results.hits.len() > limit && offset + limit < MAX_HITS;
        let mut hits = Vec::with_capacity(limit);
        for hit in results.hits.into_iter().take(limit) {
            let id: SignalId = hit
                .result
                .id
                .parse()
                .map_err(|e| SearchError::Failed(format!("document id: {e}")))?;
            let chat_id: ChatId = hit
                .result
                .chat_id
                .parse()
                .map_err(|e| SearchError::Failed(format!("document chat_id: {e}")))?;
            let raw = hit
                .formatted_result
                .as_ref()
                .and_then(|formatted| formatted.get("text"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            hits.push(Hit {
                id,
                chat_id,
                highlight: render_highlight(raw),
                indexed_text: hit.result.text,
            });
        }
        Ok(Hits { hits, more })
    }

    async fn clear(&self) -> Result<(), SearchError> {
        let task = self.call(self.index.delete_all_documents()).await?;
        self.wait(task).await
    }

    async fn check(&self) -> Result<(), SearchError> {
        self.call(self.client.health()).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::without_operators;

    #[test]
    fn operators_become_plain_words() {
        assert_eq!(without_operators("-zzz"), "zzz");
        assert_eq!(without_operators("bug --report"), "bug report");
        assert_eq!(without_operators("\"ready report\""), " ready report ");
        assert_eq!(without_operators("e-mail -\"x\""), "e-mail  x ");
    }
}
