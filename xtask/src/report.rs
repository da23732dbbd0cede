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
         Peak RSS: the workload process's resident set. Throttled: how often the kernel throttled the database above `memory.high` / charges hit `memory.max` (cgroup v2's `memory.events`; v1 counts only the second).\n\n\
         | run | vector | timeseries | query | peak RSS / ceiling | OOM kills | throttled (high / max) | outcome |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
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
            "| {mode} | {} | {} | {} | {} / {} | {} | {} / {} | {outcome}{verdict} |\n",
            e("vector"),
            e("timeseries"),
            e("query"),
            mib(&r["peak_rss_bytes"]),
            mib(&r["ceiling_bytes"]),
            r["oom_kills"].as_u64().unwrap_or(0),
            r["high_events"].as_u64().unwrap_or(0),
            r["max_events"].as_u64().unwrap_or(0),
        ));
    }
    s.push_str(&per_node(summary, &runs));
    s.push_str(&throughput(&runs));
    s.push_str(&spills(&runs));
    s.push_str(&cpu(&runs));
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

/// The comparisons between runs: label, the run compared, the run it is
/// compared with.
const COMPARISONS: [(&str, &str, &str); 3] = [
    ("governed / ample", "governed", "ample"),
    ("governed / static", "governed", "static"),
    ("roomy / ample", "roomy", "ample"),
];

/// Each engine's rate: its label and where a workload's result has it.
const RATE_ROWS: [(&str, [&str; 2]); 4] = [
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

/// A workload result's rates, row by row: each engine alone (when it had
/// the solo phase) and together, then the whole workload's runs per hour.
fn rates(w: &Value) -> Vec<(String, Option<f64>)> {
    let mut out = Vec::new();
    for (phase, w) in [("alone: ", &w["solo"]), ("", w)] {
        for (name, [engine, field]) in RATE_ROWS {
            out.push((
                format!("{phase}{name}"),
                w[engine][field].as_f64().filter(|v| *v > 0.0),
            ));
        }
    }
    let solo = if w["solo"].is_object() {
        ", with the solo phase"
    } else {
        ""
    };
    out.push((
        format!("whole workload (runs/hour{solo})"),
        w["seconds"]
            .as_f64()
            .filter(|s| *s > 0.0)
            .map(|s| 3600.0 / s),
    ));
    out
}

/// Rounds of the same harness run: per comparison, each row's ratio in
/// every round (paired: both runs of a ratio are of the same round), its
/// median and its spread. A row shows only where every round has it.
pub fn rounds(summaries: &[Value]) -> String {
    let mut s = format!(
        "# The validation in {} rounds\n\nEach round is one run of the harness (every mode in turn); a ratio is taken within a round, then the rounds' ratios are summarised: median, and lowest to highest.\n",
        summaries.len()
    );
    for (label, x, y) in COMPARISONS {
        let per_round: Vec<Vec<(String, Option<f64>)>> = summaries
            .iter()
            .filter_map(|summary| {
                let runs = summary["runs"].as_array()?;
                let (xw, yw) = (&run(runs, x)?["workload"], &run(runs, y)?["workload"]);
                if !xw.is_object() || !yw.is_object() {
                    return None;
                }
                let same_work = xw["solo"].is_object() == yw["solo"].is_object();
                Some(
                    rates(xw)
                        .into_iter()
                        .zip(rates(yw))
                        .map(|((row, a), (_, b))| {
                            let whole = row.starts_with("whole");
                            let ratio = match (a, b) {
                                (Some(a), Some(b)) if same_work || !whole => Some(a / b),
                                _ => None,
                            };
                            (row, ratio)
                        })
                        .collect(),
                )
            })
            .collect();
        if per_round.len() != summaries.len() || per_round.is_empty() {
            continue;
        }
        s.push_str(&format!("\n## {label}\n\n| | "));
        for k in 1..=per_round.len() {
            s.push_str(&format!("round {k} | "));
        }
        s.push_str(&format!(
            "median | spread |\n|---|{}\n",
            "---:|".repeat(per_round.len() + 2)
        ));
        for (i, (row, _)) in per_round[0].iter().enumerate() {
            let mut all: Vec<f64> = per_round.iter().filter_map(|r| r[i].1).collect();
            if all.len() != per_round.len() {
                continue;
            }
            s.push_str(&format!("| {row} | "));
            for v in &all {
                s.push_str(&format!("{v:.2} | "));
            }
            all.sort_by(f64::total_cmp);
            let median = if all.len() % 2 == 1 {
                all[all.len() / 2]
            } else {
                (all[all.len() / 2 - 1] + all[all.len() / 2]) / 2.0
            };
            s.push_str(&format!(
                "**{median:.2}** | {:.2}-{:.2} |\n",
                all[0],
                all[all.len() - 1]
            ));
        }
    }
    s
}

/// Each engine's rate in each run: against the run without an agent when
/// there is one, and the ratios that say what governance costs or wins
/// (each pair of runs present).
fn throughput(runs: &[Value]) -> String {
    let mut s = String::new();
    let with_workload = |m: &str| run(runs, m).filter(|r| r["workload"].is_object());
    let b = with_workload("baseline").map(|b| &b["workload"]);
    let others: Vec<&Value> = ["governed", "static", "roomy", "ample"]
        .iter()
        .filter_map(|m| with_workload(m))
        .collect();
    // The cost of governance as the validation defines it: governed against
    // ungoverned with ample memory; what it wins against what a user would
    // configure instead (static budgets); and the machinery's part of it
    // (roomy against ample: nothing had to give).
    let costs: Vec<(&str, &Value, &Value)> = COMPARISONS
        .into_iter()
        .filter_map(|(label, x, y)| Some((label, with_workload(x)?, with_workload(y)?)))
        .collect();
    if others.is_empty() || (b.is_none() && costs.is_empty()) {
        return s;
    }
    s.push_str(
        "\nThroughput (same data, same run of the harness). Against the baseline (no agent, no ceiling), when it ran: \
         the ratio is the run's rate over the baseline's (1.00 = as fast). \
         The last columns compare runs: governed against ample (ungoverned, ample memory: the cost of governance), \
         governed against static (what a user would configure instead: each engine's fixed budget in a pool of its own, same ceiling), \
         and roomy against ample (governed with ample memory: the machinery alone, with nothing to spill). \
         Rows marked alone: each engine busy in turn while the others idle (the workload's solo phase); the others: all together. \
         The total row is the whole workload's rate (one over its seconds), compared only between runs that did the same work (both with the solo phase or neither; a dash otherwise).\n\n| engine |",
    );
    if b.is_some() {
        s.push_str(" baseline |");
    }
    for o in &others {
        s.push_str(&format!(" {} |", o["mode"].as_str().unwrap_or_default()));
        if b.is_some() {
            s.push_str(" ratio |");
        }
    }
    for (label, _, _) in &costs {
        s.push_str(&format!(" {label} |"));
    }
    let columns =
        usize::from(b.is_some()) + others.len() * (1 + usize::from(b.is_some())) + costs.len();
    s.push_str(&format!("\n|---|{}\n", "---:|".repeat(columns)));
    // Each engine alone in turn (the solo phase, in the runs that had
    // it: `.ci/run` leaves it out of those it only compares together),
    // then all together. A run without the phase shows a dash, and so does
    // a ratio with one.
    let solo = |w: &Value| w["solo"].is_object();
    let any_solo = others.iter().any(|o| solo(&o["workload"])) || b.is_some_and(solo);
    let ratio = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) => format!(" {:.2} |", x / y.max(1e-12)),
        _ => " — |".to_owned(),
    };
    let cell = |v: Option<f64>| v.map_or(" — |".to_owned(), |v| format!(" {v:.0} |"));
    for phase in ["solo", ""] {
        if !phase.is_empty() && !any_solo {
            continue;
        }
        let at = |w: &Value, path: [&str; 2]| {
            let w = if phase.is_empty() {
                w
            } else if solo(w) {
                &w[phase]
            } else {
                return None;
            };
            Some(w[path[0]][path[1]].as_f64().unwrap_or(0.0))
        };
        for (name, path) in RATE_ROWS {
            let rate = |r: &Value| at(&r["workload"], path);
            let label = if phase.is_empty() {
                name.to_owned()
            } else {
                format!("alone: {name}")
            };
            s.push_str(&format!("| {label} |"));
            let bv = b.map(|b| at(b, path));
            if let Some(bv) = bv {
                s.push_str(&cell(bv));
            }
            for o in &others {
                let v = rate(o);
                s.push_str(&cell(v));
                if let Some(bv) = bv {
                    s.push_str(&ratio(v, bv));
                }
            }
            for (_, x, y) in &costs {
                s.push_str(&ratio(rate(x), rate(y)));
            }
            s.push('\n');
        }
    }
    // Runs of the whole workload per hour; compared only between runs
    // that did the same work (both with the solo phase, or neither).
    let per_hour = |w: &Value| 3600.0 / w["seconds"].as_f64().unwrap_or(f64::INFINITY);
    let total = |r: &Value| per_hour(&r["workload"]);
    let same = |x: &Value, y: &Value| solo(x) == solo(y);
    s.push_str("| total (workloads/hour) |");
    let bt = b.map(per_hour);
    if let Some(bt) = bt {
        s.push_str(&format!(" {bt:.0} |"));
    }
    for o in &others {
        s.push_str(&format!(" {:.0} |", total(o)));
        if let (Some(bt), Some(b)) = (bt, b) {
            s.push_str(&ratio(same(&o["workload"], b).then(|| total(o)), Some(bt)));
        }
    }
    for (_, x, y) in &costs {
        let comparable = same(&x["workload"], &y["workload"]);
        s.push_str(&ratio(comparable.then(|| total(x)), Some(total(y))));
    }
    s.push('\n');
    s
}

/// Where each run's CPU went: the engines' own threads (both phases; the
/// vector index's build workers beside its thread), the spill threads,
/// the rest of the workload process (link, rebalancer, threads that ended
/// other than the engines'), and the agent (its status polled by the
/// harness included); against the run's wall time. On a machine with few CPUs the engines
/// share them, so work the governor adds or saves shows here before it
/// shows in the rates.
fn cpu(runs: &[Value]) -> String {
    let rows: Vec<&Value> = runs
        .iter()
        .filter(|r| r["workload"]["cpu_seconds"].is_object())
        .collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut s = String::from(
        "\nCPU seconds, per run: each engine's own thread (vector: + its index build's workers), the spill threads, \
         the rest of the workload process (link, rebalancer), the agent (answering the harness's status requests included); the run's wall time.\n\n\
         | run | vector | timeseries | query | spill threads | rest of the process | agent | wall |\n|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let f = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{x:.1}"));
    for r in rows {
        let c = &r["workload"]["cpu_seconds"];
        let threads = c["threads"].as_object().cloned().unwrap_or_default();
        let named = |p: &dyn Fn(&str) -> bool| -> f64 {
            threads
                .iter()
                .filter(|(k, _)| p(k))
                .filter_map(|(_, v)| v.as_f64())
                // An empty sum of f64 is -0.0.
                .fold(0.0, |a, b| a + b)
        };
        // The index build's workers: its pool's (`vector-build-N`). Not
        // the threads nobody named: an engine's thread, unnamed in runs
        // before engine threads were named, could be listed there just
        // after it was joined, and was counted as a worker (the static
        // timeseries thread's 60 s added to the vector engine's 47).
        let workers = named(&|k| k.starts_with("vector-build"));
        let spill = named(&|k| k.starts_with("spill-"));
        let engines: f64 = ["vector", "timeseries", "query"]
            .iter()
            .filter_map(|e| c[*e].as_f64())
            .sum();
        let rest = c["process"]
            .as_f64()
            .map(|p| (p - engines - workers - spill).max(0.0));
        s.push_str(&format!(
            "| {} | {} + {} | {} | {} | {} | {} | {} | {} |\n",
            r["mode"].as_str().unwrap_or_default(),
            f(c["vector"].as_f64()),
            f(Some(workers)),
            f(c["timeseries"].as_f64()),
            f(c["query"].as_f64()),
            f(Some(spill)),
            f(rest),
            f(r["agent_cpu_seconds"].as_f64()),
            f(r["workload"]["seconds"].as_f64()),
        ));
    }
    // Of the engines' own threads, what ran in the kernel (runs from
    // before the split say nothing).
    let system: Vec<String> = runs
        .iter()
        .filter_map(|r| {
            let sys = &r["workload"]["cpu_seconds"]["system"];
            let parts: Vec<String> = ["vector", "timeseries", "query"]
                .iter()
                .filter_map(|e| sys[*e].as_f64().map(|x| format!("{e} {x:.1}")))
                .collect();
            (!parts.is_empty()).then(|| {
                format!(
                    "- {}: {}",
                    r["mode"].as_str().unwrap_or_default(),
                    parts.join(", ")
                )
            })
        })
        .collect();
    if !system.is_empty() {
        s.push_str(&format!(
            "\nOf the engines' own threads' seconds, those in the kernel (page faults, the memory cgroups' charging and reclaim, the attribution's programs, I/O):\n\n{}\n",
            system.join("\n")
        ));
    }
    let agents: Vec<String> = runs.iter().filter_map(agent_ticks).collect();
    if !agents.is_empty() {
        s.push_str(&format!(
            "\nThe agent's CPU, per run: its ticks (reading the kernel, deciding, acting; how many, how many at the calm pace, their time in all and p50 / p99 of the last ones) and its threads' seconds.\n\n{}\n",
            agents.join("\n")
        ));
    }
    s
}

/// One run's line on the agent's ticks and threads (None: the run had
/// no agent, or predates the figures).
fn agent_ticks(r: &Value) -> Option<String> {
    let t = &r["agent_ticks"];
    let ticks = t["ticks"].as_u64()?;
    let threads = r["agent_threads_cpu_seconds"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some(format!("{k} {:.2}", v.as_f64()?)))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    let marks = match (t["mark_events"].as_u64(), t["mark_reactions"].as_u64()) {
        (Some(e), Some(r)) => format!("; {e} crossings woke it, {r} reactions"),
        _ => String::new(),
    };
    Some(format!(
        "- {}: {ticks} ticks ({} calm), {:.2} s, p50 {} µs, p99 {} µs{marks}; threads: {threads}",
        r["mode"].as_str().unwrap_or_default(),
        t["calm_ticks"].as_u64().unwrap_or(0),
        t["seconds"].as_f64().unwrap_or(0.0),
        t["time_us"]["p50_us"].as_u64().unwrap_or(0),
        t["time_us"]["p99_us"].as_u64().unwrap_or(0),
    ))
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
        "\nSpread over the NUMA nodes ({}): per node, the database's peak anonymous memory there (its cgroup's `memory.numa_stat`) / the node's part of the ceiling then, MiB, and in brackets the worst sample against the part in force (within it + 5% to meet the target, as budgets: the agent holds it, not the kernel; without `numa.weights` the part follows where the budgets in force are placed); \
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
                    "node {}: {} / {} ({:.0}%)",
                    n["node"],
                    mib(&n["peak_anon_bytes"]),
                    mib(&n["ceiling_share_bytes"]),
                    n["peak_over_share"].as_f64().unwrap_or(0.0) * 100.0
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A run of `mode` whose engines ran at `rate` (alone at twice it) and
    /// whose workload took `seconds`.
    fn run_of(mode: &str, rate: f64, seconds: f64) -> Value {
        let engines = |r: f64| {
            json!({
                "vector": {"vectors_per_second": r, "searches_per_second": r},
                "timeseries": {"points_per_second": r},
                "query": {"rows_per_second": r},
            })
        };
        let mut w = engines(rate);
        w["solo"] = engines(2.0 * rate);
        w["seconds"] = seconds.into();
        json!({"mode": mode, "workload": w})
    }

    /// The table's rows: cells per line, for lines that start with `|`.
    fn rows(table: &str) -> Vec<Vec<String>> {
        table
            .lines()
            .filter(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_owned())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn rounds_pair_the_runs_of_a_round_and_give_the_median_and_spread() {
        // Governed against static: 1.5, 1.0 and 1.2 in the rounds, in
        // that order; the median is the middle value (round 3's), whatever
        // the order.
        let round = |g: f64, st: f64| json!({"runs": [run_of("governed", g, 3600.0 / g), run_of("static", st, 3600.0 / st)]});
        let summaries = [round(150.0, 100.0), round(90.0, 90.0), round(120.0, 100.0)];
        let text = rounds(&summaries);
        // Only the comparison both runs are in.
        assert!(text.contains("## governed / static"), "{text}");
        assert!(!text.contains("governed / ample"), "{text}");
        let t = rows(&text);
        assert_eq!(
            t[0],
            ["", "round 1", "round 2", "round 3", "median", "spread"]
        );
        let row = |name: &str| t.iter().find(|r| r[0] == name).unwrap().clone();
        assert_eq!(
            row("alone: vector search (searches/s)"),
            [
                "alone: vector search (searches/s)",
                "1.50",
                "1.00",
                "1.20",
                "**1.20**",
                "1.00-1.50"
            ]
        );
        assert_eq!(row("query GROUP BY (rows/s)")[4], "**1.20**");
        assert_eq!(
            row("whole workload (runs/hour, with the solo phase)")[1..],
            ["1.50", "1.00", "1.20", "**1.20**", "1.00-1.50"]
        );
        // Two rounds: the median is the mean of the two.
        let t = rows(&rounds(&summaries[..2]));
        assert_eq!(
            t.iter()
                .find(|r| r[0] == "query GROUP BY (rows/s)")
                .unwrap()[3..],
            ["**1.25**", "1.00-1.50"]
        );
    }

    #[test]
    fn a_round_without_one_of_the_runs_leaves_its_comparison_out() {
        let full =
            json!({"runs": [run_of("governed", 150.0, 10.0), run_of("static", 100.0, 12.0)]});
        let mut failed = run_of("static", 0.0, 0.0);
        failed["workload"] = Value::Null;
        let partial = json!({"runs": [run_of("governed", 150.0, 10.0), failed]});
        let text = rounds(&[full, partial]);
        assert!(!text.contains("## governed / static"), "{text}");
    }

    #[test]
    fn governed_against_static_is_shown_with_or_without_a_baseline() {
        let runs = [
            run_of("governed", 150.0, 10.0),
            run_of("static", 100.0, 12.5),
        ];
        let t = rows(&throughput(&runs));
        assert_eq!(t[0], ["engine", "governed", "static", "governed / static"]);
        // Every line has as many cells as the header.
        assert!(t.iter().all(|r| r.len() == t[0].len()), "{t:?}");
        let row = |name: &str| t.iter().find(|r| r[0] == name).unwrap().clone();
        assert_eq!(
            row("alone: query GROUP BY (rows/s)"),
            ["alone: query GROUP BY (rows/s)", "300", "200", "1.50"]
        );
        assert_eq!(row("query GROUP BY (rows/s)")[3], "1.50");
        // The whole workload: 12.5 s against 10 s.
        assert_eq!(
            row("total (workloads/hour)"),
            ["total (workloads/hour)", "360", "288", "1.25"]
        );

        let mut with_baseline = runs.to_vec();
        with_baseline.push(run_of("baseline", 200.0, 8.0));
        with_baseline.push(run_of("ample", 160.0, 9.0));
        let t = rows(&throughput(&with_baseline));
        assert_eq!(
            t[0],
            [
                "engine",
                "baseline",
                "governed",
                "ratio",
                "static",
                "ratio",
                "ample",
                "ratio",
                "governed / ample",
                "governed / static"
            ]
        );
        assert!(t.iter().all(|r| r.len() == t[0].len()), "{t:?}");
        let vector = t
            .iter()
            .find(|r| r[0] == "vector build (vectors/s)")
            .unwrap();
        assert_eq!(
            vector[1..],
            [
                "200", "150", "0.75", "100", "0.50", "160", "0.80", "0.94", "1.50"
            ]
        );
    }

    /// `.ci/run` runs the solo phase only where it compares alone
    /// (governed, static): the others show dashes on its rows, and their
    /// whole workload is not compared with a run that did more.
    #[test]
    fn runs_without_the_solo_phase_show_dashes_where_it_would_be() {
        let mut ample = run_of("ample", 160.0, 5.0);
        ample["workload"].as_object_mut().unwrap().remove("solo");
        let runs = [
            run_of("governed", 150.0, 10.0),
            run_of("static", 100.0, 12.5),
            ample,
        ];
        let t = rows(&throughput(&runs));
        assert_eq!(
            t[0],
            [
                "engine",
                "governed",
                "static",
                "ample",
                "governed / ample",
                "governed / static"
            ]
        );
        assert!(t.iter().all(|r| r.len() == t[0].len()), "{t:?}");
        let row = |name: &str| t.iter().find(|r| r[0] == name).unwrap().clone();
        assert_eq!(
            row("alone: query GROUP BY (rows/s)")[1..],
            ["300", "200", "—", "—", "1.50"]
        );
        assert_eq!(
            row("query GROUP BY (rows/s)")[1..],
            ["150", "100", "160", "0.94", "1.50"]
        );
        assert_eq!(
            row("total (workloads/hour)")[1..],
            ["360", "288", "720", "—", "1.25"]
        );
    }

    #[test]
    fn the_cpu_table_splits_the_process_into_engines_spill_threads_and_the_rest() {
        let mut governed = run_of("governed", 150.0, 10.0);
        governed["workload"]["cpu_seconds"] = json!({
            "vector": 4.0, "timeseries": 2.5, "query": 3.0, "process": 21.0,
            "system": {"vector": 0.5, "timeseries": 1.25, "query": 0.25},
            "threads": {"main": 0.0, "vector-build-0": 5.0, "vector-build-1": 2.5, "unnamed": 0.5, "spill-timeserie": 1.25, "spill-vector": 0.25, "nodedb-agent-li": 1.0},
        });
        governed["agent_cpu_seconds"] = json!(0.75);
        governed["agent_ticks"] = json!({
            "ticks": 1268, "calm_ticks": 27, "seconds": 0.2,
            "time_us": {"p50_us": 116, "p99_us": 315},
            "mark_events": 40, "mark_reactions": 31,
        });
        governed["agent_threads_cpu_seconds"] = json!({"main": 0.44, "serve": 0.05});
        // A workload from before the figures: no row.
        let old = run_of("static", 100.0, 12.5);
        let text = cpu(&[governed, old.clone()]);
        assert!(
            text.contains(
                "- governed: 1268 ticks (27 calm), 0.20 s, p50 116 µs, p99 315 µs; 40 crossings woke it, 31 reactions; threads: main 0.44, serve 0.05\n"
            ),
            "{text}"
        );
        assert_eq!(agent_ticks(&old), None);
        assert!(
            text.contains("\n- governed: vector 0.5, timeseries 1.2, query 0.2\n"),
            "{text}"
        );
        assert!(!text.contains("- static: vector"), "{text}");
        let t = rows(&text);
        assert_eq!(t.len(), 3, "{t:?}");
        assert_eq!(
            t[2],
            [
                "governed",
                // The unnamed 0.5 s is not a worker's: the rest's.
                "4.0 + 7.5",
                "2.5",
                "3.0",
                "1.5",
                "2.5",
                "0.8",
                "10.0"
            ]
        );
        assert_eq!(cpu(&[run_of("static", 100.0, 12.5)]), "");
    }

    #[test]
    fn without_runs_to_compare_there_is_no_table() {
        assert_eq!(throughput(&[run_of("governed", 1.0, 1.0)]), "");
        assert_eq!(throughput(&[run_of("baseline", 1.0, 1.0)]), "");
    }
}
