//! `dak bench`: drives a running dak from the outside, over real WebSocket and
//! HTTP connections, as many simulated devices, and reports what it measured.
//!
//! It only talks to the public API (`GET /v1/ws`, `GET /v1/messages`,
//! `PUT /v1/devices/{d}/push-token`, `POST /v1/acks`), with tokens minted from
//! the server's HS256 secret, so it measures exactly what a client sees.
//!
//! Scenarios ([`Scenario`]):
//! - `direct`: devices in pairs (device `i` talks to device `i^1`) send messages
//!   to each other, closed loop (at most `--window` undelivered per device) or
//!   paced to `--rate` messages/s in total; receivers ack everything. Latency is
//!   send → receive, from the send timestamp in the message body.
//! - `offline`: the odd devices only register a push token and never connect;
//!   the even ones send to them. Afterwards the inboxes are read back over
//!   `GET /v1/messages` (pages of 500), which is also timed.
//! - `group`: the devices form groups of `--group-size` (created over
//!   `POST /v1/groups`); the first member of each group sends to it, paced or
//!   closed loop as in `direct`, and every other member receives and acks.
//!   Latency is send → receive at each member: the fan-out latency.
//! - `idle`: N authenticated sockets, each until `sync.done`, held open.
//!
//! The tool checks what it measures: every message that was sent is accounted
//! for — accepted and then received (or found in the inbox), rejected with an
//! error, or never answered — and losses and duplicates are counted by sequence
//! number per sender. Each run uses fresh user ids (`bench-<run>-u<i>`), so a
//! previous run's leftovers in the server's inbox never blur the numbers.
//!
//! Progress goes to stderr: a bar redrawn in place on a terminal, else a line a
//! second. [`Report`] is the result, printed by the `dak` binary as a human
//! summary (stderr) and one JSON line (stdout). Runs that measure latency also
//! leave two SVG plots in `--plot-dir`: percentiles per second, and a
//! histogram.

mod client;
mod cpu;
mod direct;
mod group;
mod idle;
mod measure;
mod offline;
mod plot;

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// What the simulated devices do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Pairs of connected devices messaging each other.
    Direct,
    /// Groups of `--group-size` connected devices; one member of each sends to
    /// the group.
    Group,
    /// Senders to devices that never connect; the inbox is read back over REST.
    Offline,
    /// Connected sockets that do nothing.
    Idle,
}

/// `dak bench` options.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Base URL of dak's public API; the WebSocket URL is derived from it.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Base URL of the REST calls (`POST /v1/groups`, `GET /v1/messages`,
    /// `POST /v1/acks`, push tokens) when they are served apart from the
    /// WebSocket, as by separate services; default: `--url`.
    #[arg(long)]
    pub rest_url: Option<String>,
    /// The server's HS256 secret, to mint a token per simulated device.
    #[arg(long, env = "DAK_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// What the devices do.
    #[arg(long, value_enum, default_value = "direct")]
    pub scenario: Scenario,
    /// Simulated devices (one user each).
    #[arg(long, default_value_t = 100)]
    pub devices: usize,
    /// Messages per second across all senders; 0 sends as fast as the server
    /// accepts them (closed loop, `--window` per device).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Closed loop: messages one device may have in the pipeline. In `direct`
    /// a message leaves the window when its `delivered` receipt arrives (the
    /// peer received and acked it), so the loop runs at the rate dak delivers;
    /// in `group` and `offline` it leaves when it is `accepted`.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// How long to send (or, for `idle`, to hold the sockets).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Members per group (for the `group` scenario).
    #[arg(long, default_value_t = 10)]
    pub group_size: usize,
    /// How many source addresses (127.0.0.1, 127.0.0.2, …) to spread the
    /// connections over, so that ephemeral ports do not cap them; >1 needs a
    /// loopback target.
    #[arg(long, default_value_t = 1)]
    pub source_ips: u8,
    /// The gateway's process id, to report its resident memory.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// A process under test (`dak up`, or each of the separate services and
    /// engines), whose CPU time (user + system, from `/proc/<pid>/stat`) is
    /// counted over the run and reported with its share per 1,000 messages
    /// delivered. Repeat it for several processes; they are summed.
    #[arg(long = "cpu-pid")]
    pub cpu_pids: Vec<u32>,
    /// After sending stops, how long to wait with nothing more arriving
    /// (messages, and in `direct` the senders' `delivered` receipts) before
    /// counting what is still outstanding lost. A target still working
    /// through its backlog is waited for.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Connections opened at once while connecting.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Where to write the latency plots (`dak-bench-<scenario>-<run>-latency.svg`
    /// and `-histogram.svg`); created if missing.
    #[arg(long, default_value = ".")]
    pub plot_dir: PathBuf,
    /// Write no plots.
    #[arg(long)]
    pub no_plot: bool,
}

impl BenchArgs {
    /// Checks the options before anything connects.
    pub fn validate(&self) -> Result<(), String> {
        match self.scenario {
            Scenario::Group
                if self.group_size < 2 || !self.devices.is_multiple_of(self.group_size) =>
            {
                return Err(format!(
                    "--devices ({}) must be a multiple of --group-size ({}), which must be at least 2",
                    self.devices, self.group_size
                ))
            }
            Scenario::Direct | Scenario::Offline
                if self.devices < 2 || !self.devices.is_multiple_of(2) =>
            {
                return Err(format!(
                    "--devices must be an even number >= 2 for {:?} (devices pair up), not {}",
                    self.scenario, self.devices
                ))
            }
            _ => {}
        }
        if self.devices == 0 {
            return Err("--devices must be at least 1".into());
        }
        if self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.source_ips == 0 || self.source_ips > 254 {
            return Err("--source-ips must be between 1 and 254".into());
        }
        if self.connect_concurrency == 0 {
            return Err("--connect-concurrency must be at least 1".into());
        }
        Ok(())
    }
}

/// What a run measured. Counts are messages; times are milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub run: String,
    pub devices: usize,
    /// Seconds spent sending (or holding, for `idle`).
    pub duration_s: f64,
    /// Message frames written to sockets.
    pub sent: u64,
    /// Of those, answered `accepted` (durable in Kafka).
    pub accepted: u64,
    /// Of those, answered with an `error` frame (e.g. `rate_limited`).
    pub rejected: u64,
    /// Of those, answered neither way before the drain timeout.
    pub unanswered: u64,
    /// Accepted messages that reached the recipient (`offline`: found in its inbox).
    pub delivered: u64,
    /// Accepted messages that never reached the recipient.
    pub lost: u64,
    /// Extra copies of messages the recipient already had.
    pub duplicates: u64,
    /// Messages that arrived after a later one from the same sender.
    pub out_of_order: u64,
    /// Delivered messages per second, from the first send to the last arrival.
    pub delivered_per_s: f64,
    /// What `p50_ms`… measure: `delivery` (send → receive, `direct`) or
    /// `accept` (send → `accepted`, `offline`).
    pub latency: Option<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Send → `accepted` (durable in Kafka).
    pub accept_p50_ms: f64,
    pub accept_p99_ms: f64,
    /// `offline`: `GET /v1/messages?limit=500` requests.
    pub sync_pages: Option<u64>,
    pub sync_page_p50_ms: Option<f64>,
    pub sync_page_p99_ms: Option<f64>,
    /// Sockets that reached `sync.done`.
    pub connections: Option<u64>,
    /// `idle`: sockets still open at the end of the hold.
    pub connections_held: Option<u64>,
    /// Sockets that reached `sync.done` per second while connecting.
    pub connect_per_s: Option<f64>,
    /// The gateway's VmRSS at the end, when `--gateway-pid` was given.
    pub gateway_rss_bytes: Option<u64>,
    /// CPU seconds of the `--cpu-pid` processes over the whole run
    /// (connecting, sending and draining); `None` without them, or when one
    /// ended during the run.
    pub cpu_s: Option<f64>,
    /// `cpu_s` per 1,000 messages delivered.
    pub cpu_s_per_1k: Option<f64>,
    /// CPU seconds of the generator itself over the run.
    pub generator_cpu_s: Option<f64>,
    /// The first few errors seen (refused connections, closed sockets, error
    /// frames, plots that could not be written).
    pub errors: Vec<String>,
    /// The SVG plots written (`--plot-dir`).
    pub plots: Vec<String>,
}

impl Report {
    /// Whether the run found a delivery fault.
    pub fn failed(&self) -> bool {
        self.lost > 0 || self.duplicates > 0
    }

    /// The report as one JSON line.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a report serializes")
    }

    /// A few lines for a human.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "dak bench {} ({} devices, {:.1} s, run {})\n",
            self.scenario, self.devices, self.duration_s, self.run
        );
        if self.scenario != "idle" {
            s += &format!(
                "  messages: sent {}, accepted {}, rejected {}, unanswered {}\n",
                self.sent, self.accepted, self.rejected, self.unanswered
            );
            s += &format!(
                "  delivered {} ({:.0}/s), lost {}, duplicates {}, out of order {}\n",
                self.delivered, self.delivered_per_s, self.lost, self.duplicates, self.out_of_order
            );
            s += &format!(
                "  {} latency: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms\n",
                self.latency.as_deref().unwrap_or("message"),
                self.p50_ms,
                self.p99_ms,
                self.p999_ms,
                self.max_ms
            );
            if self.latency.as_deref() != Some("accept") {
                s += &format!(
                    "  accept latency: p50 {:.2} ms, p99 {:.2} ms\n",
                    self.accept_p50_ms, self.accept_p99_ms
                );
            }
        }
        if let (Some(n), Some(p50), Some(p99)) = (
            self.sync_pages,
            self.sync_page_p50_ms,
            self.sync_page_p99_ms,
        ) {
            s += &format!("  sync pages: {n}, p50 {p50:.2} ms, p99 {p99:.2} ms\n");
        }
        if let Some(c) = self.connections {
            s += &format!("  connections: {c} reached sync.done");
            if let Some(rate) = self.connect_per_s {
                s += &format!(" ({rate:.0}/s)");
            }
            if let Some(held) = self.connections_held {
                s += &format!(", {held} held to the end");
            }
            s += "\n";
        }
        if let Some(rss) = self.gateway_rss_bytes {
            s += &format!("  gateway RSS: {:.1} MiB\n", rss as f64 / (1024.0 * 1024.0));
        }
        if let Some(cpu) = self.cpu_s {
            s += &format!("  CPU of the processes measured: {cpu:.2} s");
            if let Some(per) = self.cpu_s_per_1k {
                s += &format!(", {per:.3} s per 1,000 delivered");
            }
            s += "\n";
        }
        if let Some(cpu) = self.generator_cpu_s {
            s += &format!("  CPU of the generator: {cpu:.2} s\n");
        }
        for plot in &self.plots {
            s += &format!("  plot: {plot}\n");
        }
        for e in &self.errors {
            s += &format!("  error: {e}\n");
        }
        s += if self.failed() {
            "  FAILED: messages were lost or duplicated"
        } else if self.scenario == "idle" {
            "  no messages sent"
        } else {
            "  every accepted message accounted for"
        };
        s
    }
}

/// Runs one scenario against the server at `args.url`.
pub async fn run(args: BenchArgs) -> anyhow::Result<Report> {
    args.validate().map_err(anyhow::Error::msg)?;
    let target = client::Target::new(&args).await?;
    let cpu = cpu::Cpu::start(&args.cpu_pids)?;
    let mut report = match args.scenario {
        Scenario::Direct => direct::run(&args, &target).await?,
        Scenario::Offline => offline::run(&args, &target).await?,
        Scenario::Idle => idle::run(&args, &target).await?,
        Scenario::Group => group::run(&args, &target).await?,
    };
    let measured = cpu.measured();
    for pid in measured.ended {
        report.errors.push(format!(
            "--cpu-pid {pid} ended during the run: its CPU time is not counted"
        ));
    }
    report.cpu_s = measured.processes_s;
    report.cpu_s_per_1k = measured
        .processes_s
        .and_then(|cpu| cpu::per_thousand(cpu, report.delivered));
    report.generator_cpu_s = measured.generator_s;
    report.run = target.run_id.clone();
    report.devices = args.devices;
    Ok(report)
}

/// VmRSS of a process, from `/proc/<pid>/status`.
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(["bench", "--secret", "s"].iter().chain(args))
            .unwrap()
            .bench
    }

    #[test]
    fn groups_must_divide_the_devices() {
        let group = |devices: &str, size: &str| {
            parse(&[
                "--scenario",
                "group",
                "--devices",
                devices,
                "--group-size",
                size,
            ])
            .validate()
        };
        assert!(group("500", "500").is_ok());
        assert!(group("20", "10").is_ok());
        let err = group("25", "10").unwrap_err();
        assert!(err.contains("multiple of --group-size"), "{err}");
        assert!(group("4", "1").is_err());
    }

    #[test]
    fn paired_scenarios_need_an_even_device_count() {
        assert!(parse(&["--devices", "3"]).validate().is_err());
        assert!(parse(&["--devices", "4"]).validate().is_ok());
        assert!(parse(&["--scenario", "idle", "--devices", "3"])
            .validate()
            .is_ok());
    }

    #[test]
    fn a_clean_report_passes_and_a_lossy_one_fails() {
        let mut report = Report::default();
        assert!(!report.failed());
        report.lost = 1;
        assert!(report.failed());
        let json: serde_json::Value = serde_json::from_str(&report.json()).unwrap();
        for field in [
            "scenario",
            "devices",
            "sent",
            "delivered",
            "lost",
            "duplicates",
            "delivered_per_s",
            "p50_ms",
            "p99_ms",
            "p999_ms",
            "connections",
            "gateway_rss_bytes",
            "cpu_s",
            "cpu_s_per_1k",
            "generator_cpu_s",
            "plots",
        ] {
            assert!(json.get(field).is_some(), "{field} missing from {json}");
        }
    }

    #[test]
    fn rss_of_this_process_is_readable() {
        assert!(rss_bytes(std::process::id()).unwrap() > 0);
    }
}
