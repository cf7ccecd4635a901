use std::time::Duration;

use dak_runtime::dedup::{Dedup, MemoryDedup, RedisDedup, Reservation, SqliteDedup};
use dak_wire::{ClientId, Mid, UserId};

fn mid() -> Mid {
    Mid::from_ulid(ulid::Ulid::new())
}

/// The suite every dedup store passes.
async fn contract(store: &dyn Dedup) {
    let alice = UserId::parse("alice").unwrap();
    let bob = UserId::parse("bob").unwrap();
    let id = ClientId::parse("c-17").unwrap();
    let (first, second) = (mid(), mid());

    assert_eq!(
        store.reserve(&alice, &id, first, 10).await.unwrap(),
        Reservation::New
    );
    // Before Kafka confirmed the first attempt, a retry sees it unconfirmed.
    assert_eq!(
        store.reserve(&alice, &id, second, 20).await.unwrap(),
        Reservation::Existing {
            mid: first,
            ts: 10,
            confirmed: false
        }
    );
    store.confirm(&alice, &id, first, 10).await.unwrap();
    assert_eq!(
        store.reserve(&alice, &id, second, 20).await.unwrap(),
        Reservation::Existing {
            mid: first,
            ts: 10,
            confirmed: true
        }
    );
    // Client ids are per sender.
    assert_eq!(
        store.reserve(&bob, &id, second, 20).await.unwrap(),
        Reservation::New
    );
}

/// Mappings are forgotten after the TTL, so the store does not grow forever.
async fn expiry_contract(store: &dyn Dedup) {
    let carol = UserId::parse("carol").unwrap();
    let id = ClientId::parse("old").unwrap();
    assert_eq!(
        store.reserve(&carol, &id, mid(), 1).await.unwrap(),
        Reservation::New
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if store.reserve(&carol, &id, mid(), 2).await.unwrap() == Reservation::New {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dedup entry outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn memory_dedup_keeps_the_contract() {
    contract(&MemoryDedup::new(Duration::from_secs(60))).await;
    expiry_contract(&MemoryDedup::new(Duration::from_millis(300))).await;
}

#[tokio::test]
async fn redis_dedup_keeps_the_contract() {
    redis_suites(crate::redis().await).await;
}

/// The Redis store's suites on `conn`: also run over TLS and on a Cluster.
pub async fn redis_suites(conn: dak_runtime::redis::Connection) {
    redis_contracts(conn.clone()).await;
    redis_bound(conn).await;
}

async fn redis_contracts(conn: dak_runtime::redis::Connection) {
    contract(&RedisDedup::new(
        conn.clone(),
        &crate::unique_prefix(),
        Duration::from_secs(60),
        1000,
    ))
    .await;
    expiry_contract(&RedisDedup::new(
        conn,
        &crate::unique_prefix(),
        Duration::from_millis(300),
        1000,
    ))
    .await;
}

/// Far more entries than any test makes.
const NO_BOUND: u64 = 1_000_000;

#[tokio::test]
async fn sqlite_dedup_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str, ttl| SqliteDedup::open(&dir.path().join(name), ttl, NO_BOUND).unwrap();
    contract(&open("contract.db", Duration::from_secs(60))).await;
    expiry_contract(&open("expiry.db", Duration::from_millis(300))).await;
}

/// Rows in the file, as another connection sees them.
fn rows(path: &std::path::Path) -> i64 {
    let db = rusqlite::Connection::open(path).unwrap();
    db.query_row("SELECT COUNT(*) FROM dedup", [], |r| r.get(0))
        .unwrap()
}

fn client_id(n: usize) -> ClientId {
    ClientId::parse(format!("c-{n}")).unwrap()
}

#[tokio::test]
async fn sqlite_dedup_survives_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedup.db");
    let alice = UserId::parse("alice").unwrap();
    let (confirmed, unconfirmed) = (mid(), mid());
    {
        let store = SqliteDedup::open(&path, Duration::from_secs(60), NO_BOUND).unwrap();
        store
            .reserve(&alice, &client_id(1), confirmed, 10)
            .await
            .unwrap();
        store
            .confirm(&alice, &client_id(1), confirmed, 10)
            .await
            .unwrap();
        store
            .reserve(&alice, &client_id(2), unconfirmed, 20)
            .await
            .unwrap();
    }
    let store = SqliteDedup::open(&path, Duration::from_secs(60), NO_BOUND).unwrap();
    assert_eq!(
        store
            .reserve(&alice, &client_id(1), mid(), 30)
            .await
            .unwrap(),
        Reservation::Existing {
            mid: confirmed,
            ts: 10,
            confirmed: true
        },
        "a client resending after the restart gets its first mid"
    );
    assert_eq!(
        store
            .reserve(&alice, &client_id(2), mid(), 30)
            .await
            .unwrap(),
        Reservation::Existing {
            mid: unconfirmed,
            ts: 20,
            confirmed: false
        }
    );
}

#[tokio::test]
async fn sqlite_dedup_deletes_expired_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedup.db");
    let store = SqliteDedup::open(&path, Duration::from_millis(200), NO_BOUND).unwrap();
    let dave = UserId::parse("dave").unwrap();
    for n in 0..100 {
        store.reserve(&dave, &client_id(n), mid(), 1).await.unwrap();
    }
    assert_eq!(rows(&path), 100);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every transaction deletes expired entries after its own work.
    store
        .reserve(&dave, &client_id(100), mid(), 2)
        .await
        .unwrap();
    assert_eq!(
        rows(&path),
        1,
        "only the entry made after the others expired"
    );
}

#[tokio::test]
async fn sqlite_dedup_keeps_at_most_its_bound_dropping_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dedup.db");
    let store = SqliteDedup::open(&path, Duration::from_secs(60), 10).unwrap();
    let erin = UserId::parse("erin").unwrap();
    let mids: Vec<Mid> = (0..50).map(|_| mid()).collect();
    for (n, mid) in mids.iter().enumerate() {
        store
            .reserve(&erin, &client_id(n), *mid, n as u64)
            .await
            .unwrap();
        // Apart in time, so the oldest is unambiguous.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(rows(&path), 10);
    assert_eq!(
        store
            .reserve(&erin, &client_id(49), mid(), 99)
            .await
            .unwrap(),
        Reservation::Existing {
            mid: mids[49],
            ts: 49,
            confirmed: false
        },
        "the newest are kept"
    );
    assert_eq!(
        store
            .reserve(&erin, &client_id(40), mid(), 99)
            .await
            .unwrap(),
        Reservation::Existing {
            mid: mids[40],
            ts: 40,
            confirmed: false
        }
    );
    assert_eq!(
        store
            .reserve(&erin, &client_id(0), mid(), 99)
            .await
            .unwrap(),
        Reservation::New,
        "the oldest went"
    );
    assert_eq!(rows(&path), 10);

    // A file over a smaller bound is brought down to it.
    drop(store);
    let store = SqliteDedup::open(&path, Duration::from_secs(60), 4).unwrap();
    store
        .reserve(&erin, &client_id(50), mid(), 50)
        .await
        .unwrap();
    assert_eq!(rows(&path), 4);
}

/// `n` reservations of `user`, a moment apart so their order is plain; the mids.
async fn reserve_many(store: &dyn Dedup, user: &UserId, n: usize) -> Vec<Mid> {
    let mut mids = Vec::new();
    for i in 0..n {
        let mid = mid();
        assert_eq!(
            store
                .reserve(user, &client_id(i), mid, i as u64)
                .await
                .unwrap(),
            Reservation::New
        );
        mids.push(mid);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    mids
}

/// The newest `kept` of `mids` (reserved by [`reserve_many`]) are still
/// known, the one before them is not.
async fn newest_kept(store: &dyn Dedup, user: &UserId, mids: &[Mid], kept: usize) {
    let n = mids.len();
    for (i, kept_mid) in mids.iter().enumerate().skip(n - kept) {
        assert_eq!(
            store.reserve(user, &client_id(i), mid(), 99).await.unwrap(),
            Reservation::Existing {
                mid: *kept_mid,
                ts: i as u64,
                confirmed: false
            },
            "entry {i} of {n} was kept"
        );
    }
    assert_eq!(
        store
            .reserve(user, &client_id(n - kept - 1), mid(), 99)
            .await
            .unwrap(),
        Reservation::New,
        "entry {} of {n} went",
        n - kept - 1
    );
}

#[tokio::test]
async fn memory_dedup_keeps_at_most_its_bound_dropping_the_oldest() {
    // 64 shards of 10 entries each; one sender's entries share a shard.
    let store = MemoryDedup::bounded(Duration::from_secs(60), 640);
    let frank = UserId::parse("frank").unwrap();
    let mids = reserve_many(&store, &frank, 50).await;
    newest_kept(&store, &frank, &mids, 10).await;
    assert!(store.len() <= 640);
    for u in 0..200 {
        let user = UserId::parse(format!("user-{u}")).unwrap();
        for i in 0..10 {
            store.reserve(&user, &client_id(i), mid(), 1).await.unwrap();
        }
    }
    assert!(store.len() <= 640, "{} entries", store.len());
}

#[tokio::test]
async fn redis_dedup_keeps_at_most_its_bound_per_sender_dropping_the_oldest() {
    redis_bound(crate::redis().await).await;
}

async fn redis_bound(conn: dak_runtime::redis::Connection) {
    let prefix = crate::unique_prefix();
    let store = RedisDedup::new(conn.clone(), &prefix, Duration::from_secs(60), 10);
    let grace = UserId::parse("grace").unwrap();
    let mids = reserve_many(&store, &grace, 50).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:{{grace}}:dedup:*"))
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(keys.len(), 10, "{keys:?}");
    newest_kept(&store, &grace, &mids, 10).await;
    // Another sender has a bound of its own.
    let heidi = UserId::parse("heidi").unwrap();
    assert_eq!(
        store
            .reserve(&heidi, &client_id(0), mid(), 1)
            .await
            .unwrap(),
        Reservation::New
    );
}
