//! [`Watch`]: the one type a service creates.

use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::culprit::{Culprit, task_id};
use crate::hooks::{self, LongPoll};
use crate::lag::{LagProbe, LagView};
use crate::monitor::{Monitor, Stalls, WorkerView};
use crate::stack::Sampler;

/// Bytes of the held worker's stack copied per capture (from the stack
/// pointer up). A worker blocked in a handler under hyper, axum and tower
/// measured 6.4 KiB deep in a release build, 12.6 KiB in a debug one. The
/// buffers are allocated zeroed, so a worker never captured costs no
/// resident memory.
const STACK_BYTES: usize = 64 * 1024;

/// Watches the runtimes it is installed on for stalls.
///
/// Cheap to clone (an `Arc`). Create one, [`install`](Watch::install) it on
/// the runtime builder, then read it (`stalls`, `workers`) or serve it
/// (`serve_admin`, feature `axum`). The watcher thread runs until the
/// `Watch`, its clones and the runtime are all dropped.
#[derive(Clone)]
pub struct Watch {
    inner: Arc<Inner>,
}

struct Inner {
    monitor: Arc<Monitor>,
    /// Given to each runtime's after-poll hook; the watcher thread ends
    /// when every sender is gone.
    long_polls: Sender<LongPoll>,
    sampler: Option<Arc<Sampler>>,
    lag: OnceLock<Arc<LagProbe>>,
    installed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("threshold", &self.inner.monitor.threshold)
            .field("workers", &self.inner.monitor.workers())
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Starts the watcher thread (`stall-watcher`) with `config`.
    ///
    /// # Panics
    ///
    /// If the OS cannot start a thread (as `std::thread::spawn` would).
    pub fn new(config: Config) -> Watch {
        let monitor = Arc::new(Monitor::new(&config));
        let sampler = if config.stacks && crate::stack::SUPPORTED {
            let slots = monitor.clone();
            // Which poll the handler interrupted: the sequence number while
            // a poll is in progress, u64::MAX between polls (so a capture
            // that lands after the stalled poll ended never passes for it).
            // Two atomic loads: async-signal-safe.
            let poll_seq = Arc::new(move |worker: usize| {
                use std::sync::atomic::Ordering::Acquire;
                slots.slots.get(worker).map_or(u64::MAX, |slot| {
                    if slot.poll_started.load(Acquire) == 0 {
                        u64::MAX
                    } else {
                        slot.poll_seq.load(Acquire)
                    }
                })
            });
            match Sampler::new(monitor.slots.len(), STACK_BYTES, poll_seq) {
                // The namer thread reads the unwind tables and indexes the
                // debug info in the background as it starts (about 0.15 s
                // of CPU and 6 MB for stall-lab's release build), so that a
                // stack is named within milliseconds of the stall.
                Ok(sampler) => Some(Arc::new(sampler)),
                Err(e) => {
                    tracing::warn!(
                        target: crate::span::TARGET,
                        "stall-watch: stacks are off, the sampler did not start: {e}"
                    );
                    None
                }
            }
        } else {
            None
        };
        monitor.set_stacks(match (crate::stack::SUPPORTED, config.stacks, &sampler) {
            (false, _, _) => "unsupported",
            (true, true, Some(_)) => "on",
            (true, _, _) => "off",
        });
        let (long_polls, receiver) = std::sync::mpsc::channel();
        crate::watcher::spawn(monitor.clone(), receiver, sampler.clone())
            .expect("cannot start the stall-watcher thread");
        Watch {
            inner: Arc::new(Inner {
                monitor,
                long_polls,
                sampler,
                lag: OnceLock::new(),
                installed: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Installs the poll hooks on `builder`, and returns it for chaining.
    ///
    /// This sets the builder's `on_before_task_poll` and
    /// `on_after_task_poll` callbacks (replacing any set before; set your
    /// own first, or not at all). The runtime's worker count and handle are
    /// learnt from its first polls.
    pub fn install<'a>(
        &self,
        builder: &'a mut tokio::runtime::Builder,
    ) -> &'a mut tokio::runtime::Builder {
        self.inner
            .installed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let sampler = self.inner.sampler.clone();
        hooks::install(
            builder,
            self.inner.monitor.clone(),
            self.inner.long_polls.clone(),
            Arc::new(move |worker| {
                if let Some(sampler) = &sampler {
                    sampler.register_current_thread(worker);
                }
            }),
        );
        builder
    }

    /// Tells the watch which runtime it watches now, rather than at that
    /// runtime's first poll: `/debug/runtime` and the lag probe work from
    /// the start. Optional.
    pub fn attach(&self, runtime: &tokio::runtime::Handle) {
        self.inner.monitor.set_runtime(runtime.clone());
    }

    /// Whether [`Watch::install`] was called: an uninstalled watch sees no
    /// polls and so no stalls.
    pub fn is_installed(&self) -> bool {
        self.inner
            .installed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Names `task` as `culprit` until the returned guard is dropped: a stall
    /// in that task then names it.
    pub fn track(&self, task: tokio::task::Id, culprit: Arc<Culprit>) -> Tracked {
        let task = task_id(task);
        self.inner.monitor.culprits.register(task, culprit);
        Tracked {
            monitor: self.inner.monitor.clone(),
            task,
        }
    }

    /// [`Watch::track`] for the task that calls it (`None` outside a task).
    pub fn track_current(&self, culprit: Arc<Culprit>) -> Option<Tracked> {
        tokio::task::try_id().map(|id| self.track(id, culprit))
    }

    /// Stalls in progress (with their live stacks) and the `recent` most
    /// recent finished ones.
    pub fn stalls(&self, recent: usize) -> Stalls {
        self.inner.monitor.stalls(recent)
    }

    /// What each worker of the watched runtime is doing now.
    pub fn workers(&self) -> Vec<WorkerView> {
        self.inner.monitor.worker_views()
    }

    /// The workers a stall held at some moment between `from` and `to`: a
    /// request that waited over that interval can say who kept it waiting.
    pub fn workers_held_between(&self, from: Instant, to: Instant) -> Vec<usize> {
        self.inner.monitor.workers_held_between(from, to)
    }

    /// The threshold a poll must cross to be a stall.
    pub fn threshold(&self) -> Duration {
        self.inner.monitor.threshold
    }

    /// The watched runtime, once one of its workers has polled a task.
    pub fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.inner.monitor.runtime().cloned()
    }

    /// The scheduling delay a timer-driven task feels now, from a small
    /// probe task started on the watched runtime at the first call (`None`
    /// until the runtime is known).
    pub fn lag(&self) -> Option<LagView> {
        if let Some(probe) = self.inner.lag.get() {
            return Some(probe.view());
        }
        let runtime = self.inner.monitor.runtime()?;
        let probe = LagProbe::spawn(runtime).ok()?;
        Some(self.inner.lag.get_or_init(|| probe).view())
    }
}

/// Keeps a task named for the stall watcher; unregisters it on drop.
#[derive(Debug)]
#[must_use = "the task is named only while the guard lives"]
pub struct Tracked {
    monitor: Arc<Monitor>,
    task: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.monitor.culprits.unregister(self.task);
    }
}
