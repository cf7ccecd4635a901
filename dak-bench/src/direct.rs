//! The `direct` scenario, and the sending device that `offline` reuses.
//!
//! Device `i` sends to device `i^1` and acks what it receives. Each device keeps
//! what it needs to account for every message: the seqs it got `accepted` for,
//! and how often it received each seq from its peer.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{ack_frame, message_frame, Frame, Target, Ws};
use crate::measure::{max_ms, quantile_ms, Counters, Drain, Errors, Latency, Progress};
use crate::{BenchArgs, Report};

/// In open loop (`--rate`), the most messages one device keeps unanswered; a
/// tick that finds the device at the cap is skipped, which shows as a lower
/// `sent` rate than asked for.
const OPEN_LOOP_CAP: usize = 256;

/// Where a run is; devices watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Sending,
    Draining,
    Done,
}

/// What every device task shares.
pub(crate) struct Shared {
    pub counters: Arc<Counters>,
    pub delivery: Latency,
    pub accept: Latency,
    pub errors: Errors,
    pub window: usize,
    /// Per device, in open loop.
    pub period: Option<Duration>,
    /// `direct` or `group`: what the senders' messages are.
    pub chat: &'static str,
    /// `direct`: the senders track their `delivered` receipts, and the run
    /// ends once they all came, so that none is left for the inbox of a
    /// sender that disconnected (and for the next run's servers to store).
    pub tracks_receipts: bool,
}

impl Shared {
    pub fn new(args: &BenchArgs, senders: usize) -> Self {
        let period =
            (args.rate > 0).then(|| Duration::from_secs_f64(senders as f64 / args.rate as f64));
        Self {
            counters: Arc::default(),
            delivery: Latency::new(),
            accept: Latency::new(),
            errors: Errors::default(),
            window: args.window,
            period,
            chat: match args.scenario {
                crate::Scenario::Group => "group",
                _ => "direct",
            },
            // Only `direct` peers are online to send `delivered` receipts back.
            tracks_receipts: args.scenario == crate::Scenario::Direct,
        }
    }

    /// Closed loop over delivery: a message stays in the window until its
    /// `delivered` receipt arrives (see [`crate::BenchArgs::window`]).
    pub fn awaits_delivery(&self) -> bool {
        self.tracks_receipts && self.period.is_none()
    }
}

/// What one device saw, for the accounting at the end.
#[derive(Default)]
pub(crate) struct Outcome {
    pub index: usize,
    pub sent: u64,
    /// Seqs answered `accepted`.
    pub accepted: Vec<u64>,
    pub rejected: u64,
    /// Times each seq from the peer arrived, indexed by seq.
    pub received: Vec<u32>,
    pub out_of_order: u64,
}

/// Accounting for one sender's messages against what its recipient got.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Tally {
    /// Distinct seqs that arrived.
    pub delivered: u64,
    /// Accepted seqs that never arrived.
    pub lost: u64,
    /// Copies beyond the first.
    pub duplicates: u64,
}

impl Tally {
    /// `received[seq]` is how often `seq` arrived.
    pub fn add(&mut self, accepted: &[u64], received: &[u32]) {
        for &seq in accepted {
            if received.get(seq as usize).copied().unwrap_or(0) == 0 {
                self.lost += 1;
            }
        }
        for &count in received {
            if count > 0 {
                self.delivered += 1;
                self.duplicates += u64::from(count - 1);
            }
        }
    }
}

/// Connects devices `indices` (bounded concurrency), each to `sync.done`.
pub(crate) async fn connect_all(
    target: &Target,
    indices: Vec<usize>,
    concurrency: usize,
    counters: &Counters,
    errors: &Errors,
) -> Vec<(usize, Ws, Vec<Frame>)> {
    let mut connected = Vec::with_capacity(indices.len());
    let mut attempts = futures_util::stream::iter(indices)
        .map(|i| async move { (i, target.connect(i).await) })
        .buffer_unordered(concurrency);
    while let Some((i, result)) = attempts.next().await {
        match result {
            Ok((ws, replayed)) => {
                Counters::add(&counters.connected, 1);
                connected.push((i, ws, replayed));
            }
            Err(e) => errors.push(format!("device {i}: {e:#}")),
        }
    }
    connected
}

pub(crate) async fn run(args: &BenchArgs, target: &Target) -> anyhow::Result<Report> {
    let shared = Arc::new(Shared::new(args, args.devices));
    let _progress = Progress::start(shared.counters.clone(), "direct", args.duration);
    let sockets = connect_all(
        target,
        (0..args.devices).collect(),
        args.connect_concurrency,
        &shared.counters,
        &shared.errors,
    )
    .await;
    if sockets.len() < args.devices {
        anyhow::bail!(
            "only {} of {} devices connected: {:?}",
            sockets.len(),
            args.devices,
            shared.errors.take()
        );
    }
    let (phase, watching) = watch::channel(Phase::Sending);
    let start = Instant::now();
    let mut devices = JoinSet::new();
    for (i, ws, replayed) in sockets {
        let peer = Some(target.user(i ^ 1));
        devices.spawn(device(
            shared.clone(),
            i,
            args.devices,
            peer,
            ws,
            replayed,
            watching.clone(),
        ));
    }
    let sending = drive(args, &shared, &phase, args.devices, |c| {
        Counters::get(&c.delivered) >= Counters::get(&c.accepted)
            && Counters::get(&c.awaiting_receipts) == 0
    })
    .await;
    let elapsed = start.elapsed();
    let outcomes = join_outcomes(devices).await?;

    let mut report = account(&shared, &outcomes, sending);
    let mut tally = Tally::default();
    for sender in &outcomes {
        tally.add(&sender.accepted, &outcomes[sender.index ^ 1].received);
    }
    let Tally {
        delivered,
        lost,
        duplicates,
    } = tally;
    report.scenario = "direct".into();
    report.delivered = delivered;
    report.lost = lost;
    report.duplicates = duplicates;
    finish(&mut report, args, &shared, &outcomes, elapsed, "delivery");
    crate::plot::write(&mut report, args, &target.run_id, &shared.delivery);
    Ok(report)
}

/// Waits for every device task; their outcomes in device order.
pub(crate) async fn join_outcomes(mut devices: JoinSet<Outcome>) -> anyhow::Result<Vec<Outcome>> {
    let mut outcomes = Vec::with_capacity(devices.len());
    while let Some(outcome) = devices.join_next().await {
        outcomes.push(outcome?);
    }
    outcomes.sort_by_key(|o| o.index);
    Ok(outcomes)
}

/// The receiving side of a report: order, rate, the latency histogram (which
/// `latency` names), connections, gateway memory and errors.
pub(crate) fn finish(
    report: &mut Report,
    args: &BenchArgs,
    shared: &Shared,
    outcomes: &[Outcome],
    elapsed: Duration,
    latency: &str,
) {
    let histogram = shared.delivery.merged();
    report.out_of_order = outcomes.iter().map(|o| o.out_of_order).sum();
    report.delivered_per_s = report.delivered as f64 / elapsed.as_secs_f64();
    report.latency = Some(latency.into());
    report.p50_ms = quantile_ms(&histogram, 0.5);
    report.p99_ms = quantile_ms(&histogram, 0.99);
    report.p999_ms = quantile_ms(&histogram, 0.999);
    report.max_ms = max_ms(&histogram);
    report.connections = Some(outcomes.len() as u64);
    report.gateway_rss_bytes = args.gateway_pid.and_then(crate::rss_bytes);
    report.errors = shared.errors.take();
}

/// Lets the devices send for `--duration`, then waits (up to the drain
/// timeout) until all `devices` stopped sending, every message is answered
/// and `settled` holds, then ends the run. Returns how long sending lasted.
pub(crate) async fn drive(
    args: &BenchArgs,
    shared: &Shared,
    phase: &watch::Sender<Phase>,
    devices: usize,
    settled: impl Fn(&Counters) -> bool,
) -> Duration {
    let start = Instant::now();
    // The progress bar and the per-second latencies count from here.
    shared.counters.start_sending(start);
    shared.delivery.start_clock(start);
    shared.accept.start_clock(start);
    tokio::time::sleep(args.duration).await;
    phase.send_replace(Phase::Draining);
    let sending = start.elapsed();
    let mut drain = Drain::new(args.drain_timeout);
    let counters = &shared.counters;
    // A device may be sending its last message as the phase changes: the
    // counts are final only once every device saw the change.
    let done = |c: &Counters| {
        Counters::get(&c.stopped) >= devices as u64 && c.unanswered() == 0 && settled(c)
    };
    let arrived = |c: &Counters| {
        (
            Counters::get(&c.delivered),
            Counters::get(&c.awaiting_receipts),
            c.unanswered(),
            Counters::get(&c.stopped),
        )
    };
    while !done(counters) && !drain.gives_up(arrived(counters), Instant::now()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    phase.send_replace(Phase::Done);
    sending
}

/// The sender-side totals of a run, common to `direct` and `offline`.
pub(crate) fn account(shared: &Shared, outcomes: &[Outcome], sending: Duration) -> Report {
    let accept = shared.accept.merged();
    let sent: u64 = outcomes.iter().map(|o| o.sent).sum();
    let accepted: u64 = outcomes.iter().map(|o| o.accepted.len() as u64).sum();
    let rejected: u64 = outcomes.iter().map(|o| o.rejected).sum();
    Report {
        duration_s: sending.as_secs_f64(),
        sent,
        accepted,
        rejected,
        unanswered: sent - accepted - rejected,
        accept_p50_ms: quantile_ms(&accept, 0.5),
        accept_p99_ms: quantile_ms(&accept, 0.99),
        ..Report::default()
    }
}

/// One simulated device: sends to `peer` (if any) while its phase is
/// `Sending`, acks and records whatever arrives, until the phase is `Done`.
pub(crate) async fn device(
    shared: Arc<Shared>,
    index: usize,
    devices: usize,
    peer: Option<String>,
    mut ws: Ws,
    replayed: Vec<Frame>,
    mut phase: watch::Receiver<Phase>,
) -> Outcome {
    let mut state = DeviceState {
        shared: &shared,
        outcome: Outcome {
            index,
            ..Outcome::default()
        },
        outstanding: HashMap::new(),
        undelivered: HashSet::new(),
        delivered_early: HashSet::new(),
        acks: Vec::new(),
        max_seen: None,
    };
    for frame in replayed {
        state.on_frame(frame);
    }
    let mut ticker = shared.period.map(|period| {
        // Spread the devices' ticks over one period so the total rate is smooth.
        let offset = period.mul_f64(index as f64 / devices as f64);
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut next_seq = 0u64;
    let mut ack_due: Option<tokio::time::Instant> = None;
    let mut stopped = false;
    let result: anyhow::Result<()> = async {
        loop {
            let sending = peer.is_some() && *phase.borrow() == Phase::Sending;
            if !stopped && *phase.borrow() != Phase::Sending {
                stopped = true;
                Counters::add(&shared.counters.stopped, 1);
            }
            if sending && ticker.is_none() && state.in_window() < shared.window {
                let to = peer.as_deref().expect("sending has a peer");
                while state.in_window() < shared.window {
                    ws.feed(message_frame(to, shared.chat, next_seq)).await?;
                    state.sent(next_seq);
                    next_seq += 1;
                }
                ws.flush().await?;
            }
            tokio::select! {
                biased;
                next = ws.next() => {
                    state.on_message(next)?;
                    // Take whatever else is already here, then ack it all at once.
                    while let Some(next) = ws.next().now_or_never() {
                        state.on_message(next)?;
                    }
                    // Like an app, ack in batches: at once when a batch is full,
                    // else within ACK_DELAY, so that a device flooded with small
                    // reads (a group's sender getting every member's receipt)
                    // does not spend its frame budget on tiny acks.
                    if state.acks.len() >= ACK_BATCH {
                        flush_acks(&mut ws, &mut state.acks).await?;
                    } else if !state.acks.is_empty() && ack_due.is_none() {
                        ack_due = Some(tokio::time::Instant::now() + ACK_DELAY);
                    }
                }
                _ = until(ack_due) => {
                    ack_due = None;
                    flush_acks(&mut ws, &mut state.acks).await?;
                }
                _ = tick(&mut ticker), if sending => {
                    if state.outstanding.len() < OPEN_LOOP_CAP {
                        let to = peer.as_deref().expect("sending has a peer");
                        ws.send(message_frame(to, shared.chat, next_seq)).await?;
                        state.sent(next_seq);
                        next_seq += 1;
                    }
                }
                changed = phase.changed() => {
                    if changed.is_err() || *phase.borrow() == Phase::Done {
                        return Ok(());
                    }
                }
            }
        }
    }
    .await;
    if !stopped {
        Counters::add(&shared.counters.stopped, 1);
    }
    match result {
        Ok(()) => {
            let _ = ws.close(None).await;
        }
        Err(e) => shared.errors.push(format!("device {index}: {e:#}")),
    }
    state.outcome
}

/// Most mids per ack frame.
const ACK_BATCH: usize = 500;

/// Longest an ack waits for more to fill its batch.
const ACK_DELAY: Duration = Duration::from_millis(5);

async fn flush_acks(ws: &mut Ws, acks: &mut Vec<String>) -> anyhow::Result<()> {
    for batch in std::mem::take(acks).chunks(ACK_BATCH) {
        ws.feed(ack_frame(batch)).await?;
    }
    ws.flush().await?;
    Ok(())
}

async fn until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

struct DeviceState<'a> {
    shared: &'a Shared,
    outcome: Outcome,
    /// Seq → when it was sent, until answered.
    outstanding: HashMap<u64, Instant>,
    /// Mids accepted but not yet confirmed by a `delivered` receipt (direct
    /// only; they count against the window in a closed loop).
    undelivered: HashSet<String>,
    /// Mids whose `delivered` receipt came before their `accepted`.
    delivered_early: HashSet<String>,
    acks: Vec<String>,
    max_seen: Option<u64>,
}

impl DeviceState<'_> {
    /// What counts against the closed-loop window.
    fn in_window(&self) -> usize {
        let undelivered = if self.shared.awaits_delivery() {
            self.undelivered.len()
        } else {
            0
        };
        self.outstanding.len() + undelivered
    }

    fn sent(&mut self, seq: u64) {
        self.outstanding.insert(seq, Instant::now());
        self.outcome.sent += 1;
        Counters::add(&self.shared.counters.sent, 1);
    }

    fn on_message(
        &mut self,
        next: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    ) -> anyhow::Result<()> {
        match next {
            None => anyhow::bail!("the server closed the socket"),
            Some(Err(e)) => anyhow::bail!("socket failed: {e}"),
            Some(Ok(Message::Close(close))) => {
                anyhow::bail!("the server closed the socket: {close:?}")
            }
            Some(Ok(message)) => {
                if let Some(frame) = Frame::parse(&message) {
                    self.on_frame(frame);
                }
                Ok(())
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) {
        let shared = self.shared;
        let index = self.outcome.index;
        match frame.kind.as_str() {
            "accepted" => {
                let Some(seq) = frame.id.as_deref().and_then(|id| id.parse::<u64>().ok()) else {
                    return;
                };
                if let Some(sent) = self.outstanding.remove(&seq) {
                    if let Some(mid) = frame.mid.filter(|_| self.shared.tracks_receipts) {
                        if !self.delivered_early.remove(&mid) && self.undelivered.insert(mid) {
                            Counters::add(&shared.counters.awaiting_receipts, 1);
                        }
                    }
                    shared.accept.record(index, sent.elapsed());
                    self.outcome.accepted.push(seq);
                    Counters::add(&shared.counters.accepted, 1);
                }
            }
            "error" => {
                let seq = frame.id.as_deref().and_then(|id| id.parse::<u64>().ok());
                if seq.is_some_and(|seq| self.outstanding.remove(&seq).is_some()) {
                    self.outcome.rejected += 1;
                    Counters::add(&shared.counters.rejected, 1);
                }
                shared.errors.push(format!(
                    "device {index}: error frame {}: {}",
                    frame.code.unwrap_or_default(),
                    frame.message.unwrap_or_default()
                ));
            }
            // Every acked message sends its sender a delivered receipt: acked
            // like any delivery, not counted as one.
            "receipt" => {
                if let Some(rid) = frame.rid {
                    self.acks.push(rid);
                }
                if frame.state.as_deref() == Some("delivered") && self.shared.tracks_receipts {
                    if let Some(mid) = frame.mid {
                        // A receipt that overtook its `accepted` settles it early.
                        if self.undelivered.remove(&mid) {
                            Counters::sub(&shared.counters.awaiting_receipts, 1);
                        } else {
                            self.delivered_early.insert(mid);
                        }
                    }
                }
            }
            "message" => {
                if let Some(mid) = frame.mid {
                    self.acks.push(mid);
                }
                let Some(probe) = frame.body else {
                    if frame.system.is_some() {
                        // A group's notice (its creation): acked, not counted.
                        return;
                    }
                    shared.errors.push(format!(
                        "device {index}: a message without a bench body from {:?}",
                        frame.from
                    ));
                    return;
                };
                let seq = probe.seq as usize;
                if self.outcome.received.len() <= seq {
                    self.outcome.received.resize(seq + 1, 0);
                }
                self.outcome.received[seq] += 1;
                if self.outcome.received[seq] == 1 {
                    Counters::add(&shared.counters.delivered, 1);
                    let now = crate::measure::now_ns();
                    shared.delivery.record(
                        index,
                        Duration::from_nanos(now.saturating_sub(probe.sent_ns)),
                    );
                    if self.max_seen.is_some_and(|max| probe.seq < max) {
                        self.outcome.out_of_order += 1;
                    }
                    self.max_seen = self.max_seen.max(Some(probe.seq));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Shared, Tally};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: crate::BenchArgs,
    }

    fn shared(args: &[&str]) -> Shared {
        let cli = Cli::try_parse_from(["bench", "--secret", "s"].iter().chain(args)).unwrap();
        Shared::new(&cli.bench, 10)
    }

    #[test]
    fn only_a_direct_closed_loop_waits_for_delivered_receipts() {
        assert!(shared(&["--scenario", "direct"]).awaits_delivery());
        // Paced, offline (no receiver acks) and group runs count `accepted`.
        assert!(!shared(&["--scenario", "direct", "--rate", "100"]).awaits_delivery());
        assert!(!shared(&["--scenario", "offline"]).awaits_delivery());
        assert!(!shared(&["--scenario", "group", "--devices", "20"]).awaits_delivery());
    }

    #[test]
    fn every_direct_run_waits_for_its_receipts_before_it_ends() {
        assert!(shared(&["--scenario", "direct"]).tracks_receipts);
        assert!(shared(&["--scenario", "direct", "--rate", "100"]).tracks_receipts);
        // Nobody online to ack offline messages; a group sender's receipts
        // come from every member and are not tracked.
        assert!(!shared(&["--scenario", "offline"]).tracks_receipts);
        assert!(!shared(&["--scenario", "group", "--devices", "20"]).tracks_receipts);
    }

    #[test]
    fn a_missing_message_is_lost_and_a_second_copy_is_a_duplicate() {
        let mut tally = Tally::default();
        // 0..4 accepted; 2 never arrived, 3 arrived twice.
        tally.add(&[0, 1, 2, 3], &[1, 1, 0, 2]);
        assert_eq!(
            tally,
            Tally {
                delivered: 3,
                lost: 1,
                duplicates: 1
            }
        );
    }

    #[test]
    fn messages_beyond_what_arrived_are_lost() {
        let mut tally = Tally::default();
        tally.add(&[0, 1, 2], &[1]);
        assert_eq!(tally.lost, 2);
        assert_eq!(tally.delivered, 1);
    }
}
