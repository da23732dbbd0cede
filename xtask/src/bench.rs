//! `cargo xtask bench`: the reservation path against DataFusion's memory
//! pools (criterion, one run), then the cost of kernel attribution against an
//! untraced baseline and against a bpftrace script keeping the same counts,
//! in the same run (see testkit/src/bin/tracing-cost.rs), and
//! how each counting source compares with VmRSS, then the agent's own CPU at
//! 10, 100 and 1,000 engine threads (testkit/src/bin/agent-scale.rs). Writes
//! `target/bench/tracing-cost.{md,json}` and `target/bench/agent-scale.{md,json}`;
//! criterion keeps its own reports in `target/criterion`.

use std::process::Command;

use anyhow::{Context, bail};

use crate::{
    cargo::{self, Binaries, Profile},
    cmd::{self, step},
};

pub fn bench(rounds: u32) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the tracing benchmark attaches eBPF programs: run `cargo xtask bench` as root");
    }
    step("reserve + release pairs: governor against DataFusion's pools (criterion)");
    cmd::run(cargo::command().args([
        "bench",
        "-p",
        "nodedb-governor",
        "--features",
        "datafusion",
        "--bench",
        "reservation",
    ]))?;
    step("building the tracing benchmark (release)");
    let [tracing_cost] = cargo::build(
        Profile::Release,
        &[Binaries {
            features: &["bench"],
            ..Binaries::new("nodedb-governor-testkit", &["tracing-cost"])
        }],
    )?
    .try_into()
    .expect("one binary asked for, one path");
    let out_dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&out_dir)?;
    let json = out_dir.join("tracing-cost.json");
    step(&format!(
        "tracing cost: {rounds} rounds of every configuration, interleaved"
    ));
    let out = Command::new(&tracing_cost)
        .args(["--rounds", &rounds.to_string(), "--json"])
        .arg(&json)
        // The page-cache loop's file: on the build's disk.
        .arg("--dir")
        .arg(&out_dir)
        .output()
        .context("running tracing-cost")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("tracing-cost failed ({})", out.status);
    }
    let report = String::from_utf8_lossy(&out.stdout);
    print!("{report}");
    let md = out_dir.join("tracing-cost.md");
    std::fs::write(&md, report.as_bytes())?;
    eprintln!("==> wrote {} and {}", md.display(), json.display());
    agent_scale(&out_dir)
}

/// The agent's own CPU and tick time at 10, 100 and 1,000 engine threads
/// (50 processes at most, every thread mapping and unmapping memory).
fn agent_scale(out_dir: &std::path::Path) -> anyhow::Result<()> {
    step("building the agent-cost benchmark (release)");
    let [scale] = cargo::build(
        Profile::Release,
        &[Binaries::new("nodedb-governor-testkit", &["agent-scale"])],
    )?
    .try_into()
    .expect("one binary asked for, one path");
    step("agent cost: 10, 100 and 1,000 engine threads, 10 s each, default 20 ms tick");
    let out = Command::new(&scale)
        .args(["--threads", "10,100,1000", "--seconds", "10"])
        .output()
        .context("running agent-scale")?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("agent-scale failed ({})", out.status);
    }
    let r: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("agent-scale's report")?;
    let mut md = String::from(
        "| engine threads | processes | agent CPU (% of one core) | mean tick (us) |\n|---:|---:|---:|---:|\n",
    );
    for row in r["rows"].as_array().into_iter().flatten() {
        if let Some(e) = row["error"].as_str() {
            md.push_str(&format!("| {} | | not measured: {e} | |\n", row["threads"]));
            continue;
        }
        md.push_str(&format!(
            "| {} | {} | {:.2} | {:.0} |\n",
            row["threads"],
            row["processes"],
            row["agent_cpu_percent"].as_f64().unwrap_or(f64::NAN),
            row["mean_tick_us"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    print!("{md}");
    std::fs::write(out_dir.join("agent-scale.md"), &md)?;
    std::fs::write(out_dir.join("agent-scale.json"), &out.stdout)?;
    eprintln!("==> wrote {}", out_dir.join("agent-scale.md").display());
    Ok(())
}
