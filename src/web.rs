//! The web client (`web/`), served at `/` from files built into the binary, and, on the dev
//! identity only, the sign-in it uses there: `POST /v1/dev/sign-in` with a user name answers a
//! token for that name, as `confab dev-token` does. With OIDC there is no such route.

use std::time::Duration;

use axum::Router;
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
];

/// The client's routes; with `dev` (the dev identity), its sign-in too.
pub fn routes(dev: Option<DevIdentity>) -> Router {
    let mut router = Router::new();
    for (path, content_type, body) in FILES {
        router = router.route(path, get(move || file(content_type, body)));
    }
    if let Some(dev) = dev {
        router = router.route(
            "/v1/dev/sign-in",
            post(dev_sign_in).with_state(Arc::new(dev)),
        );
    }
    router
}

async fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'",
                ),
            ),
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
    use super::dev_username;

    #[test]
    fn dev_user_names_are_plain() {
        assert_eq!(dev_username(" Alice "), Some("alice".into()));
        assert_eq!(dev_username("bob.smith-2_x"), Some("bob.smith-2_x".into()));
        for bad in ["", "a b", "ä", "<script>", &"x".repeat(65)] {
            assert_eq!(dev_username(bad), None, "{bad:?}");
        }
    }
}
