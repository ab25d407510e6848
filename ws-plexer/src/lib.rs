//! confab's ws-plexer: one WebSocket per client, `GET /v1/ws`. It carries the client's events (the
//! same as the notifier's SSE stream) as JSON text frames:
//!
//! - `{"type": "ready"}` once the subscription is live;
//! - `{"type": "event", "id": "<sequence>", "event": "signal.created", "data": {...}}`;
//! - `{"type": "reset", "reason": "..."}` when a resume cannot be served: re-read chats and history;
//! - `{"type": "error", "problem": {...}}` (an RFC 9457 problem) for frames it cannot serve.
//!
//! A client resumes after the last event id it saw with `?last_event_id=` at connect, or with a
//! `{"type": "resume", "last_event_id": "<id>"}` frame at any time (the stream restarts after that
//! id, and `ready` is sent again). Authentication is the bearer header or a `?ticket=` from
//! `POST /v1/events/ticket`, checked before the upgrade. Carrying API calls over the same socket is
//! the next step.

use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use confab_notifier::Hub;
use confab_notifier::auth::StreamAuth;
use confab_notifier::hub::Item;
use confab_notifier::sse::{open_problem, parse_last_event_id};
use confab_runtime::Problem;
use confab_schema::UserId;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Clone)]
pub struct PlexerState {
    pub hub: Hub,
    pub auth: StreamAuth,
    pub shutdown: CancellationToken,
}

/// The ws-plexer's routes, with their OpenAPI description.
pub fn routes(state: PlexerState) -> (Router, utoipa::openapi::OpenApi) {
    router().with_state(state).split_for_parts()
}

/// The OpenAPI description of the ws-plexer's routes.
pub fn openapi() -> utoipa::openapi::OpenApi {
    router().into_openapi()
}

fn router() -> OpenApiRouter<PlexerState> {
    OpenApiRouter::new().routes(routes!(upgrade))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WsQuery {
    /// A ticket from `POST /v1/events/ticket`, for clients that cannot send an Authorization header.
    #[serde(default)]
    ticket: Option<String>,
    /// Resume after this event id.
    #[serde(default)]
    last_event_id: Option<String>,
}

/// A frame from the client.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Resume { last_event_id: IdValue },
}

/// An id as a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdValue {
    Text(String),
    Number(u64),
}

const PING_INTERVAL: Duration = Duration::from_secs(20);

/// Upgrades to a WebSocket carrying the caller's events as JSON text frames (`ready`, `event`,
/// `error`).
#[utoipa::path(
    get, operation_id = "open_websocket", path = "/v1/ws", tag = "events",
    params(WsQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
    ),
    security(("bearer" = []), ())
)]
async fn upgrade(
    State(state): State<PlexerState>,
    headers: HeaderMap,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return Problem::new(StatusCode::BAD_REQUEST, "bad-request", "malformed query")
            .into_response();
    };
    let resume_after = match query.last_event_id.as_deref().map(parse_last_event_id) {
        None => None,
        Some(Ok(seq)) => Some(seq),
        Some(Err(problem)) => return problem.into_response(),
    };
    let user = match state
        .auth
        .authenticate(&headers, query.ticket.as_deref())
        .await
    {
        Ok(user) => user,
        Err(error) => return error.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            return Problem::new(
                StatusCode::BAD_REQUEST,
                "not-a-websocket",
                rejection.body_text(),
            )
            .into_response();
        }
    };
    upgrade
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| serve(socket, user, resume_after, state))
}

fn error_frame(problem: &Problem) -> String {
    json!({"type": "error", "problem": problem}).to_string()
}

fn bad_frame(detail: &str) -> String {
    error_frame(&Problem::new(
        StatusCode::BAD_REQUEST,
        "bad-frame",
        detail.to_owned(),
    ))
}

async fn serve(socket: WebSocket, user: UserId, resume_after: Option<u64>, state: PlexerState) {
    let (mut sink, mut incoming) = socket.split();
    metrics::gauge!("confab_ws_connections").increment(1.0);
    let span = tracing::debug_span!("ws", %user);
    let _entered = span.enter();
    let mut subscription = match state.hub.open(user, resume_after).await {
        Ok(subscription) => subscription,
        Err(error) => {
            let _ = sink
                .send(Message::Text(error_frame(&open_problem(&error)).into()))
                .await;
            let _ = sink.send(Message::Close(None)).await;
            metrics::gauge!("confab_ws_connections").decrement(1.0);
            return;
        }
    };
    if sink
        .send(Message::Text(json!({"type": "ready"}).to_string().into()))
        .await
        .is_err()
    {
        metrics::gauge!("confab_ws_connections").decrement(1.0);
        return;
    }
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
            item = subscription.next() => match item {
                Some(Item::Event(event)) => {
                    if sink.send(Message::Text(event.ws_frame.as_str().into())).await.is_err() {
                        break;
                    }
                }
                Some(Item::Reset(reason)) => {
                    let frame = json!({"type": "reset", "reason": reason}).to_string();
                    if sink.send(Message::Text(frame.into())).await.is_err() {
                        break;
                    }
                }
                // The hub dropped us (slow consumer or shutdown): the client resumes.
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    break;
                }
            },
            frame = incoming.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let reply = match serde_json::from_str::<ClientFrame>(&text) {
                        Ok(ClientFrame::Resume { last_event_id }) => {
                            let parsed = match last_event_id {
                                IdValue::Number(seq) => Ok(seq),
                                IdValue::Text(raw) => parse_last_event_id(&raw),
                            };
                            match parsed {
                                Err(problem) => Some(error_frame(&problem)),
                                Ok(after) => match state.hub.open(user, Some(after)).await {
                                    Ok(resumed) => {
                                        subscription = resumed;
                                        Some(json!({"type": "ready"}).to_string())
                                    }
                                    Err(error) => Some(error_frame(&open_problem(&error))),
                                },
                            }
                        }
                        Err(error) => Some(bad_frame(&format!(
                            "not a frame this socket accepts (API calls over it come next): {error}"
                        ))),
                    };
                    if let Some(reply) = reply
                        && sink.send(Message::Text(reply.into())).await.is_err()
                    {
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    if sink.send(Message::Text(bad_frame("binary frames are not accepted").into())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
            },
            _ = ping.tick() => {
                if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    metrics::gauge!("confab_ws_connections").decrement(1.0);
}
