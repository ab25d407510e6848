//! `confab bench`: time from `POST …/signals` to delivery on an SSE stream, at a steady rate, with a
//! baseline measured in the same run (a bare publish → subscribe round trip on the same bus), so the
//! figures can be read as a ratio on a shared, noisy machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use confab_runtime::config::{Config, IdentityMode, SearchBackend};
use confab_runtime::identity::DevIdentity;
use confab_schema::{ChatId, Envelope, Event, Signal, SignalId, SignalKind, UserId};

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// A label for the results (e.g. `embedded` or `stack`); the configuration decides what runs.
    #[arg(long, default_value = "embedded")]
    pub label: String,
    /// Messages to send.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Messages per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Messages sent at the same rate before the measured ones, and not measured. A freshly
    /// started Cassandra needs about a minute of load before its JIT-compiled paths and start-up
    /// compactions settle; the figure asked for is the steady state. Pass 0 to measure a cold node.
    #[arg(long, default_value_t = 30_000)]
    pub warmup: usize,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// Send messages without a client nonce (no send-parity transaction), to measure its cost.
    #[arg(long)]
    pub no_nonce: bool,
    /// Password for the OIDC password grant of users `alice` and `bob` in oidc mode; default: the
    /// user name (as in the dev realm).
    #[arg(long)]
    pub password: Option<String>,
    /// Measured runs in a row on the same warm node (the warm-up only before the first), each
    /// reported on its own.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Chats the messages are spread over, round-robin (all with the same two members).
    #[arg(long, default_value_t = 1)]
    pub chats: usize,
    /// The p99 a run must stay within to count as meeting the target, in milliseconds.
    #[arg(long, default_value_t = 20.0)]
    pub p99_target_ms: f64,
    /// After the runs, search for the highest rate whose p99 stays within `--p99-target-ms`: short
    /// runs at rising rates, from `--rate` up by `--rate-step` to `--max-rate`.
    #[arg(long)]
    pub find_max_rate: bool,
    /// Length of each step of the rate search, in seconds.
    #[arg(long, default_value_t = 10)]
    pub step_secs: u64,
    /// Rate increase per step of the rate search.
    #[arg(long, default_value_t = 250)]
    pub rate_step: u32,
    /// Highest rate the search tries.
    #[arg(long, default_value_t = 4_000)]
    pub max_rate: u32,
}

struct Summary {
    /// Per-second p99s (by send time), to tell a steady cost from a stall.
    per_second_p99_ms: Vec<f64>,
    /// The rate the load generator actually sent at (posts started per second). A generator that
    /// falls behind its schedule measures itself, not the server.
    sent_per_second: f64,
    count: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    per_second: f64,
}

impl Summary {
    fn from(histogram: &Histogram<u64>, elapsed: Duration) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            per_second_p99_ms: Vec::new(),
            sent_per_second: 0.0,
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            max_ms: ms(histogram.max()),
            per_second: histogram.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        }
    }

    fn json(&self) -> Value {
        json!({
            "delivered": self.count,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "messages_per_second": self.per_second,
            "sent_per_second": self.sent_per_second,
            "p99_ms_by_second": self.per_second_p99_ms,
        })
    }
}

pub async fn run(args: BenchArgs, mut config: Config) -> anyhow::Result<()> {
    if args.messages == 0 || args.rate == 0 || args.runs == 0 || args.chats == 0 {
        bail!("--messages, --rate, --runs and --chats must be positive");
    }
    let data_dir = tempfile_dir()?;
    // The dev key and an embedded store live in a scratch folder, never in the user's data.
    config.data_dir = data_dir.clone();
    config.store.embedded_path = None;
    config.api.listen = "127.0.0.1:0".parse()?;
    // One user sends and reads at the measured rates: no rate limits.
    config.limits = config.limits.without_rate_limits();
    let isolated = isolate(&mut config);
    let result = measure(&args, &config).await;
    drop_isolated(&config, isolated).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    result
}

async fn measure(args: &BenchArgs, config: &Config) -> anyhow::Result<()> {
    let baseline = bus_baseline(config, args.messages, args.rate).await?;
    let mut bench = PostToSse::start(config, args).await?;
    // The server stops before the caller removes its event log and search index, also when a
    // phase failed: a server left running would write its index again.
    let phases = run_phases(args, &mut bench).await;
    bench.stop().await;
    let (runs, search, highest_met) = phases?;

    let meeting = runs
        .iter()
        .filter(|r| r.p99_ms <= args.p99_target_ms)
        .count();
    let first = &runs[0];
    let results = json!({
        "label": args.label,
        "messages": args.messages,
        "warmup_messages": args.warmup,
        "rate_per_second": args.rate,
        "chats": args.chats,
        "store": format!("{:?}", config.store.backend),
        "send_parity": format!("{:?}", config.store.send_parity),
        "nonces": !args.no_nonce,
        "bus": format!("{:?}", config.bus.backend),
        "identity": format!("{:?}", config.identity.mode),
        "p99_target_ms": args.p99_target_ms,
        "post_to_sse": first.json(),
        "runs": runs.iter().map(Summary::json).collect::<Vec<_>>(),
        "runs_meeting_target": meeting,
        "rate_search": search.iter().map(|(rate, summary, met)| json!({
            "rate": rate, "met": met, "result": summary.json(),
        })).collect::<Vec<_>>(),
        "highest_rate_meeting_target": highest_met,
        "baseline_bus_round_trip": baseline.json(),
        "ratio_p50": first.p50_ms / baseline.p50_ms.max(0.001),
        "ratio_p99": first.p99_ms / baseline.p99_ms.max(0.001),
    });
    std::fs::create_dir_all(&args.out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = args
        .out
        .join(format!("post-to-sse-{}-{stamp}.json", args.label));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    println!(
        "bus baseline: p50 {:.3} ms, p99 {:.3} ms",
        baseline.p50_ms, baseline.p99_ms
    );
    println!(
        "runs meeting p99 <= {} ms: {meeting} of {}",
        args.p99_target_ms,
        runs.len()
    );
    if args.find_max_rate {
        match highest_met {
            Some(rate) => println!(
                "highest rate with p99 <= {} ms over {} chat(s): {rate}/s",
                args.p99_target_ms, args.chats
            ),
            None => println!("no rate met p99 <= {} ms", args.p99_target_ms),
        }
    }
    println!("results written to {}", path.display());
    if let Some(short) = runs.iter().find(|r| r.count < args.messages as u64) {
        bail!(
            "only {} of {} messages were delivered in a run",
            short.count,
            args.messages
        );
    }
    Ok(())
}

/// The base URL a `confab serve` child process (stdout piped) prints once it listens; its
/// further output is read and dropped so that it never blocks on a full pipe.
pub(crate) async fn listening_url(child: &mut tokio::process::Child) -> anyhow::Result<String> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let base = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if let Some((_, url)) = line.split_once(" listening on ") {
                return Ok::<_, anyhow::Error>(url.trim().to_owned());
            }
        }
        bail!("confab serve exited before listening")
    })
    .await
    .context("confab serve did not start")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(base)
}

/// The warm-up, the measured runs and the rate search, on a started benchmark.
async fn run_phases(
    args: &BenchArgs,
    bench: &mut PostToSse,
) -> anyhow::Result<(Vec<Summary>, Vec<(u32, Summary, bool)>, Option<u32>)> {
    if args.warmup > 0 {
        println!("warming up: {} messages at {}/s", args.warmup, args.rate);
        bench.phase(args.warmup, args.rate, false).await?;
    }
    let mut runs = Vec::new();
    for run in 1..=args.runs {
        let summary = bench.phase(args.messages, args.rate, true).await?;
        println!(
            "run {run}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms{}",
            summary.p50_ms,
            summary.p99_ms,
            summary.max_ms,
            if summary.p99_ms <= args.p99_target_ms {
                ""
            } else {
                "  (over the target)"
            }
        );
        runs.push(summary);
    }
    let mut search = Vec::new();
    let mut highest_met = None;
    if args.find_max_rate {
        let mut rate = args.rate;
        while rate <= args.max_rate {
            let messages = usize::try_from(u64::from(rate) * args.step_secs)?;
            let summary = bench.phase(messages, rate, true).await?;
            let met = summary.p99_ms <= args.p99_target_ms
                && summary.count == messages as u64
                && summary.sent_per_second >= f64::from(rate) * 0.95;
            println!(
                "rate {rate}/s: sent {:.0}/s, delivered {}/{messages}, p50 {:.2} ms, p99 {:.2} ms{}",
                summary.sent_per_second,
                summary.count,
                summary.p50_ms,
                summary.p99_ms,
                if met { "" } else { "  (over the target)" }
            );
            search.push((rate, summary, met));
            if !met {
                break;
            }
            highest_met = Some(rate);
            rate += args.rate_step.max(1);
        }
    }
    Ok((runs, search, highest_met))
}

/// What [`isolate`] gave a benchmark's server, for [`drop_isolated`] to remove afterwards.
pub(crate) struct Isolated {
    /// The subject prefix of its event log on NATS.
    event_log: Option<String>,
    /// Its Meilisearch index.
    search_index: Option<String>,
}

/// Gives a benchmark's server an event log and a search index of its own, under names no other
/// run uses. On a shared log its indexer would work through every event the log keeps (a day of
/// test and benchmark runs: hundreds of thousands) while the benchmark measures. A shared
/// Meilisearch index is worse: its checkpoint is a position in an earlier run's log, past the end
/// of this run's, so the indexer rebuilds the whole index from the store (every message of every
/// earlier run in the keyspace) while the benchmark measures. (A tantivy index already starts
/// empty, in the scratch folder.)
pub(crate) fn isolate(config: &mut Config) -> Isolated {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..12];
    let event_log = (config.bus.backend == confab_runtime::config::BusBackend::Nats).then(|| {
        config.bus.subject_prefix = format!("{}_bench_{run}", config.bus.subject_prefix);
        config.bus.subject_prefix.clone()
    });
    let search_index = (config.search.backend == SearchBackend::Meilisearch).then(|| {
        config.search.index = format!("{}_bench_{run}", config.search.index);
        config.search.index.clone()
    });
    Isolated {
        event_log,
        search_index,
    }
}

/// Deletes the event log and the search index [`isolate`] gave a run, with everything in them.
pub(crate) async fn drop_isolated(config: &Config, isolated: Isolated) {
    if let Some(prefix) = isolated.event_log {
        let removed = async {
            let bus = confab_runtime::bus::NatsBus::connect(
                &config.bus.nats_url,
                &prefix,
                config.log_settings(),
            )
            .await?;
            bus.delete_namespace().await
        };
        if let Err(error) = removed.await {
            eprintln!("the run's event log and buckets {prefix} were not removed: {error}");
        }
    }
    if let Some(index) = isolated.search_index {
        let removed = async {
            confab_runtime::search::MeiliSearch::new(&config.meili_settings())?
                .delete_index()
                .await
        };
        if let Err(error) = removed.await {
            eprintln!("the run's search index {index} was not removed: {error}");
        }
    }
}

pub(crate) fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("confab-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The bus alone: publish envelopes at the same rate and time their arrival at a subscriber.
async fn bus_baseline(config: &Config, messages: usize, rate: u32) -> anyhow::Result<Summary> {
    let bus = crate::open_bus(config).await?;
    let mut events = bus.subscribe().await?;
    let sent: Arc<Mutex<HashMap<SignalId, Instant>>> = Arc::default();
    let chat = ChatId::new();
    let author = UserId::from_subject("bench", "baseline");
    let receiver = {
        let sent = Arc::clone(&sent);
        tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3).expect("valid histogram");
            while (histogram.len() as usize) < messages {
                let Ok(Some(envelope)) =
                    tokio::time::timeout(Duration::from_secs(10), events.next()).await
                else {
                    break;
                };
                let Event::SignalCreated(signal) = &envelope.envelope.event else {
                    continue;
                };
                if signal.chat_id != chat {
                    continue;
                }
                if let Some(at) = sent.lock().ok().and_then(|mut s| s.remove(&signal.id)) {
                    let _ = histogram.record(at.elapsed().as_micros() as u64);
                }
            }
            histogram
        })
    };
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    for _ in 0..messages {
        ticker.tick().await;
        let id = SignalId::new();
        let signal = Signal {
            id,
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: author,
            created_at: time::OffsetDateTime::now_utc(),
            nonce: None,
            text: Some("baseline".into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        };
        if let Ok(mut s) = sent.lock() {
            s.insert(id, Instant::now());
        }
        bus.publish(&Envelope::signal_created(signal)).await?;
    }
    let histogram = receiver.await?;
    Ok(Summary::from(&histogram, started.elapsed()))
}

pub(crate) async fn token(
    config: &Config,
    http: &reqwest::Client,
    user: &str,
    password: Option<&str>,
) -> anyhow::Result<String> {
    match config.identity.mode {
        IdentityMode::Dev => {
            Ok(DevIdentity::open(&config.data_dir)?.mint(user, Duration::from_secs(3600)))
        }
        IdentityMode::Oidc => {
            let discovery: Value = http
                .get(format!(
                    "{}/.well-known/openid-configuration",
                    config.identity.issuer_url
                ))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let endpoint = discovery["token_endpoint"]
                .as_str()
                .context("no token endpoint")?;
            let client_id = config
                .client_ids()
                .into_iter()
                .next()
                .context("no client id")?;
            let response: Value = http
                .post(endpoint)
                .form(&[
                    ("grant_type", "password"),
                    ("client_id", client_id.as_str()),
                    ("username", user),
                    ("password", password.unwrap_or(user)),
                    ("scope", "openid"),
                ])
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            Ok(response["access_token"]
                .as_str()
                .context("no access token")?
                .to_owned())
        }
    }
}

/// The whole path: alice POSTs, bob's SSE stream receives. One server, one stream and one set of
/// chats serve every phase (warm-up, runs, rate search).
struct PostToSse {
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    http: reqwest::Client,
    base: String,
    alice: String,
    chats: Vec<String>,
    nonces: bool,
    /// Measured messages in flight: text → when its POST started.
    sent: Arc<Mutex<HashMap<String, Instant>>>,
    /// (latency in µs, when its POST started) of each measured delivery.
    deliveries: tokio::sync::mpsc::UnboundedReceiver<(u64, Instant)>,
    reader: tokio::task::JoinHandle<()>,
    /// Numbers every message, so texts and nonces never repeat across phases.
    next: usize,
}

impl PostToSse {
    async fn start(config: &Config, args: &BenchArgs) -> anyhow::Result<PostToSse> {
        let shutdown = CancellationToken::new();
        let listener = TcpListener::bind(config.api.listen).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let server = tokio::spawn(crate::run(
            crate::Role::Serve,
            config.clone(),
            listener,
            shutdown.clone(),
        ));
        // A start that fails part-way stops the server it started before it returns: the caller
        // then removes the run's log and index, which a running server could make again.
        let connected = async {
            let http = http_client(config, 1024)?;
            let alice = token(config, &http, "alice", args.password.as_deref()).await?;
            let bob = token(config, &http, "bob", args.password.as_deref()).await?;
            let mut bob_id = None;
            for _ in 0..100 {
                if let Ok(response) = http
                    .get(format!("{base}/v1/me"))
                    .bearer_auth(&bob)
                    .send()
                    .await
                    && response.status().is_success()
                {
                    bob_id = Some(response.json::<Value>().await?["id"].clone());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let bob_id = bob_id.context("the server did not answer")?;
            let mut chats = Vec::with_capacity(args.chats);
            for n in 0..args.chats {
                let chat: Value = http
                .post(format!("{base}/v1/chats"))
                .bearer_auth(&alice)
                .json(&json!({"kind": "group", "name": format!("bench {n}"), "members": [bob_id]}))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
                chats.push(chat["id"].as_str().context("no chat id")?.to_owned());
            }

            let sse = http
                .get(format!("{base}/v1/events"))
                .bearer_auth(&bob)
                .send()
                .await?
                .error_for_status()?;
            let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let (deliveries_tx, deliveries) = tokio::sync::mpsc::unbounded_channel();
            let reader = {
                let sent = Arc::clone(&sent);
                tokio::spawn(async move {
                    let mut ready = Some(ready_tx);
                    let mut body = sse.bytes_stream();
                    let mut buffer = String::new();
                    while let Some(Ok(chunk)) = body.next().await {
                        let arrived = Instant::now();
                        buffer.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = buffer.find("\n\n") {
                            let frame: String = buffer.drain(..end + 2).collect();
                            if frame.contains("event: ready")
                                && let Some(tx) = ready.take()
                            {
                                let _ = tx.send(());
                            }
                            for line in frame.lines() {
                                if let Some(data) = line.strip_prefix("data: ")
                                    && let Ok(event) = serde_json::from_str::<Value>(data)
                                    && let Some(text) = event["data"]["text"].as_str()
                                    && let Some(at) =
                                        sent.lock().ok().and_then(|mut s| s.remove(text))
                                {
                                    let latency = arrived.duration_since(at).as_micros() as u64;
                                    let _ = deliveries_tx.send((latency, at));
                                }
                            }
                        }
                    }
                })
            };
            ready_rx
                .await
                .context("the event stream never became ready")?;
            anyhow::Ok((http, alice, chats, sent, deliveries, reader))
        }
        .await;
        let (http, alice, chats, sent, deliveries, reader) = match connected {
            Ok(parts) => parts,
            Err(error) => {
                shutdown.cancel();
                let _ = server.await;
                return Err(error);
            }
        };
        Ok(PostToSse {
            shutdown,
            server,
            http,
            base,
            alice,
            chats,
            nonces: !args.no_nonce,
            sent,
            deliveries,
            reader,
            next: 0,
        })
    }

    /// Sends `messages` at `rate`, spread over the chats; when `measured`, times each from its POST
    /// to its arrival on the stream.
    async fn phase(
        &mut self,
        messages: usize,
        rate: u32,
        measured: bool,
    ) -> anyhow::Result<Summary> {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut posts = Vec::with_capacity(messages);
        let started = Instant::now();
        for _ in 0..messages {
            ticker.tick().await;
            let n = self.next;
            self.next += 1;
            // Unmeasured messages take the same path; the reader skips them (not in `sent`).
            let text = if measured {
                format!("message {n}")
            } else {
                format!("warm-up {n}")
            };
            let body = if self.nonces {
                json!({"kind": "message", "nonce": format!("bench-{n}"), "text": text})
            } else {
                json!({"kind": "message", "text": text})
            };
            if measured && let Ok(mut s) = self.sent.lock() {
                s.insert(text, Instant::now());
            }
            let chat = &self.chats[n % self.chats.len()];
            let request = self
                .http
                .post(format!("{}/v1/chats/{chat}/signals", self.base))
                .bearer_auth(&self.alice)
                .json(&body);
            posts.push(tokio::spawn(async move {
                request.send().await.map(|r| r.status())
            }));
        }
        let sending = started.elapsed();
        let mut failed = 0;
        let mut first_failure = None;
        for post in posts {
            let failure = match post.await {
                Ok(Ok(status)) if status.is_success() => continue,
                Ok(Ok(status)) => format!("answered {status}"),
                Ok(Err(error)) => format!("{:#}", anyhow::Error::from(error)),
                Err(error) => format!("task: {error}"),
            };
            failed += 1;
            first_failure.get_or_insert(failure);
        }
        if let Some(first) = first_failure {
            bail!("{failed} posts failed; the first: {first}");
        }
        let mut histogram = Histogram::<u64>::new(3).expect("valid histogram");
        let mut by_second: Vec<Histogram<u64>> = Vec::new();
        if measured {
            while (histogram.len() as usize) < messages {
                let Ok(Some((latency, at))) =
                    tokio::time::timeout(Duration::from_secs(15), self.deliveries.recv()).await
                else {
                    break;
                };
                let _ = histogram.record(latency);
                let second = at.duration_since(started).as_secs() as usize;
                if by_second.len() <= second {
                    by_second
                        .resize_with(second + 1, || Histogram::new(3).expect("valid histogram"));
                }
                let _ = by_second[second].record(latency);
            }
            // Whatever did not arrive is not waited for in the next phase.
            if let Ok(mut s) = self.sent.lock() {
                s.clear();
            }
        }
        let mut summary = Summary::from(&histogram, started.elapsed());
        summary.sent_per_second = messages as f64 / sending.as_secs_f64().max(1e-9);
        summary.per_second_p99_ms = by_second
            .iter()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0)
            .collect();
        Ok(summary)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.reader.abort();
        let _ = self.server.await;
    }
}

/// The benchmarks' HTTP client: up to `max_idle` pooled connections, each dropped before the
/// server would close it. The server's header timeout (`limits.header_timeout_secs`) also ends
/// keep-alive connections idle for that long; a pooled connection reused at that moment loses
/// its request ("connection closed before message completed"), and a POST is not retried.
pub fn http_client(config: &Config, max_idle: usize) -> reqwest::Result<reqwest::Client> {
    let idle = config
        .limits
        .header_timeout()
        .saturating_sub(Duration::from_secs(1))
        .max(Duration::from_millis(500));
    reqwest::Client::builder()
        .pool_max_idle_per_host(max_idle)
        .pool_idle_timeout(idle)
        .build()
}
