//! One telemetry module: tracing subscriber, a span and metrics for every HTTP request, Prometheus
//! exposition, and the `/health` (liveness) and `/ready` (readiness, naming each dependency) endpoints.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::future::BoxFuture;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tower_http::trace::TraceLayer;
use tracing_subscriber::EnvFilter;

use crate::config::TelemetryConfig;

/// Installs the global tracing subscriber (idempotent: later calls are no-ops).
pub fn init_tracing(config: &TelemetryConfig) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    let _ = if config.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    PROMETHEUS.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (e.g. by a test harness); then ours only renders.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// A dependency whose state decides readiness.
pub trait ReadinessCheck: Send + Sync {
    fn name(&self) -> &'static str;
    /// `Ok` when usable; `Err` says why not.
    fn check(&self) -> BoxFuture<'_, Result<(), String>>;
}

#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<Arc<dyn ReadinessCheck>>,
}

impl Readiness {
    pub fn new() -> Readiness {
        Readiness::default()
    }

    pub fn with(mut self, check: Arc<dyn ReadinessCheck>) -> Readiness {
        self.checks.push(check);
        self
    }

    /// Runs every check (each bounded by a deadline) and reports each by name.
    pub async fn report(&self) -> (bool, serde_json::Value) {
        let results = futures::future::join_all(self.checks.iter().map(|check| async move {
            let outcome = match tokio::time::timeout(Duration::from_secs(3), check.check()).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(why)) => Err(why),
                Err(_) => Err("timed out".to_owned()),
            };
            (check.name(), outcome)
        }))
        .await;
        let ready = results.iter().all(|(_, outcome)| outcome.is_ok());
        let checks: serde_json::Map<String, serde_json::Value> = results
            .into_iter()
            .map(|(name, outcome)| {
                let value = match outcome {
                    Ok(()) => json!({"status": "up"}),
                    Err(why) => json!({"status": "down", "error": why}),
                };
                (name.to_owned(), value)
            })
            .collect();
        (
            ready,
            json!({"status": if ready { "ready" } else { "not_ready" }, "checks": checks}),
        )
    }
}

/// `/health`, `/ready` and `/metrics`.
pub fn routes(readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "up"})) }),
        )
        .route("/ready", get(ready))
        .route("/metrics", get(|| async { prometheus().render() }))
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> Response {
    let (ready, body) = readiness.report().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

/// Wraps a router with a tracing span per request and request metrics labelled by route template.
pub fn instrument(router: Router) -> Router {
    // The recorder is there before the first request is measured (`run` installs it earlier
    // still, before any worker starts; an app built without `run`, as in tests, gets it here).
    let _ = prometheus();
    router
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http().make_span_with(|request: &Request| {
            let route = request
                .extensions()
                .get::<MatchedPath>()
                .map(MatchedPath::as_str)
                .unwrap_or("unmatched");
            tracing::info_span!("request", method = %request.method(), route, status = tracing::field::Empty)
        }))
}

async fn record_metrics(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    tracing::Span::current().record("status", response.status().as_u16());
    metrics::counter!("confab_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("confab_http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
