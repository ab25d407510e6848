//! `confab bench-store`: the CQL store layer against raw prepared inserts of the same rows, in one
//! run on one keyspace, so the figures read as ratios on a shared, noisy machine.
//!
//! - inserts N messages into one chat, and N messages spread over M chats, through
//!   [`Store::insert_signal`] and through a bare prepared `INSERT` of the same `signals` rows;
//! - reads the newest page of 50 of a chat R times through [`Store::signals_before`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use confab_api::store::Store;
use confab_api::store::cql::signal_bucket;
use confab_api::store::cql::{self, CqlOptions, CqlStore};
use confab_runtime::config::{Config, StoreBackend};
use confab_schema::{ChatId, Signal, SignalId, SignalKind, UserId};
use hdrhistogram::Histogram;
use scylla::value::MaybeUnset;
use serde_json::json;

#[derive(clap::Args, Debug, Clone)]
pub struct StoreBenchArgs {
    /// Messages inserted per scenario (one chat; spread over `--chats`).
    #[arg(long, default_value_t = 1_000_000)]
    pub messages: usize,
    /// Chats the second scenario spreads its messages over.
    #[arg(long, default_value_t = 10_000)]
    pub chats: usize,
    /// Reads of a chat's newest 50.
    #[arg(long, default_value_t = 100_000)]
    pub reads: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 128)]
    pub concurrency: usize,
    /// Reads in flight at once (latency is measured, not throughput).
    #[arg(long, default_value_t = 4)]
    pub read_concurrency: usize,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Give every stored message a client nonce, so each insert goes through send parity
    /// (`store.send_parity`). The raw baseline writes the same signal rows, nonce included, and
    /// nothing else: no parity record.
    #[arg(long)]
    pub nonces: bool,
}

fn message(chat: ChatId, author: UserId, i: usize, nonce: bool) -> Signal {
    let id = SignalId::new();
    Signal {
        id,
        chat_id: chat,
        kind: SignalKind::Message,
        author_id: author,
        created_at: id
            .created_at()
            .unwrap_or_else(time::OffsetDateTime::now_utc),
        nonce: nonce.then(|| format!("bench-{}", uuid::Uuid::new_v4().simple())),
        // About the size of a typical chat message.
        text: Some(format!(
            "benchmark message number {i}, about as long as a typical chat line"
        )),
        reply_to: None,
        attachments: Vec::new(),
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
        call: None,
    }
}

struct Measured {
    per_second: f64,
    p50_us: u64,
    p99_us: u64,
}

impl Measured {
    /// Two equal halves of one run: rates by harmonic mean (equal work), latencies by the worse.
    fn combine(a: &Measured, b: &Measured) -> Measured {
        Measured {
            per_second: 2.0 / (1.0 / a.per_second.max(1e-9) + 1.0 / b.per_second.max(1e-9)),
            p50_us: a.p50_us.max(b.p50_us),
            p99_us: a.p99_us.max(b.p99_us),
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "per_second": self.per_second,
            "p50_ms": self.p50_us as f64 / 1000.0,
            "p99_ms": self.p99_us as f64 / 1000.0,
        })
    }
}

/// Runs `op` for each of `items` with `concurrency` in flight; times each. The operations run on
/// `concurrency` tasks of the runtime, as a server's requests do, so the client's own work per
/// operation is spread over the cores instead of being polled from one task.
async fn measure<T, F, Fut>(items: Vec<T>, concurrency: usize, op: F) -> anyhow::Result<Measured>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let count = items.len();
    let items = Arc::new(std::sync::Mutex::new(items.into_iter()));
    let op = Arc::new(op);
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (items, op) = (Arc::clone(&items), Arc::clone(&op));
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let next = items.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some(item) = next else {
                    return anyhow::Ok(latencies);
                };
                let at = Instant::now();
                op(item).await?;
                latencies.push(at.elapsed().as_micros() as u64);
            }
        });
    }
    let mut histogram = Histogram::<u64>::new(3).context("histogram")?;
    while let Some(latencies) = workers.join_next().await {
        for latency in latencies.context("a worker panicked")?? {
            histogram.record(latency.max(1)).context("recording")?;
        }
    }
    let elapsed = started.elapsed();
    Ok(Measured {
        per_second: count as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: histogram.value_at_quantile(0.5),
        p99_us: histogram.value_at_quantile(0.99),
    })
}

pub async fn run(args: StoreBenchArgs, config: Config) -> anyhow::Result<()> {
    if config.store.backend != StoreBackend::Cql {
        bail!("bench-store measures the CQL store: set CONFAB_STORE__BACKEND=cql");
    }
    if args.messages == 0 || args.chats == 0 || args.reads == 0 {
        bail!("--messages, --chats and --reads must be positive");
    }
    let mut options = CqlOptions::from_config(&config);
    options.keyspace = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    options.request_timeout = Duration::from_secs(30);
    if let cql::SendParity::JetStream { bucket, .. } = &mut options.parity {
        *bucket = format!("{}_nonces", options.keyspace);
    }
    cql::migrate(&options).await?;
    let store = Arc::new(CqlStore::connect(&options).await?);
    let result = scenarios(&args, &store).await;
    let _ = cql::drop_keyspace(&options).await;
    let mut results = result?;
    results["send_parity"] = json!(format!("{:?}", config.store.send_parity));

    std::fs::create_dir_all(&args.out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = args.out.join(format!("store-{stamp}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    println!("results written to {}", path.display());
    Ok(())
}

async fn scenarios(
    args: &StoreBenchArgs,
    store: &Arc<CqlStore>,
) -> anyhow::Result<serde_json::Value> {
    let raw_insert = Arc::new(
        store
            .session()
            .prepare(store.qualify(
                "INSERT INTO signals (chat_id, bucket, id, kind, author_id, nonce, text, reply_to, attachments, edited_at, deleted) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ))
            .await?,
    );
    let raw = {
        let store = Arc::clone(store);
        move |signal: Signal| {
            let (store, raw_insert) = (Arc::clone(&store), Arc::clone(&raw_insert));
            async move {
                let bucket = signal_bucket(signal.id.unix_millis().unwrap_or_default());
                store
                    .session()
                    .execute_unpaged(
                        &raw_insert,
                        (
                            signal.chat_id.0,
                            bucket,
                            signal.id.0,
                            signal.kind.as_str(),
                            signal.author_id.0,
                            // The same cells the store writes: absent values unset, not null.
                            MaybeUnset::from_option(signal.nonce.as_deref()),
                            signal.text.as_deref(),
                            MaybeUnset::<uuid::Uuid>::Unset,
                            MaybeUnset::<Vec<uuid::Uuid>>::Unset,
                            MaybeUnset::<scylla::value::CqlTimestamp>::Unset,
                            MaybeUnset::<bool>::Unset,
                        ),
                    )
                    .await?;
                Ok(())
            }
        }
    };
    let layered = {
        let store = Arc::clone(store);
        move |signal: Signal| {
            let store = Arc::clone(&store);
            async move {
                store.insert_signal(&signal).await?;
                Ok(())
            }
        }
    };
    let author = UserId::from_subject("bench", "author");

    let mut report = serde_json::Map::new();
    for (name, chat_count) in [("one_chat", 1usize), ("many_chats", args.chats)] {
        let chats: Vec<ChatId> = (0..chat_count).map(|_| ChatId::new()).collect();
        let rows = |offset: usize| -> Vec<Signal> {
            (0..args.messages)
                .map(|i| message(chats[(i + offset) % chats.len()], author, i, args.nonces))
                .collect()
        };
        // Alternating halves (raw, store, raw, store) so neither side gets the colder or the
        // warmer node; each on fresh rows of the same shape.
        let half = |offset: usize| {
            let mut all = rows(offset);
            let second = all.split_off(all.len() / 2);
            (all, second)
        };
        let (raw_a, raw_b) = half(0);
        let (store_a, store_b) = half(1);
        let raw_1 = measure(raw_a, args.concurrency, raw.clone()).await?;
        let store_1 = measure(store_a, args.concurrency, layered.clone()).await?;
        let raw_2 = measure(raw_b, args.concurrency, raw.clone()).await?;
        let store_2 = measure(store_b, args.concurrency, layered.clone()).await?;
        let raw_result = Measured::combine(&raw_1, &raw_2);
        let store_result = Measured::combine(&store_1, &store_2);
        eprintln!(
            "{name}: raw {:.0}/s, store {:.0}/s",
            raw_result.per_second, store_result.per_second
        );
        report.insert(
            name.to_owned(),
            json!({
                "chats": chat_count,
                "messages": args.messages,
                "raw_insert": raw_result.json(),
                "store_insert": store_result.json(),
                "ratio_store_to_raw": store_result.per_second / raw_result.per_second.max(1e-9),
            }),
        );
        if name == "one_chat" {
            let chat = chats[0];
            let reads = measure((0..args.reads).collect(), args.read_concurrency, {
                let store = Arc::clone(store);
                move |_| {
                    let store = Arc::clone(&store);
                    async move {
                        let page = store.signals_before(chat, None, 50).await?;
                        if page.len() != 50 {
                            bail!("a page had {} signals", page.len());
                        }
                        Ok(())
                    }
                }
            })
            .await?;
            report.insert(
                "newest_50_reads".to_owned(),
                json!({"reads": args.reads, "latency": reads.json()}),
            );
        }
    }
    report.insert("concurrency".to_owned(), json!(args.concurrency));
    report.insert("nonces".to_owned(), json!(args.nonces));
    Ok(serde_json::Value::Object(report))
}
