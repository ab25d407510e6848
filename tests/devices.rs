//! Devices for push notifications, on both stacks: registering (again), listing, moving to another
//! user, removing, who may do what, bad registrations, and the VAPID public key.

mod support;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_runtime::vapid::VapidKeys;
use serde_json::{Value, json};
use support::{Stack, TestApp, on_both_stacks};

async fn app_with_web_push(stack: Stack) -> (TestApp, VapidKeys) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    let keys = VapidKeys::generate();
    config.push.vapid_public_key = Some(keys.public_key.clone());
    config.push.vapid_private_key = Some(keys.private_key.clone());
    config.push.allow_insecure_endpoints = true;
    (support::spawn_with(stack, config, data).await, keys)
}

fn subscription(endpoint: &str) -> Value {
    json!({
        "platform": "webpush",
        "endpoint": endpoint,
        "expirationTime": null,
        "keys": {
            "p256dh": URL_SAFE_NO_PAD.encode(VapidKeys::generate().public_key_bytes()),
            "auth": URL_SAFE_NO_PAD.encode([7u8; 16]),
        }
    })
}

async fn devices_belong_to_their_user(stack: Stack) {
    let (app, keys) = app_with_web_push(stack).await;
    let alice = app.token("alice").await;
    let bob = app.token("bob").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;

    let key: Value = app
        .http
        .get(app.url("/v1/push/vapid-public-key"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(key["public_key"], keys.public_key.as_str());

    let browser = subscription("http://127.0.0.1:9/push/abc");
    let first = app.post(&alice, "/v1/devices", &browser).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["platform"], "webpush");
    assert_eq!(first["user_id"], alice_id.as_str());
    let again = app.post(&alice, "/v1/devices", &browser).await;
    assert_eq!(
        again.status(),
        200,
        "the same subscription is the same device"
    );
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["created_at"], first["created_at"]);
    let phone = app
        .post(
            &alice,
            "/v1/devices",
            &json!({"platform": "fcm", "token": "fcm-token-1"}),
        )
        .await;
    assert_eq!(phone.status(), 201);
    let phone: Value = phone.json().await.unwrap();

    let mine: Value = app.get(&alice, "/v1/devices").await.json().await.unwrap();
    assert_eq!(mine["items"].as_array().unwrap().len(), 2);
    let bobs: Value = app.get(&bob, "/v1/devices").await.json().await.unwrap();
    assert!(
        bobs["items"].as_array().unwrap().is_empty(),
        "bob sees none of alice's"
    );

    // bob cannot remove alice's device; registering her phone's token makes it his.
    let id = phone["id"].as_str().unwrap();
    let refused = app
        .http
        .delete(app.url(&format!("/v1/devices/{id}")))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let moved = app
        .post(
            &bob,
            "/v1/devices",
            &json!({"platform": "fcm", "token": "fcm-token-1"}),
        )
        .await;
    assert_eq!(moved.status(), 201);
    let moved: Value = moved.json().await.unwrap();
    assert_eq!(moved["id"], phone["id"]);
    assert_eq!(moved["user_id"], bob_id.as_str());
    let mine: Value = app.get(&alice, "/v1/devices").await.json().await.unwrap();
    assert_eq!(mine["items"].as_array().unwrap().len(), 1);

    let removed = app
        .http
        .delete(app.url(&format!("/v1/devices/{}", first["id"].as_str().unwrap())))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 204);
    let mine: Value = app.get(&alice, "/v1/devices").await.json().await.unwrap();
    assert!(mine["items"].as_array().unwrap().is_empty());

    // Bad registrations are 4xx problems.
    for bad in [
        json!({"platform": "webpush", "endpoint": "http://push.example/x", "keys": browser["keys"]}),
        json!({"platform": "webpush", "endpoint": "https://push.example/x", "keys": {"p256dh": "AAAA", "auth": "AAAA"}}),
        json!({"platform": "webpush", "endpoint": "https://push.example/x"}),
        json!({"platform": "apns", "token": "not-hex", "topic": "com.example"}),
        json!({"platform": "apns", "token": "ab".repeat(32)}),
        json!({"platform": "fcm"}),
        json!({"platform": "fcm", "token": "t", "endpoint": "https://push.example/x"}),
        json!({"platform": "pager", "token": "t"}),
        json!({"token": "t"}),
        json!({"platform": "fcm", "token": "t", "colour": "blue"}),
    ] {
        let response = app.post(&alice, "/v1/devices", &bad).await;
        assert_eq!(response.status(), 422, "{bad}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }
    let anonymous = app.http.get(app.url("/v1/devices")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
}

/// A user has at most `MAX_DEVICES_PER_USER` devices: one more is refused with a problem, and
/// nothing is kept; registering one they have again still works, and so does a new one once one
/// was removed.
async fn a_user_has_a_bounded_number_of_devices(stack: Stack) {
    let (app, _keys) = app_with_web_push(stack).await;
    let alice = app.token("alice").await;
    let most = confab_api::domain::devices::MAX_DEVICES_PER_USER;
    let mut ids = Vec::new();
    for i in 0..most {
        let registered = app
            .post(
                &alice,
                "/v1/devices",
                &subscription(&format!("http://127.0.0.1:9/push/{i}")),
            )
            .await;
        assert_eq!(registered.status(), 201);
        ids.push(
            registered.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let one_more = app
        .post(
            &alice,
            "/v1/devices",
            &subscription("http://127.0.0.1:9/push/one-more"),
        )
        .await;
    assert_eq!(one_more.status(), 409);
    assert_eq!(
        one_more.headers()["content-type"],
        "application/problem+json"
    );
    let listed: Value = app.get(&alice, "/v1/devices").await.json().await.unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), most, "{listed}");
    let again = app
        .post(
            &alice,
            "/v1/devices",
            &subscription("http://127.0.0.1:9/push/0"),
        )
        .await;
    assert_eq!(again.status(), 200, "one of hers, registered again");
    let removed = app
        .http
        .delete(app.url(&format!("/v1/devices/{}", ids[0])))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert!(removed.status().is_success());
    let in_its_place = app
        .post(
            &alice,
            "/v1/devices",
            &subscription("http://127.0.0.1:9/push/one-more"),
        )
        .await;
    assert_eq!(in_its_place.status(), 201);
    app.stop().await;
}

#[tokio::test]
async fn a_user_has_a_bounded_number_of_devices_on_the_embedded_default() {
    a_user_has_a_bounded_number_of_devices(Stack::Embedded).await;
}

#[tokio::test]
async fn a_user_has_a_bounded_number_of_devices_on_the_real_stack() {
    if support::real_stack_available("a_user_has_a_bounded_number_of_devices_on_the_real_stack")
        .await
    {
        a_user_has_a_bounded_number_of_devices(Stack::Real).await;
    }
}

#[tokio::test]
async fn devices_belong_to_their_user_on_the_embedded_default() {
    Box::pin(devices_belong_to_their_user(Stack::Embedded)).await;
}

#[tokio::test]
async fn devices_belong_to_their_user_on_the_real_stack() {
    if support::real_stack_available("devices_belong_to_their_user_on_the_real_stack").await {
        Box::pin(devices_belong_to_their_user(Stack::Real)).await;
    }
}

#[tokio::test]
async fn without_vapid_keys_web_push_is_refused() {
    let app = support::spawn_app(Stack::Embedded).await;
    let alice = app.token("alice").await;
    let key = app
        .http
        .get(app.url("/v1/push/vapid-public-key"))
        .send()
        .await
        .unwrap();
    assert_eq!(key.status(), 404);
    let refused = app
        .post(
            &alice,
            "/v1/devices",
            &subscription("https://push.example/abc"),
        )
        .await;
    assert_eq!(refused.status(), 422);
    app.stop().await;
}

/// `api`'s state, recording the logouts it makes in `logouts`; and those logouts.
/// Bob, with a phone registered in his session `bobs-phone` (issued now), and when that was.
async fn bob_with_a_phone(
    api: &support::held_store::HeldApi,
    state: &confab_api::ApiState,
) -> (confab_schema::User, i64) {
    use confab_api::domain::devices::{DeviceFields, NewDevice, PushSettings};
    use confab_api::domain::sessions::CallerSession;

    let bob = api.user("bob").await;
    let phone = NewDevice::parse(
        DeviceFields {
            platform: Some("fcm".into()),
            token: Some(format!("phone-of-{}", bob.id.0)),
            ..Default::default()
        },
        &PushSettings::default(),
    )
    .unwrap();
    let issued = time::OffsetDateTime::now_utc().unix_timestamp();
    let session = CallerSession {
        id: Some("bobs-phone".into()),
        issued_at: issued,
    };
    state
        .register_device(bob.id, &session, phone)
        .await
        .unwrap();
    (bob, issued)
}

fn recording_logouts(
    api: &support::held_store::HeldApi,
    logouts: &tempfile::TempDir,
) -> (
    confab_api::ApiState,
    Arc<confab_runtime::revocation::Revocations>,
) {
    let revocations = confab_runtime::revocation::Revocations::in_file(
        logouts.path().join("revocations.jsonl"),
        std::time::Duration::from_secs(3_600),
    )
    .unwrap();
    let state = api.state.clone().with_revocations(Arc::clone(&revocations));
    (state, revocations)
}

/// A logout everywhere whose removal of the user's devices fails answers the failure (so it is
/// not taken for done while the devices still get pushes), and the sessions have ended all the
/// same; tried again, it removes them.
async fn a_logout_that_could_not_remove_devices_says_so(stack: Stack) {
    use confab_api::error::ApiError;
    use confab_api::store::StoreError;
    use support::held_store::{Held, HeldApi};

    let api = HeldApi::new(stack).await;
    let logouts = tempfile::tempdir().unwrap();
    let (state, revocations) = recording_logouts(&api, &logouts);
    let (bob, issued) = bob_with_a_phone(&api, &state).await;

    api.store.fail_next(Held::DeviceRemoved);
    let failed = state.logout_all(bob.id).await;
    assert!(
        matches!(failed, Err(ApiError::Store(StoreError::Unavailable(_)))),
        "{failed:?}"
    );
    assert!(
        revocations.is_revoked(bob.id, None, issued),
        "the sessions ended although the devices stayed"
    );
    assert_eq!(state.devices(bob.id).await.unwrap().len(), 1);

    state.logout_all(bob.id).await.unwrap();
    assert!(state.devices(bob.id).await.unwrap().is_empty());
    api.clean_up().await;
}

on_both_stacks!(a_logout_that_could_not_remove_devices_says_so);

/// A logout everywhere that cannot read the user's sessions still removes their devices (a lost
/// phone must stop getting previews, and the caller's own token is already refused, so trying
/// again needs a new sign-in), and answers the failure: a 503 problem.
async fn a_logout_that_could_not_read_the_sessions_still_removes_devices(stack: Stack) {
    use axum::response::IntoResponse;
    use confab_api::error::ApiError;
    use confab_api::store::StoreError;
    use support::held_store::{Held, HeldApi};

    let api = HeldApi::new(stack).await;
    let logouts = tempfile::tempdir().unwrap();
    let (state, revocations) = recording_logouts(&api, &logouts);
    let (bob, issued) = bob_with_a_phone(&api, &state).await;

    api.store.fail_next(Held::SessionsRead);
    let failed = state.logout_all(bob.id).await;
    assert!(
        matches!(failed, Err(ApiError::Store(StoreError::Unavailable(_)))),
        "{failed:?}"
    );
    assert!(
        state.devices(bob.id).await.unwrap().is_empty(),
        "the devices outlived a logout that could not read the sessions"
    );
    let answer = failed.unwrap_err().into_response();
    assert_eq!(answer.status(), 503);
    assert_eq!(answer.headers()["content-type"], "application/problem+json");
    assert!(revocations.is_revoked(bob.id, None, issued));
    api.clean_up().await;
}

on_both_stacks!(a_logout_that_could_not_read_the_sessions_still_removes_devices);

/// A registration authenticated just before a logout everywhere, whose device is stored after the
/// logout read the user's devices, is undone: the device does not outlive the logout, and the
/// registration is refused. A device it had taken over from another user goes back to them.
async fn a_registration_racing_a_logout_everywhere_is_undone(stack: Stack) {
    use confab_api::domain::devices::{DeviceFields, NewDevice, PushSettings};
    use confab_api::domain::sessions::CallerSession;
    use confab_api::error::ApiError;
    use confab_runtime::identity::AuthError;
    use support::held_store::{Held, HeldApi};

    let api = HeldApi::new(stack).await;
    let logouts = tempfile::tempdir().unwrap();
    let (state, _) = recording_logouts(&api, &logouts);
    let (alice, bob) = (api.user("alice").await, api.user("bob").await);
    let device = |token: &str| {
        NewDevice::parse(
            DeviceFields {
                platform: Some("fcm".into()),
                token: Some(token.to_owned()),
                ..Default::default()
            },
            &PushSettings::default(),
        )
        .unwrap()
    };
    let session = |id: &str| CallerSession {
        id: Some(id.into()),
        issued_at: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    let (phone, shared) = (
        format!("phone-of-{}", bob.id.0),
        format!("shared-{}", bob.id.0),
    );
    state
        .register_device(alice.id, &session("alices-tablet"), device(shared.as_str()))
        .await
        .unwrap();
    let alices = state.devices(alice.id).await.unwrap();

    for (round, token) in [&phone, &shared].into_iter().enumerate() {
        api.store.gate.close();
        api.store.hold_next(Held::DevicePut);
        let registering = tokio::spawn({
            let (state, session, device) =
                (state.clone(), session("bobs-phone"), device(token.as_str()));
            async move { state.register_device(bob.id, &session, device).await }
        });
        api.store.gate.arrived(round + 1).await;
        state.logout_all(bob.id).await.unwrap();
        api.store.gate.release(round + 1).await;
        let registered = registering.await.unwrap();
        assert!(
            matches!(registered, Err(ApiError::Auth(AuthError::Revoked))),
            "round {round}: answered as registered: {registered:?}"
        );
        assert!(
            state.devices(bob.id).await.unwrap().is_empty(),
            "round {round}: the device outlived the logout"
        );
    }
    assert_eq!(
        state.devices(alice.id).await.unwrap(),
        alices,
        "alice's device is hers again"
    );
    api.clean_up().await;
}

on_both_stacks!(a_registration_racing_a_logout_everywhere_is_undone);

/// A device registered again (as an app does at every launch) by a request whose check of its
/// session came before a logout everywhere: no write of that request comes after the check, so
/// none brings the device back once the logout removed it.
async fn a_registration_again_racing_a_logout_everywhere_leaves_no_device(stack: Stack) {
    use confab_api::domain::devices::{DeviceFields, NewDevice, PushSettings};
    use confab_api::domain::sessions::CallerSession;
    use confab_api::error::ApiError;
    use confab_runtime::identity::AuthError;
    use support::held_store::{Held, HeldApi};

    let api = HeldApi::new(stack).await;
    let logouts = tempfile::tempdir().unwrap();
    let (state, _) = recording_logouts(&api, &logouts);
    let bob = api.user("bob").await;
    let phone = NewDevice::parse(
        DeviceFields {
            platform: Some("fcm".into()),
            token: Some(format!("phone-of-{}", bob.id.0)),
            ..Default::default()
        },
        &PushSettings::default(),
    )
    .unwrap();
    let session = CallerSession {
        id: Some("bobs-phone".into()),
        issued_at: time::OffsetDateTime::now_utc().unix_timestamp(),
    };
    state
        .register_device(bob.id, &session, phone.clone())
        .await
        .unwrap();

    // The first write goes through; a second one, if the registration makes one, waits.
    api.store.pass_next(Held::DevicePut);
    api.store.hold_next(Held::DevicePut);
    let mut registering = tokio::spawn({
        let state = state.clone();
        async move { state.register_device(bob.id, &session, phone).await }
    });
    let finished = tokio::select! {
        () = api.store.gate.arrived(1) => {
            // A write after the check: the logout comes in between.
            state.logout_all(bob.id).await.unwrap();
            api.store.gate.release(1).await;
            let registered = registering.await.unwrap();
            assert!(
                matches!(registered, Err(ApiError::Auth(AuthError::Revoked))),
                "answered as registered: {registered:?}"
            );
            None
        }
        registered = &mut registering => Some(registered.unwrap()),
    };
    if let Some(registered) = finished {
        // Every write came before the check: the logout, after it, removes the device.
        assert!(registered.is_ok(), "{registered:?}");
        api.store.lift(Held::DevicePut);
        state.logout_all(bob.id).await.unwrap();
    }
    assert!(
        state.devices(bob.id).await.unwrap().is_empty(),
        "the device outlived the logout"
    );
    api.clean_up().await;
}

on_both_stacks!(a_registration_again_racing_a_logout_everywhere_leaves_no_device);
