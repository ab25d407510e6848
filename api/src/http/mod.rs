//! The HTTP surface: routes, shared state and the extractors that turn every malformed request into
//! a problem response before a handler runs.

mod chats;
mod signals;
mod users;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::routing::{get, post};
use confab_runtime::bus::Bus;
use confab_runtime::identity::{Identity, Principal, bearer_token};
use confab_runtime::signed::Signer;
use confab_schema::User;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::store::Store;

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) identity: Arc<dyn Identity>,
    pub(crate) cursors: Signer,
    provisioned: Arc<Mutex<HashMap<confab_schema::UserId, (User, Instant)>>>,
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        identity: Arc<dyn Identity>,
        secret: &[u8],
    ) -> ApiState {
        ApiState {
            store,
            bus,
            identity,
            cursors: Signer::new(secret, "cursor"),
            provisioned: Arc::default(),
        }
    }
}

/// The API routes, under `/v1`.
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/me", get(users::me))
        .route("/v1/chats", post(chats::create))
        .route("/v1/chats/{chat_id}", get(chats::get))
        .route(
            "/v1/chats/{chat_id}/signals",
            post(signals::create).get(signals::list),
        )
        .with_state(state)
}

/// How long a provisioned profile is trusted before the store is written again.
const PROVISION_REFRESH: Duration = Duration::from_secs(600);
const PROVISION_CACHE_MAX: usize = 100_000;

/// The authenticated caller. Extracting it verifies the bearer token and provisions the user from
/// the token's claims (written on first sight, and again when the claims change or the cached copy
/// is old).
pub struct Caller(pub User);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Caller, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let principal: Principal = state.identity.authenticate(token).await?;
        let user = User {
            id: principal.user_id,
            username: principal.username,
            display_name: principal.display_name,
            email: principal.email,
        };
        let fresh = state
            .provisioned
            .lock()
            .ok()
            .and_then(|cache| cache.get(&user.id).cloned())
            .is_some_and(|(cached, at)| cached == user && at.elapsed() < PROVISION_REFRESH);
        if !fresh {
            state.store.upsert_user(&user).await?;
            if let Ok(mut cache) = state.provisioned.lock() {
                if cache.len() >= PROVISION_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(user.id, (user.clone(), Instant::now()));
            }
        }
        Ok(Caller(user))
    }
}

/// `Json` whose rejections are problem responses: 400 for syntax, 422 for content, 415 without a
/// JSON content type, 413 when too large.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::Unprocessable(e.body_text())),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(ApiError::BadRequest(e.body_text())),
            Err(JsonRejection::MissingJsonContentType(e)) => {
                Err(ApiError::UnsupportedMediaType(e.body_text()))
            }
            Err(JsonRejection::BytesRejection(e))
                if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE =>
            {
                Err(ApiError::PayloadTooLarge(e.body_text()))
            }
            Err(other) => Err(ApiError::BadRequest(other.body_text())),
        }
    }
}

/// `Path` whose rejections (e.g. a malformed id) are 400 problem responses.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| ApiPath(value))
            .map_err(|e: PathRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// `Query` whose rejections are 400 problem responses.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(value)| ApiQuery(value))
            .map_err(|e: QueryRejection| ApiError::BadRequest(e.body_text()))
    }
}

/// Checks that `caller` is a member of `chat`: 404 when the chat does not exist, 403 when it does
/// but the caller is not in it.
pub(crate) async fn require_member(
    state: &ApiState,
    chat: confab_schema::ChatId,
    caller: &User,
) -> Result<confab_schema::MemberRole, ApiError> {
    match state.store.member_role(chat, caller.id).await? {
        Some(role) => Ok(role),
        None => match state.store.get_chat(chat).await? {
            Some(_) => Err(ApiError::Forbidden("you are not a member of this chat")),
            None => Err(ApiError::NotFound("no such chat")),
        },
    }
}
