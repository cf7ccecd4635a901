//! Settings shared by the services, as clap argument groups. Every setting is a
//! `DAK_…` environment variable (or the matching `--flag`); the binaries parse
//! them once at start-up, and libraries receive the parsed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::telemetry::LogFormat;

/// Process-wide settings every binary takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    /// Metrics and health: `/livez`, `/readyz`, `/metrics`. Next to the
    /// public (8080) and internal (8081) defaults, and off Prometheus's own
    /// 9090, so that both run on one machine.
    #[arg(long, env = "DAK_ADMIN_ADDR", default_value = "127.0.0.1:8082")]
    pub admin_addr: SocketAddr,
    /// `text` or `json` log lines; `RUST_LOG` filters them.
    #[arg(long, env = "DAK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// How long a stopping process may drain before its tasks are aborted.
    #[arg(long, env = "DAK_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// Kafka: where the brokers are and what the topics are called.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers, `host:port[,host:port…]`. Unset in `dak up`: the
    /// embedded durable log (`bus.db` in the data directory) is the bus.
    #[arg(long = "kafka-brokers", env = "DAK_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Prepended to every topic name, e.g. `staging.` gives `staging.dak.inbound`.
    #[arg(long, env = "DAK_TOPIC_PREFIX", default_value = "")]
    pub topic_prefix: String,
    /// Partitions of each topic created at start-up [default: 12; 1 on the
    /// embedded log, whose one process gains nothing from more].
    #[arg(long, env = "DAK_KAFKA_PARTITIONS")]
    pub partitions: Option<i32>,
    /// Replication factor of each topic created at start-up.
    #[arg(long, env = "DAK_KAFKA_REPLICATION", default_value_t = 1)]
    pub replication: i32,
    /// Producer `linger.ms`: how long records wait to be batched [default: 1].
    #[arg(long, env = "DAK_KAFKA_LINGER_MS")]
    pub linger_ms: Option<u32>,
    /// Consumer `fetch.wait.max.ms`: the longest a fetch waits at the broker
    /// when there is nothing to read [default: 100]. Brokers answer as soon as
    /// records arrive, so it does not delay delivery; lower values only make
    /// idle consumers ask more often.
    #[arg(long, env = "DAK_KAFKA_FETCH_WAIT_MS")]
    pub fetch_wait_ms: Option<u32>,
    /// Consumer `session.timeout.ms`: how long a consumer that died without
    /// leaving its group (a crashed instance) keeps its partitions before the
    /// group hands them to the survivors.
    #[arg(long, env = "DAK_KAFKA_SESSION_TIMEOUT_MS", default_value_t = 10_000)]
    pub session_timeout_ms: u32,
    /// How clients talk to the brokers: `plaintext`, `ssl` (TLS),
    /// `sasl_plaintext` or `sasl_ssl` (SASL over TLS).
    #[arg(long = "kafka-security-protocol", env = "DAK_KAFKA_SECURITY_PROTOCOL", value_enum, ignore_case = true, default_value_t = SecurityProtocol::Plaintext)]
    pub security_protocol: SecurityProtocol,
    /// SASL mechanism with `sasl_plaintext` or `sasl_ssl`: `PLAIN`,
    /// `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    #[arg(
        long = "kafka-sasl-mechanism",
        env = "DAK_KAFKA_SASL_MECHANISM",
        value_enum,
        ignore_case = true
    )]
    pub sasl_mechanism: Option<SaslMechanism>,
    #[arg(long = "kafka-sasl-username", env = "DAK_KAFKA_SASL_USERNAME")]
    pub sasl_username: Option<String>,
    /// The SASL password; or `DAK_KAFKA_SASL_PASSWORD_FILE`.
    #[arg(
        long = "kafka-sasl-password",
        env = "DAK_KAFKA_SASL_PASSWORD",
        hide_env_values = true
    )]
    pub sasl_password: Option<Secret>,
    /// A file holding the SASL password (a trailing newline is dropped), e.g. a
    /// mounted Kubernetes secret.
    #[arg(
        long = "kafka-sasl-password-file",
        env = "DAK_KAFKA_SASL_PASSWORD_FILE"
    )]
    pub sasl_password_file: Option<PathBuf>,
    /// PEM file (or directory) of the CAs that sign the brokers' certificates,
    /// with `ssl` or `sasl_ssl` [default: the system's CA store].
    #[arg(long = "kafka-ssl-ca-location", env = "DAK_KAFKA_SSL_CA_LOCATION")]
    pub ssl_ca_location: Option<PathBuf>,
    /// PEM client certificate, for brokers that authenticate clients by TLS.
    #[arg(
        long = "kafka-ssl-certificate-location",
        env = "DAK_KAFKA_SSL_CERTIFICATE_LOCATION"
    )]
    pub ssl_certificate_location: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[arg(long = "kafka-ssl-key-location", env = "DAK_KAFKA_SSL_KEY_LOCATION")]
    pub ssl_key_location: Option<PathBuf>,
    /// Password of an encrypted client key.
    #[arg(
        long = "kafka-ssl-key-password",
        env = "DAK_KAFKA_SSL_KEY_PASSWORD",
        hide_env_values = true
    )]
    pub ssl_key_password: Option<Secret>,
    /// Any further librdkafka properties, `key=value[,key=value…]`, given to
    /// every producer, consumer and admin client. Kept from `Debug` output
    /// as a whole: it may hold credentials.
    #[arg(
        long = "kafka-properties",
        env = "DAK_KAFKA_PROPERTIES",
        hide_env_values = true
    )]
    pub properties: Option<Secret>,
}

/// What no flag or variable sets, for tests that build the settings in code.
impl Default for KafkaArgs {
    fn default() -> Self {
        Self {
            brokers: None,
            topic_prefix: String::new(),
            partitions: None,
            replication: 1,
            linger_ms: None,
            fetch_wait_ms: None,
            session_timeout_ms: 10_000,
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password: None,
            sasl_password_file: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            ssl_key_password: None,
            properties: None,
        }
    }
}

/// `security.protocol` of the Kafka clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SecurityProtocol {
    #[value(name = "plaintext")]
    Plaintext,
    #[value(name = "ssl")]
    Ssl,
    #[value(name = "sasl_plaintext")]
    SaslPlaintext,
    #[value(name = "sasl_ssl")]
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    pub fn tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    pub fn sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `sasl.mechanism` of the Kafka clients: the ones librdkafka does with
/// OpenSSL alone (GSSAPI would need Cyrus SASL, OAUTHBEARER a token source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SaslMechanism {
    #[value(name = "PLAIN")]
    Plain,
    #[value(name = "SCRAM-SHA-256")]
    ScramSha256,
    #[value(name = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// The librdkafka value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A password or key: shown as `[redacted]` by `Debug`, so that printing
/// settings never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The session store: presence, in-flight deliveries, outbox dedup.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// `redis://host:port/db`, or `rediss://…` for TLS; with
    /// `DAK_REDIS_CLUSTER`, one or more nodes of the Cluster, comma-separated.
    /// Unset in `dak up`: presence is kept in process, dedup and in-flight
    /// deliveries in SQLite files under `DAK_DATA_DIR`.
    #[arg(long, env = "DAK_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<crate::redis::RedisUrl>,
    /// `DAK_REDIS_URL` names nodes of a Redis Cluster.
    #[arg(long, env = "DAK_REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub redis_cluster: bool,
    /// PEM file of the CAs trusted for `rediss://` [default: the system's CA
    /// store].
    #[arg(long, env = "DAK_REDIS_CA_CERT")]
    pub redis_ca_cert: Option<PathBuf>,
    /// PEM client certificate, for servers that check clients'
    /// (`tls-auth-clients yes`); with `DAK_REDIS_CLIENT_KEY`.
    #[arg(long, env = "DAK_REDIS_CLIENT_CERT")]
    pub redis_client_cert: Option<PathBuf>,
    #[arg(long, env = "DAK_REDIS_CLIENT_KEY")]
    pub redis_client_key: Option<PathBuf>,
    /// ACL user name, instead of one in the URL.
    #[arg(long, env = "DAK_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Password (`AUTH`), instead of one in the URL.
    #[arg(long, env = "DAK_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<Secret>,
    /// Prefix of every Redis key dak writes.
    #[arg(long, env = "DAK_REDIS_PREFIX", default_value = "dak")]
    pub redis_prefix: String,
    /// How long the (sender, client id) → mid mapping is kept, i.e. how late an
    /// outbox retry is still recognised as a duplicate.
    #[arg(long, env = "DAK_DEDUP_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub dedup_ttl: Duration,
    /// Most (sender, client id) entries the dedup file of `dak up` keeps (in
    /// SQLite, without `DAK_REDIS_URL`); beyond it the oldest go first, even
    /// before `DAK_DEDUP_TTL`.
    #[arg(long, env = "DAK_DEDUP_MAX_ENTRIES", default_value_t = 10_000_000)]
    pub dedup_max_entries: u64,
    /// Most (sender, client id) entries kept in Redis for one sender; beyond
    /// it that sender's oldest go first, even before `DAK_DEDUP_TTL`.
    #[arg(long, env = "DAK_DEDUP_MAX_PER_USER", default_value_t = 10_000)]
    pub dedup_max_per_user: u64,
    /// How long a gateway's presence outlives its last heartbeat.
    #[arg(long, env = "DAK_PRESENCE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub presence_ttl: Duration,
}

impl StoreArgs {
    /// The Redis to connect to, if any, or why the settings do not make one.
    pub fn redis_target(&self) -> Result<Option<crate::redis::Target>, String> {
        let Some(list) = &self.redis_url else {
            let set = [
                ("DAK_REDIS_CA_CERT", self.redis_ca_cert.is_some()),
                ("DAK_REDIS_CLIENT_CERT", self.redis_client_cert.is_some()),
                ("DAK_REDIS_USERNAME", self.redis_username.is_some()),
                ("DAK_REDIS_PASSWORD", self.redis_password.is_some()),
                ("DAK_REDIS_CLUSTER", self.redis_cluster),
            ];
            return match set.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(format!("{name} is set without DAK_REDIS_URL")),
                None => Ok(None),
            };
        };
        let urls: Vec<crate::redis::RedisUrl> = list
            .0
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| crate::redis::RedisUrl(url.to_owned()))
            .collect();
        if urls.is_empty() {
            return Err("DAK_REDIS_URL is empty".into());
        }
        if urls.len() > 1 && !self.redis_cluster {
            return Err(
                "DAK_REDIS_URL names several servers: set DAK_REDIS_CLUSTER=true for a Redis Cluster"
                    .into(),
            );
        }
        for url in &urls {
            match url.0.split_once("://") {
                Some(("redis" | "rediss", _)) => {}
                _ => {
                    return Err(format!(
                        "DAK_REDIS_URL: {url:?} is not a redis:// or rediss:// URL"
                    ))
                }
            }
        }
        let tls = urls[0].0.starts_with("rediss://");
        if urls.iter().any(|url| url.0.starts_with("rediss://") != tls) {
            return Err("DAK_REDIS_URL mixes redis:// and rediss:// nodes".into());
        }
        let tls_files = self.redis_ca_cert.is_some()
            || self.redis_client_cert.is_some()
            || self.redis_client_key.is_some();
        if tls_files && !tls {
            return Err(
                "DAK_REDIS_CA_CERT, DAK_REDIS_CLIENT_CERT and DAK_REDIS_CLIENT_KEY need a rediss:// URL"
                    .into(),
            );
        }
        let client_cert = match (&self.redis_client_cert, &self.redis_client_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => {
                return Err(
                    "a Redis client certificate needs both DAK_REDIS_CLIENT_CERT and DAK_REDIS_CLIENT_KEY"
                        .into(),
                )
            }
        };
        for (name, path) in [
            ("DAK_REDIS_CA_CERT", self.redis_ca_cert.as_ref()),
            ("DAK_REDIS_CLIENT_CERT", self.redis_client_cert.as_ref()),
            ("DAK_REDIS_CLIENT_KEY", self.redis_client_key.as_ref()),
        ] {
            if let Some(path) = path.filter(|p| !p.is_file()) {
                return Err(format!("{name}: {} is not a file", path.display()));
            }
        }
        Ok(Some(crate::redis::Target {
            urls,
            cluster: self.redis_cluster,
            ca_cert: self.redis_ca_cert.clone(),
            client_cert,
            username: self.redis_username.clone(),
            password: self.redis_password.clone(),
        }))
    }
}

/// ScyllaDB, the distributed engine for the inbox and push tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct ScyllaArgs {
    /// `host:port[,host:port…]`. Unset: the SQLite files under `DAK_DATA_DIR`.
    #[arg(long, env = "DAK_SCYLLA_NODES")]
    pub scylla_nodes: Option<String>,
    /// Keyspace, created with its tables at start-up if missing.
    #[arg(long, env = "DAK_SCYLLA_KEYSPACE", default_value = "dak")]
    pub scylla_keyspace: String,
    /// Replication factor of a keyspace created at start-up
    /// (NetworkTopologyStrategy, the same in every datacenter).
    #[arg(long, env = "DAK_SCYLLA_REPLICATION", default_value_t = 1)]
    pub scylla_replication: u32,
    /// The whole `WITH` clause of a keyspace created at start-up, instead of
    /// the one `DAK_SCYLLA_REPLICATION` makes, e.g. `replication = {'class':
    /// 'NetworkTopologyStrategy', 'dc1': 3} AND tablets = {'enabled': false}`.
    #[arg(long, env = "DAK_SCYLLA_KEYSPACE_WITH")]
    pub scylla_keyspace_with: Option<String>,
}

impl ScyllaArgs {
    /// The configured nodes, if ScyllaDB is in use.
    pub fn nodes(&self) -> Option<Vec<String>> {
        scylla_nodes(self.scylla_nodes.as_deref()?)
    }

    /// How a missing keyspace is created.
    pub fn keyspace_options(&self) -> crate::scylla::KeyspaceOptions {
        crate::scylla::KeyspaceOptions {
            replication_factor: self.scylla_replication,
            with: self.scylla_keyspace_with.clone(),
        }
    }
}

/// The nodes of a `DAK_SCYLLA_NODES` value (`host:port[,host:port…]`), if any.
pub fn scylla_nodes(list: &str) -> Option<Vec<String>> {
    let nodes: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Client authentication.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// HS256 secret for client JWTs. `dak up` generates and prints one when unset.
    #[arg(long, env = "DAK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A PEM public key file; with it, tokens are verified with `DAK_JWT_ALGORITHM`
    /// (RS256, ES256 or EdDSA) instead of the HS256 secret.
    #[arg(long, env = "DAK_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<std::path::PathBuf>,
    #[arg(long, env = "DAK_JWT_ALGORITHM", default_value = "RS256")]
    pub jwt_algorithm: String,
    /// An identity provider's JWKS URL; with it, tokens carrying a `kid` are
    /// verified with the key of that id it serves, instead of the HS256 secret.
    #[arg(long, env = "DAK_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// How old the fetched JWKS may grow before it is fetched again.
    #[arg(long, env = "DAK_JWT_JWKS_REFRESH", default_value = "1h", value_parser = humantime::parse_duration)]
    pub jwt_jwks_refresh: Duration,
    /// Least time between two JWKS fetches, also when tokens name unknown `kid`s.
    #[arg(long, env = "DAK_JWT_JWKS_MIN_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub jwt_jwks_min_interval: Duration,
    /// Accepted `aud` values, comma-separated; when set, a token must carry
    /// one of them. Unset: any `aud`, or none, is accepted.
    #[arg(long, env = "DAK_JWT_AUDIENCE", value_delimiter = ',')]
    pub jwt_audience: Vec<String>,
    /// Accepted `iss` values, comma-separated; when set, a token must carry
    /// one of them. Unset: any `iss`, or none, is accepted.
    #[arg(long, env = "DAK_JWT_ISSUER", value_delimiter = ',')]
    pub jwt_issuer: Vec<String>,
}

/// The internal API between session and the gateways.
#[derive(Debug, Clone, clap::Args)]
pub struct InternalArgs {
    /// Bearer token every `/internal/...` call must carry. `dak up` generates one
    /// when unset.
    #[arg(long, env = "DAK_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// Where a gateway serves `/internal/v1/send`; keep it off the public network.
    #[arg(long, env = "DAK_INTERNAL_ADDR", default_value = "127.0.0.1:8081")]
    pub internal_addr: SocketAddr,
    /// The URL session uses to reach this gateway's internal address, when it
    /// differs from `http://<DAK_INTERNAL_ADDR>` (a container or another host).
    #[arg(long, env = "DAK_INTERNAL_URL")]
    pub internal_url: Option<String>,
}

/// The public API address.
#[derive(Debug, Clone, clap::Args)]
pub struct PublicArgs {
    /// WebSocket and REST for clients.
    #[arg(long, env = "DAK_PUBLIC_ADDR", default_value = "127.0.0.1:8080")]
    pub public_addr: SocketAddr,
    /// How long a client may take to send a request's headers (also how long
    /// an idle keep-alive connection stays open); then the connection is
    /// closed. `0s`: no limit.
    #[arg(long, env = "DAK_HTTP_HEADER_TIMEOUT", default_value = "20s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// Most HTTP connections the public API serves at once (WebSockets stop
    /// counting once upgraded); further ones wait in the listen backlog.
    /// `0`: no limit.
    #[arg(long, env = "DAK_HTTP_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub http_max_connections: usize,
}

impl PublicArgs {
    pub fn connection_limits(&self) -> crate::http::ConnectionLimits {
        crate::http::ConnectionLimits {
            header_timeout: (!self.http_header_timeout.is_zero())
                .then_some(self.http_header_timeout),
            max_connections: (self.http_max_connections > 0).then_some(self.http_max_connections),
        }
    }
}

/// The delivery limits clients see.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Largest message body, bytes.
    #[arg(long, env = "DAK_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
    /// Largest WebSocket frame, bytes.
    #[arg(long, env = "DAK_MAX_FRAME_BYTES", default_value_t = 96 * 1024)]
    pub max_frame_bytes: usize,
    /// Most members of a group. The gateways refuse a larger member list at once;
    /// group-router refuses an add that would make the group larger.
    #[arg(long, env = "DAK_GROUP_MAX_MEMBERS", default_value_t = 1024)]
    pub group_max_members: usize,
    /// Most users a group notice names; a larger change names that many and
    /// says how many there were (`count`).
    #[arg(long, env = "DAK_GROUP_NOTICE_USERS", default_value_t = 64)]
    pub group_notice_users: usize,
}

impl LimitArgs {
    pub fn limits(&self) -> dak_wire::Limits {
        dak_wire::Limits {
            max_body_bytes: self.max_body_bytes,
            max_frame_bytes: self.max_frame_bytes,
            max_group_members: self.group_max_members,
        }
    }
}

/// A random secret for development use, URL-safe.
pub fn random_secret() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..40)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreArgs,
    }

    fn store(flags: &[&str]) -> StoreArgs {
        let mut argv = vec!["dak"];
        argv.extend_from_slice(flags);
        Cli::try_parse_from(argv).unwrap().store
    }

    #[test]
    fn scylla_nodes_may_be_ipv6_addresses() {
        assert_eq!(
            scylla_nodes("[::1]:9042, [fd00::2]:9042,"),
            Some(vec!["[::1]:9042".to_owned(), "[fd00::2]:9042".to_owned()])
        );
    }

    #[test]
    fn redis_settings_make_a_target() {
        assert!(store(&[]).redis_target().unwrap().is_none());
        let target = store(&[
            "--redis-url",
            "redis://10.0.0.1:7000, redis://[fd00::2]:7000",
            "--redis-cluster",
            "true",
            "--redis-password",
            "hunter2",
        ])
        .redis_target()
        .unwrap()
        .unwrap();
        assert!(target.cluster);
        assert_eq!(target.urls.len(), 2);
        assert_eq!(target.urls[1].0, "redis://[fd00::2]:7000");
        assert!(!format!("{target:?}").contains("hunter2"));
    }

    #[test]
    fn passwords_in_redis_urls_do_not_show_in_debug_output() {
        let args = store(&[
            "--redis-url",
            "rediss://dak:hunter2@redis.internal:6380/0,rediss://:swordfish@[fd00::3]:6380",
        ]);
        let shown = format!("{args:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("swordfish"), "{shown}");
        assert!(
            shown.contains("rediss://:[redacted]@[fd00::3]:6380"),
            "{shown}"
        );
        assert!(
            shown.contains("rediss://dak:[redacted]@redis.internal:6380/0"),
            "{shown}"
        );
    }

    #[test]
    fn bad_redis_settings_are_refused_with_the_setting_to_fix() {
        let ca = tempfile::NamedTempFile::new().unwrap();
        let ca = ca.path().to_str().unwrap();
        for (flags, says) in [
            (
                &["--redis-url", "redis://a:1,redis://b:1"][..],
                "set DAK_REDIS_CLUSTER=true",
            ),
            (
                &["--redis-ca-cert", ca],
                "DAK_REDIS_CA_CERT is set without DAK_REDIS_URL",
            ),
            (
                &["--redis-url", "redis://a:1", "--redis-ca-cert", ca],
                "need a rediss:// URL",
            ),
            (
                &["--redis-url", "rediss://a:1", "--redis-client-cert", ca],
                "needs both",
            ),
            (
                &[
                    "--redis-url",
                    "rediss://a:1",
                    "--redis-ca-cert",
                    "/nonexistent.pem",
                ],
                "/nonexistent.pem is not a file",
            ),
            (
                &["--redis-url", "http://a:1"],
                "is not a redis:// or rediss:// URL",
            ),
            (
                &[
                    "--redis-url",
                    "redis://a:1,rediss://b:1",
                    "--redis-cluster",
                    "true",
                ],
                "mixes",
            ),
        ] {
            let error = store(flags).redis_target().unwrap_err();
            assert!(error.contains(says), "{flags:?}: {error}");
        }
    }
}
