//! The Redis connection itself: a command that timed out makes the next one
//! go over a new connection, and readiness fails on settings that lose data.
//! Against a redis-server of each test's own, since they block the server
//! (`DEBUG SLEEP`) or change its settings.

use std::time::Duration;

use crate::servers::{free_port, start, Server};

async fn client_id(conn: &mut dak_runtime::redis::Connection) -> redis::RedisResult<i64> {
    redis::cmd("CLIENT").arg("ID").query_async(conn).await
}

/// A redis-server of the test's own, with `args`, and a connection to it.
async fn own_server(
    args: &[&str],
) -> (
    (Server, tempfile::TempDir),
    String,
    dak_runtime::redis::Connection,
) {
    let port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let mut all = vec!["--port", &port];
    all.extend_from_slice(args);
    let server = start(dir.path(), &all);
    let url = format!("redis://127.0.0.1:{port}");
    let conn = loop {
        match dak_runtime::redis::connect(&url).await {
            Ok(conn) => break conn,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    ((server, dir), url, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_on_settings_that_lose_acknowledged_data() {
    let (_server, _, mut conn) = own_server(&["--save", "", "--appendonly", "no"]).await;
    let set = |name: &'static str, value: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async::<()>(&mut conn)
                .await
                .unwrap()
        }
    };
    let problem = dak_runtime::redis::ping(&conn).await.unwrap_err();
    assert!(problem.contains("appendonly is no"), "{problem}");

    set("appendonly", "yes").await;
    set("maxmemory-policy", "allkeys-lru").await;
    let problem = dak_runtime::redis::ping(&conn).await.unwrap_err();
    assert!(
        problem.contains("maxmemory-policy is allkeys-lru"),
        "{problem}"
    );
    assert!(!problem.contains("appendonly"), "{problem}");

    set("maxmemory-policy", "noeviction").await;
    assert_eq!(dak_runtime::redis::ping(&conn).await, Ok(()));
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_timed_out_makes_the_next_one_use_a_new_connection() {
    let (_server, url, mut conn) = own_server(&[
        "--save",
        "",
        "--appendonly",
        "no",
        "--enable-debug-command",
        "yes",
    ])
    .await;
    let first = client_id(&mut conn).await.unwrap();

    // Another client blocks the server for longer than the response timeout.
    let blocker = redis::Client::open(url.as_str()).unwrap();
    let mut blocker = blocker.get_multiplexed_async_connection().await.unwrap();
    let sleeping = tokio::spawn(async move {
        redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(7)
            .query_async::<()>(&mut blocker)
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let timed_out = client_id(&mut conn).await;
    assert!(
        timed_out.as_ref().is_err_and(|e| e.is_timeout()),
        "{timed_out:?}"
    );
    sleeping.await.unwrap().unwrap();

    let next = client_id(&mut conn).await.unwrap();
    assert_ne!(next, first, "the next command went over a new connection");
    // And that one stays: no new connection per command.
    assert_eq!(client_id(&mut conn).await.unwrap(), next);
}

/// An IPv6 address in brackets, as URLs write it, is reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv6_address_is_reached() {
    let port = free_port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let _server = start(dir.path(), &["--bind", "::1", "--port", &port]);
    let target = dak_runtime::redis::Target::url(&format!("redis://[::1]:{port}"));
    let mut conn = crate::servers::connect(&target).await;
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}
