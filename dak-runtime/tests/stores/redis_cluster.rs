//! Redis Cluster: the stores keep their contracts on a cluster of three
//! primaries of the test's own (`scripts/engines/redis-cluster`), so that each
//! script's keys share a slot and pipelines spanning slots reach every node;
//! over TLS; and while slots move.

use std::time::{Duration, Instant};

use dak_runtime::presence::{Gateway, Presence, RedisPresence};
use dak_runtime::redis::{RedisUrl, Target};
use dak_wire::{DeviceId, UserId};

use crate::servers::Cluster;

/// A connection to `cluster` through its first node: one seed is enough, the
/// client learns the others from it.
async fn connect(cluster: &Cluster, tls: bool) -> dak_runtime::redis::Connection {
    let target = Target {
        urls: vec![RedisUrl(cluster.urls[0].clone())],
        cluster: true,
        ca_cert: tls.then(|| cluster.ca()),
        ..Target::default()
    };
    crate::servers::connect(&target).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_keep_their_contracts_on_a_cluster() {
    let cluster = Cluster::start(false);
    let conn = connect(&cluster, false).await;
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn.clone()).await;
    assert_eq!(dak_runtime::redis::ping(&conn).await, Ok(()));

    // The keys went to more than one node.
    let mut used = 0;
    for url in &cluster.urls {
        let mut node = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let size: i64 = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
        used += usize::from(size > 0);
    }
    assert!(used > 1, "all keys on one node");
}

/// A Cluster whose nodes serve TLS only, as managed ones do: the client
/// reaches the nodes it learns of over TLS too, trusting the given CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_keep_their_contracts_on_a_cluster_over_tls() {
    let cluster = Cluster::start(true);
    assert!(
        cluster.urls[0].starts_with("rediss://"),
        "{:?}",
        cluster.urls
    );
    let conn = connect(&cluster, true).await;
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn).await;
}

/// A cluster, a presence store on it, and `n` users with a device each,
/// written before any slot moves.
async fn cluster_with_devices(
    n: usize,
) -> (
    Cluster,
    dak_runtime::redis::Connection,
    RedisPresence,
    Vec<UserId>,
) {
    let cluster = Cluster::start(false);
    let conn = connect(&cluster, false).await;
    let presence = RedisPresence::new(conn.clone(), &crate::unique_prefix());
    let users: Vec<UserId> = (0..n)
        .map(|n| UserId::parse(format!("user-{n}")).unwrap())
        .collect();
    for user in &users {
        presence.register_device(user, &phone()).await.unwrap();
    }
    (cluster, conn, presence, users)
}

fn phone() -> DeviceId {
    DeviceId::parse("phone").unwrap()
}

/// Moves 5000 of the first node's slots, keys and all, to the second
/// (`redis-cli --cluster reshard`).
fn reshard(cluster: &Cluster) {
    let port = |url: &str| url.rsplit_once(':').unwrap().1.to_owned();
    let id = |url: &str| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port(url), "cluster", "myid"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let (from, to) = (id(&cluster.urls[0]), id(&cluster.urls[1]));
    let seed = format!("127.0.0.1:{}", port(&cluster.urls[1]));
    crate::servers::run(
        "redis-cli",
        &[
            "--cluster",
            "reshard",
            &seed,
            "--cluster-from",
            &from,
            "--cluster-to",
            &to,
            "--cluster-slots",
            "5000",
            "--cluster-yes",
        ],
        std::path::Path::new("."),
    );
}

/// Slots move while a connection is open: the connection follows the
/// redirections, and the stores keep their contracts and their data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_keep_their_contracts_while_slots_move() {
    let (cluster, conn, presence, users) = cluster_with_devices(50).await;
    reshard(&cluster);

    // Read after the move, through the same connection.
    let routes = presence.routes(&users).await.unwrap();
    assert!(
        routes.iter().all(|devices| devices.len() == 1),
        "{routes:?}"
    );
    let gateway = Gateway::new("http://gw".into());
    presence
        .heartbeat(&gateway, Duration::from_secs(30))
        .await
        .unwrap();
    presence
        .connect(&dak_runtime::presence::Connection {
            user: users[0].clone(),
            device: phone(),
            gateway_id: gateway.id.clone(),
            connection_id: "c1".into(),
        })
        .await
        .unwrap();
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn).await;
}

/// redis-rs's cluster connection can stop answering for good when many
/// commands meet a slot map a reshard made stale (a hundred at once did it
/// here); a command that timed out makes the next one use a new connection,
/// so the stores answer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_connection_that_stopped_answering_is_replaced() {
    let (cluster, _conn, presence, users) = cluster_with_devices(200).await;
    reshard(&cluster);

    // Many commands at once, each on its own (not a pipeline).
    let burst = users.iter().map(|user| {
        let presence = presence.clone();
        async move { presence.register_device(user, &phone()).await }
    });
    let failed = futures_util::future::join_all(burst)
        .await
        .iter()
        .filter(|r| r.is_err())
        .count();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match presence.routes(&users).await {
            Ok(routes) if routes.iter().all(|devices| devices.len() == 1) => break,
            other => assert!(
                Instant::now() < deadline,
                "no answer 30 s after the burst ({failed} of its commands failed): {other:?}"
            ),
        }
    }
}
