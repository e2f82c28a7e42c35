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
/// per worker, which task is being polled and since when (see
/// [`stall_watch::Watch::install`]).
pub fn build(
    config: &RuntimeConfig,
    watch: Option<&stall_watch::Watch>,
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
        watch.install(&mut builder);
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
