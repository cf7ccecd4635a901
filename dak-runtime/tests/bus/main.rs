//! The bus contract: one suite, run on both engines — the embedded log (a
//! SQLite file of each test's own) and Apache Kafka (`DAK_TEST_KAFKA_BROKERS`,
//! which scripts/test starts, with a topic prefix of each test's own); and
//! some of it on Kafka's SASL listeners, without and with TLS, and on its TLS
//! listener that requires a client certificate (`DAK_TEST_KAFKA_SASL_BROKERS`,
//! `DAK_TEST_KAFKA_SASL_SSL_BROKERS`, `DAK_TEST_KAFKA_SSL_BROKERS`).

use std::collections::HashMap;
use std::time::Duration;

use dak_runtime::bus::{Bus, Consumer, KafkaConfig, Log, LogOptions, Record, Settle, Topics};
use dak_runtime::config::{KafkaArgs, SaslMechanism, Secret, SecurityProtocol};
use dak_runtime::shutdown::Shutdown;

/// How long a test waits for records that should come. Kafka's group joins
/// take a few seconds.
const PATIENCE: Duration = Duration::from_secs(60);

const PARTITIONS: u32 = 4;

fn unique() -> String {
    ulid::Ulid::new().to_string().to_lowercase()
}

/// A bus of one engine, with its topics created.
enum Engine {
    Log,
    Kafka,
    /// Kafka through its SASL_PLAINTEXT listener (`DAK_TEST_KAFKA_SASL_BROKERS`),
    /// as the user scripts/engines/kafka makes.
    KafkaSasl(SaslMechanism),
    /// Kafka through its SASL_SSL listener (`DAK_TEST_KAFKA_SASL_SSL_BROKERS`),
    /// trusting the test CA (`DAK_TEST_KAFKA_CA`).
    KafkaSaslSsl(SaslMechanism),
    /// Kafka through its SSL listener (`DAK_TEST_KAFKA_SSL_BROKERS`), with
    /// the client certificate the test CA signed.
    KafkaSsl,
}

struct TestBus {
    bus: Bus,
    _dir: tempfile::TempDir,
}

async fn bus(engine: Engine) -> TestBus {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("t{}.", unique());
    let bus = match engine {
        Engine::Log => {
            let log = Log::open(
                &dir.path().join("bus.db"),
                LogOptions {
                    partitions: PARTITIONS,
                    ..LogOptions::default()
                },
            )
            .unwrap();
            Bus::log(log, Topics::with_prefix(&prefix))
        }
        Engine::Kafka => {
            let brokers = std::env::var("DAK_TEST_KAFKA_BROKERS").unwrap_or_else(|_| {
                panic!("the Kafka bus suite needs DAK_TEST_KAFKA_BROKERS; scripts/test sets it")
            });
            let args = KafkaArgs {
                brokers: Some(brokers.clone()),
                topic_prefix: prefix,
                partitions: Some(PARTITIONS as i32),
                replication: 1,
                linger_ms: None,
                fetch_wait_ms: None,
                session_timeout_ms: 6000,
                ..KafkaArgs::default()
            };
            Bus::kafka(KafkaConfig::new(brokers, &args).unwrap())
        }
        Engine::KafkaSsl => Bus::kafka(KafkaConfig::new(ssl_brokers(), &ssl_args(true)).unwrap()),
        Engine::KafkaSaslSsl(mechanism) => Bus::kafka(
            KafkaConfig::new(
                sasl_ssl_brokers(),
                &sasl_ssl_args(mechanism, Some(test_ca())),
            )
            .unwrap(),
        ),
        Engine::KafkaSasl(mechanism) => Bus::kafka(
            KafkaConfig::new(sasl_brokers(), &sasl_args(mechanism, "dak-secret")).unwrap(),
        ),
    };
    bus.create_topics().await.expect("topics created");
    TestBus { bus, _dir: dir }
}

fn sasl_brokers() -> String {
    std::env::var("DAK_TEST_KAFKA_SASL_BROKERS").unwrap_or_else(|_| {
        panic!("the Kafka SASL tests need DAK_TEST_KAFKA_SASL_BROKERS; scripts/test sets it")
    })
}

/// Settings for the test broker's SASL listener: user `dak`, `password`.
fn sasl_args(mechanism: SaslMechanism, password: &str) -> KafkaArgs {
    KafkaArgs {
        brokers: Some(sasl_brokers()),
        topic_prefix: format!("t{}.", unique()),
        partitions: Some(PARTITIONS as i32),
        session_timeout_ms: 6000,
        security_protocol: SecurityProtocol::SaslPlaintext,
        sasl_mechanism: Some(mechanism),
        sasl_username: Some("dak".into()),
        sasl_password: Some(Secret::new(password)),
        ..KafkaArgs::default()
    }
}

fn sasl_ssl_brokers() -> String {
    std::env::var("DAK_TEST_KAFKA_SASL_SSL_BROKERS").unwrap_or_else(|_| {
        panic!("the Kafka TLS tests need DAK_TEST_KAFKA_SASL_SSL_BROKERS; scripts/test sets it")
    })
}

fn test_ca() -> std::path::PathBuf {
    std::env::var("DAK_TEST_KAFKA_CA")
        .unwrap_or_else(|_| {
            panic!("the Kafka TLS tests need DAK_TEST_KAFKA_CA; scripts/test sets it")
        })
        .into()
}

/// Settings for the test broker's SASL_SSL listener, trusting `ca`.
fn sasl_ssl_args(mechanism: SaslMechanism, ca: Option<std::path::PathBuf>) -> KafkaArgs {
    KafkaArgs {
        brokers: Some(sasl_ssl_brokers()),
        security_protocol: SecurityProtocol::SaslSsl,
        ssl_ca_location: ca,
        ..sasl_args(mechanism, "dak-secret")
    }
}

fn ssl_brokers() -> String {
    std::env::var("DAK_TEST_KAFKA_SSL_BROKERS").unwrap_or_else(|_| {
        panic!("the Kafka TLS tests need DAK_TEST_KAFKA_SSL_BROKERS; scripts/test sets it")
    })
}

/// Settings for the test broker's SSL listener, with the client certificate
/// next to the test CA or without one.
fn ssl_args(client_certificate: bool) -> KafkaArgs {
    let ca = test_ca();
    let beside = |name: &str| ca.with_file_name(name);
    KafkaArgs {
        brokers: Some(ssl_brokers()),
        topic_prefix: format!("t{}.", unique()),
        partitions: Some(PARTITIONS as i32),
        session_timeout_ms: 6000,
        security_protocol: SecurityProtocol::Ssl,
        ssl_certificate_location: client_certificate.then(|| beside("client.crt")),
        ssl_key_location: client_certificate.then(|| beside("client.key")),
        ssl_ca_location: Some(ca),
        ..KafkaArgs::default()
    }
}

/// Reads until `n` records came, or fails after [`PATIENCE`].
async fn read(consumer: &Consumer, n: usize) -> Vec<Record> {
    let shutdown = Shutdown::new();
    let mut records = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while records.len() < n {
        let batch =
            tokio::time::timeout_at(deadline, consumer.next_batch(n - records.len(), &shutdown))
                .await
                .unwrap_or_else(|_| panic!("{} of {n} records within {PATIENCE:?}", records.len()))
                .expect("not shut down");
        records.extend(batch);
    }
    records
}

fn text(record: &Record) -> String {
    String::from_utf8(record.payload.clone()).unwrap()
}

/// Produces `n` records for each of `keys`, as `key:i`, and waits for every
/// acknowledgement.
async fn produce(bus: &Bus, keys: &[&str], n: usize) {
    let producer = bus.producer().unwrap();
    let mut deliveries = Vec::new();
    for i in 0..n {
        for key in keys {
            let payload = format!("{key}:{i}");
            deliveries.push(
                producer
                    .enqueue(&bus.topics().deliver, key, payload.as_bytes())
                    .unwrap(),
            );
        }
    }
    dak_runtime::bus::acknowledged_all(deliveries)
        .await
        .expect("every record acknowledged");
}

/// Each key's records, in the order they were read.
fn by_key(records: &[Record]) -> HashMap<String, Vec<usize>> {
    let mut keys: HashMap<String, Vec<usize>> = HashMap::new();
    for record in records {
        let text = text(record);
        let (key, i) = text.split_once(':').unwrap();
        keys.entry(key.to_owned())
            .or_default()
            .push(i.parse().unwrap());
    }
    keys
}

async fn records_of_one_key_keep_their_order(engine: Engine) {
    let t = bus(engine).await;
    let keys = ["alice", "bob", "carol", "dave", "erin", "frank"];
    produce(&t.bus, &keys, 200).await;
    let group = t.bus.topics().group("order");
    let consumer = t.bus.consumer(&group, &[&t.bus.topics().deliver]).unwrap();
    let records = read(&consumer, keys.len() * 200).await;
    let keys_read = by_key(&records);
    assert_eq!(keys_read.len(), keys.len());
    for (key, seqs) in keys_read {
        assert_eq!(seqs, (0..200).collect::<Vec<_>>(), "{key} out of order");
    }
    let partitions: std::collections::HashSet<i32> = records.iter().map(|r| r.partition).collect();
    assert!(partitions.len() > 1, "keys spread over partitions");
}

async fn a_consumer_resumes_after_what_its_group_committed(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["k"], 10).await;
    let group = t.bus.topics().group("resume");
    let topic = t.bus.topics().deliver.clone();
    {
        let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
        let first = read(&consumer, 10).await;
        // The first six are done; the rest were read, not finished.
        consumer.done(&first[..6]).await;
        consumer.commit().await;
    }
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    let again = read(&consumer, 4).await;
    assert_eq!(
        again.iter().map(text).collect::<Vec<_>>(),
        ["k:6", "k:7", "k:8", "k:9"],
        "what was not committed comes again, and only that"
    );
}

async fn a_consumer_that_dies_without_committing_leaves_everything_to_the_next(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["k"], 5).await;
    let group = t.bus.topics().group("dies");
    let topic = t.bus.topics().deliver.clone();
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    assert_eq!(read(&consumer, 5).await.len(), 5);
    drop(consumer);
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    assert_eq!(
        read(&consumer, 5)
            .await
            .iter()
            .map(text)
            .collect::<Vec<_>>(),
        ["k:0", "k:1", "k:2", "k:3", "k:4"]
    );
}

async fn every_group_gets_every_record(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["a", "b"], 50).await;
    let topic = t.bus.topics().deliver.clone();
    let one = t
        .bus
        .consumer(&t.bus.topics().group("one"), &[&topic])
        .unwrap();
    let two = t
        .bus
        .consumer(&t.bus.topics().group("two"), &[&topic])
        .unwrap();
    let (a, b) = tokio::join!(read(&one, 100), read(&two, 100));
    assert_eq!(by_key(&a), by_key(&b));
}

async fn a_waiting_consumer_gets_what_is_produced_later(engine: Engine) {
    let t = bus(engine).await;
    let topic = t.bus.topics().deliver.clone();
    let consumer = t
        .bus
        .consumer(&t.bus.topics().group("later"), &[&topic])
        .unwrap();
    let (records, ()) = tokio::join!(read(&consumer, 3), async {
        // Kafka: the consumer must have joined its group before the first
        // record, or auto.offset.reset=earliest still finds it; either way it
        // arrives.
        tokio::task::yield_now().await;
        produce(&t.bus, &["x"], 3).await;
    });
    assert_eq!(
        records.iter().map(text).collect::<Vec<_>>(),
        ["x:0", "x:1", "x:2"]
    );
}

/// Runs `consumer` until `handled` holds `until` records, handling records with
/// `fails`: true for those the handler refuses.
async fn run_until(
    consumer: &Consumer,
    until: usize,
    fails: impl Fn(&str) -> bool + Sync,
) -> Vec<String> {
    let shutdown = Shutdown::new();
    let handled = std::sync::Mutex::new(Vec::new());
    let run = consumer.run(50, &shutdown, |batch| {
        let result = if batch.iter().any(|r| fails(&text(r))) {
            Err((batch, anyhow::anyhow!("handler refuses this batch")))
        } else {
            let mut handled = handled.lock().unwrap();
            handled.extend(batch.iter().map(text));
            if handled.len() >= until {
                shutdown.cancel();
            }
            Ok(batch)
        };
        async move { result }
    });
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the consumer got past every record");
    handled.into_inner().unwrap()
}

/// Everything on the dead-letter topic before a sentinel this call adds.
async fn dead_letters(bus: &Bus) -> Vec<serde_json::Value> {
    let topic = bus.topics().dead_letter.clone();
    let producer = bus.producer().unwrap();
    producer
        .send(&topic, "k", b"{\"sentinel\":true}")
        .await
        .unwrap();
    let consumer = bus
        .consumer(&bus.topics().group("dead"), &[&topic])
        .unwrap();
    let mut parked = Vec::new();
    loop {
        for record in read(&consumer, 1).await {
            let value: serde_json::Value = serde_json::from_slice(&record.payload).unwrap();
            if value["sentinel"] == true {
                return parked;
            }
            parked.push(value);
        }
    }
}

async fn a_record_that_always_fails_is_parked_and_the_rest_go_through(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["k"], 10).await;
    let consumer = t
        .bus
        .consumer(&t.bus.topics().group("poison"), &[&t.bus.topics().deliver])
        .unwrap()
        .with_dead_letters(t.bus.producer().unwrap());
    let handled = run_until(&consumer, 9, |r| r == "k:3").await;
    let expected: Vec<String> = (0..10)
        .filter(|i| *i != 3)
        .map(|i| format!("k:{i}"))
        .collect();
    assert_eq!(handled, expected, "the others, once each and in order");
    let parked = dead_letters(&t.bus).await;
    assert_eq!(parked.len(), 1, "{parked:?}");
    assert_eq!(parked[0]["payload"], "k:3");
    assert_eq!(parked[0]["topic"], t.bus.topics().deliver.as_str());
    assert!(parked[0]["reason"]
        .as_str()
        .unwrap()
        .contains("handler refuses"));
    // Committed past it: the group does not see it again.
    drop(consumer);
    produce(&t.bus, &["k"], 1).await;
    let again = t
        .bus
        .consumer(&t.bus.topics().group("poison"), &[&t.bus.topics().deliver])
        .unwrap();
    assert_eq!(
        read(&again, 1).await.iter().map(text).collect::<Vec<_>>(),
        ["k:0"]
    );
}

async fn records_that_all_fail_are_retried_not_parked(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["k"], 3).await;
    let consumer = t
        .bus
        .consumer(&t.bus.topics().group("outage"), &[&t.bus.topics().deliver])
        .unwrap()
        .with_dead_letters(t.bus.producer().unwrap());
    // An outage: every attempt fails, the batch's 5 and the isolation round's
    // (3 for the first record, 1 for the next), until the store comes back.
    let attempts = std::sync::atomic::AtomicUsize::new(0);
    let handled = run_until(&consumer, 3, |_| {
        attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 9
    })
    .await;
    assert!(attempts.into_inner() > 9);
    assert_eq!(handled, ["k:0", "k:1", "k:2"]);
    assert!(
        dead_letters(&t.bus).await.is_empty(),
        "nothing parked in an outage"
    );
}

/// Produces `fresh`, and asserts that a new member of `group` reads it
/// first: everything before it was committed.
async fn assert_group_resumes_at(bus: &Bus, group: &str, topic: &str, fresh: &str) {
    let producer = bus.producer().unwrap();
    producer.send(topic, "k", fresh.as_bytes()).await.unwrap();
    let again = bus.consumer(group, &[topic]).unwrap();
    assert_eq!(
        read(&again, 1).await.iter().map(text).collect::<Vec<_>>(),
        [fresh]
    );
}

/// Runs a consumer's `run` (for at most [`PATIENCE`]) while `k:0` is
/// produced to `topic` and, once `first_handled` is notified, `k:1`: two
/// batches, the second produced while the first is settling.
async fn with_two_batches<F: std::future::Future>(
    bus: &Bus,
    topic: &str,
    first_handled: &tokio::sync::Notify,
    run: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    let (ran, ()) = tokio::join!(tokio::time::timeout(PATIENCE, run), async {
        produce(bus, &["k"], 1).await;
        first_handled.notified().await;
        bus.producer()
            .unwrap()
            .send(topic, "k", b"k:1")
            .await
            .unwrap();
    });
    ran
}

async fn the_next_batch_is_handled_while_one_settles(engine: Engine) {
    let t = bus(engine).await;
    let group = t.bus.topics().group("overlap");
    let topic = t.bus.topics().deliver.clone();
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    let shutdown = Shutdown::new();
    let first_handled = tokio::sync::Notify::new();
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let mut release = Some(release);
    let mut released = Some(released);
    let handled = std::sync::Mutex::new(Vec::new());
    let run = consumer.run_overlapped(50, &shutdown, |batch| {
        let texts: Vec<String> = batch.iter().map(text).collect();
        handled.lock().unwrap().extend(texts.iter().cloned());
        let settle = if texts.contains(&"k:0".to_owned()) {
            // Settles only once the next batch has been handled.
            let released = released.take().expect("k:0 handled once");
            first_handled.notify_one();
            Settle::new(async move { Ok(released.await?) })
        } else {
            if texts.contains(&"k:1".to_owned()) {
                release.take().unwrap().send(()).unwrap();
                shutdown.cancel();
            }
            Settle::done()
        };
        async move { Ok((batch, settle)) }
    });
    with_two_batches(&t.bus, &topic, &first_handled, run)
        .await
        .expect("k:1 was handled while k:0 was still settling");
    assert_eq!(handled.into_inner().unwrap(), ["k:0", "k:1"]);
    // Both settled, so both were committed.
    drop(consumer);
    assert_group_resumes_at(&t.bus, &group, &topic, "k:2").await;
}

/// A batch's settling goes on while the next batch is handled, not only in
/// the pauses between batches: here the next batch's handler waits for it.
async fn a_batch_goes_on_settling_while_the_next_is_handled(engine: Engine) {
    let t = bus(engine).await;
    let group = t.bus.topics().group("settling-beside");
    let topic = t.bus.topics().deliver.clone();
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    let shutdown = Shutdown::new();
    let first_handled = tokio::sync::Notify::new();
    // k:1's handler starts the second step of k:0's settling and waits for it.
    let (start, started) = tokio::sync::oneshot::channel::<()>();
    let (finish, finished) = tokio::sync::oneshot::channel::<()>();
    let (mut start, mut started) = (Some(start), Some(started));
    let (mut finish, mut finished) = (Some(finish), Some(finished));
    let run = consumer.run_overlapped(50, &shutdown, |batch| {
        let texts: Vec<String> = batch.iter().map(text).collect();
        let mut waits = None;
        let settle = if texts.contains(&"k:0".to_owned()) {
            let (started, finish) = (started.take().unwrap(), finish.take().unwrap());
            first_handled.notify_one();
            Settle::new(async move {
                started.await?;
                let _ = finish.send(());
                Ok(())
            })
        } else {
            if texts.contains(&"k:1".to_owned()) {
                start.take().unwrap().send(()).unwrap();
                waits = finished.take();
                shutdown.cancel();
            }
            Settle::done()
        };
        async move {
            if let Some(finished) = waits {
                finished.await.expect("k:0 settled");
            }
            Ok((batch, settle))
        }
    });
    with_two_batches(&t.bus, &topic, &first_handled, run)
        .await
        .expect("k:0 settled while k:1 was handled");
    drop(consumer);
    assert_group_resumes_at(&t.bus, &group, &topic, "k:2").await;
}

async fn a_batch_that_does_not_settle_is_handled_again(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["k"], 3).await;
    let group = t.bus.topics().group("unsettled");
    let topic = t.bus.topics().deliver.clone();
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    let shutdown = Shutdown::new();
    let mut calls = 0;
    let handled = std::sync::Mutex::new(Vec::new());
    let run = consumer.run_overlapped(50, &shutdown, |batch| {
        calls += 1;
        let mut handled = handled.lock().unwrap();
        handled.extend(batch.iter().map(text));
        let settle = if calls == 1 {
            // As when the bus refuses what the handler produced.
            Settle::new(async { Err(anyhow::anyhow!("the bus refused a record")) })
        } else {
            Settle::done()
        };
        if handled.iter().filter(|t| *t == "k:0").count() == 2 && handled.contains(&"k:2".into()) {
            shutdown.cancel();
        }
        async move { Ok((batch, settle)) }
    });
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the consumer got past every record");
    let handled = handled.into_inner().unwrap();
    assert_eq!(handled.first().map(String::as_str), Some("k:0"));
    assert_eq!(
        handled.iter().filter(|t| *t == "k:0").count(),
        2,
        "the batch that did not settle was handled again: {handled:?}"
    );
    for i in 0..3 {
        assert!(handled.contains(&format!("k:{i}")), "{handled:?}");
    }
    // Committed once it settled: the group does not see it again.
    drop(consumer);
    assert_group_resumes_at(&t.bus, &group, &topic, "k:3").await;
}

async fn a_bounded_fan_out_waits_for_room_and_keeps_order(engine: Engine) {
    let t = bus(engine).await;
    let producer = t.bus.producer().unwrap();
    let topic = t.bus.topics().deliver.clone();
    // Room for about three records at a time: the sender waits every third.
    let mut bounded = dak_runtime::bus::Bounded::new(&producer, 20);
    for i in 0..30 {
        bounded
            .send(&topic, "k", format!("k:{i}").as_bytes())
            .await
            .unwrap();
    }
    bounded.wait().await.unwrap();
    let consumer = t
        .bus
        .consumer(&t.bus.topics().group("bounded"), &[&topic])
        .unwrap();
    let records = read(&consumer, 30).await;
    assert_eq!(by_key(&records)["k"], (0..30).collect::<Vec<_>>());
}

/// One service waits on another's group: what it finished, and only that,
/// shows once committed.
async fn another_service_sees_what_a_group_finished(engine: Engine) {
    let t = bus(engine).await;
    produce(&t.bus, &["k"], 10).await;
    let group = t.bus.topics().group("stores");
    let topic = t.bus.topics().deliver.clone();
    let progress = t.bus.progress(&group, &topic).unwrap();
    let consumer = t.bus.consumer(&group, &[&topic]).unwrap();
    let records = read(&consumer, 10).await;
    let partition = records[0].partition;
    assert!(
        !progress
            .wait_past(&records[..1], Duration::from_millis(300))
            .await,
        "nothing finished yet"
    );

    consumer.done(&records[..6]).await;
    consumer.commit().await;
    assert!(progress.wait_past(&records[..6], PATIENCE).await);
    assert_eq!(
        progress.committed(&[partition]).await.unwrap(),
        [Some(records[5].offset + 1)]
    );
    assert!(
        !progress
            .wait_past(&records[..7], Duration::from_millis(300))
            .await,
        "the seventh was read, not finished"
    );
    assert!(progress.finished_before(&records[6..]).await);
    assert!(!progress.finished_before(&records[7..]).await);

    consumer.done(&records[6..]).await;
    consumer.commit().await;
    assert!(progress.wait_past(&records, PATIENCE).await);
    // Records of another topic are not this group's business.
    let elsewhere = Record {
        topic: t.bus.topics().offline.clone(),
        ..records[9].clone()
    };
    assert!(progress.wait_past(&[elsewhere], Duration::ZERO).await);
}

macro_rules! both_engines {
    ($($case:ident),* $(,)?) => {
        mod log {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Engine::Log).await;
                }
            )*
        }
        mod kafka {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::Engine::Kafka).await;
                }
            )*
        }
    };
}

both_engines!(
    records_of_one_key_keep_their_order,
    a_consumer_resumes_after_what_its_group_committed,
    a_consumer_that_dies_without_committing_leaves_everything_to_the_next,
    every_group_gets_every_record,
    a_waiting_consumer_gets_what_is_produced_later,
    a_record_that_always_fails_is_parked_and_the_rest_go_through,
    records_that_all_fail_are_retried_not_parked,
    a_bounded_fan_out_waits_for_room_and_keeps_order,
    the_next_batch_is_handled_while_one_settles,
    a_batch_goes_on_settling_while_the_next_is_handled,
    a_batch_that_does_not_settle_is_handled_again,
    another_service_sees_what_a_group_finished,
);

mod kafka_sasl {
    //! Kafka with SASL: records go through and keep their order with each
    //! mechanism; a wrong password gets nothing through.

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scram_sha_256() {
        records_of_one_key_keep_their_order(Engine::KafkaSasl(SaslMechanism::ScramSha256)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scram_sha_512() {
        a_consumer_resumes_after_what_its_group_committed(Engine::KafkaSasl(
            SaslMechanism::ScramSha512,
        ))
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain() {
        records_of_one_key_keep_their_order(Engine::KafkaSasl(SaslMechanism::Plain)).await;
    }

    /// The broker answers a metadata request with the right password and
    /// not with a wrong one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_password_gets_no_answer() {
        for mechanism in [SaslMechanism::ScramSha256, SaslMechanism::Plain] {
            let answered = |password: &'static str| async move {
                let config =
                    KafkaConfig::new(sasl_brokers(), &sasl_args(mechanism, password)).unwrap();
                Bus::kafka(config).producer().unwrap().check().await
            };
            assert_eq!(answered("dak-secret").await, Ok(()), "{mechanism:?}");
            assert!(answered("wrong").await.is_err(), "{mechanism:?}");
        }
    }

    /// Start-up (creating the topics) stops soon on a wrong password, and
    /// says why, instead of timing out a minute later.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_password_stops_the_start_saying_why() {
        let config = KafkaConfig::new(
            sasl_brokers(),
            &sasl_args(SaslMechanism::ScramSha256, "wrong"),
        )
        .unwrap();
        let started = std::time::Instant::now();
        let error = Bus::kafka(config).create_topics().await.unwrap_err();
        assert!(
            error.to_string().contains("SASL authentication error"),
            "{error}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }
}

mod kafka_sasl_ssl {
    //! Kafka with SASL over TLS: records go through; a broker whose
    //! certificate no trusted CA signed gets nothing.

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scram_sha_512() {
        records_of_one_key_keep_their_order(Engine::KafkaSaslSsl(SaslMechanism::ScramSha512)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain() {
        a_consumer_resumes_after_what_its_group_committed(Engine::KafkaSaslSsl(
            SaslMechanism::Plain,
        ))
        .await;
    }

    /// With the system's CAs instead of the test CA, the broker's
    /// certificate is not trusted and nothing answers.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broker_no_trusted_ca_signed_gets_no_request() {
        let answered = |ca: Option<std::path::PathBuf>| async move {
            let args = sasl_ssl_args(SaslMechanism::ScramSha256, ca);
            let config = KafkaConfig::new(sasl_ssl_brokers(), &args).unwrap();
            Bus::kafka(config).producer().unwrap().check().await
        };
        assert_eq!(answered(Some(test_ca())).await, Ok(()));
        assert!(answered(None).await.is_err());

        let args = sasl_ssl_args(SaslMechanism::ScramSha256, None);
        let config = KafkaConfig::new(sasl_ssl_brokers(), &args).unwrap();
        let error = Bus::kafka(config).create_topics().await.unwrap_err();
        assert!(
            error.to_string().contains("certificate verify failed"),
            "{error}"
        );
    }
}

mod kafka_ssl {
    //! Kafka over TLS with a client certificate (mTLS): records go through;
    //! without the certificate nothing answers.

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_a_client_certificate() {
        records_of_one_key_keep_their_order(Engine::KafkaSsl).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_client_certificate_nothing_answers() {
        let answered = |client_certificate: bool| async move {
            let config = KafkaConfig::new(ssl_brokers(), &ssl_args(client_certificate)).unwrap();
            Bus::kafka(config).producer().unwrap().check().await
        };
        assert_eq!(answered(true).await, Ok(()));
        assert!(answered(false).await.is_err());
    }
}

mod embedded {
    //! What only the embedded log promises: its own durability and retention.

    use super::*;

    fn open(path: &std::path::Path) -> Log {
        Log::open(path, LogOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn an_acknowledged_record_is_in_the_file_before_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db");
        let log = open(&path);
        log.create_topics(&["t"]).unwrap();
        for i in 0..20 {
            let offset = log
                .append("t", b"k", format!("r{i}").as_bytes())
                .unwrap()
                .await
                .unwrap()
                .unwrap();
            // Another connection, as another process would read the file.
            let reader = rusqlite::Connection::open(&path).unwrap();
            let payload: Vec<u8> = reader
                .query_row(
                    "SELECT payload FROM \"log:t:0\" WHERE offset = ?1",
                    [offset],
                    |row| row.get(0),
                )
                .expect("the acknowledged record is committed");
            assert_eq!(payload, format!("r{i}").as_bytes());
        }
        assert_eq!(log.synchronous(), "FULL", "commits are fsynced");
    }

    #[tokio::test]
    async fn records_and_offsets_survive_a_process_that_never_closed_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db");
        let log = open(&path);
        log.create_topics(&["t"]).unwrap();
        append_all(&log, 10).await;
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        let consumer = bus.consumer("g", &["t"]).unwrap();
        let first = read(&consumer, 10).await;
        consumer.done(&first[..4]).await;
        consumer.commit().await;
        // No shutdown, no close: as after a SIGKILL, the file is all there is.
        std::mem::forget(consumer);
        std::mem::forget(bus);
        std::mem::forget(log);

        let log = open(&path);
        assert_eq!(log.len("t").unwrap(), 10, "every acknowledged record");
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        let consumer = bus.consumer("g", &["t"]).unwrap();
        assert_eq!(text(&read(&consumer, 1).await[0]), "r4");
        let offset = log
            .append("t", b"k", b"r10")
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(offset, 10, "offsets go on where they were");
    }

    #[tokio::test]
    async fn a_record_goes_once_every_group_committed_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir.path().join("bus.db"));
        log.create_topics(&["t"]).unwrap();
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        let fast = bus.consumer("fast", &["t"]).unwrap();
        let slow = bus.consumer("slow", &["t"]).unwrap();
        append_all(&log, 10).await;
        let all = read(&fast, 10).await;
        fast.done(&all).await;
        fast.commit().await;
        let some = read(&slow, 3).await;
        slow.done(&some).await;
        slow.commit().await;
        // The 7 that slow has not read.
        until_kept(&log, 7).await;
        let rest = read(&slow, 7).await;
        assert_eq!(text(&rest[0]), "r3", "nothing slow needs was deleted");
    }

    /// Appends `n` records `r0`, `r1`, … to `t`, waiting for them all.
    async fn append_all(log: &Log, n: usize) {
        let mut answers = Vec::new();
        for i in 0..n {
            answers.push(log.append("t", b"k", format!("r{i}").as_bytes()).unwrap());
        }
        for answer in answers {
            answer.await.unwrap().unwrap();
        }
    }

    /// Waits until retention has left `t` with `left` records.
    async fn until_kept(log: &Log, left: i64) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while log.len("t").unwrap() != left {
            assert!(
                tokio::time::Instant::now() < deadline,
                "kept {} records, expected {left}",
                log.len("t").unwrap()
            );
            // Retention looks at most once a second.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn offsets_go_on_after_retention_deleted_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db");
        let log = open(&path);
        log.create_topics(&["t"]).unwrap();
        // More than one transaction deletes.
        append_all(&log, 1000).await;
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        let consumer = bus.consumer("g", &["t"]).unwrap();
        let all = read(&consumer, 1000).await;
        assert_eq!(all.len(), 1000);
        consumer.done(&all).await;
        consumer.commit().await;
        until_kept(&log, 0).await;
        // As after a SIGKILL: the file, with no record left, is all there is.
        std::mem::forget(consumer);
        std::mem::forget(bus);
        std::mem::forget(log);

        let log = open(&path);
        let offset = log
            .append("t", b"k", b"r1000")
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            offset, 1000,
            "an offset the group committed past is not reused"
        );
        let bus = Bus::log(log, Topics::with_prefix(""));
        let consumer = bus.consumer("g", &["t"]).unwrap();
        assert_eq!(text(&read(&consumer, 1).await[0]), "r1000");
    }

    #[tokio::test]
    async fn records_older_than_the_retention_go_though_a_group_has_not_read_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(
            &dir.path().join("bus.db"),
            LogOptions {
                retention: Duration::from_millis(200),
                ..LogOptions::default()
            },
        )
        .unwrap();
        log.create_topics(&["t"]).unwrap();
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        let idle = bus.consumer("idle", &["t"]).unwrap();
        append_all(&log, 300).await;
        until_kept(&log, 0).await;
        let offset = log
            .append("t", b"k", b"new")
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(offset, 300);
        let next = read(&idle, 1).await;
        assert_eq!(
            (next[0].offset, text(&next[0])),
            (300, "new".to_owned()),
            "the group goes on from the oldest record kept"
        );
    }

    #[tokio::test]
    async fn a_second_consumer_of_a_live_group_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir.path().join("bus.db"));
        log.create_topics(&["t"]).unwrap();
        let _first = log.consumer("g", &["t"]).unwrap();
        assert!(log.consumer("g", &["t"]).is_err());
    }

    #[tokio::test]
    async fn a_consumer_far_behind_reads_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(
            &dir.path().join("bus.db"),
            LogOptions {
                tail_bytes: 100,
                ..LogOptions::default()
            },
        )
        .unwrap();
        log.create_topics(&["t"]).unwrap();
        append_all(&log, 1000).await;
        let bus = Bus::log(log, Topics::with_prefix(""));
        let consumer = bus.consumer("g", &["t"]).unwrap();
        let records = read(&consumer, 1000).await;
        let expected: Vec<String> = (0..1000).map(|i| format!("r{i}")).collect();
        assert_eq!(records.iter().map(text).collect::<Vec<_>>(), expected);
    }
}

mod embedded_dedup {
    //! The outbox dedup entries the embedded log keeps beside its records:
    //! an entry and its record are written in one transaction.

    use super::*;
    use dak_runtime::bus::log::{LogDedup, Once, OnceRecord};
    use dak_runtime::dedup::{Dedup, SqliteDedup};
    use dak_wire::{ClientId, Mid, UserId};

    fn open(path: &std::path::Path, max_entries: u64, import: Option<std::path::PathBuf>) -> Log {
        let dedup = LogDedup {
            ttl: Duration::from_secs(3600),
            max_entries,
            import,
        };
        let log = Log::open_with_dedup(path, LogOptions::default(), Some(dedup)).unwrap();
        log.create_topics(&["t"]).unwrap();
        log
    }

    fn mid() -> Mid {
        Mid::from_ulid(ulid::Ulid::new())
    }

    /// A record for `(user, client_id)` whose payload names its mid, as an
    /// inbound event does.
    fn record(user: &str, client_id: &str, mid: Mid) -> OnceRecord {
        OnceRecord {
            user: user.into(),
            client_id: client_id.into(),
            mid,
            ts: mid.timestamp_ms(),
            payload: format!("{client_id} {mid}").into_bytes(),
            rebuild: Box::new({
                let client_id = client_id.to_owned();
                move |mid, _| format!("{client_id} {mid}").into_bytes()
            }),
        }
    }

    async fn once(log: &Log, user: &str, client_id: &str, mid: Mid) -> Once {
        let record = record(user, client_id, mid);
        let answer = log.append_once("t", user.as_bytes(), record).unwrap();
        answer.await.unwrap().unwrap()
    }

    fn payloads(log: &Log) -> Vec<String> {
        let reader = rusqlite::Connection::open(log.path()).unwrap();
        let mut read = reader
            .prepare("SELECT payload FROM \"log:t:0\" ORDER BY offset")
            .unwrap();
        read.query_map([], |row| row.get::<_, Vec<u8>>(0))
            .unwrap()
            .map(|payload| String::from_utf8(payload.unwrap()).unwrap())
            .collect()
    }

    fn appended_mid(once: Once) -> Mid {
        match once {
            Once::Appended { mid, .. } => mid,
            Once::Existing { .. } => panic!("expected an append, got {once:?}"),
        }
    }

    #[tokio::test]
    async fn a_client_id_is_appended_once_and_keeps_its_first_mid() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir.path().join("bus.db"), u64::MAX, None);
        let (first, second, other) = (mid(), mid(), mid());

        let appended = appended_mid(once(&log, "ann", "c-1", first).await);
        assert_eq!(appended, first);
        let again = once(&log, "ann", "c-1", second).await;
        assert_eq!(
            again,
            Once::Existing {
                mid: first,
                ts: first.timestamp_ms()
            }
        );
        // The same client id of another sender is another message.
        assert_eq!(appended_mid(once(&log, "bea", "c-1", other).await), other);

        // Both queued before either is written: one transaction, one record.
        let (a, b) = (mid(), mid());
        let queued_first = log
            .append_once("t", b"cat", record("cat", "c-9", a))
            .unwrap();
        let queued_second = log
            .append_once("t", b"cat", record("cat", "c-9", b))
            .unwrap();
        assert_eq!(appended_mid(queued_first.await.unwrap().unwrap()), a);
        assert!(matches!(
            queued_second.await.unwrap().unwrap(),
            Once::Existing { mid, .. } if mid == a
        ));

        assert_eq!(
            payloads(&log),
            vec![
                format!("c-1 {first}"),
                format!("c-1 {other}"),
                format!("c-9 {a}")
            ]
        );
    }

    #[tokio::test]
    async fn a_log_without_dedup_entries_refuses_append_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("bus.db"), LogOptions::default()).unwrap();
        log.create_topics(&["t"]).unwrap();
        assert!(!log.keeps_dedup());
        assert!(log
            .append_once("t", b"ann", record("ann", "c-1", mid()))
            .is_err());
    }

    #[tokio::test]
    async fn entries_survive_a_process_that_never_closed_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.db");
        let log = open(&path, u64::MAX, None);
        let first = mid();
        once(&log, "ann", "c-1", first).await;
        // No close: as after a SIGKILL, the file is all there is.
        std::mem::forget(log);

        let log = open(&path, u64::MAX, None);
        assert!(matches!(
            once(&log, "ann", "c-1", mid()).await,
            Once::Existing { mid, .. } if mid == first
        ));
        assert_eq!(log.len("t").unwrap(), 1, "nothing appended again");
    }

    #[tokio::test]
    async fn beyond_the_bound_the_oldest_entries_go() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir.path().join("bus.db"), 2, None);
        for client_id in ["c-1", "c-2", "c-3", "c-4"] {
            once(&log, "ann", client_id, mid()).await;
        }
        // c-1 went to keep two entries: the id counts as new again.
        let fresh = mid();
        assert_eq!(appended_mid(once(&log, "ann", "c-1", fresh).await), fresh);
        // c-4 is still kept.
        assert!(matches!(
            once(&log, "ann", "c-4", mid()).await,
            Once::Existing { .. }
        ));
    }

    #[tokio::test]
    async fn the_entries_of_an_earlier_dedup_file_move_into_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dedup.db");
        let (confirmed, unconfirmed) = (mid(), mid());
        {
            let old = SqliteDedup::open(&file, Duration::from_secs(3600), u64::MAX).unwrap();
            let ann = UserId::parse("ann").unwrap();
            let (c1, c2) = (
                ClientId::parse("c-1").unwrap(),
                ClientId::parse("c-2").unwrap(),
            );
            let ts = confirmed.timestamp_ms();
            old.reserve(&ann, &c1, confirmed, ts).await.unwrap();
            old.confirm(&ann, &c1, confirmed, ts).await.unwrap();
            // Reserved, and perhaps produced, when that process stopped.
            let ts = unconfirmed.timestamp_ms();
            old.reserve(&ann, &c2, unconfirmed, ts).await.unwrap();
        }

        let log = open(&dir.path().join("bus.db"), u64::MAX, Some(file.clone()));
        assert!(!file.exists(), "the old file is removed once imported");
        assert!(matches!(
            once(&log, "ann", "c-1", mid()).await,
            Once::Existing { mid, .. } if mid == confirmed
        ));
        // Maybe produced before: produced again, under its first mid.
        assert_eq!(
            appended_mid(once(&log, "ann", "c-2", mid()).await),
            unconfirmed
        );
        assert_eq!(payloads(&log), vec![format!("c-2 {unconfirmed}")]);
        // Now confirmed: a further retry appends nothing.
        assert!(matches!(
            once(&log, "ann", "c-2", mid()).await,
            Once::Existing { mid, .. } if mid == unconfirmed
        ));
    }
}
