//! The soak (`cargo xtask soak`): the library, a real agent and the kernel
//! driven through random demand from a seed, the invariants checked after
//! every step. Prints the report as JSON; exits 1 on a violation, after
//! saying the seed, the step and the state. Runs as root (it starts the
//! agent and mounts the spill target's tmpfs).

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use clap::Parser;
use nodedb_governor_testkit::soak::{Options, run};

#[derive(Parser)]
#[command(name = "nodedb-soak")]
struct Args {
    /// The seed (default: a fresh one, printed).
    #[arg(long)]
    seed: Option<u64>,
    /// How long to run, seconds.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// A directory on a disk for the engines' files and the spill
    /// target's mount point.
    #[arg(long, default_value = "/var/tmp/nodedb-soak")]
    scratch: PathBuf,
    /// Compare the kernel's attribution with VmRSS every this many steps.
    #[arg(long, default_value_t = 25)]
    attribution_every: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak starts the agent and mounts a tmpfs: run it as root");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!(
        "soak: seed {seed} for {} s (rerun: --seed {seed})",
        args.seconds
    );
    std::fs::create_dir_all(&args.scratch)?;
    let report = run(&Options {
        seed,
        duration: Duration::from_secs(args.seconds),
        scratch: args.scratch,
        attribution_every: args.attribution_every,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(v) = &report.violation {
        eprintln!("soak: VIOLATION (rerun with --seed {seed}):\n{v}");
        std::process::exit(1);
    }
    Ok(())
}
