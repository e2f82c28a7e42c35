//! The answer every scenario gives: what happened to this request, measured.

use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::AppError;
use stall_watch::{Culprit, Place, Watch};

use crate::measure::{PollStats, Snapshot, ms};
use crate::scenario::Scenario;

/// A poll longer than this is "holding the worker" in verdicts: long enough
/// to be no accident of scheduling, short enough that a person would notice
/// it in a latency chart.
pub const HOLD_MS: f64 = 20.0;

/// The JSON body of every scenario.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The route, e.g. `/block/sleep`.
    pub scenario: &'static str,
    /// The parameters as understood, e.g. `{"ms": 200}`.
    pub params: serde_json::Value,
    /// Poll statistics of the request's own task (see [`crate::measure`]).
    #[serde(flatten)]
    pub stats: Snapshot,
    /// One plain sentence saying what the numbers mean.
    pub verdict: String,
    /// The request's trace id: paste it into Jaeger's search box.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<std::sync::Arc<str>>,
    /// The pieces of work a fan-out or offload ran, with where and when.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<Job>,
    /// Scenario-specific extra facts (e.g. the downstream call's status).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Report {
    /// The answer of `scenario` with its measured `stats` and `verdict`, for
    /// the request `probe` measured (scenarios call [`Probe::report`]).
    fn new(
        scenario: &Scenario,
        probe: &Probe,
        params: serde_json::Value,
        stats: Snapshot,
        mut verdict: String,
    ) -> Report {
        // The victim's side of a stall: it could not even be read.
        if let Some(queued) = stats.queued_ms
            && queued >= HOLD_MS
        {
            verdict.push_str(&probe.why_unread(queued));
        }
        Report {
            scenario: scenario.route,
            params,
            stats,
            verdict,
            trace_id: probe.trace_id.clone(),
            jobs: Vec::new(),
            detail: None,
        }
    }

    pub(crate) fn with_jobs(mut self, jobs: Vec<Job>) -> Report {
        self.jobs = jobs;
        self
    }

    pub(crate) fn with_detail(mut self, detail: serde_json::Value) -> Report {
        self.detail = Some(detail);
        self
    }
}

impl IntoResponse for Report {
    /// Serialized straight into one buffer sized for a typical report
    /// (`Json` starts at 128 bytes and grows twice for a ~300-byte report).
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(REPORT_CAPACITY);
        match serde_json::to_writer(&mut body, &self) {
            Ok(()) => (
                [(
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/json"),
                )],
                body,
            )
                .into_response(),
            // What `Json` does: a report that cannot be serialized is a bug.
            Err(e) => {
                (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
            }
        }
    }
}

/// Bytes reserved for a report's JSON: `/healthz`'s is ~300, a fan-out's
/// with its jobs a few KB (it grows as needed).
const REPORT_CAPACITY: usize = 512;

/// One unit of work inside a scenario: a timer wait, a spawned task or a
/// blocking-pool job. `start_ms`/`end_ms` are relative to the request's start,
/// so overlapping intervals *are* parallelism (or concurrency, for timers).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Job {
    pub index: usize,
    /// `"worker N"` or `"blocking pool"`: where the job's code ran.
    pub ran_on: Place,
    /// The OS thread's name, e.g. `app-rt-3`: tells blocking-pool threads apart.
    pub thread: String,
    pub start_ms: f64,
    pub end_ms: f64,
    /// Time the job held its thread: the CPU loop's duration for CPU jobs,
    /// about 0 for timer waits.
    pub busy_ms: f64,
    /// Of that, the time the thread actually ran on a CPU, from the kernel's
    /// clock for the thread. The CPU loop runs for a *wall-clock* duration,
    /// so when more threads burn than there are cores, each is on a CPU for
    /// only part of it: `cpu_ms` < `busy_ms`. (CPU jobs only.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_ms: Option<f64>,
}

impl Job {
    /// Runs `ms` of CPU work on the calling thread and records it as job
    /// `index` of a request that started at `request_started`.
    pub(crate) fn cpu(index: usize, ms: u64, request_started: Instant) -> Job {
        let clock_before = crate::cpu::thread_cpu_time();
        let start = Instant::now();
        crate::cpu::burn(std::time::Duration::from_millis(ms));
        let end = Instant::now();
        let mut job = Job::record(index, request_started, start, end, end - start);
        job.cpu_ms = clock_before
            .zip(crate::cpu::thread_cpu_time())
            .map(|(before, after)| self::ms(after.saturating_sub(before)));
        job
    }

    /// A job that ran from `start` to `end` on the calling thread, busy for
    /// `busy` of that time.
    pub(crate) fn record(
        index: usize,
        request_started: Instant,
        start: Instant,
        end: Instant,
        busy: Duration,
    ) -> Job {
        Job {
            index,
            ran_on: Place::current(),
            thread: std::thread::current()
                .name()
                .unwrap_or("unnamed")
                .to_owned(),
            start_ms: ms(start.saturating_duration_since(request_started)),
            end_ms: ms(end.saturating_duration_since(request_started)),
            busy_ms: ms(busy),
            cpu_ms: None,
        }
    }
}

/// How many jobs really ran at once, on average: the sum of their CPU time
/// (busy time where the CPU clock is unknown) over the wall time of the
/// whole batch. 1.0 is one at a time; 2.0 is two cores working all along.
/// Threads beyond the core count add concurrency, not parallelism: eight
/// jobs on eight blocking threads of a 2-core machine still make about 2.0.
pub(crate) fn parallelism(jobs: &[Job]) -> f64 {
    let busy: f64 = jobs.iter().map(|j| j.cpu_ms.unwrap_or(j.busy_ms)).sum();
    let start = jobs
        .iter()
        .map(|j| j.start_ms)
        .fold(f64::INFINITY, f64::min);
    let end = jobs.iter().map(|j| j.end_ms).fold(0.0, f64::max);
    if end > start {
        (busy / (end - start) * 10.0).round() / 10.0
    } else {
        1.0
    }
}

/// The distinct places (workers, or the blocking pool) the jobs ran on.
pub(crate) fn job_places(jobs: &[Job]) -> Vec<Place> {
    let mut places: Vec<Place> = jobs.iter().map(|j| j.ran_on).collect();
    places.sort();
    places.dedup();
    places
}

/// How many distinct threads the jobs ran on.
pub(crate) fn job_threads(jobs: &[Job]) -> usize {
    let mut threads: Vec<&str> = jobs.iter().map(|j| j.thread.as_str()).collect();
    threads.sort_unstable();
    threads.dedup();
    threads.len()
}

/// The request's own poll statistics, handed to the handler by the request
/// request middleware. Also the request's start time, the zero
/// of every [`Job`] interval.
#[derive(Clone, Debug)]
pub(crate) struct Probe {
    pub stats: PollStats,
    pub started: Instant,
    /// Who this request is, for naming the tasks it spawns to the stall
    /// watcher (`None` when the watcher is off).
    pub culprit: Option<std::sync::Arc<Culprit>>,
    /// The request's trace id (`None` with OTLP off), read once from its
    /// server span by the middleware.
    pub trace_id: Option<std::sync::Arc<str>>,
    /// The stall watcher (`None` when it is off), to say who kept a request
    /// from being read.
    pub watch: Option<Watch>,
}

impl Probe {
    /// The request's answer: `scenario`'s report with its `params`, the
    /// measured `stats` and the `verdict` on them.
    pub(crate) fn report(
        &self,
        scenario: &Scenario,
        params: serde_json::Value,
        stats: Snapshot,
        verdict: String,
    ) -> Report {
        Report::new(scenario, self, params, stats, verdict)
    }

    /// The verdict's clause for a request whose bytes waited `queued_ms` in
    /// the socket before anyone read them: which workers were held by a
    /// stall meanwhile, as far as the stall watcher knows.
    ///
    /// "Held" and "not read" are not the same thing. On a multi-thread
    /// runtime a request can wait for the whole stall of *one* worker while
    /// another is free: the free one sleeps until something wakes it, and
    /// the held one may have been the one polling the sockets (README, "A
    /// free worker is not enough"). The clause says so when it happened.
    fn why_unread(&self, queued_ms: f64) -> String {
        let Some(watch) = &self.watch else {
            return unread_clause(queued_ms, &[], 0);
        };
        let created = self.stats.created();
        let arrived = created
            .checked_sub(Duration::from_secs_f64(queued_ms / 1000.0))
            .unwrap_or(created);
        let held = watch.workers_held_between(arrived, created);
        unread_clause(queued_ms, &held, watch.workers().len())
    }
}

/// The clause of [`Probe::why_unread`] for a request that waited `queued_ms`
/// while the workers `held` (of `workers`) were held by a stall.
fn unread_clause(queued_ms: f64, held: &[usize], workers: usize) -> String {
    let waited = format!("; before that it waited {} to be read", fmt_ms(queued_ms));
    if held.is_empty() {
        waited
    } else if held.len() >= workers {
        if workers == 1 {
            format!("{waited}, while the only worker was held by a stall")
        } else {
            format!("{waited}, while every worker was held by a stall")
        }
    } else {
        let free: Vec<Place> = (0..workers)
            .filter(|w| !held.contains(w))
            .map(Place::Worker)
            .collect();
        let held: Vec<Place> = held.iter().copied().map(Place::Worker).collect();
        format!(
            "{waited}: {} {} held by a stall, and {}, though free, did not pick it up \
             (see \"A free worker is not enough\" in the README)",
            fmt_places(&held),
            if held.len() == 1 { "was" } else { "were" },
            fmt_places(&free),
        )
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Probe {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, AppError> {
        parts.extensions.get::<Probe>().cloned().ok_or_else(|| {
            AppError::Internal("request was not measured (missing request middleware)".into())
        })
    }
}

/// Formats milliseconds for verdicts: whole numbers above 10 ms, one
/// decimal below, so "held worker 1 for 203 ms" and "busy for 0.1 ms".
///
/// A `Display` value, not a `String`: verdicts are `format!`ed, and each
/// `String` here was an allocation of its own on every request.
pub(crate) fn fmt_ms(value: f64) -> Millis {
    Millis(value)
}

/// Milliseconds as verdicts write them (see [`fmt_ms`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Millis(pub(crate) f64);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = self.0;
        if value >= 10.0 {
            write!(f, "{value:.0} ms")
        } else if value >= 0.1 {
            write!(f, "{value:.1} ms")
        } else {
            write!(f, "{value:.2} ms")
        }
    }
}

/// "worker 1", "workers 0 and 1", "workers 0, 1 and 2", "worker 0 and
/// blocking pool".
pub(crate) fn fmt_places(places: &[Place]) -> String {
    let mut places = places.to_vec();
    places.sort();
    places.dedup();
    let workers: Vec<String> = places
        .iter()
        .filter_map(|p| p.worker().map(|w| w.to_string()))
        .collect();
    let list = |items: &[String]| match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    };
    match (places.as_slice(), workers.len() == places.len()) {
        ([], _) => "no thread".to_owned(),
        ([one], _) => one.to_string(),
        (_, true) => format!("workers {}", list(&workers)),
        (_, false) => list(&places.iter().map(ToString::to_string).collect::<Vec<_>>()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_left_unread_beside_a_free_worker_says_so() {
        assert_eq!(
            unread_clause(10.0, &[0], 2),
            "; before that it waited 10 ms to be read: worker 0 was held by a stall, \
             and worker 1, though free, did not pick it up \
             (see \"A free worker is not enough\" in the README)"
        );
    }

    #[test]
    fn a_request_left_unread_by_held_workers_blames_them_all() {
        assert_eq!(
            unread_clause(10.0, &[0, 1], 2),
            "; before that it waited 10 ms to be read, while every worker was held by a stall"
        );
        assert_eq!(
            unread_clause(10.0, &[0], 1),
            "; before that it waited 10 ms to be read, while the only worker was held by a stall"
        );
    }

    #[test]
    fn a_wait_without_a_stall_blames_no_one() {
        assert_eq!(
            unread_clause(10.0, &[], 2),
            "; before that it waited 10 ms to be read"
        );
    }

    #[test]
    fn places_read_as_plain_words() {
        use Place::{BlockingPool, Worker};
        assert_eq!(fmt_places(&[Worker(1)]), "worker 1");
        assert_eq!(
            fmt_places(&[Worker(1), Worker(0), Worker(1)]),
            "workers 0 and 1"
        );
        assert_eq!(
            fmt_places(&[Worker(0), Worker(1), Worker(2)]),
            "workers 0, 1 and 2"
        );
        assert_eq!(
            fmt_places(&[BlockingPool, Worker(0)]),
            "worker 0 and blocking pool"
        );
        assert_eq!(fmt_places(&[]), "no thread");
    }
}
