//! The servers under dak fail while one user streams messages to another: the
//! Kafka broker is killed (SIGKILL) and started again on the same log
//! directory, or Redis is killed and started again on its append-only file.
//! Each service runs as its own process. Every accepted message must reach the
//! recipient's device (which acks it) or its inbox; a client id resent by the
//! sender's outbox keeps its mid; and no mid reaches the device twice before
//! the fault.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{kafka, rest_sync_all, token, Client, Server, Services};

/// Messages streamed; the fault comes after a third of them were accepted.
const MESSAGES: u64 = 300;
/// Sends a client keeps unanswered, as an app's outbox would.
const WINDOW: usize = 32;
/// How long the failed server stays down.
const DOWNTIME: Duration = Duration::from_secs(2);

/// The server killed mid-stream.
enum Fault {
    Kafka(Server),
    Redis(Server),
}

impl Fault {
    fn server(&mut self) -> &mut Server {
        match self {
            Fault::Kafka(server) | Fault::Redis(server) => server,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_broker_killed_mid_stream_loses_nothing() {
    stream_through(Fault::Kafka(Server::kafka().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_stream_loses_nothing() {
    stream_through(Fault::Redis(Server::redis().await)).await;
}

/// Each delivery of a mid to bob's device, with when it arrived.
type Deliveries = Arc<Mutex<BTreeMap<String, Vec<(Instant, u64)>>>>;

async fn stream_through(mut fault: Fault) {
    let (brokers, redis_url) = match &fault {
        Fault::Kafka(broker) => (broker.brokers(), crate::support::redis_url()),
        Fault::Redis(redis) => (kafka(), redis.url()),
    };
    let services = Services::new(
        &brokers,
        &[
            ("DAK_REDIS_URL", &redis_url),
            ("DAK_WS_RATE_LIMIT", "0"),
            ("DAK_ACK_TIMEOUT", "2s"),
            ("DAK_DELIVERY_RETRIES", "5"),
        ],
    );
    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let (_persistence, sync) = services.start_persistence().await;
    let (_gateway, public) = services.start_ws_gateway().await;

    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    let bob = Client::connect(public, &token("bob", "phone")).await;
    let deliveries: Deliveries = Default::default();
    let receiving = tokio::spawn(receive(bob, deliveries.clone()));

    // Alice's outbox: every message is sent until it is accepted; a refusal
    // (`unavailable` while the fault lasts) sends the same id again.
    let mut unsent: VecDeque<u64> = (0..MESSAGES).collect();
    let mut unanswered = HashSet::new();
    let mut accepted: HashMap<String, String> = HashMap::new();
    let mut fault_at = None;
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(180);
    while accepted.len() < MESSAGES as usize {
        assert!(
            Instant::now() < deadline,
            "{} of {MESSAGES} accepted",
            accepted.len()
        );
        while unanswered.len() < WINDOW {
            let Some(seq) = unsent.pop_front() else { break };
            alice
                .send_message(&format!("m-{seq}"), "bob", json!({ "seq": seq }))
                .await;
            unanswered.insert(seq);
        }
        let frame = alice.recv().await;
        match frame["type"].as_str() {
            Some("accepted") => {
                let id = frame["id"].as_str().unwrap().to_owned();
                let mid = frame["mid"].as_str().unwrap().to_owned();
                let seq: u64 = id["m-".len()..].parse().unwrap();
                unanswered.remove(&seq);
                if let Some(earlier) = accepted.insert(id.clone(), mid.clone()) {
                    assert_eq!(earlier, mid, "{id} accepted under two mids");
                }
            }
            Some("error") => {
                assert_eq!(frame["code"], "unavailable", "{frame}");
                // Without an id it answers an ack (of a receipt), which the
                // receipt's redelivery will ask for again.
                if let Some(id) = frame["id"].as_str() {
                    let seq: u64 = id["m-".len()..].parse().unwrap();
                    unanswered.remove(&seq);
                    unsent.push_back(seq);
                    refused += 1;
                }
            }
            Some("receipt") => alice.ack(&[frame["rid"].as_str().unwrap()]).await,
            _ => panic!("alice got {frame}"),
        }
        if fault_at.is_none() && accepted.len() as u64 >= MESSAGES / 3 {
            fault_at = Some(Instant::now());
            fault.server().kill();
            tokio::time::sleep(DOWNTIME).await;
            fault.server().restart().await;
        }
    }
    let fault_at = fault_at.expect("the fault happened");
    tracing::info!(refused, "every message accepted");

    // Every accepted message reaches bob's device or his inbox.
    let mids: HashSet<String> = accepted.values().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let missing = loop {
        let delivered: HashSet<String> = deliveries.lock().unwrap().keys().cloned().collect();
        let stored: HashSet<String> = rest_sync_all(sync, "bob", "phone", 500)
            .await
            .iter()
            .map(|m| m["mid"].as_str().unwrap().to_owned())
            .collect();
        let missing: Vec<&String> = mids
            .iter()
            .filter(|m| !delivered.contains(*m) && !stored.contains(*m))
            .collect();
        if missing.is_empty() || Instant::now() >= deadline {
            break missing.len();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(!receiving.is_finished(), "bob's socket closed");
    receiving.abort();
    assert_eq!(missing, 0, "accepted messages neither delivered nor stored");

    // Before the fault, each mid arrived once, in the order sent.
    let deliveries = deliveries.lock().unwrap();
    let mut before: Vec<(Instant, u64)> = Vec::new();
    for (mid, arrivals) in deliveries.iter() {
        if let Some(again) = arrivals.get(1) {
            assert!(
                again.0 >= fault_at,
                "{mid} delivered twice before the fault"
            );
        }
        if arrivals[0].0 < fault_at {
            before.push(arrivals[0]);
        }
    }
    before.sort();
    let seqs: Vec<u64> = before.iter().map(|(_, seq)| *seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "out of order before the fault: {seqs:?}"
    );
    assert!(!seqs.is_empty(), "bob received messages before the fault");
}

/// Bob's device: acks every message and records when each mid arrived, until
/// its socket closes or the task is aborted.
async fn receive(mut bob: Client, deliveries: Deliveries) {
    while let Some(frame) = bob.recv_within(Duration::from_secs(3600)).await {
        if frame["type"] != "message" {
            continue;
        }
        let mid = frame["mid"].as_str().unwrap().to_owned();
        let seq = frame["body"]["seq"].as_u64().unwrap();
        deliveries
            .lock()
            .unwrap()
            .entry(mid.clone())
            .or_default()
            .push((Instant::now(), seq));
        bob.ack(&[&mid]).await;
    }
}
