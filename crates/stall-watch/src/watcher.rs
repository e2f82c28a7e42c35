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
//!
//! Captured stacks are named on the namer thread ([`crate::namer`]), so a
//! tick never waits for debug information. A stall that ends while its
//! stack is being named is measured at once and filed when the namer is
//! done with it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use crate::cpu;
use crate::hooks::LongPoll;
use crate::monitor::{Monitor, StallRecord};
use crate::namer::{Job, Named};
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

/// Starts the watcher thread, and the namer thread if there is a
/// `sampler`. They run until `long_polls`' senders are all dropped (the
/// [`crate::Watch`] and every runtime it was installed on are gone).
pub(crate) fn spawn(
    monitor: Arc<Monitor>,
    long_polls: Receiver<LongPoll>,
    sampler: Option<Arc<Sampler>>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let namer = match &sampler {
        Some(sampler) => {
            let (jobs, job_receiver) = std::sync::mpsc::channel();
            let (named_sender, named) = std::sync::mpsc::channel();
            crate::namer::spawn(monitor.clone(), sampler.clone(), job_receiver, named_sender)?;
            Some((jobs, named))
        }
        None => None,
    };
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            let mut watcher = Watcher {
                monitor: &monitor,
                sampler: sampler.as_deref(),
                namer,
                watched: vec![Watched::default(); monitor.slots.len()],
                naming: HashMap::new(),
                pending: Vec::new(),
            };
            watcher.run(&long_polls);
        })
}

/// The watcher thread's state.
struct Watcher<'a> {
    monitor: &'a Monitor,
    sampler: Option<&'a Sampler>,
    /// Captures go to the namer; (worker, seq) come back once named.
    namer: Option<(Sender<Job>, Receiver<Named>)>,
    watched: Vec<Watched>,
    /// Captures at the namer, by (worker, poll sequence).
    naming: HashMap<(usize, u64), u32>,
    /// Stalls over whose stack is still being named.
    pending: Vec<Finished>,
}

/// A stall measured as it ended, to be filed with its stack.
struct Finished {
    record: StallRecord,
    seq: u64,
    span: Option<tracing::Span>,
}

impl Watcher<'_> {
    fn run(&mut self, long_polls: &Receiver<LongPoll>) {
        loop {
            match long_polls.recv_timeout(TICK) {
                Ok(long_poll) => {
                    self.finish(long_poll);
                    // Drain whatever else is queued before the next tick.
                    while let Ok(more) = long_polls.try_recv() {
                        self.finish(more);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.collect_named();
            self.tick();
            self.monitor.culprits.purge();
        }
        // Nothing more will be named once the namer's queue is closed.
        self.namer = None;
        self.naming.clear();
        for finished in std::mem::take(&mut self.pending) {
            file(self.monitor, finished);
        }
    }

    /// Takes the namer's answers, and files the stalls that waited for them.
    fn collect_named(&mut self) {
        let Some((_, named)) = &self.namer else {
            return;
        };
        loop {
            match named.try_recv() {
                Ok(key) => {
                    if let Some(left) = self.naming.get_mut(&key) {
                        *left -= 1;
                        if *left == 0 {
                            self.naming.remove(&key);
                        }
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // The namer is gone: file without waiting.
                    self.namer = None;
                    self.naming.clear();
                    break;
                }
            }
        }
        let naming = &self.naming;
        let (ready, waiting) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|f| !naming.contains_key(&(f.record.worker, f.seq)));
        self.pending = waiting;
        for finished in ready {
            file(self.monitor, finished);
        }
    }

    fn tick(&mut self) {
        tick(
            self.monitor,
            &mut self.watched,
            self.sampler,
            self.namer.as_ref().map(|(jobs, _)| jobs),
            &mut self.naming,
        );
    }

    fn finish(&mut self, long_poll: LongPoll) {
        let finished = measure(self.monitor, &mut self.watched, long_poll);
        if self
            .naming
            .contains_key(&(finished.record.worker, finished.seq))
        {
            self.pending.push(finished);
        } else {
            file(self.monitor, finished);
        }
    }
}

fn tick(
    monitor: &Monitor,
    watched: &mut [Watched],
    sampler: Option<&Sampler>,
    jobs: Option<&Sender<Job>>,
    naming: &mut HashMap<(usize, u64), u32>,
) {
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
                w.span = Some(crate::span::open(
                    worker,
                    task,
                    culprit.as_deref(),
                    monitor.link_stall_span.as_ref(),
                ));
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
            if let (Some(sampler), Some(jobs)) = (sampler, jobs)
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
                        let first = w.captures == 1;
                        if jobs
                            .send(Job {
                                raw,
                                round_trip,
                                first,
                            })
                            .is_ok()
                        {
                            *naming.entry((worker, seq)).or_default() += 1;
                        }
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

/// Measures a long poll the hook reported, as it arrives: its CPU time
/// comes from the samples around it, which later ticks replace.
fn measure(monitor: &Monitor, watched: &mut [Watched], long_poll: LongPoll) -> Finished {
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
    // while the next poll began and ended. Without it, a sleep right after a
    // busy loop on the same worker would be measured from a sample before
    // the busy loop, and called on-CPU.
    if let (Some(w), Some(after)) = (watched.get_mut(long_poll.worker), long_poll.clock_end) {
        w.note_poll_end(long_poll.ended_ns, after);
    }
    let on_cpu_ns = used.map(|u| u.on_cpu_ns);
    // The span the tick opened; a stall over before any tick saw it gets
    // one when filed.
    let span = match watched.get_mut(long_poll.worker) {
        Some(w) if w.announced == Some(long_poll.seq) => w.span.take(),
        _ => None,
    };
    Finished {
        record: StallRecord {
            id: 0,
            worker: long_poll.worker,
            started_at_ms: monitor.unix_ms(long_poll.started_ns),
            duration_ms: crate::ms(Duration::from_nanos(duration_ns)),
            on_cpu_ms: on_cpu_ns.map(|ns| crate::ms(Duration::from_nanos(ns.min(duration_ns)))),
            cpu: cpu::classify(used, window_ns),
            culprit: long_poll.culprit.as_deref().cloned(),
            task_id: long_poll.task,
            jaeger_url: None,
            stack: Vec::new(),
        },
        seq: long_poll.seq,
        span,
    }
}

/// Files a measured stall with its last stack, logs it and closes its span.
fn file(monitor: &Monitor, finished: Finished) {
    let Finished {
        mut record,
        seq,
        span,
    } = finished;
    record.stack = monitor.take_live_stack(record.worker, seq);
    let record = monitor.file(record);
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
    let span = span.unwrap_or_else(|| {
        crate::span::open(
            record.worker,
            record.task_id,
            record.culprit.as_ref(),
            monitor.link_stall_span.as_ref(),
        )
    });
    crate::span::close(&span, &record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_over_while_its_stack_is_named_is_filed_with_the_stack() {
        let monitor = Monitor::new(&crate::Config::default());
        let (jobs, _job_receiver) = std::sync::mpsc::channel();
        let (named_sender, named) = std::sync::mpsc::channel();
        let mut watcher = Watcher {
            monitor: &monitor,
            sampler: None,
            namer: Some((jobs, named)),
            watched: vec![Watched::default(); monitor.slots.len()],
            naming: HashMap::from([((0, 5), 1)]),
            pending: Vec::new(),
        };
        let long_poll = |seq| LongPoll {
            worker: 0,
            seq,
            started_ns: 1_000_000,
            ended_ns: 301_000_000,
            task: 7,
            culprit: None,
            clock_end: None,
        };
        // Poll 5's capture is at the namer: its end waits. Poll 6 had none.
        watcher.finish(long_poll(5));
        watcher.finish(long_poll(6));
        assert_eq!(monitor.recent_stalls(10).len(), 1);
        assert_eq!(watcher.pending.len(), 1);
        watcher.collect_named();
        assert_eq!(monitor.recent_stalls(10).len(), 1, "nothing named yet");

        let frame = crate::Frame {
            function: "report".into(),
            file: Some("src/report.rs".into()),
            line: Some(42),
            user_code: true,
        };
        monitor.set_live_stack(0, 5, vec![frame.clone()]);
        named_sender.send((0, 5)).unwrap();
        watcher.collect_named();
        let filed = monitor.recent_stalls(10);
        assert_eq!(filed.len(), 2);
        let five = filed.iter().find(|r| r.stack == [frame.clone()]);
        assert!(five.is_some(), "{filed:?}");
        assert!(watcher.pending.is_empty() && watcher.naming.is_empty());
    }

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
