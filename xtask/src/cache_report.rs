//! The cache scenario's report, for one kernel: `report.md` (per run and
//! phase, the vector queries' latency, the vector thread's major faults,
//! the index's lowest residency; the flush's throughput; the governed
//! run's criteria against the ungoverned one) and `timeline.svg` (per
//! run: the index's residency and the flush's progress, and the queries'
//! p99 per 100 ms window, log scale).

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

const PHASES: [&str; 3] = ["before", "during", "after"];

/// Writes `summary.json`, `report.md` and `timeline.svg` into `dir`,
/// prints the report, and returns whether the governed run (if there was
/// one) met the target, the cache criteria included.
pub fn write(dir: &Path, summary: &Value) -> anyhow::Result<bool> {
    let runs = crate::report::write_files(dir, summary, &report(summary), timeline)?;
    // Without a governed run and a verdict nothing was shown.
    let governed: Vec<&Value> = runs.iter().filter(|r| r["mode"] == "governed").collect();
    Ok(!governed.is_empty()
        && governed.iter().all(|r| r["target_met"] == true)
        && summary["cache"]["met"] == true)
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / 1048576.0
}

fn us(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x >= 1000.0 => format!("{:.1} ms", x / 1000.0),
        Some(x) => format!("{x:.0} µs"),
        None => "-".to_owned(),
    }
}

/// The governed run's engine placement (`[[engine]] cpus`), as a clause.
fn placement(p: &Value) -> String {
    if !p.is_object() {
        return String::new();
    }
    format!(
        ", and the engines placed by where the scratch disk interrupts (CPU {}, {:.0}% of its interrupts on line {} {} during a probe write): the vector engine on CPUs {}, the flushing timeseries engine on CPU {}",
        p["disk"]["cpu"],
        p["disk"]["share"].as_f64().unwrap_or(0.0) * 100.0,
        p["disk"]["line"].as_str().unwrap_or("?"),
        p["disk"]["device"].as_str().unwrap_or("?"),
        p["vector"].as_str().unwrap_or("?"),
        p["timeseries"].as_str().unwrap_or("?"),
    )
}

fn report(summary: &Value) -> String {
    let kernel = summary["kernel"].as_str().unwrap_or("unknown");
    let runs = summary["runs"].as_array().cloned().unwrap_or_default();
    let backend = runs
        .iter()
        .find_map(|r| r["cgroup_backend"].as_str())
        .unwrap_or("none");
    let first = runs.first().map(|r| &r["workload"]).unwrap_or(&Value::Null);
    let mut s = format!(
        "Cache scenario, kernel {kernel} ({backend}); ceiling {:.0} MiB (deploy/scenarios/cache.toml). \
         The vector engine queries a {:.0} MiB mapped index (every query reads vectors from its upper sixteenth and from anywhere in it) \
         while the timeseries engine flushes {:.0} MiB of Gorilla segments. \
         Ungoverned: buffered writes, nothing protected. Governed: the flush through the library's uncached writer, the index locked resident (`MLOCK_ONFAULT`), charged to the vector budget{}.\n\n\
         The flush runs in {} windows, with queries alone before, between and after them: `before` is the first quiet window, `during` the flush windows together, `after` the last quiet window; the p99 without a flush pools every quiet window.\n\n\
         | run | phase | queries | p50 | p99 | vector major faults | index resident (lowest) | flush |\n|---|---|---:|---:|---:|---:|---:|---|\n",
        mib(&summary["config"]["ceiling_bytes"]),
        mib(&first["index_bytes"]),
        mib(&first["flush"]["bytes"]),
        placement(&summary["placement"]),
        first["phases"]["during"]["windows"].as_u64().unwrap_or(1),
    );
    for r in &runs {
        let mode = r["mode"].as_str().unwrap_or_default();
        let w = &r["workload"];
        if !w.is_object() {
            s.push_str(&format!(
                "| {mode} | - | - | - | - | - | - | {} |\n",
                r["exit"].as_str().unwrap_or("failed")
            ));
            continue;
        }
        let index = w["index_bytes"].as_f64().unwrap_or(1.0).max(1.0);
        for p in PHASES {
            let x = &w["phases"][p];
            let flush = if p == "during" {
                format!(
                    "{:.0} MiB/s ({})",
                    w["flush"]["mib_per_s"].as_f64().unwrap_or(0.0),
                    w["flush"]["path"].as_str().unwrap_or("?")
                )
            } else {
                String::new()
            };
            s.push_str(&format!(
                "| {mode} | {p} | {} | {} | {} | {} | {:.0} MiB ({:.1}%) | {flush} |\n",
                x["queries"],
                us(&x["p50_us"]),
                us(&x["p99_us"]),
                x["vector_major_faults"],
                mib(&x["min_hot_resident_bytes"]),
                x["min_hot_resident_bytes"].as_f64().unwrap_or(0.0) / index * 100.0,
            ));
        }
    }
    let c = &summary["cache"];
    if let Some(why) = c["why"].as_str() {
        s.push_str(&format!("\nNo verdict: {why}.\n"));
    } else if c.is_object() {
        let u = &c["ungoverned"];
        s.push_str(&format!(
            "\nThe problem (ungoverned): the index fell to {:.1}% resident during the flush; its p99 rose {:.1}× over the run's before-flush p99; the vector thread took {} major faults; the flush left {:.0}% of what it wrote in the page cache.\n\n\
             | governed run against | measured | limit | |\n|---|---:|---:|---|\n",
            u["min_hot_resident"].as_f64().unwrap_or(0.0) * 100.0,
            u["p99_during_vs_before"].as_f64().unwrap_or(0.0),
            u["major_faults_during"],
            u["flush_left_cached"].as_f64().unwrap_or(0.0) * 100.0,
        ));
        let missed_reported = format!(
            "missed (reported, not gated: {})",
            c["timing_reported_why"].as_str().unwrap_or("not gated")
        );
        for (name, label, at_least) in [
            (
                "flush_left_cached",
                "the flush's bytes left in the page cache / written",
                false,
            ),
            (
                "hot_set_resident",
                "index resident during the flush (lowest)",
                true,
            ),
            (
                "major_faults_vs_ungoverned",
                "major faults during the flush / ungoverned",
                false,
            ),
            (
                "p99_during_vs_quiet",
                "p99 in the flush windows / p99 in the quiet windows between them (1.2, or 100 µs more)",
                false,
            ),
            (
                "flush_throughput_vs_ungoverned",
                "flush throughput / ungoverned",
                true,
            ),
        ] {
            let x = &c[name];
            s.push_str(&format!(
                "| {label} | {:.3} | {} {} | {} |\n",
                x["value"].as_f64().unwrap_or(f64::NAN),
                if at_least { "≥" } else { "≤" },
                // (The p99's limit is worked out from the quiet p99.)
                x["limit"].as_f64().map_or_else(
                    || x["limit"].to_string(),
                    |l| format!("{}", (l * 100.0).round() / 100.0)
                ),
                match (x["ok"] == true, x["gated"] != false) {
                    (true, _) => "ok",
                    (false, true) => "MISSED",
                    (false, false) => &missed_reported,
                },
            ));
        }
        let ev = &c["vector_cache_evicted_bytes"];
        if ev.is_object() {
            s.push_str(&format!(
                "\nThe kernel's page-cache attribution: reclaim evicted {:.0} MiB of the vector engine's page cache (its index) ungoverned, {:.0} MiB governed.\n",
                mib(&ev["ungoverned"]),
                mib(&ev["governed"]),
            ));
        }
        s.push_str(&format!(
            "\nCriteria {}; the existing ones (no OOM kill, resident set under the ceiling, engines within budget): governed target {}.\n",
            if c["met"] == true { "met" } else { "MISSED" },
            if runs
                .iter()
                .filter(|r| r["mode"] == "governed")
                .all(|r| r["target_met"] == true)
            {
                "met"
            } else {
                "MISSED"
            },
        ));
    }
    s
}

fn timeline(path: &Path, kernel: &str, runs: &[Value]) -> anyhow::Result<()> {
    crate::plot::fonts()?;
    let root = SVGBackend::new(path, (1000, 300 * runs.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let rows = root.split_evenly((runs.len(), 2));
    for (i, run) in runs.iter().enumerate() {
        let w = &run["workload"];
        let points = w["timeline"].as_array().cloned().unwrap_or_default();
        let mode = run["mode"].as_str().unwrap_or_default();
        let t_max = points
            .last()
            .and_then(|p| p["t"].as_f64())
            .unwrap_or(1.0)
            .max(1.0);
        let index = w["index_bytes"].as_f64().unwrap_or(1.0).max(1.0);
        let flush = w["flush"]["bytes"].as_f64().unwrap_or(1.0).max(1.0);
        let t = |p: &Value| p["t"].as_f64().unwrap_or(0.0);
        let mut left = ChartBuilder::on(&rows[2 * i])
            .caption(
                format!("{mode} ({kernel}): index resident, flush done (%)"),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..t_max, 0.0..105.0)?;
        left.configure_mesh().x_desc("seconds").draw()?;
        left.draw_series(LineSeries::new(
            points.iter().map(|p| {
                (
                    t(p),
                    p["hot_resident_bytes"].as_f64().unwrap_or(0.0) / index * 100.0,
                )
            }),
            RGBColor(31, 119, 180).stroke_width(2),
        ))?
        .label("index resident")
        .legend(|(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 20, y)],
                RGBColor(31, 119, 180).stroke_width(2),
            )
        });
        left.draw_series(LineSeries::new(
            points.iter().map(|p| {
                (
                    t(p),
                    p["flushed_bytes"].as_f64().unwrap_or(0.0) / flush * 100.0,
                )
            }),
            RGBColor(255, 127, 14).stroke_width(2),
        ))?
        .label("flush done")
        .legend(|(x, y)| {
            PathElement::new(
                vec![(x, y), (x + 20, y)],
                RGBColor(255, 127, 14).stroke_width(2),
            )
        });
        left.configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .draw()?;
        let p99: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| Some((t(p), p["p99_us"].as_f64()? / 1000.0)))
            .collect();
        let y_max = p99.iter().map(|p| p.1).fold(1.0, f64::max) * 1.5;
        let mut right = ChartBuilder::on(&rows[2 * i + 1])
            .caption(
                format!("{mode}: vector query p99 per 100 ms (ms, log)"),
                ("sans-serif", 15),
            )
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(45)
            .build_cartesian_2d(0.0..t_max, (0.01..y_max).log_scale())?;
        right.configure_mesh().x_desc("seconds").draw()?;
        right.draw_series(LineSeries::new(
            p99.into_iter().map(|(x, y)| (x, y.max(0.01))),
            RGBColor(214, 39, 40).stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}
