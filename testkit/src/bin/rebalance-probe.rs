//! A process embedding the library, for the agent's rebalancing: Vector
//! grows past its budget while Query is idle (the agent lends Vector
//! Query's unused budget, so nothing spills), then Query gets busy (the
//! agent takes the loan back and Vector, now over its budget, is spilled).
//! Memory is touched without reserving it, so only the kernel's figures
//! drive the agent; the budget in force is read from the agent's status
//! (the library's cap is that budget less the memory it never reserved).
//! Prints one JSON line with what was observed.

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use nodedb_governor::EngineId;
use nodedb_governor_demo::{governed, memory::MIB};
use nodedb_governor_testkit::{
    probe::{AgentArgs, UntrackedSpill, on_engine_thread},
    wait::poll,
};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// The agent's admin socket (for the budget in force).
    #[arg(long)]
    admin: std::path::PathBuf,
    /// Vector's growth, MiB (past its budget).
    #[arg(long, default_value_t = 96)]
    vector_mib: usize,
    /// Query's growth once it gets busy, MiB.
    #[arg(long, default_value_t = 40)]
    query_mib: usize,
}

/// Waits for `done` (30 s at most: 2 to 4 s is usual; a CI machine
/// running other tests' agents beside this one has taken more than 10).
fn wait_until(what: &str, done: impl FnMut() -> bool) -> anyhow::Result<()> {
    if !poll(Duration::from_secs(30), Duration::from_millis(2), done) {
        bail!("timed out waiting for {what}");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let spill = UntrackedSpill::new(&[EngineId::Vector, EngineId::Query])?;
    let (vector, query) = (spill.of(EngineId::Vector), spill.of(EngineId::Query));
    let _registered = spill.register();
    let (governor, link) = spill.connect(&args.agent)?;
    let cap = |e| governor.usage(e).map_or(0, |u| u.cap_bytes);
    // An engine's budget in force, as the agent reports it.
    let budget_of = |engine: &str| -> u64 {
        governed::admin_status(&args.admin)
            .and_then(|v| {
                v["clients"]
                    .as_array()?
                    .iter()
                    .find(|c| c["pid"] == std::process::id())?["engines"][engine]["budget_bytes"]
                    .as_u64()
            })
            .unwrap_or(0)
    };
    let budget = || budget_of("vector");
    let configured = cap(EngineId::Vector);

    // Vector grows past its budget while Query is idle.
    on_engine_thread(&link, EngineId::Vector, || {
        Ok(vector.touch(args.vector_mib * MIB, 2 * MIB)?)
    })?;
    wait_until("a loan to vector", || budget() > configured)?;
    let lent_budget = budget();
    // The library may reserve only what the borrowed budget leaves
    // beside what the kernel sees Vector hold unreserved.
    wait_until("the library's cap to leave room for the unreserved", || {
        cap(EngineId::Vector) <= lent_budget.saturating_sub(args.vector_mib as u64 * MIB as u64)
    })?;
    let library_cap = cap(EngineId::Vector);
    // Give the agent a few ticks: with the loan, Vector is not spilled.
    std::thread::sleep(Duration::from_millis(300));
    let spilled_during_loan = vector.spilled_bytes();
    let held_during_loan = vector.held_bytes();

    // Query gets busy: it takes back what it needs as it grows (what it
    // holds and its cushion, a quarter of its budget, each time it reaches
    // Critical of its budget in force), Vector is spilled.
    on_engine_thread(&link, EngineId::Query, || {
        Ok(query.touch(args.query_mib * MIB, 2 * MIB)?)
    })?;
    let query_mib = args.query_mib as f64 * MIB as f64;
    wait_until("query to take back what it needs", || {
        budget_of("query") as f64 * 0.90 > query_mib
    })
    .map_err(|e| {
        // What the agent saw: the engines' levels, budgets and loans.
        let clients = governed::admin_status(&args.admin).map(|s| s["clients"].clone());
        e.context(format!("the agent's clients: {clients:?}"))
    })?;
    wait_until("vector to be spilled", || {
        (vector.held_bytes() as f64) < budget() as f64 * 0.90
    })?;
    let out = serde_json::json!({
        "configured_cap_bytes": configured,
        "budget_during_loan_bytes": lent_budget,
        "library_cap_during_loan_bytes": library_cap,
        "vector_held_during_loan_bytes": held_during_loan,
        "vector_spilled_during_loan_bytes": spilled_during_loan,
        "vector_budget_after_bytes": budget(),
        "query_budget_after_bytes": budget_of("query"),
        "vector_held_after_bytes": vector.held_bytes(),
        "vector_spilled_after_bytes": vector.spilled_bytes(),
        "query_held_bytes": query.held_bytes(),
        "query_spilled_bytes": query.spilled_bytes(),
    });
    println!("{out}");
    Ok(())
}
