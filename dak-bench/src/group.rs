//! The `group` scenario: groups of `--group-size` connected devices, the first
//! member of each sending to its group, every other member receiving.
//!
//! The groups are created over REST before the clock starts, and each member
//! waits for the group's `created` notice, so every member is routable when the
//! first message goes out. Delivered receipts flow back to each sender (one per
//! member and message) and are acked like any delivery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{ack_frame, Frame, Target, Ws};
use crate::direct::{
    account, connect_all, device, drive, finish, join_outcomes, Phase, Shared, Tally,
};
use crate::measure::{Counters, Progress};
use crate::{BenchArgs, Report};

/// How long a member waits for its group's `created` notice.
const CREATE_PATIENCE: Duration = Duration::from_secs(60);

pub(crate) async fn run(args: &BenchArgs, target: &Target) -> anyhow::Result<Report> {
    let size = args.group_size;
    let groups = args.devices / size;
    let shared = Arc::new(Shared::new(args, groups));
    let _progress = Progress::start(shared.counters.clone(), "group", args.duration);
    let mut sockets = connect_all(
        target,
        (0..args.devices).collect(),
        args.connect_concurrency,
        &shared.counters,
        &shared.errors,
    )
    .await;
    if sockets.len() < args.devices {
        bail!(
            "only {} of {} devices connected: {:?}",
            sockets.len(),
            args.devices,
            shared.errors.take()
        );
    }
    sockets.sort_by_key(|(i, _, _)| *i);

    let group_id = |g: usize| format!("bench-{}-g{g}", target.run_id);
    for g in 0..groups {
        create_group(
            target,
            g * size,
            &group_id(g),
            (g * size + 1..(g + 1) * size).collect(),
        )
        .await?;
    }
    let waits = futures_util::stream::iter(sockets.iter_mut())
        .map(|(i, ws, _)| async move { created(ws).await.with_context(|| format!("device {i}")) })
        .buffer_unordered(args.connect_concurrency)
        .collect::<Vec<_>>()
        .await;
    for wait in waits {
        wait?;
    }

    let (phase, watching) = watch::channel(Phase::Sending);
    let start = Instant::now();
    let mut devices = JoinSet::new();
    for (i, ws, replayed) in sockets {
        let to = (i % size == 0).then(|| group_id(i / size));
        devices.spawn(device(
            shared.clone(),
            i,
            args.devices,
            to,
            ws,
            replayed,
            watching.clone(),
        ));
    }
    let fan_out = (size - 1) as u64;
    let sending = drive(args, &shared, &phase, args.devices, |c| {
        Counters::get(&c.delivered) >= Counters::get(&c.accepted) * fan_out
    })
    .await;
    let elapsed = start.elapsed();
    let outcomes = join_outcomes(devices).await?;

    let mut report = account(&shared, &outcomes, sending);
    let mut tally = Tally::default();
    for sender in outcomes.iter().step_by(size) {
        for member in &outcomes[sender.index + 1..sender.index + size] {
            tally.add(&sender.accepted, &member.received);
        }
    }
    report.scenario = "group".into();
    report.delivered = tally.delivered;
    report.lost = tally.lost;
    report.duplicates = tally.duplicates;
    finish(&mut report, args, &shared, &outcomes, elapsed, "fan-out");
    crate::plot::write(&mut report, args, &target.run_id, &shared.delivery);
    Ok(report)
}

/// `POST /v1/groups` as device `admin`, with `members` (device indices).
async fn create_group(
    target: &Target,
    admin: usize,
    id: &str,
    members: Vec<usize>,
) -> anyhow::Result<()> {
    let members: Vec<String> = members.into_iter().map(|i| target.user(i)).collect();
    let response = target
        .http
        .post(format!("{}/v1/groups", target.http_base))
        .bearer_auth(target.token(admin))
        .json(&serde_json::json!({"id": id, "name": id, "members": members}))
        .send()
        .await
        .context("POST /v1/groups")?;
    if response.status().as_u16() != 202 {
        bail!(
            "POST /v1/groups: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

/// Reads until the group's `created` notice, and acks it.
async fn created(ws: &mut Ws) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CREATE_PATIENCE;
    loop {
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow::anyhow!("no group notice within {CREATE_PATIENCE:?}"))?;
        let message = match next {
            None => bail!("socket closed while waiting for the group"),
            Some(Err(e)) => bail!("socket failed while waiting for the group: {e}"),
            Some(Ok(message)) => message,
        };
        let Some(Frame {
            kind,
            mid,
            system: Some(_),
            ..
        }) = Frame::parse(&message)
        else {
            continue;
        };
        if kind == "message" {
            if let Some(mid) = mid {
                ws.send(ack_frame(&[mid])).await?;
            }
            return Ok(());
        }
    }
}
