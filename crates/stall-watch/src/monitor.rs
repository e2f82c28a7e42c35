//! The state the hooks, the watcher and the views share: per-worker slots,
//! the culprit registry and the history of finished stalls.
//!
//! The poll hooks write each worker's [`WorkerSlot`] with a few atomic stores;
//! everyone else only reads them. Nothing here runs on the watched runtime's
//! workers except [`Monitor::note_long_poll`], called by the after-poll hook
//! once a poll has turned out long.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::culprit::{Culprit, Culprits};

/// What one worker is doing right now, written by the poll hooks on that
/// worker and read by everyone else. Plain atomics: the hooks run on every
/// poll of every task and must cost next to nothing. Aligned to 128 bytes
/// (two cache lines, the unit x86's adjacent-line prefetcher pulls) so
/// that two workers' hooks never write to one line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct WorkerSlot {
    /// Start of the poll in progress, in raw ticks of the monitor's clock,
    /// plus one; 0 means "not polling".
    pub(crate) poll_started: AtomicU64,
    /// Incremented at every poll start: tells two polls apart even if they
    /// started at the same nanosecond.
    pub(crate) poll_seq: AtomicU64,
    /// The task being polled.
    pub(crate) task: AtomicU64,
    /// The OS thread id of this worker (for its CPU clock in /proc), 0 until
    /// its first poll.
    pub(crate) tid: AtomicU64,
    /// The thread's scheduler clocks when its id was recorded, and when:
    /// the watcher's first "before" sample, should the worker's very first
    /// task be a stall.
    pub(crate) first_clock_at: AtomicU64,
    pub(crate) first_on_cpu: AtomicU64,
    pub(crate) first_waiting: AtomicU64,
    /// The last finished poll of at least the threshold: start and end, in
    /// nanoseconds since the epoch, plus one (0: none yet). Written by the
    /// after-poll hook before the worker polls anything else, so a request
    /// stuck behind that poll sees it when it finally runs, even before
    /// the watcher thread has filed the stall.
    last_long_poll_started: AtomicU64,
    last_long_poll_ended: AtomicU64,
}

/// The state of one worker, now.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    /// The worker's index (`tokio::runtime::worker_index`).
    pub index: usize,
    /// `idle`, `polling` (a poll shorter than the threshold so far) or
    /// `stalled`.
    pub state: &'static str,
    /// How long the poll in progress has lasted, if any.
    pub poll_elapsed_ms: Option<f64>,
    /// Who is being polled, when it is a named task.
    pub current: Option<Culprit>,
}

/// A stall in progress.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveStall {
    /// The held worker.
    pub worker: usize,
    /// When the poll began, Unix milliseconds.
    pub started_at_ms: u64,
    /// How long it has lasted so far.
    pub elapsed_ms: f64,
    /// Who holds the worker, when the task was named.
    pub culprit: Option<Culprit>,
    /// The tokio task id of the poll.
    pub task_id: u64,
    /// The held worker's stack, captured during this very poll (empty until
    /// the first capture arrives, or when stacks are off or unsupported).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<crate::Frame>,
}

/// A finished stall.
#[derive(Debug, Clone, Serialize)]
pub struct StallRecord {
    /// Sequence number since the watcher started, from 1.
    pub id: u64,
    /// The worker that was held.
    pub worker: usize,
    /// When the poll began, Unix milliseconds.
    pub started_at_ms: u64,
    /// How long the poll held the worker, exactly (from the poll hooks).
    pub duration_ms: f64,
    /// CPU time the worker thread used during the stall, as sampled from
    /// the kernel's per-thread clocks.
    pub on_cpu_ms: Option<f64>,
    /// `on-cpu` (computing), `off-cpu` (sleeping or waiting in a blocking
    /// call), `preempted` (ready but denied a CPU by the OS: an overloaded
    /// machine), `mixed`, or `unknown` where the clocks are unavailable.
    pub cpu: &'static str,
    /// Who held the worker, when the task was named.
    pub culprit: Option<Culprit>,
    /// The tokio task id of the poll.
    pub task_id: u64,
    /// Link to the culprit's trace, when it has one and a trace URL is set.
    pub jaeger_url: Option<String>,
    /// The held worker's stack, captured while it was held: the last
    /// capture of the stall (empty when none was taken).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stack: Vec<crate::Frame>,
}

/// Stalls in progress and recent ones: the `/debug/stalls` document.
#[derive(Debug, Clone, Serialize)]
pub struct Stalls {
    /// The threshold a poll must cross to be a stall.
    pub threshold_ms: f64,
    /// Stalls in progress, read straight from the workers' slots.
    pub in_progress: Vec<ActiveStall>,
    /// The most recent finished stalls, newest first.
    pub recent: Vec<StallRecord>,
    /// Finished stalls since the watcher started.
    pub total: u64,
    /// Whether the watcher wakes an idle worker as a stall begins.
    pub wake_idle_worker: bool,
    /// `"on"`, `"off"` or `"unsupported"` (stack capture needs Linux on
    /// x86_64 or aarch64).
    pub stacks: &'static str,
    /// What stack capture has cost so far (`None` unless stacks are on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack_capture: Option<CaptureStats>,
}

/// What capturing stacks has cost so far.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaptureStats {
    /// The signal the capture handler is installed on.
    pub signal: i32,
    /// Memory set aside per worker: the stack copy and the registers.
    pub buffer_bytes_per_worker: usize,
    /// Captures taken (and attached to their stall).
    pub captures: u64,
    /// Time spent in the signal handler on the held worker: mean and max.
    pub handler_ns_mean: u64,
    /// The longest time in the handler.
    pub handler_ns_max: u64,
    /// Round trip of a capture as the watcher sees it (signal sent to copy
    /// ready), the last one.
    pub round_trip_us_last: u64,
    /// Reading the unwind tables and indexing the debug information by
    /// compilation unit, once, as the namer thread started.
    pub prepare_ms: f64,
    /// Compilation units indexed then.
    pub indexed_units: usize,
    /// CPU time spent, between namings, indexing each function's and line
    /// sequence's addresses (0 until complete).
    pub index_ms: f64,
    /// Memory that index holds.
    pub index_bytes: usize,
    /// Unwinding and naming the frames of the first capture, on the namer
    /// thread: units of code not seen before are parsed then.
    pub symbolize_us_first: u64,
    /// The same for the last capture (cached addresses make it cheap).
    pub symbolize_us_last: u64,
    /// The longest naming so far.
    pub symbolize_us_max: u64,
    /// Return addresses whose frames are cached.
    pub cached_addresses: usize,
    /// From a poll crossing the threshold to its stack, named, in
    /// `/debug/stalls`: the watcher's tick, the capture and the naming. The
    /// last stall's, and the longest.
    pub stack_ready_ms_last: f64,
    /// The longest of those.
    pub stack_ready_ms_max: f64,
}

/// Task name of the empty task that wakes an idle worker at a stall.
pub const WAKE_TASK_NAME: &str = "stall watcher: wake an idle worker";

/// Everything the hooks, the watcher and the views share.
#[derive(Debug)]
pub(crate) struct Monitor {
    epoch: Instant,
    /// The hooks' clock: the TSC where it is reliable (a third of the cost
    /// of `Instant::now`), else the OS clock. Slots keep its raw ticks,
    /// scaled to nanoseconds only off the hot path.
    pub(crate) clock: quanta::Clock,
    /// `clock`'s raw reading at `epoch`.
    epoch_raw: u64,
    /// The threshold in nanoseconds.
    pub(crate) threshold_ns: u64,
    /// The threshold in `clock`'s raw ticks, for the after-poll hook's
    /// comparison (no scaling per poll).
    pub(crate) threshold_raw: u64,
    pub(crate) epoch_unix_ns: u64,
    pub(crate) threshold: Duration,
    pub(crate) slots: Vec<WorkerSlot>,
    pub(crate) culprits: Culprits,
    history: Mutex<VecDeque<StallRecord>>,
    history_len: usize,
    total: AtomicU64,
    /// Base URL for trace links (`{url}/trace/{trace_id}`).
    trace_url: Option<String>,
    /// [`crate::Config::link_stall_span`].
    pub(crate) link_stall_span: Option<crate::config::StallSpanLink>,
    /// Whether the watcher wakes an idle worker at each stall.
    wake_idle_worker: bool,
    /// The watched runtime, learnt by the poll hooks on a worker's first
    /// poll: its metrics for the views, and where to spawn the wake-up task.
    runtime: OnceLock<tokio::runtime::Handle>,
    /// Its worker count (0 until it is known), capped at the slots.
    workers: AtomicUsize,
    /// Identifies this monitor to the hooks' per-thread "already
    /// registered" mark.
    pub(crate) id: usize,
    /// `"on"`, `"off"` or `"unsupported"`, once the sampler has started.
    stacks: OnceLock<&'static str>,
    /// The latest stack captured on each held worker, with the poll sequence
    /// number it belongs to (set by the watcher during a stall).
    live_stacks: Mutex<HashMap<usize, (u64, Vec<crate::Frame>)>>,
    /// Capture costs, updated by the watcher.
    capture_stats: Mutex<Option<CaptureStats>>,
}

impl Monitor {
    pub(crate) fn new(config: &crate::Config) -> Monitor {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
        let epoch_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0));
        let clock = quanta::Clock::new();
        let epoch_raw = clock.raw();
        let threshold_ns = u64::try_from(config.threshold.as_nanos()).unwrap_or(u64::MAX);
        let threshold_raw = raw_ticks_for(&clock, threshold_ns);
        Monitor {
            epoch: Instant::now(),
            clock,
            epoch_raw,
            threshold_ns,
            threshold_raw,
            epoch_unix_ns,
            threshold: config.threshold,
            slots: (0..config.max_workers)
                .map(|_| WorkerSlot::default())
                .collect(),
            culprits: Culprits::default(),
            history: Mutex::new(VecDeque::with_capacity(config.history)),
            history_len: config.history,
            total: AtomicU64::new(0),
            trace_url: config.trace_url.clone(),
            link_stall_span: config.link_stall_span.clone(),
            wake_idle_worker: config.wake_idle_worker,
            runtime: OnceLock::new(),
            workers: AtomicUsize::new(0),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stacks: OnceLock::new(),
            live_stacks: Mutex::new(HashMap::new()),
            capture_stats: Mutex::new(None),
        }
    }

    /// The watched runtime, once one of its workers has polled a task.
    pub(crate) fn runtime(&self) -> Option<&tokio::runtime::Handle> {
        self.runtime.get()
    }

    pub(crate) fn set_runtime(&self, handle: tokio::runtime::Handle) {
        let workers = handle.metrics().num_workers();
        if self.runtime.set(handle).is_ok() {
            self.set_workers(workers);
        }
    }

    pub(crate) fn set_workers(&self, workers: usize) {
        self.workers
            .store(workers.min(self.slots.len()), Ordering::Release);
    }

    /// Workers of the watched runtime (0 until it has polled a task).
    pub(crate) fn workers(&self) -> usize {
        self.workers.load(Ordering::Acquire)
    }

    /// Whether the watcher wakes an idle worker at each stall, and can: only
    /// a multi_thread runtime has another worker to wake.
    pub(crate) fn wakes_idle_workers(&self) -> bool {
        self.wake_idle_worker
            && self
                .runtime
                .get()
                .is_some_and(|rt| rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread)
    }

    /// Spawns an empty task on the watched runtime from this (non-worker)
    /// thread, if asked to. A task arriving from outside goes to the
    /// runtime's shared queue and unparks a sleeping worker. That worker runs
    /// it, finds nothing else to do, and parks again, this time on the I/O
    /// driver, which the blocked worker let go of when it woke. From then on
    /// sockets are read and timers fire although one worker is held.
    pub(crate) fn wake_an_idle_worker(&self) {
        if self.wakes_idle_workers()
            && let Some(rt) = self.runtime.get()
        {
            let _ = tokio::task::Builder::new()
                .name(WAKE_TASK_NAME)
                .spawn_on(async {}, rt);
        }
    }

    /// Nanoseconds since the epoch, now.
    pub(crate) fn now_ns(&self) -> u64 {
        self.raw_to_ns(self.clock.raw())
    }

    /// Nanoseconds since the epoch of a raw clock reading.
    pub(crate) fn raw_to_ns(&self, raw: u64) -> u64 {
        self.clock.delta_as_nanos(self.epoch_raw, raw)
    }

    pub(crate) fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Unix milliseconds of a monitor timestamp.
    pub(crate) fn unix_ms(&self, ns: u64) -> u64 {
        (self.epoch_unix_ns + ns) / 1_000_000
    }

    /// The poll in progress on `worker`: (sequence, start ns, task id).
    pub(crate) fn current_poll(&self, worker: usize) -> Option<(u64, u64, u64)> {
        let slot = &self.slots[worker];
        // Read the sequence on both sides of the other fields: if it moved,
        // a new poll began meanwhile and the fields may be mixed; treat that
        // as "just started", which is never a stall.
        let seq = slot.poll_seq.load(Ordering::Acquire);
        let started = slot.poll_started.load(Ordering::Acquire);
        let task = slot.task.load(Ordering::Acquire);
        if started == 0 || slot.poll_seq.load(Ordering::Acquire) != seq {
            return None;
        }
        Some((seq, self.raw_to_ns(started - 1), task))
    }

    /// Notes on `worker`'s slot a finished poll of at least the threshold
    /// (the after-poll hook calls it, before that worker polls anything
    /// else).
    pub(crate) fn note_long_poll(&self, worker: usize, started_ns: u64, ended_ns: u64) {
        let Some(slot) = self.slots.get(worker) else {
            return;
        };
        slot.last_long_poll_ended
            .store(ended_ns + 1, Ordering::Relaxed);
        slot.last_long_poll_started
            .store(started_ns + 1, Ordering::Release);
    }

    /// [`Monitor::note_long_poll`] with instants, for tests elsewhere.
    #[cfg(test)]
    pub(crate) fn note_long_poll_at(&self, worker: usize, started: Instant, ended: Instant) {
        self.note_long_poll(worker, self.ns_at(started), self.ns_at(ended));
    }

    /// The workers held by a poll of at least the threshold at some moment
    /// between `from` and `to`: the one in progress, the last one that
    /// ended (noted by the hook, possibly not filed yet), or any filed stall.
    pub(crate) fn workers_held_between(&self, from: Instant, to: Instant) -> Vec<usize> {
        let (from, to) = (self.ns_at(from), self.ns_at(to));
        let overlaps = |started: u64, ended: u64| started < to && ended > from;
        let now = self.now_ns();
        let threshold = u64::try_from(self.threshold.as_nanos()).unwrap_or(u64::MAX);
        let mut held: Vec<bool> = (0..self.workers())
            .map(|worker| {
                let in_progress = self.current_poll(worker).is_some_and(|(_, started, _)| {
                    now.saturating_sub(started) >= threshold && overlaps(started, now)
                });
                let slot = &self.slots[worker];
                let started = slot.last_long_poll_started.load(Ordering::Acquire);
                let ended = slot.last_long_poll_ended.load(Ordering::Acquire);
                let last = started != 0 && overlaps(started - 1, ended.saturating_sub(1));
                in_progress || last
            })
            .collect();
        // The slot keeps only a worker's last long poll; the history has the
        // earlier ones (to the millisecond, which is plenty here).
        let history = self.history.lock().expect("history lock");
        for stall in history.iter() {
            let started = (stall.started_at_ms * 1_000_000).saturating_sub(self.epoch_unix_ns);
            let ended = started + (stall.duration_ms * 1e6) as u64;
            if overlaps(started, ended)
                && let Some(h) = held.get_mut(stall.worker)
            {
                *h = true;
            }
        }
        held.iter()
            .enumerate()
            .filter_map(|(worker, &h)| h.then_some(worker))
            .collect()
    }

    /// Every worker's state, now.
    pub(crate) fn worker_views(&self) -> Vec<WorkerView> {
        let now = self.now_ns();
        (0..self.workers())
            .map(|index| match self.current_poll(index) {
                None => WorkerView {
                    index,
                    state: "idle",
                    poll_elapsed_ms: None,
                    current: None,
                },
                Some((_, started, task)) => {
                    let elapsed = Duration::from_nanos(now.saturating_sub(started));
                    WorkerView {
                        index,
                        state: if elapsed >= self.threshold {
                            "stalled"
                        } else {
                            "polling"
                        },
                        poll_elapsed_ms: Some(crate::ms(elapsed)),
                        current: self.culprits.get(task).map(|c| (*c).clone()),
                    }
                }
            })
            .collect()
    }

    /// Stalls in progress, read straight from the slots: no watcher latency.
    pub(crate) fn active_stalls(&self) -> Vec<ActiveStall> {
        let now = self.now_ns();
        (0..self.workers())
            .filter_map(|worker| {
                let (seq, started, task) = self.current_poll(worker)?;
                let elapsed = Duration::from_nanos(now.saturating_sub(started));
                (elapsed >= self.threshold).then(|| ActiveStall {
                    worker,
                    started_at_ms: self.unix_ms(started),
                    elapsed_ms: crate::ms(elapsed),
                    culprit: self.culprits.get(task).map(|c| (*c).clone()),
                    task_id: task,
                    stack: self.live_stack(worker, seq),
                })
            })
            .collect()
    }

    /// The most recent finished stalls, newest first.
    pub(crate) fn recent_stalls(&self, limit: usize) -> Vec<StallRecord> {
        let history = self.history.lock().expect("history lock");
        history.iter().rev().take(limit).cloned().collect()
    }

    /// How many stalls have finished since start.
    pub(crate) fn total_stalls(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    pub(crate) fn file(&self, mut record: StallRecord) -> StallRecord {
        record.id = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        record.jaeger_url = record
            .culprit
            .as_ref()
            .and_then(|c| c.trace_id.as_ref())
            .zip(self.trace_url.as_ref())
            .map(|(trace, base)| format!("{base}/trace/{trace}"));
        let mut history = self.history.lock().expect("history lock");
        if history.len() == self.history_len {
            history.pop_front();
        }
        history.push_back(record.clone());
        record
    }

    pub(crate) fn set_stacks(&self, stacks: &'static str) {
        let _ = self.stacks.set(stacks);
    }

    /// Updates the capture costs (the namer, after each capture).
    pub(crate) fn with_capture_stats(&self, update: impl FnOnce(&mut CaptureStats)) {
        let mut stats = self.capture_stats.lock().expect("capture stats lock");
        update(stats.get_or_insert_with(CaptureStats::default));
    }

    /// Keeps `stack`, captured during poll `seq` on `worker`, as that
    /// stall's live stack.
    pub(crate) fn set_live_stack(&self, worker: usize, seq: u64, stack: Vec<crate::Frame>) {
        self.live_stacks
            .lock()
            .expect("live stacks lock")
            .insert(worker, (seq, stack));
    }

    /// Takes the live stack of poll `seq` on `worker`, once it has ended.
    pub(crate) fn take_live_stack(&self, worker: usize, seq: u64) -> Vec<crate::Frame> {
        let mut stacks = self.live_stacks.lock().expect("live stacks lock");
        match stacks.get(&worker) {
            Some((s, _)) if *s == seq => stacks.remove(&worker).map(|(_, f)| f).unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    fn live_stack(&self, worker: usize, seq: u64) -> Vec<crate::Frame> {
        match self
            .live_stacks
            .lock()
            .expect("live stacks lock")
            .get(&worker)
        {
            Some((s, frames)) if *s == seq => frames.clone(),
            _ => Vec::new(),
        }
    }

    /// Stalls in progress and the `recent` most recent finished ones.
    pub(crate) fn stalls(&self, recent: usize) -> Stalls {
        Stalls {
            threshold_ms: crate::ms(self.threshold),
            in_progress: self.active_stalls(),
            recent: self.recent_stalls(recent),
            total: self.total_stalls(),
            wake_idle_worker: self.wakes_idle_workers(),
            stacks: self.stacks.get().copied().unwrap_or("off"),
            stack_capture: self
                .capture_stats
                .lock()
                .expect("capture stats lock")
                .clone(),
        }
    }
}

/// The fewest raw ticks of `clock` that scale to at least `ns`
/// nanoseconds (`u64::MAX` if none do).
fn raw_ticks_for(clock: &quanta::Clock, ns: u64) -> u64 {
    let reaches = |ticks: u64| clock.delta_as_nanos(0, ticks) >= ns;
    // Double up to a bound that reaches, then halve the gap: ~64 scalings,
    // once per monitor. The cap keeps the scaling's arithmetic in range.
    let mut high = ns.max(1);
    while !reaches(high) {
        if high >= 1 << 62 {
            return u64::MAX;
        }
        high *= 2;
    }
    let mut low = 0;
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if reaches(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    high
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A monitor of two workers whose epoch is 50 ms in the past, and "now".
    fn monitor() -> (Arc<Monitor>, Instant) {
        let monitor = Monitor::new(
            &crate::Config::default()
                .threshold(Duration::from_millis(1))
                .history(8),
        );
        monitor.set_workers(2);
        std::thread::sleep(Duration::from_millis(50));
        (Arc::new(monitor), Instant::now())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_raw_threshold_is_the_first_tick_count_that_reaches_it() {
        let clock = quanta::Clock::new();
        for ns in [1, 999, 1_000_000, 20_000_000, 10_000_000_000] {
            let ticks = raw_ticks_for(&clock, ns);
            assert!(
                clock.delta_as_nanos(0, ticks) >= ns,
                "{ns} ns: {ticks} ticks"
            );
            assert!(
                clock.delta_as_nanos(0, ticks - 1) < ns,
                "{ns} ns: {ticks} ticks"
            );
        }
    }

    #[test]
    fn a_worker_is_held_by_a_long_poll_that_overlaps_the_interval() {
        let (monitor, now) = monitor();
        monitor.note_long_poll_at(1, now - ms(30), now - ms(5));
        assert_eq!(monitor.workers_held_between(now - ms(10), now), vec![1]);
        // Ended before the interval began: not held.
        assert!(monitor.workers_held_between(now - ms(4), now).is_empty());
    }

    #[test]
    fn an_earlier_stall_still_counts_once_the_slot_holds_a_later_one() {
        let (monitor, now) = monitor();
        // Worker 0 was held during the interval, and the watcher filed it…
        monitor.file(StallRecord {
            id: 0,
            worker: 0,
            started_at_ms: monitor.unix_ms(monitor.ns_at(now - ms(30))),
            duration_ms: 25.0,
            on_cpu_ms: None,
            cpu: "unknown",
            culprit: None,
            task_id: 1,
            jaeger_url: None,
            stack: Vec::new(),
        });
        // …but its slot now records a later long poll, after the interval.
        monitor.note_long_poll_at(0, now + ms(1), now + ms(3));
        assert_eq!(monitor.workers_held_between(now - ms(10), now), vec![0]);
    }
}
