//! The event bus every service produces to and consumes from, on one of two
//! engines that keep the same contract (its suite is `tests/bus`):
//!
//! - [`kafka`]: a Kafka cluster through rdkafka, for the separate services.
//! - [`log`]: the embedded durable log in a SQLite file, for `dak up`.
//!
//! The contract: a produce is acknowledged only once it is durable; records
//! of one key keep their order (one partition per key); consumer groups get
//! ordered batches and commit after processing, so a consumer that dies
//! before it committed leaves its records to the next consumer of its group.
//! The services only see [`Bus`], [`Producer`], [`Consumer`] and [`Record`].

pub mod kafka;
pub mod log;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::shutdown::Shutdown;

pub use self::kafka::KafkaConfig;
pub use self::log::{Log, LogOptions};

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("embedded log: {0}")]
    Log(#[from] log::LogError),
}

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

    /// The name of a consumer group, namespaced by the topic prefix so that
    /// deployments (and test runs) sharing a cluster do not share offsets.
    pub fn group(&self, name: &str) -> String {
        let prefix = self.inbound.trim_end_matches("dak.inbound");
        format!("{prefix}{name}")
    }
}

/// A bus: where the records go, and the topic names. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    topics: Topics,
    engine: Engine,
}

#[derive(Clone)]
enum Engine {
    Kafka(Arc<KafkaConfig>),
    Log(Log),
}

impl Bus {
    pub fn kafka(config: KafkaConfig) -> Self {
        Self {
            topics: config.topics.clone(),
            engine: Engine::Kafka(Arc::new(config)),
        }
    }

    pub fn log(log: Log, topics: Topics) -> Self {
        Self {
            topics,
            engine: Engine::Log(log),
        }
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// What the bus is, for the start-up log line.
    pub fn describe(&self) -> String {
        match &self.engine {
            Engine::Kafka(config) => format!("kafka {}", config.brokers),
            Engine::Log(log) => format!("embedded log {}", log.path().display()),
        }
    }

    /// The embedded log, when the bus is one.
    pub fn embedded_log(&self) -> Option<&Log> {
        match &self.engine {
            Engine::Kafka(_) => None,
            Engine::Log(log) => Some(log),
        }
    }

    /// Creates the topics that do not exist yet.
    pub async fn create_topics(&self) -> Result<(), BusError> {
        match &self.engine {
            Engine::Kafka(config) => Ok(kafka::create_topics(config).await?),
            Engine::Log(log) => {
                let log = log.clone();
                let topics = self.topics.clone();
                tokio::task::spawn_blocking(move || log.create_topics(&topics.all()))
                    .await
                    .map_err(|_| log::LogError::Closed)??;
                Ok(())
            }
        }
    }

    pub fn producer(&self) -> Result<Producer, BusError> {
        Ok(match &self.engine {
            Engine::Kafka(config) => Producer::Kafka(kafka::KafkaProducer::new(config)?),
            Engine::Log(log) => Producer::Log(log.clone()),
        })
    }

    /// A member of consumer group `group` (already namespaced, see
    /// [`Topics::group`]) reading `topics`.
    pub fn consumer(&self, group: &str, topics: &[&str]) -> Result<Consumer, BusError> {
        let inner = match &self.engine {
            Engine::Kafka(config) => {
                ConsumerEngine::Kafka(kafka::KafkaConsumer::new(config, group, topics)?)
            }
            Engine::Log(log) => {
                ConsumerEngine::Log(tokio::sync::Mutex::new(log.consumer(group, topics)?))
            }
        };
        Ok(Consumer {
            inner,
            group: group.to_owned(),
        })
    }
}

/// Writes records to the bus. Cheap to clone.
#[derive(Clone)]
pub enum Producer {
    Kafka(kafka::KafkaProducer),
    Log(Log),
}

impl Producer {
    /// Queues a record now and returns a future for its acknowledgement.
    /// Records queued in order for one key land in that order.
    pub fn enqueue(
        &self,
        topic: &str,
        key: &str,
        payload: &[u8],
    ) -> Result<ProduceFuture, BusError> {
        Ok(ProduceFuture(match self {
            Producer::Kafka(producer) => {
                ProduceEngine::Kafka(producer.enqueue(topic, key, payload)?)
            }
            Producer::Log(log) => ProduceEngine::Log(log.append(topic, key.as_bytes(), payload)?),
        }))
    }

    /// Produces one record and waits until it is durable.
    pub async fn send(&self, topic: &str, key: &str, payload: &[u8]) -> Result<(), BusError> {
        self.enqueue(topic, key, payload)?.await
    }

    /// Readiness: the bus answers.
    pub async fn check(&self) -> Result<(), String> {
        match self {
            Producer::Kafka(producer) => producer.check().await,
            Producer::Log(_) => Ok(()),
        }
    }

    /// Waits (up to `timeout`) for queued records to be acknowledged, for a
    /// clean shutdown.
    pub async fn flush(&self, timeout: Duration) {
        match self {
            Producer::Kafka(producer) => producer.flush(timeout).await,
            Producer::Log(log) => {
                if tokio::time::timeout(timeout, log.flush()).await.is_err() {
                    tracing::warn!("embedded log flush incomplete");
                }
            }
        }
    }
}

/// The acknowledgement of one queued record: resolves once the record is
/// durable, or with the error that kept it from being so.
pub struct ProduceFuture(ProduceEngine);

enum ProduceEngine {
    Kafka(rdkafka::producer::DeliveryFuture),
    Log(tokio::sync::oneshot::Receiver<Result<i64, log::LogError>>),
}

impl Future for ProduceFuture {
    type Output = Result<(), BusError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            ProduceEngine::Kafka(future) => Pin::new(future).poll(cx).map(|result| match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e.into()),
                Err(_) => Err(rdkafka::error::KafkaError::Canceled.into()),
            }),
            ProduceEngine::Log(answer) => Pin::new(answer).poll(cx).map(|result| match result {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(log::LogError::Closed.into()),
            }),
        }
    }
}

/// Waits for every acknowledgement in `deliveries`; the first error wins.
pub async fn acknowledged_all(deliveries: Vec<ProduceFuture>) -> Result<(), BusError> {
    for result in futures_util::future::join_all(deliveries).await {
        result?;
    }
    Ok(())
}

/// A record taken off a topic, owned so it can be held across awaits.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
}

/// A consumer-group member that commits only what its handler finished.
pub struct Consumer {
    inner: ConsumerEngine,
    group: String,
}

enum ConsumerEngine {
    Kafka(kafka::KafkaConsumer),
    Log(tokio::sync::Mutex<log::LogConsumer>),
}

impl Consumer {
    /// Waits for the next records, up to `max`, in order within each
    /// partition. Returns `None` once `shutdown` fires.
    pub async fn next_batch(&self, max: usize, shutdown: &Shutdown) -> Option<Vec<Record>> {
        match &self.inner {
            ConsumerEngine::Kafka(consumer) => consumer.next_batch(max, shutdown).await,
            ConsumerEngine::Log(consumer) => loop {
                let mut consumer = consumer.lock().await;
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return None,
                    next = consumer.next_batch(max) => next,
                };
                match next {
                    Ok(batch) => return Some(batch),
                    Err(e) => {
                        tracing::warn!(group = %self.group, error = %e, "embedded log read failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => return None,
                            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        }
                    }
                }
            },
        }
    }

    /// Marks `records` finished: their offsets are committed (at once on the
    /// embedded log, with the next auto-commit on Kafka).
    pub async fn done(&self, records: &[Record]) {
        match &self.inner {
            ConsumerEngine::Kafka(consumer) => consumer.done(records),
            ConsumerEngine::Log(consumer) => consumer.lock().await.done(records),
        }
    }

    /// Runs `handle` on batches of up to `max` records until shutdown. A
    /// batch's offsets are committed only after `handle` succeeded; a failed
    /// batch is handed over again after a pause that doubles with each
    /// failure ([`batch_retry_delay`]), so handlers must be idempotent (they
    /// are keyed on mid and device), and a struggling broker or store is not
    /// hammered.
    pub async fn run<H, Fut>(&self, max: usize, shutdown: &Shutdown, mut handle: H)
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: Future<Output = Result<Vec<Record>, (Vec<Record>, anyhow::Error)>>,
    {
        while let Some(mut batch) = self.next_batch(max, shutdown).await {
            let mut failures = 0;
            loop {
                match handle(batch).await {
                    Ok(done) => {
                        self.done(&done).await;
                        break;
                    }
                    Err((again, e)) => {
                        failures += 1;
                        let delay = batch_retry_delay(failures);
                        tracing::warn!(group = %self.group, error = %format!("{e:#}"), failures, ?delay, "batch failed, retrying");
                        batch = again;
                        tokio::select! {
                            _ = shutdown.cancelled() => return self.commit().await,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
        self.commit().await;
    }

    /// Commits what was marked done, before leaving the group.
    pub async fn commit(&self) {
        match &self.inner {
            ConsumerEngine::Kafka(consumer) => consumer.commit().await,
            ConsumerEngine::Log(consumer) => consumer.lock().await.commit().await,
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

    #[test]
    fn groups_are_namespaced_by_the_topic_prefix() {
        assert_eq!(
            Topics::with_prefix("staging.").group("dak.session"),
            "staging.dak.session"
        );
        assert_eq!(Topics::with_prefix("").group("dak.session"), "dak.session");
    }
}
