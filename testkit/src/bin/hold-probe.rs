//! A governed process that holds memory: it connects over the control
//! channel, registers a thread of `--engine` (default vector) that touches
//! `--mib` MiB and keeps it, then prints its link state as a JSON line every 100 ms (until
//! killed), so a test can watch it ride out an agent restart.

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use nodedb_governor::EngineId;
use nodedb_governor_demo::{governed, memory::MIB, untracked::Untracked};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    socket: std::path::PathBuf,
    #[arg(long)]
    database: String,
    #[arg(long, default_value_t = 32)]
    mib: usize,
    /// The one engine this process runs.
    #[arg(long, default_value = "vector")]
    engine: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let Some(id) = EngineId::BUILTIN
        .into_iter()
        .find(|e| format!("{e:?}").to_lowercase() == args.engine)
    else {
        bail!("--engine {:?} is not a built-in engine", args.engine);
    };
    let name = args.engine.as_str();
    let (_governor, link) = governed::connect(&args.socket, &args.database, &[(name, id)], None)?;
    let held = Untracked::default();
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<()> {
            let tid = link.register_current_thread(id)?;
            if !link.wait_placed(tid, Duration::from_secs(10)) {
                bail!("thread not placed");
            }
            held.touch(args.mib * MIB, 2 * MIB)?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("worker panicked"))?
    })?;
    loop {
        let st = link.stats();
        println!(
            "{}",
            serde_json::json!({
                "connected": st.connected,
                "connects": st.connects,
                "held_bytes": held.held_bytes(),
            })
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
