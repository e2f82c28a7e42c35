//! The report's three SVG charts, drawn with plotters' SVG backend.
//!
//! Text is written as SVG `<text>`, laid out by plotters' rough width
//! estimate (no font files, no fontconfig), and the browser or rsvg draws it
//! with its own sans-serif: what a chart in a README needs.

use std::path::Path;

use plotters::prelude::*;

use super::claims::{Beside, FanoutPoint, RuntimeSetup, ThroughputPoint};

/// The chart files, in the order the report shows them.
pub(crate) const LATENCY: &str = "latency-percentiles.svg";
pub(crate) const THROUGHPUT: &str = "throughput-vs-concurrency.svg";
pub(crate) const FANOUT: &str = "fanout-wall-time.svg";

const SIZE: (u32, u32) = (900, 520);
const PALETTE: [RGBColor; 4] = [
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

fn color(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// `/healthz` percentiles beside blocking traffic (thick lines) and beside
/// its cooperative twin (thin lines), one colour per runtime.
pub(crate) fn latency(path: &Path, setups: &[RuntimeSetup], beside: &[Beside]) -> DrawResult {
    const LABELS: [&str; 4] = ["p50", "p90", "p99", "p99.9"];
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let values = |b: &Beside| {
        let p = &b.healthz_ms;
        [p.p50, p.p90, p.p99, p.p99_9].map(|v| v.max(0.05))
    };
    let top = beside.iter().flat_map(&values).fold(1.0_f64, f64::max) * 2.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "/healthz latency beside blocking vs cooperative traffic",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-1i32..4i32, (0.05f64..top).log_scale())?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| {
            usize::try_from(*x)
                .ok()
                .and_then(|i| LABELS.get(i))
                .map_or(String::new(), |l| (*l).to_owned())
        })
        .light_line_style(WHITE)
        .y_desc("ms (log scale), from when each request was due")
        .draw()?;
    for (i, setup) in setups.iter().enumerate() {
        for b in beside.iter().filter(|b| b.configuration == setup.label) {
            let blocking = b.background.starts_with("/block/");
            let style = color(i).stroke_width(if blocking { 3 } else { 1 });
            let points: Vec<(i32, f64)> = values(b)
                .iter()
                .enumerate()
                .map(|(x, y)| (x as i32, *y))
                .collect();
            chart
                .draw_series(LineSeries::new(points.clone(), style))?
                .label(format!("{}, beside {}", setup.label, b.background))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(
                points
                    .iter()
                    .map(|p| Circle::new(*p, if blocking { 4 } else { 3 }, color(i).filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Throughput of `/coop/sleep?ms=50` (thin) and `/block/sleep?ms=50`
/// (thick) against the number of connections, and the ideal C ÷ 50 ms.
pub(crate) fn throughput(
    path: &Path,
    setups: &[RuntimeSetup],
    points: &[ThroughputPoint],
) -> DrawResult {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let max_c = points.iter().map(|p| p.concurrency).max().unwrap_or(1) as f64;
    let top = points
        .iter()
        .map(|p| p.throughput)
        .fold(max_c / 0.05, f64::max)
        * 1.5;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput vs concurrency: 50 ms on a timer vs 50 ms holding the worker",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0.8f64..max_c * 1.25).log_scale(), (5f64..top).log_scale())?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("connections (closed loop)")
        .y_desc("answers per second (log scale)")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()?;
    let ideal: Vec<(f64, f64)> = points
        .iter()
        .map(|p| p.concurrency)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|c| (c as f64, c as f64 / 0.05))
        .collect();
    chart
        .draw_series(LineSeries::new(ideal, BLACK.mix(0.35).stroke_width(1)))?
        .label("ideal: C ÷ 50 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.35)));
    for (i, setup) in setups.iter().enumerate() {
        for (route, width) in [(super::claims::COOP_50, 1), (super::claims::BLOCK_50, 3)] {
            let series: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.configuration == setup.label && p.route == route)
                .map(|p| (p.concurrency as f64, p.throughput.max(5.0)))
                .collect();
            let style = color(i).stroke_width(width);
            chart
                .draw_series(LineSeries::new(series.clone(), style))?
                .label(format!("{}, {route}", setup.label))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart.draw_series(series.iter().map(|p| Circle::new(*p, 3, color(i).filled())))?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

/// `/fanout/spawn?n=4&ms=50` wall time per runtime, measured (dots) and
/// ⌈n ÷ workers⌉ × 50 ms (crosses).
pub(crate) fn fanout(path: &Path, points: &[FanoutPoint]) -> DrawResult {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let top = points
        .iter()
        .map(|p| p.p50_ms.max(p.expected_ms))
        .fold(100.0_f64, f64::max)
        * 1.2;
    let labels: Vec<String> = points.iter().map(|p| p.configuration.clone()).collect();
    let n = points.len() as i32;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "/fanout/spawn?n=4&ms=50: wall time vs workers",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-1i32..n, 0f64..top)?;
    chart
        .configure_mesh()
        .x_labels(points.len() + 2)
        .x_label_formatter(&|x| {
            usize::try_from(*x)
                .ok()
                .and_then(|i| labels.get(i))
                .cloned()
                .unwrap_or_default()
        })
        .light_line_style(WHITE)
        .y_desc("ms (p50, one request at a time)")
        .draw()?;
    let measured: Vec<(i32, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (i as i32, p.p50_ms))
        .collect();
    let expected: Vec<(i32, f64)> = points
        .iter()
        .enumerate()
        .map(|(i, p)| (i as i32, p.expected_ms))
        .collect();
    chart
        .draw_series(LineSeries::new(expected.clone(), BLACK.mix(0.4)))?
        .label("expected: ⌈4 ÷ workers⌉ × 50 ms")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    chart.draw_series(
        expected
            .iter()
            .map(|p| Cross::new(*p, 6, BLACK.stroke_width(2))),
    )?;
    chart
        .draw_series(LineSeries::new(measured.clone(), color(0).stroke_width(2)))?
        .label("measured")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color(0)));
    chart.draw_series(
        measured
            .iter()
            .map(|p| Circle::new(*p, 5, color(0).filled())),
    )?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}
