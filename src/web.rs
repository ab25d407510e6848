//! The web client (`web/`), served at `/` from files built into the binary, and how it signs in
//! (`/config.json`): with OIDC, the authorization-code flow with PKCE at the configured issuer for
//! the first of `identity.client_ids`; on the dev identity of `confab serve`, `POST /v1/dev/sign-in`
//! with a user name answers a token for that name, as `confab dev-token` does (with OIDC there is
//! no such route).

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use confab_runtime::identity::DevIdentity;
use confab_runtime::problem::Problem;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use time::OffsetDateTime;

/// How long a dev sign-in lasts.
const DEV_SESSION: Duration = Duration::from_secs(12 * 3600);

/// The client's files: (path, content type, body).
const FILES: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("../web/index.html"),
    ),
    (
        "/app.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/app.js"),
    ),
    (
        "/app.css",
        "text/css; charset=utf-8",
        include_str!("../web/app.css"),
    ),
    // At the root, so that its scope is the whole client.
    (
        "/sw.js",
        "text/javascript; charset=utf-8",
        include_str!("../web/sw.js"),
    ),
];

/// How the web client signs in.
pub enum WebSignIn {
    /// A user name typed in, trusted (`confab serve` on the dev identity).
    Dev(DevIdentity),
    /// The authorization-code flow with PKCE at `issuer`, as the public client `client_id`.
    Oidc { issuer: String, client_id: String },
    /// Not from this client (dev tokens on a distributed role).
    Unavailable,
}

/// The client's routes, its sign-in with them. `downloads_from`: where attachment downloads are
/// redirected to (the storage's origin, with presigned redirects), which the page must be allowed
/// to fetch from.
pub fn routes(sign_in: WebSignIn, downloads_from: Option<&str>) -> Router {
    let (config, connect_to) = match &sign_in {
        WebSignIn::Dev(_) => (serde_json::json!({"sign_in": "dev"}), None),
        WebSignIn::Oidc { issuer, client_id } => (
            serde_json::json!({"sign_in": "oidc", "issuer": issuer, "client_id": client_id}),
            origin_of(issuer),
        ),
        WebSignIn::Unavailable => (serde_json::json!({"sign_in": "unavailable"}), None),
    };
    let policy = content_policy(connect_to.as_deref(), downloads_from.and_then(origin_of));
    let policy = HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'self'"));
    let config = Bytes::from(config.to_string());
    let mut router = Router::new();
    let files = FILES
        .iter()
        .map(|&(path, content_type, body)| {
            (path, content_type, Bytes::from_static(body.as_bytes()))
        })
        .chain([("/config.json", "application/json", config)]);
    for (path, content_type, body) in files {
        let policy = policy.clone();
        router = router.route(path, get(move || file(content_type, body, policy)));
    }
    if let WebSignIn::Dev(dev) = sign_in {
        router = router.route(
            "/v1/dev/sign-in",
            post(dev_sign_in).with_state(Arc::new(dev)),
        );
    }
    router
}

/// The page's content security policy. It fetches from its own origin, with OIDC from the
/// issuer's (discovery, tokens), and with presigned redirects from the storage's (a download's
/// redirect is followed by the same fetch, which the policy checks again).
fn content_policy(issuer: Option<&str>, storage: Option<String>) -> String {
    let mut connect = String::from("'self'");
    for origin in [issuer.map(str::to_owned), storage].into_iter().flatten() {
        connect.push(' ');
        connect.push_str(&origin);
    }
    format!("default-src 'self'; img-src 'self' blob: data:; connect-src {connect}")
}

/// `scheme://host[:port]` of a URL, for a content security policy.
fn origin_of(url: &str) -> Option<String> {
    let origin = reqwest::Url::parse(url).ok()?.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

async fn file(content_type: &'static str, body: Bytes, policy: HeaderValue) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (header::CONTENT_SECURITY_POLICY, policy),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    username: String,
}

#[derive(Serialize)]
struct SignedIn {
    token: String,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
}

/// A user name as the dev sign-in takes it: 1 to 64 of `a-z`, `0-9`, `.`, `_`, `-`.
fn dev_username(value: &str) -> Option<String> {
    let name = value.trim().to_ascii_lowercase();
    let valid = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    valid.then_some(name)
}

async fn dev_sign_in(
    State(dev): State<Arc<DevIdentity>>,
    body: Result<axum::Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(body) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                "invalid-body",
                rejection.body_text(),
            )
            .into_response();
        }
    };
    let Some(username) = dev_username(&body.username) else {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-username",
            "a user name is 1 to 64 of a-z, 0-9, '.', '_' and '-'",
        )
        .into_response();
    };
    let expires_at = OffsetDateTime::now_utc() + DEV_SESSION;
    axum::Json(SignedIn {
        token: dev.mint(&username, DEV_SESSION),
        expires_at,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::{content_policy, dev_username, origin_of};

    /// With presigned redirects, a download's fetch ends at the storage: the policy must let the
    /// page fetch from there, or every large attachment fails to load.
    #[test]
    fn the_page_may_fetch_from_the_storage_it_is_redirected_to() {
        let storage = origin_of("http://127.0.0.1:8333");
        let policy = content_policy(Some("https://id.example.org"), storage);
        assert!(
            policy.ends_with("connect-src 'self' https://id.example.org http://127.0.0.1:8333"),
            "{policy}"
        );
        assert!(content_policy(None, None).ends_with("connect-src 'self'"));
    }

    #[test]
    fn the_issuer_origin_is_scheme_host_and_port() {
        assert_eq!(
            origin_of("http://127.0.0.1:8180/realms/confab").as_deref(),
            Some("http://127.0.0.1:8180")
        );
        assert_eq!(
            origin_of("https://id.example.org/realms/x").as_deref(),
            Some("https://id.example.org")
        );
        assert_eq!(origin_of("not a url"), None);
    }

    #[test]
    fn dev_user_names_are_plain() {
        assert_eq!(dev_username(" Alice "), Some("alice".into()));
        assert_eq!(dev_username("bob.smith-2_x"), Some("bob.smith-2_x".into()));
        for bad in ["", "a b", "ä", "<script>", &"x".repeat(65)] {
            assert_eq!(dev_username(bad), None, "{bad:?}");
        }
    }
}
