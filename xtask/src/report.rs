//! The validation's report, for one kernel: `summary.json` as the harness
//! wrote it, `report.md` (per engine, peaks against budgets; throughput
//! against the run without an agent) and `timeline.svg` (see plot.rs).
//! Written for the host's validation and for each VM's.

use std::{fs, path::Path};

use serde_json::Value;

/// Writes `summary.json`, `report.md` and `timeline.svg` for one kernel's
/// validation into `dir`, prints the report, and returns whether the
/// governed run (if there was one) met the target.
pub fn write(dir: &Path, summary: &Value) -> anyhow::Result<bool> {
    let runs = write_files(dir, summary, &report(summary), crate::plot::timeline)?;
    Ok(runs.iter().filter(|r| r["mode"] == "governed").all(met))
}

/// Writes a validation's `summary.json`, its `report`
/// (`report.md`, printed too) and its timeline (`timeline.svg`, drawn by
/// `plot` from the kernel's name and the runs) into `dir`; returns the
/// runs.
pub fn write_files(
    dir: &Path,
    summary: &Value,
    report: &str,
    plot: impl FnOnce(&Path, &str, &[Value]) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Value>> {
    fs::create_dir_all(dir)?;
    let kernel = summary["kernel"].as_str().unwrap_or("unknown");
    let runs = summary["runs"].as_array().cloned().unwrap_or_default();
    fs::write(
        dir.join("summary.json"),
        serde_json::to_vec_pretty(summary)?,
    )?;
    fs::write(dir.join("report.md"), report)?;
    plot(&dir.join("timeline.svg"), kernel, &runs)?;
    eprintln!("{report}");
    eprintln!(
        "    written: {}/{{summary.json,report.md,timeline.svg}}",
        dir.display()
    );
    Ok(runs)
}

/// Whether a run met the target (as the harness judged it).
fn met(run: &Value) -> bool {
    run["target_met"] == true
}

fn mib(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0) >> 20
}

fn run<'a>(runs: &'a [Value], mode: &str) -> Option<&'a Value> {
    runs.iter().find(|r| r["mode"] == mode)
}

fn report(summary: &Value) -> String {
    let kernel = summary["kernel"].as_str().unwrap_or("unknown");
    let runs = summary["runs"].as_array().cloned().unwrap_or_default();
    let backend = runs
        .iter()
        .find_map(|r| r["cgroup_backend"].as_str())
        .unwrap_or("none");
    let mut s = format!(
        "Kernel {kernel} ({backend}); the bundled configuration's ceiling ({} MiB) and budgets; workload `{}`.\n\n\
         Per engine: peak attributed resident / configured budget, MiB; in brackets, the governed run's peak against the budget in force (the configured budget moved by loans; for {} s after a loan is taken back, the larger budget, while the borrower spills), the other runs' against the configured budget. \
         Peak RSS: the workload process's resident set.\n\n\
         | run | vector | timeseries | query | peak RSS / ceiling | OOM kills | outcome |\n|---|---:|---:|---:|---:|---:|---|\n",
        mib(&summary["config"]["ceiling_bytes"]),
        summary["workload_args"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "defaults".to_owned()),
        summary["loan_grace_seconds"],
    );
    for r in &runs {
        let mode = r["mode"].as_str().unwrap_or_default();
        let e = |n: &str| {
            let x = &r["engines"][n];
            if mode == "baseline" {
                return "(no agent)".to_owned();
            }
            let mut cell = format!(
                "{} / {}",
                mib(&x["peak_resident_bytes"]),
                mib(&x["budget_bytes"])
            );
            if mode == "governed" {
                cell.push_str(&format!(
                    " ({:.0}%)",
                    x["peak_over_budget_in_force"].as_f64().unwrap_or(0.0) * 100.0
                ));
            } else {
                cell.push_str(&format!(
                    " ({:.0}%)",
                    x["peak_over_budget"].as_f64().unwrap_or(0.0) * 100.0
                ));
            }
            cell
        };
        let outcome = if r["completed"] == true {
            if r["correct"] == true {
                "completed, correct".to_owned()
            } else {
                "completed, WRONG".to_owned()
            }
        } else {
            r["exit"].as_str().unwrap_or("failed").to_owned()
        };
        let verdict = match mode {
            "governed" if met(r) => ", target met",
            "governed" => ", TARGET MISSED",
            _ => "",
        };
        s.push_str(&format!(
            "| {mode} | {} | {} | {} | {} / {} | {} | {outcome}{verdict} |\n",
            e("vector"),
            e("timeseries"),
            e("query"),
            mib(&r["peak_rss_bytes"]),
            mib(&r["ceiling_bytes"]),
            r["oom_kills"].as_u64().unwrap_or(0),
        ));
    }
    s.push_str(&per_node(summary, &runs));
    // Throughput against the run without an agent.
    if let Some(b) = run(&runs, "baseline").map(|b| &b["workload"])
        && b.is_object()
    {
        let others: Vec<&Value> = ["governed", "static", "roomy", "ample"]
            .iter()
            .filter_map(|m| run(&runs, m))
            .filter(|r| r["workload"].is_object())
            .collect();
        let pair = |a: &str, b: &str| {
            Some((run(&runs, a)?, run(&runs, b)?))
                .filter(|(x, y)| x["workload"].is_object() && y["workload"].is_object())
        };
        // The cost of governance as the validation defines it: governed
        // against ungoverned with ample memory; and the machinery's part of
        // it (roomy against ample: nothing had to give).
        let costs: Vec<(&str, &Value, &Value)> = [
            ("governed / ample", "governed", "ample"),
            ("governed / static", "governed", "static"),
            ("roomy / ample", "roomy", "ample"),
        ]
        .into_iter()
        .filter_map(|(label, a, b)| pair(a, b).map(|(x, y)| (label, x, y)))
        .collect();
        if !others.is_empty() {
            s.push_str(
                "\nThroughput against the baseline (no agent, no ceiling; same data, same run of the harness): \
                 the ratio is the run's rate over the baseline's (1.00 = as fast). \
                 The last columns are the cost of governance: governed against ample (ungoverned, ample memory), \
                 governed against static (what a user would configure instead: each engine's fixed budget in a pool of its own, same ceiling), \
                 and roomy against ample (governed with ample memory: the machinery alone, with nothing to spill). \
                 Rows marked alone: each engine busy in turn while the others idle (the workload's solo phase); the others: all together. \
                 The total row is the whole workload's rate (the same work in every run: one over its seconds).\n\n| engine | baseline |",
            );
            for o in &others {
                s.push_str(&format!(
                    " {} | ratio |",
                    o["mode"].as_str().unwrap_or_default()
                ));
            }
            for (label, _, _) in &costs {
                s.push_str(&format!(" {label} |"));
            }
            s.push_str("\n|---|---:|");
            for _ in &others {
                s.push_str("---:|---:|");
            }
            for _ in &costs {
                s.push_str("---:|");
            }
            s.push('\n');
            let rows = [
                ("vector build (vectors/s)", ["vector", "vectors_per_second"]),
                (
                    "vector search (searches/s)",
                    ["vector", "searches_per_second"],
                ),
                (
                    "timeseries ingest (points/s)",
                    ["timeseries", "points_per_second"],
                ),
                ("query GROUP BY (rows/s)", ["query", "rows_per_second"]),
            ];
            // Each engine alone in turn (the solo phase), then all together.
            for phase in ["solo", ""] {
                if !phase.is_empty() && !b[phase].is_object() {
                    continue;
                }
                let at = |w: &Value, path: [&str; 2]| {
                    let w = if phase.is_empty() { w } else { &w[phase] };
                    w[path[0]][path[1]].as_f64().unwrap_or(0.0)
                };
                for (name, path) in rows {
                    let rate = |r: &Value| at(&r["workload"], path);
                    let bv = at(b, path);
                    let label = if phase.is_empty() {
                        name.to_owned()
                    } else {
                        format!("alone: {name}")
                    };
                    s.push_str(&format!("| {label} | {bv:.0} |"));
                    for o in &others {
                        let v = rate(o);
                        s.push_str(&format!(" {v:.0} | {:.2} |", v / bv.max(1e-9)));
                    }
                    for (_, x, y) in &costs {
                        s.push_str(&format!(" {:.2} |", rate(x) / rate(y).max(1e-9)));
                    }
                    s.push('\n');
                }
            }
            // Runs of the whole workload per hour.
            let per_hour = |w: &Value| 3600.0 / w["seconds"].as_f64().unwrap_or(f64::INFINITY);
            let total = |r: &Value| per_hour(&r["workload"]);
            let bt = per_hour(b);
            s.push_str(&format!("| total (workloads/hour) | {bt:.0} |"));
            for o in &others {
                s.push_str(&format!(
                    " {:.0} | {:.2} |",
                    total(o),
                    total(o) / bt.max(1e-12)
                ));
            }
            for (_, x, y) in &costs {
                s.push_str(&format!(" {:.2} |", total(x) / total(y).max(1e-12)));
            }
            s.push('\n');
        }
    }
    s.push_str(&spills(&runs));
    if let Some(g) = run(&runs, "governed").map(|g| &g["workload"])
        && g.is_object()
    {
        s.push_str(&format!(
            "\nGoverned run: vector evicted {} segments to disk ({} searches scanned disk), timeseries flushed {} times, \
             the GROUP BY spilled {} files ({} MiB); the agent sent {} spill requests ({} MiB freed) and {} purges.\n",
            g["vector"]["stats"]["evictions"],
            g["vector"]["stats"]["disk_scans"],
            g["timeseries"]["stats"]["flushes"],
            g["query"]["spill_files"],
            mib(&g["query"]["spilled_bytes"]),
            g["link"]["spills"],
            mib(&g["link"]["spilled_bytes"]),
            g["link"]["purges"],
        ));
    }
    if let Some(g) = run(&runs, "governed") {
        let forced: Vec<String> = crate::validate_engines()
            .iter()
            .filter_map(|e| {
                let n = g["engines"][e]["forced_spills"].as_u64()?;
                Some(format!("{e} {n}"))
            })
            .collect();
        if !forced.is_empty() {
            s.push_str(&format!(
                "Loans taken back that forced the borrower to spill (it held Critical of its new budget): {}.\n",
                forced.join(", ")
            ));
        }
    }
    s
}

/// What each run gave up to stay within memory: per engine, what it
/// spilled (vector segments evicted to disk, timeseries flushes before
/// the final one, the `GROUP BY`'s spill files) and its peak.
fn spills(runs: &[Value]) -> String {
    let rows: Vec<&Value> = ["governed", "static", "ample"]
        .iter()
        .filter_map(|m| run(runs, m))
        .filter(|r| r["workload"].is_object())
        .collect();
    if rows.len() < 2 {
        return String::new();
    }
    let mut s = String::from(
        "\nSpilled, per run (alone + together, when each engine also ran alone): vector segments evicted to disk (searches that scanned disk), timeseries flushes (the final one included), \
         the `GROUP BY`'s spill files and MiB; each engine's peak attributed resident, MiB.\n\n\
         | run | vector evicted | timeseries flushes | GROUP BY spilled | peaks vector / timeseries / query | peak RSS |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let w = &r["workload"];
        // "alone + together" when the workload had its solo phase.
        let both = |path: &[&str], f: &dyn Fn(&Value) -> u64| {
            let at = |w: &Value| f(path.iter().fold(w, |v, k| &v[*k]));
            if w["solo"].is_object() {
                format!("{} + {}", at(&w["solo"]), at(w))
            } else {
                at(w).to_string()
            }
        };
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        s.push_str(&format!(
            "| {} | {} ({}) | {} | {} files, {} MiB | {} / {} / {} | {} |\n",
            r["mode"].as_str().unwrap_or_default(),
            both(&["vector", "stats", "evictions"], &n),
            both(&["vector", "stats", "disk_scans"], &n),
            both(&["timeseries", "stats", "flushes"], &n),
            both(&["query", "spill_files"], &n),
            both(&["query", "spilled_bytes"], &mib),
            mib(&r["engines"]["vector"]["peak_resident_bytes"]),
            mib(&r["engines"]["timeseries"]["peak_resident_bytes"]),
            mib(&r["engines"]["query"]["peak_resident_bytes"]),
            mib(&r["peak_rss_bytes"]),
        ));
    }
    s
}

/// The runs spread over the NUMA nodes, per node: each node's peak of the
/// database's anonymous memory against its share of the ceiling, and each
/// placed engine's peak there against its share of its budget in force.
fn per_node(summary: &Value, runs: &[Value]) -> String {
    let Some(spread) = summary["spread"]["cpus"].as_array() else {
        return String::new();
    };
    let mut s = format!(
        "\nSpread over the NUMA nodes ({}): per node, the database's peak anonymous memory there (its cgroup's `memory.numa_stat`) / the node's part of the ceiling, MiB (within it + 5% to meet the target, as budgets: the agent holds it, not the kernel); \
         each placed engine's peak there / its share of its budget in force there, in brackets (the worst sample, with the same loan grace).\n\n\
         | run | per node | engines per node | the agent | per node met |\n|---|---|---|---|---|\n",
        spread
            .iter()
            .filter_map(|p| Some(format!("{} on CPUs {}", p[0].as_str()?, p[1].as_str()?)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for r in runs.iter().filter(|r| r["numa"].is_object()) {
        let v = &r["numa"];
        let nodes = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                format!(
                    "node {}: {} / {}",
                    n["node"],
                    mib(&n["peak_anon_bytes"]),
                    mib(&n["ceiling_share_bytes"])
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let engines = crate::validate_engines()
            .iter()
            .flat_map(|e| {
                v["engines"][e]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(move |n| {
                        format!(
                            "{e} on {}: {} MiB ({:.0}%)",
                            n["node"],
                            mib(&n["peak_resident_bytes"]),
                            n["peak_over_share_in_force"].as_f64().unwrap_or(0.0) * 100.0
                        )
                    })
            })
            .collect::<Vec<_>>()
            .join("; ");
        let crowded = v["crowded_nodes"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(n, c)| format!("node {n} crowded {c} times"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "none crowded".to_owned());
        s.push_str(&format!(
            "| {} | {nodes} | {engines} | {crowded} | {} |\n",
            r["mode"].as_str().unwrap_or_default(),
            if v["met"] == true { "yes" } else { "no" }
        ));
    }
    s
}
