//! The `offline` scenario: the even devices send to the odd ones, which have
//! registered a push token but never connect, so every message goes to the
//! offline inbox. Afterwards each inbox is read back over `GET /v1/messages`
//! in pages of 500 (timed) until every accepted message is found, then acked
//! so the server's inbox is left empty.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{Frame, Target, DEVICE};
use crate::direct::{account, connect_all, device, drive, join_outcomes, Phase, Shared, Tally};
use crate::measure::{max_ms, quantile_ms, Counters, Drain, Latency, Progress};
use crate::{BenchArgs, Report};

/// The largest page `GET /v1/messages` serves.
const PAGE: usize = 500;

/// Inboxes read at once.
const READERS: usize = 32;

#[derive(Deserialize)]
struct Page {
    messages: Vec<Frame>,
    next: Option<String>,
}

/// What one receiver's inbox held at the last read.
struct Inbox {
    /// Times each seq was found, indexed by seq.
    found: Vec<u32>,
    mids: Vec<String>,
}

pub(crate) async fn run(args: &BenchArgs, target: &Target) -> anyhow::Result<Report> {
    let senders: Vec<usize> = (0..args.devices).step_by(2).collect();
    let shared = Arc::new(Shared::new(args, senders.len()));
    let _progress = Progress::start(shared.counters.clone(), "offline", args.duration);

    let registrations = futures_util::stream::iter(senders.iter().map(|i| i ^ 1))
        .map(|r| register(target, r))
        .buffer_unordered(args.connect_concurrency)
        .collect::<Vec<_>>()
        .await;
    registrations
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;

    let sockets = connect_all(
        target,
        senders.clone(),
        args.connect_concurrency,
        &shared.counters,
        &shared.errors,
    )
    .await;
    if sockets.len() < senders.len() {
        anyhow::bail!(
            "only {} of {} senders connected: {:?}",
            sockets.len(),
            senders.len(),
            shared.errors.take()
        );
    }
    let (phase, watching) = watch::channel(Phase::Sending);
    let start = Instant::now();
    let mut devices = JoinSet::new();
    for (i, ws, replayed) in sockets {
        devices.spawn(device(
            shared.clone(),
            i,
            args.devices,
            Some(target.user(i ^ 1)),
            ws,
            replayed,
            watching.clone(),
        ));
    }
    let sending = drive(args, &shared, &phase, senders.len(), |_| true).await;
    let outcomes = join_outcomes(devices).await?;
    let mut report = account(&shared, &outcomes, sending);

    // Read every inbox back until it holds what its sender got accepted, or
    // nothing more came into it for the drain timeout.
    let pages = Latency::new();
    let page_count = std::sync::atomic::AtomicU64::new(0);
    let inboxes = futures_util::stream::iter(outcomes.iter())
        .map(|sender| {
            let (pages, page_count, counters) = (&pages, &page_count, &shared.counters);
            async move {
                let receiver = sender.index ^ 1;
                let mut drain = Drain::new(args.drain_timeout);
                loop {
                    let inbox = read_inbox(target, receiver, pages, page_count).await?;
                    let complete = sender
                        .accepted
                        .iter()
                        .all(|&seq| inbox.found.get(seq as usize).copied().unwrap_or(0) > 0);
                    let unique = inbox.found.iter().filter(|&&n| n > 0).count();
                    if complete || drain.gives_up(unique, Instant::now()) {
                        Counters::add(&counters.delivered, unique as u64);
                        return anyhow::Ok((sender, inbox));
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
        .buffer_unordered(READERS)
        .collect::<Vec<_>>()
        .await;
    let elapsed = start.elapsed();

    let mut tally = Tally::default();
    let mut cleanup = Vec::new();
    for result in inboxes {
        let (sender, inbox) = result?;
        tally.add(&sender.accepted, &inbox.found);
        cleanup.push((sender.index ^ 1, inbox.mids));
    }
    let Tally {
        delivered,
        lost,
        duplicates,
    } = tally;
    let acked = futures_util::stream::iter(cleanup)
        .map(|(receiver, mids)| ack_all(target, receiver, mids))
        .buffer_unordered(READERS)
        .collect::<Vec<_>>()
        .await;
    for result in acked {
        if let Err(e) = result {
            shared.errors.push(format!("acking the inbox: {e:#}"));
        }
    }

    let accept = shared.accept.merged();
    let pages = pages.merged();
    report.scenario = "offline".into();
    report.delivered = delivered;
    report.lost = lost;
    report.duplicates = duplicates;
    report.delivered_per_s = delivered as f64 / elapsed.as_secs_f64();
    // Nothing is received live, so the latency a sender sees is send → accepted.
    report.latency = Some("accept".into());
    report.p50_ms = quantile_ms(&accept, 0.5);
    report.p99_ms = quantile_ms(&accept, 0.99);
    report.p999_ms = quantile_ms(&accept, 0.999);
    report.max_ms = max_ms(&accept);
    report.sync_pages = Some(page_count.into_inner());
    report.sync_page_p50_ms = Some(quantile_ms(&pages, 0.5));
    report.sync_page_p99_ms = Some(quantile_ms(&pages, 0.99));
    report.connections = Some(outcomes.len() as u64);
    report.gateway_rss_bytes = args.gateway_pid.and_then(crate::rss_bytes);
    report.errors = shared.errors.take();
    crate::plot::write(&mut report, args, &target.run_id, &shared.accept);
    Ok(report)
}

async fn register(target: &Target, receiver: usize) -> anyhow::Result<()> {
    let response = target
        .http
        .put(format!(
            "{}/v1/devices/{DEVICE}/push-token",
            target.http_base
        ))
        .bearer_auth(target.token(receiver))
        .json(&serde_json::json!({
            "token": format!("bench-{}", target.user(receiver)),
            "platform": "android",
        }))
        .send()
        .await
        .context("registering a push token")?;
    let status = response.status();
    anyhow::ensure!(
        status.is_success(),
        "registering a push token: {status}: {}",
        response.text().await.unwrap_or_default()
    );
    Ok(())
}

/// Reads a device's whole inbox, page by page, timing each page.
async fn read_inbox(
    target: &Target,
    receiver: usize,
    pages: &Latency,
    page_count: &std::sync::atomic::AtomicU64,
) -> anyhow::Result<Inbox> {
    let token = target.token(receiver);
    let mut inbox = Inbox {
        found: Vec::new(),
        mids: Vec::new(),
    };
    let mut after: Option<String> = None;
    loop {
        let mut url = format!("{}/v1/messages?limit={PAGE}", target.http_base);
        if let Some(cursor) = &after {
            url += &format!("&after={cursor}");
        }
        let started = Instant::now();
        let response = target
            .http
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .context("GET /v1/messages")?;
        let status = response.status();
        anyhow::ensure!(status.is_success(), "GET /v1/messages: {status}");
        let page: Page = response.json().await.context("GET /v1/messages body")?;
        pages.record(receiver, started.elapsed());
        page_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for message in page.messages {
            if let Some(probe) = message.body {
                let seq = probe.seq as usize;
                if inbox.found.len() <= seq {
                    inbox.found.resize(seq + 1, 0);
                }
                inbox.found[seq] += 1;
            }
            inbox.mids.extend(message.mid);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(inbox),
        }
    }
}

/// Acks a device's inbox over REST, in batches of 100.
async fn ack_all(target: &Target, receiver: usize, mids: Vec<String>) -> anyhow::Result<()> {
    let token = target.token(receiver);
    for batch in mids.chunks(100) {
        let response = target
            .http
            .post(format!("{}/v1/acks", target.http_base))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "mids": batch }))
            .send()
            .await
            .context("POST /v1/acks")?;
        anyhow::ensure!(
            response.status().is_success(),
            "POST /v1/acks: {}",
            response.status()
        );
    }
    Ok(())
}
