//! The `confab` binary: one entry point for every process of a deployment.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use confab::Role;
use confab_runtime::config::{Config, StoreBackend};
use confab_runtime::identity::DevIdentity;
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "confab", version, about = "confab: a distributed chat backend")]
struct Cli {
    /// Configuration file (TOML). Default: `CONFAB_CONFIG`, else `./confab.toml` when present.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process: API, notifier and ws-plexer on `api.listen` (embedded defaults).
    Serve,
    /// The HTTP API alone.
    Api,
    /// The notifier alone (SSE delivery).
    Notifier,
    /// The ws-plexer alone (WebSocket delivery).
    WsPlexer,
    /// Creates or upgrades the store's schema. Safe to run twice.
    Migrate,
    /// Rebuilds the message search index from the store (resumes an interrupted run).
    Reindex(confab::reindex::ReindexArgs),
    /// Prints a token for USERNAME that a server in dev identity mode accepts.
    DevToken {
        username: String,
        /// Validity in hours.
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
    /// Measures the CQL store layer against raw prepared inserts and writes a results file.
    BenchStore(confab::bench_store::StoreBenchArgs),
    /// Measures message search: indexing rate and query latency on each engine, the search
    /// endpoint against the same queries sent to the engine directly.
    BenchSearch(confab::bench_search::SearchBenchArgs),
    /// Prints a new VAPID key pair for Web Push, as configuration lines.
    VapidKeys,
    /// Prints the OpenAPI description of every route.
    Openapi,
    /// Measures POST-to-delivery latency and writes a results file.
    Bench(confab::bench::BenchArgs),
    /// Measures a page of history and a page of the chat list through the HTTP API.
    BenchReads(confab::bench_reads::ReadsBenchArgs),
    /// Measures fan-out (idle memory per connection, deliveries, latency, CPU) side by side with
    /// Centrifugo and writes a results file.
    BenchFanout(confab::bench_fanout::FanoutArgs),
    /// Schedules, cancels and sends delayed pushes to a local Web Push receiver on each queue
    /// backend, and writes a results file.
    BenchPush(confab::bench_push::PushBenchArgs),
    /// Measures attachment upload and download throughput through confab against direct S3
    /// requests, and the server's memory while a large upload streams; writes a results file.
    BenchAttachments(confab::bench_attachments::AttachmentsBenchArgs),
    /// Removes attachment objects that no attachment references any more (never one still
    /// referenced, even while an upload of the same bytes runs), and staging objects older than a
    /// day, showing its progress.
    GcBlobs {
        /// Leave objects modified within this many seconds for a later run.
        #[arg(long, default_value_t = 0)]
        min_age_secs: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = Config::load(cli.config.as_deref())?;
    confab_runtime::telemetry::init_tracing(&config.telemetry);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match cli.command {
            Command::Serve => serve(Role::Serve, config).await,
            Command::Api => serve(Role::Api, config).await,
            Command::Notifier => serve(Role::Notifier, config).await,
            Command::WsPlexer => serve(Role::WsPlexer, config).await,
            Command::Migrate => migrate(&config).await,
            Command::Reindex(args) => confab::reindex::run(args, config).await,
            Command::BenchSearch(args) => confab::bench_search::run(args, config).await,
            Command::DevToken { username, hours } => {
                let identity = DevIdentity::open(&config.data_dir)?;
                println!(
                    "{}",
                    identity.mint(&username, Duration::from_secs(hours * 3600))
                );
                Ok(())
            }
            Command::Bench(args) => confab::bench::run(args, config).await,
            Command::BenchStore(args) => confab::bench_store::run(args, config).await,
            Command::BenchReads(args) => confab::bench_reads::run(args, config).await,
            Command::BenchFanout(args) => confab::bench_fanout::run(args, config).await,
            Command::BenchPush(args) => Box::pin(confab::bench_push::run(args, config)).await,
            Command::BenchAttachments(args) => confab::bench_attachments::run(args, config).await,
            Command::GcBlobs { min_age_secs } => {
                confab::gc_blobs(&config, Duration::from_secs(min_age_secs)).await
            }
            Command::VapidKeys => {
                let keys = confab_runtime::vapid::VapidKeys::generate();
                println!("CONFAB_PUSH__VAPID_PUBLIC_KEY={}", keys.public_key);
                println!("CONFAB_PUSH__VAPID_PRIVATE_KEY={}", keys.private_key);
                Ok(())
            }
            Command::Openapi => {
                println!("{}", serde_json::to_string_pretty(&confab::openapi())?);
                Ok(())
            }
        }
    })
}

async fn serve(role: Role, config: Config) -> anyhow::Result<()> {
    let addr = role.listen(&config);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    // Boxed: the whole process's future is large.
    Box::pin(confab::run(
        role,
        config,
        listener,
        confab_runtime::shutdown::on_signal(),
    ))
    .await
}

async fn migrate(config: &Config) -> anyhow::Result<()> {
    match config.store.backend {
        StoreBackend::Cql => {
            let options = confab_api::store::cql::CqlOptions::from_config(config);
            let applied = confab_api::store::cql::migrate(&options).await?;
            println!(
                "keyspace {}: applied migrations {applied:?}",
                options.keyspace
            );
        }
        StoreBackend::Embedded => {
            confab::open_store(config, true).await?;
            println!(
                "embedded store at {} is up to date",
                config.embedded_store_path().display()
            );
        }
    }
    if config.search.backend == confab_runtime::config::SearchBackend::Meilisearch {
        let search = confab::open_search(config)?.context("no search engine")?;
        search
            .prepare()
            .await
            .context("creating the Meilisearch index and its settings")?;
        println!("search index {} is up to date", config.search.index);
    }
    if config.bus.backend == confab_runtime::config::BusBackend::Nats {
        let bus = confab_runtime::bus::NatsBus::connect(
            &config.bus.nats_url,
            &config.bus.subject_prefix,
            config.log_settings(),
        )
        .await?;
        bus.ensure_stream().await?;
        println!(
            "event stream {} is up to date",
            confab_runtime::bus::NatsBus::stream_name(&config.bus.subject_prefix)
        );
    }
    Ok(())
}
