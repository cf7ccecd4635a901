use std::time::Duration;

use dak_runtime::presence::{
    Connection, DeviceRoute, Gateway, MemoryPresence, Presence, RedisPresence,
};
use dak_wire::{DeviceId, UserId};

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn device(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn conn(u: &str, d: &str, gateway: &Gateway, id: &str) -> Connection {
    Connection {
        user: user(u),
        device: device(d),
        gateway_id: gateway.id.clone(),
        connection_id: id.into(),
    }
}

/// A route as the tests compare it: device, gateway URL, and whether it is live.
fn route(d: &str, url: Option<&str>) -> (DeviceId, Option<String>, bool) {
    (device(d), url.map(str::to_owned), false)
}

fn live(d: &str, url: &str) -> (DeviceId, Option<String>, bool) {
    (device(d), Some(url.to_owned()), true)
}

fn view(r: &DeviceRoute) -> (DeviceId, Option<String>, bool) {
    (r.device.clone(), r.gateway_url.clone(), r.live)
}

async fn routes(store: &dyn Presence, u: &str) -> Vec<(DeviceId, Option<String>, bool)> {
    store
        .routes(&[user(u)])
        .await
        .unwrap()
        .remove(0)
        .iter()
        .map(view)
        .collect()
}

/// The suite every presence store passes.
async fn contract(store: &dyn Presence) {
    let gw1 = Gateway::new("http://gw1".into());
    let gw2 = Gateway::new("http://gw2".into());
    let ttl = Duration::from_secs(30);

    // Unknown users have no devices.
    assert_eq!(routes(store, "nobody").await, vec![]);

    // A connected device routes to its gateway while the gateway heartbeats.
    store.heartbeat(&gw1, ttl).await.unwrap();
    store
        .connect(&conn("bob", "phone", &gw1, "c1"))
        .await
        .unwrap();
    assert_eq!(
        routes(store, "bob").await,
        vec![route("phone", Some("http://gw1"))]
    );

    // A second device on another gateway, whose heartbeat has not started yet,
    // is known but not routable.
    store
        .connect(&conn("bob", "tablet", &gw2, "c2"))
        .await
        .unwrap();
    assert_eq!(
        routes(store, "bob").await,
        vec![route("phone", Some("http://gw1")), route("tablet", None)]
    );
    store.heartbeat(&gw2, ttl).await.unwrap();
    assert_eq!(
        routes(store, "bob").await[1],
        route("tablet", Some("http://gw2"))
    );

    // A socket goes live when its replay is done; only the current connection can.
    assert!(!store
        .set_live(&user("bob"), &device("phone"), "not-c1")
        .await
        .unwrap());
    assert!(store
        .set_live(&user("bob"), &device("phone"), "c1")
        .await
        .unwrap());
    assert_eq!(routes(store, "bob").await[0], live("phone", "http://gw1"));
    let raw = store.routes(&[user("bob")]).await.unwrap().remove(0);
    assert_eq!(raw[0].live_socket(), Some(("http://gw1", "c1")));
    assert_eq!(raw[1].live_socket(), None, "connected but not live");

    // A reconnect replaces the entry (not live again until its own replay); the
    // old connection's late disconnect does not remove the new one.
    store
        .connect(&conn("bob", "phone", &gw2, "c3"))
        .await
        .unwrap();
    store
        .disconnect(&conn("bob", "phone", &gw1, "c1"))
        .await
        .unwrap();
    assert_eq!(
        routes(store, "bob").await[0],
        route("phone", Some("http://gw2"))
    );

    // Disconnecting keeps the device known, without a route.
    store
        .disconnect(&conn("bob", "phone", &gw2, "c3"))
        .await
        .unwrap();
    assert_eq!(routes(store, "bob").await[0], route("phone", None));

    // A gateway that stops takes its routes with it.
    store.gateway_stopped(&gw2).await.unwrap();
    assert_eq!(
        routes(store, "bob").await,
        vec![route("phone", None), route("tablet", None)]
    );

    // A device can become known without a socket (a push-token registration).
    store
        .register_device(&user("bob"), &device("watch"))
        .await
        .unwrap();
    assert_eq!(routes(store, "bob").await.len(), 3);
    store
        .register_device(&user("newbie"), &device("phone"))
        .await
        .unwrap();
    assert_eq!(routes(store, "newbie").await, vec![route("phone", None)]);

    // Several users in one call, answered in order.
    store
        .connect(&conn("carol", "web", &gw1, "c4"))
        .await
        .unwrap();
    let many = store
        .routes(&[user("carol"), user("nobody"), user("bob")])
        .await
        .unwrap();
    assert_eq!(many.len(), 3);
    assert_eq!(
        many[0].iter().map(view).collect::<Vec<_>>(),
        vec![route("web", Some("http://gw1"))]
    );
    assert!(many[1].is_empty());
    assert_eq!(many[2].len(), 3);
    assert_eq!(store.routes(&[]).await.unwrap().len(), 0);

    // A device its user removed is no longer routed to, even with its socket
    // still open; the others stay. Removing it twice, or a device never
    // known, is no error.
    let web_socket = Some(("http://gw1".to_owned(), "c4".to_owned()));
    assert_eq!(
        store.socket(&user("carol"), &device("web")).await.unwrap(),
        web_socket
    );
    store
        .unregister_device(&user("carol"), &device("web"))
        .await
        .unwrap();
    assert_eq!(routes(store, "carol").await, vec![]);
    // Its socket can still be found, to be told.
    assert_eq!(
        store.socket(&user("carol"), &device("web")).await.unwrap(),
        web_socket
    );
    assert_eq!(
        store
            .socket(&user("carol"), &device("phone"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.socket(&user("bob"), &device("phone")).await.unwrap(),
        None,
        "disconnected"
    );
    store
        .unregister_device(&user("bob"), &device("watch"))
        .await
        .unwrap();
    store
        .unregister_device(&user("bob"), &device("watch"))
        .await
        .unwrap();
    store
        .unregister_device(&user("nobody"), &device("phone"))
        .await
        .unwrap();
    assert_eq!(
        routes(store, "bob").await,
        vec![route("phone", None), route("tablet", None)]
    );
    // Connecting again makes it known again, with its new socket.
    store
        .connect(&conn("carol", "web", &gw1, "c5"))
        .await
        .unwrap();
    assert_eq!(
        routes(store, "carol").await,
        vec![route("web", Some("http://gw1"))]
    );
}

/// A gateway that dies stops heartbeating; its entries stop counting at expiry.
async fn expiry_contract(store: &dyn Presence) {
    let gw = Gateway::new("http://doomed".into());
    store
        .heartbeat(&gw, Duration::from_millis(300))
        .await
        .unwrap();
    store
        .connect(&conn("dave", "phone", &gw, "c1"))
        .await
        .unwrap();
    assert_eq!(
        routes(store, "dave").await,
        vec![route("phone", Some("http://doomed"))]
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while routes(store, "dave").await[0].1.is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence outlived the heartbeat"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn memory_presence_keeps_the_contract() {
    let store = MemoryPresence::default();
    contract(&store).await;
    expiry_contract(&store).await;
}

#[tokio::test]
async fn memory_presence_with_a_device_file_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = MemoryPresence::with_device_file(&dir.path().join("devices.db"), Vec::new).unwrap();
    contract(&store).await;
    expiry_contract(&store).await;
}

/// `dak up` restarted: the devices each user had are known again from the
/// file; the sockets died with the process, the same gateway id included.
#[tokio::test]
async fn memory_presence_knows_its_devices_again_from_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.db");
    let gw = Gateway::new("http://gw".into());
    let ttl = Duration::from_secs(30);
    {
        let store = MemoryPresence::with_device_file(&path, Vec::new).unwrap();
        store.heartbeat(&gw, ttl).await.unwrap();
        store
            .connect(&conn("bob", "phone", &gw, "c1"))
            .await
            .unwrap();
        store
            .register_device(&user("bob"), &device("watch"))
            .await
            .unwrap();
        store
            .connect(&conn("alice", "web", &gw, "c2"))
            .await
            .unwrap();
        // A reconnect of a known device, and a device registered twice.
        store
            .connect(&conn("bob", "phone", &gw, "c3"))
            .await
            .unwrap();
        store
            .register_device(&user("bob"), &device("watch"))
            .await
            .unwrap();
        // A device its user removed.
        store
            .register_device(&user("bob"), &device("old-phone"))
            .await
            .unwrap();
        store
            .unregister_device(&user("bob"), &device("old-phone"))
            .await
            .unwrap();
    }

    let store = MemoryPresence::with_device_file(&path, Vec::new).unwrap();
    store.heartbeat(&gw, ttl).await.unwrap();
    assert_eq!(
        routes(&store, "bob").await,
        vec![route("phone", None), route("watch", None)]
    );
    assert_eq!(routes(&store, "alice").await, vec![route("web", None)]);
    assert_eq!(routes(&store, "nobody").await, vec![]);
}

/// A new file starts with the devices found elsewhere (an older `dak up`'s
/// files), once: a file that has been filled is not filled again.
#[tokio::test]
async fn a_new_device_file_starts_with_the_devices_found_earlier_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devices.db");
    let earlier = || {
        vec![
            (user("bob"), device("phone")),
            (user("bob"), device("laptop")),
        ]
    };
    drop(MemoryPresence::with_device_file(&path, earlier).unwrap());

    let store = MemoryPresence::with_device_file(&path, || panic!("asked again")).unwrap();
    assert_eq!(
        routes(&store, "bob").await,
        vec![route("laptop", None), route("phone", None)]
    );
}

#[tokio::test]
async fn redis_presence_keeps_the_contract() {
    redis_contracts(crate::redis().await).await;
}

/// The Redis store's suites on `conn`: also run over TLS and on a Cluster.
pub async fn redis_suites(conn: dak_runtime::redis::Connection) {
    redis_contracts(conn.clone()).await;
    written_back_after_data_loss(conn.clone()).await;
    a_removed_device_is_not_written_back(conn).await;
}

#[tokio::test]
async fn redis_presence_does_not_write_back_a_removed_device() {
    a_removed_device_is_not_written_back(crate::redis().await).await;
}

/// The gateway writes back the sockets it holds at every heartbeat; a device
/// its user removed while its socket stays open must stay removed, until it
/// connects or registers again.
async fn a_removed_device_is_not_written_back(redis: dak_runtime::redis::Connection) {
    let store = RedisPresence::new(redis, &crate::unique_prefix());
    let gw = Gateway::new("http://gw1".into());
    store.heartbeat(&gw, Duration::from_secs(30)).await.unwrap();
    let phone = conn("bob", "phone", &gw, "c1");
    let laptop = conn("bob", "laptop", &gw, "c2");
    store.connect(&phone).await.unwrap();
    store.connect(&laptop).await.unwrap();
    store
        .unregister_device(&user("bob"), &device("laptop"))
        .await
        .unwrap();
    store
        .reassert(&[(phone.clone(), true), (laptop.clone(), true)])
        .await
        .unwrap();
    assert_eq!(
        routes(&store, "bob").await,
        vec![route("phone", Some("http://gw1"))]
    );

    // Connecting again makes it known again, and written back from then on.
    let again = conn("bob", "laptop", &gw, "c3");
    store.connect(&again).await.unwrap();
    store.reassert(&[(again, false)]).await.unwrap();
    assert_eq!(
        routes(&store, "bob").await,
        vec![
            route("laptop", Some("http://gw1")),
            route("phone", Some("http://gw1"))
        ]
    );
    // So does registering it (a push token) after another removal.
    store
        .unregister_device(&user("bob"), &device("laptop"))
        .await
        .unwrap();
    store
        .register_device(&user("bob"), &device("laptop"))
        .await
        .unwrap();
    assert_eq!(routes(&store, "bob").await.len(), 2);
}

async fn redis_contracts(conn: dak_runtime::redis::Connection) {
    let store = RedisPresence::new(conn, &crate::unique_prefix());
    contract(&store).await;
    expiry_contract(&store).await;
}

#[tokio::test]
async fn redis_presence_written_back_after_data_loss() {
    written_back_after_data_loss(crate::redis().await).await;
}

/// Redis lost its data: the gateway's write-back restores its sockets, each
/// live or not as the gateway knows it, and leaves alone a device that a
/// newer connection took over meanwhile.
async fn written_back_after_data_loss(mut redis: dak_runtime::redis::Connection) {
    let prefix = crate::unique_prefix();
    let store = RedisPresence::new(redis.clone(), &prefix);
    let gw1 = Gateway::new("http://gw1".into());
    let gw2 = Gateway::new("http://gw2".into());
    let ttl = Duration::from_secs(30);
    store.heartbeat(&gw1, ttl).await.unwrap();
    store.heartbeat(&gw2, ttl).await.unwrap();
    let phone = conn("alice", "phone", &gw1, "c1");
    let tablet = conn("alice", "tablet", &gw1, "c2");
    store.connect(&phone).await.unwrap();
    store.connect(&tablet).await.unwrap();

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut redis)
        .await
        .unwrap();
    store.heartbeat(&gw1, ttl).await.unwrap();
    store.heartbeat(&gw2, ttl).await.unwrap();
    assert_eq!(routes(&store, "alice").await, vec![], "all gone");

    // Meanwhile the tablet reconnected through gw2.
    store
        .connect(&conn("alice", "tablet", &gw2, "c3"))
        .await
        .unwrap();
    store
        .reassert(&[(phone, true), (tablet, false)])
        .await
        .unwrap();
    assert_eq!(
        routes(&store, "alice").await,
        vec![
            live("phone", "http://gw1"),
            route("tablet", Some("http://gw2"))
        ]
    );
}
