//! The workload's engines under small budgets: they stay within them by
//! flushing and evicting, and lose nothing doing it.

use nodedb_governor::{Budget, EngineId, MemoryGovernor, SpillConfig, SpillController};
use nodedb_governor_workload::{
    timeseries::{CHUNK_POINTS, Timeseries},
    vector::{self, CHARGE_PER_VECTOR, VectorEngine},
};

const MIB: u64 = 1 << 20;

fn governor(engine: EngineId, cap: u64) -> MemoryGovernor {
    let budget = Budget::builder(1 << 30)
        .engine(engine, 0, cap)
        .build()
        .unwrap();
    MemoryGovernor::new(budget)
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nodedb-workload-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn timeseries_ingest_stays_in_its_budget_and_loses_no_point() {
    let cap = MIB;
    let g = governor(EngineId::Timeseries, cap);
    let dir = scratch("ts");
    let hooks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ts = {
        let hooks = hooks.clone();
        Timeseries::new(&g, 8, &dir.join("points.gorilla"))
            .unwrap()
            .after_flush(move || {
                hooks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            })
    };
    let (mut sum, n) = (0.0f64, 200_000u64);
    let mut peak = 0;
    for i in 0..n {
        let v = 20.0 + (i % 600) as f64 * 0.25;
        sum += v;
        ts.ingest((i % 8) as usize, 1_700_000_000_000 + i as i64 * 100, v)
            .unwrap();
        peak = peak.max(g.usage(EngineId::Timeseries).unwrap().used_bytes);
    }
    assert!(peak <= cap, "peak {peak} above the {cap}-byte cap");
    ts.flush().unwrap();
    let st = ts.stats();
    assert!(st.refusals > 0 && st.flushes > 1, "{st:?}");
    assert_eq!(
        hooks.load(std::sync::atomic::Ordering::Relaxed),
        st.flushes,
        "the hook (the arena's purge) runs after every flush"
    );
    assert_eq!(g.usage(EngineId::Timeseries).unwrap().used_bytes, 0);
    let (points, back) = ts.verify().unwrap();
    assert_eq!(points, n);
    assert_eq!(back, sum, "every value back, bit for bit in sum");
    assert!(
        st.compressed_bytes * 4 < st.raw_bytes_flushed,
        "Gorilla compresses a regular series: {st:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_spill_request_flushes_the_timeseries_buffers() {
    let g = governor(EngineId::Timeseries, 64 * MIB);
    let dir = scratch("ts-spill");
    let ts = std::sync::Arc::new(Timeseries::new(&g, 4, &dir.join("points.gorilla")).unwrap());
    let spill = SpillController::new(SpillConfig::default()).unwrap();
    let _reg = spill.register(EngineId::Timeseries, ts.clone());
    for i in 0..(CHUNK_POINTS * 4 * 3) as i64 {
        ts.ingest((i % 4) as usize, i, i as f64).unwrap();
    }
    let held = g.usage(EngineId::Timeseries).unwrap().used_bytes;
    assert!(held >= 12 * CHUNK_POINTS as u64 * 16, "{held}");
    let ingest_end = std::time::Instant::now();
    let freed = spill.spill_engines(&[EngineId::Timeseries], held / 2);
    let after = std::time::Instant::now();
    assert!(freed >= held / 2, "freed {freed} of {held}");
    assert_eq!(ts.stats().spill_flushes, 1);
    // The flush's time is kept for the ingest's rate, when it came after
    // the ingest; a final flush is not a spill's.
    let spilled = ts.spill_flush_time_since(ingest_end);
    assert!(spilled > std::time::Duration::ZERO);
    assert!(spilled <= after - ingest_end);
    assert_eq!(ts.spill_flush_time_since(after), std::time::Duration::ZERO);
    ts.flush().unwrap();
    assert_eq!(ts.spill_flush_time_since(ingest_end), spilled);
    assert_eq!(ts.verify().unwrap().0, (CHUNK_POINTS * 12) as u64);
    // A file cut inside its last segment is refused, naming where.
    let path = dir.join("points.gorilla");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = ts.verify().unwrap_err().to_string();
    assert!(err.contains("a segment is cut at byte"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Whether files in `dir` can be opened for direct I/O.
fn takes_direct_io(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("direct-probe");
    std::fs::write(&probe, [0u8; 4096]).unwrap();
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe)
        .is_ok();
    let _ = std::fs::remove_file(probe);
    ok
}

#[test]
fn vector_segments_are_evicted_to_fit_and_search_still_finds_the_nearest() {
    let per_segment = 1000u32;
    let segments = 6u32;
    // Not a multiple of a block: documents straddle block boundaries.
    let payload = 3000usize;
    // Room for two and a half segments.
    let cap = u64::from(per_segment) * (CHARGE_PER_VECTOR + payload as u64) * 5 / 2;
    let g = governor(EngineId::Vector, cap);
    let dir = scratch("vec");
    let v = VectorEngine::new(&g, &dir, payload).unwrap();
    for s in 0..segments {
        v.add_segment(s * per_segment, per_segment).unwrap();
        let used = g.usage(EngineId::Vector).unwrap().used_bytes;
        assert!(used <= cap, "{used} above {cap}");
    }
    let st = v.stats();
    assert_eq!(st.vectors, u64::from(per_segment * segments));
    assert!(st.evictions >= 4, "{st:?}");
    let n = per_segment * segments;
    let mut total = 0.0;
    let queries = 20;
    for i in 0..queries {
        let q = vector::vector(1_000_000 + i);
        let found = v.search(&q, 10).unwrap();
        total += vector::recall(&found, &vector::exact(&q, n, 10));
    }
    let recall = total / f64::from(queries);
    assert!(recall >= 0.9, "recall@10 {recall}");
    let st = v.stats();
    assert!(st.disk_scans > 0, "{st:?}");
    // Every result's document was fetched and checked, most of them from
    // the evicted segments (four of six), each scan reading its vectors.
    assert_eq!(st.documents, 10 * u64::from(queries), "{st:?}");
    assert!(st.documents_from_disk > st.documents / 2, "{st:?}");
    let scanned = st.disk_scans * u64::from(per_segment) * (4 + 4 * vector::DIM as u64);
    assert_eq!(
        st.disk_bytes_read,
        scanned + st.documents_from_disk * payload as u64,
        "{st:?}"
    );
    // Read past the page cache: the evicted segments' files are not left
    // in it by the scans.
    if takes_direct_io(&dir) {
        assert!(st.direct_io, "{st:?}");
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = std::fs::File::open(f.unwrap().path()).unwrap();
            let (cached, size) = nodedb_governor::page_cache::resident_bytes(&f).unwrap();
            assert!(cached < size / 10, "{cached} of {size} bytes cached");
        }
    }
    // The agent's spill: everything resident can go.
    let spill = SpillController::new(SpillConfig::default()).unwrap();
    let v = std::sync::Arc::new(v);
    let _reg = spill.register(EngineId::Vector, v.clone());
    let held = v.resident_charge();
    assert!(held > 0);
    assert!(spill.spill_engines(&[EngineId::Vector], held) >= held);
    // What this thread kept as credit from the releases goes back too.
    g.flush_thread_credit();
    assert_eq!(g.usage(EngineId::Vector).unwrap().used_bytes, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_document_changed_on_disk_fails_the_search_that_returns_it() {
    let per_segment = 500u32;
    let payload = 1000usize;
    // Room for one segment: the first is evicted by the second.
    let cap = u64::from(per_segment) * (CHARGE_PER_VECTOR + payload as u64) * 3 / 2;
    let g = governor(EngineId::Vector, cap);
    let dir = scratch("vec-bad");
    let v = VectorEngine::new(&g, &dir, payload).unwrap();
    v.add_segment(0, per_segment).unwrap();
    v.add_segment(per_segment, per_segment).unwrap();
    assert_eq!(v.stats().evictions, 1);
    // The query is vector 7 itself: document 7, in the evicted segment,
    // is its nearest.
    let q = vector::vector(7);
    let found = v.search(&q, 10).unwrap();
    assert_eq!(found[0].1, 7);
    let file = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "vec"))
        .unwrap();
    let mut bytes = std::fs::read(&file).unwrap();
    let at = per_segment as usize * (4 + 4 * vector::DIM) + 7 * payload + 123;
    bytes[at] ^= 0xff;
    std::fs::write(&file, bytes).unwrap();
    let err = v.search(&q, 10).unwrap_err().to_string();
    assert!(
        err.contains("document 7's payload is wrong at byte 123"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
