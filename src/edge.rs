//! The edge every request crosses before a service: the HTTP server (with a header-read timeout
//! against slowloris), CORS, the request timeout, the body idle timeout, the per-address rate
//! limit of requests without a login or with a token that does not verify (`limits.*`), and the reading of a refused request's unread
//! body after the answer, so that a client still sending it gets the answer. The body size limit
//! is set on the API's routes (`limits.body_bytes`), so WebSocket request frames meet it too.
//! Accepted connections get `TCP_USER_TIMEOUT` and keepalive (`server.*`), so that a client that
//! vanished without closing is noticed in bounded time and its streams end.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use confab_notifier::auth::StreamAuth;
use confab_runtime::addresses::{self, TrustedProxies};
use confab_runtime::config::{LimitsConfig, ServerConfig};
use confab_runtime::identity::{AuthError, Identity, bearer_token};
use confab_runtime::limits::KeyedLimit;
use confab_runtime::problem::Problem;
use futures::StreamExt;
use http_body::{Body as _, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::timeout::TimeoutBody;

/// Wraps `router` in the edge's layers; `identity` (and `streams`, for their tickets, on a node
/// that serves event streams) tells the requests with a login from those without.
pub fn layer(
    router: axum::Router,
    limits: &LimitsConfig,
    identity: Arc<dyn Identity>,
    streams: Option<StreamAuth>,
) -> axum::Router {
    let public = Arc::new(PublicLimit {
        limit: KeyedLimit::new("requests without a login from this address", limits.public),
        // Validated with the configuration: a list that does not parse never gets here.
        proxies: limits.trusted_proxies().unwrap_or_default(),
        identity,
        streams,
    });
    let request_timeout = limits.request_timeout();
    let body_idle = limits.body_idle_timeout();
    let body_bytes = limits.body_bytes;
    let router = router
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .layer(axum::middleware::from_fn_with_state(public, limit_public))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| time_limit(request_timeout, request, next),
        ))
        .layer(axum::middleware::from_fn(linger))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| refuse_large(body_bytes, request, next),
        ))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let (parts, body) = request.into_parts();
                let body = Body::new(TimeoutBody::new(body_idle, body));
                next.run(Request::from_parts(parts, body))
            },
        ));
    // Outermost, so refusals (429, 408, 413) carry CORS headers a browser script can read.
    match cors(limits) {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins; none configured, no CORS headers (browsers refuse other
/// origins' scripts).
fn cors(limits: &LimitsConfig) -> Option<CorsLayer> {
    let origins = limits.cors_origins();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::PATCH,
                Method::DELETE,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                header::IF_NONE_MATCH,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([
                header::RETRY_AFTER,
                header::LOCATION,
                header::ETAG,
                header::CONTENT_RANGE,
                header::CONTENT_DISPOSITION,
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// How much of a refused request's unread body the edge reads after answering, at most.
const LINGER_BYTES: u64 = 128 * 1024 * 1024;
/// How long the edge reads a refused request's unread body after answering, at most.
const LINGER_TIME: Duration = Duration::from_secs(10);

/// Reads the rest of a refused request's body after the answer has gone out. A refusal often
/// comes before the body is read (no login, not a member, storage down), and a server that closes
/// a connection with unread bytes in it resets it: a client still sending its upload gets a
/// broken pipe instead of the answer (RFC 9112 §9.6, "lingering close"). Bodies declared larger
/// than [`LINGER_BYTES`] are not waited for; `refuse_large`'s 413s are outside this layer.
async fn linger(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    let shared = Arc::new(Mutex::new(Some(body)));
    let body = Body::new(SharedBody(Arc::clone(&shared)));
    let response = next.run(Request::from_parts(parts, body)).await;
    if response.status().is_client_error() || response.status().is_server_error() {
        let rest = shared.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(rest) = rest
            && !rest.is_end_stream()
            && rest.size_hint().lower() <= LINGER_BYTES
        {
            tokio::spawn(drain(rest));
        }
    }
    response
}

/// Reads and drops `body` until it ends, fails, passes [`LINGER_BYTES`] or [`LINGER_TIME`].
async fn drain(body: Body) {
    let mut chunks = body.into_data_stream();
    let mut read = 0u64;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while let Some(Ok(chunk)) = chunks.next().await {
            read += chunk.len() as u64;
            if read > LINGER_BYTES {
                break;
            }
        }
    })
    .await;
}

/// A request body the edge can take back once the service has answered: the service reads
/// through it, and whatever it left unread stays with the edge.
struct SharedBody(Arc<Mutex<Option<Body>>>);

impl SharedBody {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Body>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        match self.lock().as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            // Taken by the edge: the service has answered, and nothing reads on.
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.lock()
            .as_ref()
            .is_none_or(http_body::Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.lock()
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), http_body::Body::size_hint)
    }
}

/// Paths probed by orchestrators and scrapers, never limited.
const PROBES: &[&str] = &["/health", "/ready", "/metrics"];

/// The per-address limit of requests without a login, and what tells a login from none.
struct PublicLimit {
    /// Keyed by [`addresses::limit_key`] of the client address.
    limit: KeyedLimit<IpAddr>,
    /// Whose `X-Forwarded-For` names the client address.
    proxies: TrustedProxies,
    identity: Arc<dyn Identity>,
    /// Checks the tickets browsers open event streams with (they cannot send a header).
    streams: Option<StreamAuth>,
}

/// The paths a ticket opens (`?ticket=`).
const STREAMS: &[&str] = &["/v1/events", "/v1/ws"];

/// The `ticket` query parameter of `request`, on a stream's path, and whether the request
/// resumes (`Last-Event-ID`, or `last_event_id`), which a ticket allows for longer.
fn stream_ticket(request: &Request) -> Option<(String, bool)> {
    #[derive(serde::Deserialize)]
    struct StreamQuery {
        ticket: Option<String>,
        last_event_id: Option<String>,
    }
    if !STREAMS.contains(&request.uri().path()) {
        return None;
    }
    let query = axum::extract::Query::<StreamQuery>::try_from_uri(request.uri())
        .ok()?
        .0;
    // Only `EventSource` reconnects with the URL it was given: a socket's ticket is never
    // allowed longer (see the ws-plexer's upgrade).
    let resumes = request.uri().path() == "/v1/events"
        && (request.headers().contains_key("last-event-id") || query.last_event_id.is_some());
    Some((query.ticket?, resumes))
}

/// Requests without a login take a token of their client address's bucket (the peer's, or what
/// trusted proxies forward; an IPv6 client's /64): those without an
/// `Authorization` header (but for an event stream's with a valid ticket: behind a proxy every
/// browser's reconnecting stream would share the proxy's bucket), and those whose header does not
/// hold a token that verifies (else any
/// header at all, even garbage, would pass unlimited, each forcing a verification). A signed-in
/// user's requests go by their own limits (`limits.send` and the like), also from an address past
/// its allowance. The identity remembers the signatures it checked, so checking here costs a
/// signed-in request a digest and a look at the claims, not a second signature check.
async fn limit_public(
    State(public): State<Arc<PublicLimit>>,
    request: Request,
    next: Next,
) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip());
    let Some(peer) = peer else {
        return next.run(request).await;
    };
    if PROBES.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let without_login = match bearer_token(request.headers()) {
        // A browser's stream carries its login in a ticket.
        Err(_) => !public.streams.as_ref().is_some_and(|streams| {
            stream_ticket(&request)
                .is_some_and(|(ticket, resumes)| streams.vouches_for(&ticket, resumes))
        }),
        Ok(token) => match public.identity.authenticate(token).await {
            Ok(_) => false,
            // Not the caller's fault: the handler answers 503, unlimited here as with a login.
            Err(AuthError::Unavailable(_)) => false,
            Err(_) => true,
        },
    };
    if !without_login {
        return next.run(request).await;
    }
    let forwarded_for = request
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .map(HeaderValue::as_bytes);
    let client = public.proxies.client_address(peer, forwarded_for);
    if let Err(limited) = public.limit.check(&addresses::limit_key(client)) {
        return Problem::from(&limited).into_response();
    }
    next.run(request).await
}

/// Whether `request` is an attachment upload, whose body may take long to arrive (it is bounded by
/// the body idle timeout and `attachments.max_bytes` instead).
fn is_upload(request: &Request) -> bool {
    request.method() == Method::POST
        && request
            .uri()
            .path()
            .strip_prefix("/v1/chats/")
            .and_then(|rest| rest.strip_suffix("/attachments"))
            .is_some_and(|chat| !chat.contains('/'))
}

/// A body declared larger than `limit` is refused before it is read, on every route but uploads
/// (routes that read a body also stop reading at the limit: `DefaultBodyLimit`).
async fn refuse_large(limit: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) && !is_upload(&request) {
        return Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            format!("a request body is at most {limit} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// A request whose response has not started within `limit` is answered 408. (Streams answer at
/// once, so this bounds their opening only.)
async fn time_limit(limit: Duration, request: Request, next: Next) -> Response {
    if is_upload(&request) {
        return next.run(request).await;
    }
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            format!(
                "the request took longer than {} s; try again",
                limit.as_secs()
            ),
        )
        .into_response(),
    }
}

/// Accepts a connection on `listener` and sets its socket options: TCP_NODELAY, and `server`'s
/// `TCP_USER_TIMEOUT` and keepalive. An option that cannot be set is logged, not fatal.
async fn accept(
    listener: &TcpListener,
    server: &ServerConfig,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let (tcp, peer) = listener.accept().await?;
    // Events are small writes; without TCP_NODELAY, Nagle's algorithm holds them back for up to
    // a delayed-ACK interval (~40 ms).
    if let Err(error) = tcp.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set");
    }
    let socket = socket2::SockRef::from(&tcp);
    // A stream's client that vanished without closing (its network changed, it slept) leaves a
    // half-open connection: without these, the kernel retransmits to it for about 15 minutes,
    // and the stream holds its place in the caps all along.
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
    if let Some(timeout) = server.tcp_user_timeout()
        && let Err(error) = socket.set_tcp_user_timeout(Some(timeout))
    {
        tracing::debug!(%error, "TCP_USER_TIMEOUT not set");
    }
    if let Some(idle) = server.tcp_keepalive() {
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(idle);
        if let Err(error) = socket.set_tcp_keepalive(&keepalive) {
            tracing::debug!(%error, "TCP keepalive not set");
        }
    }
    Ok((tcp, peer))
}

/// Serves `router` on `listener` until `shutdown`, then waits for open connections to finish.
/// Like `axum::serve`, with the peer address as `ConnectInfo`, the socket options of [`accept`],
/// and a limit on how long a client may take to send a request's headers.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    server: &ServerConfig,
    shutdown: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(());
    loop {
        let (tcp, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = accept(&listener, server) => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let mut request = request.map(Body::new);
            request.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(request)
        });
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let closed_rx = closed_rx.clone();
        tokio::spawn(async move {
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            let mut connection = std::pin::pin!(connection);
            let mut closing = false;
            loop {
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result {
                            tracing::trace!(%error, "connection ended");
                        }
                        break;
                    }
                    () = shutdown.cancelled(), if !closing => {
                        // Finish the request in progress, then close.
                        closing = true;
                        connection.as_mut().graceful_shutdown();
                    }
                }
            }
            drop(closed_rx);
        });
    }
    drop(listener);
    drop(closed_rx);
    closed_tx.closed().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's end of a connection made to a fresh listener, accepted as `serve` accepts.
    async fn accepted(server: &ServerConfig) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let client = TcpStream::connect(listener.local_addr().expect("address"))
            .await
            .expect("connects");
        let (accepted, _) = accept(&listener, server).await.expect("accepts");
        (accepted, client)
    }

    #[tokio::test]
    async fn accepted_connections_get_the_configured_socket_options() {
        let (tcp, _client) = accepted(&ServerConfig {
            tcp_user_timeout_secs: 30,
            tcp_keepalive_secs: 15,
        })
        .await;
        let socket = socket2::SockRef::from(&tcp);
        assert!(tcp.nodelay().expect("TCP_NODELAY"));
        assert!(socket.keepalive().expect("SO_KEEPALIVE"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            Duration::from_secs(15)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"),
            Duration::from_secs(15)
        );
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        assert_eq!(
            socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"),
            Some(Duration::from_secs(30))
        );
    }

    #[tokio::test]
    async fn zero_leaves_the_kernels_defaults() {
        let (tcp, _client) = accepted(&ServerConfig {
            tcp_user_timeout_secs: 0,
            tcp_keepalive_secs: 0,
        })
        .await;
        let socket = socket2::SockRef::from(&tcp);
        assert!(!socket.keepalive().expect("SO_KEEPALIVE"));
        #[cfg(any(target_os = "linux", target_os = "android", target_os = "fuchsia"))]
        assert_eq!(socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"), None);
    }
}
