//! `dak up` as a process of its own, stopped (SIGTERM) or killed (SIGKILL)
//! while a device holds messages it has not acked yet and more are arriving,
//! then started again on the same data directory: every accepted message
//! reaches the device once it reconnects, once each on the new socket, and
//! the messages it held come back in the order sent (it had not acked them,
//! so they must come again); a client id resent by the sender's outbox gets
//! its old mid and is not delivered again.
//!
//! A message sent while the process stops may be durable without its sender
//! having heard `accepted`: it may arrive too. After a SIGKILL, a message in
//! transit at the kill may arrive twice under its one mid (the bus hands out
//! again what a consumer had not committed: at least once); the held ones,
//! and everything after a SIGTERM, arrive once.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{
    dak_up_command, register_device, spawn_dak_up, token, wait_for_inbox, Client, Process, PATIENCE,
};

/// Messages accepted before the stop; the device reads all of them and acks
/// none.
const HELD: u64 = 40;
/// Messages sent while the process stops; only those answered `accepted`
/// count.
const IN_FLIGHT: u64 = 40;

/// `dak up` on a data directory that outlives the process.
struct DakUp {
    data_dir: tempfile::TempDir,
}

/// A running `dak up`, on the addresses it bound (port 0) and printed.
struct Running {
    process: Process,
    public: SocketAddr,
}

impl DakUp {
    fn new() -> Self {
        Self {
            data_dir: tempfile::tempdir().unwrap(),
        }
    }

    async fn start(&self) -> Running {
        let env = [
            ("DAK_WS_RATE_LIMIT", "0"),
            ("DAK_ACK_TIMEOUT", "2s"),
            ("DAK_DELIVERY_RETRIES", "10"),
            ("DAK_SHUTDOWN_GRACE", "5s"),
        ];
        let (process, public, _) = spawn_dak_up(self.data_dir.path(), &env).await;
        Running { process, public }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_stopped_with_sigterm_loses_nothing() {
    restart_loses_nothing(Stop::Term).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_killed_with_sigkill_loses_nothing() {
    restart_loses_nothing(Stop::Kill).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// SIGTERM: a clean shutdown.
    Term,
    /// SIGKILL: a crash.
    Kill,
}

async fn restart_loses_nothing(stop: Stop) {
    let dak = DakUp::new();
    let Running {
        mut process,
        public,
    } = dak.start().await;

    let mut bob = Client::connect(public, &token("bob", "phone")).await;
    let mut alice = Client::connect(public, &token("alice", "phone")).await;
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
    match stop {
        Stop::Term => {
            let status = process.terminate();
            assert!(status.success(), "dak up exited with {status} on SIGTERM");
        }
        Stop::Kill => process.kill(),
    }
    // What alice heard before her socket went away.
    while let Some(frame) = alice.recv_within(Duration::from_secs(5)).await {
        if frame["type"] == "accepted" {
            accepted.insert(seq_of(frame["id"].as_str().unwrap()), mid_of(&frame));
        }
    }
    drop(bob);

    let restarted = dak.start().await;
    let public = restarted.public;
    // Bob reconnects: every accepted message comes once, in the order sent,
    // from the inbox replay or from the retries of deliveries in flight.
    let mut bob = Client::connect_raw(public, &token("bob", "phone")).await;
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
        let seq = receive(&frame, &accepted, &mut mids, stop);
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
    let mut alice = Client::connect_raw(public, &token("alice", "phone")).await;
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
            receive(&frame, &accepted, &mut mids, stop);
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
    stop: Stop,
) -> u64 {
    let mid = mid_of(frame);
    let seq = frame["body"]["seq"].as_u64().unwrap();
    assert!(seq < HELD + IN_FLIGHT, "a message alice sent: {frame}");
    if let Some(accepted_mid) = accepted.get(&seq) {
        assert_eq!(accepted_mid, &mid, "an accepted message, under its mid");
    }
    let first_time = mids.insert(mid);
    let in_transit_at_a_crash = stop == Stop::Kill && seq >= HELD;
    assert!(
        first_time || in_transit_at_a_crash,
        "seq {seq} delivered twice: {frame}"
    );
    seq
}

fn seq_of(id: &str) -> u64 {
    id.trim_start_matches("m-").parse().unwrap()
}

fn mid_of(frame: &serde_json::Value) -> String {
    frame["mid"].as_str().unwrap().to_owned()
}

/// The devices a user had before a restart are still his after it: a message
/// sent to him while none of them is connected waits in each device's inbox,
/// so every one of them gets it, not only the first to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_device_known_before_a_restart_gets_what_was_sent_after_it() {
    let dak = DakUp::new();
    let Running {
        mut process,
        public,
    } = dak.start().await;
    // bob's phone and laptop connect; his tablet only registers a push token.
    drop(Client::connect(public, &token("bob", "phone")).await);
    drop(Client::connect(public, &token("bob", "laptop")).await);
    register_device(public, "bob", "tablet").await;
    let status = process.terminate();
    assert!(status.success(), "dak up exited with {status} on SIGTERM");

    let restarted = dak.start().await;
    each_gets_its_copy(
        restarted.public,
        &[("laptop", 0), ("phone", 0), ("tablet", 0)],
    )
    .await;
}

/// The first start of a `dak up` with `devices.db` on the data directory of
/// one without it: the devices that left a trace in the other files (a
/// stored message, a push token, the status of a message they got) are
/// bob's, and each gets what is sent next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_devices_an_earlier_dak_up_knew_are_found_in_its_files() {
    let dak = DakUp::new();
    let Running {
        mut process,
        public,
    } = dak.start().await;
    // The laptop connects once and goes away, and its copy is stored; the
    // phone stays and acks its copy; the tablet has a push token, and a
    // copy stored.
    drop(Client::connect(public, &token("bob", "laptop")).await);
    let mut phone = Client::connect(public, &token("bob", "phone")).await;
    register_device(public, "bob", "tablet").await;
    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    alice
        .send_message("before", "bob", json!({ "text": "hello" }))
        .await;
    alice.expect("accepted").await;
    let got = phone.expect("message").await;
    phone.ack(&[&mid_of(&got)]).await;
    wait_for_inbox(public, "bob", "laptop", 1).await;
    // Its `delivered` receipt reached alice: the phone's ack is handled.
    alice.expect("receipt").await;
    let status = process.terminate();
    assert!(status.success(), "dak up exited with {status} on SIGTERM");
    for file in ["devices.db", "devices.db-wal", "devices.db-shm"] {
        let _ = std::fs::remove_file(dak.data_dir.path().join(file));
    }

    let restarted = dak.start().await;
    each_gets_its_copy(
        restarted.public,
        &[("laptop", 1), ("phone", 0), ("tablet", 1)],
    )
    .await;
}

/// alice sends bob one message while none of his devices is connected: each
/// of `devices`, holding `(device, messages stored before)`, gets its own
/// copy in its inbox, whichever asks first.
async fn each_gets_its_copy(public: SocketAddr, devices: &[(&str, usize)]) {
    let mut alice = Client::connect_raw(public, &token("alice", "phone")).await;
    alice.replay().await;
    alice
        .send_message("after", "bob", json!({ "text": "hi" }))
        .await;
    let mid = mid_of(&alice.expect("accepted").await);
    for (device, before) in devices {
        let stored = wait_for_inbox(public, "bob", device, before + 1).await;
        assert_eq!(
            mid_of(&stored[*before]),
            mid,
            "bob's {device} after the restart"
        );
    }
}

/// Two `dak up` on one data directory would each trust what they hold in
/// memory of the same files (the log's tails and offsets, the outbox dedup
/// entries, the deliveries in flight) and undo each other's work. The second
/// must refuse to start, naming the directory and the process that has it;
/// the first carries on, and once it is gone, SIGKILL included, the
/// directory is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_dak_up_on_a_data_directory_in_use_refuses_to_start() {
    let dak = DakUp::new();
    let mut first = dak.start().await;
    let mut alice = Client::connect(first.public, &token("alice", "phone")).await;
    register_device(first.public, "bob", "phone").await;
    alice
        .send_message("before", "bob", json!({"text": "before"}))
        .await;
    let before = alice.expect("accepted").await["mid"].clone();

    // Its own addresses, so that only the data directory is shared.
    let (status, said) = run_to_exit(dak_up_command(dak.data_dir.path(), &[])).await;
    assert_eq!(status.code(), Some(64), "exit status; it said: {said}");
    let dir = dak.data_dir.path().display().to_string();
    let pid = first.process.id().to_string();
    assert!(
        said.contains(&dir) && said.contains("in use") && said.contains(&pid),
        "names the directory and the process using it: {said}"
    );

    // The first carries on.
    alice
        .send_message("after", "bob", json!({"text": "after"}))
        .await;
    let after = alice.expect("accepted").await["mid"].clone();

    let mids = |inbox: Vec<serde_json::Value>| -> Vec<_> {
        inbox.iter().map(|m| m["mid"].clone()).collect()
    };
    let both = vec![before, after];
    let inbox = wait_for_inbox(first.public, "bob", "phone", 2).await;
    assert_eq!(mids(inbox), both, "bob's inbox");

    first.process.kill();
    let again = dak.start().await;
    let inbox = wait_for_inbox(again.public, "bob", "phone", 2).await;
    assert_eq!(mids(inbox), both, "bob's inbox after the restart");
}

/// A file of the data directory that is not a SQLite database (a disk that
/// failed, another file copied over it): `dak up` does not start, and says
/// which file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_names_a_data_file_it_cannot_open() {
    // Each file `dak up` opens on its embedded defaults: `dedup.db` only
    // on Kafka.
    for &file in dak::backup::FILES.iter().filter(|&&f| f != "dedup.db") {
        let data_dir = tempfile::tempdir().unwrap();
        let path = data_dir.path().join(file);
        std::fs::write(&path, "not a database\n".repeat(1000)).unwrap();
        let (status, said) = run_to_exit(dak_up_command(data_dir.path(), &[])).await;
        assert!(!status.success(), "{file}: dak up started; it said: {said}");
        assert!(
            said.contains(&path.display().to_string()) && said.contains("not a database"),
            "{file}: names the file and what is wrong with it: {said}"
        );
    }
}

/// Runs `command` until it exits, within [`PATIENCE`], and returns its exit
/// status and what it wrote on stderr.
async fn run_to_exit(mut command: std::process::Command) -> (std::process::ExitStatus, String) {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dak up");
    let stderr = child.stderr.take().unwrap();
    // Read as it comes, so that a process that keeps running never blocks
    // on a full pipe.
    let said = std::thread::spawn(move || {
        let mut said = String::new();
        let _ = std::io::Read::read_to_string(&mut { stderr }, &mut said);
        said
    });
    let mut child = Process::from_child(child);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.exit_status() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dak up still runs after {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    (status, said.join().expect("reading stderr"))
}

/// Messages alice sends before `dak backup` starts.
const BEFORE_COPY: u64 = 60;
/// Messages she goes on sending while it runs (and after, if it is quicker).
const DURING_COPY: u64 = 40;

/// `dak backup` of the data directory of a `dak up` taking messages; that
/// `dak up` is then killed and a new one started on the copy. Every message
/// accepted before the copy began reaches the device, once each and in the
/// order sent; what it gets beside them is only what was accepted later,
/// in order too; and the outbox's resend of an early client id gets its
/// first mid back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_on_a_backup_taken_under_traffic_has_what_was_accepted_before_it() {
    let dak = DakUp::new();
    let mut first = dak.start().await;
    register_device(first.public, "bob", "phone").await;
    let mut alice = Client::connect(first.public, &token("alice", "phone")).await;
    let mut mids: HashMap<u64, serde_json::Value> = HashMap::new();
    for seq in 0..BEFORE_COPY {
        mids.insert(seq, send_seq(&mut alice, seq).await);
    }

    let copies = tempfile::tempdir().unwrap();
    let copy = copies.path().join("copy");
    let mut backup = std::process::Command::new(env!("CARGO_BIN_EXE_dak"));
    backup
        .arg("backup")
        .arg("--data-dir")
        .arg(dak.data_dir.path())
        .arg(&copy);
    let copying = tokio::spawn(run_to_exit(backup));
    let mut seq = BEFORE_COPY;
    while seq < BEFORE_COPY + DURING_COPY || !copying.is_finished() {
        mids.insert(seq, send_seq(&mut alice, seq).await);
        seq += 1;
    }
    let (status, said) = copying.await.unwrap();
    assert!(status.success(), "dak backup: {said}");
    // The backup's list of files names every database `dak up` keeps.
    for entry in std::fs::read_dir(dak.data_dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".db") {
            assert!(
                dak::backup::FILES.contains(&name.as_str()),
                "{name} not backed up"
            );
        }
    }
    first.process.kill();

    let env = [("DAK_WS_RATE_LIMIT", "0")];
    let (_restored, public, _) = spawn_dak_up(&copy, &env).await;
    let mut bob = Client::connect_raw(public, &token("bob", "phone")).await;
    let mut got: Vec<u64> = Vec::new();
    while !(0..BEFORE_COPY).all(|seq| got.contains(&seq)) {
        let frame = bob.expect_any().await;
        if frame["type"] != "message" {
            continue;
        }
        let seq = frame["body"]["seq"].as_u64().unwrap();
        assert_eq!(frame["mid"], mids[&seq], "message {seq} under its mid");
        assert!(
            got.last().is_none_or(|&last| last < seq),
            "message {seq} after {got:?}: once each, in order"
        );
        got.push(seq);
    }

    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    alice.send_message("m-0", "bob", json!({"seq": 0})).await;
    assert_eq!(alice.expect("accepted").await["mid"], mids[&0]);
}

/// Sends alice's message `seq` to bob, as client id `m-{seq}`, and returns
/// the mid it was accepted under.
async fn send_seq(alice: &mut Client, seq: u64) -> serde_json::Value {
    let id = format!("m-{seq}");
    alice.send_message(&id, "bob", json!({"seq": seq})).await;
    alice.expect("accepted").await["mid"].clone()
}
