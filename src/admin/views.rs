//! `/debug/runtime`, `/debug/stalls` and `/debug/events`: the runtime as the
//! admin server sees it from outside.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Json, Response};
use futures::Stream;
use serde_json::{Value, json};

use super::{AdminState, EVENTS_INTERVAL, no_store};

/// How many recent stalls the live views carry.
pub const RECENT_STALLS: usize = 50;

/// Window of the per-worker busy ratio.
pub const BUSY_WINDOW: Duration = Duration::from_secs(1);

/// Samples tokio's per-worker busy time every [`EVENTS_INTERVAL`], keeping
/// one [`BUSY_WINDOW`] of history to turn into a ratio.
#[derive(Debug, Default)]
pub struct BusySampler {
    /// (when, busy time of each worker) — oldest first.
    samples: Mutex<VecDeque<(Instant, Vec<Duration>)>>,
}

impl BusySampler {
    /// Runs forever on the admin runtime.
    pub async fn run(self: Arc<Self>, app: tokio::runtime::Handle) {
        let mut interval = tokio::time::interval(EVENTS_INTERVAL);
        loop {
            interval.tick().await;
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
pub fn runtime_document(state: &AdminState) -> Value {
    let metrics = state.app.metrics();
    let views = state.monitor.as_ref().map(|m| m.worker_views());
    let polling: Vec<Option<f64>> = (0..metrics.num_workers())
        .map(|w| {
            views
                .as_ref()
                .and_then(|v| v.get(w))
                .and_then(|v| v.poll_elapsed_ms)
        })
        .collect();
    let ratios = state.busy.ratios(metrics.num_workers(), &polling);
    let worker_stats: Vec<Value> = (0..metrics.num_workers())
        .map(|w| {
            let view = views.as_ref().and_then(|v| v.get(w));
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
    json!({
        "flavor": state.config.runtime.flavor,
        "workers": metrics.num_workers(),
        "max_blocking_threads": state.config.runtime.max_blocking_threads,
        "blocking_threads": metrics.num_blocking_threads(),
        "idle_blocking_threads": metrics.num_idle_blocking_threads(),
        "blocking_queue_depth": metrics.blocking_queue_depth(),
        "alive_tasks": metrics.num_alive_tasks(),
        "global_queue_depth": metrics.global_queue_depth(),
        "busy_window_ms": BUSY_WINDOW.as_millis() as u64,
        "worker_stats": worker_stats,
        // null with the console off.
        "console": state.console.as_ref().map(|b| b.snapshot()),
    })
}

/// The `/debug/stalls` document (empty, with `watch: false`, when the
/// watcher is off).
pub fn stalls_document(state: &AdminState) -> Value {
    match &state.monitor {
        Some(monitor) => {
            let mut document = monitor.stalls_document(RECENT_STALLS);
            document["watch"] = json!(true);
            document
        }
        None => json!({
            "watch": false,
            "threshold_ms": state.config.stall.threshold_ms,
            "in_progress": [],
            "recent": [],
            "total": 0,
            "wake_idle_worker": false,
        }),
    }
}

pub async fn runtime(State(state): State<AdminState>) -> Response {
    no_store(Json(runtime_document(&state)))
}

pub async fn stalls(State(state): State<AdminState>) -> Response {
    no_store(Json(stalls_document(&state)))
}

/// Server-sent events: one `snapshot` event every [`EVENTS_INTERVAL`].
pub async fn events(State(state): State<AdminState>) -> impl IntoResponse {
    let stream = futures::stream::unfold(
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
        "stalls": stalls_document(state),
        "lag": state.lag.view(),
    })
}
