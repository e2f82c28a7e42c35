//! On-CPU or off-CPU: was the stalled worker computing or asleep?
//!
//! A stall from `std::thread::sleep` or a blocking syscall leaves the thread
//! off the CPU; a busy loop keeps it on. The difference tells you what to fix
//! (move blocking IO to `spawn_blocking`, or slice/offload computation), and
//! the kernel keeps the answer: `/proc/self/task/TID/schedstat` holds the
//! nanoseconds the thread has run on a CPU, then the nanoseconds it has spent
//! *ready but waiting for a CPU* (preempted by other threads). A poll that
//! mostly waited for a CPU was not blocked by its own code: the machine was
//! overloaded. Reading the file is a small read, so it is done only by the
//! watcher thread and at the end of a long poll — never on every poll.

use std::path::PathBuf;

/// The calling thread's Linux thread id, from `/proc/thread-self`
/// (a symlink to `PID/task/TID`), without `unsafe` or libc.
pub(crate) fn current_tid() -> Option<u64> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// A thread's scheduler clocks, in nanoseconds since it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SchedClock {
    /// Time running on a CPU.
    pub(crate) on_cpu_ns: u64,
    /// Time ready to run but waiting for a CPU.
    pub(crate) waiting_ns: u64,
}

impl SchedClock {
    /// The clocks' progress from `earlier` to `self`.
    pub(crate) fn since(self, earlier: SchedClock) -> SchedClock {
        SchedClock {
            on_cpu_ns: self.on_cpu_ns.saturating_sub(earlier.on_cpu_ns),
            waiting_ns: self.waiting_ns.saturating_sub(earlier.waiting_ns),
        }
    }
}

/// The scheduler clocks of thread `tid` of this process.
pub(crate) fn thread_clock(tid: u64) -> Option<SchedClock> {
    let path = PathBuf::from(format!("/proc/self/task/{tid}/schedstat"));
    let text = std::fs::read_to_string(path).ok()?;
    let mut fields = text.split_whitespace();
    Some(SchedClock {
        on_cpu_ns: fields.next()?.parse().ok()?,
        waiting_ns: fields.next()?.parse().ok()?,
    })
}

/// Classifies a stall from what its thread did over `window_ns`:
/// `on-cpu` (computing), `off-cpu` (asleep or in a blocking call),
/// `preempted` (ready, but the OS ran other threads: an overloaded machine,
/// not a blocking handler), `mixed`, or `unknown` without a clock.
pub(crate) fn classify(used: Option<SchedClock>, window_ns: u64) -> &'static str {
    let Some(used) = used else { return "unknown" };
    if window_ns == 0 {
        return "unknown";
    }
    let on = used.on_cpu_ns as f64 / window_ns as f64;
    let waiting = used.waiting_ns as f64 / window_ns as f64;
    // Time the thread *wanted* a CPU (running or ready to run) tells what the
    // code did: compute, or sleep in a blocking call. Among the wanting, a
    // busy loop on a loaded machine still gets a good share of the CPU,
    // while a trivial poll that the OS merely paused got almost none.
    let wanted = on + waiting;
    if wanted >= 0.7 {
        if on * 2.0 >= waiting {
            "on-cpu"
        } else {
            "preempted"
        }
    } else if wanted <= 0.3 {
        "off-cpu"
    } else {
        "mixed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_busy_thread_gains_cpu_time_and_a_sleeping_one_does_not() {
        let tid = current_tid().expect("Linux /proc/thread-self");
        let before = thread_clock(tid).unwrap().on_cpu_ns;
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        let busy = thread_clock(tid).unwrap().on_cpu_ns - before;
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_clock(tid).unwrap().on_cpu_ns - before - busy;
        assert!(busy > slept, "busy {busy} ns, asleep {slept} ns");
    }

    #[test]
    fn classifies_by_where_the_time_went() {
        let clock = |on, waiting| {
            Some(SchedClock {
                on_cpu_ns: on,
                waiting_ns: waiting,
            })
        };
        assert_eq!(classify(clock(1_000, 0), 100_000), "off-cpu");
        assert_eq!(classify(clock(95_000, 0), 100_000), "on-cpu");
        assert_eq!(classify(clock(10_000, 80_000), 100_000), "preempted");
        // A busy loop sharing a loaded machine is still computing.
        assert_eq!(classify(clock(45_000, 50_000), 100_000), "on-cpu");
        assert_eq!(classify(clock(50_000, 0), 100_000), "mixed");
        assert_eq!(classify(None, 100_000), "unknown");
    }
}
