//! The bus on a Kafka cluster, through rdkafka: start-up topic creation, the
//! idempotent producer (`acks=all`), and at-least-once consumers. Every
//! client also gets the TLS, SASL and pass-through properties
//! `client_properties` resolves from the settings.
//!
//! Consumers use librdkafka's auto-commit of *stored* offsets: a handler
//! stores a record's offset only after it finished with it, so a crash replays
//! what was not finished and never skips it (DESIGN §6).

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, StreamConsumer};
pub use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::producer::{
    DeliveryFuture, DeliveryResult, FutureProducer, FutureRecord, Producer as _, ProducerContext,
    ThreadedProducer,
};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;

mod client_properties;

use self::client_properties::Property;
use super::{Record, Topics};
use crate::config::{KafkaArgs, SecurityProtocol};
use crate::process::ConfigError;
use crate::shutdown::Shutdown;

/// Resolved Kafka settings: bootstrap servers, topics, and what every client
/// gets besides (security, pass-through properties).
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topics: Topics,
    pub partitions: i32,
    pub replication: i32,
    pub linger_ms: u32,
    pub fetch_wait_ms: u32,
    pub session_timeout_ms: u32,
    pub security_protocol: SecurityProtocol,
    client_properties: Vec<Property>,
}

impl KafkaConfig {
    /// Settings for a Kafka cluster: what `args` sets, or the defaults.
    /// Refuses a bad combination of security settings, and properties
    /// librdkafka does not know or takes no such value for.
    pub fn new(brokers: String, args: &KafkaArgs) -> Result<Self, ConfigError> {
        let client_properties = client_properties::resolve(args).map_err(ConfigError)?;
        let config = Self {
            brokers,
            topics: Topics::with_prefix(&args.topic_prefix),
            partitions: args.partitions.unwrap_or(12),
            replication: args.replication,
            linger_ms: args.linger_ms.unwrap_or(1),
            fetch_wait_ms: args.fetch_wait_ms.unwrap_or(100),
            session_timeout_ms: args.session_timeout_ms,
            security_protocol: args.security_protocol,
            client_properties,
        };
        // librdkafka checks every name and value when it builds its
        // configuration, without connecting anywhere.
        if let Err(e) = config
            .finish(&mut config.client_config())
            .create_native_config()
        {
            return Err(ConfigError(match e {
                // The value is left out: it may be a password.
                KafkaError::ClientConfig(_, description, key, _) => {
                    format!("kafka property {key}: {description}")
                }
                e => format!("kafka settings: {e}"),
            }));
        }
        Ok(config)
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            // A record written right after another would otherwise wait for
            // the broker's delayed ACK.
            .set("socket.nagle.disable", "true")
            .set("log_level", "4");
        config
    }

    /// Adds the resolved properties to a client's own, last, so that the
    /// pass-through can change what dak chose (not what it refuses).
    fn finish<'c>(&self, client: &'c mut ClientConfig) -> &'c mut ClientConfig {
        for property in &self.client_properties {
            client.set(&property.key, &property.value);
        }
        client
    }
}

/// How long start-up waits for the cluster to let a client in: about as long
/// as an admin request waits for a broker.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);

/// Waits until the cluster answers a client with these settings. An admin
/// client never reads the queue where librdkafka reports a refused login (a
/// wrong password, a certificate no trusted CA signed), so topic creation
/// alone would time out after a minute without saying why; a producer reads
/// it, and a refusal ends the wait at once with librdkafka's reason.
pub async fn join(config: &KafkaConfig) -> Result<(), ClusterRefused> {
    let probe: ThreadedProducer<LastError> = config
        .finish(&mut config.client_config())
        .create_with_context(LastError::default())
        .map_err(|e| ClusterRefused(e.to_string()))?;
    let probe = Arc::new(probe);
    let deadline = tokio::time::Instant::now() + JOIN_PATIENCE;
    loop {
        let asking = probe.clone();
        let answered = tokio::task::spawn_blocking(move || {
            asking
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
        })
        .await
        .map_err(|e| ClusterRefused(e.to_string()))?;
        let Err(e) = answered else {
            return Ok(());
        };
        let (refused, last) = probe.context().seen();
        if let Some(reason) = refused {
            return Err(ClusterRefused(reason));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ClusterRefused(last.unwrap_or_else(|| e.to_string())));
        }
    }
}

/// The cluster did not let a client in, with librdkafka's last word on why.
#[derive(Debug, thiserror::Error)]
#[error("no answer from the Kafka cluster: {0}")]
pub struct ClusterRefused(pub String);

/// A client context that keeps what librdkafka reported: the first refusal
/// (a failed login or TLS handshake), which later errors such as "all
/// brokers are down" must not hide, and the last error.
#[derive(Default)]
struct LastError(std::sync::Mutex<(Option<String>, Option<String>)>);

impl LastError {
    /// The first refusal and the last error.
    fn seen(&self) -> (Option<String>, Option<String>) {
        self.0.lock().expect("last error lock").clone()
    }
}

impl ClientContext for LastError {
    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
        let code = error.rdkafka_error_code();
        let refused = matches!(
            code,
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SSL)
        );
        let mut seen = self.0.lock().expect("last error lock");
        if refused && seen.0.is_none() {
            seen.0 = Some(reason.to_owned());
        }
        // "n/m brokers are down" follows the error that says why.
        if code != Some(RDKafkaErrorCode::AllBrokersDown) {
            seen.1 = Some(reason.to_owned());
        }
    }
}

impl ProducerContext for LastError {
    type DeliveryOpaque = ();

    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// Creates the topics that do not exist yet, through the admin API.
pub async fn create_topics(config: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> =
        config.finish(&mut config.client_config()).create()?;
    let topics: Vec<NewTopic> = config
        .topics
        .all()
        .into_iter()
        .map(|name| {
            NewTopic::new(
                name,
                config.partitions,
                TopicReplication::Fixed(config.replication),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code))
                    .inspect_err(|_| tracing::error!(%topic, "creating topic"));
            }
        }
    }
    Ok(())
}

/// The idempotent producer every service writes with. Cheap to clone.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer,
}

impl KafkaProducer {
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let mut client = config.client_config();
        client
            // Idempotence keeps a key's records in order across retries. It does
            // not set enable.gapless.guarantee, which turns a batch that timed
            // out into a fatal error that stops the producer for good: a record
            // that failed was answered `unavailable`, never `accepted`, and the
            // client's resend takes a later place, so the order of accepted
            // messages holds without it (architecture.md, Kafka).
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "30000");
        let inner = config.finish(&mut client).create()?;
        Ok(Self { inner })
    }

    pub fn enqueue(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<DeliveryFuture, KafkaError> {
        self.inner
            .send_result(FutureRecord::to(topic).key(key).payload(payload))
            .map_err(|(e, _)| e)
    }

    /// Readiness: the cluster answers a metadata request.
    pub async fn check(&self) -> Result<(), String> {
        if let Some((code, reason)) = self.inner.client().fatal_error() {
            return Err(format!(
                "the producer stopped on a fatal error: {code}: {reason}"
            ));
        }
        let producer = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Waits for queued records to be acknowledged, for a clean shutdown.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.inner.clone();
        let flushed = tokio::task::spawn_blocking(move || producer.flush(Timeout::After(timeout)));
        match flushed.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "producer flush incomplete"),
            Err(e) => tracing::warn!(error = %e, "producer flush task failed"),
        }
    }
}

/// Reports consumer lag from librdkafka's statistics as `dak_consumer_lag`.
struct LagReporter {
    group: String,
}

impl ClientContext for LagReporter {
    fn stats(&self, statistics: Statistics) {
        for (name, topic) in &statistics.topics {
            // Lag behind what handlers finished (stored offsets), where known.
            let lag: i64 = topic
                .partitions
                .values()
                .filter(|p| p.partition >= 0 && p.desired)
                .map(|p| {
                    if p.consumer_lag_stored >= 0 {
                        p.consumer_lag_stored
                    } else {
                        p.consumer_lag.max(0)
                    }
                })
                .sum();
            ::metrics::gauge!(crate::metrics::CONSUMER_LAG, "group" => self.group.clone(), "topic" => name.clone())
                .set(lag as f64);
        }
    }
}

impl ConsumerContext for LagReporter {}

/// How often a consumer commits the offsets its handlers stored. Another
/// service may wait for a group's commits: push sends a notification once
/// persistence's group committed past the message (`GroupProgress`), so this
/// is most of how long a push waits on Kafka. It also bounds what a crashed
/// consumer hands its successor again. librdkafka's default is 5 s; a commit
/// goes out only when an offset moved, so an idle consumer sends none.
const AUTO_COMMIT_MS: u64 = 250;

/// A consumer-group member that stores offsets only when told to.
pub struct KafkaConsumer {
    inner: Arc<StreamConsumer<LagReporter>>,
    group: String,
}

impl KafkaConsumer {
    pub fn new(config: &KafkaConfig, group: &str, topics: &[&str]) -> Result<Self, KafkaError> {
        let mut client = config.client_config();
        client
            .set("group.id", group)
            .set("statistics.interval.ms", "5000")
            .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string())
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", AUTO_COMMIT_MS.to_string())
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "cooperative-sticky");
        let inner: StreamConsumer<LagReporter> =
            config
                .finish(&mut client)
                .create_with_context(LagReporter {
                    group: group.to_owned(),
                })?;
        inner.subscribe(topics)?;
        Ok(Self {
            inner: Arc::new(inner),
            group: group.to_owned(),
        })
    }

    /// Waits for the next record, then takes whatever else is already
    /// buffered, up to `max`. Returns `None` once `shutdown` fires.
    pub async fn next_batch(&self, max: usize, shutdown: &Shutdown) -> Option<Vec<Record>> {
        let first = loop {
            let received = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                received = self.inner.recv() => received.map(|m| record(&m)),
            };
            match received {
                Ok(record) => break record,
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        let mut batch = vec![first];
        while batch.len() < max {
            match self.inner.recv().now_or_never() {
                Some(Ok(m)) => batch.push(record(&m)),
                _ => break,
            }
        }
        Some(batch)
    }

    /// Stores the offsets of `records`: they are committed with the next
    /// auto-commit.
    pub fn done(&self, records: &[Record]) {
        for r in records {
            if let Err(e) = self.inner.store_offset(&r.topic, r.partition, r.offset) {
                tracing::warn!(group = %self.group, error = %e, "storing offset");
            }
        }
    }

    /// Commits what was stored, before leaving the group. librdkafka's commit
    /// blocks, so it runs off the async workers.
    pub async fn commit(&self) {
        let inner = self.inner.clone();
        let group = self.group.clone();
        let committed =
            tokio::task::spawn_blocking(move || inner.commit_consumer_state(CommitMode::Sync));
        match committed.await {
            Ok(Ok(())) | Ok(Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset))) => {}
            Ok(Err(e)) => tracing::warn!(%group, error = %e, "final commit"),
            Err(e) => tracing::warn!(%group, error = %e, "final commit task failed"),
        }
    }
}

/// Reads what another service's consumer group committed, without joining
/// the group: librdkafka's `committed` asks the group's coordinator.
pub struct KafkaProgress {
    inner: Arc<BaseConsumer>,
}

/// How long one read of a group's offsets waits for the coordinator.
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(10);

impl KafkaProgress {
    pub fn new(config: &KafkaConfig, group: &str) -> Result<Self, KafkaError> {
        let mut client = config.client_config();
        client
            .set("group.id", group)
            .set("enable.auto.commit", "false");
        let inner: BaseConsumer = config.finish(&mut client).create()?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The group's committed offset (the next it will read) of each of
    /// `partitions` of `topic`; `None` where it committed nothing. The
    /// request blocks, so it runs off the async workers.
    pub async fn committed(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<Vec<Option<i64>>, KafkaError> {
        let mut asked = TopicPartitionList::new();
        for &partition in partitions {
            asked.add_partition(topic, partition);
        }
        let inner = self.inner.clone();
        let answer = tokio::task::spawn_blocking(move || {
            inner.committed_offsets(asked, Timeout::After(PROGRESS_TIMEOUT))
        })
        .await
        .map_err(|_| KafkaError::Canceled)??;
        Ok(partitions
            .iter()
            .map(|&partition| match answer.find_partition(topic, partition) {
                Some(entry) => match entry.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                },
                None => None,
            })
            .collect())
    }
}

fn record(m: &BorrowedMessage<'_>) -> Record {
    Record {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().unwrap_or_default().to_vec(),
        payload: m.payload().unwrap_or_default().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_with(properties: &str) -> KafkaArgs {
        KafkaArgs {
            properties: Some(crate::config::Secret::new(properties)),
            ..KafkaArgs::default()
        }
    }

    #[test]
    fn properties_librdkafka_does_not_take_stop_the_start() {
        let error = KafkaConfig::new("127.0.0.1:9092".into(), &args_with("no.such.property=1"))
            .unwrap_err();
        assert!(
            error.0.contains("kafka property no.such.property"),
            "{error}"
        );
        let error = KafkaConfig::new(
            "127.0.0.1:9092".into(),
            &args_with("socket.keepalive.enable=perhaps"),
        )
        .unwrap_err();
        assert!(error.0.contains("socket.keepalive.enable"), "{error}");
        KafkaConfig::new(
            "127.0.0.1:9092".into(),
            &args_with("socket.keepalive.enable=true,client.id=dak"),
        )
        .unwrap();
    }

    /// librdkafka refuses `ssl` and `sasl_ssl` when it was built without
    /// OpenSSL; this fails if the `ssl` feature goes missing.
    #[test]
    fn tls_and_sasl_are_built_in() {
        let args = KafkaArgs {
            security_protocol: SecurityProtocol::SaslSsl,
            sasl_mechanism: Some(crate::config::SaslMechanism::ScramSha256),
            sasl_username: Some("dak".into()),
            sasl_password: Some(crate::config::Secret::new("secret")),
            ..KafkaArgs::default()
        };
        let config = KafkaConfig::new("127.0.0.1:9092".into(), &args).unwrap();
        KafkaProducer::new(&config).unwrap();
    }

    /// An IPv6 bootstrap server in brackets is dialled: a listener on [::1]
    /// sees the client connect (nothing answers it, the test needs no broker).
    #[tokio::test]
    async fn ipv6_brokers_are_dialled() {
        let listener = tokio::net::TcpListener::bind("[::1]:0")
            .await
            .expect("an IPv6 loopback address");
        let brokers = format!("[::1]:{}", listener.local_addr().unwrap().port());
        let config = KafkaConfig::new(brokers, &KafkaArgs::default()).unwrap();
        let producer = KafkaProducer::new(&config).unwrap();
        let asking = tokio::spawn(async move { producer.check().await });
        let (_socket, peer) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("the client connected within 10 s")
            .unwrap();
        assert!(peer.is_ipv6(), "{peer}");
        asking.abort();
    }
}
