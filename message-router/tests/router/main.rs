//! message-router on both buses (the embedded log, and Apache Kafka at
//! `DAK_TEST_KAFKA_BROKERS`): inbound events in, routed events out, keyed by
//! recipient, garbage skipped without stalling.

use std::time::Duration;

use dak_runtime::bus::{Bus, KafkaConfig, Log, LogOptions, Topics};
use dak_runtime::config::KafkaArgs;
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::Reporter;
use dak_wire::event::{self, Ack, DeliverEvent, InboundEvent, Message};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use message_router::MessageRouter;
use serde_json::value::RawValue;

fn message(from: &str, to: &str, seq: u32) -> Message {
    Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse(format!("c-{seq}")).unwrap(),
        from: UserId::parse(from).unwrap(),
        from_device: DeviceId::default_device(),
        to: to.into(),
        chat: ChatKind::Direct,
        body: Some(RawValue::from_string(seq.to_string()).unwrap()),
        ephemeral: false,
        notice: None,
        ts: 1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(
        &dir.path().join("bus.db"),
        LogOptions {
            partitions: 4,
            ..LogOptions::default()
        },
    )
    .unwrap();
    let topics = Topics::with_prefix(&format!("r{}.", ulid::Ulid::new()));
    routes_messages_and_acks_to_the_recipients_stream_in_order(Bus::log(log, topics)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_on_kafka() {
    let brokers = std::env::var("DAK_TEST_KAFKA_BROKERS")
        .expect("DAK_TEST_KAFKA_BROKERS names the test Kafka (scripts/test sets it)");
    let args = KafkaArgs {
        brokers: Some(brokers.clone()),
        topic_prefix: format!("r{}.", ulid::Ulid::new()),
        partitions: Some(4),
        replication: 1,
        linger_ms: None,
        fetch_wait_ms: None,
        session_timeout_ms: 6_000,
        ..KafkaArgs::default()
    };
    routes_messages_and_acks_to_the_recipients_stream_in_order(Bus::kafka(
        KafkaConfig::new(brokers, &args).unwrap(),
    ))
    .await;
}

async fn routes_messages_and_acks_to_the_recipients_stream_in_order(bus: Bus) {
    bus.create_topics().await.unwrap();
    let producer = bus.producer().unwrap();
    let kafka = &bus;

    let shutdown = Shutdown::new();
    let status = Reporter::on_bus(producer.clone(), &bus.topics().status);
    let router = MessageRouter::build(&bus, producer.clone(), status).unwrap();
    let running = tokio::spawn(router.run(shutdown.clone()));

    // 50 messages from alice to bob, garbage in the middle, then bob's ack.
    let mut mids = Vec::new();
    for seq in 0..50 {
        if seq == 25 {
            producer
                .send(&kafka.topics().inbound, "alice", b"{not an event")
                .await
                .unwrap();
        }
        let m = message("alice", "bob", seq);
        mids.push(m.mid);
        producer
            .send(
                &kafka.topics().inbound,
                "alice",
                &event::encode(&InboundEvent::Message(m)),
            )
            .await
            .unwrap();
    }
    let ack = Ack {
        user: UserId::parse("bob").unwrap(),
        device: DeviceId::parse("phone").unwrap(),
        mids: vec![mids[0]],
    };
    producer
        .send(
            &kafka.topics().inbound,
            "bob",
            &event::encode(&InboundEvent::Ack(ack.clone())),
        )
        .await
        .unwrap();

    let consumer = bus
        .consumer(
            &bus.topics().group("router-test-reader"),
            &[&bus.topics().deliver],
        )
        .unwrap();
    let reading = Shutdown::new();

    let mut routed = Vec::new();
    let mut acks = Vec::new();
    let mut records = std::collections::VecDeque::new();
    while routed.len() < 50 || acks.is_empty() {
        if records.is_empty() {
            let batch =
                tokio::time::timeout(Duration::from_secs(45), consumer.next_batch(100, &reading))
                    .await
                    .expect("routed events within 45 s")
                    .unwrap();
            records.extend(batch);
            continue;
        }
        let record = records.pop_front().unwrap();
        assert_eq!(record.key, b"bob", "keyed by the recipient");
        match event::decode::<DeliverEvent>(&record.payload).unwrap() {
            DeliverEvent::Message(d) => {
                assert_eq!(d.recipient.as_str(), "bob");
                routed.push(d.message.mid);
            }
            DeliverEvent::Ack(a) => acks.push(a),
            other => panic!("nothing else was sent: {other:?}"),
        }
    }
    assert_eq!(
        routed, mids,
        "every message once, in order, past the garbage"
    );
    assert_eq!(acks, vec![ack]);

    shutdown.cancel();
    running.await.unwrap().unwrap();
}
