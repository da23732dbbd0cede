//! A small stand-in for NodeDB with three engines, for `cargo xtask run`:
//! * vector (2 threads) builds an index that grows to a steady size, and
//!   rebuilds it now and then;
//! * timeseries (2 threads) ingests into allocator buffers and flushes them;
//! * query (2 threads) runs a GROUP BY-like burst every few seconds.
//!
//! It prints `{"pid":P,"engines":{"name":[tids...]}}` first, so whoever
//! starts it can assign its threads to engines, then runs until killed.

use std::{collections::BTreeMap, thread, time::Duration};

use clap::Parser;
use nodedb_governor_demo::{
    engine::Engine,
    memory::{self, Kind, MIB},
};

#[derive(Parser)]
struct Args {
    /// Multiplies every size.
    #[arg(long, default_value_t = 1)]
    scale: usize,
}

fn main() -> anyhow::Result<()> {
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
    // Let whoever started us assign the threads before memory moves.
    thread::sleep(Duration::from_secs(1));

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
