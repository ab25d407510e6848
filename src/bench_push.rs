//! `confab bench-push`: the delayed-push pipeline under load, on each queue backend. `--pushes`
//! messages, each to its own (user, chat), are scheduled as fast as `--concurrency` producers can,
//! every `--cancel-every`-th cancelled right after (its user fetched it), while the sender runs.
//! Every device is a Web Push subscription at a local receiver in this process, so each push is
//! really encrypted (RFC 8291), signed (VAPID) and POSTed.
//!
//! Reported: schedule and cancel rates and latencies; how late each sent push arrived past its due
//! time (p50/p99/max; target p99 ≤ 1 s); pushes missing, sent twice, or sent although cancelled
//! (target: none). The devices come from memory, not the store: this measures the queue and the
//! sender, not device lookups. How late each push was when the queue handed it out (claimed) is
//! reported apart from its arrival, so the queue's share of the lateness can be told from the
//! sender's.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_notifier::push::{Announced, DeviceDirectory, PushSender};
use confab_runtime::bus::BusError;
use confab_runtime::config::Config;
use confab_runtime::presence::now_ms;
use confab_runtime::push_queue::{
    Cancelled, Claimed, EmbeddedPushQueue, NatsPushQueue, PendingPush, PushMessage, PushQueue,
};
use confab_runtime::vapid::VapidKeys;
use confab_schema::push::{Device, Platform, WebPushKeys};
use confab_schema::{ChatId, DeviceId, Signal, SignalId, UserId};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug, Clone)]
pub struct PushBenchArgs {
    /// Messages, each to its own recipient and chat.
    #[arg(long, default_value_t = 100_000)]
    pub pushes: usize,
    /// Every n-th push is cancelled right after it is scheduled.
    #[arg(long, default_value_t = 2)]
    pub cancel_every: usize,
    /// The push delay, in ms.
    #[arg(long, default_value_t = 5_000)]
    pub delay_ms: u64,
    /// Producers scheduling at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Messages per second, paced; 0 schedules as fast as the producers can.
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Comma-separated: `embedded`, `nats`.
    #[arg(long, default_value = "embedded,nats")]
    pub backends: String,
    /// Comma-separated hold horizons (ms) for the NATS queue, each measured in turn: how far ahead
    /// of its due time a node holds a ticket rather than handing it back.
    #[arg(long, default_value = "2000")]
    pub hold_ms: String,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

/// Arrivals at the receiver: device index → arrival times (Unix ms).
type Arrivals = Arc<Mutex<HashMap<usize, Vec<i64>>>>;

/// The queue under test, recording how late past its due time each push was when claimed.
struct ClaimTimed {
    queue: Arc<dyn PushQueue>,
    late_ms: Mutex<Histogram<u64>>,
}

#[async_trait]
impl PushQueue for ClaimTimed {
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        message: &PushMessage,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError> {
        self.queue
            .schedule(user, chat, message, due_ms, expires_ms)
            .await
    }
    async fn cancel(
        &self,
        user: UserId,
        chat: ChatId,
        up_to: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        self.queue.cancel(user, chat, up_to, now_ms).await
    }
    async fn message_deleted(
        &self,
        user: UserId,
        chat: ChatId,
        deleted: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        self.queue
            .message_deleted(user, chat, deleted, now_ms)
            .await
    }
    async fn drop_pending(&self, user: UserId, chat: ChatId) -> Result<bool, BusError> {
        self.queue.drop_pending(user, chat).await
    }
    async fn drop_previews(&self, user: UserId) -> Result<usize, BusError> {
        self.queue.drop_previews(user).await
    }
    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Claimed, BusError> {
        let claimed = self.queue.claim_due(now_ms, limit).await?;
        // Measured when the claim returns, not when it began: its own round trips count.
        let returned = self::now_ms();
        let mut late = self.late_ms.lock().expect("not poisoned");
        for push in &claimed.pushes {
            let _ = late.record(u64::try_from(returned - push.due_ms).unwrap_or(0));
        }
        Ok(claimed)
    }
    async fn sent(&self, push: &PendingPush, now_ms: i64) -> Result<(), BusError> {
        self.queue.sent(push, now_ms).await
    }
    async fn release(&self) {
        self.queue.release().await;
    }
}

async fn receive(State(arrivals): State<Arrivals>, Path(device): Path<usize>) -> StatusCode {
    arrivals
        .lock()
        .expect("not poisoned")
        .entry(device)
        .or_default()
        .push(now_ms());
    StatusCode::CREATED
}

/// Every bench user's one Web Push device at the receiver.
struct Devices {
    origin: String,
    keys: WebPushKeys,
    index: HashMap<UserId, usize>,
}

#[async_trait]
impl DeviceDirectory for Devices {
    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, String> {
        let Some(i) = self.index.get(&user) else {
            return Ok(vec![]);
        };
        Ok(vec![Device {
            id: DeviceId(uuid::Uuid::from_u128(*i as u128)),
            user_id: user,
            platform: Platform::Webpush,
            endpoint: Some(format!("{}/push/{i}", self.origin)),
            keys: Some(self.keys.clone()),
            token: None,
            topic: None,
            created_at: time::OffsetDateTime::now_utc(),
        }])
    }

    async fn remove(&self, _user: UserId, _device: DeviceId) -> Result<(), String> {
        Ok(())
    }

    async fn reached(&self, _user: UserId, _chat: ChatId) -> Result<Option<SignalId>, String> {
        // The bench cancels through the queue; no markers move.
        Ok(None)
    }

    async fn message(&self, _chat: ChatId, _id: SignalId) -> Result<Announced, String> {
        // The bench's messages are never edited or deleted; the text stands in for theirs.
        Ok(Announced::Text(Some("a message of the bench".into())))
    }

    async fn signals_before(
        &self,
        _chat: ChatId,
        _before: SignalId,
        _limit: usize,
    ) -> Result<Vec<Signal>, String> {
        // Asked only when a message was deleted, which the bench never does.
        Ok(Vec::new())
    }

    async fn display_name(&self, _user: UserId) -> Result<Option<String>, String> {
        Ok(None)
    }

    async fn is_member(&self, _user: UserId, _chat: ChatId) -> Result<bool, String> {
        // Every recipient of the bench stays in its chat.
        Ok(true)
    }
}

fn user(i: usize) -> UserId {
    UserId::from_subject("bench-push", &i.to_string())
}

pub async fn run(args: PushBenchArgs, config: Config) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let mut table = vec![
        "| backend | pushes (cancelled) | schedules/s | cancels/s | schedule p99 | claimed late p50 / p99 | late p50 | late p99 | late max | missing | twice | sent although cancelled |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    let holds: Vec<u64> = args
        .hold_ms
        .split(',')
        .map(|h| h.trim().parse())
        .collect::<Result<_, _>>()
        .context("--hold-ms: milliseconds, comma-separated")?;
    let mut runs = Vec::new();
    for backend in args.backends.split(',').map(str::trim) {
        match backend {
            "embedded" => runs.push((backend.to_owned(), None)),
            "nats" => runs.extend(
                holds
                    .iter()
                    .map(|h| (format!("nats, hold {h} ms"), Some(*h))),
            ),
            other => anyhow::bail!("unknown backend {other}: embedded or nats"),
        }
    }
    for (backend, hold) in runs {
        let dir = tempfile::tempdir()?;
        let prefix = format!("benchpush{}", uuid::Uuid::new_v4().simple());
        let (queue, nats): (Arc<dyn PushQueue>, Option<NatsPushQueue>) = match hold {
            None => (
                Arc::new(EmbeddedPushQueue::open(&dir.path().join("push.sqlite3"))?),
                None,
            ),
            Some(hold) => (
                Arc::new(
                    NatsPushQueue::connect(&config.bus.nats_url, &prefix)
                        .await?
                        .holding(Duration::from_millis(hold)),
                ),
                Some(NatsPushQueue::connect(&config.bus.nats_url, &prefix).await?),
            ),
        };
        let row = measure(&args, Arc::clone(&queue)).await;
        if let Some(nats) = nats {
            nats.delete_bucket().await?;
        }
        let row = row.with_context(|| format!("backend {backend}"))?;
        table.push(format!(
            "| {backend} | {} ({}) | {:.0} | {:.0} | {:.1} ms | {} / {} ms | {} ms | {} ms | {} ms | {} | {} | {} |",
            row["pushes"],
            row["cancelled"],
            row["schedules_per_second"].as_f64().unwrap_or(0.0),
            row["cancels_per_second"].as_f64().unwrap_or(0.0),
            row["schedule_p99_ms"].as_f64().unwrap_or(0.0),
            row["claimed_late_p50_ms"],
            row["claimed_late_p99_ms"],
            row["late_p50_ms"],
            row["late_p99_ms"],
            row["late_max_ms"],
            row["missing"],
            row["sent_twice"],
            row["sent_although_cancelled"],
        ));
        rows.push(json!({"backend": backend, "result": row}));
    }
    for line in &table {
        println!("{line}");
    }
    std::fs::create_dir_all(&args.out)?;
    let path = args.out.join(format!(
        "push-{}.json",
        time::OffsetDateTime::now_utc().unix_timestamp()
    ));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "pushes": args.pushes,
            "cancel_every": args.cancel_every,
            "delay_ms": args.delay_ms,
            "rate": args.rate,
            "results": rows,
        }))?,
    )?;
    eprintln!("results in {}", path.display());
    Ok(())
}

async fn measure(args: &PushBenchArgs, queue: Arc<dyn PushQueue>) -> anyhow::Result<Value> {
    let arrivals: Arrivals = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://{}", listener.local_addr()?);
    let router = axum::Router::new()
        .route("/push/{device}", axum::routing::post(receive))
        .with_state(Arc::clone(&arrivals));
    let shutdown = CancellationToken::new();
    let server = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        })
    };
    // One subscription key pair for every device (a P-256 pair, as VAPID's): each push is still
    // encrypted on its own, to a fresh ephemeral key.
    let keys = WebPushKeys {
        p256dh: VapidKeys::generate().public_key,
        auth: URL_SAFE_NO_PAD.encode([7u8; 16]),
    };
    let index: HashMap<UserId, usize> = (0..args.pushes).map(|i| (user(i), i)).collect();
    let vapid = VapidKeys::generate();
    let timed = Arc::new(ClaimTimed {
        queue: Arc::clone(&queue),
        late_ms: Mutex::new(Histogram::<u64>::new(3)?),
    });
    let sender = PushSender {
        queue: Arc::clone(&timed) as Arc<dyn PushQueue>,
        devices: Arc::new(Devices {
            origin,
            keys,
            index,
        }),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()?,
        vapid: Some(vapid),
        subject: "mailto:bench@localhost".into(),
        vapid_tokens: Arc::default(),
        poll: Duration::from_millis(100),
        fcm: None,
        apns: None,
    }
    .start(shutdown.clone());

    let due: Arc<Mutex<Vec<i64>>> = Arc::new(Mutex::new(vec![0; args.pushes]));
    let schedule_us = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let cancel_us = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let cancel_secs = Arc::new(Mutex::new(Duration::ZERO));
    let delay = i64::try_from(args.delay_ms)?;
    let author = UserId::from_subject("bench-push", "author");
    let started = Instant::now();
    futures::stream::iter(0..args.pushes)
        .for_each_concurrent(args.concurrency, |i| {
            let queue = Arc::clone(&queue);
            let (due, schedule_us, cancel_us, cancel_secs) = (
                Arc::clone(&due),
                Arc::clone(&schedule_us),
                Arc::clone(&cancel_us),
                Arc::clone(&cancel_secs),
            );
            let rate = args.rate;
            async move {
                if rate > 0 {
                    let at = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
                    tokio::time::sleep_until(at.into()).await;
                }
                let (recipient, chat) = (user(i), ChatId::new());
                let message = PushMessage {
                    signal: SignalId::new(),
                    author,
                    author_name: "Bench".into(),
                    preview: Some(format!("message {i}")),
                };
                let at = now_ms() + delay;
                let timer = Instant::now();
                if let Err(error) = queue
                    .schedule(recipient, chat, &message, at, at + 3_600_000)
                    .await
                {
                    eprintln!("schedule failed: {error}");
                    return;
                }
                let _ = schedule_us
                    .lock()
                    .expect("not poisoned")
                    .record(micros(timer));
                due.lock().expect("not poisoned")[i] = at;
                if i % args.cancel_every.max(1) == 0 {
                    let timer = Instant::now();
                    match queue
                        .cancel(recipient, chat, message.signal, now_ms())
                        .await
                    {
                        Ok(_) => {
                            let _ = cancel_us
                                .lock()
                                .expect("not poisoned")
                                .record(micros(timer));
                            *cancel_secs.lock().expect("not poisoned") += timer.elapsed();
                            due.lock().expect("not poisoned")[i] = -1;
                        }
                        Err(error) => eprintln!("cancel failed: {error}"),
                    }
                }
            }
        })
        .await;
    let produced = started.elapsed();
    let due = due.lock().expect("not poisoned").clone();
    let expected = due.iter().filter(|d| **d > 0).count();
    let cancelled = due.iter().filter(|d| **d < 0).count();
    let last_due = due.iter().copied().max().unwrap_or(0);

    // Wait for every push, and a little past the last due time for any that should not come.
    let deadline = Instant::now()
        + Duration::from_millis(args.delay_ms)
        + produced * 2
        + Duration::from_secs(60);
    loop {
        let arrived = arrivals.lock().expect("not poisoned").len();
        let settled = now_ms() > last_due + 2_000;
        if (arrived >= expected && settled) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    let _ = sender.await;
    let _ = server.await;

    let arrivals = arrivals.lock().expect("not poisoned").clone();
    let mut late = Histogram::<u64>::new(3)?;
    let (mut missing, mut twice, mut unwanted, mut early) = (0, 0, 0, 0);
    for (i, due) in due.iter().enumerate() {
        match (arrivals.get(&i), *due) {
            (None, d) if d > 0 => missing += 1,
            (None, _) => {}
            (Some(_), d) if d < 0 => unwanted += 1,
            (Some(times), d) => {
                if times.len() > 1 {
                    twice += 1;
                }
                if times[0] < d {
                    early += 1;
                }
                late.record(u64::try_from(times[0] - d).unwrap_or(0))?;
            }
        }
    }
    let schedule_us = schedule_us.lock().expect("not poisoned").clone();
    let cancel_us = cancel_us.lock().expect("not poisoned").clone();
    let cancel_busy = cancel_secs.lock().expect("not poisoned").as_secs_f64();
    Ok(json!({
        "pushes": args.pushes,
        "cancelled": cancelled,
        "expected": expected,
        "produce_seconds": produced.as_secs_f64(),
        // Producers did both: each rate is its operations over the producing time.
        "schedules_per_second": args.pushes as f64 / produced.as_secs_f64(),
        "cancels_per_second": if cancel_busy > 0.0 { cancelled as f64 * args.concurrency as f64 / cancel_busy } else { 0.0 },
        "schedule_p50_ms": schedule_us.value_at_quantile(0.5) as f64 / 1000.0,
        "schedule_p99_ms": schedule_us.value_at_quantile(0.99) as f64 / 1000.0,
        "cancel_p99_ms": cancel_us.value_at_quantile(0.99) as f64 / 1000.0,
        "late_p50_ms": late.value_at_quantile(0.5),
        "late_p99_ms": late.value_at_quantile(0.99),
        "late_max_ms": late.max(),
        "claimed_late_p50_ms": timed.late_ms.lock().expect("not poisoned").value_at_quantile(0.5),
        "claimed_late_p99_ms": timed.late_ms.lock().expect("not poisoned").value_at_quantile(0.99),
        "missing": missing,
        "sent_twice": twice,
        "sent_early": early,
        "sent_although_cancelled": unwanted,
    }))
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}
