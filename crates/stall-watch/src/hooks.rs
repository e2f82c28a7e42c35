//! The poll hooks: the only stall-watcher code that runs on the workers.
//!
//! `on_before_task_poll` and `on_after_task_poll` (tokio_unstable) run on the
//! worker thread immediately around every task poll. They must be cheap:
//! the worker index (tokio's thread-local), one TSC read each (quanta), a
//! few relaxed or release atomic stores, and a comparison in raw ticks.
//! Anything heavier — looking up the culprit, reading the CPU clock —
//! happens only when a poll turns out to be long.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;

use crate::cpu;
use crate::culprit::{Culprit, task_id};
use crate::monitor::Monitor;

/// A poll that lasted at least the threshold, reported by the after-poll hook
/// with exact timestamps.
#[derive(Debug)]
pub(crate) struct LongPoll {
    pub(crate) worker: usize,
    pub(crate) seq: u64,
    pub(crate) started_ns: u64,
    pub(crate) ended_ns: u64,
    pub(crate) task: u64,
    pub(crate) culprit: Option<Arc<Culprit>>,
    /// The thread's scheduler clocks at the end of the poll.
    pub(crate) clock_end: Option<cpu::SchedClock>,
}

/// What a thread last registered as: for which monitor (its id; 0 for none
/// yet), as which worker and under which kernel thread id.
#[derive(Clone, Copy)]
struct Registration {
    monitor: usize,
    worker: usize,
    tid: u64,
}

thread_local! {
    /// A monitor id, not a flag: a thread may poll for one runtime, then
    /// another (a `current_thread` runtime runs on its caller's thread).
    /// The after-poll hook checks here that the worker's slot is still this
    /// thread's.
    static REGISTERED: Cell<Registration> = const {
        Cell::new(Registration { monitor: 0, worker: 0, tid: 0 })
    };
}

/// Installs the hooks on `builder`; long polls are sent to `long_polls`.
pub(crate) fn install(
    builder: &mut tokio::runtime::Builder,
    monitor: Arc<Monitor>,
    long_polls: Sender<LongPoll>,
    on_register: Arc<dyn Fn(usize) + Send + Sync>,
) {
    let before = monitor.clone();
    builder.on_before_task_poll(move |meta| {
        let Some(worker) = tokio::runtime::worker_index() else {
            return;
        };
        let Some(slot) = before.slots.get(worker) else {
            return;
        };
        let registered = REGISTERED.get();
        if registered.monitor != before.id
            || registered.worker != worker
            || slot.tid.load(Ordering::Relaxed) != registered.tid
        {
            // Once per worker thread, and again if another thread took this
            // worker over (`block_in_place`) and this one took it back: the
            // runtime, the thread's id and a first clock sample.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                before.set_runtime(handle);
            }
            on_register(worker);
            let tid = cpu::current_tid().unwrap_or(0);
            REGISTERED.set(Registration {
                monitor: before.id,
                worker,
                tid,
            });
            if tid != 0 {
                if let Some(clock) = cpu::thread_clock(tid) {
                    slot.first_on_cpu.store(clock.on_cpu_ns, Ordering::Relaxed);
                    slot.first_waiting
                        .store(clock.waiting_ns, Ordering::Relaxed);
                    slot.first_clock_at
                        .store(before.now_ns(), Ordering::Relaxed);
                }
                slot.tid.store(tid, Ordering::Release);
            }
        }
        // Sequence first, then the fields, start last with Release: a reader
        // that sees the new start also sees the new task (see
        // `Monitor::current_poll`). Only this worker ever writes its slot, so
        // the counters are a load and a store, not a locked read-modify-write.
        slot.poll_seq
            .store(slot.poll_seq.load(Ordering::Relaxed) + 1, Ordering::Release);
        slot.task.store(task_id(meta.id()), Ordering::Release);
        slot.poll_started
            .store(before.clock.raw() + 1, Ordering::Release);
    });

    let after = monitor;
    // `Sender` is `Send + Sync` (Rust ≥ 1.72), so the hook can own it.
    builder.on_after_task_poll(move |meta| {
        let Some(worker) = tokio::runtime::worker_index() else {
            return;
        };
        let Some(slot) = after.slots.get(worker) else {
            return;
        };
        let registered = REGISTERED.get();
        if registered.monitor == after.id
            && registered.worker == worker
            && registered.tid != slot.tid.load(Ordering::Relaxed)
        {
            // This poll gave the worker away (`block_in_place`) and the
            // thread that took it over registered: the slot is its now.
            return;
        }
        let started = slot.poll_started.load(Ordering::Relaxed);
        slot.poll_started.store(0, Ordering::Release);
        if started == 0 {
            return;
        }
        let (started, ended) = (started - 1, after.clock.raw());
        // Saturating: a TSC read on another core may lag a little.
        if ended.saturating_sub(started) < after.threshold_raw {
            return;
        }
        // A long poll: now, and only now, do the expensive parts.
        let (started_ns, ended_ns) = (after.raw_to_ns(started), after.raw_to_ns(ended));
        after.note_long_poll(worker, started_ns, ended_ns);
        let task = task_id(meta.id());
        let _ = long_polls.send(LongPoll {
            worker,
            seq: slot.poll_seq.load(Ordering::Acquire),
            started_ns,
            ended_ns,
            task,
            culprit: after.culprits.get(task),
            clock_end: cpu::thread_clock(slot.tid.load(Ordering::Relaxed)),
        });
    });
}
