//! The Redis connection itself: a command that timed out makes the next one
//! go over a new connection. Against a redis-server of the test's own, since
//! it blocks the server (`DEBUG SLEEP`) past the response timeout.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn client_id(conn: &mut dak_runtime::redis::Connection) -> redis::RedisResult<i64> {
    redis::cmd("CLIENT").arg("ID").query_async(conn).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_timed_out_makes_the_next_one_use_a_new_connection() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Server(
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "yes"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)"),
    );
    let url = format!("redis://127.0.0.1:{port}");
    let mut conn = loop {
        match dak_runtime::redis::connect(&url).await {
            Ok(conn) => break conn,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
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
