//! One tracing set-up for every binary: `RUST_LOG` filters (default `info`),
//! `DAK_LOG_FORMAT=json` switches to JSON lines.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second init (tests starting several services) keeps the first subscriber.
    let _ = result;
}

/// For tests: silent unless `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("debug,rdkafka=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

/// Lets a log line that can come once per request through at most once per
/// period, and counts the ones held back meanwhile: while the bus refuses
/// writes, a flood of refused sends is one line every few seconds, not one
/// per send. The counts the operator needs are in the metrics.
pub struct Sparse {
    period: std::time::Duration,
    state: std::sync::Mutex<SparseState>,
}

struct SparseState {
    last: Option<std::time::Instant>,
    held: u64,
}

impl Sparse {
    pub const fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            state: std::sync::Mutex::new(SparseState {
                last: None,
                held: 0,
            }),
        }
    }

    /// `Some(lines held back since the last one let through)` when the line
    /// due at `now` is to be logged; `None` when it is held back.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut state = self.state.lock().expect("sparse log lock");
        match state.last {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                state.held += 1;
                None
            }
            _ => {
                state.last = Some(now);
                Some(std::mem::take(&mut state.held))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::Sparse;

    #[test]
    fn one_line_per_period_with_the_count_held_back() {
        let sparse = Sparse::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(sparse.admit(at(0)), Some(0), "the first comes at once");
        assert_eq!(sparse.admit(at(1)), None);
        assert_eq!(sparse.admit(at(9)), None);
        assert_eq!(
            sparse.admit(at(10)),
            Some(2),
            "a period later, with the two held"
        );
        assert_eq!(sparse.admit(at(15)), None);
        assert_eq!(sparse.admit(at(100)), Some(1));
        assert_eq!(sparse.admit(at(100)), None);
    }
}
