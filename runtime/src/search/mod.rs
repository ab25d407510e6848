//! Full-text search of chat history. [`Search`] is the seam: [`MeiliSearch`] is the production
//! engine (a Meilisearch index), [`TantivySearch`] the embedded one (a tantivy index in the data
//! directory, for `confab serve`). Both pass [`conformance`], one suite split into cases
//! ([`search_conformance_tests!`](crate::search_conformance_tests)).
//!
//! The index holds one document per visible message: its id, chat, author, creation time and text.
//! Nothing else is copied: a hit names a signal, and the API reads the signal itself from the store.
//! An index also keeps a few named checkpoints (how far the indexer has read the event log, how far
//! a reindex got), written atomically with the changes they account for.
//!
//! Invariant: a query always carries the chats it may return hits of, and the engine applies that
//! filter itself, so a page is never short and a caller never sees a hit of another chat.

mod meili;
mod tantivy;

pub mod conformance;

use std::sync::Arc;

use async_trait::async_trait;
use confab_schema::{ChatId, Envelope, Event, Signal, SignalId, SignalKind, UserId};
use futures::future::BoxFuture;
use time::OffsetDateTime;

pub use meili::{CHATS_PER_PART, MeiliSearch, MeiliSettings};
pub use tantivy::TantivySearch;

use crate::telemetry::ReadinessCheck;

#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The engine cannot be reached or did not answer in time.
    #[error("search engine unavailable: {0}")]
    Unavailable(String),
    /// The (embedded) index is open in another process.
    #[error("search index in use: {0}")]
    InUse(String),
    /// The engine refused or failed a change or a query.
    #[error("search engine failed: {0}")]
    Failed(String),
}

/// The most hits a query can page through (Meilisearch's default `maxTotalHits`).
pub const MAX_HITS: usize = 1_000;

/// Before a highlighted word, in the engines' raw output (a private-use character, so no escaping
/// is needed to find it; [`render_highlight`] turns it into `<mark>`).
pub(crate) const MARK_START: char = '\u{E000}';
pub(crate) const MARK_END: char = '\u{E001}';
/// How many words a highlight shows around the matches.
pub(crate) const CROP_WORDS: usize = 24;
pub(crate) const CROP_MARKER: &str = "…";

/// One searchable message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub id: SignalId,
    pub chat_id: ChatId,
    pub author_id: UserId,
    pub created_at: OffsetDateTime,
    pub text: String,
}

impl Document {
    /// The document of a signal: `None` when it has nothing to find (deleted, no text, or not a
    /// message: a rename's text is the chat's name, which is no message of anyone's).
    pub fn of(signal: &Signal) -> Option<Document> {
        if signal.deleted || signal.kind != SignalKind::Message {
            return None;
        }
        let text = signal.text.as_ref().filter(|t| !t.trim().is_empty())?;
        Some(Document {
            id: signal.id,
            chat_id: signal.chat_id,
            author_id: signal.author_id,
            created_at: signal.created_at,
            text: text.clone(),
        })
    }

    /// Milliseconds since the epoch, the unit both engines filter `created_at` in.
    pub fn created_ms(&self) -> i64 {
        millis(self.created_at)
    }
}

/// A change to the index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Adds or replaces the document with this id.
    Upsert(Document),
    /// Removes the document with this id, if any.
    Remove(SignalId),
}

impl Change {
    /// The change a signal's current state asks for.
    pub fn of_signal(signal: &Signal) -> Change {
        match Document::of(signal) {
            Some(document) => Change::Upsert(document),
            None => Change::Remove(signal.id),
        }
    }

    /// The change a logged event asks for: created and edited messages are (re)indexed, deleted
    /// ones removed; other events change nothing.
    pub fn of_event(envelope: &Envelope) -> Option<Change> {
        match &envelope.event {
            Event::SignalCreated(signal) | Event::SignalUpdated(signal) => {
                Some(Change::of_signal(signal))
            }
            Event::SignalDeleted(signal) => Some(Change::Remove(signal.id)),
            _ => None,
        }
    }

    pub fn id(&self) -> SignalId {
        match self {
            Change::Upsert(document) => document.id,
            Change::Remove(id) => *id,
        }
    }
}

/// Keeps the last change of each document, in the order of those last changes: what applying
/// `changes` in order leaves behind.
pub(crate) fn coalesce(changes: &[Change]) -> Vec<&Change> {
    let mut last = std::collections::HashMap::with_capacity(changes.len());
    for (i, change) in changes.iter().enumerate() {
        last.insert(change.id(), i);
    }
    changes
        .iter()
        .enumerate()
        .filter(|(i, change)| last.get(&change.id()) == Some(i))
        .map(|(_, change)| change)
        .collect()
}

/// A search: words to find (all of them, with typos by length and the last one as a prefix) in
/// messages of `chats` only.
#[derive(Clone, Debug)]
pub struct Query {
    pub text: String,
    /// The chats hits may come from. Empty finds nothing.
    pub chats: Vec<ChatId>,
    pub author: Option<UserId>,
    /// Only messages created strictly before this time.
    pub before: Option<OffsetDateTime>,
    /// Only messages created strictly after this time.
    pub after: Option<OffsetDateTime>,
    /// Hits to skip (`offset + limit` at most [`MAX_HITS`]).
    pub offset: usize,
    pub limit: usize,
}

/// A message found, with its text around the matches: HTML-escaped, matched words in `<mark>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub id: SignalId,
    pub chat_id: ChatId,
    pub highlight: String,
    /// The text the message was indexed with, which the highlight shows and the query matched.
    pub indexed_text: String,
}

impl Hit {
    /// Whether the hit was indexed from `text`, the message's text now. A message edited since
    /// it was indexed (the indexer a batch behind, failing, or having missed the edit) would
    /// otherwise be found by words it no longer holds, its highlight showing them.
    pub fn indexed_from(&self, text: &str) -> bool {
        self.indexed_text == strip_marks(text)
    }
}

/// A page of hits, best first (then newest first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hits {
    pub hits: Vec<Hit>,
    /// Whether more hits follow the page (within [`MAX_HITS`]).
    pub more: bool,
}

#[async_trait]
pub trait Search: Send + Sync + 'static {
    /// Creates the index and applies its settings; idempotent, run at start-up.
    async fn prepare(&self) -> Result<(), SearchError>;
    /// Applies `changes` in order and, with them, sets `checkpoint` (`(name, value)`). Returns once
    /// they are searchable. Applying the same changes again leaves the same index.
    async fn apply(
        &self,
        changes: &[Change],
        checkpoint: Option<(&str, &str)>,
    ) -> Result<(), SearchError>;
    /// The value a checkpoint was last set to.
    async fn checkpoint(&self, name: &str) -> Result<Option<String>, SearchError>;
    /// One page of the hits of `query`.
    async fn search(&self, query: &Query) -> Result<Hits, SearchError>;
    /// Removes every document and checkpoint.
    async fn clear(&self) -> Result<(), SearchError>;
    /// Whether the engine answers now.
    async fn check(&self) -> Result<(), SearchError>;
}

/// Readiness of a [`Search`] engine.
pub struct SearchReadiness(pub Arc<dyn Search>);

impl ReadinessCheck for SearchReadiness {
    fn name(&self) -> &'static str {
        "search"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

pub(crate) fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// How many typos a query word of `chars` characters may have (Meilisearch's defaults: none below
/// 5 characters, one below 9, two from 9).
pub(crate) fn typos_allowed(chars: usize) -> u8 {
    match chars {
        0..=4 => 0,
        5..=8 => 1,
        _ => 2,
    }
}

/// Turns an engine's raw highlight (the text with [`MARK_START`]/[`MARK_END`] around matches) into
/// HTML: the text escaped, matches in `<mark>`.
pub(crate) fn render_highlight(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 16);
    for c in raw.chars() {
        match c {
            MARK_START => out.push_str("<mark>"),
            MARK_END => out.push_str("</mark>"),
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Removes the marker characters from stored text, so a message cannot fake a highlight.
pub(crate) fn strip_marks(text: &str) -> String {
    text.replace([MARK_START, MARK_END], "")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highlights_are_escaped_html() {
        let raw = format!("a <b> & {MARK_START}word{MARK_END} \"q\"");
        assert_eq!(
            render_highlight(&raw),
            "a &lt;b&gt; &amp; <mark>word</mark> &quot;q&quot;"
        );
        assert_eq!(strip_marks(&format!("x{MARK_START}y{MARK_END}")), "xy");
    }

    #[test]
    fn only_messages_are_searchable() {
        let signal = |kind: SignalKind| Signal {
            id: SignalId::new(),
            chat_id: ChatId::new(),
            kind,
            author_id: UserId::from_subject("t", "a"),
            created_at: OffsetDateTime::UNIX_EPOCH,
            nonce: None,
            text: Some("quarterly planning".into()),
            reply_to: None,
            attachments: Vec::new(),
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        };
        assert!(Document::of(&signal(SignalKind::Message)).is_some());
        for kind in [
            SignalKind::Renamed,
            SignalKind::Call,
            SignalKind::Joined,
            SignalKind::Left,
        ] {
            let not_a_message = signal(kind);
            assert_eq!(Document::of(&not_a_message), None, "{kind:?}");
            assert_eq!(
                Change::of_signal(&not_a_message),
                Change::Remove(not_a_message.id)
            );
        }
        let mut deleted = signal(SignalKind::Message);
        deleted.deleted = true;
        assert_eq!(Document::of(&deleted), None);
    }

    #[test]
    fn coalescing_keeps_the_last_change_of_each_document() {
        let id = SignalId::new();
        let other = SignalId::new();
        let doc = |id: SignalId, text: &str| {
            Change::Upsert(Document {
                id,
                chat_id: ChatId::new(),
                author_id: UserId::from_subject("t", "a"),
                created_at: OffsetDateTime::UNIX_EPOCH,
                text: text.into(),
            })
        };
        let changes = vec![
            doc(id, "one"),
            doc(other, "two"),
            Change::Remove(id),
            doc(other, "three"),
        ];
        let kept = coalesce(&changes);
        assert_eq!(kept, vec![&changes[2], &changes[3]]);
    }
}
