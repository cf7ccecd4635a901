//! `dak up` when its data directory takes no more bytes. A full disk refuses
//! a write that would grow a file; so does a file size limit
//! (`RLIMIT_FSIZE`), which a test can set on one process and lift again
//! without root. `dak up` must keep running, refuse what it cannot make
//! durable with `unavailable` (the client keeps the message), say so on
//! `/readyz`, and once its files can grow again take the refused message and
//! deliver every accepted one, once, in order.
//!
//! The other limit a process starts with, its soft limit of open files, is
//! one `dak up` raises itself: every socket is an open file.

use std::collections::HashMap;
use std::net::SocketAddr;

use serde_json::{json, Value};

use crate::support::{
    dak_up_command, metric, register_device, start_dak_up, token, wait_ready, Client, PATIENCE,
};

/// The size no file of `dak up` may grow past while the limit holds. Its
/// files are far smaller once it started; the bus's write-ahead log passes
/// this after a few hundred messages of [`BODY`] bytes.
const LIMIT: u64 = 2 << 20;

/// Bytes of padding per message, so the files fill in a few hundred.
const BODY: usize = 4000;

/// Most messages sent before the limit must have been reached.
const MOST: u64 = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_outlives_a_data_directory_that_takes_no_more_bytes() {
    let data_dir = tempfile::tempdir().unwrap();
    let (mut process, public, admin) = start_dak_up(dak_up_command(
        data_dir.path(),
        &[("DAK_WS_RATE_LIMIT", "0")],
    ))
    .await;
    // Bob's phone is known and away: what alice sends waits in its inbox.
    register_device(public, "bob", "phone").await;
    let mut alice = Client::connect(public, &token("alice", "phone")).await;

    set_file_size_limit(process.id(), LIMIT);
    let mut accepted: HashMap<u64, String> = HashMap::new();
    let refused = loop {
        let seq = accepted.len() as u64;
        assert!(seq < MOST, "{MOST} messages accepted past the size limit");
        let answer = send(&mut alice, seq).await;
        match answer["type"].as_str() {
            Some("accepted") => {
                accepted.insert(seq, mid_of(&answer));
            }
            _ => {
                assert_eq!(answer["code"], "unavailable", "answer: {answer}");
                assert_eq!(answer["id"], format!("m-{seq}"), "answer: {answer}");
                break seq;
            }
        }
    };
    assert!(
        process.is_running(),
        "dak up ended when a file could not grow"
    );
    let (status, readiness) = readyz(admin).await;
    assert_eq!(status, 503, "/readyz while writes fail: {readiness}");
    assert!(
        readiness["failing"]["bus"].is_string(),
        "/readyz names the bus: {readiness}"
    );
    assert!(metric(admin, "dak_bus_write_failures_total").await >= 1.0);

    // Room again (the operator freed space): the outbox's retry is taken.
    set_file_size_limit(process.id(), libc::RLIM_INFINITY);
    let answer = loop {
        let answer = send(&mut alice, refused).await;
        if answer["type"] == "accepted" {
            break answer;
        }
        assert_eq!(answer["code"], "unavailable", "answer: {answer}");
    };
    accepted.insert(refused, mid_of(&answer));
    // An id accepted before the failure keeps its mid.
    assert_eq!(mid_of(&send(&mut alice, 0).await), accepted[&0]);
    wait_ready(admin).await;

    // Bob's phone gets every accepted message, once each, in the order sent:
    // from its inbox, or live after the replay if persistence is still
    // catching up on what it retried.
    let mut sent: Vec<(u64, String)> = accepted.into_iter().collect();
    sent.sort();
    let mut bob = Client::connect_raw(public, &token("bob", "phone")).await;
    let mut got: Vec<(u64, String)> = Vec::new();
    while got.len() < sent.len() {
        let frame = bob.expect_any().await;
        if frame["type"] == "message" {
            got.push((frame["body"]["seq"].as_u64().unwrap(), mid_of(&frame)));
        }
    }
    assert_eq!(got, sent, "bob's phone: every accepted message, in order");
    assert!(process.is_running());
}

/// Sends message `seq` as alice and returns the answer to it: `accepted`, or
/// the error frame carrying its id.
async fn send(alice: &mut Client, seq: u64) -> Value {
    let id = format!("m-{seq}");
    alice
        .send_message(&id, "bob", json!({"seq": seq, "pad": "x".repeat(BODY)}))
        .await;
    loop {
        let frame = alice.expect_any().await;
        if frame["id"] == id.as_str()
            && matches!(frame["type"].as_str(), Some("accepted" | "error"))
        {
            return frame;
        }
    }
}

/// Sets the soft `RLIMIT_FSIZE` of process `pid` to `bytes` (at most its
/// hard limit), which any process may lower and raise again.
fn set_file_size_limit(pid: u32, bytes: libc::rlim_t) {
    let mut limit = file_size_limit(pid, None);
    limit.rlim_cur = bytes.min(limit.rlim_max);
    file_size_limit(pid, Some(limit));
}

/// `prlimit` on `RLIMIT_FSIZE` of process `pid`: sets it to `new`, if given,
/// and returns what it was.
fn file_size_limit(pid: u32, new: Option<libc::rlimit>) -> libc::rlimit {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new.as_ref().map_or(std::ptr::null(), |n| n as *const _);
    // SAFETY: both pointers are null or point at locals that outlive the
    // call; prlimit reads `new` and writes `old`. A child of this process is
    // ours to change.
    #[allow(unsafe_code)]
    let result =
        unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_FSIZE, new_ptr, &mut old) };
    assert_eq!(result, 0, "prlimit: {}", std::io::Error::last_os_error());
    old
}

async fn readyz(admin: SocketAddr) -> (u16, Value) {
    let response = reqwest::get(format!("http://{admin}/readyz"))
        .await
        .expect("/readyz");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON from /readyz"))
}

fn mid_of(frame: &Value) -> String {
    frame["mid"].as_str().expect("a mid").to_owned()
}

/// Open files `dak up` is started with, as a soft limit: the default of many
/// Linux systems is 1,024, and every socket is one.
const FEW_FILES: libc::rlim_t = 256;

/// Sockets connected at once, past [`FEW_FILES`].
const SOCKETS: usize = 400;

/// A process may raise its soft limit of open files up to its hard limit;
/// a chat server left at a low soft limit stops accepting sockets (EMFILE)
/// long before it runs out of anything else. `dak up` started with a soft
/// limit of 256 must hold 400 sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dak_up_holds_more_sockets_than_its_soft_limit_of_open_files() {
    use std::os::unix::process::CommandExt;

    let data_dir = tempfile::tempdir().unwrap();
    let mut command = dak_up_command(data_dir.path(), &[("DAK_WS_RATE_LIMIT", "0")]);
    // SAFETY: runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: getrlimit and setrlimit are
    // system calls on a local.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            limit.rlim_cur = FEW_FILES.min(limit.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let (_process, public, _admin) = start_dak_up(command).await;

    let mut sockets = Vec::new();
    for i in 0..SOCKETS {
        let device = format!("d{i}");
        let connected =
            tokio::time::timeout(PATIENCE, Client::connect(public, &token("crowd", &device))).await;
        match connected {
            Ok(client) => sockets.push(client),
            Err(_) => panic!("socket {i} not connected within {PATIENCE:?}"),
        }
    }
    // Every one of them is live: a message to their user reaches each.
    let mut alice = Client::connect(public, &token("alice", "phone")).await;
    alice
        .send_message("hello", "crowd", json!({"text": "hello"}))
        .await;
    alice.expect("accepted").await;
    for (i, socket) in sockets.iter_mut().enumerate() {
        let frame = socket.recv().await;
        assert_eq!(frame["type"], "message", "socket {i}: {frame}");
    }
}
