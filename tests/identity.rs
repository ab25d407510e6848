//! Identity and secrets: dev identity only by explicit choice, strong and rotatable signing
//! secrets, strict token claims, and logging out everywhere (`POST /v1/me/logout-all`, and the
//! identity provider's back-channel logout, with the real Keycloak).

mod support;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab::Role;
use confab_runtime::config::IdentityMode;
use hmac::Mac;
use serde_json::{Value, json};
use support::{DEADLINE, SseStream, Stack, TestApp, config_for, spawn_app, spawn_with};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Runs `role` with `config` until it fails to start, or until it is ready (then stops it).
async fn start(role: Role, config: confab_runtime::config::Config) -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(confab::run(role, config, listener, shutdown.clone()));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if server.is_finished() {
            return server
                .await
                .unwrap()
                .map_err(|e| format!("{e:#}"))
                .and(Err("stopped by itself".into()));
        }
        if reqwest::get(format!("{base}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            shutdown.cancel();
            server.await.unwrap().map_err(|e| format!("{e:#}"))?;
            return Ok(());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{role:?} never answered"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn distributed_roles_refuse_dev_identity_unless_allowed() {
    for role in [Role::Api, Role::Notifier, Role::WsPlexer] {
        let data = tempfile::tempdir().unwrap();
        let config = config_for(Stack::Embedded, data.path().to_path_buf());
        assert_eq!(config.identity.mode, IdentityMode::Dev);
        let error = start(role, config.clone()).await.expect_err("refused");
        assert!(
            error.contains("identity.allow_dev_in_distributed_roles"),
            "{role:?}: {error}"
        );
        let mut allowed = config;
        allowed.identity.allow_dev_in_distributed_roles = true;
        start(role, allowed).await.expect("starts when allowed");
    }
    // `confab serve` runs dev identity by itself.
    let data = tempfile::tempdir().unwrap();
    start(
        Role::Serve,
        config_for(Stack::Embedded, data.path().to_path_buf()),
    )
    .await
    .expect("serve starts");
}

#[tokio::test]
async fn weak_or_placeholder_secrets_are_refused_at_start() {
    for (field, secret) in [
        ("secret_key", "REPLACE-ME-with-openssl-rand-hex-32"),
        ("secret_key", "short-secret"),
        ("secret_key", "00000000000000000000000000000000000000"),
        ("secret_keys", "new:changeme-changeme-changeme-changeme"),
    ] {
        let data = tempfile::tempdir().unwrap();
        let mut config = config_for(Stack::Embedded, data.path().to_path_buf());
        config.secret_key = None;
        if field == "secret_key" {
            config.secret_key = Some(secret.into());
        } else {
            config.secret_keys = Some(secret.into());
        }
        let error = start(Role::Serve, config).await.expect_err(secret);
        assert!(error.contains(field), "{secret}: {error}");
    }
}

async fn ticket(app: &TestApp, token: &str) -> String {
    let response = app.post(token, "/v1/events/ticket", &json!({})).await;
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["ticket"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn spawn_with_keys(stack: Stack, keys: &str) -> TestApp {
    let data = tempfile::tempdir().unwrap();
    let mut config = config_for(stack, data.path().to_path_buf());
    config.secret_key = None;
    config.secret_keys = Some(keys.into());
    spawn_with(stack, config, data).await
}

/// Tickets and cursors signed before a rotation keep working; once the old key is removed they
/// are refused.
async fn rotation_keeps_live_clients(stack: Stack) {
    let (old, new) = (support::secret(), support::secret());
    // All three apps start first: a ticket lives a minute, and on a loaded machine starting two
    // apps on the real stack can take longer than that.
    let before = spawn_with_keys(stack, &format!("old:{old}")).await;
    let rotated = spawn_with_keys(stack, &format!("new:{new},old:{old}")).await;
    let removed = spawn_with_keys(stack, &format!("new:{new}")).await;
    let alice = before.token("alice").await;
    let bob = before.token("bob").await;
    before.me(&bob).await;
    for _ in 0..2 {
        before.group_chat(&alice, &[&before.me(&bob).await]).await;
    }
    let old_ticket = ticket(&before, &alice).await;
    let page: Value = before
        .get(&alice, "/v1/chats?limit=1")
        .await
        .json()
        .await
        .unwrap();
    let cursor = page["next_cursor"]
        .as_str()
        .expect("a second page")
        .to_owned();

    // The same user's token on the other apps (a dev token is checked with the app's own key).
    for (app, accepted) in [(&rotated, true), (&removed, false)] {
        let token = app.token("alice").await;
        let stream = app
            .http
            .get(app.url(&format!("/v1/events?ticket={old_ticket}")))
            .send()
            .await
            .unwrap();
        let listed = app
            .get(&token, &format!("/v1/chats?limit=1&cursor={cursor}"))
            .await;
        if accepted {
            assert_eq!(stream.status(), 200, "the old key still verifies");
            assert_eq!(listed.status(), 200);
        } else {
            assert_eq!(stream.status(), 401, "a removed key no longer verifies");
            assert_eq!(stream.headers()["content-type"], "application/problem+json");
            assert_eq!(listed.status(), 400);
        }
        drop(stream);
    }
    // New tickets are signed with the new key, which the app without the old key accepts.
    let fresh = ticket(&rotated, &rotated.token("alice").await).await;
    assert!(fresh.starts_with("new."));
    let stream = removed
        .http
        .get(removed.url(&format!("/v1/events?ticket={fresh}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    drop(stream);
    before.stop().await;
    rotated.stop().await;
    removed.stop().await;
}

#[tokio::test]
async fn rotation_keeps_live_clients_on_the_embedded_stack() {
    rotation_keeps_live_clients(Stack::Embedded).await;
}

#[tokio::test]
async fn rotation_keeps_live_clients_on_the_real_stack() {
    if !support::real_stack_available("rotation_keeps_live_clients_on_the_real_stack").await {
        return;
    }
    rotation_keeps_live_clients(Stack::Real).await;
}

/// A token signed with the app's dev key, with any claims.
fn dev_signed(app: &TestApp, claims: &Value) -> String {
    let key = std::fs::read(app.config.data_dir.join("dev-identity.key")).unwrap();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{payload}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(signed.as_bytes());
    format!(
        "{signed}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

async fn assert_refused(app: &TestApp, token: &str, what: &str) {
    let response = app.get(token, "/v1/me").await;
    assert_eq!(response.status(), 401, "{what}");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json",
        "{what}"
    );
}

/// Refused, and so is an event stream opened with it.
async fn assert_refused_with_its_stream(app: &TestApp, token: &str, what: &str) {
    assert_refused(app, token, what).await;
    let stream = app
        .http
        .get(app.url("/v1/events"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 401, "{what}: a stream");
}

/// Logs out everywhere with `token`, and waits until `listening`, a stream of the same user, has
/// ended and the clock's second is past the logout's (a token issued in the logout's second is
/// refused by it anyway: one renewed after it is what tells). The logout's second.
async fn log_out_everywhere(app: &TestApp, token: &str, listening: &mut SseStream) -> i64 {
    let response = app.post(token, "/v1/me/logout-all", &json!({})).await;
    assert_eq!(response.status(), 204);
    let logged_out_at = now();
    listening.ends().await;
    while now() <= logged_out_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    logged_out_at
}

/// An address the provider has not verified is neither kept nor found: anybody can type someone
/// else's address into their profile at the provider, and others find a user by address. Once
/// verified (a boolean, or the string some providers write), it is.
#[tokio::test]
async fn an_unverified_address_is_not_taken() {
    let app = spawn_app(Stack::Embedded).await;
    let address = "ceo@corp.example";
    let mallory_with = |verified: Option<Value>| {
        let mut claims = json!({
            "iss": "confab-dev", "sub": "mallory", "aud": "confab-dev", "azp": "confab-dev",
            "typ": "Bearer", "exp": now() + 600, "iat": now(), "preferred_username": "mallory",
            "email": address,
        });
        if let Some(verified) = verified {
            claims["email_verified"] = verified;
        }
        dev_signed(&app, &claims)
    };
    let bob = app.token("bob").await;
    app.me(&bob).await;
    let found_by_address = || async {
        let response = app
            .http
            .get(app.url("/v1/users"))
            .query(&[("q", address)])
            .bearer_auth(&bob)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let page: Value = response.json().await.unwrap();
        page["items"].as_array().unwrap().len()
    };
    for verified in [None, Some(json!(false)), Some(json!("false"))] {
        let mallory = mallory_with(verified.clone());
        let me: Value = app.get(&mallory, "/v1/me").await.json().await.unwrap();
        assert!(me["email"].is_null(), "verified: {verified:?}: {me}");
        assert_eq!(found_by_address().await, 0, "verified: {verified:?}");
    }
    for verified in [json!(true), json!("true")] {
        let mallory = mallory_with(Some(verified.clone()));
        let me: Value = app.get(&mallory, "/v1/me").await.json().await.unwrap();
        assert_eq!(me["email"], address, "verified: {verified}");
        assert_eq!(found_by_address().await, 1, "verified: {verified}");
    }
    app.stop().await;
}

#[tokio::test]
async fn tokens_with_bad_claims_are_refused() {
    let app = spawn_app(Stack::Embedded).await;
    let good = json!({
        "iss": "confab-dev", "sub": "mallory", "aud": "confab-dev", "azp": "confab-dev",
        "typ": "Bearer", "exp": now() + 600, "iat": now(), "preferred_username": "mallory",
    });
    assert_eq!(
        app.get(&dev_signed(&app, &good), "/v1/me").await.status(),
        200
    );
    let with = |field: &str, value: Value| {
        let mut claims = good.clone();
        claims[field] = value;
        claims
    };
    let without = |field: &str| {
        let mut claims = good.clone();
        claims.as_object_mut().unwrap().remove(field);
        claims
    };
    for (what, claims) in [
        ("wrong audience", with("aud", json!("account"))),
        ("azp only", without("aud")),
        ("expired", with("exp", json!(now() - 60))),
        ("wrong issuer", with("iss", json!("https://evil.example"))),
        ("not yet valid", with("nbf", json!(now() + 600))),
        ("an ID token", with("typ", json!("ID"))),
        ("no type", without("typ")),
    ] {
        assert_refused(&app, &dev_signed(&app, &claims), what).await;
    }
    app.stop().await;
}

/// Keycloak's admin REST API, for the tests that change the dev realm (their own client only).
/// Each call signs in again: the master realm's admin tokens live a minute, which a test on a
/// loaded machine can outlast.
struct KeycloakAdmin {
    http: reqwest::Client,
    base: String,
}

impl KeycloakAdmin {
    async fn connect() -> KeycloakAdmin {
        let issuer = support::oidc_issuer();
        let base = issuer
            .split("/realms/")
            .next()
            .unwrap()
            .trim_end_matches('/')
            .to_owned();
        let admin = KeycloakAdmin {
            http: reqwest::Client::new(),
            base,
        };
        admin.token().await;
        admin
    }

    /// A fresh admin access token.
    async fn token(&self) -> String {
        let response = self
            .http
            .post(format!(
                "{}/realms/master/protocol/openid-connect/token",
                self.base
            ))
            .form(&[
                ("grant_type", "password"),
                ("client_id", "admin-cli"),
                ("username", "admin"),
                ("password", "admin"),
            ])
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "Keycloak admin login");
        response.json::<Value>().await.unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn realm(&self, path: &str) -> String {
        format!("{}/admin/realms/confab{path}", self.base)
    }

    /// Creates a public client with direct grants, its own id in `aud`, and `attributes`;
    /// answers its internal id.
    async fn create_client(&self, client_id: &str, audience: bool, attributes: Value) -> String {
        let mappers = if audience {
            json!([{
                "name": "audience", "protocol": "openid-connect",
                "protocolMapper": "oidc-audience-mapper",
                "config": {"included.client.audience": client_id, "access.token.claim": "true",
                           "id.token.claim": "false"}
            }])
        } else {
            json!([])
        };
        let response = self
            .http
            .post(self.realm("/clients"))
            .bearer_auth(self.token().await)
            .json(&json!({
                "clientId": client_id, "enabled": true, "publicClient": true,
                "directAccessGrantsEnabled": true, "standardFlowEnabled": false,
                "protocol": "openid-connect", "attributes": attributes,
                "protocolMappers": mappers,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201, "client created");
        response.headers()["location"]
            .to_str()
            .unwrap()
            .rsplit('/')
            .next()
            .unwrap()
            .to_owned()
    }

    async fn delete_client(&self, id: &str) {
        let _ = self
            .http
            .delete(self.realm(&format!("/clients/{id}")))
            .bearer_auth(self.token().await)
            .send()
            .await;
    }

    /// Ends a session, as an administrator (or the user signing out) would.
    async fn delete_session(&self, sid: &str) {
        let response = self
            .http
            .delete(self.realm(&format!("/sessions/{sid}")))
            .bearer_auth(self.token().await)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn keycloak_tokens_for_another_audience_are_refused() {
    if !support::real_stack_available("keycloak_tokens_for_another_audience_are_refused").await {
        return;
    }
    let admin = KeycloakAdmin::connect().await;
    // A client whose tokens carry no audience mapper: `azp` names it, `aud` does not.
    let client = support::unique("confab-test-");
    let id = admin.create_client(&client, false, json!({})).await;
    let data = tempfile::tempdir().unwrap();
    let mut config = config_for(Stack::Real, data.path().to_path_buf());
    config.identity.client_ids = format!("{},{client}", support::oidc_client());
    let app = spawn_with(Stack::Real, config, data).await;
    let azp_only =
        support::keycloak_token_at(&support::oidc_issuer(), &client, "alice", "alice").await;
    assert_eq!(claims_of(&azp_only)["azp"], client.as_str());
    assert_refused(&app, &azp_only, "azp only").await;
    // The dev realm's own client has the audience mapper: accepted.
    let good = support::keycloak_token("alice", "alice").await;
    assert_eq!(app.get(&good, "/v1/me").await.status(), 200);
    // A token with a key id Keycloak never issued.
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    parts[0] = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","kid":"no-such-key","typ":"JWT"}"#);
    assert_refused(&app, &parts.join("."), "unknown kid").await;
    admin.delete_client(&id).await;
    app.stop().await;
}

/// `POST /v1/me/logout-all` ends the caller's streams at once and refuses their old tokens and
/// tickets; other users are not affected and a new sign-in works.
async fn logout_all_ends_streams(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    let alice_ticket = ticket(&app, &alice).await;
    let mut alices = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;
    let mut bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;
    let response = app.post(&alice, "/v1/me/logout-all", &json!({})).await;
    assert_eq!(response.status(), 204);
    let logged_out_at = now();
    alices.ends().await;
    assert_refused(&app, &alice, "a token issued before the logout").await;
    let stream = app
        .http
        .get(app.url(&format!("/v1/events?ticket={alice_ticket}")))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 401, "a ticket issued before the logout");
    // bob is not affected: his stream carries his message.
    let chat = app.group_chat(&bob, &[&alice_id]).await;
    let sent = app
        .post(
            &bob,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "nonce": "n-1", "text": "still here"}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let event = bobs.next_of("signal.created").await;
    assert_eq!(event.data["data"]["text"], "still here");
    assert_eq!(app.get(&bob, "/v1/me").await.status(), 200);
    drop((alices, bobs));
    // A restart forgets no logout.
    let config = app.config.clone();
    let data = app.stop_keeping_state().await;
    let app = spawn_with(stack, config, data).await;
    assert_refused(
        &app,
        &alice,
        "a token issued before the logout, after a restart",
    )
    .await;
    assert_eq!(app.get(&bob, "/v1/me").await.status(), 200);
    // A token issued after the logout works.
    while now() <= logged_out_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = app.token("alice").await;
    assert_eq!(app.get(&again, "/v1/me").await.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn logout_all_ends_streams_on_the_embedded_stack() {
    logout_all_ends_streams(Stack::Embedded).await;
}

#[tokio::test]
async fn logout_all_ends_streams_on_the_real_stack() {
    if !support::real_stack_available("logout_all_ends_streams_on_the_real_stack").await {
        return;
    }
    logout_all_ends_streams(Stack::Real).await;
}

/// Logging out everywhere holds through a refresh at the provider: the provider's sessions go on
/// (confab does not end them there), so a device that renews its token after the logout gets a
/// token of the same session issued after it. That token is refused, whether the session was
/// used with the API or only with the event stream; another user's sessions are not affected.
#[tokio::test]
async fn logout_all_refuses_tokens_refreshed_after_it() {
    if !support::real_stack_available("logout_all_refuses_tokens_refreshed_after_it").await {
        return;
    }
    let app = spawn_app(Stack::Real).await;
    let phone = support::keycloak_sign_in("alice").await;
    let laptop = support::keycloak_sign_in("alice").await;
    let bob = support::keycloak_sign_in("bob").await;
    let sid = |token: &str| claims_of(token)["sid"].as_str().unwrap().to_owned();
    assert_ne!(sid(&phone.access_token), sid(&laptop.access_token));
    assert_eq!(app.get(&phone.access_token, "/v1/me").await.status(), 200);
    assert_eq!(app.get(&bob.access_token, "/v1/me").await.status(), 200);
    // The laptop only ever listens.
    let mut laptops = SseStream::open(
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(&laptop.access_token),
    )
    .await;

    let logged_out_at = log_out_everywhere(&app, &phone.access_token, &mut laptops).await;
    for (device, sign_in) in [("phone", &phone), ("laptop", &laptop)] {
        let renewed = support::keycloak_refresh(sign_in).await;
        let claims = claims_of(&renewed.access_token);
        assert_eq!(sid(&renewed.access_token), sid(&sign_in.access_token));
        assert!(
            claims["iat"].as_i64().unwrap() > logged_out_at,
            "{device}: issued after the logout: {claims}"
        );
        assert_refused_with_its_stream(&app, &renewed.access_token, device).await;
    }
    // bob's sessions go on, renewed too.
    assert_eq!(app.get(&bob.access_token, "/v1/me").await.status(), 200);
    let bob_renewed = support::keycloak_refresh(&bob).await;
    assert_eq!(
        app.get(&bob_renewed.access_token, "/v1/me").await.status(),
        200
    );
    // alice signs in again: a new session works.
    let again = support::keycloak_sign_in("alice").await;
    assert_eq!(app.get(&again.access_token, "/v1/me").await.status(), 200);
    app.stop().await;
}

/// The same with dev tokens, renewed by hand (a token of the same session issued later), on the
/// embedded stack; a restart keeps the sessions ended.
#[tokio::test]
async fn logout_all_refuses_sessions_renewed_after_it_on_the_embedded_stack() {
    let app = spawn_app(Stack::Embedded).await;
    let token = |app: &TestApp, user: &str, sid: &str| {
        dev_signed(
            app,
            &json!({
                "iss": "confab-dev", "sub": user, "aud": "confab-dev", "azp": "confab-dev",
                "typ": "Bearer", "exp": now() + 600, "iat": now(), "sid": sid,
                "preferred_username": user,
            }),
        )
    };
    let (phone, laptop, bobs) = (
        support::unique("phone-"),
        support::unique("laptop-"),
        support::unique("bob-"),
    );
    let alices_phone = token(&app, "alice", &phone);
    assert_eq!(app.get(&alices_phone, "/v1/me").await.status(), 200);
    assert_eq!(
        app.get(&token(&app, "bob", &bobs), "/v1/me").await.status(),
        200
    );
    // The laptop only ever listens.
    let mut laptops = SseStream::open(
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(token(&app, "alice", &laptop)),
    )
    .await;
    log_out_everywhere(&app, &alices_phone, &mut laptops).await;
    for (device, sid) in [("phone", &phone), ("laptop", &laptop)] {
        let renewed = token(&app, "alice", sid);
        assert_refused_with_its_stream(&app, &renewed, device).await;
    }
    assert_eq!(
        app.get(&token(&app, "bob", &bobs), "/v1/me").await.status(),
        200
    );
    let config = app.config.clone();
    let data = app.stop_keeping_state().await;
    let app = spawn_with(Stack::Embedded, config, data).await;
    assert_refused(&app, &token(&app, "alice", &phone), "after a restart").await;
    let again = token(&app, "alice", &support::unique("again-"));
    assert_eq!(app.get(&again, "/v1/me").await.status(), 200);
    app.stop().await;
}

/// An app with a Keycloak client of its own, whose sessions' ends Keycloak reports to the app
/// (back-channel logout).
struct BackchannelApp {
    app: TestApp,
    client: String,
    /// The client's id in Keycloak.
    id: String,
}

impl BackchannelApp {
    async fn start() -> (KeycloakAdmin, BackchannelApp) {
        let admin = KeycloakAdmin::connect().await;
        let client = support::unique("confab-test-");
        let data = tempfile::tempdir().unwrap();
        let mut config = config_for(Stack::Real, data.path().to_path_buf());
        config.identity.client_ids = client.clone();
        let app = spawn_with(Stack::Real, config, data).await;
        let id = admin
            .create_client(
                &client,
                true,
                json!({
                    "backchannel.logout.url": app.url("/v1/auth/backchannel-logout"),
                    "backchannel.logout.session.required": "true",
                }),
            )
            .await;
        (admin, BackchannelApp { app, client, id })
    }

    /// A token of a new session of `user` (whose password is their name).
    async fn token(&self, user: &str) -> String {
        support::keycloak_token_at(&support::oidc_issuer(), &self.client, user, user).await
    }

    async fn stop(self, admin: &KeycloakAdmin) {
        admin.delete_client(&self.id).await;
        self.app.stop().await;
    }
}

/// A socket whose token was refreshed with a token of another session belongs to that session
/// from then on: that session's logout ends it, and the logout of the session it was opened in
/// no longer does.
#[tokio::test]
async fn a_socket_refreshed_into_another_session_ends_with_that_session() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    if !support::real_stack_available("a_socket_refreshed_into_another_session").await {
        return;
    }
    let (admin, logouts) = BackchannelApp::start().await;
    let first = logouts.token("alice").await;
    let second = logouts.token("alice").await;
    let sid = |token: &str| claims_of(token)["sid"].as_str().unwrap().to_owned();
    assert_ne!(sid(&first), sid(&second));

    let mut request = format!("{}/v1/ws", logouts.app.base.replacen("http://", "ws://", 1))
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {first}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    /// The type of the next frame that is not an event, or "closed".
    async fn next(
        ws: &mut tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    ) -> String {
        loop {
            let frame = tokio::time::timeout(DEADLINE, ws.next())
                .await
                .expect("a frame before the deadline");
            match frame {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text).unwrap();
                    if frame["type"] != "event" {
                        return frame["type"].as_str().unwrap().to_owned();
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return "closed".to_owned(),
                Some(Ok(_)) => {}
            }
        }
    }
    assert_eq!(next(&mut ws).await, "ready");
    ws.send(Message::Text(
        json!({"type": "auth", "token": second}).to_string().into(),
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await, "auth");

    // The session the socket was opened in ends: the socket, now of the other, goes on.
    admin.delete_session(&sid(&first)).await;
    assert_refused(&logouts.app, &first, "the first session's token").await;
    ws.send(Message::Text(
        json!({"type": "request", "id": 1, "method": "GET", "path": "/v1/me"})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    assert_eq!(next(&mut ws).await, "response");
    // The session it was refreshed into ends: so does the socket.
    admin.delete_session(&sid(&second)).await;
    assert_eq!(next(&mut ws).await, "closed");
    logouts.stop(&admin).await;
}

#[tokio::test]
async fn keycloak_backchannel_logout_ends_the_session_and_its_streams() {
    if !support::real_stack_available("keycloak_backchannel_logout_ends_the_session").await {
        return;
    }
    let (admin, logouts) = BackchannelApp::start().await;
    let app = &logouts.app;
    let alice = logouts.token("alice").await;
    let other_alice = logouts.token("alice").await;
    let bob = logouts.token("bob").await;
    let mut alices = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&alice)).await;

    // Malformed and forged logout tokens are refused.
    for token in ["garbage", alice.as_str()] {
        let response = app
            .http
            .post(app.url("/v1/auth/backchannel-logout"))
            .form(&[("logout_token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert_eq!(app.get(&alice, "/v1/me").await.status(), 200);

    let sid = claims_of(&alice)["sid"].as_str().unwrap().to_owned();
    admin.delete_session(&sid).await;
    alices.ends().await;
    assert_refused(app, &alice, "the ended session's token").await;
    // Only that session ended: alice's other session and bob go on.
    assert_eq!(app.get(&other_alice, "/v1/me").await.status(), 200);
    assert_eq!(app.get(&bob, "/v1/me").await.status(), 200);
    logouts.stop(&admin).await;
}

/// A logout that the provider made too (a back-channel logout of one session, or of all of a
/// user's) is kept only as long as a token issued before it lives
/// (`identity.revocation_ttl_secs`): nothing renews in a session the provider ended. A process
/// started after that neither holds it nor reads it before it is ready. A session a logout
/// everywhere ended in confab alone is kept as long as a session lives.
async fn logouts_are_kept_as_long_as_a_token_lives(stack: Stack) {
    use confab_runtime::revocation::{Lasting, Revocation};
    let data = tempfile::tempdir().unwrap();
    let mut config = config_for(stack, data.path().to_path_buf());
    config.identity.revocation_ttl_secs = 1;
    config.identity.session_ttl_secs = 3600;
    let shutdown = CancellationToken::new();
    let started = || async {
        let revocations = confab::open_revocations(&config, shutdown.clone())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while revocations.check().is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the revocations were read in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        revocations
    };
    let alice = confab_schema::UserId::from_subject("i", &support::unique("alice"));
    let at = time::OffsetDateTime::now_utc().unix_timestamp();
    let first = started().await;
    for session in [Some("ended-at-the-provider".to_owned()), None] {
        first
            .revoke(Revocation {
                user: Some(alice),
                session,
                before: at,
            })
            .await
            .unwrap();
    }
    first
        .revoke_lasting(
            Revocation {
                user: Some(alice),
                session: Some("ended-in-confab".to_owned()),
                before: at,
            },
            Lasting::Session,
        )
        .await
        .unwrap();
    drop(first);

    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let later = started().await;
        assert!(
            later.is_revoked(alice, Some("ended-in-confab"), at + 1),
            "a session ended in confab alone is kept for a session's lifetime"
        );
        let held = later.is_revoked(alice, Some("ended-at-the-provider"), at + 1)
            || later.is_revoked(alice, None, at);
        if !held {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a process started {}s after the logouts still holds them, with a token's \
             lifetime of 1s",
            time::OffsetDateTime::now_utc().unix_timestamp() - at
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    shutdown.cancel();
    if stack == Stack::Real {
        confab_runtime::revocation::Revocations::delete_nats_bucket(
            &config.bus.nats_url,
            &config.bus.subject_prefix,
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn logouts_are_kept_as_long_as_a_token_lives_on_the_embedded_stack() {
    logouts_are_kept_as_long_as_a_token_lives(Stack::Embedded).await;
}

#[tokio::test]
async fn logouts_are_kept_as_long_as_a_token_lives_on_the_real_stack() {
    if !support::real_stack_available("logouts_are_kept_as_long_as_a_token_lives_on_the_real_stack")
        .await
    {
        return;
    }
    logouts_are_kept_as_long_as_a_token_lives(Stack::Real).await;
}
