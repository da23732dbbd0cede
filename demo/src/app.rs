//! A small stand-in for NodeDB with three engines, for `cargo xtask run`
//! (`nodedb-demo`) and the end-to-end tests (testkit's `demo-probe`, the
//! same program):
//! * vector (2 threads) builds an index that grows to a steady size, and
//!   rebuilds it now and then;
//! * timeseries (2 threads) ingests into allocator buffers and flushes them;
//! * query (2 threads) runs a GROUP BY-like burst every few seconds.
//!
//! With `--control-socket` it is governed the normal way: it embeds the
//! library, connects to the agent, registers every worker thread with its
//! engine, and each engine's spill handler gives memory back when the
//! agent asks. Without it, it prints `{"pid":P,"engines":{"name":[tids...]}}`
//! first, so whoever starts it can assign its threads, then runs until
//! killed.

use std::{collections::BTreeMap, thread, time::Duration};

use std::sync::Arc;

use crate::{
    engine::Engine,
    governed::{self, ENGINES},
    memory::{self, Kind, MIB},
};
use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor::{HandlerRegistration, SpillConfig, SpillController, control::AgentLink};

/// What keeps the demo governed: the link and the spill registrations.
struct Governed {
    _registrations: Vec<HandlerRegistration>,
    _link: Arc<AgentLink>,
}

/// Connects to the agent and registers every worker with its engine.
fn govern(
    socket: &std::path::Path,
    database: &str,
    engines: &[&Engine],
) -> anyhow::Result<Governed> {
    let spill = Arc::new(SpillController::new(SpillConfig::default())?);
    let (_governor, link) = governed::connect(socket, database, &ENGINES, Some(spill.clone()))?;
    let link = Arc::new(link);
    let mut registrations = Vec::new();
    for e in engines {
        let (_, id) = ENGINES
            .iter()
            .find(|(n, _)| *n == e.name)
            .context("engine name")?;
        let id = *id;
        let l = link.clone();
        for tid in e.on_all(move |_| l.register_current_thread(id)) {
            let tid = tid?;
            if !link.wait_placed(tid, Duration::from_secs(10)) {
                bail!("the agent did not place thread {tid}");
            }
        }
        registrations.push((id, e.spill_handler()));
    }
    Ok(Governed {
        _registrations: registrations
            .into_iter()
            .map(|(id, h)| spill.register(id, h))
            .collect(),
        _link: link,
    })
}

#[derive(Parser)]
struct Args {
    /// Multiplies every size.
    #[arg(long, default_value_t = 1)]
    scale: usize,
    /// The agent's control socket: be governed through the library.
    #[arg(long, alias = "socket")]
    control_socket: Option<std::path::PathBuf>,
    /// The database name in the agent's configuration.
    #[arg(long, default_value = "nodedb")]
    database: String,
}

/// The demo's `main`: its arguments from the command line.
pub fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    memory::configure_malloc();
    let s = args.scale.max(1);
    let vector = Engine::start("vector", 2);
    let timeseries = Engine::start("timeseries", 2);
    let query = Engine::start("query", 2);
    let engines: BTreeMap<String, Vec<u32>> = [&vector, &timeseries, &query]
        .iter()
        .map(|e| (e.name.clone(), e.tids()))
        .collect();
    let hello = serde_json::json!({ "pid": std::process::id(), "engines": engines });
    println!("{hello}");
    let _governed = match &args.control_socket {
        Some(socket) => Some(govern(
            socket,
            &args.database,
            &[&vector, &timeseries, &query],
        )?),
        // Let whoever started us assign the threads before memory moves.
        None => {
            thread::sleep(Duration::from_secs(1));
            None
        }
    };

    let tick = Duration::from_millis(250);
    let mut index_mib = 0;
    let mut ingest_mib = 0;
    for step in 0u64.. {
        // vector: grow to 48 MiB, rebuild every 40 ticks.
        if step % 40 == 39 {
            vector.free(Kind::Anon, index_mib * s * MIB);
            index_mib = 0;
        } else if index_mib < 48 {
            vector.alloc(Kind::Anon, 4 * s * MIB)?;
            index_mib += 4;
        }
        // timeseries: 4 MiB of buffers per tick, flushed at 96 MiB.
        if ingest_mib >= 96 {
            timeseries.free(Kind::Malloc, ingest_mib * s * MIB);
            ingest_mib = 0;
        } else {
            timeseries.alloc(Kind::Malloc, 4 * s * MIB)?;
            ingest_mib += 4;
        }
        // query: a 128 MiB burst over 8 ticks, every 24 ticks.
        match step % 24 {
            0..=7 => query.alloc(Kind::Anon, 16 * s * MIB)?,
            8 => query.free(Kind::Anon, 128 * s * MIB),
            _ => {}
        }
        thread::sleep(tick);
    }
    Ok(())
}
