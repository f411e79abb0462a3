//! `--report FILE.html` (or `.svg`): a self-contained page with the latency percentile curve and
//! throughput and latency over time, drawn by plotters' SVG backend and embedded inline.

use plotters::prelude::*;

use super::{table, Report};

/// Chart size in pixels.
const SIZE: (u32, u32) = (900, 420);
/// The percentile curve goes out to 99.999 % (five nines).
const MAX_NINES: f64 = 5.0;

/// The full HTML page.
pub fn render(report: &Report) -> String {
    let mut body = String::new();
    body.push_str(&percentile_svg(report));
    body.push_str(&timeline_svg(report));
    let table = table::render(report)
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>imedge-loadgen report</title>\
         <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em;overflow:auto}}</style>\
         </head><body><h1>imedge-loadgen report</h1><pre>{table}</pre>{body}</body></html>\n"
    )
}

/// Just the charts, for `--report FILE.svg`: the percentile curve.
pub fn render_svg(report: &Report) -> String {
    percentile_svg(report)
}

fn percentile_svg(report: &Report) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let _ = root.fill(&WHITE);
        let h = &report.totals.latency;
        let max = (h.max().max(10)) as f64 * 1.2;
        let chart = ChartBuilder::on(&root)
            .caption(
                "Latency by percentile (µs, CO-corrected)",
                ("sans-serif", 20),
            )
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..MAX_NINES, (1f64..max).log_scale());
        if let Ok(mut chart) = chart {
            let _ = chart
                .configure_mesh()
                .x_desc("percentile")
                .y_desc("latency µs")
                .x_label_formatter(&|x| format!("{:.3}%", 100.0 * (1.0 - 10f64.powf(-x))))
                .draw();
            if !h.is_empty() {
                let points: Vec<(f64, f64)> = (0..=500)
                    .map(|i| {
                        let x = f64::from(i) * MAX_NINES / 500.0;
                        let q = 1.0 - 10f64.powf(-x);
                        (x, (h.value_at_quantile(q).max(1)) as f64)
                    })
                    .collect();
                let _ = chart.draw_series(LineSeries::new(points, &BLUE));
            }
        }
        let _ = root.present();
    }
    svg
}

fn timeline_svg(report: &Report) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (SIZE.0, SIZE.1 * 2)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let (top, bottom) = root.split_vertically(SIZE.1);
        let ticks = &report.timeline;
        let t_max = ticks.last().map_or(1.0, |t| t.t_s.max(1.0));
        let rate_max = ticks
            .iter()
            .map(|t| t.sent_per_s.max(t.delivered_per_s))
            .fold(1.0, f64::max)
            * 1.1;
        if let Ok(mut chart) = ChartBuilder::on(&top)
            .caption("Throughput over time (messages/s)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..t_max, 0f64..rate_max)
        {
            let _ = chart.configure_mesh().x_desc("s").draw();
            if let Ok(s) = chart.draw_series(LineSeries::new(
                ticks.iter().map(|t| (t.t_s, t.sent_per_s)),
                &BLUE,
            )) {
                s.label("sent")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            }
            if let Ok(s) = chart.draw_series(LineSeries::new(
                ticks.iter().map(|t| (t.t_s, t.delivered_per_s)),
                &GREEN,
            )) {
                s.label("delivered")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
            }
            let _ = chart.configure_series_labels().border_style(BLACK).draw();
        }
        let lat_max = ticks.iter().map(|t| t.p99_us).max().unwrap_or(10).max(10) as f64 * 1.5;
        if let Ok(mut chart) = ChartBuilder::on(&bottom)
            .caption("Latency over time (µs)", ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..t_max, (1f64..lat_max).log_scale())
        {
            let _ = chart.configure_mesh().x_desc("s").draw();
            let with_data = || ticks.iter().filter(|t| t.p50_us > 0);
            if let Ok(s) = chart.draw_series(LineSeries::new(
                with_data().map(|t| (t.t_s, t.p50_us as f64)),
                &BLUE,
            )) {
                s.label("p50")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            }
            if let Ok(s) = chart.draw_series(LineSeries::new(
                with_data().map(|t| (t.t_s, t.p99_us as f64)),
                &RED,
            )) {
                s.label("p99")
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            }
            let _ = chart.configure_series_labels().border_style(BLACK).draw();
        }
        let _ = root.present();
    }
    svg
}
