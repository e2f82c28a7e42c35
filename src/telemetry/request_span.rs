//! The request's server span, made with the OpenTelemetry SDK directly.
//!
//! Every other span goes through `tracing` (and tracing-opentelemetry, when
//! OTLP is on); the one made for every request does not, because that path
//! costs several times plain `tracing` per span (tokio-rs/tracing#1303):
//! under the overhead bench the SDK span took 2.5–4 µs less of the workers'
//! CPU per request. What the `tracing` span gave for free is kept:
//!
//! - the span is the *current OpenTelemetry context* while the request task
//!   is polled ([`RequestSpan::context`] + `FutureExt::with_context`), so the
//!   scenarios' `tracing` spans, which have no `tracing` parent, take it as
//!   their parent through tracing-opentelemetry;
//! - [`add_event`] puts the long-poll event on it;
//! - [`link_stall_span`] links stall-watch's `executor.stall` span to it by
//!   the ids its culprit carries.

use std::sync::OnceLock;

use axum::http::{HeaderMap, Method};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _,
};
use opentelemetry::{Context, KeyValue, global};
use opentelemetry_http::HeaderExtractor;
use opentelemetry_sdk::trace::SdkTracer;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The tracer of the request spans: set by `init` when OTLP export is on.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

pub(super) fn install(tracer: SdkTracer) {
    let _ = TRACER.set(tracer);
}

/// A request's server span while the request runs; ended by
/// [`RequestSpan::end`].
#[derive(Debug)]
pub struct RequestSpan {
    /// The inbound parent (if any) with this span: what the request task is
    /// polled in.
    cx: Context,
}

impl RequestSpan {
    /// Starts the server span `name` (`GET /block/sleep`) of a request,
    /// continuing the W3C `traceparent` in `headers` if there is one; `None`
    /// when OTLP export is off.
    pub fn start(
        name: &str,
        method: &Method,
        route: &str,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<RequestSpan> {
        let tracer = TRACER.get()?;
        // Most requests carry none: skip the global propagator (a lock and a
        // context built from nothing) for them.
        let parent = if headers.contains_key("traceparent") {
            global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
        } else {
            Context::new()
        };
        let span = tracer
            .span_builder(name.to_owned())
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method_str(method)),
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("url.path", path.to_owned()),
                // Where the span is made, as tracing-opentelemetry gives
                // every other span of stall-lab's.
                KeyValue::new("code.module.name", module_path!()),
            ])
            .start_with_context(tracer, &parent);
        Some(RequestSpan {
            cx: parent.with_span(span),
        })
    }

    /// Hex (trace id, span id), if the span is valid.
    pub fn ids(&self) -> Option<(String, String)> {
        let span = self.cx.span();
        let sc = span.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }

    /// The context to poll the request in: its children's parent.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// Ends the span with `attributes` (the outcome), its status an error
    /// if `error`.
    pub fn end(self, attributes: impl IntoIterator<Item = KeyValue>, error: bool) {
        let span = self.cx.span();
        span.set_attributes(attributes);
        if error {
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

/// The method, without an allocation for the common ones.
fn method_str(method: &Method) -> opentelemetry::Value {
    let known = if method == Method::GET {
        "GET"
    } else if method == Method::POST {
        "POST"
    } else if method == Method::HEAD {
        "HEAD"
    } else {
        return method.as_str().to_owned().into();
    };
    known.into()
}

/// Adds the event `name` to the request span being polled on this thread,
/// if any (a no-op with OTLP off).
pub fn add_event(name: String, attributes: Vec<KeyValue>) {
    Context::map_current(|cx| {
        if cx.has_active_span() {
            cx.span().add_event(name, attributes);
        }
    });
}

/// Links a stall's `executor.stall` span to its culprit's request span, by
/// the ids the culprit carries (for `stall_watch::Config::link_stall_span`).
pub fn link_stall_span(span: &tracing::Span, culprit: &stall_watch::Culprit) {
    let (Some(trace), Some(span_id)) = (&culprit.trace_id, &culprit.span_id) else {
        return;
    };
    let (Ok(trace), Ok(span_id)) = (TraceId::from_hex(trace), SpanId::from_hex(span_id)) else {
        return;
    };
    span.add_link(SpanContext::new(
        trace,
        span_id,
        TraceFlags::SAMPLED,
        false,
        TraceState::default(),
    ));
}
