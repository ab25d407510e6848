//! Test harness: spawns confab on port 0 against either the embedded defaults or the real services
//! `infra/up.sh` started (fresh keyspace and NATS subject prefix per test), and speaks to it as a
//! client would: real tokens, real SSE and WebSocket streams.

#![allow(dead_code)]

pub mod held_store;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use confab_runtime::config::{BusBackend, Config, IdentityMode, SearchBackend, StoreBackend};
use confab_runtime::identity::DevIdentity;
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// How long a starting confab may take to report ready: on the real stack it connects to every
/// service and prepares its statements, which a cold Cassandra on a busy machine answers slowly.
pub const READY_DEADLINE: Duration = Duration::from_secs(90);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// SQLite, in-process bus, dev identity.
    Embedded,
    /// Cassandra, NATS and Keycloak as started by `infra/up.sh`.
    Real,
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub fn cql_contact_points() -> String {
    env_or("CONFAB_TEST_CQL_CONTACT_POINTS", "127.0.0.1:9042")
}
pub fn nats_url() -> String {
    env_or("CONFAB_TEST_NATS_URL", "nats://127.0.0.1:4222")
}
pub fn oidc_issuer() -> String {
    env_or(
        "CONFAB_TEST_OIDC_ISSUER",
        "http://127.0.0.1:8180/realms/confab",
    )
}
pub fn oidc_client() -> String {
    env_or("CONFAB_TEST_OIDC_CLIENT_ID", "confab-web")
}
/// The Meilisearch `infra/up.sh` started, if it started one.
pub fn meili_url() -> Option<String> {
    std::env::var("CONFAB_TEST_MEILI_URL")
        .ok()
        .filter(|u| !u.is_empty())
}
pub fn meili_key() -> Option<String> {
    std::env::var("CONFAB_TEST_MEILI_KEY").ok()
}

/// Whether a Meilisearch server is configured and answers; prints a SKIPPED line (or panics in CI)
/// when it does not.
pub async fn meilisearch_available(test: &str) -> bool {
    let Some(url) = meili_url() else {
        assert!(
            !services_required(),
            "CONFAB_TEST_MEILI_URL is not set; infra/up.sh starts Meilisearch when its binary is there"
        );
        eprintln!(
            "SKIPPED {test}: no Meilisearch (CONFAB_TEST_MEILI_URL is not set); see infra/README.md"
        );
        return false;
    };
    let healthy = reqwest::Client::new()
        .get(format!("{}/health", url.trim_end_matches('/')))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    if !healthy {
        assert!(!services_required(), "Meilisearch does not answer at {url}");
        eprintln!("SKIPPED {test}: Meilisearch does not answer at {url}; run infra/up.sh");
    }
    healthy
}

pub fn s3_endpoint() -> String {
    env_or("CONFAB_TEST_S3_ENDPOINT", "http://127.0.0.1:8333")
}

/// In CI (`CONFAB_REQUIRE_SERVICES=1`) a missing service fails the test; elsewhere it is skipped,
/// loudly.
pub fn services_required() -> bool {
    std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Whether the real services answer; prints a SKIPPED line (or panics in CI) when they do not.
pub async fn real_stack_available(test: &str) -> bool {
    let checks = [
        (
            "Cassandra",
            cql_contact_points()
                .split(',')
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
        ("NATS", nats_url().trim_start_matches("nats://").to_owned()),
        (
            "SeaweedFS S3",
            s3_endpoint()
                .trim_start_matches("http://")
                .trim_end_matches('/')
                .to_owned(),
        ),
        (
            "Keycloak",
            oidc_issuer()
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
        ),
    ];
    for (name, addr) in checks {
        if tokio::net::TcpStream::connect(&addr).await.is_err() {
            assert!(
                !services_required(),
                "{name} is not reachable at {addr}; infra/up.sh starts it"
            );
            eprintln!("SKIPPED {test}: {name} is not reachable at {addr}; run infra/up.sh");
            return false;
        }
    }
    true
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..16]
    )
}

/// A fresh keyspace name for a test on the real store. The first in a test process also drops
/// the keyspaces that runs stopped before cleaning up left behind (over two hours old, so a run
/// going on beside this one keeps its own).
pub fn scratch_keyspace() -> String {
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| {
        // A thread of its own: this may be called inside a test's runtime, which cannot block.
        let swept = std::thread::spawn(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let mut config = Config::default();
            config.store.cql_contact_points = cql_contact_points();
            let options = confab_api::store::cql::CqlOptions::from_config(&config);
            runtime.block_on(confab_api::store::cql::drop_stale_scratch_keyspaces(
                &options,
                Duration::from_secs(2 * 3600),
            ))
        })
        .join();
        match swept {
            Ok(Ok(0)) => {}
            Ok(Ok(dropped)) => eprintln!("dropped {dropped} keyspaces left by earlier test runs"),
            // No store to sweep: the test that asked for the name says what it does about that.
            Ok(Err(_)) | Err(_) => {}
        }
    });
    confab_api::store::cql::scratch_keyspace()
}

/// A fresh signing secret, long and random enough to be accepted.
pub fn secret() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// A configuration for `stack` with its own data folder, keyspace and subject prefix.
pub fn config_for(stack: Stack, data_dir: PathBuf) -> Config {
    let mut config = Config {
        data_dir,
        ..Config::default()
    };
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.notifier.listen = "127.0.0.1:0".parse().unwrap();
    config.ws_plexer.listen = "127.0.0.1:0".parse().unwrap();
    config.secret_key = Some(secret());
    if stack == Stack::Real {
        config.store.backend = StoreBackend::Cql;
        config.store.cql_contact_points = cql_contact_points();
        config.store.keyspace = scratch_keyspace();
        config.store.request_timeout_ms = 20_000;
        config.bus.backend = BusBackend::Nats;
        config.bus.nats_url = nats_url();
        config.bus.subject_prefix = unique("t");
        config.identity.mode = IdentityMode::Oidc;
        config.identity.issuer_url = oidc_issuer();
        config.identity.client_ids = oidc_client();
        // Search on Meilisearch when there is one (a fresh index per app), else on tantivy.
        if let Some(url) = meili_url() {
            config.search.backend = SearchBackend::Meilisearch;
            config.search.meili_url = url;
            config.search.meili_key = meili_key();
            config.search.index = unique("t_");
        }
        config.attachments.backend = confab_runtime::config::BlobsBackend::S3;
        config.attachments.s3_endpoint = s3_endpoint();
        config.attachments.s3_bucket = env_or("CONFAB_TEST_S3_BUCKET", "confab");
        config.attachments.s3_region = env_or("CONFAB_TEST_S3_REGION", "us-east-1");
        config.attachments.s3_access_key = env_or("CONFAB_TEST_S3_ACCESS_KEY", "");
        config.attachments.s3_secret_key = env_or("CONFAB_TEST_S3_SECRET_KEY", "");
        config.attachments.s3_prefix = format!("{}/", unique("t"));
    }
    config
}

/// Waits (up to [`READY_DEADLINE`]) until the confab at `base` answers `/ready` with a success.
pub async fn wait_ready(base: &str) {
    let deadline = tokio::time::Instant::now() + READY_DEADLINE;
    loop {
        if let Ok(response) = reqwest::get(format!("{base}/ready")).await
            && response.status().is_success()
        {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            // One last look, which may find it ready after all: a check that was slow to answer
            // could have carried the loop past the deadline.
            let last = match reqwest::get(format!("{base}/ready")).await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(error) => error.to_string(),
            };
            panic!("{base} never became ready: {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// confab running in this process (`confab serve`'s composition) on a port chosen by the OS.
pub struct TestApp {
    pub stack: Stack,
    pub base: String,
    pub config: Config,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    _data: tempfile::TempDir,
}

pub async fn spawn_app(stack: Stack) -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let config = config_for(stack, data.path().to_path_buf());
    spawn_with(stack, config, data).await
}

pub async fn spawn_with(stack: Stack, config: Config, data: tempfile::TempDir) -> TestApp {
    spawn_role_with(stack, confab::Role::Serve, config, data).await
}

/// confab in `role` in this process. A role other than `serve` migrates no keyspace, and takes
/// dev tokens (the embedded stack's) only with `identity.allow_dev_in_distributed_roles`.
pub async fn spawn_role_with(
    stack: Stack,
    role: confab::Role,
    config: Config,
    data: tempfile::TempDir,
) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let mut server = tokio::spawn(confab::run(
        role,
        config.clone(),
        listener,
        shutdown.clone(),
    ));
    // A server that fails to start says why, rather than leaving the wait to time out.
    tokio::select! {
        () = wait_ready(&base) => {}
        ended = &mut server => panic!("confab at {base} stopped before it was ready: {ended:?}"),
    }
    // Pooled connections dropped before the server's header timeout closes them idle.
    let http = confab::bench::http_client(&config, 16).expect("an HTTP client");
    TestApp {
        stack,
        base,
        config,
        http,
        shutdown,
        server: Some(server),
        _data: data,
    }
}

impl TestApp {
    pub async fn wait_ready(&self) {
        wait_ready(&self.base).await;
    }

    /// A bearer token for `username`: minted by the dev key, or from Keycloak's password grant.
    pub async fn token(&self, username: &str) -> String {
        match self.stack {
            Stack::Embedded => DevIdentity::open(&self.config.data_dir)
                .unwrap()
                .mint(username, Duration::from_secs(600)),
            Stack::Real => keycloak_token(username, username).await,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, token: &str, path: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn delete(&self, token: &str, path: &str) -> reqwest::Response {
        self.http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn post(&self, token: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// The caller's user id (provisioning them).
    pub async fn put(&self, token: &str, path: &str, body: &Value) -> reqwest::Response {
        self.http
            .put(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn me(&self, token: &str) -> String {
        let response = self.get(token, "/v1/me").await;
        assert_eq!(response.status(), 200);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub async fn group_chat(&self, owner: &str, members: &[&str]) -> String {
        let response = self
            .post(
                owner,
                "/v1/chats",
                &serde_json::json!({"kind": "group", "name": "team", "members": members}),
            )
            .await;
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Stops the app and drops what it made on the real services. Boxed: the cleanup's future is
    /// large.
    pub fn stop(self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.stop_now())
    }

    /// Tells the app to shut down, without waiting for it (a stop then waits).
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the app and keeps what it made (its data folder, which it hands back, and its keyspace
    /// and streams on the real services): for a test that starts it again on the same state. A
    /// later app on the same configuration cleans up with [`TestApp::stop`].
    pub async fn stop_keeping_state(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(DEADLINE, server)
                .await
                .expect("server drains within the deadline")
                .unwrap()
                .unwrap();
        }
        self._data
    }

    async fn stop_now(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(DEADLINE, server)
                .await
                .expect("server drains within the deadline")
                .unwrap()
                .unwrap();
        }
        if self.stack == Stack::Real {
            Box::pin(clean_up_real(&self.config)).await;
        }
    }
}

/// Removes what a test made on the real services: its keyspace, event stream, key-value buckets,
/// search index and objects.
pub async fn clean_up_real(config: &Config) {
    let options = confab_api::store::cql::CqlOptions::from_config(config);
    let _ = confab_api::store::cql::drop_keyspace(&options).await;
    if let Ok(bus) = confab_runtime::bus::NatsBus::connect(
        &config.bus.nats_url,
        &config.bus.subject_prefix,
        config.log_settings(),
    )
    .await
    {
        let _ = bus.delete_stream().await;
    }
    if let Ok(presence) = confab_runtime::presence::NatsPresence::connect(
        &config.bus.nats_url,
        &config.bus.subject_prefix,
    )
    .await
    {
        let _ = presence.delete_bucket().await;
    }
    if let Ok(queue) = confab_runtime::push_queue::NatsPushQueue::connect(
        &config.bus.nats_url,
        &config.bus.subject_prefix,
    )
    .await
    {
        let _ = queue.delete_bucket().await;
    }
    let _ = confab_runtime::revocation::Revocations::delete_nats_bucket(
        &config.bus.nats_url,
        &config.bus.subject_prefix,
    )
    .await;
    if config.search.backend == SearchBackend::Meilisearch
        && let Ok(search) = confab_runtime::search::MeiliSearch::new(&config.meili_settings())
    {
        let _ = search.delete_index().await;
    }
    // The test's objects under its own key prefix.
    let blobs = confab_runtime::blobs::S3Blobs::new(&config.attachments.s3_settings());
    for _ in 0..100 {
        let Ok(objects) = confab_runtime::blobs::Blobs::list(&blobs, None, 1000).await else {
            break;
        };
        if objects.is_empty() {
            break;
        }
        for object in objects {
            let _ = confab_runtime::blobs::Blobs::delete(&blobs, &object.name).await;
        }
    }
    let _ = confab_runtime::blobs::Blobs::sweep_staging(&blobs, Duration::ZERO).await;
}

/// `confab` binaries on the real services, as a deployment runs them: a fresh keyspace and subject
/// prefix, migrated, configured through `CONFAB_` variables; [`Deployment::clean_up`] removes what
/// they made.
pub struct Deployment {
    pub env: Vec<(String, String)>,
    pub config: Config,
    pub dir: tempfile::TempDir,
}

impl Deployment {
    pub async fn new(name: &str) -> Deployment {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_for(Stack::Real, dir.path().to_path_buf());
        config.bus.subject_prefix = unique(name);
        let env: Vec<(String, String)> = [
            ("CONFAB_STORE__BACKEND", "cql".to_owned()),
            (
                "CONFAB_STORE__CQL_CONTACT_POINTS",
                config.store.cql_contact_points.clone(),
            ),
            ("CONFAB_STORE__KEYSPACE", config.store.keyspace.clone()),
            // Schema changes while other tests run take Cassandra a while.
            (
                "CONFAB_STORE__REQUEST_TIMEOUT_MS",
                config.store.request_timeout_ms.to_string(),
            ),
            ("CONFAB_BUS__BACKEND", "nats".to_owned()),
            ("CONFAB_BUS__NATS_URL", config.bus.nats_url.clone()),
            (
                "CONFAB_BUS__SUBJECT_PREFIX",
                config.bus.subject_prefix.clone(),
            ),
            ("CONFAB_IDENTITY__MODE", "oidc".to_owned()),
            (
                "CONFAB_IDENTITY__ISSUER_URL",
                config.identity.issuer_url.clone(),
            ),
            (
                "CONFAB_IDENTITY__CLIENT_IDS",
                config.identity.client_ids.clone(),
            ),
            ("CONFAB_SECRET_KEY", secret()),
            ("CONFAB_API__LISTEN", "127.0.0.1:0".to_owned()),
            ("CONFAB_NOTIFIER__LISTEN", "127.0.0.1:0".to_owned()),
            ("CONFAB_WS_PLEXER__LISTEN", "127.0.0.1:0".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let migrate = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
            .arg("migrate")
            .current_dir(dir.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .await
            .unwrap();
        assert!(
            migrate.status.success(),
            "{}",
            String::from_utf8_lossy(&migrate.stderr)
        );
        Deployment { env, config, dir }
    }

    /// Starts `confab <role>` with the deployment's variables and `extra`, and waits until it is
    /// ready.
    pub async fn start(&self, role: &str, extra: &[(&str, &str)]) -> ConfabProcess {
        let mut env = self.env.clone();
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let process = ConfabProcess::start(&[role], &env, self.dir.path()).await;
        wait_ready(&process.base).await;
        process
    }

    pub async fn clean_up(self) {
        Box::pin(clean_up_real(&self.config)).await;
    }
}

/// One round of a lobby race: every person (a token and a user id) enters the lobby at `path` at
/// once, through the API at `bases[(i + round) % n]`; then every pairing must be agreed by both
/// partners, and each paired person must have exactly the one direct chat of their pairing (no
/// second pairing made a chat that was then lost). Everyone leaves the lobby at the end.
pub async fn race_lobby_round(
    bases: &[&str],
    people: &[(String, String)],
    path: &str,
    round: usize,
) {
    let http = reqwest::Client::new();
    let via = |i: usize| bases[(i + round) % bases.len()];
    futures::future::join_all(people.iter().enumerate().map(|(i, (token, _))| {
        let request = http
            .post(format!("{}{path}", via(i)))
            .bearer_auth(token)
            .json(&serde_json::json!({}));
        async move {
            let status = request.send().await.unwrap().status().as_u16();
            assert!(matches!(status, 200 | 202), "round {round}: {status}");
        }
    }))
    .await;
    let mut partner_of = std::collections::HashMap::new();
    for (i, (token, id)) in people.iter().enumerate() {
        // Entering again answers where the caller stands and changes nothing.
        let status: Value = http
            .post(format!("{}{path}", via(i + 1)))
            .bearer_auth(token)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["state"] == "paired" {
            partner_of.insert(
                id.clone(),
                (
                    status["partner_id"].as_str().unwrap().to_owned(),
                    status["chat_id"].as_str().unwrap().to_owned(),
                ),
            );
        }
    }
    assert!(!partner_of.is_empty(), "round {round}: someone was paired");
    for (user, (partner, chat)) in &partner_of {
        assert_eq!(
            partner_of.get(partner),
            Some(&(user.clone(), chat.clone())),
            "round {round}: pairs agree"
        );
    }
    for (i, (token, id)) in people.iter().enumerate() {
        let chats: Value = http
            .get(format!("{}/v1/chats", via(i)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let direct: Vec<&str> = chats["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["kind"] == "direct")
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        match partner_of.get(id) {
            Some((_, chat)) => assert_eq!(direct, [chat.as_str()], "round {round}"),
            None => assert!(direct.is_empty(), "round {round}: {direct:?}"),
        }
    }
    for (i, (token, _)) in people.iter().enumerate() {
        let left = http
            .delete(format!("{}{path}", via(i)))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(left.status(), 204, "round {round}: leaving");
    }
}

/// An access token from Keycloak's password grant (enabled in the dev realm only).
pub async fn keycloak_token(username: &str, password: &str) -> String {
    keycloak_token_at(&oidc_issuer(), &oidc_client(), username, password).await
}

pub async fn keycloak_token_at(
    issuer: &str,
    client: &str,
    username: &str,
    password: &str,
) -> String {
    let response = reqwest::Client::new()
        .post(format!("{issuer}/protocol/openid-connect/token"))
        .form(&[
            ("grant_type", "password"),
            ("client_id", client),
            ("username", username),
            ("password", password),
            ("scope", "openid"),
        ])
        .send()
        .await
        .expect("Keycloak answers");
    assert!(
        response.status().is_success(),
        "token request for {username}: {}",
        response.status()
    );
    response.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A sign-in at Keycloak: its access token, and the refresh token that renews it in the same
/// session.
pub struct KeycloakSignIn {
    pub access_token: String,
    pub refresh_token: String,
}

/// A password-grant sign-in of `username` (whose password is their name) at the dev realm's
/// client.
pub async fn keycloak_sign_in(username: &str) -> KeycloakSignIn {
    keycloak_grant(&[
        ("grant_type", "password"),
        ("client_id", &oidc_client()),
        ("username", username),
        ("password", username),
        ("scope", "openid"),
    ])
    .await
}

/// Renews `sign_in` at Keycloak (the refresh-token grant): a new access token of the same session.
pub async fn keycloak_refresh(sign_in: &KeycloakSignIn) -> KeycloakSignIn {
    keycloak_grant(&[
        ("grant_type", "refresh_token"),
        ("client_id", &oidc_client()),
        ("refresh_token", &sign_in.refresh_token),
    ])
    .await
}

async fn keycloak_grant(form: &[(&str, &str)]) -> KeycloakSignIn {
    let response = reqwest::Client::new()
        .post(format!("{}/protocol/openid-connect/token", oidc_issuer()))
        .form(form)
        .send()
        .await
        .expect("Keycloak answers");
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert!(status.is_success(), "token request: {status} {body}");
    let field = |name: &str| {
        body[name]
            .as_str()
            .unwrap_or_else(|| panic!("no {name} in {body}"))
            .to_owned()
    };
    KeycloakSignIn {
        access_token: field("access_token"),
        refresh_token: field("refresh_token"),
    }
}

/// A Server-Sent Events stream, read event by event.
pub struct SseStream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
    /// The `ready` event's id: where a fresh stream starts (none on a resumed one).
    pub ready_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: String,
    pub data: Value,
}

impl SseStream {
    /// Opens `url` and waits for the `ready` event, so the subscription is live on return.
    pub async fn open(request: reqwest::RequestBuilder) -> SseStream {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200, "event stream refused");
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"),
            "not an event stream"
        );
        let mut stream = SseStream {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
            ready_id: None,
        };
        let ready = stream.next_event().await;
        assert_eq!(ready.event, "ready");
        stream.ready_id = ready.id;
        stream
    }

    /// The next event of type `name`, skipping others, within the deadline.
    pub async fn next_of(&mut self, name: &str) -> SseEvent {
        loop {
            let event = self.next_event().await;
            if event.event == name {
                return event;
            }
        }
    }

    /// Waits (within the deadline) until the server ends the stream, skipping what comes before.
    pub async fn ends(&mut self) {
        tokio::time::timeout(DEADLINE, async {
            while let Some(Ok(_)) = self.body.next().await {}
        })
        .await
        .expect("the stream ends before the deadline");
    }

    /// The next event, within the deadline.
    pub async fn next_event(&mut self) -> SseEvent {
        self.next_event_within(DEADLINE)
            .await
            .expect("an event arrives before the deadline")
    }

    /// The next event, if one arrives within `limit`.
    pub async fn next_event_within(&mut self, limit: Duration) -> Option<SseEvent> {
        tokio::time::timeout(limit, async {
            loop {
                if let Some(end) = self.buffer.find("\n\n") {
                    let frame: String = self.buffer.drain(..end + 2).collect();
                    let mut event = SseEvent {
                        id: None,
                        event: "message".into(),
                        data: Value::Null,
                    };
                    let mut data = String::new();
                    let mut only_comments = true;
                    for line in frame.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            event.id = Some(v.trim().to_owned());
                            only_comments = false;
                        } else if let Some(v) = line.strip_prefix("event:") {
                            event.event = v.trim().to_owned();
                            only_comments = false;
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                            only_comments = false;
                        }
                    }
                    if only_comments {
                        continue;
                    }
                    event.data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                    return event;
                }
                let chunk = self
                    .body
                    .next()
                    .await
                    .expect("stream open")
                    .expect("stream readable");
                self.buffer.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .ok()
    }
}

/// A running `confab` binary with stdout watched for its listening address.
pub struct ConfabProcess {
    pub child: tokio::process::Child,
    pub base: String,
}

impl ConfabProcess {
    /// Starts `confab <args>` with `env` and waits for its "listening on" line.
    pub async fn start(
        args: &[&str],
        env: &[(String, String)],
        dir: &std::path::Path,
    ) -> ConfabProcess {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"));
        command
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (key, _) in std::env::vars() {
            if key.starts_with("CONFAB_") && !key.starts_with("CONFAB_TEST_") {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = command.spawn().expect("confab starts");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let base = tokio::time::timeout(DEADLINE * 3, async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some((_, url)) = line.split_once(" listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("confab {args:?} exited before listening");
        })
        .await
        .expect("confab listens before the deadline");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        ConfabProcess { child, base }
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub async fn terminate(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("confab exits after SIGTERM")
            .unwrap();
        assert!(status.success(), "confab exited with {status}");
    }
}

/// A TCP relay between a client and a service, which a test can cut to simulate the service going
/// down (every relayed connection is closed and new ones are refused).
pub struct Relay {
    pub addr: std::net::SocketAddr,
    cut: CancellationToken,
}

impl Relay {
    pub async fn start(target: String) -> Relay {
        Relay::start_at("127.0.0.1:0".parse().unwrap(), target).await
    }

    /// A relay on `addr` (a cut relay's address, to bring the service back).
    pub async fn start_at(addr: std::net::SocketAddr, target: String) -> Relay {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    () = stop.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                let target = target.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        () = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Relay { addr, cut }
    }

    /// Closes every relayed connection and stops accepting new ones.
    pub fn cut(&self) {
        self.cut.cancel();
    }
}

/// Runs `async fn $name(stack: Stack)` as two tests, `$name::embedded` and `$name::real`; the
/// second is skipped without the real services (and fails in CI, see [`real_stack_available`]).
#[allow(unused_macros)]
macro_rules! on_both_stacks {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                Box::pin(super::$name($crate::support::Stack::Embedded)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn real() {
                if !$crate::support::real_stack_available(concat!(stringify!($name), "::real"))
                    .await
                {
                    return;
                }
                Box::pin(super::$name($crate::support::Stack::Real)).await;
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use on_both_stacks;
