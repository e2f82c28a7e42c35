//! [`WatchLayer`]: names every request's task after its route, so a stall
//! says which request held the worker.
//!
//! hyper polls a request's handler inside its connection's task (one task
//! per HTTP/1 connection, one per HTTP/2 stream). While a request is in
//! flight the layer registers that task as `METHOD /route` (axum's
//! `MatchedPath` when the layer sits on a `Router`, else the path), with the
//! current `tracing` span and its trace ids when a [`TraceIds`] function is
//! given. Nothing is spawned; the registration is two map operations per
//! request, never per poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::MatchedPath;
use axum::http::Request;

use crate::culprit::Culprit;
use crate::watch::{Tracked, Watch};

/// Reads a span's trace and span ids (hex), e.g. from the OpenTelemetry
/// context tracing-opentelemetry keeps on it:
///
/// ```ignore
/// fn trace_ids(span: &tracing::Span) -> Option<(String, String)> {
///     use opentelemetry::trace::TraceContextExt;
///     use tracing_opentelemetry::OpenTelemetrySpanExt;
///     let cx = span.context();
///     let sc = cx.span().span_context().clone();
///     sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
/// }
/// ```
pub type TraceIds = fn(&tracing::Span) -> Option<(String, String)>;

/// A tower layer that names each request's task for the stall watcher.
///
/// Put it inside (below) your tracing layer, so the current span is the
/// request's span.
#[derive(Clone, Debug)]
pub struct WatchLayer {
    watch: Watch,
    trace_ids: Option<TraceIds>,
}

impl Watch {
    /// A [`WatchLayer`] for this watch.
    pub fn layer(&self) -> WatchLayer {
        WatchLayer {
            watch: self.clone(),
            trace_ids: None,
        }
    }
}

impl WatchLayer {
    /// Culprits carry the trace and span ids `trace_ids` reads from the
    /// current span (for links to the trace). By default there are none.
    pub fn trace_ids(mut self, trace_ids: TraceIds) -> WatchLayer {
        self.trace_ids = Some(trace_ids);
        self
    }
}

impl<S> tower::Layer<S> for WatchLayer {
    type Service = WatchService<S>;

    fn layer(&self, inner: S) -> WatchService<S> {
        WatchService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`WatchLayer`] wraps around yours.
#[derive(Clone, Debug)]
pub struct WatchService<S> {
    inner: S,
    layer: WatchLayer,
}

impl<S, B> tower::Service<Request<B>> for WatchService<S>
where
    S: tower::Service<Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map_or_else(|| request.uri().path(), |m| m.as_str());
        let name = format!("{} {route}", request.method());
        let span = tracing::Span::current();
        let mut culprit = Culprit::new(name).with_span(&span);
        if let Some((trace, span_id)) = self.layer.trace_ids.and_then(|f| f(&span)) {
            culprit = culprit.with_trace(trace, span_id);
        }
        let culprit = Arc::new(culprit);
        let watch = self.layer.watch.clone();
        let future = self.inner.call(request);
        Box::pin(async move {
            // Registered from inside the task that polls the handler; the
            // guard unregisters it when the response is ready or the request
            // is dropped.
            let _tracked: Option<Tracked> = watch.track_current(culprit);
            future.await
        })
    }
}
