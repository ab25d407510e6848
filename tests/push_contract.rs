//! Contract tests of the native push providers, on both stacks: confab sends delayed pushes to
//! local receivers that check every request the way FCM and APNs do.
//!
//! - FCM (HTTP v1): the receiver is also the OAuth token endpoint. It verifies the JWT-bearer
//!   assertion's RS256 signature with the service account's public key and its claims (`iss`,
//!   `scope`, `aud`, `iat`, `exp`), issues access tokens, and accepts `messages:send` only with a
//!   token it issued and a message of the documented shape.
//! - APNs: the receiver speaks HTTP/2 only (an HTTP/1.1 request is refused before any handler),
//!   verifies the provider token's ES256 signature with the `.p8` key's public half, its `kid` and
//!   `iss`, and the headers (`apns-topic`, `apns-push-type`, `apns-collapse-id`,
//!   `apns-expiration`, `apns-priority`) and payload of each push.
//!
//! With a delay of a few hundred milliseconds: an unfetched message gives exactly one push per
//! device; a 503 is retried; a refused access token is renewed once; a device the provider calls
//! gone (`UNREGISTERED`, token `INVALID_ARGUMENT`, 410, `BadDeviceToken`) is removed.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::pkcs8::EncodePrivateKey;
use serde_json::{Value, json};
use support::{DEADLINE, Stack, TestApp};

/// A service-account key made for these tests only (see `tests/fixtures/README.md`).
const SERVICE_ACCOUNT: &str = include_str!("fixtures/fcm-test-service-account.json");
const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
const APNS_KEY_ID: &str = "KEY4TEST01";
const APNS_TEAM_ID: &str = "TEAM4TEST1";
const APNS_TOPIC: &str = "com.example.confab";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A JWT's header and claims, decoded, and its signing input and signature.
fn split_jwt(jwt: &str) -> Option<(Value, Value, String, Vec<u8>)> {
    let (signed, signature) = jwt.rsplit_once('.')?;
    let (header, claims) = signed.split_once('.')?;
    let json = |part: &str| -> Option<Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    };
    Some((
        json(header)?,
        json(claims)?,
        signed.to_owned(),
        URL_SAFE_NO_PAD.decode(signature).ok()?,
    ))
}

/// Everything a receiver saw that a real provider would have refused, with the request.
#[derive(Clone, Default)]
struct Violations(Arc<Mutex<Vec<String>>>);

impl Violations {
    fn check(&self, ok: bool, what: impl FnOnce() -> String) -> bool {
        if !ok {
            self.0.lock().unwrap().push(what());
        }
        ok
    }

    fn assert_none(&self) {
        let violations = self.0.lock().unwrap();
        assert!(
            violations.is_empty(),
            "requests a provider would refuse: {violations:#?}"
        );
    }
}

/// One push as a receiver accepted it.
#[derive(Clone, Debug)]
struct Accepted {
    /// The device token it was addressed to.
    token: String,
    /// FCM: the `message`; APNs: the payload.
    body: Value,
    /// APNs: the `apns-collapse-id`.
    collapse_id: Option<String>,
}

/// What a receiver does with the next requests for a device token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    /// Answer 503 this many times (with `Retry-After: 0`), then accept.
    Unavailable(u32),
    /// Answer that the device is gone.
    Gone,
}

#[derive(Clone, Default)]
struct Log {
    accepted: Arc<Mutex<Vec<Accepted>>>,
    /// Requests per device token, answered however.
    attempts: Arc<Mutex<HashMap<String, u32>>>,
    behaviour: Arc<Mutex<HashMap<String, Behaviour>>>,
    violations: Violations,
}

impl Log {
    /// Counts an attempt and says whether to answer it otherwise than accepting it.
    fn attempt(&self, token: &str) -> Option<Behaviour> {
        *self
            .attempts
            .lock()
            .unwrap()
            .entry(token.to_owned())
            .or_default() += 1;
        let mut behaviours = self.behaviour.lock().unwrap();
        match behaviours.get(token).copied() {
            Some(Behaviour::Unavailable(n)) => {
                if n <= 1 {
                    behaviours.remove(token);
                } else {
                    behaviours.insert(token.to_owned(), Behaviour::Unavailable(n - 1));
                }
                Some(Behaviour::Unavailable(n))
            }
            other => other,
        }
    }

    fn set(&self, token: &str, behaviour: Behaviour) {
        self.behaviour
            .lock()
            .unwrap()
            .insert(token.to_owned(), behaviour);
    }

    fn attempts(&self, token: &str) -> u32 {
        self.attempts
            .lock()
            .unwrap()
            .get(token)
            .copied()
            .unwrap_or(0)
    }

    fn chat_of(push: &Accepted) -> &Value {
        // FCM carries the fields in `data`, APNs beside `aps`.
        if push.body["data"].is_object() {
            &push.body["data"]["chat_id"]
        } else {
            &push.body["chat_id"]
        }
    }

    /// Waits until a push for `chat` reaches `token`, and returns it.
    async fn next_for(&self, token: &str, chat: &str) -> Accepted {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            self.violations.assert_none();
            if let Some(push) = self
                .accepted
                .lock()
                .unwrap()
                .iter()
                .find(|p| p.token == token && Self::chat_of(p) == chat)
            {
                return push.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no push for {chat} reached {token}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn count_for(&self, chat: &str) -> usize {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .filter(|p| Self::chat_of(p) == chat)
            .count()
    }
}

// ---------------------------------------------------------------------------------------------
// FCM: the OAuth token endpoint and `messages:send`.

#[derive(Clone)]
struct FcmReceiver {
    origin: String,
    project: String,
    client_email: String,
    key_id: String,
    public: rsa::RsaPublicKey,
    /// Access tokens issued and not revoked.
    valid: Arc<Mutex<HashSet<String>>>,
    grants: Arc<Mutex<u32>>,
    log: Log,
}

impl FcmReceiver {
    async fn start() -> FcmReceiver {
        use rsa::pkcs8::DecodePrivateKey;
        let account: Value = serde_json::from_str(SERVICE_ACCOUNT).unwrap();
        let private =
            rsa::RsaPrivateKey::from_pkcs8_pem(account["private_key"].as_str().unwrap()).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = FcmReceiver {
            origin: format!("http://{}", listener.local_addr().unwrap()),
            project: account["project_id"].as_str().unwrap().to_owned(),
            client_email: account["client_email"].as_str().unwrap().to_owned(),
            key_id: account["private_key_id"].as_str().unwrap().to_owned(),
            public: private.to_public_key(),
            valid: Arc::default(),
            grants: Arc::default(),
            log: Log::default(),
        };
        let router = axum::Router::new()
            .route("/token", axum::routing::post(fcm_token))
            .route(
                "/v1/projects/{project}/messages:send",
                axum::routing::post(fcm_send),
            )
            .with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, router).await });
        receiver
    }

    fn token_uri(&self) -> String {
        format!("{}/token", self.origin)
    }

    fn grants(&self) -> u32 {
        *self.grants.lock().unwrap()
    }

    /// Forgets every access token issued, as a revocation would.
    fn revoke_all(&self) {
        self.valid.lock().unwrap().clear();
    }
}

/// The token endpoint: an RFC 7523 JWT-bearer grant, checked as Google's would.
async fn fcm_token(
    State(receiver): State<FcmReceiver>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    use rsa::signature::Verifier;
    let v = &receiver.log.violations;
    let refuse = || {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "invalid_grant", "error_description": "bad assertion"})),
        )
            .into_response()
    };
    let grant = form.get("grant_type").map(String::as_str);
    if !v.check(
        grant == Some("urn:ietf:params:oauth:grant-type:jwt-bearer"),
        || format!("grant_type {grant:?}"),
    ) {
        return refuse();
    }
    let Some((header, claims, signed, signature)) =
        form.get("assertion").and_then(|a| split_jwt(a))
    else {
        v.check(false, || "the assertion is not a JWT".into());
        return refuse();
    };
    let verified = rsa::pkcs1v15::Signature::try_from(signature.as_slice())
        .ok()
        .is_some_and(|signature| {
            rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(receiver.public.clone())
                .verify(signed.as_bytes(), &signature)
                .is_ok()
        });
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or_default(),
        claims["exp"].as_i64().unwrap_or_default(),
    );
    let checks = [
        (verified, "the RS256 signature verifies with the key"),
        (header["alg"] == "RS256", "alg RS256"),
        (header["kid"] == receiver.key_id.as_str(), "kid"),
        (claims["iss"] == receiver.client_email.as_str(), "iss"),
        (claims["scope"] == FCM_SCOPE, "scope"),
        (claims["aud"] == receiver.token_uri().as_str(), "aud"),
        ((iat - now()).abs() <= 60, "iat is now"),
        (exp > now() && exp - iat <= 3600, "exp within an hour"),
    ];
    for (ok, what) in checks {
        if !v.check(ok, || format!("assertion: {what}: {header} {claims}")) {
            return refuse();
        }
    }
    let mut grants = receiver.grants.lock().unwrap();
    *grants += 1;
    let token = format!("ya29.test-{}", *grants);
    receiver.valid.lock().unwrap().insert(token.clone());
    axum::Json(json!({"access_token": token, "expires_in": 3599, "token_type": "Bearer"}))
        .into_response()
}

fn fcm_error(status: StatusCode, code: &str, details: Value) -> Response {
    (
        status,
        axum::Json(json!({"error": {
            "code": status.as_u16(),
            "message": format!("test: {code}"),
            "status": code,
            "details": details,
        }})),
    )
        .into_response()
}

/// `messages:send`: a bearer token this endpoint issued, and a message of the v1 shape.
async fn fcm_send(
    State(receiver): State<FcmReceiver>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let v = &receiver.log.violations;
    let bearer = headers
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !receiver.valid.lock().unwrap().contains(bearer) {
        return fcm_error(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", json!([]));
    }
    v.check(project == receiver.project, || format!("project {project}"));
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        v.check(false, || "the body is not JSON".into());
        return fcm_error(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", json!([]));
    };
    let message = &body["message"];
    let token = message["token"].as_str().unwrap_or_default().to_owned();
    let data = message["data"].as_object().cloned().unwrap_or_default();
    let android = &message["android"];
    let checks = [
        (!token.is_empty(), "message.token"),
        (
            !data.is_empty() && data.values().all(Value::is_string),
            "data holds strings only",
        ),
        (
            android["collapse_key"] == message["data"]["chat_id"],
            "android.collapse_key is the chat",
        ),
        (
            android["ttl"].as_str().is_some_and(|ttl| {
                ttl.strip_suffix('s')
                    .and_then(|s| s.parse::<u64>().ok())
                    .is_some_and(|s| s > 0)
            }),
            "android.ttl is a duration in seconds",
        ),
    ];
    for (ok, what) in checks {
        v.check(ok, || format!("message: {what}: {body}"));
    }
    match receiver.log.attempt(&token) {
        Some(Behaviour::Unavailable(_)) => {
            let mut response = fcm_error(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", json!([]));
            response
                .headers_mut()
                .insert("retry-after", "0".parse().unwrap());
            response
        }
        Some(Behaviour::Gone) if token.starts_with("invalid-") => fcm_error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            json!([{"@type": "type.googleapis.com/google.rpc.BadRequest",
                    "fieldViolations": [{"field": "message.token",
                                         "description": "Invalid registration token"}]}]),
        ),
        Some(Behaviour::Gone) => fcm_error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            json!([{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                    "errorCode": "UNREGISTERED"}]),
        ),
        None => {
            receiver.log.accepted.lock().unwrap().push(Accepted {
                token,
                body: message.clone(),
                collapse_id: None,
            });
            axum::Json(json!({"name": format!("projects/{project}/messages/1")})).into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// APNs: HTTP/2 only.

#[derive(Clone)]
struct ApnsReceiver {
    origin: String,
    public: p256::ecdsa::VerifyingKey,
    /// Provider tokens seen.
    jwts: Arc<Mutex<HashSet<String>>>,
    log: Log,
}

impl ApnsReceiver {
    /// Serves HTTP/2 only (prior knowledge, as over TLS after ALPN `h2`); an HTTP/1.1 request
    /// is a protocol error to this server.
    async fn start(key: &p256::SecretKey) -> ApnsReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver = ApnsReceiver {
            origin: format!("http://{}", listener.local_addr().unwrap()),
            public: p256::ecdsa::VerifyingKey::from(&p256::ecdsa::SigningKey::from(key)),
            jwts: Arc::default(),
            log: Log::default(),
        };
        let router = axum::Router::new()
            .route("/3/device/{token}", axum::routing::post(apns_push))
            .with_state(receiver.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        receiver
    }

    fn jwts(&self) -> usize {
        self.jwts.lock().unwrap().len()
    }
}

fn apns_error(status: StatusCode, reason: &str) -> Response {
    (status, axum::Json(json!({"reason": reason}))).into_response()
}

async fn apns_push(
    State(receiver): State<ApnsReceiver>,
    Path(token): Path<String>,
    request: Request,
) -> Response {
    use p256::ecdsa::signature::Verifier;
    let v = &receiver.log.violations;
    v.check(request.version() == Version::HTTP_2, || {
        format!("{:?}, not HTTP/2", request.version())
    });
    let (parts, body) = request.into_parts();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    // The provider token.
    let authorization = header("authorization");
    let jwt = authorization.strip_prefix("bearer ").unwrap_or_default();
    let Some((jwt_header, claims, signed, signature)) = split_jwt(jwt) else {
        v.check(false, || format!("authorization {authorization:?}"));
        return apns_error(StatusCode::FORBIDDEN, "MissingProviderToken");
    };
    let verified = p256::ecdsa::Signature::from_slice(&signature)
        .ok()
        .is_some_and(|s| receiver.public.verify(signed.as_bytes(), &s).is_ok());
    let iat = claims["iat"].as_i64().unwrap_or_default();
    let token_checks = [
        (verified, "the ES256 signature verifies with the key"),
        (jwt_header["alg"] == "ES256", "alg ES256"),
        (jwt_header["kid"] == APNS_KEY_ID, "kid"),
        (claims["iss"] == APNS_TEAM_ID, "iss is the team"),
        (
            iat <= now() + 60 && now() - iat < 3600,
            "iat within the hour",
        ),
    ];
    for (ok, what) in token_checks {
        if !v.check(ok, || {
            format!("provider token: {what}: {jwt_header} {claims}")
        }) {
            return apns_error(StatusCode::FORBIDDEN, "InvalidProviderToken");
        }
    }
    receiver.jwts.lock().unwrap().insert(jwt.to_owned());
    let body = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let payload: Value = serde_json::from_slice(&body).unwrap_or_default();
    let chat = payload["chat_id"].as_str().unwrap_or_default().to_owned();
    let expiration = header("apns-expiration").parse::<i64>().unwrap_or_default();
    // A withdrawal is a silent background push; everything else an alert in the chat's thread.
    let withdrawal = payload["type"] == "withdrawn";
    let (push_type, priority) = if withdrawal {
        ("background", "5")
    } else {
        ("alert", "10")
    };
    let shape = if withdrawal {
        payload["aps"] == json!({"content-available": 1})
    } else {
        payload["aps"]["alert"]["body"].is_string() && payload["aps"]["thread-id"] == chat.as_str()
    };
    let checks = [
        (header("apns-topic") == APNS_TOPIC, "apns-topic"),
        (header("apns-push-type") == push_type, "apns-push-type"),
        (header("apns-priority") == priority, "apns-priority"),
        (
            !chat.is_empty() && header("apns-collapse-id") == chat,
            "apns-collapse-id is the chat",
        ),
        (expiration > now(), "apns-expiration is ahead"),
        (
            shape,
            "aps: an alert in the thread, or content-available alone",
        ),
        (
            token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()),
            "the device token in the path",
        ),
    ];
    for (ok, what) in checks {
        v.check(ok, || {
            format!("push: {what}: {:?} {payload}", parts.headers)
        });
    }
    match receiver.log.attempt(&token) {
        Some(Behaviour::Unavailable(_)) => {
            apns_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable")
        }
        Some(Behaviour::Gone) if token.starts_with("bad") => {
            apns_error(StatusCode::BAD_REQUEST, "BadDeviceToken")
        }
        Some(Behaviour::Gone) => apns_error(StatusCode::GONE, "Unregistered"),
        None => {
            receiver.log.accepted.lock().unwrap().push(Accepted {
                token,
                body: payload,
                collapse_id: Some(header("apns-collapse-id")),
            });
            StatusCode::OK.into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Through confab.

async fn send(app: &TestApp, token: &str, chat: &str, text: &str) -> String {
    let response = app
        .post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn register(app: &TestApp, token: &str, device: Value) {
    let response = app.post(token, "/v1/devices", &device).await;
    assert_eq!(response.status(), 201, "{device}");
}

/// Waits until the user has `n` devices left.
async fn wait_for_devices(app: &TestApp, token: &str, n: usize) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let devices: Value = app.get(token, "/v1/devices").await.json().await.unwrap();
        if devices["items"].as_array().unwrap().len() == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gone devices were never removed: {devices}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/metrics` counts the platform's pushes (sent, retried into sent, gone) and times its requests.
async fn assert_metrics(app: &TestApp, platform: &str) {
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "confab_pushes_sent_total",
        "confab_push_devices_gone_total",
        "confab_push_provider_seconds_count",
    ] {
        let label = format!("platform=\"{platform}\"");
        assert!(
            metrics
                .lines()
                .any(|line| line.starts_with(&format!("{name}{{")) && line.contains(&label)),
            "{name} with {label} is missing: {metrics}"
        );
    }
}

/// A recipient's two devices on one provider, sent to through confab.
struct Scenario {
    app: TestApp,
    alice: String,
    alice_id: String,
    bob: String,
}

async fn scenario(stack: Stack, configure: impl FnOnce(&mut confab_runtime::Config)) -> Scenario {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.push.delay_ms = Some(300);
    configure(&mut config);
    let app = support::spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    app.me(&bob).await;
    Scenario {
        app,
        alice,
        alice_id,
        bob,
    }
}

async fn fcm_contract(stack: Stack) {
    let receiver = FcmReceiver::start().await;
    let s = scenario(stack, |config| {
        config.push.fcm.service_account_json = Some(SERVICE_ACCOUNT.to_owned());
        config.push.fcm.base_url = Some(receiver.origin.clone());
        config.push.fcm.token_uri = Some(receiver.token_uri());
    })
    .await;
    let (phone, tablet) = (
        support::unique("fcm-phone-"),
        support::unique("invalid-tablet-"),
    );
    for token in [&phone, &tablet] {
        register(&s.app, &s.bob, json!({"platform": "fcm", "token": token})).await;
    }
    let bob_id = s.app.me(&s.bob).await;
    let mut chats = Vec::new();
    for _ in 0..5 {
        chats.push(s.app.group_chat(&s.alice, &[&bob_id]).await);
    }
    let [first, retried, renewed, later, gone] = &chats[..] else {
        unreachable!()
    };

    // Unfetched: exactly one data message per device, with the push's fields as strings.
    let signal = send(&s.app, &s.alice, first, "hello").await;
    for token in [&phone, &tablet] {
        let push = receiver.log.next_for(token, first).await;
        let data = &push.body["data"];
        assert_eq!(data["type"], "messages");
        assert_eq!(data["chat_id"], first.as_str());
        assert_eq!(data["signal_id"], signal.as_str());
        assert_eq!(data["author_id"], s.alice_id.as_str());
        assert_eq!(data["count"], "1");
        assert_eq!(push.body["android"]["collapse_key"], first.as_str());
    }
    assert_eq!(receiver.grants(), 1, "one access token serves every push");

    // A 503 (with Retry-After) is retried.
    receiver.log.set(&phone, Behaviour::Unavailable(1));
    let before = receiver.log.attempts(&phone);
    send(&s.app, &s.alice, retried, "once more").await;
    receiver.log.next_for(&phone, retried).await;
    assert_eq!(receiver.log.attempts(&phone) - before, 2, "503, then 200");

    // A revoked access token: one new grant, and the push goes through.
    receiver.revoke_all();
    send(&s.app, &s.alice, renewed, "after revocation").await;
    for token in [&phone, &tablet] {
        receiver.log.next_for(token, renewed).await;
    }
    assert_eq!(receiver.grants(), 2, "a 401 renews the access token once");

    // Exactly once: a later push has gone out, and the first chat still got one per device.
    send(&s.app, &s.alice, later, "later").await;
    for token in [&phone, &tablet] {
        receiver.log.next_for(token, later).await;
    }
    assert_eq!(receiver.log.count_for(first), 2, "one push per device");
    assert_eq!(receiver.log.count_for(retried), 2, "the retry sent it once");

    // UNREGISTERED (404) and INVALID_ARGUMENT about the token: both devices are gone.
    receiver.log.set(&phone, Behaviour::Gone);
    receiver.log.set(&tablet, Behaviour::Gone);
    send(&s.app, &s.alice, gone, "to gone devices").await;
    wait_for_devices(&s.app, &s.bob, 0).await;
    assert_eq!(receiver.log.count_for(gone), 0);
    receiver.log.violations.assert_none();
    assert_metrics(&s.app, "fcm").await;
    s.app.stop().await;
}

async fn apns_contract(stack: Stack) {
    let key = p256::SecretKey::from_slice(&[0x5a; 32]).unwrap();
    let receiver = ApnsReceiver::start(&key).await;
    // The receiver refuses HTTP/1.1.
    let http1 = reqwest::Client::builder().http1_only().build().unwrap();
    let refused = http1
        .post(format!("{}/3/device/{}", receiver.origin, "ab".repeat(32)))
        .send()
        .await;
    assert!(refused.is_err(), "an HTTP/1.1 request was answered");
    let pem = key
        .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string();
    let s = scenario(stack, |config| {
        config.push.apns.key_pem = Some(pem);
        config.push.apns.key_id = Some(APNS_KEY_ID.into());
        config.push.apns.team_id = Some(APNS_TEAM_ID.into());
        config.push.apns.base_url = Some(receiver.origin.clone());
    })
    .await;
    let hex = |prefix: &str| {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        format!("{prefix}{unique}{unique}")[..64].to_owned()
    };
    let (phone, ipad) = (hex("0"), hex("bad"));
    for token in [&phone, &ipad] {
        register(
            &s.app,
            &s.bob,
            json!({"platform": "apns", "token": token, "topic": APNS_TOPIC}),
        )
        .await;
    }
    let bob_id = s.app.me(&s.bob).await;
    let mut chats = Vec::new();
    for _ in 0..4 {
        chats.push(s.app.group_chat(&s.alice, &[&bob_id]).await);
    }
    let [first, retried, later, gone] = &chats[..] else {
        unreachable!()
    };

    // Unfetched: exactly one alert per device, in the chat's thread, collapsing by chat.
    let signal = send(&s.app, &s.alice, first, "hello").await;
    for token in [&phone, &ipad] {
        let push = receiver.log.next_for(token, first).await;
        // The recipient allows previews (the default): the text, under the sender's name.
        assert_eq!(push.body["aps"]["alert"]["body"], "hello");
        assert!(
            push.body["aps"]["alert"]["title"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
        );
        assert_eq!(push.body["aps"]["thread-id"], first.as_str());
        assert_eq!(push.body["signal_id"], signal.as_str());
        assert_eq!(push.body["author_id"], s.alice_id.as_str());
        assert_eq!(push.body["count"], 1);
        assert_eq!(push.collapse_id.as_deref(), Some(first.as_str()));
    }

    // A 503 is retried.
    receiver.log.set(&phone, Behaviour::Unavailable(1));
    let before = receiver.log.attempts(&phone);
    send(&s.app, &s.alice, retried, "once more").await;
    receiver.log.next_for(&phone, retried).await;
    assert_eq!(receiver.log.attempts(&phone) - before, 2, "503, then 200");

    // Exactly once, and one provider token for all of it.
    let last = send(&s.app, &s.alice, later, "later").await;
    for token in [&phone, &ipad] {
        receiver.log.next_for(token, later).await;
    }
    assert_eq!(receiver.log.count_for(first), 2, "one push per device");
    assert_eq!(receiver.log.count_for(retried), 2, "the retry sent it once");
    assert_eq!(receiver.jwts(), 1, "the provider token is reused");

    // Read on another device: the notification is withdrawn by a silent push with its collapse id.
    let read = s
        .app
        .post(
            &s.bob,
            &format!("/v1/chats/{later}/read"),
            &json!({"up_to": last}),
        )
        .await;
    assert_eq!(read.status(), 200);
    for token in [&phone, &ipad] {
        let deadline = tokio::time::Instant::now() + support::DEADLINE;
        loop {
            let withdrawn = receiver.log.accepted.lock().unwrap().iter().any(|p| {
                &p.token == token
                    && p.body["type"] == "withdrawn"
                    && p.collapse_id.as_deref() == Some(later.as_str())
            });
            if withdrawn {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no withdrawal reached {token}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    // 410 Unregistered and 400 BadDeviceToken: both devices are gone.
    receiver.log.set(&phone, Behaviour::Gone);
    receiver.log.set(&ipad, Behaviour::Gone);
    send(&s.app, &s.alice, gone, "to gone devices").await;
    wait_for_devices(&s.app, &s.bob, 0).await;
    assert_eq!(receiver.log.count_for(gone), 0);
    receiver.log.violations.assert_none();
    assert_metrics(&s.app, "apns").await;
    s.app.stop().await;
}

#[tokio::test]
async fn fcm_contract_on_the_embedded_default() {
    Box::pin(fcm_contract(Stack::Embedded)).await;
}

#[tokio::test]
async fn fcm_contract_on_the_real_stack() {
    if support::real_stack_available("fcm_contract_on_the_real_stack").await {
        Box::pin(fcm_contract(Stack::Real)).await;
    }
}

#[tokio::test]
async fn apns_contract_on_the_embedded_default() {
    Box::pin(apns_contract(Stack::Embedded)).await;
}

#[tokio::test]
async fn apns_contract_on_the_real_stack() {
    if support::real_stack_available("apns_contract_on_the_real_stack").await {
        Box::pin(apns_contract(Stack::Real)).await;
    }
}
