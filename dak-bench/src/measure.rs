//! What is counted while a scenario runs: shared counters, latency histograms,
//! and the once-a-second progress line.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Nanoseconds since the Unix epoch. Sender and receiver share the clock
/// because the bench runs both ends in one process.
pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Running totals, read by the progress line and the drain check.
#[derive(Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    /// First copies received (or found).
    pub delivered: AtomicU64,
    pub connected: AtomicU64,
    /// Device tasks that stopped sending (or ended) once sending was over.
    pub stopped: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    /// Sent messages not answered yet, neither `accepted` nor `error`.
    pub fn unanswered(&self) -> u64 {
        Self::get(&self.sent).saturating_sub(Self::get(&self.accepted) + Self::get(&self.rejected))
    }
}

/// A latency histogram in microseconds, sharded so that thousands of device
/// tasks do not contend on one lock (and do not each hold a histogram).
pub(crate) struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

const SHARDS: usize = 16;

impl Latency {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
        }
    }

    pub fn record(&self, shard: usize, latency: Duration) {
        let micros = (latency.as_micros() as u64).max(1);
        self.shards[shard % SHARDS]
            .lock()
            .expect("latency lock")
            .saturating_record(micros);
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            all.add(&*shard.lock().expect("latency lock"))
                .expect("same bounds");
        }
        all
    }
}

/// 1 µs to 10 min, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A quantile of a microsecond histogram, in milliseconds (0 when empty).
pub(crate) fn quantile_ms(h: &Histogram<u64>, q: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

pub(crate) fn max_ms(h: &Histogram<u64>) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        h.max() as f64 / 1000.0
    }
}

/// Prints a progress line to stderr every second until dropped.
pub(crate) struct Progress {
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    pub fn start(counters: Arc<Counters>, label: &'static str) -> Self {
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let (mut last_sent, mut last_delivered) = (0, 0);
            loop {
                tick.tick().await;
                let sent = Counters::get(&counters.sent);
                let delivered = Counters::get(&counters.delivered);
                eprintln!(
                    "[{label} {:>4}s] connected {} sent {sent} ({}/s) delivered {delivered} ({}/s) unanswered {} rejected {}",
                    start.elapsed().as_secs(),
                    Counters::get(&counters.connected),
                    sent - last_sent,
                    delivered - last_delivered,
                    counters.unanswered(),
                    Counters::get(&counters.rejected),
                );
                (last_sent, last_delivered) = (sent, delivered);
            }
        });
        Self { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Keeps the first few error messages of a run.
#[derive(Default)]
pub(crate) struct Errors {
    first: Mutex<Vec<String>>,
    count: AtomicU64,
}

impl Errors {
    pub fn push(&self, error: String) {
        self.count.fetch_add(1, Relaxed);
        let mut first = self.first.lock().expect("errors lock");
        if first.len() < 5 {
            first.push(error);
        }
    }

    pub fn take(&self) -> Vec<String> {
        let mut errors = self.first.lock().expect("errors lock").clone();
        let count = self.count.load(Relaxed);
        if count > errors.len() as u64 {
            errors.push(format!("… {} errors in all", count));
        }
        errors
    }
}
