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
//! Design points a reader learning tokio should notice:
//!
//! * Span export never needs the application runtime. The SDK's
//!   `BatchSpanProcessor` runs on its own OS thread; the HTTP exporter uses the
//!   *blocking* reqwest client (which owns a private runtime thread); the gRPC
//!   (tonic) exporter is built on, and every export runs on, a dedicated
//!   single-threaded runtime on an `otlp-grpc` OS thread. So when every app
//!   worker is blocked (the thing stall-lab demonstrates) spans still leave
//!   the process.
//! * The tokio-console gRPC server is run by us on a listener *we* bind, on its
//!   own `console-server` thread + runtime, so a busy port is an `Err` from
//!   [`init`] instead of a panic in a background thread, and port 0 works.
//! * With OTLP export off there is no OpenTelemetry layer at all: telemetry
//!   off means no per-request tracing cost (and no trace ids).
//! * Every filter is static (per callsite). The one per-span decision, which
//!   of tokio's task and resource spans the console records, is taken by
//!   [`console_budget::ConsoleGate`] around the whole subscriber, so that a
//!   refused span does not exist at all. The same gate keeps a side
//!   runtime's tasks out of the console
//!   ([`console_budget::keep_this_thread_out_of_the_console`]); a per-thread
//!   dynamic *filter* would make every callsite "sometimes" interesting and
//!   cost on every disabled `trace!` in the process.
//! * [`Telemetry::shutdown`] is bounded: it never waits longer than its timeout
//!   (plus a small margin), even when the collector is gone.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, global};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use serde::{Deserialize, Serialize};
use tracing::subscriber::NoSubscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::FilterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, filter};

pub mod console_budget;
mod lean_filter;
use console_budget::ConsoleGate;
pub use console_budget::{BudgetSnapshot, ConsoleBudget, keep_this_thread_out_of_the_console};
use lean_filter::LeanEnvFilter;

/// Name used for `service.name` unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "stall-lab";

/// Wire protocol of the OTLP exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies, POSTed to `<base>/v1/traces` (port 4318).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC via tonic (port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

impl OtlpProtocol {
    /// Parses the values the OpenTelemetry spec uses in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http/protobuf" => Some(Self::HttpProtobuf),
            "grpc" => Some(Self::Grpc),
            _ => None,
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        })
    }
}

/// The `[telemetry]` section of the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// fmt layer filter, e.g. `"info,stall_lab=debug"`; `RUST_LOG` overrides it.
    pub log: String,
    /// Filter for what becomes an OTLP span (on top of the fixed deny-list of
    /// tokio/exporter targets). App spans are at INFO.
    pub otlp_filter: String,
    /// Export spans over OTLP. When false there is no OpenTelemetry layer:
    /// no spans, no trace ids, no cost.
    pub otlp: bool,
    /// Base URL of the collector, e.g. `http://localhost:4318` (http) or
    /// `http://localhost:4317` (grpc).
    pub otlp_endpoint: String,
    pub otlp_protocol: OtlpProtocol,
    /// Batch span processor delay. 500 ms so a stall shows up in Jaeger within
    /// ~1 s (the SDK default is 5 s). `OTEL_BSP_SCHEDULE_DELAY` overrides.
    pub batch_delay_ms: u64,
    /// Run the tokio-console server (needs `--cfg tokio_unstable`).
    pub console: bool,
    /// `TOKIO_CONSOLE_BIND` overrides. Port 0 picks a free port; see
    /// [`Telemetry::console_addr`].
    pub console_listen: SocketAddr,
    /// `TOKIO_CONSOLE_RETENTION` overrides (`600`, `600s`, `10m`).
    pub console_retention_secs: u64,
    /// `TOKIO_CONSOLE_PUBLISH_INTERVAL` overrides (`1000`, `1000ms`, `1s`).
    pub console_publish_interval_ms: u64,
    /// Tasks the console may record per retention window; 0 = no limit.
    /// See [`console_budget`].
    pub console_task_budget: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log: "info".into(),
            otlp_filter: "info".into(),
            otlp: true,
            otlp_endpoint: "http://localhost:4318".into(),
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            batch_delay_ms: 500,
            console: true,
            console_listen: SocketAddr::from(([127, 0, 0, 1], 6669)),
            console_retention_secs: 600,
            console_publish_interval_ms: 1000,
            console_task_budget: 2000,
        }
    }
}

/// Facts about the app runtime that go into the OTLP resource.
#[derive(Debug, Clone)]
pub struct ResourceInfo {
    pub flavor: &'static str,
    pub workers: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error(
        "tokio-console cannot listen on {addr} (config key telemetry.console_listen{via}): {source}"
    )]
    ConsoleBind {
        addr: SocketAddr,
        /// `", set by TOKIO_CONSOLE_BIND"` when the env var chose the address.
        via: &'static str,
        #[source]
        source: std::io::Error,
    },
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
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "a global tracing subscriber is already installed (telemetry::init called twice?): {0}"
    )]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// What [`Telemetry::shutdown`] managed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Spans the collector acknowledged, over the whole life of the process.
    pub exported_spans: u64,
    /// Spans that ended (and were sampled) but never reached the collector:
    /// failed exports, queue overflow, or still queued when the timeout hit.
    pub dropped_spans: u64,
    /// Export *calls* (batches) that failed.
    pub failed_exports: u64,
}

/// Handle returned by [`init`]; keep it alive for the life of the process
/// and call [`Telemetry::shutdown`] at the end to flush.
pub struct Telemetry {
    provider: SdkTracerProvider,
    stats: Arc<ExportStats>,
    grpc_runtime: Option<RuntimeThread>,
    console: Option<ConsoleServer>,
    console_budget: Option<Arc<ConsoleBudget>>,
    lines: Vec<String>,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("describe", &self.lines)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Environment / configuration resolution (pure functions: unit-testable
// without touching the process environment, which is `unsafe` to mutate in
// edition 2024).
// ---------------------------------------------------------------------------

/// Reads one environment variable; `init` passes `std::env::var`, tests pass a map.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

fn env_nonempty(env: EnvLookup<'_>, key: &str) -> Option<String> {
    env(key).filter(|v| !v.trim().is_empty())
}

/// Where traces go, after env overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedOtlp {
    pub protocol: OtlpProtocol,
    /// Full URL handed to the exporter (http: includes `/v1/traces`).
    pub endpoint: String,
    /// Which setting chose the endpoint (for the startup log).
    pub endpoint_source: &'static str,
    pub protocol_source: &'static str,
    /// Per-export deadline (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` >
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` > 10 s), milliseconds in the env vars.
    pub timeout: Duration,
}

/// Endpoint precedence: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as-is) >
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (base) > `telemetry.otlp_endpoint` (base).
/// Protocol: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` > `OTEL_EXPORTER_OTLP_PROTOCOL` > config.
///
/// We resolve this ourselves and pass the result to the exporter builder
/// programmatically (which in opentelemetry-otlp 0.33 beats every env var), so
/// the startup log can say exactly where spans go.
pub fn resolve_otlp(
    cfg: &TelemetryConfig,
    env: EnvLookup<'_>,
) -> Result<ResolvedOtlp, TelemetryError> {
    let (protocol, protocol_source) = match [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|k| env_nonempty(env, k).map(|v| (k, v)))
    {
        Some((key, v)) => {
            let p = OtlpProtocol::parse(&v).ok_or_else(|| TelemetryError::Config {
                key: if key.contains("TRACES") {
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                } else {
                    "OTEL_EXPORTER_OTLP_PROTOCOL"
                },
                message: format!(
                    "{v:?} is not supported (use \"http/protobuf\" or \"grpc\"; http/json is not built in)"
                ),
            })?;
            (p, key)
        }
        None => (cfg.otlp_protocol, "telemetry.otlp_protocol"),
    };
    let with_path = |base: &str| match protocol {
        // OTLP/HTTP: a *base* URL gets the per-signal path appended (spec).
        OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        // gRPC has no per-signal path: the service name is the path.
        OtlpProtocol::Grpc => base.to_string(),
    };
    let (endpoint, endpoint_source) =
        if let Some(v) = env_nonempty(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            (v, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        } else if let Some(v) = env_nonempty(env, "OTEL_EXPORTER_OTLP_ENDPOINT") {
            (with_path(&v), "OTEL_EXPORTER_OTLP_ENDPOINT")
        } else {
            (with_path(&cfg.otlp_endpoint), "telemetry.otlp_endpoint")
        };
    let timeout = match [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|k| env_nonempty(env, k).map(|v| (k, v)))
    {
        Some((key, v)) => {
            Duration::from_millis(v.trim().parse().map_err(|_| TelemetryError::Config {
                key: if key.contains("TRACES") {
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
                } else {
                    "OTEL_EXPORTER_OTLP_TIMEOUT"
                },
                message: format!("{v:?} is not a number of milliseconds"),
            })?)
        }
        None => Duration::from_secs(10),
    };
    Ok(ResolvedOtlp {
        protocol,
        endpoint,
        endpoint_source,
        protocol_source,
        timeout,
    })
}

/// tokio-console settings after env overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedConsole {
    pub listen: SocketAddr,
    pub listen_from_env: bool,
    pub retention: Duration,
    pub publish_interval: Duration,
}

/// `TOKIO_CONSOLE_BIND` / `_RETENTION` / `_PUBLISH_INTERVAL` override the
/// config. We parse them here instead of calling console-subscriber's
/// `Builder::with_default_env()`, because that *panics* on a malformed value
/// (and would also read `TOKIO_CONSOLE_RECORD_PATH`/`_BUFFER_CAPACITY`).
pub fn resolve_console(
    cfg: &TelemetryConfig,
    env: EnvLookup<'_>,
) -> Result<ResolvedConsole, TelemetryError> {
    let (listen, listen_from_env) = match env_nonempty(env, "TOKIO_CONSOLE_BIND") {
        Some(v) => {
            let addr = v
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| TelemetryError::Config {
                    key: "TOKIO_CONSOLE_BIND",
                    message: format!("{v:?} is not HOST:PORT"),
                })?;
            (addr, true)
        }
        None => (cfg.console_listen, false),
    };
    // `key` overrides `configured`; a bare number is in `bare_unit`.
    let duration =
        |key: &'static str, bare_unit: Duration, examples: &str, configured| match env_nonempty(
            env, key,
        ) {
            Some(v) => parse_duration(&v, bare_unit).ok_or_else(|| TelemetryError::Config {
                key,
                message: format!("{v:?} is not a duration (e.g. {examples})"),
            }),
            None => Ok(configured),
        };
    let retention = duration(
        "TOKIO_CONSOLE_RETENTION",
        Duration::from_secs(1),
        "600, 600s, 10m",
        Duration::from_secs(cfg.console_retention_secs),
    )?;
    let publish_interval = duration(
        "TOKIO_CONSOLE_PUBLISH_INTERVAL",
        Duration::from_millis(1),
        "1000, 1000ms, 1s",
        Duration::from_millis(cfg.console_publish_interval_ms),
    )?;
    Ok(ResolvedConsole {
        listen,
        listen_from_env,
        retention,
        publish_interval,
    })
}

/// Parses `"250ms"`, `"3s"`, `"10m"`, `"1h"`; a bare number is in `bare_unit`
/// (console-subscriber itself uses humantime and rejects bare numbers).
pub fn parse_duration(s: &str, bare_unit: Duration) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let unit = match unit.trim() {
        "" => bare_unit,
        "ms" => Duration::from_millis(1),
        "s" | "sec" | "secs" => Duration::from_secs(1),
        "m" | "min" | "mins" => Duration::from_secs(60),
        "h" | "hr" | "hrs" => Duration::from_secs(3600),
        _ => return None,
    };
    unit.checked_mul(u32::try_from(n).ok()?)
}

// ---------------------------------------------------------------------------
// Filters
// ---------------------------------------------------------------------------

/// Crates whose spans/events must never become OTLP spans: tokio's own
/// instrumentation (`runtime.*` spans, `tokio::*` targets) and the exporter's
/// transport stack (exporting those would export the export, forever).
/// Matched on the first `::` segment, so `tower_http` (an app-level crate)
/// still passes while `tower::buffer` does not.
const OTLP_DENY_CRATES: &[&str] = &[
    "tokio",
    "runtime",
    "h2",
    "hyper",
    "hyper_util",
    "tonic",
    "tower",
    "reqwest",
    "opentelemetry",
    "opentelemetry_sdk",
    "opentelemetry-otlp",
    "opentelemetry_otlp",
    "opentelemetry-http",
    "opentelemetry_http",
    "tracing_opentelemetry",
    "console_subscriber",
];

fn otlp_allowed(meta: &tracing::Metadata<'_>) -> bool {
    !meta.name().starts_with("runtime.") && !OTLP_DENY_CRATES.contains(&crate_of(meta.target()))
}

/// The crate segment of a target: `tower` for `tower::buffer`. Split on a
/// `char` (a byte search), not on `"::"` (a substring searcher): with the
/// console's budget, tokio's spawn callsite is asked on every spawn, and so
/// is [`otlp_allowed`].
fn crate_of(target: &str) -> &str {
    target.split(':').next().unwrap_or_default()
}

/// What the console layer records: tokio's own instrumentation.
const CONSOLE_DIRECTIVES: &str = "tokio=trace,runtime=trace";

/// The internal-logs feature of opentelemetry/opentelemetry_sdk is ON in this
/// dependency graph (opentelemetry's default features), so the SDK emits a
/// `tracing` error event per failed batch (`BatchSpanProcessor.ExportError`).
/// Our [`CountingExporter`] reports failures once; silence the SDK unless the
/// user's filter explicitly mentions opentelemetry.
fn fmt_filter_string(base: &str) -> String {
    if base.contains("opentelemetry") {
        base.to_string()
    } else if base.trim().is_empty() {
        "opentelemetry=off".to_string()
    } else {
        // EnvFilter target directives are prefix matches: `opentelemetry`
        // covers opentelemetry_sdk, opentelemetry-otlp and opentelemetry-http.
        format!("{base},opentelemetry=off")
    }
}

// ---------------------------------------------------------------------------
// Export accounting
// ---------------------------------------------------------------------------

/// The batch queue's size unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise
/// (the SDK's own default, which it reads from the same variable).
const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;

#[derive(Debug, Default)]
struct ExportStats {
    /// Sampled spans handed to the batch processor.
    ended: AtomicU64,
    /// Sampled spans refused at the door because the queue was full.
    overflowed: AtomicU64,
    /// Spans taken out of the queue by an export call, whatever its outcome.
    taken: AtomicU64,
    exported: AtomicU64,
    /// Spans of the batches whose export failed.
    failed_spans: AtomicU64,
    failed_batches: AtomicU64,
    /// How many spans the queue holds: [`CountingProcessor`] refuses a span
    /// past it (counting it), so the SDK never drops one uncounted.
    max_queue: usize,
    /// True from the first failed export or refused span to the first
    /// successful export with the queue less than half full: one warning
    /// per outage (or per spell of a collector too slow to keep up), not
    /// one per batch.
    in_trouble: AtomicBool,
}

impl ExportStats {
    fn new(max_queue: usize) -> Self {
        Self {
            max_queue,
            ..Self::default()
        }
    }

    /// Spans in the queue, not yet taken by an export.
    fn queued(&self) -> u64 {
        let taken_or_refused =
            self.taken.load(Ordering::Relaxed) + self.overflowed.load(Ordering::Relaxed);
        self.ended
            .load(Ordering::Relaxed)
            .saturating_sub(taken_or_refused)
    }

    /// Admits a sampled span into the queue, or counts it dropped.
    fn admit(&self) -> bool {
        if self.queued() >= self.max_queue as u64 {
            self.overflowed.fetch_add(1, Ordering::Relaxed);
            if !self.in_trouble.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "OTLP export cannot keep up: the queue of {} spans is full and new spans \
                     are being dropped (logged once until export catches up)",
                    self.max_queue
                );
            }
            return false;
        }
        self.ended.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn record(&self, spans: usize, result: &OTelSdkResult, target: &str) {
        match result {
            Ok(()) => {
                self.exported.fetch_add(spans as u64, Ordering::Relaxed);
                if self.queued() < self.max_queue as u64 / 2
                    && self.in_trouble.swap(false, Ordering::Relaxed)
                {
                    tracing::info!(
                        "OTLP export to {target} recovered; spans are flowing again ({} dropped so far)",
                        self.dropped()
                    );
                }
            }
            Err(e) => {
                self.failed_batches.fetch_add(1, Ordering::Relaxed);
                self.failed_spans.fetch_add(spans as u64, Ordering::Relaxed);
                if !self.in_trouble.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "OTLP export to {target} failing: {e}; spans are being dropped \
                         (logged once until it recovers)"
                    );
                }
            }
        }
    }

    /// Spans lost so far: refused by a full queue or in a failed batch.
    fn dropped(&self) -> u64 {
        self.overflowed.load(Ordering::Relaxed) + self.failed_spans.load(Ordering::Relaxed)
    }

    fn snapshot(&self) -> ExportSnapshot {
        ExportSnapshot {
            exported: self.exported.load(Ordering::Relaxed),
            dropped: self.dropped(),
            queued: self.queued(),
            failed_exports: self.failed_batches.load(Ordering::Relaxed),
            failing: self.in_trouble.load(Ordering::Relaxed),
        }
    }

    /// At the end every span not exported is lost, those still queued too.
    fn report(&self) -> ShutdownReport {
        let exported = self.exported.load(Ordering::Relaxed);
        let seen = self.ended.load(Ordering::Relaxed) + self.overflowed.load(Ordering::Relaxed);
        ShutdownReport {
            exported_spans: exported,
            dropped_spans: seen.saturating_sub(exported),
            failed_exports: self.failed_batches.load(Ordering::Relaxed),
        }
    }
}

/// The span export's counters while the server runs, for `/debug/runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExportSnapshot {
    /// Spans the collector acknowledged.
    pub exported: u64,
    /// Spans lost: refused because the queue was full (collector down, slow
    /// or blackholed for long enough) or in a batch whose export failed.
    pub dropped: u64,
    /// Spans waiting in the queue for the next export.
    pub queued: u64,
    /// Export calls (batches) that failed.
    pub failed_exports: u64,
    /// The collector is failing or not keeping up right now.
    pub failing: bool,
}

/// A handle on the span export's counters: cheap to clone, readable from any
/// thread (the admin server's), never blocking.
#[derive(Debug, Clone)]
pub struct ExportCounters(Arc<ExportStats>);

impl ExportCounters {
    /// The counters now. All zero when OTLP export is off.
    pub fn snapshot(&self) -> ExportSnapshot {
        self.0.snapshot()
    }
}

#[derive(Debug)]
enum Transport {
    /// Blocking reqwest client: `export` is synchronous under the hood, so the
    /// SDK's batch thread (which drives exports with
    /// `futures_executor::block_on`) needs no tokio runtime at all.
    Http(Box<opentelemetry_otlp::SpanExporter>),
    /// Tonic: the channel's connection tasks live on the `otlp-grpc` runtime
    /// (they were spawned there by `connect_lazy`). We also run the export
    /// future itself there, so its timers/retry sleeps are tokio-driven and
    /// the batch thread only waits on a `JoinHandle`.
    Grpc {
        exporter: Arc<opentelemetry_otlp::SpanExporter>,
        runtime: tokio::runtime::Handle,
        timeout: Duration,
    },
}

/// Wraps the real exporter: counts spans, and logs one warning per outage.
#[derive(Debug)]
struct CountingExporter {
    transport: Transport,
    stats: Arc<ExportStats>,
    target: String,
}

impl SpanExporter for CountingExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        self.stats.taken.fetch_add(n as u64, Ordering::Relaxed);
        let result = match &self.transport {
            Transport::Http(exporter) => exporter.export(batch).await,
            Transport::Grpc {
                exporter,
                runtime,
                timeout,
            } => {
                let exporter = Arc::clone(exporter);
                let timeout = *timeout;
                // Spawning creates a `runtime.spawn` span on *this* thread; do
                // it with no subscriber so exporter plumbing never shows up in
                // tokio-console (or anywhere else).
                let task = tracing::subscriber::with_default(NoSubscriber::default(), || {
                    runtime.spawn(async move {
                        match tokio::time::timeout(timeout, exporter.export(batch)).await {
                            Ok(r) => r,
                            Err(_) => Err(OTelSdkError::Timeout(timeout)),
                        }
                    })
                });
                match task.await {
                    Ok(r) => r,
                    Err(e) => Err(OTelSdkError::InternalFailure(format!(
                        "otlp-grpc runtime task failed: {e}"
                    ))),
                }
            }
        };
        self.stats.record(n, &result, &self.target);
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match &self.transport {
            Transport::Http(e) => e.shutdown_with_timeout(timeout),
            Transport::Grpc { exporter, .. } => exporter.shutdown_with_timeout(timeout),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        match &mut self.transport {
            Transport::Http(e) => e.set_resource(resource),
            // Called once by the batch thread right after the provider is
            // built, before any export, so the Arc is not shared yet.
            Transport::Grpc { exporter, .. } => match Arc::get_mut(exporter) {
                Some(e) => e.set_resource(resource),
                None => tracing::warn!("OTLP resource could not be set (exporter busy)"),
            },
        }
    }
}

/// Counts sampled spans entering the batch queue, so the shutdown report can
/// say how many never made it out.
#[derive(Debug)]
struct CountingProcessor {
    inner: BatchSpanProcessor,
    stats: Arc<ExportStats>,
}

impl SpanProcessor for CountingProcessor {
    fn on_start(&self, span: &mut opentelemetry_sdk::trace::Span, cx: &opentelemetry::Context) {
        self.inner.on_start(span, cx);
    }
    fn on_end(&self, span: SpanData) {
        // A sampled span past a full queue is dropped here, counted, rather
        // than by the SDK, which would drop it uncounted (its own warning is
        // filtered out of the logs).
        if span.span_context.is_sampled() && !self.stats.admit() {
            return;
        }
        self.inner.on_end(span);
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }
    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

// ---------------------------------------------------------------------------
// Side threads with their own runtimes
// ---------------------------------------------------------------------------

/// A current-thread runtime driven by its own OS thread until `stop` fires.
/// Tasks spawned through `handle` from any thread run on that OS thread, so
/// they keep running when every app worker is blocked.
struct RuntimeThread {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RuntimeThread {
    fn start(name: &'static str) -> Result<Self, TelemetryError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // This thread's tasks are exporter plumbing: keep them out of
                // every layer (and out of tokio-console).
                let _quiet = tracing::subscriber::set_default(NoSubscriber::default());
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })
            .map_err(|source| TelemetryError::Io {
                what: "spawning the otlp-grpc thread",
                source,
            })?;
        let handle = ready_rx
            .recv()
            .map_err(|_| TelemetryError::Io {
                what: "otlp-grpc thread died during start-up",
                source: std::io::Error::other("thread exited"),
            })?
            .map_err(|source| TelemetryError::Io {
                what: "building the otlp-grpc runtime",
                source,
            })?;
        Ok(Self {
            handle,
            stop: Some(stop_tx),
        })
    }
}

impl Drop for RuntimeThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

struct ConsoleServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for ConsoleServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds the console port *ourselves* (so a busy port is an error here, and
/// port 0 works), then serves console-subscriber's gRPC service on it from a
/// `console-server` thread with its own runtime — the same shape as
/// console-subscriber's `Builder::spawn`, minus its `expect()`s.
fn start_console(
    c: &ResolvedConsole,
) -> Result<(console_subscriber::ConsoleLayer, ConsoleServer), TelemetryError> {
    let bind_err = |source| TelemetryError::ConsoleBind {
        addr: c.listen,
        via: if c.listen_from_env {
            ", set by TOKIO_CONSOLE_BIND"
        } else {
            ""
        },
        source,
    };
    let listener = std::net::TcpListener::bind(c.listen).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;

    let (layer, server) = console_subscriber::ConsoleLayer::builder()
        .retention(c.retention)
        .publish_interval(c.publish_interval)
        .server_addr(addr) // informational only: we serve on our own listener
        .build();
    let parts = server.into_parts();

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("console-server".into())
        .spawn(move || {
            let result = {
                // Like console-subscriber's own spawn(): the console server
                // must not trace itself (it would report on its own tasks).
                let _quiet = tracing::subscriber::set_default(NoSubscriber::default());
                serve_console(listener, parts, stop_rx)
            };
            if let Err(e) = result {
                tracing::error!("tokio-console server on {addr} stopped: {e}");
            }
        })
        .map_err(|source| TelemetryError::Io {
            what: "spawning the console-server thread",
            source,
        })?;
    Ok((
        layer,
        ConsoleServer {
            addr,
            stop: Some(stop_tx),
        },
    ))
}

fn serve_console(
    listener: std::net::TcpListener,
    parts: console_subscriber::ServerParts,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let console_subscriber::ServerParts {
        instrument_server,
        aggregator,
        ..
    } = parts;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let aggregate = tokio::spawn(aggregator.run());
        let serve = tonic::transport::Server::builder()
            .add_service(instrument_server)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        // Not serve_with_incoming_shutdown: graceful shutdown would wait for
        // open console watch streams, which never end. Dropping is fine here.
        let result = tokio::select! {
            r = serve => r.map_err(Into::into),
            _ = stop => Ok(()),
        };
        aggregate.abort();
        result
    })
}

// ---------------------------------------------------------------------------
// init
// ---------------------------------------------------------------------------

/// Installs the global subscriber. Call once per process, before building the
/// app runtime's first span. Reads the process environment for overrides.
pub fn init(cfg: &TelemetryConfig, info: &ResourceInfo) -> Result<Telemetry, TelemetryError> {
    init_with_env(cfg, info, &|k| std::env::var(k).ok())
}

/// [`init`] with an explicit environment (used by tests; `init` passes the
/// real one). Note: resource detectors (`OTEL_RESOURCE_ATTRIBUTES`) and the
/// SDK's own sampler/batch env parsing still read the real environment.
pub fn init_with_env(
    cfg: &TelemetryConfig,
    info: &ResourceInfo,
    env: EnvLookup<'_>,
) -> Result<Telemetry, TelemetryError> {
    let mut lines = Vec::new();

    // 1. fmt filter: RUST_LOG wins over the config.
    let (log, log_source) = match env_nonempty(env, "RUST_LOG") {
        Some(v) => (v, "RUST_LOG"),
        None => (cfg.log.clone(), "telemetry.log"),
    };
    let fmt_filter =
        EnvFilter::try_new(fmt_filter_string(&log)).map_err(|e| TelemetryError::Config {
            key: log_source,
            message: format!("{log:?}: {e}"),
        })?;
    let otlp_level =
        LeanEnvFilter::try_new(&cfg.otlp_filter).map_err(|e| TelemetryError::Config {
            key: "telemetry.otlp_filter",
            message: format!("{:?}: {e}", cfg.otlp_filter),
        })?;
    lines.push(format!("logs: filter {log:?} (from {log_source})"));

    // 2. Console first: a busy port must fail init before anything global
    //    (subscriber, propagator, threads) has been installed.
    let console = if cfg.console {
        let c = resolve_console(cfg, env)?;
        let (layer, server) = start_console(&c)?;
        let budget = Arc::new(ConsoleBudget::new(cfg.console_task_budget, c.retention));
        let layer = layer
            // Static: which tasks and resources it records is decided by
            // `ConsoleGate`, around the whole subscriber.
            .with_filter(LeanEnvFilter::new(CONSOLE_DIRECTIVES))
            .boxed();
        lines.push(format!(
            "tokio-console: listening on {} (retention {} s, publish every {} ms, {}) - run `tokio-console http://{}`",
            server.addr,
            c.retention.as_secs(),
            c.publish_interval.as_millis(),
            match cfg.console_task_budget {
                0 => "no task budget: ~50 KB per task for the retention, use --no-console under load".to_string(),
                n => format!("records at most {n} tasks per retention window, telemetry.console_task_budget"),
            },
            server.addr
        ));
        Some((layer, server, budget))
    } else {
        lines.push("tokio-console: off (telemetry.console = false)".into());
        None
    };

    // 3. Tracer provider. Sampler: not set here on purpose - the 0.33 SDK's
    //    `Config::default()` already honours OTEL_TRACES_SAMPLER(_ARG)
    //    (always_on, always_off, traceidratio, parentbased_*), default
    //    parentbased_always_on; calling `with_sampler` would override the env.
    let max_queue = env_nonempty(env, "OTEL_BSP_MAX_QUEUE_SIZE")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
    let stats = Arc::new(ExportStats::new(max_queue));
    let mut builder = SdkTracerProvider::builder().with_resource(build_resource(info, env));
    let mut grpc_runtime = None;
    if cfg.otlp {
        let o = resolve_otlp(cfg, env)?;
        let exporter_err = |source| TelemetryError::Exporter {
            protocol: o.protocol,
            endpoint: o.endpoint.clone(),
            source,
        };
        let transport = match o.protocol {
            OtlpProtocol::HttpProtobuf => Transport::Http(Box::new(
                opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                    .with_endpoint(o.endpoint.clone())
                    .with_timeout(o.timeout)
                    .build()
                    .map_err(exporter_err)?,
            )),
            OtlpProtocol::Grpc => {
                let rt = RuntimeThread::start("otlp-grpc")?;
                // `connect_lazy` spawns the channel's worker task on the
                // *current* runtime: enter ours so it lands on `otlp-grpc`,
                // never on the app runtime (which may be blocked).
                let exporter = {
                    let _enter = rt.handle.enter();
                    tracing::subscriber::with_default(NoSubscriber::default(), || {
                        opentelemetry_otlp::SpanExporter::builder()
                            .with_tonic()
                            .with_endpoint(o.endpoint.clone())
                            .with_timeout(o.timeout)
                            .build()
                    })
                    .map_err(exporter_err)?
                };
                let t = Transport::Grpc {
                    exporter: Arc::new(exporter),
                    runtime: rt.handle.clone(),
                    timeout: o.timeout,
                };
                grpc_runtime = Some(rt);
                t
            }
        };
        let exporter = CountingExporter {
            transport,
            stats: Arc::clone(&stats),
            target: o.endpoint.clone(),
        };
        // BatchConfigBuilder::default() reads OTEL_BSP_SCHEDULE_DELAY,
        // _MAX_QUEUE_SIZE (bounded queue, default 2048), _MAX_EXPORT_BATCH_SIZE,
        // _EXPORT_TIMEOUT itself; a programmatic value would *override* the
        // env, so only apply our 500 ms default when the env var is absent.
        let mut batch = BatchConfigBuilder::default();
        let delay_source = if env_nonempty(env, "OTEL_BSP_SCHEDULE_DELAY").is_none() {
            batch = batch.with_scheduled_delay(Duration::from_millis(cfg.batch_delay_ms));
            format!("{} ms", cfg.batch_delay_ms)
        } else {
            "OTEL_BSP_SCHEDULE_DELAY".to_string()
        };
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch.build())
            .build();
        builder = builder.with_span_processor(CountingProcessor {
            inner: processor,
            stats: Arc::clone(&stats),
        });
        lines.push(format!(
            "traces: OTLP {} -> {} (endpoint from {}, protocol from {}, batch delay {})",
            o.protocol, o.endpoint, o.endpoint_source, o.protocol_source, delay_source
        ));
    } else {
        lines.push(
            "traces: OTLP export off (telemetry.otlp = false): no spans, no trace ids".into(),
        );
    }
    let provider = builder.build();
    let tracer = provider.tracer("stall-lab");

    // 4. The subscriber. Each layer carries its own filter.
    let (console_layer, console_server, console_budget) = match console {
        Some((layer, server, budget)) => (Some(layer), Some(server), Some(budget)),
        None => (None, None, None),
    };
    // Static filters (one answer per callsite, cached), except the console
    // budget's on tokio's task and resource spans. A filter that answers
    // differently per thread (to hide some threads' tasks from the console)
    // would make every callsite in the process "sometimes" interesting, so
    // every disabled `trace!` in hyper or tokio gets evaluated on every call:
    // measured at several times the per-request cost. Side threads that must
    // stay out of the console say so to `ConsoleGate` instead, which decides
    // only on the task and resource callsites.
    let otel_filter = filter::filter_fn(otlp_allowed).and(otlp_level);
    // The fmt layer logs events only: recording every request span's fields
    // for log context would cost formatting on every request. Events that
    // matter name their request themselves.
    let fmt_filter = fmt_filter.and(filter::filter_fn(|meta| {
        meta.is_event() && meta.target() != SPAN_EVENT_ONLY
    }));

    // With export off there is no OpenTelemetry layer at all, so telemetry
    // off costs nothing per request; the price is no trace ids.
    let otel_layer = cfg.otlp.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Not worth their cost on every span: busy/idle timing (two clock
            // reads and an extension lookup per enter and exit; the request
            // span carries stall-lab's own poll statistics instead) and the
            // thread's name and id (the `workers` attribute says where the
            // request ran).
            .with_tracked_inactivity(false)
            .with_threads(false)
            // Nor is making each span the current OpenTelemetry context on
            // every enter (a context clone and a thread-local push per poll
            // of the request task): nothing here reads
            // `opentelemetry::Context::current()`; parents come from the
            // tracing span tree, and outbound propagation uses
            // `Span::context()`.
            .with_context_activation(false)
            // `target` repeats `code.module.name`; the location (file and
            // line of the span) stays: it points a learner at the code
            // that blocked.
            .with_target(false)
            .with_filter(otel_filter)
    });

    let layers = stack(console_layer, otel_layer.map(Layer::boxed), fmt_filter);
    ConsoleGate::new(
        tracing_subscriber::registry().with(layers),
        console_budget.clone(),
    )
    .try_init()?;

    // Inbound/outbound W3C traceparent.
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());

    Ok(Telemetry {
        provider,
        stats,
        grpc_runtime,
        console: console_server,
        console_budget,
        lines,
    })
}

type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The target of events meant for their span in Jaeger, not for the logs:
/// the request's "held worker N for X ms" event, whose stall the watcher
/// already logs ("stall in progress", "stall over").
pub const SPAN_EVENT_ONLY: &str = "stall_lab::span_event";

/// The subscriber's layers, the switched-off ones left out.
///
/// A `Vec` of boxed layers rather than `Option` layers: an absent `Option`
/// layer answers "always interested" for every callsite, so with it the
/// registry created every span in the process (tokio's per-task
/// `runtime.spawn` spans and every request span) with all telemetry off.
fn stack(
    console: Option<BoxedLayer>,
    otel: Option<BoxedLayer>,
    fmt_filter: impl tracing_subscriber::layer::Filter<Registry> + Send + Sync + 'static,
) -> Vec<BoxedLayer> {
    let fmt: BoxedLayer = tracing_subscriber::fmt::layer()
        // Logs on stderr; stdout carries only the `listening:` lines.
        .with_writer(std::io::stderr)
        .with_filter(fmt_filter)
        .boxed();
    console.into_iter().chain(otel).chain([fmt]).collect()
}

/// Resource: ours first, then `OTEL_RESOURCE_ATTRIBUTES` (the env wins on
/// conflicts, as the spec says), then `OTEL_SERVICE_NAME` on top.
fn build_resource(info: &ResourceInfo, env: EnvLookup<'_>) -> Resource {
    let mut b = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", SERVICE_NAME),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
            KeyValue::new("stall_lab.runtime.flavor", info.flavor),
            KeyValue::new("stall_lab.runtime.workers", info.workers as i64),
        ])
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    if let Some(name) = env_nonempty(env, "OTEL_SERVICE_NAME") {
        b = b.with_service_name(name);
    }
    b.build()
}

impl Telemetry {
    /// Human lines for the startup log.
    pub fn describe(&self) -> Vec<String> {
        self.lines.clone()
    }

    /// The console's task budget, when the console is on: for the warning
    /// that it ran out and for `/debug/runtime`.
    pub fn console_budget(&self) -> Option<Arc<ConsoleBudget>> {
        self.console_budget.clone()
    }

    /// The address the console server actually bound (port 0 resolved).
    pub fn console_addr(&self) -> Option<SocketAddr> {
        self.console.as_ref().map(|c| c.addr)
    }

    /// Live counters (same numbers as the shutdown report).
    pub fn export_stats(&self) -> ShutdownReport {
        self.stats.report()
    }

    /// The export's live counters (exported, dropped, queued, failing), as a
    /// handle another thread can keep: for the admin server's
    /// `/debug/runtime`.
    pub fn export_counters(&self) -> ExportCounters {
        ExportCounters(Arc::clone(&self.stats))
    }

    /// Flushes spans that have ended and stops the exporter, waiting at most
    /// `timeout` (+ a small margin). Call it from a plain thread (e.g. `main`
    /// after the app runtime has returned, or `spawn_blocking`), not from an
    /// async task: it blocks.
    pub fn shutdown(mut self, timeout: Duration) -> ShutdownReport {
        let start = Instant::now();
        // The SDK's shutdown already waits with `recv_timeout(timeout)` on
        // the batch thread, but we run it on a helper thread anyway so *our*
        // bound holds whatever the SDK does (and whatever thread called us).
        let provider = self.provider.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let _ = tx.send(provider.shutdown_with_timeout(timeout));
            });
        let outcome = match spawned {
            Ok(_) => rx
                .recv_timeout(timeout + Duration::from_millis(250))
                .unwrap_or(Err(OTelSdkError::Timeout(timeout))),
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        };
        let report = self.stats.report();
        match outcome {
            Ok(()) | Err(OTelSdkError::AlreadyShutdown) => {}
            Err(e) => tracing::warn!(
                "telemetry shutdown incomplete after {:?}: {e}; {} span(s) not exported",
                start.elapsed(),
                report.dropped_spans
            ),
        }
        // Stop side runtimes (in-flight gRPC exports are cancelled).
        self.grpc_runtime.take();
        self.console.take();
        report
    }
}

// ---------------------------------------------------------------------------
// Trace-context helpers
// ---------------------------------------------------------------------------

/// Hex (trace id, span id) of `span`, if it is an OpenTelemetry span.
pub fn span_ids(span: &tracing::Span) -> Option<(String, String)> {
    let cx = span.context();
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Makes `span` a child of the W3C `traceparent` in `headers`, if any.
/// Call it right after creating the span, before it is entered (afterwards the
/// OTel span has started and its parent can no longer change).
pub fn set_parent_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    // Most requests carry none: skip the global propagator (a lock and a
    // context built from nothing) for them.
    if span.is_disabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// `traceparent` (and `tracestate`) headers for an outbound call made inside
/// `span`. reqwest 0.13 uses the same `http` 1.x `HeaderMap`, so this goes
/// straight into `RequestBuilder::headers`.
pub fn inject_headers(span: &tracing::Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(&mut headers)));
    headers
}

/// The `traceparent` value alone, e.g. for logging or non-http carriers.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    inject_headers(span)
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    /// Tests that install a subscriber take turns: a callsite's interest is
    /// combined over every live subscriber, so one test's console gate
    /// ("ask me per call") would change what another test's stack is asked.
    static ONE_SUBSCRIBER_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn with_every_exporter_off_no_span_is_created() {
        let _turn = ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // The fmt layer as init builds it (events only), at its most verbose.
        let fmt_filter = EnvFilter::new("trace").and(filter::filter_fn(|m| m.is_event()));
        let subscriber = tracing_subscriber::registry().with(stack(None, None, fmt_filter));
        tracing::subscriber::with_default(subscriber, || {
            assert!(tracing::info_span!("request").is_disabled());
            assert!(tracing::trace_span!(target: "tokio::task", "runtime.spawn").is_disabled());
            assert!(tracing::event_enabled!(tracing::Level::INFO));
        });
    }

    /// The subscriber as `init` builds it with the console on and OTLP off,
    /// `console` standing in for the console layer.
    fn with_console(
        console: impl Layer<Registry> + Send + Sync + 'static,
        budget: &Arc<ConsoleBudget>,
    ) -> impl tracing::Subscriber + Send + Sync + 'static {
        let console = console
            .with_filter(LeanEnvFilter::new(CONSOLE_DIRECTIVES))
            .boxed();
        let fmt_filter = EnvFilter::new("info").and(filter::filter_fn(|m| m.is_event()));
        let layers = stack(Some(console), None, fmt_filter);
        ConsoleGate::new(
            tracing_subscriber::registry().with(layers),
            Some(Arc::clone(budget)),
        )
    }

    /// A task the console's budget refuses has no span at all, for any
    /// layer: tokio then attaches no id to it and traces none of its polls
    /// and wakes. A resource (here a timer) is recorded only inside a task
    /// the console records. The gate wakes no other callsite up.
    #[test]
    fn a_task_the_console_budget_refuses_has_no_span() {
        use std::sync::Mutex;
        let _turn = ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        /// Stands in for the console layer: notes each span it is given,
        /// with the task it was created in (or, for a task's own span, that
        /// task).
        type Notes = Arc<Mutex<Vec<(&'static str, Option<String>)>>>;
        struct Seen(Notes);
        impl<S: tracing::Subscriber> Layer<S> for Seen {
            fn on_new_span(
                &self,
                attrs: &tracing::span::Attributes<'_>,
                _: &tracing::span::Id,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                struct TaskId(Option<String>);
                impl tracing::field::Visit for TaskId {
                    fn record_u64(&mut self, f: &tracing::field::Field, v: u64) {
                        if f.name() == "task.id" {
                            self.0 = Some(v.to_string());
                        }
                    }
                    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn fmt::Debug) {}
                }
                let task = if attrs.metadata().name() == "runtime.spawn" {
                    let mut id = TaskId(None);
                    attrs.record(&mut id);
                    id.0
                } else {
                    tokio::task::try_id().map(|id| id.to_string())
                };
                self.0.lock().unwrap().push((attrs.metadata().name(), task));
            }
        }
        let seen = Notes::default();
        // Three tasks: `block_on`'s own, then one spawned task.
        let budget = Arc::new(ConsoleBudget::new(2, Duration::from_secs(600)));
        let subscriber = with_console(Seen(Arc::clone(&seen)), &budget);
        tracing::subscriber::with_default(subscriber, || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let (recorded, refused) = rt.block_on(async {
                let task = || {
                    tokio::spawn(async {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        tracing::Span::current().metadata().map(|m| m.name())
                    })
                };
                let (recorded, refused) = (task(), task());
                let ids = (recorded.id().to_string(), refused.id().to_string());
                let current = (recorded.await.unwrap(), refused.await.unwrap());
                assert_eq!(
                    current,
                    (Some("runtime.spawn"), None),
                    "polled inside its own span if recorded; a refused one has none"
                );
                ids
            });
            let s = budget.snapshot();
            assert_eq!((s.tasks_recorded, s.tasks_not_recorded), (2, 1));
            let seen = seen.lock().unwrap().clone();
            let tasks: Vec<_> = seen.iter().filter(|(n, _)| *n == "runtime.spawn").collect();
            assert_eq!(tasks.len(), 2, "block_on and one task: {seen:?}");
            assert!(tasks.iter().any(|(_, t)| t.as_ref() == Some(&recorded)));
            let timers_in = |task: &String| {
                seen.iter()
                    .filter(|(n, t)| *n == "runtime.resource" && t.as_ref() == Some(task))
                    .count()
            };
            assert_eq!(
                timers_in(&recorded),
                1,
                "the recorded task's timer: {seen:?}"
            );
            assert_eq!(
                timers_in(&refused),
                0,
                "no timer of the refused task: {seen:?}"
            );

            assert!(
                !tracing::event_enabled!(target: "hyper::proto::h1::conn", tracing::Level::TRACE),
                "a disabled trace! elsewhere stays disabled"
            );
            assert!(
                tracing::event_enabled!(tracing::Level::INFO),
                "logs still flow"
            );
            assert!(
                tracing::info_span!("request").is_disabled(),
                "no span for a layer that is off"
            );
        });
    }

    /// The admin runtime's tasks and timers stay out of the console and
    /// its budget (and nothing else changes for them).
    #[test]
    fn a_plumbing_threads_tasks_get_no_span() {
        let _turn = ONE_SUBSCRIBER_AT_A_TIME
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let budget = Arc::new(ConsoleBudget::new(0, Duration::from_secs(600)));
        let subscriber = with_console(tracing_subscriber::layer::Identity::new(), &budget);
        tracing::subscriber::with_default(subscriber, || {
            // (libtest runs each test on a thread of its own.)
            keep_this_thread_out_of_the_console();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let current = rt.block_on(async {
                tokio::spawn(async {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    tracing::Span::current().is_none()
                })
                .await
                .unwrap()
            });
            assert!(current, "the task ran without a span of its own");
            assert!(
                tracing::trace_span!(target: "runtime::resource", "runtime.resource").is_disabled()
            );
            let s = budget.snapshot();
            assert_eq!((s.tasks_recorded, s.tasks_not_recorded), (0, 0));
            assert!(
                tracing::event_enabled!(tracing::Level::INFO),
                "logs still flow"
            );
        });
    }

    #[test]
    fn endpoint_precedence() {
        let cfg = TelemetryConfig::default();
        let r = resolve_otlp(&cfg, &env_of(&[])).unwrap();
        assert_eq!(r.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(r.protocol, OtlpProtocol::HttpProtobuf);

        let r = resolve_otlp(
            &cfg,
            &env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]),
        )
        .unwrap();
        assert_eq!(r.endpoint, "http://c:4318/v1/traces");

        let r = resolve_otlp(
            &cfg,
            &env_of(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom"),
            ]),
        )
        .unwrap();
        assert_eq!(r.endpoint, "http://t:1/custom");
        assert_eq!(r.endpoint_source, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    }

    #[test]
    fn protocol_precedence() {
        let cfg = TelemetryConfig {
            otlp_endpoint: "http://x:4317".into(),
            ..Default::default()
        };
        let r = resolve_otlp(&cfg, &env_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).unwrap();
        assert_eq!(r.protocol, OtlpProtocol::Grpc);
        assert_eq!(r.endpoint, "http://x:4317", "grpc gets no /v1/traces");
        let r = resolve_otlp(
            &cfg,
            &env_of(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ]),
        )
        .unwrap();
        assert_eq!(r.protocol, OtlpProtocol::HttpProtobuf);
        let err = resolve_otlp(
            &cfg,
            &env_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{err}"
        );
    }

    #[test]
    fn serde_protocol_names() {
        #[derive(Deserialize)]
        struct W {
            p: OtlpProtocol,
        }
        let w: W = serde_json::from_str(r#"{"p":"http/protobuf"}"#).unwrap();
        assert_eq!(w.p, OtlpProtocol::HttpProtobuf);
        let w: W = serde_json::from_str(r#"{"p":"grpc"}"#).unwrap();
        assert_eq!(w.p, OtlpProtocol::Grpc);
    }

    #[test]
    fn console_env_overrides() {
        let cfg = TelemetryConfig::default();
        let c = resolve_console(&cfg, &env_of(&[])).unwrap();
        assert_eq!(c.retention, Duration::from_secs(600));
        assert_eq!(c.publish_interval, Duration::from_millis(1000));
        let c = resolve_console(
            &cfg,
            &env_of(&[
                ("TOKIO_CONSOLE_BIND", "127.0.0.1:7000"),
                ("TOKIO_CONSOLE_RETENTION", "10m"),
                ("TOKIO_CONSOLE_PUBLISH_INTERVAL", "250"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert!(c.listen_from_env);
        assert_eq!(c.retention, Duration::from_secs(600));
        assert_eq!(c.publish_interval, Duration::from_millis(250));
        assert!(resolve_console(&cfg, &env_of(&[("TOKIO_CONSOLE_RETENTION", "soon")])).is_err());
    }

    #[test]
    fn failure_logged_once_per_outage() {
        let stats = ExportStats::new(DEFAULT_MAX_QUEUE_SIZE);
        let err: OTelSdkResult = Err(OTelSdkError::InternalFailure("down".into()));
        for _ in 0..8 {
            assert!(stats.admit());
        }
        stats.taken.store(8, Ordering::Relaxed);
        stats.record(3, &err, "x");
        assert!(stats.in_trouble.load(Ordering::Relaxed));
        stats.record(3, &err, "x"); // no second warning: flag already set
        stats.record(2, &Ok(()), "x");
        assert!(!stats.in_trouble.load(Ordering::Relaxed), "recovered");
        let live = stats.snapshot();
        assert_eq!((live.exported, live.dropped, live.queued), (2, 6, 0));
        assert_eq!(
            stats.report(),
            ShutdownReport {
                exported_spans: 2,
                dropped_spans: 6,
                failed_exports: 2
            }
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_stays_one_outage_until_it_drains() {
        let stats = ExportStats::new(4);
        for _ in 0..4 {
            assert!(stats.admit());
        }
        assert!(!stats.admit(), "the fifth span finds the queue full");
        assert!(stats.in_trouble.load(Ordering::Relaxed));
        // A slow export succeeds while the queue is still full: still one
        // outage.
        stats.taken.store(1, Ordering::Relaxed);
        assert!(stats.admit());
        stats.record(1, &Ok(()), "x");
        assert!(stats.in_trouble.load(Ordering::Relaxed), "queue still full");
        // Drained: recovered.
        stats.taken.store(5, Ordering::Relaxed);
        stats.record(4, &Ok(()), "x");
        assert!(!stats.in_trouble.load(Ordering::Relaxed));
        let live = stats.snapshot();
        assert_eq!((live.exported, live.dropped, live.queued), (5, 1, 0));
        assert_eq!(stats.report().dropped_spans, 1);
    }

    #[test]
    fn otlp_deny_list() {
        // Matching is on the crate segment: tower_http passes, tower does not.
        for (target, ok) in [
            ("tower_http::trace", true),
            ("stall_lab::routes", true),
            ("tower::buffer", false),
            ("hyper_util::client", false),
            ("h2::codec", false),
            ("opentelemetry-otlp", false),
        ] {
            assert_eq!(
                !OTLP_DENY_CRATES.contains(&crate_of(target)),
                ok,
                "{target}"
            );
        }
        assert_eq!(fmt_filter_string("info"), "info,opentelemetry=off");
        assert_eq!(
            fmt_filter_string("opentelemetry_sdk=debug"),
            "opentelemetry_sdk=debug"
        );
    }
}
