//! `report.md` and `report.json`: the same results, for people and for
//! scripts (and for the test that checks each verdict against its numbers).

use std::fmt::Write as _;

use serde::Serialize;

use super::claims::{
    Beside, FanoutPoint, Op, Plan, Row, RuntimeSetup, Stranding, ThroughputPoint, Verdict,
};

/// Everything one `stall-lab experiment` measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ExperimentReport {
    pub stall_lab_version: &'static str,
    /// Cores the machine offers (`available_parallelism`).
    pub cores: usize,
    pub plan: Plan,
    pub elapsed_s: f64,
    /// The 1-minute load average at the start and at the end (Linux).
    pub loadavg: [Option<f64>; 2],
    pub setups: Vec<RuntimeSetup>,
    /// The table: one row per claim and configuration.
    pub rows: Vec<Row>,
    /// Claim 1: `/healthz` beside `/block/sleep` and beside `/coop/sleep`.
    pub beside_sleep: Vec<Beside>,
    /// Claim 2.
    pub throughput: Vec<ThroughputPoint>,
    /// Claim 3.
    pub fanout: Vec<FanoutPoint>,
    /// Claim 5: `/healthz` beside `/block/cpu` and beside `/offload/cpu`.
    pub beside_cpu: Vec<Beside>,
    /// Claim 6.
    pub stranding: Vec<Stranding>,
    /// SVG files next to the report.
    pub charts: Vec<&'static str>,
}

impl ExperimentReport {
    /// The one table, as Markdown.
    pub(crate) fn table(&self) -> String {
        let mut out = String::from(
            "| # | claim | configuration | measured | expected | verdict |\n|---|---|---|---|---|---|\n",
        );
        for r in &self.rows {
            let verdict = match r.verdict {
                Verdict::Confirmed => "confirmed".to_owned(),
                other => format!("**{}**", other.as_str()),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                r.claim, r.title, r.configuration, r.measured, r.expected, verdict
            );
        }
        out
    }

    pub(crate) fn markdown(&self) -> String {
        let confirmed = self
            .rows
            .iter()
            .filter(|r| r.verdict == Verdict::Confirmed)
            .count();
        let mut out = format!(
            "# stall-lab experiment\n\n\
             stall-lab {} on {} core(s) (1-minute load average {} at the start, {} at the end), \
             {} run, {:.0} s. Each claim was measured under load \
             (`stall-lab load`, on its own runtime) against stall-lab servers started in this \
             process, one runtime configuration at a time. {confirmed} of {} rows confirmed.\n\n",
            self.stall_lab_version,
            self.cores,
            self.loadavg[0].map_or("unknown".to_owned(), |l| format!("{l:.1}")),
            self.loadavg[1].map_or("unknown".to_owned(), |l| format!("{l:.1}")),
            if self.plan.quick {
                "a --quick"
            } else {
                "a full"
            },
            self.elapsed_s,
            self.rows.len()
        );
        out.push_str(&self.table());
        out.push_str(
            "\nA row is confirmed when every check below holds; the bounds are fixed in \
             src/experiment/claims.rs before the run, and nothing is retried.\n\n",
        );
        for r in &self.rows {
            let checks: Vec<String> = r
                .checks
                .iter()
                .map(|c| {
                    format!(
                        "{} = {} {} {} ({})",
                        c.what,
                        fmt(c.value),
                        match c.op {
                            Op::AtLeast => "≥",
                            Op::AtMost => "≤",
                        },
                        fmt(c.bound),
                        if c.holds { "holds" } else { "fails" }
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "- claim {}, {}: {}",
                r.claim,
                r.configuration,
                checks.join("; ")
            );
        }
        out.push_str("\n## Charts\n\n");
        for chart in &self.charts {
            let _ = writeln!(out, "![{chart}]({chart})\n");
        }
        out
    }
}

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "not measured".to_owned()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
