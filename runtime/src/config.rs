//! confab's one typed configuration: defaults, then a TOML file (`--config`, or `CONFAB_CONFIG`, or
//! `confab.toml` in the working directory when present), then `CONFAB_` environment variables with
//! `__` between section and field (`CONFAB_STORE__BACKEND=cql`). Every field's default is documented
//! next to it. The defaults run the embedded single-node stack.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::addresses::TrustedProxies;

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
    /// Secret for signed tickets and cursors, shared by every instance of a deployment: at least 32
    /// bytes (`openssl rand -hex 32`); short or placeholder values are refused at start. It has the
    /// key id `default`. Default: none, which makes each process generate its own at start-up (fine
    /// for `confab serve`; set it, or `secret_keys`, when running several instances).
    pub secret_key: Option<String>,
    /// Several secrets with ids, for rotation: `id1:secret1,id2:secret2`. The first signs new
    /// tickets and cursors; all of them verify, so to rotate, put a new key first, and remove the
    /// old one once what it signed has expired (tickets: minutes; cursors: `cursor_ttl_secs`). Each
    /// secret is checked like `secret_key`. Set this or `secret_key`, not both. Default: none.
    pub secret_keys: Option<String>,
    /// How long a paging cursor stays valid, in seconds. Default 604800 (7 days).
    pub cursor_ttl_secs: u64,
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
    pub limits: LimitsConfig,
    pub server: ServerConfig,
    pub circles: CirclesConfig,
    pub queues: QueuesConfig,
    pub calls: CallsConfig,
}

/// Circles: groups joined with an access code whose members are paired at random.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CirclesConfig {
    /// A circle's time to live when its creator names none, in hours. Default 72.
    pub default_ttl_hours: f64,
    /// The longest time to live a circle may ask for, in hours. Default 720 (30 days).
    pub max_ttl_hours: f64,
    /// The most members a circle takes (and the default when its creator names none). Default 200.
    pub max_members: u32,
    /// How often each API process removes expired circles and their chats, in milliseconds.
    /// Default 60000.
    pub sweep_interval_ms: u64,
}

impl Default for CirclesConfig {
    fn default() -> Self {
        CirclesConfig {
            default_ttl_hours: 72.0,
            max_ttl_hours: 720.0,
            max_members: 200,
            sweep_interval_ms: 60_000,
        }
    }
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
    /// How long a participant of an answered call may have no live event stream (SSE or
    /// WebSocket, as the notifiers' presence records show) before the call counts them gone, in
    /// seconds: the next read of the call (its view, a join, a start in its chat) takes them out
    /// with a `left` signal, and a call nobody is left in ends. Without it, a call whose apps were
    /// all killed would stay active for good, and every later start in its chat would join it and
    /// ring nobody. Media flows peer to peer, so a call may go on through a short loss of the
    /// stream (a network change): the default leaves two minutes for a reconnect. Default 120.
    pub disconnect_grace_secs: u64,
}

impl Default for CallsConfig {
    fn default() -> Self {
        CallsConfig {
            turn_secret: None,
            turn_uris: String::new(),
            turn_ttl_secs: 3_600,
            ring_timeout_secs: 45,
            disconnect_grace_secs: 120,
        }
    }
}

/// The matching queues (`vent`, `listen`, `talk`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueuesConfig {
    /// How long a waiting or matched user may have no live event stream (SSE or WebSocket) before
    /// they are taken out of the queue (a match ends for both), in milliseconds. Default 30000.
    pub disconnect_grace_ms: u64,
    /// How often each API process looks for waiting users who went away, in milliseconds.
    /// Default 5000.
    pub sweep_interval_ms: u64,
}

impl Default for QueuesConfig {
    fn default() -> Self {
        QueuesConfig {
            disconnect_grace_ms: 30_000,
            sweep_interval_ms: 5_000,
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

    pub fn disconnect_grace(&self) -> Duration {
        Duration::from_secs(self.disconnect_grace_secs.clamp(1, 86_400))
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
    /// The part size of multipart uploads, in bytes (at least 5 MiB): a body sent without a
    /// `Content-Length` goes up in parts, and holds at most two in memory (one with its length
    /// goes up in one streamed PUT). Default 8388608 (8 MiB).
    pub part_bytes: usize,
    /// The largest attachment, in bytes; a larger body is refused with 413 and nothing is kept.
    /// Default 104857600 (100 MiB).
    pub max_bytes: u64,
    /// Answer downloads with a redirect to a short-lived presigned URL of the bucket instead of
    /// streaming the bytes through confab (s3 backend only). Bodies small enough for the memory
    /// cache (`cache_object_bytes`) are still served by confab: for them the redirect's extra
    /// round trip costs more than it saves. The web client is then allowed to fetch from
    /// `s3_endpoint`, which browsers must reach, and whose bucket must allow the client's origin
    /// (CORS). Default false.
    pub presigned_redirect: bool,
    /// How long a presigned URL is valid, in seconds. Default 300.
    pub presigned_ttl_secs: u64,
    /// Images larger than this many pixels (width × height) get no thumbnail or preview and are
    /// kept as plain files (decompression bombs). Default 50000000.
    pub max_image_pixels: u64,
    /// Memory for recently uploaded or read small objects (thumbnails, previews, small files),
    /// served without a request to the storage; 0 turns the cache off. Objects never change (they
    /// are named by their hash), so a kept copy is never stale. Default 33554432 (32 MiB).
    pub cache_bytes: usize,
    /// The largest object the memory cache keeps, in bytes. Default 1048576 (1 MiB).
    pub cache_object_bytes: usize,
    /// Keep an object read from the storage from its first read on. By default an object is
    /// kept from its second read (or a read while its first is still streaming): a first read
    /// is passed through without the copy and hash that keeping costs, and objects read only
    /// once push out nothing. Uploads are kept either way. Default false.
    pub cache_keeps_first_reads: bool,
    /// Bodies up to this many bytes (small files, previews) are kept in the store's rows instead
    /// of the bucket or directory: no request to the storage to write or read them, and no object
    /// in it. At most 65536; 0 writes every new body to the storage (bodies kept in the store
    /// before are still served and collected). Default 4096.
    pub inline_bytes: usize,
    /// How long an upload's body may take to arrive in all, in seconds, however steadily it comes
    /// (`limits.body_idle_timeout_secs` bounds the stalls); a slower upload is refused with 408
    /// and nothing is kept. At most [`MAX_UPLOAD_TIMEOUT_SECS`] (20 hours): the collector takes a
    /// reference no record names for an orphan a day after its upload began; 0 counts as 1.
    /// Default 14400 (4 hours).
    pub upload_timeout_secs: u64,
}

/// The largest `attachments.upload_timeout_secs`: 20 hours.
pub const MAX_UPLOAD_TIMEOUT_SECS: u64 = 20 * 3600;

/// The largest `attachments.inline_bytes`.
pub const MAX_INLINE_BYTES: usize = 64 * 1024;

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
            cache_bytes: 32 * 1024 * 1024,
            cache_object_bytes: 1024 * 1024,
            cache_keeps_first_reads: false,
            inline_bytes: 4096,
            upload_timeout_secs: 4 * 3600,
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

    /// What the memory cache keeps, or `None` when it is off.
    pub fn cache_limits(&self) -> Option<crate::blobs::CacheLimits> {
        (self.cache_bytes > 0 && self.cache_object_bytes > 0).then_some(crate::blobs::CacheLimits {
            total_bytes: self.cache_bytes,
            object_bytes: self.cache_object_bytes.min(self.cache_bytes),
            keeps_first_reads: self.cache_keeps_first_reads,
        })
    }

    /// How long an upload's body may take to arrive, within 1 second and
    /// [`MAX_UPLOAD_TIMEOUT_SECS`].
    pub fn upload_timeout(&self) -> Duration {
        Duration::from_secs(self.upload_timeout_secs.clamp(1, MAX_UPLOAD_TIMEOUT_SECS))
    }

    pub fn presigned_ttl(&self) -> Duration {
        Duration::from_secs(self.presigned_ttl_secs.clamp(1, 7 * 24 * 3600))
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// Accept push endpoints on internal addresses (loopback, private ranges, link-local), and
    /// `http` ones on loopback (tests, local development). Otherwise an endpoint must be `https`
    /// to a public address, by its IP or by what its name resolves to when a push is sent.
    /// Default false.
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
    /// How long an api process reuses the push settings it read for a chat's members (their
    /// mutes, delays and previews) for the chat's next messages, in milliseconds: a burst reads
    /// them once rather than for every message. A change made through the same process applies
    /// at once; one made through another api process applies to messages sent here after at most
    /// this long. 0 reads them for every message. Default 1000.
    pub settings_cache_ms: Option<u64>,
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

    pub fn settings_cache(&self) -> Duration {
        Duration::from_millis(self.settings_cache_ms.unwrap_or(1_000))
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
            secret_keys: None,
            cursor_ttl_secs: 7 * 24 * 3600,
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
            limits: LimitsConfig::default(),
            server: ServerConfig::default(),
            circles: CirclesConfig::default(),
            queues: QueuesConfig::default(),
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
    /// Streams one user holds at most on one node. One more takes the place of the user's oldest,
    /// which ends telling its client why (SSE `closed`, WebSocket close code 4009, reason
    /// `replaced`), so that connections that died unnoticed never lock a user out. At least 1 (0
    /// is refused at start). Default 32.
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

/// A token bucket: `per_second` tokens flow in, up to `burst`; each request takes one (in
/// `limits.chats`, one per person it puts into a chat). A `per_second` of 0 turns the limit off.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

impl RateLimit {
    pub const fn new(per_second: f64, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }

    pub const OFF: RateLimit = RateLimit::new(0.0, 0);

    /// Whether requests are limited at all.
    pub fn is_on(&self) -> bool {
        self.per_second > 0.0 && self.burst > 0
    }
}

/// How every role's HTTP server treats the TCP connections it accepts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// How long data written to a connection may stay unacknowledged before the kernel closes it
    /// (`TCP_USER_TIMEOUT`; Linux only, ignored elsewhere), in seconds; 0 leaves the kernel's
    /// default, which retransmits for about 15 minutes. A stream whose client vanished without
    /// closing (a phone that changed networks, a laptop that slept) is so noticed within about
    /// this long after the server's next write to it (SSE keep-alive comments every
    /// `notifier.keep_alive_secs`, WebSocket pings every 20 s), and its place freed. Default 30.
    pub tcp_user_timeout_secs: u64,
    /// TCP keepalive: a connection idle this long, in seconds, is probed, and then as often again
    /// until its peer answers; one that does not is closed (within `tcp_user_timeout_secs` of the
    /// first probe when that is set, else after the kernel's count of probes). 0 turns keepalive
    /// off. Default 15.
    pub tcp_keepalive_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tcp_user_timeout_secs: 30,
            tcp_keepalive_secs: 15,
        }
    }
}

impl ServerConfig {
    /// `TCP_USER_TIMEOUT`, or `None` for the kernel's default.
    pub fn tcp_user_timeout(&self) -> Option<Duration> {
        (self.tcp_user_timeout_secs > 0).then(|| Duration::from_secs(self.tcp_user_timeout_secs))
    }

    /// The keepalive idle time and probe interval, or `None` for no keepalive.
    pub fn tcp_keepalive(&self) -> Option<Duration> {
        (self.tcp_keepalive_secs > 0).then(|| Duration::from_secs(self.tcp_keepalive_secs))
    }
}

/// Abuse limits. Rate limits are kept in memory by each process: with `n` API processes behind a
/// balancer a user may reach up to `n` times a limit.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Messages sent per user (`POST /v1/chats/{id}/signals`, also over the WebSocket). Default
    /// `{ per_second = 20, burst = 200 }`.
    pub send: RateLimit,
    /// Edits and deletions of signals per user. Default `{ per_second = 10, burst = 100 }`.
    pub edit: RateLimit,
    /// Reactions added or removed per user. Default `{ per_second = 20, burst = 200 }`.
    pub react: RateLimit,
    /// Message and user searches per user. Default `{ per_second = 20, burst = 100 }`.
    pub search: RateLimit,
    /// Reads of who has read or received a signal per user (`GET
    /// /v1/chats/{id}/signals/{signal_id}/views` and `/deliveries`), each page counted: a page
    /// of a large chat reads up to a thousand markers. Default `{ per_second = 10, burst = 100 }`.
    pub receipts: RateLimit,
    /// Attachment uploads per user. Default `{ per_second = 5, burst = 50 }`.
    pub upload: RateLimit,
    /// Joins and leaves of the matching queues per user (`POST /v1/queues/{kind}/join`,
    /// `DELETE /v1/queues/{kind}`): each join may make a chat with a stranger. Default
    /// `{ per_second = 1, burst = 20 }`.
    pub queue: RateLimit,
    /// Joins of circles by access code per user (`POST /v1/circles/join`), counted whether the code
    /// opens a circle or not, so codes are not tried fast. Default `{ per_second = 0.2, burst = 10 }`.
    pub circle_join: RateLimit,
    /// People put into chats per user, chats created and members added counted together
    /// (`POST /v1/chats`, `POST /v1/chats/{id}/members`, also over the WebSocket): a new group
    /// counts its members other than its creator, a new direct chat one, an added member one.
    /// A request that changes nothing (a direct chat found again, a member already in) counts
    /// nothing, and one refused (4xx) one. Each person put into a chat gets its messages, calls and
    /// pushes, so it is people, not requests, that one user must not put into chats by the
    /// thousand: counted in requests, twenty groups of a thousand would pass while an admin
    /// adding members one by one would be held back. A group may start with more people than
    /// `burst`: it is created when the allowance is full, and leaves it in debt (the user's
    /// next request waits until it has refilled to cover it), so the allowance still bounds the
    /// people reached over time and one large group is never refused for good. Default
    /// `{ per_second = 0.5, burst = 300 }`: a person sets up a team of up to three hundred at
    /// once, or hundreds of direct chats and additions in a row, without waiting, and then thirty
    /// people a minute (an addition every 2 s, about as fast as someone picks people by hand);
    /// the largest group, a thousand (`MAX_INITIAL_MEMBERS`), is made from a full allowance and
    /// then the next chat waits about 23 minutes. An account that puts strangers into groups
    /// reaches no more than 300 people at once and 1,800 an hour after that (per API process).
    pub chats: RateLimit,
    /// Calls started per user (`POST /v1/chats/{id}/calls`, also over the WebSocket), a start
    /// that joins the chat's live call too: each rings every member and pushes a missed call to
    /// each who does not answer. Default `{ per_second = 0.05, burst = 10 }`: ten in a row,
    /// then three a minute.
    pub calls: RateLimit,
    /// Read and delivery markers moved per user (`POST /v1/chats/{id}/read` and `/delivered`,
    /// also over the WebSocket): each is a store write and, in a group, an event to every member.
    /// A client moves a marker as it shows or receives messages, not once per message of a busy
    /// chat. Default `{ per_second = 20, burst = 200 }`.
    pub marks: RateLimit,
    /// Typing notices per user (`POST /v1/chats/{id}/typing`, also over the WebSocket), across
    /// all their chats: each is an event to every member of the chat. Only calls that publish
    /// count: within one chat, calls closer than two seconds apart publish once, and the others
    /// cost nothing. Default `{ per_second = 2, burst = 30 }`.
    pub typing: RateLimit,
    /// Event streams opened and resumed per user (`GET /v1/events`, `GET /v1/ws`, and a socket's
    /// `resume` frame), on each node: each reads the user's chats from the store, and a resume
    /// also scans the log after its id (up to `notifier.replay_limit` × 20 events), so a loop of
    /// them must not cost that without end. A client opens a stream per tab or device and reopens
    /// it after a network change, a token's expiry or a node's restart, one reconnect per stream
    /// at a time. Default `{ per_second = 1, burst = 64 }`: a user reconnecting all the streams
    /// a node holds for them at once (`notifier.max_connections_per_user`, 32), twice, is not
    /// refused (a browser's `EventSource` does not retry after a 429), and then one a second,
    /// more than streams that each reconnect every few seconds need. An open that fails
    /// otherwise (a full node, a store read) counts nothing.
    pub stream_opens: RateLimit,
    /// Requests without a login (no `Authorization` header, or one whose token does not verify),
    /// per client address, except `/health`, `/ready` and `/metrics`, and event streams opened
    /// with a valid ticket (a browser's login). The client address is the peer's, or behind
    /// `trusted_proxies` the one they forward; IPv6 clients are counted by their /64, the block
    /// one host is given. Default `{ per_second = 50, burst = 500 }`.
    pub public: RateLimit,
    /// The proxies (load balancers, ingresses) in front of confab whose `X-Forwarded-For` says
    /// which address a request came from, as comma-separated addresses and ranges
    /// (`10.0.5.10, 10.0.6.0/28`). The header is read from the right, past these proxies, to the
    /// first address not among them; a client's own entries left of it are ignored, and so is the
    /// header from any other peer. List only proxies that append their peer's address to the
    /// header, and keep the ranges narrow: any address listed that passes the header on untouched
    /// (a plain TCP balancer), or a client inside a range listed, can name any address it likes
    /// and take a fresh allowance with each. A range of every address is refused. Without it,
    /// every client behind a proxy shares the proxy's allowance in `public`. Default: none.
    pub trusted_proxies: String,
    /// Origins (`https://app.example.com`) whose browser scripts may call the API, the ticket
    /// endpoint and the event streams (CORS), comma-separated; `*` allows any origin. Default: none.
    pub cors_origins: String,
    /// The largest request body, in bytes, of every endpoint but attachment uploads (which have
    /// `attachments.max_bytes`); a larger one is refused with 413. Default 65536.
    pub body_bytes: usize,
    /// How long a client may take to send a request's headers, in seconds; a slower connection is
    /// closed. This also bounds how long a keep-alive connection may sit idle between requests,
    /// so clients that pool connections should drop them sooner. Default 10.
    pub header_timeout_secs: u64,
    /// How long a request may take until its response starts, in seconds (408 after that);
    /// attachment uploads are exempt, bounded by `body_idle_timeout_secs` and
    /// `attachments.upload_timeout_secs`. Default 60.
    pub request_timeout_secs: u64,
    /// How long a request body may stall between two chunks, in seconds. Default 30.
    pub body_idle_timeout_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            send: RateLimit::new(20.0, 200),
            edit: RateLimit::new(10.0, 100),
            react: RateLimit::new(20.0, 200),
            search: RateLimit::new(20.0, 100),
            receipts: RateLimit::new(10.0, 100),
            upload: RateLimit::new(5.0, 50),
            queue: RateLimit::new(1.0, 20),
            circle_join: RateLimit::new(0.2, 10),
            chats: RateLimit::new(0.5, 300),
            calls: RateLimit::new(0.05, 10),
            marks: RateLimit::new(20.0, 200),
            typing: RateLimit::new(2.0, 30),
            stream_opens: RateLimit::new(1.0, 64),
            public: RateLimit::new(50.0, 500),
            trusted_proxies: String::new(),
            cors_origins: String::new(),
            body_bytes: 64 * 1024,
            header_timeout_secs: 10,
            request_timeout_secs: 60,
            body_idle_timeout_secs: 30,
        }
    }
}

impl LimitsConfig {
    /// Turns every rate limit off (benchmarks, which send as one user at high rates).
    pub fn without_rate_limits(mut self) -> LimitsConfig {
        for limit in [
            &mut self.send,
            &mut self.edit,
            &mut self.react,
            &mut self.search,
            &mut self.receipts,
            &mut self.upload,
            &mut self.queue,
            &mut self.circle_join,
            &mut self.chats,
            &mut self.calls,
            &mut self.marks,
            &mut self.typing,
            &mut self.stream_opens,
            &mut self.public,
        ] {
            *limit = RateLimit::OFF;
        }
        self
    }

    /// The proxies whose `X-Forwarded-For` is believed.
    pub fn trusted_proxies(&self) -> Result<TrustedProxies, ConfigError> {
        TrustedProxies::parse(&self.trusted_proxies)
            .map_err(|error| ConfigError::Invalid(format!("limits.trusted_proxies: {error}")))
    }

    /// The allowed CORS origins.
    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_origins
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('/').to_owned())
            .collect()
    }

    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs.max(1))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs.max(1))
    }

    pub fn body_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.body_idle_timeout_secs.max(1))
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
    /// The most events the indexer applies in one batch: at least what arrives in one
    /// `batch_interval_ms` under the load expected, or a steady stream splits into a full batch
    /// and a small one per interval. Default 2000.
    pub batch_size: usize,
    /// How long the indexer waits for more events before applying a batch, in milliseconds.
    /// Default 50.
    pub batch_wait_ms: u64,
    /// The least time from the start of one indexing batch to the start of the next while
    /// messages keep coming, in milliseconds: how stale search may be under load, traded for the
    /// search engine's cost, which is mostly per batch (docs/BENCHMARKS.md). After a quiet
    /// interval, a message is indexed after `batch_wait_ms`. Default 1000.
    pub batch_interval_ms: u64,
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
            batch_size: 2000,
            batch_wait_ms: 50,
            batch_interval_ms: 1000,
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
    /// Default 86400 (24 hours); at most 604800 (7 days, `bus::MAX_RETENTION`).
    pub retention_secs: u64,
    /// How long the log recognises a re-published event id and drops the copy (JetStream's
    /// duplicate window). Default 120.
    pub duplicate_window_secs: u64,
    /// The embedded log's SQLite file. Default `<data_dir>/events.sqlite3`.
    pub embedded_path: Option<PathBuf>,
    /// How often an api process records that it is alive and looks for silent ones whose event
    /// outbox it must publish. Default 5000.
    pub outbox_sweep_interval_ms: u64,
    /// How long an api process may be silent before another publishes the events it left in the
    /// outbox. Longer than a pause of a live process (a stall, a store hiccup); a live writer
    /// wrongly swept only has its events published twice within the duplicate window, which the
    /// log drops. Default 30000.
    pub outbox_silent_after_ms: u64,
}

impl BusConfig {
    /// `outbox_sweep_interval_ms` as a duration.
    pub fn outbox_sweep_interval(&self) -> Duration {
        Duration::from_millis(self.outbox_sweep_interval_ms.max(100))
    }

    /// `outbox_silent_after_ms` as a duration.
    pub fn outbox_silent_after(&self) -> Duration {
        Duration::from_millis(self.outbox_silent_after_ms)
    }
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
            outbox_sweep_interval_ms: 5_000,
            outbox_silent_after_ms: 30_000,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// Tokens from `confab dev-token`, signed with a key in `data_dir`: anyone who can read that
    /// directory can be any user. Loopback only, for `confab serve`; `confab api`, `notifier` and
    /// `ws-plexer` refuse it unless `identity.allow_dev_in_distributed_roles` is set.
    Dev,
    /// Bearer tokens from an OpenID Connect provider (Keycloak).
    Oidc,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// `dev` or `oidc`. Default `dev` (for `confab serve` on loopback only).
    pub mode: IdentityMode,
    /// Lets `confab api`, `confab notifier` and `confab ws-plexer` run with `mode = dev` (tests of
    /// the distributed roles on one machine). Never in production. Default false.
    pub allow_dev_in_distributed_roles: bool,
    /// OIDC issuer URL (discovery at `<issuer>/.well-known/openid-configuration`); a token's `iss`
    /// must equal it exactly. Default `http://127.0.0.1:8180/realms/confab`.
    pub issuer_url: String,
    /// The audiences accepted, comma-separated: a token's `aud` must contain one of them (`azp`
    /// alone is not enough; in Keycloak, give the client an audience mapper). Back-channel logout
    /// tokens must be addressed to one of them too. Default `confab-web`.
    pub client_ids: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds. Default 30.
    pub leeway_secs: u64,
    /// How often the provider's signing keys (JWKS) are refetched in the background, in seconds; a
    /// key the provider removed stops being trusted within this time. A token naming an unknown key
    /// triggers a refetch too, at most once per 10 seconds. Default 300.
    pub jwks_refresh_secs: u64,
    /// How long a logout (back-channel logout, `POST /v1/me/logout-all`) is remembered, in seconds:
    /// it must outlive every access token issued before it. Default 86400. The sessions a logout
    /// everywhere ends (in confab, not at the provider, which may go on renewing their tokens) are
    /// remembered for `session_ttl_secs` if that is longer.
    pub revocation_ttl_secs: u64,
    /// The longest a session at the identity provider lives, renewing its tokens, in seconds (in
    /// Keycloak, the longer of "SSO Session Max" and "Offline Session Max" where offline tokens
    /// are used). The sessions each user's tokens were seen in are recorded this long, so that a
    /// logout everywhere ends every one of them, and a session it ended stays refused this long:
    /// the provider's session goes on, and may renew its tokens, until then. Default 2592000 (30
    /// days).
    pub session_ttl_secs: u64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            mode: IdentityMode::Dev,
            allow_dev_in_distributed_roles: false,
            issuer_url: "http://127.0.0.1:8180/realms/confab".into(),
            client_ids: "confab-web".into(),
            leeway_secs: 30,
            jwks_refresh_secs: 300,
            revocation_ttl_secs: 24 * 3600,
            session_ttl_secs: crate::sessions::DEFAULT_SESSION_TTL.as_secs(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `tracing` filter directive. Default `info,meilisearch_sdk::request=error` (overridden by
    /// `RUST_LOG`): the Meilisearch client logs every answer it did not expect as a warning,
    /// also the 404s confab asks for on purpose (an index or a checkpoint not made yet); the
    /// failures that matter are logged by confab itself.
    pub log_filter: String,
    /// `text` or `json` log lines. Default `text`.
    pub log_format: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_filter: "info,meilisearch_sdk::request=error".into(),
            log_format: "text".into(),
        }
    }
}

/// Top-level keys the environment may set; other `CONFAB_*` variables are not configuration.
const SECTIONS: &[&str] = &[
    "data_dir",
    "secret_key",
    "secret_keys",
    "cursor_ttl_secs",
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
    "limits",
    "server",
    "circles",
    "queues",
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
        let circles = &self.circles;
        if !(circles.default_ttl_hours > 0.0
            && circles.max_ttl_hours >= circles.default_ttl_hours
            && circles.max_ttl_hours.is_finite())
        {
            return Err(ConfigError::Invalid(
                "circles.default_ttl_hours must be above 0 and at most circles.max_ttl_hours"
                    .into(),
            ));
        }
        if circles.max_members < 2 {
            return Err(ConfigError::Invalid(
                "circles.max_members must be at least 2".into(),
            ));
        }
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
        if self.bus.retention_secs > crate::bus::MAX_RETENTION.as_secs() {
            // A resume past that would find the log's events and not the chats the user left.
            return Err(ConfigError::Invalid(format!(
                "bus.retention_secs must be at most {}",
                crate::bus::MAX_RETENTION.as_secs()
            )));
        }
        if self.notifier.max_connections_per_user == 0 {
            // Zero would refuse every stream, or (taken as one) silently cap users at one.
            return Err(ConfigError::Invalid(
                "notifier.max_connections_per_user must be at least 1".into(),
            ));
        }
        if self.attachments.max_bytes == 0 {
            return Err(ConfigError::Invalid(
                "attachments.max_bytes must be above 0".into(),
            ));
        }
        if self.attachments.inline_bytes > MAX_INLINE_BYTES {
            return Err(ConfigError::Invalid(format!(
                "attachments.inline_bytes must be at most {MAX_INLINE_BYTES}: larger cells slow the store"
            )));
        }
        self.keyring()?;
        for (name, limit) in [
            ("send", self.limits.send),
            ("edit", self.limits.edit),
            ("react", self.limits.react),
            ("search", self.limits.search),
            ("receipts", self.limits.receipts),
            ("upload", self.limits.upload),
            ("queue", self.limits.queue),
            ("circle_join", self.limits.circle_join),
            ("chats", self.limits.chats),
            ("calls", self.limits.calls),
            ("marks", self.limits.marks),
            ("typing", self.limits.typing),
            ("stream_opens", self.limits.stream_opens),
            ("public", self.limits.public),
        ] {
            if !limit.per_second.is_finite() || limit.per_second < 0.0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name}.per_second must be 0 (off) or above"
                )));
            }
        }
        self.limits.trusted_proxies()?;
        for origin in self.limits.cors_origins() {
            if origin != "*"
                && !url::Url::parse(&origin)
                    .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.path() == "/")
            {
                return Err(ConfigError::Invalid(format!(
                    "limits.cors_origins: `{origin}` is not an origin (scheme://host[:port]) or `*`"
                )));
            }
        }
        if self.limits.body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.body_bytes must be at least 1024".into(),
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

    /// The configured signing secrets (`secret_keys` or `secret_key`), checked; `None` when neither
    /// is set.
    pub fn keyring(&self) -> Result<Option<crate::signed::Keyring>, ConfigError> {
        use crate::signed::Keyring;
        let single = self.secret_key.as_deref().filter(|s| !s.is_empty());
        let many = self.secret_keys.as_deref().filter(|s| !s.trim().is_empty());
        match (single, many) {
            (None, None) => Ok(None),
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "set secret_key or secret_keys, not both".into(),
            )),
            (Some(secret), None) => Keyring::single(secret)
                .map(Some)
                .map_err(|e| ConfigError::Invalid(format!("secret_key: {e}"))),
            (None, Some(list)) => Keyring::parse(list)
                .map(Some)
                .map_err(|e| ConfigError::Invalid(format!("secret_keys: {e}"))),
        }
    }

    /// The secrets for signed tokens: configured, or a fresh random one for this process.
    pub fn keyring_or_random(&self) -> Result<crate::signed::Keyring, ConfigError> {
        Ok(self
            .keyring()?
            .unwrap_or_else(crate::signed::Keyring::random))
    }

    /// How long a paging cursor stays valid.
    pub fn cursor_ttl(&self) -> Duration {
        Duration::from_secs(self.cursor_ttl_secs.max(60))
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
    fn server_socket_options_load_from_the_environment() {
        let defaults = ServerConfig::default();
        assert_eq!(defaults.tcp_user_timeout(), Some(Duration::from_secs(30)));
        assert_eq!(defaults.tcp_keepalive(), Some(Duration::from_secs(15)));
        figment::Jail::expect_with(|jail| {
            jail.set_env("CONFAB_SERVER__TCP_USER_TIMEOUT_SECS", "0");
            jail.set_env("CONFAB_SERVER__TCP_KEEPALIVE_SECS", "5");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                config.server.tcp_user_timeout(),
                None,
                "the kernel's default"
            );
            assert_eq!(config.server.tcp_keepalive(), Some(Duration::from_secs(5)));
            Ok(())
        });
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
            jail.create_file("e.toml", "[attachments]\ninline_bytes = 65537\n")?;
            assert!(Config::load(Some(Path::new("e.toml"))).is_err());
            jail.create_file("f.toml", "[attachments]\ninline_bytes = 65536\n")?;
            let config = Config::load(Some(Path::new("f.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(config.attachments.inline_bytes, 65536);
            Ok(())
        });
    }

    #[test]
    fn a_per_user_stream_cap_of_zero_is_refused_by_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CONFAB_NOTIFIER__MAX_CONNECTIONS_PER_USER", "0");
            let refused = Config::load(None).expect_err("a cap of 0 streams per user");
            assert!(
                refused
                    .to_string()
                    .contains("notifier.max_connections_per_user"),
                "{refused}"
            );
            jail.set_env("CONFAB_NOTIFIER__MAX_CONNECTIONS_PER_USER", "1");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.notifier.max_connections_per_user, 1);
            Ok(())
        });
    }

    #[test]
    fn a_retention_longer_than_the_store_keeps_leavings_is_refused() {
        figment::Jail::expect_with(|jail| {
            let longest = crate::bus::MAX_RETENTION.as_secs();
            jail.set_env("CONFAB_BUS__RETENTION_SECS", (longest + 1).to_string());
            let refused = Config::load(None).expect_err("a retention over the longest");
            assert!(
                refused.to_string().contains("bus.retention_secs"),
                "{refused}"
            );
            jail.set_env("CONFAB_BUS__RETENTION_SECS", longest.to_string());
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.bus.retention_secs, longest);
            Ok(())
        });
    }

    #[test]
    fn limits_load_from_the_environment_and_bad_ones_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("CONFAB_LIMITS__SEND__PER_SECOND", "2.5");
            jail.set_env("CONFAB_LIMITS__SEND__BURST", "7");
            jail.set_env("CONFAB_LIMITS__CALLS__BURST", "3");
            jail.set_env("CONFAB_LIMITS__CHATS__PER_SECOND", "0.25");
            jail.set_env(
                "CONFAB_LIMITS__CORS_ORIGINS",
                "https://app.example.com, http://localhost:3000/",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(config.limits.send, RateLimit::new(2.5, 7));
            assert_eq!(config.limits.edit, LimitsConfig::default().edit);
            assert_eq!(config.limits.calls, RateLimit::new(0.05, 3));
            assert_eq!(config.limits.chats, RateLimit::new(0.25, 300));
            assert_eq!(
                config.limits.cors_origins(),
                vec!["https://app.example.com", "http://localhost:3000"]
            );
            assert!(Config::default().limits.cors_origins().is_empty());
            jail.set_env(
                "CONFAB_LIMITS__CORS_ORIGINS",
                "https://app.example.com/path",
            );
            assert!(Config::load(None).is_err());
            jail.set_env("CONFAB_LIMITS__CORS_ORIGINS", "");
            jail.set_env("CONFAB_LIMITS__TRUSTED_PROXIES", "10.0.0.0/8, fd00::/8");
            let config = Config::load(None).map_err(|e| e.to_string())?;
            assert_eq!(
                config.limits.trusted_proxies().map_err(|e| e.to_string())?,
                crate::addresses::TrustedProxies::parse("10.0.0.0/8,fd00::/8")?
            );
            jail.set_env("CONFAB_LIMITS__TRUSTED_PROXIES", "10.0.0.0/40");
            let refused = Config::load(None).expect_err("a prefix longer than the address");
            assert!(
                refused.to_string().contains("limits.trusted_proxies"),
                "{refused}"
            );
            jail.set_env("CONFAB_LIMITS__TRUSTED_PROXIES", "");
            jail.set_env("CONFAB_LIMITS__SEND__PER_SECOND", "-1");
            assert!(Config::load(None).is_err());
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
    fn weak_secrets_are_refused_and_rotation_lists_load() {
        figment::Jail::expect_with(|jail| {
            // The placeholder shipped in the Kubernetes manifests.
            jail.set_env("CONFAB_SECRET_KEY", "REPLACE-ME-with-openssl-rand-hex-32");
            let error = Config::load(None).expect_err("placeholder").to_string();
            assert!(error.contains("secret_key"), "{error}");
            jail.set_env("CONFAB_SECRET_KEY", "too-short");
            assert!(Config::load(None).is_err());
            jail.set_env("CONFAB_SECRET_KEY", "x".repeat(40));
            assert!(Config::load(None).is_err());
            jail.set_env("CONFAB_SECRET_KEY", "");
            jail.set_env(
                "CONFAB_SECRET_KEYS",
                "k2:0f9e8d7c6b5a49382716a5b4c3d2e1f0,k1:a3f1c9e27b4d8605f1e2d3c4b5a69788",
            );
            let config = Config::load(None).map_err(|e| e.to_string())?;
            let keyring = config.keyring().unwrap().expect("configured");
            assert_eq!(keyring.signing_id(), "k2");
            jail.set_env(
                "CONFAB_SECRET_KEYS",
                "k2:0f9e8d7c6b5a49382716a5b4c3d2e1f0,k1:changeme",
            );
            assert!(Config::load(None).is_err());
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
