//! The SQLite dedup file (`dak up`'s outbox dedup): a reserve and its confirm,
//! once per accepted message, from one caller or from 64 at once (a busy
//! gateway's connections). Run with `cargo bench -p dak-runtime --bench dedup`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dak_runtime::dedup::{Dedup, Reservation, SqliteDedup};
use dak_wire::{ClientId, Mid, UserId};

fn main() {
    divan::main();
}

/// Reserve and confirm pairs each caller makes per iteration.
const PER_CALLER: usize = 100;

struct Fixture {
    /// Holds the file's directory until the benchmark ends.
    _dir: tempfile::TempDir,
    store: Arc<SqliteDedup>,
    rt: tokio::runtime::Runtime,
    next: Arc<AtomicU64>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteDedup::open(
            &dir.path().join("dedup.db"),
            Duration::from_secs(24 * 3600),
            10_000_000,
        )
        .unwrap();
        Self {
            _dir: dir,
            store: Arc::new(store),
            // The two cores of the machine dak is measured on.
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap(),
            next: Arc::new(AtomicU64::new(0)),
        }
    }
}

/// One caller's share: fresh client ids, each reserved then confirmed.
async fn pairs(store: Arc<SqliteDedup>, next: Arc<AtomicU64>) {
    for _ in 0..PER_CALLER {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let user = UserId::parse(format!("user{}", n % 1000)).unwrap();
        let id = ClientId::parse(format!("01JD8X3Q7M{n:016}")).unwrap();
        let mid = Mid::from_ulid(ulid::Ulid::new());
        let reserved = store.reserve(&user, &id, mid, n).await.unwrap();
        assert_eq!(reserved, Reservation::New);
        store.confirm(&user, &id, mid, n).await.unwrap();
    }
}

#[divan::bench(args = [1, 64], sample_count = 20, sample_size = 1)]
fn reserve_and_confirm(bencher: divan::Bencher, callers: usize) {
    let f = Fixture::new();
    bencher
        .counter(divan::counter::ItemsCount::new(callers * PER_CALLER))
        .bench_local(|| {
            f.rt.block_on(async {
                let tasks: Vec<_> = (0..callers)
                    .map(|_| tokio::spawn(pairs(f.store.clone(), f.next.clone())))
                    .collect();
                for task in tasks {
                    task.await.unwrap();
                }
            })
        });
}
