//! A process embedding the library, for the enforcement test: it connects
//! to the agent over the control channel, registers an engine thread
//! (Vector by default), and in each round that thread touches memory
//! *without reserving it* (only the kernel knows) until it is over the
//! budget the agent set, or over a NUMA node's share of it (`--node`). The
//! agent sees it in the attribution and asks for a spill; the engine's
//! spill handler unmaps what was touched. With `--quiet`, another engine
//! holds memory under its shares all along and must hear no spill. Prints
//! one JSON line: per round, the breach-to-spill latency and what was
//! freed.

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
    /// The engine driven over its budget (default: vector, with the demo's
    /// three engines declared; otherwise only it and `--quiet`).
    #[arg(long, default_value = "vector")]
    engine: String,
    /// Judge the breach on this NUMA node's share of the budget (split by
    /// the nodes' memory, as the agent splits a placed engine's): the
    /// engine's threads must run there (its `cpus` in the agent's config).
    #[arg(long)]
    node: Option<u32>,
    /// Another engine, holding `--quiet-mib` of untracked memory below its
    /// shares all along: it must get no spill request.
    #[arg(long)]
    quiet: Option<String>,
    #[arg(long, default_value_t = 8)]
    quiet_mib: usize,
    /// The agent's admin socket: each round, the engine's memory the
    /// kernel counts besides the touched blocks (its thread's stack, code
    /// and heap) is read from the agent's status at the calm point, and
    /// the breach is judged on the blocks and it together, as the agent
    /// judges (without it, on the blocks alone).
    #[arg(long)]
    admin: Option<std::path::PathBuf>,
}

fn engine_id(name: &str) -> anyhow::Result<EngineId> {
    EngineId::builtin(name).with_context(|| format!("no built-in engine {name:?}"))
}

/// `node`'s part of the machine's memory (the agent's default split).
fn node_fraction(node: u32) -> anyhow::Result<f64> {
    let topology = nodedb_governor::Topology::detect().context("the kernel's nodes")?;
    let total: u64 = topology.nodes().iter().map(|n| n.memory_bytes).sum();
    let mine = topology
        .nodes()
        .iter()
        .find(|n| n.id == node)
        .with_context(|| format!("no node {node}"))?
        .memory_bytes;
    Ok(mine as f64 / total.max(1) as f64)
}

/// What the agent's status counts for `engine` of this process (on
/// `node`, or in all) beyond the `held` bytes of touched blocks.
fn besides_blocks(admin: &std::path::Path, engine: &str, node: Option<u32>, held: usize) -> usize {
    let Some(status) = nodedb_governor_demo::governed::admin_status(admin) else {
        return 0;
    };
    let me = u64::from(std::process::id());
    let attributed = status["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"].as_u64() == Some(me)))
        .map(|p| p["engines"][engine].clone())
        .unwrap_or_default();
    let counted = match node {
        Some(n) => attributed["node_resident_bytes"][n as usize].as_u64(),
        None => attributed["resident_bytes"].as_u64(),
    };
    (counted.unwrap_or(0) as usize).saturating_sub(held)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let engine = engine_id(&args.engine)?;
    let quiet = args.quiet.as_deref().map(engine_id).transpose()?;
    let spill = UntrackedSpill::new(&[engine].into_iter().chain(quiet).collect::<Vec<_>>())?;
    let untracked = spill.of(engine);
    let _registered = spill.register();
    let (governor, link) = if engine == EngineId::Vector && quiet.is_none() {
        spill.connect(&args.agent)?
    } else {
        spill.connect_own(&args.agent)?
    };
    // What the breach is judged on: the budget, or a node's share of it.
    let share = match args.node {
        Some(node) => node_fraction(node)?,
        None => 1.0,
    };
    let budget = (governor.usage(engine)?.cap_bytes as f64 * share) as u64;
    if let Some(q) = quiet {
        let held = spill.of(q);
        let bytes = args.quiet_mib * MIB;
        on_engine_thread(&link, q, || {
            held.blocks
                .lock()
                .unwrap()
                .push(Block::new(Kind::Anon, bytes).context("the quiet engine's memory")?);
            Ok(())
        })?;
    }

    // Below Critical: the agent saw the last spill (the engine back under
    // its budget).
    let calm = || {
        poll(Duration::from_secs(10), Duration::from_millis(2), || {
            link.agent_level(engine) < Some(PressureLevel::Critical)
        })
    };
    let step = args.step_mib * MIB;
    let worker = on_engine_thread(&link, engine, || {
        let mut out = Vec::new();
        // Rounds whose spill came before the breach (asked for at Warning
        // while the database stalled on memory, or for what the kernel
        // counts besides the touched blocks): not timed, run again, at
        // most as many as the rounds.
        let mut early = Vec::new();
        let mut round = 0;
        let mut baseline = 0usize;
        while out.len() < args.rounds {
            round += 1;
            // Calm first: the last round's spill is seen by the agent.
            if !calm() {
                bail!("round {round}: the engine never calmed down");
            }
            let spills_before = untracked.spills.lock().unwrap().len();
            let held = untracked.reclaimable_bytes() as usize;
            let besides = args
                .admin
                .as_deref()
                .map_or(0, |a| besides_blocks(a, &args.engine, args.node, held));
            baseline = baseline.max(besides);
            // Touch until the spill comes (or just over the budget):
            // the breach is crossing the Critical threshold, of the
            // blocks and what the kernel counts besides them.
            let critical = ((budget as f64 * args.critical) as usize).saturating_sub(besides);
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
                let what = format!(
                    "round {round}: spilled before the Critical threshold was crossed \
                     (touched {touched} of {critical} bytes, {held} held at the start; \
                     the spill's target {} bytes, freed {})",
                    spill.1, spill.2
                );
                eprintln!("{what}");
                early.push(what);
                if early.len() > args.rounds {
                    bail!(
                        "{} rounds spilled before their breach: {early:?}",
                        early.len()
                    );
                }
                continue;
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
        Ok((out, early, baseline))
    })?;
    let (worker, early, baseline) = worker;
    // After the last spill the agent must see the engine back under its
    // budget (below Critical).
    if !calm() {
        bail!("the engine never came back under its budget");
    }
    let final_level = link.agent_level(engine);
    let quiet_spills = quiet.map(|q| spill.of(q).spills.lock().unwrap().len());
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
            "node": args.node,
            "quiet_spills": quiet_spills,
            "early_spills": early,
            "besides_blocks_bytes": baseline,
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
