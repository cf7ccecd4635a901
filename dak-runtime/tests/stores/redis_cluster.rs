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
