//! Connecting to Redis: one multiplexed, auto-reconnecting connection per process
//! part, shared by clones.
//!
//! [`Connection`] wraps redis-rs's `ConnectionManager`, which reconnects after
//! I/O errors but not after a command timed out. A multiplexed connection
//! whose answers stopped coming (seen under CPU starvation: every command of
//! a gateway timed out for minutes while Redis itself answered other clients
//! at once) would otherwise stay stuck; here a timed-out command makes the
//! next command open a new connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The shortest time between two replacements of a connection, so that a
/// Redis that is merely slow is not flooded with new connections.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// A Redis connection shared by clones; usable wherever redis-rs takes a
/// `ConnectionLike` (`query_async`, `invoke_async`).
#[derive(Clone)]
pub struct Connection {
    shared: Arc<Shared>,
}

struct Shared {
    client: redis::Client,
    state: Mutex<State>,
}

struct State {
    current: ConnectionManager,
    replaced_at: Instant,
    /// Set after a timeout: the next command replaces the connection.
    stale: bool,
}

fn config() -> ConnectionManagerConfig {
    // Every command waits for a reconnect in progress. The crate's default
    // backoff (1 s, then a delay times 100, capped at 60 s) held every
    // command of a service for over a minute after a Redis restart; here a
    // reconnect gives up after about 2 s, the command fails (the client hears
    // `unavailable` and retries), and the next command tries again.
    ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(5))
        .set_factor(2)
        .set_max_delay(1000)
        .set_number_of_retries(2)
}

/// Connects to `url` and checks the server answers, giving up after 10 s so a
/// service with a wrong `DAK_REDIS_URL` exits instead of hanging at start-up.
pub async fn connect(url: &str) -> Result<Connection, redis::RedisError> {
    let client = redis::Client::open(url)?;
    let connecting = async {
        let mut conn = ConnectionManager::new_with_config(client.clone(), config()).await?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(conn)
    };
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "no answer from Redis within 10 s",
                url.to_owned(),
            )))
        })?;
    Ok(Connection {
        shared: Arc::new(Shared {
            client,
            state: Mutex::new(State {
                current: conn,
                replaced_at: Instant::now(),
                stale: false,
            }),
        }),
    })
}

impl Connection {
    /// The connection to use now, replacing a stale one first.
    async fn connection(&self) -> ConnectionManager {
        {
            let mut state = self.shared.state.lock().expect("redis state lock");
            if !state.stale || state.replaced_at.elapsed() < REPLACE_AT_MOST_EVERY {
                return state.current.clone();
            }
            state.stale = false;
            state.replaced_at = Instant::now();
        }
        tracing::warn!("a redis command timed out: opening a new connection");
        let opened = ConnectionManager::new_with_config(self.shared.client.clone(), config()).await;
        let mut state = self.shared.state.lock().expect("redis state lock");
        match opened {
            Ok(fresh) => state.current = fresh,
            Err(e) => tracing::warn!(error = %e, "opening a new redis connection"),
        }
        state.current.clone()
    }

    fn note(&self, result: &redis::RedisResult<impl Sized>) {
        if let Err(e) = result {
            if e.is_timeout() {
                self.shared.state.lock().expect("redis state lock").stale = true;
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let mut conn = self.connection().await;
            let result = conn.req_packed_command(cmd).await;
            self.note(&result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let mut conn = self.connection().await;
            let result = conn.req_packed_commands(cmd, offset, count).await;
            self.note(&result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.shared
            .state
            .lock()
            .expect("redis state lock")
            .current
            .get_db()
    }
}

/// Readiness: the server answers, and keeps what dak writes. In-flight
/// deliveries and dedup entries live only in Redis, so it must not evict keys
/// (`maxmemory-policy noeviction`) and must write an append-only file
/// (`appendonly yes`): otherwise a full memory or a restart loses messages
/// that were acknowledged. A server that refuses `CONFIG GET` (some managed
/// services rename it) is taken at its word; its settings are the operator's
/// to check.
pub async fn ping(conn: &Connection) -> Result<(), String> {
    let mut conn = conn.clone();
    redis::cmd("PING")
        .query_async::<String>(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let settings: redis::RedisResult<HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .arg("appendonly")
        .query_async(&mut conn)
        .await;
    match settings {
        Ok(settings) => settings_problem(&settings).map_or(Ok(()), Err),
        Err(e) if e.kind() == redis::ErrorKind::ResponseError => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// What is wrong with a server's settings for dak, if anything.
fn settings_problem(settings: &HashMap<String, String>) -> Option<String> {
    let mut problems = Vec::new();
    if let Some(policy) = settings.get("maxmemory-policy") {
        if policy != "noeviction" {
            problems.push(format!(
                "maxmemory-policy is {policy}; dak needs noeviction (an evicted key loses an in-flight delivery or a dedup entry)"
            ));
        }
    }
    if settings.get("appendonly").is_some_and(|v| v != "yes") {
        problems.push(
            "appendonly is no; dak needs yes (a restart would lose in-flight deliveries and dedup entries)"
                .to_owned(),
        );
    }
    (!problems.is_empty()).then(|| format!("redis settings: {}", problems.join("; ")))
}
