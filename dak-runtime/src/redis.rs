//! Connecting to Redis: one multiplexed, auto-reconnecting connection per process
//! part, shared by clones; to one server or to a Redis Cluster, over TCP or TLS
//! (`rediss://`).
//!
//! To one server, [`Connection`] wraps redis-rs's `ConnectionManager`, which
//! reconnects after I/O errors but not after a command timed out. A
//! multiplexed connection whose answers stopped coming would otherwise stay
//! stuck; here a timed-out command makes the next command open a new
//! connection. (The stall that first showed this, every command of a gateway
//! timing out for minutes while Redis answered other clients at once, was
//! the gateway's own: command futures that held places in the connection's
//! bounded queue without being polled. See `spawn_reply` in ws-gateway.
//! Keep such futures polled: a new connection does not help against it.)
//!
//! To a Cluster, it wraps redis-rs's cluster connection, which routes each
//! command by its key's slot and follows the cluster's changes; a timed-out
//! command makes the next one open a new cluster connection too. dak's keys
//! put what one script or command touches under one hash tag (`{user}`,
//! `{inflight:N}`), so each lands in one slot; pipelines, which may span
//! slots, are sent command by command (still pipelined on each node's
//! connection).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value};

use crate::config::Secret;

/// The shortest time between two replacements of a connection, so that a
/// Redis that is merely slow is not flooded with new connections.
const REPLACE_AT_MOST_EVERY: Duration = Duration::from_secs(5);

/// How many commands of one pipeline are sent together on a Cluster.
/// redis-rs 0.32's cluster connection stopped answering for good (every
/// command timed out) when a hundred commands came at once to a slot map
/// that a reshard had made stale: its slot refresh never finished. Sixteen
/// at a time keep pipelining and let the refresh finish
/// (`redis_cluster::stores_keep_their_contracts_while_slots_move`).
const CLUSTER_PIPELINE_DEPTH: usize = 16;

/// Where Redis is and how to reach it.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// `redis://` or `rediss://` URLs: one server's, or seed nodes of a
    /// Cluster. `Debug` shows them without their passwords.
    pub urls: Vec<RedisUrl>,
    /// The URLs are nodes of a Redis Cluster.
    pub cluster: bool,
    /// PEM CAs trusted for `rediss://` instead of the system's.
    pub ca_cert: Option<PathBuf>,
    /// A PEM client certificate and its key, for servers that check clients.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// A Redis URL, which may carry a password: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl From<String> for RedisUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// `urls` (one, or a comma-separated list) without the passwords in their
/// user info, for messages and logs.
pub fn redact(urls: &str) -> String {
    urls.split(',')
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:[redacted]{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

impl Target {
    /// One server at `url`, with no further settings.
    pub fn url(url: &str) -> Self {
        Self {
            urls: vec![RedisUrl(url.to_owned())],
            ..Self::default()
        }
    }

    /// What every node is connected with: address, database, credentials.
    fn connection_infos(&self) -> redis::RedisResult<Vec<redis::ConnectionInfo>> {
        self.urls
            .iter()
            .map(|url| {
                let mut info = url.0.as_str().into_connection_info()?;
                if let Some(username) = &self.username {
                    info.redis.username = Some(username.clone());
                }
                if let Some(password) = &self.password {
                    info.redis.password = Some(password.expose().to_owned());
                }
                Ok(info)
            })
            .collect()
    }

    /// The CA and client certificate to use, when any is set.
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, redis::RedisError> {
        if self.ca_cert.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read a TLS file",
                    format!("{}: {e}", path.display()),
                ))
            })
        };
        Ok(Some(redis::TlsCertificates {
            root_cert: self.ca_cert.as_ref().map(read).transpose()?,
            client_tls: match &self.client_cert {
                Some((cert, key)) => Some(redis::ClientTlsConfig {
                    client_cert: read(cert)?,
                    client_key: read(key)?,
                }),
                None => None,
            },
        }))
    }

    /// Whether the connection is encrypted.
    fn tls(&self) -> bool {
        self.urls.iter().any(|url| url.0.starts_with("rediss://"))
    }

    /// The URLs without their passwords, for messages and logs.
    pub fn describe(&self) -> String {
        let urls: Vec<String> = self.urls.iter().map(|u| redact(&u.0)).collect();
        urls.join(",")
    }
}

/// A Redis connection shared by clones; usable wherever redis-rs takes a
/// `ConnectionLike` (`query_async`, `invoke_async`).
#[derive(Clone)]
pub struct Connection {
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Server(Arc<Shared<ConnectionManager>>),
    Cluster(Arc<Shared<ClusterConnection>>),
}

/// Opens a new connection of one kind.
type Open<C> =
    Box<dyn Fn() -> futures_util::future::BoxFuture<'static, redis::RedisResult<C>> + Send + Sync>;

/// A connection that a command's timeout marks stale, and how to open a new one.
struct Shared<C> {
    open: Open<C>,
    state: Mutex<State<C>>,
}

struct State<C> {
    current: C,
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

/// Connects to one server at `url` (see [`connect_to`]).
pub async fn connect(url: &str) -> Result<Connection, redis::RedisError> {
    connect_to(&Target::url(url)).await
}

/// Connects to `target` and checks the server answers, giving up after 10 s
/// so a service with a wrong `DAK_REDIS_URL` exits instead of hanging at
/// start-up.
pub async fn connect_to(target: &Target) -> Result<Connection, redis::RedisError> {
    let connecting = async {
        let inner = if target.cluster {
            Inner::Cluster(open_cluster(target).await?)
        } else {
            Inner::Server(open_server(target).await?)
        };
        let mut conn = Connection { inner };
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(conn)
    };
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::IoError,
                "no answer from Redis within 10 s",
                target.describe(),
            )))
        })?;
    tracing::info!(
        redis = %target.describe(),
        cluster = target.cluster,
        tls = target.tls(),
        "connected to redis"
    );
    Ok(conn)
}

async fn open_server(target: &Target) -> Result<Arc<Shared<ConnectionManager>>, redis::RedisError> {
    let [info] = <[_; 1]>::try_from(target.connection_infos()?).map_err(|_| {
        redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "one Redis URL is needed when it is not a Cluster",
        ))
    })?;
    let client = match target.certificates()? {
        Some(certificates) => redis::Client::build_with_tls(info, certificates)?,
        None => redis::Client::open(info)?,
    };
    Shared::open(Box::new(move || {
        let client = client.clone();
        Box::pin(async move { ConnectionManager::new_with_config(client, config()).await })
    }))
    .await
}

async fn open_cluster(
    target: &Target,
) -> Result<Arc<Shared<ClusterConnection>>, redis::RedisError> {
    // The same time limits as one server's (see `config`).
    let mut builder = redis::cluster::ClusterClientBuilder::new(target.connection_infos()?)
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(5))
        .retries(2);
    if let Some(certificates) = target.certificates()? {
        builder = builder.certs(certificates);
    }
    let client = builder.build()?;
    Shared::open(Box::new(move || {
        let client = client.clone();
        Box::pin(async move { client.get_async_connection().await })
    }))
    .await
}

impl<C: Clone> Shared<C> {
    async fn open(open: Open<C>) -> Result<Arc<Self>, redis::RedisError> {
        let current = open().await?;
        Ok(Arc::new(Self {
            open,
            state: Mutex::new(State {
                current,
                replaced_at: Instant::now(),
                stale: false,
            }),
        }))
    }

    /// The connection to use now, replacing a stale one first.
    async fn connection(&self) -> C {
        {
            let mut state = self.state.lock().expect("redis state lock");
            if !state.stale || state.replaced_at.elapsed() < REPLACE_AT_MOST_EVERY {
                return state.current.clone();
            }
            state.stale = false;
            state.replaced_at = Instant::now();
        }
        tracing::warn!("a redis command timed out: opening a new connection");
        let opened = (self.open)().await;
        let mut state = self.state.lock().expect("redis state lock");
        match opened {
            Ok(fresh) => state.current = fresh,
            Err(e) => tracing::warn!(error = %e, "opening a new redis connection"),
        }
        state.current.clone()
    }

    fn note(&self, result: &redis::RedisResult<impl Sized>) {
        if let Err(e) = result {
            if e.is_timeout() {
                self.state.lock().expect("redis state lock").stale = true;
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            match &self.inner {
                Inner::Server(shared) => {
                    let result = shared.connection().await.req_packed_command(cmd).await;
                    shared.note(&result);
                    result
                }
                Inner::Cluster(shared) => {
                    let result = shared.connection().await.req_packed_command(cmd).await;
                    shared.note(&result);
                    result
                }
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            match &self.inner {
                Inner::Server(shared) => {
                    let mut conn = shared.connection().await;
                    let result = conn.req_packed_commands(pipeline, offset, count).await;
                    shared.note(&result);
                    result
                }
                Inner::Cluster(shared) => {
                    let mut cluster = shared.connection().await;
                    // A transaction must stay on one node (its keys in one
                    // slot). Other pipelines may span slots, which the
                    // cluster client refuses: they go command by command.
                    let result = if pipeline.is_transaction() {
                        cluster.req_packed_commands(pipeline, offset, count).await
                    } else {
                        cluster_pipeline(&cluster, pipeline).await
                    };
                    shared.note(&result);
                    result
                }
            }
        })
    }

    fn get_db(&self) -> i64 {
        match &self.inner {
            Inner::Server(shared) => shared
                .state
                .lock()
                .expect("redis state lock")
                .current
                .get_db(),
            Inner::Cluster(_) => 0,
        }
    }
}

/// Sends a pipeline's commands each to the node of its slot, a batch at a
/// time (see [`CLUSTER_PIPELINE_DEPTH`]); answers in the pipeline's order.
async fn cluster_pipeline(
    cluster: &ClusterConnection,
    pipeline: &Pipeline,
) -> redis::RedisResult<Vec<Value>> {
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let mut answers = Vec::with_capacity(commands.len());
    for batch in commands.chunks(CLUSTER_PIPELINE_DEPTH) {
        let sent = batch.iter().map(|cmd| {
            let mut cluster = cluster.clone();
            async move { cluster.req_packed_command(cmd).await }
        });
        answers.extend(futures_util::future::try_join_all(sent).await?);
    }
    Ok(answers)
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
