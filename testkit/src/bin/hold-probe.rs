//! A governed process that holds memory: it connects over the control
//! channel, registers a thread of `--engine` (default vector) that touches
//! `--mib` MiB and keeps it, then prints its link state as a JSON line every 100 ms (until
//! killed), so a test can watch it ride out an agent restart.

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use nodedb_governor::EngineId;
use nodedb_governor_demo::{memory::MIB, untracked::Untracked};
use nodedb_governor_testkit::probe::{AgentArgs, on_engine_thread};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
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
    let (_governor, link) = args.agent.connect(&[(args.engine.as_str(), id)], None)?;
    let held = Untracked::default();
    on_engine_thread(&link, id, || Ok(held.touch(args.mib * MIB, 2 * MIB)?))?;
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
