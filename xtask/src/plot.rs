//! The validation's timeline: per run, each engine's attributed resident
//! bytes against its configured budget (dashed) and its budget in force
//! (thin), and the workload's total resident set against the ceiling
//! (black; dashed: the ceiling).

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

/// Text is drawn with DejaVu Sans (Debian's `fonts-dejavu-core`, which
/// the setup installs), read once and registered as "sans-serif": plotters
/// measures text with it for the SVG timelines and draws it for the PNG
/// panels.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn fonts() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT)
                .map_err(|e| format!("{FONT}: {e} (install fonts-dejavu-core)"))?;
            plotters::style::register_font(
                "sans-serif",
                FontStyle::Normal,
                Box::leak(bytes.into_boxed_slice()),
            )
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Series colours, in turn (matplotlib's ten).
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

pub fn timeline(path: &Path, kernel: &str, runs: &[Value]) -> anyhow::Result<()> {
    fonts()?;
    let root = SVGBackend::new(path, (1000, 330 * runs.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((runs.len(), 1));
    for (panel, run) in panels.iter().zip(runs) {
        let points = run["timeline"].as_array().cloned().unwrap_or_default();
        let t_max = points
            .last()
            .and_then(|p| p["t"].as_f64())
            .unwrap_or(1.0)
            .max(1.0);
        let ceiling = run["ceiling_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
        let peak = run["peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / 1048576.0;
        let y_max = (ceiling.max(peak) * 1.1).max(1.0);
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{} ({kernel}): resident MiB by engine and in all; dashed: budgets, ceiling; thin: budget in force",
                    run["mode"].as_str().unwrap_or_default()
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..t_max, 0.0..y_max)?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("MiB")
            .draw()?;
        let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / 1048576.0;
        for (i, e) in super::validate_engines().iter().enumerate() {
            let c = PALETTE[i];
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| {
                        (
                            p["t"].as_f64().unwrap_or(0.0),
                            mib(&p[*e]["resident_bytes"]),
                        )
                    }),
                    c.stroke_width(2),
                ))?
                .label(*e)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            let budget = mib(&run["engines"][*e]["budget_bytes"]);
            chart.draw_series(DashedLineSeries::new(
                [(0.0, budget), (t_max, budget)],
                6,
                4,
                c.stroke_width(1),
            ))?;
            if run["mode"] == "governed" {
                // The budget in force, as a step line.
                let mut steps = Vec::new();
                for p in points
                    .iter()
                    .filter(|p| p[*e]["budget_bytes"].as_u64() > Some(0))
                {
                    let (t, b) = (p["t"].as_f64().unwrap_or(0.0), mib(&p[*e]["budget_bytes"]));
                    if let Some(&(_, last)) = steps.last() {
                        steps.push((t, last));
                    }
                    steps.push((t, b));
                }
                chart.draw_series(LineSeries::new(steps, c.mix(0.5).stroke_width(1)))?;
            }
        }
        chart
            .draw_series(LineSeries::new(
                points
                    .iter()
                    .map(|p| (p["t"].as_f64().unwrap_or(0.0), mib(&p["rss_bytes"]))),
                BLACK.stroke_width(2),
            ))?
            .label("total RSS")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        if ceiling <= y_max {
            chart.draw_series(DashedLineSeries::new(
                [(0.0, ceiling), (t_max, ceiling)],
                6,
                4,
                BLACK.stroke_width(1),
            ))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The validation's timeline draws (its text measured with the
    /// registered font) from a run of two samples.
    #[test]
    fn a_timeline_is_drawn_with_the_registered_font() {
        let path = std::env::temp_dir().join(format!("timeline-{}.svg", std::process::id()));
        let run = serde_json::json!({
            "mode": "governed",
            "ceiling_bytes": 1u64 << 30,
            "peak_rss_bytes": 900u64 << 20,
            "engines": {"vector": {"budget_bytes": 400u64 << 20}},
            "timeline": [
                {"t": 0.0, "rss_bytes": 100u64 << 20, "vector": {"resident_bytes": 50u64 << 20, "budget_bytes": 400u64 << 20}},
                {"t": 1.0, "rss_bytes": 900u64 << 20, "vector": {"resident_bytes": 350u64 << 20, "budget_bytes": 400u64 << 20}}
            ]
        });
        timeline(&path, "test", &[run]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(
            svg.contains("<svg") && svg.contains("governed (test)"),
            "{svg}"
        );
    }
}
