use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use confab_runtime::Problem;
use confab_schema::DeviceId;
use confab_schema::push::Device;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::responses::{CallerErrors, Invalid};
use super::{ApiJson, ApiPath, Caller, CallerInSession};
use crate::domain::Outcome;
use crate::domain::devices::{DeviceFields, NewDevice};
use crate::error::ApiResult;
use crate::state::ApiState;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterKeys {
    p256dh: Option<String>,
    auth: Option<String>,
}

/// A device: `{"platform":"webpush","endpoint":…,"keys":{"p256dh":…,"auth":…}}` (a browser's
/// `PushSubscription` as JSON, with the platform), `{"platform":"fcm","token":…}`,
/// `{"platform":"apns","token":…,"topic":…}` or `{"platform":"unifiedpush","endpoint":…}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterDevice {
    platform: Option<String>,
    endpoint: Option<String>,
    keys: Option<RegisterKeys>,
    token: Option<String>,
    topic: Option<String>,
    /// Part of a browser's `PushSubscription`; ignored.
    #[serde(rename = "expirationTime")]
    #[schema(value_type = Option<f64>)]
    expiration_time: Option<serde_json::Value>,
}

/// The caller's devices.
#[derive(Debug, Serialize, ToSchema)]
pub struct Devices {
    items: Vec<Device>,
}

/// Registers a device of the caller for push notifications. Registering the same endpoint or token
/// again answers the same device (200).
#[utoipa::path(
    post, operation_id = "register_device", path = "/v1/devices", tag = "push",
    request_body = RegisterDevice,
    responses(
        (status = 201, description = "Registered", body = Device),
        (status = 200, description = "Registered already", body = Device),
        (status = 409, description = "The caller has as many devices as allowed", body = confab_runtime::Problem, content_type = "application/problem+json"),
        CallerErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn register(
    State(state): State<ApiState>,
    CallerInSession(caller, session): CallerInSession,
    ApiJson(body): ApiJson<RegisterDevice>,
) -> ApiResult<Response> {
    let _ = body.expiration_time;
    let (p256dh, auth) = match body.keys {
        Some(keys) => (keys.p256dh, keys.auth),
        None => (None, None),
    };
    let new = NewDevice::parse(
        DeviceFields {
            platform: body.platform,
            endpoint: body.endpoint,
            p256dh,
            auth,
            token: body.token,
            topic: body.topic,
        },
        &state.push,
    )?;
    Ok(
        match state.register_device(caller.id, &session, new).await? {
            Outcome::Created(device) => (StatusCode::CREATED, Json(device)).into_response(),
            Outcome::Existing(device) => (StatusCode::OK, Json(device)).into_response(),
        },
    )
}

/// The caller's devices.
#[utoipa::path(
    get, operation_id = "list_devices", path = "/v1/devices", tag = "push",
    responses(
        (status = 200, description = "OK", body = Devices),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> ApiResult<Json<Devices>> {
    Ok(Json(Devices {
        items: state.devices(caller.id).await?,
    }))
}

/// Removes one of the caller's devices.
#[utoipa::path(
    delete, operation_id = "remove_device", path = "/v1/devices/{device_id}", tag = "push",
    params(("device_id" = DeviceId, Path, description = "The device")),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such device of the caller", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn remove(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(device_id): ApiPath<DeviceId>,
) -> ApiResult<StatusCode> {
    state.remove_device(caller.id, device_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The application server key browsers pass to `pushManager.subscribe`.
#[derive(Debug, Serialize, ToSchema)]
pub struct VapidPublicKey {
    /// base64url of the uncompressed P-256 point.
    public_key: String,
}

/// The VAPID public key for Web Push subscriptions (404 when Web Push is not configured).
#[utoipa::path(
    get, operation_id = "vapid_public_key", path = "/v1/push/vapid-public-key", tag = "push",
    responses(
        (status = 200, description = "OK", body = VapidPublicKey),
        (status = 404, description = "Web Push is not configured", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn vapid_public_key(State(state): State<ApiState>) -> ApiResult<Json<VapidPublicKey>> {
    Ok(Json(VapidPublicKey {
        public_key: state.vapid_public_key()?,
    }))
}
