//! What the poll hooks cost per poll: a task that yields a million times on a
//! current-thread runtime, with and without the hooks installed, best of
//! several interleaved runs (the minimum is the cost without interference
//! from whatever else the machine is doing).
//!
//! Then what a stack capture costs: `HOOKS_STALLS` stalls of 60 ms in a row
//! on a watched runtime, and the watch's own capture figures (time in the
//! signal handler, round trip, naming the first stack and a cached one,
//! buffer per worker) with the process's resident memory before and after.
//!
//! Run with `cargo bench -p stall-watch --bench hooks`; `HOOKS_POLLS`,
//! `HOOKS_RUNS` and `HOOKS_STALLS` override the defaults.

use std::time::{Duration, Instant};

fn main() {
    let polls: u32 = env_or("HOOKS_POLLS", 1_000_000);
    let runs: u32 = env_or("HOOKS_RUNS", 7);
    let watch = stall_watch::Watch::new(
        stall_watch::Config::default()
            .threshold(Duration::from_millis(20))
            .stacks(false),
    );
    let (mut with, mut without) = (f64::MAX, f64::MAX);
    for _ in 0..runs {
        with = with.min(ns_per_poll(Some(&watch), polls));
        without = without.min(ns_per_poll(None, polls));
    }
    println!("stall-watch poll hooks: {polls} polls, best of {runs} runs each");
    println!("  without hooks  {without:7.1} ns/poll");
    println!("  with hooks     {with:7.1} ns/poll");
    println!("  hooks cost     {:7.1} ns/poll", (with - without).max(0.0));
    capture_costs(env_or("HOOKS_STALLS", 20));
}

/// Stalls `stalls` times and prints what capturing their stacks cost.
fn capture_costs(stalls: u32) {
    let watch = stall_watch::Watch::new(stall_watch::Config::default());
    let runtime = watch
        .install(&mut tokio::runtime::Builder::new_multi_thread())
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let rss_before = rss_kib();
    for _ in 0..stalls {
        let stall = runtime.spawn(async {
            std::thread::sleep(Duration::from_millis(60));
        });
        runtime.block_on(stall).expect("stalling task");
    }
    // The last stall is filed by the watcher thread a tick later.
    std::thread::sleep(Duration::from_millis(50));
    let rss_after = rss_kib();
    let Some(c) = watch.stalls(0).stack_capture else {
        println!("stack capture: none (stacks unsupported here, or no capture landed)");
        return;
    };
    println!("stack capture: {} captures of {stalls} stalls", c.captures);
    println!(
        "  signal handler   mean {:.1} µs, max {:.1} µs",
        c.handler_ns_mean as f64 / 1000.0,
        c.handler_ns_max as f64 / 1000.0
    );
    println!("  round trip       {} µs (the last)", c.round_trip_us_last);
    println!(
        "  preparing        {:.1} ms on the namer thread at start ({} compilation units indexed)",
        c.prepare_ms, c.indexed_units
    );
    println!(
        "  naming a stack   first {:.1} ms, last {:.3} ms, longest {:.1} ms",
        c.symbolize_us_first as f64 / 1000.0,
        c.symbolize_us_last as f64 / 1000.0,
        c.symbolize_us_max as f64 / 1000.0
    );
    println!(
        "  buffer           {} KiB per worker",
        c.buffer_bytes_per_worker / 1024
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        println!("  resident memory  {before} KiB before, {after} KiB after");
    }
}

/// The process's resident memory, from /proc (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Nanoseconds per poll of a task that yields `polls` times.
fn ns_per_poll(watch: Option<&stall_watch::Watch>, polls: u32) -> f64 {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if let Some(watch) = watch {
        watch.install(&mut builder);
    }
    let runtime = builder.enable_all().build().expect("runtime");
    runtime.block_on(async {
        let task = tokio::spawn(async move {
            for _ in 0..polls {
                tokio::task::yield_now().await;
            }
        });
        let start = Instant::now();
        task.await.expect("yielding task");
        start.elapsed().as_nanos() as f64 / f64::from(polls)
    })
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
