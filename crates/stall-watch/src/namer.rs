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
//! information by compilation unit ([`Sampler::prepare`]); then, between
//! namings, it indexes each function's and line sequence's addresses
//! ([`Sampler::index_step`]), after which naming new code reads only the
//! entries of the functions on the stack.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
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
    /// The stall's first capture (not a recapture of a long one).
    pub(crate) first: bool,
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
    // Between namings, build the function and line index a few units at a
    // time; a capture waits at most one step.
    let mut indexing = Some(Duration::ZERO);
    loop {
        let job = match indexing {
            Some(spent) => match jobs.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Empty) => {
                    let step = Instant::now();
                    let more = sampler.index_step();
                    let spent = spent + step.elapsed();
                    indexing = more.then_some(spent);
                    if !more {
                        let bytes = sampler.index_bytes();
                        monitor.with_capture_stats(|stats| {
                            stats.index_ms = crate::ms(spent);
                            stats.index_bytes = bytes;
                        });
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
            },
            None => match jobs.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let Job {
            raw,
            round_trip,
            first,
        } = job;
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
        // How long after the poll crossed the threshold its stack was there
        // to see, if it is still going on.
        let ready = monitor
            .current_poll(raw.worker)
            .filter(|&(seq, _, _)| first && seq == raw.seq)
            .map(|(_, started, _)| {
                let crossed = started.saturating_add(monitor.threshold_ns);
                Duration::from_nanos(monitor.now_ns().saturating_sub(crossed))
            });
        record_costs(monitor, sampler, &raw, round_trip, symbolize, ready);
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
    ready: Option<Duration>,
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
        if let Some(ready) = ready {
            stats.stack_ready_ms_last = crate::ms(ready);
            stats.stack_ready_ms_max = stats.stack_ready_ms_max.max(crate::ms(ready));
        }
    });
}
