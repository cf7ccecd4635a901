//! A process that nobody scrapes must not keep its histogram samples: the
//! Prometheus recorder holds each sample until it is folded into its buckets,
//! and every message records several. The allocator below counts the bytes
//! this test binary holds.

// The counting allocator hands every call on to the system allocator.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to `System` with the caller's own arguments; the
// counter only adds and subtracts the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

#[test]
fn histogram_samples_are_let_go_without_a_scrape() {
    let handle = dak_runtime::admin::metrics();
    let started = Instant::now();
    // The recorder's own allocations for this series come first.
    dak_runtime::metrics::message_age("sent", 0);
    let before = LIVE.load(Ordering::Relaxed);

    // Two million samples: 32 MiB if the recorder kept them all.
    for _ in 0..2_000_000 {
        dak_runtime::metrics::message_age("sent", 0);
    }
    // Nothing scrapes this process, which goes on recording a sample now and
    // then. Within a few upkeeps the samples are gone: the recorder frees
    // drained samples once a later drain or record lets it.
    let mut recorded = 2_000_001;
    let deadline = Instant::now() + 10 * dak_runtime::admin::UPKEEP_EVERY;
    loop {
        let held = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        if held < 2 * MIB {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} KiB of samples still held after {:?} without a scrape",
            held / 1024,
            10 * dak_runtime::admin::UPKEEP_EVERY
        );
        dak_runtime::metrics::message_age("sent", 0);
        recorded += 1;
        std::thread::sleep(Duration::from_millis(50));
    }

    // Let go, not lost: a scrape counts every sample, but one. metrics-util's
    // sample bucket can lose a sample recorded at the very moment a drain
    // detaches the bucket's block (the writer took the block before the
    // drain and writes into it after the drain read it); the upkeep thread
    // drains once a second, so a run of this test may lose one sample per
    // drain at most. Samples kept instead of counted would be millions.
    let text = handle.render();
    let prefix = "dak_message_age_seconds_count{stage=\"sent\"} ";
    let counted: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in\n{text}"))
        .parse()
        .unwrap();
    let drains = started.elapsed().as_secs() / dak_runtime::admin::UPKEEP_EVERY.as_secs() + 2;
    assert!(
        counted <= recorded && recorded - counted <= drains,
        "{counted} samples counted of {recorded} recorded, over {drains} drains at most"
    );
}
