//! stall-lab: an axum server that makes visible what is (and is not) parallel
//! about async Rust.
//!
//! Layout, one concept per module:
//!
//! - [`cli`]: the command line (`stall-lab serve`), exit codes.
//! - [`config`]: layered configuration: embedded defaults, file, env, flags.
//! - [`runtime`]: the only place that builds the application runtime.
//! - [`telemetry`]: the only place that touches the subscriber stack.
//! - [`net`]: binding a listener before its runtime exists.
//! - [`server`]: bind, announce `listening: …`, serve, drain on shutdown.
//! - [`shutdown`]: the SIGINT/SIGTERM future.
//! - [`app`]: the router, fallbacks and middleware.
//! - [`request`]: runs every request in its own named, measured task.
//! - [`arrival`]: a listener whose connections keep the kernel's receive
//!   timestamp, so a request knows how long it waited to be read.
//! - [`measure`]: poll statistics of a future (polls, busy, longest poll,
//!   scheduling delay, workers).
//! - [`report`]: the JSON answer every scenario gives.
//! - [`scenarios`]: one module per route, each a lesson.
//! - [`stall`]: the stall watcher: per-worker poll hooks, a watcher thread,
//!   stall records and `executor.stall` spans.
//! - [`admin`]: the admin server on its own thread and runtime: dashboard,
//!   `/debug/runtime`, `/debug/stalls`, `/debug/events`.
//! - [`load`]: `stall-lab load`, the load generator (open loop with
//!   coordinated-omission correction, or closed loop; HdrHistogram).
//! - [`experiment`]: `stall-lab experiment`, the claims measured on
//!   in-process servers, written as a report with charts.
//! - [`params`], [`budget`], [`error`], [`state`], [`cpu`]: the handlers'
//!   toolbox: validated `ms`/`n`, the stall budget, the JSON error shape,
//!   shared state, and time-bounded CPU work.

mod admin;
pub mod app;
mod arrival;
mod budget;
pub mod cli;
pub mod config;
mod cpu;
mod error;
mod experiment;
mod load;
mod measure;
mod net;
mod params;
mod report;
mod request;
pub mod runtime;
mod scenario;
pub mod scenarios;
pub mod server;
mod shutdown;
pub mod state;
pub mod telemetry;
