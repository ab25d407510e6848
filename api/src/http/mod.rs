//! The HTTP surface: routes (each documented in the OpenAPI description it is registered with) and
//! the extractors that turn every malformed request into a problem response before a handler runs.
//! A handler extracts, parses its input into the domain's types, calls one operation of
//! [`crate::domain`], and maps the result to a status and a body.

mod attachments;
mod calls;
mod chats;
mod circles;
mod devices;
mod markers;
mod members;
mod queues;
mod reactions;
mod responses;
mod search;
mod sessions;
mod settings;
mod signals;
mod typing;
mod users;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use confab_runtime::identity::bearer_token;
use confab_schema::User;
use serde::de::DeserializeOwned;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::domain::sessions::CallerSession;
use crate::error::ApiError;
use crate::state::ApiState;

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
        (name = "push", description = "Devices for push notifications"),
        (name = "attachments", description = "Files uploaded to chats, and their thumbnails"),
        (name = "circles", description = "Groups joined with an access code, members paired at random"),
        (name = "queues", description = "Matching queues: vent with listen, talk with talk"),
        (name = "calls", description = "Calls: their state, WebRTC signalling between participants, TURN credentials"),
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
    let (router, mut openapi) = router().with_state(state).split_for_parts();
    document_json_bodies(&mut openapi);
    (
        router.layer(axum::middleware::from_fn(run_changes_to_completion)),
        openapi,
    )
}

/// A request that changes something runs to completion in a task of its own, even when its client
/// disconnects and the server drops the connection's future: a change is never stored without its
/// event published (`domain::events`), nor left half made.
async fn run_changes_to_completion(
    request: Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.method().is_safe() {
        return next.run(request).await;
    }
    match tokio::spawn(next.run(request)).await {
        Ok(response) => response,
        Err(error) => {
            tracing::error!(%error, "request task failed");
            axum::response::IntoResponse::into_response(ApiError::Store(
                crate::store::StoreError::Unavailable("the request could not complete".into()),
            ))
        }
    }
}

/// The OpenAPI description of the API routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut openapi = router().into_openapi();
    document_json_bodies(&mut openapi);
    openapi
}

/// Every JSON body is read by [`ApiJson`], which refuses one without a JSON content type (415) or
/// over its size limit (413): documented here, once, for every operation that takes one.
fn document_json_bodies(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{Content, Ref, RefOr, ResponseBuilder};
    for item in openapi.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let takes_json = operation
                .request_body
                .as_ref()
                .is_some_and(|body| match body {
                    RefOr::T(body) => body.content.contains_key("application/json"),
                    RefOr::Ref(_) => false,
                });
            if !takes_json {
                continue;
            }
            for (status, description) in [
                ("413", "The body is larger than allowed"),
                ("415", "The body is not declared as JSON"),
            ] {
                operation
                    .responses
                    .responses
                    .entry(status.to_owned())
                    .or_insert_with(|| {
                        ResponseBuilder::new()
                            .description(description)
                            .content(
                                "application/problem+json",
                                Content::new(Some(Ref::from_schema_name("Problem"))),
                            )
                            .build()
                            .into()
                    });
            }
        }
    }
}

fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(users::me))
        .routes(routes!(users::search))
        .routes(routes!(users::set_status))
        .routes(routes!(users::presence))
        .routes(routes!(users::get))
        .routes(routes!(sessions::logout_all))
        .routes(routes!(sessions::backchannel_logout))
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
        .routes(routes!(typing::typing))
        .routes(routes!(search::search))
        .routes(routes!(devices::register, devices::list))
        .routes(routes!(devices::remove))
        .routes(routes!(devices::vapid_public_key))
        .routes(routes!(settings::get, settings::put))
        .routes(routes!(settings::get_for_chat, settings::put_for_chat))
        .routes(routes!(attachments::upload, attachments::list))
        .routes(routes!(attachments::download))
        .routes(routes!(attachments::thumbnail))
        .routes(routes!(attachments::preview))
        .routes(routes!(circles::create))
        .routes(routes!(circles::get))
        .routes(routes!(circles::join))
        .routes(routes!(circles::rotate_code))
        .routes(routes!(circles::members))
        .routes(routes!(circles::remove_member))
        .routes(routes!(circles::pair, circles::unpair))
        .routes(routes!(queues::join))
        .routes(routes!(queues::status, queues::leave))
        .routes(routes!(calls::start))
        .routes(routes!(calls::turn_credentials))
        .routes(routes!(calls::get))
        .routes(routes!(calls::join))
        .routes(routes!(calls::leave))
        .routes(routes!(calls::end))
        .routes(routes!(calls::signal))
}

/// The authenticated caller. Extracting it verifies the bearer token (whose session is recorded
/// first: see `confab_runtime::sessions`) and provisions the user from the token's claims.
pub struct Caller(pub User);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Caller, ApiError> {
        let CallerInSession(user, _) = CallerInSession::from_request_parts(parts, state).await?;
        Ok(Caller(user))
    }
}

/// The authenticated caller, with the session their token belongs to: for a change that must not
/// outlive a logout it races (see `domain::devices`).
pub struct CallerInSession(pub User, pub CallerSession);

impl FromRequestParts<ApiState> for CallerInSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<CallerInSession, ApiError> {
        let token = bearer_token(&parts.headers)?;
        let principal = state.identity.authenticate(token).await?;
        let session = CallerSession::of(&principal);
        Ok(CallerInSession(state.provision(principal).await?, session))
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
