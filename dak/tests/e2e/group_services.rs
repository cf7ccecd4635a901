//! Groups with each service in its own process, against Apache Kafka and
//! Redis: a 200-member group with half its members online, and group commands
//! queued while group-router is down.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};

use crate::support::{
    kafka, register_device, remove_device, rest_group, rest_sync_all, token, wait_for_inbox,
    Client, Services, PATIENCE,
};

/// A replacement group-router gets `dak.group` once the killed instance's
/// session timed out and the consumer group rebalanced, which under parallel
/// test load on a 2-core machine has taken over 45 s (see `services.rs`).
const FAILOVER: Duration = Duration::from_secs(120);

fn mid(frame: &Value) -> String {
    frame["mid"]
        .as_str()
        .unwrap_or_else(|| panic!("no mid in {frame}"))
        .to_owned()
}

/// `frame` is a system notice of `event` on `group`, without a body.
fn assert_notice(who: &str, frame: &Value, group: &str, event: &str) {
    assert_eq!(
        (
            frame["type"].as_str(),
            frame["chat"].as_str(),
            frame["to"].as_str(),
            frame["system"]["event"].as_str()
        ),
        (Some("message"), Some("group"), Some(group), Some(event)),
        "{who} expected a `{event}` notice: {frame}"
    );
    assert!(frame.get("body").is_none(), "{who}: {frame}");
}

/// `frame` is an ordinary (non-system) message of `from` to `group`.
fn assert_group_message(who: &str, frame: &Value, group: &str, from: &str) {
    assert_eq!(
        (
            frame["type"].as_str(),
            frame["chat"].as_str(),
            frame["to"].as_str(),
            frame["from"].as_str()
        ),
        (Some("message"), Some("group"), Some(group), Some(from)),
        "{who} expected a group message from {from}: {frame}"
    );
    assert!(frame.get("system").is_none(), "{who}: {frame}");
}

async fn ack(client: &mut Client, frame: &Value) {
    let id = match frame["type"].as_str() {
        Some("receipt") => frame["rid"].as_str(),
        _ => frame["mid"].as_str(),
    };
    client
        .ack(&[id.unwrap_or_else(|| panic!("nothing to ack in {frame}"))])
        .await;
}

/// The next frame that is not a receipt. Receipts are acked and skipped when
/// `sender` (the client sent group messages); anyone else getting one fails.
async fn next_not_receipt(client: &mut Client, who: &str, sender: bool) -> Value {
    loop {
        let frame = client.recv_as(who, "a frame that is not a receipt").await;
        if frame["type"] != "receipt" {
            return frame;
        }
        assert!(sender, "{who} sent nothing but got a receipt: {frame}");
        ack(client, &frame).await;
    }
}

/// Polls `GET /v1/groups/{group}` on group-router as `user` until `done` holds
/// (writes are applied asynchronously), for at most [`PATIENCE`]; returns the
/// last answer for the caller to assert on.
async fn group_view(
    api: SocketAddr,
    user: &str,
    group: &str,
    done: impl Fn(u16, &Value) -> bool,
) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (status, body) = rest_group(api, user, "GET", &format!("/{group}"), None).await;
        if done(status, &body) || tokio::time::Instant::now() >= deadline {
            return (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn roles(group: &Value) -> Vec<(String, String)> {
    group["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {group}"))
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// What one online member saw while the two senders wrote to the group.
#[derive(Default)]
struct Seen {
    /// Client id → mid, from `accepted`.
    accepted: HashMap<String, String>,
    /// Per sender: (client id, mid, seq) in arrival order.
    messages: HashMap<String, Vec<(String, String, u64)>>,
    /// Distinct (mid, by) of the delivered receipts.
    receipts: HashSet<(String, String)>,
}

/// Reads (and acks) until `me` has every `accepted` for its `sends`, `want[s]`
/// messages of each other sender `s`, and `receipts` distinct receipts.
async fn read_phase(
    client: &mut Client,
    me: &str,
    group: &str,
    sends: usize,
    want: &[(&str, usize)],
    receipts: usize,
) -> Seen {
    let mut seen = Seen::default();
    let mut mids = HashSet::new();
    loop {
        let done = seen.accepted.len() == sends
            && seen.receipts.len() == receipts
            && want
                .iter()
                .all(|(s, n)| seen.messages.get(*s).map_or(0, Vec::len) == *n);
        if done {
            return seen;
        }
        let frame = client.recv_as(me, "a message of the read phase").await;
        match frame["type"].as_str() {
            Some("accepted") => {
                let id = frame["id"].as_str().unwrap().to_owned();
                assert!(
                    seen.accepted.insert(id, mid(&frame)).is_none(),
                    "{me}: accepted twice: {frame}"
                );
                assert!(seen.accepted.len() <= sends, "{me}: {frame}");
            }
            Some("message") => {
                let from = frame["from"].as_str().unwrap_or_default();
                let wanted = want.iter().find(|(s, _)| *s == from);
                assert!(wanted.is_some(), "{me} got an unexpected message {frame}");
                assert_group_message(me, &frame, group, from);
                let m = mid(&frame);
                assert!(mids.insert(m.clone()), "{me} got {m} twice: {frame}");
                let seq = frame["body"]["seq"].as_u64().expect("a seq body");
                let id = frame["id"].as_str().unwrap().to_owned();
                seen.messages
                    .entry(from.to_owned())
                    .or_default()
                    .push((id, m, seq));
                ack(client, &frame).await;
            }
            Some("receipt") => {
                assert!(receipts > 0, "{me} sent nothing but got a receipt: {frame}");
                assert_eq!(
                    (frame["state"].as_str(), frame["device"].as_str()),
                    (Some("delivered"), Some("default")),
                    "{me}: {frame}"
                );
                ack(client, &frame).await;
                seen.receipts
                    .insert((mid(&frame), frame["by"].as_str().unwrap().to_owned()));
            }
            _ => panic!("{me} got an unexpected frame {frame}"),
        }
    }
}

/// The inbox, the push tokens and the groups on the CQL server (a keyspace of
/// the test's own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_member_group_with_half_online_on_separate_services() {
    dak_runtime::scylla::with_test_keyspace(
        "a_200_member_group_with_half_online_on_separate_services",
        |nodes, keyspace| a_200_member_group_on_cql(nodes.join(","), keyspace),
    )
    .await;
}

async fn a_200_member_group_on_cql(nodes: String, keyspace: String) {
    const GROUP: &str = "two-hundred";
    const FROM_A: u64 = 20;
    const FROM_B: u64 = 5;
    let started = std::time::Instant::now();
    let brokers = kafka();
    let services = Services::new(
        &brokers,
        &[
            ("DAK_WS_RATE_LIMIT", "0"),
            ("DAK_SCYLLA_NODES", &nodes),
            ("DAK_SCYLLA_KEYSPACE", &keyspace),
            // Every delivery and send logged, to read if this test fails.
            (
                "RUST_LOG",
                "info,session=debug,ws_gateway=debug,dak_runtime::gateway=debug,push=warn",
            ),
        ],
    );
    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let (_persistence, sync) = services.start_persistence().await;
    let (_push, push_admin) = services.start("push", &[]).await;
    let (_group_router, api) = services.start_group_router().await;
    let (_gateway, public) = services.start_ws_gateway().await;
    let (_rest, rest) = services.start_rest_gateway().await;

    let users: Vec<String> = (0..200).map(|i| format!("m{i:03}")).collect();
    let (online_users, offline_users) = users.split_at(100);
    let mut online = Vec::with_capacity(100);
    for user in online_users {
        online.push(Client::connect(public, &token(user, "default")).await);
    }
    for user in offline_users {
        register_device(rest, user, "default").await;
    }
    eprintln!(
        "stack up, 100 online, 100 registered: {:?}",
        started.elapsed()
    );

    // m000 creates the group with everyone else; every online member hears it.
    let (status, answer) = rest_group(
        rest,
        "m000",
        "POST",
        "",
        Some(json!({"id": GROUP, "name": "Two hundred", "members": &users[1..]})),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let created_mid = mid(&answer);
    join_all(online.iter_mut().zip(online_users).map(|(client, me)| {
        let (created_mid, others) = (&created_mid, &users[1..]);
        async move {
            let frame = client.recv_as(me, "the created notice").await;
            assert_notice(me, &frame, GROUP, "created");
            assert_eq!(
                (
                    frame["mid"].as_str(),
                    frame["from"].as_str(),
                    frame["system"]["by"].as_str()
                ),
                (Some(created_mid.as_str()), Some("m000"), Some("m000")),
                "{me}: {frame}"
            );
            // A change of 199 users names the first 64 (DAK_GROUP_NOTICE_USERS)
            // and counts them all.
            assert_eq!(frame["system"]["users"], json!(others[..64]), "{me}");
            assert_eq!(frame["system"]["count"], 199, "{me}");
            ack(client, &frame).await;
        }
    }))
    .await;
    eprintln!("created notice on 100 sockets: {:?}", started.elapsed());

    // m000 writes 20 messages and m001 writes 5, at once.
    for seq in 0..FROM_A {
        online[0]
            .send(json!({"type": "message", "id": format!("a{seq}"), "to": GROUP, "chat": "group", "body": {"seq": seq}}))
            .await;
    }
    for seq in 0..FROM_B {
        online[1]
            .send(json!({"type": "message", "id": format!("b{seq}"), "to": GROUP, "chat": "group", "body": {"seq": seq}}))
            .await;
    }
    let seen: Vec<Seen> = join_all(online.iter_mut().zip(online_users).enumerate().map(
        |(i, (client, me))| async move {
            let (sends, want, receipts): (usize, Vec<(&str, usize)>, usize) = match i {
                0 => (20, vec![("m001", 5)], 99 * 20),
                1 => (5, vec![("m000", 20)], 99 * 5),
                _ => (0, vec![("m000", 20), ("m001", 5)], 0),
            };
            read_phase(client, me, GROUP, sends, &want, receipts).await
        },
    ))
    .await;
    eprintln!(
        "25 messages and 2475 receipts on 100 sockets: {:?}",
        started.elapsed()
    );

    // Each sender's messages reached every other online member once, in order,
    // with the mids the sender was given; delivered receipts came back to the
    // senders from every online member, and to no one else (read_phase).
    let sent_by: HashMap<&str, (&HashMap<String, String>, u64)> = [
        ("m000", (&seen[0].accepted, FROM_A)),
        ("m001", (&seen[1].accepted, FROM_B)),
    ]
    .into_iter()
    .collect();
    for (me, s) in online_users.iter().zip(&seen) {
        for (sender, (accepted, n)) in &sent_by {
            if me == sender {
                assert!(
                    !s.messages.contains_key(*sender),
                    "{me} got its own message"
                );
                continue;
            }
            let got = &s.messages[*sender];
            let seqs: Vec<u64> = got.iter().map(|(_, _, seq)| *seq).collect();
            assert_eq!(seqs, (0..*n).collect::<Vec<_>>(), "{me} from {sender}");
            for (id, m, _) in got {
                assert_eq!(
                    accepted.get(id),
                    Some(m),
                    "{me}: {sender}'s {id} came with another mid"
                );
            }
        }
    }
    for (sender, (accepted, _)) in &sent_by {
        let expected: HashSet<(String, String)> = accepted
            .values()
            .flat_map(|m| {
                online_users
                    .iter()
                    .filter(|u| u != sender)
                    .map(move |u| (m.clone(), u.clone()))
            })
            .collect();
        let got = &seen[if *sender == "m000" { 0 } else { 1 }].receipts;
        assert_eq!(got, &expected, "{sender}'s delivered receipts");
    }

    // The offline members' inboxes hold the notice, then the 25 messages.
    let message_mids: HashSet<&String> = seen[0]
        .accepted
        .values()
        .chain(seen[1].accepted.values())
        .collect();
    for user in offline_users {
        let inbox = wait_for_inbox(sync, user, "default", 26).await;
        assert_notice(user, &inbox[0], GROUP, "created");
        assert_eq!(inbox[0]["mid"], created_mid.as_str(), "{user}");
        let mut per_sender: HashMap<&str, Vec<u64>> = HashMap::new();
        let mut mids = HashSet::new();
        for frame in &inbox[1..] {
            let from = frame["from"].as_str().unwrap_or_default();
            assert_group_message(user, frame, GROUP, from);
            let (accepted, _) = sent_by
                .get(from)
                .unwrap_or_else(|| panic!("{user}: {frame}"));
            let m = mid(frame);
            assert_eq!(
                accepted.get(frame["id"].as_str().unwrap()),
                Some(&m),
                "{user}: {frame}"
            );
            assert!(mids.insert(m.clone()), "{user} stored {m} twice");
            per_sender
                .entry(from)
                .or_default()
                .push(frame["body"]["seq"].as_u64().unwrap());
        }
        assert_eq!(
            mids.iter().collect::<HashSet<_>>(),
            message_mids,
            "{user}'s inbox"
        );
        assert_eq!(
            per_sender["m000"],
            (0..FROM_A).collect::<Vec<_>>(),
            "{user}"
        );
        assert_eq!(
            per_sender["m001"],
            (0..FROM_B).collect::<Vec<_>>(),
            "{user}"
        );
    }
    eprintln!("100 offline inboxes checked: {:?}", started.elapsed());

    // Every offline member's device, known by its push token in the CQL
    // store, was woken (push only logs without FCM credentials, and counts).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while crate::support::metric(push_admin, "dak_push_sent_total").await < 100.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "push woke fewer than the 100 offline devices"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // m000 asks where its first message is, on persistence's status API (the
    // status store is on the CQL server too): acked by the 99 other online
    // members, stored for and then pushed to the 100 offline ones (push waits
    // until persistence's group has committed what it stored).
    let first = seen[0].accepted["a0"].clone();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = reqwest::Client::new()
            .get(format!("http://{sync}/v1/messages/{first}/status"))
            .bearer_auth(token("m000", "default"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let status: Value = response.json().await.unwrap();
        let mut states: HashMap<&str, usize> = HashMap::new();
        let mut push_delays: Vec<u64> = Vec::new();
        for device in status["devices"].as_array().unwrap() {
            let user = device["user"].as_str().unwrap();
            let state = device["state"].as_str().unwrap();
            let steps: Vec<&str> = device["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["state"].as_str().unwrap())
                .collect();
            let online = online_users.iter().any(|u| u == user);
            if online && state == "acked" {
                *states.entry("acked").or_default() += 1;
            }
            if !online && steps.starts_with(&["stored", "pushed"]) {
                *states.entry("stored and pushed").or_default() += 1;
                let at = |i: usize| device["history"][i]["at"].as_u64().unwrap();
                push_delays.push(at(1) - at(0));
            }
        }
        if states.get("acked") == Some(&99) && states.get("stored and pushed") == Some(&100) {
            assert_eq!(status["to"], GROUP, "{status}");
            push_delays.sort_unstable();
            eprintln!(
                "stored to pushed, 100 devices: median {} ms, max {} ms",
                push_delays[50], push_delays[99]
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status of {first} never showed 99 acked, 100 stored and pushed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // m000 removes m050: everyone online hears it, m050 included.
    let (status, answer) = rest_group(
        rest,
        "m000",
        "DELETE",
        &format!("/{GROUP}/members/m050"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let removed_mid = mid(&answer);
    join_all(
        online
            .iter_mut()
            .zip(online_users)
            .enumerate()
            .map(|(i, (client, me))| {
                let removed_mid = &removed_mid;
                async move {
                    let frame = next_not_receipt(client, me, i < 2).await;
                    assert_notice(me, &frame, GROUP, "removed");
                    assert_eq!(
                        (
                            frame["mid"].as_str(),
                            frame["system"]["by"].as_str(),
                            &frame["system"]["users"]
                        ),
                        (Some(removed_mid.as_str()), Some("m000"), &json!(["m050"])),
                        "{me}: {frame}"
                    );
                    ack(client, &frame).await;
                }
            }),
    )
    .await;

    // The next group message reaches every online member but m050 (and m000,
    // whose socket sent it).
    online[0]
        .send(json!({"type": "message", "id": "a-last", "to": GROUP, "chat": "group", "body": {"seq": FROM_A}}))
        .await;
    let accepted = next_not_receipt(&mut online[0], "m000", true).await;
    assert_eq!(
        (accepted["type"].as_str(), accepted["id"].as_str()),
        (Some("accepted"), Some("a-last")),
        "{accepted}"
    );
    let last_mid = mid(&accepted);
    join_all(
        online
            .iter_mut()
            .zip(online_users)
            .enumerate()
            .filter(|(i, _)| *i != 0 && *i != 50)
            .map(|(i, (client, me))| {
                let last_mid = &last_mid;
                async move {
                    let frame = next_not_receipt(client, me, i == 1).await;
                    assert_group_message(me, &frame, GROUP, "m000");
                    assert_eq!(
                        (frame["mid"].as_str(), frame["body"]["seq"].as_u64()),
                        (Some(last_mid.as_str()), Some(FROM_A)),
                        "{me}: {frame}"
                    );
                    ack(client, &frame).await;
                }
            }),
    )
    .await;
    // Only now, with the group message delivered, a direct message to m050:
    // it must be m050's next frame, the group message never having come.
    online[0]
        .send(json!({"type": "message", "id": "d-m050", "to": "m050", "chat": "direct", "body": "just you"}))
        .await;
    // The members' receipts for the last message may come before the
    // `accepted`: they count below.
    let mut early_receipts = Vec::new();
    let accepted = loop {
        let frame = online[0].recv_as("m000", "the accepted of d-m050").await;
        if frame["type"] != "receipt" {
            break frame;
        }
        ack(&mut online[0], &frame).await;
        early_receipts.push(frame);
    };
    assert_eq!(accepted["id"], "d-m050", "{accepted}");
    let direct_mid = mid(&accepted);
    let frame = online[50].recv_as("m050", "the direct message").await;
    assert_eq!(
        (
            frame["type"].as_str(),
            frame["chat"].as_str(),
            frame["from"].as_str(),
            frame["mid"].as_str()
        ),
        (
            Some("message"),
            Some("direct"),
            Some("m000"),
            Some(direct_mid.as_str())
        ),
        "m050 got something other than the direct message: {frame}"
    );
    ack(&mut online[50], &frame).await;

    // m000 hears the last message was delivered to the 98 online members left,
    // and gets nothing but receipts.
    let expected: BTreeSet<String> = online_users
        .iter()
        .filter(|u| *u != "m000" && *u != "m050")
        .cloned()
        .collect();
    let mut by = BTreeSet::new();
    let mut early = early_receipts.into_iter();
    while by != expected {
        let frame = match early.next() {
            Some(frame) => frame,
            None => {
                let frame = online[0]
                    .recv_as("m000", "receipts of the last message")
                    .await;
                ack(&mut online[0], &frame).await;
                frame
            }
        };
        assert_eq!(frame["type"], "receipt", "m000: {frame}");
        if frame["mid"] == last_mid.as_str() {
            let who = frame["by"].as_str().unwrap().to_owned();
            assert!(expected.contains(&who), "receipt from {who}: {frame}");
            by.insert(who);
        }
    }

    // Offline members got the removal and the last message after the rest.
    for user in ["m100", "m150", "m199"] {
        let inbox = wait_for_inbox(sync, user, "default", 28).await;
        assert_notice(user, &inbox[26], GROUP, "removed");
        assert_eq!(inbox[26]["mid"], removed_mid.as_str(), "{user}");
        assert_group_message(user, &inbox[27], GROUP, "m000");
        assert_eq!(inbox[27]["mid"], last_mid.as_str(), "{user}");
    }

    // group-router's view: 199 members, m000 the admin; m050 is out.
    let (status, group) = group_view(api, "m001", GROUP, |s, g| {
        s == 200 && g["members"].as_array().map(Vec::len) == Some(199)
    })
    .await;
    assert_eq!(status, 200, "{group}");
    let members = roles(&group);
    assert_eq!(members.len(), 199, "{group}");
    let expected: Vec<(String, String)> = users
        .iter()
        .filter(|u| *u != "m050")
        .map(|u| {
            let role = if u == "m000" { "admin" } else { "member" };
            (u.clone(), role.to_owned())
        })
        .collect();
    assert_eq!(members, expected);
    assert_eq!(
        (group["name"].as_str(), group["created_by"].as_str()),
        (Some("Two hundred"), Some("m000"))
    );
    let (status, answer) = group_view(api, "m050", GROUP, |s, _| s == 403).await;
    assert_eq!(status, 403, "{answer}");
    // The stores were the CQL ones: their tables hold the test's data.
    let cql = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(nodes.split(','))
        .build()
        .await
        .expect("connect to the CQL server");

    // m199 removes its one device: its inbox on the CQL server empties and
    // its push token goes; m198 keeps both.
    remove_device(rest, "m199", "default", "default").await;
    wait_for_inbox(sync, "m199", "default", 0).await;
    let token_of = |user: &'static str| {
        let (cql, keyspace) = (&cql, &keyspace);
        async move {
            let rows = cql
                .query_unpaged(
                    format!(
                        "SELECT fcm_token FROM {keyspace}.push_tokens WHERE user_id = ? AND device_id = ?"
                    ),
                    (user, "default"),
                )
                .await
                .expect("read a push token")
                .into_rows_result()
                .expect("rows");
            rows.maybe_first_row::<(String,)>().expect("a token row")
        }
    };
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while token_of("m199").await.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the removed device's push token is still there"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(token_of("m198").await.is_some());
    assert!(!rest_sync_all(sync, "m198", "default", 500).await.is_empty());
    for table in ["groups", "group_members", "push_tokens", "inbox_by_device"] {
        let rows = cql
            .query_unpaged(format!("SELECT COUNT(*) FROM {keyspace}.{table}"), ())
            .await
            .expect("count rows")
            .into_rows_result()
            .expect("rows");
        let (count,): (i64,) = rows.single_row().expect("one count");
        assert!(count > 0, "{keyspace}.{table} is empty");
    }
    eprintln!("done: {:?}", started.elapsed());
}

/// A short description of a frame, for comparing sequences: the notice's
/// event and users, or the message's sender and body; with its mid.
fn label(frame: &Value) -> (String, String) {
    let text = match frame["type"].as_str() {
        Some("message") if frame.get("system").is_some() => {
            let event = frame["system"]["event"].as_str().unwrap_or("?");
            match frame["system"].get("users") {
                Some(users) => format!("{event} {users}"),
                None => event.to_owned(),
            }
        }
        Some("message") => format!(
            "{} {}: {}",
            frame["chat"].as_str().unwrap_or("?"),
            frame["from"].as_str().unwrap_or("?"),
            frame["body"]
        ),
        _ => frame.to_string(),
    };
    (text, frame["mid"].as_str().unwrap_or_default().to_owned())
}

/// Reads until `n` frames arrived that are neither receipts nor repeats of
/// `before` (mids delivered before group-router was killed, which it may
/// deliver again after the crash), acking everything; each wait is bounded by
/// [`FAILOVER`]. Returns those frames, and the receipts seen on the way.
async fn after_restart(
    client: &mut Client,
    who: &str,
    n: usize,
    before: &HashSet<String>,
) -> (Vec<Value>, Vec<Value>) {
    let mut frames = Vec::new();
    let mut receipts = Vec::new();
    let mut mids = HashSet::new();
    while frames.len() < n {
        let frame = client
            .recv_within(FAILOVER)
            .await
            .unwrap_or_else(|| panic!("{who}: nothing within {FAILOVER:?} after {frames:?}"));
        ack(client, &frame).await;
        if frame["type"] == "receipt" {
            receipts.push(frame);
            continue;
        }
        let m = mid(&frame);
        if before.contains(&m) {
            eprintln!("{who}: a redelivery after the crash: {frame}");
            continue;
        }
        assert!(mids.insert(m), "{who} got a mid twice: {frame}");
        frames.push(frame);
    }
    (frames, receipts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commands_sent_while_group_router_is_down_apply_in_order_when_it_returns() {
    const GROUP: &str = "crew";
    const RENAMED: &str = "Crew, renamed";
    let started = std::time::Instant::now();
    let brokers = kafka();
    let services = Services::new(
        &brokers,
        &[
            ("DAK_WS_RATE_LIMIT", "0"),
            // The killed group-router's partitions move after this (6 s is the
            // broker's minimum).
            ("DAK_KAFKA_SESSION_TIMEOUT_MS", "6000"),
        ],
    );
    let _router = services.start("message-router", &[]).await;
    let _session = services.start("session", &[]).await;
    let _persistence = services.start_persistence().await;
    let (mut group_router, _) = services.start_group_router().await;
    let (_gateway, public) = services.start_ws_gateway().await;
    let (_rest, rest) = services.start_rest_gateway().await;
    let mut alice = Client::connect(public, &token("alice", "default")).await;
    let mut bob = Client::connect(public, &token("bob", "default")).await;
    let mut carol = Client::connect(public, &token("carol", "default")).await;
    let mut dave = Client::connect(public, &token("dave", "default")).await;
    let mut erin = Client::connect(public, &token("erin", "default")).await;

    let create = json!({"id": GROUP, "name": "Crew", "members": ["bob", "carol"]});
    let (status, answer) = rest_group(rest, "alice", "POST", "", Some(create.clone())).await;
    assert_eq!(status, 202, "{answer}");
    let created_mid = mid(&answer);
    for (who, client) in [
        ("alice", &mut alice),
        ("bob", &mut bob),
        ("carol", &mut carol),
    ] {
        let frame = client.recv().await;
        assert_notice(who, &frame, GROUP, "created");
        assert_eq!(frame["mid"], created_mid.as_str(), "{who}: {frame}");
        ack(client, &frame).await;
    }

    // bob is no admin: his add is accepted into the stream, then refused.
    bob.send(json!({"type": "group.add", "id": "b-add", "group": GROUP, "members": ["dave"]}))
        .await;
    let accepted = bob.expect("accepted").await;
    let rejected = bob.expect("rejected").await;
    assert_eq!(
        (
            rejected["code"].as_str(),
            rejected["id"].as_str(),
            rejected["mid"].as_str()
        ),
        (Some("forbidden"), Some("b-add"), accepted["mid"].as_str()),
        "{rejected}"
    );
    ack(&mut bob, &rejected).await;

    // alice's app creates the group again (a retry): accepted, and harmless.
    let (status, again) = rest_group(rest, "alice", "POST", "", Some(create)).await;
    assert_eq!(status, 202, "{again}");
    assert_ne!(again["mid"], answer["mid"], "a fresh command");
    // What group-router had delivered before it died, it may deliver again.
    let before: HashSet<String> = [created_mid.clone(), mid(&rejected)].into();

    group_router.kill();
    eprintln!("group-router killed: {:?}", started.elapsed());

    // While it is down: rename, add dave, a message, remove carol (all alice's,
    // so one ordered stream into dak.group), then bob writes.
    let (status, renamed) = rest_group(
        rest,
        "alice",
        "PUT",
        &format!("/{GROUP}/name"),
        Some(json!({"name": RENAMED})),
    )
    .await;
    assert_eq!(status, 202, "{renamed}");
    let (status, added) = rest_group(
        rest,
        "alice",
        "POST",
        &format!("/{GROUP}/members"),
        Some(json!({"members": ["dave"]})),
    )
    .await;
    assert_eq!(status, 202, "{added}");
    alice
        .send(json!({"type": "message", "id": "a1", "to": GROUP, "chat": "group", "body": "while it was down"}))
        .await;
    let alice_mid = mid(&alice.expect("accepted").await);
    let (status, removed) = rest_group(
        rest,
        "alice",
        "DELETE",
        &format!("/{GROUP}/members/carol"),
        None,
    )
    .await;
    assert_eq!(status, 202, "{removed}");
    // message-router keeps alice's events in order: once her direct message to
    // erin arrived, her removal of carol is on dak.group, and bob's message,
    // sent after, lands behind it.
    alice
        .send(json!({"type": "message", "id": "a-barrier", "to": "erin", "chat": "direct", "body": "ping"}))
        .await;
    let barrier = mid(&alice.expect("accepted").await);
    let frame = erin.expect("message").await;
    assert_eq!(frame["mid"], barrier.as_str(), "{frame}");
    ack(&mut erin, &frame).await;
    bob.send(
        json!({"type": "message", "id": "b1", "to": GROUP, "chat": "group", "body": "bob here"}),
    )
    .await;
    let bob_mid = mid(&bob.expect("accepted").await);

    // A new group-router on the same store picks the queue up.
    let (_group_router, api) = services.start_group_router().await;
    eprintln!("group-router restarted: {:?}", started.elapsed());
    let (
        (alice_frames, alice_receipts),
        (bob_frames, bob_receipts),
        (carol_frames, carol_receipts),
        (dave_frames, dave_receipts),
    ) = tokio::join!(
        after_restart(&mut alice, "alice", 4, &before),
        after_restart(&mut bob, "bob", 4, &before),
        after_restart(&mut carol, "carol", 4, &before),
        after_restart(&mut dave, "dave", 4, &before),
    );
    eprintln!("queued commands applied: {:?}", started.elapsed());

    let renamed = ("renamed".to_owned(), mid(&renamed));
    let added = (r#"added ["dave"]"#.to_owned(), mid(&added));
    let removed = (r#"removed ["carol"]"#.to_owned(), mid(&removed));
    let from_alice = (
        r#"group alice: "while it was down""#.to_owned(),
        alice_mid.clone(),
    );
    let from_bob = (r#"group bob: "bob here""#.to_owned(), bob_mid.clone());
    let labels = |frames: &[Value]| frames.iter().map(label).collect::<Vec<_>>();
    assert_eq!(
        labels(&bob_frames),
        [
            renamed.clone(),
            added.clone(),
            from_alice.clone(),
            removed.clone()
        ],
        "bob: {bob_frames:?}"
    );
    assert_eq!(
        labels(&carol_frames),
        [
            renamed.clone(),
            added.clone(),
            from_alice.clone(),
            removed.clone()
        ],
        "carol: {carol_frames:?}"
    );
    assert_eq!(
        labels(&dave_frames),
        [
            added.clone(),
            from_alice.clone(),
            removed.clone(),
            from_bob.clone()
        ],
        "dave: {dave_frames:?}"
    );
    assert_eq!(
        labels(&alice_frames),
        [renamed.clone(), added.clone(), removed.clone(), from_bob],
        "alice: {alice_frames:?}"
    );
    assert_eq!(bob_frames[0]["system"]["name"], RENAMED, "{bob_frames:?}");
    for frames in [&alice_frames, &bob_frames, &carol_frames, &dave_frames] {
        for f in frames.iter().filter(|f| f.get("system").is_some()) {
            assert_eq!(
                (f["from"].as_str(), f["system"]["by"].as_str()),
                (Some("alice"), Some("alice")),
                "{f}"
            );
        }
    }
    for (who, receipts) in [("carol", &carol_receipts), ("dave", &dave_receipts)] {
        assert!(receipts.is_empty(), "{who} sent nothing: {receipts:?}");
    }

    // carol is out: after dave had bob's message, a direct message from alice
    // is carol's next frame.
    alice
        .send(json!({"type": "message", "id": "a-barrier-2", "to": "carol", "chat": "direct", "body": "bye"}))
        .await;
    let mut alice_receipts = alice_receipts;
    let accepted = loop {
        let frame = alice.recv().await;
        ack(&mut alice, &frame).await;
        if frame["type"] == "receipt" {
            alice_receipts.push(frame);
            continue;
        }
        break frame;
    };
    assert_eq!(accepted["id"], "a-barrier-2", "alice: {accepted}");
    let frame = loop {
        let frame = carol.recv().await;
        ack(&mut carol, &frame).await;
        if frame["mid"].as_str().is_some_and(|m| before.contains(m)) {
            continue;
        }
        break frame;
    };
    assert_eq!(
        (frame["chat"].as_str(), frame["mid"].as_str()),
        (Some("direct"), accepted["mid"].as_str()),
        "carol got something other than alice's direct message: {frame}"
    );

    // bob's socket never gets his own message: what follows is the delivered
    // receipts from alice and dave (carol was out), and nothing else.
    let receipted = |receipts: &[Value], mid: &str| -> BTreeSet<String> {
        receipts
            .iter()
            .filter(|r| r["mid"] == mid)
            .map(|r| r["by"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut bob_receipts = bob_receipts;
    while receipted(&bob_receipts, &bob_mid).len() < 2 {
        let frame = bob
            .recv_within(PATIENCE)
            .await
            .unwrap_or_else(|| panic!("bob: receipts so far {bob_receipts:?}"));
        ack(&mut bob, &frame).await;
        if frame["mid"].as_str().is_some_and(|m| before.contains(m)) {
            continue;
        }
        assert_eq!(frame["type"], "receipt", "bob: {frame}");
        bob_receipts.push(frame);
    }
    assert_eq!(
        receipted(&bob_receipts, &bob_mid),
        ["alice".to_owned(), "dave".to_owned()].into()
    );
    // alice's message was delivered to bob, carol and dave.
    while receipted(&alice_receipts, &alice_mid).len() < 3 {
        let frame = alice.recv().await;
        ack(&mut alice, &frame).await;
        assert_eq!(frame["type"], "receipt", "alice: {frame}");
        alice_receipts.push(frame);
    }
    assert_eq!(
        receipted(&alice_receipts, &alice_mid),
        ["bob".to_owned(), "carol".to_owned(), "dave".to_owned()].into()
    );

    // group-router's view: renamed, dave in, carol out.
    let role = |u: &str, r: &str| (u.to_owned(), r.to_owned());
    let expected = vec![
        role("alice", "admin"),
        role("bob", "member"),
        role("dave", "member"),
    ];
    let (status, group) = group_view(api, "dave", GROUP, |s, g| {
        s == 200 && g["name"] == RENAMED && roles(g) == expected
    })
    .await;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["name"], RENAMED);
    assert_eq!(roles(&group), expected);
    let (status, answer) = group_view(api, "carol", GROUP, |s, _| s == 403).await;
    assert_eq!(status, 403, "{answer}");
    eprintln!("done: {:?}", started.elapsed());
}
