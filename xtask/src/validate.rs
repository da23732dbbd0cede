//! `cargo xtask validate`: the mixed workload (vector search, bulk
//! timeseries ingest, SQL GROUP BY) run three times on this host, each
//! time under a fresh agent with the bundled configuration's budgets:
//!
//! - `governed`: the agent enforces;
//! - `ungoverned`: the agent only observes (`enforce = false`), with
//!   `memory.max` at the same ceiling: the problem, measured the same way;
//! - `baseline`: observed, with ample memory (the ceiling 16 times larger),
//!   for the throughput cost of governance.
//!
//! Every 200 ms the agent's status is sampled: each engine's attributed
//! resident bytes and budget in force, and the database's cgroup charge.
//! Writes `summary.json`, `report.md` and `timeline.svg` (plotters) under
//! `target/validate/<kernel>/`.

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::cmd::{self, step};

const ENGINES: [&str; 3] = ["vector", "timeseries", "query"];

pub struct Options {
    /// Arguments passed to nodedb-workload (sizes).
    pub workload_args: Vec<String>,
    pub timeout: Duration,
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Governed,
    Ungoverned,
    Baseline,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Governed => "governed",
            Mode::Ungoverned => "ungoverned",
            Mode::Baseline => "baseline",
        }
    }
}

/// The bundled configuration, made private to one run.
fn config(mode: Mode, run_dir: &Path) -> anyhow::Result<String> {
    let bundled = fs::read_to_string(crate::root().join("deploy/nodedb-governor.toml"))?;
    let mut out = String::new();
    for line in bundled.lines() {
        let key = line.split('=').next().unwrap_or_default().trim();
        let replaced = match key {
            "database" => Some("database = \"nodedb-validate\"".to_owned()),
            "run_dir" => Some(format!("run_dir = \"{}\"", run_dir.display())),
            "metrics_addr" => Some(String::new()),
            "ceiling" if mode == Mode::Baseline => Some("ceiling = \"16GiB\"".to_owned()),
            _ => None,
        };
        out.push_str(replaced.as_deref().unwrap_or(line));
        out.push('\n');
        if key == "database" && mode != Mode::Governed {
            out.push_str("enforce = false\n");
        }
    }
    Ok(out)
}

fn status(agent: &Path, run_dir: &Path) -> Option<Value> {
    let out = Command::new(agent)
        .args(["status", "--json", "--socket"])
        .arg(run_dir.join("agent.sock"))
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())?
}

/// One run: the agent, the workload, the timeline.
fn run_once(mode: Mode, bin: &Path, out_dir: &Path, opts: &Options) -> anyhow::Result<Value> {
    step(&format!("{} run", mode.name()));
    let run_dir = out_dir.join(format!("run-{}", mode.name()));
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir)?;
    let config_file = run_dir.join("governor.toml");
    fs::write(&config_file, config(mode, &run_dir)?)?;
    let agent_bin = bin.join("nodedb-governor");
    let _agent = Reaped(
        Command::new(&agent_bin)
            .args(["run", "--config"])
            .arg(&config_file)
            .stderr(fs::File::create(run_dir.join("agent.log"))?)
            .spawn()
            .context("starting the agent")?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run_dir.join("control.sock").exists() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not start: see {}",
                run_dir.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = status(&agent_bin, &run_dir).context("the agent's status")?;
    let ceiling = first["ceiling"]["limit_bytes"].as_u64().unwrap_or(0);
    let scratch = run_dir.join("scratch");
    let mut workload = Command::new(bin.join("nodedb-workload"))
        .arg("--socket")
        .arg(run_dir.join("control.sock"))
        .args(["--database", "nodedb-validate", "--dir"])
        .arg(&scratch)
        .args(&opts.workload_args)
        .stdout(Stdio::piped())
        .stderr(fs::File::create(run_dir.join("workload.log"))?)
        .spawn()
        .context("starting the workload")?;
    let started = Instant::now();
    let mut timeline = Vec::new();
    let exit = loop {
        if let Some(st) = workload.try_wait()? {
            break st;
        }
        if started.elapsed() > opts.timeout {
            let _ = workload.kill();
            bail!("the workload ran past {:?}", opts.timeout);
        }
        if let Some(s) = status(&agent_bin, &run_dir) {
            let client = s["clients"]
                .as_array()
                .and_then(|c| c.first())
                .cloned()
                .unwrap_or_default();
            let mut point = json!({
                "t": started.elapsed().as_secs_f64(),
                "cgroup_bytes": s["ceiling"]["current_bytes"],
                "rss_bytes": s["processes"].as_array().map_or(0, |p| p.iter().map(|p| p["vm_rss_bytes"].as_u64().unwrap_or(0)).sum::<u64>()),
            });
            for e in ENGINES {
                point[e] = json!({
                    "resident_bytes": s["engines"][e]["resident_bytes"],
                    "budget_bytes": client["engines"][e]["budget_bytes"],
                });
            }
            timeline.push(point);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut stdout = String::new();
    use std::io::Read;
    if let Some(mut o) = workload.stdout.take() {
        let _ = o.read_to_string(&mut stdout);
    }
    let result: Value = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    let last = status(&agent_bin, &run_dir).unwrap_or_default();
    let _ = fs::remove_dir_all(&scratch);
    use std::os::unix::process::ExitStatusExt;
    let peak = |f: &dyn Fn(&Value) -> u64| timeline.iter().map(f).max().unwrap_or(0);
    let mut engines = json!({});
    let configured = budgets(&first);
    for e in ENGINES {
        let resident = peak(&|p: &Value| p[e]["resident_bytes"].as_u64().unwrap_or(0));
        let budget = configured.get(e).copied().unwrap_or(0);
        engines[e] = json!({
            "peak_resident_bytes": resident,
            "budget_bytes": budget,
            "peak_over_budget": resident as f64 / budget.max(1) as f64,
        });
    }
    let summary = json!({
        "mode": mode.name(),
        "ceiling_bytes": ceiling,
        "peak_cgroup_bytes": peak(&|p: &Value| p["cgroup_bytes"].as_u64().unwrap_or(0)),
        "peak_rss_bytes": peak(&|p: &Value| p["rss_bytes"].as_u64().unwrap_or(0)),
        "oom_kills": last["ceiling"]["events"]["oom_kill"],
        "exit": exit.code().map_or_else(|| format!("signal {}", exit.signal().unwrap_or(0)), |c| format!("code {c}")),
        "completed": exit.success(),
        "engines": engines,
        "workload": result,
        "timeline": timeline,
    });
    eprintln!(
        "    {}: exit {}, peak cgroup {} MiB of {} MiB",
        mode.name(),
        summary["exit"],
        summary["peak_cgroup_bytes"].as_u64().unwrap_or(0) >> 20,
        ceiling >> 20
    );
    Ok(summary)
}

/// The configured budget per engine, from the agent's first status (its
/// configuration, as the library got it).
fn budgets(status: &Value) -> std::collections::BTreeMap<String, u64> {
    let limit = status["ceiling"]["limit_bytes"].as_u64().unwrap_or(0);
    // The bundled percentages.
    let bundled =
        fs::read_to_string(crate::root().join("deploy/nodedb-governor.toml")).unwrap_or_default();
    let mut out = std::collections::BTreeMap::new();
    let mut name = None;
    for line in bundled.lines() {
        let (k, v) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), v.trim().trim_matches('"')),
            None => continue,
        };
        match k {
            "name" => name = Some(v.to_owned()),
            "budget" => {
                if let (Some(n), Some(p)) = (name.take(), v.strip_suffix('%')) {
                    let pct: f64 = p.parse().unwrap_or(0.0);
                    out.insert(n, (limit as f64 * pct / 100.0) as u64);
                }
            }
            _ => {}
        }
    }
    out
}

pub fn validate(opts: &Options) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the validation runs the agent: run it as root");
    }
    let root = crate::root();
    step("building the agent and the workload");
    cmd::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "-q",
        "-p",
        "nodedb-governor",
        "--bin",
        "nodedb-governor",
        "-p",
        "nodedb-governor-workload",
        "--bin",
        "nodedb-workload",
    ]))?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let out_dir = root.join("target/validate").join(&kernel);
    fs::create_dir_all(&out_dir)?;
    let bin = root.join("target/debug");
    let mut runs = Vec::new();
    for mode in [Mode::Governed, Mode::Ungoverned, Mode::Baseline] {
        runs.push(run_once(mode, &bin, &out_dir, opts)?);
    }
    let report = report(&kernel, &runs);
    fs::write(out_dir.join("report.md"), &report)?;
    fs::write(
        out_dir.join("summary.json"),
        serde_json::to_vec_pretty(&json!({"kernel": kernel, "runs": runs}))?,
    )?;
    crate::plot::timeline(&out_dir.join("timeline.svg"), &kernel, &runs)?;
    eprintln!("{report}");
    eprintln!(
        "    written: {}/{{summary.json,report.md,timeline.svg}}",
        out_dir.display()
    );
    let governed = &runs[0];
    let within = ENGINES.iter().all(|e| {
        governed["engines"][e]["peak_over_budget"]
            .as_f64()
            .unwrap_or(f64::MAX)
            <= 1.05
    });
    let under = governed["peak_cgroup_bytes"].as_u64() < governed["ceiling_bytes"].as_u64();
    let ok = governed["completed"] == true
        && governed["workload"]["correct"] == true
        && governed["oom_kills"].as_u64().unwrap_or(0) == 0
        && within
        && under;
    if !ok {
        bail!("the governed run missed the target (see the report)");
    }
    Ok(())
}

fn mib(v: &Value) -> String {
    format!("{}", v.as_u64().unwrap_or(0) >> 20)
}

fn report(kernel: &str, runs: &[Value]) -> String {
    let mut s = format!(
        "Kernel {kernel}. Peak attributed resident per engine against its budget (MiB), the database cgroup's peak charge against the ceiling, and the outcome.\n\n\
         | run | vector | timeseries | query | cgroup peak / ceiling | OOM kills | outcome |\n|---|---:|---:|---:|---:|---:|---|\n"
    );
    for r in runs {
        let e = |n: &str| {
            format!(
                "{} / {} ({:.0}%)",
                mib(&r["engines"][n]["peak_resident_bytes"]),
                mib(&r["engines"][n]["budget_bytes"]),
                r["engines"][n]["peak_over_budget"].as_f64().unwrap_or(0.0) * 100.0
            )
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} / {} | {} | {} |\n",
            r["mode"].as_str().unwrap_or_default(),
            e("vector"),
            e("timeseries"),
            e("query"),
            mib(&r["peak_cgroup_bytes"]),
            mib(&r["ceiling_bytes"]),
            r["oom_kills"].as_u64().unwrap_or(0),
            if r["completed"] == true {
                if r["workload"]["correct"] == true {
                    "completed, correct"
                } else {
                    "completed, WRONG"
                }
            } else {
                r["exit"].as_str().unwrap_or("failed")
            }
        ));
    }
    // Throughput: governed against the baseline with ample memory.
    let (g, b) = (&runs[0]["workload"], &runs[2]["workload"]);
    if g.is_object() && b.is_object() {
        s.push_str("\nThroughput, governed against the baseline with ample memory (same data, same run of the harness):\n\n| engine | governed | baseline | ratio |\n|---|---:|---:|---:|\n");
        for (name, path) in [
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
        ] {
            let (gv, bv) = (
                g[path[0]][path[1]].as_f64().unwrap_or(0.0),
                b[path[0]][path[1]].as_f64().unwrap_or(0.0),
            );
            s.push_str(&format!(
                "| {name} | {gv:.0} | {bv:.0} | {:.2} |\n",
                gv / bv.max(1e-9)
            ));
        }
    }
    s
}
