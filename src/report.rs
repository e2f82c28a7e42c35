//! The answer every scenario gives: what happened to this request, measured.

use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Json, Response};
use serde::Serialize;

use crate::error::AppError;
use crate::measure::{PollStats, Snapshot, ms};

/// The JSON body of every scenario.
#[derive(Debug, Serialize)]
pub struct Report {
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
        scenario: &crate::scenarios::Scenario,
        probe: &Probe,
        params: serde_json::Value,
        stats: Snapshot,
        mut verdict: String,
    ) -> Report {
        // The victim's side of a stall: it could not even be read.
        if let Some(queued) = stats.queued_ms
            && queued >= crate::scenarios::HOLD_MS
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

    pub fn with_jobs(mut self, jobs: Vec<Job>) -> Report {
        self.jobs = jobs;
        self
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Report {
        self.detail = Some(detail);
        self
    }
}

/// Awaits every job's `JoinHandle`, in order.
pub async fn join_jobs(handles: Vec<tokio::task::JoinHandle<Job>>) -> Result<Vec<Job>, AppError> {
    let mut jobs = Vec::with_capacity(handles.len());
    for handle in handles {
        jobs.push(
            handle
                .await
                .map_err(|e| AppError::Internal(format!("job failed: {e}")))?,
        );
    }
    Ok(jobs)
}

impl IntoResponse for Report {
    fn into_response(self) -> Response {
        Json(self).into_response()
    }
}

/// One unit of work inside a scenario: a timer wait, a spawned task or a
/// blocking-pool job. `start_ms`/`end_ms` are relative to the request's start,
/// so overlapping intervals *are* parallelism (or concurrency, for timers).
#[derive(Debug, Clone, Serialize)]
pub struct Job {
    pub index: usize,
    /// `"worker N"` or `"blocking pool"`: where the job's code ran.
    pub ran_on: String,
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
    pub fn cpu(index: usize, ms: u64, request_started: Instant) -> Job {
        let clock = || crate::stall::cpu::current_tid().and_then(crate::stall::cpu::thread_clock);
        let clock_before = clock();
        let start = Instant::now();
        crate::cpu::burn(std::time::Duration::from_millis(ms));
        let end = Instant::now();
        let mut job = Job::record(index, request_started, start, end, end - start);
        job.cpu_ms = clock_before
            .zip(clock())
            .map(|(before, after)| self::ms(Duration::from_nanos(after.since(before).on_cpu_ns)));
        job
    }

    /// A job that ran from `start` to `end` on the calling thread, busy for
    /// `busy` of that time.
    pub fn record(
        index: usize,
        request_started: Instant,
        start: Instant,
        end: Instant,
        busy: Duration,
    ) -> Job {
        Job {
            index,
            ran_on: crate::runtime::current_place(),
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
pub fn parallelism(jobs: &[Job]) -> f64 {
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

/// The distinct places (workers or blocking threads) the jobs ran on.
pub fn job_places(jobs: &[Job]) -> Vec<String> {
    let mut places: Vec<String> = jobs
        .iter()
        .map(|j| {
            if j.ran_on == crate::runtime::BLOCKING_POOL {
                format!("{} thread {}", j.ran_on, j.thread)
            } else {
                j.ran_on.clone()
            }
        })
        .collect();
    places.sort();
    places.dedup();
    places
}

/// The request's own poll statistics, handed to the handler by the request
/// middleware ([`crate::request`]). Also the request's start time, the zero
/// of every [`Job`] interval.
#[derive(Clone, Debug)]
pub struct Probe {
    pub stats: PollStats,
    pub started: Instant,
    /// Who this request is, for naming the tasks it spawns to the stall
    /// watcher (`None` when the watcher is off).
    pub culprit: Option<std::sync::Arc<crate::stall::Culprit>>,
    /// The request's trace id (`None` with OTLP off), read once from its
    /// server span by the middleware.
    pub trace_id: Option<std::sync::Arc<str>>,
    /// The stall watcher's view of the workers (`None` when it is off), to
    /// say who kept a request from being read.
    pub monitor: Option<std::sync::Arc<crate::stall::Monitor>>,
}

impl Probe {
    /// The request's answer: `scenario`'s report with its `params`, the
    /// measured `stats` and the `verdict` on them.
    pub fn report(
        &self,
        scenario: &crate::scenarios::Scenario,
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
        let waited = format!("; before that it waited {} to be read", fmt_ms(queued_ms));
        let Some(monitor) = &self.monitor else {
            return waited;
        };
        let created = self.stats.created();
        let arrived = created
            .checked_sub(Duration::from_secs_f64(queued_ms / 1000.0))
            .unwrap_or(created);
        let held = monitor.workers_held_between(arrived, created);
        let workers = monitor.workers();
        let name = |w: &usize| format!("worker {w}");
        if held.is_empty() {
            waited
        } else if held.len() >= workers {
            if workers == 1 {
                format!("{waited}, while the only worker was held by a stall")
            } else {
                format!("{waited}, while every worker was held by a stall")
            }
        } else {
            let free: Vec<String> = (0..workers)
                .filter(|w| !held.contains(w))
                .map(|w| name(&w))
                .collect();
            let held: Vec<String> = held.iter().map(name).collect();
            format!(
                "{waited}: {} {} held by a stall, and {}, though free, did not pick it up \
                 (see \"A free worker is not enough\" in the README)",
                fmt_places(&held),
                if held.len() == 1 { "was" } else { "were" },
                fmt_places(&free),
            )
        }
    }

    /// Milliseconds since the request started.
    pub fn since_start(&self, at: Instant) -> f64 {
        ms(at.saturating_duration_since(self.started))
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
pub fn fmt_ms(value: f64) -> String {
    if value >= 10.0 {
        format!("{value:.0} ms")
    } else if value >= 0.1 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.2} ms")
    }
}

/// "worker 1", "workers 0 and 1", "workers 0, 1 and 2".
pub fn fmt_places<S: AsRef<str>>(places: &[S]) -> String {
    let mut places: Vec<&str> = places.iter().map(AsRef::as_ref).collect();
    places.sort();
    places.dedup();
    match places.as_slice() {
        [] => "no thread".to_owned(),
        [one] => (*one).to_owned(),
        [init @ .., last] => {
            let all_workers = places.iter().all(|p| p.starts_with("worker "));
            if all_workers {
                let numbers: Vec<&str> = places.iter().map(|p| &p["worker ".len()..]).collect();
                let (init, last) = numbers.split_at(numbers.len() - 1);
                format!("workers {} and {}", init.join(", "), last[0])
            } else {
                format!("{} and {last}", init.join(", "))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stall::Monitor;

    /// A probe of a request created now on a runtime of `workers`, whose
    /// monitor started 30 ms ago (so every instant below is after its epoch).
    fn probe_on(workers: usize) -> (Probe, std::sync::Arc<Monitor>) {
        let monitor = Monitor::new(workers, Duration::from_millis(1), 8, None);
        std::thread::sleep(Duration::from_millis(30));
        let probe = Probe {
            stats: PollStats::new(),
            started: Instant::now(),
            culprit: None,
            trace_id: None,
            monitor: Some(monitor.clone()),
        };
        (probe, monitor)
    }

    /// Worker `worker` was held from `from` to `to` ms before the request's
    /// task was created.
    fn held(probe: &Probe, monitor: &Monitor, worker: usize, from: u64, to: u64) {
        let created = probe.stats.created();
        monitor.note_long_poll_at(
            worker,
            created - Duration::from_millis(from),
            created - Duration::from_millis(to),
        );
    }

    #[test]
    fn a_request_left_unread_beside_a_free_worker_says_so() {
        let (probe, monitor) = probe_on(2);
        held(&probe, &monitor, 0, 15, 2);
        assert_eq!(
            probe.why_unread(10.0),
            "; before that it waited 10 ms to be read: worker 0 was held by a stall, \
             and worker 1, though free, did not pick it up \
             (see \"A free worker is not enough\" in the README)"
        );
    }

    #[test]
    fn a_request_left_unread_by_held_workers_blames_them_all() {
        let (probe, monitor) = probe_on(2);
        held(&probe, &monitor, 0, 15, 2);
        held(&probe, &monitor, 1, 8, 1);
        assert_eq!(
            probe.why_unread(10.0),
            "; before that it waited 10 ms to be read, while every worker was held by a stall"
        );
        let (single, monitor) = probe_on(1);
        held(&single, &monitor, 0, 15, 2);
        assert_eq!(
            single.why_unread(10.0),
            "; before that it waited 10 ms to be read, while the only worker was held by a stall"
        );
    }

    #[test]
    fn a_stall_outside_the_wait_is_not_blamed() {
        let (probe, monitor) = probe_on(2);
        // Ended before the request's bytes arrived (10 ms before creation).
        held(&probe, &monitor, 0, 25, 12);
        assert_eq!(
            probe.why_unread(10.0),
            "; before that it waited 10 ms to be read"
        );
        let unwatched = Probe {
            monitor: None,
            ..probe
        };
        assert_eq!(
            unwatched.why_unread(10.0),
            "; before that it waited 10 ms to be read"
        );
    }
}
