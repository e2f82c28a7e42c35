//! The lag probe: one small task on the application runtime that asks for a
//! timer every [`PERIOD`] and records how late it was polled.
//!
//! Lateness is the runtime's *scheduling delay* as a timer-driven task feels
//! it: about a millisecond (timer granularity) when a worker is free, the
//! rest of a stall when none is. A task-based probe cannot say *which*
//! worker is stuck, so stalls are detected per worker by the stall watcher,
//! and this probe only draws the lag chart.
//!
//! It also shows something surprising. With one worker of two blocked and
//! the other idle, the probe is often late by the whole stall anyway. A multi-thread
//! runtime's timers and IO events are processed by whichever worker parks
//! *on the driver*; the other idle workers sleep on a condition variable
//! until something notifies them. When the worker that was driving picks up
//! the blocking task, nothing may wake an idle one to take over the driver,
//! so timers fire late although a worker is free. A blocked worker can delay
//! more than its own queue. (tokio-rs/tokio#4730;
//! [`crate::Config::wake_idle_worker`] makes the watcher wake an idle
//! worker, and the probe then stays on time during a one-worker stall.)
//!
//! When the runtime is completely stuck the probe cannot report at all; the
//! admin server notices that its last report is overdue and shows the probe
//! as *pending* for as long as it has been overdue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How often the probe asks to be woken.
pub(crate) const PERIOD: Duration = Duration::from_millis(100);

/// Task name of the probe in tokio-console.
pub(crate) const TASK_NAME: &str = "lag probe";

#[derive(Debug)]
pub(crate) struct LagProbe {
    epoch: Instant,
    /// When the probe last ran, ns since `epoch`.
    last_run_ns: AtomicU64,
    /// Its lateness then, ns.
    last_delay_ns: AtomicU64,
}

/// The lag probe's latest report.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LagView {
    /// The last measured lateness, or how long the overdue probe has been
    /// waiting so far.
    pub probe_delay_ms: f64,
    /// True while the probe is overdue: no worker has been free to run it.
    pub pending: bool,
}

impl LagProbe {
    /// Spawns the probe on `app` (the application runtime).
    pub(crate) fn spawn(app: &tokio::runtime::Handle) -> std::io::Result<std::sync::Arc<LagProbe>> {
        let probe = std::sync::Arc::new(LagProbe {
            epoch: Instant::now(),
            last_run_ns: AtomicU64::new(0),
            last_delay_ns: AtomicU64::new(0),
        });
        let writer = probe.clone();
        tokio::task::Builder::new().name(TASK_NAME).spawn_on(
            async move {
                loop {
                    let due = tokio::time::Instant::now() + PERIOD;
                    tokio::time::sleep_until(due).await;
                    let now = tokio::time::Instant::now();
                    writer
                        .last_delay_ns
                        .store(nanos(now - due), Ordering::Relaxed);
                    writer
                        .last_run_ns
                        .store(nanos(now.into_std() - writer.epoch), Ordering::Relaxed);
                }
            },
            app,
        )?;
        Ok(probe)
    }

    pub(crate) fn view(&self) -> LagView {
        let now = nanos(self.epoch.elapsed());
        let last_run = self.last_run_ns.load(Ordering::Relaxed);
        let due = last_run + nanos(PERIOD);
        // A few ms of slack: a probe 2 ms late is late, not stuck.
        let overdue = now.saturating_sub(due);
        if overdue > nanos(Duration::from_millis(5)) {
            LagView {
                probe_delay_ms: crate::ms(Duration::from_nanos(overdue)),
                pending: true,
            }
        } else {
            LagView {
                probe_delay_ms: crate::ms(Duration::from_nanos(
                    self.last_delay_ns.load(Ordering::Relaxed),
                )),
                pending: false,
            }
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
