//! The library's NUMA on the kernel's own nodes (the two-node VM): per
//! node, a thread pinned to the node's CPUs joins its engine's jemalloc
//! arena for that node and touches 32 MiB, and the kernel says where the
//! pages are (`move_pages` with no target: each page's node); a budget
//! split across the nodes charges each reservation to the thread's node,
//! `strict` refuses on the exhausted node while the other has room, and
//! `prefer-local` borrows the other node's share and counts it remote.
//!
//! Prints one JSON object; exits non-zero, naming the check, when one
//! fails, or when the machine has fewer than two nodes.

use anyhow::{Context, bail, ensure};
use nodedb_governor::{
    Budget, EngineId, MemError, MemoryGovernor, NumaPolicy, ThresholdsHandle, Topology,
    arena::EngineArenas,
};
use nodedb_governor_testkit::numa::{self, pin_current_thread};
use serde_json::json;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// Each page's node (see [`numa::page_nodes`]).
fn nodes_of(buf: &[u8]) -> anyhow::Result<Vec<i32>> {
    numa::page_nodes(buf.as_ptr() as usize, buf.len())
}

fn main() -> anyhow::Result<()> {
    let topology = Topology::detect().context("the kernel's nodes")?;
    let nodes = topology.nodes().to_vec();
    ensure!(
        nodes.len() >= 2,
        "{} node(s): the NUMA probe needs two",
        nodes.len()
    );

    // Arenas: one per engine and node; pages land on the thread's node.
    let arenas = EngineArenas::create_numa(&[EngineId::Vector], &topology)?;
    let mut arena_report = Vec::new();
    for (pos, node) in nodes.iter().enumerate() {
        let (arena, on_node, total) = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<(u32, usize, usize)> {
                pin_current_thread(&node.cpus)?;
                arenas.pin_current_thread(EngineId::Vector)?;
                let arena = EngineArenas::current_thread_arena()?;
                let mut buf = vec![0u8; (32 * MIB) as usize];
                for i in (0..buf.len()).step_by(PAGE) {
                    buf[i] = 1;
                }
                std::hint::black_box(&buf);
                let status = nodes_of(&buf)?;
                let here = status.iter().filter(|&&n| n == node.id as i32).count();
                Ok((arena, here, status.len()))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the node {} thread panicked", node.id))?
        })?;
        ensure!(
            arena == arenas.index_on(EngineId::Vector, pos)?,
            "a thread on node {} joined arena {arena}, not its node's",
            node.id
        );
        let share = on_node as f64 / total.max(1) as f64;
        ensure!(
            share >= 0.95,
            "node {}'s arena: {on_node} of {total} pages on the node",
            node.id
        );
        arena_report
            .push(json!({"node": node.id, "arena": arena, "pages": total, "on_node": share}));
    }

    // The budget split across the nodes (by their memory; the VM's nodes
    // are equal): vector strict, query prefer-local, 128 MiB caps.
    let budget = Budget::builder(512 * MIB)
        .engine(EngineId::Vector, 0, 128 * MIB)
        .engine(EngineId::Query, 0, 128 * MIB)
        .numa(topology.clone())
        .engine_numa(EngineId::Vector, NumaPolicy::Strict, None)
        .build()?;
    let g = MemoryGovernor::with_batch(budget, ThresholdsHandle::default(), 0);
    let share = g.node_usage(EngineId::Vector)?[1].share_bytes;
    let (last, first) = (&nodes[nodes.len() - 1], &nodes[0]);
    let on = |cpus: &[u32], f: &(dyn Fn() -> anyhow::Result<serde_json::Value> + Sync)| {
        std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<serde_json::Value> {
                pin_current_thread(cpus)?;
                f()
            })
            .join()
            .map_err(|_| anyhow::anyhow!("a pinned thread panicked"))?
        })
    };
    let held = std::sync::Mutex::new(Vec::new());
    let strict = on(&last.cpus, &|| {
        let r = g.try_reserve(EngineId::Vector, share)?;
        ensure!(r.node_bytes() == [(last.id, share)], "{:?}", r.node_bytes());
        held.lock().unwrap().push(r);
        match g.try_reserve(EngineId::Vector, MIB) {
            Err(MemError::NodeBudgetExceeded { node, .. }) if node == last.id => {}
            other => bail!("strict on the exhausted node {}: {other:?}", last.id),
        }
        Ok(json!({"share_bytes": share, "refused_on": last.id}))
    })?;
    let other_room = on(&first.cpus, &|| {
        let r = g.try_reserve(EngineId::Vector, 16 * MIB)?;
        ensure!(
            r.node_bytes() == [(first.id, 16 * MIB)],
            "{:?}",
            r.node_bytes()
        );
        Ok(json!({"node": first.id, "reserved": 16 * MIB}))
    })?;
    let remote = on(&last.cpus, &|| {
        let q = g.try_reserve(EngineId::Query, share)?;
        let spilled = g.try_reserve(EngineId::Query, 8 * MIB)?;
        ensure!(
            spilled.node_bytes().iter().all(|(n, _)| *n != last.id),
            "prefer-local charged the full node: {:?}",
            spilled.node_bytes()
        );
        let remote: u64 = g
            .node_usage(EngineId::Query)?
            .iter()
            .map(|n| n.remote_bytes)
            .sum();
        ensure!(remote == 8 * MIB, "remote bytes {remote}");
        drop((q, spilled));
        Ok(json!({"remote_bytes": remote}))
    })?;
    // Freed from the other node's thread: the books go back to zero.
    on(&first.cpus, &|| {
        held.lock().unwrap().clear();
        Ok(json!(null))
    })?;
    let left: u64 = g.node_totals().iter().map(|n| n.used_bytes).sum();
    ensure!(
        left == 0 && g.total_bytes() == 0,
        "{left} bytes left on the nodes"
    );
    println!(
        "{}",
        json!({
            "nodes": nodes.iter().map(|n| json!({"node": n.id, "cpus": n.cpus, "memory_bytes": n.memory_bytes})).collect::<Vec<_>>(),
            "arenas": arena_report,
            "strict": strict,
            "other_node": other_room,
            "prefer_local": remote,
        })
    );
    Ok(())
}
