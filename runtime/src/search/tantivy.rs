//! The embedded search engine: a tantivy index in a directory of its own (`confab serve`).
//!
//! It follows Meilisearch's behaviour closely enough for one conformance suite: every query word must
//! match, a word of 5 to 8 characters may have one typo and a longer one two (a transposition counts
//! as one), the last word also matches as a prefix, and diacritics and case are ignored. Where it
//! differs: ranking is BM25 (exact matches boosted over typo matches) then newest first, where
//! Meilisearch ranks by its rules (words, typo, proximity, attribute, then newest first, exactness);
//! words are split on anything not a letter or digit, with no language-specific segmentation.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use confab_schema::{ChatId, SignalId};
use tantivy::collector::TopDocs;
use tantivy::collector::sort_key::{SortBySimilarityScore, SortByStaticFastValue};
use tantivy::directory::MmapDirectory;
use tantivy::query::{
    BooleanQuery, BoostQuery, ConstScoreQuery, FuzzyTermQuery, Occur, Query as TantivyQuery,
    RangeQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, STORED, STRING, Schema, TextFieldIndexing,
    TextOptions, Value,
};
use tantivy::tokenizer::{
    AsciiFoldingFilter, LowerCaser, RemoveLongFilter, SimpleTokenizer, TextAnalyzer,
};
use tantivy::{Index, IndexReader, IndexWriter, Order, ReloadPolicy, TantivyDocument, Term, doc};

use super::{
    CROP_MARKER, CROP_WORDS, Change, Hit, Hits, MARK_END, MARK_START, MAX_HITS, Query, Search,
    SearchError, coalesce, render_highlight, typos_allowed,
};

const TOKENIZER: &str = "confab";
const WRITER_HEAP: usize = 32 * 1024 * 1024;

#[derive(Clone, Copy)]
struct Fields {
    id: Field,
    chat_id: Field,
    author_id: Field,
    created_at: Field,
    text: Field,
}

fn schema() -> (Schema, Fields) {
    let mut builder = Schema::builder();
    let text_options = TextOptions::default()
        .set_indexing_options(
            TextFieldIndexing::default()
                .set_tokenizer(TOKENIZER)
                .set_index_option(IndexRecordOption::WithFreqsAndPositions),
        )
        .set_stored();
    let fields = Fields {
        id: builder.add_text_field("id", STRING | STORED),
        chat_id: builder.add_text_field("chat_id", STRING | STORED),
        author_id: builder.add_text_field("author_id", STRING),
        created_at: builder.add_i64_field(
            "created_at",
            NumericOptions::default()
                .set_fast()
                .set_stored()
                .set_indexed(),
        ),
        text: builder.add_text_field("text", text_options),
    };
    (builder.build(), fields)
}

/// Letters and digits, lower-cased, diacritics folded: the words of a text and of a query.
fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(SimpleTokenizer::default())
        .filter(RemoveLongFilter::limit(64))
        .filter(LowerCaser)
        .filter(AsciiFoldingFilter)
        .build()
}

struct Writer {
    writer: IndexWriter,
    checkpoints: BTreeMap<String, String>,
}

struct Inner {
    fields: Fields,
    reader: IndexReader,
    writer: Mutex<Writer>,
    analyzer: TextAnalyzer,
}

/// A tantivy index in a directory; one process at a time may open it.
#[derive(Clone)]
pub struct TantivySearch {
    inner: Arc<Inner>,
}

fn failed(error: impl std::fmt::Display) -> SearchError {
    SearchError::Failed(error.to_string())
}

impl TantivySearch {
    /// Opens the index in `dir`, creating it when absent.
    pub fn open(dir: &Path) -> Result<TantivySearch, SearchError> {
        std::fs::create_dir_all(dir).map_err(|e| failed(format!("{}: {e}", dir.display())))?;
        let (schema, fields) = schema();
        let directory = MmapDirectory::open(dir).map_err(failed)?;
        let index = Index::open_or_create(directory, schema).map_err(|e| {
            failed(format!(
                "{}: {e} (an index of another version: remove the directory and run `confab \
                 reindex`)",
                dir.display()
            ))
        })?;
        index.tokenizers().register(TOKENIZER, analyzer());
        let writer: IndexWriter =
            index
                .writer_with_num_threads(1, WRITER_HEAP)
                .map_err(|e| match e {
                    tantivy::TantivyError::LockFailure(..) => SearchError::InUse(format!(
                        "{} is open in another process (one process at a time opens an embedded \
                         index; several API processes use search.backend = meilisearch)",
                        dir.display()
                    )),
                    other => failed(format!("{}: {other}", dir.display())),
                })?;
        let checkpoints = index
            .load_metas()
            .map_err(failed)?
            .payload
            .and_then(|payload| serde_json::from_str(&payload).ok())
            .unwrap_or_default();
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()
            .map_err(failed)?;
        Ok(TantivySearch {
            inner: Arc::new(Inner {
                fields,
                reader,
                writer: Mutex::new(Writer {
                    writer,
                    checkpoints,
                }),
                analyzer: analyzer(),
            }),
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T, SearchError> + Send + 'static,
    ) -> Result<T, SearchError> {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(failed)?
    }
}

impl Inner {
    fn words(&self, text: &str) -> Vec<String> {
        let mut analyzer = self.analyzer.clone();
        let mut stream = analyzer.token_stream(text);
        let mut words = Vec::new();
        while let Some(token) = stream.next() {
            words.push(token.text.clone());
        }
        words
    }

    fn commit(&self, writer: &mut Writer) -> Result<(), SearchError> {
        let payload = serde_json::to_string(&writer.checkpoints).map_err(failed)?;
        let mut commit = writer.writer.prepare_commit().map_err(failed)?;
        commit.set_payload(&payload);
        commit.commit().map_err(failed)?;
        self.reader.reload().map_err(failed)
    }

    fn apply(
        &self,
        changes: &[Change],
        checkpoint: Option<(&str, &str)>,
    ) -> Result<(), SearchError> {
        let mut writer = self.writer.lock().map_err(failed)?;
        let f = self.fields;
        for change in coalesce(changes) {
            let id = change.id().to_string();
            writer.writer.delete_term(Term::from_field_text(f.id, &id));
            if let Change::Upsert(document) = change {
                writer
                    .writer
                    .add_document(doc!(
                        f.id => id,
                        f.chat_id => document.chat_id.to_string(),
                        f.author_id => document.author_id.to_string(),
                        f.created_at => document.created_ms(),
                        f.text => super::strip_marks(&document.text),
                    ))
                    .map_err(failed)?;
            }
        }
        if let Some((name, value)) = checkpoint {
            writer.checkpoints.insert(name.to_owned(), value.to_owned());
        }
        self.commit(&mut writer)
    }

    fn search(&self, query: &Query) -> Result<Hits, SearchError> {
        let words = self.words(&query.text);
        let offset = query.offset.min(MAX_HITS);
        let limit = query.limit.min(MAX_HITS - offset);
        if words.is_empty() || query.chats.is_empty() || limit == 0 {
            return Ok(Hits::default());
        }
        let f = self.fields;
        let mut clauses: Vec<(Occur, Box<dyn TantivyQuery>)> = Vec::new();
        for (i, word) in words.iter().enumerate() {
            let last = i + 1 == words.len();
            let term = Term::from_field_text(f.text, word);
            let typos = typos_allowed(word.chars().count());
            let exact: Box<dyn TantivyQuery> = Box::new(BoostQuery::new(
                Box::new(TermQuery::new(term.clone(), IndexRecordOption::WithFreqs)),
                2.0,
            ));
            let mut alternatives = vec![(Occur::Should, exact)];
            if last {
                alternatives.push((
                    Occur::Should,
                    Box::new(FuzzyTermQuery::new_prefix(term, typos, true)),
                ));
            } else if typos > 0 {
                alternatives.push((
                    Occur::Should,
                    Box::new(FuzzyTermQuery::new(term, typos, true)),
                ));
            }
            clauses.push((Occur::Must, Box::new(BooleanQuery::new(alternatives))));
        }
        let chats = TermSetQuery::new(
            query
                .chats
                .iter()
                .map(|chat| Term::from_field_text(f.chat_id, &chat.to_string())),
        );
        clauses.push((
            Occur::Must,
            Box::new(ConstScoreQuery::new(Box::new(chats), 0.0)),
        ));
        if let Some(author) = query.author {
            clauses.push((
                Occur::Must,
                Box::new(ConstScoreQuery::new(
                    Box::new(TermQuery::new(
                        Term::from_field_text(f.author_id, &author.to_string()),
                        IndexRecordOption::Basic,
                    )),
                    0.0,
                )),
            ));
        }
        if query.before.is_some() || query.after.is_some() {
            let bound = |t: Option<time::OffsetDateTime>| match t {
                Some(t) => Bound::Excluded(Term::from_field_i64(f.created_at, super::millis(t))),
                None => Bound::Unbounded,
            };
            clauses.push((
                Occur::Must,
                Box::new(ConstScoreQuery::new(
                    Box::new(RangeQuery::new(bound(query.after), bound(query.before))),
                    0.0,
                )),
            ));
        }
        let searcher = self.reader.searcher();
        let collector = TopDocs::with_limit(limit + 1).and_offset(offset).order_by((
            (SortBySimilarityScore, Order::Desc),
            (
                SortByStaticFastValue::<i64>::for_field("created_at"),
                Order::Desc,
            ),
        ));
        let found = searcher
            .search(&BooleanQuery::new(clauses), &collector)
            .map_err(failed)?;
        let more = found.len() > limit && offset + limit < MAX_HITS;
        let mut hits = Vec::with_capacity(limit);
        for (_, address) in found.into_iter().take(limit) {
            let stored: TantivyDocument = searcher.doc(address).map_err(failed)?;
            let text = |field| {
                stored
                    .get_first(field)
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            };
            let id: SignalId = text(f.id).parse().map_err(failed)?;
            let chat_id: ChatId = text(f.chat_id).parse().map_err(failed)?;
            let indexed_text = text(f.text);
            hits.push(Hit {
                id,
                chat_id,
                highlight: self.highlight(&indexed_text, &words),
                indexed_text,
            });
        }
        Ok(Hits { hits, more })
    }

    /// The text around its first match, matched words marked, as Meilisearch crops it. Each
    /// distinct word of the text is looked at once, against each distinct query word: a long
    /// message of one word repeated costs one comparison, not one per repetition.
    fn highlight(&self, text: &str, words: &[String]) -> String {
        let mut analyzer = self.analyzer.clone();
        let mut stream = analyzer.token_stream(text);
        let mut query: Vec<(&str, bool)> = Vec::with_capacity(words.len());
        for (i, word) in words.iter().enumerate() {
            let prefix = i + 1 == words.len();
            match query.iter_mut().find(|(seen, _)| *seen == word.as_str()) {
                Some(seen) => seen.1 |= prefix,
                None => query.push((word, prefix)),
            }
        }
        let mut looked_at: HashMap<String, bool> = HashMap::new();
        let mut tokens = Vec::new();
        while let Some(token) = stream.next() {
            let matched = match looked_at.get(&token.text) {
                Some(&matched) => matched,
                None => {
                    let matched = query
                        .iter()
                        .any(|&(word, prefix)| word_matches(&token.text, word, prefix));
                    looked_at.insert(token.text.clone(), matched);
                    matched
                }
            };
            tokens.push((token.offset_from, token.offset_to, matched));
        }
        let first = tokens.iter().position(|t| t.2).unwrap_or(0);
        let start = first.saturating_sub(CROP_WORDS / 4);
        let end = (start + CROP_WORDS).min(tokens.len());
        let (from, to) = if tokens.is_empty() {
            (0, text.len())
        } else {
            (
                if start == 0 { 0 } else { tokens[start].0 },
                if end == tokens.len() {
                    text.len()
                } else {
                    tokens[end - 1].1
                },
            )
        };
        let mut raw = String::with_capacity(to - from + 8);
        if from > 0 {
            raw.push_str(CROP_MARKER);
        }
        let mut at = from;
        for &(token_from, token_to, matched) in &tokens[start..end] {
            if matched {
                raw.push_str(&text[at..token_from]);
                raw.push(MARK_START);
                raw.push_str(&text[token_from..token_to]);
                raw.push(MARK_END);
                at = token_to;
            }
        }
        raw.push_str(&text[at..to]);
        if to < text.len() {
            raw.push_str(CROP_MARKER);
        }
        render_highlight(&raw)
    }
}

/// Whether an indexed word matches a query word, by the rules the query was built with.
fn word_matches(token: &str, word: &str, prefix: bool) -> bool {
    let typos = usize::from(typos_allowed(word.chars().count()));
    if token == word || (prefix && token.starts_with(word)) {
        return true;
    }
    if typos == 0 {
        return false;
    }
    let token: Vec<char> = token.chars().collect();
    let word: Vec<char> = word.chars().collect();
    within_typos(&token, &word, typos, prefix)
}

/// Whether `token` (or, with `prefix`, one of its beginnings) is at most `typos` edits from
/// `word`: Levenshtein, a transposition of neighbours counting as one edit. Only the cells within
/// `typos` of the diagonal are worked out (no other can come within `typos`), and every
/// beginning of the token comes from one table: the work is bounded by the word's length and
/// the typos allowed, whatever the token.
fn within_typos(token: &[char], word: &[char], typos: usize, prefix: bool) -> bool {
    #[cfg(test)]
    tests::COMPARISONS.with(|n| n.set(n.get() + 1));
    let (rows, columns) = (token.len(), word.len());
    if !prefix && rows.abs_diff(columns) > typos {
        return false;
    }
    // A beginning longer than the word by more than `typos` is too far from it.
    let rows = if prefix {
        rows.min(columns + typos)
    } else {
        rows
    };
    if rows + typos < columns {
        return false;
    }
    let far = typos + 1;
    let band = |i: usize| (i.saturating_sub(typos), (i + typos).min(columns));
    let mut before = vec![far; columns + 1];
    let mut previous: Vec<usize> = (0..=columns).map(|j| j.min(far)).collect();
    let mut current = vec![far; columns + 1];
    let mut best = if rows == 0 { previous[columns] } else { far };
    for i in 1..=rows {
        current.fill(far);
        let (from, to) = band(i);
        if from == 0 {
            current[0] = i.min(far);
        }
        for j in from.max(1)..=to {
            let cost = usize::from(token[i - 1] != word[j - 1]);
            let mut cell = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && token[i - 1] == word[j - 2] && token[i - 2] == word[j - 1] {
                cell = cell.min(before[j - 2] + 1);
            }
            current[j] = cell.min(far);
        }
        if prefix && i + typos >= columns {
            best = best.min(current[columns]);
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    if !prefix {
        best = previous[columns];
    }
    best <= typos
}

#[async_trait]
impl Search for TantivySearch {
    async fn prepare(&self) -> Result<(), SearchError> {
        // The schema and the tokenizer are fixed when the index is opened.
        Ok(())
    }

    async fn apply(
        &self,
        changes: &[Change],
        checkpoint: Option<(&str, &str)>,
    ) -> Result<(), SearchError> {
        let changes = changes.to_vec();
        let checkpoint = checkpoint.map(|(k, v)| (k.to_owned(), v.to_owned()));
        self.blocking(move |inner| {
            inner.apply(
                &changes,
                checkpoint.as_ref().map(|(k, v)| (k.as_str(), v.as_str())),
            )
        })
        .await
    }

    async fn checkpoint(&self, name: &str) -> Result<Option<String>, SearchError> {
        // The writer's lock may be held through a commit: wait for it off the async threads.
        let name = name.to_owned();
        self.blocking(move |inner| {
            let writer = inner.writer.lock().map_err(failed)?;
            Ok(writer.checkpoints.get(&name).cloned())
        })
        .await
    }

    async fn search(&self, query: &Query) -> Result<Hits, SearchError> {
        let query = query.clone();
        self.blocking(move |inner| inner.search(&query)).await
    }

    async fn clear(&self) -> Result<(), SearchError> {
        self.blocking(|inner| {
            let mut writer = inner.writer.lock().map_err(failed)?;
            writer.writer.delete_all_documents().map_err(failed)?;
            writer.checkpoints.clear();
            inner.commit(&mut writer)
        })
        .await
    }

    async fn check(&self) -> Result<(), SearchError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// How many comparisons of a text's word with a query word took a table.
        pub(super) static COMPARISONS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// A long message of one word repeated, searched with that word and its misspellings: each
    /// distinct word of the text is compared once with each distinct query word, so a search
    /// whose hits are such messages costs the service no more than short ones.
    #[test]
    fn a_highlight_compares_each_distinct_word_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let search = TantivySearch::open(dir.path()).expect("opens");
        let text = format!("abcde {}", "abcdf ".repeat(600));
        let words: Vec<String> = ["abcdx", "abcdy", "abcdx", "abcdz", "abcdx"]
            .iter()
            .map(|w| (*w).to_owned())
            .collect();
        COMPARISONS.with(|n| n.set(0));
        let marked = search.inner.highlight(&text, &words);
        assert!(marked.contains("<mark>abcde</mark>"), "{marked}");
        let comparisons = COMPARISONS.with(std::cell::Cell::get);
        // Two distinct words in the text, three distinct query words.
        assert!(comparisons <= 2 * 3, "{comparisons} comparisons");
    }

    /// The banded table finds what the whole one finds.
    #[test]
    fn the_banded_table_agrees_with_the_whole_one() {
        fn whole(a: &[char], b: &[char]) -> usize {
            let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
            for (i, row) in rows.iter_mut().enumerate() {
                row[0] = i;
            }
            for (j, cell) in rows[0].iter_mut().enumerate() {
                *cell = j;
            }
            for i in 1..=a.len() {
                for j in 1..=b.len() {
                    let cost = usize::from(a[i - 1] != b[j - 1]);
                    let mut best = (rows[i - 1][j] + 1)
                        .min(rows[i][j - 1] + 1)
                        .min(rows[i - 1][j - 1] + cost);
                    if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                        best = best.min(rows[i - 2][j - 2] + 1);
                    }
                    rows[i][j] = best;
                }
            }
            rows[a.len()][b.len()]
        }
        let samples = [
            "",
            "a",
            "ab",
            "ba",
            "abc",
            "hello",
            "hellp",
            "ehllo",
            "helo",
            "world",
            "wonderful",
            "wodner",
            "wond",
            "tomorrow",
            "tomorow",
            "abcdefghij",
            "abdcefghji",
            "xyz",
        ];
        for token in samples {
            for word in samples {
                let (t, w): (Vec<char>, Vec<char>) =
                    (token.chars().collect(), word.chars().collect());
                for typos in 1..=2 {
                    assert_eq!(
                        within_typos(&t, &w, typos, false),
                        whole(&t, &w) <= typos,
                        "{token} {word} {typos}"
                    );
                    let by_prefix = (0..=t.len()).any(|len| whole(&t[..len], &w) <= typos);
                    assert_eq!(
                        within_typos(&t, &w, typos, true),
                        by_prefix,
                        "{token} {word} {typos} as a prefix"
                    );
                }
            }
        }
    }

    #[test]
    fn words_match_with_typos_by_length_and_the_last_as_a_prefix() {
        assert!(word_matches("hello", "hello", false));
        assert!(!word_matches("hello", "helo", false)); // 4 characters: no typo
        assert!(word_matches("hello", "hellp", false));
        assert!(word_matches("hello", "ehllo", false)); // a transposition is one typo
        assert!(!word_matches("world", "hellp", false));
        assert!(word_matches("wonderful", "wond", true));
        assert!(word_matches("wonderful", "wodner", true));
        assert!(!word_matches("wonderful", "wond", false));
        assert!(word_matches("tomorrow", "tomorow", false));
    }
}
