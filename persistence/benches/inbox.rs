//! The SQLite inbox (dak up's store for offline devices): a batch of stored
//! messages, and reading a 500-message sync page. Run with
//! `cargo bench -p persistence`.

use std::sync::atomic::{AtomicU64, Ordering};

use dak_wire::event::Message;
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use persistence::inbox::{Inbox, SqliteInbox, Stored};
use serde_json::value::RawValue;

fn main() {
    divan::main();
}

const TS: u64 = 1_764_000_000_000;

/// Fresh mids every call, so each batch is new to the inbox.
fn batch(next: &AtomicU64, size: u64, user: &UserId, device: &DeviceId) -> Vec<Stored> {
    let first = next.fetch_add(size, Ordering::Relaxed);
    (first..first + size)
        .map(|n| Stored {
            user: user.clone(),
            device: Some(device.clone()),
            seq: n,
            message: Message {
                mid: Mid::from_ulid(ulid::Ulid::from_parts(TS, n.into())),
                id: ClientId::parse(format!("c-{n}")).unwrap(),
                from: UserId::parse("alice").unwrap(),
                from_device: DeviceId::parse("phone").unwrap(),
                to: user.to_string(),
                chat: ChatKind::Direct,
                body: Some(RawValue::from_string(r#"{"text":"see you at eight"}"#.into()).unwrap()),
                ephemeral: false,
                notice: None,
                ts: TS,
            },
            expires_at_ms: u64::MAX / 2,
        })
        .collect()
}

/// An empty inbox in a temporary directory, and what the benchmarks need
/// to fill it.
struct Fixture {
    /// Holds the inbox's directory until the benchmark ends.
    _dir: tempfile::TempDir,
    inbox: SqliteInbox,
    rt: tokio::runtime::Runtime,
    next: AtomicU64,
    user: UserId,
    device: DeviceId,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self {
            inbox: SqliteInbox::open(&dir.path().join("inbox.db")).unwrap(),
            _dir: dir,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            next: AtomicU64::new(0),
            user: UserId::parse("bob").unwrap(),
            device: DeviceId::parse("tablet").unwrap(),
        }
    }
}

#[divan::bench(args = [1, 100, 500])]
fn store_batch(bencher: divan::Bencher, size: u64) {
    let f = Fixture::new();
    bencher
        .with_inputs(|| batch(&f.next, size, &f.user, &f.device))
        .bench_local_values(|items| f.rt.block_on(f.inbox.store(&items)).unwrap());
}

#[divan::bench]
fn sync_page_of_500(bencher: divan::Bencher) {
    let f = Fixture::new();
    for _ in 0..4 {
        f.rt.block_on(f.inbox.store(&batch(&f.next, 500, &f.user, &f.device)))
            .unwrap();
    }
    bencher.bench_local(|| {
        let page =
            f.rt.block_on(f.inbox.page(&f.user, &f.device, None, 500, TS))
                .unwrap();
        assert_eq!(page.len(), 500);
        page
    });
}
