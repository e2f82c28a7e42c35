//! The namer thread: turns captured stacks into frames, off the watcher.
//!
//! Naming new code reads debug information (a millisecond or so per
//! compilation unit not seen before; more on a loaded machine), and the
//! watcher must keep its 5 ms tick meanwhile: a second stall on another
//! worker is announced on time even while the first one's stack is named.
//! So the watcher only captures (tens of microseconds) and hands the copy
//! here; this thread unwinds and names it, attaches the frames to the stall
//! in progress, and tells the watcher, which files a stall that ended while
//! its stack was being named only once the stack is there.
//!
//! As it starts, the thread reads the unwind tables and indexes the debug
//! information ([`Sampler::prepare`]), so the first stall is named nearly
//! as fast as the next ones.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use crate::monitor::Monitor;
use crate::stack::{RawStack, Sampler};

/// Name of the namer's OS thread.
pub(crate) const THREAD_NAME: &str = "stall-namer";

/// A capture to name.
pub(crate) struct Job {
    pub(crate) raw: RawStack,
    /// From the signal sent to the copy ready, as the watcher saw it.
    pub(crate) round_trip: Duration,
}

/// A capture named and attached: (worker, poll sequence).
pub(crate) type Named = (usize, u64);

/// Starts the namer thread. It runs until the sender of `jobs` is dropped.
pub(crate) fn spawn(
    monitor: Arc<Monitor>,
    sampler: Arc<Sampler>,
    jobs: Receiver<Job>,
    named: Sender<Named>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || run(&monitor, &sampler, &jobs, &named))
}

fn run(monitor: &Monitor, sampler: &Sampler, jobs: &Receiver<Job>, named: &Sender<Named>) {
    let started = Instant::now();
    let units = sampler.prepare();
    let prepare = started.elapsed();
    monitor.with_capture_stats(|stats| {
        stats.prepare_ms = crate::ms(prepare);
        stats.indexed_units = units;
    });
    while let Ok(Job { raw, round_trip }) = jobs.recv() {
        let started = Instant::now();
        let mut frames = sampler.symbolize(&raw);
        let symbolize = started.elapsed();
        if raw.truncated {
            frames.push(crate::Frame {
                function: "… (outer frames beyond the copied 64 KiB)".into(),
                file: None,
                line: None,
                user_code: false,
            });
        }
        monitor.set_live_stack(raw.worker, raw.seq, frames);
        record_costs(monitor, sampler, &raw, round_trip, symbolize);
        if named.send((raw.worker, raw.seq)).is_err() {
            return;
        }
    }
}

/// Adds one capture's costs to the monitor's figures.
fn record_costs(
    monitor: &Monitor,
    sampler: &Sampler,
    raw: &RawStack,
    round_trip: Duration,
    symbolize: Duration,
) {
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let cached = sampler.cached_addresses();
    monitor.with_capture_stats(|stats| {
        stats.signal = sampler.signal();
        stats.buffer_bytes_per_worker = sampler.buffer_bytes_per_worker();
        let total = stats.handler_ns_mean * stats.captures + raw.handler_ns;
        stats.captures += 1;
        stats.handler_ns_mean = total / stats.captures;
        stats.handler_ns_max = stats.handler_ns_max.max(raw.handler_ns);
        stats.round_trip_us_last = micros(round_trip);
        if stats.captures == 1 {
            stats.symbolize_us_first = micros(symbolize);
        }
        stats.symbolize_us_last = micros(symbolize);
        stats.symbolize_us_max = stats.symbolize_us_max.max(micros(symbolize));
        stats.cached_addresses = cached;
    });
}
