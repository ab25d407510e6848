//! confab's one typed configuration: defaults, then a TOML file (`--config`, or `CONFAB_CONFIG`, or
//! `confab.toml` in the working directory when present), then `CONFAB_` environment variables with
//! `__` between section and field (`CONFAB_STORE__BACKEND=cql`). Every field's default is documented
//! next to it. The defaults run the embedded single-node stack.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where embedded state lives (the embedded store, the dev signing key). Default `./confab-data`.
    pub data_dir: PathBuf,
    /// Secret for signed tickets and cursors, shared by every instance of a deployment. Default: none,
    /// which makes each process generate its own at start-up (fine for `confab serve`; set it when
    /// running several instances).
    pub secret_key: Option<String>,
    pub api: ListenConfig,
    pub notifier: NotifierConfig,
    pub ws_plexer: WsPlexerConfig,
    pub store: StoreConfig,
    pub bus: BusConfig,
    pub identity: IdentityConfig,
    pub telemetry: TelemetryConfig,
    pub push: PushConfig,
    pub search: SearchConfig,
    pub attachments: AttachmentsConfig,
    pub calls: CallsConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallsConfig {
    /// The secret shared with the TURN servers (coturn's `static-auth-secret`). Default: none,
    /// which makes `GET /v1/calls/turn-credentials` answer 404.
    pub turn_secret: Option<String>,
    /// The TURN servers' URIs handed out with credentials, comma-separated
    /// (`turn:turn.example.org:3478?transport=udp,turns:turn.example.org:5349`). Default empty.
    pub turn_uris: String,
    /// How long TURN credentials stay valid, in seconds. Default 3600.
    pub turn_ttl_secs: u64,
    /// How long a call rings before nobody having answered makes it `missed`, in seconds.
    /// Default 45.
    pub ring_timeout_secs: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            turn_secret: None,
            turn_uris: String::new(),
            turn_ttl_secs: 3_600,
            ring_timeout_secs: 45,
        }
    }
}

impl CallsConfig {
    /// The configured TURN URIs.
    pub fn turn_uris(&self) -> Vec<String> {
        self.turn_uris
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn turn_ttl(&self) -> Duration {
        Duration::from_secs(self.turn_ttl_secs.clamp(60, 7 * 24 * 3600))
    }

    pub fn ring_timeout(&self) -> Duration {
        Duration::from_secs(self.ring_timeout_secs.clamp(1, 3_600))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlobsBackend {
    /// Files in a directory (`attachments.dir`), for one machine.
    Local,
    /// An S3 bucket (SeaweedFS's S3 gateway in production), path-style.
    S3,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachmentsConfig {
    /// `local` or `s3`. Default `local`.
    pub backend: BlobsBackend,
    /// The local backend's directory. Default `<data_dir>/attachments`.
    pub dir: Option<PathBuf>,
    /// The S3 endpoint. Default `http://127.0.0.1:8333` (SeaweedFS's S3 gateway).
    pub s3_endpoint: String,
    /// The bucket. Default `confab`.
    pub s3_bucket: String,
    /// The region requests are signed for. Default `us-east-1`.
    pub s3_region: String,
    /// The access key id. Default empty.
    pub s3_access_key: String,
    /// The secret access key. Default empty.
    pub s3_secret_key: String,
    /// Prepended to every object key, so deployments can share a bucket. Default `confab/`.
    pub s3_prefix: String,
    /// The part size of multipart uploads, in bytes (at least 5 MiB). An upload holds at most two
    /// parts in memory. Default 8388608 (8 MiB).
    pub part_bytes: usize,
    /// The largest attachment, in bytes; a larger body is refused with 413 and nothing is kept.
    /// Default 104857600 (100 MiB).
    pub max_bytes: u64,
    /// Answer downloads with a redirect to a short-lived presigned URL of the bucket instead of
    /// streaming the bytes through confab (s3 backend only). Default false.
    pub presigned_redirect: bool,
    /// How long a presigned URL is valid, in seconds. Default 300.
    pub presigned_ttl_secs: u64,
    /// Images larger than this many pixels (width × height) get no thumbnail or preview and are
    /// kept as plain files (decompression bombs). Default 50000000.
    pub max_image_pixels: u64,
}

impl Default for AttachmentsConfig {
    fn default() -> Self {
        AttachmentsConfig {
            backend: BlobsBackend::Local,
            dir: None,
            s3_endpoint: "http://127.0.0.1:8333".into(),
            s3_bucket: "confab".into(),
            s3_region: "us-east-1".into(),
            s3_access_key: String::new(),
            s3_secret_key: String::new(),
            s3_prefix: "confab/".into(),
            part_bytes: crate::blobs::DEFAULT_PART_BYTES,
            max_bytes: 100 * 1024 * 1024,
            presigned_redirect: false,
            presigned_ttl_secs: 300,
            max_image_pixels: 50_000_000,
        }
    }
}

impl AttachmentsConfig {
    /// The S3 backend's settings.
    pub fn s3_settings(&self) -> crate::blobs::S3Settings {
        crate::blobs::S3Settings {
            endpoint: self.s3_endpoint.clone(),
            bucket: self.s3_bucket.clone(),
            region: self.s3_region.clone(),
            access_key: self.s3_access_key.clone(),
            secret_key: self.s3_secret_key.clone(),
            prefix: self.s3_prefix.clone(),
            part_bytes: self.part_bytes,
        }
    }

    pub fn presigned_ttl(&self) -> Duration {
        Duration::from_secs(self.presigned_ttl_secs.clamp(1, 7 * 24 * 3600))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Accept `http` push endpoints on loopback hosts (tests, local development). Anything else
    /// must be `https`. Default false.
    pub allow_insecure_endpoints: bool,
    /// The VAPID public key browsers subscribe with: base64url of the uncompressed P-256 point
    /// (`confab vapid-keys` makes a pair). Default: none (Web Push devices are refused).
    pub vapid_public_key: Option<String>,
    /// The VAPID private key (base64url of the 32-byte scalar). Default: none.
    pub vapid_private_key: Option<String>,
    /// The contact push services see in the VAPID token (`mailto:` or `https:`). Default
    /// `mailto:push@localhost`.
    pub vapid_subject: Option<String>,
    /// How long a message waits, unfetched, before its recipient's devices get a push, in
    /// milliseconds. Default 10000.
    pub delay_ms: Option<u64>,
    /// How long after its due time a push may still be sent; later it is dropped. Default 3600.
    pub ttl_secs: Option<u64>,
    /// Firebase Cloud Messaging (HTTP v1). Without a service-account key, FCM devices get no
    /// pushes.
    pub fcm: FcmConfig,
    /// Apple Push Notification service, with a token key. Without one, APNs devices get no
    /// pushes.
    pub apns: ApnsConfig,
}

/// FCM's credentials and address.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FcmConfig {
    /// Path of the service-account key file as Google issues it (JSON with `project_id`,
    /// `client_email`, `private_key` and `token_uri`). Default: none.
    pub service_account_file: Option<PathBuf>,
    /// The same key inline, as its JSON text (for a secret passed in the environment). Set this
    /// or `service_account_file`, not both. Default: none.
    pub service_account_json: Option<String>,
    /// FCM's base URL; messages go to `{base_url}/v1/projects/{project_id}/messages:send`.
    /// Default `https://fcm.googleapis.com`.
    pub base_url: Option<String>,
    /// Where access tokens are requested (OAuth 2.0 JWT-bearer grant). Default: the key's
    /// `token_uri`.
    pub token_uri: Option<String>,
}

/// APNs' credentials and address (token-based authentication).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApnsConfig {
    /// Path of the token key (`AuthKey_<key id>.p8`: PKCS #8 PEM of a P-256 key) from the Apple
    /// developer account. Default: none.
    pub key_file: Option<PathBuf>,
    /// The same key inline, as its PEM text. Set this or `key_file`, not both. Default: none.
    pub key_pem: Option<String>,
    /// The key's id (10 characters, shown with the key). Required with a key.
    pub key_id: Option<String>,
    /// The developer account's team id (10 characters). Required with a key.
    pub team_id: Option<String>,
    /// APNs' base URL; pushes go to `{base_url}/3/device/{token}` over HTTP/2. Default
    /// `https://api.push.apple.com`; `https://api.sandbox.push.apple.com` for development builds
    /// of an app.
    pub base_url: Option<String>,
}

/// FCM's base URL when none is configured.
pub const FCM_BASE_URL: &str = "https://fcm.googleapis.com";
/// APNs' base URL when none is configured.
pub const APNS_BASE_URL: &str = "https://api.push.apple.com";

/// A base URL setting: `http` or `https`, without a trailing slash.
fn base_url(value: Option<&str>, default: &str, name: &str) -> Result<String, ConfigError> {
    let value = value.map(str::trim).unwrap_or(default);
    match url::Url::parse(value) {
        Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
            Ok(value.trim_end_matches('/').to_owned())
        }
        _ => Err(ConfigError::Invalid(format!(
            "{name} `{value}` is not an http or https URL"
        ))),
    }
}

/// One key given as a file or inline: its text, or none.
fn key_text(
    file: Option<&Path>,
    inline: Option<&str>,
    names: (&str, &str),
) -> Result<Option<String>, ConfigError> {
    match (file, inline) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
            "set {} or {}, not both",
            names.0, names.1
        ))),
        (Some(path), None) => std::fs::read_to_string(path)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("{} {}: {e}", names.0, path.display()))),
        (None, Some(text)) => Ok(Some(text.to_owned())),
    }
}

impl FcmConfig {
    /// The service account, when a key is configured; a key that does not parse is an error.
    pub fn service_account(&self) -> Result<Option<crate::push_auth::ServiceAccount>, ConfigError> {
        let names = (
            "push.fcm.service_account_file",
            "push.fcm.service_account_json",
        );
        let Some(json) = key_text(
            self.service_account_file.as_deref(),
            self.service_account_json.as_deref(),
            names,
        )?
        else {
            return Ok(None);
        };
        crate::push_auth::ServiceAccount::from_json(&json)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("push.fcm: {e}")))
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> Result<String, ConfigError> {
        base_url(self.base_url.as_deref(), FCM_BASE_URL, "push.fcm.base_url")
    }

    /// The token URI: the setting, else the key's.
    pub fn token_uri(
        &self,
        account: &crate::push_auth::ServiceAccount,
    ) -> Result<String, ConfigError> {
        base_url(
            self.token_uri.as_deref(),
            &account.token_uri,
            "push.fcm.token_uri",
        )
    }
}

impl ApnsConfig {
    /// The token key, when one is configured; a key that does not parse, or one without its key
    /// id and team id, is an error.
    pub fn key(&self) -> Result<Option<crate::push_auth::ApnsKey>, ConfigError> {
        let Some(pem) = key_text(
            self.key_file.as_deref(),
            self.key_pem.as_deref(),
            ("push.apns.key_file", "push.apns.key_pem"),
        )?
        else {
            return Ok(None);
        };
        let (Some(key_id), Some(team_id)) = (&self.key_id, &self.team_id) else {
            return Err(ConfigError::Invalid(
                "push.apns.key_id and push.apns.team_id are required with an APNs key".into(),
            ));
        };
        crate::push_auth::ApnsKey::from_pem(&pem, key_id, team_id)
            .map(Some)
            .map_err(|e| ConfigError::Invalid(format!("push.apns: {e}")))
    }

    /// The base URL, without a trailing slash.
    pub fn base_url(&self) -> Result<String, ConfigError> {
        base_url(
            self.base_url.as_deref(),
            APNS_BASE_URL,
            "push.apns.base_url",
        )
    }
}

impl PushConfig {
    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.unwrap_or(10_000))
    }

    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_secs.unwrap_or(3_600).max(1))
    }

    pub fn subject(&self) -> String {
        self.vapid_subject
            .clone()
            .unwrap_or_else(|| "mailto:push@localhost".into())
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./confab-data"),
            secret_key: None,
            api: ListenConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            },
            notifier: NotifierConfig::default(),
            ws_plexer: WsPlexerConfig::default(),
            store: StoreConfig::default(),
            bus: BusConfig::default(),
            identity: IdentityConfig::default(),
            telemetry: TelemetryConfig::default(),
            push: PushConfig::default(),
            search: SearchConfig::default(),
            attachments: AttachmentsConfig::default(),
            calls: CallsConfig::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// Address to listen on. Defaults: api `127.0.0.1:8080` (also `confab serve`'s single port),
    /// ws-plexer `127.0.0.1:8082`.
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WsPlexerConfig {
    /// Address to listen on. Default `127.0.0.1:8082`.
    pub listen: SocketAddr,
    /// Where `confab ws-plexer` sends the API calls its sockets carry (`confab serve` calls its own
    /// API in process). Default `http://127.0.0.1:8080`.
    pub api_url: String,
    /// API calls a socket may have in flight at once; more are answered 429. Default 32.
    pub max_in_flight: usize,
    /// The largest frame a client may send, in bytes; a larger one closes the socket. Default 65536.
    pub max_frame_bytes: usize,
}

impl Default for WsPlexerConfig {
    fn default() -> Self {
        WsPlexerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8082)),
            api_url: "http://127.0.0.1:8080".into(),
            max_in_flight: 32,
            max_frame_bytes: 64 * 1024,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotifierConfig {
    /// Address to listen on. Default `127.0.0.1:8081`.
    pub listen: SocketAddr,
    /// How long an SSE/WebSocket ticket stays valid, in seconds. Default 60.
    pub ticket_ttl_secs: u64,
    /// Interval of SSE keep-alive comments, in seconds. Default 15.
    pub keep_alive_secs: u64,
    /// Events buffered per connection before a slow client is disconnected. Default 1024.
    pub connection_buffer: usize,
    /// The most events a resume replays; a client further behind gets a `reset` and re-reads its
    /// chats instead. Default 10000.
    pub replay_limit: usize,
    /// Streams (SSE and WebSocket) one node holds at most; more are refused with 503. Default 200000.
    pub max_connections: usize,
    /// Streams one user holds at most on one node; more are refused with 429. Default 32.
    pub max_connections_per_user: usize,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            ticket_ttl_secs: 60,
            keep_alive_secs: 15,
            connection_buffer: 1024,
            replay_limit: 10_000,
            max_connections: 200_000,
            max_connections_per_user: 32,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// SQLite in `data_dir`, for one machine.
    Embedded,
    /// ScyllaDB (production) or Apache Cassandra.
    Cql,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded` or `cql`. Default `embedded`.
    pub backend: StoreBackend,
    /// CQL contact points, comma-separated `host:port`. Default `127.0.0.1:9042`.
    pub cql_contact_points: String,
    /// CQL keyspace. Default `confab`.
    pub keyspace: String,
    /// Replication map used when `confab migrate` creates the keyspace. Default
    /// `{'class': 'SimpleStrategy', 'replication_factor': 1}`; production uses
    /// `{'class': 'NetworkTopologyStrategy', '<dc>': 3}`.
    pub replication: String,
    /// CQL request timeout in milliseconds. Default 5000.
    pub request_timeout_ms: u64,
    /// Embedded database file. Default `<data_dir>/confab.sqlite3`.
    pub embedded_path: Option<PathBuf>,
    /// How long, in seconds, a message's nonce makes a repeated send return the first one instead
    /// of storing a second. Retries come within seconds or minutes; after this the nonce is
    /// forgotten. Default 3600.
    pub nonce_ttl_secs: u64,
    /// How the CQL store settles racing sends of one nonce: `jetstream` (a compare-and-set in a
    /// JetStream key-value bucket on `bus.nats_url`, no Paxos round) or `lwt` (a lightweight
    /// transaction per send, for deployments without NATS). Default `jetstream`. The embedded store
    /// settles them in its own transaction and ignores this.
    pub send_parity: SendParityMode,
}

/// See [`StoreConfig::send_parity`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendParityMode {
    Jetstream,
    Lwt,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::Embedded,
            cql_contact_points: "127.0.0.1:9042".into(),
            keyspace: "confab".into(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
            request_timeout_ms: 5_000,
            embedded_path: None,
            nonce_ttl_secs: 3_600,
            send_parity: SendParityMode::Jetstream,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SearchBackend {
    /// A tantivy index in `data_dir`, for one process.
    Tantivy,
    /// A Meilisearch server.
    Meilisearch,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// `tantivy` or `meilisearch`. Default `tantivy`.
    pub backend: SearchBackend,
    /// Meilisearch's URL. Default `http://127.0.0.1:7700`.
    pub meili_url: String,
    /// Meilisearch's API key: the master key, or a key allowed `search`, `documents.*`,
    /// `indexes.*`, `settings.*` and `tasks.get` on the index. Default: none.
    pub meili_key: Option<String>,
    /// The Meilisearch index's uid. Default `confab_signals`.
    pub index: String,
    /// How long a Meilisearch request, or waiting for one of its tasks, may take, in milliseconds.
    /// Default 10000.
    pub request_timeout_ms: u64,
    /// The tantivy index's directory. Default `<data_dir>/search`.
    pub embedded_path: Option<PathBuf>,
    /// Whether `confab api` (and `confab serve`) runs the indexer, which reads the event log into the
    /// index. Every running indexer does the same (idempotent) work; with several API replicas turn
    /// it off on all but one or two. Default true.
    pub indexer: bool,
    /// The most events the indexer applies in one batch. Default 500.
    pub batch_size: usize,
    /// How long the indexer waits for more events before applying a batch, in milliseconds.
    /// Default 50.
    pub batch_wait_ms: u64,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            backend: SearchBackend::Tantivy,
            meili_url: "http://127.0.0.1:7700".into(),
            meili_key: None,
            index: "confab_signals".into(),
            request_timeout_ms: 10_000,
            embedded_path: None,
            indexer: true,
            batch_size: 500,
            batch_wait_ms: 50,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusBackend {
    /// In-process broadcast, for one process.
    Embedded,
    /// NATS.
    Nats,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    /// `embedded` or `nats`. Default `embedded`.
    pub backend: BusBackend,
    /// NATS server URL. Default `nats://127.0.0.1:4222`.
    pub nats_url: String,
    /// Prefix of every subject, so deployments (and tests) can share a NATS server. The event
    /// stream is named after it (`<prefix>_events`, dots and dashes as `_`). Default `confab`.
    pub subject_prefix: String,
    /// How long the event log keeps events, so a client can resume after a disconnect this long.
    /// Default 86400 (24 hours).
    pub retention_secs: u64,
    /// How long the log recognises a re-published event id and drops the copy (JetStream's
    /// duplicate window). Default 120.
    pub duplicate_window_secs: u64,
    /// The embedded log's SQLite file. Default `<data_dir>/events.sqlite3`.
    pub embedded_path: Option<PathBuf>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            backend: BusBackend::Embedded,
            nats_url: "nats://127.0.0.1:4222".into(),
            subject_prefix: "confab".into(),
            retention_secs: 24 * 3600,
            duplicate_window_secs: 120,
            embedded_path: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// Tokens from `confab dev-token`, signed with a key in `data_dir`. Loopback only.
    Dev,
    /// Bearer tokens from an OpenID Connect provider (Keycloak).
    Oidc,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// `dev` or `oidc`. Default `dev`.
    pub mode: IdentityMode,
    /// OIDC issuer URL (discovery at `<issuer>/.well-known/openid-configuration`). Default
    /// `http://127.0.0.1:8180/realms/confab`.
    pub issuer_url: String,
    /// Client ids whose tokens are accepted: a token's `azp` must be one of them, or its `aud` must
    /// contain one. Comma-separated. Default `confab-web`.
    pub client_ids: String,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds. Default 30.
    pub leeway_secs: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            mode: IdentityMode::Dev,
            issuer_url: "http://127.0.0.1:8180/realms/confab".into(),
            client_ids: "confab-web".into(),
            leeway_secs: 30,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `tracing` filter directive. Default `info` (overridden by `RUST_LOG`).
    pub log_filter: String,
    /// `text` or `json` log lines. Default `text`.
    pub log_format: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_filter: "info".into(),
            log_format: "text".into(),
        }
    }
}

/// Top-level keys the environment may set; other `CONFAB_*` variables are not configuration.
const SECTIONS: &[&str] = &[
    "data_dir",
    "secret_key",
    "api",
    "notifier",
    "ws_plexer",
    "store",
    "bus",
    "identity",
    "telemetry",
    "push",
    "search",
    "attachments",
    "calls",
];

impl Config {
    /// Loads defaults, then `file` (or `CONFAB_CONFIG`, or `./confab.toml` when present), then the
    /// `CONFAB_` environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("CONFAB_CONFIG").map(PathBuf::from))
            .or_else(|| Some(PathBuf::from("confab.toml")).filter(|p| p.exists()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} not found",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(
            Env::prefixed("CONFAB_")
                .filter(|key| {
                    let key = key.as_str().to_ascii_lowercase();
                    SECTIONS
                        .iter()
                        .any(|s| key == *s || key.starts_with(&format!("{s}__")))
                })
                .split("__"),
        );
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        match (&self.push.vapid_public_key, &self.push.vapid_private_key) {
            (None, None) => {}
            (Some(public), Some(private)) => {
                let keys = crate::vapid::VapidKeys::from_private_key(private)
                    .map_err(|e| ConfigError::Invalid(format!("push.vapid_private_key: {e}")))?;
                if keys.public_key != public.trim() {
                    return Err(ConfigError::Invalid(
                        "push.vapid_public_key is not the public half of push.vapid_private_key"
                            .into(),
                    ));
                }
            }
            _ => {
                return Err(ConfigError::Invalid(
                    "set both push.vapid_public_key and push.vapid_private_key, or neither".into(),
                ));
            }
        }
        // The native push services' keys parse now, not at the first push.
        if let Some(account) = self.push.fcm.service_account()? {
            self.push.fcm.token_uri(&account)?;
        }
        self.push.fcm.base_url()?;
        self.push.apns.key()?;
        self.push.apns.base_url()?;
        if !confab_schema::subjects::is_valid_prefix(&self.bus.subject_prefix) {
            return Err(ConfigError::Invalid(format!(
                "bus.subject_prefix `{}` must be dot-separated tokens of letters, digits, `_` or `-`",
                self.bus.subject_prefix
            )));
        }
        if !self
            .store
            .keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || self.store.keyspace.is_empty()
            || self.store.keyspace.len() > 48
        {
            return Err(ConfigError::Invalid(format!(
                "store.keyspace `{}` must be 1-48 letters, digits or `_`",
                self.store.keyspace
            )));
        }
        if self.search.index.is_empty()
            || self.search.index.len() > 400
            || !self
                .search
                .index
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ConfigError::Invalid(format!(
                "search.index `{}` must be 1-400 letters, digits, `_` or `-`",
                self.search.index
            )));
        }
        if self.search.batch_size == 0 {
            return Err(ConfigError::Invalid(
                "search.batch_size must be at least 1".into(),
            ));
        }
        if self.attachments.max_bytes == 0 {
            return Err(ConfigError::Invalid(
                "attachments.max_bytes must be above 0".into(),
            ));
        }
        if self.identity.mode == IdentityMode::Oidc && self.client_ids().is_empty() {
            return Err(ConfigError::Invalid("identity.client_ids is empty".into()));
        }
        Ok(())
    }

    pub fn client_ids(&self) -> Vec<String> {
        self.identity
            .client_ids
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The embedded event log's file.
    pub fn embedded_bus_path(&self) -> PathBuf {
        self.bus
            .embedded_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("events.sqlite3"))
    }

    /// The event log's retention and duplicate window.
    pub fn log_settings(&self) -> crate::bus::LogSettings {
        crate::bus::LogSettings {
            retention: Duration::from_secs(self.bus.retention_secs.max(1)),
            duplicate_window: Duration::from_secs(self.bus.duplicate_window_secs.max(1)),
        }
    }

    /// The tantivy index's directory.
    pub fn embedded_search_path(&self) -> PathBuf {
        self.search
            .embedded_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("search"))
    }

    /// Where the Meilisearch index is.
    pub fn meili_settings(&self) -> crate::search::MeiliSettings {
        crate::search::MeiliSettings {
            url: self.search.meili_url.clone(),
            api_key: self.search.meili_key.clone().filter(|k| !k.is_empty()),
            index: self.search.index.clone(),
            timeout: Duration::from_millis(self.search.request_timeout_ms.max(1)),
        }
    }

    pub fn embedded_store_path(&self) -> PathBuf {
        self.store
            .embedded_path
            .clone()
            .unwrap_or_else(|| self.data_dir.join("confab.sqlite3"))
    }

    /// The local attachments directory.
    pub fn attachments_dir(&self) -> PathBuf {
        self.attachments
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("attachments"))
    }

    /// The secret for signed tokens: configured, or fresh random bytes for this process.
    pub fn secret_bytes(&self) -> Vec<u8> {
        match &self.secret_key {
            Some(secret) if !secret.is_empty() => secret.as_bytes().to_vec(),
            _ => rand::random::<[u8; 32]>().to_vec(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment's Jail API returns its own error type
mod tests {
    use super::*;

    #[test]
    fn calls_are_configured_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CONFAB_CALLS__TURN_SECRET", "shared");
            jail.set_env(
                "CONFAB_CALLS__TURN_URIS",
                "turn:t.example:3478, turns:t.example:5349",
            );
            jail.set_env("CONFAB_CALLS__RING_TIMEOUT_SECS", "2");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.calls.turn_secret.as_deref(), Some("shared"));
            assert_eq!(
                config.calls.turn_uris(),
                ["turn:t.example:3478", "turns:t.example:5349"]
            );
            assert_eq!(config.calls.ring_timeout(), Duration::from_secs(2));
            assert_eq!(config.calls.turn_ttl_secs, 3_600);
            Ok(())
        });
    }

    #[test]
    fn defaults_run_the_embedded_stack_on_loopback() {
        let config = Config::default();
        assert_eq!(config.store.backend, StoreBackend::Embedded);
        assert_eq!(config.bus.backend, BusBackend::Embedded);
        assert_eq!(config.identity.mode, IdentityMode::Dev);
        assert!(config.api.listen.ip().is_loopback());
        assert_eq!(config.api.listen.port(), 8080);
        assert_eq!(config.notifier.listen.port(), 8081);
        assert_eq!(config.ws_plexer.listen.port(), 8082);
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[store]\nbackend = \"cql\"\nkeyspace = \"from_file\"\n[bus]\nsubject_prefix = \"f\"\n",
            )?;
            jail.set_env("CONFAB_STORE__KEYSPACE", "from_env");
            jail.set_env("CONFAB_TEST_SOMETHING", "ignored");
            let config = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.store.backend, StoreBackend::Cql);
            assert_eq!(config.store.keyspace, "from_env");
            assert_eq!(config.bus.subject_prefix, "f");
            Ok(())
        });
    }

    #[test]
    fn unknown_fields_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[store]\nbakend = \"cql\"\n")?;
            assert!(Config::load(Some(Path::new("c.toml"))).is_err());
            jail.create_file("d.toml", "[bus]\nsubject_prefix = \"a b\"\n")?;
            assert!(Config::load(Some(Path::new("d.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn native_push_keys_load_from_files_and_the_environment() {
        use p256::pkcs8::EncodePrivateKey;
        let service_account = include_str!("../../tests/fixtures/fcm-test-service-account.json");
        let p8 = p256::SecretKey::from_slice(&[9u8; 32])
            .unwrap()
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        figment::Jail::expect_with(|jail| {
            // Inline, from the environment: JSON and PEM stay text.
            jail.set_env("CONFAB_PUSH__FCM__SERVICE_ACCOUNT_JSON", service_account);
            jail.set_env("CONFAB_PUSH__FCM__BASE_URL", "http://127.0.0.1:9/");
            jail.set_env("CONFAB_PUSH__APNS__KEY_PEM", &p8);
            jail.set_env("CONFAB_PUSH__APNS__KEY_ID", "ABC123DEFG");
            jail.set_env("CONFAB_PUSH__APNS__TEAM_ID", "TEAM123456");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let account = config.push.fcm.service_account().unwrap().unwrap();
            assert_eq!(account.project_id, "confab-contract-test");
            assert_eq!(
                config.push.fcm.token_uri(&account).unwrap(),
                "https://oauth2.googleapis.com/token"
            );
            assert_eq!(config.push.fcm.base_url().unwrap(), "http://127.0.0.1:9");
            let key = config.push.apns.key().unwrap().unwrap();
            assert_eq!(key.key_id, "ABC123DEFG");
            assert_eq!(
                config.push.apns.base_url().unwrap(),
                "https://api.push.apple.com"
            );
            Ok(())
        });
        figment::Jail::expect_with(|jail| {
            // From files named in a config file.
            jail.create_file("sa.json", service_account)?;
            jail.create_file("AuthKey.p8", &p8)?;
            jail.create_file(
                "c.toml",
                "[push.fcm]\nservice_account_file = \"sa.json\"\ntoken_uri = \"http://127.0.0.1:9/token\"\n\
                 [push.apns]\nkey_file = \"AuthKey.p8\"\nkey_id = \"ABC123DEFG\"\n\
                 team_id = \"TEAM123456\"\nbase_url = \"https://api.sandbox.push.apple.com\"\n",
            )?;
            let config = Config::load(Some(Path::new("c.toml"))).map_err(|e| e.to_string())?;
            let account = config.push.fcm.service_account().unwrap().unwrap();
            assert_eq!(
                config.push.fcm.token_uri(&account).unwrap(),
                "http://127.0.0.1:9/token"
            );
            assert!(config.push.apns.key().unwrap().is_some());
            Ok(())
        });
    }

    #[test]
    fn bad_native_push_settings_are_refused_at_start_up() {
        let refused = |toml: &str, expected: &str| {
            figment::Jail::expect_with(|jail| {
                jail.create_file("c.toml", toml)?;
                let error = Config::load(Some(Path::new("c.toml")))
                    .expect_err(toml)
                    .to_string();
                assert!(error.contains(expected), "{error} should say {expected}");
                Ok(())
            });
        };
        refused(
            "[push.fcm]\nservice_account_file = \"missing.json\"\n",
            "push.fcm.service_account_file missing.json",
        );
        refused(
            "[push.fcm]\nservice_account_json = \"{}\"\n",
            "push.fcm: the service-account key is not JSON as Google issues it",
        );
        refused(
            "[push.fcm]\nservice_account_json = \"{}\"\nservice_account_file = \"a\"\n",
            "not both",
        );
        refused(
            "[push.fcm]\nbase_url = \"fcm.googleapis.com\"\n",
            "push.fcm.base_url",
        );
        refused(
            "[push.apns]\nkey_pem = \"-----BEGIN PRIVATE KEY-----\"\nkey_id = \"ABC123DEFG\"\n\
             team_id = \"TEAM123456\"\n",
            "push.apns: the APNs key is not a PKCS #8 PEM P-256 private key",
        );
        refused(
            "[push.apns]\nkey_pem = \"x\"\n",
            "push.apns.key_id and push.apns.team_id are required",
        );
    }
}
