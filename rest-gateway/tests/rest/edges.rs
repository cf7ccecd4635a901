//! Hostile and careless clients (issue 12, item 8).

use std::time::Duration;

use rest_gateway::rate::RateLimit;

use crate::support::{read_answer, request, send_head, token, Rest};

#[tokio::test(start_paused = true)]
async fn a_bad_token_is_refused_before_the_body_is_read() {
    let rest = Rest::start().await;
    // Announces 9 MB, sends 10 bytes, and would dribble the rest.
    let mut socket = send_head(
        rest.addr,
        "POST",
        "/v1/messages",
        "not.a.token",
        9_000_000,
        b"{\"messages",
    )
    .await;
    let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut socket))
        .await
        .expect("the 401 must not wait for the body");
    assert_eq!(answer.status, 401);
    assert_eq!(answer.error_code(), "unauthorized");
}

/// `{"messages":[{},{},…` with `n` items.
fn many_items(n: usize) -> String {
    let mut body = String::from("{\"messages\":[");
    body.push_str(&vec!["{}"; n].join(","));
    body
}

#[tokio::test]
async fn item_counts_are_limited_while_parsing() {
    let rest = Rest::start().await;
    let alice = token("alice");

    let mut body = many_items(200);
    body.push_str("]}");
    let answer = request(rest.addr, "POST", "/v1/messages", &alice, body.as_bytes()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert_eq!(answer.error_code(), "bad_request");
    assert!(answer.error_message().contains("at most 100"), "{answer:?}");

    // Past the 100th item the parser stops: what follows is never read, so
    // it is the count, not the broken tail, that the answer names.
    let mut body = many_items(101);
    body.push_str(", this is not JSON");
    let answer = request(rest.addr, "POST", "/v1/messages", &alice, body.as_bytes()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.error_message().contains("at most 100"), "{answer:?}");

    let mut mids = String::from("{\"mids\":[");
    mids.push_str(&vec!["\"x\""; 1001].join(","));
    mids.push_str(", broken");
    let answer = request(rest.addr, "POST", "/v1/acks", &alice, mids.as_bytes()).await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(
        answer.error_message().contains("at most 1000"),
        "{answer:?}"
    );

    let mut receipts = String::from("{\"receipts\":[");
    receipts.push_str(&vec!["{}"; 101].join(","));
    receipts.push_str(", broken");
    let answer = request(
        rest.addr,
        "POST",
        "/v1/receipts",
        &alice,
        receipts.as_bytes(),
    )
    .await;
    assert_eq!(answer.status, 400, "{answer:?}");
    assert!(answer.error_message().contains("at most 100"), "{answer:?}");

    // The body size limit stays.
    let huge = vec![b' '; 100 * 96 * 1024 + 8192];
    let answer = request(rest.addr, "POST", "/v1/messages", &alice, &huge).await;
    assert_eq!(answer.status, 413, "{answer:?}");
    assert_eq!(answer.error_code(), "too_large");
    assert_eq!(rest.inbound(), 0, "nothing refused reaches the bus");
}

#[tokio::test(start_paused = true)]
async fn writes_past_a_users_rate_are_refused_with_retry_after() {
    let rest = Rest::with_rate_limit(RateLimit {
        per_second: 2,
        max_users: 100,
    })
    .await;
    let (alice, bob) = (token("alice"), token("bob"));
    let ack = br#"{"mids":["01JDQ8V9Q6F4S9G4Z9Y8X7W6V5"]}"#;
    // The burst: twice the rate.
    for _ in 0..4 {
        let answer = request(rest.addr, "POST", "/v1/acks", &alice, ack).await;
        assert_eq!(answer.status, 202, "{answer:?}");
    }
    let limited = request(rest.addr, "POST", "/v1/acks", &alice, ack).await;
    assert_eq!(limited.status, 429, "{limited:?}");
    assert_eq!(limited.error_code(), "rate_limited");
    assert_eq!(limited.header("retry-after"), Some("1"));
    // Another user is not held back by alice.
    let answer = request(rest.addr, "POST", "/v1/acks", &bob, ack).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    // A message refused for the rate never reaches the bus.
    let message = br#"{"messages":[{"id":"c-1","to":"bob","chat":"direct","body":"hi"}]}"#;
    let answer = request(rest.addr, "POST", "/v1/messages", &alice, message).await;
    assert_eq!(answer.status, 429, "{answer:?}");
    assert_eq!(rest.inbound(), 5, "the five acks taken, nothing refused");

    tokio::time::advance(Duration::from_millis(500)).await;
    let answer = request(rest.addr, "POST", "/v1/messages", &alice, message).await;
    assert_eq!(answer.status, 202, "{answer:?}");
    assert_eq!(answer.body["accepted"][0]["id"], "c-1");
}
