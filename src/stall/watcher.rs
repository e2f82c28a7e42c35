//! The watcher thread: turns the workers' slots into stalls, live.
//!
//! It is a plain OS thread, not a task: a task would need a worker to run on,
//! and the workers are exactly what may be stuck. Every [`TICK`] it
//!
//! 1. samples each worker's CPU clock (so a stall's on-CPU time can be taken
//!    from a sample made *before* the stall began);
//! 2. looks for polls older than the threshold and logs each new one at once
//!    ("worker 1 stalled by GET /block/sleep …") — the stall is visible at
//!    `/debug/stalls` even sooner, since that reads the slots directly;
//! 3. files the long polls the after-poll hook reported as [`StallRecord`]s,
//!    and exports an `executor.stall` span for each, linked to the culprit's
//!    request span.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Link, Span as _, SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState, Tracer as _,
};
use opentelemetry::{KeyValue, global};

use super::hooks::LongPoll;
use super::{Monitor, StallRecord, cpu};

/// How often the watcher looks. Detection latency is at most this past the
/// threshold; the cost is a few atomic loads and one small /proc read per
/// worker per tick.
pub const TICK: Duration = Duration::from_millis(5);

/// Name of the watcher's OS thread.
pub const THREAD_NAME: &str = "stall-watcher";

/// A clock sample of one worker: (monitor ns, its scheduler clocks).
type Sample = (u64, cpu::SchedClock);

/// Per-worker state private to the watcher thread.
#[derive(Debug, Default, Clone)]
struct Watched {
    /// The two most recent CPU samples, oldest first.
    samples: [Option<Sample>; 2],
    /// Poll sequence number of the stall already announced on this worker.
    announced: Option<u64>,
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
}

/// Starts the watcher thread. It runs until `long_polls`' senders are all
/// dropped (that is, until the application runtime is gone).
pub fn spawn(
    monitor: Arc<Monitor>,
    long_polls: Receiver<LongPoll>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || run(&monitor, &long_polls))
}

fn run(monitor: &Monitor, long_polls: &Receiver<LongPoll>) {
    let mut watched = vec![Watched::default(); monitor.workers()];
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
        tick(monitor, &mut watched);
    }
}

fn tick(monitor: &Monitor, watched: &mut [Watched]) {
    let now = monitor.now_ns();
    for (worker, w) in watched.iter_mut().enumerate() {
        let slot = &monitor.slots[worker];
        let current = monitor.current_poll(worker);
        let tid = slot.tid.load(std::sync::atomic::Ordering::Acquire);
        if tid != 0 && w.samples[1].is_none() {
            // Seed with the hook's sample from the worker's first poll, so
            // that even a stall in that very first poll has a "before".
            w.push((
                slot.first_clock_at
                    .load(std::sync::atomic::Ordering::Relaxed),
                cpu::SchedClock {
                    on_cpu_ns: slot.first_on_cpu.load(std::sync::atomic::Ordering::Relaxed),
                    waiting_ns: slot
                        .first_waiting
                        .load(std::sync::atomic::Ordering::Relaxed),
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

        // Announce a stall the moment it crosses the threshold.
        if let Some((seq, started, task)) = current {
            let elapsed = Duration::from_nanos(now.saturating_sub(started));
            if elapsed >= monitor.threshold && w.announced != Some(seq) {
                w.announced = Some(seq);
                monitor.wake_an_idle_worker();
                let culprit = monitor.culprits.get(task);
                match culprit.as_deref() {
                    Some(c) => tracing::warn!(
                        worker,
                        route = %c.route,
                        trace_id = c.trace_id.as_deref().unwrap_or("-"),
                        "stall in progress: worker {worker} held by {} for {} ms and counting",
                        c.route,
                        elapsed.as_millis()
                    ),
                    None => tracing::warn!(
                        worker,
                        "stall in progress: worker {worker} held by unnamed task {task} for {} ms and counting",
                        elapsed.as_millis()
                    ),
                }
            }
        }
    }
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
    let on_cpu_ns = used.map(|u| u.on_cpu_ns);
    let record = monitor.file(StallRecord {
        id: 0,
        worker: long_poll.worker,
        started_at_ms: monitor.unix_ms(long_poll.started_ns),
        duration_ms: crate::measure::ms(Duration::from_nanos(duration_ns)),
        on_cpu_ms: on_cpu_ns
            .map(|ns| crate::measure::ms(Duration::from_nanos(ns.min(duration_ns)))),
        cpu: cpu::classify(used, window_ns),
        culprit: long_poll.culprit.as_deref().cloned(),
        task_id: long_poll.task,
        jaeger_url: None,
    });
    tracing::warn!(
        worker = record.worker,
        duration_ms = record.duration_ms,
        cpu = record.cpu,
        "stall over: worker {} was held for {:.0} ms ({}) by {}",
        record.worker,
        record.duration_ms,
        record.cpu,
        record
            .culprit
            .as_ref()
            .map_or("an unnamed task", |c| &*c.route)
    );
    export_span(monitor, &record, &long_poll);
}

/// Exports an `executor.stall` span with the stall's exact start and end,
/// linked to the culprit's request span. Built with the OpenTelemetry API
/// directly (not a `tracing` span) because the watcher learns of the stall
/// only when it is over, and a span must carry its real start time.
fn export_span(monitor: &Monitor, record: &StallRecord, long_poll: &LongPoll) {
    let tracer = global::tracer(crate::telemetry::SERVICE_NAME);
    let start = UNIX_EPOCH + Duration::from_nanos(monitor.epoch_unix_ns + long_poll.started_ns);
    let end = UNIX_EPOCH + Duration::from_nanos(monitor.epoch_unix_ns + long_poll.ended_ns);
    let mut attributes = vec![
        KeyValue::new("worker", record.worker as i64),
        KeyValue::new("duration_ms", record.duration_ms),
        KeyValue::new("cpu", record.cpu),
        KeyValue::new("task.id", record.task_id as i64),
    ];
    if let Some(on_cpu) = record.on_cpu_ms {
        attributes.push(KeyValue::new("on_cpu_ms", on_cpu));
    }
    let mut links = Vec::new();
    if let Some(c) = &record.culprit {
        attributes.push(KeyValue::new("culprit.route", c.route.clone()));
        attributes.push(KeyValue::new("culprit.task", c.task.clone()));
        if let (Some(trace), Some(span)) = (&c.trace_id, &c.span_id) {
            attributes.push(KeyValue::new("culprit.trace_id", trace.clone()));
            if let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(trace), SpanId::from_hex(span))
            {
                let context = SpanContext::new(
                    trace_id,
                    span_id,
                    TraceFlags::SAMPLED,
                    true,
                    TraceState::default(),
                );
                links.push(Link::with_context(context));
            }
        }
    }
    let mut span = tracer
        .span_builder("executor.stall")
        .with_kind(SpanKind::Internal)
        .with_start_time(start)
        .with_attributes(attributes)
        .with_links(links)
        .start(&tracer);
    span.end_with_timestamp(end.max(start).min(SystemTime::now().max(end)));
}
