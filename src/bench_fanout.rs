//! `confab bench-fanout`: fan-out side by side with Centrifugo, one server after the other with the
//! same load generator (this process), on this machine:
//!
//! - idle connections: the server's resident memory per connection, for SSE and WebSocket;
//! - one chat of `--subscribers` members, all connected, `--rate` 128-byte messages per second:
//!   deliveries per second, p50/p99 from send to receipt, and the server's CPU-seconds per 100,000
//!   deliveries (from `/proc`).
//!
//! Targets: `embedded` (`confab serve` on its defaults), `stack` (`confab serve` on Cassandra and
//! NATS, with dev tokens), and `centrifugo` (v6, in-memory broker, installed with `go install` into
//! a cache outside the repository).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use confab_runtime::config::Config;
use confab_runtime::identity::DevIdentity;

#[derive(clap::Args, Debug, Clone)]
pub struct FanoutArgs {
    /// Idle connections per transport.
    #[arg(long, default_value_t = 10_000)]
    pub idle: usize,
    /// Members of the chat, all connected.
    #[arg(long, default_value_t = 1_000)]
    pub subscribers: usize,
    /// Messages per second into the chat.
    #[arg(long, default_value_t = 20)]
    pub rate: u32,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Comma-separated: `embedded`, `stack`, `centrifugo`.
    #[arg(long, default_value = "embedded,stack,centrifugo")]
    pub targets: String,
    /// Comma-separated: `sse`, `ws`.
    #[arg(long, default_value = "sse,ws")]
    pub transports: String,
    /// Centrifugo's version, installed with `go install` unless already in the cache.
    #[arg(long, default_value = "v6.9.1")]
    pub centrifugo_version: String,
    /// Where `go install` puts Centrifugo; default `~/.cache/confab-bench/bin`.
    #[arg(long)]
    pub tools: Option<PathBuf>,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Embedded,
    Stack,
    Centrifugo,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Embedded => "confab embedded",
            Target::Stack => "confab real stack",
            Target::Centrifugo => "centrifugo (memory broker)",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Sse,
    Ws,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Sse => "sse",
            Transport::Ws => "ws",
        }
    }
}

const CENTRIFUGO_SECRET: &str = "bench-hmac-secret-not-for-production";
const CENTRIFUGO_API_KEY: &str = "bench-api-key";
const CHANNEL: &str = "chat";

/// A server under test, as a process of its own.
struct Server {
    target: Target,
    child: tokio::process::Child,
    base: String,
    data: tempfile::TempDir,
}

impl Server {
    fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("server exited")
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    fn token(&self, user: &str) -> anyhow::Result<String> {
        match self.target {
            Target::Centrifugo => Ok(centrifugo_token(user)),
            _ => Ok(DevIdentity::open(self.data.path())?.mint(user, Duration::from_secs(3600))),
        }
    }
}

fn centrifugo_token(user: &str) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 3600;
    let claims = b64.encode(json!({"sub": user, "exp": exp, "channels": [CHANNEL]}).to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(CENTRIFUGO_SECRET.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(format!("{header}.{claims}").as_bytes());
    let signature = b64.encode(mac.finalize().into_bytes());
    format!("{header}.{claims}.{signature}")
}

/// Resident memory of `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// CPU time of `pid` (user + system), in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / 100.0)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start(target: Target, config: &Config, args: &FanoutArgs) -> anyhow::Result<Server> {
    let data = tempfile::tempdir()?;
    match target {
        Target::Embedded | Target::Stack => {
            let mut command = tokio::process::Command::new(std::env::current_exe()?);
            command.arg("serve");
            for (key, _) in std::env::vars() {
                if key.starts_with("CONFAB_") {
                    command.env_remove(key);
                }
            }
            let suffix = uuid::Uuid::new_v4().simple().to_string();
            let caps = (args.idle + args.subscribers + 100).to_string();
            command
                .env("CONFAB_DATA_DIR", data.path())
                .env("CONFAB_API__LISTEN", "127.0.0.1:0")
                .env("CONFAB_NOTIFIER__MAX_CONNECTIONS", &caps)
                .env("CONFAB_TELEMETRY__LOG_FILTER", "warn")
                .env_remove("RUST_LOG");
            if target == Target::Stack {
                command
                    .env("CONFAB_STORE__BACKEND", "cql")
                    .env(
                        "CONFAB_STORE__CQL_CONTACT_POINTS",
                        &config.store.cql_contact_points,
                    )
                    .env(
                        "CONFAB_STORE__KEYSPACE",
                        format!("fanout_{}", &suffix[..12]),
                    )
                    .env("CONFAB_BUS__BACKEND", "nats")
                    .env("CONFAB_BUS__NATS_URL", &config.bus.nats_url)
                    .env(
                        "CONFAB_BUS__SUBJECT_PREFIX",
                        format!("fanout{}", &suffix[..12]),
                    );
            }
            command
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .kill_on_drop(true);
            let mut child = command.spawn().context("starting confab serve")?;
            let base = crate::bench::listening_url(&mut child).await?;
            Ok(Server {
                target,
                child,
                base,
                data,
            })
        }
        Target::Centrifugo => {
            let binary = centrifugo_binary(args).await?;
            let port = free_port()?;
            let config_path = data.path().join("config.json");
            std::fs::write(
                &config_path,
                json!({
                    "http_server": {"address": "127.0.0.1", "port": port},
                    "client": {
                        "token": {"hmac_secret_key": CENTRIFUGO_SECRET},
                        "allowed_origins": ["*"],
                    },
                    "http_api": {"key": CENTRIFUGO_API_KEY},
                    "uni_sse": {"enabled": true},
                    "uni_websocket": {"enabled": true},
                    "health": {"enabled": true},
                    "log": {"level": "error"},
                })
                .to_string(),
            )?;
            let child = tokio::process::Command::new(binary)
                .arg("--config")
                .arg(&config_path)
                .current_dir(data.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("starting centrifugo")?;
            let base = format!("http://127.0.0.1:{port}");
            let deadline = Instant::now() + Duration::from_secs(30);
            while reqwest::get(format!("{base}/health")).await.is_err() {
                if Instant::now() > deadline {
                    bail!("centrifugo did not start");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok(Server {
                target,
                child,
                base,
                data,
            })
        }
    }
}

/// The Centrifugo binary, installed with `go install` into the cache when missing.
async fn centrifugo_binary(args: &FanoutArgs) -> anyhow::Result<PathBuf> {
    let dir = match &args.tools {
        Some(dir) => dir.clone(),
        None => PathBuf::from(std::env::var("HOME").context("HOME is unset")?)
            .join(".cache/confab-bench/bin"),
    };
    let binary = dir.join("centrifugo");
    if binary.exists() {
        return Ok(binary);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "installing centrifugo {} with go install into {}",
        args.centrifugo_version,
        dir.display()
    );
    let status = tokio::process::Command::new("go")
        .arg("install")
        .arg(format!(
            "github.com/centrifugal/centrifugo/v6@{}",
            args.centrifugo_version
        ))
        .env("GOBIN", &dir)
        .status()
        .await
        .context("running go install (is Go installed?)")?;
    if !status.success() || !binary.exists() {
        bail!("go install of centrifugo failed");
    }
    Ok(binary)
}

/// A connected subscriber: a task that reads until the connection ends and reports each message's
/// send time (microseconds since `epoch`).
async fn subscribe(
    server: &Server,
    transport: Transport,
    token: &str,
    on_message: impl Fn(u64) + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (ready, is_ready) = tokio::sync::oneshot::channel::<()>();
    let handle = match transport {
        Transport::Sse => {
            let url = match server.target {
                Target::Centrifugo => {
                    let connect = json!({"token": token}).to_string();
                    let mut url =
                        reqwest::Url::parse(&format!("{}/connection/uni_sse", server.base))?;
                    url.query_pairs_mut().append_pair("cf_connect", &connect);
                    url
                }
                _ => reqwest::Url::parse(&format!("{}/v1/events", server.base))?,
            };
            let mut request = reqwest::Client::new().get(url);
            if server.target != Target::Centrifugo {
                request = request.bearer_auth(token);
            }
            let response = request.send().await?.error_for_status()?;
            let mut body = response.bytes_stream();
            tokio::spawn(async move {
                let mut ready = Some(ready);
                let mut buffer = String::new();
                while let Some(Ok(chunk)) = body.next().await {
                    buffer.push_str(&String::from_utf8_lossy(&chunk));
                    while let Some(end) = buffer.find("\n\n") {
                        let frame: String = buffer.drain(..end + 2).collect();
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        for line in frame.lines() {
                            if let Some(data) = line.strip_prefix("data:")
                                && let Some(sent) = sent_at(data.trim())
                            {
                                on_message(sent);
                            }
                        }
                    }
                }
            })
        }
        Transport::Ws => {
            let url = match server.target {
                Target::Centrifugo => format!(
                    "{}/connection/uni_websocket",
                    server.base.replacen("http://", "ws://", 1)
                ),
                _ => format!("{}/v1/ws", server.base.replacen("http://", "ws://", 1)),
            };
            let mut request = url.into_client_request()?;
            if server.target != Target::Centrifugo {
                request
                    .headers_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
            }
            let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
            if server.target == Target::Centrifugo {
                socket
                    .send(Message::Text(json!({"token": token}).to_string().into()))
                    .await?;
            }
            tokio::spawn(async move {
                let mut ready = Some(ready);
                while let Some(Ok(message)) = socket.next().await {
                    if let Message::Text(text) = message {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        // Centrifugo may batch pushes, one JSON per line.
                        for line in text.lines() {
                            if let Some(sent) = sent_at(line) {
                                on_message(sent);
                            }
                        }
                    }
                }
            })
        }
    };
    tokio::time::timeout(Duration::from_secs(30), is_ready)
        .await
        .context("subscriber not ready in time")??;
    Ok(handle)
}

/// The send time in a message's text: confab's `data.text`, or Centrifugo's `pub.data.text`
/// (or `push.pub.data.text`).
fn sent_at(json: &str) -> Option<u64> {
    let value: Value = serde_json::from_str(json).ok()?;
    let text = value["data"]["text"]
        .as_str()
        .or_else(|| value["pub"]["data"]["text"].as_str())
        .or_else(|| value["push"]["pub"]["data"]["text"].as_str())?;
    text.get(..20)?.parse().ok()
}

/// The server's resident memory per idle connection, in bytes.
async fn idle(server: &Server, transport: Transport, count: usize) -> anyhow::Result<f64> {
    let pid = server.pid()?;
    let tokens: Vec<String> = (0..count)
        .map(|i| server.token(&format!("idle-{i}")))
        .collect::<Result<_, _>>()?;
    let before = rss(pid)?;
    let connections: Vec<tokio::task::JoinHandle<()>> = futures::stream::iter(tokens)
        .map(|token| async move { subscribe(server, transport, &token, |_| {}).await })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    // Let allocator and kernel buffers settle before reading the figure.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss(pid)?;
    for connection in &connections {
        connection.abort();
    }
    Ok((after.saturating_sub(before)) as f64 / count as f64)
}

struct FanoutResult {
    deliveries: u64,
    expected: u64,
    deliveries_per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_seconds_per_100k: f64,
}

async fn fanout(
    server: &Server,
    transport: Transport,
    args: &FanoutArgs,
    config: &Config,
) -> anyhow::Result<FanoutResult> {
    let pid = server.pid()?;
    let http = crate::bench::http_client(config, 64)?;
    let users: Vec<String> = (0..args.subscribers)
        .map(|i| format!("member-{i}"))
        .collect();
    let tokens: Vec<String> = users
        .iter()
        .map(|u| server.token(u))
        .collect::<Result<_, _>>()?;
    // The chat: confab's group of every member, or Centrifugo's channel in every token.
    let chat = if server.target == Target::Centrifugo {
        CHANNEL.to_owned()
    } else {
        let ids: Vec<String> = futures::stream::iter(tokens.iter().skip(1))
            .map(|token| {
                let http = http.clone();
                let url = format!("{}/v1/me", server.base);
                async move {
                    let me: Value = http
                        .get(url)
                        .bearer_auth(token)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await?;
                    Ok::<_, anyhow::Error>(me["id"].as_str().unwrap_or_default().to_owned())
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let created: Value = http
            .post(format!("{}/v1/chats", server.base))
            .bearer_auth(&tokens[0])
            .json(&json!({"kind": "group", "name": "fanout", "members": ids}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        created["id"].as_str().context("no chat id")?.to_owned()
    };

    let epoch = Instant::now();
    let histogram = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let last_receipt = Arc::new(Mutex::new(epoch));
    let subscribers: Vec<tokio::task::JoinHandle<()>> = futures::stream::iter(tokens.iter())
        .map(|token| {
            let histogram = Arc::clone(&histogram);
            let received = Arc::clone(&received);
            let last_receipt = Arc::clone(&last_receipt);
            async move {
                subscribe(server, transport, token, move |sent| {
                    let now = epoch.elapsed().as_micros() as u64;
                    if let Ok(mut h) = histogram.lock() {
                        let _ = h.record(now.saturating_sub(sent));
                    }
                    received.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(mut last) = last_receipt.lock() {
                        *last = Instant::now();
                    }
                })
                .await
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;

    let cpu_before = cpu_seconds(pid)?;
    let messages = u64::from(args.rate) * args.seconds;
    let expected = messages * args.subscribers as u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(args.rate)));
    let started = Instant::now();
    for _ in 0..messages {
        ticker.tick().await;
        let stamp = format!("{:020}", epoch.elapsed().as_micros());
        let text = format!("{stamp}{}", "x".repeat(128 - stamp.len()));
        let http = http.clone();
        let request = match server.target {
            Target::Centrifugo => http
                .post(format!("{}/api/publish", server.base))
                .header("X-API-Key", CENTRIFUGO_API_KEY)
                .json(&json!({"channel": chat, "data": {"text": text}})),
            _ => http
                .post(format!("{}/v1/chats/{chat}/signals", server.base))
                .bearer_auth(&tokens[0])
                .json(&json!({"kind": "message", "text": text})),
        };
        tokio::spawn(async move {
            if let Err(error) = request.send().await.and_then(|r| r.error_for_status()) {
                eprintln!("send failed: {error}");
            }
        });
    }
    // Wait for every delivery, or for deliveries to stop coming.
    loop {
        let count = received.load(std::sync::atomic::Ordering::Relaxed);
        let idle_for = last_receipt.lock().map(|l| l.elapsed()).unwrap_or_default();
        if count >= expected || idle_for > Duration::from_secs(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu_after = cpu_seconds(pid)?;
    let deliveries = received.load(std::sync::atomic::Ordering::Relaxed);
    let span = last_receipt
        .lock()
        .map(|l| l.duration_since(started))
        .unwrap_or_default();
    for subscriber in subscribers {
        subscriber.abort();
    }
    let histogram = histogram
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| Histogram::<u64>::new(3).expect("valid histogram"));
    Ok(FanoutResult {
        deliveries,
        expected,
        deliveries_per_second: deliveries as f64 / span.as_secs_f64().max(1e-9),
        p50_ms: histogram.value_at_quantile(0.5) as f64 / 1000.0,
        p99_ms: histogram.value_at_quantile(0.99) as f64 / 1000.0,
        cpu_seconds_per_100k: (cpu_after - cpu_before) / deliveries.max(1) as f64 * 100_000.0,
    })
}

pub async fn run(args: FanoutArgs, config: Config) -> anyhow::Result<()> {
    let targets: Vec<Target> = args
        .targets
        .split(',')
        .map(|t| match t.trim() {
            "embedded" => Ok(Target::Embedded),
            "stack" => Ok(Target::Stack),
            "centrifugo" => Ok(Target::Centrifugo),
            other => bail!("unknown target {other}"),
        })
        .collect::<Result<_, _>>()?;
    let transports: Vec<Transport> = args
        .transports
        .split(',')
        .map(|t| match t.trim() {
            "sse" => Ok(Transport::Sse),
            "ws" => Ok(Transport::Ws),
            other => bail!("unknown transport {other}"),
        })
        .collect::<Result<_, _>>()?;
    let mut rows = Vec::new();
    let mut table = vec![
        "| server | transport | idle RSS per connection | deliveries/s | p50 | p99 | CPU-s per 100k deliveries | delivered |".to_owned(),
        "|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for target in &targets {
        for transport in &transports {
            eprintln!(
                "{} over {}: idle connections",
                target.name(),
                transport.name()
            );
            let server = start(*target, &config, &args).await?;
            let per_connection = idle(&server, *transport, args.idle).await;
            server.stop().await;
            eprintln!("{} over {}: fan-out", target.name(), transport.name());
            let server = start(*target, &config, &args).await?;
            let result = fanout(&server, *transport, &args, &config).await;
            server.stop().await;
            let per_connection = per_connection?;
            let result = result?;
            table.push(format!(
                "| {} | {} | {:.1} KB | {:.0} | {:.1} ms | {:.1} ms | {:.3} | {}/{} |",
                target.name(),
                transport.name(),
                per_connection / 1000.0,
                result.deliveries_per_second,
                result.p50_ms,
                result.p99_ms,
                result.cpu_seconds_per_100k,
                result.deliveries,
                result.expected,
            ));
            rows.push(json!({
                "server": target.name(),
                "transport": transport.name(),
                "idle_connections": args.idle,
                "idle_rss_bytes_per_connection": per_connection,
                "subscribers": args.subscribers,
                "rate": args.rate,
                "seconds": args.seconds,
                "deliveries": result.deliveries,
                "expected": result.expected,
                "deliveries_per_second": result.deliveries_per_second,
                "p50_ms": result.p50_ms,
                "p99_ms": result.p99_ms,
                "cpu_seconds_per_100k_deliveries": result.cpu_seconds_per_100k,
            }));
        }
    }
    for line in &table {
        println!("{line}");
    }
    write_results(&args.out, &rows)?;
    Ok(())
}

fn write_results(out: &Path, rows: &[Value]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = out.join(format!("fanout-{stamp}.json"));
    let machine: HashMap<&str, Value> = HashMap::from([(
        "cores",
        json!(
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0)
        ),
    )]);
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({"machine": machine, "results": rows}))?,
    )?;
    eprintln!("results in {}", path.display());
    Ok(())
}
