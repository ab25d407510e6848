use axum::Form;
use axum::extract::State;
use axum::extract::rejection::FormRejection;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use utoipa::ToSchema;

use super::Caller;
use super::responses::CallerErrors;
use crate::domain::inputs::LogoutToken;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// Ends every session of the caller, everywhere: their tokens issued until now are refused, and
/// their open event streams and WebSockets end at once. Their push devices are removed too
/// (register them again after signing in). Sign in again for a new token, after ending the
/// session at the identity provider too (a browser: its `end_session_endpoint`): a sign-in within
/// the provider's session gets that session's id back, which stays refused. A 503 may come after
/// the sessions ended, when the devices could not all be removed: sign in again and repeat.
#[utoipa::path(
    post, operation_id = "logout_all", path = "/v1/me/logout-all", tag = "users",
    responses(
        (status = 204, description = "Every session of the caller has ended, and their push devices are removed"),
        CallerErrors,
    ),
    security(("bearer" = []))
)]
pub async fn logout_all(
    State(state): State<ApiState>,
    Caller(caller): Caller,
) -> ApiResult<StatusCode> {
    state.logout_all(caller.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The form an identity provider posts.
#[derive(Debug, Deserialize, ToSchema)]
pub struct BackchannelLogout {
    /// The logout token: a JWT signed by the identity provider.
    logout_token: String,
}

/// OpenID Connect Back-Channel Logout 1.0: the identity provider (Keycloak) posts a signed logout
/// token naming a session (`sid`) or a user (`sub`); that session's tokens are refused from now
/// on and its event streams end. A token naming the user alone ends all of their sessions and
/// removes their push devices. Configure it as the client's back-channel logout URL.
#[utoipa::path(
    post, operation_id = "backchannel_logout", path = "/v1/auth/backchannel-logout", tag = "users",
    request_body(content = BackchannelLogout, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "The session has ended"),
        (status = 400, description = "Missing, malformed or unverifiable logout token", body = confab_runtime::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Tokens cannot be verified, logouts recorded, or the user's push devices removed, right now", body = confab_runtime::Problem, content_type = "application/problem+json"),
    ),
    security(())
)]
pub async fn backchannel_logout(
    State(state): State<ApiState>,
    form: Result<Form<BackchannelLogout>, FormRejection>,
) -> ApiResult<impl IntoResponse> {
    let Form(form) = form.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let token = LogoutToken::parse(form.logout_token)?;
    state.backchannel_logout(&token).await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], StatusCode::OK))
}
