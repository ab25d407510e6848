//! How the ws-plexer makes the API calls its sockets carry: through the API's own router, so every
//! rule, check and error is the HTTP API's (no second implementation, no bypass). `confab serve`
//! calls its router in process; `confab ws-plexer` sends the same request to an API process.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use bytes::Bytes;
use tower::ServiceExt;

/// The largest API response body a socket relays.
pub const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// An API response: its status, body and the body's media type. A body that is not JSON, which a
/// socket refuses whatever it holds, is only read as far as its first chunk, to tell it from none.
pub struct ApiResponse {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub body: Bytes,
}

/// Why an API call over a socket has no answer to relay.
#[derive(Debug)]
pub enum CallError {
    /// The API could not be reached, or broke off its answer.
    Unreachable(String),
    /// The answer's body is larger than [`MAX_RESPONSE_BYTES`].
    TooLarge,
    /// The request's path would not reach the API as written (a URL parser would rewrite it).
    /// [`crate::ApiPath`] refuses such paths first; this is the last check before the wire.
    Rewritten,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(why) => write!(f, "the API could not be reached: {why}"),
            CallError::TooLarge => write!(f, "an answer of more than {MAX_RESPONSE_BYTES} bytes"),
            CallError::Rewritten => write!(f, "a path the URL parser rewrites"),
        }
    }
}

impl From<&CallError> for confab_runtime::Problem {
    /// The error frame a request gets when its call has no answer to relay.
    fn from(error: &CallError) -> Self {
        match error {
            CallError::TooLarge => confab_runtime::Problem::new(
                StatusCode::BAD_GATEWAY,
                "response-too-large",
                format!(
                    "the answer is larger than a socket relays ({MAX_RESPONSE_BYTES} bytes); ask \
                     for it over HTTP"
                ),
            ),
            CallError::Rewritten => confab_runtime::Problem::new(
                StatusCode::BAD_REQUEST,
                "bad-frame",
                "path is an API path under /v1/, without `.` or `..` segments",
            ),
            CallError::Unreachable(_) => confab_runtime::Problem::new(
                StatusCode::BAD_GATEWAY,
                "api-unavailable",
                "the API could not be reached; retry",
            ),
        }
    }
}

#[async_trait]
pub trait ApiCaller: Send + Sync + 'static {
    async fn call(&self, request: Request<Body>) -> Result<ApiResponse, CallError>;
}

/// The API's router in this process.
pub struct InProcess(pub axum::Router);

#[async_trait]
impl ApiCaller for InProcess {
    async fn call(&self, request: Request<Body>) -> Result<ApiResponse, CallError> {
        let response = self
            .0
            .clone()
            .oneshot(request)
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status = response.status();
        let content_type = content_type(response.headers());
        let body = relayable_body(response.into_body(), content_type.as_deref()).await?;
        Ok(ApiResponse {
            status,
            content_type,
            body,
        })
    }
}

/// Reads a response body chunk by chunk and stops as soon as it passes [`MAX_RESPONSE_BYTES`], so
/// a socket never holds more than that of one response. A body whose `content_type` is not JSON
/// is refused by the socket whatever it holds, so only its first chunk is read (an attachment's
/// bytes are not fetched for nothing). Both ways of calling the API read through here, so they
/// relay the same bodies and refuse the same ones.
async fn relayable_body(body: Body, content_type: Option<&str>) -> Result<Bytes, CallError> {
    use futures::StreamExt;
    let json = content_type.is_some_and(crate::is_json_media_type);
    let mut chunks = body.into_data_stream();
    let mut read = bytes::BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| CallError::Unreachable(e.to_string()))?;
        if !json && !chunk.is_empty() {
            return Ok(chunk);
        }
        if read.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(CallError::TooLarge);
        }
        read.extend_from_slice(&chunk);
    }
    Ok(read.freeze())
}

fn content_type(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// An API process, over HTTP.
pub struct OverHttp {
    http: reqwest::Client,
    base: String,
}

impl OverHttp {
    pub fn new(base: &str) -> Result<OverHttp, reqwest::Error> {
        // Redirects are the client's to follow, as in process: followed here, a presigned download
        // would be fetched by the plexer itself.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(OverHttp {
            http,
            base: base.trim_end_matches('/').to_owned(),
        })
    }
}

#[async_trait]
impl ApiCaller for OverHttp {
    async fn call(&self, request: Request<Body>) -> Result<ApiResponse, CallError> {
        let (parts, body) = request.into_parts();
        let body = axum::body::to_bytes(body, MAX_RESPONSE_BYTES)
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let url = reqwest::Url::parse(&format!("{}{path}", self.base))
            .map_err(|_| CallError::Rewritten)?;
        // The parser removes dot segments: the path sent must be the path checked.
        let base_path = reqwest::Url::parse(&self.base)
            .map(|b| b.path().trim_end_matches('/').to_owned())
            .unwrap_or_default();
        if url.path() != format!("{base_path}{}", parts.uri.path()) {
            return Err(CallError::Rewritten);
        }
        let mut outgoing = self.http.request(method, url).body(body);
        for (name, value) in &parts.headers {
            outgoing = outgoing.header(name.as_str(), value.as_bytes());
        }
        let response = outgoing
            .send()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        let content_type = content_type(response.headers());
        let body = relayable_body(
            Body::from_stream(response.bytes_stream()),
            content_type.as_deref(),
        )
        .await?;
        Ok(ApiResponse {
            status,
            content_type,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A body of `chunks` chunks of 64 KiB, counting those read into `read`.
    fn counted(chunks: usize, read: &Arc<AtomicUsize>) -> Body {
        let read = Arc::clone(read);
        Body::from_stream(futures::stream::iter((0..chunks).map(move |_| {
            read.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 64 * 1024]))
        })))
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_read_no_further_than_its_first_chunk() {
        let read = Arc::new(AtomicUsize::new(0));
        let body = relayable_body(counted(32, &read), Some("application/octet-stream"))
            .await
            .expect("read");
        assert!(!body.is_empty(), "told from none");
        assert_eq!(read.load(Ordering::SeqCst), 1, "one chunk of 32 read");
        let empty = relayable_body(Body::empty(), Some("image/png"))
            .await
            .expect("read");
        assert!(empty.is_empty());

        let read = Arc::new(AtomicUsize::new(0));
        let body = relayable_body(counted(32, &read), Some("application/json"))
            .await
            .expect("read");
        assert_eq!(body.len(), 32 * 64 * 1024, "JSON is read whole");
        assert_eq!(read.load(Ordering::SeqCst), 32);
        // Past the limit, JSON is refused as soon as it passes it.
        let read = Arc::new(AtomicUsize::new(0));
        let chunks = MAX_RESPONSE_BYTES / (64 * 1024);
        let refused = relayable_body(counted(chunks + 10, &read), Some("application/json")).await;
        assert!(matches!(refused, Err(CallError::TooLarge)));
        assert_eq!(read.load(Ordering::SeqCst), chunks + 1);
    }
}
