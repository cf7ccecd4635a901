//! One shutdown signal per process. The binary cancels it on SIGINT or SIGTERM;
//! services watch it, stop taking work, drain, and return.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub type Shutdown = CancellationToken;

/// Resolves on the first SIGINT or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs `tasks` until they all end. When `shutdown` fires they get `grace` to
/// drain; whatever still runs after that is aborted. The first task error is
/// returned, and cancels the others: one failed part takes the process down
/// rather than leaving it half alive.
pub async fn supervise(
    mut tasks: JoinSet<anyhow::Result<()>>,
    shutdown: Shutdown,
    grace: Duration,
) -> anyhow::Result<()> {
    let mut first_error = None;
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(result) => {
                    let result = result.map_err(anyhow::Error::from).and_then(|r| r);
                    if let Err(e) = result {
                        tracing::error!(error = %format!("{e:#}"), "a service failed, shutting down");
                        first_error.get_or_insert(e);
                    }
                    shutdown.cancel();
                }
            },
            _ = shutdown.cancelled() => {
                let drained = tokio::time::timeout(grace, drain(&mut tasks, &mut first_error)).await;
                if drained.is_err() {
                    tracing::warn!(grace_secs = grace.as_secs_f64(), "services did not drain in time, aborting");
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                }
                break;
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn drain(tasks: &mut JoinSet<anyhow::Result<()>>, first_error: &mut Option<anyhow::Error>) {
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result.map_err(anyhow::Error::from).and_then(|r| r) {
            first_error.get_or_insert(e);
        }
    }
}

/// Spawns `fut` onto `tasks`, naming it in the error it may return.
pub fn spawn<F>(tasks: &mut JoinSet<anyhow::Result<()>>, name: &'static str, fut: F)
where
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tasks.spawn(async move {
        let result = fut.await;
        result.map_err(|e| e.context(name))
    });
}
