//! Plain threads stand in for tokio workers: each registers as worker 0 of
//! its own sampler, sets its poll sequence number, and then stalls in a
//! function of this file. Margins are wide: two noisy shared cores.

use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::{Frame, Sampler, StackError};

/// Enough for these tests' stacks (a few KiB deep) with room to spare.
const STACK_BYTES: usize = 64 * 1024;
const TIMEOUT: Duration = Duration::from_secs(2);

/// A sampler whose worker 0 reads its poll sequence from `seq`.
fn sampler(seq: &Arc<AtomicU64>) -> Arc<Sampler> {
    let seq = seq.clone();
    let poll_seq = Arc::new(move |_worker: usize| seq.load(Ordering::SeqCst));
    Arc::new(Sampler::new(1, STACK_BYTES, poll_seq).expect("sampler"))
}

/// Runs `work` on a new thread registered as worker 0 of `sampler`, and
/// waits until `work` says (through the flag it gets) that it is about to
/// stall, plus a little.
fn spawn_worker<T: Send + 'static>(
    sampler: &Arc<Sampler>,
    work: impl FnOnce(&AtomicBool) -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let sampler = sampler.clone();
    let stalling = Arc::new(AtomicBool::new(false));
    let flag = stalling.clone();
    let handle = thread::spawn(move || {
        sampler.register_current_thread(0);
        work(&flag)
    });
    while !stalling.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(30));
    handle
}

fn find<'a>(frames: &'a [Frame], function: &str) -> Option<&'a Frame> {
    frames.iter().find(|f| f.function.ends_with(function))
}

fn show(frames: &[Frame]) -> String {
    frames
        .iter()
        .map(|f| {
            format!(
                "  {}{} at {}:{}\n",
                if f.user_code { "* " } else { "" },
                f.function,
                f.file.as_deref().unwrap_or("?"),
                f.line.unwrap_or(0)
            )
        })
        .collect()
}

/// Asserts that `function` is among `frames`, in this file, with a line,
/// marked as user code.
fn assert_culprit(frames: &[Frame], function: &str) {
    let culprit = find(frames, function)
        .unwrap_or_else(|| panic!("no {function} in the stack:\n{}", show(frames)));
    let file = culprit.file.as_deref().unwrap_or_default();
    assert!(
        file.ends_with("src/stack/tests.rs"),
        "{function} in {file}:\n{}",
        show(frames)
    );
    assert!(culprit.line.is_some_and(|l| l > 0), "{}", show(frames));
    assert!(culprit.user_code, "{}", show(frames));
}

#[inline(never)]
fn sleeping_culprit(stalling: &AtomicBool, how_long: Duration) -> Duration {
    let started = Instant::now();
    stalling.store(true, Ordering::SeqCst);
    thread::sleep(how_long);
    started.elapsed()
}

#[test]
fn a_sleep_is_captured_and_still_sleeps_its_whole_time() {
    let seq = Arc::new(AtomicU64::new(1));
    let sampler = sampler(&seq);
    let worker = spawn_worker(&sampler, |stalling| {
        sleeping_culprit(stalling, Duration::from_millis(300))
    });
    let raw = sampler.capture(0, 1, TIMEOUT).expect("capture");
    // A second signal during the same sleep: it must not cut it short either.
    // (Not asserted: on a loaded machine it may land after the sleep.)
    let _ = sampler.capture(0, 1, TIMEOUT);
    let slept = worker.join().expect("worker");

    assert!(slept >= Duration::from_millis(300), "slept only {slept:?}");
    let frames = sampler.symbolize(&raw);
    // std's `thread::sleep` lives in `std::thread::functions` (re-exported
    // as `std::thread::sleep`); DWARF names the defining module.
    assert!(
        frames
            .iter()
            .any(|f| f.function.starts_with("std::thread::") && f.function.ends_with("::sleep")),
        "no std::thread::sleep:\n{}",
        show(&frames)
    );
    assert_culprit(&frames, "sleeping_culprit");
    let first_user = frames.iter().find(|f| f.user_code).expect("a user frame");
    assert!(
        first_user.function.ends_with("sleeping_culprit"),
        "{}",
        show(&frames)
    );
}

#[inline(never)]
fn spinning_culprit(stalling: &AtomicBool, stop: &AtomicBool) -> u64 {
    stalling.store(true, Ordering::SeqCst);
    let mut x = 1u64;
    while !stop.load(Ordering::Relaxed) {
        x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    x
}

#[test]
fn a_busy_loop_is_captured() {
    let seq = Arc::new(AtomicU64::new(7));
    let sampler = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let worker = spawn_worker(&sampler, move |stalling| {
        spinning_culprit(stalling, &worker_stop)
    });
    let raw = sampler.capture(0, 7, TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");

    let frames = sampler.symbolize(&raw.expect("capture"));
    assert_culprit(&frames, "spinning_culprit");
}

#[inline(never)]
fn locking_culprit(stalling: &AtomicBool, mutex: &Mutex<u32>) -> u32 {
    stalling.store(true, Ordering::SeqCst);
    *mutex.lock().expect("lock")
}

#[test]
fn a_mutex_wait_is_captured_and_still_waits_for_the_lock() {
    let seq = Arc::new(AtomicU64::new(3));
    let sampler = sampler(&seq);
    let mutex = Arc::new(Mutex::new(0));
    let mut guard = mutex.lock().expect("lock");
    let worker_mutex = mutex.clone();
    let worker = spawn_worker(&sampler, move |stalling| {
        let started = Instant::now();
        let value = locking_culprit(stalling, &worker_mutex);
        (value, started.elapsed())
    });
    let held_from = Instant::now();
    let raw = sampler.capture(0, 3, TIMEOUT);
    let again = sampler.capture(0, 3, TIMEOUT);
    thread::sleep(Duration::from_millis(200));
    *guard = 42;
    let held = held_from.elapsed();
    drop(guard);
    let (value, waited) = worker.join().expect("worker");

    assert_eq!(value, 42, "the worker got the lock before it was released");
    assert!(waited >= held, "waited {waited:?}, lock held {held:?}");
    assert!(again.is_ok(), "{again:?}");
    let frames = sampler.symbolize(&raw.expect("capture"));
    assert_culprit(&frames, "locking_culprit");
    assert!(
        frames.iter().any(|f| f.function.contains("lock")),
        "{}",
        show(&frames)
    );
}

#[inline(never)]
fn reading_culprit(stalling: &AtomicBool, socket: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    stalling.store(true, Ordering::SeqCst);
    let mut buf = [0u8; 16];
    // One `read`, not `read_exact`: an EINTR would surface here as an error.
    let n = socket.read(&mut buf)?;
    Ok(buf[..n].to_vec())
}

#[test]
fn a_blocking_read_is_captured_and_still_returns_its_data() {
    let seq = Arc::new(AtomicU64::new(11));
    let sampler = sampler(&seq);
    let (mut writer, mut reader) = UnixStream::pair().expect("socket pair");
    let worker = spawn_worker(&sampler, move |stalling| {
        reading_culprit(stalling, &mut reader)
    });
    let raw = sampler.capture(0, 11, TIMEOUT);
    let again = sampler.capture(0, 11, TIMEOUT);
    thread::sleep(Duration::from_millis(100));
    writer.write_all(b"hello").expect("write");
    let read = worker.join().expect("worker");

    assert_eq!(read.expect("read, not EINTR"), b"hello");
    assert!(again.is_ok(), "{again:?}");
    let frames = sampler.symbolize(&raw.expect("capture"));
    assert_culprit(&frames, "reading_culprit");
}

#[test]
fn a_capture_in_a_later_poll_is_discarded() {
    let seq = Arc::new(AtomicU64::new(5));
    let sampler = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let worker = spawn_worker(&sampler, move |stalling| {
        spinning_culprit(stalling, &worker_stop)
    });
    // The stalled poll was 5; by the time the signal lands the worker is in
    // poll 6.
    seq.store(6, Ordering::SeqCst);
    let result = sampler.capture(0, 5, TIMEOUT);
    // And the slot is free again for the next capture.
    let next = sampler.capture(0, 6, TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");

    assert_eq!(
        result.map(|raw| raw.seq),
        Err(StackError::WrongPoll {
            expected: 5,
            found: 6
        })
    );
    assert_eq!(next.map(|raw| raw.seq), Ok(6));
}

#[test]
fn a_worker_that_blocks_the_signal_times_out_and_the_late_signal_is_harmless() {
    let seq = Arc::new(AtomicU64::new(1));
    let sampler = sampler(&seq);
    let signal = sampler.signal();
    let unblock = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (worker_unblock, worker_stop) = (unblock.clone(), stop.clone());
    let worker = spawn_worker(&sampler, move |stalling| {
        let set = |how| {
            // SAFETY: a zeroed sigset_t filled by sigemptyset/sigaddset, and
            // a change to this thread's own mask.
            unsafe {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, signal);
                libc::pthread_sigmask(how, &set, std::ptr::null_mut());
            }
        };
        set(libc::SIG_BLOCK);
        stalling.store(true, Ordering::SeqCst);
        while !worker_unblock.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        // The pending signal is delivered now, to an idle slot.
        set(libc::SIG_UNBLOCK);
        spinning_culprit(&AtomicBool::new(false), &worker_stop)
    });
    let blocked = sampler.capture(0, 1, Duration::from_millis(100));
    unblock.store(true, Ordering::SeqCst);
    thread::sleep(Duration::from_millis(50));
    let after = sampler.capture(0, 1, TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");

    assert_eq!(blocked.map(|raw| raw.seq), Err(StackError::Timeout));
    let frames = sampler.symbolize(&after.expect("capture after unblocking"));
    assert_culprit(&frames, "spinning_culprit");
}

#[test]
fn an_unregistered_worker_is_an_error() {
    let seq = Arc::new(AtomicU64::new(1));
    let sampler = sampler(&seq);
    sampler.prepare();
    assert_eq!(
        sampler.capture(0, 1, TIMEOUT).map(|raw| raw.seq),
        Err(StackError::NotRegistered)
    );
    assert_eq!(
        sampler.capture(9, 1, TIMEOUT).map(|raw| raw.seq),
        Err(StackError::NotRegistered)
    );
}

/// The marker one "poll" of the stress worker keeps on its stack.
const MARKER: u64 = 0x5741_4c4c_0000_0000;

/// One poll of the stress worker: an even sequence number while it runs,
/// odd once it has ended, and a marker on its stack that names the poll.
#[inline(never)]
fn allocating_poll(seq: &AtomicU64, n: u64, sink: &mut Vec<String>) {
    let marker = [MARKER | n; 4];
    black_box(&marker);
    seq.store(n, Ordering::SeqCst);
    for i in 0..(n % 64) {
        sink.push(format!("poll {n} item {i}"));
    }
    if sink.len() > 4096 {
        sink.clear();
        sink.shrink_to_fit();
    }
    seq.store(n + 1, Ordering::SeqCst);
    black_box(&marker);
}

#[test]
fn stress_two_thousand_captures_of_an_allocating_worker() {
    const CAPTURES: usize = 2_000;
    let seq = Arc::new(AtomicU64::new(1));
    let sampler = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let (worker_seq, worker_stop) = (seq.clone(), stop.clone());
    let worker = spawn_worker(&sampler, move |stalling| {
        stalling.store(true, Ordering::SeqCst);
        let mut sink = Vec::new();
        let mut n = 2;
        while !worker_stop.load(Ordering::Relaxed) {
            allocating_poll(&worker_seq, n, &mut sink);
            n += 2;
        }
        n / 2
    });

    // The other worker: allocation-heavy too, never signalled, sharing the
    // allocator with the captured one.
    let other_stop = stop.clone();
    let other = thread::spawn(move || {
        let mut sink = Vec::new();
        let mut rounds = 0u64;
        while !other_stop.load(Ordering::Relaxed) {
            sink.push(vec![rounds; (rounds % 512) as usize]);
            if sink.len() > 1024 {
                sink.clear();
            }
            rounds += 1;
            if rounds.is_multiple_of(256) {
                // Busy, but on two shared cores leave the captured worker
                // some turns, or the test measures the scheduler.
                thread::sleep(Duration::from_micros(200));
            }
        }
        rounds
    });

    let (mut taken, mut wrong_poll, mut symbolized) = (0, 0, 0);
    let started = Instant::now();
    for i in 0..CAPTURES {
        let expected = loop {
            let now = seq.load(Ordering::SeqCst);
            if now.is_multiple_of(2) {
                break now;
            }
        };
        match sampler.capture(0, expected, TIMEOUT) {
            Ok(raw) => {
                taken += 1;
                assert_eq!(raw.seq, expected);
                let marker = (MARKER | expected).to_ne_bytes();
                assert!(
                    raw.stack.windows(8).any(|w| w == marker),
                    "capture {i}: the stack of poll {expected} lacks its marker"
                );
                if i.is_multiple_of(200) {
                    let frames = sampler.symbolize(&raw);
                    assert!(
                        find(&frames, "allocating_poll").is_some(),
                        "{}",
                        show(&frames)
                    );
                    symbolized += 1;
                }
            }
            Err(StackError::WrongPoll { expected: e, found }) => {
                assert_eq!(e, expected);
                assert!(found > expected);
                wrong_poll += 1;
            }
            Err(other) => panic!("capture {i}: {other}"),
        }
    }
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let polls = worker.join().expect("worker");
    other.join().expect("other worker");
    println!(
        "stress: {CAPTURES} captures in {elapsed:?}: {taken} taken (marker checked), \
         {wrong_poll} discarded as a later poll, {symbolized} symbolized; worker ran {polls} polls"
    );
    assert_eq!(taken + wrong_poll, CAPTURES);
    assert!(taken > 0);
}

#[test]
fn two_samplers_on_one_thread_each_get_their_capture() {
    let seq = Arc::new(AtomicU64::new(4));
    let first = sampler(&seq);
    let second = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let also = second.clone();
    let worker = spawn_worker(&first, move |stalling| {
        also.register_current_thread(0);
        spinning_culprit(stalling, &worker_stop)
    });
    let a = first.capture(0, 4, TIMEOUT);
    let b = second.capture(0, 4, TIMEOUT);
    drop(first);
    let c = second.capture(0, 4, TIMEOUT);
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");
    assert!(a.is_ok() && b.is_ok() && c.is_ok(), "{a:?} {b:?} {c:?}");
}

/// VmRSS of this process, in KiB.
fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Prints the costs: `cargo test -p stall-watch stack::tests::costs -- --nocapture`.
#[test]
fn costs() {
    const ROUNDS: usize = 200;
    let seq = Arc::new(AtomicU64::new(1));
    let sampler = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let worker = spawn_worker(&sampler, move |stalling| {
        spinning_culprit(stalling, &worker_stop)
    });
    let mut handler_ns = Vec::new();
    let mut round_trip = Vec::new();
    let mut copied = Vec::new();
    let mut last = None;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let raw = sampler.capture(0, 1, TIMEOUT).expect("capture");
        round_trip.push(started.elapsed());
        handler_ns.push(raw.handler_ns);
        copied.push(raw.stack.len());
        last = Some(raw);
    }
    let raw = last.expect("a capture");
    assert_eq!((raw.worker, raw.seq, raw.truncated), (0, 1, false));
    let registers = format!(
        "pc {:#x} sp {:#x} fp {:#x} lr {:#x}",
        raw.pc, raw.sp, raw.fp, raw.lr
    );
    let rss_before = resident_kib();
    let started = Instant::now();
    sampler.prepare();
    let prepare = started.elapsed();
    let started = Instant::now();
    let frames = sampler.symbolize(&raw);
    let first = started.elapsed();
    let started = Instant::now();
    let again = sampler.symbolize(&raw);
    let cached = started.elapsed();
    let addresses = sampler.cached_addresses();
    let rss_growth = resident_kib().saturating_sub(rss_before);
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");

    assert_eq!(frames, again);
    handler_ns.sort_unstable();
    round_trip.sort_unstable();
    let pct = |p: usize| p * (ROUNDS - 1) / 100;
    println!(
        "costs over {ROUNDS} captures of a spinning thread:\n\
         \x20 time in handler: median {} ns, p99 {} ns, max {} ns ({} bytes of stack copied)\n\
         \x20 capture round trip: median {:?}, p99 {:?}, max {:?}\n\
         \x20 last capture: {registers}\n\
         \x20 prepare (list modules, read unwind tables): {prepare:?}\n\
         \x20 symbolize {} frames: first {first:?}, cached {cached:?} ({addresses} addresses cached)\n\
         \x20 resident memory added by prepare + first symbolize: {rss_growth} KiB \
         (meaningful with --test-threads=1)\n\
         \x20 buffer per worker: {} bytes (stack_bytes {STACK_BYTES}); signal {}\n{}",
        handler_ns[pct(50)],
        handler_ns[pct(99)],
        handler_ns[ROUNDS - 1],
        copied[0],
        round_trip[pct(50)],
        round_trip[pct(99)],
        round_trip[ROUNDS - 1],
        frames.len(),
        sampler.buffer_bytes_per_worker(),
        sampler.signal(),
        show(&frames),
    );
}

#[test]
fn inlined_names_lose_their_generic_arguments_only() {
    use super::symbols::without_generic_arguments as short;
    let short = |name: &str| short(name.to_owned());
    assert_eq!(
        short("poll<tokio::Stage<{async_block_env#1}>, alloc::sync::Arc<H>>"),
        "poll"
    );
    assert_eq!(short("{closure#0}<F, S>"), "{closure#0}");
    assert_eq!(
        short("std::thread::local::LocalKey<T>::with"),
        "std::thread::local::LocalKey<T>::with"
    );
    assert_eq!(
        short("<core::panic::AssertUnwindSafe<F> as FnOnce<()>>::call_once"),
        "<core::panic::AssertUnwindSafe<F> as FnOnce<()>>::call_once"
    );
    assert_eq!(short("sleeping_culprit"), "sleeping_culprit");
    assert_eq!(short("<>"), "<>");
    // A function type's `->` among the arguments (axum's handler futures).
    assert_eq!(
        short("{async_block#0}<fn(State<S>) -> handler::{async_fn_env#0}, Result<R, E>>"),
        "{async_block#0}"
    );
    assert_eq!(
        short("poll<Pin<Box<dyn Future<Output=R>>>, fn(R) -> Result<R, Infallible>>"),
        "poll"
    );
}

#[test]
fn user_code_is_neither_std_nor_a_dependency() {
    use super::symbols::is_user_file;
    assert!(is_user_file("/app/src/scenarios/block_sleep.rs"));
    assert!(is_user_file("src/main.rs"));
    assert!(!is_user_file(
        "/rustc/59807616e1fa2540724bfbac14d7976d7e4a3860/library/std/src/thread/functions.rs"
    ));
    assert!(!is_user_file(
        "/home/me/.rustup/toolchains/stable/lib/rustlib/src/rust/library/core/src/hint.rs"
    ));
    assert!(!is_user_file(
        "/home/me/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/tokio-1.54.0/src/runtime/park.rs"
    ));
    assert!(!is_user_file(
        "/usr/local/cargo/registry/src/index.crates.io-1949cf8c6b5b557f/axum-0.8.9/src/routing/mod.rs"
    ));
    assert!(!is_user_file(
        "/home/me/.cargo/git/checkouts/tokio-1234/abcd/tokio/src/lib.rs"
    ));
}

/// What the watcher will do: tokio's poll hooks register the worker thread
/// and count polls; a task blocks its worker in `sleeping_culprit`.
#[test]
fn a_task_blocking_a_tokio_worker_is_captured() {
    use std::cell::Cell;
    thread_local! {
        static REGISTERED: Cell<bool> = const { Cell::new(false) };
    }
    let seq = Arc::new(AtomicU64::new(0));
    let sampler = sampler(&seq);
    let (hook_seq, hook_sampler) = (seq.clone(), sampler.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .on_before_task_poll(move |_| {
            if tokio::runtime::worker_index() != Some(0) {
                return;
            }
            if !REGISTERED.get() {
                hook_sampler.register_current_thread(0);
                REGISTERED.set(true);
            }
            hook_seq.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .expect("runtime");
    let stalling = Arc::new(AtomicBool::new(false));
    let task_stalling = stalling.clone();
    let task =
        runtime.spawn(async move { sleeping_culprit(&task_stalling, Duration::from_millis(300)) });
    while !stalling.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(30));
    let raw = sampler.capture(0, seq.load(Ordering::SeqCst), TIMEOUT);
    let slept = runtime.block_on(task).expect("task");

    assert!(slept >= Duration::from_millis(300), "slept only {slept:?}");
    let raw = raw.expect("capture");
    let frames = sampler.symbolize(&raw);
    println!(
        "tokio worker: {} bytes of stack from sp to the thread's top (copy truncated: {}), {} frames:\n{}",
        raw.stack.len(),
        raw.truncated,
        frames.len(),
        show(&frames)
    );
    assert_culprit(&frames, "sleeping_culprit");

    // Reading only the units of the stack names every frame as addr2line
    // does from the whole module.
    let reference = sampler.symbolize_with_addr2line(&raw);
    assert_eq!(
        frames,
        reference,
        "per unit:\n{}\naddr2line:\n{}",
        show(&frames),
        show(&reference)
    );
}

/// `block_in_place` hands a worker to another thread, and the first thread
/// may take it back: the last thread registered is the one captured.
#[test]
fn a_worker_that_moves_threads_is_captured_on_the_last_one_registered() {
    let seq = Arc::new(AtomicU64::new(2));
    let sampler = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let (go_back, back) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let (first_stop, first_go_back, first_back) = (stop.clone(), go_back.clone(), back.clone());
    let first_sampler = sampler.clone();
    let first = spawn_worker(&sampler, move |stalling| {
        stalling.store(true, Ordering::SeqCst);
        while !first_go_back.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(1));
        }
        first_sampler.register_current_thread(0);
        first_back.store(true, Ordering::SeqCst);
        spinning_culprit(&AtomicBool::new(false), &first_stop)
    });
    let first_tid = sampler.registered_tid(0);
    let second_sampler = sampler.clone();
    let second_stop = stop.clone();
    let second = thread::spawn(move || {
        second_sampler.register_current_thread(0);
        let mut n = 0u64;
        while !second_stop.load(Ordering::Relaxed) {
            n = black_box(n + 1);
        }
        n
    });
    while sampler.registered_tid(0) == first_tid {
        thread::sleep(Duration::from_millis(1));
    }
    let on_second = sampler
        .capture(0, 2, TIMEOUT)
        .expect("capture on the second thread");
    go_back.store(true, Ordering::SeqCst);
    while !back.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(1));
    }
    thread::sleep(Duration::from_millis(30));
    let on_first = sampler
        .capture(0, 2, TIMEOUT)
        .expect("capture on the first thread again");
    stop.store(true, Ordering::SeqCst);
    first.join().expect("first");
    second.join().expect("second");

    assert_eq!(sampler.registered_tid(0), first_tid);
    let frames = sampler.symbolize(&on_second);
    assert!(
        find(&frames, "spinning_culprit").is_none(),
        "{}",
        show(&frames)
    );
    assert_culprit(&sampler.symbolize(&on_first), "spinning_culprit");
}

#[inline(never)]
fn clock_reading_culprit(stalling: &AtomicBool, stop: &AtomicBool) -> Duration {
    stalling.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let mut last = started;
    while !stop.load(Ordering::Relaxed) {
        last = black_box(Instant::now());
    }
    last - started
}

/// A loop on `Instant::now()` spends most of its time in the vDSO, which has
/// no file: its unwind tables are read from memory.
#[test]
fn a_loop_reading_the_clock_unwinds_through_the_vdso() {
    let seq = Arc::new(AtomicU64::new(1));
    let sampler = sampler(&seq);
    let stop = Arc::new(AtomicBool::new(false));
    let worker_stop = stop.clone();
    let worker = spawn_worker(&sampler, move |stalling| {
        clock_reading_culprit(stalling, &worker_stop)
    });
    let captures: Vec<_> = (0..50)
        .map(|_| sampler.capture(0, 1, TIMEOUT).expect("capture"))
        .collect();
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");

    let mut in_vdso = 0;
    for raw in &captures {
        let frames = sampler.symbolize(raw);
        assert_culprit(&frames, "clock_reading_culprit");
        if frames.iter().any(|f| f.function.contains("vdso")) {
            in_vdso += 1;
        }
    }
    println!(
        "clock loop: {in_vdso} of 50 captures were in the vDSO; the last:\n{}",
        show(&sampler.symbolize(&captures[49]))
    );
}

/// Reading one unit at a time names what addr2line names from the whole
/// module, over functions all through this test binary, or through the
/// binary named by `STALL_WATCH_COMPARE_WITH` (a release build, where Rust
/// emits references between units):
/// `STALL_WATCH_COMPARE_WITH=target/release/stall-lab cargo test --release
/// -p stall-watch names_agree_with_addr2line -- --nocapture`.
#[test]
fn names_agree_with_addr2line() {
    let path = std::env::var_os("STALL_WATCH_COMPARE_WITH")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().expect("test binary"));
    let started = Instant::now();
    let (compared, differ) = super::symbols::compare_with_addr2line(&path, 3);
    println!(
        "{compared} addresses of {} compared in {:?}; {} differ",
        path.display(),
        started.elapsed(),
        differ.len()
    );
    assert!(compared > 500, "only {compared} functions sampled");
    assert!(
        differ.is_empty(),
        "{} of {compared} differ, such as:\n{}",
        differ.len(),
        differ
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}
