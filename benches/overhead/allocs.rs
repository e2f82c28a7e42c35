//! Allocations per request: a counting wrapper around jemalloc, the
//! allocator of every server measured.
//!
//! Counting needs the counter *inside* the server, so for this pass every
//! variant runs as this bench binary re-executed (stall-lab's variants
//! through `stall_lab::cli::main`, the same code as its binary), with
//! `OVERHEAD_COUNT_ALLOCS` set. The CPU rounds do not count: they run the
//! real binaries, and the counter stays off in the bare and naive servers
//! (one relaxed load per allocation).
//!
//! The child answers each line it reads on stdin with `allocs: N`, the
//! allocations (`alloc`, `alloc_zeroed`, `realloc`) made so far by every
//! thread of the process, so the figure includes the exporter's and the
//! console's threads: what a request costs the process, not one worker.

#![allow(unsafe_code)] // a global allocator cannot be written without it

use std::alloc::{GlobalAlloc, Layout};
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Set in a child's environment to count its allocations.
pub(crate) const COUNT_ALLOCS_ENV: &str = "OVERHEAD_COUNT_ALLOCS";

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCS: AtomicU64 = AtomicU64::new(0);

pub(crate) struct Counting(pub(crate) tikv_jemallocator::Jemalloc);

impl Counting {
    #[inline]
    fn count(&self) {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call is forwarded unchanged to jemalloc.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: as above.
        unsafe { self.0.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { self.0.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: as above.
        unsafe { self.0.realloc(ptr, layout, new_size) }
    }
}

/// In a child started with [`COUNT_ALLOCS_ENV`]: turns the counter on and
/// answers the parent's questions on a thread of its own.
pub(crate) fn serve_counts_if_asked() {
    if std::env::var_os(COUNT_ALLOCS_ENV).is_none() {
        return;
    }
    COUNTING.store(true, Ordering::Relaxed);
    std::thread::spawn(|| {
        for line in std::io::stdin().lock().lines() {
            if line.is_err() {
                break;
            }
            let n = ALLOCS.load(Ordering::Relaxed);
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "allocs: {n}");
            let _ = out.flush();
        }
    });
}
