//! Per-engine jemalloc arenas, with jemalloc as this test's global
//! allocator so real allocations are measured: arenas are dedicated (not
//! jemalloc's automatic ones), a pinned thread's memory lands in its
//! engine's arena only, and purge gives freed pages back.

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
