//! The `idle` scenario: N authenticated sockets, each read until `sync.done`,
//! then held open (answering the server's pings) for `--duration`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::client::{Target, Ws};
use crate::direct::connect_all;
use crate::measure::{Counters, Errors, Progress};
use crate::{BenchArgs, Report};

pub(crate) async fn run(args: &BenchArgs, target: &Target) -> anyhow::Result<Report> {
    let counters = Arc::new(Counters::default());
    let errors = Arc::new(Errors::default());
    let _progress = Progress::start(counters.clone(), "idle", args.duration);
    let start = Instant::now();
    let sockets = connect_all(
        target,
        (0..args.devices).collect(),
        args.connect_concurrency,
        &counters,
        &errors,
    )
    .await;
    let connect_time = start.elapsed();
    counters.start_sending(Instant::now());
    let connections = sockets.len() as u64;

    let (done, watching) = watch::channel(false);
    let dropped = Arc::new(AtomicU64::new(0));
    let mut held = JoinSet::new();
    for (i, ws, _) in sockets {
        held.spawn(hold(
            i,
            ws,
            watching.clone(),
            dropped.clone(),
            errors.clone(),
        ));
    }
    tokio::time::sleep(args.duration).await;
    // Measured while every socket is still open.
    let gateway_rss_bytes = args.gateway_pid.and_then(crate::rss_bytes);
    done.send_replace(true);
    while held.join_next().await.is_some() {}

    Ok(Report {
        scenario: "idle".into(),
        duration_s: args.duration.as_secs_f64(),
        connections: Some(connections),
        connections_held: Some(connections - dropped.load(Relaxed)),
        connect_per_s: Some(connections as f64 / connect_time.as_secs_f64()),
        gateway_rss_bytes,
        errors: errors.take(),
        ..Report::default()
    })
}

/// Keeps reading one socket (so pings are answered) until the run is done.
async fn hold(
    index: usize,
    mut ws: Ws,
    mut done: watch::Receiver<bool>,
    dropped: Arc<AtomicU64>,
    errors: Arc<Errors>,
) {
    loop {
        tokio::select! {
            next = ws.next() => match next {
                Some(Ok(_)) => {}
                None | Some(Err(_)) => {
                    dropped.fetch_add(1, Relaxed);
                    errors.push(format!("device {index}: the socket closed while idle"));
                    return;
                }
            },
            _ = done.changed() => break,
        }
    }
    let _ = ws.close(None).await;
}
