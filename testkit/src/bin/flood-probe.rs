//! Floods a running agent's control socket: `--idle` connections held
//! open (half silent, half welcomed that never read) while `--churn` more
//! come and go from `--threads` threads, then prints one JSON line (how
//! many the kernel refused, how long the churn took). Run by hand against
//! `cargo xtask run`'s agent, with `nodedb-governor status` beside it.

use std::{path::PathBuf, time::Instant};

use clap::Parser;
use nodedb_governor_testkit::{flood, wire::hello};

#[derive(Parser)]
struct Args {
    /// The agent's control socket.
    #[arg(long)]
    control: PathBuf,
    /// The database the hellos name (the agent's `database`).
    #[arg(long)]
    database: String,
    /// The engine the hellos declare (one the agent knows).
    #[arg(long, default_value = "query")]
    engine: String,
    #[arg(long, default_value_t = 1_000)]
    idle: usize,
    #[arg(long, default_value_t = 10_000)]
    churn: usize,
    #[arg(long, default_value_t = 4)]
    threads: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.control.exists(),
        "no control socket at {}",
        args.control.display()
    );
    let hello = hello(&args.database, &[args.engine.as_str()]);
    let idle = flood::hold_idle(&args.control, &hello, args.idle);
    let started = Instant::now();
    let refused = flood::churn(&args.control, &hello, args.churn, args.threads);
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "idle": idle.len(),
            "churned": args.churn,
            "refused": refused,
            "churn_seconds": seconds,
        })
    );
    drop(idle);
    Ok(())
}
