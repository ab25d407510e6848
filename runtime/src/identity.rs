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
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;
use tokio::sync::{Mutex, RwLock};

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
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(&'static str),
    #[error("token expired")]
    Expired,
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Identity: Send + Sync + 'static {
    /// Verifies `token` (the bearer credential, without the `Bearer ` prefix).
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError>;
    /// Whether tokens can be verified now (keys loaded).
    async fn check(&self) -> Result<(), String>;
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
    azp: Option<String>,
    #[serde(default, skip_serializing_if = "Audience::is_empty")]
    aud: Audience,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preferred_username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
}

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
}

/// A JWT split into its parts, decoded.
struct Jwt {
    header: Header,
    claims: Claims,
    signed: Vec<u8>,
    signature: Vec<u8>,
}

fn decode(token: &str) -> Result<Jwt, AuthError> {
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
    let claims: Claims =
        serde_json::from_slice(&b64(payload)?).map_err(|_| AuthError::Invalid("bad claims"))?;
    Ok(Jwt {
        header,
        claims,
        signed: token.as_bytes()[..token.len() - signature.len() - 1].to_vec(),
        signature: b64(signature)?,
    })
}

/// Checks the time, issuer, audience and type claims, and maps the token to a [`Principal`].
fn principal(
    claims: &Claims,
    issuer: &str,
    client_ids: &[String],
    leeway: i64,
) -> Result<Principal, AuthError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if claims.exp + leeway < now {
        return Err(AuthError::Expired);
    }
    if claims.nbf.is_some_and(|nbf| nbf - leeway > now) {
        return Err(AuthError::Invalid("not yet valid"));
    }
    if claims.iss != issuer {
        return Err(AuthError::Invalid("wrong issuer"));
    }
    let for_us = client_ids
        .iter()
        .any(|id| claims.azp.as_deref() == Some(id.as_str()) || claims.aud.contains(id));
    if !for_us {
        return Err(AuthError::Invalid("not issued for this service"));
    }
    // Keycloak marks ID and refresh tokens in `typ`; only access tokens are bearer credentials.
    if let Some(typ) = &claims.typ
        && !typ.eq_ignore_ascii_case("bearer")
    {
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
        email: claims.email.clone(),
        expires_at: claims.exp,
    })
}

/// Verifies access tokens issued by an OpenID Connect provider.
pub struct OidcIdentity {
    issuer: String,
    client_ids: Vec<String>,
    leeway: i64,
    http: reqwest::Client,
    keys: RwLock<Option<KeySet>>,
    /// Serialises refreshes and remembers the last one, so unknown `kid`s cannot hammer the provider.
    refresh: Mutex<Option<Instant>>,
}

struct KeySet {
    jwks_uri: openidconnect::JsonWebKeySetUrl,
    keys: HashMap<String, CoreJsonWebKey>,
    unnamed: Vec<CoreJsonWebKey>,
}

/// The outcome of checking a token's signature against the loaded keys.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Valid,
    Invalid,
    /// The token names a key id the loaded set does not have.
    UnknownKey,
}

const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(10);

impl OidcIdentity {
    pub fn new(
        issuer: &str,
        client_ids: Vec<String>,
        leeway_secs: u64,
    ) -> Result<OidcIdentity, AuthError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        Ok(OidcIdentity {
            issuer: issuer.trim_end_matches('/').to_owned(),
            client_ids,
            leeway: i64::try_from(leeway_secs).unwrap_or(30),
            http,
            keys: RwLock::new(None),
            refresh: Mutex::new(None),
        })
    }

    /// Fetches discovery metadata and keys (when none are loaded) or just the keys.
    async fn refresh_keys(&self, force: bool) -> Result<(), AuthError> {
        let mut last = self.refresh.lock().await;
        let have_keys = self.keys.read().await.is_some();
        if have_keys && !force {
            return Ok(());
        }
        if let Some(at) = *last
            && at.elapsed() < MIN_REFRESH_INTERVAL
            && have_keys
        {
            return Ok(());
        }
        *last = Some(Instant::now());
        let existing_uri = self.keys.read().await.as_ref().map(|k| k.jwks_uri.clone());
        let (jwks_uri, set) = match existing_uri {
            Some(uri) => {
                let set = CoreJsonWebKeySet::fetch_async(&uri, &self.http)
                    .await
                    .map_err(|e| AuthError::Unavailable(format!("fetching JWKS: {e}")))?;
                (uri, set)
            }
            None => {
                let issuer = IssuerUrl::new(self.issuer.clone())
                    .map_err(|e| AuthError::Unavailable(format!("bad issuer URL: {e}")))?;
                let metadata = CoreProviderMetadata::discover_async(issuer, &self.http)
                    .await
                    .map_err(|e| AuthError::Unavailable(format!("OIDC discovery: {e}")))?;
                (metadata.jwks_uri().clone(), metadata.jwks().clone())
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
        tracing::info!(issuer = %self.issuer, keys = keys.len() + unnamed.len(), "loaded identity provider keys");
        *self.keys.write().await = Some(KeySet {
            jwks_uri,
            keys,
            unnamed,
        });
        Ok(())
    }

    async fn verify_signature(
        &self,
        jwt: &Jwt,
        alg: &CoreJwsSigningAlgorithm,
    ) -> Result<Verdict, AuthError> {
        let guard = self.keys.read().await;
        let Some(set) = guard.as_ref() else {
            return Err(AuthError::Unavailable("no keys loaded".into()));
        };
        let candidates: Vec<&CoreJsonWebKey> = match &jwt.header.kid {
            Some(kid) => match set.keys.get(kid) {
                Some(key) => vec![key],
                None => return Ok(Verdict::UnknownKey),
            },
            None => set.unnamed.iter().chain(set.keys.values()).collect(),
        };
        let valid = candidates.into_iter().any(|key| {
            key.verify_signature(alg, &jwt.signed, &jwt.signature)
                .is_ok()
        });
        Ok(if valid {
            Verdict::Valid
        } else {
            Verdict::Invalid
        })
    }
}

#[async_trait]
impl Identity for OidcIdentity {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let jwt = decode(token)?;
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
        self.refresh_keys(false).await?;
        let mut verdict = self.verify_signature(&jwt, &alg).await?;
        if verdict == Verdict::UnknownKey {
            // The provider may have rotated its keys.
            self.refresh_keys(true).await?;
            verdict = self.verify_signature(&jwt, &alg).await?;
        }
        if verdict != Verdict::Valid {
            return Err(AuthError::Invalid("bad signature"));
        }
        principal(&jwt.claims, &self.issuer, &self.client_ids, self.leeway)
    }

    async fn check(&self) -> Result<(), String> {
        self.refresh_keys(false).await.map_err(|e| e.to_string())
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
            azp: Some(DEV_CLIENT.into()),
            aud: Audience::None,
            typ: Some("Bearer".into()),
            preferred_username: Some(username.into()),
            name: Some(capitalise(username)),
            email: Some(format!("{username}@localhost")),
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
        let jwt = decode(token)?;
        if jwt.header.alg != serde_json::json!("HS256") {
            return Err(AuthError::Invalid("unsupported algorithm"));
        }
        self.mac(&jwt.signed)
            .verify_slice(&jwt.signature)
            .map_err(|_| AuthError::Invalid("bad signature"))?;
        principal(&jwt.claims, DEV_ISSUER, &[DEV_CLIENT.to_owned()], 0)
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

    #[test]
    fn claims_must_name_this_issuer_and_client() {
        let claims = |iss: &str, azp: Option<&str>, aud: Audience| Claims {
            iss: iss.into(),
            sub: "s".into(),
            exp: OffsetDateTime::now_utc().unix_timestamp() + 60,
            nbf: None,
            azp: azp.map(str::to_owned),
            aud,
            typ: Some("Bearer".into()),
            preferred_username: Some("u".into()),
            name: None,
            email: None,
        };
        let ids = vec!["web".to_owned()];
        assert!(principal(&claims("i", Some("web"), Audience::None), "i", &ids, 0).is_ok());
        assert!(
            principal(
                &claims("i", Some("x"), Audience::Many(vec!["web".into()])),
                "i",
                &ids,
                0
            )
            .is_ok()
        );
        assert!(principal(&claims("other", Some("web"), Audience::None), "i", &ids, 0).is_err());
        assert!(
            principal(
                &claims("i", Some("x"), Audience::One("y".into())),
                "i",
                &ids,
                0
            )
            .is_err()
        );
        let mut id_token = claims("i", Some("web"), Audience::None);
        id_token.typ = Some("ID".into());
        assert!(principal(&id_token, "i", &ids, 0).is_err());
    }
}
