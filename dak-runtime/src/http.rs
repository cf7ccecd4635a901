//! Serving an axum router on a listener the caller bound, until shutdown.

use axum::Router;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
