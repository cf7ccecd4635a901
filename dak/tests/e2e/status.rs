//! Message status and checked read receipts, in process on `dak up`: the sender
//! asks where its message is, ops look up any mid, and a read receipt reaches
//! a message's sender only from a user the message went to.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{ack_id, register_device, token, Options, Stack};

/// GET `path` on `addr`, with `user`'s token when given: (status, body).
async fn get(addr: SocketAddr, path: &str, user: Option<&str>) -> (u16, Value) {
    let mut request = reqwest::Client::new().get(format!("http://{addr}{path}"));
    if let Some(user) = user {
        request = request.bearer_auth(token(user, "phone"));
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The state of each device in a status answer, as "user/device=state".
fn states(status: &Value) -> Vec<String> {
    let mut states: Vec<String> = status["devices"]
        .as_array()
        .map(|devices| {
            devices
                .iter()
                .map(|d| {
                    let device = d["device"].as_str().unwrap_or("-");
                    format!(
                        "{}/{device}={}",
                        d["user"].as_str().unwrap(),
                        d["state"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    states.sort();
    states
}

/// `device`'s entry in a status answer.
fn device<'a>(status: &'a Value, device: &str) -> Option<&'a Value> {
    status["devices"]
        .as_array()?
        .iter()
        .find(|d| d["device"] == device)
}

/// The steps in `device`'s history, in the order the status lists them.
fn history<'a>(status: &'a Value, name: &str) -> Vec<&'a str> {
    device(status, name)
        .and_then(|d| d["history"].as_array())
        .map(|steps| steps.iter().filter_map(|s| s["state"].as_str()).collect())
        .unwrap_or_default()
}

/// Polls the admin status of `mid` until `done` holds for it (described by
/// `want` when it never does): a step is kept a little after the fact (an
/// `acked` step, for one, is reported beside the ack's other work).
async fn wait_for_status(
    admin: SocketAddr,
    mid: &str,
    want: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = get(admin, &format!("/v1/messages/{mid}/status"), None).await;
        if code == 200 && done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "status of {mid} never became {want}; last: {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`wait_for_status`] until the device states are `want`.
async fn wait_for_states(admin: SocketAddr, mid: &str, want: &[&str]) -> Value {
    wait_for_status(admin, mid, &format!("{want:?}"), |status| {
        states(status) == want
    })
    .await
}

/// Whether `steps` begin with `stored`, then `pushed`: push wakes a device
/// only once persistence stored the message.
fn stored_and_pushed(steps: &[&str]) -> bool {
    matches!(steps, ["stored", "pushed", ..])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sender_sees_where_its_message_is_per_device_and_ops_see_any_mid() {
    let stack = Stack::start(Options::default()).await;
    register_device(stack.public, "bob", "tablet").await;
    let mut bob = stack.connect("bob", "phone").await;
    let mut alice = stack.connect("alice", "phone").await;

    alice.send_message("s1", "bob", json!("where is it")).await;
    let mid = alice.expect("accepted").await["mid"]
        .as_str()
        .unwrap()
        .to_owned();
    let frame = bob.expect("message").await;
    assert_eq!(frame["mid"], mid.as_str());
    bob.ack(&[mid.as_str()]).await;
    alice.expect("receipt").await;

    // The phone acked it; the tablet, never connected, has it in its inbox and
    // was sent a push notification (its registration gave it a token).
    let ops = wait_for_status(
        stack.admin,
        &mid,
        "the phone acked, the tablet stored and pushed",
        |status| {
            let (states, tablet) = (states(status), history(status, "tablet"));
            states.len() == 2
                && states[0] == "bob/phone=acked"
                && tablet.len() == 2
                && stored_and_pushed(&tablet)
        },
    )
    .await;
    let tablet = device(&ops, "tablet").unwrap();
    assert_eq!(tablet["state"], "pushed", "{tablet}");
    assert_eq!(ops["from"], "alice");
    assert_eq!(ops["to"], "bob");
    assert_eq!(ops["chat"], "direct");
    assert!(ops["accepted_at"].as_u64().is_some(), "{ops}");
    assert_eq!(history(&ops, "phone"), ["delivered", "acked"], "{ops}");

    // The sender sees the same on the public address; nobody else does.
    let path = format!("/v1/messages/{mid}/status");
    let (code, mine) = get(stack.public, &path, Some("alice")).await;
    assert_eq!(code, 200, "{mine}");
    assert_eq!(mine, ops);
    let (code, body) = get(stack.public, &path, Some("bob")).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    let (code, _) = get(stack.public, &path, None).await;
    assert_eq!(code, 401);

    // A mid nobody sent, and one that is not a mid.
    let unknown = "/v1/messages/01J00000000000000000000000/status";
    let (code, body) = get(stack.admin, unknown, None).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    let (code, body) = get(stack.public, unknown, Some("alice")).await;
    assert_eq!(code, 403, "{body}");
    let (code, body) = get(stack.admin, "/v1/messages/nope/status", None).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );

    // The tablet connects: the inbox replays it, the tablet acks, the inbox drops it.
    let mut tablet =
        crate::support::Client::connect_raw(stack.public, &token("bob", "tablet")).await;
    let replayed = tablet.replay().await;
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    tablet.ack(&[mid.as_str()]).await;
    let ops = wait_for_states(
        stack.admin,
        &mid,
        &["bob/phone=acked", "bob/tablet=dropped"],
    )
    .await;
    let tablet_steps = history(&ops, "tablet");
    assert!(stored_and_pushed(&tablet_steps), "{ops}");
    assert_eq!(tablet_steps[2..], ["delivered", "dropped"], "{ops}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_reaches_the_sender_only_from_a_user_the_message_went_to() {
    // Alone: the test counts refused receipts.
    let stack = Stack::start_alone(Options::default()).await;
    let refused = r#"dak_read_receipts_total{outcome="refused"}"#;
    let refused_before = stack.metric(refused).await;
    let mut alice = stack.connect("alice", "phone").await;
    let mut bob = stack.connect("bob", "phone").await;
    let mut carol = stack.connect("carol", "phone").await;
    let mut mallory = stack.connect("mallory", "phone").await;

    alice.send_message("r1", "bob", json!("for bob only")).await;
    let mid = alice.expect("accepted").await["mid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(bob.expect("message").await["mid"], mid.as_str());
    bob.ack(&[mid.as_str()]).await;
    let delivered = alice.expect("receipt").await;
    assert_eq!(delivered["state"], "delivered");
    alice.ack(&[ack_id(&delivered).unwrap().as_str()]).await;

    // mallory never got it, yet says she read it; bob says carol sent it; bob
    // reports reading a mid that does not exist.
    mallory
        .send(json!({"type": "receipt", "mid": mid, "to": "alice", "state": "read"}))
        .await;
    bob.send(json!({"type": "receipt", "mid": mid, "to": "carol", "state": "read"}))
        .await;
    bob.send(json!({"type": "receipt", "mid": "01J00000000000000000000000", "to": "alice", "state": "read"}))
        .await;
    // All three are decided (refused) before anything else happens.
    let deadline = Instant::now() + Duration::from_secs(20);
    while stack.metric(refused).await < refused_before + 3.0 {
        assert!(
            Instant::now() < deadline,
            "the receipts were not all refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // bob's real receipt reaches alice, and is the first receipt she gets.
    bob.send(json!({"type": "receipt", "mid": mid, "to": "alice", "state": "read"}))
        .await;
    let read = alice.expect("receipt").await;
    assert_eq!(
        (
            read["mid"].as_str(),
            read["by"].as_str(),
            read["state"].as_str()
        ),
        (Some(mid.as_str()), Some("bob"), Some("read")),
        "{read}"
    );
    // carol got nothing: the receipt addressed to her was refused above.
    if let Some(frame) = carol.recv_within(Duration::from_millis(300)).await {
        panic!("carol got {frame}");
    }
    // The status shows who read it.
    let ops = wait_for_states(stack.admin, &mid, &["bob/phone=read"]).await;
    assert_eq!(ops["from"], "alice");
    assert_eq!(stack.metric(refused).await, refused_before + 3.0);
    stack.stop().await;
}
