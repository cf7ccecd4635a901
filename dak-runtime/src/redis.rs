//! Connecting to Redis: one multiplexed, auto-reconnecting connection per process
//! part, shared by clones.

use redis::aio::ConnectionManager;

pub use redis::aio::ConnectionManager as Connection;

/// Connects to `url` and checks the server answers, giving up after 10 s so a
/// service with a wrong `DAK_REDIS_URL` exits instead of hanging at start-up.
pub async fn connect(url: &str) -> Result<ConnectionManager, redis::RedisError> {
    let client = redis::Client::open(url)?;
    // Every command waits for a reconnect in progress. The crate's default
    // backoff (1 s, then a delay times 100, capped at 60 s) held every
    // command of a service for over a minute after a Redis restart; here a
    // reconnect gives up after about 2 s, the command fails (the client hears
    // `unavailable` and retries), and the next command tries again.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(std::time::Duration::from_secs(2))
        .set_response_timeout(std::time::Duration::from_secs(5))
        .set_factor(2)
        .set_max_delay(1000)
        .set_number_of_retries(2);
    let connecting = async {
        let mut conn = ConnectionManager::new_with_config(client, config).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(conn)
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), connecting)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "no answer from Redis within 10 s",
                url.to_owned(),
            )))
        })
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
