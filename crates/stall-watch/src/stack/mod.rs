//! The held worker's stack, captured while it is held.
//!
//! The watcher thread knows *that* a worker is stuck in one poll; this module
//! tells it *where*. It is the only module of the crate allowed `unsafe`:
//! a signal handler, a process-wide table it reads, and raw copies of another
//! frame's stack.
//!
//! How a capture goes (Linux x86_64 and aarch64):
//!
//! 1. The watcher calls [`Sampler::capture`]: it flips that worker's slot from
//!    idle to *requested* and sends the worker thread a realtime signal with
//!    `tgkill` ([`signal`]).
//! 2. The handler runs on the worker, between two instructions of whatever it
//!    was doing. It only does async-signal-safe work: it finds the slot by
//!    `gettid` in a static table, copies the interrupted registers (pc, sp,
//!    fp, and lr on aarch64) from the `ucontext` and the raw stack bytes from
//!    sp upwards into a buffer allocated in advance, notes which poll it
//!    interrupted, and marks the slot *done*. No allocation, no lock, no
//!    unwinding: unwinders can take locks and allocate (backtrace-rs#742), and
//!    pprof-rs was seen to deadlock doing it in a handler.
//! 3. Back on the watcher, the copy is discarded unless it was taken during
//!    the very poll the watcher asked about.
//! 4. [`Sampler::symbolize`], off the worker, unwinds the copied bytes with
//!    the DWARF call-frame information of each loaded module (`.eh_frame`,
//!    via framehop: [`unwind`]) and names each return address with its
//!    function, file and line, inlined frames included, reading only the
//!    DWARF of the functions on the stack through an index of each
//!    function's and line sequence's addresses ([`symbols`], [`dwarf`],
//!    [`index`]),
//!    with a cache by address.
//!
//! Why copy and unwind later rather than walk frame pointers in the handler:
//! std and glibc keep no frame pointer, so a frame-pointer walk from a thread
//! in `std::thread::sleep` skips the caller of `sleep` — the very frame that
//! names the culprit. DWARF unwinding gets it, and it needs no rebuild of std.
//!
//! # Wiring it to the watcher
//!
//! - One [`Sampler`] per monitor: `Sampler::new(workers, 64 * 1024,
//!   poll_seq)`. 64 KiB of stack per worker is ample: a tokio worker blocked
//!   in a task measured 6.4 KiB from its stack pointer to its thread's top in
//!   a release build, 12.6 KiB in a debug build.
//! - `poll_seq(worker)` must change when the poll *ends*, not only when the
//!   next one starts, or a capture landing between two polls passes for the
//!   stalled one. With the worker slots' `poll_seq` and `poll_started`:
//!   `if poll_started == 0 { u64::MAX } else { poll_seq }` (two atomic
//!   loads; the handler runs on the worker itself, so it sees the hooks'
//!   stores in program order).
//! - In the before-poll hook: when the worker slot's thread id is not the
//!   one this thread registered (kept in a thread-local), register again.
//!   That registers each worker thread once, and again whenever
//!   `block_in_place` moved the worker (`crate::hooks`).
//! - On the watcher, for a poll `seq` past the threshold:
//!   `capture(worker, seq, timeout)`. [`StackError::Timeout`] (the worker
//!   was not scheduled in time) and [`StackError::WrongPoll`] (the poll
//!   ended) mean "nothing to attach"; try again at the next tick if the stall
//!   goes on. Then [`Sampler::symbolize`], off the watcher (the namer
//!   thread, `crate::namer`), which calls [`Sampler::prepare`] as it starts
//!   and [`Sampler::index_step`] while idle: 30 ms and then about 0.1 s of
//!   CPU for stall-lab's release binary, 1.4 MB of index, after which a
//!   stack of new code is named in a few milliseconds.
//!
//! Elsewhere the module is a stub: [`Sampler::new`] says
//! [`StackError::Unsupported`], so the crate builds everywhere.

#![allow(unsafe_code)]

use std::fmt;

use serde::Serialize;

/// The items that exist only where capture is implemented.
macro_rules! where_supported {
    ($($item:item)*) => {$(
        #[cfg(all(
            target_os = "linux",
            any(target_arch = "x86_64", target_arch = "aarch64")
        ))]
        $item
    )*};
}

where_supported! {
    mod dwarf;
    mod index;
    mod names;
    mod signal;
    mod symbols;
    mod unwind;
    pub(crate) use signal::Sampler;
}

#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod stub;
#[cfg(not(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
pub(crate) use stub::Sampler;

#[cfg(all(
    test,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod tests;

/// Whether stack capture works on this platform.
pub(crate) const SUPPORTED: bool = cfg!(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
));

/// Where a stack was held, in words: the top frame in the service's own
/// code and what it called, e.g. `at src/report.rs:42 in std::thread::sleep`;
/// the function itself when what it called is a `core` primitive inlined
/// into a loop (a busy loop). Paths under the working directory are shown
/// relative to it.
pub(crate) fn where_held(stack: &[Frame]) -> Option<String> {
    let top = stack.iter().position(|f| f.user_code)?;
    let frame = &stack[top];
    let callee = top
        .checked_sub(1)
        .map(|i| &stack[i])
        .filter(|c| {
            !c.file
                .as_deref()
                .is_some_and(|f| f.contains("library/core/"))
        })
        .unwrap_or(frame);
    let at = match (&frame.file, frame.line) {
        (Some(file), Some(line)) => format!("at {}:{line} ", relative(file)),
        (Some(file), None) => format!("at {} ", relative(file)),
        _ => String::new(),
    };
    Some(format!("{at}in {}", callee.function))
}

/// `file` relative to the working directory, when it is below it.
fn relative(file: &str) -> &str {
    static CWD: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let cwd = CWD.get_or_init(|| {
        std::env::current_dir()
            .ok()
            .and_then(|d| d.to_str().map(|d| format!("{}/", d.trim_end_matches('/'))))
    });
    cwd.as_deref()
        .and_then(|cwd| file.strip_prefix(cwd))
        .unwrap_or(file)
}

#[cfg(test)]
mod where_held_tests {
    use super::*;

    fn frame(function: &str, file: &str, user_code: bool) -> Frame {
        Frame {
            function: function.into(),
            file: Some(file.into()),
            line: Some(7),
            user_code,
        }
    }

    #[test]
    fn names_the_users_line_and_what_it_called() {
        let sleep = [
            frame("clock_nanosleep", "libc", false),
            frame(
                "std::thread::sleep",
                "/rustc/x/library/std/src/thread/mod.rs",
                false,
            ),
            frame("app::handler", "/srv/app/src/main.rs", true),
        ];
        assert_eq!(
            where_held(&sleep).unwrap(),
            "at /srv/app/src/main.rs:7 in std::thread::sleep"
        );
        let spin = [
            frame(
                "core::iter::range::next",
                "/rustc/x/library/core/src/iter/range.rs",
                false,
            ),
            frame("app::burn", "/srv/app/src/cpu.rs", true),
        ];
        assert_eq!(
            where_held(&spin).unwrap(),
            "at /srv/app/src/cpu.rs:7 in app::burn"
        );
        assert_eq!(where_held(&sleep[..2]), None);
    }
}

/// A stack as text, one frame a line (for `code.stacktrace`).
pub(crate) fn render(stack: &[Frame]) -> String {
    stack.iter().map(|f| format!("{f}\n")).collect()
}

impl fmt::Display for Frame {
    /// `at src/main.rs:12 in my_app::handler`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "at {file}:{line} in {}", self.function),
            (Some(file), None) => write!(f, "at {file} in {}", self.function),
            _ => write!(f, "in {}", self.function),
        }
    }
}

/// One frame of a captured stack, innermost first: the function, and where
/// in its source the worker was (or, for callers, where the call is).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Frame {
    /// The demangled function name without its hash, such as
    /// `std::thread::sleep`; for a function without debug information, its
    /// symbol (`clock_nanosleep`), or its address in hex if it has none.
    pub function: String,
    /// The source file, as recorded in the debug information (absolute, or
    /// relative to where it was compiled); `None` without line tables.
    pub file: Option<String>,
    /// The line in `file`.
    pub line: Option<u32>,
    /// Whether this frame is the application's own code: it has a source
    /// file, and that file is not part of Rust's standard library nor of a
    /// dependency (cargo registry or git checkout), and it is not in a system
    /// library such as libc. The first such frame is where to look.
    pub user_code: bool,
}

/// The registers and stack bytes of one worker, copied by the signal handler
/// during one poll. Unwound and named by [`Sampler::symbolize`].
#[derive(Debug, Clone)]
pub(crate) struct RawStack {
    /// The worker it was taken from.
    pub(crate) worker: usize,
    /// The poll it interrupted (equal to the `expected_seq` it was asked for).
    pub(crate) seq: u64,
    /// The interrupted instruction.
    pub(crate) pc: u64,
    /// The interrupted stack pointer: `stack[0]` is the byte at this address.
    pub(crate) sp: u64,
    /// The interrupted frame pointer (rbp / x29).
    pub(crate) fp: u64,
    /// The link register (x30) on aarch64; 0 on x86_64.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    pub(crate) lr: u64,
    /// The stack from `sp` up to the top of the thread's stack, or up to the
    /// sampler's `stack_bytes`, whichever is lower.
    pub(crate) stack: Vec<u8>,
    /// Whether the copy stopped at `stack_bytes` before the top of the
    /// stack: the outermost frames may then be missing.
    pub(crate) truncated: bool,
    /// Time spent in the signal handler, in nanoseconds (CLOCK_MONOTONIC).
    pub(crate) handler_ns: u64,
}

/// Why no stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StackError {
    /// Not Linux on x86_64 or aarch64.
    #[cfg_attr(target_os = "linux", allow(dead_code))] // made by the stub only
    Unsupported,
    /// No realtime signal was free for the handler, or `sigaction` failed
    /// (the errno).
    Install(i32),
    /// The worker index is out of range, or its thread has not registered.
    NotRegistered,
    /// A capture of this worker is already in progress.
    Busy,
    /// `tgkill` failed (the errno): typically the thread has exited.
    Signal(i32),
    /// The handler did not run within the timeout (the thread blocks the
    /// signal, or is not scheduled).
    Timeout,
    /// The handler ran during another poll than the one asked about: the
    /// stalled poll had ended. The copy is discarded.
    WrongPoll {
        /// The poll asked about.
        expected: u64,
        /// The poll the handler interrupted.
        found: u64,
    },
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unsupported => {
                f.write_str("stack capture is supported on Linux x86_64 and aarch64 only")
            }
            Self::Install(errno) => {
                write!(f, "cannot install the stack signal handler (errno {errno})")
            }
            Self::NotRegistered => f.write_str("that worker's thread has not registered"),
            Self::Busy => f.write_str("a capture of that worker is already in progress"),
            Self::Signal(errno) => write!(f, "cannot signal the worker thread (errno {errno})"),
            Self::Timeout => f.write_str("the worker did not run the stack signal handler in time"),
            Self::WrongPoll { expected, found } => write!(
                f,
                "the capture landed in poll {found}, not in the stalled poll {expected}"
            ),
        }
    }
}

impl std::error::Error for StackError {}
