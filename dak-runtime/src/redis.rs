//! Connecting to Redis: one multiplexed, auto-reconnecting connection per process
//! part, shared by clones.

use redis::aio::ConnectionManager;

pub use redis::aio::ConnectionManager as Connection;

/// Connects to `url` and checks the server answers.
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(std::time::Duration::from_secs(5))
        .set_response_timeout(std::time::Duration::from_secs(5));
    let mut conn = ConnectionManager::new_with_config(client, config).await?;
    let _: String = redis::cmd("PING").query_async(&mut conn).await?;
    Ok(conn)
}

/// Readiness: the server answers PING.
pub async fn ping(conn: &ConnectionManager) -> Result<(), String> {
    let mut conn = conn.clone();
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
