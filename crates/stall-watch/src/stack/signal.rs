//! The capture: a realtime signal, a handler that copies registers and stack
//! bytes, and the slot protocol that hands the copy to the watcher.
//!
//! # The signal
//!
//! A realtime signal, the highest one (`SIGRTMAX`, 64 with glibc) whose
//! disposition is still the default when the first sampler is made. Not
//! `SIGPROF`: profilers (perf's user-space helpers, pprof-rs, gperftools) own
//! it, and sharing it would corrupt both. Not `SIGUSR1`/`SIGUSR2`: runtimes
//! and applications use them freely (the JVM's suspend signal is `SIGUSR2`).
//! Realtime signals have no fixed meaning, glibc keeps the lowest ones for
//! itself (`SIGRTMIN` is already past them), and applications that use
//! realtime signals for timers count up from `SIGRTMIN`, so the top of the
//! range is the least likely to collide. Realtime signals also queue rather
//! than merge, so a second capture request is never lost in a first.
//!
//! Flags: `SA_SIGINFO` for the `ucontext` (the interrupted registers),
//! `SA_RESTART` so an interrupted `read`, `write`, `futex` or `accept`
//! resumes instead of failing with `EINTR` (`nanosleep` is never restarted by
//! the kernel, but `std::thread::sleep` loops on `EINTR` with the time left),
//! `SA_ONSTACK` so the handler runs on the thread's alternate signal stack
//! when it has one (std gives every thread it spawns one) and never adds to a
//! deep stack.
//!
//! # The slot protocol
//!
//! Each worker has a [`Slot`]: a buffer allocated in advance, and a state:
//!
//! ```text
//!   IDLE ──watcher: capture()──► REQUESTED ──handler──► WRITING ──handler──► DONE
//!    ▲                              │                                         │
//!    └──── watcher: timeout (CAS) ──┘                 watcher: copy out ──────┘
//! ```
//!
//! Only the handler moves REQUESTED → WRITING, only with a compare-and-swap,
//! and the watcher takes the slot back on timeout only with a compare-and-swap
//! from REQUESTED: if that fails the handler is writing, and the watcher waits
//! for DONE. So the buffer is never read while written, and never reused while
//! a handler may still write it. A signal that arrives late finds the slot
//! IDLE (or requested by a newer capture, which it then serves correctly).
//!
//! # The thread table
//!
//! The handler must find its slot without thread-locals (a `thread_local!`
//! may allocate on first access) and without locks: a static table of
//! [`TABLE_SIZE`] entries maps a kernel thread id to a slot. Each entry is
//! written by the thread it names, when it registers, and carries that
//! thread's stack bounds. Entries are freed only after the slot pointer is
//! cleared *and* no handler is inside the entry (`active` counts them), so a
//! handler never follows a pointer to a freed slot.

use std::cell::UnsafeCell;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU8, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::symbols::Symbolizer;
use super::{Frame, RawStack, StackError};

/// Slot states; see the module docs.
const IDLE: u8 = 0;
const REQUESTED: u8 = 1;
const WRITING: u8 = 2;
const DONE: u8 = 3;

/// Threads that can be registered at once, over all samplers of the process.
/// A tokio runtime has one entry per worker thread (plus one per thread that
/// took a worker over after `block_in_place`).
const TABLE_SIZE: usize = 512;

/// No entry: `Slot::entry` before registration.
const NO_ENTRY: usize = usize::MAX;

/// The poll-sequence reader the handler calls (see [`Sampler::new`]).
type PollSeq = Arc<dyn Fn(usize) -> u64 + Send + Sync>;

/// What the handler leaves for the watcher besides the stack bytes.
#[derive(Debug, Default, Clone, Copy)]
struct Capture {
    seq_before: u64,
    seq_after: u64,
    pc: u64,
    sp: u64,
    fp: u64,
    lr: u64,
    len: usize,
    truncated: bool,
    handler_ns: u64,
}

/// One worker's capture buffer and state.
struct Slot {
    worker: usize,
    state: AtomicU8,
    /// The kernel thread id registered for this worker (0: none yet). The
    /// handler serves the slot only on this thread.
    tid: AtomicI32,
    /// Index of this slot's entry in [`TABLE`], or [`NO_ENTRY`].
    entry: AtomicUsize,
    poll_seq: PollSeq,
    /// Written by the handler in WRITING only; read by the watcher in DONE only.
    capture: UnsafeCell<Capture>,
    /// `stack_bytes` long. Same rule as `capture`.
    buf: UnsafeCell<Box<[u8]>>,
}

// SAFETY: the `UnsafeCell`s are accessed under the state protocol described in
// the module docs: the handler writes them only between its REQUESTED→WRITING
// CAS and its DONE store (Release); the watcher reads them only after loading
// DONE (Acquire) and before storing IDLE. No two threads access them at once.
unsafe impl Sync for Slot {}

/// One row of the thread table.
struct Entry {
    /// The slot, or null when the entry is free or being freed.
    slot: AtomicPtr<Slot>,
    /// The thread this entry belongs to.
    tid: AtomicI32,
    /// Its stack: `[lo, hi)`, from `pthread_getattr_np`.
    stack_lo: AtomicUsize,
    stack_hi: AtomicUsize,
    /// Handlers currently inside this entry.
    active: AtomicU32,
    /// 0 free, 1 claimed.
    claimed: AtomicU8,
}

impl Entry {
    const fn new() -> Self {
        Self {
            slot: AtomicPtr::new(ptr::null_mut()),
            tid: AtomicI32::new(0),
            stack_lo: AtomicUsize::new(0),
            stack_hi: AtomicUsize::new(0),
            active: AtomicU32::new(0),
            claimed: AtomicU8::new(0),
        }
    }
}

static TABLE: [Entry; TABLE_SIZE] = [const { Entry::new() }; TABLE_SIZE];

/// The signal the handler is installed on, once per process.
static SIGNAL: OnceLock<Result<libc::c_int, StackError>> = OnceLock::new();

/// Captures the stacks of registered worker threads; see the module docs.
pub(crate) struct Sampler {
    signal: libc::c_int,
    stack_bytes: usize,
    /// Boxed so the table's pointers stay valid when the sampler moves.
    slots: Box<[Slot]>,
    /// Built on first use (reading every module's unwind tables takes a
    /// while), then reused: the unwinder, its cache and the symbol cache.
    symbolizer: Mutex<Option<Symbolizer>>,
    /// Serializes registrations (rare: once per worker thread), so two
    /// threads registering one worker cannot both keep an entry.
    registering: Mutex<()>,
}

impl Sampler {
    /// Installs the process-wide signal handler (once per process; a second
    /// `Sampler` reuses it) and preallocates one capture buffer per worker
    /// (`workers` of them, `stack_bytes` of stack copy each).
    ///
    /// `poll_seq(worker)` reads that worker's current poll sequence number.
    /// The handler calls it, on the interrupted worker, to record which poll
    /// it interrupted, so it must be async-signal-safe: load an atomic and
    /// nothing else. It should also change when the poll *ends* (not only
    /// when the next one starts), or a capture that lands between two polls
    /// is taken for the earlier one.
    pub(crate) fn new(
        workers: usize,
        stack_bytes: usize,
        poll_seq: Arc<dyn Fn(usize) -> u64 + Send + Sync>,
    ) -> Result<Sampler, StackError> {
        let signal = SIGNAL.get_or_init(install_handler).clone()?;
        let slots = (0..workers)
            .map(|worker| Slot {
                worker,
                state: AtomicU8::new(IDLE),
                tid: AtomicI32::new(0),
                entry: AtomicUsize::new(NO_ENTRY),
                poll_seq: poll_seq.clone(),
                capture: UnsafeCell::new(Capture::default()),
                buf: UnsafeCell::new(vec![0u8; stack_bytes].into_boxed_slice()),
            })
            .collect();
        Ok(Sampler {
            signal,
            stack_bytes,
            slots,
            symbolizer: Mutex::new(None),
            registering: Mutex::new(()),
        })
    }

    /// The signal number the handler is installed on.
    pub(crate) fn signal(&self) -> i32 {
        self.signal
    }

    /// Bytes allocated in advance for each worker: the stack copy and the
    /// registers.
    pub(crate) fn buffer_bytes_per_worker(&self) -> usize {
        self.stack_bytes + size_of::<Slot>()
    }

    /// Called on the worker thread (once, from its first poll hook): records
    /// its kernel thread id and its stack bounds for `worker`. Call it again
    /// from a thread that takes the worker over (after `block_in_place`); the
    /// last thread registered is the one signalled. Not for the per-poll path:
    /// it reads the thread's attributes.
    pub(crate) fn register_current_thread(&self, worker: usize) {
        let Some(slot) = self.slots.get(worker) else {
            return;
        };
        let tid = gettid();
        let Some((lo, hi)) = current_stack_bounds() else {
            return;
        };
        let _registering = self.registering.lock().unwrap_or_else(|e| e.into_inner());
        // This thread's previous entry for this slot, if any: its fields are
        // only ever written by this thread, so updating them in place is safe
        // from a handler (which runs on this thread, not concurrently).
        let old = slot.entry.load(Ordering::Acquire);
        if old != NO_ENTRY && TABLE[old].tid.load(Ordering::Relaxed) == tid {
            TABLE[old].stack_lo.store(lo, Ordering::Relaxed);
            TABLE[old].stack_hi.store(hi, Ordering::Relaxed);
            slot.tid.store(tid, Ordering::Release);
            return;
        }
        let Some(index) = TABLE.iter().position(|e| {
            e.claimed
                .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        }) else {
            tracing::warn!("stall-watch: stack table full, worker {worker} will have no stacks");
            return;
        };
        let entry = &TABLE[index];
        entry.tid.store(tid, Ordering::Relaxed);
        entry.stack_lo.store(lo, Ordering::Relaxed);
        entry.stack_hi.store(hi, Ordering::Relaxed);
        // Publish: a handler that loads this pointer sees the fields above.
        entry
            .slot
            .store(ptr::from_ref(slot).cast_mut(), Ordering::Release);
        slot.tid.store(tid, Ordering::Release);
        slot.entry.store(index, Ordering::Release);
        if old != NO_ENTRY {
            // The worker moved to this thread; the old thread's entry goes.
            release_entry(old);
        }
    }

    #[cfg(test)]
    /// The kernel thread id registered for `worker`, if any: one relaxed
    /// atomic load, cheap enough for a poll hook. A hook that caches its own
    /// thread id can compare the two and call
    /// [`Sampler::register_current_thread`] when they differ, which is how a
    /// worker that moved threads (`block_in_place` hands the worker to a new
    /// thread, and the old one may take it back) stays signalled on the
    /// right one.
    pub(crate) fn registered_tid(&self, worker: usize) -> Option<i32> {
        let tid = self.slots.get(worker)?.tid.load(Ordering::Relaxed);
        (tid != 0).then_some(tid)
    }

    /// Signals `worker`'s thread, waits up to `timeout` for the handler, and
    /// returns the copy only if the handler interrupted poll `expected_seq`
    /// (the same sequence number before and after the copy); otherwise
    /// [`StackError::WrongPoll`] or [`StackError::Timeout`]. Never returns a
    /// stack from another poll. Called on the watcher thread.
    pub(crate) fn capture(
        &self,
        worker: usize,
        expected_seq: u64,
        timeout: Duration,
    ) -> Result<RawStack, StackError> {
        let slot = self.slots.get(worker).ok_or(StackError::NotRegistered)?;
        let tid = slot.tid.load(Ordering::Acquire);
        if tid == 0 {
            return Err(StackError::NotRegistered);
        }
        slot.state
            .compare_exchange(IDLE, REQUESTED, Ordering::AcqRel, Ordering::Acquire)
            .map_err(|_| StackError::Busy)?;

        if let Err(errno) = tgkill(tid, self.signal) {
            // Not sent. A late signal from an earlier capture may still have
            // taken the request; then wait for it like any other.
            if slot
                .state
                .compare_exchange(REQUESTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return Err(StackError::Signal(errno));
            }
        }

        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            let state = slot.state.load(Ordering::Acquire);
            if state == DONE {
                break;
            }
            // Give up only if the handler has not started: if this CAS fails
            // the handler took the request just now and is writing; wait.
            if state == REQUESTED
                && started.elapsed() >= timeout
                && slot
                    .state
                    .compare_exchange(REQUESTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                return Err(StackError::Timeout);
            }
            // The handler needs the worker's CPU: on a busy machine, give it
            // ours. A few yields, then short sleeps.
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }

        // SAFETY: the state is DONE (loaded with Acquire above): the handler
        // has finished writing `capture` and `buf` (it stored DONE with
        // Release after its last write) and no other handler can start
        // writing until this thread stores IDLE below.
        let result = unsafe {
            let capture = *slot.capture.get();
            if capture.seq_before != expected_seq || capture.seq_after != expected_seq {
                Err(StackError::WrongPoll {
                    expected: expected_seq,
                    found: if capture.seq_before == expected_seq {
                        capture.seq_after
                    } else {
                        capture.seq_before
                    },
                })
            } else {
                let buf = &*slot.buf.get();
                Ok(RawStack {
                    worker,
                    seq: expected_seq,
                    pc: capture.pc,
                    sp: capture.sp,
                    fp: capture.fp,
                    lr: capture.lr,
                    stack: buf[..capture.len].to_vec(),
                    truncated: capture.truncated,
                    handler_ns: capture.handler_ns,
                })
            }
        };
        slot.state.store(IDLE, Ordering::Release);
        result
    }

    /// Does now, on the calling thread, what the first
    /// [`Sampler::symbolize`] would otherwise do: list the modules, read
    /// their unwind tables and index each one's debug information by
    /// compilation unit. Returns the units indexed. Optional; the namer
    /// thread calls it as it starts, so the first stall is named nearly as
    /// fast as the next ones.
    pub(crate) fn prepare(&self) -> usize {
        let mut symbolizer = self.symbolizer.lock().unwrap_or_else(|e| e.into_inner());
        let symbolizer = symbolizer.get_or_insert_with(Symbolizer::new);
        symbolizer.prepare();
        symbolizer.indexed_units()
    }

    #[cfg(test)]
    /// The frames of `raw` as addr2line names them from each module's
    /// whole DWARF, uncached.
    pub(crate) fn symbolize_with_addr2line(&self, raw: &RawStack) -> Vec<Frame> {
        let mut symbolizer = self.symbolizer.lock().unwrap_or_else(|e| e.into_inner());
        symbolizer
            .get_or_insert_with(Symbolizer::new)
            .symbolize_with_addr2line(raw)
    }

    /// Adds a few compilation units to the function and line index that
    /// makes naming new code fast (a few milliseconds of work); says
    /// whether units are left. Until it is complete, namings read whole
    /// units. Call it from the namer thread when it has nothing to name.
    pub(crate) fn index_step(&self) -> bool {
        let mut symbolizer = self.symbolizer.lock().unwrap_or_else(|e| e.into_inner());
        symbolizer.get_or_insert_with(Symbolizer::new).index_step()
    }

    /// Bytes held by the function and line index.
    pub(crate) fn index_bytes(&self) -> usize {
        let symbolizer = self.symbolizer.lock().unwrap_or_else(|e| e.into_inner());
        symbolizer.as_ref().map_or(0, Symbolizer::index_bytes)
    }

    /// How many addresses have their frames cached.
    pub(crate) fn cached_addresses(&self) -> usize {
        let symbolizer = self.symbolizer.lock().unwrap_or_else(|e| e.into_inner());
        symbolizer.as_ref().map_or(0, Symbolizer::cached)
    }

    /// Unwinds the copied stack (DWARF call-frame information from each
    /// module's `.eh_frame`) and names each frame (function, file, line;
    /// inlined calls expanded), innermost first. The first frame is where the
    /// worker was; no frame of the signal handler is included. Results are
    /// cached by address, so a second stall in the same code is cheap. Runs
    /// off the worker; the first call builds the unwinder.
    pub(crate) fn symbolize(&self, raw: &RawStack) -> Vec<Frame> {
        let mut symbolizer = self.symbolizer.lock().unwrap_or_else(|e| e.into_inner());
        symbolizer
            .get_or_insert_with(Symbolizer::new)
            .symbolize(raw)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        // No capture is in progress (`capture` borrows the sampler). Take
        // every entry that points into our slots out of the table;
        // `release_entry` waits for any handler still inside an entry, so none
        // touches the slots once they are freed.
        let ours = self.slots.as_ptr_range();
        for (index, entry) in TABLE.iter().enumerate() {
            let slot = entry.slot.load(Ordering::Acquire).cast_const();
            if ours.contains(&slot) {
                release_entry(index);
            }
        }
    }
}

/// Frees a table entry: clear its slot so no new handler uses it, wait for
/// the handlers inside it, then let it be claimed again.
fn release_entry(index: usize) {
    let entry = &TABLE[index];
    entry.slot.store(ptr::null_mut(), Ordering::SeqCst);
    while entry.active.load(Ordering::SeqCst) != 0 {
        std::thread::yield_now();
    }
    entry.tid.store(0, Ordering::Relaxed);
    entry.claimed.store(0, Ordering::Release);
}

/// Picks the signal and installs [`handler`] on it.
fn install_handler() -> Result<libc::c_int, StackError> {
    let signal = (libc::SIGRTMIN()..=libc::SIGRTMAX())
        .rev()
        .find(|&signal| {
            // SAFETY: reading the current action into a zeroed `sigaction`
            // (a plain C struct for which all-zero is valid); a null new
            // action means "query only".
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(signal, ptr::null(), &mut old) == 0
                    && old.sa_sigaction == libc::SIG_DFL
            }
        })
        .ok_or(StackError::Install(libc::EBUSY))?;
    // SAFETY: `action` is fully initialized (zeroed, then the fields set);
    // `handler` has the signature `SA_SIGINFO` requires and only does
    // async-signal-safe work (see its comments).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, ptr::null_mut()) != 0 {
            return Err(StackError::Install(errno()));
        }
    }
    Ok(signal)
}

/// The signal handler. Runs on the interrupted worker, between any two of its
/// instructions, so it only does async-signal-safe work: atomics, `gettid`,
/// `clock_gettime`, and plain memory copies into buffers allocated in
/// advance. It never allocates, locks, unwinds or touches a thread-local.
extern "C" fn handler(
    _signal: libc::c_int,
    _info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: `__errno_location` returns this thread's errno, always valid.
    // The syscalls below may overwrite it; the interrupted code must find it
    // unchanged.
    let saved_errno = unsafe { *libc::__errno_location() };
    let started = monotonic_ns();
    let tid = gettid();
    for entry in &TABLE {
        if entry.tid.load(Ordering::Relaxed) != tid {
            continue;
        }
        entry.active.fetch_add(1, Ordering::SeqCst);
        let slot = entry.slot.load(Ordering::SeqCst);
        // Re-check the owner now that `active` pins the entry: it may have
        // been freed and claimed by another thread since the first check.
        if !slot.is_null() && entry.tid.load(Ordering::Acquire) == tid {
            // SAFETY: a non-null slot pointer in an entry we hold `active` on
            // points to a live slot: `release_entry` clears the pointer and
            // then waits for `active` to reach 0 before the sampler frees its
            // slots. `context` is the `ucontext_t` the kernel passes to an
            // `SA_SIGINFO` handler.
            unsafe { serve(&*slot, entry, tid, context.cast(), started) };
        }
        entry.active.fetch_sub(1, Ordering::SeqCst);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved_errno };
}

/// The handler's work for one slot requested on this thread.
///
/// # Safety
///
/// Called from [`handler`] on thread `tid`, with `context` the kernel's
/// `ucontext_t`, and `entry` this thread's table entry for `slot`.
unsafe fn serve(
    slot: &Slot,
    entry: &Entry,
    tid: i32,
    context: *const libc::ucontext_t,
    started: u64,
) {
    // This thread must be the one registered for the worker now: an older
    // thread of the same worker (after `block_in_place`) is not the worker.
    if slot.tid.load(Ordering::Acquire) != tid {
        return;
    }
    if slot
        .state
        .compare_exchange(REQUESTED, WRITING, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    let seq_before = (slot.poll_seq)(slot.worker);
    // SAFETY: the kernel's ucontext is valid for the handler's duration.
    let (pc, sp, fp, lr) = registers(unsafe { &*context });
    let lo = entry.stack_lo.load(Ordering::Relaxed);
    let hi = entry.stack_hi.load(Ordering::Relaxed);
    // SAFETY: in WRITING, this handler is the only one accessing `buf` and
    // `capture` (see `Slot`).
    let buf = unsafe { &mut *slot.buf.get() };
    let sp_addr = sp as usize;
    let (len, truncated) = if lo <= sp_addr && sp_addr < hi {
        let available = hi - sp_addr;
        let len = available.min(buf.len());
        // SAFETY: `[sp, sp + len)` lies within this thread's own stack
        // `[lo, hi)`, which is mapped (sp is in use and everything above it
        // belongs to live frames or the thread's start). The thread is
        // stopped in this handler, so nothing writes those bytes meanwhile.
        // `buf` holds at least `len` bytes and does not overlap the stack.
        // Some of those bytes are padding or dead slots of the interrupted
        // frames: they are only ever read back as plain integers (return
        // addresses and saved frame pointers) by the unwinder.
        unsafe { ptr::copy_nonoverlapping(sp_addr as *const u8, buf.as_mut_ptr(), len) };
        (len, len < available)
    } else {
        // Running on a stack we did not register (a coroutine, a signal
        // stack): registers only, no bytes.
        (0, false)
    };
    let seq_after = (slot.poll_seq)(slot.worker);
    // SAFETY: as for `buf`.
    unsafe {
        *slot.capture.get() = Capture {
            seq_before,
            seq_after,
            pc,
            sp,
            fp,
            lr,
            len,
            truncated,
            handler_ns: monotonic_ns().saturating_sub(started),
        };
    }
    slot.state.store(DONE, Ordering::Release);
}

/// pc, sp, fp, lr of the interrupted code, from the `ucontext_t` the kernel
/// passes to an `SA_SIGINFO` handler.
#[cfg(target_arch = "x86_64")]
fn registers(context: &libc::ucontext_t) -> (u64, u64, u64, u64) {
    let gregs = &context.uc_mcontext.gregs;
    (
        gregs[libc::REG_RIP as usize] as u64,
        gregs[libc::REG_RSP as usize] as u64,
        gregs[libc::REG_RBP as usize] as u64,
        0,
    )
}

/// pc, sp, fp, lr of the interrupted code, from the `ucontext_t` the kernel
/// passes to an `SA_SIGINFO` handler.
#[cfg(target_arch = "aarch64")]
fn registers(context: &libc::ucontext_t) -> (u64, u64, u64, u64) {
    let mcontext = &context.uc_mcontext;
    (
        mcontext.pc,
        mcontext.sp,
        mcontext.regs[29],
        mcontext.regs[30],
    )
}

/// The calling thread's kernel id. A raw syscall: async-signal-safe, and
/// present in every libc.
fn gettid() -> i32 {
    // SAFETY: `gettid` takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Sends `signal` to thread `tid` of this process.
fn tgkill(tid: i32, signal: libc::c_int) -> Result<(), i32> {
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, signal) };
    if rc == 0 { Ok(()) } else { Err(errno()) }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// CLOCK_MONOTONIC in nanoseconds; async-signal-safe (POSIX lists
/// `clock_gettime`).
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64) * 1_000_000_000 + now.tv_nsec as u64
}

/// The calling thread's stack, `[lowest address, top)`.
fn current_stack_bounds() -> Option<(usize, usize)> {
    // SAFETY: `attr` is initialized by `pthread_getattr_np` before use and
    // destroyed after; `addr` and `size` are valid out-pointers.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = ptr::null_mut();
        let mut size: libc::size_t = 0;
        let rc = libc::pthread_attr_getstack(&attr, &mut addr, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        if rc != 0 {
            return None;
        }
        let lo = addr as usize;
        Some((lo, lo + size))
    }
}
