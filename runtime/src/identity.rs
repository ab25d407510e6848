//! Who is calling. [`Identity`] turns a bearer token into a [`Principal`]; [`OidcIdentity`] checks
//! tokens from an OpenID Connect provider (Keycloak) against its discovered JWKS, [`DevIdentity`]
//! checks tokens minted by `confab dev-token` with a key kept in the data directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_schema::UserId;
use futures::future::BoxFuture;
use hmac::{Hmac, Mac};
use openidconnect::core::{
    CoreJsonWebKey, CoreJsonWebKeySet, CoreJwsSigningAlgorithm, CoreProviderMetadata,
};
use openidconnect::{IssuerUrl, JsonWebKey};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use time::OffsetDateTime;

use crate::telemetry::ReadinessCheck;

/// An authenticated caller, as the token describes them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user_id: UserId,
    pub username: String,
    pub display_name: String,
    pub email: Option<String>,
    /// When the token stops being valid (Unix seconds, leeway not included): a stream or socket
    /// opened with it ends then, unless the client refreshes it.
    pub expires_at: i64,
    /// The token's session at the provider (`sid`), which a logout names.
    pub session: Option<String>,
    /// When the token was issued (`iat`, Unix seconds); 0 when it does not say.
    pub issued_at: i64,
}

/// What a back-channel logout token asks to end: one session, or every session of a user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logout {
    pub user: Option<UserId>,
    pub session: Option<String>,
    /// When the provider issued the logout token (its `iat`, Unix seconds, the provider's clock,
    /// as the tokens it ends are stamped).
    pub issued_at: i64,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    #[error("token expired")]
    Expired,
    #[error("the session of this token has ended (logged out)")]
    Revoked,
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Identity: Send + Sync + 'static {
    /// Verifies `token` (the bearer credential, without the `Bearer ` prefix).
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError>;
    /// Whether tokens can be verified now (keys loaded).
    async fn check(&self) -> Result<(), String>;
    /// Verifies an OpenID Connect Back-Channel Logout token and answers what it ends.
    async fn verify_logout(&self, _token: &str) -> Result<Logout, AuthError> {
        Err(AuthError::Invalid(
            "back-channel logout needs an OpenID Connect provider",
        ))
    }
}

/// Readiness of an [`Identity`].
pub struct IdentityReadiness(pub Arc<dyn Identity>);

impl ReadinessCheck for IdentityReadiness {
    fn name(&self) -> &'static str {
        "identity"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.0.check())
    }
}

/// The claims confab reads from an access token.
#[derive(Debug, Deserialize, Serialize)]
struct Claims {
    iss: String,
    sub: String,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    azp: Option<String>,
    #[serde(default, skip_serializing_if = "Audience::is_empty")]
    aud: Audience,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preferred_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    /// Whether the provider checked that the address is the user's. A boolean, or (as some
    /// providers write it) the string `"true"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email_verified: Option<serde_json::Value>,
}

impl Claims {
    /// The e-mail address, if the provider verified it: others find a user by their address, so
    /// one anybody can type into their profile would let them pass for its owner.
    fn verified_email(&self) -> Option<String> {
        let verified = matches!(&self.email_verified, Some(serde_json::Value::Bool(true)))
            || matches!(&self.email_verified, Some(serde_json::Value::String(s)) if s == "true");
        self.email.clone().filter(|_| verified)
    }
}

/// The claims of a back-channel logout token (OpenID Connect Back-Channel Logout 1.0, 2.4).
#[derive(Debug, Deserialize)]
struct LogoutClaims {
    iss: String,
    #[serde(default)]
    aud: Audience,
    iat: i64,
    #[serde(default)]
    exp: Option<i64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    events: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    nonce: Option<serde_json::Value>,
}

/// The event a logout token must carry.
pub const BACKCHANNEL_LOGOUT_EVENT: &str = "http://schemas.openid.net/event/backchannel-logout";
/// How old a logout token may be.
const LOGOUT_TOKEN_MAX_AGE: i64 = 300;

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn is_empty(&self) -> bool {
        matches!(self, Audience::None)
    }
    fn contains(&self, value: &str) -> bool {
        match self {
            Audience::None => false,
            Audience::One(one) => one == value,
            Audience::Many(many) => many.iter().any(|a| a == value),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: serde_json::Value,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    typ: Option<String>,
}

/// A JWT split into its parts, decoded.
struct Jwt<C> {
    header: Header,
    claims: C,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

fn decode<C: DeserializeOwned>(token: &str) -> Result<Jwt<C>, AuthError> {
    if token.len() > 16 * 1024 {
        return Err(AuthError::Invalid("too long"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Invalid("not a JWS compact token"));
    };
    let b64 = |s: &str| {
        URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| AuthError::Invalid("bad base64url"))
    };
    let header: Header =
        serde_json::from_slice(&b64(header)?).map_err(|_| AuthError::Invalid("bad header"))?;
    let claims: C =
        serde_json::from_slice(&b64(payload)?).map_err(|_| AuthError::Invalid("bad claims"))?;
    Ok(Jwt {
        header,
        claims,
        signed: token.as_bytes()[..token.len() - signature.len() - 1].to_vec(),
        signature: b64(signature)?,
    })
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Checks the time, issuer, audience and type claims of an access token, and maps it to a
/// [`Principal`]. `header_typ` is the JOSE header's `typ`.
fn principal(
    claims: &Claims,
    header_typ: Option<&str>,
    issuer: &str,
    audiences: &[String],
    leeway: i64,
) -> Result<Principal, AuthError> {
    let now = now();
    if claims.exp + leeway < now {
        return Err(AuthError::Expired);
    }
    if claims.nbf.is_some_and(|nbf| nbf - leeway > now) {
        return Err(AuthError::Invalid("not yet valid"));
    }
    if claims.iat.is_some_and(|iat| iat - leeway > now) {
        return Err(AuthError::Invalid("issued in the future"));
    }
    if claims.iss != issuer {
        return Err(AuthError::Invalid("wrong issuer"));
    }
    // The audience, not the authorized party: a token a client got for another service names
    // that service in `aud`, and must not be accepted here.
    if !audiences.iter().any(|id| claims.aud.contains(id)) {
        return Err(AuthError::Invalid("not issued for this service (audience)"));
    }
    // Only access tokens are bearer credentials: Keycloak marks them `typ: Bearer` (and ID and
    // refresh tokens otherwise); RFC 9068 providers mark the header `typ: at+jwt`.
    let access_header = header_typ.is_some_and(|typ| {
        typ.eq_ignore_ascii_case("at+jwt") || typ.eq_ignore_ascii_case("application/at+jwt")
    });
    let access_claim = claims
        .typ
        .as_deref()
        .is_some_and(|typ| typ.eq_ignore_ascii_case("bearer"));
    let access = match &claims.typ {
        Some(_) => access_claim,
        None => access_header,
    };
    if !access {
        return Err(AuthError::Invalid("not an access token"));
    }
    if claims.sub.is_empty() {
        return Err(AuthError::Invalid("no subject"));
    }
    let username = claims
        .preferred_username
        .clone()
        .unwrap_or_else(|| claims.sub.clone());
    Ok(Principal {
        user_id: UserId::from_subject(issuer, &claims.sub),
        display_name: claims.name.clone().unwrap_or_else(|| username.clone()),
        username,
        email: claims.verified_email(),
        expires_at: claims.exp,
        session: claims.sid.clone().filter(|sid| !sid.is_empty()),
        issued_at: claims.iat.unwrap_or(0),
    })
}

/// Checks a back-channel logout token's claims (its signature is checked already).
fn logout(
    claims: &LogoutClaims,
    header_typ: Option<&str>,
    issuer: &str,
    audiences: &[String],
    leeway: i64,
) -> Result<Logout, AuthError> {
    let now = now();
    if claims.iss != issuer {
        return Err(AuthError::Invalid("wrong issuer"));
    }
    if !audiences.iter().any(|id| claims.aud.contains(id)) {
        return Err(AuthError::Invalid("not issued for this service (audience)"));
    }
    if claims.iat - leeway > now || claims.iat + LOGOUT_TOKEN_MAX_AGE + leeway < now {
        return Err(AuthError::Invalid(
            "logout token issued too long ago or in the future",
        ));
    }
    if claims.exp.is_some_and(|exp| exp + leeway < now) {
        return Err(AuthError::Expired);
    }
    if header_typ.is_some_and(|typ| {
        !typ.eq_ignore_ascii_case("logout+jwt") && !typ.eq_ignore_ascii_case("jwt")
    }) {
        return Err(AuthError::Invalid("not a logout token"));
    }
    let event = claims
        .events
        .as_ref()
        .and_then(|events| events.get(BACKCHANNEL_LOGOUT_EVENT));
    if !event.is_some_and(serde_json::Value::is_object) {
        return Err(AuthError::Invalid("not a logout token (events)"));
    }
    if claims.nonce.is_some() {
        return Err(AuthError::Invalid("a logout token has no nonce"));
    }
    let user = claims
        .sub
        .as_deref()
        .filter(|sub| !sub.is_empty())
        .map(|sub| UserId::from_subject(issuer, sub));
    let session = claims.sid.clone().filter(|sid| !sid.is_empty());
    if user.is_none() && session.is_none() {
        return Err(AuthError::Invalid("a logout token names a sid or a sub"));
    }
    Ok(Logout {
        user,
        session,
        issued_at: claims.iat,
    })
}

/// Verifies access tokens issued by an OpenID Connect provider. The provider's keys are loaded and
/// refreshed by a background task (on a schedule, and when a token names a key id the loaded set
/// lacks, at most once per [`MIN_REFRESH_INTERVAL`]); a request never fetches them itself, and no
/// lock is held across a fetch, so an unreachable or slow provider never stalls tokens signed by
/// keys already known.
pub struct OidcIdentity {
    shared: Arc<OidcShared>,
    _stop: tokio_util::sync::DropGuard,
}

struct OidcShared {
    issuer: String,
    client_ids: Vec<String>,
    leeway: i64,
    http: reqwest::Client,
    interval: Duration,
    /// Refetches triggered by unknown key ids happen at most this often.
    min_refetch: Duration,
    keys: std::sync::RwLock<Option<Arc<KeySet>>>,
    /// Found by discovery, once; afterwards only the key set is refetched.
    jwks_uri: std::sync::Mutex<Option<openidconnect::JsonWebKeySetUrl>>,
    /// Wakes the refresher early.
    wake: Arc<tokio::sync::Notify>,
    /// Counts finished refresh attempts; requests waiting for a refresh watch it.
    attempts: tokio::sync::watch::Sender<u64>,
    /// When the last fetch started, and whether one runs now.
    last_fetch: std::sync::Mutex<Option<Instant>>,
    in_flight: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
    discoveries: AtomicU64,
    fetches: AtomicU64,
}

struct KeySet {
    keys: HashMap<String, CoreJsonWebKey>,
    unnamed: Vec<CoreJsonWebKey>,
    /// Digests of tokens whose signature these keys verified. A client sends the same access
    /// token with every request for its lifetime, and an RS256 check costs far more than the
    /// request's other work, so each token's signature is checked once per loaded key set. The
    /// set lives and dies with the keys: a refresh that drops a key drops its tokens too. Only
    /// valid signatures are kept (nobody can add one without the provider's key), and at most
    /// [`VERIFIED_TOKENS_MAX`]; the claims (expiry included) are still checked on every request.
    verified: std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
}

/// Tokens remembered as verified per key set; past this the memory is emptied and refills.
/// About 100 bytes each with the table's overhead, so a few MB at most.
const VERIFIED_TOKENS_MAX: usize = 50_000;

impl KeySet {
    fn new(keys: HashMap<String, CoreJsonWebKey>, unnamed: Vec<CoreJsonWebKey>) -> KeySet {
        KeySet {
            keys,
            unnamed,
            verified: std::sync::Mutex::new(std::collections::HashSet::new()),
        }
    }
}

/// The outcome of checking a token's signature against the loaded keys.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Valid,
    Invalid,
    /// The token names a key id the loaded set does not have.
    UnknownKey,
}

/// Refetches triggered by unknown key ids happen at most this often.
pub const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);
/// How long a request with an unknown key id waits for the refetch it triggered.
const UNKNOWN_KEY_WAIT: Duration = Duration::from_secs(2);
/// How long a request waits for the first keys before answering 503.
const NO_KEYS_WAIT: Duration = Duration::from_secs(5);

impl OidcShared {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().ok().and_then(|keys| keys.clone())
    }

    /// Fetches discovery metadata (until it once succeeded) and the key set, and replaces the
    /// loaded keys with it, so keys the provider removed stop being trusted.
    async fn refresh(&self) -> Result<(), String> {
        if let Ok(mut last) = self.last_fetch.lock() {
            *last = Some(Instant::now());
        }
        self.in_flight.store(true, Ordering::Release);
        let result = self.fetch().await;
        self.in_flight.store(false, Ordering::Release);
        if let Ok(mut last_error) = self.last_error.lock() {
            *last_error = result.as_ref().err().cloned();
        }
        self.attempts.send_modify(|n| *n += 1);
        result
    }

    async fn fetch(&self) -> Result<(), String> {
        let known_uri = self.jwks_uri.lock().ok().and_then(|uri| uri.clone());
        let set = match known_uri {
            Some(uri) => {
                self.fetches.fetch_add(1, Ordering::Relaxed);
                CoreJsonWebKeySet::fetch_async(&uri, &self.http)
                    .await
                    .map_err(|e| format!("fetching JWKS: {e}"))?
            }
            None => {
                self.discoveries.fetch_add(1, Ordering::Relaxed);
                let issuer = IssuerUrl::new(self.issuer.clone())
                    .map_err(|e| format!("bad issuer URL: {e}"))?;
                let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
                    .await
                    .map_err(|e| format!("OIDC discovery: {e}"))?;
                if let Ok(mut uri) = self.jwks_uri.lock() {
                    *uri = Some(metadata.jwks_uri().clone());
                }
                metadata.jwks().clone()
            }
        };
        let mut keys = HashMap::new();
        let mut unnamed = Vec::new();
        for key in set.keys() {
            match key.key_id() {
                Some(kid) => {
                    keys.insert(kid.as_str().to_owned(), key.clone());
                }
                None => unnamed.push(key.clone()),
            }
        }
        tracing::debug!(issuer = %self.issuer, keys = keys.len() + unnamed.len(), "loaded identity provider keys");
        if let Ok(mut loaded) = self.keys.write() {
            *loaded = Some(Arc::new(KeySet::new(keys, unnamed)));
        }
        Ok(())
    }

    /// Whether a refetch can happen now (or runs already), so waiting for one is worth it.
    fn refetch_possible(&self) -> bool {
        self.in_flight.load(Ordering::Acquire)
            || self
                .last_fetch
                .lock()
                .ok()
                .and_then(|last| *last)
                .is_none_or(|at| at.elapsed() >= self.min_refetch)
    }

    /// Asks the refresher for a refetch and waits up to `wait` for an attempt to finish.
    async fn refetch(&self, wait: Duration) {
        let mut attempts = self.attempts.subscribe();
        attempts.borrow_and_update();
        // A fetch running now ends this wait; waking the refresher then would only cause another.
        if !self.in_flight.load(Ordering::Acquire) {
            self.wake.notify_one();
        }
        let _ = tokio::time::timeout(wait, attempts.changed()).await;
    }

    /// Checks `jwt`'s signature with the loaded keys, asking for a refetch when it names an
    /// unknown key.
    async fn verify<C>(&self, jwt: &Jwt<C>) -> Result<(), AuthError> {
        let alg: CoreJwsSigningAlgorithm = serde_json::from_value(jwt.header.alg.clone())
            .map_err(|_| AuthError::Invalid("unsupported algorithm"))?;
        // Only asymmetric algorithms: a provider's public key must never be usable as an HMAC secret.
        if matches!(
            alg,
            CoreJwsSigningAlgorithm::HmacSha256
                | CoreJwsSigningAlgorithm::HmacSha384
                | CoreJwsSigningAlgorithm::HmacSha512
                | CoreJwsSigningAlgorithm::None
        ) {
            return Err(AuthError::Invalid("unsupported algorithm"));
        }
        let keys = match self.current() {
            Some(keys) => keys,
            None => {
                self.refetch(NO_KEYS_WAIT).await;
                self.current().ok_or_else(|| {
                    AuthError::Unavailable(
                        self.last_error
                            .lock()
                            .ok()
                            .and_then(|e| e.clone())
                            .unwrap_or_else(|| "no keys loaded yet".into()),
                    )
                })?
            }
        };
        let mut verdict = check_signature(&keys, jwt, &alg);
        if verdict == Verdict::UnknownKey && self.refetch_possible() {
            // The provider may have rotated its keys.
            metrics::counter!("confab_identity_unknown_kid_refetches_total").increment(1);
            self.refetch(UNKNOWN_KEY_WAIT).await;
            if let Some(keys) = self.current() {
                verdict = check_signature(&keys, jwt, &alg);
            }
        }
        match verdict {
            Verdict::Valid => Ok(()),
            Verdict::UnknownKey => Err(AuthError::Invalid("unknown signing key")),
            Verdict::Invalid => Err(AuthError::Invalid("bad signature")),
        }
    }
}

fn check_signature<C>(set: &KeySet, jwt: &Jwt<C>, alg: &CoreJwsSigningAlgorithm) -> Verdict {
    // The signed part holds the header, so the algorithm and key id are in the digest too.
    let digest: [u8; 32] = {
        use sha2::Digest;
        let mut hasher = Sha256::new();
        hasher.update(&jwt.signed);
        hasher.update([0]);
        hasher.update(&jwt.signature);
        hasher.finalize().into()
    };
    if set.verified.lock().is_ok_and(|v| v.contains(&digest)) {
        metrics::counter!("confab_identity_signature_checks_total", "result" => "remembered")
            .increment(1);
        return Verdict::Valid;
    }
    let verdict = check_signature_with_keys(set, jwt, alg);
    if verdict == Verdict::Valid {
        metrics::counter!("confab_identity_signature_checks_total", "result" => "checked")
            .increment(1);
        if let Ok(mut verified) = set.verified.lock() {
            if verified.len() >= VERIFIED_TOKENS_MAX {
                verified.clear();
            }
            verified.insert(digest);
        }
    }
    verdict
}

fn check_signature_with_keys<C>(
    set: &KeySet,
    jwt: &Jwt<C>,
    alg: &CoreJwsSigningAlgorithm,
) -> Verdict {
    let candidates: Vec<&CoreJsonWebKey> = match &jwt.header.kid {
        Some(kid) => match set.keys.get(kid) {
            Some(key) => vec![key],
            None => return Verdict::UnknownKey,
        },
        None => set.unnamed.iter().chain(set.keys.values()).collect(),
    };
    let valid = candidates.into_iter().any(|key| {
        key.verify_signature(alg, &jwt.signed, &jwt.signature)
            .is_ok()
    });
    if valid {
        Verdict::Valid
    } else {
        Verdict::Invalid
    }
}

/// The background task that keeps an [`OidcIdentity`]'s keys fresh.
async fn refresher(
    shared: std::sync::Weak<OidcShared>,
    interval: Duration,
    min_refetch: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let Some(identity) = shared.upgrade() else {
            return;
        };
        let fetched_at = tokio::time::Instant::now();
        let ok = match identity.refresh().await {
            Ok(()) => true,
            Err(error) => {
                metrics::counter!("confab_identity_refresh_failures_total").increment(1);
                tracing::warn!(issuer = %identity.issuer, %error, "identity provider keys not refreshed; the loaded ones stay in use");
                false
            }
        };
        // Scheduled: the interval (or sooner after a failure); early on a request's wake-up,
        // but never within `min_refetch` of the last fetch.
        let next = if ok {
            interval
        } else {
            min_refetch.min(interval)
        };
        let wake = Arc::clone(&identity.wake);
        drop(identity);
        let woken = async {
            wake.notified().await;
            tokio::time::sleep_until(fetched_at + min_refetch).await;
        };
        let wait = async {
            tokio::select! {
                () = tokio::time::sleep(next) => {}
                () = woken => {}
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = wait => {}
        }
    }
}

impl OidcIdentity {
    /// Starts loading the provider's keys in the background (so it must be called within a Tokio
    /// runtime); `refresh` is how often they are refetched.
    pub fn new(
        issuer: &str,
        client_ids: Vec<String>,
        leeway_secs: u64,
        refresh: Duration,
    ) -> Result<OidcIdentity, AuthError> {
        OidcIdentity::with_timings(
            issuer,
            client_ids,
            leeway_secs,
            refresh.max(MIN_REFRESH_INTERVAL),
            MIN_REFRESH_INTERVAL,
        )
    }

    fn with_timings(
        issuer: &str,
        client_ids: Vec<String>,
        leeway_secs: u64,
        interval: Duration,
        min_refetch: Duration,
    ) -> Result<OidcIdentity, AuthError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let shared = Arc::new(OidcShared {
            issuer: issuer.trim_end_matches('/').to_owned(),
            client_ids,
            leeway: i64::try_from(leeway_secs).unwrap_or(30),
            http,
            interval,
            min_refetch,
            keys: std::sync::RwLock::new(None),
            jwks_uri: std::sync::Mutex::new(None),
            wake: Arc::new(tokio::sync::Notify::new()),
            attempts: tokio::sync::watch::channel(0).0,
            last_fetch: std::sync::Mutex::new(None),
            // The first fetch starts right away.
            in_flight: AtomicBool::new(true),
            last_error: std::sync::Mutex::new(None),
            discoveries: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
        });
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(refresher(
            Arc::downgrade(&shared),
            shared.interval,
            shared.min_refetch,
            stop.clone(),
        ));
        Ok(OidcIdentity {
            shared,
            _stop: stop.drop_guard(),
        })
    }

    /// How many discoveries and key set fetches ran: (discoveries, fetches).
    pub fn fetch_counts(&self) -> (u64, u64) {
        (
            self.shared.discoveries.load(Ordering::Relaxed),
            self.shared.fetches.load(Ordering::Relaxed),
        )
    }
}

#[async_trait]
impl Identity for OidcIdentity {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let jwt: Jwt<Claims> = decode(token)?;
        self.shared.verify(&jwt).await?;
        principal(
            &jwt.claims,
            jwt.header.typ.as_deref(),
            &self.shared.issuer,
            &self.shared.client_ids,
            self.shared.leeway,
        )
    }

    async fn check(&self) -> Result<(), String> {
        if self.shared.current().is_some() {
            return Ok(());
        }
        Err(self
            .shared
            .last_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "identity provider keys not loaded yet".into()))
    }

    async fn verify_logout(&self, token: &str) -> Result<Logout, AuthError> {
        let jwt: Jwt<LogoutClaims> = decode(token)?;
        self.shared.verify(&jwt).await?;
        logout(
            &jwt.claims,
            jwt.header.typ.as_deref(),
            &self.shared.issuer,
            &self.shared.client_ids,
            self.shared.leeway,
        )
    }
}

/// The issuer of dev tokens.
pub const DEV_ISSUER: &str = "confab-dev";
const DEV_CLIENT: &str = "confab-dev";
const DEV_KEY_FILE: &str = "dev-identity.key";

/// Verifies tokens minted by [`DevIdentity::mint`]: HS256 with a random key kept in the data
/// directory. For one machine only; the server refuses to bind a non-loopback address in this mode.
pub struct DevIdentity {
    key: Vec<u8>,
}

impl DevIdentity {
    /// Loads the key from `data_dir`, creating it (readable by the owner only) on first use. Safe when
    /// several processes start at once: the key is written aside and linked into place, so all of
    /// them end up with the one that landed first.
    pub fn open(data_dir: &Path) -> std::io::Result<DevIdentity> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join(DEV_KEY_FILE);
        if let Ok(key) = std::fs::read(&path)
            && key.len() >= 32
        {
            return Ok(DevIdentity { key });
        }
        let candidate = data_dir.join(format!("{DEV_KEY_FILE}.{}", uuid::Uuid::new_v4().simple()));
        write_private(&candidate, &rand::random::<[u8; 32]>())?;
        let linked = std::fs::hard_link(&candidate, &path);
        let _ = std::fs::remove_file(&candidate);
        match linked {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
        let key = std::fs::read(&path)?;
        if key.len() < 32 {
            return Err(std::io::Error::other(format!(
                "{} is not a dev identity key",
                path.display()
            )));
        }
        Ok(DevIdentity { key })
    }

    /// A token for `username`, valid for `ttl`.
    pub fn mint(&self, username: &str, ttl: Duration) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        self.mint_until(
            username,
            now + i64::try_from(ttl.as_secs()).unwrap_or(86_400),
        )
    }

    /// A token for `username` that expires at `expires` (Unix seconds), which may be in the past.
    pub fn mint_until(&self, username: &str, expires: i64) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            iss: DEV_ISSUER.into(),
            sub: username.into(),
            exp: expires,
            nbf: Some(now.min(expires) - 1),
            iat: Some(now.min(expires)),
            azp: Some(DEV_CLIENT.into()),
            aud: Audience::One(DEV_CLIENT.into()),
            typ: Some("Bearer".into()),
            sid: Some(uuid::Uuid::new_v4().simple().to_string()),
            preferred_username: Some(username.into()),
            name: Some(capitalise(username)),
            email: Some(format!("{username}@localhost")),
            email_verified: Some(serde_json::Value::Bool(true)),
        };
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap_or_default());
        let signed = format!("{header}.{payload}");
        let signature = URL_SAFE_NO_PAD.encode(self.mac(signed.as_bytes()).finalize().into_bytes());
        format!("{signed}.{signature}")
    }

    fn mac(&self, message: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(message);
        mac
    }
}

fn capitalise(name: &str) -> String {
    let mut chars = name.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[async_trait]
impl Identity for DevIdentity {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let jwt: Jwt<Claims> = decode(token)?;
        if jwt.header.alg != serde_json::json!("HS256") {
            return Err(AuthError::Invalid("unsupported algorithm"));
        }
        self.mac(&jwt.signed)
            .verify_slice(&jwt.signature)
            .map_err(|_| AuthError::Invalid("bad signature"))?;
        principal(
            &jwt.claims,
            jwt.header.typ.as_deref(),
            DEV_ISSUER,
            &[DEV_CLIENT.to_owned()],
            0,
        )
    }

    async fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The bearer token of a request's `Authorization` header.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Result<&str, AuthError> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Invalid("malformed Authorization header"))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or(AuthError::Invalid("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Invalid("expected a Bearer token"));
    }
    Ok(token.trim())
}

impl From<&AuthError> for crate::Problem {
    fn from(error: &AuthError) -> crate::Problem {
        use axum::http::StatusCode;
        match error {
            AuthError::Unavailable(_) => crate::Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "identity-unavailable",
                "tokens cannot be verified right now",
            ),
            other => crate::Problem::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                other.to_string(),
            ),
        }
    }
}

impl axum::response::IntoResponse for AuthError {
    fn into_response(self) -> axum::response::Response {
        if let AuthError::Unavailable(why) = &self {
            tracing::warn!(%why, "identity provider unavailable");
        }
        let mut response = crate::Problem::from(&self).into_response();
        if response.status() == axum::http::StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dev_tokens_verify_and_forgeries_do_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = DevIdentity::open(dir.path()).expect("key");
        let token = identity.mint("alice", Duration::from_secs(60));
        let principal = identity.authenticate(&token).await.expect("valid");
        assert_eq!(principal.username, "alice");
        assert_eq!(principal.display_name, "Alice");
        assert_eq!(principal.user_id, UserId::from_subject(DEV_ISSUER, "alice"));

        // The same key is found again by a second process.
        let again = DevIdentity::open(dir.path()).expect("key");
        assert!(again.authenticate(&token).await.is_ok());

        let other = DevIdentity::open(tempfile::tempdir().expect("tempdir").path()).expect("key");
        assert!(matches!(
            other.authenticate(&token).await,
            Err(AuthError::Invalid("bad signature"))
        ));

        let mut parts: Vec<&str> = token.split('.').collect();
        let tampered_claims = URL_SAFE_NO_PAD.encode(
            br#"{"iss":"confab-dev","sub":"bob","exp":9999999999,"azp":"confab-dev","preferred_username":"bob"}"#,
        );
        parts[1] = &tampered_claims;
        assert!(identity.authenticate(&parts.join(".")).await.is_err());
        assert!(identity.authenticate("garbage").await.is_err());
    }

    #[test]
    fn processes_starting_together_agree_on_one_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let keys: Vec<Vec<u8>> = (0..8)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || DevIdentity::open(&path).expect("key").key)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("thread"))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] == w[1]));
        let leftovers = std::fs::read_dir(&path).expect("dir").count();
        assert_eq!(leftovers, 1, "only the key file remains");
    }

    #[tokio::test]
    async fn expired_dev_tokens_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = DevIdentity::open(dir.path()).expect("key");
        let expired = identity.mint_until("alice", OffsetDateTime::now_utc().unix_timestamp() - 10);
        assert!(matches!(
            identity.authenticate(&expired).await,
            Err(AuthError::Expired)
        ));
    }

    fn claims(iss: &str, azp: Option<&str>, aud: Audience) -> Claims {
        Claims {
            iss: iss.into(),
            sub: "s".into(),
            exp: now() + 60,
            nbf: None,
            iat: Some(now()),
            azp: azp.map(str::to_owned),
            aud,
            typ: Some("Bearer".into()),
            sid: Some("session-1".into()),
            preferred_username: Some("u".into()),
            name: None,
            email: None,
            email_verified: None,
        }
    }

    #[test]
    fn claims_must_name_this_issuer_and_audience() {
        let ids = vec!["web".to_owned()];
        let check = |claims: &Claims| principal(claims, Some("JWT"), "i", &ids, 5);
        let good = check(&claims(
            "i",
            Some("web"),
            Audience::Many(vec!["web".into()]),
        ))
        .expect("valid");
        assert_eq!(good.session.as_deref(), Some("session-1"));
        assert!(check(&claims("i", Some("x"), Audience::One("web".into()))).is_ok());
        // `azp` alone is not enough: the audience must name this service.
        assert!(matches!(
            check(&claims("i", Some("web"), Audience::None)),
            Err(AuthError::Invalid(_))
        ));
        assert!(check(&claims("i", Some("web"), Audience::One("account".into()))).is_err());
        // The issuer exactly.
        assert!(check(&claims("i/", Some("web"), Audience::One("web".into()))).is_err());
        assert!(check(&claims("other", Some("web"), Audience::One("web".into()))).is_err());
        // Times, with the leeway.
        let mut expired = claims("i", None, Audience::One("web".into()));
        expired.exp = now() - 10;
        assert!(matches!(check(&expired), Err(AuthError::Expired)));
        expired.exp = now() - 2;
        assert!(check(&expired).is_ok(), "within the leeway");
        let mut early = claims("i", None, Audience::One("web".into()));
        early.nbf = Some(now() + 60);
        assert!(check(&early).is_err());
        early.nbf = None;
        early.iat = Some(now() + 60);
        assert!(check(&early).is_err());
        // The type: ID and refresh tokens are not bearer credentials.
        let mut id_token = claims("i", Some("web"), Audience::One("web".into()));
        id_token.typ = Some("ID".into());
        assert!(check(&id_token).is_err());
        id_token.typ = None;
        assert!(check(&id_token).is_err(), "no type at all");
        assert!(principal(&id_token, Some("at+jwt"), "i", &ids, 5).is_ok());
    }

    fn logout_claims() -> LogoutClaims {
        serde_json::from_value(serde_json::json!({
            "iss": "i", "aud": "web", "iat": now(), "jti": "j", "sub": "s", "sid": "session-1",
            "events": {BACKCHANNEL_LOGOUT_EVENT: {}}
        }))
        .expect("claims")
    }

    #[test]
    fn logout_tokens_are_checked() {
        let ids = vec!["web".to_owned()];
        let check = |claims: &LogoutClaims| logout(claims, Some("logout+jwt"), "i", &ids, 5);
        let ended = check(&logout_claims()).expect("valid");
        assert_eq!(ended.session.as_deref(), Some("session-1"));
        assert_eq!(ended.user, Some(UserId::from_subject("i", "s")));
        let mut bad = logout_claims();
        bad.iss = "other".into();
        assert!(check(&bad).is_err());
        let mut bad = logout_claims();
        bad.aud = Audience::One("account".into());
        assert!(check(&bad).is_err());
        let mut bad = logout_claims();
        bad.events = None;
        assert!(check(&bad).is_err());
        let mut bad = logout_claims();
        bad.nonce = Some(serde_json::json!("n"));
        assert!(check(&bad).is_err());
        let mut bad = logout_claims();
        bad.sid = None;
        bad.sub = None;
        assert!(check(&bad).is_err());
        let mut bad = logout_claims();
        bad.iat = now() - 3600;
        assert!(check(&bad).is_err());
        // An access token is not a logout token.
        assert!(logout(&logout_claims(), Some("at+jwt"), "i", &ids, 5).is_err());
    }

    /// A small OpenID provider whose key set a test changes, and can make hang.
    struct Provider {
        issuer: String,
        keys: Arc<std::sync::Mutex<Vec<(String, p256::ecdsa::SigningKey)>>>,
        hang: Arc<AtomicBool>,
    }

    impl Provider {
        async fn start(kids: &[&str]) -> Provider {
            use axum::routing::get;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let issuer = format!("http://{}", listener.local_addr().unwrap());
            let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
            let hang = Arc::new(AtomicBool::new(false));
            let provider = Provider {
                issuer: issuer.clone(),
                keys: Arc::clone(&keys),
                hang: Arc::clone(&hang),
            };
            for kid in kids {
                provider.add(kid);
            }
            let discovery = {
                let issuer = issuer.clone();
                let hang = Arc::clone(&hang);
                move || {
                    let issuer = issuer.clone();
                    let hang = Arc::clone(&hang);
                    async move {
                        if hang.load(Ordering::Acquire) {
                            std::future::pending::<()>().await;
                        }
                        axum::Json(serde_json::json!({
                            "issuer": issuer,
                            "authorization_endpoint": format!("{issuer}/auth"),
                            "jwks_uri": format!("{issuer}/certs"),
                            "response_types_supported": ["code"],
                            "subject_types_supported": ["public"],
                            "id_token_signing_alg_values_supported": ["ES256"],
                        }))
                    }
                }
            };
            let certs = move || {
                let keys = Arc::clone(&keys);
                let hang = Arc::clone(&hang);
                async move {
                    if hang.load(Ordering::Acquire) {
                        std::future::pending::<()>().await;
                    }
                    let keys: Vec<serde_json::Value> = keys
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|(kid, key)| {
                            use p256::elliptic_curve::sec1::ToSec1Point;
                            let point =
                                p256::PublicKey::from(key.verifying_key()).to_sec1_point(false);
                            let bytes = point.as_bytes();
                            serde_json::json!({
                                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                                "kid": kid,
                                "x": URL_SAFE_NO_PAD.encode(&bytes[1..33]),
                                "y": URL_SAFE_NO_PAD.encode(&bytes[33..65]),
                            })
                        })
                        .collect();
                    axum::Json(serde_json::json!({ "keys": keys }))
                }
            };
            let router = axum::Router::new()
                .route("/.well-known/openid-configuration", get(discovery))
                .route("/certs", get(certs));
            tokio::spawn(async move { axum::serve(listener, router).await });
            provider
        }

        /// An identity that trusts this provider for audience `web`, with 5 s of leeway.
        fn identity(&self, refresh: Duration, min_refetch: Duration) -> OidcIdentity {
            OidcIdentity::with_timings(&self.issuer, vec!["web".into()], 5, refresh, min_refetch)
                .unwrap()
        }

        fn add(&self, kid: &str) {
            let key = p256::ecdsa::SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap();
            self.keys.lock().unwrap().push((kid.to_owned(), key));
        }

        fn remove(&self, kid: &str) {
            self.keys.lock().unwrap().retain(|(k, _)| k != kid);
        }

        /// An access token signed by key `kid` (or by a key no one knows, when it is not
        /// there).
        fn token(&self, kid: &str) -> String {
            use p256::ecdsa::signature::Signer;
            let key = self
                .keys
                .lock()
                .unwrap()
                .iter()
                .find(|(k, _)| k == kid)
                .map(|(_, key)| key.clone())
                .unwrap_or_else(|| {
                    p256::ecdsa::SigningKey::from_slice(&rand::random::<[u8; 32]>()).unwrap()
                });
            let header = serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
            let claims = serde_json::json!({
                "iss": self.issuer, "sub": "alice", "aud": "web", "typ": "Bearer",
                "exp": now() + 600, "iat": now(), "sid": "s1",
            });
            let signed = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let signature: p256::ecdsa::Signature = key.sign(signed.as_bytes());
            format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
        }
    }

    async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !condition().await {
            assert!(Instant::now() < deadline, "{what} before the deadline");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn a_removed_key_stops_being_trusted_within_the_refresh_interval() {
        let provider = Provider::start(&["k1", "k2"]).await;
        let identity = provider.identity(Duration::from_secs(1), Duration::from_secs(10));
        let old = provider.token("k1");
        // Twice, so that the token is remembered as verified when its key goes.
        for _ in 0..2 {
            assert_eq!(identity.authenticate(&old).await.unwrap().username, "alice");
        }
        provider.remove("k1");
        eventually("the removed key is refused", async || {
            identity.authenticate(&old).await.is_err()
        })
        .await;
        assert!(identity.authenticate(&provider.token("k2")).await.is_ok());
        assert_eq!(identity.fetch_counts().0, 1, "discovery ran once");
    }

    #[tokio::test]
    async fn a_signature_is_checked_once_per_key_set_and_forgeries_are_never_remembered() {
        let provider = Provider::start(&["k1"]).await;
        let identity = provider.identity(Duration::from_secs(300), Duration::from_secs(10));
        let remembered = || {
            identity
                .shared
                .current()
                .map_or(0, |set| set.verified.lock().unwrap().len())
        };
        let token = provider.token("k1");
        assert!(identity.authenticate(&token).await.is_ok());
        assert_eq!(remembered(), 1);
        assert!(identity.authenticate(&token).await.is_ok());
        assert_eq!(
            remembered(),
            1,
            "the second request is answered from memory"
        );
        // The same signed part with another signature, and another key's signature, are checked
        // (and refused) every time, never remembered.
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
        bytes[10] ^= 1;
        let tampered = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&bytes));
        for _ in 0..2 {
            assert!(identity.authenticate(&tampered).await.is_err());
        }
        let (_, forged_signature) = provider
            .token("k9")
            .rsplit_once('.')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
            .unwrap();
        assert!(
            identity
                .authenticate(&format!("{signed}.{forged_signature}"))
                .await
                .is_err()
        );
        assert_eq!(remembered(), 1);
        // A refreshed key set starts empty: the token is checked against the new keys again.
        identity.shared.refresh().await.unwrap();
        assert_eq!(remembered(), 0);
        assert!(identity.authenticate(&token).await.is_ok());
        assert_eq!(remembered(), 1);
    }

    #[tokio::test]
    async fn an_unknown_key_id_triggers_one_refetch() {
        let provider = Provider::start(&["k1"]).await;
        let identity = provider.identity(Duration::from_secs(300), Duration::from_millis(200));
        assert!(identity.authenticate(&provider.token("k1")).await.is_ok());
        // The provider rotates in a new key: the first token naming it triggers a refetch.
        provider.add("k2");
        eventually("a refetch is allowed", async || {
            identity.shared.refetch_possible()
        })
        .await;
        assert!(identity.authenticate(&provider.token("k2")).await.is_ok());
        // Right after it, a random kid is refused without another fetch.
        let fetches = identity.fetch_counts().1;
        assert!(matches!(
            identity.authenticate(&provider.token("random")).await,
            Err(AuthError::Invalid("unknown signing key"))
        ));
        assert_eq!(identity.fetch_counts().1, fetches);
    }

    #[tokio::test]
    async fn a_random_kid_with_a_hanging_provider_stalls_no_one() {
        let provider = Provider::start(&["k1"]).await;
        let identity =
            Arc::new(provider.identity(Duration::from_secs(300), Duration::from_millis(100)));
        let valid = provider.token("k1");
        assert!(identity.authenticate(&valid).await.is_ok());
        // The provider stops answering; a token with a random kid triggers a refetch that hangs.
        provider.hang.store(true, Ordering::Release);
        eventually("a refetch is allowed", async || {
            identity.shared.refetch_possible()
        })
        .await;
        let random = {
            let identity = Arc::clone(&identity);
            let token = provider.token("random");
            tokio::spawn(async move {
                let started = Instant::now();
                (identity.authenticate(&token).await, started.elapsed())
            })
        };
        eventually("the refetch runs", async || {
            identity.shared.in_flight.load(Ordering::Acquire)
        })
        .await;
        // Meanwhile tokens signed by known keys verify at once, concurrently.
        let started = Instant::now();
        let checks: Vec<_> = (0..20)
            .map(|_| {
                let identity = Arc::clone(&identity);
                let valid = valid.clone();
                tokio::spawn(async move { identity.authenticate(&valid).await.is_ok() })
            })
            .collect();
        for check in checks {
            assert!(check.await.unwrap());
        }
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "valid tokens waited {:?}",
            started.elapsed()
        );
        // The unknown kid waits briefly, then is refused; discovery never runs again.
        let (outcome, waited) = random.await.unwrap();
        assert!(matches!(outcome, Err(AuthError::Invalid(_))));
        assert!(
            waited < UNKNOWN_KEY_WAIT + Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(identity.fetch_counts().0, 1);
        assert!(identity.check().await.is_ok(), "known keys stay in use");
    }
}
