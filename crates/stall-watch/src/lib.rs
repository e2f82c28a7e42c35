//! Live stall detection for tokio: which worker is held, by which request,
//! for how long, at which line, while it happens.
//!
//! A *stall* is one poll of one task that holds a worker thread longer than a
//! threshold: a handler that calls `std::thread::sleep`, does blocking IO,
//! waits on a `std::sync::Mutex` or computes for 200 ms without an `.await`.
//! Every task queued on that worker waits meanwhile. stall-watch finds each
//! stall per worker, the moment it crosses the threshold:
//!
//! - two poll hooks (tokio's `on_before_task_poll`/`on_after_task_poll`)
//!   note on each worker which task it polls and since when: a clock read
//!   and a few atomic stores per poll, nothing more;
//! - a watcher thread (a plain OS thread, so it runs while every worker is
//!   blocked) reads those notes every 5 ms, names the culprit from a
//!   registry of task ids, logs the stall, opens an `executor.stall` span,
//!   and captures the held worker's stack (Linux x86_64/aarch64), which a
//!   namer thread unwinds and names to function, file and line;
//! - finished stalls are kept with their CPU class (on-cpu, off-cpu,
//!   preempted) from the kernel's per-thread clocks.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! let watch = stall_watch::Watch::new(stall_watch::Config::default());
//! let runtime = watch
//!     .install(&mut tokio::runtime::Builder::new_multi_thread())
//!     .enable_all()
//!     .build()?;
//! # #[cfg(feature = "axum")]
//! let _admin = watch.serve_admin("127.0.0.1:3001".parse().unwrap())?; // own thread
//! runtime.block_on(async {
//!     // … your service; with axum: `.layer(watch.layer())`
//! });
//! # Ok(()) }
//! ```
//!
//! Needs `--cfg tokio_unstable` (the poll hooks and `worker_index` are
//! unstable tokio APIs): put `rustflags = ["--cfg", "tokio_unstable"]` under
//! `[build]` in `.cargo/config.toml`.
//!
//! Layout, bottom layer first (each module imports only from those above it
//! in this list):
//!
//! - `place`, `config`, `cpu`, `culprit`, `stack`: leaves (where code runs,
//!   settings, thread clocks, the culprit registry, stack capture).
//! - `monitor`: the shared state: per-worker slots, history, live stacks.
//! - `hooks`: the two poll hooks, the only code on the workers.
//! - `span`, `namer`, `watcher`: the `executor.stall` span, the thread
//!   that names captured stacks, and the watcher thread.
//! - `lag`: the lag probe task.
//! - `watch`: [`Watch`], the one type to create.
//! - `layer`, `admin` (feature `axum`): the tower layer naming culprits by
//!   route, and the admin server with the dashboard.

#![cfg_attr(docsrs, feature(doc_cfg))]

mod config;
mod cpu;
mod culprit;
mod hooks;
mod lag;
mod monitor;
mod namer;
mod place;
mod span;
mod stack;
mod watch;
mod watcher;

#[cfg(feature = "axum")]
mod admin;
#[cfg(feature = "axum")]
mod layer;

pub use config::Config;
pub use culprit::{Culprit, task_id};
pub use lag::LagView;
pub use monitor::{ActiveStall, CaptureStats, StallRecord, Stalls, WAKE_TASK_NAME, WorkerView};
pub use place::Place;
pub use stack::Frame;
pub use watch::{Tracked, Watch};

#[cfg(feature = "axum")]
pub use admin::{Admin, AdminServer};
#[cfg(feature = "axum")]
pub use layer::{TraceIds, WatchLayer, WatchService};

/// A duration as fractional milliseconds, rounded to microseconds (how every
/// figure in the views is given).
pub fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}
