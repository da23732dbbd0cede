//! A governed process for the agent's pressure inputs: Vector (essential)
//! holds `--vector-mib` MiB it never reserved (only the kernel knows), and
//! Query (not essential) holds a reservation of `--query-mib` MiB. Every
//! 50 ms it prints a JSON line: whether a further 4 MiB reservation (more
//! than a thread's credit of two 1 MiB batches) is
//! granted to each engine, Query's cap in force, and the purge and spill
//! requests the agent sent. Runs until killed.

use std::time::Duration;

use clap::Parser;
use nodedb_governor::EngineId;
use nodedb_governor_demo::{memory::MIB, untracked::Untracked};
use nodedb_governor_testkit::probe::{AgentArgs, on_engine_thread};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    #[arg(long, default_value_t = 52)]
    vector_mib: usize,
    #[arg(long, default_value_t = 8)]
    query_mib: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (governor, link) = args.agent.connect(
        &[("vector", EngineId::Vector), ("query", EngineId::Query)],
        None,
    )?;
    let held = Untracked::default();
    on_engine_thread(&link, EngineId::Vector, || {
        Ok(held.touch(args.vector_mib * MIB, 2 * MIB)?)
    })?;
    let _query = governor.try_reserve(EngineId::Query, args.query_mib * MIB as u64)?;
    let grant = |e: EngineId| governor.try_reserve(e, 4 * MIB as u64).is_ok();
    loop {
        let st = link.stats();
        let query = governor.usage(EngineId::Query)?;
        println!(
            "{}",
            serde_json::json!({
                "connected": st.connected,
                "vector_granted": grant(EngineId::Vector),
                "query_granted": grant(EngineId::Query),
                "query_cap_bytes": query.cap_bytes,
                "query_used_bytes": query.used_bytes,
                "purges": st.purges,
                "spills": st.spills,
                "held_bytes": held.held_bytes(),
            })
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
