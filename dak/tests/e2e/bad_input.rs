use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{rest_send, token, Client, Options, Stack};

/// Each bad frame gets an `error` with the right code, the socket stays open,
/// and the good message sent after all of them is the only thing bob receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_errors_and_disturb_nothing() {
    let stack = Stack::start(Options {
        extra: vec![
            "--max-body-bytes".into(),
            "1024".into(),
            "--max-frame-bytes".into(),
            "2048".into(),
        ],
        ..Options::default()
    })
    .await;
    let mut alice = stack.connect("alice", "phone").await;
    let mut bob = stack.connect("bob", "phone").await;

    let cases: Vec<(String, &str, Option<&str>)> = vec![
        (
            r#"{"type":"message","id":"c-1""#.into(),
            "bad_request",
            None,
        ),
        ("not json at all".into(), "bad_request", None),
        (
            r#"{"type":"dance","id":"c-2"}"#.into(),
            "bad_request",
            Some("c-2"),
        ),
        (
            r#"{"id":"c-3","to":"bob","body":1}"#.into(),
            "bad_request",
            Some("c-3"),
        ),
        (
            r#"{"type":"message","id":"c-4","body":1}"#.into(),
            "bad_request",
            Some("c-4"),
        ),
        (
            r#"{"type":"message","id":"c-5","to":"bob"}"#.into(),
            "bad_request",
            Some("c-5"),
        ),
        (
            r#"{"type":"message","id":"c 6","to":"bob","body":1}"#.into(),
            "bad_request",
            Some("c 6"),
        ),
        (
            r#"{"type":"message","id":"c-7","to":"bob/../admin","body":1}"#.into(),
            "bad_request",
            Some("c-7"),
        ),
        (
            r#"{"type":"message","id":"c-8","to":"bob","from":"mallory","body":1}"#.into(),
            "forbidden",
            Some("c-8"),
        ),
        (
            r#"{"type":"ack","mids":["not-a-mid"]}"#.into(),
            "bad_request",
            None,
        ),
        (
            json!({"type":"message","id":"c-9","to":"bob","body":"x".repeat(1500)}).to_string(),
            "too_large",
            Some("c-9"),
        ),
        (
            json!({"type":"ping","pad":"x".repeat(3000)}).to_string(),
            "too_large",
            None,
        ),
    ];
    for (text, code, id) in &cases {
        alice.send_text(text.clone()).await;
        let error = alice.expect("error").await;
        assert_eq!(error["code"], *code, "for {text:.80}: {error}");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        match id {
            Some(id) => assert_eq!(error["id"], *id, "for {text:.80}"),
            None => assert!(error.get("id").is_none(), "for {text:.80}: {error}"),
        }
    }
    let error_for_missing_to = {
        alice
            .send_text(r#"{"type":"message","id":"c-10","body":1}"#.into())
            .await;
        alice.expect("error").await
    };
    assert_eq!(error_for_missing_to["message"], "field `to` is missing");

    alice
        .send_text(String::from_utf8(vec![b'x'; 10]).unwrap())
        .await;
    assert_eq!(alice.expect("error").await["code"], "bad_request");

    // Still open, still working.
    alice.send(json!({"type": "ping"})).await;
    alice.expect("pong").await;
    alice
        .send_message("good", "bob", json!("the only one"))
        .await;
    let accepted = alice.expect("accepted").await;
    let frame = bob.expect("message").await;
    assert_eq!(frame["mid"], accepted["mid"]);
    assert_eq!(frame["from"], "alice", "the server sets `from`");
    bob.ack(&[frame["mid"].as_str().unwrap()]).await;
    assert!(bob.next_within(Duration::from_millis(500)).await.is_none());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_refused_and_the_socket_stays() {
    use futures_util::SinkExt;
    let stack = Stack::start(Options::default()).await;
    let client = stack.connect("alice", "phone").await;
    let mut ws = client.into_inner();
    ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        vec![1, 2, 3].into(),
    ))
    .await
    .unwrap();
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"type":"ping"}"#.into(),
    ))
    .await
    .unwrap();
    let mut frames = Vec::new();
    use futures_util::StreamExt;
    while frames.len() < 2 {
        if let tokio_tungstenite::tungstenite::Message::Text(t) = ws.next().await.unwrap().unwrap()
        {
            frames.push(serde_json::from_str::<Value>(t.as_str()).unwrap());
        }
    }
    assert_eq!(frames[0]["code"], "bad_request");
    assert_eq!(frames[1]["type"], "pong");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_at_the_upgrade() {
    let stack = Stack::start(Options::default()).await;
    let forged = dak_runtime::auth::mint(
        "not-the-secret",
        &"alice".parse().unwrap(),
        &"phone".parse().unwrap(),
        Duration::from_secs(60),
    );
    let expired = {
        // exp one hour ago, signed with the right secret.
        use jsonwebtoken::{encode, EncodingKey, Header};
        let exp = dak_runtime::now_ms() / 1000 - 3600;
        encode(
            &Header::default(),
            &json!({"sub": "alice", "exp": exp}),
            &EncodingKey::from_secret(crate::support::SECRET.as_bytes()),
        )
        .unwrap()
    };
    for bad in [forged.as_str(), expired.as_str(), "garbage"] {
        match Client::try_connect(stack.public, bad).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                assert_eq!(response.status().as_u16(), 401);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a bad token was let in"),
        }
    }
    let no_token = reqwest::get(format!("http://{}/v1/ws", stack.public))
        .await
        .unwrap();
    assert_eq!(no_token.status().as_u16(), 401);
    let body: Value = no_token.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_rate_limited_and_the_socket_stays() {
    let stack = Stack::start(Options {
        extra: vec!["--rate-limit".into(), "1".into()],
        ..Options::default()
    })
    .await;
    let mut alice = stack.connect("alice", "phone").await;
    let started = std::time::Instant::now();
    for i in 0..30 {
        alice.send_message(&format!("f-{i}"), "bob", json!(i)).await;
    }
    let (mut accepted, mut limited) = (0, 0);
    for _ in 0..30 {
        let frame = alice.recv().await;
        match (frame["type"].as_str(), frame["code"].as_str()) {
            (Some("accepted"), _) => accepted += 1,
            (Some("error"), Some("rate_limited")) => limited += 1,
            _ => panic!("unexpected {frame}"),
        }
    }
    // The burst is twice the rate (2), plus one per second the flood took to be
    // read; the server read it all within the time measured here.
    let allowed = 2 + started.elapsed().as_secs_f64().ceil() as usize;
    assert!(
        (2..=allowed).contains(&accepted),
        "accepted {accepted}, allowed {allowed}"
    );
    assert!(limited >= 30 - allowed);
    assert_eq!(accepted + limited, 30);
    alice.send(json!({"type": "ping"})).await;
    alice.expect("pong").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_refuses_bad_input_clearly() {
    let stack = Stack::start(Options::default()).await;
    let alice = token("alice", "phone");
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/messages", stack.public);

    let malformed = http
        .post(&url)
        .bearer_auth(&alice)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status().as_u16(), 400);
    let body: Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request");

    let (status, body) = rest_send(stack.public, &alice, json!({"messages": []})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request"))
    );
    let too_many: Vec<Value> = (0..101)
        .map(|i| json!({"id": format!("m{i}"), "to": "bob", "body": 1}))
        .collect();
    let (status, _) = rest_send(stack.public, &alice, json!({"messages": too_many})).await;
    assert_eq!(status, 400);

    let (status, body) = rest_send(
        stack.public,
        "forged",
        json!({"messages": [{"id": "1", "to": "bob", "body": 1}]}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let no_auth = http
        .post(&url)
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(no_auth.status().as_u16(), 401);

    // One bad message does not sink the batch.
    let (status, body) = rest_send(
        stack.public,
        &alice,
        json!({"messages": [
            {"id": "ok-1", "to": "bob", "body": 1},
            {"id": "bad-1", "to": "bob"},
            {"id": "spoof", "to": "bob", "from": "mallory", "body": 1},
            {"id": "ok-2", "to": "bob", "body": 2}
        ]}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    let accepted: Vec<&str> = body["accepted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(accepted, ["ok-1", "ok-2"]);
    let rejected: Vec<(&str, &str)> = body["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap(), r["code"].as_str().unwrap()))
        .collect();
    assert_eq!(rejected, [("bad-1", "bad_request"), ("spoof", "forbidden")]);

    // A body past the batch limit gets the JSON error shape too.
    let huge = http
        .post(&url)
        .bearer_auth(&alice)
        .header("content-type", "application/json")
        .body(vec![b' '; 11 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413);
    assert_eq!(
        huge.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..]),
        "the unread rest of the body ends the connection, and the client is told"
    );
    let body: Value = huge.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_large");

    let acks = format!("http://{}/v1/acks", stack.public);
    let bad_ack = http
        .post(&acks)
        .bearer_auth(&alice)
        .json(&json!({"mids": ["x"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_ack.status().as_u16(), 400);
    stack.stop().await;
}
