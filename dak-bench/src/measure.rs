//! What is counted while a scenario runs: shared counters, latency histograms
//! (overall and per second of the run), and the progress shown on stderr.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::{Counter, Histogram};

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
    /// Accepted `direct` messages whose `delivered` receipt has not come yet.
    pub awaiting_receipts: AtomicU64,
    /// When sending (or, for `idle`, holding) began; the progress bar counts
    /// from here.
    pub sending_since: OnceLock<Instant>,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }

    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub fn sub(c: &AtomicU64, n: u64) {
        c.fetch_sub(n, Relaxed);
    }

    /// Sent messages not answered yet, neither `accepted` nor `error`.
    pub fn unanswered(&self) -> u64 {
        Self::get(&self.sent).saturating_sub(Self::get(&self.accepted) + Self::get(&self.rejected))
    }

    /// Marks the start of sending (the first call counts).
    pub fn start_sending(&self, at: Instant) {
        let _ = self.sending_since.set(at);
    }
}

/// A latency histogram in microseconds, sharded so that thousands of device
/// tasks do not contend on one lock (and do not each hold a histogram).
///
/// Each record also lands in a histogram of its second of the run (counted
/// from [`Latency::start_clock`]), for the percentiles-over-time plot.
pub(crate) struct Latency {
    shards: Vec<Mutex<Shard>>,
    /// Second 0 of the per-second histograms; until it is set, everything
    /// lands in second 0.
    clock: OnceLock<Instant>,
}

/// One lock's worth of a [`Latency`].
struct Shard {
    all: Histogram<u64>,
    /// Indexed by whole seconds since the clock started.
    seconds: Vec<Histogram<u32>>,
}

const SHARDS: usize = 16;

impl Latency {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        all: histogram(),
                        seconds: Vec::new(),
                    })
                })
                .collect(),
            clock: OnceLock::new(),
        }
    }

    /// Starts counting seconds for the per-second histograms (the first call
    /// counts).
    pub fn start_clock(&self, at: Instant) {
        let _ = self.clock.set(at);
    }

    pub fn record(&self, shard: usize, latency: Duration) {
        let second = self
            .clock
            .get()
            .map_or(0, |start| start.elapsed().as_secs() as usize);
        self.record_at(shard, second, latency);
    }

    /// Records `latency` as seen in second `second` of the run.
    pub fn record_at(&self, shard: usize, second: usize, latency: Duration) {
        let micros = (latency.as_micros() as u64).max(1);
        let mut shard = self.shards[shard % SHARDS].lock().expect("latency lock");
        shard.all.saturating_record(micros);
        if shard.seconds.len() <= second {
            shard.seconds.resize_with(second + 1, second_histogram);
        }
        // `record`, not `saturating_record`: only the former grows the histogram.
        shard.seconds[second]
            .record(micros)
            .expect("a second's histogram grows to any latency");
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = histogram();
        for shard in &self.shards {
            all.add(&shard.lock().expect("latency lock").all)
                .expect("same bounds");
        }
        all
    }

    /// One histogram per second of the run, all shards merged; seconds without
    /// records are empty histograms.
    pub fn per_second(&self) -> Vec<Histogram<u32>> {
        let mut seconds: Vec<Histogram<u32>> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().expect("latency lock");
            if seconds.len() < shard.seconds.len() {
                seconds.resize_with(shard.seconds.len(), second_histogram);
            }
            for (merged, h) in seconds.iter_mut().zip(&shard.seconds) {
                merged
                    .add(h)
                    .expect("an auto-resizing histogram takes any value");
            }
        }
        seconds
    }
}

/// 1 µs to 10 min, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// One second's latencies, for a plot: 2 significant digits (1 % steps) and
/// 32-bit counts, growing only as far as the largest value recorded, so that a
/// second costs each shard a few KiB.
fn second_histogram() -> Histogram<u32> {
    Histogram::new(2).expect("valid histogram precision")
}

/// A quantile of a microsecond histogram, in milliseconds (0 when empty).
pub(crate) fn quantile_ms<T: Counter>(h: &Histogram<T>, q: f64) -> f64 {
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

/// Shows progress on stderr until dropped: on a terminal, one line redrawn in
/// place with a bar of the sending time gone by; otherwise (a CI log) a line a
/// second.
pub(crate) struct Progress {
    task: tokio::task::JoinHandle<()>,
    line: Arc<Mutex<Line>>,
}

/// The state of the redrawn line, shared by the task and `Drop` so that the
/// final newline never lands before the task's last redraw.
#[derive(Default)]
struct Line {
    /// A line was drawn and not ended yet.
    drawn: bool,
    stopped: bool,
}

impl Progress {
    /// `sending` is how long the run sends (`--duration`), the length of the bar.
    pub fn start(counters: Arc<Counters>, label: &'static str, sending: Duration) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let line = Arc::new(Mutex::new(Line::default()));
        let task_line = line.clone();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            let (mut last_sent, mut last_delivered) = (0, 0);
            loop {
                tick.tick().await;
                let sent = Counters::get(&counters.sent);
                let delivered = Counters::get(&counters.delivered);
                if terminal {
                    let text = bar_line(
                        label,
                        counters.sending_since.get().map(Instant::elapsed),
                        sending,
                        &counters,
                        (sent - last_sent, delivered - last_delivered),
                    );
                    let mut line = task_line.lock().expect("progress lock");
                    if line.stopped {
                        return;
                    }
                    eprint!("\r{text}\x1b[K");
                    line.drawn = true;
                } else {
                    eprintln!(
                        "[{label} {:>4}s] connected {} sent {sent} ({}/s) delivered {delivered} ({}/s) unanswered {} rejected {}",
                        start.elapsed().as_secs(),
                        Counters::get(&counters.connected),
                        sent - last_sent,
                        delivered - last_delivered,
                        counters.unanswered(),
                        Counters::get(&counters.rejected),
                    );
                }
                (last_sent, last_delivered) = (sent, delivered);
            }
        });
        Self { task, line }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let mut line = self.line.lock().expect("progress lock");
        line.stopped = true;
        if line.drawn {
            eprintln!();
            line.drawn = false;
        }
        self.task.abort();
    }
}

/// Width of the progress bar, in characters.
const BAR: usize = 20;

/// The redrawn progress line: `since` is how long sending has been going
/// (`None` before it began), `sending` how long it lasts, `per_s` the sent and
/// delivered messages of the last second.
fn bar_line(
    label: &str,
    since: Option<Duration>,
    sending: Duration,
    counters: &Counters,
    per_s: (u64, u64),
) -> String {
    let share = match since {
        None => 0.0,
        Some(_) if sending.is_zero() => 1.0,
        Some(since) => (since.as_secs_f64() / sending.as_secs_f64()).min(1.0),
    };
    let filled = (share * BAR as f64).round() as usize;
    let total = sending.as_secs_f64().round() as u64;
    let time = match since {
        None => "connecting".to_string(),
        Some(since) if since <= sending => {
            let width = total.to_string().len();
            format!("{:>width$}s/{total}s", since.as_secs())
        }
        // Past the sending time: draining (or closing the sockets).
        Some(since) => format!("{total}s/{total}s +{}s", (since - sending).as_secs()),
    };
    let mut line = format!(
        "[{label}] [{}{}]  {time}",
        "#".repeat(filled),
        "-".repeat(BAR - filled)
    );
    let sent = Counters::get(&counters.sent);
    if since.is_none() || sent == 0 {
        line += &format!(
            "  connected {}",
            thousands(Counters::get(&counters.connected))
        );
    } else {
        line += &format!(
            "  sent {} ({}/s)  delivered {} ({}/s)  unanswered {}",
            thousands(sent),
            thousands(per_s.0),
            thousands(Counters::get(&counters.delivered)),
            thousands(per_s.1),
            thousands(counters.unanswered()),
        );
        let rejected = Counters::get(&counters.rejected);
        if rejected > 0 {
            line += &format!("  rejected {}", thousands(rejected));
        }
    }
    line
}

/// `n` with a comma every three digits: 45,000.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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

/// When a drain stops waiting: once what it watches (counts of what arrived)
/// has not changed for `timeout`. A target still working through its backlog
/// is waited for however long that takes; one where nothing arrives any more
/// is given up on `timeout` after the last arrival.
pub(crate) struct Drain<T> {
    timeout: Duration,
    seen: Option<(T, Instant)>,
}

impl<T: PartialEq> Drain<T> {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            seen: None,
        }
    }

    /// Whether to stop waiting, given what is counted `now`.
    pub fn gives_up(&mut self, counted: T, now: Instant) -> bool {
        match &self.seen {
            Some((last, since)) if *last == counted => {
                now.saturating_duration_since(*since) >= self.timeout
            }
            _ => {
                self.seen = Some((counted, now));
                self.timeout.is_zero()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_waits_while_things_arrive_and_gives_up_after_a_quiet_timeout() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut drain = Drain::new(Duration::from_secs(30));
        assert!(!drain.gives_up(0, at(0)));
        assert!(!drain.gives_up(0, at(29)));
        // Still arriving: long past the first 30 s, it keeps waiting.
        assert!(!drain.gives_up(10, at(29)));
        assert!(!drain.gives_up(20, at(50)));
        assert!(!drain.gives_up(20, at(79)));
        // Nothing new for 30 s.
        assert!(drain.gives_up(20, at(80)));
    }

    #[test]
    fn a_drain_where_nothing_arrives_gives_up_after_the_timeout() {
        let start = Instant::now();
        let mut drain = Drain::new(Duration::from_secs(30));
        assert!(!drain.gives_up((5, 3), start));
        assert!(drain.gives_up((5, 3), start + Duration::from_secs(30)));
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(45_000), "45,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn the_bar_fills_with_the_sending_time() {
        let counters = Counters::default();
        Counters::add(&counters.connected, 200);
        let line = bar_line("direct", None, Duration::from_secs(20), &counters, (0, 0));
        assert_eq!(
            line,
            "[direct] [--------------------]  connecting  connected 200"
        );

        Counters::add(&counters.sent, 45_000);
        Counters::add(&counters.accepted, 44_988);
        Counters::add(&counters.delivered, 44_900);
        let line = bar_line(
            "direct",
            Some(Duration::from_secs(9)),
            Duration::from_secs(20),
            &counters,
            (5_000, 4_990),
        );
        assert_eq!(
            line,
            "[direct] [#########-----------]   9s/20s  sent 45,000 (5,000/s)  \
             delivered 44,900 (4,990/s)  unanswered 12"
        );

        let line = bar_line(
            "direct",
            Some(Duration::from_secs(23)),
            Duration::from_secs(20),
            &counters,
            (0, 0),
        );
        assert!(
            line.starts_with("[direct] [####################]  20s/20s +3s  sent"),
            "{line}"
        );
    }

    #[test]
    fn each_record_lands_in_its_second() {
        let latency = Latency::new();
        latency.record_at(0, 0, Duration::from_millis(1));
        latency.record_at(5, 2, Duration::from_millis(3));
        latency.record_at(7, 2, Duration::from_millis(5));
        let seconds = latency.per_second();
        let counts: Vec<u64> = seconds.iter().map(|h| h.len()).collect();
        assert_eq!(counts, [1, 0, 2]);
        assert_eq!(latency.merged().len(), 3);
        assert!((quantile_ms(&seconds[2], 1.0) - 5.0).abs() < 0.05);
    }
}
