//! `stall-lab experiment --quick` and `stall-lab load`, run as the binary:
//! the report's shape, and that every verdict follows from the report's own
//! numbers. (Whether a claim is confirmed on this machine is the report's
//! business, not the test's: a contradicted claim is a valid result.)

use std::process::Command;

use serde_json::Value;

use crate::helpers::BIN;

fn f(v: &Value) -> f64 {
    // serde_json writes a NaN (nothing measured) as null.
    v.as_f64().unwrap_or(f64::NAN)
}

fn near(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// Finds the check of `row` whose `what` contains `needle`.
fn check<'a>(row: &'a Value, needle: &str) -> &'a Value {
    row["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["what"].as_str().unwrap().contains(needle))
        .unwrap_or_else(|| panic!("no check {needle:?} in {row}"))
}

#[tokio::test]
async fn experiment_quick_writes_a_report_whose_verdicts_follow_from_its_numbers() {
    let _exclusive = crate::helpers::exclusive().await;
    let out = std::env::temp_dir().join(format!("stall-lab-experiment-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            Command::new(BIN)
                .args(["experiment", "--quick", "--out"])
                .arg(&out)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The budget is 60 s on 2 cores; leave room for a CI machine
    // busy with other tests' builds.
    assert!(elapsed.as_secs() < 120, "took {elapsed:?}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        markdown.contains("| # | claim | configuration | measured | expected | verdict |"),
        "{markdown}"
    );
    assert!(stdout.contains("| # | claim |"), "{stdout}");
    for chart in report["charts"].as_array().unwrap() {
        let svg = std::fs::read_to_string(out.join(chart.as_str().unwrap())).unwrap();
        assert!(
            svg.starts_with("<svg"),
            "{chart}: {}",
            &svg[..80.min(svg.len())]
        );
        assert!(svg.contains("<text"), "{chart} has no text");
    }
    assert_eq!(report["charts"].as_array().unwrap().len(), 3);

    let setups = report["setups"].as_array().unwrap();
    let labels: Vec<&str> = setups
        .iter()
        .map(|s| s["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels[0], "current_thread");
    assert!(labels.contains(&"multi_thread, 1 worker"), "{labels:?}");
    let multi = setups
        .iter()
        .filter(|s| s["workers"].as_u64().unwrap() >= 2)
        .count();

    let rows = report["rows"].as_array().unwrap();
    let count = |claim: u64| rows.iter().filter(|r| r["claim"] == claim).count();
    for claim in 1..=5 {
        assert_eq!(
            count(claim),
            setups.len(),
            "claim {claim}: one row per runtime"
        );
    }
    assert_eq!(count(6), 2 * multi, "claim 6: with and without the wake-up");

    for row in rows {
        // The verdict is exactly "all checks hold" (or inconclusive when a
        // value is missing), and each check's `holds` is its comparison.
        let checks = row["checks"].as_array().unwrap();
        assert!(!checks.is_empty(), "{row}");
        let mut all_hold = true;
        let mut missing = false;
        for c in checks {
            let (value, bound) = (f(&c["value"]), f(&c["bound"]));
            let holds = match c["op"].as_str().unwrap() {
                ">=" => value >= bound,
                "<=" => value <= bound,
                op => panic!("unknown op {op}"),
            };
            assert_eq!(c["holds"].as_bool().unwrap(), holds, "{row}");
            all_hold &= holds;
            missing |= value.is_nan();
        }
        let verdict = row["verdict"].as_str().unwrap();
        let expected = if missing {
            "inconclusive"
        } else if all_hold {
            "confirmed"
        } else {
            "contradicted"
        };
        assert_eq!(verdict, expected, "{row}");
        // And the table says the same.
        let line = markdown
            .lines()
            .find(|l| {
                l.starts_with(&format!("| {} |", row["claim"]))
                    && l.contains(&format!("| {} |", row["configuration"].as_str().unwrap()))
            })
            .unwrap_or_else(|| panic!("no table line for {row}"));
        assert!(line.contains(verdict), "{line}");
    }

    // The checks' values are the report's own measurements.
    let p99 = |list: &str, config: &str, background: &str| {
        let entry = report[list]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["configuration"] == config && b["background"] == background)
            .unwrap();
        f(&entry["healthz_ms"]["p99"])
    };
    for row in rows {
        let config = row["configuration"].as_str().unwrap();
        match row["claim"].as_u64().unwrap() {
            1 => assert!(near(
                f(&check(row, "/healthz p99")["value"]),
                p99("beside_sleep", config, "/block/sleep?ms=50")
                    - p99("beside_sleep", config, "/coop/sleep?ms=50")
            )),
            5 => assert!(near(
                f(&check(row, "/healthz p99")["value"]),
                p99("beside_cpu", config, "/block/cpu?ms=40")
                    - p99("beside_cpu", config, "/offload/cpu?ms=40")
            )),
            2 => {
                let top = report["plan"]["concurrencies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_u64().unwrap())
                    .max()
                    .unwrap();
                for route in ["/coop/sleep?ms=50", "/block/sleep?ms=50"] {
                    let point = report["throughput"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|p| {
                            p["configuration"] == config
                                && p["route"] == route
                                && p["concurrency"] == top
                        })
                        .unwrap();
                    assert!(near(
                        f(&check(row, route)["value"]),
                        f(&point["throughput"])
                    ));
                }
            }
            3 => {
                let point = report["fanout"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|p| p["configuration"] == config)
                    .unwrap();
                let workers = point["workers"].as_u64().unwrap();
                assert_eq!(
                    f(&point["expected_ms"]),
                    4u64.div_ceil(workers) as f64 * 50.0
                );
                assert!(near(
                    f(&check(row, "p50 ÷ expected")["value"]),
                    f(&point["p50_ms"]) / f(&point["expected_ms"])
                ));
            }
            6 => {
                let s = report["stranding"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|s| {
                        config
                            == format!(
                                "{}, wake_idle_worker = {}",
                                s["configuration"].as_str().unwrap(),
                                s["wake_idle_worker"]
                            )
                    })
                    .unwrap();
                let probes = s["probes"].as_u64().unwrap();
                assert!(probes > 0, "{s}");
                let stranded = s["probe_ms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|ms| f(ms) >= 100.0)
                    .count() as u64;
                assert_eq!(s["stranded"].as_u64().unwrap(), stranded, "{s}");
                assert!(near(
                    f(&check(row, "share stranded")["value"]),
                    stranded as f64 / probes as f64
                ));
            }
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[tokio::test]
async fn load_reports_per_route_figures_as_json_and_refuses_bad_input() {
    let _exclusive = crate::helpers::exclusive().await;
    let app = crate::helpers::spawn_app(&["--no-otlp", "--no-console"], &[]);
    let url = app.listeners["app"].clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .args(["load", "--url", &url, "--rate", "100", "--duration", "1s"])
            .args(["--mix", "/coop/sleep?ms=20:3,/healthz:1,/nope:1", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{output:?}");
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["mode"], "open");
    assert_eq!(report["overall"]["requests"], 100, "{report}");
    let routes = report["routes"].as_array().unwrap();
    assert_eq!(routes[0]["path"], "/coop/sleep?ms=20");
    assert_eq!(routes[0]["requests"], 60);
    assert!(f(&routes[0]["latency_ms"]["p50"]) >= 20.0, "{report}");
    // The unknown route's answers are counted as errors by status.
    assert_eq!(routes[2]["statuses"]["404"], 20, "{report}");
    assert!(f(&report["cpu"]["cores"]) >= 0.0, "{report}");

    let refused = Command::new(BIN)
        .args(["load", "--url", "http://127.0.0.1:1", "--rate", "5"])
        .args(["--concurrency", "2"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let bad_mix = Command::new(BIN)
        .args(["load", "--url", "http://127.0.0.1:1", "--mix", "/a:x"])
        .output()
        .unwrap();
    assert_eq!(bad_mix.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad_mix.stderr).contains("not a positive integer"),
        "{bad_mix:?}"
    );
}
