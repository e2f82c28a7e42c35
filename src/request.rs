//! Every request runs in its own named task, inside a measuring wrapper.
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

use std::sync::atomic::Ordering;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::AppError;
use crate::measure::PollStats;
use crate::report::Probe;
use crate::state::AppState;

/// Route label for requests that matched no route.
pub const UNMATCHED: &str = "unmatched";

/// The task name of a request: method and route template, e.g.
/// `GET /block/sleep`, never the concrete path with its query.
pub fn task_name(method: &axum::http::Method, route: &str) -> String {
    format!("{method} {route}")
}

pub async fn run_in_own_task(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED, |m| m.as_str())
        .to_owned();
    let name = task_name(req.method(), &route);

    let probe = Probe {
        stats: PollStats::new(),
        started: Instant::now(),
    };
    req.extensions_mut().insert(probe.clone());
    let work = probe.stats.measure(next.run(req));

    state.in_flight.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(&state);
    let spawned = tokio::task::Builder::new().name(&name).spawn(work);
    match spawned {
        Ok(handle) => match handle.await {
            Ok(response) => response,
            Err(join_error) => {
                AppError::Internal(format!("request task for {name} failed: {join_error}"))
                    .into_response()
            }
        },
        Err(spawn_error) => AppError::Internal(format!(
            "cannot spawn request task for {name}: {spawn_error}"
        ))
        .into_response(),
    }
}

/// Decrements the in-flight gauge however the request ends.
struct InFlight<'a>(&'a AppState);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
