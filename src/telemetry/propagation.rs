//! W3C trace context: reading `traceparent` from a request, writing it
//! into an outbound one.

use axum::http::HeaderMap;
use opentelemetry::global;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use tracing_opentelemetry::OpenTelemetrySpanExt;

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
