//! Telemetry: the *only* module that touches the global `tracing` subscriber.
//!
//! The subscriber is a `Registry` with three layers, each with its **own**
//! filter (per-layer filtering, `Layer::with_filter`), because the three
//! consumers want very different things:
//!
//! | layer                 | sees                                   | why                                              |
//! |-----------------------|----------------------------------------|--------------------------------------------------|
//! | fmt (stderr logs)     | `RUST_LOG`, else `telemetry.log`       | human logs                                       |
//! | OpenTelemetry (OTLP)  | INFO+ app spans, never tokio/exporter  | Jaeger must show requests, not tokio's internals |
//! | tokio-console         | `tokio=trace,runtime=trace`            | the console *is* tokio's internal instrumentation |
//!
//! One file per concern:
//!
//! - [`init`](init()) composes the rest and returns the [`Telemetry`] handle,
//!   whose [`shutdown`](Telemetry::shutdown) never waits longer than its
//!   timeout (plus a small margin), even when the collector is gone.
//! - `settings`: the `[telemetry]` section; `env`: the `OTEL_*`,
//!   `TOKIO_CONSOLE_*` and `RUST_LOG` overrides on top of it.
//! - `filters`: each layer's static filter; `layers`: the layers, and the
//!   console's gate around them.
//! - `export`: the tracer provider and its OTLP exporter, which never need
//!   the application runtime, so spans leave the process while every app
//!   worker is blocked; counts what was exported and dropped.
//! - `console`: the tokio-console server on a listener *we* bind, so a busy
//!   port is an `Err` from [`init`](init()) instead of a panic in a
//!   background thread, and port 0 works.
//! - `side_thread`: the side thread with its own runtime that the gRPC
//!   exporter and the console server run on.
//! - `console_budget`: which tokio tasks the console records, decided by a
//!   gate around the whole subscriber so that a refused task has no span at
//!   all; the same gate keeps side runtimes' tasks out of the console
//!   ([`keep_this_thread_out_of_the_console`]). A per-thread dynamic
//!   *filter* would make every callsite "sometimes" interesting and cost on
//!   every disabled `trace!` in the process.
//! - `lean_filter`: `EnvFilter` without its per-span bookkeeping.
//! - `propagation`: W3C `traceparent` out; `request_span`: each request's
//!   server span, made with the OpenTelemetry SDK (it reads `traceparent`
//!   in), the context its children find it in, its events, and the link
//!   from a stall's span to it.
//!
//! With OTLP export off there is no OpenTelemetry layer and no request span
//! at all: telemetry off means no per-request tracing cost (and no trace
//! ids).

mod console;
mod console_budget;
mod env;
mod export;
mod filters;
mod init;
mod layers;
mod lean_filter;
mod propagation;
mod request_span;
mod settings;
mod side_thread;

pub use console_budget::{
    BudgetSnapshot, ConsoleBudget, keep_this_thread_out_of_the_console, out_of_the_console,
};
pub use export::{ExportCounters, ExportSnapshot, ShutdownReport};
pub use init::{Telemetry, init};
pub use propagation::inject_headers;
pub use request_span::{RequestSpan, add_event, link_stall_span};
pub use settings::{OtlpProtocol, TelemetryConfig};

/// Name used for `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "stall-lab";

/// Facts about the app runtime that go into the OTLP resource.
#[derive(Debug, Clone)]
pub struct ResourceInfo {
    pub flavor: &'static str,
    pub workers: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The console's port could not be bound.
    #[error("tokio-console: {0:#}")]
    ConsoleBind(anyhow::Error),
    #[error("invalid {key}: {message}")]
    Config { key: &'static str, message: String },
    #[error("building the OTLP {protocol} exporter for {endpoint} failed: {source}")]
    Exporter {
        protocol: OtlpProtocol,
        endpoint: String,
        #[source]
        source: opentelemetry_otlp::ExporterBuildError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a global tracing subscriber is already installed (telemetry::init called twice?): {0}"
    )]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}
