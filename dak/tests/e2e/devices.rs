//! Listing and removing devices (`GET /v1/devices`, `DELETE
//! /v1/devices/{device}`), on `dak up`'s own stores and with Redis.

use serde_json::json;

use crate::support::{
    eventually, register_device, remove_device, rest_sync_all, send_seq, seqs, token,
    wait_for_inbox, Client, Options, Stack,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_loses_its_inbox_and_gets_nothing_new() {
    removal(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_loses_its_inbox_and_gets_nothing_new_with_redis() {
    removal(Options {
        redis: true,
        ..Options::default()
    })
    .await;
}

/// bob's phone and laptop are away and both hold what alice sent. From his
/// phone bob removes the laptop: its inbox is emptied, nothing newer is
/// stored for it, the phone keeps getting everything, and the laptop is
/// his again once it connects.
async fn removal(options: Options) {
    // Alone: the test reads counters.
    let stack = Stack::start_alone(options).await;
    register_device(stack.public, "bob", "phone").await;
    register_device(stack.public, "bob", "laptop").await;
    let mut alice = stack.connect("alice", "phone").await;
    send_seq(&mut alice, "bob", 0..2).await;
    let first = wait_for_inbox(stack.public, "bob", "phone", 2).await[0]["mid"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_for_inbox(stack.public, "bob", "laptop", 2).await;
    assert_eq!(
        devices(stack.public, "bob").await,
        json!([
            {"device": "laptop", "connected": false},
            {"device": "phone", "connected": false},
        ])
    );

    let routed = |kind: &str| format!("dak_events_routed_total{{kind=\"{kind}\"}}");
    let removals_before = stack.metric(&routed("device_removed")).await;
    let tokens_before = stack.metric(&routed("push_token")).await;
    remove_device(stack.public, "bob", "phone", "laptop").await;
    assert_eq!(
        devices(stack.public, "bob").await,
        json!([{"device": "phone", "connected": false}])
    );
    wait_for_inbox(stack.public, "bob", "laptop", 0).await;
    assert_eq!(
        stack.metric(&routed("device_removed")).await - removals_before,
        1.0
    );
    assert_eq!(stack.metric(&routed("push_token")).await, tokens_before);
    // Where the first message is: still stored (and pushed) for the phone,
    // and its copy for the laptop went with the laptop.
    eventually("the removed step", || async {
        let status: serde_json::Value =
            reqwest::get(format!("http://{}/v1/messages/{first}/status", stack.admin))
                .await
                .ok()?
                .json()
                .await
                .ok()?;
        let state = |device: &str| {
            status["devices"]
                .as_array()?
                .iter()
                .find(|d| d["device"] == device)
                .map(|d| d["state"].clone())
        };
        let phone = state("phone")?;
        (state("laptop")? == "removed" && (phone == "stored" || phone == "pushed")).then_some(())
    })
    .await;

    // Sent after the removal: the phone gets them; the laptop's inbox, which
    // persistence fills in the order of bob's offline stream, stays empty
    // once the phone's holds the last of them.
    send_seq(&mut alice, "bob", 2..4).await;
    let on_phone = wait_for_inbox(stack.public, "bob", "phone", 4).await;
    assert_eq!(seqs(&on_phone), vec![0, 1, 2, 3]);
    assert!(rest_sync_all(stack.public, "bob", "laptop", 100)
        .await
        .is_empty());

    // The laptop connects again: nothing to replay, and it is bob's again.
    let mut laptop = Client::connect_raw(stack.public, &token("bob", "laptop")).await;
    assert!(laptop.replay().await.is_empty(), "nothing kept for it");
    alice
        .send_message("after", "bob", json!({ "seq": 4 }))
        .await;
    alice.expect("accepted").await;
    let frame = laptop.expect("message").await;
    assert_eq!(frame["body"]["seq"], 4);
    let on_phone = wait_for_inbox(stack.public, "bob", "phone", 5).await;
    assert_eq!(seqs(&on_phone), vec![0, 1, 2, 3, 4]);
    assert_eq!(
        devices(stack.public, "bob").await,
        json!([
            {"device": "laptop", "connected": true},
            {"device": "phone", "connected": false},
        ])
    );
    stack.stop().await;
}

/// A device removed while its socket is open is told, and its socket closes
/// with 4001: its app knows to sign out. The user's other device is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_that_is_removed_is_told_and_closed() {
    told_and_closed(Options::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_device_that_is_removed_is_told_and_closed_with_redis() {
    told_and_closed(Options {
        redis: true,
        ..Options::default()
    })
    .await;
}

async fn told_and_closed(options: Options) {
    let stack = Stack::start(options).await;
    let mut laptop = stack.connect("bob", "laptop").await;
    let mut phone = stack.connect("bob", "phone").await;
    remove_device(stack.public, "bob", "phone", "laptop").await;
    assert_eq!(laptop.expect_any().await, json!({"type": "device.removed"}));
    assert_eq!(laptop.closed().await, Some(4001));

    // The phone carries on: the next thing it gets is what alice sends.
    let mut alice = stack.connect("alice", "phone").await;
    alice
        .send_message("after", "bob", json!({ "seq": 0 }))
        .await;
    alice.expect("accepted").await;
    let frame = phone.expect_any().await;
    assert_eq!(
        (frame["type"].as_str(), frame["body"]["seq"].as_u64()),
        (Some("message"), Some(0)),
        "{frame}"
    );
    stack.stop().await;
}

/// `GET /v1/devices` as `user`'s phone: the `devices` array.
async fn devices(public: std::net::SocketAddr, user: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .get(format!("http://{public}/v1/devices"))
        .bearer_auth(token(user, "phone"))
        .send()
        .await
        .expect("REST request");
    assert_eq!(response.status().as_u16(), 200);
    let mut body: serde_json::Value = response.json().await.unwrap();
    body["devices"].take()
}
