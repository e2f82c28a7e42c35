//! Span export: the tracer provider, its OTLP exporter, and the counting
//! that lets shutdown say how many spans never left.
//!
//! Export never needs the application runtime. The SDK's
//! `BatchSpanProcessor` runs on its own OS thread; the HTTP exporter uses the
//! *blocking* reqwest client (which owns a private runtime thread); the gRPC
//! (tonic) exporter is built on, and every export runs on, the `otlp-grpc`
//! side thread. So spans leave the process while every app worker is blocked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    BatchConfig, BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, SpanData, SpanExporter,
    SpanProcessor,
};
use tracing::subscriber::NoSubscriber;

use super::env::{EnvLookup, ResolvedOtlp, env_nonempty, resolve_otlp};
use super::settings::{OtlpProtocol, TelemetryConfig};
use super::side_thread::SideRuntime;
use super::{ResourceInfo, SERVICE_NAME, TelemetryError};

/// What [`Telemetry::shutdown`](super::Telemetry::shutdown) managed to do.
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

/// The batch queue's size unless `OTEL_BSP_MAX_QUEUE_SIZE` says otherwise
/// (the SDK's own default, which it reads from the same variable).
const DEFAULT_MAX_QUEUE_SIZE: usize = 2048;

#[derive(Debug, Default)]
pub(super) struct ExportStats {
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

    pub(super) fn snapshot(&self) -> ExportSnapshot {
        ExportSnapshot {
            exported: self.exported.load(Ordering::Relaxed),
            dropped: self.dropped(),
            queued: self.queued(),
            failed_exports: self.failed_batches.load(Ordering::Relaxed),
            failing: self.in_trouble.load(Ordering::Relaxed),
        }
    }

    /// At the end every span not exported is lost, those still queued too.
    pub(super) fn report(&self) -> ShutdownReport {
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
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
pub struct ExportCounters(pub(super) Arc<ExportStats>);

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

/// The tracer provider and what keeps its export going.
pub(super) struct Export {
    pub(super) provider: SdkTracerProvider,
    pub(super) stats: Arc<ExportStats>,
    /// The `otlp-grpc` side thread, with the gRPC exporter.
    pub(super) grpc_runtime: Option<SideRuntime>,
}

/// Builds the tracer provider: with `telemetry.otlp` on, an OTLP exporter
/// behind a batch processor; off, none. Returns it and the startup log line.
///
/// The sampler is not set here: the SDK's `Config::default()` already honours
/// `OTEL_TRACES_SAMPLER(_ARG)` (default `parentbased_always_on`), which
/// `with_sampler` would override.
pub(super) fn start(
    cfg: &TelemetryConfig,
    info: &ResourceInfo,
    env: EnvLookup<'_>,
) -> Result<(Export, String), TelemetryError> {
    let max_queue = env_nonempty(env, "OTEL_BSP_MAX_QUEUE_SIZE")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_MAX_QUEUE_SIZE);
    let stats = Arc::new(ExportStats::new(max_queue));
    let builder = SdkTracerProvider::builder().with_resource(build_resource(info, env));
    if !cfg.otlp {
        let export = Export {
            provider: builder.build(),
            stats,
            grpc_runtime: None,
        };
        let line = "traces: OTLP export off (telemetry.otlp = false): no spans, no trace ids";
        return Ok((export, line.into()));
    }
    let o = resolve_otlp(cfg, env)?;
    let (transport, grpc_runtime) = transport(&o)?;
    let exporter = CountingExporter {
        transport,
        stats: Arc::clone(&stats),
        target: o.endpoint.clone(),
    };
    let (batch, delay_source) = batch_config(cfg, env);
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();
    let provider = builder
        .with_span_processor(CountingProcessor {
            inner: processor,
            stats: Arc::clone(&stats),
        })
        .build();
    let line = format!(
        "traces: OTLP {} -> {} (endpoint from {}, protocol from {}, batch delay {})",
        o.protocol, o.endpoint, o.endpoint_source, o.protocol_source, delay_source
    );
    let export = Export {
        provider,
        stats,
        grpc_runtime,
    };
    Ok((export, line))
}

/// The OTLP exporter for `o`, and for gRPC the side thread it runs on.
fn transport(o: &ResolvedOtlp) -> Result<(Transport, Option<SideRuntime>), TelemetryError> {
    let exporter_err = |source| TelemetryError::Exporter {
        protocol: o.protocol,
        endpoint: o.endpoint.clone(),
        source,
    };
    match o.protocol {
        OtlpProtocol::HttpProtobuf => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(o.endpoint.clone())
                .with_timeout(o.timeout)
                .build()
                .map_err(exporter_err)?;
            Ok((Transport::Http(Box::new(exporter)), None))
        }
        OtlpProtocol::Grpc => {
            let rt = SideRuntime::start("otlp-grpc", std::future::pending::<Result<(), String>>())?;
            // `connect_lazy` spawns the channel's worker task on the
            // *current* runtime: enter ours so it lands on `otlp-grpc`,
            // never on the app runtime (which may be blocked).
            let exporter = {
                let _enter = rt.handle().enter();
                tracing::subscriber::with_default(NoSubscriber::default(), || {
                    opentelemetry_otlp::SpanExporter::builder()
                        .with_tonic()
                        .with_endpoint(o.endpoint.clone())
                        .with_timeout(o.timeout)
                        .build()
                })
                .map_err(exporter_err)?
            };
            let transport = Transport::Grpc {
                exporter: Arc::new(exporter),
                runtime: rt.handle().clone(),
                timeout: o.timeout,
            };
            Ok((transport, Some(rt)))
        }
    }
}

/// The batch processor's settings and where its delay came from.
///
/// `BatchConfigBuilder::default()` reads `OTEL_BSP_SCHEDULE_DELAY`,
/// `_MAX_QUEUE_SIZE` (bounded queue, default 2048), `_MAX_EXPORT_BATCH_SIZE`
/// and `_EXPORT_TIMEOUT` itself; a programmatic value would *override* the
/// env, so `telemetry.batch_delay_ms` applies only when the env var is absent.
fn batch_config(cfg: &TelemetryConfig, env: EnvLookup<'_>) -> (BatchConfig, String) {
    let batch = BatchConfigBuilder::default();
    if env_nonempty(env, "OTEL_BSP_SCHEDULE_DELAY").is_some() {
        return (batch.build(), "OTEL_BSP_SCHEDULE_DELAY".into());
    }
    let batch = batch.with_scheduled_delay(Duration::from_millis(cfg.batch_delay_ms));
    (batch.build(), format!("{} ms", cfg.batch_delay_ms))
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
