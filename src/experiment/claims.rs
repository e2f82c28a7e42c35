//! The six claims, each measured under load, and the rule that turns each
//! measurement into a verdict.
//!
//! A verdict is never a judgement call made after looking at the numbers:
//! every row carries its [`Check`]s (a measured value, `>=` or `<=`, a
//! bound fixed in this file before the run), and the verdict is
//! "confirmed" exactly when all of them hold. A claim the machine
//! contradicts is reported as contradicted, with its numbers; nothing is
//! retried until it passes.

use std::time::Duration;

use serde::Serialize;

use crate::load::stats::{Percentiles, Report};

/// What the runtime under test looks like.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct RuntimeSetup {
    /// `current_thread`, `multi_thread, 2 workers (one per core)`, …
    pub label: String,
    pub flavor: crate::config::Flavor,
    pub workers: usize,
}

/// current_thread; multi_thread with 1, 2 and one-per-core workers, with
/// duplicates removed (on a 2-core machine "one per core" *is* 2).
pub(crate) fn setups(cores: usize) -> Vec<RuntimeSetup> {
    use crate::config::Flavor::{CurrentThread, MultiThread};
    let mut setups = vec![RuntimeSetup {
        label: "current_thread".into(),
        flavor: CurrentThread,
        workers: 1,
    }];
    for workers in [1, 2, cores] {
        if setups
            .iter()
            .any(|s| s.flavor == MultiThread && s.workers == workers)
        {
            continue;
        }
        let per_core = if workers == cores {
            " (one per core)"
        } else {
            ""
        };
        let plural = if workers == 1 { "" } else { "s" };
        setups.push(RuntimeSetup {
            label: format!("multi_thread, {workers} worker{plural}{per_core}"),
            flavor: MultiThread,
            workers,
        });
    }
    setups
}

/// How long each measurement runs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    pub quick: bool,
    /// Each open-loop run of claims 1, 4 and 5.
    #[serde(serialize_with = "seconds", rename = "run_s")]
    pub run: Duration,
    /// Each point of claim 2's throughput curves.
    #[serde(serialize_with = "seconds", rename = "point_s")]
    pub point: Duration,
    /// Claim 2's concurrencies.
    pub concurrencies: Vec<usize>,
    /// Claim 3's closed loop of one.
    #[serde(serialize_with = "seconds", rename = "fanout_s")]
    pub fanout: Duration,
    /// Claim 6: one-worker stalls per side.
    pub stalls: usize,
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                run: Duration::from_millis(1500),
                point: Duration::from_millis(800),
                concurrencies: vec![1, 4, 16],
                fanout: Duration::from_millis(1000),
                stalls: 3,
            }
        } else {
            Plan {
                quick,
                run: Duration::from_secs(5),
                point: Duration::from_secs(2),
                concurrencies: vec![1, 2, 4, 8, 16, 32],
                fanout: Duration::from_secs(3),
                stalls: 8,
            }
        }
    }
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// `>=` or `<=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum Op {
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<=")]
    AtMost,
}

/// One condition of a verdict: `value op bound`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub what: String,
    pub value: f64,
    pub op: Op,
    pub bound: f64,
    pub holds: bool,
}

impl Check {
    pub(crate) fn new(what: impl Into<String>, value: f64, op: Op, bound: f64) -> Check {
        let holds = match op {
            Op::AtLeast => value >= bound,
            Op::AtMost => value <= bound,
        };
        Check {
            what: what.into(),
            value,
            op,
            bound,
            holds,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    /// Every check holds.
    Confirmed,
    /// At least one check fails.
    Contradicted,
    /// Something could not be measured (no answers at all).
    Inconclusive,
}

impl Verdict {
    pub(crate) fn of(checks: &[Check]) -> Verdict {
        if checks.iter().any(|c| !c.value.is_finite()) {
            Verdict::Inconclusive
        } else if checks.iter().all(|c| c.holds) {
            Verdict::Confirmed
        } else {
            Verdict::Contradicted
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Verdict::Confirmed => "confirmed",
            Verdict::Contradicted => "contradicted",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One line of the report's table.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub claim: u8,
    pub title: &'static str,
    pub configuration: String,
    pub measured: String,
    pub expected: String,
    pub verdict: Verdict,
    pub checks: Vec<Check>,
}

impl Row {
    fn new(
        claim: u8,
        configuration: &str,
        measured: String,
        expected: String,
        checks: Vec<Check>,
    ) -> Row {
        Row {
            claim,
            title: TITLES[usize::from(claim) - 1],
            configuration: configuration.to_owned(),
            measured,
            expected,
            verdict: Verdict::of(&checks),
            checks,
        }
    }
}

/// The claims, as the README states them.
pub(crate) const TITLES: [&str; 6] = [
    "a blocking handler stalls everyone on its worker",
    "IO-bound work scales with concurrency; blocking work stops at workers ÷ duration",
    "nothing is parallel on current_thread; parallelism needs workers",
    "join! is concurrent, sequential awaits are not",
    "spawn_blocking takes CPU work off the workers",
    "a free worker is not enough",
];

/// `/healthz` latency beside some steady traffic.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Beside {
    pub configuration: String,
    /// The background route, e.g. `/block/sleep?ms=50`.
    pub background: String,
    pub healthz_ms: Percentiles,
    pub healthz_answered: u64,
}

/// Claim 1 (`/block/sleep` vs `/coop/sleep`) and claim 5 (`/block/cpu` vs
/// `/offload/cpu`): `/healthz` beside the blocking route, then beside its
/// fixed twin, at the same rates.
pub(crate) struct BesideRoutes {
    pub claim: u8,
    pub blocking: &'static str,
    pub fixed: &'static str,
    /// Requests per second of the background route; `/healthz` gets
    /// `healthz_per_background` times as many.
    pub background_rate: f64,
    pub healthz_per_background: u32,
    /// How much worse `/healthz` p99 must be beside the blocking route.
    pub margin_ms: f64,
}

/// Claim 1: 10 stalls of 50 ms a second: half of one worker's time.
pub(crate) const CLAIM_1: BesideRoutes = BesideRoutes {
    claim: 1,
    blocking: "/block/sleep?ms=50",
    fixed: "/coop/sleep?ms=50",
    background_rate: 10.0,
    healthz_per_background: 9,
    margin_ms: 10.0,
};

/// Claim 5: 5 CPU jobs of 40 ms a second: a fifth of one core.
pub(crate) const CLAIM_5: BesideRoutes = BesideRoutes {
    claim: 5,
    blocking: "/block/cpu?ms=40",
    fixed: "/offload/cpu?ms=40",
    background_rate: 5.0,
    healthz_per_background: 19,
    margin_ms: 10.0,
};

impl BesideRoutes {
    /// The `--mix` of one side.
    pub(crate) fn mix(&self, background: &str) -> String {
        format!("/healthz:{},{background}:1", self.healthz_per_background)
    }

    pub(crate) fn rate(&self) -> f64 {
        self.background_rate * f64::from(self.healthz_per_background + 1)
    }

    pub(crate) fn beside(&self, configuration: &str, background: &str, report: &Report) -> Beside {
        let healthz = report.route("/healthz").expect("the mix has /healthz");
        Beside {
            configuration: configuration.to_owned(),
            background: background.to_owned(),
            healthz_ms: healthz.latency_ms,
            healthz_answered: healthz.answered,
        }
    }

    pub(crate) fn row(&self, configuration: &str, blocked: &Beside, fixed: &Beside) -> Row {
        let (b, f) = (&blocked.healthz_ms, &fixed.healthz_ms);
        let nan_if_none = |answered: u64, v: f64| if answered == 0 { f64::NAN } else { v };
        let difference = nan_if_none(blocked.healthz_answered, b.p99)
            - nan_if_none(fixed.healthz_answered, f.p99);
        Row::new(
            self.claim,
            configuration,
            format!(
                "/healthz p50 / p99: {:.1} / {:.1} ms beside {}, {:.1} / {:.1} ms beside {}",
                b.p50, b.p99, self.blocking, f.p50, f.p99, self.fixed
            ),
            format!(
                "p99 beside {} at least {} ms above p99 beside {} ({} req/s of each)",
                self.blocking, self.margin_ms, self.fixed, self.background_rate
            ),
            vec![Check::new(
                format!(
                    "/healthz p99 beside {} − beside {} (ms)",
                    self.blocking, self.fixed
                ),
                difference,
                Op::AtLeast,
                self.margin_ms,
            )],
        )
    }
}

/// Claim 2's routes: both wait 50 ms, one on a timer, one holding its worker.
pub(crate) const COOP_50: &str = "/coop/sleep?ms=50";
pub(crate) const BLOCK_50: &str = "/block/sleep?ms=50";

/// One point of a throughput curve.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ThroughputPoint {
    pub configuration: String,
    pub route: String,
    pub concurrency: usize,
    pub throughput: f64,
    pub p50_ms: f64,
    /// Answers with a status other than 2xx (503: the stall budget).
    pub not_ok: u64,
}

/// How long one throughput point runs: `plan.point`, and for the blocking
/// route at least three rounds of C requests through the workers. With 16
/// connections on one worker, answers come in batches every 16 × 50 ms;
/// a window shorter than a few batches would count the cut, not the rate.
pub(crate) fn point_duration(
    plan: &Plan,
    route: &str,
    concurrency: usize,
    workers: usize,
) -> Duration {
    if route == BLOCK_50 {
        let round_ms = (50 * concurrency).div_ceil(workers.max(1)) as u64;
        plan.point.max(Duration::from_millis(3 * round_ms))
    } else {
        plan.point
    }
}

/// Claim 2 for one runtime: coop throughput at the highest concurrency is
/// at least half of C ÷ 50 ms; block throughput stays at most 10 % above
/// workers ÷ 50 ms.
pub(crate) fn throughput_row(setup: &RuntimeSetup, points: &[ThroughputPoint]) -> Row {
    let top = points.iter().map(|p| p.concurrency).max().unwrap_or(1);
    let at = |route: &str| {
        points
            .iter()
            .find(|p| p.route == route && p.concurrency == top)
            .map_or(f64::NAN, |p| p.throughput)
    };
    let (coop, block) = (at(COOP_50), at(BLOCK_50));
    let ideal = top as f64 / 0.050;
    let ceiling = setup.workers as f64 / 0.050;
    let curve = |route: &str| {
        points
            .iter()
            .filter(|p| p.route == route)
            .map(|p| format!("{:.0}", p.throughput))
            .collect::<Vec<_>>()
            .join(" → ")
    };
    let concurrencies: Vec<String> = points
        .iter()
        .filter(|p| p.route == COOP_50)
        .map(|p| p.concurrency.to_string())
        .collect();
    Row::new(
        2,
        &setup.label,
        format!(
            "req/s at C = {}: /coop/sleep?ms=50 {}; /block/sleep?ms=50 {}",
            concurrencies.join(", "),
            curve(COOP_50),
            curve(BLOCK_50)
        ),
        format!(
            "coop at C = {top} ≥ {:.0} (half of C ÷ 50 ms); block ≤ {:.0} (workers ÷ 50 ms, +10 %)",
            ideal * 0.5,
            ceiling * 1.1
        ),
        vec![
            Check::new(
                format!("/coop/sleep?ms=50 req/s at C = {top}"),
                coop,
                Op::AtLeast,
                ideal * 0.5,
            ),
            Check::new(
                format!("/block/sleep?ms=50 req/s at C = {top}"),
                block,
                Op::AtMost,
                ceiling * 1.1,
            ),
        ],
    )
}

/// Claim 3's request: four CPU jobs of 50 ms, each in a spawned task.
pub(crate) const FANOUT: &str = "/fanout/spawn?n=4&ms=50";
pub(crate) const FANOUT_JOBS: usize = 4;
pub(crate) const FANOUT_JOB_MS: f64 = 50.0;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct FanoutPoint {
    pub configuration: String,
    pub workers: usize,
    pub p50_ms: f64,
    pub expected_ms: f64,
    pub answered: u64,
}

/// ⌈n ÷ workers⌉ · ms: the jobs run `workers` at a time.
pub(crate) fn fanout_expected(workers: usize) -> f64 {
    FANOUT_JOBS.div_ceil(workers) as f64 * FANOUT_JOB_MS
}

/// Claim 3: the wall time is within −20 % / +30 % of ⌈n ÷ workers⌉ · ms.
pub(crate) fn fanout_row(point: &FanoutPoint) -> Row {
    let ratio = if point.answered == 0 {
        f64::NAN
    } else {
        point.p50_ms / point.expected_ms
    };
    Row::new(
        3,
        &point.configuration,
        format!(
            "{FANOUT}: p50 wall time {:.1} ms over {} requests, one at a time",
            point.p50_ms, point.answered
        ),
        format!(
            "⌈4 ÷ {} worker(s)⌉ × 50 ms = {:.0} ms (−20 % … +30 %)",
            point.workers, point.expected_ms
        ),
        vec![
            Check::new("p50 ÷ expected", ratio, Op::AtLeast, 0.8),
            Check::new("p50 ÷ expected", ratio, Op::AtMost, 1.3),
        ],
    )
}

/// Claim 4's twins: four 50 ms timers, joined or one after another.
pub(crate) const JOIN: &str = "/fanout/join?n=4&ms=50";
pub(crate) const SEQUENTIAL: &str = "/fanout/sequential?n=4&ms=50";
/// Requests per second of each.
pub(crate) const JOIN_RATE: f64 = 10.0;

/// Claim 4: joined p50 ≤ 1.3 × 50 ms; sequential p50 ≥ 0.9 × 200 ms.
pub(crate) fn join_row(configuration: &str, report: &Report) -> Row {
    let p50 = |route: &str| {
        report
            .route(route)
            .filter(|r| r.answered > 0)
            .map_or(f64::NAN, |r| r.latency_ms.p50)
    };
    let (join, sequential) = (p50(JOIN), p50(SEQUENTIAL));
    Row::new(
        4,
        configuration,
        format!(
            "p50: joined {join:.1} ms, sequential {sequential:.1} ms ({JOIN_RATE} req/s of each)"
        ),
        "joined ≈ 50 ms (≤ 65), sequential ≈ 4 × 50 ms (≥ 180)".to_owned(),
        vec![
            Check::new(format!("{JOIN} p50 (ms)"), join, Op::AtMost, 65.0),
            Check::new(
                format!("{SEQUENTIAL} p50 (ms)"),
                sequential,
                Op::AtLeast,
                180.0,
            ),
        ],
    )
}

/// Claim 6: how long the stall lasts, and when the probes go out.
pub(crate) const STALL: &str = "/block/sleep?ms=600";
/// Offsets of the `/healthz` probes from the stall's start.
pub(crate) const PROBE_OFFSETS_MS: [u64; 8] = [100, 150, 200, 250, 300, 350, 400, 450];
/// A probe that took this long waited for the stall (an answered probe
/// takes a few ms; a probe a woken worker picks up, about 25).
pub(crate) const STRANDED_MS: f64 = 100.0;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Stranding {
    pub configuration: String,
    pub wake_idle_worker: bool,
    /// Probes answered (the share is of these).
    pub probes: usize,
    pub stranded: usize,
    /// Probes with no answer (not counted in the share).
    pub failed: usize,
    pub probe_ms: Vec<f64>,
}

impl Stranding {
    pub(crate) fn share(&self) -> f64 {
        if self.probes == 0 {
            f64::NAN
        } else {
            self.stranded as f64 / self.probes as f64
        }
    }
}

/// Claim 6: without the wake-up at least 20 % of the probes are stranded
/// although a worker is free; with `stall.wake_idle_worker` at most 10 %.
pub(crate) fn stranding_row(s: &Stranding) -> Row {
    let measured = format!(
        "{} of {} /healthz on new connections waited ≥ {STRANDED_MS} ms ({:.0} %) during {} on a keep-alive connection",
        s.stranded,
        s.probes,
        s.share() * 100.0,
        STALL
    );
    let configuration = format!(
        "{}, wake_idle_worker = {}",
        s.configuration, s.wake_idle_worker
    );
    if s.wake_idle_worker {
        Row::new(
            6,
            &configuration,
            measured,
            "woken: ≤ 10 % stranded".to_owned(),
            vec![Check::new("share stranded", s.share(), Op::AtMost, 0.1)],
        )
    } else {
        Row::new(
            6,
            &configuration,
            measured,
            "as tokio is: ≥ 20 % stranded although a worker is free".to_owned(),
            vec![Check::new("share stranded", s.share(), Op::AtLeast, 0.2)],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setups_are_deduplicated() {
        let two: Vec<String> = setups(2).into_iter().map(|s| s.label).collect();
        assert_eq!(
            two,
            [
                "current_thread",
                "multi_thread, 1 worker",
                "multi_thread, 2 workers (one per core)"
            ]
        );
        assert_eq!(setups(8).len(), 4);
        assert_eq!(setups(1).len(), 3);
    }

    #[test]
    fn a_verdict_is_all_its_checks() {
        let yes = Check::new("x", 5.0, Op::AtLeast, 5.0);
        let no = Check::new("y", 5.1, Op::AtMost, 5.0);
        assert_eq!(Verdict::of(std::slice::from_ref(&yes)), Verdict::Confirmed);
        assert_eq!(Verdict::of(&[yes, no]), Verdict::Contradicted);
        let nan = Check::new("z", f64::NAN, Op::AtMost, 5.0);
        assert_eq!(Verdict::of(&[nan]), Verdict::Inconclusive);
    }

    #[test]
    fn fanout_expectation_is_rounds_of_workers() {
        assert_eq!(fanout_expected(1), 200.0);
        assert_eq!(fanout_expected(2), 100.0);
        assert_eq!(fanout_expected(3), 100.0);
        assert_eq!(fanout_expected(8), 50.0);
    }
}
