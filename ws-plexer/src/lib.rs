//! confab's ws-plexer: one WebSocket per client, `GET /v1/ws` (subprotocol `confab.v1`). It
//! carries the client's events (the same as the notifier's SSE stream) and its API calls, as JSON
//! text frames.
//!
//! From the server:
//! - `{"type": "ready", "id": "<sequence>"}` once the subscription is live. `id` is there on a
//!   fresh stream only: the position it starts after, for the client to resume from until its
//!   first event (a resumed stream's `ready` has none: the client keeps its own last id);
//! - `{"type": "event", "id": "<sequence>", "event": "signal.created", "data": {...}}`;
//! - `{"type": "reset", "reason": "...", "id": "<sequence>"}` when a resume cannot be served:
//!   re-read chats and history, and resume from `id` (the position the stream now stands at) from
//!   then on;
//! - `{"type": "response", "id": ..., "status": 201, "body": {...}}` answering a request: the
//!   API's JSON answer as it came (`null` when empty). An answer that is not JSON (an attachment's
//!   bytes) is refused with status 406 and a `not-json` problem: fetch it over HTTP;
//! - `{"type": "auth", "expires_at": "..."}` accepting a refreshed token;
//! - `{"type": "error", "problem": {...}}` (an RFC 9457 problem) for frames it cannot serve. A
//!   request frame it cannot read whole but whose `id` it can is answered with a `response` of
//!   that id instead (status 400, a `bad-frame` problem), so that the client's call settles.
//!
//! A user holds at most `notifier.max_connections_per_user` streams on a node: one more takes the
//! place of their oldest, whose socket closes with code 4009 and reason `replaced`; its client
//! does not reconnect on its own (it would push out the stream that replaced it).
//!
//! From the client:
//! - `{"type": "request", "id": ..., "method": "POST", "path": "/v1/chats/…/signals", "body": {...}}`:
//!   an API call, made through the API's own router with the socket's token, so it is checked and
//!   answered exactly as over HTTP. At most `ws_plexer.max_in_flight` at once, counting answers
//!   not yet sent to a client that is not reading (more get 429);
//! - `{"type": "auth", "token": "..."}`: a fresh token for the same user, before the current one
//!   expires; the socket then belongs to its session (that session's logout ends it). When it
//!   expires the socket closes (code 4001, "token expired");
//! - `{"type": "resume", "last_event_id": "<id>"}`: restart the stream after that id (also
//!   `?last_event_id=` at connect). Opens and resumes count against the user's
//!   `limits.stream_opens`: past it, an error frame with a 429 problem (`retry_after` in it), and
//!   the socket keeps the stream it had.
//!
//! Authentication is the bearer header or a `?ticket=` from `POST /v1/events/ticket`, checked before
//! the upgrade; a socket opened with a ticket makes API calls after an `auth` frame.

pub mod api;

use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use confab_notifier::Hub;
use confab_notifier::auth::{StreamAuth, StreamIdentity};
use confab_notifier::hub::{Item, Subscription};
use confab_notifier::sse::{open_problem, parse_last_event_id};
use confab_runtime::Problem;
use confab_runtime::identity::AuthError;
use futures::future::Shared;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::api::{ApiCaller, ApiResponse};
use tokio_util::sync::CancellationToken;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

#[derive(Clone)]
pub struct PlexerState {
    pub hub: Hub,
    pub auth: StreamAuth,
    /// Where request frames go.
    pub api: Arc<dyn ApiCaller>,
    pub limits: Limits,
    pub shutdown: CancellationToken,
}

/// Per-socket limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_in_flight: usize,
    pub max_frame_bytes: usize,
    /// How long a request frame's call may take before it is answered 408, as over HTTP
    /// (`limits.request_timeout_secs`).
    pub request_timeout: Duration,
}

/// The subprotocol this socket speaks.
pub const SUBPROTOCOL: &str = "confab.v1";

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
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientFrame {
    Resume {
        last_event_id: IdValue,
    },
    Auth {
        token: String,
    },
    Request {
        id: Value,
        method: String,
        path: String,
        #[serde(default)]
        body: Option<Value>,
    },
}

/// An id as a string or a number.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdValue {
    Text(String),
    Number(u64),
}

const PING_INTERVAL: Duration = Duration::from_secs(20);
/// A client that takes longer than this to accept one frame is disconnected; it resumes later.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one frame, within [`SEND_TIMEOUT`].
async fn send(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    message: Message,
) -> Result<(), ()> {
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(()),
        Err(_) => {
            metrics::counter!("confab_ws_send_timeouts_total").increment(1);
            Err(())
        }
    }
}

/// Upgrades to a WebSocket carrying the caller's events as JSON text frames (`ready`, `event`,
/// `error`).
#[utoipa::path(
    get, operation_id = "open_websocket", path = "/v1/ws", tag = "events",
    params(WsQuery),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Malformed request", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "Missing or invalid token", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many streams opened or resumed by this user lately (`limits.stream_opens`), or too many requests without a login from this address (`limits.public`; a socket whose ticket does not verify counts as one without a login)", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "Events are unavailable on this node, or it holds as many streams as it may (`node-full`): retry, on another node", body = Problem, content_type = "application/problem+json"),
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
    // A ticket opens a socket within its own lifetime only, resuming or not: the longer life of
    // a resuming ticket is for `EventSource`, which reconnects with the URL it was given. No
    // browser reconnects a socket by itself (clients ask for a fresh ticket each time), and a
    // ticket read from a logged URL must not open the user's events until their token expires.
    let caller = match state
        .auth
        .authenticate(&headers, query.ticket.as_deref(), false)
        .await
    {
        Ok(caller) => caller,
        Err(error) => return error.into_response(),
    };
    // Checked before the stream opens: a request that cannot become a socket is no connection,
    // and must not count as one (nor bring its user online for an instant).
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
    // Opened before the upgrade, so a refusal (caps, a node not ready) is a plain HTTP problem.
    let subscription = match state
        .hub
        .open_in(caller.user, caller.session.clone(), resume_after)
        .await
    {
        Ok(subscription) => subscription,
        Err(error) => return open_problem(&error).into_response(),
    };
    // Small buffers: most sockets idle, and each one's buffers are its memory.
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(state.limits.max_frame_bytes)
        .max_frame_size(state.limits.max_frame_bytes)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| serve(socket, caller, subscription, state))
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

/// Why a socket closes, as the close frame says it.
const TOKEN_EXPIRED: u16 = 4001;
const WRONG_USER: u16 = 4003;
/// A newer stream of the same user took this one's place (the hub's [`Item::Closed`] with
/// [`confab_notifier::hub::REPLACED`]): the client must not reconnect on its own.
const REPLACED: u16 = 4009;
/// The socket sent more than [`MAX_REFUSED_TOKENS`] tokens that did not verify in
/// [`REFUSED_TOKENS_WINDOW`].
const TOO_MANY_REFUSED_TOKENS: u16 = 4029;

/// How many `auth` frames whose token does not verify a socket may send in
/// [`REFUSED_TOKENS_WINDOW`] before it is closed. Each costs a signature check, which over HTTP
/// the per-address limit bounds (`limits.public`); a client refreshing its token sends one that
/// verifies, and one out of step (a token that expired on its way) a refused one now and then.
const MAX_REFUSED_TOKENS: usize = 5;
const REFUSED_TOKENS_WINDOW: Duration = Duration::from_secs(600);

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// A request frame's id: a string or a number, echoed in its response.
fn valid_request_id(id: &Value) -> bool {
    match id {
        Value::String(s) => !s.is_empty() && s.len() <= 64,
        Value::Number(_) => true,
        _ => false,
    }
}

/// A request frame's path, checked once at the edge: an API path under `/v1/`, not an event
/// stream, and nothing a URL parser would rewrite on the way to an API process. Such a parser
/// removes dot segments (`..`, `.`, also percent-encoded), reads a backslash as a slash and drops
/// tabs and newlines, so a path checked as written could reach another one (`/v1/../metrics` is
/// `/metrics`) with the user's token.
#[derive(Debug, PartialEq, Eq)]
pub struct ApiPath(String);

impl ApiPath {
    pub fn parse(raw: &str) -> Result<ApiPath, Problem> {
        let refuse =
            |detail: &str| Problem::new(StatusCode::BAD_REQUEST, "bad-frame", detail.to_owned());
        let under_v1 = "path is an API path under /v1/ (not an event stream)";
        if raw.len() > 2048 {
            return Err(refuse("path is at most 2048 bytes"));
        }
        if raw
            .chars()
            .any(|c| c == '\\' || c == '#' || c.is_ascii_whitespace() || c.is_control())
        {
            return Err(refuse(
                "path has no backslash, fragment, white space or control character",
            ));
        }
        let path = raw.split_once('?').map_or(raw, |(path, _query)| path);
        if !path.starts_with("/v1/") {
            return Err(refuse(under_v1));
        }
        if path.split('/').any(is_dot_segment) {
            return Err(refuse("path has no `.` or `..` segment"));
        }
        let streaming = ["/v1/events", "/v1/ws"]
            .iter()
            .any(|p| path == *p || path.starts_with(&format!("{p}/")));
        if streaming {
            return Err(refuse(under_v1));
        }
        Ok(ApiPath(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `.` or `..`, written plainly or percent-encoded (`%2e`, in either case).
fn is_dot_segment(segment: &str) -> bool {
    let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
    decoded == "." || decoded == ".."
}

/// Checks a request frame and builds the HTTP request it stands for, with the socket's token.
fn api_request(
    method: &str,
    path: &str,
    body: Option<&Value>,
    token: &str,
) -> Result<axum::http::Request<axum::body::Body>, Problem> {
    let method = match method {
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE" => {
            axum::http::Method::from_bytes(method.as_bytes())
                .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "bad-frame", "unknown method"))?
        }
        _ => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                "bad-frame",
                "method is one of GET, POST, PUT, PATCH, DELETE",
            ));
        }
    };
    let path = ApiPath::parse(path)?;
    let uri: axum::http::Uri = path.as_str().parse().map_err(|_| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "bad-frame",
            "path is not a valid URI path",
        )
    })?;
    let mut request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"));
    let body = match body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            axum::body::Body::from(body.to_string())
        }
        None => axum::body::Body::empty(),
    };
    request
        .body(body)
        .map_err(|_| Problem::new(StatusCode::BAD_REQUEST, "bad-frame", "malformed request"))
}

/// The frame answering request `id` with `response`. A JSON body goes in as it came, once checked
/// to be one JSON value without building it (a 4 MiB array of zeros would be millions of values);
/// an empty one is `null`. Any other body (an attachment's bytes) is refused with `not-json`
/// (406): the socket carries JSON, and such a body is for HTTP (`GET /v1/attachments/{id}`),
/// where its type, length and ranges travel with it.
fn response_frame(id: &Value, response: &ApiResponse) -> String {
    let status = response.status.as_u16();
    if response.body.is_empty() {
        return json!({"type": "response", "id": id, "status": status, "body": null}).to_string();
    }
    let declared_json = response
        .content_type
        .as_deref()
        .is_some_and(is_json_media_type);
    let one_value = serde_json::from_slice::<serde::de::IgnoredAny>(&response.body).is_ok();
    match std::str::from_utf8(&response.body) {
        Ok(body) if declared_json && one_value => {
            format!(r#"{{"type":"response","id":{id},"status":{status},"body":{body}}}"#)
        }
        _ if declared_json => problem_response(
            id,
            &Problem::new(
                StatusCode::BAD_GATEWAY,
                "api-answer-malformed",
                "the API's answer says it is JSON and is not; retry over HTTP",
            ),
        ),
        _ => problem_response(
            id,
            &Problem::new(
                StatusCode::NOT_ACCEPTABLE,
                "not-json",
                "this answer is not JSON (an attachment's bytes): a socket carries JSON answers \
                 only; make this request over HTTP (`GET /v1/attachments/{id}`)",
            ),
        ),
    }
}

/// `application/json` or `application/…+json`, whatever its parameters.
pub(crate) fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A socket's API calls: at most `max_in_flight` at once, counting those whose answer is not yet
/// sent, so a client that stops reading holds at most that many answers (each at most
/// [`api::MAX_RESPONSE_BYTES`] and its frame) in the plexer; its further requests get 429. A call
/// that takes longer than `request_timeout` is answered 408, and the calls end with their socket
/// (dropped with it), so slow calls neither hold a socket's places for good nor outlive it. A
/// change the API makes runs to its end on a task of its own all the same.
///
/// Reads run at once, side by side. Changes (any method but `GET`) to one resource run one after
/// another in the order their frames came, each once the one before is over: a client that sends
/// two messages into a chat without waiting has them stored in that order, as over one HTTP/1.1
/// connection. A change that takes longer than `request_timeout` is answered 408 and goes on
/// (the API makes it whatever happens here), holding its place and the next change until it is
/// over (at most [`HELD_TURNS`] timeouts); one whose turn does not come in time is answered 408
/// and not made. The resource is the path's first three segments (`/v1/chats/{id}`,
/// `/v1/me/settings`), so changes to different chats do not wait on each other.
struct Calls {
    api: Arc<dyn ApiCaller>,
    max_in_flight: usize,
    request_timeout: Duration,
    places: Arc<Semaphore>,
    sender: mpsc::Sender<Answer>,
    answers: mpsc::Receiver<Answer>,
    tasks: JoinSet<()>,
    /// Per resource, the end of its latest change: the next change to it waits for that.
    latest_changes: HashMap<String, Shared<oneshot::Receiver<()>>>,
}

/// How many request timeouts a change answered 408 holds the next change to its resource at
/// most, while the API may still be making it.
const HELD_TURNS: u32 = 5;

/// The resource whose changes run in order: `None` for a read.
fn ordered_resource(request: &axum::http::Request<axum::body::Body>) -> Option<String> {
    if request.method() == axum::http::Method::GET {
        return None;
    }
    let segments: Vec<&str> = request.uri().path().split('/').skip(1).take(3).collect();
    Some(segments.join("/"))
}

/// An answer to send. It holds its call's place until it is sent (dropped).
struct Answer {
    frame: String,
    _place: Option<OwnedSemaphorePermit>,
}

impl Calls {
    fn new(api: Arc<dyn ApiCaller>, max_in_flight: usize, request_timeout: Duration) -> Calls {
        let max_in_flight = max_in_flight.max(1);
        // Never full: an answer needs a place, and there are as many as slots.
        let (sender, answers) = mpsc::channel(max_in_flight);
        Calls {
            api,
            max_in_flight,
            request_timeout,
            places: Arc::new(Semaphore::new(max_in_flight)),
            sender,
            answers,
            tasks: JoinSet::new(),
            latest_changes: HashMap::new(),
        }
    }

    /// Starts the call of request `id`, whose answer comes from [`Calls::next`]; or answers at
    /// once with 429 when `max_in_flight` calls are in flight or their answers unsent.
    fn start(
        &mut self,
        id: Value,
        request: axum::http::Request<axum::body::Body>,
    ) -> Option<String> {
        // The calls that ended are forgotten.
        while self.tasks.try_join_next().is_some() {}
        let Ok(place) = Arc::clone(&self.places).try_acquire_owned() else {
            return Some(problem_response(
                &id,
                &Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-requests",
                    format!(
                        "at most {} requests in flight (or answered and unread) per socket",
                        self.max_in_flight
                    ),
                ),
            ));
        };
        let api = Arc::clone(&self.api);
        let sender = self.sender.clone();
        let limit = self.request_timeout;
        // Changes that ended are forgotten; the ones in flight are at most `max_in_flight`.
        self.latest_changes
            .retain(|_, change| change.clone().now_or_never().is_none());
        let (ended, end) = oneshot::channel::<()>();
        let resource = ordered_resource(&request);
        let ordered = resource.is_some();
        let before =
            resource.and_then(|resource| self.latest_changes.insert(resource, end.shared()));
        self.tasks.spawn(async move {
            let deadline = tokio::time::Instant::now() + limit;
            let timed_out = || {
                problem_response(
                    &id,
                    &Problem::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request-timeout",
                        format!(
                            "the request took longer than {} s; try again",
                            limit.as_secs()
                        ),
                    ),
                )
            };
            // Its turn comes once the change before it to the same resource is over (ended, or
            // dropped with its task), within the request's time.
            let mut before = before;
            let turn = match before.as_mut() {
                Some(before) => tokio::time::timeout_at(deadline, before).await.is_ok(),
                None => true,
            };
            if !turn {
                // Never made: answered at once, and the next change still waits for the one
                // before this, which is not over.
                let _ = sender
                    .send(Answer {
                        frame: timed_out(),
                        _place: None,
                    })
                    .await;
                if let Some(before) = before {
                    let _ = before.await;
                }
                drop((ended, place));
                return;
            }
            // A handler that panics (in process, the API's router runs on this task) still
            // answers its request, so that the client's call settles.
            let mut call =
                std::pin::pin!(std::panic::AssertUnwindSafe(api.call(request)).catch_unwind());
            let frame = match tokio::time::timeout_at(deadline, call.as_mut()).await {
                Err(_) if ordered => {
                    // A change taking too long goes on (the API makes it whatever happens
                    // here): answered now, it keeps its place and the next change to the
                    // resource waiting until it is over, or their order would not hold.
                    let _ = sender
                        .send(Answer {
                            frame: timed_out(),
                            _place: None,
                        })
                        .await;
                    // Not for ever: a call that never ends (a connection to the API left half
                    // open) would hold the resource's changes until the socket closes.
                    let held = limit.saturating_mul(HELD_TURNS);
                    let _ = tokio::time::timeout(held, call).await;
                    drop((ended, place));
                    return;
                }
                Err(_) => timed_out(),
                Ok(Ok(Ok(response))) => response_frame(&id, &response),
                Ok(Ok(Err(error))) => {
                    if let api::CallError::Unreachable(_) = error {
                        tracing::warn!(%error, "API call over the socket failed");
                    }
                    problem_response(&id, &Problem::from(&error))
                }
                Ok(Err(_)) => {
                    metrics::counter!("confab_ws_call_panics_total").increment(1);
                    tracing::error!("an API call over the socket panicked");
                    problem_response(
                        &id,
                        &Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "internal",
                            "the server failed on this request",
                        ),
                    )
                }
            };
            // The next change to the resource goes once this one is answered.
            drop(ended);
            // The place goes with the answer: freed once it is sent, not once it is queued.
            let _ = sender
                .send(Answer {
                    frame,
                    _place: Some(place),
                })
                .await;
        });
        None
    }

    /// The next answer to send.
    async fn next(&mut self) -> Option<Answer> {
        self.answers.recv().await
    }
}

/// The instant `wait` from now, or one far off when that is past what the clock can hold (a
/// token whose expiry is absurdly far off).
fn instant_after(wait: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(wait)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// The answer to a frame that is not one this socket accepts. A request frame whose id can be read
/// (the rest of it cannot: a field missing, of the wrong type, or unknown) is answered as a request,
/// with that id and a 400 problem, so that the client's call settles; any other frame gets an
/// error frame.
fn unreadable_frame(text: &str, error: &serde_json::Error) -> String {
    let detail = format!("not a frame this socket accepts: {error}");
    let request_id = serde_json::from_str::<Value>(text)
        .ok()
        .filter(|frame| frame["type"] == "request")
        .map(|mut frame| frame["id"].take())
        .filter(valid_request_id);
    match request_id {
        Some(id) => problem_response(
            &id,
            &Problem::new(StatusCode::BAD_REQUEST, "bad-frame", detail),
        ),
        None => bad_frame(&detail),
    }
}

fn problem_response(id: &Value, problem: &Problem) -> String {
    json!({"type": "response", "id": id, "status": problem.status().as_u16(), "body": problem})
        .to_string()
}

/// The `ready` frame of a stream just opened. A fresh stream's carries, as `id`, the position it
/// starts after (as SSE's `ready` event does): a client that drops before its first event resumes
/// from there instead of missing what came meanwhile. A resumed stream's has none: its client
/// keeps its own last id.
fn ready_frame(subscription: &Subscription) -> String {
    match subscription.fresh_after() {
        Some(after) => json!({"type": "ready", "id": after.to_string()}).to_string(),
        None => json!({"type": "ready"}).to_string(),
    }
}

async fn serve(
    socket: WebSocket,
    mut caller: StreamIdentity,
    mut subscription: Subscription,
    state: PlexerState,
) {
    let (mut sink, mut incoming) = socket.split();
    metrics::gauge!("confab_ws_connections").increment(1.0);
    let user = caller.user;
    let span = tracing::debug_span!("ws", %user);
    let _entered = span.enter();
    if send(&mut sink, Message::Text(ready_frame(&subscription).into()))
        .await
        .is_err()
    {
        metrics::gauge!("confab_ws_connections").decrement(1.0);
        return;
    }
    let mut calls = Calls::new(
        Arc::clone(&state.api),
        state.limits.max_in_flight,
        state.limits.request_timeout,
    );
    // When the socket's recent refused tokens came.
    let mut refused_tokens: std::collections::VecDeque<tokio::time::Instant> =
        std::collections::VecDeque::new();
    let expiry = tokio::time::sleep(caller.remaining());
    tokio::pin!(expiry);
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => {
                let _ = send(&mut sink, Message::Close(None)).await;
                break;
            }
            () = &mut expiry => {
                let _ = send(&mut sink, close(TOKEN_EXPIRED, "token expired")).await;
                break;
            }
            item = subscription.next() => match item {
                Some(Item::Event(event)) => {
                    if send(&mut sink, Message::Text(event.ws_frame.clone())).await.is_err() {
                        break;
                    }
                }
                Some(Item::Reset { reason, at }) => {
                    // With the position the stream stands at: the client's last id from now on.
                    let frame = json!({"type": "reset", "reason": reason, "id": at.to_string()}).to_string();
                    if send(&mut sink, Message::Text(frame.into())).await.is_err() {
                        break;
                    }
                }
                Some(Item::Closed(reason)) => {
                    let code = if reason == confab_notifier::hub::REPLACED { REPLACED } else { 1000 };
                    let _ = send(&mut sink, close(code, reason)).await;
                    break;
                }
                // The hub dropped us (slow consumer, logout or shutdown): the client resumes.
                None => {
                    let _ = send(&mut sink, Message::Close(None)).await;
                    break;
                }
            },
            Some(answer) = calls.next() => {
                let sent = send(&mut sink, Message::Text(answer.frame.into())).await;
                if sent.is_err() {
                    break;
                }
            }
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
                                // At the per-user cap, this socket's own stream makes room.
                                // Within a request's time, as the same open over HTTP: meanwhile
                                // this loop sends no ping, answer or expiry.
                                Ok(after) => match tokio::time::timeout(
                                    state.limits.request_timeout,
                                    state.hub.open_replacing(&subscription, user, caller.session.clone(), Some(after)),
                                ).await {
                                    Ok(Ok(resumed)) => {
                                        subscription = resumed;
                                        Some(ready_frame(&subscription))
                                    }
                                    Ok(Err(error)) => Some(error_frame(&open_problem(&error))),
                                    // The stream it was to replace may be gone: if so it ends,
                                    // and the socket with it, and its client resumes.
                                    Err(_) => Some(error_frame(&Problem::new(
                                        StatusCode::SERVICE_UNAVAILABLE,
                                        "unavailable",
                                        "the resume took too long; retry",
                                    ))),
                                },
                            }
                        }
                        Ok(ClientFrame::Auth { token }) => match state.auth.token(&token).await {
                            Ok(fresh) if fresh.user == user => {
                                // Moving the stream to another session takes the hub's routing
                                // lock, which every event's dispatch on the node needs: only
                                // when the session changed, not on every frame repeating a token.
                                let moved = fresh.session != caller.session;
                                caller = fresh;
                                if moved {
                                    subscription.renew(caller.session.clone());
                                }
                                expiry.as_mut().reset(instant_after(caller.remaining()));
                                let expires_at = time::OffsetDateTime::from_unix_timestamp(caller.expires_at)
                                    .ok()
                                    .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok());
                                Some(json!({"type": "auth", "expires_at": expires_at}).to_string())
                            }
                            Ok(_) => {
                                let _ = send(&mut sink, close(WRONG_USER, "a token of another user")).await;
                                break;
                            }
                            Err(error) => {
                                // Not the client's doing when the identity provider is down.
                                if !matches!(error, AuthError::Unavailable(_)) {
                                    let now = tokio::time::Instant::now();
                                    while refused_tokens.front().is_some_and(|at| now.duration_since(*at) > REFUSED_TOKENS_WINDOW) {
                                        refused_tokens.pop_front();
                                    }
                                    refused_tokens.push_back(now);
                                }
                                if refused_tokens.len() > MAX_REFUSED_TOKENS {
                                    let _ = send(&mut sink, close(TOO_MANY_REFUSED_TOKENS, "too many tokens that do not verify")).await;
                                    break;
                                }
                                Some(error_frame(&Problem::from(&error)))
                            }
                        },
                        Ok(ClientFrame::Request { id, method, path, body }) => {
                            if !valid_request_id(&id) {
                                Some(bad_frame("a request's id is a non-empty string of at most 64 bytes, or a number"))
                            } else if let Some(token) = caller.token.clone() {
                                match api_request(&method, &path, body.as_ref(), &token) {
                                    Err(problem) => Some(problem_response(&id, &problem)),
                                    Ok(request) => calls.start(id, request),
                                }
                            } else {
                                Some(problem_response(&id, &Problem::new(
                                    StatusCode::UNAUTHORIZED,
                                    "unauthorized",
                                    "this socket was opened with a ticket: send an auth frame with a token first",
                                )))
                            }
                        }
                        Err(error) => Some(unreadable_frame(&text, &error)),
                    };
                    if let Some(reply) = reply
                        && send(&mut sink, Message::Text(reply.into())).await.is_err()
                    {
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    if send(&mut sink, Message::Text(bad_frame("binary frames are not accepted").into())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(error)) => {
                    // Over the frame limit, or a protocol error: say why where the socket still can.
                    tracing::debug!(%error, "socket error");
                    let _ = send(&mut sink, close(1009, "frame too large or malformed")).await;
                    break;
                }
                Some(Ok(Message::Close(_))) | None => break,
            },
            _ = ping.tick() => {
                if send(&mut sink, Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    metrics::gauge!("confab_ws_connections").decrement(1.0);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use axum::body::Body;
    use axum::http::Request;

    use super::*;
    use crate::api::OverHttp;

    /// A request timeout no test call reaches.
    const LONG: Duration = Duration::from_secs(60);

    /// Paths that name something outside `/v1/` once a URL parser has removed their dot segments.
    const DOTTED: [&str; 6] = [
        "/v1/../metrics",
        "/v1/%2e%2e/metrics",
        "/v1/%2E%2e/metrics",
        "/v1/./me",
        "/v1/.%2E/metrics",
        "/v1/chats/..",
    ];

    /// An API that answers every call at once with `body`, of type `content_type`.
    struct Answering {
        content_type: &'static str,
        body: bytes::Bytes,
    }

    #[async_trait::async_trait]
    impl ApiCaller for Answering {
        async fn call(&self, _: Request<Body>) -> Result<ApiResponse, crate::api::CallError> {
            Ok(ApiResponse {
                status: StatusCode::OK,
                content_type: Some(self.content_type.to_owned()),
                body: self.body.clone(),
            })
        }
    }

    fn get() -> Request<Body> {
        Request::get("/v1/me").body(Body::empty()).expect("request")
    }

    /// An API that notes each call as it comes in (by its `x-label` header); a call labelled
    /// `held…` then waits until the test lets one go.
    struct Noting {
        entered: std::sync::Mutex<Vec<String>>,
        gate: Semaphore,
    }

    #[async_trait::async_trait]
    impl ApiCaller for Noting {
        async fn call(&self, request: Request<Body>) -> Result<ApiResponse, crate::api::CallError> {
            let label = request.headers()["x-label"]
                .to_str()
                .expect("text")
                .to_owned();
            let held = label.starts_with("held");
            self.entered.lock().expect("not poisoned").push(label);
            if held {
                self.gate.acquire().await.expect("open").forget();
            }
            Ok(ApiResponse {
                status: StatusCode::OK,
                content_type: Some("application/json".to_owned()),
                body: "null".into(),
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_to_one_chat_run_in_the_order_sent_and_reads_do_not_wait() {
        let api = Arc::new(Noting {
            entered: std::sync::Mutex::default(),
            gate: Semaphore::new(0),
        });
        let mut calls = Calls::new(Arc::clone(&api) as Arc<dyn ApiCaller>, 8, LONG);
        let request = |method: &str, path: &str, label: &str| {
            Request::builder()
                .method(method)
                .uri(path)
                .header("x-label", label)
                .body(Body::empty())
                .expect("request")
        };
        let frames = [
            ("POST", "/v1/chats/a/signals", "held first"),
            ("POST", "/v1/chats/a/signals?x=1", "second"),
            ("GET", "/v1/chats/a/signals", "read"),
            ("POST", "/v1/chats/b/signals", "other chat"),
            ("PUT", "/v1/me/settings", "settings"),
        ];
        for (id, (method, path, label)) in frames.into_iter().enumerate() {
            assert!(
                calls
                    .start(json!(id), request(method, path, label))
                    .is_none()
            );
        }
        // The clock is paused: this ends once every task has run as far as it can.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut entered = api.entered.lock().expect("not poisoned").clone();
        entered.sort();
        assert_eq!(
            entered,
            ["held first", "other chat", "read", "settings"],
            "the second change to chat a waits for the first; the rest go at once"
        );
        api.gate.add_permits(1);
        for _ in 0..frames.len() {
            drop(answer(&mut calls).await);
        }
        let entered = api.entered.lock().expect("not poisoned").clone();
        assert_eq!(
            entered.last().map(String::as_str),
            Some("second"),
            "{entered:?}"
        );
        assert!(
            calls
                .start(json!(9), request("GET", "/v1/me", "read again"))
                .is_none()
        );
        assert!(
            calls.latest_changes.is_empty(),
            "the ended changes are forgotten: {:?}",
            calls.latest_changes.keys()
        );
    }

    /// A change that times out is answered 408 but goes on in the API: the next change to the
    /// same resource, sent later, still waits until it is over, or the two could be stored in
    /// either order. One that times out waiting for its turn is answered 408 and never made.
    #[tokio::test(start_paused = true)]
    async fn a_change_answered_408_still_holds_back_the_next() {
        let api = Arc::new(Noting {
            entered: std::sync::Mutex::default(),
            gate: Semaphore::new(0),
        });
        let limit = Duration::from_secs(10);
        let mut calls = Calls::new(Arc::clone(&api) as Arc<dyn ApiCaller>, 8, limit);
        let post = |label: &str| {
            Request::builder()
                .method("POST")
                .uri("/v1/chats/a/signals")
                .header("x-label", label)
                .body(Body::empty())
                .expect("request")
        };
        assert!(calls.start(json!(1), post("held first")).is_none());
        assert!(calls.start(json!(2), post("second")).is_none());
        for _ in 0..2 {
            let answered: Value =
                serde_json::from_str(&calls.next().await.expect("answered").frame).expect("JSON");
            assert_eq!(answered["status"], 408, "{answered}");
        }
        assert!(calls.start(json!(3), post("third")).is_none());
        // The clock is paused: this ends once every task has run as far as it can.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(
            *api.entered.lock().expect("not poisoned"),
            ["held first"],
            "a change went while the one before it, answered 408, was still being made"
        );
        api.gate.add_permits(1);
        let answered: Value =
            serde_json::from_str(&calls.next().await.expect("answered").frame).expect("JSON");
        assert_eq!(
            (answered["id"].clone(), answered["status"].clone()),
            (json!(3), json!(200))
        );
        assert_eq!(
            *api.entered.lock().expect("not poisoned"),
            ["held first", "third"],
            "the change that timed out waiting was made"
        );
    }

    async fn answer(calls: &mut Calls) -> String {
        tokio::time::timeout(std::time::Duration::from_secs(5), calls.next())
            .await
            .expect("answered before the deadline")
            .expect("answered")
            .frame
    }

    #[tokio::test]
    async fn a_json_answer_goes_in_as_it_came_and_any_other_is_refused() {
        // Spaces and key order kept: the body is not parsed into values and written again.
        let mut json = String::from("{\"z\": 1, \"a\": [");
        json.push_str(&"0, ".repeat(1_000_000));
        json.push_str("0]}");
        let mut calls = Calls::new(
            Arc::new(Answering {
                content_type: "application/json",
                body: json.clone().into(),
            }),
            4,
            LONG,
        );
        assert!(calls.start(json!(7), get()).is_none());
        let frame = answer(&mut calls).await;
        assert!(
            frame == format!(r#"{{"type":"response","id":7,"status":200,"body":{json}}}"#),
            "the body embedded verbatim: {}…",
            &frame[..frame.len().min(120)]
        );
        assert!(
            serde_json::from_str::<Value>(&frame).is_ok(),
            "one JSON frame"
        );

        let mut calls = Calls::new(
            Arc::new(Answering {
                content_type: "application/octet-stream",
                body: vec![0u8; 4096].into(),
            }),
            4,
            LONG,
        );
        assert!(calls.start(json!("bytes"), get()).is_none());
        let refused: Value = serde_json::from_str(&answer(&mut calls).await).expect("JSON");
        assert_eq!(refused["status"], 406, "{refused}");
        assert!(
            refused["body"]["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("not-json")),
            "{refused}"
        );
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_holds_at_most_max_in_flight_answers() {
        let mut calls = Calls::new(
            Arc::new(Answering {
                content_type: "application/json",
                body: format!("[{}0]", "0,".repeat(100_000)).into(),
            }),
            2,
            LONG,
        );
        assert!(calls.start(json!(1), get()).is_none());
        assert!(calls.start(json!(2), get()).is_none());
        // Both answered, neither sent: the client is not reading.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while calls.answers.len() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "never answered");
            tokio::task::yield_now().await;
        }
        let third = calls.start(json!(3), get());
        assert!(
            third
                .as_deref()
                .is_some_and(|f| f.contains("\"status\":429")),
            "a third call while two answers wait unsent: {third:?}"
        );
        // Once one is sent, its place is free again.
        drop(answer(&mut calls).await);
        assert!(calls.start(json!(4), get()).is_none());
    }

    /// An API whose handler panics on every call.
    struct Panicking;

    #[async_trait::async_trait]
    impl ApiCaller for Panicking {
        async fn call(&self, _: Request<Body>) -> Result<ApiResponse, crate::api::CallError> {
            panic!("a handler bug");
        }
    }

    #[tokio::test]
    async fn a_call_whose_handler_panics_is_answered_with_its_id() {
        let mut calls = Calls::new(Arc::new(Panicking), 1, LONG);
        assert!(calls.start(json!(9), get()).is_none());
        let answered: Value = serde_json::from_str(&answer(&mut calls).await).expect("JSON");
        assert_eq!(answered["type"], "response", "{answered}");
        assert_eq!(answered["id"], 9, "{answered}");
        assert_eq!(answered["status"], 500, "{answered}");
        assert_eq!(
            answered["body"]["status"], 500,
            "a problem document: {answered}"
        );
        // Its place is free again.
        assert!(calls.start(json!(10), get()).is_none());
    }

    /// An API whose calls never end; each holds a clone of `alive` while it runs.
    struct Stalled {
        alive: Arc<()>,
    }

    #[async_trait::async_trait]
    impl ApiCaller for Stalled {
        async fn call(&self, _: Request<Body>) -> Result<ApiResponse, crate::api::CallError> {
            let _alive = Arc::clone(&self.alive);
            std::future::pending().await
        }
    }

    #[tokio::test]
    async fn a_call_past_the_request_timeout_is_answered_408_and_calls_end_with_their_socket() {
        let alive = Arc::new(());
        let api = Arc::new(Stalled {
            alive: Arc::clone(&alive),
        });
        let mut calls = Calls::new(api.clone(), 2, Duration::from_millis(50));
        assert!(calls.start(json!("slow"), get()).is_none());
        let answered: Value = serde_json::from_str(&answer(&mut calls).await).expect("JSON");
        assert_eq!(answered["id"], "slow", "{answered}");
        assert_eq!(answered["status"], 408, "{answered}");
        assert!(
            answered["body"]["type"]
                .as_str()
                .is_some_and(|t| t.ends_with("request-timeout")),
            "{answered}"
        );
        // Its place is free again, and a socket that closes takes its calls with it.
        let mut calls = Calls::new(api, 2, LONG);
        assert!(calls.start(json!(1), get()).is_none());
        assert!(calls.start(json!(2), get()).is_none());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&alive) < 4 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the calls never ran"
            );
            tokio::task::yield_now().await;
        }
        drop(calls);
        // Left: `alive` itself and the API's own, which the first socket's calls still hold.
        while Arc::strong_count(&alive) > 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "calls outlived their socket"
            );
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn an_expiry_past_what_the_clock_holds_is_far_off_not_a_panic() {
        let far = instant_after(Duration::MAX);
        assert!(far > tokio::time::Instant::now() + Duration::from_secs(86_400));
    }

    #[test]
    fn a_request_frame_with_a_dot_segment_is_a_bad_frame() {
        for path in DOTTED
            .into_iter()
            .chain(["/v1\\..\\metrics", "/v1/..\\metrics"])
        {
            let refused = api_request("GET", path, None, "token").map(|_| ());
            assert!(
                refused
                    .as_ref()
                    .is_err_and(|p| p.kind.ends_with("bad-frame")),
                "{path}: {refused:?}"
            );
        }
        assert!(api_request("GET", "/v1/me?x=..", None, "token").is_ok());
        assert!(api_request("GET", "/v1/chats/a..b", None, "token").is_ok());
    }

    #[tokio::test]
    async fn the_api_over_http_gets_no_path_a_parser_rewrote() {
        // An API process that records the paths it was asked for.
        let asked = Arc::new(Mutex::new(Vec::<String>::new()));
        let recorder = Arc::clone(&asked);
        let app = Router::new().fallback(move |request: Request<Body>| {
            let recorder = Arc::clone(&recorder);
            async move {
                recorder
                    .lock()
                    .expect("lock")
                    .push(request.uri().path().to_owned());
                "{}"
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let api = OverHttp::new(&base).expect("client");
        for path in DOTTED {
            let request = Request::get(path).body(Body::empty()).expect("request");
            let answer = api.call(request).await.map(|r| r.status);
            assert!(answer.is_err(), "{path}: {answer:?}");
        }
        assert_eq!(
            asked.lock().expect("lock").as_slice(),
            &[] as &[String],
            "no request left the plexer"
        );
        let plain = Request::get("/v1/me").body(Body::empty()).expect("request");
        assert_eq!(
            api.call(plain).await.map(|r| r.status).ok(),
            Some(StatusCode::OK)
        );
        server.abort();
    }
}
