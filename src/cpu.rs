//! Real CPU work, bounded by elapsed time.
//!
//! The CPU scenarios need work the optimizer cannot delete and that takes as
//! long as asked on any machine, so the loop is time-bounded rather than
//! iteration-bounded: it mixes a 64-bit state (xorshift, a few cycles per
//! round) and checks the clock every [`ROUNDS_PER_CLOCK_CHECK`] rounds. The
//! state goes through [`std::hint::black_box`] so the loop has an observable
//! result, and the caller gets the round count back as proof of work.
//!
//! This function never yields: it is synchronous. Where it runs decides the
//! lesson. Called directly in a handler, it holds a worker; called in ~1 ms
//! slices between `yield_now().await`s, it shares the worker; called inside
//! `spawn_blocking`, it runs on the blocking pool and holds no worker at all.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// How many rounds run between two clock reads: small enough to stop within
/// a few microseconds of the deadline, large enough that reading the clock
/// is a negligible share of the work.
pub(crate) const ROUNDS_PER_CLOCK_CHECK: u64 = 4096;

/// CPU time the calling thread has run so far, from the kernel's scheduler
/// clock (`/proc/thread-self/schedstat`; `None` where there is none).
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let on_cpu_ns = text.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(on_cpu_ns))
}

/// Burns CPU on the calling thread for `duration`, then returns how many
/// rounds of work it did.
pub(crate) fn burn(duration: Duration) -> u64 {
    let deadline = Instant::now() + duration;
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rounds = 0;
    loop {
        for _ in 0..ROUNDS_PER_CLOCK_CHECK {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
        }
        state = black_box(state);
        rounds += ROUNDS_PER_CLOCK_CHECK;
        if Instant::now() >= deadline {
            return black_box(rounds ^ (state & 1));
        }
    }
}

/// Lowers the calling thread's scheduling priority by `by` nice levels,
/// once per thread (a blocking-pool thread is reused; its priority stays).
///
/// For offloaded CPU work: with more runnable threads than cores, the OS
/// shares a core in proportion to each thread's weight, which drops by about
/// a quarter per nice level (a thread at +10 weighs ~1/10 of one at 0). A
/// worker that has requests to read then gets the core first, and the jobs
/// still get every cycle nobody else wants. Not undone: raising a priority
/// back takes a privilege (`CAP_SYS_NICE`) a server should not need.
/// Returns the error if the OS refused (the work then runs unchanged).
pub(crate) fn lower_priority(by: u8) -> std::io::Result<()> {
    use std::cell::Cell;
    thread_local! {
        static LOWERED: Cell<bool> = const { Cell::new(false) };
    }
    if by == 0 || LOWERED.get() {
        return Ok(());
    }
    LOWERED.set(true);
    renice_this_thread(i32::from(by))
}

#[cfg(target_os = "linux")]
fn renice_this_thread(by: i32) -> std::io::Result<()> {
    use rustix::process::{getpriority_process, setpriority_process};
    // On Linux a nice value is per thread: `PRIO_PROCESS` with a thread id
    // changes that thread only.
    let me = Some(rustix::thread::gettid());
    let now = getpriority_process(me)?;
    setpriority_process(me, (now + by).min(19))?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn renice_this_thread(_by: i32) -> std::io::Result<()> {
    Ok(())
}

/// This thread's nice value (Linux; `None` elsewhere).
#[cfg(test)]
fn nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    return rustix::process::getpriority_process(Some(rustix::thread::gettid())).ok();
    #[cfg(not(target_os = "linux"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_priority_renices_this_thread_once_and_no_other() {
        let main_before = nice();
        let (before, after, again) = std::thread::spawn(|| {
            let before = nice();
            lower_priority(3).unwrap();
            let after = nice();
            lower_priority(3).unwrap();
            (before, after, nice())
        })
        .join()
        .unwrap();
        if cfg!(target_os = "linux") {
            let before = before.unwrap();
            assert_eq!(after, Some((before + 3).min(19)));
            assert_eq!(again, after, "once per thread");
        }
        assert_eq!(nice(), main_before, "only the calling thread");
    }

    #[test]
    fn burns_for_about_the_requested_time() {
        let start = Instant::now();
        let rounds = burn(Duration::from_millis(30));
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(30), "{took:?}");
        assert!(rounds > 0);
    }
}
