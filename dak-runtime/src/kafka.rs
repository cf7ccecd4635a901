//! Kafka through rdkafka: topic names, start-up topic creation, the idempotent
//! producer (`acks=all`), at-least-once consumers, and the embedded mock cluster.
//!
//! Consumers use librdkafka's auto-commit of *stored* offsets: a handler stores a
//! message's offset only after it finished with it, so a crash replays what was
//! not finished and never skips it (DESIGN §6).

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use futures_util::FutureExt;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
pub use rdkafka::error::KafkaError;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Message as _};
pub use rdkafka::producer::DeliveryFuture;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;

use crate::config::KafkaArgs;
use crate::shutdown::Shutdown;

/// The topics of DESIGN §6, with the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub inbound: String,
    pub group: String,
    pub deliver: String,
    pub offline: String,
    pub status: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            inbound: format!("{prefix}dak.inbound"),
            group: format!("{prefix}dak.group"),
            deliver: format!("{prefix}dak.deliver"),
            offline: format!("{prefix}dak.offline"),
            status: format!("{prefix}dak.status"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [
            &self.inbound,
            &self.group,
            &self.deliver,
            &self.offline,
            &self.status,
        ]
    }
}

/// Resolved Kafka settings: bootstrap servers and topics.
#[derive(Debug, Clone)]
pub struct KafkaConfig {
    pub brokers: String,
    pub topics: Topics,
    pub partitions: i32,
    pub replication: i32,
    pub linger_ms: u32,
    pub fetch_wait_ms: u32,
    pub session_timeout_ms: u32,
}

impl KafkaConfig {
    /// Settings for a Kafka cluster: what `args` sets, or the defaults.
    pub fn new(brokers: String, args: &KafkaArgs) -> Self {
        Self {
            brokers,
            topics: Topics::with_prefix(&args.topic_prefix),
            partitions: args.partitions.unwrap_or(12),
            replication: args.replication,
            linger_ms: args.linger_ms.unwrap_or(1),
            fetch_wait_ms: args.fetch_wait_ms.unwrap_or(10),
            session_timeout_ms: args.session_timeout_ms,
        }
    }

    /// Settings for the embedded mock cluster, which lives in the one process
    /// that uses it: one partition per topic (consumers there fetch every
    /// partition in one loop anyway, and each partition costs the mock a
    /// search per fetch), and short fetch waits, since the mock does not
    /// answer a waiting fetch when records arrive.
    pub fn embedded(brokers: String, args: &KafkaArgs) -> Self {
        Self {
            partitions: args.partitions.unwrap_or(1),
            fetch_wait_ms: args.fetch_wait_ms.unwrap_or(2),
            ..Self::new(brokers, args)
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("broker.address.family", "v4")
            .set("log_level", "4");
        config
    }
}

/// Creates the topics that do not exist yet, through the admin API.
pub async fn create_topics(config: &KafkaConfig) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = config.client_config().create()?;
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
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(config: &KafkaConfig) -> Result<Self, KafkaError> {
        let inner = config
            .client_config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger_ms.to_string())
            .set("queue.buffering.max.messages", "1000000")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(Self { inner })
    }

    /// Queues a record now and returns a future for the broker's acknowledgement.
    /// Records queued in order for one key land in that order.
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

    /// Produces one record and waits until the broker acknowledged it.
    pub async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), KafkaError> {
        acknowledged(self.enqueue(topic, key, payload)?).await
    }

    /// Readiness: the cluster answers a metadata request.
    pub async fn check(&self) -> Result<(), String> {
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
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.inner.flush(Timeout::After(timeout)) {
            tracing::warn!(error = %e, "producer flush incomplete");
        }
    }
}

/// Waits for the broker's acknowledgement of one queued record.
pub async fn acknowledged(delivery: DeliveryFuture) -> Result<(), KafkaError> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
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

/// A consumer-group member that stores offsets only when told to.
pub struct EventConsumer {
    inner: StreamConsumer<LagReporter>,
    group: String,
}

impl EventConsumer {
    pub fn new(config: &KafkaConfig, group: &str, topics: &[&str]) -> Result<Self, KafkaError> {
        let inner: StreamConsumer<LagReporter> = config
            .client_config()
            .set("group.id", group)
            .set("statistics.interval.ms", "5000")
            .set("fetch.wait.max.ms", config.fetch_wait_ms.to_string())
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", config.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .create_with_context(LagReporter {
                group: group.to_owned(),
            })?;
        inner.subscribe(topics)?;
        Ok(Self {
            inner,
            group: group.to_owned(),
        })
    }

    /// Waits for the next record, then takes whatever else is already buffered,
    /// up to `max`. Returns `None` once `shutdown` fires.
    pub async fn next_batch(&self, max: usize, shutdown: &Shutdown) -> Option<Vec<Record>> {
        let first = loop {
            let received = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                received = self.inner.recv() => received.map(|m| Record::from(&m)),
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
                Some(Ok(m)) => batch.push(Record::from(&m)),
                _ => break,
            }
        }
        Some(batch)
    }

    /// Marks `records` finished: their offsets are committed with the next
    /// auto-commit. Records are in partition order, so the last one of each
    /// partition carries its offset.
    pub fn done(&self, records: &[Record]) {
        for r in records {
            if let Err(e) = self.inner.store_offset(&r.topic, r.partition, r.offset) {
                tracing::warn!(group = %self.group, error = %e, "storing offset");
            }
        }
    }

    /// Runs `handle` on batches of up to `max` records until shutdown. A batch's
    /// offsets are stored only after `handle` succeeded; a failed batch is handed
    /// over again after a pause that doubles with each failure (see
    /// [`batch_retry_delay`]), so handlers must be idempotent (they are keyed on
    /// mid and device), and a struggling broker or store is not hammered.
    pub async fn run<H, Fut>(&self, max: usize, shutdown: &Shutdown, mut handle: H)
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<Record>, (Vec<Record>, anyhow::Error)>>,
    {
        while let Some(mut batch) = self.next_batch(max, shutdown).await {
            let mut failures = 0;
            loop {
                match handle(batch).await {
                    Ok(done) => {
                        self.done(&done);
                        break;
                    }
                    Err((again, e)) => {
                        failures += 1;
                        let delay = batch_retry_delay(failures);
                        tracing::warn!(group = %self.group, error = %format!("{e:#}"), failures, ?delay, "batch failed, retrying");
                        batch = again;
                        tokio::select! {
                            _ = shutdown.cancelled() => return self.commit(),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
        self.commit();
    }

    /// Commits what was stored, before leaving the group.
    pub fn commit(&self) {
        match self.inner.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(group = %self.group, error = %e, "final commit"),
        }
    }
}

/// How long a consumer waits before it hands a failed batch over again, after
/// `failures` failures in a row: 250 ms, doubling, at most 30 s.
pub fn batch_retry_delay(failures: u32) -> Duration {
    const FIRST: Duration = Duration::from_millis(250);
    const MOST: Duration = Duration::from_secs(30);
    FIRST
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(MOST)
}

/// A record taken off a topic, owned so it can be held across awaits.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
}

impl From<&BorrowedMessage<'_>> for Record {
    fn from(m: &BorrowedMessage<'_>) -> Self {
        Self {
            topic: m.topic().to_owned(),
            partition: m.partition(),
            offset: m.offset(),
            payload: m.payload().unwrap_or_default().to_vec(),
        }
    }
}

/// librdkafka's in-process mock cluster, the event bus of `dak up` and of the fast
/// tests. `MockCluster` must stay on the thread that made it, so it lives on a
/// thread of its own that takes topic-creation requests and ends when this value
/// is dropped.
pub struct EmbeddedKafka {
    brokers: String,
    commands: std_mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Command {
    CreateTopics {
        names: Vec<String>,
        partitions: i32,
        reply: std_mpsc::Sender<Result<(), KafkaError>>,
    },
}

impl EmbeddedKafka {
    pub fn start() -> Result<Self, KafkaError> {
        let (commands, receiver) = std_mpsc::channel::<Command>();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("kafka-mock".into())
            .spawn(move || {
                let cluster = match rdkafka::mocking::MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                // Ends when every sender is gone, i.e. when EmbeddedKafka drops.
                for command in receiver {
                    match command {
                        Command::CreateTopics {
                            names,
                            partitions,
                            reply,
                        } => {
                            let result = names
                                .iter()
                                .try_for_each(|name| cluster.create_topic(name, partitions, 1));
                            let _ = reply.send(result);
                        }
                    }
                }
            })
            .expect("spawning the mock cluster thread");
        let brokers = ready_rx.recv().map_err(|_| KafkaError::Canceled)??;
        Ok(Self {
            brokers,
            commands,
            thread: Some(thread),
        })
    }

    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    pub fn create_topics(&self, topics: &Topics, partitions: i32) -> Result<(), KafkaError> {
        let (reply, answer) = std_mpsc::channel();
        self.commands
            .send(Command::CreateTopics {
                names: topics.all().iter().map(|t| t.to_string()).collect(),
                partitions,
                reply,
            })
            .map_err(|_| KafkaError::Canceled)?;
        answer.recv().map_err(|_| KafkaError::Canceled)?
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop; the cluster drops there.
        let (closed, _) = std_mpsc::channel();
        self.commands = closed;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_batch_waits_longer_each_time_up_to_a_bound() {
        let delays: Vec<u64> = (1..=10)
            .map(|n| batch_retry_delay(n).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(batch_retry_delay(u32::MAX), Duration::from_secs(30));
    }
}
