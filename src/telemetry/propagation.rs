//! W3C trace context: writing `traceparent` into an outbound request (the
//! inbound one is read where the request span is made, `request_span`).

use axum::http::HeaderMap;
use opentelemetry::global;
use opentelemetry_http::HeaderInjector;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// `traceparent` (and `tracestate`) headers for an outbound call made inside
/// `span`. reqwest 0.13 uses the same `http` 1.x `HeaderMap`, so this goes
/// straight into `RequestBuilder::headers`.
pub fn inject_headers(span: &tracing::Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let cx = span.context();
    global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(&mut headers)));
    headers
}
