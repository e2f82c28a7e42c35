//! The table, the targets and the notes printed at the end.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::measure::Sample;
use crate::receiver::Received;
use crate::variant::{ByVariant, Variant};
use crate::watcher_cost::WatcherCost;
use crate::{REPRODUCE, Settings};

pub(crate) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

#[derive(Default)]
pub(crate) struct Results {
    pub(crate) samples: Vec<Sample>,
    pub(crate) skipped: Option<String>,
    pub(crate) failed: Option<String>,
    /// Allocations per request, counted once (see `allocs`).
    pub(crate) allocs_per_request: Option<f64>,
}

impl Results {
    pub(crate) fn median_of(&self, f: impl Fn(&Sample) -> f64) -> f64 {
        median(&mut self.samples.iter().map(f).collect::<Vec<_>>())
    }
    pub(crate) fn cpu(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| self.median_of(|s| s.cpu_us_per_request))
    }
    /// The largest peak resident memory over the rounds, MiB.
    pub(crate) fn peak_rss_mib(&self) -> Option<f64> {
        let peak = self
            .samples
            .iter()
            .filter_map(|s| s.peak_rss_mib)
            .fold(f64::NAN, f64::max);
        peak.is_finite().then_some(peak)
    }
}

pub(crate) fn report(
    settings: &Settings,
    results: &ByVariant<Results>,
    received: &Received,
    took: Duration,
    watcher: &WatcherCost,
) {
    let bare = results[Variant::Bare].cpu();
    println!();
    println!(
        "{:<45} {:>9} {:>12} {:>8} {:>7} {:>10} {:>16} {:>11}",
        "variant",
        "req/s",
        "CPU µs/req",
        "× bare",
        "cores",
        "spans/req",
        "µs/req min–max",
        "allocs/req"
    );
    println!("{}", "-".repeat(45 + 9 + 12 + 8 + 7 + 10 + 16 + 11 + 7));
    for (variant, r) in results.iter() {
        let Some(cpu) = r.cpu() else {
            let why = r
                .skipped
                .as_deref()
                .or(r.failed.as_deref().map(|_| "FAILED (see above)"))
                .unwrap_or("no data");
            println!("{:<45} {why}", variant.label());
            continue;
        };
        let rps = r.median_of(|s| s.requests_per_s);
        let cores = r.median_of(|s| s.server_cores);
        let ratio = bare.map_or("-".to_string(), |b| format!("{:.2}×", cpu / b));
        let spans = if variant.exports_otlp() {
            format!(
                "{:.2}",
                r.median_of(|s| s.spans_per_request.unwrap_or(f64::NAN))
            )
        } else {
            "-".to_string()
        };
        let (lo, hi) = r.samples.iter().fold((f64::MAX, f64::MIN), |(lo, hi), s| {
            (lo.min(s.cpu_us_per_request), hi.max(s.cpu_us_per_request))
        });
        let allocs = r
            .allocs_per_request
            .map_or("-".to_string(), |n| format!("{n:.1}"));
        println!(
            "{:<45} {rps:>9.0} {cpu:>12.2} {ratio:>8} {cores:>7.2} {spans:>10} {:>16} {allocs:>11}",
            variant.label(),
            format!("{lo:.2}–{hi:.2}"),
        );
    }

    println!();
    println!("peak resident memory of the server (VmHWM, largest over the rounds):");
    for (variant, r) in results.iter() {
        if let Some(peak) = r.peak_rss_mib() {
            println!("  {:<45} {peak:>9.1} MiB", variant.label());
        }
    }

    println!();
    println!("where the server CPU goes, µs/request by thread (median round of each variant):");
    for (variant, r) in results.iter() {
        let Some(cpu) = r.cpu() else { continue };
        // The round whose total is the median: its breakdown adds up to it.
        let Some(sample) = r.samples.iter().min_by(|a, b| {
            (a.cpu_us_per_request - cpu)
                .abs()
                .total_cmp(&(b.cpu_us_per_request - cpu).abs())
        }) else {
            continue;
        };
        let parts: Vec<String> = sample
            .by_thread
            .iter()
            .filter(|(_, us)| *us >= 0.05)
            .take(6)
            .map(|(name, us)| format!("{name} {us:.2}"))
            .collect();
        println!("  {:<45} {}", variant.label(), parts.join(", "));
    }

    println!();
    println!("targets (MISS is a figure to report, not a failure):");
    let ratio = |a: Variant, b: Variant| Some(results[a].cpu()? / results[b].cpu()?);
    // Why a ratio is missing: the first of its two variants without figures.
    let missing = |a: Variant, b: Variant| -> String {
        [a, b]
            .into_iter()
            .find(|&v| results[v].cpu().is_none())
            .map_or(String::new(), |v| {
                let why = results[v].skipped.as_deref().unwrap_or("not measured");
                format!("{}: {why}", v.label())
            })
    };
    // Whether two variants' min–max ranges over the rounds overlap: then
    // their difference is within this machine's noise.
    let overlap = |a: Variant, b: Variant| {
        let range = |v: Variant| {
            results[v]
                .samples
                .iter()
                .fold((f64::MAX, f64::MIN), |(lo, hi), s| {
                    (lo.min(s.cpu_us_per_request), hi.max(s.cpu_us_per_request))
                })
        };
        let ((alo, ahi), (blo, bhi)) = (range(a), range(b));
        alo <= bhi && blo <= ahi
    };
    let target = |name: &str, (a, b): (Variant, Variant), limit: f64| match ratio(a, b) {
        Some(v) => println!(
            "  {name:<62} {v:.3}× (≤ {limit}×)  {}{}",
            if v <= limit { "PASS" } else { "MISS" },
            if overlap(a, b) {
                "  (the rounds' ranges overlap: within noise)"
            } else {
                ""
            }
        ),
        None => println!("  {name:<62} n/a: {}", missing(a, b)),
    };
    // Issue 15's targets: medians of OVERHEAD_ROUNDS=5, each variant
    // measured in the same run.
    target(
        "everything on ≤ 1.00× the naive reference",
        (Variant::All, Variant::Naive),
        1.00,
    );
    target(
        "OTLP only ≤ 1.60× bare axum",
        (Variant::Otlp, Variant::Bare),
        1.60,
    );
    target(
        "telemetry off ≤ 1.25× bare axum",
        (Variant::Off, Variant::Bare),
        1.25,
    );
    match (
        results[Variant::All].peak_rss_mib(),
        results[Variant::Naive].peak_rss_mib(),
    ) {
        (Some(ours), Some(naive)) => println!(
            "  {:<62} {ours:.1} vs {naive:.1} MiB  {}",
            "peak memory, everything on ≤ the naive reference's",
            if ours <= naive { "PASS" } else { "MISS" }
        ),
        _ => println!(
            "  peak memory: n/a: {}",
            missing(Variant::All, Variant::Naive)
        ),
    }
    println!(
        "  {:<62} {:.1} ns (≤ 40 ns)  {}",
        "stall-watch poll hooks per poll (in isolation, see below)",
        watcher.hooks_ns_per_poll,
        if watcher.hooks_ns_per_poll <= 40.0 {
            "PASS"
        } else {
            "MISS"
        }
    );
    // The floor of the design: what a task per request costs by itself.
    match (
        ratio(Variant::BareTask, Variant::Bare),
        ratio(Variant::Naive, Variant::Bare),
    ) {
        (Some(task), Some(naive)) => println!(
            "  {:<62} {task:.3}× bare; the naive reference {naive:.3}× bare",
            "reference: bare axum with a task per request (variant 9)"
        ),
        _ => println!(
            "  reference: a task per request: n/a: {}",
            missing(Variant::BareTask, Variant::Bare)
        ),
    }
    target(
        "stall watcher ≤ 1.05× (telemetry off vs off-without-watcher)",
        (Variant::Off, Variant::OffNoWatcher),
        1.05,
    );
    target(
        "stall watcher ≤ 1.05× (all-on vs all-on-without-watcher)",
        (Variant::All, Variant::AllNoWatcher),
        1.05,
    );
    // The same question without the machine's noise: the watcher's own cost
    // per request, measured in isolation, over what a request costs without
    // it (telemetry off, watcher off).
    let added_us = watcher.ns_per_request() / 1000.0;
    let isolated = results[Variant::OffNoWatcher]
        .cpu()
        .or_else(|| results[Variant::Off].cpu())
        .map(|base| (base + added_us) / base);
    match isolated {
        Some(v) => println!(
            "  {:<62} {v:.3}× (≤ 1.05×)  {}",
            "stall watcher ≤ 1.05× (measured in isolation, see below)",
            if v <= 1.05 { "PASS" } else { "MISS" }
        ),
        None => println!("  stall watcher in isolation: n/a (no telemetry-off figure)"),
    }
    println!(
        "    hooks +{:.1} ns/poll × {:.2} polls per /healthz + culprit registry {:.1} ns = +{:.3} µs per request",
        watcher.hooks_ns_per_poll,
        watcher.polls_per_request,
        watcher.registry_ns_per_request,
        added_us
    );

    println!();
    println!(
        "notes: medians of {} interleaved round(s); CPU is the server process's \
         (all threads, from /proc/<pid>/task/*/schedstat) over the measured window, \
         divided by the number of 200 answers completed in it.",
        settings.rounds
    );
    println!(
        "  The load client and the OTLP receiver run in this process on the same \
         cores as the server, so req/s is shared-machine throughput; every variant \
         is measured the same way, which keeps the CPU-per-request ratios comparable."
    );
    println!(
        "  spans/req: spans the receiver got per completed request ({} batches, {} \
         unreadable); below 1 means the server dropped spans.",
        received.batches.load(Ordering::Relaxed),
        received.bad_batches.load(Ordering::Relaxed)
    );
    let mut problems = Vec::new();
    for (variant, r) in results.iter() {
        let (not_ok, errors) = r
            .samples
            .iter()
            .fold((0, 0), |(n, e), s| (n + s.not_ok, e + s.errors));
        if not_ok + errors > 0 {
            problems.push(format!(
                "  {}: {not_ok} non-200 answers, {errors} connection errors",
                variant.label()
            ));
        }
        if r.samples.iter().any(|s| s.tick_based) {
            problems.push(format!(
                "  {}: a thread exited during a window; its CPU is from clock ticks \
                 (1/{} s resolution)",
                variant.label(),
                settings.clk_tck
            ));
        }
        // Each kind of line once (up to three), told apart by their first
        // words after the timestamp: a budget notice can hide a stall.
        let mut kinds: Vec<(&str, &str)> = Vec::new();
        for line in r.samples.iter().flat_map(|s| &s.warnings) {
            let text = line.split_once(' ').map_or(line.as_str(), |(_, rest)| rest);
            let kind = text.get(..60).unwrap_or(text);
            if kinds.len() < 3 && !kinds.iter().any(|(k, _)| *k == kind) {
                kinds.push((kind, line));
            }
        }
        if !kinds.is_empty() {
            let lines: u64 = r.samples.iter().map(|s| s.log_lines).sum();
            let examples: Vec<&str> = kinds.iter().map(|(_, line)| *line).collect();
            problems.push(format!(
                "  {} logged {lines} line(s) at RUST_LOG=warn over {} run(s), e.g.:\n      {}",
                variant.label(),
                r.samples.len(),
                examples.join("\n      ")
            ));
        }
    }
    if !problems.is_empty() {
        println!("  worth a look:");
        for p in problems {
            println!("  {p}");
        }
    }
    println!(
        "  took {:.0} s; reproduce with: {REPRODUCE}",
        took.as_secs_f64()
    );
}
