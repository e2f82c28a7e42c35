//! What a load run counts, and the report it makes of it.
//!
//! Latencies go into HdrHistograms in microseconds (3 significant digits:
//! 51.2 ms is stored as 51.2 ms, not rounded to a bucket of 10 ms), one per
//! route and one overall. Each request records two durations:
//!
//! - `latency`: from when the request was *due* to the end of its answer.
//!   In the open loop that is the schedule's time, so a request that waited
//!   in the generator because every connection was stuck behind a stall
//!   still counts the wait: this is the coordinated-omission correction.
//! - `service`: from when it was actually written to the end of its answer,
//!   what a naive generator would report.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// The largest latency the histograms hold without resizing: an hour.
const HIGHEST_US: u64 = 3_600_000_000;

/// Counts of one route (or of all of them).
#[derive(Clone)]
pub(crate) struct Tally {
    pub latency: Histogram<u64>,
    pub service: Histogram<u64>,
    /// Answers by HTTP status.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no answer, by [`super::client::Failure::label`].
    pub failures: BTreeMap<String, u64>,
    /// Requests still waiting when the run ended. Their wait so far is in
    /// `latency` (a lower bound: they took at least that long).
    pub unfinished: u64,
}

impl Default for Tally {
    fn default() -> Self {
        let histogram = || {
            let mut h =
                Histogram::new_with_bounds(1, HIGHEST_US, 3).expect("valid HdrHistogram bounds");
            h.auto(true);
            h
        };
        Tally {
            latency: histogram(),
            service: histogram(),
            statuses: BTreeMap::new(),
            failures: BTreeMap::new(),
            unfinished: 0,
        }
    }
}

/// What happened to one request.
pub(crate) enum Outcome {
    Answered {
        status: u16,
        latency: Duration,
        service: Duration,
    },
    Failed {
        label: String,
    },
    /// Still waiting (for a connection or for the answer) when the run
    /// ended, `waited` after it was due.
    Unfinished {
        waited: Duration,
    },
}

impl Tally {
    pub(crate) fn record(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Answered {
                status,
                latency,
                service,
            } => {
                *self.statuses.entry(*status).or_default() += 1;
                self.latency.saturating_record(micros(*latency));
                self.service.saturating_record(micros(*service));
            }
            Outcome::Failed { label } => *self.failures.entry(label.clone()).or_default() += 1,
            Outcome::Unfinished { waited } => {
                self.unfinished += 1;
                self.latency.saturating_record(micros(*waited));
            }
        }
    }

    pub(crate) fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }

    fn add(&mut self, other: &Tally) {
        self.latency.add(&other.latency).expect("auto-resizing");
        self.service.add(&other.service).expect("auto-resizing");
        for (status, n) in &other.statuses {
            *self.statuses.entry(*status).or_default() += n;
        }
        for (label, n) in &other.failures {
            *self.failures.entry(label.clone()).or_default() += n;
        }
        self.unfinished += other.unfinished;
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub(crate) struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    pub(crate) fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p99_9: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

/// The figures of one route, or of all routes together.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RouteReport {
    pub path: String,
    /// Requests the run started (answered + failed + unfinished).
    pub requests: u64,
    pub answered: u64,
    /// Answers with a 2xx status.
    pub ok: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub failures: BTreeMap<String, u64>,
    pub unfinished: u64,
    /// Answers per second of the run.
    pub throughput: f64,
    /// From when each request was due (coordinated-omission corrected).
    pub latency_ms: Percentiles,
    /// From when each request was written (what a naive generator reports).
    pub service_ms: Percentiles,
}

impl RouteReport {
    fn new(path: String, tally: &Tally, elapsed: Duration) -> RouteReport {
        let answered = tally.answered();
        let failed: u64 = tally.failures.values().sum();
        RouteReport {
            path,
            requests: answered + failed + tally.unfinished,
            answered,
            ok: tally
                .statuses
                .iter()
                .filter(|(s, _)| (200..300).contains(*s))
                .map(|(_, n)| n)
                .sum(),
            statuses: tally.statuses.clone(),
            failures: tally.failures.clone(),
            unfinished: tally.unfinished,
            throughput: answered as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_ms: Percentiles::of(&tally.latency),
            service_ms: Percentiles::of(&tally.service),
        }
    }
}

/// The generator's own CPU time over the run.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct CpuUse {
    pub user_s: f64,
    pub system_s: f64,
    /// (user + system) / elapsed: 1.0 is one core busy all the time.
    pub cores: f64,
}

/// The result of one `stall-lab load` run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    pub url: String,
    /// `open` (fixed rate) or `closed` (fixed concurrency).
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub duration_s: f64,
    /// Connections the generator opened.
    pub connections: u64,
    pub overall: RouteReport,
    pub routes: Vec<RouteReport>,
    /// The generator's process CPU (the whole process: in `stall-lab
    /// experiment` that includes the in-process server).
    pub cpu: Option<CpuUse>,
}

impl Report {
    pub(crate) fn new(
        head: Head,
        paths: &[String],
        tallies: &[Tally],
        elapsed: Duration,
        cpu: Option<CpuUse>,
    ) -> Report {
        let mut all = Tally::default();
        for t in tallies {
            all.add(t);
        }
        Report {
            url: head.url,
            mode: head.mode,
            rate: head.rate,
            concurrency: head.concurrency,
            duration_s: elapsed.as_secs_f64(),
            connections: head.connections,
            overall: RouteReport::new("all".to_owned(), &all, elapsed),
            routes: paths
                .iter()
                .zip(tallies)
                .map(|(p, t)| RouteReport::new(p.clone(), t, elapsed))
                .collect(),
            cpu,
        }
    }

    /// The figures of the route whose path is `path`.
    pub(crate) fn route(&self, path: &str) -> Option<&RouteReport> {
        self.routes.iter().find(|r| r.path == path)
    }

    /// The human-readable table `stall-lab load` prints.
    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        let how = match (self.rate, self.concurrency) {
            (Some(rate), _) => format!("open loop at {rate} req/s"),
            (_, Some(c)) => format!("closed loop with {c} connection(s)"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{} for {:.1} s against {} ({} connection(s) opened)\n\n",
            how, self.duration_s, self.url, self.connections
        ));
        let width = self
            .routes
            .iter()
            .map(|r| r.path.len())
            .max()
            .unwrap_or(0)
            .max(5);
        out.push_str(&format!(
            "{:<width$}  {:>8}  {:>8}  {:>6}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}  {:>8}\n",
            "route",
            "requests",
            "ok",
            "errors",
            "req/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms"
        ));
        let rows = self.routes.iter().chain(
            // The overall line only adds something with more than one route.
            (self.routes.len() > 1).then_some(&self.overall),
        );
        for r in rows {
            let l = &r.latency_ms;
            out.push_str(&format!(
                "{:<width$}  {:>8}  {:>8}  {:>6}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}  {:>8.1}\n",
                r.path,
                r.requests,
                r.ok,
                r.requests - r.ok - r.unfinished,
                r.throughput,
                l.p50,
                l.p90,
                l.p99,
                l.p99_9,
                l.max
            ));
        }
        let o = &self.overall;
        out.push_str(&format!(
            "\nanswers by status: {}\n",
            counts(o.statuses.iter())
        ));
        out.push_str(&format!(
            "no answer (connection errors): {}\n",
            counts(o.failures.iter())
        ));
        out.push_str(&format!(
            "unfinished when the run ended: {} (counted, with their wait so far as latency)\n",
            o.unfinished
        ));
        if self.mode == "open" {
            out.push_str(&format!(
                "latency is from when each request was due; from when it was written: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
                o.service_ms.p50, o.service_ms.p99, o.service_ms.max
            ));
        }
        if let Some(cpu) = self.cpu {
            out.push_str(&format!(
                "generator CPU: {:.2} s user + {:.2} s system = {:.1} % of one core\n",
                cpu.user_s,
                cpu.system_s,
                cpu.cores * 100.0
            ));
        }
        out
    }
}

/// The parts of a report that describe the run, not its results.
pub(crate) struct Head {
    pub url: String,
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub connections: u64,
}

/// `"200 × 3, 503 × 1"`, or `"none"`.
fn counts<K: std::fmt::Display>(
    tally: impl Iterator<Item = (K, impl std::fmt::Display)>,
) -> String {
    let parts: Vec<String> = tally.map(|(k, n)| format!("{k} × {n}")).collect();
    if parts.is_empty() {
        "none".to_owned()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut tally = Tally::default();
        // 1..=1000 ms, once each.
        for ms in 1..=1000u64 {
            tally.record(&Outcome::Answered {
                status: 200,
                latency: Duration::from_millis(ms),
                service: Duration::from_millis(ms),
            });
        }
        let p = Percentiles::of(&tally.latency);
        // 3 significant digits: within 0.1 % of the exact value.
        let near = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(near(p.p50, 500.0), "{p:?}");
        assert!(near(p.p90, 900.0), "{p:?}");
        assert!(near(p.p99, 990.0), "{p:?}");
        assert!(near(p.p99_9, 999.0), "{p:?}");
        assert!(near(p.max, 1000.0), "{p:?}");
        assert!(near(p.mean, 500.5), "{p:?}");
    }

    #[test]
    fn failures_and_unfinished_are_counted_not_lost() {
        let mut tally = Tally::default();
        tally.record(&Outcome::Answered {
            status: 503,
            latency: Duration::from_millis(2),
            service: Duration::from_millis(2),
        });
        tally.record(&Outcome::Failed {
            label: "connect: connection refused".into(),
        });
        tally.record(&Outcome::Unfinished {
            waited: Duration::from_secs(3),
        });
        let report = RouteReport::new("/x".into(), &tally, Duration::from_secs(1));
        assert_eq!(report.requests, 3);
        assert_eq!(report.ok, 0);
        assert_eq!(report.unfinished, 1);
        assert_eq!(report.statuses[&503], 1);
        // The unfinished request's wait is the worst latency.
        assert!(report.latency_ms.max >= 3000.0);
    }
}
