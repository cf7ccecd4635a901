//! Redis Cluster: the stores keep their contracts on a cluster of three
//! primaries of the test's own (`scripts/engines/redis-cluster`), so that each
//! script's keys share a slot and pipelines spanning slots reach every node.

use dak_runtime::redis::{RedisUrl, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_keep_their_contracts_on_a_cluster() {
    let cluster = crate::servers::Cluster::start(false);
    let urls = &cluster.urls;
    let target = Target {
        // One seed is enough: the client learns the others from it.
        urls: vec![RedisUrl(urls[0].clone())],
        cluster: true,
        ..Target::default()
    };
    let conn = crate::servers::connect(&target).await;
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn.clone()).await;
    assert_eq!(dak_runtime::redis::ping(&conn).await, Ok(()));

    // The keys went to more than one node.
    let mut used = 0;
    for url in urls {
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
    let cluster = crate::servers::Cluster::start(true);
    assert!(
        cluster.urls[0].starts_with("rediss://"),
        "{:?}",
        cluster.urls
    );
    let target = Target {
        urls: vec![RedisUrl(cluster.urls[0].clone())],
        cluster: true,
        ca_cert: Some(cluster.ca()),
        ..Target::default()
    };
    let conn = crate::servers::connect(&target).await;
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn).await;
}

/// Slots move while a connection is open (`redis-cli --cluster reshard`
/// moves most of one node's slots, keys and all, to another): the
/// connection follows the redirections, and the stores keep their contracts
/// and their data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_keep_their_contracts_while_slots_move() {
    use dak_runtime::presence::{Connection, Gateway, Presence, RedisPresence};
    use dak_wire::{DeviceId, UserId};

    let cluster = crate::servers::Cluster::start(false);
    let target = Target {
        urls: vec![RedisUrl(cluster.urls[0].clone())],
        cluster: true,
        ..Target::default()
    };
    let conn = crate::servers::connect(&target).await;
    // Written before the move: a device of each of many users.
    let presence = RedisPresence::new(conn.clone(), &crate::unique_prefix());
    let users: Vec<UserId> = (0..50)
        .map(|n| UserId::parse(format!("user-{n}")).unwrap())
        .collect();
    for user in &users {
        presence
            .register_device(user, &DeviceId::parse("phone").unwrap())
            .await
            .unwrap();
    }

    reshard(&cluster);

    // Read after the move, through the same connection.
    let routes = presence.routes(&users).await.unwrap();
    assert!(
        routes.iter().all(|devices| devices.len() == 1),
        "{routes:?}"
    );
    let gateway = Gateway::new("http://gw".into());
    presence
        .heartbeat(&gateway, std::time::Duration::from_secs(30))
        .await
        .unwrap();
    presence
        .connect(&Connection {
            user: users[0].clone(),
            device: DeviceId::parse("phone").unwrap(),
            gateway_id: gateway.id.clone(),
            connection_id: "c1".into(),
        })
        .await
        .unwrap();
    crate::presence::redis_suites(conn.clone()).await;
    crate::dedup::redis_suites(conn).await;
}

/// Moves 5000 of the first node's slots, keys and all, to the second.
fn reshard(cluster: &crate::servers::Cluster) {
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

/// redis-rs's cluster connection can stop answering for good when many
/// commands meet a slot map a reshard made stale (a hundred at once did it
/// here); a command that timed out makes the next one use a new connection,
/// so the stores answer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_connection_that_stopped_answering_is_replaced() {
    use dak_runtime::presence::{Presence, RedisPresence};
    use dak_wire::{DeviceId, UserId};

    let cluster = crate::servers::Cluster::start(false);
    let target = Target {
        urls: vec![RedisUrl(cluster.urls[0].clone())],
        cluster: true,
        ..Target::default()
    };
    let conn = crate::servers::connect(&target).await;
    let presence = RedisPresence::new(conn.clone(), &crate::unique_prefix());
    let users: Vec<UserId> = (0..200)
        .map(|n| UserId::parse(format!("user-{n}")).unwrap())
        .collect();
    let phone = DeviceId::parse("phone").unwrap();
    for user in &users {
        presence.register_device(user, &phone).await.unwrap();
    }
    reshard(&cluster);

    // Many commands at once, each on its own (not a pipeline).
    let burst = users.iter().map(|user| {
        let presence = presence.clone();
        let phone = phone.clone();
        async move { presence.register_device(user, &phone).await }
    });
    let failed = futures_util::future::join_all(burst)
        .await
        .iter()
        .filter(|r| r.is_err())
        .count();

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match presence.routes(&users).await {
            Ok(routes) if routes.iter().all(|devices| devices.len() == 1) => break,
            other => assert!(
                std::time::Instant::now() < deadline,
                "no answer 30 s after the burst ({failed} of its commands failed): {other:?}"
            ),
        }
    }
}
