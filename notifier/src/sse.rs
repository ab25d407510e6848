//! `GET /v1/events`: the caller's events as Server-Sent Events, each with `id:` (its sequence in
//! the event log), `event:` (its type) and `data:` (`{"type", "data"}` JSON). The first event,
//! `ready`, tells the client its subscription is live. A reconnecting client sends the last id it
//! saw (`Last-Event-ID`, as `EventSource` does, or `?last_event_id=`) and gets exactly the events it
//! missed, or a `reset` event when they cannot be replayed, whose id the client resumes from next.
//! A user holds at most
//! `notifier.max_connections_per_user` streams on a node: a newer one takes the place of the
//! oldest, which ends with a `closed` event (reason `replaced`) after which its client does not
//! reconnect on its own.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use bytes::Bytes;
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use axum::http::StatusCode;
use confab_runtime::Problem;

use crate::auth::{IssuedTicket, StreamAuth};
use crate::hub::{Hub, Item, OpenError};

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
    /// Resume after this event id, for clients that cannot send `Last-Event-ID` (which wins).
    #[serde(default)]
    last_event_id: Option<String>,
}

/// Parses a client's last event id: the decimal sequence of an event it received.
pub fn parse_last_event_id(raw: &str) -> Result<u64, Problem> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 20 || !raw.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-last-event-id",
            "a last event id is the decimal id of an event this server sent",
        ));
    }
    raw.parse().map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-last-event-id",
            "the last event id is out of range",
        )
    })
}

/// The problem a stream that cannot open answers.
pub fn open_problem(error: &OpenError) -> Problem {
    match error {
        OpenError::Revoked => Problem::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the session of this token has ended (logged out)",
        ),
        OpenError::Limited(limited) => Problem::from(limited),
        OpenError::NodeFull => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "node-full",
            "this node holds as many event streams as it may; retry on another",
        ),
        OpenError::Ended => Problem::new(
            StatusCode::CONFLICT,
            "stream-ended",
            "this socket's event stream has ended (replaced by a newer one); the socket closes",
        ),
        _ => {
            tracing::warn!(%error, "event stream not opened");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "events are unavailable on this node; retry",
            )
        }
    }
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
/// `id:` line (its sequence), the event type as `event:` and `{"type", "data"}` JSON as `data:`.
/// With `Last-Event-ID` (or `last_event_id`) the stream first replays exactly the events after that
/// id, or sends a `reset` event when the log no longer holds them or never issued the id. The
/// reset's `id:` is the position the stream continues from: the client's last id from then on.
/// A user holds at most `notifier.max_connections_per_user` streams on a node: one more takes the
/// place of their oldest, which ends with `event: closed` and `{"type": "closed", "data":
/// {"reason": "replaced"}}`. A client must not reconnect on its own after that (it would push out
/// the stream that replaced it), only on its user's action.
#[utoipa::path(
    get, operation_id = "stream_events", path = "/v1/events", tag = "events",
    params(StreamQuery),
    responses(
        (status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Malformed query or last event id", body = confab_runtime::Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = confab_runtime::Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many streams opened or resumed by this user lately (`limits.stream_opens`), or too many requests without a login from this address (`limits.public`; a stream whose ticket does not verify counts as one without a login)", body = confab_runtime::Problem, content_type = "application/problem+json"),
        (status = 503, description = "Events are unavailable on this node, or it holds as many streams as it may (`node-full`): retry, on another node", body = confab_runtime::Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []), ())
)]
async fn events(
    State(state): State<NotifierState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let Ok(Query(query)) = query else {
        return Problem::new(StatusCode::BAD_REQUEST, "bad-request", "malformed query")
            .into_response();
    };
    let header = headers
        .get("last-event-id")
        .map(|value| value.to_str().unwrap_or("\u{fffd}"));
    let resume_after = match header.or(query.last_event_id.as_deref()) {
        None => None,
        Some(raw) => match parse_last_event_id(raw) {
            Ok(seq) => Some(seq),
            Err(problem) => return problem.into_response(),
        },
    };
    let caller = match state
        .auth
        .authenticate(&headers, query.ticket.as_deref(), resume_after.is_some())
        .await
    {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    let user = caller.user;
    let subscription = match state
        .hub
        .open_in(user, caller.session.clone(), resume_after)
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => return open_problem(&error).into_response(),
    };
    tracing::debug!(%user, ?resume_after, "event stream opened");
    // A fresh stream's `ready` carries the position it starts after, so a client that drops
    // before any event resumes from there instead of missing what came meanwhile.
    let ready = match subscription.fresh_after() {
        Some(after) => Bytes::from(format!("id: {after}\nevent: ready\ndata: {{}}\n\n")),
        None => Bytes::from_static(b"event: ready\ndata: {}\n\n"),
    };
    let ready = stream::once(async move { Ok::<_, Infallible>(ready) });
    let shutdown = state.shutdown.clone();
    // The stream ends when the token it was opened with expires; the client reconnects with a
    // fresh one and resumes.
    let expiry = tokio::time::sleep(caller.remaining());
    let events = stream::unfold(subscription, |mut subscription| async move {
        let frame = match subscription.next().await? {
            // Rendered once per node; an ephemeral event has no id, so the client's last id stays
            // the last logged one.
            Item::Event(event) => event.sse_frame.clone(),
            // With the position the stream stands at as its id: a client that resumes from there
            // is not reset again.
            Item::Reset { reason, at } => Bytes::from(format!(
                "id: {at}\nevent: reset\ndata: {}\n\n",
                serde_json::json!({"type": "reset", "data": {"reason": reason}})
            )),
            // The last frame: the stream ends after it.
            Item::Closed(reason) => Bytes::from(format!(
                "event: closed\ndata: {}\n\n",
                serde_json::json!({"type": "closed", "data": {"reason": reason}})
            )),
        };
        Some((Ok::<_, Infallible>(frame), subscription))
    })
    .take_until(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = expiry => {}
        }
    });
    sse(ready.chain(events), state.keep_alive)
}

/// An event stream response: the frames as they come, and a comment line whenever nothing was
/// sent for `keep_alive`, so proxies keep the connection open.
fn sse(
    frames: impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    keep_alive: Duration,
) -> axum::response::Response {
    let frames = frames.boxed();
    let body = stream::unfold(
        (frames, tokio::time::Instant::now() + keep_alive),
        move |(mut frames, mut next_ping)| async move {
            tokio::select! {
                frame = frames.next() => {
                    next_ping = tokio::time::Instant::now() + keep_alive;
                    frame.map(|frame| (frame, (frames, next_ping)))
                }
                () = tokio::time::sleep_until(next_ping) => {
                    next_ping = tokio::time::Instant::now() + keep_alive;
                    Some((Ok(Bytes::from_static(b":\n\n")), (frames, next_ping)))
                }
            }
        },
    );
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/event-stream"),
            (axum::http::header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}
