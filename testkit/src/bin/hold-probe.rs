//! A governed process that holds memory: it connects over the control
//! channel, registers a thread of `--engine` (default vector) that touches
//! `--mib` MiB and keeps it, then prints its link state as a JSON line every 100 ms (until
//! killed), so a test can watch it ride out an agent restart. With
//! `--stay` the engine thread stays alive (parked) and the lines carry its
//! tid, so a test can read what the agent did to it.

use std::io::Write;
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
    /// The engine thread stays alive after touching its memory.
    #[arg(long)]
    stay: bool,
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
    std::thread::scope(|s| -> anyhow::Result<()> {
        let engine_tid = if args.stay {
            let (tx, rx) = std::sync::mpsc::channel();
            let (link, held) = (&link, &held);
            s.spawn(move || {
                let placed = (|| -> anyhow::Result<u32> {
                    let tid = link.register_current_thread(id)?;
                    if !link.wait_placed(tid, Duration::from_secs(10)) {
                        bail!("the agent did not place {id:?} thread {tid}");
                    }
                    held.touch(args.mib * MIB, 2 * MIB)?;
                    Ok(tid)
                })();
                let placed_ok = placed.is_ok();
                let _ = tx.send(placed);
                // Parked for the rest of the run (the process is killed).
                if placed_ok {
                    loop {
                        std::thread::park();
                    }
                }
            });
            Some(rx.recv()??)
        } else {
            on_engine_thread(&link, id, || Ok(held.touch(args.mib * MIB, 2 * MIB)?))?;
            None
        };
        loop {
            let st = link.stats();
            // The test reading these lines may have stopped reading (and is
            // about to kill this process): a closed pipe ends the probe (its
            // parked engine thread with it).
            let line = writeln!(
                std::io::stdout(),
                "{}",
                serde_json::json!({
                    "connected": st.connected,
                    "connects": st.connects,
                    "held_bytes": held.held_bytes(),
                    "engine_tid": engine_tid,
                })
            );
            if line.is_err() {
                std::process::exit(0);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}
