//! `GET /v1/events`: the caller's events as Server-Sent Events, each with `id:` (the envelope id),
//! `event:` (its type) and `data:` (`{"type", "data"}` JSON). The first event, `ready`, tells the
//! client its subscription is live.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{IssuedTicket, StreamAuth};
use crate::hub::Hub;

#[derive(Clone)]
pub struct NotifierState {
    pub hub: Hub,
    pub auth: StreamAuth,
    pub keep_alive: Duration,
    /// Cancelled at shutdown: open streams end so the server can drain.
    pub shutdown: CancellationToken,
}

/// The notifier's routes, with their OpenAPI description.
pub fn routes(state: NotifierState) -> (Router, utoipa::openapi::OpenApi) {
    router().with_state(state).split_for_parts()
}

/// The OpenAPI description of the notifier's routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().into_openapi()
}

fn router() -> OpenApiRouter<NotifierState> {
    OpenApiRouter::new()
        .routes(routes!(events))
        .routes(routes!(ticket))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// A ticket from `POST /v1/events/ticket`, for clients that cannot send an Authorization header.
    #[serde(default)]
    ticket: Option<String>,
}

/// A short-lived ticket that authenticates `GET /v1/events` and `GET /v1/ws` as `?ticket=`.
#[utoipa::path(
    post, operation_id = "create_ticket", path = "/v1/events/ticket", tag = "events",
    responses(
        (status = 200, description = "OK", body = IssuedTicket),
        (status = 401, description = "Missing or invalid token", body = confab_runtime::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []))
)]
async fn ticket(
    State(state): State<NotifierState>,
    headers: HeaderMap,
) -> Result<Json<IssuedTicket>, confab_runtime::identity::AuthError> {
    state.auth.issue(&headers).await.map(Json)
}

/// The caller's events as Server-Sent Events: `ready` first, then one event per change, each with an
/// `id:` line, the event type as `event:` and `{"type", "data"}` JSON as `data:`.
#[utoipa::path(
    get, operation_id = "stream_events", path = "/v1/events", tag = "events",
    params(StreamQuery),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 401, description = "Missing or invalid token", body = confab_runtime::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []), ())
)]
async fn events(
    State(state): State<NotifierState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let ticket = match &query {
        Ok(Query(q)) => q.ticket.as_deref(),
        Err(_) => {
            return confab_runtime::Problem::new(
                axum::http::StatusCode::BAD_REQUEST,
                "bad-request",
                "malformed query",
            )
            .into_response();
        }
    };
    let user = match state.auth.authenticate(&headers, ticket).await {
        Ok(user) => user,
        Err(error) => return error.into_response(),
    };
    let registration = state.hub.register(user);
    tracing::debug!(%user, "event stream opened");
    let ready =
        stream::once(async { Ok::<_, Infallible>(SseEvent::default().event("ready").data("{}")) });
    let shutdown = state.shutdown.clone();
    let events = stream::unfold(registration, |mut registration| async move {
        let envelope = registration.events.recv().await?;
        let event = SseEvent::default()
            .id(envelope.id.to_string())
            .event(envelope.event.kind().as_str())
            .json_data(envelope.client_json())
            .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"));
        Some((Ok::<_, Infallible>(event), registration))
    })
    .take_until(async move { shutdown.cancelled().await });
    sse(ready.chain(events), state.keep_alive).into_response()
}

fn sse(
    stream: impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
    keep_alive: Duration,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    Sse::new(stream).keep_alive(KeepAlive::new().interval(keep_alive))
}
