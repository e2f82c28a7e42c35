//! The watcher thread: turns the workers' slots into stalls, live.
//!
//! It is a plain OS thread, not a task: a task would need a worker to run on,
//! and the workers are exactly what may be stuck. Every [`TICK`] it
//!
//! 1. samples each worker's CPU clock (so a stall's on-CPU time can be taken
//!    from a sample made *before* the stall began);
//! 2. looks for polls older than the threshold, logs each new one at once
//!    ("stall in progress: worker 1 held by GET /block/sleep …"), opens its
//!    `executor.stall` span and captures the held worker's stack (again every
//!    [`RECAPTURE_EVERY`], at most [`MAX_CAPTURES`] times);
//! 3. files the long polls the after-poll hook reported as [`StallRecord`]s,
//!    with their last stack, and closes their spans.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::cpu;
use crate::hooks::LongPoll;
use crate::monitor::{Monitor, StallRecord};
use crate::span::TARGET;
use crate::stack::{Sampler, StackError};

/// How often the watcher looks. Detection latency is at most this past the
/// threshold; the cost is a few atomic loads and one small /proc read per
/// worker per tick.
pub(crate) const TICK: Duration = Duration::from_millis(5);

/// Name of the watcher's OS thread.
pub(crate) const THREAD_NAME: &str = "stall-watcher";

/// While a stall lasts, its stack is captured again this often, so a stall
/// that moves shows where it went.
pub(crate) const RECAPTURE_EVERY: Duration = Duration::from_secs(1);

/// At most this many captures per stall.
pub(crate) const MAX_CAPTURES: u32 = 4;

/// At most this many capture attempts per stall: a worker that was not
/// scheduled in time is tried again at the next tick, within reason (each
/// attempt queues a signal).
const MAX_ATTEMPTS: u32 = 12;

/// How long the watcher waits for the held worker's signal handler. The
/// round trip is microseconds on an idle machine; on a loaded one it is
/// waiting for the worker to be scheduled.
const CAPTURE_TIMEOUT: Duration = Duration::from_millis(20);

/// A clock sample of one worker: (monitor ns, its scheduler clocks).
type Sample = (u64, cpu::SchedClock);

/// Per-worker state private to the watcher thread.
#[derive(Debug, Default, Clone)]
struct Watched {
    /// The two most recent CPU samples, oldest first.
    samples: [Option<Sample>; 2],
    /// Poll sequence number of the stall already announced on this worker.
    announced: Option<u64>,
    /// Its `executor.stall` span, open until the stall ends.
    span: Option<tracing::Span>,
    /// Stack captures taken of it so far, attempts made, and when the last
    /// capture was taken.
    captures: u32,
    attempts: u32,
    last_capture: Option<Instant>,
}

impl Watched {
    /// The newest sample taken at or before `ns`; failing that (the watcher
    /// was starved of CPU and sampled only once the stall had begun), the
    /// oldest one after it: a shorter window, but the same thread doing the
    /// same thing.
    fn sample_for(&self, ns: u64) -> Option<Sample> {
        let mut samples = self.samples.iter().flatten().copied();
        samples
            .clone()
            .rev()
            .find(|(at, _)| *at <= ns)
            .or_else(|| samples.find(|(at, _)| *at > ns))
    }

    fn push(&mut self, sample: Sample) {
        self.samples = [self.samples[1], Some(sample)];
    }

    /// Keeps the clock read at the end of a long poll as a sample, unless
    /// a newer one was taken since.
    fn note_poll_end(&mut self, ended_ns: u64, clock: cpu::SchedClock) {
        if self.samples[1].is_none_or(|(at, _)| at < ended_ns) {
            self.push((ended_ns, clock));
        }
    }
}

/// Starts the watcher thread. It runs until `long_polls`' senders are all
/// dropped (the [`crate::Watch`] and every runtime it was installed on are
/// gone).
pub(crate) fn spawn(
    monitor: Arc<Monitor>,
    long_polls: Receiver<LongPoll>,
    sampler: Option<Arc<Sampler>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || run(&monitor, &long_polls, sampler.as_deref()))
}

fn run(monitor: &Monitor, long_polls: &Receiver<LongPoll>, sampler: Option<&Sampler>) {
    let mut watched = vec![Watched::default(); monitor.slots.len()];
    loop {
        match long_polls.recv_timeout(TICK) {
            Ok(long_poll) => {
                finish(monitor, &mut watched, long_poll);
                // Drain whatever else is queued before the next tick.
                while let Ok(more) = long_polls.try_recv() {
                    finish(monitor, &mut watched, more);
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
        tick(monitor, &mut watched, sampler);
        monitor.culprits.purge();
    }
}

fn tick(monitor: &Monitor, watched: &mut [Watched], sampler: Option<&Sampler>) {
    let now = monitor.now_ns();
    let workers = monitor.workers();
    for (worker, w) in watched.iter_mut().enumerate().take(workers) {
        let slot = &monitor.slots[worker];
        let current = monitor.current_poll(worker);
        let tid = slot.tid.load(Ordering::Acquire);
        if tid != 0 && w.samples[1].is_none() {
            // Seed with the hook's sample from the worker's first poll, so
            // that even a stall in that very first poll has a "before".
            w.push((
                slot.first_clock_at.load(Ordering::Relaxed),
                cpu::SchedClock {
                    on_cpu_ns: slot.first_on_cpu.load(Ordering::Relaxed),
                    waiting_ns: slot.first_waiting.load(Ordering::Relaxed),
                },
            ));
        }
        // Sample the clocks, except while a poll that began before the
        // newest sample is still running: that sample is the "before" of a
        // possible stall and must not be pushed out.
        let newest = w.samples[1].map_or(0, |(at, _)| at);
        let spans_newest = current.is_some_and(|(_, started, _)| started < newest);
        if !spans_newest
            && tid != 0
            && let Some(clock) = cpu::thread_clock(tid)
        {
            w.push((now, clock));
        }

        // Announce a stall the moment it crosses the threshold, then take
        // its stack (again every RECAPTURE_EVERY while it lasts).
        if let Some((seq, started, task)) = current {
            let elapsed = Duration::from_nanos(now.saturating_sub(started));
            if elapsed < monitor.threshold {
                continue;
            }
            if w.announced != Some(seq) {
                w.announced = Some(seq);
                w.captures = 0;
                w.attempts = 0;
                w.last_capture = None;
                monitor.wake_an_idle_worker();
                let culprit = monitor.culprits.get(task);
                w.span = Some(crate::span::open(worker, task, culprit.as_deref()));
                match culprit.as_deref() {
                    Some(c) => tracing::warn!(
                        target: TARGET,
                        worker,
                        route = &*c.route,
                        trace_id = c.trace_id.as_deref().unwrap_or("-"),
                        "stall in progress: worker {worker} held by {} for {} ms and counting",
                        c.route,
                        elapsed.as_millis()
                    ),
                    None => tracing::warn!(
                        target: TARGET,
                        worker,
                        "stall in progress: worker {worker} held by unnamed task {task} for {} ms and counting",
                        elapsed.as_millis()
                    ),
                }
            }
            if let Some(sampler) = sampler
                && w.captures < MAX_CAPTURES
                && w.attempts < MAX_ATTEMPTS
                && w.last_capture
                    .is_none_or(|at| at.elapsed() >= RECAPTURE_EVERY)
            {
                w.attempts += 1;
                // Captured during poll `seq` or not at all: a capture that
                // lands after that poll ended is discarded by the sampler.
                let sent = Instant::now();
                match sampler.capture(worker, seq, CAPTURE_TIMEOUT) {
                    Ok(raw) => {
                        let round_trip = sent.elapsed();
                        w.captures += 1;
                        w.last_capture = Some(Instant::now());
                        debug_assert_eq!((raw.worker, raw.seq), (worker, seq));
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
                        monitor.set_live_stack(worker, seq, frames);
                        record_costs(monitor, sampler, &raw, round_trip, symbolize);
                    }
                    // The stall is over; the hook has reported it.
                    Err(StackError::WrongPoll { .. }) => w.attempts = MAX_ATTEMPTS,
                    // Not scheduled in time, or busy: the next tick tries again.
                    Err(_) => {}
                }
            }
        }
    }
}

/// Adds one capture's costs to the monitor's figures.
fn record_costs(
    monitor: &Monitor,
    sampler: &Sampler,
    raw: &crate::stack::RawStack,
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
        stats.cached_addresses = cached;
    });
}

fn finish(monitor: &Monitor, watched: &mut [Watched], long_poll: LongPoll) {
    let duration_ns = long_poll.ended_ns.saturating_sub(long_poll.started_ns);
    // CPU used between the last sample before the stall and its end. The
    // sample may precede the stall by up to one tick, which biases short
    // stalls slightly towards on-CPU; the classification's 30 %/70 % bands
    // absorb that.
    let (used, window_ns) = match (
        watched
            .get(long_poll.worker)
            .and_then(|w| w.sample_for(long_poll.started_ns)),
        long_poll.clock_end,
    ) {
        (Some((at, before)), Some(after)) => (
            Some(after.since(before)),
            long_poll.ended_ns.saturating_sub(at),
        ),
        _ => (None, duration_ns),
    };
    // The hook read this worker's clock as the poll ended: a sample like the
    // watcher's own, and the only one there is when the watcher was busy
    // (naming a stack) while the next poll began and ended. Without it, a
    // sleep right after a busy loop on the same worker would be measured
    // from a sample before the busy loop, and called on-CPU.
    if let (Some(w), Some(after)) = (watched.get_mut(long_poll.worker), long_poll.clock_end) {
        w.note_poll_end(long_poll.ended_ns, after);
    }
    let on_cpu_ns = used.map(|u| u.on_cpu_ns);
    let record = monitor.file(StallRecord {
        id: 0,
        worker: long_poll.worker,
        started_at_ms: monitor.unix_ms(long_poll.started_ns),
        duration_ms: crate::ms(Duration::from_nanos(duration_ns)),
        on_cpu_ms: on_cpu_ns.map(|ns| crate::ms(Duration::from_nanos(ns.min(duration_ns)))),
        cpu: cpu::classify(used, window_ns),
        culprit: long_poll.culprit.as_deref().cloned(),
        task_id: long_poll.task,
        jaeger_url: None,
        stack: monitor.take_live_stack(long_poll.worker, long_poll.seq),
    });
    let culprit = record
        .culprit
        .as_ref()
        .map_or("an unnamed task", |c| &*c.route);
    let place = crate::stack::where_held(&record.stack)
        .map(|at| format!(" {at}"))
        .unwrap_or_default();
    tracing::warn!(
        target: TARGET,
        worker = record.worker,
        duration_ms = record.duration_ms,
        cpu = record.cpu,
        "stall over: worker {} was held for {:.0} ms ({}) by {culprit}{place}",
        record.worker,
        record.duration_ms,
        record.cpu,
    );
    // The span the tick opened, or (a stall over before any tick saw it)
    // one opened now.
    let span = match watched.get_mut(long_poll.worker) {
        Some(w) if w.announced == Some(long_poll.seq) && w.span.is_some() => w.span.take(),
        _ => None,
    }
    .unwrap_or_else(|| {
        crate::span::open(
            long_poll.worker,
            long_poll.task,
            long_poll.culprit.as_deref(),
        )
    });
    crate::span::close(&span, &record);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(on_cpu_ms: u64) -> cpu::SchedClock {
        cpu::SchedClock {
            on_cpu_ns: on_cpu_ms * 1_000_000,
            waiting_ns: 0,
        }
    }

    #[test]
    fn a_long_polls_end_is_the_next_polls_before() {
        // Sampled at 0 ms; then a 200 ms busy loop ended at 300 ms while the
        // watcher was busy, and a sleep began at 310 ms.
        let mut w = Watched::default();
        w.push((0, clock(0)));
        w.note_poll_end(300_000_000, clock(200));
        let (at, before) = w.sample_for(310_000_000).unwrap();
        assert_eq!(at, 300_000_000);
        assert_eq!(before.on_cpu_ns, 200_000_000);
        // A sample the watcher took after that poll ended stays the newest.
        w.push((400_000_000, clock(201)));
        w.note_poll_end(350_000_000, clock(200));
        assert_eq!(w.samples[1].map(|(at, _)| at), Some(400_000_000));
    }
}
