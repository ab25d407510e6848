use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use confab_schema::ChatId;
use confab_schema::call::{Call, CallSignalType, TurnCredentials};
use serde::Deserialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::responses::{CallerErrors, ChatErrors, Conflict, Invalid, Limited, TooLarge};
use super::{ApiJson, ApiPath, Caller};
use crate::domain::Outcome;
use crate::domain::inputs::{RelayTarget, SignalPayload};
use crate::error::ApiResult;
use crate::limits::Class;
use crate::state::ApiState;

/// Starts a call in a chat (members only): it rings the other members until `ring_until`, and a
/// `call` signal with state `started` goes into the history. A chat has one live (ringing or
/// active) call at most: in a chat that has one, the caller joins it (as `join_call` does) and
/// gets it with 200. Limited per user (`limits.calls`), a start that joins counted too.
#[utoipa::path(
    post, operation_id = "start_call", path = "/v1/chats/{chat_id}/calls", tag = "calls",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    responses(
        (status = 201, description = "Started", body = Call),
        (status = 200, description = "The chat's live call, which the caller is in now", body = Call),
        Conflict,
        ChatErrors,
        Limited,
    ),
    security(("bearer" = []))
)]
pub async fn start(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat_id): ApiPath<ChatId>,
) -> ApiResult<(StatusCode, Json<Call>)> {
    state.throttle(Class::Calls, caller.id)?;
    Ok(match state.start_call(&caller, chat_id).await? {
        Outcome::Created(call) => (StatusCode::CREATED, Json(call)),
        Outcome::Existing(call) => (StatusCode::OK, Json(call)),
    })
}

/// A call of one of the caller's chats, with who is in it.
#[utoipa::path(
    get, operation_id = "get_call", path = "/v1/calls/{call_id}", tag = "calls",
    params(("call_id" = Uuid, Path, description = "The call")),
    responses(
        (status = 200, description = "OK", body = Call),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(call_id): ApiPath<Uuid>,
) -> ApiResult<Json<Call>> {
    Ok(Json(state.get_call(caller.id, call_id).await?))
}

/// Joins (answers) a call of one of the caller's chats: a `joined` signal. Joining again changes
/// nothing; a call that is over or full answers 409.
#[utoipa::path(
    post, operation_id = "join_call", path = "/v1/calls/{call_id}/join", tag = "calls",
    params(("call_id" = Uuid, Path, description = "The call")),
    responses(
        (status = 200, description = "In the call", body = Call),
        ChatErrors, Conflict,
    ),
    security(("bearer" = []))
)]
pub async fn join(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(call_id): ApiPath<Uuid>,
) -> ApiResult<Json<Call>> {
    Ok(Json(state.join_call(caller.id, call_id).await?))
}

/// Leaves a call: a `left` signal. The call ends (`ended`) when nobody is left in it, and a
/// direct chat's call when either side leaves.
#[utoipa::path(
    post, operation_id = "leave_call", path = "/v1/calls/{call_id}/leave", tag = "calls",
    params(("call_id" = Uuid, Path, description = "The call")),
    responses(
        (status = 200, description = "Left", body = Call),
        ChatErrors, Conflict,
    ),
    security(("bearer" = []))
)]
pub async fn leave(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(call_id): ApiPath<Uuid>,
) -> ApiResult<Json<Call>> {
    Ok(Json(state.leave_call(caller.id, call_id).await?))
}

/// Ends a call for everyone: an `ended` signal. In a direct chat either member ends it (the one called declines a ringing call so); in a
/// group its starter or an owner or admin. A call that is over is answered as it is.
#[utoipa::path(
    post, operation_id = "end_call", path = "/v1/calls/{call_id}/end", tag = "calls",
    params(("call_id" = Uuid, Path, description = "The call")),
    responses(
        (status = 200, description = "Ended", body = Call),
        ChatErrors,
    ),
    security(("bearer" = []))
)]
pub async fn end(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(call_id): ApiPath<Uuid>,
) -> ApiResult<Json<Call>> {
    Ok(Json(state.end_call(caller.id, call_id).await?))
}

/// A WebRTC signalling message for other participants of a call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CallSignalling {
    /// A participant's user id, or `"all"` for every other participant.
    pub to: String,
    #[serde(rename = "type")]
    pub kind: CallSignalType,
    /// The SDP description or ICE candidate, as the WebRTC stack gave it: a JSON object or string
    /// of at most 32 KiB.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

/// Relays an offer, answer or ICE candidate from the caller, a participant of the call, to another
/// participant (or all others): a `call.signal` event on their connections only, never stored.
#[utoipa::path(
    post, operation_id = "signal_call", path = "/v1/calls/{call_id}/signal", tag = "calls",
    params(("call_id" = Uuid, Path, description = "The call")),
    request_body = CallSignalling,
    responses(
        (status = 204, description = "Relayed"),
        ChatErrors, Conflict, Invalid, TooLarge,
    ),
    security(("bearer" = []))
)]
pub async fn signal(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(call_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<CallSignalling>,
) -> ApiResult<StatusCode> {
    let to = RelayTarget::parse(&body.to)?;
    let payload = SignalPayload::parse(body.payload)?;
    state
        .relay_call_signal(caller.id, call_id, to, body.kind, payload)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Short-lived credentials for the TURN servers (coturn's shared-secret scheme): `username` is
/// `<expiry, unix seconds>:<user id>`, `password` base64(HMAC-SHA1(secret, username)). 404 when no
/// TURN servers are configured.
#[utoipa::path(
    get, operation_id = "turn_credentials", path = "/v1/calls/turn-credentials", tag = "calls",
    responses(
        (status = 200, description = "OK", body = TurnCredentials),
        (status = 404, description = "No TURN servers are configured", body = confab_runtime::Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn turn_credentials(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> ApiResult<Json<TurnCredentials>> {
    Ok(Json(state.turn_credentials(caller.id)?))
}
