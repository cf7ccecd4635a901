use std::time::Duration;

use dak_wire::event::{OfflineEvent, OfflineReason};
use serde_json::json;

use crate::support::{exchange, rest_send, token, Options, Stack};

fn unlimited() -> Options {
    Options {
        extra: vec!["--rate-limit".into(), "0".into()],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_exchange_1000_messages_in_order_on_the_embedded_stores() {
    let stack = Stack::start(unlimited()).await;
    let alice = stack.connect("alice", "phone").await;
    let bob = stack.connect("bob", "phone").await;
    exchange(alice, bob, 500).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_exchange_1000_messages_in_order_on_redis() {
    let stack = Stack::start(Options {
        redis: true,
        ..unlimited()
    })
    .await;
    let alice = stack.connect("alice", "phone").await;
    let bob = stack.connect("bob", "phone").await;
    exchange(alice, bob, 500).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_send_reaches_a_socket_and_rest_ack_clears_it() {
    let stack = Stack::start_alone(Options::default()).await;
    let mut bob = stack.connect("bob", "laptop").await;
    let (status, answer) = rest_send(
        stack.public,
        &token("alice", "phone"),
        json!({"messages": [{"id": "r-1", "to": "bob", "chat": "direct", "body": {"text": "from REST"}}]}),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["rejected"], json!([]));
    let mid = answer["accepted"][0]["mid"].as_str().unwrap().to_owned();

    let frame = bob.expect("message").await;
    assert_eq!(frame["mid"], mid.as_str());
    assert_eq!(frame["id"], "r-1");
    assert_eq!(frame["from"], "alice");
    assert_eq!(frame["body"], json!({"text": "from REST"}));
    assert_eq!(frame["ts"], answer["accepted"][0]["ts"]);

    let acked = reqwest::Client::new()
        .post(format!("http://{}/v1/acks", stack.public))
        .bearer_auth(token("bob", "laptop"))
        .json(&json!({"mids": [mid]}))
        .send()
        .await
        .unwrap();
    assert_eq!(acked.status().as_u16(), 202);
    wait_for_metric(&stack, "dak_messages_acked_total", 1.0).await;
    stack.stop().await;
}

async fn wait_for_metric(stack: &Stack, name: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    while stack.metric(name).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unacked_message_is_retried_then_offlined_and_a_late_ack_is_forwarded() {
    let stack = Stack::start_alone(Options {
        ack_timeout: "300ms",
        retries: 2,
        ..Options::default()
    })
    .await;
    let offline = stack.offline();
    let mut alice = stack.connect("alice", "phone").await;
    let mut bob = stack.connect("bob", "phone").await;
    alice
        .send_message("c-1", "bob", json!("are you there?"))
        .await;
    let mid = alice.expect("accepted").await["mid"]
        .as_str()
        .unwrap()
        .to_owned();

    // First send plus two retries, all the same mid; bob never acks.
    for attempt in 0..3 {
        let frame = bob.expect("message").await;
        assert_eq!(frame["mid"], mid.as_str(), "attempt {attempt}");
    }
    match offline.next().await {
        OfflineEvent::Store {
            user,
            device,
            reason,
            message,
        } => {
            assert_eq!(user.as_str(), "bob");
            assert_eq!(device.unwrap().as_str(), "phone");
            assert_eq!(reason, OfflineReason::AckTimeout);
            assert_eq!(message.mid.to_string(), mid);
            assert_eq!(message.body.as_ref().unwrap().get(), r#""are you there?""#);
        }
        other => panic!("expected a store event, got {other:?}"),
    }
    // No fourth send.
    assert!(bob.next_within(Duration::from_millis(900)).await.is_none());
    assert_eq!(stack.metric("dak_messages_retried_total").await, 2.0);

    // The ack that comes too late is forwarded so storage can drop the message.
    bob.ack(&[&mid]).await;
    match offline.next().await {
        OfflineEvent::Drop(ack) => {
            assert_eq!(ack.user.as_str(), "bob");
            assert_eq!(ack.device.as_str(), "phone");
            assert_eq!(
                ack.mids.iter().map(|m| m.to_string()).collect::<Vec<_>>(),
                vec![mid]
            );
        }
        other => panic!("expected a drop event, got {other:?}"),
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_a_user_without_devices_goes_offline_at_once() {
    let stack = Stack::start(Options::default()).await;
    let offline = stack.offline();
    let mut alice = stack.connect("alice", "phone").await;
    alice.send_message("c-1", "nobody-yet", json!(1)).await;
    alice.expect("accepted").await;
    match offline.next().await {
        OfflineEvent::Store {
            user,
            device,
            reason,
            ..
        } => {
            assert_eq!(user.as_str(), "nobody-yet");
            assert_eq!(device, None);
            assert_eq!(reason, OfflineReason::NoDevice);
        }
        other => panic!("unexpected {other:?}"),
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_device_that_disconnected_gets_its_messages_offlined() {
    let stack = Stack::start_alone(Options::default()).await;
    let offline = stack.offline();
    let bob = stack.connect("bob", "tablet").await;
    drop(bob);
    let mut alice = stack.connect("alice", "phone").await;
    // The gateway notices the closed socket quickly, but not instantly.
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    while stack.metric("dak_connected_devices").await > 1.0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.send_message("c-1", "bob", json!(1)).await;
    alice.expect("accepted").await;
    match offline.next().await {
        OfflineEvent::Store { device, reason, .. } => {
            assert_eq!(device.unwrap().as_str(), "tablet");
            assert_eq!(reason, OfflineReason::NotConnected);
        }
        other => panic!("unexpected {other:?}"),
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_client_id_gets_the_same_mid_and_is_delivered_once() {
    let stack = Stack::start_alone(Options::default()).await;
    let mut alice = stack.connect("alice", "phone").await;
    let mut bob = stack.connect("bob", "phone").await;

    alice.send_message("outbox-1", "bob", json!("once")).await;
    let first = alice.expect("accepted").await;
    // The app reconnects and its outbox sends the same message again, over the
    // WebSocket and over REST.
    drop(alice);
    let mut alice = stack.connect("alice", "phone").await;
    alice.send_message("outbox-1", "bob", json!("once")).await;
    let second = alice.expect("accepted").await;
    assert_eq!(first["mid"], second["mid"]);
    assert_eq!(first["ts"], second["ts"]);
    let (_, answer) = rest_send(
        stack.public,
        &token("alice", "phone"),
        json!({"messages": [{"id": "outbox-1", "to": "bob", "body": "once"}]}),
    )
    .await;
    assert_eq!(answer["accepted"][0]["mid"], first["mid"]);

    // A marker sent after the retries: when it arrives, any duplicate would have too.
    alice.send_message("outbox-2", "bob", json!("marker")).await;
    alice.expect("accepted").await;
    let delivered = bob.expect("message").await;
    assert_eq!(delivered["mid"], first["mid"]);
    bob.ack(&[delivered["mid"].as_str().unwrap()]).await;
    let next = bob.expect("message").await;
    assert_eq!(
        next["body"], "marker",
        "the retried message was delivered twice"
    );
    assert_eq!(stack.metric("dak_duplicate_sends_total").await, 2.0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_and_its_device_goes_offline() {
    let stack = Stack::start_alone(Options {
        ping_interval: "200ms",
        idle_timeout: "600ms",
        ..Options::default()
    })
    .await;
    let offline = stack.offline();
    let bob = stack.connect("bob", "phone").await;
    // Bob's phone drops off the network: its socket stays open, nothing answers
    // the pings. (Not reading the stream means no pong is sent.)
    let half_open = bob.into_inner();
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    while stack.metric("dak_connected_devices").await > 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the silent socket was never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = stack.connect("alice", "phone").await;
    alice.send_message("c-1", "bob", json!(1)).await;
    alice.expect("accepted").await;
    match offline.next().await {
        OfflineEvent::Store { reason, .. } => assert_eq!(reason, OfflineReason::NotConnected),
        other => panic!("unexpected {other:?}"),
    }
    drop(half_open);
    stack.stop().await;
}

/// The gateway answers a client's close frame, so the client sees a clean
/// close (a browser reports one without an answer as 1006, abnormal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_closes_gets_its_close_answered() {
    let stack = Stack::start(Options::default()).await;
    let mut bob = stack.connect("bob", "phone").await;
    bob.close(1000).await;
    assert_eq!(bob.closed().await, Some(1000));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_device_replaces_its_old_socket() {
    let stack = Stack::start(Options::default()).await;
    let mut old = stack.connect("bob", "phone").await;
    let mut new = stack.connect("bob", "phone").await;
    assert_eq!(old.closed().await, Some(4000));
    let mut alice = stack.connect("alice", "phone").await;
    alice
        .send_message("c-1", "bob", json!("to the new socket"))
        .await;
    let frame = new.expect("message").await;
    assert_eq!(frame["body"], "to the new socket");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_authenticate_with_the_query_token() {
    let stack = Stack::start(Options::default()).await;
    let mut client =
        crate::support::Client::connect_with_query(stack.public, &token("carol", "web")).await;
    client.send(json!({"type": "ping"})).await;
    client.expect("pong").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served() {
    let stack = Stack::start(Options::default()).await;
    let livez = reqwest::get(format!("http://{}/livez", stack.admin))
        .await
        .unwrap();
    assert_eq!(livez.status().as_u16(), 200);
    let readyz = reqwest::get(format!("http://{}/readyz", stack.admin))
        .await
        .unwrap();
    assert_eq!(readyz.status().as_u16(), 200);
    let text = reqwest::get(format!("http://{}/metrics", stack.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("dak_connected_devices"), "{text}");
    // Consumer lag: reported by each consumer of the embedded bus.
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    loop {
        let text = reqwest::get(format!("http://{}/metrics", stack.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(&format!(
            "dak_consumer_lag{{group=\"{}dak.session\"",
            stack.topic_prefix
        )) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no consumer lag reported: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.stop().await;
}

/// Redis loses everything (a restart without persistence, a failover to an
/// empty replica): the gateway writes back the presence of its sockets with
/// its next heartbeat, and a connected device gets new messages live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_heals_within_a_heartbeat_after_redis_lost_its_data() {
    let stack = Stack::start(Options {
        redis: true,
        extra: ["--rate-limit", "0", "--presence-ttl", "3s"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await;
    let mut alice = stack.connect("alice", "phone").await;
    let mut bob = stack.connect("bob", "phone").await;

    let client = redis::Client::open(crate::support::redis_url()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", stack.redis_prefix))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the stack keeps its state in Redis");
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .unwrap();

    // Written back by the next heartbeat (every second here).
    let presence = format!("{}:{{bob}}:presence", stack.redis_prefix);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let entry: Option<String> = redis::cmd("HGET")
            .arg(&presence)
            .arg("phone")
            .query_async(&mut redis)
            .await
            .unwrap();
        if let Some(entry) = entry {
            assert!(entry.ends_with(" 1"), "bob's socket is live: {entry}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "bob's presence was not written back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    alice
        .send_message("after", "bob", json!({"text": "still here?"}))
        .await;
    alice.expect("accepted").await;
    let frame = bob.expect("message").await;
    assert_eq!(frame["body"]["text"], "still here?");
    stack.stop().await;
}
