//! Every request runs in its own named task, inside a server span and a
//! measuring wrapper.
//!
//! axum does not schedule anything: hyper polls a request's handler inside
//! the task of its *connection*. This middleware instead spawns the rest of
//! the request (extractors and handler) as a task of its own, named after the
//! route (`GET /block/sleep`), for two reasons:
//!
//! 1. tokio-console shows one task per in-flight request, by route, rather
//!    than one anonymous task per keep-alive connection.
//! 2. The task's polls are exactly the handler's polls, so [`PollStats`]
//!    measures the handler and nothing else.
//!
//! Spawning does not add parallelism by itself: the connection task just
//! awaits the request task's `JoinHandle`. If the client goes away, the
//! request task still runs to completion; a blocking handler could not be
//! interrupted anyway (it never reaches an `.await` where it could be
//! cancelled), and finishing keeps the stall budget honest.
//!
//! The server span (with OTLP on; made with the OpenTelemetry SDK, see
//! [`RequestSpan`]) follows the HTTP semantic conventions
//! (`http.request.method`, `http.route`, `url.path`,
//! `http.response.status_code`), continues an inbound W3C `traceparent`, and
//! ends with the poll statistics as attributes, so Jaeger shows *why* a
//! request was slow: `busy_ms` ≈ `wall_ms` means it held a worker;
//! a large `sched_delay_ms` means it waited for one.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::Either;
use opentelemetry::KeyValue;
use opentelemetry::trace::FutureExt as _;

use crate::arrival::Arrival;
use crate::error::AppError;
use crate::measure::PollStats;
use crate::report::Probe;
use crate::state::AppState;
use crate::telemetry::RequestSpan;

/// Route label for requests that matched no route.
pub(crate) const UNMATCHED: &str = "unmatched";

pub(crate) async fn run_in_own_task(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    // `MatchedPath` is an `Arc<str>` inside: a clone is a reference count,
    // where `to_owned()` on its `&str` allocated on every request.
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    let name = state.task_name(req.method(), route);

    // The server span, made with the OpenTelemetry SDK (`telemetry::
    // RequestSpan` says why not with `tracing`); none with OTLP off.
    let otel = RequestSpan::start(&name, req.method(), route, req.uri().path(), req.headers());
    let ids = otel.as_ref().and_then(RequestSpan::ids);
    // What the ids are needed for, made before the culprit takes them.
    // W3C Trace Context level 2: tells the client which trace to look up.
    let traceresponse = ids
        .as_ref()
        .and_then(|(trace_id, span_id)| traceresponse(trace_id, span_id));
    let trace_id = ids
        .as_ref()
        .map(|(trace_id, _)| Arc::<str>::from(trace_id.as_str()));

    let culprit = state
        .watch
        .as_ref()
        .map(|_| state.culprit(&name, route, ids));
    let stats = PollStats::new();
    // The kernel stamped the request's bytes when they reached the socket;
    // it is now fully read, so their age is how long it waited to be read.
    if let Some(age) = req
        .extensions()
        .get::<ConnectInfo<Arrival>>()
        .and_then(|info| info.0.age())
    {
        stats.set_queued(age);
    }
    // The handler gets the probe; the middleware keeps the statistics.
    let probe = Probe {
        stats: stats.clone(),
        // The statistics were created a moment ago: one clock read, not two.
        started: stats.created(),
        culprit: culprit.clone(),
        trace_id,
        watch: state.watch.clone(),
    };
    req.extensions_mut().insert(probe);
    let mut work = stats.measure(next.run(req));
    if let Some(watch) = &state.watch {
        work = work.report_polls_over(watch.threshold(), name.clone());
    }
    // Context outside, measurement inside: each poll runs with the request
    // span as the current OpenTelemetry context, so the scenarios' spans
    // are its children and the long-poll event lands on it.
    let work = match &otel {
        Some(otel) => Either::Left(work.with_context(otel.context().clone())),
        None => Either::Right(work),
    };

    state.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(&state);
    let mut response = match tokio::task::Builder::new().name(&name).spawn(work) {
        Ok(handle) => {
            // Named for the stall watcher from the moment it exists: should
            // this task hold a worker too long, the stall names this route.
            let _tracked = state.track(handle.id(), culprit);
            match handle.await {
                Ok(response) => response,
                Err(join_error) => {
                    AppError::Internal(format!("request task for {name} failed: {join_error}"))
                        .into_response()
                }
            }
        }
        Err(spawn_error) => AppError::Internal(format!(
            "cannot spawn request task for {name}: {spawn_error}"
        ))
        .into_response(),
    };

    if let Some(notice) = state.console_budget.as_ref().and_then(|b| b.take_notice()) {
        tracing::warn!("{notice}");
    }

    if let Some(otel) = otel {
        end_span(otel, response.status(), &stats);
    }

    if let Some(value) = traceresponse {
        response.headers_mut().insert("traceresponse", value);
    }
    response
}

/// Ends the request's span with how the request went: the status and the
/// poll statistics (a snapshot taken only when there is a span).
fn end_span(otel: RequestSpan, status: StatusCode, stats: &PollStats) {
    let stats = stats.snapshot();
    // One string, written in place: no `String` per worker and no `Vec`.
    let mut workers = String::with_capacity(24);
    for (i, place) in stats.workers.iter().enumerate() {
        use std::fmt::Write;
        let _ = write!(workers, "{}{place}", if i == 0 { "" } else { ", " });
    }
    let attributes = [
        KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
        KeyValue::new("wall_ms", stats.wall_ms),
        KeyValue::new("polls", i64::try_from(stats.polls).unwrap_or(i64::MAX)),
        KeyValue::new("busy_ms", stats.busy_ms),
        KeyValue::new("longest_poll_ms", stats.longest_poll_ms),
        KeyValue::new("sched_delay_ms", stats.sched_delay_ms),
        KeyValue::new("workers", workers),
    ];
    let queued = stats.queued_ms.map(|q| KeyValue::new("queued_ms", q));
    otel.end(
        attributes.into_iter().chain(queued),
        status.is_server_error(),
    );
}

/// `00-{trace}-{span}-01` (W3C Trace Context level 2), built on the stack:
/// the header value is its only allocation.
fn traceresponse(trace_id: &str, span_id: &str) -> Option<HeaderValue> {
    let mut buf = [0u8; 64];
    let len = 3 + trace_id.len() + 1 + span_id.len() + 3;
    let out = buf.get_mut(..len)?;
    let mut at = 0;
    for part in [
        b"00-".as_slice(),
        trace_id.as_bytes(),
        b"-",
        span_id.as_bytes(),
        b"-01",
    ] {
        out[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    HeaderValue::from_bytes(out).ok()
}

/// Decrements the in-flight gauge however the request ends.
struct InFlight<'a>(&'a AppState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
