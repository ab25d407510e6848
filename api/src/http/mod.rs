//! The HTTP surface: routes (each documented in the OpenAPI description it is registered with),
//! shared state, and the extractors that turn every malformed request into a problem response
//! before a handler runs.

mod chats;
mod markers;
mod members;
mod reactions;
mod responses;
mod signals;
mod users;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use confab_runtime::bus::Bus;
use confab_runtime::identity::{Identity, Principal, bearer_token};
use confab_runtime::signed::Signer;
use confab_schema::limits::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use confab_schema::{ChatId, Envelope, Event, MemberRole, User, UserId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::coalesce::Coalescer;
use crate::error::ApiError;
use crate::store::Store;

/// Everything a handler needs. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) identity: Arc<dyn Identity>,
    pub(crate) cursors: Signer,
    /// A chat's position in its members' lists, written once per burst rather than per signal.
    pub(crate) chat_activity: Arc<Coalescer<ChatId, (Vec<UserId>, confab_schema::Signal)>>,
    /// Authors' read markers, moved by their own signals.
    pub(crate) author_markers: Arc<Coalescer<(ChatId, UserId), ()>>,
    provisioned: Arc<Mutex<HashMap<UserId, (User, Instant)>>>,
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
            chat_activity: Arc::default(),
            author_markers: Arc::default(),
            provisioned: Arc::default(),
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "confab", description = "A distributed chat backend: chats, members and signals."),
    modifiers(&BearerAuth),
    components(schemas(confab_runtime::Problem)),
    tags(
        (name = "users", description = "Who is calling, and finding others"),
        (name = "chats", description = "Direct and group chats"),
        (name = "members", description = "Who is in a chat, and their roles"),
        (name = "signals", description = "A chat's history: messages, joins, leaves, renames"),
        (name = "reactions", description = "Emoji reactions to signals"),
        (name = "markers", description = "Read and delivery markers"),
        (name = "events", description = "Live events over Server-Sent Events and WebSocket"),
    )
)]
struct ApiDoc;

/// Adds the bearer-token security scheme every operation uses.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The document every service's OpenAPI description is merged into: title, tags, security scheme.
pub fn openapi_base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The API routes under `/v1`, with their OpenAPI description.
pub fn routes(state: ApiState) -> (axum::Router, utoipa::openapi::OpenApi) {
    router().with_state(state).split_for_parts()
}

/// The OpenAPI description of the API routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().into_openapi()
}

fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(users::me))
        .routes(routes!(users::search))
        .routes(routes!(chats::create, chats::list))
        .routes(routes!(chats::get, chats::update))
        .routes(routes!(members::list, members::add))
        .routes(routes!(members::remove, members::set_role))
        .routes(routes!(signals::create, signals::list))
        .routes(routes!(signals::edit, signals::delete))
        .routes(routes!(reactions::add, reactions::remove))
        .routes(routes!(reactions::list))
        .routes(routes!(markers::read))
        .routes(routes!(markers::delivered))
        .routes(routes!(markers::views))
        .routes(routes!(markers::deliveries))
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

/// A page of a list: `{"items": [...], "next_cursor": "…" | null}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Opaque; pass back as `?cursor=` for the next page. `null` on the last page.
    pub next_cursor: Option<String>,
}

/// Checks a page size: 1 to 100, 50 when absent.
pub(crate) fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
    if (1..=MAX_PAGE_SIZE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE_SIZE}"
        )))
    }
}

/// What every cursor carries: which list it belongs to, so it cannot be replayed elsewhere.
#[derive(Serialize, Deserialize)]
struct Cursor<P> {
    /// The list: e.g. `signals:<chat id>`.
    l: String,
    p: P,
}

impl ApiState {
    pub(crate) fn cursor<P: Serialize>(&self, list: &str, position: P) -> String {
        self.cursors.sign(&Cursor {
            l: list.to_owned(),
            p: position,
        })
    }

    pub(crate) fn open_cursor<P: DeserializeOwned>(
        &self,
        list: &str,
        cursor: &str,
    ) -> Result<P, ApiError> {
        let cursor: Cursor<P> = self
            .cursors
            .open(cursor)
            .map_err(|_| ApiError::BadRequest("invalid cursor".into()))?;
        if cursor.l != list {
            return Err(ApiError::BadRequest(
                "cursor belongs to another list".into(),
            ));
        }
        Ok(cursor.p)
    }

    /// Publishes `event` on `chat` to `recipients`. Stored is stored: a failed publish is logged and
    /// counted, and history still has the change.
    pub(crate) async fn publish(&self, chat: ChatId, recipients: Vec<UserId>, event: Event) {
        let kind = event.kind().as_str();
        let envelope = Envelope::new(chat, recipients, event);
        match self.bus.publish(&envelope).await {
            Ok(()) => {
                metrics::counter!("confab_events_published_total", "type" => kind).increment(1)
            }
            Err(error) => {
                tracing::warn!(%error, event = kind, %chat, "event not published");
                metrics::counter!("confab_events_unpublished_total", "type" => kind).increment(1);
            }
        }
    }

    /// Publishes `event` to every current member of `chat`.
    pub(crate) async fn publish_to_members(
        &self,
        chat: ChatId,
        event: Event,
    ) -> Result<(), ApiError> {
        let recipients = self
            .store
            .members(chat)
            .await?
            .into_iter()
            .map(|m| m.user_id)
            .collect();
        self.publish(chat, recipients, event).await;
        Ok(())
    }
}

/// Checks that `caller` is a member of `chat`: 404 when the chat does not exist, 403 when it does
/// but the caller is not in it.
pub(crate) async fn require_member(
    state: &ApiState,
    chat: ChatId,
    caller: UserId,
) -> Result<MemberRole, ApiError> {
    match state.store.member_role(chat, caller).await? {
        Some(role) => Ok(role),
        None => Err(not_member(state, chat).await),
    }
}

/// The caller's role in `chat` and the chat itself, with the refusals of [`require_member`].
pub(crate) async fn member_of(
    state: &ApiState,
    chat: ChatId,
    caller: UserId,
) -> Result<(MemberRole, confab_schema::Chat), ApiError> {
    let role = require_member(state, chat, caller).await?;
    let chat = state
        .store
        .get_chat(chat)
        .await?
        .ok_or(ApiError::NotFound("no such chat"))?;
    Ok((role, chat))
}

/// The refusal for a non-member: 404 for an unknown chat, else 403.
pub(crate) async fn not_member(state: &ApiState, chat: ChatId) -> ApiError {
    match state.store.get_chat(chat).await {
        Ok(Some(_)) => ApiError::Forbidden("you are not a member of this chat"),
        Ok(None) => ApiError::NotFound("no such chat"),
        Err(error) => error.into(),
    }
}
