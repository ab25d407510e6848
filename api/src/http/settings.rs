use axum::Json;
use axum::extract::State;
use confab_runtime::Problem;
use confab_schema::ChatId;
use confab_schema::settings::{ChatSettings, UserSettings};
use serde::Deserialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

use super::responses::{CallerErrors, Invalid};
use super::{ApiJson, ApiPath, Caller};
use crate::domain::settings::{NewChatSettings, NewUserSettings};
use crate::error::ApiResult;
use crate::state::ApiState;

/// The caller's settings, whole: a field left out takes its default.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutSettings {
    /// Push delay in ms (at most one day); `null` or absent for the server's default.
    push_delay_ms: Option<u32>,
    /// Whether pushes preview the message text. Default true.
    push_previews: Option<bool>,
    /// Whether clients load images without being asked. Default true.
    auto_load_images: Option<bool>,
    /// Whether clients show low-quality previews first. Default false.
    low_quality_previews: Option<bool>,
}

/// The caller's settings for a chat, whole: a field left out takes its default.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutChatSettings {
    /// Muted for good. Default false.
    muted: Option<bool>,
    /// Muted until then (RFC 3339).
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    muted_until: Option<OffsetDateTime>,
    /// This chat's push delay in ms (at most one day); `null` or absent for the user's.
    push_delay_ms: Option<u32>,
}

/// The caller's settings: push delay and previews, and what clients load.
#[utoipa::path(
    get, operation_id = "settings", path = "/v1/me/settings", tag = "users",
    responses((status = 200, description = "OK", body = UserSettings), CallerErrors),
    security(("bearer" = []))
)]
pub async fn get(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> ApiResult<Json<UserSettings>> {
    Ok(Json(state.settings(caller.id).await?))
}

/// Replaces the caller's settings.
#[utoipa::path(
    put, operation_id = "put_settings", path = "/v1/me/settings", tag = "users",
    request_body = PutSettings,
    responses((status = 200, description = "The settings now", body = UserSettings), CallerErrors, Invalid),
    security(("bearer" = []))
)]
pub async fn put(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiJson(body): ApiJson<PutSettings>,
) -> ApiResult<Json<UserSettings>> {
    let defaults = UserSettings::default();
    let settings = NewUserSettings::parse(UserSettings {
        push_delay_ms: body.push_delay_ms,
        push_previews: body.push_previews.unwrap_or(defaults.push_previews),
        auto_load_images: body.auto_load_images.unwrap_or(defaults.auto_load_images),
        low_quality_previews: body
            .low_quality_previews
            .unwrap_or(defaults.low_quality_previews),
    })?;
    Ok(Json(state.put_settings(caller.id, settings).await?))
}

/// The caller's settings for a chat: mute and push delay (members only).
#[utoipa::path(
    get, operation_id = "chat_settings", path = "/v1/chats/{chat_id}/settings", tag = "chats",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    responses(
        (status = 200, description = "OK", body = ChatSettings),
        (status = 404, description = "No such chat", body = Problem, content_type = "application/problem+json"),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn get_for_chat(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat): ApiPath<ChatId>,
) -> ApiResult<Json<ChatSettings>> {
    Ok(Json(state.chat_settings(caller.id, chat).await?))
}

/// Replaces the caller's settings for a chat (members only).
#[utoipa::path(
    put, operation_id = "put_chat_settings", path = "/v1/chats/{chat_id}/settings", tag = "chats",
    params(("chat_id" = ChatId, Path, description = "The chat")),
    request_body = PutChatSettings,
    responses(
        (status = 200, description = "The settings now", body = ChatSettings),
        (status = 404, description = "No such chat", body = Problem, content_type = "application/problem+json"),
        CallerErrors, Invalid,
    ),
    security(("bearer" = []))
)]
pub async fn put_for_chat(
    State(state): State<ApiState>,
    Caller(caller): Caller,
    ApiPath(chat): ApiPath<ChatId>,
    ApiJson(body): ApiJson<PutChatSettings>,
) -> ApiResult<Json<ChatSettings>> {
    let settings = NewChatSettings::parse(ChatSettings {
        muted: body.muted.unwrap_or(false),
        muted_until: body.muted_until,
        push_delay_ms: body.push_delay_ms,
    })?;
    Ok(Json(
        state.put_chat_settings(caller.id, chat, settings).await?,
    ))
}
