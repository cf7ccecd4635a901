//! Contract tests for the offline inbox: every implementation passes the same
//! suite, SQLite and ScyllaDB (on the CQL server of `DAK_TEST_SCYLLA_NODES`,
//! which scripts/test starts; without it the ScyllaDB cases fail).

use dak_wire::{ChatKind, ClientId, DeviceId, Message, Mid, UserId};
use persistence::inbox::{Inbox, SqliteInbox, Stored};
use persistence::scylla::ScyllaInbox;
use serde_json::value::RawValue;

mod receipts;

const FAR: u64 = u64::MAX / 4;

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn device(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn message(to: &str, seq: u64) -> Message {
    Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse(format!("c-{seq}")).unwrap(),
        from: user("alice"),
        from_device: device("phone"),
        to: to.into(),
        chat: ChatKind::Direct,
        body: Some(RawValue::from_string(format!(r#"{{"n":{seq}}}"#)).unwrap()),
        ephemeral: false,
        notice: None,
        ts: seq,
    }
}

fn stored(to: &str, dev: Option<&str>, seq: u64, expires_at_ms: u64) -> Stored {
    Stored {
        user: user(to),
        device: dev.map(device),
        seq,
        message: message(to, seq),
        expires_at_ms,
    }
}

fn mids(page: &[(u64, Message)]) -> Vec<Mid> {
    page.iter().map(|(_, m)| m.mid).collect()
}

/// The suite every inbox passes. `unique` makes user names no other run uses.
pub async fn contract(inbox: &dyn Inbox, unique: &str) {
    let bob = format!("bob{unique}");
    let carol = format!("carol{unique}");
    let phone = device("phone");

    // Stored in order, served oldest first, paged by position.
    let items: Vec<Stored> = (10..20)
        .map(|seq| stored(&bob, Some("phone"), seq, FAR))
        .collect();
    assert_eq!(inbox.store(&items).await.unwrap(), 10);
    let all = inbox.page(&user(&bob), &phone, None, 100, 0).await.unwrap();
    assert_eq!(
        mids(&all),
        items.iter().map(|s| s.message.mid).collect::<Vec<_>>()
    );
    assert_eq!(
        all[0].1.body.as_ref().unwrap().get(),
        r#"{"n":10}"#,
        "the body comes back as stored"
    );
    let first = inbox.page(&user(&bob), &phone, None, 4, 0).await.unwrap();
    assert_eq!(first.len(), 4);
    let rest = inbox
        .page(&user(&bob), &phone, Some(first[3].0), 100, 0)
        .await
        .unwrap();
    assert_eq!(rest.len(), 6);
    assert_eq!(rest[0].1.mid, items[4].message.mid);

    // Storing the same messages again (Kafka redelivery) changes nothing.
    assert_eq!(inbox.store(&items[..3]).await.unwrap(), 0);
    assert_eq!(
        inbox
            .page(&user(&bob), &phone, None, 100, 0)
            .await
            .unwrap()
            .len(),
        10
    );

    // Another device of the same user has its own inbox.
    assert!(inbox
        .page(&user(&bob), &device("tablet"), None, 100, 0)
        .await
        .unwrap()
        .is_empty());

    // Acks drop exactly what they name, and only for that device.
    let acked = [items[0].message.mid, items[1].message.mid];
    assert_eq!(
        inbox
            .drop_acked(&user(&bob), &phone, &acked, FAR)
            .await
            .unwrap()
            .len(),
        2
    );
    let left = inbox.page(&user(&bob), &phone, None, 100, 0).await.unwrap();
    assert_eq!(left.len(), 8);
    assert_eq!(left[0].1.mid, items[2].message.mid);
    // A store that arrives after the drop of its mid stays dropped.
    assert_eq!(inbox.store(&items[..1]).await.unwrap(), 0);
    assert_eq!(
        inbox
            .page(&user(&bob), &phone, None, 100, 0)
            .await
            .unwrap()
            .len(),
        8
    );

    // Expired messages are not served, and expiry deletes them.
    let short = stored(&carol, Some("web"), 5, 1_000);
    let long = stored(&carol, Some("web"), 6, FAR);
    inbox.store(&[short.clone(), long.clone()]).await.unwrap();
    let page = inbox
        .page(&user(&carol), &device("web"), None, 100, 2_000)
        .await
        .unwrap();
    assert_eq!(mids(&page), vec![long.message.mid]);
    assert!(inbox.expire(2_000).await.unwrap() >= 1);
    let page = inbox
        .page(&user(&carol), &device("web"), None, 100, 0)
        .await
        .unwrap();
    assert_eq!(
        mids(&page),
        vec![long.message.mid],
        "the expired message is gone for good"
    );

    // The user-level inbox goes to the first device that takes it over, in order.
    let dave = format!("dave{unique}");
    let waiting: Vec<Stored> = (1..=3).map(|seq| stored(&dave, None, seq, FAR)).collect();
    inbox.store(&waiting).await.unwrap();
    assert_eq!(
        inbox
            .take_over(&user(&dave), &device("first"))
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        inbox
            .take_over(&user(&dave), &device("second"))
            .await
            .unwrap(),
        0
    );
    let page = inbox
        .page(&user(&dave), &device("first"), None, 100, 0)
        .await
        .unwrap();
    assert_eq!(
        mids(&page),
        waiting.iter().map(|s| s.message.mid).collect::<Vec<_>>()
    );

    assert!(inbox.depth().await.unwrap() >= 8 + 1 + 3);

    dropping_returns_what_it_removed(inbox, unique).await;
    removing_a_device_deletes_its_inbox_alone(inbox, unique).await;
}

/// A device its user removed loses every stored copy; the user's other
/// devices, the user-level inbox and other users keep theirs, and the
/// device can be stored for again once it is back.
async fn removing_a_device_deletes_its_inbox_alone(inbox: &dyn Inbox, unique: &str) {
    let gina = format!("gina{unique}");
    let henry = format!("henry{unique}");
    let (phone, laptop) = (device("phone"), device("laptop"));
    let for_phone: Vec<Stored> = (1..=3)
        .map(|seq| stored(&gina, Some("phone"), seq, FAR))
        .collect();
    // The laptop's copies of the first two.
    let for_laptop: Vec<Stored> = for_phone[..2]
        .iter()
        .map(|s| Stored {
            device: Some(laptop.clone()),
            ..s.clone()
        })
        .collect();
    let waiting = stored(&gina, None, 4, FAR);
    let henrys = stored(&henry, Some("laptop"), 5, FAR);
    inbox.store(&for_phone).await.unwrap();
    inbox.store(&for_laptop).await.unwrap();
    inbox
        .store(&[waiting.clone(), henrys.clone()])
        .await
        .unwrap();

    let mut removed: Vec<Mid> = inbox
        .remove_device(&user(&gina), &laptop)
        .await
        .unwrap()
        .iter()
        .map(|m| m.mid)
        .collect();
    removed.sort_unstable();
    let mut expected: Vec<Mid> = for_laptop.iter().map(|s| s.message.mid).collect();
    expected.sort_unstable();
    assert_eq!(removed, expected, "the laptop's two copies, as stored");
    let page = |u: String, d: DeviceId| async move {
        mids(&inbox.page(&user(&u), &d, None, 100, 0).await.unwrap())
    };
    assert_eq!(page(gina.clone(), laptop.clone()).await, vec![]);
    assert_eq!(
        page(gina.clone(), phone.clone()).await,
        for_phone.iter().map(|s| s.message.mid).collect::<Vec<_>>(),
        "the other device keeps its copies"
    );
    assert_eq!(
        page(henry.clone(), laptop.clone()).await,
        vec![henrys.message.mid],
        "another user's device of the same name keeps its copy"
    );
    // Handed over again (the bus delivers at least once): nothing left.
    assert!(inbox
        .remove_device(&user(&gina), &laptop)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        inbox
            .take_over(&user(&gina), &device("tablet"))
            .await
            .unwrap(),
        1,
        "the user-level inbox stays"
    );

    // The device registered again: it is stored for as before.
    let later = stored(&gina, Some("laptop"), 6, FAR);
    assert_eq!(inbox.store(std::slice::from_ref(&later)).await.unwrap(), 1);
    assert_eq!(page(gina, laptop).await, vec![later.message.mid]);
}

/// A drop hands back the messages it removed, as stored, in the order of the
/// acked mids, each once.
async fn dropping_returns_what_it_removed(inbox: &dyn Inbox, unique: &str) {
    let frank = format!("frank{unique}");
    let phone = device("phone");
    let items: Vec<Stored> = (1..=3)
        .map(|seq| stored(&frank, Some("phone"), seq, FAR))
        .collect();
    assert_eq!(inbox.store(&items).await.unwrap(), 3);
    // Also waiting in the user-level inbox, as stored before the user had a device.
    let both = Stored {
        device: None,
        ..items[1].clone()
    };
    assert_eq!(inbox.store(std::slice::from_ref(&both)).await.unwrap(), 1);
    let only_waiting = stored(&frank, None, 4, FAR);
    assert_eq!(
        inbox
            .store(std::slice::from_ref(&only_waiting))
            .await
            .unwrap(),
        1
    );

    let unknown = Mid::from_ulid(ulid::Ulid::new());
    let acked = [
        items[2].message.mid,
        unknown,
        items[1].message.mid,
        only_waiting.message.mid,
        items[2].message.mid,
    ];
    // Found first, as a drop would remove them, and left where they are.
    let found = inbox.find(&user(&frank), &phone, &acked).await.unwrap();
    let in_order = vec![
        items[2].message.mid,
        items[1].message.mid,
        only_waiting.message.mid,
    ];
    assert_eq!(found.iter().map(|m| m.mid).collect::<Vec<_>>(), in_order);
    assert_eq!(found[0].body.as_ref().unwrap().get(), r#"{"n":3}"#);
    assert_eq!(found[2].body.as_ref().unwrap().get(), r#"{"n":4}"#);
    assert_eq!(
        inbox
            .page(&user(&frank), &phone, None, 100, 0)
            .await
            .unwrap()
            .len(),
        3,
        "finding removes nothing"
    );

    let dropped = inbox
        .drop_acked(&user(&frank), &phone, &acked, FAR)
        .await
        .unwrap();
    assert_eq!(
        dropped.iter().map(|m| m.mid).collect::<Vec<_>>(),
        vec![
            items[2].message.mid,
            items[1].message.mid,
            only_waiting.message.mid
        ],
        "in the order acked, each once, the unknown mid left out"
    );
    assert_eq!(
        dropped[0].body.as_ref().unwrap().get(),
        r#"{"n":3}"#,
        "the body comes back as stored"
    );
    assert_eq!(dropped[0].id, items[2].message.id);
    assert_eq!(dropped[0].from, items[2].message.from);
    assert_eq!(dropped[0].ts, items[2].message.ts);
    assert_eq!(dropped[1].body.as_ref().unwrap().get(), r#"{"n":2}"#);
    assert_eq!(dropped[2].body.as_ref().unwrap().get(), r#"{"n":4}"#);

    // Both copies went: nothing of it is left to take over.
    assert_eq!(
        mids(
            &inbox
                .page(&user(&frank), &phone, None, 100, 0)
                .await
                .unwrap()
        ),
        vec![items[0].message.mid]
    );
    assert_eq!(
        inbox
            .take_over(&user(&frank), &device("tablet"))
            .await
            .unwrap(),
        0
    );

    // Dropping again, or dropping what was never stored, returns nothing.
    assert!(inbox
        .find(&user(&frank), &phone, &acked)
        .await
        .unwrap()
        .is_empty());
    assert!(inbox
        .drop_acked(&user(&frank), &phone, &acked, FAR)
        .await
        .unwrap()
        .is_empty());
    assert!(inbox
        .drop_acked(&user(&frank), &phone, &[unknown], FAR)
        .await
        .unwrap()
        .is_empty());
    assert!(inbox
        .drop_acked(&user(&frank), &phone, &[], FAR)
        .await
        .unwrap()
        .is_empty());
}

/// Pages read while a large store is under way see a prefix of it, never a
/// later message without an earlier one: a cursor taken from such a page would
/// skip the earlier message for good.
pub async fn pages_during_a_store_never_skip(inbox: &dyn Inbox, unique: &str) {
    let dave = format!("dave{unique}");
    let phone = device("phone");
    let items: Vec<Stored> = (0..600)
        .map(|seq| stored(&dave, Some("phone"), 1000 + seq, FAR))
        .collect();
    let all: Vec<Mid> = items.iter().map(|s| s.message.mid).collect();
    let done = std::sync::atomic::AtomicBool::new(false);
    let store = async {
        assert_eq!(inbox.store(&items).await.unwrap(), 600);
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    // Reads pages until one is read after the store finished, so at least
    // one is read whatever the timing: a thread preempted right after the
    // store began may find it already done.
    let watch = async {
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let page = inbox
                .page(&user(&dave), &phone, None, 1000, 0)
                .await
                .unwrap();
            let seen = mids(&page);
            assert_eq!(
                seen,
                all[..seen.len()],
                "a page passed a message not yet written"
            );
            if finished {
                return;
            }
            tokio::task::yield_now().await;
        }
    };
    tokio::join!(store, watch);
    let page = inbox
        .page(&user(&dave), &phone, None, 1000, 0)
        .await
        .unwrap();
    assert_eq!(mids(&page), all);
}

#[tokio::test]
async fn sqlite_inbox_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let inbox = SqliteInbox::open(&dir.path().join("inbox.db")).unwrap();
    contract(&inbox, "").await;
    pages_during_a_store_never_skip(&inbox, "").await;
}

#[tokio::test]
async fn sqlite_inbox_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("inbox.db");
    let item = stored("erin", Some("phone"), 1, FAR);
    {
        let inbox = SqliteInbox::open(&path).unwrap();
        inbox.store(std::slice::from_ref(&item)).await.unwrap();
    }
    let inbox = SqliteInbox::open(&path).unwrap();
    let page = inbox
        .page(&user("erin"), &device("phone"), None, 10, 0)
        .await
        .unwrap();
    assert_eq!(mids(&page), vec![item.message.mid]);

    // `dak up` restarted: its embedded Kafka counts offsets from 0 again. What is
    // stored now still comes after what was kept.
    let later = stored("erin", Some("phone"), 0, FAR);
    inbox.store(std::slice::from_ref(&later)).await.unwrap();
    let page = inbox
        .page(&user("erin"), &device("phone"), None, 10, 0)
        .await
        .unwrap();
    assert_eq!(mids(&page), vec![item.message.mid, later.message.mid]);
    let rest = inbox
        .page(&user("erin"), &device("phone"), Some(page[0].0), 10, 0)
        .await
        .unwrap();
    assert_eq!(
        mids(&rest),
        vec![later.message.mid],
        "a cursor from before the restart still works"
    );
}

#[tokio::test]
async fn scylla_inbox_keeps_the_contract() {
    dak_runtime::scylla::with_test_keyspace(
        "scylla_inbox_keeps_the_contract",
        |nodes, keyspace| async move {
            let store = ScyllaInbox::connect(&nodes, &keyspace, &Default::default())
                .await
                .expect("connect to DAK_TEST_SCYLLA_NODES and create the keyspace");
            let unique = ulid::Ulid::new().to_string().to_lowercase();
            contract(&store, &unique).await;
            pages_during_a_store_never_skip(&store, &unique).await;
        },
    )
    .await;
}
