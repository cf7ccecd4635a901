//! A client that stops reading costs the gateway a bounded queue and, after
//! the idle timeout, its socket; nobody else notices (issue 12, item 9).

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{config, connect, message, Ws};

#[tokio::test(start_paused = true)]
async fn a_socket_that_never_reads_is_closed_at_the_idle_timeout_and_others_go_on() {
    let config = config();
    let idle_timeout = config.idle_timeout;
    let ws = Ws::start(config).await;

    // bob connects and never reads; carol reads everything, answering pings.
    let _bob = connect(ws.public, "bob", Some(4096)).await;
    let carol = connect(ws.public, "carol", None).await;
    ws.wait_connected("bob").await;
    ws.wait_connected("carol").await;
    let (carol_tx, mut carol_frames) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let mut carol = carol;
        while let Some(Ok(frame)) = carol.next().await {
            if let Message::Text(text) = frame {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "message" {
                    let _ = carol_tx.send(frame["body"]["seq"].as_u64().unwrap());
                }
            }
        }
    });

    // Fill bob's socket until the gateway stops taking frames for him.
    let mut queued = 0;
    let stalled_at = loop {
        let batch: Vec<Value> = (queued..queued + 16).map(|i| message(i, 60_000)).collect();
        let outcomes = ws.send("bob", &batch).await;
        let sent = outcomes.iter().take_while(|o| *o == "sent").count();
        queued += sent;
        if sent < batch.len() {
            assert_eq!(outcomes[sent], "busy", "{outcomes:?}");
            break Instant::now();
        }
        assert!(
            queued < 2000,
            "the gateway kept taking frames for a socket that never reads"
        );
    };
    // The queue is bounded in bytes: far fewer 60 KB frames than the 1024
    // the frame count allows (what the kernel buffers hold comes on top).
    assert!(queued < 300, "{queued} frames of 60 KB queued for bob");

    // carol's messages still flow while bob's socket is stuck.
    for seq in 0..3 {
        assert_eq!(ws.send("carol", &[message(seq, 100)]).await, ["sent"]);
        let got = tokio::time::timeout(Duration::from_secs(5), carol_frames.recv()).await;
        assert_eq!(
            got.expect("carol's frame must not wait for bob"),
            Some(seq as u64)
        );
    }

    // bob's socket is closed once its write has been stuck for the idle
    // timeout; until then the gateway takes what fits in his queue.
    let closed_after = loop {
        let outcome = ws.send("bob", &[message(9999, 10)]).await;
        match outcome[0].as_str() {
            "busy" | "sent" => {}
            "not_connected" => break stalled_at.elapsed(),
            other => panic!("unexpected outcome {other}"),
        }
        assert!(
            stalled_at.elapsed() < idle_timeout * 3,
            "bob's stuck socket is still open after {:?}",
            stalled_at.elapsed()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    assert!(
        closed_after >= idle_timeout - Duration::from_secs(1),
        "{closed_after:?}"
    );
    assert!(
        closed_after <= idle_timeout + Duration::from_secs(2),
        "{closed_after:?}"
    );
    assert_eq!(ws.gateway.connections(), 1, "carol's socket is still there");

    // And carol still gets hers.
    assert_eq!(ws.send("carol", &[message(3, 100)]).await, ["sent"]);
    assert_eq!(carol_frames.recv().await, Some(3));
    reader.abort();
}
