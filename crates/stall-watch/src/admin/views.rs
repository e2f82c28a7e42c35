//! `/debug/runtime`, `/debug/stalls` and `/debug/events`: the runtime as the
//! admin server sees it from outside.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use futures_util::Stream;
use serde_json::{Value, json};

use super::{EVENTS_INTERVAL, State as AdminState, flavor, merge, no_store};
use crate::watch::Watch;

/// How many recent stalls the live views carry.
pub(super) const RECENT_STALLS: usize = 50;

/// Window of the per-worker busy ratio.
pub(super) const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// Samples tokio's per-worker busy time every [`EVENTS_INTERVAL`], keeping
/// one [`BUSY_WINDOW`] of history to turn into a ratio.
#[derive(Debug, Default)]
pub(super) struct BusySampler {
    /// (when, busy time of each worker) — oldest first.
    samples: Mutex<VecDeque<(Instant, Vec<Duration>)>>,
}

impl BusySampler {
    /// Runs forever on the admin runtime.
    pub(super) async fn run(self: Arc<Self>, watch: Watch) {
        let mut interval = tokio::time::interval(EVENTS_INTERVAL);
        loop {
            interval.tick().await;
            let Some(app) = watch.runtime() else {
                continue;
            };
            let metrics = app.metrics();
            let busy: Vec<Duration> = (0..metrics.num_workers())
                .map(|w| metrics.worker_total_busy_duration(w))
                .collect();
            let mut samples = self.samples.lock().expect("busy samples lock");
            samples.push_back((Instant::now(), busy));
            while samples.len() > 2
                && samples
                    .front()
                    .is_some_and(|(at, _)| at.elapsed() > BUSY_WINDOW + EVENTS_INTERVAL)
            {
                samples.pop_front();
            }
        }
    }

    /// Busy ratio of each worker over the window. tokio adds a poll's time to
    /// the busy total only when the worker goes back to its scheduler loop,
    /// so a poll in progress is added from the stall watcher's slots.
    fn ratios(&self, workers: usize, polling_ms: &[Option<f64>]) -> Vec<f64> {
        let samples = self.samples.lock().expect("busy samples lock");
        let (Some((t0, first)), Some((t1, last))) = (samples.front(), samples.back()) else {
            return vec![0.0; workers];
        };
        let window = t1.saturating_duration_since(*t0).as_secs_f64();
        (0..workers)
            .map(|w| {
                if window <= 0.0 {
                    return 0.0;
                }
                let busy = last
                    .get(w)
                    .zip(first.get(w))
                    .map_or(0.0, |(b1, b0)| (*b1 - *b0).as_secs_f64());
                let current = polling_ms.get(w).copied().flatten().unwrap_or(0.0) / 1000.0;
                let ratio = (busy + current.min(window)) / window;
                (ratio.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
            })
            .collect()
    }
}

/// The `/debug/runtime` document.
fn runtime_document(state: &AdminState) -> Value {
    let Some(app) = state.watch.runtime() else {
        return json!({ "workers": 0, "worker_stats": [], "note": "waiting for the watched runtime's first task (the watch learns its workers then, or from Watch::attach)" });
    };
    let metrics = app.metrics();
    let views = state.watch.workers();
    let polling: Vec<Option<f64>> = (0..metrics.num_workers())
        .map(|w| views.get(w).and_then(|v| v.poll_elapsed_ms))
        .collect();
    let ratios = state.busy.ratios(metrics.num_workers(), &polling);
    let worker_stats: Vec<Value> = (0..metrics.num_workers())
        .map(|w| {
            let view = views.get(w);
            json!({
                "index": w,
                "state": view.map_or("unknown", |v| v.state),
                "busy_ratio": ratios[w],
                "local_queue_depth": metrics.worker_local_queue_depth(w),
                "poll_elapsed_ms": view.and_then(|v| v.poll_elapsed_ms),
                "current": view.and_then(|v| v.current.clone()),
                "polls": metrics.worker_poll_count(w),
            })
        })
        .collect();
    let mut document = json!({
        "flavor": flavor(app.runtime_flavor()),
        "workers": metrics.num_workers(),
        "blocking_threads": metrics.num_blocking_threads(),
        "idle_blocking_threads": metrics.num_idle_blocking_threads(),
        "blocking_queue_depth": metrics.blocking_queue_depth(),
        "alive_tasks": metrics.num_alive_tasks(),
        "global_queue_depth": metrics.global_queue_depth(),
        "busy_window_ms": BUSY_WINDOW.as_millis() as u64,
        "worker_stats": worker_stats,
    });
    if let Some(extra) = &state.runtime_extra {
        merge(&mut document, extra());
    }
    document
}

/// The `/debug/stalls` document with the `recent` most recent stalls.
fn stalls_document(state: &AdminState, recent: usize) -> Value {
    let mut document = serde_json::to_value(state.watch.stalls(recent)).unwrap_or_default();
    document["watch"] = json!(state.watch.is_installed());
    document
}

pub(super) async fn runtime(State(state): State<AdminState>) -> Response {
    no_store(Json(runtime_document(&state)))
}

/// `/debug/stalls?recent=N`: how many finished stalls to list (default
/// [`RECENT_STALLS`]; the history keeps at most `Config::history`).
#[derive(Debug, serde::Deserialize)]
pub(super) struct StallsQuery {
    recent: Option<usize>,
}

pub(super) async fn stalls(
    State(state): State<AdminState>,
    axum::extract::Query(query): axum::extract::Query<StallsQuery>,
) -> Response {
    let recent = query.recent.unwrap_or(RECENT_STALLS);
    no_store(Json(stalls_document(&state, recent)))
}

/// Server-sent events: one `snapshot` event every [`EVENTS_INTERVAL`].
pub(super) async fn events(State(state): State<AdminState>) -> impl IntoResponse {
    let stream = futures_util::stream::unfold(
        (state, tokio::time::interval(EVENTS_INTERVAL)),
        |(state, mut interval)| async move {
            interval.tick().await;
            let event = Event::default()
                .event("snapshot")
                .data(snapshot(&state).to_string());
            Some((Ok::<_, Infallible>(event), (state, interval)))
        },
    );
    let stream: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(stream);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    response
}

fn snapshot(state: &AdminState) -> Value {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    json!({
        "now_ms": now_ms,
        "runtime": runtime_document(state),
        "stalls": stalls_document(state, RECENT_STALLS),
        "lag": state.watch.lag(),
    })
}
