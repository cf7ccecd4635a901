//! The admin endpoints every service serves on its admin address:
//!
//! - `GET /livez`: 200 while the process runs.
//! - `GET /readyz`: 200 when every dependency check passes (Kafka, Redis, store),
//!   503 with the failing checks otherwise.
//! - `GET /metrics`: Prometheus text: dak's metrics, `dak_build_info`, and the
//!   standard `process_*` metrics (CPU, memory, open files, start time), read
//!   from `/proc/self` on each scrape (Linux only).

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

/// How often histogram samples are folded into their buckets between scrapes.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The process's Prometheus recorder, installed on first use.
///
/// The recorder keeps every histogram sample (16 bytes each) until it folds
/// them into their buckets, which it does only when asked: a scrape asks, and
/// so does a thread of its own every [`UPKEEP_EVERY`]. Without that thread a
/// process nobody scrapes grows by every message's samples (several per
/// message) for as long as it runs.
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
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("dak-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    upkeep.run_upkeep();
                })
                .expect("starting the metrics upkeep thread");
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
    let mut text = state.metrics.render();
    process_metrics(&mut text);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}

/// Appends the standard process metrics of the Prometheus client libraries,
/// read from `/proc/self`: a few small files per scrape. Where `/proc` is
/// missing (not Linux), nothing is appended.
fn process_metrics(out: &mut String) {
    use std::fmt::Write;
    // USER_HZ, the unit of the CPU times in /proc/self/stat, is 100 on every
    // Linux architecture dak builds for (it is part of the kernel's ABI).
    const TICKS_PER_SECOND: f64 = 100.0;
    let mut family = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = write!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
        );
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    // The fields after the command name, which is in parentheses and may hold
    // spaces: fields[0] is the state (field 3 of proc(5)).
    let fields: Vec<&str> = stat
        .as_deref()
        .and_then(|s| s.rsplit_once(')'))
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> Option<f64> { fields.get(n - 3)?.parse().ok() };
    if let (Some(utime), Some(stime)) = (field(14), field(15)) {
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (utime + stime) / TICKS_PER_SECOND,
        );
    }
    let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot_time, field(22)) {
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot + start / TICKS_PER_SECOND,
        );
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let kib = |key: &str| -> Option<f64> {
            let line = status.lines().find_map(|l| l.strip_prefix(key))?;
            let value: f64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some(value * 1024.0)
        };
        if let Some(rss) = kib("VmRSS:") {
            family(
                "process_resident_memory_bytes",
                "gauge",
                "Resident memory size in bytes.",
                rss,
            );
        }
        if let Some(vsz) = kib("VmSize:") {
            family(
                "process_virtual_memory_bytes",
                "gauge",
                "Virtual memory size in bytes.",
                vsz,
            );
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("Max open files"))?;
            line["Max open files".len()..]
                .split_whitespace()
                .next()?
                .parse::<f64>()
                .ok()
        });
    if let Some(max) = max_fds {
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            max,
        );
    }
}
