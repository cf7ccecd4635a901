//! message-router against librdkafka's mock cluster: inbound events in, routed
//! events out, keyed by recipient, garbage skipped without stalling.

use std::time::Duration;

use dak_runtime::config::KafkaArgs;
use dak_runtime::kafka::{EmbeddedKafka, KafkaConfig, Producer};
use dak_runtime::shutdown::Shutdown;
use dak_wire::event::{self, Ack, DeliverEvent, InboundEvent, Message};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use message_router::MessageRouter;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message as _;
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
async fn routes_messages_and_acks_to_the_recipients_stream_in_order() {
    let cluster = EmbeddedKafka::start().unwrap();
    let args = KafkaArgs {
        brokers: None,
        topic_prefix: format!("r{}.", ulid::Ulid::new()),
        partitions: Some(4),
        replication: 1,
        linger_ms: Some(1),
        fetch_wait_ms: Some(10),
        session_timeout_ms: 10_000,
    };
    let kafka = KafkaConfig::new(cluster.brokers().to_owned(), &args);
    cluster
        .create_topics(&kafka.topics, kafka.partitions)
        .unwrap();
    let producer = Producer::new(&kafka).unwrap();

    let shutdown = Shutdown::new();
    let router = MessageRouter::build(&kafka, producer.clone()).unwrap();
    let running = tokio::spawn(router.run(shutdown.clone()));

    // 50 messages from alice to bob, garbage in the middle, then bob's ack.
    let mut mids = Vec::new();
    for seq in 0..50 {
        if seq == 25 {
            producer
                .send(&kafka.topics.inbound, "alice", b"{not an event")
                .await
                .unwrap();
        }
        let m = message("alice", "bob", seq);
        mids.push(m.mid);
        producer
            .send(
                &kafka.topics.inbound,
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
            &kafka.topics.inbound,
            "bob",
            &event::encode(&InboundEvent::Ack(ack.clone())),
        )
        .await
        .unwrap();

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", cluster.brokers())
        .set("group.id", "router-test-reader")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&kafka.topics.deliver]).unwrap();

    let mut routed = Vec::new();
    let mut acks = Vec::new();
    while routed.len() < 50 || acks.is_empty() {
        let record = tokio::time::timeout(Duration::from_secs(45), consumer.recv())
            .await
            .expect("routed events within 45 s")
            .unwrap();
        assert_eq!(record.key(), Some(&b"bob"[..]), "keyed by the recipient");
        match event::decode::<DeliverEvent>(record.payload().unwrap()).unwrap() {
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
