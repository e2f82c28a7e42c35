//! What the poll hooks cost per poll: a task that yields a million times on a
//! current-thread runtime, with and without the hooks installed, best of
//! several interleaved runs (the minimum is the cost without interference
//! from whatever else the machine is doing).
//!
//! Run with `cargo bench -p stall-watch --bench hooks`; `HOOKS_POLLS` and
//! `HOOKS_RUNS` override the defaults.

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
