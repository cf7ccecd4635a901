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
    Kafka(rdkafka::error::KafkaError),
    #[error(transparent)]
    KafkaRefused(#[from] kafka::ClusterRefused),
    #[error("embedded log: {0}")]
    Log(log::LogError),
    /// A report kept in the process instead of produced (message status in
    /// `dak up`, see [`crate::status::in_process`]) was not kept.
    #[error("status store: {0}")]
    Status(String),
}

crate::from_cause!(
    rdkafka::error::KafkaError => BusError::Kafka,
    log::LogError => BusError::Log,
);

/// The topics of DESIGN §6, with the configured prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub inbound: String,
    pub group: String,
    pub deliver: String,
    pub offline: String,
    pub status: String,
    /// Records a consumer could not handle, parked for people to look at.
    pub dead_letter: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Self {
            inbound: format!("{prefix}dak.inbound"),
            group: format!("{prefix}dak.group"),
            deliver: format!("{prefix}dak.deliver"),
            offline: format!("{prefix}dak.offline"),
            status: format!("{prefix}dak.status"),
            dead_letter: format!("{prefix}dak.dead-letter"),
        }
    }

    pub fn all(&self) -> [&str; 6] {
        [
            &self.inbound,
            &self.group,
            &self.deliver,
            &self.offline,
            &self.status,
            &self.dead_letter,
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

    /// For tests of one service: an embedded log in `dir` (file `bus.db`),
    /// two partitions a topic, unprefixed topic names, every topic created.
    pub async fn embedded_for_tests(dir: &std::path::Path) -> Self {
        let log = Log::open(
            &dir.join("bus.db"),
            LogOptions {
                partitions: 2,
                ..LogOptions::default()
            },
        )
        .expect("opening the test's embedded log");
        let bus = Self::log(log, Topics::with_prefix(""));
        bus.create_topics()
            .await
            .expect("creating the test's topics");
        bus
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// What the bus is, for the start-up log line.
    pub fn describe(&self) -> String {
        match &self.engine {
            Engine::Kafka(config) => format!(
                "kafka {} ({})",
                config.brokers,
                config.security_protocol.as_str()
            ),
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
            Engine::Kafka(config) => {
                kafka::join(config).await?;
                Ok(kafka::create_topics(config).await?)
            }
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
        // At zero from the start, so that the dead-letter alert sees the first.
        for topic in topics {
            ::metrics::counter!(crate::metrics::DEAD_LETTERS, "topic" => topic.to_string(), "group" => group.to_owned())
                .increment(0);
        }
        Ok(Consumer {
            inner,
            group: group.to_owned(),
            dead_letters: DeadLetters {
                producer: None,
                topic: self.topics.dead_letter.clone(),
                group: group.to_owned(),
            },
        })
    }
}

impl Bus {
    /// Watches what consumer group `group` (already namespaced) finished of
    /// `topic`, for a service that must act on a record only after another
    /// service handled it.
    pub fn progress(&self, group: &str, topic: &str) -> Result<GroupProgress, BusError> {
        let inner = match &self.engine {
            Engine::Kafka(config) => {
                ProgressEngine::Kafka(kafka::KafkaProgress::new(config, group)?)
            }
            Engine::Log(log) => ProgressEngine::Log(log::LogProgress::new(log, group)?),
        };
        Ok(GroupProgress {
            inner,
            topic: topic.to_owned(),
        })
    }
}

/// What one consumer group finished of one topic (see [`Bus::progress`]).
pub struct GroupProgress {
    inner: ProgressEngine,
    topic: String,
}

enum ProgressEngine {
    Kafka(kafka::KafkaProgress),
    Log(log::LogProgress),
}

/// The first pause of [`GroupProgress::wait_past`] between two reads of the
/// group's offsets; it doubles up to [`PROGRESS_POLL_MAX`]. A Kafka consumer
/// commits every 250 ms, so a longer pause would add most of itself to the
/// wait; a read is one small request, made only while something waits.
const PROGRESS_POLL_FIRST: Duration = Duration::from_millis(5);
const PROGRESS_POLL_MAX: Duration = Duration::from_millis(50);

impl GroupProgress {
    /// The group's committed offset (the next it will read) of each of
    /// `partitions`; `None` where it committed nothing.
    pub async fn committed(&self, partitions: &[i32]) -> Result<Vec<Option<i64>>, BusError> {
        Ok(match &self.inner {
            ProgressEngine::Kafka(progress) => progress.committed(&self.topic, partitions).await?,
            ProgressEngine::Log(progress) => progress.committed(&self.topic, partitions).await?,
        })
    }

    /// Waits until the group has finished every record of `records` (of
    /// this topic), reading its offsets now and then, for at most `limit`.
    /// Whether it had; a failed read counts as not yet.
    pub async fn wait_past(&self, records: &[Record], limit: Duration) -> bool {
        let marks = last_offsets(records.iter().filter(|r| r.topic == self.topic));
        self.wait_past_marks(marks, limit).await
    }

    /// Whether the group has finished every record before `records` (of
    /// this topic) in their partitions: whether it has caught up with them.
    /// One read; a failed read counts as not.
    pub async fn finished_before(&self, records: &[Record]) -> bool {
        let marks = first_offsets(records.iter().filter(|r| r.topic == self.topic))
            .into_iter()
            .map(|(partition, first)| (partition, first - 1))
            .collect();
        self.wait_past_marks(marks, Duration::ZERO).await
    }

    async fn wait_past_marks(&self, marks: Vec<(i32, i64)>, limit: Duration) -> bool {
        if marks.is_empty() {
            return true;
        }
        let partitions: Vec<i32> = marks.iter().map(|&(partition, _)| partition).collect();
        let deadline = tokio::time::Instant::now() + limit;
        let mut pause = PROGRESS_POLL_FIRST;
        loop {
            match self.committed(&partitions).await {
                Ok(committed) if past(&marks, &committed) => return true,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(topic = %self.topic, error = %e, "reading a group's offsets")
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(PROGRESS_POLL_MAX);
        }
    }
}

/// The highest offset of each partition among `records`, by partition.
fn last_offsets<'r>(records: impl Iterator<Item = &'r Record>) -> Vec<(i32, i64)> {
    offsets_by_partition(records, i64::max)
}

/// The lowest offset of each partition among `records`, by partition.
fn first_offsets<'r>(records: impl Iterator<Item = &'r Record>) -> Vec<(i32, i64)> {
    offsets_by_partition(records, i64::min)
}

fn offsets_by_partition<'r>(
    records: impl Iterator<Item = &'r Record>,
    keep: fn(i64, i64) -> i64,
) -> Vec<(i32, i64)> {
    let mut marks: Vec<(i32, i64)> = Vec::new();
    for record in records {
        match marks.iter_mut().find(|(p, _)| *p == record.partition) {
            Some((_, offset)) => *offset = keep(*offset, record.offset),
            None => marks.push((record.partition, record.offset)),
        }
    }
    marks.sort_unstable();
    marks
}

/// Whether committed offsets (the next to read, per mark's partition) are
/// past each mark's offset.
fn past(marks: &[(i32, i64)], committed: &[Option<i64>]) -> bool {
    marks
        .iter()
        .zip(committed)
        .all(|(&(_, offset), committed)| committed.is_some_and(|next| next > offset))
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
            Producer::Log(log) => log.writer_answers().await.map_err(|e| e.to_string()),
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
    /// A report handed to a task of this process instead of the bus.
    InProcess(tokio::sync::oneshot::Receiver<Result<(), String>>),
}

impl ProduceFuture {
    /// The acknowledgement of a report a task of this process keeps instead
    /// of the bus: `answer` gets whether it was kept; a task that dropped it
    /// unanswered counts as an error.
    pub fn in_process(answer: tokio::sync::oneshot::Receiver<Result<(), String>>) -> Self {
        Self(ProduceEngine::InProcess(answer))
    }
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
            ProduceEngine::InProcess(answer) => {
                Pin::new(answer).poll(cx).map(|result| match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(BusError::Status(e)),
                    Err(_) => Err(BusError::Status("its task has stopped".into())),
                })
            }
        }
    }
}

/// Produces many records while at most `max_bytes` of them wait for their
/// acknowledgement: a large fan-out waits for the bus to catch up instead of
/// filling the producer's queue and failing. A queue found full (other records
/// of the process fill it too) is waited out the same way, once.
pub struct Bounded<'a> {
    producer: &'a Producer,
    acks: Vec<ProduceFuture>,
    bytes: usize,
    max_bytes: usize,
}

impl<'a> Bounded<'a> {
    pub fn new(producer: &'a Producer, max_bytes: usize) -> Self {
        Self {
            producer,
            acks: Vec::new(),
            bytes: 0,
            max_bytes,
        }
    }

    /// Queues one record, first waiting for what is outstanding when this
    /// record would pass the bound.
    pub async fn send(&mut self, topic: &str, key: &str, payload: &[u8]) -> Result<(), BusError> {
        if self.bytes + payload.len() > self.max_bytes {
            self.wait().await?;
        }
        let ack = match self.producer.enqueue(topic, key, payload) {
            Err(e) if e.is_queue_full() && !self.acks.is_empty() => {
                self.wait().await?;
                self.producer.enqueue(topic, key, payload)?
            }
            ack => ack?,
        };
        self.acks.push(ack);
        self.bytes += payload.len();
        Ok(())
    }

    /// Waits for every record queued so far.
    pub async fn wait(&mut self) -> Result<(), BusError> {
        self.bytes = 0;
        acknowledged_all(std::mem::take(&mut self.acks)).await
    }
}

impl BusError {
    /// The producer's queue is full: waiting for acknowledgements makes room.
    pub fn is_queue_full(&self) -> bool {
        matches!(
            self,
            BusError::Kafka(rdkafka::error::KafkaError::MessageProduction(
                rdkafka::types::RDKafkaErrorCode::QueueFull
            ))
        )
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
    dead_letters: DeadLetters,
}

/// Failures in a row after which [`Consumer::run`] handles a batch's records
/// one by one, to find the one that cannot be handled.
const ISOLATE_AFTER: u32 = 5;

/// Attempts at one record on its own before it counts as failing.
const ISOLATED_ATTEMPTS: u32 = 3;

/// How long a record must keep failing, while a record after it went through,
/// before it is parked: a store that times out now and then (a loaded CQL
/// node) fails single records for seconds, and must not get them parked.
const POISON_AFTER: Duration = Duration::from_secs(30);

/// Where a consumer parks records it cannot handle: a record that is not a
/// valid event (malformed, or of a version this build does not know), or one
/// whose handler keeps failing while the records around it go through. Each is
/// counted, logged with where it came from, and written to the dead-letter
/// topic in an envelope that says why (see docs/operations.md), so nothing is
/// dropped silently and one bad record does not block its partition.
#[derive(Clone)]
pub struct DeadLetters {
    producer: Option<Producer>,
    topic: String,
    group: String,
}

/// The dead-letter topic's record: the original, and why it was parked.
#[derive(serde::Serialize)]
struct Parked<'a> {
    v: u32,
    group: &'a str,
    topic: &'a str,
    partition: i32,
    offset: i64,
    reason: &'a str,
    /// The original payload, as text when it is UTF-8 (events are JSON).
    payload: std::borrow::Cow<'a, str>,
}

impl DeadLetters {
    /// Parks `record`, waiting until the dead-letter topic has it.
    pub async fn park(&self, record: &Record, reason: &str) -> Result<(), BusError> {
        ::metrics::counter!(crate::metrics::DEAD_LETTERS, "topic" => record.topic.clone(), "group" => self.group.clone())
            .increment(1);
        tracing::error!(
            group = %self.group,
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            reason,
            dead_letter_topic = %self.topic,
            "parking a record in the dead-letter topic"
        );
        let Some(producer) = &self.producer else {
            return Ok(());
        };
        let parked = Parked {
            v: 1,
            group: &self.group,
            topic: &record.topic,
            partition: record.partition,
            offset: record.offset,
            reason,
            payload: String::from_utf8_lossy(&record.payload),
        };
        let payload = serde_json::to_vec(&parked).expect("the envelope serializes");
        let key = String::from_utf8_lossy(&record.key);
        producer.send(&self.topic, &key, &payload).await
    }
}

enum ConsumerEngine {
    Kafka(kafka::KafkaConsumer),
    Log(tokio::sync::Mutex<log::LogConsumer>),
}

impl Consumer {
    /// Parks what this consumer cannot handle in the dead-letter topic through
    /// `producer`; without one, such records are only counted and logged.
    pub fn with_dead_letters(mut self, producer: Producer) -> Self {
        self.dead_letters.producer = Some(producer);
        self
    }

    /// For handlers that find a record they cannot decode.
    pub fn dead_letters(&self) -> DeadLetters {
        self.dead_letters.clone()
    }

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
    ///
    /// A batch that keeps failing is then handled one record at a time, in
    /// order ([`Consumer::isolate`]), to tell a poison record, which is parked
    /// ([`DeadLetters`]) so its partition moves on, from an outage (a store
    /// or the bus is down), during which the batch keeps being retried. A
    /// batch of one record is first joined by the records after it, if any
    /// come within the pause, since only they can tell the two cases apart.
    pub async fn run<H, Fut>(&self, max: usize, shutdown: &Shutdown, mut handle: H)
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: Future<Output = Result<Vec<Record>, (Vec<Record>, anyhow::Error)>>,
    {
        self.run_overlapped(max, shutdown, |batch| {
            let handled = handle(batch);
            async move { handled.await.map(|done| (done, Settle::done())) }
        })
        .await
    }

    /// [`Consumer::run`] for a handler that hands back, with its batch, what
    /// must still succeed before the batch counts as done: typically the
    /// acknowledgements of what it produced. The next batch is handled while
    /// that settles, and offsets are committed in order once it has. When it
    /// fails, the batch is handled again (the batch after it may then have
    /// been handled already: handlers are idempotent). A handler that
    /// succeeds must hand back the batch it was given.
    pub async fn run_overlapped<H, Fut>(&self, max: usize, shutdown: &Shutdown, mut handle: H)
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: Future<Output = Result<(Vec<Record>, Settle), (Vec<Record>, anyhow::Error)>>,
    {
        let batch_records =
            ::metrics::histogram!(crate::metrics::BATCH_RECORDS, "group" => self.group.clone());
        let batch_seconds =
            ::metrics::histogram!(crate::metrics::BATCH_SECONDS, "group" => self.group.clone());
        let mut unsettled: Option<(Vec<Record>, Settle)> = None;
        loop {
            let next = match unsettled.as_mut() {
                None => self.next_batch(max, shutdown).await,
                // Whichever comes first: a quiet topic must not keep a batch
                // from its commit, nor a failed settling from its retry.
                Some((_, settle)) => {
                    let settled = tokio::select! {
                        biased;
                        settled = &mut settle.0 => Ok(settled),
                        next = self.next_batch(max, shutdown) => Err(next),
                    };
                    match settled {
                        Ok(settled) => {
                            let (batch, _) = unsettled.take().expect("a batch was settling");
                            if !self
                                .settled(batch, settled, max, shutdown, &mut handle)
                                .await
                            {
                                break;
                            }
                            continue;
                        }
                        Err(next) => next,
                    }
                }
            };
            let Some(batch) = next else { break };
            let started = std::time::Instant::now();
            batch_records.record(batch.len() as f64);
            // The batch before goes on settling meanwhile.
            let mut previous = unsettled
                .take()
                .map(|(batch, settle)| (batch, settle, None));
            let handling = self.handle_until_done(batch, max, shutdown, &mut handle);
            let handled = match previous.as_mut() {
                None => handling.await,
                Some((_, settle, settled)) => beside(&mut settle.0, settled, handling).await,
            };
            batch_seconds.record(started.elapsed().as_secs_f64());
            if let Some((previous, settle, settled)) = previous {
                let settled = match settled {
                    Some(settled) => settled,
                    None => settle.0.await,
                };
                if !self
                    .settled(previous, settled, max, shutdown, &mut handle)
                    .await
                {
                    break;
                }
            }
            match handled {
                Some(handled) => unsettled = Some(handled),
                None => break,
            }
        }
        if let Some((last, settle)) = unsettled {
            let settled = settle.0.await;
            self.settled(last, settled, max, shutdown, &mut handle)
                .await;
        }
        self.commit().await;
    }

    /// Marks `batch` done once `settled` says it settled; otherwise handles it
    /// again, and waits for that to settle, until it does. False when
    /// shutdown came first.
    async fn settled<H, Fut>(
        &self,
        mut batch: Vec<Record>,
        mut settled: anyhow::Result<()>,
        max: usize,
        shutdown: &Shutdown,
        handle: &mut H,
    ) -> bool
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: Future<Output = Result<(Vec<Record>, Settle), (Vec<Record>, anyhow::Error)>>,
    {
        let mut failures = 0;
        loop {
            let e = match settled {
                Ok(()) => {
                    self.done(&batch).await;
                    return true;
                }
                Err(e) => e,
            };
            failures += 1;
            let delay = batch_retry_delay(failures);
            tracing::warn!(group = %self.group, error = %format!("{e:#}"), failures, ?delay, "batch did not settle, handling it again");
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            let Some((again, settle)) = self.handle_until_done(batch, max, shutdown, handle).await
            else {
                return false;
            };
            batch = again;
            settled = settle.0.await;
        }
    }

    /// Hands `batch` to `handle` until it succeeds, with the pauses and the
    /// isolation described at [`Consumer::run`]. None when shutdown came first.
    async fn handle_until_done<H, Fut>(
        &self,
        mut batch: Vec<Record>,
        max: usize,
        shutdown: &Shutdown,
        handle: &mut H,
    ) -> Option<(Vec<Record>, Settle)>
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: Future<Output = Result<(Vec<Record>, Settle), (Vec<Record>, anyhow::Error)>>,
    {
        let mut failures = 0;
        loop {
            let e = match handle(batch).await {
                Ok(handled) => return Some(handled),
                Err((again, e)) => {
                    batch = again;
                    e
                }
            };
            failures += 1;
            let delay = batch_retry_delay(failures);
            tracing::warn!(group = %self.group, error = %format!("{e:#}"), failures, ?delay, "batch failed, retrying");
            if failures >= ISOLATE_AFTER {
                if batch.len() == 1 {
                    let more = tokio::time::timeout(
                        delay,
                        self.next_batch(max.saturating_sub(1).max(1), shutdown),
                    );
                    match more.await {
                        Ok(Some(more)) => batch.extend(more),
                        Ok(None) => return None,
                        Err(_) => continue,
                    }
                }
                match self.isolate(batch, handle).await {
                    Ok(done) => return Some((done, Settle::done())),
                    Err(again) => batch = again,
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Handles `batch` one record at a time, in order, each with up to
    /// [`ISOLATED_ATTEMPTS`]. When a record keeps failing, the next one is
    /// tried: if it fails too, this is an outage and the batch is given back
    /// to be retried whole; if it goes through, the failing record is tried
    /// again, with growing pauses, and parked only once it has kept failing
    /// for [`POISON_AFTER`]. Returns the batch once every record went through
    /// or was parked.
    async fn isolate<H, Fut>(
        &self,
        batch: Vec<Record>,
        handle: &mut H,
    ) -> Result<Vec<Record>, Vec<Record>>
    where
        H: FnMut(Vec<Record>) -> Fut,
        Fut: Future<Output = Result<(Vec<Record>, Settle), (Vec<Record>, anyhow::Error)>>,
    {
        let mut i = 0;
        while i < batch.len() {
            let mut failure = None;
            for attempt in 1..=ISOLATED_ATTEMPTS {
                match handle_alone(handle, &batch[i]).await {
                    Ok(()) => {
                        failure = None;
                        break;
                    }
                    Err(e) => failure = Some(e),
                }
                if attempt < ISOLATED_ATTEMPTS {
                    tokio::time::sleep(batch_retry_delay(attempt)).await;
                }
            }
            if failure.is_none() {
                i += 1;
                continue;
            }
            // Does anything go through? The next record tells.
            let Some(next) = batch.get(i + 1) else {
                return Err(batch);
            };
            if handle_alone(handle, next).await.is_err() {
                return Err(batch);
            }
            let failing_since = tokio::time::Instant::now();
            let mut pause = Duration::from_millis(500);
            loop {
                let failure = match handle_alone(handle, &batch[i]).await {
                    Ok(()) => break,
                    Err(e) => e,
                };
                if failing_since.elapsed() >= POISON_AFTER {
                    let reason = format!(
                        "handler failed for {POISON_AFTER:?} while later records went through: {failure:#}"
                    );
                    if let Err(e) = self.dead_letters.park(&batch[i], &reason).await {
                        tracing::warn!(group = %self.group, error = %e, "parking a record failed");
                        return Err(batch);
                    }
                    break;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            i += 2;
        }
        Ok(batch)
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

/// What a batch's handler left to finish before the batch counts as done
/// ([`Consumer::run_overlapped`]).
pub struct Settle(Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>);

impl Settle {
    /// Nothing left: the batch is done.
    pub fn done() -> Self {
        Self::new(std::future::ready(Ok(())))
    }

    /// Done once every one of `deliveries` is acknowledged by the bus.
    pub fn acknowledged(deliveries: Vec<ProduceFuture>) -> Self {
        Self::new(async move { Ok(acknowledged_all(deliveries).await?) })
    }

    /// Done once `settling` succeeds; when it fails, the batch is handled again.
    pub fn new(settling: impl Future<Output = anyhow::Result<()>> + Send + 'static) -> Self {
        Self(Box::pin(settling))
    }
}

/// Awaits `main`, polling `side` beside it until `side` is done, whose
/// outcome then goes to `outcome`.
async fn beside<T>(
    side: &mut Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>,
    outcome: &mut Option<anyhow::Result<()>>,
    main: impl Future<Output = T>,
) -> T {
    let mut main = std::pin::pin!(main);
    loop {
        tokio::select! {
            out = &mut main => return out,
            done = &mut *side, if outcome.is_none() => *outcome = Some(done),
        }
    }
}

/// Handles `record` on its own and waits for it to settle.
async fn handle_alone<H, Fut>(handle: &mut H, record: &Record) -> anyhow::Result<()>
where
    H: FnMut(Vec<Record>) -> Fut,
    Fut: Future<Output = Result<(Vec<Record>, Settle), (Vec<Record>, anyhow::Error)>>,
{
    let (_, settle) = handle(vec![record.clone()]).await.map_err(|(_, e)| e)?;
    settle.0.await
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

    fn record(topic: &str, partition: i32, offset: i64) -> Record {
        Record {
            topic: topic.into(),
            partition,
            offset,
            key: Vec::new(),
            payload: Vec::new(),
        }
    }

    #[test]
    fn a_batch_is_marked_by_its_first_and_last_offsets_per_partition() {
        let batch = [
            record("t", 1, 7),
            record("t", 0, 3),
            record("t", 1, 9),
            record("t", 0, 2),
        ];
        assert_eq!(last_offsets(batch.iter()), [(0, 3), (1, 9)]);
        assert_eq!(first_offsets(batch.iter()), [(0, 2), (1, 7)]);
        assert_eq!(last_offsets([].iter()), []);
    }

    #[test]
    fn a_group_is_past_a_mark_once_it_committed_beyond_it() {
        let marks = [(0, 3), (1, 9)];
        assert!(past(&marks, &[Some(4), Some(10)]));
        assert!(past(&marks, &[Some(40), Some(12)]));
        // The committed offset is the next to read: 9 is not past offset 9.
        assert!(!past(&marks, &[Some(4), Some(9)]));
        assert!(!past(&marks, &[None, Some(10)]));
    }
}
