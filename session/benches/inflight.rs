//! The SQLite in-flight file (`dak up`'s in-flight deliveries, fsynced at
//! every commit): a batch of deliveries begun, then each acked by an ack of
//! its own, every ack in one call, as session does for a batch of
//! `dak.deliver`.
//! Run with `cargo bench -p session --bench inflight`.

use std::sync::atomic::{AtomicU64, Ordering};

use dak_wire::event::{Ack, Message};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use serde_json::value::RawValue;
use session::inflight::{InFlight, Pending, SqliteInFlight};

fn main() {
    divan::main();
}

const TS: u64 = 1_764_000_000_000;

struct Fixture {
    /// Holds the file's directory until the benchmark ends.
    _dir: tempfile::TempDir,
    store: SqliteInFlight,
    rt: tokio::runtime::Runtime,
    next: AtomicU64,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            store: SqliteInFlight::open(&dir.path().join("inflight.db")).unwrap(),
            _dir: dir,
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            next: AtomicU64::new(0),
        }
    }

    /// Fresh deliveries, each to a user of its own.
    fn deliveries(&self, size: u64) -> Vec<Pending> {
        let first = self.next.fetch_add(size, Ordering::Relaxed);
        (first..first + size)
            .map(|n| Pending {
                user: UserId::parse(format!("user{n}")).unwrap(),
                device: DeviceId::parse("phone").unwrap(),
                message: Message {
                    mid: Mid::from_ulid(ulid::Ulid::from_parts(TS, n.into())),
                    id: ClientId::parse(format!("c-{n}")).unwrap(),
                    from: UserId::parse("alice").unwrap(),
                    from_device: DeviceId::parse("phone").unwrap(),
                    to: format!("user{n}"),
                    chat: ChatKind::Direct,
                    body: Some(
                        RawValue::from_string(r#"{"text":"see you at eight"}"#.into()).unwrap(),
                    ),
                    ephemeral: false,
                    notice: None,
                    ts: TS,
                },
                sends: 1,
                first_sent_ms: TS,
                deadline_ms: TS + 10_000,
            })
            .collect()
    }
}

#[divan::bench(args = [1, 100], sample_count = 50)]
fn begin_then_ack_each(bencher: divan::Bencher, batch: u64) {
    let f = Fixture::new();
    bencher
        .counter(divan::counter::ItemsCount::new(batch))
        .with_inputs(|| f.deliveries(batch))
        .bench_local_values(|deliveries| {
            f.rt.block_on(async {
                f.store.begin(&deliveries).await.unwrap();
                let acks: Vec<Ack> = deliveries
                    .iter()
                    .map(|d| Ack {
                        user: d.user.clone(),
                        device: d.device.clone(),
                        mids: vec![d.message.mid],
                    })
                    .collect();
                for acked in f.store.acked(&acks).await.unwrap() {
                    assert!(acked[0].is_some());
                }
                f.store.remove(&deliveries).await.unwrap();
            })
        });
}
