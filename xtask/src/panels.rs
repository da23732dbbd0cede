//! `cargo xtask panels`: what the Grafana dashboard (`deploy/grafana`)
//! shows, drawn without Grafana. It runs the enforcement suite's
//! Prometheus test (an agent governing the demo, scraped by a real
//! Prometheus) for `secs` more seconds, which writes each panel's queries
//! over the run to `target/dashboard-panels.json`, and draws each panel as
//! a PNG under `docs/dashboard/`.

use std::path::Path;

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde_json::Value;

use crate::{
    cargo,
    cmd::{self, step},
};

pub fn panels(secs: u64, redraw: bool) -> anyhow::Result<()> {
    if !redraw {
        record(secs)?;
    }
    let root = crate::root();
    let data = root.join("target/dashboard-panels.json");
    let data: Value = serde_json::from_str(
        &std::fs::read_to_string(&data).with_context(|| format!("reading {}", data.display()))?,
    )?;
    let out = root.join("docs/dashboard");
    std::fs::create_dir_all(&out)?;
    step(&format!("drawing the panels into {}", out.display()));
    crate::plot::fonts()?;
    let start = data["start"].as_f64().unwrap_or(0.0);
    for (i, panel) in data["panels"].as_array().into_iter().flatten().enumerate() {
        let title = panel["title"].as_str().unwrap_or_default();
        let path = out.join(format!("{:02}-{}.png", i + 1, slug(title)));
        draw(&path, panel, start).with_context(|| format!("drawing {title:?}"))?;
        eprintln!(
            "    {}",
            path.strip_prefix(&root).unwrap_or(&path).display()
        );
    }
    Ok(())
}

/// Runs the Prometheus test `secs` longer, which leaves its data behind.
fn record(secs: u64) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "the Prometheus test runs an agent (eBPF, cgroups): run `cargo xtask panels` as root"
        );
    }
    crate::setup::deploy_tools()?;
    step(&format!(
        "an agent governing the demo, scraped by Prometheus for {secs} s more than the test's checks"
    ));
    cmd::run(
        cargo::command()
            .args([
                "test",
                "-p",
                "nodedb-governor-testkit",
                "--test",
                "enforcement",
            ])
            .args(["prometheus::", "--", "--nocapture"])
            .env("NODEDB_GOVERNOR_PANELS_SECS", secs.to_string())
            .env("NODEDB_GOVERNOR_REQUIRE_PRIVILEGED", "1"),
    )
}

/// "Engine memory: resident, reserved" -> "engine-memory-resident-reserved".
fn slug(title: &str) -> String {
    let words: Vec<String> = title
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(6)
        .map(str::to_ascii_lowercase)
        .collect();
    words.join("-")
}

/// The panel's unit as drawn: (what values are multiplied by, the axis's
/// name).
fn scale(unit: &str) -> (f64, &'static str) {
    match unit {
        "bytes" => (1.0 / 1048576.0, "MiB"),
        "Bps" => (1.0 / 1048576.0, "MiB/s"),
        "percentunit" => (100.0, "%"),
        "reqps" => (1.0, "per second"),
        "s" => (1.0, "seconds"),
        _ => (1.0, ""),
    }
}

/// Grafana's legend template with the series' labels filled in.
fn legend(template: &str, metric: &Value) -> String {
    let mut s = template.to_owned();
    if let Some(labels) = metric.as_object() {
        for (k, v) in labels {
            s = s.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or_default());
        }
    }
    s
}

fn draw(path: &Path, panel: &Value, start: f64) -> anyhow::Result<()> {
    let (factor, axis) = scale(panel["unit"].as_str().unwrap_or_default());
    let series: Vec<(String, Vec<(f64, f64)>)> = panel["series"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let points = s["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| {
                    let t = p[0].as_f64()? - start;
                    let v: f64 = p[1].as_str()?.parse().ok()?;
                    v.is_finite().then_some((t, v * factor))
                })
                .collect();
            (
                legend(s["legend"].as_str().unwrap_or_default(), &s["metric"]),
                points,
            )
        })
        .collect();
    let t_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(t, _)| t))
        .fold(1.0_f64, f64::max);
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(_, v)| v))
        .fold((0.0_f64, 0.0_f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let hi = if hi - lo < 1e-9 {
        lo + 1.0
    } else {
        hi + (hi - lo) * 0.1
    };
    let root = BitMapBackend::new(path, (1150, 340)).into_drawing_area();
    root.fill(&WHITE)?;
    // The chart on the left, its legend beside it (never over the lines).
    let (plot, legend_area) = root.split_horizontally(850);
    let mut chart = ChartBuilder::on(&plot)
        .caption(
            panel["title"].as_str().unwrap_or_default(),
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..t_max, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc(axis)
        .label_style(("sans-serif", 12))
        .draw()?;
    for (i, (name, points)) in series.into_iter().enumerate() {
        let c = crate::plot::PALETTE[i % crate::plot::PALETTE.len()];
        chart.draw_series(LineSeries::new(points, c.stroke_width(2)))?;
        let y = 40 + 17 * i as i32;
        legend_area.draw(&PathElement::new(vec![(4, y), (22, y)], c.stroke_width(3)))?;
        legend_area.draw(&Text::new(name, (28, y - 7), ("sans-serif", 12)))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legends_and_names_read_as_grafana_would() {
        let m = serde_json::json!({"engine": "query", "pid": "42"});
        assert_eq!(
            legend("{{engine}} resident (pid {{pid}})", &m),
            "query resident (pid 42)"
        );
        assert_eq!(
            slug("Engine memory: resident, reserved, budget in force"),
            "engine-memory-resident-reserved-budget-in"
        );
        assert_eq!(scale("bytes").1, "MiB");
    }
}
