//! `confab bench-attachments`: upload and download throughput of attachments through confab
//! (`confab serve` as a child process, storing in the configured S3 bucket, its metadata in the
//! configured store: a fresh keyspace of a CQL store, dropped afterwards) against direct
//! `aws-sdk-s3` PUT and GET of the same sizes to the same bucket, in the same run; and the server's
//! resident memory while the largest upload streams.
//!
//! Every body is made on the fly (a different pattern per upload, so deduplication never skips
//! work) and every object is removed at the end.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use confab_api::store::cql::{self, CqlOptions};
use confab_runtime::blobs::s3_sdk::primitives::ByteStream;
use confab_runtime::blobs::{Blobs, S3Blobs};
use confab_runtime::config::{BlobsBackend, Config, StoreBackend};
use confab_runtime::identity::DevIdentity;
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(clap::Args, Debug, Clone)]
pub struct AttachmentsBenchArgs {
    /// Body sizes in bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [1024u64, 1024 * 1024, 100 * 1024 * 1024])]
    pub sizes: Vec<u64>,
    /// Transfers per size and direction: the first size gets this many, each tenfold larger size
    /// a tenth (at least two).
    #[arg(long, default_value_t = 100)]
    pub transfers: usize,
    /// Concurrent readers of one object in the fan-out measurement (sizes up to 1 MiB: a
    /// picture sent to a group, fetched by every member at once).
    #[arg(long, default_value_t = 32)]
    pub readers: usize,
    /// A label for the results.
    #[arg(long, default_value = "stack")]
    pub label: String,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

const CHUNK: usize = 64 * 1024;

/// `len` bytes of the pattern `seed`, made as they are sent.
fn body(seed: u64, len: u64) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let mut sent = 0u64;
    futures::stream::iter(std::iter::from_fn(move || {
        if sent >= len {
            return None;
        }
        let n = (CHUNK as u64).min(len - sent) as usize;
        let mut chunk = vec![(seed % 251) as u8; n];
        chunk[..8.min(n)].copy_from_slice(&(seed ^ sent).to_le_bytes()[..8.min(n)]);
        sent += n as u64;
        Some(Ok(Bytes::from(chunk)))
    }))
}

/// Downloads each attachment of `ids` through confab, checking its length.
async fn download_all(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    ids: &[String],
    size: u64,
) -> anyhow::Result<()> {
    for id in ids {
        let mut stream = http
            .get(format!("{base}/v1/attachments/{id}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .bytes_stream();
        let mut got = 0u64;
        while let Some(chunk) = stream.next().await {
            got += chunk?.len() as u64;
        }
        if got != size {
            bail!("downloaded {got} of {size} bytes");
        }
    }
    Ok(())
}

/// The body `seed`, `len` whole in memory.
async fn body_bytes(seed: u64, len: u64) -> anyhow::Result<Bytes> {
    let mut bytes = Vec::with_capacity(len as usize);
    let mut chunks = Box::pin(body(seed, len));
    while let Some(chunk) = chunks.next().await {
        bytes.extend_from_slice(&chunk?);
    }
    Ok(Bytes::from(bytes))
}

/// The `Content-Digest` of the body `seed`, `len` (computed before the timed uploads: a client
/// hashes its file before it sends it).
async fn digest_of(seed: u64, len: u64) -> anyhow::Result<String> {
    use base64::Engine;
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    let mut chunks = Box::pin(body(seed, len));
    while let Some(chunk) = chunks.next().await {
        hasher.update(&chunk?);
    }
    Ok(format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
    ))
}

/// Uploads the body `seed`, `size` through confab; answers the attachment id. With `sampling`,
/// records the server's peak memory while it runs.
#[allow(clippy::too_many_arguments)]
async fn upload(
    http: &reqwest::Client,
    base: &str,
    chat: &str,
    token: &str,
    seed: u64,
    size: u64,
    digest: Option<String>,
    sampling: &Option<(u32, Arc<AtomicU64>)>,
) -> anyhow::Result<String> {
    let sampler = sampling.as_ref().map(|(pid, peak)| {
        let (pid, peak) = (*pid, Arc::clone(peak));
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss(pid).unwrap_or(0), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    });
    let mut request = http
        .post(format!("{base}/v1/chats/{chat}/attachments?name=b.bin"))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream");
    if let Some(digest) = digest {
        request = request.header("content-digest", digest);
    }
    // A file's length is known before it is sent, as a browser's upload of one says.
    let response = request
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(body(seed, size)))
        .send()
        .await;
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let meta: Value = response?.error_for_status()?.json().await?;
    Ok(meta["id"].as_str().context("no id")?.to_owned())
}

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

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64().max(1e-9)
}

/// The `confab serve` child the benchmark measures, storing attachments under its own prefix
/// of the bucket. Restarting it empties its memory cache, as a read on another node would find it.
struct Server {
    child: tokio::process::Child,
    base: String,
    pid: u32,
    data: PathBuf,
    prefix: String,
    max_bytes: u64,
    /// The CQL keyspace of its metadata (when the store is CQL).
    keyspace: String,
}

impl Server {
    async fn start(
        data: &std::path::Path,
        prefix: &str,
        max_bytes: u64,
        keyspace: &str,
    ) -> anyhow::Result<Server> {
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command.arg("serve");
        for (key, _) in std::env::vars() {
            let kept = ["CONFAB_ATTACHMENTS__", "CONFAB_STORE__"];
            if key.starts_with("CONFAB_") && !kept.iter().any(|k| key.starts_with(k)) {
                command.env_remove(key);
            }
        }
        command
            .env("CONFAB_STORE__KEYSPACE", keyspace)
            .env("CONFAB_DATA_DIR", data)
            .env("CONFAB_API__LISTEN", "127.0.0.1:0")
            .env("CONFAB_ATTACHMENTS__S3_PREFIX", prefix)
            .env("CONFAB_ATTACHMENTS__MAX_BYTES", max_bytes.to_string())
            // One user uploads back to back: the per-user upload rate limit is not what is measured.
            .env("CONFAB_LIMITS__UPLOAD__PER_SECOND", "0")
            .env("CONFAB_LIMITS__UPLOAD__BURST", "0")
            .env("CONFAB_TELEMETRY__LOG_FILTER", "warn")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        let mut child = command.spawn().context("starting confab serve")?;
        let pid = child.id().context("no pid")?;
        let base = crate::bench::listening_url(&mut child).await?;
        Ok(Server {
            child,
            base,
            pid,
            data: data.to_owned(),
            prefix: prefix.to_owned(),
            max_bytes,
            keyspace: keyspace.to_owned(),
        })
    }

    async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops the server and starts it again on the same data.
    async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await;
        *self = Server::start(
            &self.data.clone(),
            &self.prefix.clone(),
            self.max_bytes,
            &self.keyspace.clone(),
        )
        .await?;
        Ok(())
    }
}

/// The time of one phase's downloads through confab and of their direct counterparts.
#[derive(Default)]
struct Phase {
    confab: Duration,
    direct: Duration,
    count: usize,
}

/// How fast confab went against direct, from their times for the same bytes.
fn ratio(direct: Duration, confab: Duration) -> f64 {
    direct.as_secs_f64() / confab.as_secs_f64().max(1e-9)
}

/// Downloads each attachment of `ids` through confab, each followed by a direct GET of the
/// object of `keys` at the same position.
async fn download_paired(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    ids: &[String],
    direct: &S3Blobs,
    keys: &[String],
    size: u64,
) -> anyhow::Result<Phase> {
    let mut phase = Phase::default();
    for (id, key) in ids.iter().zip(keys) {
        let started = Instant::now();
        download_all(http, base, token, std::slice::from_ref(id), size).await?;
        phase.confab += started.elapsed();
        let started = Instant::now();
        direct_get(direct, key, size).await?;
        phase.direct += started.elapsed();
        phase.count += 1;
    }
    Ok(phase)
}

/// One `GetObject` of `key` straight from the bucket, read to the end and its length checked.
async fn direct_get(direct: &S3Blobs, key: &str, size: u64) -> anyhow::Result<()> {
    let object = direct
        .client()
        .get_object()
        .bucket(direct.bucket())
        .key(key)
        .send()
        .await
        .context("direct GET")?;
    let mut body = object.body;
    let mut got = 0u64;
    while let Some(chunk) = body.next().await {
        got += chunk?.len() as u64;
    }
    anyhow::ensure!(got == size, "direct GET read {got} of {size} bytes");
    Ok(())
}

/// `readers` concurrent downloads of the attachment `id` through confab.
async fn fan_out(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    size: u64,
    readers: usize,
) -> anyhow::Result<()> {
    let ids = vec![id.to_owned()];
    futures::future::try_join_all(
        (0..readers).map(|_| download_all(http, base, token, &ids, size)),
    )
    .await?;
    Ok(())
}

pub async fn run(args: AttachmentsBenchArgs, config: Config) -> anyhow::Result<()> {
    if config.attachments.backend != BlobsBackend::S3 {
        bail!(
            "set attachments.backend = s3 (CONFAB_ATTACHMENTS__BACKEND=s3) and its s3_* settings"
        );
    }
    let prefix = format!("bench{}/", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut settings = config.attachments.s3_settings();
    settings.prefix = prefix.clone();
    let direct = S3Blobs::new(&settings);
    direct.check().await.context("reaching the bucket")?;

    let data = tempfile::tempdir()?;
    let max_bytes = args.sizes.iter().max().copied().unwrap_or(0) + 1;
    let mut store = CqlOptions::from_config(&config);
    store.keyspace = format!("bench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut server = Server::start(data.path(), &prefix, max_bytes, &store.keyspace).await?;
    let result = measure(&args, &config, &mut server, data.path(), &direct, &prefix).await;
    server.stop().await;
    if config.store.backend == StoreBackend::Cql {
        let _ = cql::drop_keyspace(&store).await;
    }
    // Everything this run stored: confab's objects and the direct ones.
    for _ in 0..1000 {
        let Ok(objects) = direct.list(None, 1000).await else {
            break;
        };
        if objects.is_empty() {
            break;
        }
        for object in objects {
            let _ = direct.delete(&object.name).await;
        }
    }
    let _ = direct.sweep_staging(Duration::ZERO).await;
    let mut results = result?;
    results["label"] = json!(args.label);
    results["store"] = json!(format!("{:?}", config.store.backend));
    results["inline_bytes"] = json!(config.attachments.inline_bytes);
    std::fs::create_dir_all(&args.out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = args
        .out
        .join(format!("attachments-{}-{stamp}.json", args.label));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    println!("results written to {}", path.display());
    Ok(())
}

async fn measure(
    args: &AttachmentsBenchArgs,
    config: &Config,
    server: &mut Server,
    data_dir: &std::path::Path,
    direct: &S3Blobs,
    prefix: &str,
) -> anyhow::Result<Value> {
    let http = crate::bench::http_client(config, 64)?;
    let base = server.base.clone();
    let base = base.as_str();
    let token = DevIdentity::open(data_dir)?.mint("bench", Duration::from_secs(3600));
    let other = DevIdentity::open(data_dir)?.mint("bench-peer", Duration::from_secs(3600));
    let peer: Value = http
        .get(format!("{base}/v1/me"))
        .bearer_auth(&other)
        .send()
        .await?
        .json()
        .await?;
    let chat: Value = http
        .post(format!("{base}/v1/chats"))
        .bearer_auth(&token)
        .json(&json!({"kind": "group", "name": "bench", "members": [peer["id"]]}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let chat = chat["id"].as_str().context("no chat id")?.to_owned();
    let largest = args.sizes.iter().max().copied().unwrap_or(0);
    let mut rows = Vec::new();
    let mut idle_rss = rss(server.pid)?;
    let peak = Arc::new(AtomicU64::new(idle_rss));
    let mut seed = 1u64;
    for (i, &size) in args.sizes.iter().enumerate() {
        let base = server.base.clone();
        let base = base.as_str();
        let pid = server.pid;
        if size == largest {
            idle_rss = rss(pid)?;
            peak.store(idle_rss, Ordering::Relaxed);
        }
        // Samples the server's memory while the largest size uploads.
        let sampled = |size: u64| (size == largest).then(|| (pid, Arc::clone(&peak)));
        let transfers = (args.transfers / 10usize.pow(i as u32)).max(2);
        // Every transfer through confab is paired with its direct counterpart right after it,
        // so that both see the same moment of a shared, noisy machine; each ratio is over the
        // pairs of one phase. The bodies and their digests are made before anything is timed:
        // a client hashes its file before it sends it, and the direct PUT sends from memory.
        let mut seeds = Vec::with_capacity(transfers);
        for _ in 0..transfers {
            let (staged, declared, direct_seed) = (seed + 1, seed + 2, seed + 3);
            seed += 3;
            seeds.push((
                staged,
                declared,
                digest_of(declared, size).await?,
                direct_seed,
            ));
        }
        let client = direct.client();
        let (mut staged_up, mut declared_up, mut direct_up) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        let (mut ids, mut declared_ids, mut keys) = (Vec::new(), Vec::new(), Vec::new());
        for (n, (staged, declared, digest, direct_seed)) in seeds.into_iter().enumerate() {
            // Through confab: without a declared digest (staged, then copied to its content
            // address), then with one (written once, straight to its content address).
            for (seed, digest, elapsed, made) in [
                (staged, None, &mut staged_up, &mut ids),
                (declared, Some(digest), &mut declared_up, &mut declared_ids),
            ] {
                let started = Instant::now();
                let sampling = sampled(size);
                made.push(upload(&http, base, &chat, &token, seed, size, digest, &sampling).await?);
                *elapsed += started.elapsed();
            }
            // Direct: one PUT of the whole body, from memory.
            let bytes = body_bytes(direct_seed, size).await?;
            let key = format!("{prefix}direct/{size}-{n}");
            let started = Instant::now();
            client
                .put_object()
                .bucket(direct.bucket())
                .key(&key)
                .body(ByteStream::from(bytes))
                .send()
                .await
                .context("direct PUT")?;
            direct_up += started.elapsed();
            keys.push(key);
        }
        // The declared uploads, as a member fetches what was just sent (kept in memory when
        // the cache keeps objects of this size).
        let recent =
            download_paired(&http, base, &other, &declared_ids, direct, &keys, size).await?;
        // After a restart (an empty cache, as on another node), the first uploads: reads from
        // the storage of server-side copies.
        server.restart().await?;
        let base = server.base.clone();
        let base = base.as_str();
        // A node in service has its connections to the storage open and its first reads
        // done; a freshly started one has not. One download of an object neither
        // measurement reads again pays that once, and leaves the measured objects uncached.
        if let [_, .., warm_up] = declared_ids.as_slice() {
            download_all(&http, base, &other, std::slice::from_ref(warm_up), size).await?;
        }
        let cold = download_paired(&http, base, &other, &ids, direct, &keys, size).await?;
        // One object of each small size fetched by many members at once, also from the storage.
        let fan_out_size = size <= 1024 * 1024;
        let confab_fan_out = if fan_out_size {
            let started = Instant::now();
            fan_out(&http, base, &other, &declared_ids[0], size, args.readers).await?;
            Some(started.elapsed())
        } else {
            None
        };
        let direct_fan_out = if fan_out_size {
            let started = Instant::now();
            futures::future::try_join_all(
                (0..args.readers).map(|_| direct_get(direct, &keys[0], size)),
            )
            .await?;
            Some(started.elapsed())
        } else {
            None
        };
        // The declared uploads from the storage as well, each written by one PUT like the
        // direct objects (the staged ones are server-side copies): all but the fan-out's
        // object and the warm-up's.
        let cold_declared = match (
            declared_ids.get(1..declared_ids.len().saturating_sub(1)),
            keys.get(1..keys.len().saturating_sub(1)),
        ) {
            (Some(ids), Some(keys)) if !ids.is_empty() => {
                Some(download_paired(&http, base, &other, ids, direct, keys, size).await?)
            }
            _ => None,
        };
        for key in &keys {
            let _ = client
                .delete_object()
                .bucket(direct.bucket())
                .key(key)
                .send()
                .await;
        }
        let total = size * transfers as u64;
        let direct_down = recent.direct + cold.direct;
        let mut row = json!({
            "size_bytes": size,
            "transfers": transfers,
            "upload_mib_s": {
                "confab": mib_per_s(total, staged_up),
                "confab_declared_digest": mib_per_s(total, declared_up),
                "direct": mib_per_s(total, direct_up),
            },
            "download_mib_s": {
                "confab": mib_per_s(total, cold.confab),
                "confab_just_uploaded": mib_per_s(total, recent.confab),
                "direct": mib_per_s(2 * total, direct_down),
            },
            "upload_ratio": ratio(direct_up, staged_up),
            "upload_declared_digest_ratio": ratio(direct_up, declared_up),
            "download_ratio": ratio(cold.direct, cold.confab),
            "download_just_uploaded_ratio": ratio(recent.direct, recent.confab),
        });
        if let Some(phase) = cold_declared {
            row["download_mib_s"]["confab_declared"] =
                json!(mib_per_s(size * phase.count as u64, phase.confab));
            row["download_declared_ratio"] = json!(ratio(phase.direct, phase.confab));
        }
        if let (Some(confab), Some(direct)) = (confab_fan_out, direct_fan_out) {
            let fanned = size * args.readers as u64;
            row["fan_out"] = json!({
                "readers": args.readers,
                "confab_mib_s": mib_per_s(fanned, confab),
                "direct_mib_s": mib_per_s(fanned, direct),
                "ratio": ratio(direct, confab),
            });
        }
        println!("{row}");
        rows.push(row);
    }
    let peak_rss = peak.load(Ordering::Relaxed);
    Ok(json!({
        "sizes": rows,
        "server_rss": {
            "idle_bytes": idle_rss,
            "peak_during_largest_upload_bytes": peak_rss,
            "growth_bytes": peak_rss.saturating_sub(idle_rss),
            "largest_upload_bytes": largest,
        },
        "note": "confab: POST with a streamed body and its Content-Length (hashed, staged, multipart above 8 MiB, then a server-side copy to its content address); confab_declared_digest: the same POST with Content-Digest (hashed while written straight to its content address, completed once the hash matches); GET through confab of the declared uploads right after they were made (confab_just_uploaded: the memory cache's hits up to attachments.cache_object_bytes) and, after a restart of the server (an empty cache) and one download of an object not measured (a warm process), of the staged uploads (confab: reads from the storage, server-side copies) and of the declared uploads but the first and the last (confab_declared: reads from the storage of objects written by one PUT, as the direct ones); fan_out: one object fetched by that many concurrent readers right after the restart, through confab and directly; direct: one PutObject of the whole body from memory and one GetObject, same bucket, same run",
    }))
}
