//! Offline delivery: the inbox, REST sync, replay on connect, several devices.

use std::time::Duration;

use serde_json::json;

use crate::support::{
    register_device, rest_sync, rest_sync_all, send_seq, seqs, token, wait_for_inbox, Client,
    Options, Stack,
};

fn unlimited() -> Options {
    Options {
        extra: vec!["--rate-limit".into(), "0".into()],
        ..Options::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_finds_500_messages_in_its_inbox_syncs_them_and_gets_them_replayed() {
    let stack = Stack::start(unlimited()).await;
    register_device(stack.public, "bob", "phone").await;
    let mut alice = stack.connect("alice", "phone").await;
    send_seq(&mut alice, "bob", 0..500).await;

    // All 500 stored, in order, and REST pages through them.
    let stored = wait_for_inbox(stack.public, "bob", "phone", 500).await;
    assert_eq!(seqs(&stored), (0..500).collect::<Vec<_>>());
    let paged = rest_sync_all(stack.public, "bob", "phone", 100).await;
    assert_eq!(seqs(&paged), (0..500).collect::<Vec<_>>());
    assert_eq!(paged[0]["type"], "message");
    assert_eq!(paged[0]["from"], "alice");
    assert!(paged[0]["mid"].is_string() && paged[0]["ts"].is_u64());

    // Connecting replays them, oldest first, then `sync.done`.
    let mut bob = Client::connect_raw(stack.public, &token("bob", "phone")).await;
    let replayed = bob.replay().await;
    assert_eq!(seqs(&replayed), (0..500).collect::<Vec<_>>());
    let mids: Vec<&str> = replayed
        .iter()
        .map(|f| f["mid"].as_str().unwrap())
        .collect();
    for chunk in mids.chunks(100) {
        bob.ack(chunk).await;
    }
    // Acks empty the inbox.
    wait_for_inbox(stack.public, "bob", "phone", 0).await;

    // Live again: the next message comes straight to the socket, once.
    alice
        .send_message("after", "bob", json!({"seq": 500}))
        .await;
    alice.expect("accepted").await;
    let frame = bob.expect("message").await;
    assert_eq!(frame["body"]["seq"], 500);
    bob.ack(&[frame["mid"].as_str().unwrap()]).await;
    assert!(bob.next_within(Duration::from_millis(500)).await.is_none());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_arriving_during_a_replay_are_not_lost_duplicated_or_reordered() {
    let stack = Stack::start(unlimited()).await;
    register_device(stack.public, "bob", "phone").await;
    let mut alice = stack.connect("alice", "phone").await;
    send_seq(&mut alice, "bob", 0..300).await;
    wait_for_inbox(stack.public, "bob", "phone", 300).await;

    // Bob connects while alice keeps sending.
    let public = stack.public;
    let sender = tokio::spawn(async move {
        send_seq(&mut alice, "bob", 300..600).await;
        alice
    });
    let mut bob = Client::connect_raw(public, &token("bob", "phone")).await;
    let mut received = Vec::new();
    let mut sync_done_at = None;
    while received.len() < 600 {
        let frame = bob.recv().await;
        match frame["type"].as_str() {
            Some("sync.done") => sync_done_at = Some(received.len()),
            Some("message") => {
                bob.ack(&[frame["mid"].as_str().unwrap()]).await;
                received.push(frame);
            }
            _ => panic!("unexpected {frame}"),
        }
    }
    sender.await.unwrap();
    assert_eq!(
        seqs(&received),
        (0..600).collect::<Vec<_>>(),
        "lost, duplicated or reordered"
    );
    let sync_done_at = sync_done_at.expect("sync.done arrived");
    assert!(
        sync_done_at >= 300,
        "sync.done came after {sync_done_at} messages, before the stored ones"
    );
    assert!(
        bob.next_within(Duration::from_millis(500)).await.is_none(),
        "a duplicate arrived"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_user_get_and_ack_independently() {
    let stack = Stack::start(Options::default()).await;
    register_device(stack.public, "bob", "phone").await;
    register_device(stack.public, "bob", "tablet").await;
    let mut alice = stack.connect("alice", "phone").await;
    send_seq(&mut alice, "bob", 0..10).await;
    wait_for_inbox(stack.public, "bob", "phone", 10).await;
    wait_for_inbox(stack.public, "bob", "tablet", 10).await;

    let mut phone = Client::connect_raw(stack.public, &token("bob", "phone")).await;
    let replayed = phone.replay().await;
    assert_eq!(seqs(&replayed), (0..10).collect::<Vec<_>>());
    let mids: Vec<&str> = replayed
        .iter()
        .map(|f| f["mid"].as_str().unwrap())
        .collect();
    phone.ack(&mids).await;
    wait_for_inbox(stack.public, "bob", "phone", 0).await;
    // The tablet's copies are its own.
    assert_eq!(
        seqs(&rest_sync_all(stack.public, "bob", "tablet", 100).await),
        (0..10).collect::<Vec<_>>()
    );

    // A live message reaches the connected phone directly and the tablet's inbox.
    send_seq(&mut alice, "bob", 10..11).await;
    let live = phone.expect("message").await;
    assert_eq!(live["body"]["seq"], 10);
    phone.ack(&[live["mid"].as_str().unwrap()]).await;
    wait_for_inbox(stack.public, "bob", "tablet", 11).await;

    let mut tablet = Client::connect_raw(stack.public, &token("bob", "tablet")).await;
    let replayed = tablet.replay().await;
    assert_eq!(seqs(&replayed), (0..11).collect::<Vec<_>>());
    let mids: Vec<&str> = replayed
        .iter()
        .map(|f| f["mid"].as_str().unwrap())
        .collect();
    tablet.ack(&mids).await;
    wait_for_inbox(stack.public, "bob", "tablet", 0).await;
    assert!(phone
        .next_within(Duration::from_millis(300))
        .await
        .is_none());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_a_user_without_devices_go_to_the_first_device() {
    let stack = Stack::start(Options::default()).await;
    let mut alice = stack.connect("alice", "phone").await;
    send_seq(&mut alice, "newcomer", 0..3).await;
    // The user-level inbox is not any device's yet; wait until the messages are
    // stored by watching it from the first device's point of view once they are.
    let deadline = tokio::time::Instant::now() + crate::support::PATIENCE;
    let mut first = loop {
        // REST sync takes the user-level inbox over too; use a throwaway device
        // name to look without taking it over.
        let (_, page) = rest_sync(stack.public, "newcomer", "peek", "").await;
        if !page["messages"].as_array().unwrap().is_empty() {
            break page;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing stored for the newcomer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // The peek above took the inbox over for device `peek`: it got all three.
    let mut all = first["messages"].as_array().unwrap().clone();
    while all.len() < 3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        first = rest_sync(stack.public, "newcomer", "peek", "").await.1;
        all = first["messages"].as_array().unwrap().clone();
        assert!(tokio::time::Instant::now() < deadline);
    }
    assert_eq!(seqs(&all), vec![0, 1, 2]);
    // A device that connects later does not get them a second time.
    let mut phone = Client::connect_raw(stack.public, &token("newcomer", "phone")).await;
    assert!(phone.replay().await.is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_connecting_device_gets_what_waited_for_its_user() {
    let stack = Stack::start(Options::default()).await;
    let mut alice = stack.connect("alice", "phone").await;
    send_seq(&mut alice, "brand-new", 0..3).await;
    let offline = stack.offline();
    for _ in 0..3 {
        offline.next().await;
    }
    let mut phone = Client::connect_raw(stack.public, &token("brand-new", "phone")).await;
    assert_eq!(seqs(&phone.replay().await), vec![0, 1, 2]);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_and_push_token_refuse_bad_input() {
    let stack = Stack::start(Options::default()).await;
    for query in [
        "?after=garbage",
        "?after=42",
        "?limit=0",
        "?limit=501",
        "?limit=many",
        "?limit=-1",
    ] {
        let (status, body) = rest_sync(stack.public, "bob", "phone", query).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{query}");
    }
    let (status, body) = rest_sync(stack.public, "bob", "phone", "?limit=500").await;
    assert_eq!(
        (status, &body["messages"], &body["next"]),
        (200, &json!([]), &json!(null))
    );
    let unauthenticated = reqwest::get(format!("http://{}/v1/messages", stack.public))
        .await
        .unwrap();
    assert_eq!(unauthenticated.status().as_u16(), 401);

    let http = reqwest::Client::new();
    let put = |device: &str, body: serde_json::Value| {
        http.put(format!(
            "http://{}/v1/devices/{device}/push-token",
            stack.public
        ))
        .bearer_auth(token("bob", "phone"))
        .json(&body)
        .send()
    };
    let cases = [
        (
            "phone",
            json!({"token": "abc", "platform": "blackberry"}),
            400,
        ),
        ("phone", json!({"token": "", "platform": "ios"}), 400),
        (
            "phone",
            json!({"token": "has space", "platform": "ios"}),
            400,
        ),
        (
            "phone",
            json!({"token": "x".repeat(5000), "platform": "ios"}),
            400,
        ),
        ("phone", json!({"platform": "ios"}), 400),
        ("tablet", json!({"token": "abc", "platform": "ios"}), 403),
        (
            "bad%20device",
            json!({"token": "abc", "platform": "ios"}),
            400,
        ),
        ("phone", json!({"token": "abc", "platform": "ios"}), 202),
    ];
    for (device, body, status) in cases {
        let response = put(device, body.clone()).await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{device} {body:.60}");
    }
    stack.stop().await;
}

/// A device that connects and does not read its replay holds up only itself:
/// another device connecting meanwhile gets its inbox and `sync.done` at once.
/// (The replay used to run inside persistence's consumer, which waited up to
/// 30 s for the stalled socket before it took the next record.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_read_its_replay_delays_nobody_else() {
    let stack = Stack::start(Options {
        extra: ["--rate-limit", "0", "--send-queue", "4"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    })
    .await;
    register_device(stack.public, "bob", "phone").await;
    register_device(stack.public, "carol", "phone").await;
    let mut alice = stack.connect("alice", "phone").await;
    // More than bob's socket queue and the TCP buffers between hold.
    let pad = "x".repeat(60_000);
    for seq in 0..400 {
        alice
            .send_message(&format!("b-{seq}"), "bob", json!({"seq": seq, "pad": pad}))
            .await;
        alice.expect("accepted").await;
    }
    alice.send_message("c-0", "carol", json!({"seq": 0})).await;
    alice.expect("accepted").await;
    wait_for_inbox(stack.public, "bob", "phone", 400).await;
    wait_for_inbox(stack.public, "carol", "phone", 1).await;

    // Bob's replay has begun once his first frame arrives; he reads no more.
    let mut bob = Client::connect_raw(stack.public, &token("bob", "phone")).await;
    assert_eq!(bob.recv().await["body"]["seq"], 0);

    let mut carol = Client::connect_raw(stack.public, &token("carol", "phone")).await;
    let replayed = tokio::time::timeout(Duration::from_secs(5), carol.replay())
        .await
        .expect("carol's replay waited for bob's socket");
    assert_eq!(seqs(&replayed), [0]);

    // Bob, reading again, gets the rest of his inbox in order.
    let rest = bob.replay().await;
    assert_eq!(seqs(&rest), (1..400).collect::<Vec<_>>());
    stack.stop().await;
}
