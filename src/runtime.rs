//! The only place that builds the application runtime.
//!
//! There is no `#[tokio::main]` anywhere in stall-lab: the flavor, the number
//! of worker threads and the size of the blocking pool are the experiment's
//! independent variables, so they come from configuration and are stated in
//! the startup log. The admin server and the exporters build their own small
//! runtimes on their own threads, precisely so they are *not* this runtime.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Flavor, RuntimeConfig};

/// Name prefix of every thread of the application runtime, workers and
/// blocking-pool threads alike (tokio names both with one function), so they
/// are easy to find in `top -H`, a profiler or a debugger.
pub const APP_THREAD_PREFIX: &str = "app-rt";

/// Builds the application runtime described by `config`.
///
/// `current_thread` has exactly one worker: the thread that calls
/// `Runtime::block_on` (here, the main thread). `multi_thread` gets
/// `effective_workers()` threads plus the main thread blocked in `block_on`,
/// which polls only the top-level future, never a request.
///
/// With `watch`, the stall watcher's poll hooks are installed: they record,
/// per worker, which task is being polled and since when, and report every
/// long poll (see [`crate::stall`]).
pub fn build(
    config: &RuntimeConfig,
    watch: Option<crate::stall::Watch>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match config.flavor {
        Flavor::CurrentThread => {
            if config.worker_threads > 1 {
                tracing::warn!(
                    worker_threads = config.worker_threads,
                    "runtime.worker_threads is ignored by the current_thread flavor: it has exactly one worker"
                );
            }
            tokio::runtime::Builder::new_current_thread()
        }
        Flavor::MultiThread => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(config.effective_workers());
            builder
        }
    };
    if let Some(watch) = watch {
        crate::stall::hooks::install(&mut builder, watch.monitor, watch.long_polls);
    }
    let counter = AtomicUsize::new(0);
    builder
        .enable_all()
        .max_blocking_threads(config.max_blocking_threads)
        .thread_name_fn(move || {
            let n = counter.fetch_add(1, Ordering::Relaxed);
            format!("{APP_THREAD_PREFIX}-{n}")
        })
        .build()
}

/// Where the calling code runs, in the words the scenario answers use:
/// `"worker N"` on an application worker, `"blocking pool"` elsewhere
/// (a `spawn_blocking` thread, or any thread outside the runtime).
pub fn current_place() -> String {
    match tokio::runtime::worker_index() {
        Some(index) => format!("worker {index}"),
        None => BLOCKING_POOL.to_owned(),
    }
}

/// `"worker N"` for the poll statistics' worker bit `N` (0..=63; workers
/// past 63 share bit 63), else `"blocking pool"`. Made once: they go into
/// every answer and every traced request.
pub fn place(worker_bit: Option<usize>) -> &'static str {
    static WORKER_NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    let names = WORKER_NAMES.get_or_init(|| (0..64).map(|n| format!("worker {n}")).collect());
    match worker_bit {
        Some(bit) => names[bit.min(63)].as_str(),
        None => BLOCKING_POOL,
    }
}

/// How answers name tokio's blocking pool.
pub const BLOCKING_POOL: &str = "blocking pool";
