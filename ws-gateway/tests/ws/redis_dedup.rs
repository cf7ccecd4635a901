//! The gateway with its dedup store in Redis, as the separate services run
//! it: every socket's messages are answered while hundreds send at once.

use std::sync::Arc;
use std::time::Duration;

use dak_runtime::dedup::RedisDedup;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{config, connect, Ws};

const SOCKETS: usize = 200;
const MESSAGES_EACH: usize = 20;

/// Each socket writes a burst of messages before reading any answer, so the
/// gateway holds, per socket, answers waiting for their dedup confirm while
/// the next message's dedup reserve waits in the same Redis connection's
/// queue. Every message must be `accepted`, in order. Before the answers ran
/// as tasks of their own, confirms that nothing polled held that queue's
/// places, every Redis command of the gateway stalled, and sockets heard
/// `unavailable` after the 5 s command timeout.
#[tokio::test]
async fn many_sockets_sending_at_once_all_hear_accepted() {
    let url =
        std::env::var("DAK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let conn = dak_runtime::redis::connect(&url)
        .await
        .expect("Redis for the dedup store (scripts/test starts one)");
    let prefix = format!("dak-test-{}", ulid::Ulid::new().to_string().to_lowercase());
    let dedup = RedisDedup::new(conn, &prefix, Duration::from_secs(60), 10_000);
    let ws = Ws::start_with_dedup(config(), Arc::new(dedup)).await;

    let mut clients = Vec::new();
    for i in 0..SOCKETS {
        clients.push(connect(ws.public, &format!("u{i}"), None).await);
    }
    for client in &mut clients {
        for seq in 0..MESSAGES_EACH {
            let frame = json!({"type": "message", "id": seq.to_string(), "to": "sink", "body": {"seq": seq}});
            client
                .feed(Message::Text(frame.to_string().into()))
                .await
                .unwrap();
        }
        client.flush().await.unwrap();
    }

    let answers = futures_util::future::join_all(clients.into_iter().enumerate().map(
        |(i, mut client)| async move {
            let mut accepted = Vec::new();
            while accepted.len() < MESSAGES_EACH {
                let Some(Ok(Message::Text(text))) = client.next().await else {
                    panic!("u{i}'s socket ended after {} answers", accepted.len());
                };
                let frame: Value = serde_json::from_str(&text).unwrap();
                match frame["type"].as_str() {
                    Some("accepted") => accepted.push(frame["id"].as_str().unwrap().to_owned()),
                    _ => panic!("u{i} heard {frame} after {} accepted", accepted.len()),
                }
            }
            accepted
        },
    ))
    .await;

    let in_order: Vec<String> = (0..MESSAGES_EACH).map(|seq| seq.to_string()).collect();
    for (i, accepted) in answers.iter().enumerate() {
        assert_eq!(accepted, &in_order, "u{i}");
    }
}
