//! The stall watcher: every poll that holds a worker longer than
//! `stall.threshold_ms`, named — worker, duration, culprit — while it happens.
//!
//! Why not the usual tools:
//! - a *heartbeat task* (sleep 10 ms, measure lateness) only notices when the
//!   whole runtime is stuck: with 1 of 2 workers blocked the other one runs
//!   the heartbeat on time and nothing is reported;
//! - tokio-console flags a task only after a 1 s first poll, and shows no
//!   workers;
//! - a tracing backend sees spans, not the executor.
//!
//! So stall-lab watches the *workers*. tokio's poll hooks (`tokio_unstable`)
//! run on the worker itself just before and after each task poll; they write
//! "worker N started polling task T at time S" into that worker's
//! [`WorkerSlot`] with a few atomic stores ([`hooks`]). A plain OS thread, the
//! [`watcher`], reads the slots every [`watcher::TICK`]: a slot whose poll
//! started more than the threshold ago is a stall *in progress*. When a long
//! poll ends, the after-poll hook sends its exact start, end and CPU time to
//! the watcher, which files a [`StallRecord`] in a bounded history.
//!
//! Who is to blame is looked up by task id in the [`Culprits`] registry,
//! where the request middleware registers every request task (route, trace
//! id). Nothing here runs on the application runtime's workers except the
//! two hooks, so the watcher keeps watching while every worker is blocked.

pub mod cpu;
pub mod hooks;
pub mod watcher;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Who a task is: what the stall watcher reports as the culprit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Culprit {
    /// `GET /block/sleep`: method and route template. Shared, not copied:
    /// a culprit is made for every request.
    pub route: Arc<str>,
    /// The task's name in tokio-console.
    pub task: Arc<str>,
    /// Hex trace id of the request, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Hex span id of the request's server span (for span links).
    #[serde(skip)]
    pub span_id: Option<String>,
}

/// Task id → culprit, for every task worth naming (requests, fan-out jobs,
/// named background tasks). Registered once per task, looked up only when a
/// stall is found, so the per-poll hooks never touch it.
#[derive(Debug, Default)]
pub struct Culprits {
    by_task: Mutex<HashMap<u64, Arc<Culprit>>>,
}

impl Culprits {
    pub fn register(&self, task: tokio::task::Id, culprit: Arc<Culprit>) {
        self.by_task
            .lock()
            .expect("culprits lock")
            .insert(task_id(task), culprit);
    }

    pub fn unregister(&self, task: tokio::task::Id) {
        self.by_task
            .lock()
            .expect("culprits lock")
            .remove(&task_id(task));
    }

    pub fn get(&self, task: u64) -> Option<Arc<Culprit>> {
        self.by_task
            .lock()
            .expect("culprits lock")
            .get(&task)
            .cloned()
    }
}

/// tokio's task ids are opaque: no accessor gives the number. But `Id`
/// derives `Hash` over its `NonZeroU64`, so a hasher that keeps the one `u64`
/// it is fed recovers it without the allocation of `to_string()` — this runs
/// in the poll hooks, on every poll.
pub fn task_id(id: tokio::task::Id) -> u64 {
    use std::hash::{Hash, Hasher};

    #[derive(Default)]
    struct Capture(u64);
    impl Hasher for Capture {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            // Not reached for `Id` today; a fold keeps it well-defined if
            // tokio ever hashes differently.
            for b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(*b);
            }
        }
        fn write_u64(&mut self, n: u64) {
            self.0 = n;
        }
    }
    let mut capture = Capture::default();
    id.hash(&mut capture);
    capture.finish()
}

/// What one worker is doing right now, written by the poll hooks on that
/// worker and read by everyone else. Plain atomics: the hooks run on every
/// poll of every task and must cost next to nothing.
#[derive(Debug, Default)]
pub struct WorkerSlot {
    /// Start of the poll in progress, in nanoseconds since the monitor's
    /// epoch, plus one; 0 means "not polling".
    poll_started: AtomicU64,
    /// Incremented at every poll start: tells two polls apart even if they
    /// started at the same nanosecond.
    poll_seq: AtomicU64,
    /// The task being polled.
    task: AtomicU64,
    /// The OS thread id of this worker (for its CPU clock in /proc), 0 until
    /// its first poll.
    tid: AtomicU64,
    /// The thread's scheduler clocks when its id was recorded, and when:
    /// the watcher's first "before" sample, should the worker's very first
    /// task be a stall.
    first_clock_at: AtomicU64,
    first_on_cpu: AtomicU64,
    first_waiting: AtomicU64,
    /// The last finished poll of at least the threshold: start and end, in
    /// nanoseconds since the epoch, plus one (0: none yet). Written by the
    /// after-poll hook before the worker polls anything else, so a request
    /// stuck behind that poll sees it when it finally runs, even before
    /// the watcher thread has filed the stall.
    last_long_poll_started: AtomicU64,
    last_long_poll_ended: AtomicU64,
}

/// The state of one worker as reported by `/debug/runtime`.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerView {
    pub index: usize,
    /// `idle`, `polling` (a poll shorter than the threshold so far) or
    /// `stalled`.
    pub state: &'static str,
    /// How long the poll in progress has lasted, if any.
    pub poll_elapsed_ms: Option<f64>,
    /// Who is being polled, when it is a named task.
    pub current: Option<Culprit>,
}

/// A stall in progress, as reported by `/debug/stalls`.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveStall {
    pub worker: usize,
    pub started_at_ms: u64,
    pub elapsed_ms: f64,
    pub culprit: Option<Culprit>,
    pub task_id: u64,
}

/// A finished stall.
#[derive(Debug, Clone, Serialize)]
pub struct StallRecord {
    /// Sequence number since the server started, from 1.
    pub id: u64,
    pub worker: usize,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    pub duration_ms: f64,
    /// CPU time the worker thread used during the stall (as sampled; see
    /// [`cpu`]), and the classification derived from it.
    pub on_cpu_ms: Option<f64>,
    /// `on-cpu` (computing), `off-cpu` (sleeping or waiting in a blocking
    /// call), `preempted` (ready but denied a CPU by the OS: an overloaded
    /// machine), `mixed`, or `unknown` where the clocks are unavailable.
    pub cpu: &'static str,
    pub culprit: Option<Culprit>,
    pub task_id: u64,
    /// Link to the culprit's trace, when there is one.
    pub jaeger_url: Option<String>,
}

/// Task name of the empty task that wakes an idle worker at a stall.
pub const WAKE_TASK_NAME: &str = "stall watcher: wake an idle worker";

/// What the runtime builder needs to install the poll hooks.
pub struct Watch {
    pub monitor: Arc<Monitor>,
    pub long_polls: std::sync::mpsc::Sender<hooks::LongPoll>,
}

/// Creates the monitor, starts the watcher thread, and returns what the
/// runtime builder needs. The watcher stops by itself once the runtime (and
/// with it the hooks' sender) is dropped.
pub fn start(
    workers: usize,
    config: &crate::config::StallConfig,
    jaeger_ui_url: Option<&str>,
) -> std::io::Result<Watch> {
    let monitor = Monitor::new(
        workers,
        Duration::from_millis(config.threshold_ms),
        config.history,
        jaeger_ui_url,
    );
    let (long_polls, receiver) = std::sync::mpsc::channel();
    watcher::spawn(monitor.clone(), receiver)?;
    Ok(Watch {
        monitor,
        long_polls,
    })
}

/// Everything the hooks, the watcher and the admin server share.
#[derive(Debug)]
pub struct Monitor {
    epoch: Instant,
    epoch_unix_ns: u64,
    pub threshold: Duration,
    slots: Vec<WorkerSlot>,
    pub culprits: Culprits,
    history: Mutex<VecDeque<StallRecord>>,
    history_len: usize,
    total: AtomicU64,
    /// Base URL of the Jaeger UI, for `jaeger_url` links (none when traces
    /// are not exported).
    jaeger_ui_url: Option<String>,
    /// The application runtime, when the watcher is to wake an idle worker
    /// at each stall (`stall.wake_idle_worker`).
    wake: std::sync::OnceLock<tokio::runtime::Handle>,
}

impl Monitor {
    pub fn new(
        workers: usize,
        threshold: Duration,
        history_len: usize,
        jaeger_ui_url: Option<&str>,
    ) -> Arc<Monitor> {
        let epoch_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(0));
        Arc::new(Monitor {
            epoch: Instant::now(),
            epoch_unix_ns,
            threshold,
            slots: (0..workers).map(|_| WorkerSlot::default()).collect(),
            culprits: Culprits::default(),
            history: Mutex::new(VecDeque::with_capacity(history_len)),
            history_len,
            total: AtomicU64::new(0),
            jaeger_ui_url: jaeger_ui_url.map(|url| url.trim_end_matches('/').to_owned()),
            wake: std::sync::OnceLock::new(),
        })
    }

    pub fn workers(&self) -> usize {
        self.slots.len()
    }

    /// From now on, the watcher wakes an idle worker of `app` whenever a
    /// stall begins (see [`Monitor::wake_an_idle_worker`]).
    pub fn wake_idle_workers_of(&self, app: tokio::runtime::Handle) {
        let _ = self.wake.set(app);
    }

    /// Spawns an empty task on the application runtime from this (non-
    /// worker) thread, if asked to. A task arriving from outside goes to the
    /// runtime's shared queue and unparks a sleeping worker. That worker runs
    /// it, finds nothing else to do, and parks again, this time on the I/O
    /// driver, which the blocked worker let go of when it woke. From then on
    /// sockets are read and timers fire although one worker is held.
    fn wake_an_idle_worker(&self) {
        if let Some(app) = self.wake.get() {
            let _ = tokio::task::Builder::new()
                .name(WAKE_TASK_NAME)
                .spawn_on(async {}, app);
        }
    }

    /// Nanoseconds since the epoch, for the slots' timestamps.
    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    fn ns_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Unix milliseconds of a monitor timestamp.
    fn unix_ms(&self, ns: u64) -> u64 {
        (self.epoch_unix_ns + ns) / 1_000_000
    }

    /// The poll in progress on `worker`: (sequence, start ns, task id).
    fn current_poll(&self, worker: usize) -> Option<(u64, u64, u64)> {
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
        Some((seq, started - 1, task))
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
    pub fn workers_held_between(&self, from: Instant, to: Instant) -> Vec<usize> {
        let (from, to) = (self.ns_at(from), self.ns_at(to));
        let overlaps = |started: u64, ended: u64| started < to && ended > from;
        let now = self.now_ns();
        let threshold = u64::try_from(self.threshold.as_nanos()).unwrap_or(u64::MAX);
        let mut held: Vec<bool> = (0..self.slots.len())
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
    pub fn worker_views(&self) -> Vec<WorkerView> {
        let now = self.now_ns();
        (0..self.slots.len())
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
                        poll_elapsed_ms: Some(crate::measure::ms(elapsed)),
                        current: self.culprits.get(task).map(|c| (*c).clone()),
                    }
                }
            })
            .collect()
    }

    /// Stalls in progress, read straight from the slots: no watcher latency.
    pub fn active_stalls(&self) -> Vec<ActiveStall> {
        let now = self.now_ns();
        (0..self.slots.len())
            .filter_map(|worker| {
                let (_, started, task) = self.current_poll(worker)?;
                let elapsed = Duration::from_nanos(now.saturating_sub(started));
                (elapsed >= self.threshold).then(|| ActiveStall {
                    worker,
                    started_at_ms: self.unix_ms(started),
                    elapsed_ms: crate::measure::ms(elapsed),
                    culprit: self.culprits.get(task).map(|c| (*c).clone()),
                    task_id: task,
                })
            })
            .collect()
    }

    /// The most recent finished stalls, newest first.
    pub fn recent_stalls(&self, limit: usize) -> Vec<StallRecord> {
        let history = self.history.lock().expect("history lock");
        history.iter().rev().take(limit).cloned().collect()
    }

    /// How many stalls have finished since start.
    pub fn total_stalls(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    fn file(&self, mut record: StallRecord) -> StallRecord {
        record.id = self.total.fetch_add(1, Ordering::Relaxed) + 1;
        record.jaeger_url = record
            .culprit
            .as_ref()
            .and_then(|c| c.trace_id.as_ref())
            .zip(self.jaeger_ui_url.as_ref())
            .map(|(trace, base)| format!("{base}/trace/{trace}"));
        let mut history = self.history.lock().expect("history lock");
        if history.len() == self.history_len {
            history.pop_front();
        }
        history.push_back(record.clone());
        record
    }

    /// The `/debug/stalls` document.
    pub fn stalls_document(&self, recent: usize) -> serde_json::Value {
        serde_json::json!({
            "threshold_ms": crate::measure::ms(self.threshold),
            "in_progress": self.active_stalls(),
            "recent": self.recent_stalls(recent),
            "total": self.total_stalls(),
            // Whether the watcher wakes an idle worker as a stall begins.
            "wake_idle_worker": self.wake.get().is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A monitor of two workers whose epoch is 50 ms in the past, and "now".
    fn monitor() -> (Arc<Monitor>, Instant) {
        let monitor = Monitor::new(2, Duration::from_millis(1), 8, None);
        std::thread::sleep(Duration::from_millis(50));
        (monitor, Instant::now())
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
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
        });
        // …but its slot now records a later long poll, after the interval.
        monitor.note_long_poll_at(0, now + ms(1), now + ms(3));
        assert_eq!(monitor.workers_held_between(now - ms(10), now), vec![0]);
    }
}
