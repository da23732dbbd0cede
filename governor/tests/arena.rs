//! Per-engine jemalloc arenas, with jemalloc as this test's global
//! allocator so real allocations are measured: arenas are dedicated (not
//! jemalloc's automatic ones), a pinned thread's memory lands in its
//! engine's arena only, and purge gives freed pages back.

mod common;

use nodedb_governor::{EngineId, arena::EngineArenas};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const MIB: usize = 1 << 20;

fn touch(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for i in (0..len).step_by(4096) {
        v[i] = 1;
    }
    std::hint::black_box(&v);
    v
}

#[test]
fn arenas_are_dedicated_not_jemallocs_automatic_ones() {
    let arenas = EngineArenas::create(&[EngineId::Vector, EngineId::Query]).unwrap();
    // SAFETY: "opt.narenas" is an unsigned.
    let automatic: u32 = unsafe { tikv_jemalloc_ctl::raw::read(b"opt.narenas\0") }.unwrap();
    let (v, q) = (
        arenas.index(EngineId::Vector).unwrap(),
        arenas.index(EngineId::Query).unwrap(),
    );
    assert!(
        v >= automatic && q >= automatic && v != q,
        "vector {v}, query {q}, automatic 0..{automatic}"
    );
    assert!(arenas.index(EngineId::Wal).is_err());
    std::thread::spawn(move || {
        let before = EngineArenas::current_thread_arena().unwrap();
        assert!(
            before < automatic,
            "a new thread starts on an automatic arena"
        );
        arenas.pin_current_thread(EngineId::Vector).unwrap();
        assert_eq!(EngineArenas::current_thread_arena().unwrap(), v);
    })
    .join()
    .unwrap();
}

#[test]
fn a_pinned_threads_memory_is_its_engines_and_purge_returns_it() {
    let arenas = EngineArenas::create(&[EngineId::Timeseries, EngineId::Crdt]).unwrap();
    let before = arenas.stats(EngineId::Timeseries).unwrap();
    let other_before = arenas.stats(EngineId::Crdt).unwrap();
    let arenas = std::sync::Arc::new(arenas);
    let a = arenas.clone();
    std::thread::spawn(move || {
        a.pin_current_thread(EngineId::Timeseries).unwrap();
        let buffers: Vec<Vec<u8>> = (0..8).map(|_| touch(4 * MIB)).collect();
        let held = a.stats(EngineId::Timeseries).unwrap();
        assert!(
            held.active_bytes >= before.active_bytes + 32 * MIB as u64,
            "32 MiB allocated by the pinned thread: {before:?} -> {held:?}"
        );
        assert!(held.resident_bytes >= 32 * MIB as u64, "{held:?}");
        drop(buffers);
        let freed = a.stats(EngineId::Timeseries).unwrap();
        assert!(
            freed.active_bytes < held.active_bytes,
            "{held:?} -> {freed:?}"
        );
        a.purge(EngineId::Timeseries).unwrap();
        let purged = a.stats(EngineId::Timeseries).unwrap();
        assert_eq!(
            purged.dirty_bytes, 0,
            "purge leaves no dirty pages: {purged:?}"
        );
        assert!(
            purged.resident_bytes + 24 * MIB as u64 <= held.resident_bytes,
            "purge gave the pages back: {held:?} -> {purged:?}"
        );
        a.decay(EngineId::Timeseries).unwrap();
    })
    .join()
    .unwrap();
    let other = arenas.stats(EngineId::Crdt).unwrap();
    assert!(
        other.active_bytes < other_before.active_bytes + MIB as u64,
        "another engine's arena saw none of it: {other_before:?} -> {other:?}"
    );
}

/// The arena figures reach Prometheus, per engine, and follow real
/// allocations and purges.
#[cfg(feature = "metrics")]
#[test]
fn arena_resident_bytes_are_exported_per_engine() {
    use nodedb_governor::{Budget, MemoryGovernor, metrics::GovernorMetrics};
    use prometheus::{Encoder, Registry, TextEncoder};

    let scrape = |registry: &Registry, series: &str| -> i64 {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    };
    let g = MemoryGovernor::new(
        Budget::builder(1 << 30)
            .engine(EngineId::Wal, 0, 1 << 30)
            .engine(EngineId::Bridge, 0, 1 << 30)
            .build()
            .unwrap(),
    );
    let arenas = EngineArenas::create(&[EngineId::Wal, EngineId::Bridge]).unwrap();
    let registry = Registry::new();
    let m = GovernorMetrics::register(&registry).unwrap();
    let wal = r#"nodedb_governor_engine_arena_resident_bytes{engine="wal"}"#;
    let bridge = r#"nodedb_governor_engine_arena_active_bytes{engine="bridge"}"#;

    m.update_arenas(&g, &arenas).unwrap();
    let (wal_before, bridge_before) = (scrape(&registry, wal), scrape(&registry, bridge));

    let arenas = std::sync::Arc::new(arenas);
    let a = arenas.clone();
    let held = std::thread::spawn(move || {
        a.pin_current_thread(EngineId::Wal).unwrap();
        let v = touch(32 * MIB);
        // Freed by this thread so it goes back to the Wal arena.
        let kept = touch(16 * MIB);
        drop(v);
        kept
    })
    .join()
    .unwrap();
    m.update_arenas(&g, &arenas).unwrap();
    let wal_now = scrape(&registry, wal);
    assert!(
        wal_now - wal_before >= 16 * MIB as i64,
        "wal arena resident grew by {} bytes",
        wal_now - wal_before
    );
    assert!(
        (scrape(&registry, bridge) - bridge_before).abs() < MIB as i64,
        "the bridge arena saw none of it"
    );
    assert_eq!(
        scrape(
            &registry,
            r#"nodedb_governor_engine_arena_dirty_bytes{engine="wal"}"#
        ),
        arenas.stats(EngineId::Wal).unwrap().dirty_bytes as i64
    );
    drop(held);
}

#[test]
fn with_numa_a_thread_joins_its_engines_arena_on_its_node() {
    use nodedb_governor::{Node, Topology};
    // Two CPUs this process may run on, each treated as a node (the
    // two-node VM checks where the pages land).
    let Some((a, b)) = common::two_cpus() else {
        return;
    };
    let node = |id: u32, cpu: u32| Node {
        id,
        cpus: vec![cpu],
        memory_bytes: 1 << 30,
    };
    let topology = Topology::new(vec![node(0, a), node(1, b)]).unwrap();
    let arenas = EngineArenas::create_numa(&[EngineId::Sparse], &topology).unwrap();
    let (on0, on1) = (
        arenas.index_on(EngineId::Sparse, 0).unwrap(),
        arenas.index_on(EngineId::Sparse, 1).unwrap(),
    );
    assert_ne!(on0, on1);
    let arenas = std::sync::Arc::new(arenas);
    let active = |n| arenas.stats_on(EngineId::Sparse, n).unwrap().active_bytes;
    let (before0, before1) = (active(0), active(1));
    let held = std::thread::scope(|s| {
        s.spawn(|| {
            common::pin(b);
            arenas.pin_current_thread(EngineId::Sparse).unwrap();
            assert_eq!(EngineArenas::current_thread_arena().unwrap(), on1);
            (0..4).map(|_| touch(4 * MIB)).collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    });
    // 16 MiB in node 1's arena, none in node 0's; the engine's stats sum both.
    let grown1 = active(1) - before1;
    assert!(grown1 >= 16 * MIB as u64, "node 1's arena grew {grown1}");
    assert!(active(0) - before0 < MIB as u64, "node 0's arena grew");
    assert_eq!(
        arenas.stats(EngineId::Sparse).unwrap().active_bytes,
        active(0) + active(1)
    );
    std::thread::scope(|s| {
        s.spawn(|| {
            common::pin(a);
            arenas.pin_current_thread(EngineId::Sparse).unwrap();
            assert_eq!(EngineArenas::current_thread_arena().unwrap(), on0);
        });
    });
    drop(held);
}
