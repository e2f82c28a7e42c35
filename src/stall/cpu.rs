//! On-CPU or off-CPU: was the stalled worker computing or asleep?
//!
//! A stall from `std::thread::sleep` or a blocking syscall leaves the thread
//! off the CPU; a busy loop keeps it on. The difference tells you what to fix
//! (move blocking IO to `spawn_blocking`, or slice/offload computation), and
//! the kernel keeps the answer: `/proc/self/task/TID/schedstat` starts with
//! the nanoseconds the thread has run on a CPU. Reading it is a small file
//! read, so it is done only by the watcher thread and at the end of a long
//! poll — never on every poll.

use std::path::PathBuf;

/// The calling thread's Linux thread id, from `/proc/thread-self`
/// (a symlink to `PID/task/TID`), without `unsafe` or libc.
pub fn current_tid() -> Option<u64> {
    let link = std::fs::read_link("/proc/thread-self").ok()?;
    link.file_name()?.to_str()?.parse().ok()
}

/// Nanoseconds thread `tid` of this process has spent on a CPU.
pub fn thread_cpu_ns(tid: u64) -> Option<u64> {
    let path = PathBuf::from(format!("/proc/self/task/{tid}/schedstat"));
    let text = std::fs::read_to_string(path).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Classifies a stall from the CPU time its thread used over its duration.
pub fn classify(on_cpu_ns: Option<u64>, duration_ns: u64) -> &'static str {
    let Some(on_cpu) = on_cpu_ns else { return "unknown" };
    if duration_ns == 0 {
        return "unknown";
    }
    let ratio = on_cpu as f64 / duration_ns as f64;
    if ratio >= 0.7 {
        "on-cpu"
    } else if ratio <= 0.3 {
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
        let Some(tid) = current_tid() else { return };
        let before = thread_cpu_ns(tid).unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        let busy = thread_cpu_ns(tid).unwrap() - before;
        std::thread::sleep(Duration::from_millis(30));
        let slept = thread_cpu_ns(tid).unwrap() - before - busy;
        assert!(busy > slept, "busy {busy} ns, asleep {slept} ns");
        assert_eq!(classify(Some(1_000), 100_000), "off-cpu");
        assert_eq!(classify(Some(95_000), 100_000), "on-cpu");
    }
}
