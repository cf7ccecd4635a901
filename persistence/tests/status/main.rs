//! Contract tests for the message status store: SQLite and ScyllaDB (on the CQL
//! server of `DAK_TEST_SCYLLA_NODES`, which scripts/test starts; without it the
//! ScyllaDB case fails) pass the same suite.

mod in_process;

use std::time::Duration;

use dak_runtime::now_ms;
use dak_wire::event::{DeviceStep, StatusEvent};
use dak_wire::{ChatKind, DeviceId, Mid, UserId};
use persistence::status::{ScyllaStatus, SqliteStatus, StatusStore};

const RETENTION: Duration = Duration::from_secs(3600);

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

/// A mid minted `age_ms` ago.
fn mid(age_ms: u64) -> Mid {
    Mid::from_ulid(ulid::Ulid::from_parts(now_ms() - age_ms, rand_bits()))
}

fn rand_bits() -> u128 {
    ulid::Ulid::new().random()
}

fn accepted(mid: Mid, at: u64) -> StatusEvent {
    StatusEvent::Accepted {
        mid,
        from: user("alice"),
        to: "team-7".into(),
        chat: ChatKind::Group,
        at,
    }
}

fn step(mid: Mid, to: &str, device: Option<&str>, step: DeviceStep, at: u64) -> StatusEvent {
    StatusEvent::Device {
        mid,
        from: user("alice"),
        user: user(to),
        device: device.map(|d| DeviceId::parse(d).unwrap()),
        step,
        at,
    }
}

/// The suite every status store passes.
pub async fn contract(store: &dyn StatusStore) {
    // Every kind of step comes back as it went in, oldest first.
    let m = mid(1000);
    let t = m.timestamp_ms();
    let steps = vec![
        step(m, "bob", Some("phone"), DeviceStep::Acked, t + 30),
        accepted(m, t),
        step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 10),
        step(m, "carol", None, DeviceStep::Stored, t + 20),
    ];
    store.record(&steps).await.unwrap();
    let got = store.steps(m).await.unwrap();
    assert_eq!(
        got,
        vec![
            accepted(m, t),
            step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 10),
            step(m, "carol", None, DeviceStep::Stored, t + 20),
            step(m, "bob", Some("phone"), DeviceStep::Acked, t + 30),
        ]
    );

    // A step reported again keeps its earliest time, whichever comes first.
    store
        .record(&[step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 50)])
        .await
        .unwrap();
    store
        .record(&[step(m, "carol", None, DeviceStep::Stored, t + 5)])
        .await
        .unwrap();
    let got = store.steps(m).await.unwrap();
    assert_eq!(got.len(), 4, "{got:?}");
    assert!(got.contains(&step(
        m,
        "bob",
        Some("phone"),
        DeviceStep::Delivered,
        t + 10
    )));
    assert!(got.contains(&step(m, "carol", None, DeviceStep::Stored, t + 5)));

    // A read receipt is not a step: it is stored only once checked, as `read`.
    let other = mid(1000);
    store
        .record(&[StatusEvent::Read {
            mid: other,
            to: user("alice"),
            by: user("bob"),
            device: DeviceId::parse("phone").unwrap(),
            at: t,
        }])
        .await
        .unwrap();
    assert_eq!(store.steps(other).await.unwrap(), vec![]);

    // Mids are apart; an unknown mid has no steps.
    store
        .record(&[step(other, "dave", Some("tablet"), DeviceStep::Pushed, t)])
        .await
        .unwrap();
    assert_eq!(
        store.steps(other).await.unwrap(),
        vec![step(other, "dave", Some("tablet"), DeviceStep::Pushed, t)]
    );
    assert_eq!(store.steps(mid(0)).await.unwrap(), vec![]);
    assert_eq!(store.steps(m).await.unwrap().len(), 4);

    // Every device step round-trips.
    let all = mid(1000);
    let each: Vec<StatusEvent> = DeviceStep::ALL
        .into_iter()
        .enumerate()
        .map(|(i, s)| step(all, "erin", Some("phone"), s, t + i as u64))
        .collect();
    store.record(&each).await.unwrap();
    assert_eq!(store.steps(all).await.unwrap(), each);

    // One call with the steps of many mids, as a busy consumer's batch has,
    // a step among them twice: each mid gets its own, the earliest time kept.
    let many: Vec<Mid> = (0..25).map(|_| mid(1000)).collect();
    let mut steps: Vec<StatusEvent> = many
        .iter()
        .flat_map(|&m| {
            let t = m.timestamp_ms();
            [
                accepted(m, t),
                step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 10),
            ]
        })
        .collect();
    let (twice, twice_t) = (many[7], many[7].timestamp_ms());
    steps.insert(
        3,
        step(
            twice,
            "bob",
            Some("phone"),
            DeviceStep::Delivered,
            twice_t + 90,
        ),
    );
    store.record(&steps).await.unwrap();
    for &m in &many {
        let t = m.timestamp_ms();
        assert_eq!(
            store.steps(m).await.unwrap(),
            vec![
                accepted(m, t),
                step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 10)
            ],
            "{m} (written twice: {})",
            m == twice
        );
    }

    // The retention counts from the mid's own time: a mid older than it keeps
    // nothing, however late its steps come.
    let old = mid(RETENTION.as_millis() as u64 + 60_000);
    store
        .record(&[accepted(old, old.timestamp_ms())])
        .await
        .unwrap();
    assert_eq!(store.steps(old).await.unwrap(), vec![]);
}

#[tokio::test]
async fn sqlite_status_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStatus::open(&dir.path().join("status.db"), RETENTION).unwrap();
    contract(&store).await;
}

#[tokio::test]
async fn sqlite_status_forgets_mids_past_the_retention_and_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("status.db");
    let m = mid(2_000);
    {
        let store = SqliteStatus::open(&path, RETENTION).unwrap();
        store
            .record(&[accepted(m, m.timestamp_ms())])
            .await
            .unwrap();
    }
    let store = SqliteStatus::open(&path, RETENTION).unwrap();
    assert_eq!(
        store.steps(m).await.unwrap().len(),
        1,
        "kept across a reopen"
    );
    drop(store);
    // Opened again with a retention the mid is past: upkeep deletes it.
    let store = SqliteStatus::open(&path, Duration::from_secs(1)).unwrap();
    store.record(&[accepted(mid(0), now_ms())]).await.unwrap();
    assert_eq!(store.steps(m).await.unwrap(), vec![]);
}

#[tokio::test]
async fn scylla_status_keeps_the_contract() {
    dak_runtime::scylla::with_test_keyspace(
        "scylla_status_keeps_the_contract",
        |nodes, keyspace| async move {
            let store = ScyllaStatus::connect(&nodes, &keyspace, &Default::default(), RETENTION)
                .await
                .expect("connect to DAK_TEST_SCYLLA_NODES and create the keyspace");
            contract(&store).await;
        },
    )
    .await;
}

/// After an upgrade from a version that kept the steps in `message_status`
/// (partition `mid`), a message sent before it keeps its status: its steps
/// from the old table and the new, each step once at its earliest time.
#[tokio::test]
async fn scylla_status_reads_the_steps_an_earlier_version_wrote() {
    dak_runtime::scylla::with_test_keyspace(
        "scylla_status_reads_the_steps_an_earlier_version_wrote",
        |nodes, keyspace| async move {
            let session = dak_runtime::scylla::connect(&nodes, &keyspace, &Default::default())
                .await
                .expect("connect to DAK_TEST_SCYLLA_NODES");
            session
                .query_unpaged(
                    format!(
                        "CREATE TABLE {keyspace}.message_status (
                            mid text, user_id text, device_id text, state text,
                            at bigint, sender text, recipient text, chat text,
                            PRIMARY KEY ((mid), user_id, device_id, state))"
                    ),
                    (),
                )
                .await
                .unwrap();
            let old = mid(5_000);
            let t = old.timestamp_ms();
            let insert = format!(
                "INSERT INTO {keyspace}.message_status
                   (mid, user_id, device_id, state, at, sender, recipient, chat)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            );
            for (user, device, state, at, recipient, chat) in [
                ("", "", "accepted", t, "bob", "direct"),
                ("bob", "phone", "delivered", t + 10, "", ""),
            ] {
                session
                    .query_unpaged(
                        insert.as_str(),
                        (
                            old.to_string(),
                            user,
                            device,
                            state,
                            at as i64,
                            "alice",
                            recipient,
                            chat,
                        ),
                    )
                    .await
                    .unwrap();
            }

            let store = ScyllaStatus::connect(&nodes, &keyspace, &Default::default(), RETENTION)
                .await
                .unwrap();
            // The device acks after the upgrade, and a replay reports its
            // delivery again, later.
            store
                .record(&[
                    step(old, "bob", Some("phone"), DeviceStep::Acked, t + 30),
                    step(old, "bob", Some("phone"), DeviceStep::Delivered, t + 20),
                ])
                .await
                .unwrap();
            let accepted_before = StatusEvent::Accepted {
                mid: old,
                from: user("alice"),
                to: "bob".into(),
                chat: ChatKind::Direct,
                at: t,
            };
            assert_eq!(
                store.steps(old).await.unwrap(),
                vec![
                    accepted_before,
                    step(old, "bob", Some("phone"), DeviceStep::Delivered, t + 10),
                    step(old, "bob", Some("phone"), DeviceStep::Acked, t + 30),
                ]
            );

            // A message sent after the upgrade is the new table's alone.
            contract(&store).await;
        },
    )
    .await;
}
