//! [`init`]: the subscriber composed from the console, the exporter and the
//! filters, and the [`Telemetry`] handle that shuts it down.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::global;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::propagation::TraceContextPropagator;

use super::console::ConsoleServer;
use super::console_budget::ConsoleBudget;
use super::export::{Export, ShutdownReport};
use super::settings::TelemetryConfig;
use super::{ResourceInfo, SERVICE_NAME, TelemetryError, console, env, export, filters, layers};

/// Installs the global subscriber. Call once per process, before building the
/// app runtime's first span. Reads the process environment for the
/// `OTEL_*`, `TOKIO_CONSOLE_*` and `RUST_LOG` overrides.
pub fn init(cfg: &TelemetryConfig, info: &ResourceInfo) -> Result<Telemetry, TelemetryError> {
    let env = &|k: &str| std::env::var(k).ok();
    // Every filter is checked before anything starts.
    let (log, log_source) = env::resolve_log(cfg, env);
    let fmt_filter = filters::fmt_filter(&log, log_source)?;
    let otel_filter = filters::otel_filter(&cfg.otlp_filter)?;
    let mut lines = vec![format!("logs: filter {log:?} (from {log_source})")];

    // The console first: a busy port must fail init before anything global
    // (subscriber, propagator, threads) has been installed.
    let (console, line) = console::start(cfg, env)?;
    lines.push(line);
    let (export, line) = export::start(cfg, info, env)?;
    lines.push(line);

    // With export off there is no OpenTelemetry layer at all, so telemetry
    // off costs nothing per request; the price is no trace ids.
    let otel_layer = cfg.otlp.then(|| {
        let tracer = export.provider.tracer(SERVICE_NAME);
        layers::otel_layer(tracer, otel_filter)
    });
    let (console_layer, console_server, console_budget) = match console {
        Some(c) => (Some(c.layer), Some(c.server), Some(c.budget)),
        None => (None, None, None),
    };
    let stack = layers::stack(console_layer, otel_layer, fmt_filter);
    layers::install(stack, console_budget.clone())?;

    // Inbound/outbound W3C traceparent.
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(export.provider.clone());
    if cfg.otlp {
        super::request_span::install(export.provider.tracer(SERVICE_NAME));
    }

    Ok(Telemetry {
        export,
        console: console_server,
        console_budget,
        lines,
    })
}

/// Handle returned by [`init`]; keep it alive for the life of the process
/// and call [`Telemetry::shutdown`] at the end to flush.
pub struct Telemetry {
    export: Export,
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

    /// The export's live counters (exported, dropped, queued, failing), as a
    /// handle another thread can keep: for the admin server's
    /// `/debug/runtime`.
    pub fn export_counters(&self) -> super::ExportCounters {
        super::ExportCounters(Arc::clone(&self.export.stats))
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
        let provider = self.export.provider.clone();
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
        let report = self.export.stats.report();
        match outcome {
            Ok(()) | Err(OTelSdkError::AlreadyShutdown) => {}
            Err(e) => tracing::warn!(
                "telemetry shutdown incomplete after {:?}: {e}; {} span(s) not exported",
                start.elapsed(),
                report.dropped_spans
            ),
        }
        // Stop side runtimes (in-flight gRPC exports are cancelled).
        self.export.grpc_runtime.take();
        self.console.take();
        report
    }
}
