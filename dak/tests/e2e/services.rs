//! Each service in its own process, against Apache Kafka and Redis.

use std::time::Duration;

use dak_runtime::presence::{Presence, RedisPresence};
use dak_wire::event::{OfflineEvent, OfflineReason};
use serde_json::json;

use crate::support::{exchange, kafka, rest_send, token, Client, Services, PATIENCE};

async fn redis(prefix: &str) -> RedisPresence {
    let conn = dak_runtime::redis::connect(&crate::support::redis_url())
        .await
        .expect("redis");
    RedisPresence::new(conn, prefix)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_services_deliver_in_order_with_rest_and_dedup() {
    let brokers = kafka();
    let services = Services::new(&brokers, &[("DAK_WS_RATE_LIMIT", "0")]);
    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let _persistence = services.start_persistence().await;
    let (mut gateway, public) = services.start_ws_gateway().await;
    let (_rest, rest_public) = services.start_rest_gateway().await;

    let alice = Client::connect(public, &token("alice", "phone")).await;
    let bob = Client::connect(public, &token("bob", "phone")).await;
    let (_alice, mut bob) = exchange(alice, bob, 500).await;

    // REST reaches the socket; the same client id sent twice is delivered once.
    for _ in 0..2 {
        let (status, answer) = rest_send(
            rest_public,
            &token("alice", "tablet"),
            json!({"messages": [{"id": "rest-1", "to": "bob", "body": "via REST"}]}),
        )
        .await;
        assert_eq!(status, 202, "{answer}");
    }
    let frame = bob.expect("message").await;
    assert_eq!(frame["body"], "via REST");
    bob.ack(&[frame["mid"].as_str().unwrap()]).await;
    assert!(
        bob.next_within(Duration::from_secs(2)).await.is_none(),
        "delivered twice"
    );

    // SIGTERM: the gateway closes its sockets with "going away" and exits cleanly.
    let status = gateway.terminate();
    assert!(status.success(), "ws-gateway exited with {status}");
    assert_eq!(bob.closed().await, Some(1001));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_services_retry_then_offline_then_forward_a_late_ack() {
    let brokers = kafka();
    let services = Services::new(
        &brokers,
        &[("DAK_ACK_TIMEOUT", "400ms"), ("DAK_DELIVERY_RETRIES", "2")],
    );
    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let _persistence = services.start_persistence().await;
    let (_gateway, public) = services.start_ws_gateway().await;
    let offline = services.offline();

    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    let mut bob = Client::connect(public, &token("bob", "phone")).await;
    alice.send_message("c-1", "bob", json!("hello?")).await;
    let mid = alice.expect("accepted").await["mid"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..3 {
        assert_eq!(bob.expect("message").await["mid"], mid.as_str());
    }
    match offline.next().await {
        OfflineEvent::Store {
            reason, message, ..
        } => {
            assert_eq!(reason, OfflineReason::AckTimeout);
            assert_eq!(message.mid.to_string(), mid);
        }
        other => panic!("unexpected {other:?}"),
    }
    bob.ack(&[&mid]).await;
    match offline.next().await {
        OfflineEvent::Drop(ack) => assert_eq!(ack.mids[0].to_string(), mid),
        other => panic!("unexpected {other:?}"),
    }
}

/// Session is killed (SIGKILL) while deliveries are in flight; a new session
/// instance picks up from Kafka offsets and the in-flight store, and bob ends up
/// with every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_session_mid_delivery_loses_nothing() {
    let brokers = kafka();
    let services = Services::new(
        &brokers,
        &[
            ("DAK_ACK_TIMEOUT", "1s"),
            ("DAK_DELIVERY_RETRIES", "20"),
            ("DAK_WS_RATE_LIMIT", "0"),
            // The dead instance's partitions move after this (6 s is the
            // broker's minimum).
            ("DAK_KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    let _router = services.start("message-router", &[]).await;
    let (mut session, _) = services.start("session", &[]).await;
    let _persistence = services.start_persistence().await;
    let (_gateway, public) = services.start_ws_gateway().await;
    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    let mut bob = Client::connect(public, &token("bob", "phone")).await;

    const N: usize = 200;
    let mut sent = std::collections::BTreeSet::new();
    for i in 0..N {
        alice.send_message(&format!("k-{i}"), "bob", json!(i)).await;
    }
    // As an app's outbox does, a message refused `unavailable` (a produce
    // that timed out on a loaded broker) is sent again under its id.
    while sent.len() < N {
        let frame = alice.expect_any().await;
        match frame["type"].as_str() {
            Some("accepted") => {
                sent.insert(frame["mid"].as_str().unwrap().to_owned());
            }
            Some("error") if frame["code"] == "unavailable" => {
                let id = frame["id"].as_str().unwrap().to_owned();
                let i: u64 = id["k-".len()..].parse().unwrap();
                alice.send_message(&id, "bob", json!(i)).await;
            }
            _ => panic!("alice got {frame}"),
        }
    }

    // Bob receives (without acking) until a few dozen arrived, then session dies.
    let mut received = std::collections::BTreeSet::new();
    while received.len() < 30 {
        received.insert(
            bob.expect("message").await["mid"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    session.kill();
    // Bob's app reconnects too: whatever was still queued on the old socket is
    // gone, so every message he has not seen must come from the new session's
    // retries or from its reprocessing of uncommitted offsets.
    drop(bob);
    let _replacement = services.start("session", &[]).await;
    // The new socket's replay goes through the new session, once the group gave
    // it the dead member's partitions: the session timeout plus a rebalance,
    // which on this 2-core machine under a parallel test load has taken over
    // 45 s. The wait is bounded by that protocol, not by a guess.
    // Its inbox may hold messages by then: the new session's retries find the
    // old socket gone and store what it had in flight.
    let mut bob = Client::connect_raw(public, &token("bob", "phone")).await;
    let replayed = tokio::time::timeout(Duration::from_secs(120), bob.replay())
        .await
        .expect("sync.done after the failover");
    for frame in replayed {
        received.insert(frame["mid"].as_str().unwrap().to_owned());
    }

    for mid in &received {
        bob.ack(&[mid]).await;
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !sent.is_subset(&received) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lost {} messages",
            sent.difference(&received).count()
        );
        if let Some(frame) = bob.next_within(Duration::from_secs(1)).await {
            let mid = frame["mid"].as_str().unwrap().to_owned();
            bob.ack(&[&mid]).await;
            received.insert(mid);
        }
    }
    assert_eq!(received, sent);
}

/// A ws-gateway that dies without closing its sockets leaves presence entries
/// behind; once its heartbeat expires they no longer count, and messages for its
/// devices go offline instead of to a dead address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_gateway_leaves_no_presence_after_the_expiry() {
    let brokers = kafka();
    let services = Services::new(&brokers, &[("DAK_PRESENCE_TTL", "1500ms")]);
    let presence = redis(&services.redis_prefix).await;
    let bob_id: dak_wire::UserId = "bob".parse().unwrap();

    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let _persistence = services.start_persistence().await;
    let (mut doomed, public_a) = services.start_ws_gateway().await;
    let (_survivor, public_b) = services.start_ws_gateway().await;

    let offline = services.offline();
    let bob = Client::connect(public_a, &token("bob", "phone")).await;
    let routes = presence
        .routes(std::slice::from_ref(&bob_id))
        .await
        .unwrap();
    assert!(
        routes[0][0].gateway_url.is_some(),
        "bob is present while connected"
    );

    doomed.kill();
    drop(bob);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let routes = presence
            .routes(std::slice::from_ref(&bob_id))
            .await
            .unwrap();
        if routes[0][0].gateway_url.is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "phantom presence outlived the expiry"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut alice = Client::connect(public_b, &token("alice", "phone")).await;
    alice
        .send_message("c-1", "bob", json!("while you were out"))
        .await;
    alice.expect("accepted").await;
    match offline.next().await {
        OfflineEvent::Store { device, reason, .. } => {
            assert_eq!(device.unwrap().as_str(), "phone");
            assert_eq!(reason, OfflineReason::NotConnected);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// persistence is killed while messages stream in and started again on the same
/// SQLite file; every message ends up stored once, in order, survives another
/// restart while the device never acks, and is replayed when it connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_persistence_mid_stream_loses_nothing() {
    use crate::support::{register_device, send_seq, seqs, wait_for_inbox, wait_for_inbox_within};
    let brokers = kafka();
    let services = Services::new(
        &brokers,
        &[
            ("DAK_WS_RATE_LIMIT", "0"),
            ("DAK_KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let (mut persistence, sync) = services.start_persistence().await;
    let (_gateway, public) = services.start_ws_gateway().await;
    let (_rest, rest_public) = services.start_rest_gateway().await;

    register_device(rest_public, "bob", "phone").await;
    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    send_seq(&mut alice, "bob", 0..100).await;
    persistence.kill();
    send_seq(&mut alice, "bob", 100..300).await;
    let (mut persistence, sync_again) = services.start_persistence().await;
    let _ = sync;

    // The new instance gets the killed one's partitions after the session
    // timeout and a rebalance, which under parallel test load has taken over
    // 45 s on this 2-core machine; the bound is that protocol's.
    let stored =
        wait_for_inbox_within(sync_again, "bob", "phone", 300, Duration::from_secs(120)).await;
    assert_eq!(seqs(&stored), (0..300).collect::<Vec<_>>());

    // Bob never acked: a clean restart keeps everything.
    assert!(persistence.terminate().success());
    let (_persistence, sync_third) = services.start_persistence().await;
    assert_eq!(
        seqs(&wait_for_inbox(sync_third, "bob", "phone", 300).await),
        (0..300).collect::<Vec<_>>()
    );

    let mut bob = Client::connect_raw(public, &token("bob", "phone")).await;
    assert_eq!(seqs(&bob.replay().await), (0..300).collect::<Vec<_>>());
}
