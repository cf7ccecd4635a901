//! The admin endpoints every service serves on its admin address:
//!
//! - `GET /livez`: 200 while the process runs.
//! - `GET /readyz`: 200 when every dependency check passes (Kafka, Redis, store),
//!   503 with the failing checks otherwise.
//! - `GET /metrics`: Prometheus text.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// The dependency checks behind `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, CheckFn)>,
}

impl Readiness {
    pub fn add<F, Fut>(&mut self, name: &'static str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name, Arc::new(move || Box::pin(check()))));
    }

    pub fn extend(&mut self, other: Readiness) {
        self.checks.extend(other.checks);
    }

    /// Runs every check (each bounded to 3 s) and returns the failures.
    pub async fn failures(&self) -> Vec<(&'static str, String)> {
        let runs = self.checks.iter().map(|(name, check)| async move {
            match tokio::time::timeout(Duration::from_secs(3), check()).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some((*name, e)),
                Err(_) => Some((*name, "timed out".to_owned())),
            }
        });
        futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// The process's Prometheus recorder, installed on first use.
pub fn metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ],
                )
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test binary); then this
            // handle renders nothing, which only the metrics endpoint notices.
            let _ = ::metrics::set_global_recorder(recorder);
            crate::metrics::describe();
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    readiness: Readiness,
    metrics: PrometheusHandle,
}

pub fn router(readiness: Readiness) -> Router {
    let state = AdminState {
        readiness,
        metrics: metrics(),
    };
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let failures = state.readiness.failures().await;
    if failures.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"status": "ready"})))
    } else {
        let failing: serde_json::Map<_, _> = failures
            .into_iter()
            .map(|(name, e)| (name.to_owned(), serde_json::Value::String(e)))
            .collect();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "not ready", "failing": failing})),
        )
    }
}

async fn render_metrics(State(state): State<AdminState>) -> impl IntoResponse {
    state.metrics.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}
