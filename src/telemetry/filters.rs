//! Each layer's filter. All are static (one answer per callsite, cached):
//! the one per-span decision, which tokio tasks the console records, is
//! [`ConsoleGate`](super::console_budget::ConsoleGate)'s.

use tracing_subscriber::filter::{self, FilterExt};
use tracing_subscriber::layer::Filter;
use tracing_subscriber::{EnvFilter, Registry};

use super::TelemetryError;
use super::lean_filter::LeanEnvFilter;

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
pub(super) const CONSOLE_DIRECTIVES: &str = "tokio=trace,runtime=trace";

/// The internal-logs feature of opentelemetry/opentelemetry_sdk is ON in this
/// dependency graph (opentelemetry's default features), so the SDK emits a
/// `tracing` error event per failed batch (`BatchSpanProcessor.ExportError`).
/// Our counting exporter reports failures once; silence the SDK unless the
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

/// The fmt layer's filter: `log` (from the setting `source`) with the SDK
/// silenced, on events only. Recording every request span's fields for log
/// context would cost formatting on every request; events that matter name
/// their request themselves.
pub(super) fn fmt_filter(
    log: &str,
    source: &'static str,
) -> Result<impl Filter<Registry> + Send + Sync + 'static, TelemetryError> {
    let directives =
        EnvFilter::try_new(fmt_filter_string(log)).map_err(|e| TelemetryError::Config {
            key: source,
            message: format!("{log:?}: {e}"),
        })?;
    Ok(directives.and(filter::filter_fn(|meta| meta.is_event())))
}

/// The OpenTelemetry layer's filter: `telemetry.otlp_filter`, never tokio's
/// or the exporter's own spans.
pub(super) fn otel_filter(
    otlp_filter: &str,
) -> Result<impl Filter<Registry> + Send + Sync + 'static, TelemetryError> {
    let level = LeanEnvFilter::try_new(otlp_filter).map_err(|e| TelemetryError::Config {
        key: "telemetry.otlp_filter",
        message: format!("{otlp_filter:?}: {e}"),
    })?;
    Ok(filter::filter_fn(otlp_allowed).and(level))
}

/// The console layer's filter: tokio's own instrumentation.
pub(super) fn console_filter() -> LeanEnvFilter {
    LeanEnvFilter::new(CONSOLE_DIRECTIVES)
}

#[cfg(test)]
mod tests {
    use super::*;

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
