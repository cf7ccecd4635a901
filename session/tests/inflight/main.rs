//! Contract tests for the in-flight store: the in-process store, the Redis
//! store (on one server and on a Redis Cluster) and the SQLite store pass the
//! same suite. Time is passed in
//! explicitly, so deadlines and leases are tested without waiting.

use dak_wire::event::{Ack, Message};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use serde_json::value::RawValue;
use session::inflight::{InFlight, MemoryInFlight, Pending, RedisInFlight, SqliteInFlight};

/// The Redis servers of dak-runtime's store tests: a Cluster of their own.
#[allow(dead_code)]
#[path = "../../../dak-runtime/tests/stores/servers.rs"]
mod servers;

mod receipts;

fn delivery(user: &str, device: &str, deadline_ms: u64) -> Pending {
    Pending {
        user: UserId::parse(user).unwrap(),
        device: DeviceId::parse(device).unwrap(),
        message: Message {
            mid: Mid::from_ulid(ulid::Ulid::new()),
            id: ClientId::parse("c1").unwrap(),
            from: UserId::parse("alice").unwrap(),
            from_device: DeviceId::default_device(),
            to: user.into(),
            chat: ChatKind::Direct,
            body: Some(RawValue::from_string(r#"{"secret":"AAEC"}"#.into()).unwrap()),
            ephemeral: false,
            notice: None,
            ts: 1,
        },
        sends: 1,
        first_sent_ms: 1_000,
        deadline_ms,
    }
}

/// An ack from `user`'s `device` for `mids`.
fn ack(user: &UserId, device: &DeviceId, mids: &[Mid]) -> Ack {
    Ack {
        user: user.clone(),
        device: device.clone(),
        mids: mids.to_vec(),
    }
}

/// The mid of each delivery an ack found, or `None`.
fn found_mids(found: &[Option<Pending>]) -> Vec<Option<Mid>> {
    found
        .iter()
        .map(|p| p.as_ref().map(|p| p.message.mid))
        .collect()
}

fn mids(found: &[Pending]) -> Vec<Mid> {
    let mut mids: Vec<Mid> = found.iter().map(|p| p.message.mid).collect();
    mids.sort();
    mids
}

async fn contract(store: &dyn InFlight) {
    let a = delivery("bob", "phone", 2_000);
    let b = delivery("bob", "tablet", 3_000);
    let c = delivery("carol", "web", 4_000);

    assert_eq!(
        store
            .begin(&[a.clone(), b.clone(), c.clone()])
            .await
            .unwrap(),
        vec![true, true, true]
    );
    // The same mid for the same device again is a duplicate; for another device it is not.
    let mut a_elsewhere = a.clone();
    a_elsewhere.device = DeviceId::parse("watch").unwrap();
    assert_eq!(
        store
            .begin(&[a.clone(), a_elsewhere.clone()])
            .await
            .unwrap(),
        vec![false, true]
    );
    assert_eq!(store.count().await.unwrap(), 4);

    // Nothing is due before its deadline.
    assert!(store
        .claim_due(1_999, 10_000, 100)
        .await
        .unwrap()
        .is_empty());
    // At 3 000, a, a_elsewhere and b are due; claiming leases them.
    let claimed = store.claim_due(3_000, 10_000, 100).await.unwrap();
    assert_eq!(
        mids(&claimed),
        mids(&[a.clone(), a_elsewhere.clone(), b.clone()])
    );
    let body = claimed.iter().find(|p| p.device == b.device).unwrap();
    assert_eq!(
        body.message.body.as_ref().unwrap().get(),
        r#"{"secret":"AAEC"}"#,
        "the message survives the store"
    );
    assert!(
        store
            .claim_due(3_000, 10_000, 100)
            .await
            .unwrap()
            .is_empty(),
        "leased deliveries are not claimed twice"
    );

    // A claimer that dies: the lease runs out and the delivery is claimable again.
    let again = store.claim_due(13_000, 10_000, 100).await.unwrap();
    assert_eq!(again.len(), 4, "a, a_elsewhere, b after their lease, and c");

    // A resend moves the deadline and counts the send.
    let mut resent = b.clone();
    resent.sends = 2;
    resent.deadline_ms = 50_000;
    assert!(store.resent(&resent).await.unwrap());
    assert!(store
        .claim_due(49_999, 10_000, 100)
        .await
        .unwrap()
        .iter()
        .all(|p| p.device != b.device));
    let due = store.claim_due(50_000, 10_000, 100).await.unwrap();
    let b_again = due
        .iter()
        .find(|p| p.device == b.device)
        .expect("b is due at its new deadline");
    assert_eq!(b_again.sends, 2);

    // Acks find exactly what they name, and leave it in flight until it is
    // removed.
    let acked = store
        .acked(&[ack(&a.user, &a.device, &[a.message.mid, c.message.mid])])
        .await
        .unwrap();
    assert_eq!(
        found_mids(&acked[0]),
        vec![Some(a.message.mid), None],
        "c is carol's, not bob's phone's"
    );
    let found = acked[0][0].clone().unwrap();
    assert_eq!(found.message.body.unwrap().get(), r#"{"secret":"AAEC"}"#);
    let again = store
        .acked(&[ack(&a.user, &a.device, &[a.message.mid])])
        .await
        .unwrap();
    assert_eq!(found_mids(&again[0]), vec![Some(a.message.mid)]);
    store.remove(std::slice::from_ref(&a)).await.unwrap();
    let removed = store
        .acked(&[ack(&a.user, &a.device, &[a.message.mid])])
        .await
        .unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(found_mids(&removed[0]), vec![None]);
    // A resend after the removal does not bring the delivery back.
    assert!(!store.resent(&a).await.unwrap());

    store.remove(&[b.clone(), c.clone()]).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 1, "only a_elsewhere is left");
    let last = store.claim_due(u64::MAX / 4, 10, 100).await.unwrap();
    assert_eq!(mids(&last), vec![a_elsewhere.message.mid]);
}

/// An early begin answers as `begin` does, and a call made after it sees
/// what it began, before its writes are known to be durable; then they are.
async fn early_contract(store: &dyn InFlight) {
    let a = delivery("erin", "phone", 2_000);
    let b = delivery("erin", "tablet", 2_000);
    let (fresh, durable) = store.begin_early(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(fresh, vec![true, true]);
    let found = store
        .acked(&[ack(&a.user, &a.device, &[a.message.mid])])
        .await
        .unwrap();
    assert_eq!(found_mids(&found[0]), vec![Some(a.message.mid)]);
    let (again, durable_again) = store.begin_early(std::slice::from_ref(&b)).await.unwrap();
    assert_eq!(
        again,
        vec![false],
        "the same delivery is a duplicate at once"
    );
    durable.await.unwrap();
    durable_again.await.unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
}

/// One call looks up the acks of several devices at once: each ack gets its
/// own answer, in the order of the acks and of their mids, and an ack without
/// mids gets none.
async fn many_acks_contract(store: &dyn InFlight) {
    let phone = delivery("dave", "phone", 2_000);
    let phone_later = delivery("dave", "phone", 2_000);
    let tablet = delivery("dave", "tablet", 2_000);
    let erin = delivery("erin", "web", 2_000);
    let all = [
        phone.clone(),
        phone_later.clone(),
        tablet.clone(),
        erin.clone(),
    ];
    assert!(store.begin(&all).await.unwrap().iter().all(|fresh| *fresh));
    let before = store.count().await.unwrap();

    let found = store
        .acked(&[
            ack(
                &phone.user,
                &phone.device,
                &[
                    phone_later.message.mid,
                    tablet.message.mid,
                    phone.message.mid,
                ],
            ),
            ack(&erin.user, &erin.device, &[]),
            ack(&tablet.user, &tablet.device, &[tablet.message.mid]),
            // A lookup: the same delivery twice in one call is found twice.
            ack(&phone.user, &phone.device, &[phone.message.mid]),
        ])
        .await
        .unwrap();
    let mids_found: Vec<Vec<Option<Mid>>> = found.iter().map(|f| found_mids(f)).collect();
    assert_eq!(
        mids_found,
        vec![
            vec![Some(phone_later.message.mid), None, Some(phone.message.mid)],
            vec![],
            vec![Some(tablet.message.mid)],
            vec![Some(phone.message.mid)],
        ]
    );
    assert_eq!(store.count().await.unwrap(), before, "nothing is removed");
    let done: Vec<Pending> = found.into_iter().flatten().flatten().collect();
    store.remove(&done).await.unwrap();
    assert_eq!(store.count().await.unwrap(), before - 3, "erin's is left");
    assert!(store.acked(&[]).await.unwrap().is_empty());
    let only_empty = store
        .acked(&[ack(&erin.user, &erin.device, &[])])
        .await
        .unwrap();
    assert_eq!(only_empty.len(), 1);
    assert!(only_empty[0].is_empty());
    let erin_found = store
        .acked(&[ack(&erin.user, &erin.device, &[erin.message.mid])])
        .await
        .unwrap();
    assert_eq!(found_mids(&erin_found[0]), vec![Some(erin.message.mid)]);
}

/// A claim is due again only when its lease ends, or at the deadline of a
/// resend, even one earlier than that lease; a delivery begun after a claim
/// found nothing is due at its own deadline.
async fn deadlines_after_a_claim_contract(store: &dyn InFlight) {
    let d = delivery("ivan", "phone", 1_000);
    assert_eq!(store.claim_due(1_000, 60_000, 100).await.unwrap().len(), 0);
    store.begin(std::slice::from_ref(&d)).await.unwrap();
    assert_eq!(
        mids(&store.claim_due(1_000, 60_000, 100).await.unwrap()),
        vec![d.message.mid]
    );
    assert!(store
        .claim_due(5_000, 60_000, 100)
        .await
        .unwrap()
        .is_empty());

    let mut resent = d.clone();
    resent.sends = 2;
    resent.deadline_ms = 11_000;
    assert!(store.resent(&resent).await.unwrap());
    assert!(store
        .claim_due(10_999, 60_000, 100)
        .await
        .unwrap()
        .is_empty());
    let due = store.claim_due(11_000, 60_000, 100).await.unwrap();
    assert_eq!(
        mids(&due),
        vec![d.message.mid],
        "due at the resend's deadline"
    );
    assert_eq!(due[0].sends, 2);

    // Leased until 71,000: nothing is due before, then the claim is again.
    assert!(store
        .claim_due(70_999, 60_000, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        mids(&store.claim_due(71_000, 60_000, 100).await.unwrap()),
        vec![d.message.mid]
    );
    store.remove(std::slice::from_ref(&d)).await.unwrap();
    assert!(store
        .claim_due(u64::MAX / 4, 10, 100)
        .await
        .unwrap()
        .is_empty());
    let later = delivery("ivan", "phone", 200_000);
    store.begin(std::slice::from_ref(&later)).await.unwrap();
    assert!(store
        .claim_due(199_999, 60_000, 100)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        mids(&store.claim_due(200_000, 60_000, 100).await.unwrap()),
        vec![later.message.mid]
    );
}

/// Deliveries held while their device replays come back in order, once.
async fn held_contract(store: &dyn InFlight) {
    let mut held: Vec<Pending> = (0..3).map(|_| delivery("frank", "phone", 9_000)).collect();
    for h in &mut held {
        h.sends = 0;
    }
    let sent = delivery("frank", "phone", 9_000);
    let other_device = {
        let mut d = delivery("frank", "tablet", 9_000);
        d.sends = 0;
        d
    };
    store
        .begin(&[
            held[0].clone(),
            sent.clone(),
            held[1].clone(),
            other_device.clone(),
            held[2].clone(),
        ])
        .await
        .unwrap();
    let user = UserId::parse("frank").unwrap();
    let taken = store
        .take_held(&user, &DeviceId::parse("phone").unwrap())
        .await
        .unwrap();
    assert_eq!(mids(&taken), mids(&held));
    assert_eq!(
        taken.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        held.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        "in the order they were held"
    );
    assert!(store
        .take_held(&user, &DeviceId::parse("phone").unwrap())
        .await
        .unwrap()
        .is_empty());

    // Sent, then held again (the device reconnected): it comes back with the next take.
    let mut rehold = sent.clone();
    rehold.sends = 0;
    assert!(store.resent(&rehold).await.unwrap());
    let taken = store
        .take_held(&user, &DeviceId::parse("phone").unwrap())
        .await
        .unwrap();
    assert_eq!(mids(&taken), vec![sent.message.mid]);
    // A held entry that was sent meanwhile (by the retry loop) is not taken.
    let mut tablet_sent = other_device.clone();
    tablet_sent.sends = 1;
    store.resent(&tablet_sent).await.unwrap();
    assert!(store
        .take_held(&user, &DeviceId::parse("tablet").unwrap())
        .await
        .unwrap()
        .is_empty());
}

async fn claim_limit_contract(store: &dyn InFlight) {
    let many: Vec<Pending> = (0..50)
        .map(|i| delivery(&format!("user{i}"), "phone", 100))
        .collect();
    store.begin(&many).await.unwrap();
    let mut claimed = 0;
    // Claims come in bounded batches until everything due was claimed.
    loop {
        let batch = store.claim_due(100, 1_000_000, 16).await.unwrap();
        if batch.is_empty() {
            break;
        }
        assert!(
            batch.len() <= 16,
            "claimed {} with a limit of 16",
            batch.len()
        );
        claimed += batch.len();
    }
    assert_eq!(claimed, 50);
}

/// A batch as large as session's: many users and devices, held and sent
/// deliveries mixed, one user with hundreds, and the same delivery twice in
/// one call. Each answer comes
/// back at its delivery's position, and held deliveries keep their order.
async fn large_batch_contract(store: &dyn InFlight) {
    let mut batch: Vec<Pending> = (0..900)
        .map(|i| {
            let device = ["phone", "tablet", "web"][(i / 60) % 3];
            // user0 alone has more deliveries than one script call takes.
            let user = if i < 300 { 0 } else { i % 60 };
            let mut d = delivery(&format!("user{user}"), device, 5_000);
            if i % 5 == 0 {
                d.sends = 0;
            }
            d
        })
        .collect();
    batch.insert(500, batch[17].clone());
    let fresh = store.begin(&batch).await.unwrap();
    let expected: Vec<bool> = (0..batch.len()).map(|i| i != 500).collect();
    assert_eq!(fresh, expected, "only the repeat at 500 is not new");
    assert_eq!(store.count().await.unwrap(), 900);

    let user = UserId::parse("user0").unwrap();
    let phone = DeviceId::parse("phone").unwrap();
    let held_in_order: Vec<Mid> = batch
        .iter()
        .enumerate()
        .filter(|&(i, d)| i != 500 && d.is_held() && d.user == user && d.device == phone)
        .map(|(_, d)| d.message.mid)
        .collect();
    assert!(held_in_order.len() > 1);
    let taken = store.take_held(&user, &phone).await.unwrap();
    assert_eq!(
        taken.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        held_in_order
    );

    // One ack per delivery, every other one naming a mid never delivered to it.
    let strangers: Vec<Mid> = (0..450)
        .map(|_| Mid::from_ulid(ulid::Ulid::new()))
        .collect();
    let acks: Vec<Ack> = batch
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 500)
        .map(|(i, d)| {
            let mut mids = vec![d.message.mid];
            if i % 2 == 0 {
                mids.insert(0, strangers[(i / 2) % strangers.len()]);
            }
            ack(&d.user, &d.device, &mids)
        })
        .collect();
    let found = store.acked(&acks).await.unwrap();
    for (ack, found) in acks.iter().zip(&found) {
        let mut expected: Vec<Option<Mid>> = vec![Some(*ack.mids.last().unwrap())];
        if ack.mids.len() == 2 {
            expected.insert(0, None);
        }
        assert_eq!(found_mids(found), expected);
        let delivered = found.last().unwrap().as_ref().unwrap();
        assert_eq!(
            (&delivered.user, &delivered.device),
            (&ack.user, &ack.device)
        );
    }
    let done: Vec<Pending> = found.into_iter().flatten().flatten().collect();
    store.remove(&done).await.unwrap();
    assert_eq!(store.count().await.unwrap(), 0);
}

fn redis_url() -> String {
    std::env::var("DAK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn prefix() -> String {
    format!("dak-test-{}", ulid::Ulid::new().to_string().to_lowercase())
}

#[tokio::test]
async fn memory_inflight_keeps_the_contract() {
    contract(&MemoryInFlight::default()).await;
    held_contract(&MemoryInFlight::default()).await;
    many_acks_contract(&MemoryInFlight::default()).await;
    claim_limit_contract(&MemoryInFlight::default()).await;
    large_batch_contract(&MemoryInFlight::default()).await;
    deadlines_after_a_claim_contract(&MemoryInFlight::default()).await;
    early_contract(&MemoryInFlight::default()).await;
}

#[tokio::test]
async fn redis_inflight_keeps_the_contract() {
    let conn = dak_runtime::redis::connect(&redis_url())
        .await
        .expect("Redis (scripts/test starts one)");
    contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    held_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    many_acks_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    large_batch_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    deadlines_after_a_claim_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    early_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    claim_limit_contract(&RedisInFlight::new(conn, &prefix())).await;
}

/// On a Redis Cluster of three primaries, where a script's keys must share
/// a slot and a claim's pipeline spans the shards' slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_inflight_keeps_the_contract_on_a_cluster() {
    let cluster = servers::Cluster::start(false);
    let target = dak_runtime::redis::Target {
        urls: vec![dak_runtime::redis::RedisUrl(cluster.urls[0].clone())],
        cluster: true,
        ..Default::default()
    };
    let conn = dak_runtime::redis::connect_to(&target)
        .await
        .expect("the test's Redis Cluster");
    contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    held_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    many_acks_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    large_batch_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    deadlines_after_a_claim_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    early_contract(&RedisInFlight::new(conn.clone(), &prefix())).await;
    claim_limit_contract(&RedisInFlight::new(conn, &prefix())).await;
}

#[tokio::test]
async fn sqlite_inflight_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let open = |name: &str| SqliteInFlight::open(&dir.path().join(name)).unwrap();
    contract(&open("contract.db")).await;
    held_contract(&open("held.db")).await;
    many_acks_contract(&open("acks.db")).await;
    claim_limit_contract(&open("claim.db")).await;
    large_batch_contract(&open("large.db")).await;
    deadlines_after_a_claim_contract(&open("deadlines.db")).await;
    early_contract(&open("early.db")).await;
}

/// The file knows when it is empty, without a call to its thread: once a
/// claim found nothing, or its last delivery was removed; a delivery written
/// wakes whoever waits for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_inflight_knows_when_it_is_empty_and_wakes_a_waiter_on_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(SqliteInFlight::open(&dir.path().join("empty.db")).unwrap());
    assert!(!store.known_empty(), "not known before a claim looked");
    assert!(store
        .claim_due(1_000, 10_000, 100)
        .await
        .unwrap()
        .is_empty());
    assert!(store.known_empty());

    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.wait_while_empty().await }
    });
    let d = delivery("judy", "phone", 5_000);
    store.begin(std::slice::from_ref(&d)).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), waiter)
        .await
        .expect("the write woke the waiter")
        .unwrap();
    assert!(!store.known_empty());
    // Waiting now returns at once.
    tokio::time::timeout(std::time::Duration::from_secs(20), store.wait_while_empty())
        .await
        .unwrap();

    // Known empty again once its last delivery is removed, not before.
    let other = delivery("judy", "tablet", 5_000);
    store.begin(std::slice::from_ref(&other)).await.unwrap();
    store.remove(std::slice::from_ref(&d)).await.unwrap();
    assert!(!store.known_empty());
    store.remove(std::slice::from_ref(&d)).await.unwrap();
    assert!(
        !store.known_empty(),
        "removing what is gone changes nothing"
    );
    store.remove(std::slice::from_ref(&other)).await.unwrap();
    assert!(store.known_empty());
    // And after a reopen, by its rows.
    drop(store);
    let store = SqliteInFlight::open(&dir.path().join("empty.db")).unwrap();
    store.begin(std::slice::from_ref(&d)).await.unwrap();
    drop(store);
    let store = SqliteInFlight::open(&dir.path().join("empty.db")).unwrap();
    store.remove(std::slice::from_ref(&d)).await.unwrap();
    assert!(store.known_empty(), "the file's one delivery is gone");
}

/// What `dak up` finds after a restart: every delivery that was in flight or
/// held, due at its deadline, held ones in order, each acked once.
#[tokio::test]
async fn sqlite_inflight_survives_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inflight.db");
    let sent = delivery("grace", "phone", 5_000);
    let acked = delivery("grace", "phone", 5_000);
    let held: Vec<Pending> = (0..3)
        .map(|_| {
            let mut d = delivery("grace", "tablet", 90_000);
            d.sends = 0;
            d
        })
        .collect();
    {
        let store = SqliteInFlight::open(&path).unwrap();
        let mut all = vec![sent.clone(), acked.clone()];
        all.extend(held.iter().cloned());
        let (fresh, durable) = store.begin_early(&all).await.unwrap();
        assert!(fresh.iter().all(|fresh| *fresh));
        durable.await.unwrap();
        store.remove(std::slice::from_ref(&acked)).await.unwrap();
    }

    let store = SqliteInFlight::open(&path).unwrap();
    assert_eq!(store.count().await.unwrap(), 4);
    assert_eq!(
        store.begin(std::slice::from_ref(&sent)).await.unwrap(),
        vec![false],
        "a replayed event for it is still a duplicate"
    );
    let due = store.claim_due(5_000, 10_000, 100).await.unwrap();
    assert_eq!(mids(&due), vec![sent.message.mid]);
    assert_eq!(
        due[0].message.body.as_ref().unwrap().get(),
        r#"{"secret":"AAEC"}"#
    );
    let taken = store
        .take_held(&held[0].user, &held[0].device)
        .await
        .unwrap();
    assert_eq!(
        taken.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        held.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        "held deliveries come back in the order they were held"
    );
    // Held again after the restart: placed after anything held before it.
    let mut later = delivery("grace", "tablet", 90_000);
    later.sends = 0;
    store.begin(&[later.clone()]).await.unwrap();
    let mut rehold = held[1].clone();
    rehold.deadline_ms = 95_000;
    assert!(store.resent(&rehold).await.unwrap());
    let taken = store
        .take_held(&held[0].user, &held[0].device)
        .await
        .unwrap();
    assert_eq!(
        taken.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        vec![later.message.mid, held[1].message.mid]
    );
    let acks = store
        .acked(&[ack(
            &sent.user,
            &sent.device,
            &[sent.message.mid, acked.message.mid],
        )])
        .await
        .unwrap();
    assert_eq!(
        found_mids(&acks[0]),
        vec![Some(sent.message.mid), None],
        "acked before the restart"
    );
}

/// A file written by a version whose table was `inflight` (keyed user first):
/// opening it moves every delivery into the current table, due and held ones
/// alike, and the old table is gone.
#[tokio::test]
async fn sqlite_inflight_takes_over_the_deliveries_of_an_older_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inflight.db");
    let sent = delivery("heidi", "phone", 5_000);
    let mut held = delivery("heidi", "tablet", 90_000);
    held.sends = 0;
    {
        let old = rusqlite::Connection::open(&path).unwrap();
        old.execute_batch(
            "CREATE TABLE inflight (
                 user TEXT NOT NULL, device TEXT NOT NULL, mid TEXT NOT NULL,
                 deadline INTEGER NOT NULL, held INTEGER, record TEXT NOT NULL,
                 UNIQUE (user, device, mid));
             CREATE INDEX inflight_due ON inflight (deadline);
             CREATE INDEX inflight_held ON inflight (user, device, held)
                 WHERE held IS NOT NULL;",
        )
        .unwrap();
        for (d, place) in [(&sent, None), (&held, Some(7))] {
            old.execute(
                "INSERT INTO inflight (user, device, mid, deadline, held, record)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                rusqlite::params![
                    d.user.as_str(),
                    d.device.as_str(),
                    d.message.mid.to_string(),
                    d.deadline_ms as i64,
                    place,
                    serde_json::to_string(d).unwrap()
                ],
            )
            .unwrap();
        }
    }

    let store = SqliteInFlight::open(&path).unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
    let due = store.claim_due(5_000, 10_000, 100).await.unwrap();
    assert_eq!(mids(&due), vec![sent.message.mid]);
    let taken = store.take_held(&held.user, &held.device).await.unwrap();
    assert_eq!(mids(&taken), vec![held.message.mid]);
    // A delivery held now goes after the ones held before the upgrade.
    let mut later = delivery("heidi", "tablet", 90_000);
    later.sends = 0;
    store.begin(&[later.clone()]).await.unwrap();
    let mut rehold = held.clone();
    rehold.deadline_ms = 95_000;
    assert!(store.resent(&rehold).await.unwrap());
    let taken = store.take_held(&held.user, &held.device).await.unwrap();
    assert_eq!(
        taken.iter().map(|p| p.message.mid).collect::<Vec<_>>(),
        vec![later.message.mid, held.message.mid]
    );
    drop(store);
    let tables: Vec<String> = rusqlite::Connection::open(&path)
        .unwrap()
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(tables, vec!["deliveries".to_owned()]);
}

/// `dak up` hands the deliveries of an earlier process to the inbox in the
/// order of their deadlines (the order they were sent), so the SQLite store
/// claims earliest deadline first, as the in-process one does.
#[tokio::test]
async fn sqlite_inflight_claims_the_earliest_deadline_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteInFlight::open(&dir.path().join("inflight.db")).unwrap();
    let deliveries: Vec<Pending> = [5_000, 1_000, 4_000, 2_000, 3_000]
        .into_iter()
        .map(|deadline| delivery("heidi", "phone", deadline))
        .collect();
    store.begin(&deliveries).await.unwrap();
    let claimed = store.claim_due(10_000, 0, 100).await.unwrap();
    let deadlines: Vec<u64> = claimed.iter().map(|p| p.deadline_ms).collect();
    assert_eq!(deadlines, vec![1_000, 2_000, 3_000, 4_000, 5_000]);
}
