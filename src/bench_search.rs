//! `confab bench-search`: message search on each engine (tantivy, and Meilisearch with
//! `--meilisearch`). Per engine: messages written to an embedded store, then indexed through the
//! [`Search`] trait in batches (documents/s); then the same queries, one at a time, sent straight to
//! the engine and through `GET /v1/search` (authentication, the caller's chats, the engine, the
//! hits' signals from the store), p50/p99 and throughput of each, and their ratio.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use confab_api::ApiState;
use confab_api::store::embedded::EmbeddedStore;
use confab_api::store::{NewChat, Store};
use confab_runtime::bus::EmbeddedBus;
use confab_runtime::config::Config;
use confab_runtime::identity::DevIdentity;
use confab_runtime::search::{Change, Document, MeiliSearch, Query, Search, TantivySearch};
use confab_schema::{ChatId, ChatKind, MemberRole, Signal, SignalId, SignalKind, UserId};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpListener;

#[derive(clap::Args, Debug, Clone)]
pub struct SearchBenchArgs {
    /// Messages indexed per engine.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Chats they are spread over; the searcher is in all but a tenth of them.
    #[arg(long, default_value_t = 200)]
    pub chats: usize,
    /// Measured searches per path (engine, endpoint) and engine, one at a time.
    #[arg(long, default_value_t = 2_000)]
    pub searches: usize,
    /// Documents per indexing batch.
    #[arg(long, default_value_t = 1_000)]
    pub batch: usize,
    /// Also measure Meilisearch at `search.meili_url` with `search.meili_key` (a fresh index,
    /// deleted afterwards).
    #[arg(long)]
    pub meilisearch: bool,
    /// Instead of the above: how long Meilisearch takes to search for a member of many chats with
    /// the chats split into parts of each of these sizes (0: one query over all of them), for each
    /// number of chats in `--member-of`. Uses `search.meili_url` (a fresh index, deleted
    /// afterwards).
    #[arg(long, value_delimiter = ',')]
    pub part_sizes: Vec<usize>,
    /// With `--part-sizes`: the numbers of chats the searcher is in.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,1000,2000,5000,10000,20000"
    )]
    pub member_of: Vec<usize>,
    /// With `--part-sizes`: documents indexed, spread evenly over the largest `--member-of`.
    #[arg(long, default_value_t = 20_000)]
    pub documents: usize,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

pub async fn run(args: SearchBenchArgs, config: Config) -> anyhow::Result<()> {
    if !args.part_sizes.is_empty() {
        return part_sizes(&args, &config).await;
    }
    if args.messages < 1_000 || args.chats < 10 || args.searches == 0 || args.batch == 0 {
        bail!("--messages at least 1000, --chats at least 10, --searches and --batch positive");
    }
    let mut results = Vec::new();
    let dir = crate::bench::tempfile_dir()?;
    let outcome = async {
        let tantivy = Arc::new(TantivySearch::open(&dir.join("tantivy"))?);
        results.push(measure(&args, "tantivy", tantivy, &dir.join("tantivy-data")).await?);
        if args.meilisearch {
            let mut settings = config.meili_settings();
            settings.index = format!("bench_{}", uuid::Uuid::new_v4().simple());
            settings.timeout = Duration::from_secs(600);
            let meili = Arc::new(MeiliSearch::new(&settings)?);
            let measured = measure(
                &args,
                "meilisearch",
                Arc::clone(&meili) as Arc<dyn Search>,
                &dir.join("meili-data"),
            )
            .await;
            let _ = meili.delete_index().await;
            results.push(measured?);
        }
        anyhow::Ok(())
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    let results = json!({
        "messages": args.messages,
        "chats": args.chats,
        "searches": args.searches,
        "engines": results,
    });
    std::fs::create_dir_all(&args.out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = args.out.join(format!("search-{stamp}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    println!("results written to {}", path.display());
    Ok(())
}

/// `--part-sizes`: one broad query (two words most documents hold) by a member of the first
/// `member_of` chats, each part size in turn, timed five times after one untimed search; the best
/// and the median, and whether the first page of hits is the newest twenty matching documents
/// (computed here from what was indexed).
async fn part_sizes(args: &SearchBenchArgs, config: &Config) -> anyhow::Result<()> {
    let chats_max = args.member_of.iter().copied().max().unwrap_or(0);
    if chats_max == 0 || args.documents == 0 {
        bail!("--member-of and --documents must be positive");
    }
    let mut settings = config.meili_settings();
    settings.index = format!("bench_parts_{}", uuid::Uuid::new_v4().simple());
    settings.timeout = Duration::from_secs(600);
    let engine = MeiliSearch::new(&settings)?;
    let measured = async {
        engine.prepare().await?;
        let chats: Vec<ChatId> = (0..chats_max).map(|_| ChatId::new()).collect();
        let author = UserId::from_subject("bench", "author");
        let vocabulary = vocabulary(2_000);
        let mut rng = Rng(0x005e_ed0f_9a27);
        // A millisecond apart, so the newest-first order has no ties to break differently.
        let start = time::OffsetDateTime::now_utc() - time::Duration::days(1);
        // Which documents hold both words of the query: the expected page is computed here.
        let mut matching: Vec<(usize, SignalId)> = Vec::new();
        let documents: Vec<Change> = (0..args.documents)
            .map(|i| {
                let mut words: Vec<&str> = (0..6)
                    .map(|_| vocabulary[rng.skewed(vocabulary.len())].as_str())
                    .collect();
                // Four documents in five hold both words of the query.
                if i % 5 != 4 {
                    words.extend(["harbour", "lantern"]);
                }
                let id = SignalId::new();
                if i % 5 != 4 {
                    matching.push((i, id));
                }
                Change::Upsert(Document {
                    id,
                    chat_id: chats[i % chats.len()],
                    author_id: author,
                    created_at: start + time::Duration::milliseconds(i64::try_from(i).unwrap_or(i64::MAX)),
                    text: words.join(" "),
                })
            })
            .collect();
        println!(
            "part sizes: indexing {} documents over {chats_max} chats",
            args.documents
        );
        for batch in documents.chunks(args.batch.max(1)) {
            engine.apply(batch, Some(("bench", "0"))).await?;
        }
        let mut rows = Vec::new();
        for &member_of in &args.member_of {
            let query = Query {
                text: "harbour lantern".into(),
                chats: chats[..member_of.min(chats.len())].to_vec(),
                author: None,
                before: None,
                after: None,
                offset: 0,
                limit: 20,
            };
            // Newest first: the documents are a millisecond apart in index order.
            let expected: Vec<SignalId> = matching
                .iter()
                .rev()
                .filter(|(i, _)| i % chats.len() < member_of)
                .take(20)
                .map(|(_, id)| *id)
                .collect();
            for &part in &args.part_sizes {
                let parts = if part == 0 { usize::MAX } else { part };
                let engine = engine.clone().with_chats_per_part(parts);
                let page: Vec<SignalId> = engine.search(&query).await?.hits.iter().map(|h| h.id).collect();
                let mut times = Vec::with_capacity(5);
                for _ in 0..5 {
                    let started = Instant::now();
                    engine.search(&query).await?;
                    times.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                times.sort_by(f64::total_cmp);
                let same_page = page == expected;
                println!(
                    "member of {member_of:>6} chats, parts of {:>6}: best {:>8.1} ms, median {:>8.1} ms, {} hits{}",
                    if part == 0 { "all".to_owned() } else { part.to_string() },
                    times[0],
                    times[2],
                    page.len(),
                    if same_page {
                        String::new()
                    } else {
                        let found = page.iter().filter(|id| expected.contains(id)).count();
                        format!(", NOT THE NEWEST: {found} of the {} expected", expected.len())
                    }
                );
                rows.push(json!({
                    "member_of": member_of,
                    "chats_per_part": (part != 0).then_some(part),
                    "best_ms": times[0],
                    "median_ms": times[2],
                    "hits": page.len(),
                    "same_page": same_page,
                }));
            }
        }
        anyhow::Ok(rows)
    }
    .await;
    let _ = engine.delete_index().await;
    let results = json!({
        "documents": args.documents,
        "chats": chats_max,
        "default_chats_per_part": confab_runtime::search::CHATS_PER_PART,
        "runs": measured?,
    });
    std::fs::create_dir_all(&args.out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = args.out.join(format!("search-parts-{stamp}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    println!("results written to {}", path.display());
    Ok(())
}

/// A small deterministic generator (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// An index into a vocabulary of `n` words, common words far more often (Zipf-like).
    fn skewed(&mut self, n: usize) -> usize {
        let u = (self.next() % 1_000_000) as f64 / 1_000_000.0;
        ((n as f64) * u.powi(3)) as usize % n
    }
}

fn vocabulary(size: usize) -> Vec<String> {
    const SYLLABLES: [&str; 24] = [
        "ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "pa", "do", "ge", "bri", "stan",
        "mor", "tel", "quin", "dra", "fel", "gor", "hun", "jas", "pli", "wex",
    ];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut words = std::collections::BTreeSet::new();
    while words.len() < size {
        let parts = 2 + rng.below(3);
        let word: String = (0..parts)
            .map(|_| SYLLABLES[rng.below(SYLLABLES.len())])
            .collect();
        words.insert(word);
    }
    let mut words: Vec<String> = words.into_iter().collect();
    // Shuffle, so the common words are not the alphabetically first.
    for i in (1..words.len()).rev() {
        let j = rng.below(i + 1);
        words.swap(i, j);
    }
    words
}

/// Queries like people type: one or two words, some with a typo, some cut short.
fn queries(vocabulary: &[String], n: usize) -> Vec<String> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    (0..n)
        .map(|_| {
            let mut words = vec![vocabulary[rng.skewed(vocabulary.len())].clone()];
            if rng.below(10) < 3 {
                words.push(vocabulary[rng.skewed(vocabulary.len())].clone());
            }
            let last = words.last_mut().expect("a word");
            match rng.below(10) {
                0 | 1 if last.len() >= 6 => {
                    // A transposition: one typo.
                    let mut chars: Vec<char> = last.chars().collect();
                    chars.swap(2, 3);
                    *last = chars.into_iter().collect();
                }
                2 | 3 if last.len() >= 6 => last.truncate(4),
                _ => {}
            }
            words.join(" ")
        })
        .collect()
}

async fn measure(
    args: &SearchBenchArgs,
    name: &str,
    search: Arc<dyn Search>,
    data: &std::path::Path,
) -> anyhow::Result<Value> {
    println!("{name}: preparing {} messages", args.messages);
    std::fs::create_dir_all(data)?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&data.join("confab.sqlite3"))?);
    let bus = Arc::new(EmbeddedBus::open(
        &data.join("events.sqlite3"),
        Default::default(),
    )?);
    let identity = Arc::new(DevIdentity::open(data)?);
    let token = identity.mint("searcher", Duration::from_secs(24 * 3600));
    search.prepare().await?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let state = ApiState::new(
        Arc::clone(&store),
        bus,
        identity,
        &confab_runtime::signed::Keyring::random(),
    )
    .with_search(Arc::clone(&search));
    let (router, _) = confab_api::routes(state);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    let outcome = measure_with(args, name, &*search, &*store, &base, &token).await;
    server.abort();
    outcome
}

async fn measure_with(
    args: &SearchBenchArgs,
    name: &str,
    search: &dyn Search,
    store: &dyn Store,
    base: &str,
    token: &str,
) -> anyhow::Result<Value> {
    let http = reqwest::Client::new();
    let me: Value = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let searcher: UserId = me["id"]
        .as_str()
        .context("no user id")?
        .parse()
        .context("user id")?;
    let stranger = UserId::from_subject("bench", "stranger");
    let mut chats = Vec::with_capacity(args.chats);
    for i in 0..args.chats {
        let id = ChatId::new();
        let member = if i % 10 == 9 { stranger } else { searcher };
        store
            .create_chat(&NewChat {
                id,
                kind: ChatKind::Group,
                name: Some(format!("chat {i}")),
                description: None,
                created_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc()),
                created_by: member,
                members: vec![(member, MemberRole::Owner)],
            })
            .await?;
        chats.push(id);
    }
    let my_chats = store.chats_of(searcher).await?;

    let vocabulary = vocabulary(5_000);
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let started = Instant::now();
    let mut documents = Vec::with_capacity(args.messages);
    for _ in 0..args.messages {
        let chat = chats[rng.below(chats.len())];
        let words = 4 + rng.below(16);
        let text: Vec<&str> = (0..words)
            .map(|_| vocabulary[rng.skewed(vocabulary.len())].as_str())
            .collect();
        let id = SignalId::new();
        documents.push(Signal {
            id,
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: searcher,
            created_at: id.created_at().context("v7 id")?,
            nonce: None,
            text: Some(text.join(" ")),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        });
    }
    let stored: Vec<anyhow::Result<()>> = futures::stream::iter(&documents)
        .map(|signal| async move {
            store.insert_signal(signal).await?;
            Ok(())
        })
        .buffer_unordered(16)
        .collect()
        .await;
    stored.into_iter().collect::<anyhow::Result<Vec<()>>>()?;
    let store_secs = started.elapsed().as_secs_f64();
    println!(
        "{name}: stored {} messages in {store_secs:.1} s; indexing",
        args.messages
    );

    let started = Instant::now();
    for batch in documents.chunks(args.batch) {
        let changes: Vec<Change> = batch
            .iter()
            .filter_map(Document::of)
            .map(Change::Upsert)
            .collect();
        search.apply(&changes, Some(("bench", "0"))).await?;
    }
    let index_secs = started.elapsed().as_secs_f64();
    let docs_per_sec = args.messages as f64 / index_secs;
    println!("{name}: indexed at {docs_per_sec:.0} documents/s");

    let queries = queries(&vocabulary, args.searches);
    let warmup: Vec<String> = queries.iter().take(200).cloned().collect();
    let engine_query = |q: &str| Query {
        text: q.to_owned(),
        chats: my_chats.clone(),
        author: None,
        before: None,
        after: None,
        offset: 0,
        limit: 20,
    };
    for q in &warmup {
        search.search(&engine_query(q)).await?;
        endpoint(&http, base, token, q).await?;
    }
    let mut engine = Histogram::<u64>::new(3)?;
    let mut hits = 0usize;
    let started = Instant::now();
    for q in &queries {
        let t = Instant::now();
        hits += search.search(&engine_query(q)).await?.hits.len();
        engine.record(t.elapsed().as_micros() as u64)?;
    }
    let engine_secs = started.elapsed().as_secs_f64();
    let mut through = Histogram::<u64>::new(3)?;
    let mut endpoint_hits = 0usize;
    let started = Instant::now();
    for q in &queries {
        let t = Instant::now();
        endpoint_hits += endpoint(&http, base, token, q).await?;
        through.record(t.elapsed().as_micros() as u64)?;
    }
    let endpoint_secs = started.elapsed().as_secs_f64();
    let summary = |h: &Histogram<u64>, secs: f64| {
        json!({
            "p50_ms": h.value_at_quantile(0.5) as f64 / 1000.0,
            "p99_ms": h.value_at_quantile(0.99) as f64 / 1000.0,
            "max_ms": h.max() as f64 / 1000.0,
            "searches_per_s": args.searches as f64 / secs,
        })
    };
    let ratio = engine_secs / endpoint_secs;
    println!(
        "{name}: engine p50 {:.2} ms p99 {:.2} ms; endpoint p50 {:.2} ms p99 {:.2} ms; endpoint \
         throughput {ratio:.2}× the engine's",
        engine.value_at_quantile(0.5) as f64 / 1000.0,
        engine.value_at_quantile(0.99) as f64 / 1000.0,
        through.value_at_quantile(0.5) as f64 / 1000.0,
        through.value_at_quantile(0.99) as f64 / 1000.0,
    );
    Ok(json!({
        "engine": name,
        "store_inserts_per_s": args.messages as f64 / store_secs,
        "index_documents_per_s": docs_per_sec,
        "engine_direct": summary(&engine, engine_secs),
        "endpoint": summary(&through, endpoint_secs),
        "endpoint_throughput_ratio": ratio,
        "mean_hits_engine": hits as f64 / args.searches as f64,
        "mean_hits_endpoint": endpoint_hits as f64 / args.searches as f64,
    }))
}

async fn endpoint(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    q: &str,
) -> anyhow::Result<usize> {
    let page: Value = http
        .get(format!("{base}/v1/search"))
        .query(&[("q", q), ("limit", "20")])
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(page["items"].as_array().map_or(0, Vec::len))
}
