//! Composition: builds the store, bus and identity named by the [`Config`] and runs confab's
//! services on a listener until shutdown. `confab serve` runs all three on one listener; `confab api`,
//! `confab notifier` and `confab ws-plexer` run one each, for the distributed deployment.

pub mod bench;
pub mod bench_attachments;
pub mod bench_fanout;
pub mod bench_push;
pub mod bench_reads;
pub mod bench_search;
pub mod bench_store;
pub mod edge;
pub mod reindex;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::extract::DefaultBodyLimit;
use confab_api::domain::attachments::AttachmentSettings;
use confab_api::domain::circles::CircleSettings;
use confab_api::domain::devices::PushSettings;
use confab_api::indexer::Indexer;
use confab_api::limits::RateLimits;
use confab_api::outbox::SweepSettings;
use confab_api::store::cql::{self, CqlOptions, CqlStore};
use confab_api::store::embedded::EmbeddedStore;
use confab_api::store::{MarkerKind, Store, StoreReadiness, StoreSmallObjects};
use confab_api::{ApiState, routes as api_routes};
use confab_notifier::auth::StreamAuth;
use confab_notifier::hub::{Caps, LeftChat};
use confab_notifier::push::{Announced, DeviceDirectory, PushSender};
use confab_notifier::push_apns::Apns;
use confab_notifier::push_fcm::Fcm;
use confab_notifier::{Hub, HubReadiness, Membership, NotifierState};
use confab_runtime::blobs::{Blobs, BlobsReadiness, CachedBlobs, InlineBlobs, LocalBlobs, S3Blobs};
use confab_runtime::bus::{Bus, BusReadiness, EmbeddedBus, NatsBus};
use confab_runtime::config::{
    BlobsBackend, BusBackend, Config, IdentityMode, SearchBackend, StoreBackend,
};
use confab_runtime::identity::{DevIdentity, Identity, IdentityReadiness, OidcIdentity};
use confab_runtime::presence::{EmbeddedPresence, NatsPresence, Presence};
use confab_runtime::problem;
use confab_runtime::push_queue::{EmbeddedPushQueue, NatsPushQueue, PushQueue};
use confab_runtime::revocation::{Keep, RevocationAware, Revocations};
use confab_runtime::search::{MeiliSearch, Search, SearchError, TantivySearch};
use confab_runtime::sessions::{SessionLedger, SessionRecording};
use confab_runtime::telemetry::{self, Readiness};
use confab_runtime::vapid::VapidKeys;
use confab_schema::push::Device;
use confab_schema::{ChatId, DeviceId, Signal, SignalId, UserId};
use confab_ws_plexer::api::{ApiCaller, InProcess, OverHttp};
use confab_ws_plexer::{Limits, PlexerState};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The OpenAPI description of every service: what `confab serve` answers.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = confab_api::openapi_base();
    doc.merge(confab_api::openapi());
    doc.merge(confab_notifier::openapi());
    doc.merge(confab_ws_plexer::openapi());
    doc
}

/// Which of confab's services a process runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// API, notifier and ws-plexer on one listener.
    Serve,
    Api,
    Notifier,
    WsPlexer,
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Api => "api",
            Role::Notifier => "notifier",
            Role::WsPlexer => "ws-plexer",
        }
    }

    /// The address this role listens on by default.
    pub fn listen(&self, config: &Config) -> SocketAddr {
        match self {
            Role::Serve | Role::Api => config.api.listen,
            Role::Notifier => config.notifier.listen,
            Role::WsPlexer => config.ws_plexer.listen,
        }
    }
}

/// Opens the configured store. The embedded store migrates itself; a CQL keyspace is migrated by
/// `confab migrate`, or here when `migrate` is set (`confab serve`).
pub async fn open_store(config: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    match config.store.backend {
        StoreBackend::Embedded => {
            let path = config.embedded_store_path();
            let store = EmbeddedStore::open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            Ok(Arc::new(store))
        }
        StoreBackend::Cql => {
            let options = CqlOptions::from_config(config);
            if migrate {
                cql::migrate(&options)
                    .await
                    .context("migrating the CQL keyspace")?;
            }
            let store = CqlStore::connect(&options)
                .await
                .context("connecting to the CQL store (has `confab migrate` run?)")?;
            Ok(Arc::new(store))
        }
    }
}

pub async fn open_bus(config: &Config) -> anyhow::Result<Arc<dyn Bus>> {
    Ok(match config.bus.backend {
        BusBackend::Embedded => {
            let path = config.embedded_bus_path();
            Arc::new(
                EmbeddedBus::open(&path, config.log_settings())
                    .with_context(|| format!("opening the event log {}", path.display()))?,
            )
        }
        BusBackend::Nats => Arc::new(
            NatsBus::connect(
                &config.bus.nats_url,
                &config.bus.subject_prefix,
                config.log_settings(),
            )
            .await
            .context("connecting to NATS")?,
        ),
    })
}

/// Where presence records live: the NATS key-value bucket with the NATS bus, else in memory (one
/// process).
pub async fn open_presence(config: &Config) -> anyhow::Result<Arc<dyn Presence>> {
    Ok(match config.bus.backend {
        BusBackend::Embedded => Arc::new(EmbeddedPresence::default()),
        BusBackend::Nats => Arc::new(
            NatsPresence::connect(&config.bus.nats_url, &config.bus.subject_prefix)
                .await
                .context("connecting to NATS for presence")?,
        ),
    })
}

/// Where pushes wait for their delay: a NATS key-value bucket with the NATS bus, else a SQLite
/// file in the data directory.
pub async fn open_push_queue(config: &Config) -> anyhow::Result<Arc<dyn PushQueue>> {
    Ok(match config.bus.backend {
        BusBackend::Embedded => {
            let path = config.data_dir.join("push.sqlite3");
            Arc::new(
                EmbeddedPushQueue::open(&path)
                    .with_context(|| format!("opening the push queue {}", path.display()))?,
            )
        }
        BusBackend::Nats => Arc::new(
            NatsPushQueue::connect(&config.bus.nats_url, &config.bus.subject_prefix)
                .await
                .context("connecting to NATS for the push queue")?,
        ),
    })
}

/// How long one request to a push service may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(15);

/// The FCM and APNs senders, each when the configuration has its keys.
type NativePush = (Option<Arc<Fcm>>, Option<Arc<Apns>>);

fn native_push(config: &Config, http: &reqwest::Client) -> anyhow::Result<NativePush> {
    let fcm = match config.push.fcm.service_account()? {
        Some(account) => {
            let token_uri = config.push.fcm.token_uri(&account)?;
            Some(Arc::new(Fcm::new(
                http.clone(),
                account,
                &config.push.fcm.base_url()?,
                token_uri,
            )))
        }
        None => None,
    };
    let apns = match config.push.apns.key()? {
        Some(key) => Some(Arc::new(
            Apns::new(key, config.push.apns.base_url()?, PUSH_TIMEOUT)
                .context("building the APNs client")?,
        )),
        None => None,
    };
    Ok((fcm, apns))
}

/// The message search engine: a tantivy index in the data directory, or a Meilisearch index.
/// `None` when the tantivy index is open in another process (one process at a time opens it): this
/// one then runs without search, loudly.
pub fn open_search(config: &Config) -> anyhow::Result<Option<Arc<dyn Search>>> {
    Ok(Some(match config.search.backend {
        SearchBackend::Tantivy => {
            let path = config.embedded_search_path();
            match TantivySearch::open(&path) {
                Ok(search) => Arc::new(search),
                Err(SearchError::InUse(why)) => {
                    tracing::warn!("SEARCH DISABLED in this process: {why}");
                    return Ok(None);
                }
                Err(error) => {
                    return Err(error)
                        .with_context(|| format!("opening the search index {}", path.display()));
                }
            }
        }
        SearchBackend::Meilisearch => {
            Arc::new(MeiliSearch::new(&config.meili_settings()).context("configuring Meilisearch")?)
        }
    }))
}

/// Where attachments' bytes live: a directory under the data directory, or an S3 bucket; those up
/// to `attachments.inline_bytes` in `store`'s rows.
pub fn open_blobs(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Arc<dyn Blobs>> {
    let storage: Arc<dyn Blobs> =
        match config.attachments.backend {
            BlobsBackend::Local => {
                let dir = config.attachments_dir();
                Arc::new(LocalBlobs::open(&dir).with_context(|| {
                    format!("opening the attachments directory {}", dir.display())
                })?)
            }
            BlobsBackend::S3 => Arc::new(S3Blobs::new(&config.attachments.s3_settings())),
        };
    // Also with a limit of 0: bodies kept in the table before still have to be found.
    let storage: Arc<dyn Blobs> = Arc::new(InlineBlobs::new(
        Arc::new(StoreSmallObjects(store)),
        storage,
        config.attachments.inline_bytes,
    ));
    Ok(match config.attachments.cache_limits() {
        Some(limits) => Arc::new(CachedBlobs::new(storage, limits)),
        None => storage,
    })
}

/// How the API stores and serves attachments.
pub fn attachment_settings(config: &Config, blobs: Arc<dyn Blobs>) -> AttachmentSettings {
    AttachmentSettings {
        blobs,
        max_bytes: config.attachments.max_bytes,
        presigned_redirect: config.attachments.presigned_redirect,
        // A body kept in the store has no URL to redirect to.
        served_up_to: config
            .attachments
            .cache_limits()
            .map_or(0, |limits| limits.object_bytes as u64)
            .max(config.attachments.inline_bytes as u64),
        presigned_ttl: config.attachments.presigned_ttl(),
        max_image_pixels: config.attachments.max_image_pixels,
        upload_time: config.attachments.upload_timeout(),
    }
}

/// The devices the push sender delivers to, from the store.
pub struct StoreDevices(pub Arc<dyn Store>);

#[async_trait::async_trait]
impl DeviceDirectory for StoreDevices {
    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, String> {
        self.0.devices_of(user).await.map_err(|e| e.to_string())
    }
    async fn remove(&self, user: UserId, device: DeviceId) -> Result<(), String> {
        self.0
            .delete_device(user, device)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    async fn reached(&self, user: UserId, chat: ChatId) -> Result<Option<SignalId>, String> {
        let (read, delivered) = futures::join!(
            self.0.marker(MarkerKind::Read, chat, user),
            self.0.marker(MarkerKind::Delivered, chat, user),
        );
        Ok(read
            .map_err(|e| e.to_string())?
            .max(delivered.map_err(|e| e.to_string())?))
    }
    async fn message(&self, chat: ChatId, id: SignalId) -> Result<Announced, String> {
        Ok(match self.0.get_signal(chat, id).await {
            Ok(Some(signal)) if !signal.deleted => Announced::Text(signal.text),
            Ok(_) => Announced::Deleted,
            Err(error) => return Err(error.to_string()),
        })
    }
    async fn signals_before(
        &self,
        chat: ChatId,
        before: SignalId,
        limit: usize,
    ) -> Result<Vec<Signal>, String> {
        self.0
            .signals_before(chat, Some(before), limit)
            .await
            .map_err(|e| e.to_string())
    }
    async fn display_name(&self, user: UserId) -> Result<Option<String>, String> {
        self.0
            .get_user(user)
            .await
            // Pushes show the name to the other members: never an address.
            .map(|user| user.map(|user| confab_api::domain::users::name_shown_to_others(&user)))
            .map_err(|e| e.to_string())
    }
    async fn is_member(&self, user: UserId, chat: ChatId) -> Result<bool, String> {
        self.0
            .member_role(chat, user)
            .await
            .map(|role| role.is_some())
            .map_err(|e| e.to_string())
    }
}

/// Where every role records the sessions of the tokens it accepts.
pub struct StoreSessions(pub Arc<dyn Store>);

#[async_trait::async_trait]
impl SessionLedger for StoreSessions {
    async fn record(&self, user: UserId, session: &str, ttl: Duration) -> Result<(), String> {
        self.0
            .record_session(user, session, ttl)
            .await
            .map_err(|e| e.to_string())
    }
}

/// What a notifier routes by: the chats a user is in, and those they left recently, read from the
/// store. (Besides the sessions of the tokens they accept, the notifier and the ws-plexer read
/// this and nothing else; only the API writes the rest.)
pub struct StoreMembership {
    pub store: Arc<dyn Store>,
    /// How long the log keeps events: a chat left before that has no event a resume can replay.
    pub retention: Duration,
}

#[async_trait::async_trait]
impl Membership for StoreMembership {
    async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, String> {
        self.store.chats_of(user).await.map_err(|e| e.to_string())
    }
    async fn left_chats_of(
        &self,
        user: UserId,
        since: time::OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<LeftChat>, String> {
        let since = since.max(time::OffsetDateTime::now_utc() - self.retention);
        Ok(self
            .store
            .left_chats_of(user, since, limit)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|left| LeftChat {
                chat_id: left.chat_id,
                left_at: left.left_at,
            })
            .collect())
    }
}

pub fn open_identity(config: &Config) -> anyhow::Result<Arc<dyn Identity>> {
    Ok(match config.identity.mode {
        IdentityMode::Dev => Arc::new(DevIdentity::open(&config.data_dir).with_context(|| {
            format!(
                "opening the dev identity key in {}",
                config.data_dir.display()
            )
        })?),
        IdentityMode::Oidc => Arc::new(OidcIdentity::new(
            &config.identity.issuer_url,
            config.client_ids(),
            config.identity.leeway_secs,
            Duration::from_secs(config.identity.jwks_refresh_secs),
        )?),
    })
}

/// Where logouts are recorded: a NATS key-value bucket with the NATS bus (shared by every
/// process), else a file in the data directory read back at start.
pub async fn open_revocations(
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Revocations>> {
    // A session a logout everywhere ended can go on renewing its tokens at the provider until the
    // provider's session ends: its revocation is kept as long as sessions are recorded. Every
    // other one only as long as a token issued before it lives.
    let keep = Keep {
        tokens: Duration::from_secs(config.identity.revocation_ttl_secs.max(1)),
        sessions: Duration::from_secs(config.identity.session_ttl_secs.max(1)),
    };
    Ok(match config.bus.backend {
        BusBackend::Embedded => {
            Revocations::in_file(config.data_dir.join("revocations.jsonl"), keep)
                .map_err(anyhow::Error::msg)
                .context("opening the revocations file")?
        }
        BusBackend::Nats => Revocations::nats(
            &config.bus.nats_url,
            &config.bus.subject_prefix,
            keep,
            shutdown,
        )
        .await
        .map_err(anyhow::Error::msg)
        .context("connecting to NATS for revocations")?,
    })
}

/// Dev identity accepts tokens anyone with the data directory can mint: `confab serve` on loopback
/// only, and the distributed roles only when `identity.allow_dev_in_distributed_roles` says so.
fn guard_dev_mode(role: Role, config: &Config, addr: SocketAddr) -> anyhow::Result<()> {
    if config.identity.mode == IdentityMode::Dev {
        if role != Role::Serve && !config.identity.allow_dev_in_distributed_roles {
            bail!(
                "confab {} refuses identity.mode = dev: anyone who can mint a dev token could be any \
                 user. Configure identity.mode = oidc, or, for a test on one machine only, set \
                 identity.allow_dev_in_distributed_roles = true \
                 (CONFAB_IDENTITY__ALLOW_DEV_IN_DISTRIBUTED_ROLES=true).",
                role.name()
            );
        }
        if !addr.ip().is_loopback() {
            bail!(
                "identity.mode = dev accepts tokens from `confab dev-token`; it only binds loopback \
                 addresses, not {addr}. Configure identity.mode = oidc for anything else."
            );
        }
        tracing::warn!(
            role = role.name(),
            "DEV IDENTITY MODE: tokens come from `confab dev-token`, and whoever can read the data \
             directory can be any user; this is NOT FOR PRODUCTION. Listening on loopback only."
        );
    }
    Ok(())
}

/// How calls ring, and the TURN servers (when a secret is configured).
fn call_settings(config: &Config) -> confab_api::domain::calls::CallSettings {
    let calls = &config.calls;
    confab_api::domain::calls::CallSettings {
        ring_timeout: calls.ring_timeout(),
        disconnect_grace: calls.disconnect_grace(),
        turn: calls
            .turn_secret
            .clone()
            .filter(|secret| !secret.is_empty())
            .map(|secret| confab_api::domain::calls::TurnSettings {
                secret,
                uris: calls.turn_uris(),
                ttl: calls.turn_ttl(),
            }),
    }
}

/// The services built for one process.
pub struct App {
    pub router: axum::Router,
    /// Background workers (the hub's bus consumer), awaited on shutdown.
    workers: Vec<tokio::task::JoinHandle<()>>,
    /// The API's state, whose outbox writer retires once the requests and workers are done.
    api: Option<ApiState>,
}

/// How long a clean shutdown waits for the last outbox removals before leaving the writer to a
/// sweep instead: a few removal paces.
const OUTBOX_RETIRE_WAIT: Duration = Duration::from_secs(2);

/// Builds the router and workers of `role`.
pub async fn build(
    role: Role,
    config: &Config,
    shutdown: CancellationToken,
) -> anyhow::Result<App> {
    let keyring = config.keyring_or_random()?;
    if config.keyring()?.is_none() && role != Role::Serve {
        tracing::warn!(
            "secret_key is unset: cursors and tickets are valid on this process only, and only \
             until it restarts"
        );
    }
    let revocations = open_revocations(config, shutdown.clone()).await?;
    let store = open_store(config, role == Role::Serve).await?;
    // Every role verifies tokens (the API's calls, the notifier's streams, the ws-plexer's
    // sockets), and each records a token's session before accepting it: a session used only to
    // listen is ended by a logout everywhere like any other.
    let identity: Arc<dyn Identity> = Arc::new(RevocationAware {
        inner: Arc::new(SessionRecording::new(
            open_identity(config)?,
            Arc::new(StoreSessions(Arc::clone(&store))),
            Duration::from_secs(config.identity.session_ttl_secs),
        )),
        revocations: Arc::clone(&revocations),
    });
    let bus = open_bus(config).await?;
    let presence = open_presence(config).await?;
    let push_queue = open_push_queue(config).await?;
    let mut readiness = Readiness::new()
        .with(Arc::new(IdentityReadiness(Arc::clone(&identity))))
        .with(Arc::new(BusReadiness(Arc::clone(&bus))));
    let mut router = axum::Router::new();
    let mut openapi = confab_api::http::openapi_base();
    let mut workers = Vec::new();
    // The API's own router, for the ws-plexer to call in process (`confab serve`).
    let mut api_router = None;
    let mut api_state = None;

    readiness = readiness.with(Arc::new(StoreReadiness(Arc::clone(&store))));
    if matches!(role, Role::Serve | Role::Api) {
        let blobs = open_blobs(config, Arc::clone(&store))?;
        readiness = readiness.with(Arc::new(BlobsReadiness(Arc::clone(&blobs))));
        // Not a readiness check: search being down must not take the API (and sending) down.
        let search = open_search(config)?;
        if let Some(search) = &search
            && config.search.indexer
        {
            workers.push(
                Indexer {
                    store: Arc::clone(&store),
                    bus: Arc::clone(&bus),
                    search: Arc::clone(search),
                    batch_size: config.search.batch_size,
                    batch_wait: Duration::from_millis(config.search.batch_wait_ms),
                    batch_interval: Duration::from_millis(config.search.batch_interval_ms),
                    changed_lately: Default::default(),
                }
                .start(shutdown.clone()),
            );
        }
        let mut state = ApiState::new(
            Arc::clone(&store),
            Arc::clone(&bus),
            Arc::clone(&identity),
            &keyring,
        )
        .with_cursor_ttl(config.cursor_ttl())
        .with_republish_window(config.log_settings().duplicate_window)
        .with_presence(Arc::clone(&presence))
        .with_push(PushSettings {
            allow_insecure_endpoints: config.push.allow_insecure_endpoints,
            vapid_public_key: config.push.vapid_public_key.clone(),
            delay: config.push.delay(),
            ttl: config.push.ttl(),
            settings_cache: config.push.settings_cache(),
        })
        .with_push_queue(Arc::clone(&push_queue))
        .with_revocations(Arc::clone(&revocations))
        .with_attachments(attachment_settings(config, blobs))
        .with_rate_limits(RateLimits::new(&config.limits))
        .with_circles(CircleSettings::from_config(&config.circles, &config.queues))
        .with_calls(call_settings(config));
        if let Some(search) = search {
            state = state.with_search(search);
        }
        workers.push(state.clone().start_outbox_sweeper(
            SweepSettings {
                interval: config.bus.outbox_sweep_interval(),
                silent_after: config.bus.outbox_silent_after(),
            },
            shutdown.clone(),
        ));
        workers.push(state.clone().start_sweeps(shutdown.clone()));
        // Every API process sweeps: a call rings out even when the process that started it is gone.
        let ring_timeout = config.calls.ring_timeout();
        workers.push(state.start_call_sweeper(
            (ring_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(1)),
            shutdown.clone(),
        ));
        api_state = Some(state.clone());
        let (routes, doc) = api_routes(state);
        // Every JSON body, over HTTP or in a WebSocket request frame (uploads stream their own).
        let routes = routes.layer(DefaultBodyLimit::max(config.limits.body_bytes));
        api_router = Some(
            routes
                .clone()
                .fallback(problem::not_found)
                .method_not_allowed_fallback(problem::method_not_allowed),
        );
        router = router.merge(routes);
        openapi.merge(doc);
        // The web client; its dev sign-in only where dev tokens are the identity anyway.
        let sign_in = match (role, config.identity.mode) {
            (Role::Serve, IdentityMode::Dev) => {
                crate::web::WebSignIn::Dev(DevIdentity::open(&config.data_dir)?)
            }
            (_, IdentityMode::Dev) => crate::web::WebSignIn::Unavailable,
            (_, IdentityMode::Oidc) => crate::web::WebSignIn::Oidc {
                issuer: config.identity.issuer_url.clone(),
                client_id: config
                    .identity
                    .client_ids
                    .split(',')
                    .map(str::trim)
                    .find(|c| !c.is_empty())
                    .unwrap_or_default()
                    .to_owned(),
            },
        };
        let downloads_from = (config.attachments.presigned_redirect
            && config.attachments.backend == BlobsBackend::S3)
            .then_some(config.attachments.s3_endpoint.as_str());
        router = router.merge(crate::web::routes(sign_in, downloads_from));
    }
    // Streams' tickets, which count as a login at the edge's per-address limit.
    let mut stream_auth = None;
    if matches!(role, Role::Serve | Role::Notifier | Role::WsPlexer) {
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(StoreMembership {
                store: Arc::clone(&store),
                retention: config.log_settings().retention,
            }),
            Arc::clone(&presence),
            config.notifier.connection_buffer,
            config.notifier.replay_limit,
        )
        .with_caps(Caps {
            per_node: config.notifier.max_connections,
            per_user: config.notifier.max_connections_per_user,
        })
        .with_revocations(Arc::clone(&revocations))
        .with_stream_open_limit(config.limits.stream_opens)
        .with_duplicate_window(config.log_settings().duplicate_window);
        workers.push(
            hub.start(shutdown.clone())
                .await
                .context("subscribing to events")?,
        );
        readiness = readiness.with(Arc::new(HubReadiness(hub.clone())));
        if matches!(role, Role::Serve | Role::Notifier) {
            let vapid = match &config.push.vapid_private_key {
                Some(private) => Some(VapidKeys::from_private_key(private)?),
                None => None,
            };
            let http = confab_notifier::push::http_client(
                PUSH_TIMEOUT,
                config.push.allow_insecure_endpoints,
            )?;
            let (fcm, apns) = native_push(config, &http)?;
            workers.push(
                PushSender {
                    queue: Arc::clone(&push_queue),
                    devices: Arc::new(StoreDevices(Arc::clone(&store))),
                    http,
                    vapid,
                    subject: config.push.subject(),
                    vapid_tokens: Arc::default(),
                    poll: Duration::from_millis(100),
                    fcm,
                    apns,
                }
                .start(shutdown.clone()),
            );
        }
        let auth = StreamAuth::new(
            Arc::clone(&identity),
            &keyring,
            Duration::from_secs(config.notifier.ticket_ttl_secs),
        )
        .with_revocations(Arc::clone(&revocations));
        stream_auth = Some(auth.clone());
        if matches!(role, Role::Serve | Role::Notifier) {
            let (routes, doc) = confab_notifier::routes(NotifierState {
                hub: hub.clone(),
                auth: auth.clone(),
                keep_alive: Duration::from_secs(config.notifier.keep_alive_secs.max(1)),
                shutdown: shutdown.clone(),
            });
            router = router.merge(routes);
            openapi.merge(doc);
        }
        if matches!(role, Role::Serve | Role::WsPlexer) {
            let api: Arc<dyn ApiCaller> = match api_router.take() {
                Some(router) => Arc::new(InProcess(router)),
                None => Arc::new(
                    OverHttp::new(&config.ws_plexer.api_url)
                        .context("building the HTTP client for the API")?,
                ),
            };
            let (routes, doc) = confab_ws_plexer::routes(PlexerState {
                hub,
                auth,
                api,
                limits: Limits {
                    max_in_flight: config.ws_plexer.max_in_flight,
                    max_frame_bytes: config.ws_plexer.max_frame_bytes,
                    request_timeout: config.limits.request_timeout(),
                },
                shutdown: shutdown.clone(),
            });
            router = router.merge(routes);
            openapi.merge(doc);
        }
    }
    if matches!(role, Role::Serve | Role::Notifier | Role::WsPlexer) {
        let asyncapi = Arc::new(confab_notifier::asyncapi::document());
        router = router.route(
            "/v1/asyncapi.json",
            axum::routing::get(move || {
                let asyncapi = Arc::clone(&asyncapi);
                async move { axum::Json(asyncapi.as_ref().clone()) }
            }),
        );
    }
    let openapi = Arc::new(openapi);
    let router = telemetry::instrument(edge::layer(
        router
            .route(
                "/v1/openapi.json",
                axum::routing::get(move || {
                    let openapi = Arc::clone(&openapi);
                    async move { axum::Json(openapi.as_ref().clone()) }
                }),
            )
            .merge(telemetry::routes(readiness))
            .fallback(problem::not_found)
            .method_not_allowed_fallback(problem::method_not_allowed),
        &config.limits,
        identity,
        stream_auth,
    ));
    Ok(App {
        router,
        workers,
        api: api_state,
    })
}

/// Runs `role` on `listener` until `shutdown`, then drains open requests and workers.
pub async fn run(
    role: Role,
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    guard_dev_mode(role, &config, addr)?;
    // The metrics recorder is installed before any worker starts: installed by the first request
    // instead, it dropped what a process recorded before anyone asked it anything (a notifier
    // that sent pushes before its first request showed none on /metrics).
    let _ = telemetry::prometheus();
    // Boxed: building every service makes a large future.
    let app = Box::pin(build(role, &config, shutdown.clone())).await?;
    // Tests and scripts read this line to find a port chosen by the OS.
    println!("confab {} listening on http://{addr}", role.name());
    tracing::info!(role = role.name(), %addr, "listening");
    edge::serve(
        listener,
        app.router,
        config.limits.header_timeout(),
        &config.server,
        shutdown.clone(),
    )
    .await;
    for worker in app.workers {
        let _ = worker.await;
    }
    if let Some(api) = app.api {
        match api.retire_outbox(OUTBOX_RETIRE_WAIT).await {
            Ok(true) => tracing::info!("outbox writer retired: nothing left for a sweep"),
            Ok(false) => tracing::warn!("outbox entries remain; a sweep publishes them"),
            Err(error) => tracing::warn!(%error, "outbox writer not retired; a sweep reads it"),
        }
    }
    tracing::info!(role = role.name(), "stopped");
    Ok(())
}

/// `confab gc-blobs`: removes the attachment objects no attachment references, with a progress
/// line on standard error, and prints what it did.
pub async fn gc_blobs(config: &Config, min_age: Duration) -> anyhow::Result<()> {
    use std::io::Write;
    let store = open_store(config, false).await?;
    let blobs = open_blobs(config, Arc::clone(&store))?;
    blobs.check().await.context("reaching attachment storage")?;
    let started = std::time::Instant::now();
    let mut last_shown = std::time::Instant::now() - Duration::from_secs(1);
    let done = confab_api::domain::attachments::collect_garbage(
        store.as_ref(),
        blobs.as_ref(),
        min_age,
        |progress| {
            if last_shown.elapsed() >= Duration::from_millis(200) {
                last_shown = std::time::Instant::now();
                eprint!(
                    "\r{spinner} scanned {} objects, removed {} ({} bytes)   ",
                    progress.scanned,
                    progress.removed,
                    progress.removed_bytes,
                    spinner = ['|', '/', '-', '\\'][(progress.scanned % 4) as usize],
                );
                let _ = std::io::stderr().flush();
            }
        },
    )
    .await?;
    eprintln!();
    println!(
        "gc-blobs: scanned {} objects, removed {} ({} bytes), {} stale uploads and {} orphaned references in {:.1}s",
        done.scanned,
        done.removed,
        done.removed_bytes,
        done.swept,
        done.orphans_dropped,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
