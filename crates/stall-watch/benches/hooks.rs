//! What the poll hooks cost per poll: a task that yields on a
//! current-thread runtime with the hooks installed and on one without, in
//! short chunks taken in turn (`HOOKS_PAIRS` pairs of `HOOKS_CHUNK` polls,
//! the order swapped every pair). The cost is the **median of the pairs'
//! differences**: each pair runs within a few milliseconds, so whatever else
//! the machine does drifts out of the difference, and the median ignores
//! the pairs a preemption landed in. (The difference of two best-of-N
//! minima, this bench's earlier figure, moved from 4 to 93 ns between runs
//! of the same build here.)
//!
//! Then what a stack capture costs: `HOOKS_STALLS` stalls of 60 ms in a row
//! on a watched runtime, and the watch's own capture figures (time in the
//! signal handler, round trip, naming the first stack and a cached one,
//! buffer per worker) with the process's resident memory before and after.
//!
//! Run with `cargo bench -p stall-watch --bench hooks`; `HOOKS_PAIRS`,
//! `HOOKS_CHUNK` and `HOOKS_STALLS` override the defaults.

use std::time::{Duration, Instant};

fn main() {
    let pairs: usize = env_or("HOOKS_PAIRS", 400);
    let chunk: u32 = env_or("HOOKS_CHUNK", 10_000);
    let watch = stall_watch::Watch::new(
        stall_watch::Config::default()
            .threshold(Duration::from_millis(20))
            .stacks(false),
    );
    let hooked = runtime(Some(&watch));
    let plain = runtime(None);
    // Warm both up (thread-locals, the watch's first-poll registration).
    ns_per_poll(&hooked, chunk);
    ns_per_poll(&plain, chunk);
    let (mut with, mut without, mut cost) = (
        Vec::with_capacity(pairs),
        Vec::with_capacity(pairs),
        Vec::with_capacity(pairs),
    );
    for pair in 0..pairs {
        let (w, wo) = if pair % 2 == 0 {
            let w = ns_per_poll(&hooked, chunk);
            (w, ns_per_poll(&plain, chunk))
        } else {
            let wo = ns_per_poll(&plain, chunk);
            (ns_per_poll(&hooked, chunk), wo)
        };
        with.push(w);
        without.push(wo);
        cost.push(w - wo);
    }
    let (with, without, cost) = (sorted(with), sorted(without), sorted(cost));
    println!("stall-watch poll hooks: {pairs} pairs of {chunk} polls, in turn");
    println!(
        "  without hooks  {:7.1} ns/poll (median)",
        quantile(&without, 0.5)
    );
    println!(
        "  with hooks     {:7.1} ns/poll (median)",
        quantile(&with, 0.5)
    );
    println!(
        "  hooks cost     {:7.1} ns/poll (median of the pairs' differences; quartiles {:.1} to {:.1})",
        quantile(&cost, 0.5),
        quantile(&cost, 0.25),
        quantile(&cost, 0.75)
    );
    capture_costs(env_or("HOOKS_STALLS", 20));
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// The `q` quantile of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let at = ((v.len() - 1) as f64 * q).round() as usize;
    v[at]
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

/// A current-thread runtime, with `watch`'s hooks if given.
fn runtime(watch: Option<&stall_watch::Watch>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    if let Some(watch) = watch {
        watch.install(&mut builder);
    }
    builder.enable_all().build().expect("runtime")
}

/// Nanoseconds per poll of a task that yields `polls` times on `runtime`.
fn ns_per_poll(runtime: &tokio::runtime::Runtime, polls: u32) -> f64 {
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
