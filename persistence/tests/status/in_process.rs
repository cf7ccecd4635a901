//! Status reported inside one process (`dak up` on its embedded log): the
//! services' reports go straight to persistence's task, which keeps them in
//! the status store in the order they were made and checks read receipts
//! against them as it does what it reads from `dak.status`.

use std::sync::Arc;
use std::time::Duration;

use dak_runtime::auth::Verifier;
use dak_runtime::bus::{Bus, Consumer};
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status;
use dak_wire::event::{self, DeliverEvent, DeviceStep, Notice, StatusEvent};
use dak_wire::{DeviceId, ReceiptState};
use persistence::status::{SqliteStatus, StatusStore};
use persistence::{Deps, Persistence};

use crate::{accepted, mid, step, user, RETENTION};

const PATIENCE: Duration = Duration::from_secs(20);

fn read(m: dak_wire::Mid, by: &str, at: u64) -> StatusEvent {
    StatusEvent::Read {
        mid: m,
        to: user("alice"),
        by: user(by),
        device: DeviceId::parse("phone").unwrap(),
        at,
    }
}

/// The next read receipt on `dak.deliver`: (to, about mid, by).
async fn next_read_receipt(deliveries: &Consumer) -> (String, dak_wire::Mid, String) {
    let shutdown = Shutdown::new();
    tokio::time::timeout(PATIENCE, async {
        loop {
            for record in deliveries.next_batch(1, &shutdown).await.unwrap() {
                let DeliverEvent::Message(d) = event::decode(&record.payload).unwrap() else {
                    continue;
                };
                if let Some(Notice::Receipt {
                    mid,
                    state: ReceiptState::Read,
                }) = d.message.notice
                {
                    return (d.recipient.to_string(), mid, d.message.from.to_string());
                }
            }
        }
    })
    .await
    .expect("a read receipt on dak.deliver")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_reported_in_the_process_are_kept_in_order_and_allow_read_receipts() {
    dak_runtime::telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::embedded_for_tests(dir.path()).await;
    let store = Arc::new(SqliteStatus::open(&dir.path().join("status.db"), RETENTION).unwrap());
    let inbox =
        Arc::new(persistence::inbox::SqliteInbox::open(&dir.path().join("inbox.db")).unwrap());
    let (reporter, reports) = status::in_process();
    let persistence = Persistence::build(
        persistence::Config {
            inbox_ttl: Duration::from_secs(86_400),
            tombstone_ttl: Duration::from_secs(86_400),
            expiry_interval: Duration::from_secs(60),
            status_retention: RETENTION,
        },
        &bus,
        Deps {
            inbox,
            status: store.clone(),
            reporter: reporter.clone(),
            producer: bus.producer().unwrap(),
            verifier: Verifier::hs256("secret"),
            internal_token: "internal".into(),
            local_gateway: None,
        },
    )
    .unwrap();
    let keeper = tokio::spawn(persistence.keep_reports(reports));
    let deliveries = bus
        .consumer("test.deliveries", &[&bus.topics().deliver])
        .unwrap();

    // Kept once the report's future resolves.
    let m = mid(1_000);
    let t = m.timestamp_ms();
    reporter
        .report(vec![
            accepted(m, t),
            step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 1),
        ])
        .await
        .unwrap();
    assert_eq!(
        store.steps(m).await.unwrap(),
        vec![
            accepted(m, t),
            step(m, "bob", Some("phone"), DeviceStep::Delivered, t + 1)
        ]
    );

    // Carol's receipt (the message never went to her) is refused; bob's,
    // reported after it, is the first to reach alice.
    reporter
        .report(vec![read(m, "carol", t + 2)])
        .await
        .unwrap();
    reporter.report(vec![read(m, "bob", t + 3)]).await.unwrap();
    assert_eq!(
        next_read_receipt(&deliveries).await,
        ("alice".into(), m, "bob".into())
    );

    // Reports keep the order they were queued in, awaited or not: dave's
    // receipt, queued right behind the step that allows it, is relayed.
    let later = mid(500);
    let lt = later.timestamp_ms();
    let mut pending = reporter
        .enqueue(vec![step(
            later,
            "dave",
            Some("phone"),
            DeviceStep::Delivered,
            lt,
        )])
        .unwrap();
    pending.extend(reporter.enqueue(vec![read(later, "dave", lt + 1)]).unwrap());
    dak_runtime::bus::acknowledged_all(pending).await.unwrap();
    assert_eq!(
        next_read_receipt(&deliveries).await,
        ("alice".into(), later, "dave".into())
    );
    let kept = store.steps(later).await.unwrap();
    assert!(
        kept.contains(&step(
            later,
            "dave",
            Some("phone"),
            DeviceStep::Read,
            lt + 1
        )),
        "the relayed receipt is kept as the step `read`: {kept:?}"
    );

    // The task ends once every reporter is gone, and reporting then fails.
    let last = reporter.clone();
    drop(reporter);
    drop(persistence);
    assert!(
        last.report(vec![accepted(mid(0), t)]).await.is_ok(),
        "a reporter still held is still kept"
    );
    drop(last);
    tokio::time::timeout(PATIENCE, keeper)
        .await
        .expect("the task ends once every reporter is gone")
        .unwrap()
        .unwrap();
}
