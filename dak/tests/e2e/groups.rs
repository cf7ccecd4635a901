//! Groups, receipts and typing, in process on the mock cluster: what a new user
//! tries first with `dak up` and a few WebSocket clients.

use std::time::Duration;

use dak_wire::event::OfflineEvent;
use serde_json::{json, Value};

use crate::support::{
    ack_id, register_device, rest_group, token, until, wait_for_inbox, Client, Options, Stack,
};

/// Reads the next frame, which must be a system notice of `event`; acks it.
async fn notice(client: &mut Client, event: &str) -> Value {
    let frame = client.expect("message").await;
    assert_eq!(frame["system"]["event"], event, "{frame}");
    assert!(frame.get("body").is_none(), "{frame}");
    client.ack(&[frame["mid"].as_str().unwrap()]).await;
    frame
}

/// Reads the next frame, which must be a group message; acks it.
async fn group_message(client: &mut Client, group: &str) -> Value {
    let frame = client.expect("message").await;
    assert_eq!(
        (frame["chat"].as_str(), frame["to"].as_str()),
        (Some("group"), Some(group)),
        "{frame}"
    );
    client.ack(&[frame["mid"].as_str().unwrap()]).await;
    frame
}

fn members(group: &Value) -> Vec<(String, String)> {
    group["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["user"].as_str().unwrap().to_owned(),
                m["role"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Nothing arrives on `client` for a short while: used only after a later event
/// proved that whatever could have arrived was already routed.
async fn quiet(client: &mut Client) {
    if let Some(frame) = client.recv_within(Duration::from_millis(300)).await {
        panic!("unexpected frame {frame}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_from_creation_to_removal_with_receipts_and_typing() {
    let stack = Stack::start(Options::default()).await;
    let mut alice = stack.connect("alice", "default").await;
    let mut bob = stack.connect("bob", "default").await;
    let mut carol = stack.connect("carol", "default").await;

    let (status, answer) = rest_group(
        stack.public,
        "alice",
        "POST",
        "",
        Some(json!({"id": "team", "name": "Team", "members": ["bob", "carol"]})),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    for client in [&mut alice, &mut bob, &mut carol] {
        let created = notice(client, "created").await;
        assert_eq!(created["system"]["users"], json!(["bob", "carol"]));
        assert_eq!(
            (created["from"].as_str(), created["to"].as_str()),
            (Some("alice"), Some("team"))
        );
        assert_eq!(
            created["mid"], answer["mid"],
            "the notice carries the command's mid"
        );
    }
    let (status, group) = rest_group(stack.public, "bob", "GET", "/team", None).await;
    assert_eq!(status, 200, "{group}");
    assert_eq!(group["name"], "Team");
    let admin = |u: &str, r: &str| (u.to_owned(), r.to_owned());
    assert_eq!(
        members(&group),
        [
            admin("alice", "admin"),
            admin("bob", "member"),
            admin("carol", "member")
        ]
    );
    assert_eq!(
        rest_group(stack.public, "mallory", "GET", "/team", None)
            .await
            .0,
        403
    );

    // bob writes; alice and carol get it, bob's only device does not.
    bob.send(json!({"type": "message", "id": "b1", "to": "team", "chat": "group", "body": {"text": "hi all"}}))
        .await;
    let mid = bob.expect("accepted").await["mid"].clone();
    for client in [&mut alice, &mut carol] {
        let m = group_message(client, "team").await;
        assert_eq!(
            (m["mid"].clone(), m["from"].as_str(), m["body"].clone()),
            (mid.clone(), Some("bob"), json!({"text": "hi all"}))
        );
    }
    // Their acks come back to bob as delivered receipts, and a read receipt is
    // relayed: to the sender only, never to the group.
    carol
        .send(json!({"type": "receipt", "mid": mid, "to": "bob", "state": "read"}))
        .await;
    let mut receipts = Vec::new();
    while receipts.len() < 3 {
        let r = bob.expect("receipt").await;
        assert_eq!(r["mid"], mid, "{r}");
        bob.ack(&[r["rid"].as_str().unwrap()]).await;
        receipts.push((
            r["by"].as_str().unwrap().to_owned(),
            r["state"].as_str().unwrap().to_owned(),
        ));
    }
    receipts.sort();
    assert_eq!(
        receipts,
        [
            admin("alice", "delivered"),
            admin("carol", "delivered"),
            admin("carol", "read")
        ]
    );

    // Typing reaches the other members, not the typist.
    alice
        .send(json!({"type": "typing", "to": "team", "chat": "group"}))
        .await;
    for client in [&mut bob, &mut carol] {
        let typing = client.expect("typing").await;
        assert_eq!(
            typing,
            json!({"type": "typing", "from": "alice", "to": "team", "chat": "group"})
        );
    }

    // bob is no admin: his add is accepted into the stream, then refused.
    bob.send(json!({"type": "group.add", "id": "b2", "group": "team", "members": ["dave"]}))
        .await;
    let accepted = bob.expect("accepted").await;
    let rejected = bob.expect("rejected").await;
    assert_eq!(
        (rejected["code"].as_str(), rejected["id"].as_str()),
        (Some("forbidden"), Some("b2"))
    );
    assert_eq!(rejected["mid"], accepted["mid"]);
    bob.ack(&[rejected["mid"].as_str().unwrap()]).await;

    // alice removes carol: everyone hears it, carol too; then carol is out.
    let (status, _) =
        rest_group(stack.public, "alice", "DELETE", "/team/members/carol", None).await;
    assert_eq!(status, 202);
    for client in [&mut alice, &mut bob, &mut carol] {
        let removed = notice(client, "removed").await;
        assert_eq!(removed["system"]["users"], json!(["carol"]));
    }
    alice
        .send(
            json!({"type": "message", "id": "a1", "to": "team", "chat": "group", "body": "after"}),
        )
        .await;
    alice.expect("accepted").await;
    assert_eq!(group_message(&mut bob, "team").await["body"], "after");
    quiet(&mut carol).await;
    carol
        .send(json!({"type": "message", "id": "c1", "to": "team", "chat": "group", "body": "still here?"}))
        .await;
    carol.expect("accepted").await;
    let refused = carol.expect("rejected").await;
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(
        rest_group(stack.public, "carol", "GET", "/team", None)
            .await
            .0,
        403
    );
    // bob heard nothing from carol, and the receipt for "after" went to alice.
    let (skipped, r) = until(&mut alice, "receipt").await;
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(r["by"], "bob");
    quiet(&mut bob).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_admin_leaving_promotes_and_creating_twice_makes_one_group() {
    let stack = Stack::start(Options::default()).await;
    let mut bob = stack.connect("bob", "default").await;
    let mut carol = stack.connect("carol", "default").await;
    let create = json!({"id": "crew", "name": "Crew", "members": ["bob", "carol"]});
    for _ in 0..2 {
        let (status, answer) =
            rest_group(stack.public, "alice", "POST", "", Some(create.clone())).await;
        assert_eq!(status, 202, "{answer}");
    }
    // Commands of different users reach the group in no set order: each step
    // below waits until the one before it was applied.
    for client in [&mut bob, &mut carol] {
        notice(client, "created").await;
    }
    // Someone else taking the id is refused, to the device that asked.
    let mut mallory = stack.connect("mallory", "default").await;
    let (status, _) = rest_group(stack.public, "mallory", "POST", "", Some(create.clone())).await;
    assert_eq!(status, 202);
    let refused = mallory.expect("rejected").await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    // Only one `created` (checked by what comes next): alice left and bob
    // (joined first, ties by id) is admin.
    let (status, _) =
        rest_group(stack.public, "alice", "DELETE", "/crew/members/alice", None).await;
    assert_eq!(status, 202);
    for client in [&mut bob, &mut carol] {
        let left = notice(client, "left").await;
        assert_eq!(left["system"]["users"], json!(["alice"]));
        let promoted = notice(client, "promoted").await;
        assert_eq!(promoted["system"]["users"], json!(["bob"]));
    }
    let (_, group) = rest_group(stack.public, "bob", "GET", "/crew", None).await;
    let role = |u: &str, r: &str| (u.to_owned(), r.to_owned());
    assert_eq!(
        members(&group),
        [role("bob", "admin"), role("carol", "member")]
    );
    assert_eq!(group["created_by"], "alice");

    // The new admin can add; renaming reaches everyone.
    let (status, _) = rest_group(
        stack.public,
        "bob",
        "POST",
        "/crew/members",
        Some(json!({"members": ["dave"]})),
    )
    .await;
    assert_eq!(status, 202);
    for client in [&mut bob, &mut carol] {
        assert_eq!(
            notice(client, "added").await["system"]["users"],
            json!(["dave"])
        );
    }
    let (status, _) = rest_group(
        stack.public,
        "carol",
        "PUT",
        "/crew/name",
        Some(json!({"name": "The Crew"})),
    )
    .await;
    assert_eq!(status, 202);
    for client in [&mut bob, &mut carol] {
        assert_eq!(
            notice(client, "renamed").await["system"]["name"],
            "The Crew"
        );
    }
    // dave had no device yet: both notices wait for him, in order.
    let mut dave = Client::connect_raw(stack.public, &token("dave", "default")).await;
    let replay = dave.replay().await;
    let events: Vec<&str> = replay
        .iter()
        .map(|f| f["system"]["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["added", "renamed"]);

    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_receipt_reaches_an_offline_sender_through_the_inbox() {
    let stack = Stack::start(Options::default()).await;
    let mut alice = stack.connect("alice", "phone").await;
    let mut bob = stack.connect("bob", "phone").await;
    alice
        .send_message("a1", "bob", json!("are you there?"))
        .await;
    let mid = alice.expect("accepted").await["mid"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(alice);
    let m = bob.expect("message").await;
    // Acked after alice is gone (her socket may take a moment to be noticed;
    // either way the receipt ends up in her inbox or on her next socket).
    bob.ack(&[m["mid"].as_str().unwrap()]).await;

    let offline = stack.offline();
    let receipt = loop {
        match offline.next().await {
            OfflineEvent::Store { user, message, .. } if user.as_str() == "alice" => break message,
            _ => continue,
        }
    };
    assert_eq!(receipt.from.as_str(), "bob");
    let mut alice = Client::connect_raw(stack.public, &token("alice", "phone")).await;
    let replay = alice.replay().await;
    assert_eq!(replay.len(), 1, "{replay:?}");
    let r = &replay[0];
    assert_eq!(
        (
            r["type"].as_str(),
            r["mid"].as_str(),
            r["by"].as_str(),
            r["device"].as_str(),
            r["state"].as_str()
        ),
        (
            Some("receipt"),
            Some(mid.as_str()),
            Some("bob"),
            Some("phone"),
            Some("delivered")
        )
    );
    assert_eq!(r["rid"].as_str().unwrap(), receipt.mid.to_string());
    alice.ack(&[r["rid"].as_str().unwrap()]).await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_syncing_over_rest_sends_delivered_receipts_and_typing_is_never_stored() {
    let stack = Stack::start(Options::default()).await;
    register_device(stack.public, "bob", "phone").await;
    let mut alice = stack.connect("alice", "phone").await;
    let offline = stack.offline();

    // Typing to bob, who is not connected, goes nowhere; the message after it is stored.
    alice
        .send(json!({"type": "typing", "to": "bob", "chat": "direct"}))
        .await;
    alice
        .send(json!({"type": "message", "id": "e1", "to": "bob", "body": "gone soon", "ephemeral": true}))
        .await;
    alice.expect("accepted").await;
    alice.send_message("a1", "bob", json!("kept")).await;
    let mid = alice.expect("accepted").await["mid"]
        .as_str()
        .unwrap()
        .to_owned();
    match offline.next().await {
        OfflineEvent::Store { message, .. } => {
            assert_eq!(
                message.mid.to_string(),
                mid,
                "only the ordinary message is stored"
            );
        }
        other => panic!("unexpected {other:?}"),
    }

    // bob syncs in the background and acks over REST: alice hears it was
    // delivered. (The `store` event is on the topic a moment before the inbox
    // has written it.)
    let stored = wait_for_inbox(stack.public, "bob", "phone", 1).await;
    assert_eq!(stored[0]["mid"], mid.as_str());
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/acks", stack.public))
        .bearer_auth(token("bob", "phone"))
        .json(&json!({"mids": [mid]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let r = alice.expect("receipt").await;
    assert_eq!(
        (r["mid"].as_str(), r["by"].as_str(), r["state"].as_str()),
        (Some(mid.as_str()), Some("bob"), Some("delivered"))
    );
    alice.ack(&[ack_id(&r).unwrap().as_str()]).await;

    // A read receipt over REST is relayed too.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/receipts", stack.public))
        .bearer_auth(token("bob", "phone"))
        .json(&json!({"receipts": [{"mid": mid, "to": "alice", "state": "read"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    let r = alice.expect("receipt").await;
    assert_eq!(
        (r["by"].as_str(), r["state"].as_str()),
        (Some("bob"), Some("read"))
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_input_gets_clear_errors_and_nothing_else_changes() {
    let stack = Stack::start(Options::default()).await;
    let too_many: Vec<String> = (0..1025).map(|i| format!("u{i}")).collect();
    let cases = [
        (
            json!({"id": "g1", "name": "G", "members": too_many}),
            413,
            "too_large",
        ),
        (
            json!({"id": "not a group", "name": "G"}),
            400,
            "bad_request",
        ),
        (json!({"id": "g1"}), 400, "bad_request"),
        (
            json!({"id": "g1", "name": "G", "members": ["bob", "no/such"]}),
            400,
            "bad_request",
        ),
        (json!({"name": "G"}), 400, "bad_request"),
    ];
    for (body, status, code) in cases {
        let (got, answer) = rest_group(stack.public, "alice", "POST", "", Some(body.clone())).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
    }
    let (status, _) = rest_group(
        stack.public,
        "alice",
        "DELETE",
        "/g1/members/no%20one",
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = rest_group(
        stack.public,
        "alice",
        "POST",
        "/g1/members",
        Some(json!({"members": []})),
    )
    .await;
    assert_eq!(status, 400);
    let unauthenticated = reqwest::Client::new()
        .post(format!("http://{}/v1/groups", stack.public))
        .json(&json!({"id": "g1", "name": "G"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status().as_u16(), 401);

    // Over the socket: each bad frame is answered, and the socket carries on.
    let mut alice = stack.connect("alice", "default").await;
    let frames = [
        (
            json!({"type": "group.add", "id": "x1", "group": "g1", "members": ["not valid"]}),
            "bad_request",
        ),
        (
            json!({"type": "group.create", "id": "x2", "group": "g1"}),
            "bad_request",
        ),
        (
            json!({"type": "receipt", "mid": "01J00000000000000000000000", "to": "bob", "state": "delivered"}),
            "bad_request",
        ),
        (
            json!({"type": "typing", "to": "a group", "chat": "group"}),
            "bad_request",
        ),
    ];
    for (frame, code) in frames {
        alice.send(frame.clone()).await;
        let error = alice.expect("error").await;
        assert_eq!(error["code"], code, "{frame}: {error}");
    }
    // A message to a group that does not exist is accepted into the stream,
    // then refused by group-router.
    alice
        .send(json!({"type": "message", "id": "m1", "to": "nowhere", "chat": "group", "body": 1}))
        .await;
    let accepted = alice.expect("accepted").await;
    let refused = alice.expect("rejected").await;
    assert_eq!(
        (refused["mid"].clone(), refused["code"].as_str()),
        (accepted["mid"].clone(), Some("forbidden"))
    );
    alice.ack(&[refused["mid"].as_str().unwrap()]).await;
    alice.send(json!({"type": "ping"})).await;
    alice.expect("pong").await;
    // None of it created a group.
    assert_eq!(
        rest_group(stack.public, "alice", "GET", "/g1", None)
            .await
            .0,
        403
    );
    stack.stop().await;
}
