//! `cargo xtask validate`: the mixed workload (vector search, bulk
//! timeseries ingest, SQL GROUP BY) on this host, under the bundled
//! configuration's ceiling and budgets, run by `nodedb-validate` (the
//! workload crate's harness, which the VM tests run too):
//!
//! - `governed`: the agent enforces;
//! - `ungoverned`: the agent only observes, with the same ceiling;
//! - `ample`: the agent only observes, with 16 times the ceiling (what
//!   each engine takes when nothing holds it back);
//! - `roomy`: the agent enforces, with 16 times the ceiling (nothing has
//!   to give: against `ample`, the cost of the machinery alone);
//! - `baseline`: no agent, no ceiling (the throughput reference);
//! - `static`: what a user would configure instead, same ceiling: each
//!   engine held to its configured budget by a pool of its own (no
//!   lending; the `GROUP BY` on DataFusion's `FairSpillPool`).
//!
//! Writes `summary.json`, `report.md` and `timeline.svg` (plotters) under
//! `target/validate/<kernel>/`; fails when the governed run misses the
//! target.
//!
//! `--scenario cache`: the cache scenario (`nodedb-cache`, governed and
//! ungoverned, on `deploy/scenarios/cache.toml`), reported under
//! `target/validate/cache/<kernel>/` (see cache_report.rs).

use std::{fs, process::Command};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{
    cache_report, cargo,
    cmd::{self, step},
    report,
};

/// Which workload (`nodedb-validate --scenario`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Mixed,
    Cache,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Mixed => "mixed",
            Scenario::Cache => "cache",
        }
    }

    /// Its configuration, under the workspace root.
    pub fn config(self) -> &'static str {
        match self {
            Scenario::Mixed => "deploy/nodedb-governor.toml",
            Scenario::Cache => "deploy/scenarios/cache.toml",
        }
    }
}

/// The mixed scenario's runs, all of them: what `cargo xtask validate`
/// runs unless told otherwise, and `cargo xtask test` on the host.
pub const MIXED_MODES: [&str; 6] = [
    "governed",
    "ungoverned",
    "ample",
    "roomy",
    "baseline",
    "static",
];

pub struct Options {
    pub scenario: Scenario,
    /// `nodedb-validate --modes`.
    pub modes: Vec<String>,
    /// Arguments passed to nodedb-workload (sizes).
    pub workload_args: Vec<String>,
    /// The runs with the workload's solo phase (None: every run).
    pub solo_in: Option<Vec<String>>,
    pub timeout_secs: u64,
    /// Harness runs of every mode, one after the other (the mixed
    /// scenario): with more than one, each round's files go under
    /// `round-<k>/` and `rounds.md` gives each comparison's ratio per
    /// round, its median and its spread (a single run varies by ±0.1 on
    /// this host).
    pub rounds: u32,
    /// The cache scenario's timing criteria reported beside its verdict
    /// instead of deciding it (`nodedb-validate --timing reported`):
    /// `cargo xtask test`, where a timed figure of one run would be a
    /// timed assertion.
    pub report_timing: bool,
}

pub fn validate(opts: &Options) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the validation runs the agent: run it as root");
    }
    let root = crate::root();
    step("building the agent, the workload and its harness");
    let [validate_bin] = cargo::build_as_tests(&["nodedb-validate"])?
        .try_into()
        .expect("one binary asked for, one path");
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let out_dir = match opts.scenario {
        Scenario::Mixed => root.join("target/validate").join(&kernel),
        Scenario::Cache => root.join("target/validate/cache").join(&kernel),
    };
    let scratch = root.join("target/validate/scratch");
    let rounds = if opts.scenario == Scenario::Mixed {
        opts.rounds.max(1)
    } else {
        1
    };
    let mut summaries = Vec::new();
    let mut all_met = true;
    for round in 1..=rounds {
        let dir = if rounds == 1 {
            out_dir.clone()
        } else {
            out_dir.join(format!("round-{round}"))
        };
        step(&format!(
            "validating on {kernel}: the {} scenario, {}{}",
            opts.scenario.name(),
            opts.modes.join(", "),
            if rounds == 1 {
                String::new()
            } else {
                format!(" (round {round} of {rounds})")
            }
        ));
        let (summary, met) = run_harness(opts, &validate_bin, &root, &dir, &scratch)?;
        all_met &= met;
        summaries.push(summary);
    }
    if rounds > 1 {
        let text = report::rounds(&summaries);
        fs::write(out_dir.join("rounds.md"), &text)?;
        println!("{text}");
        println!("    written: {}", out_dir.join("rounds.md").display());
    }
    if !all_met {
        bail!("the governed run missed the target (see the report)");
    }
    Ok(())
}

/// One run of `nodedb-validate` into `out_dir`, reported there: its
/// summary, and whether it completed with the governed run on target.
fn run_harness(
    opts: &Options,
    validate_bin: &std::path::Path,
    root: &std::path::Path,
    out_dir: &std::path::Path,
    scratch: &std::path::Path,
) -> anyhow::Result<(Value, bool)> {
    let _ = fs::remove_file(out_dir.join("summary.json"));
    let status = Command::new(validate_bin)
        .args(["--scenario", opts.scenario.name()])
        .arg("--config")
        .arg(root.join(opts.scenario.config()))
        .arg("--out")
        .arg(out_dir)
        .arg("--scratch")
        .arg(scratch)
        .args(["--modes", &opts.modes.join(",")])
        .args(["--timeout-secs", &opts.timeout_secs.to_string()])
        .args(
            (opts.scenario == Scenario::Cache && opts.report_timing)
                .then_some(["--timing", "reported"])
                .into_iter()
                .flatten(),
        )
        .args(
            opts.solo_in
                .as_ref()
                .map(|m| ["--solo-in".to_owned(), m.join(",")])
                .into_iter()
                .flatten(),
        )
        .arg("--")
        .args(&opts.workload_args)
        .stdout(std::process::Stdio::null())
        .status()
        .context("running nodedb-validate")?;
    let _ = fs::remove_dir_all(scratch);
    let summary: Value = serde_json::from_slice(
        &fs::read(out_dir.join("summary.json")).context("nodedb-validate wrote no summary")?,
    )?;
    let met = match opts.scenario {
        Scenario::Mixed => report::write(out_dir, &summary)?,
        Scenario::Cache => cache_report::write(out_dir, &summary)?,
    };
    Ok((summary, met && status.success()))
}
