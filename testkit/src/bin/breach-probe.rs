//! A process embedding the library, for the enforcement test: it connects
//! to the agent over the control channel, registers a Vector thread, and in
//! each round that thread touches memory *without reserving it* (only the
//! kernel knows) until it is over the Vector budget the agent set. The
//! agent sees it in the attribution and asks for a spill; the Vector spill
//! handler unmaps what was touched. Prints one JSON line: per round, the
//! breach-to-spill latency and what was freed.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor::{EngineId, PressureLevel, SpillHandler as _};
use nodedb_governor_demo::memory::{Block, Kind, MIB};
use nodedb_governor_testkit::{
    probe::{AgentArgs, UntrackedSpill, on_engine_thread},
    wait::poll,
};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// Breaches to measure.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Touched per step, MiB.
    #[arg(long, default_value_t = 2)]
    step_mib: usize,
    /// The agent's Critical threshold (fraction of the budget): the breach
    /// the agent must answer with a spill.
    #[arg(long, default_value_t = 0.90)]
    critical: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spill = UntrackedSpill::new(&[EngineId::Vector])?;
    let untracked = spill.of(EngineId::Vector);
    let _registered = spill.register();
    let (governor, link) = spill.connect(&args.agent)?;
    let budget = governor.usage(EngineId::Vector)?.cap_bytes;

    // Below Critical: the agent saw the last spill (the engine back under
    // its budget).
    let calm = || {
        poll(Duration::from_secs(10), Duration::from_millis(2), || {
            link.agent_level(EngineId::Vector) < Some(PressureLevel::Critical)
        })
    };
    let step = args.step_mib * MIB;
    let worker = on_engine_thread(&link, EngineId::Vector, || {
        let mut out = Vec::new();
        for round in 0..args.rounds {
            // Calm first: the last round's spill is seen by the agent.
            if !calm() {
                bail!("round {round}: the engine never calmed down");
            }
            let spills_before = untracked.spills.lock().unwrap().len();
            let held = untracked.reclaimable_bytes() as usize;
            // Touch until the spill comes (or just over the budget):
            // the breach is crossing the Critical threshold.
            let critical = (budget as f64 * args.critical) as usize;
            let mut touched = held;
            let mut breach = None;
            let mut peak = touched;
            let wait = Instant::now() + Duration::from_secs(10);
            let spill = loop {
                if let Some(s) = untracked.spills.lock().unwrap().get(spills_before) {
                    break *s;
                }
                if touched <= budget as usize {
                    let b = Block::new(Kind::Anon, step).context("touching memory")?;
                    touched += b.len();
                    peak = peak.max(touched);
                    untracked.blocks.lock().unwrap().push(b);
                } else {
                    std::thread::sleep(Duration::from_micros(100));
                }
                if breach.is_none() && touched > critical {
                    breach = Some(Instant::now());
                }
                if Instant::now() > wait {
                    bail!("round {round}: no spill within 10 s of the breach");
                }
            };
            let Some(breach) = breach else {
                bail!("round {round}: spilled before the Critical threshold was crossed");
            };
            out.push(serde_json::json!({
                "round": round,
                "peak_touched_bytes": peak,
                "over_budget": peak > budget as usize,
                "latency_us": spill.0.saturating_duration_since(breach).as_micros() as u64,
                "target_bytes": spill.1,
                "freed_bytes": spill.2,
            }));
        }
        Ok(out)
    })?;
    // After the last spill the agent must see the engine back under its
    // budget (below Critical).
    if !calm() {
        bail!("the engine never came back under its budget");
    }
    let final_level = link.agent_level(EngineId::Vector);
    let mut lat: Vec<u64> = worker
        .iter()
        .filter_map(|r| r["latency_us"].as_u64())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let stats = link.stats();
    println!(
        "{}",
        serde_json::json!({
            "budget_bytes": budget,
            "rounds": worker,
            "latency_us": { "p50": pct(0.50), "p99": pct(0.99), "max": lat[lat.len() - 1] },
            "spill_requests": stats.spills,
            "spilled_bytes": stats.spilled_bytes,
            "connects": stats.connects,
            "prompt_wakeups": stats.prompt_wakeups,
            "final_level": format!("{final_level:?}"),
        })
    );
    Ok(())
}
