//! `confab bench-reads`: the latency of the two reads every client makes most, through the whole
//! HTTP stack: a page of 50 of a chat's history (with reactions), and a page of 50 of the chat list
//! (with each chat's latest signal and unread count). The baseline, measured in the same run, is
//! `GET /v1/me`: authentication and routing without the reads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use confab_runtime::config::Config;

#[derive(clap::Args, Debug, Clone)]
pub struct ReadsBenchArgs {
    /// Messages in the history chat; every third gets one to five reactions.
    #[arg(long, default_value_t = 2_000)]
    pub messages: usize,
    /// Chats in the reader's list, each with a few messages, half of them unread.
    #[arg(long, default_value_t = 200)]
    pub chats: usize,
    /// Measured requests per endpoint, one at a time.
    #[arg(long, default_value_t = 2_000)]
    pub requests: usize,
    /// Unmeasured requests per endpoint before the measured ones.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// A label for the results (e.g. `embedded` or `stack`).
    #[arg(long, default_value = "embedded")]
    pub label: String,
    /// Password for the OIDC password grant in oidc mode; default: the user name (dev realm).
    #[arg(long)]
    pub password: Option<String>,
    /// Folder for the results file.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

const EMOJI: [&str; 5] = ["👍", "🎉", "❤️", "😂", "👀"];
const USERS: usize = 4;

pub async fn run(args: ReadsBenchArgs, mut config: Config) -> anyhow::Result<()> {
    if args.messages < 100 || args.chats < 51 || args.requests == 0 {
        bail!(
            "--messages must be at least 100, --chats at least 51 (two pages), --requests positive"
        );
    }
    let data_dir = crate::bench::tempfile_dir()?;
    config.data_dir = data_dir.clone();
    config.store.embedded_path = None;
    config.api.listen = "127.0.0.1:0".parse()?;
    // One user sends and reads at the measured rates: no rate limits.
    config.limits = config.limits.without_rate_limits();
    let isolated = crate::bench::isolate(&mut config);
    let shutdown = CancellationToken::new();
    let listener = TcpListener::bind(config.api.listen).await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(crate::run(
        crate::Role::Serve,
        config.clone(),
        listener,
        shutdown.clone(),
    ));
    let result = measure_all(&args, &config, &base).await;
    shutdown.cancel();
    let _ = server.await;
    crate::bench::drop_isolated(&config, isolated).await;
    let _ = std::fs::remove_dir_all(&data_dir);
    let results = result?;

    std::fs::create_dir_all(&args.out)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    let path = args.out.join(format!("reads-{}-{stamp}.json", args.label));
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    println!("results written to {}", path.display());
    Ok(())
}

/// A client of the benchmark's server.
struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request.send().await?;
        let status = response.status();
        if !status.is_success() {
            bail!("{status}: {}", response.text().await.unwrap_or_default());
        }
        Ok(response.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, token: &str, path: &str) -> anyhow::Result<Value> {
        self.send(
            self.http
                .get(format!("{}{path}", self.base))
                .bearer_auth(token),
        )
        .await
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> anyhow::Result<Value> {
        self.send(
            self.http
                .post(format!("{}{path}", self.base))
                .bearer_auth(token)
                .json(&body),
        )
        .await
    }

    async fn put(&self, token: &str, path: &str) -> anyhow::Result<Value> {
        self.send(
            self.http
                .put(format!("{}{path}", self.base))
                .bearer_auth(token),
        )
        .await
    }
}

async fn measure_all(args: &ReadsBenchArgs, config: &Config, base: &str) -> anyhow::Result<Value> {
    let http = crate::bench::http_client(config, 64)?;
    let client = Client {
        http: http.clone(),
        base: base.to_owned(),
    };
    let password = args.password.as_deref();
    let mut tokens = Vec::new();
    for user in ["alice", "bob", "carol", "dave"] {
        tokens.push(crate::bench::token(config, &http, user, password).await?);
    }
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for token in &tokens {
        loop {
            match client.get(token, "/v1/me").await {
                Ok(me) => {
                    ids.push(me["id"].clone());
                    break;
                }
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(error) => return Err(error),
            }
        }
    }
    let (alice, bob) = (&tokens[0], &tokens[1]);

    // The history chat: messages from alice and bob, reactions from everyone.
    println!("setting up: {} messages with reactions", args.messages);
    let chat = client
        .post(
            alice,
            "/v1/chats",
            json!({"kind": "group", "name": "history", "members": [ids[1], ids[2], ids[3]]}),
        )
        .await?;
    let chat = chat["id"].as_str().context("no chat id")?.to_owned();
    let sent: Vec<anyhow::Result<Value>> = futures::stream::iter(0..args.messages)
        .map(|i| {
            let (client, chat) = (&client, &chat);
            let token = &tokens[i % 2];
            async move {
                client
                    .post(
                        token,
                        &format!("/v1/chats/{chat}/signals"),
                        json!({"kind": "message", "nonce": format!("m-{i}"),
                               "text": format!("message {i}, about as long as a chat line")}),
                    )
                    .await
            }
        })
        .buffered(32)
        .collect()
        .await;
    let sent: Vec<String> = sent
        .into_iter()
        .map(|s| Ok(s?["id"].as_str().context("no signal id")?.to_owned()))
        .collect::<anyhow::Result<_>>()?;
    let reactions: Vec<(usize, usize, usize)> = sent
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 == 0)
        .flat_map(|(i, _)| {
            let kinds = 1 + i % 5;
            // Each of the four users reacts with a different emoji.
            (0..kinds).map(move |k| (i, k, (i + k) % USERS))
        })
        .collect();
    let reacted: Vec<anyhow::Result<Value>> = futures::stream::iter(reactions)
        .map(|(i, k, user)| {
            let (client, chat, sent, tokens) = (&client, &chat, &sent, &tokens);
            async move {
                client
                    .put(
                        &tokens[user],
                        &format!(
                            "/v1/chats/{chat}/signals/{}/reactions/{}",
                            sent[i], EMOJI[k]
                        ),
                    )
                    .await
            }
        })
        .buffered(32)
        .collect()
        .await;
    let reactions_added = reacted.len();
    for reaction in reacted {
        reaction?;
    }

    // Bob's chat list: chats with a few messages each; he has read every other one.
    println!("setting up: {} chats in bob's list", args.chats);
    let listed: Vec<anyhow::Result<()>> = futures::stream::iter(0..args.chats)
        .map(|n| {
            let (client, ids) = (&client, &ids);
            async move {
                let chat = client
                    .post(
                        alice,
                        "/v1/chats",
                        json!({"kind": "group", "name": format!("chat {n}"), "members": [ids[1]]}),
                    )
                    .await?;
                let chat = chat["id"].as_str().context("no chat id")?.to_owned();
                let mut last = None;
                for m in 0..3 {
                    let signal = client
                        .post(
                            alice,
                            &format!("/v1/chats/{chat}/signals"),
                            json!({"kind": "message", "nonce": format!("c-{n}-{m}"), "text": format!("hello {m}")}),
                        )
                        .await?;
                    last = signal["id"].as_str().map(str::to_owned);
                }
                if n % 2 == 0
                    && let Some(last) = last
                {
                    client
                        .post(bob, &format!("/v1/chats/{chat}/read"), json!({"up_to": last}))
                        .await?;
                }
                Ok(())
            }
        })
        .buffered(16)
        .collect()
        .await;
    for chat in listed {
        chat?;
    }

    // The search indexer works through the set-up's messages in the background; measuring while
    // it still does would measure it too. A last message marks the end of the set-up: once a
    // search finds it, the indexer has caught up.
    let marker = format!("settled{}", uuid::Uuid::new_v4().simple());
    client
        .post(
            alice,
            &format!("/v1/chats/{chat}/signals"),
            json!({"kind": "message", "nonce": marker, "text": marker}),
        )
        .await?;
    println!("waiting for the search index to catch up");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let found = client.get(alice, &format!("/v1/search?q={marker}")).await?;
        if found["items"]
            .as_array()
            .is_some_and(|items| !items.is_empty())
        {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the search index did not catch up with the set-up in 300 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let history_path = format!("/v1/chats/{chat}/signals?limit=50");
    let deep = client
        .get(
            bob,
            &format!(
                "/v1/chats/{chat}/signals?limit=50&before={}",
                sent[args.messages / 2]
            ),
        )
        .await?;
    anyhow::ensure!(
        deep["items"].as_array().map(Vec::len) == Some(50),
        "a deep page is short"
    );
    let deep_path = format!(
        "/v1/chats/{chat}/signals?limit=50&before={}",
        sent[args.messages / 2]
    );
    let first_page = client.get(bob, "/v1/chats?limit=50").await?;
    let cursor = first_page["next_cursor"]
        .as_str()
        .context("the chat list has one page only")?;
    let second_page_path = format!("/v1/chats?limit=50&cursor={cursor}");

    let endpoints: [(&str, &str); 5] = [
        ("baseline_me", "/v1/me"),
        ("history_newest_50", history_path.as_str()),
        ("history_deep_50", deep_path.as_str()),
        ("chat_list_first_50", "/v1/chats?limit=50"),
        ("chat_list_second_50", second_page_path.as_str()),
    ];
    let mut report = serde_json::Map::new();
    let mut baseline_p99 = None;
    for (name, path) in endpoints {
        for _ in 0..args.warmup {
            client.get(bob, path).await?;
        }
        let mut histogram = Histogram::<u64>::new(3)?;
        for _ in 0..args.requests {
            let at = Instant::now();
            let page = client.get(bob, path).await?;
            histogram.record(at.elapsed().as_micros().max(1) as u64)?;
            if name != "baseline_me" && page["items"].as_array().is_none_or(Vec::is_empty) {
                bail!("{name}: an empty page");
            }
        }
        let p50 = histogram.value_at_quantile(0.5) as f64 / 1000.0;
        let p99 = histogram.value_at_quantile(0.99) as f64 / 1000.0;
        let baseline = *baseline_p99.get_or_insert(p99);
        println!("{name}: p50 {p50:.2} ms, p99 {p99:.2} ms");
        report.insert(
            name.to_owned(),
            json!({
                "requests": args.requests,
                "p50_ms": p50,
                "p99_ms": p99,
                "max_ms": histogram.max() as f64 / 1000.0,
                "ratio_p99_to_baseline": p99 / baseline.max(0.001),
            }),
        );
    }
    Ok(json!({
        "label": args.label,
        "store": format!("{:?}", config.store.backend),
        "bus": format!("{:?}", config.bus.backend),
        "identity": format!("{:?}", config.identity.mode),
        "history_messages": args.messages,
        "reactions": reactions_added,
        "chats_in_list": args.chats,
        "endpoints": report,
    }))
}
