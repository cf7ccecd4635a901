//! `dak up` as a process of its own, stopped (SIGTERM) or killed (SIGKILL)
//! while a device holds messages it has not acked yet and more are arriving,
//! then started again on the same data directory: every accepted message
//! reaches the device once it reconnects, once each on the new socket, and
//! the messages it held come back in the order sent (it had not acked them,
//! so they must come again); a client id resent by the sender's outbox gets
//! its old mid and is not delivered again.
//!
//! A message sent while the process stops may be durable without its sender
//! having heard `accepted`: it may arrive too, but at most once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{free_port, token, wait_ready, Client, Process, PATIENCE, SECRET};

/// Messages accepted before the stop; the device reads all of them and acks
/// none.
const HELD: u64 = 40;
/// Messages sent while the process stops; only those answered `accepted`
/// count.
const IN_FLIGHT: u64 = 40;

/// `dak up` on fixed ports and a data directory that outlive the process.
struct DakUp {
    data_dir: tempfile::TempDir,
    public: SocketAddr,
    internal: SocketAddr,
    admin: SocketAddr,
}

impl DakUp {
    fn new() -> Self {
        let addr = || -> SocketAddr { format!("127.0.0.1:{}", free_port()).parse().unwrap() };
        Self {
            data_dir: tempfile::tempdir().unwrap(),
            public: addr(),
            internal: addr(),
            admin: addr(),
        }
    }

    async fn start(&self) -> Process {
        let log = std::env::var_os("TEST_LOG").is_some();
        let child = Command::new(env!("CARGO_BIN_EXE_dak"))
            .arg("up")
            .env("DAK_DATA_DIR", self.data_dir.path())
            .env("DAK_PUBLIC_ADDR", self.public.to_string())
            .env("DAK_INTERNAL_ADDR", self.internal.to_string())
            .env("DAK_ADMIN_ADDR", self.admin.to_string())
            .env("DAK_JWT_SECRET", SECRET)
            .env("DAK_WS_RATE_LIMIT", "0")
            .env("DAK_ACK_TIMEOUT", "2s")
            .env("DAK_DELIVERY_RETRIES", "10")
            .env("DAK_SHUTDOWN_GRACE", "5s")
            .env_remove("DAK_KAFKA_BROKERS")
            .env_remove("DAK_REDIS_URL")
            .stdout(if log { Stdio::inherit() } else { Stdio::null() })
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .expect("spawning dak up");
        let process = Process::from_child(child);
        wait_ready(self.admin).await;
        process
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_stopped_with_sigterm_loses_nothing() {
    restart_loses_nothing(|process| {
        let status = process.terminate();
        assert!(status.success(), "dak up exited with {status} on SIGTERM");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_killed_with_sigkill_loses_nothing() {
    restart_loses_nothing(|process| process.kill()).await;
}

async fn restart_loses_nothing(stop: impl FnOnce(&mut Process)) {
    let dak = DakUp::new();
    let mut process = dak.start().await;

    let mut bob = Client::connect(dak.public, &token("bob", "phone")).await;
    let mut alice = Client::connect(dak.public, &token("alice", "phone")).await;
    let mut accepted: HashMap<u64, String> = HashMap::new();
    for seq in 0..HELD {
        alice
            .send_message(&format!("m-{seq}"), "bob", json!({ "seq": seq }))
            .await;
    }
    while accepted.len() < HELD as usize {
        let frame = alice.expect("accepted").await;
        accepted.insert(seq_of(frame["id"].as_str().unwrap()), mid_of(&frame));
    }
    // Bob's device has every one of them, and acks none.
    for seq in 0..HELD {
        let frame = bob.expect("message").await;
        assert_eq!(frame["body"]["seq"], seq);
    }

    // More keep coming while dak goes down: those answered `accepted` are
    // durable, whatever happens next.
    for seq in HELD..HELD + IN_FLIGHT {
        alice
            .send_message(&format!("m-{seq}"), "bob", json!({ "seq": seq }))
            .await;
    }
    let first = alice.expect("accepted").await;
    accepted.insert(seq_of(first["id"].as_str().unwrap()), mid_of(&first));
    stop(&mut process);
    // What alice heard before her socket went away.
    while let Some(frame) = alice.recv_within(Duration::from_secs(5)).await {
        if frame["type"] == "accepted" {
            accepted.insert(seq_of(frame["id"].as_str().unwrap()), mid_of(&frame));
        }
    }
    drop(bob);

    let _process = dak.start().await;
    // Bob reconnects: every accepted message comes once, in the order sent,
    // from the inbox replay or from the retries of deliveries in flight.
    let mut bob = Client::connect_raw(dak.public, &token("bob", "phone")).await;
    let mut received: Vec<u64> = Vec::new();
    let mut mids = HashSet::new();
    let deadline = Instant::now() + PATIENCE;
    while !accepted.keys().all(|seq| received.contains(seq)) {
        assert!(
            Instant::now() < deadline,
            "bob got {} of {} accepted messages after the restart",
            accepted.keys().filter(|seq| received.contains(seq)).count(),
            accepted.len()
        );
        let Some(frame) = bob.next_within(Duration::from_secs(1)).await else {
            continue;
        };
        if frame["type"] != "message" {
            continue;
        }
        let seq = receive(&frame, &accepted, &mut mids);
        received.push(seq);
        bob.ack(&[&mid_of(&frame)]).await;
    }
    let held: Vec<u64> = received.iter().copied().filter(|seq| *seq < HELD).collect();
    assert_eq!(
        held,
        (0..HELD).collect::<Vec<_>>(),
        "the held messages again, in order"
    );

    // Alice's outbox resends an id accepted before the stop: same mid, and
    // bob does not get it again; the next thing he gets is a new message.
    let mut alice = Client::connect_raw(dak.public, &token("alice", "phone")).await;
    // Bob's acks sent alice delivered receipts, kept for her while she was away.
    for receipt in alice.replay().await {
        alice
            .ack(&[receipt["rid"].as_str().expect("only receipts")])
            .await;
    }
    alice.send_message("m-5", "bob", json!({ "seq": 5 })).await;
    assert_eq!(mid_of(&alice.expect("accepted").await), accepted[&5]);
    alice
        .send_message("after", "bob", json!({ "seq": 1000 }))
        .await;
    // Before it, only what was sent during the stop and not yet seen.
    loop {
        let frame = bob.expect_any().await;
        if frame["type"] == "message" && frame["body"]["seq"] == 1000 {
            break;
        }
        if frame["type"] == "message" {
            receive(&frame, &accepted, &mut mids);
            bob.ack(&[&mid_of(&frame)]).await;
        }
    }
}

/// Checks a message bob got after the restart and returns its seq: one that
/// alice sent, under the mid she heard if she heard one, and not one bob
/// already got on this socket.
fn receive(
    frame: &serde_json::Value,
    accepted: &HashMap<u64, String>,
    mids: &mut HashSet<String>,
) -> u64 {
    let mid = mid_of(frame);
    let seq = frame["body"]["seq"].as_u64().unwrap();
    assert!(seq < HELD + IN_FLIGHT, "a message alice sent: {frame}");
    if let Some(accepted_mid) = accepted.get(&seq) {
        assert_eq!(accepted_mid, &mid, "an accepted message, under its mid");
    }
    assert!(mids.insert(mid), "seq {seq} delivered twice: {frame}");
    seq
}

fn seq_of(id: &str) -> u64 {
    id.trim_start_matches("m-").parse().unwrap()
}

fn mid_of(frame: &serde_json::Value) -> String {
    frame["mid"].as_str().unwrap().to_owned()
}
