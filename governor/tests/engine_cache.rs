//! The engines' page cache: `drop_cold` drops an engine's least recently
//! touched files first and stops once enough has left the cache, leaving
//! its hot files and other engines' files cached; a hot set is charged to
//! the engine's budget, bounded by its limit, locked (the kernel's
//! `VmLck` shows it), released by an Emergency and locked again after.
//!
//! Files live under cargo's target directory (a block filesystem: tmpfs
//! pages cannot be dropped).

use std::{
    fs::{self, File},
    io::{Read, Write},
    path::PathBuf,
    sync::Arc,
};

use nodedb_governor::{
    Budget, EngineCache, EngineId, MemError, MemoryGovernor, ThresholdsHandle,
    page_cache::resident_bytes,
};

const MIB: u64 = 1 << 20;

/// Without the per-thread credit (batch 0), so usage is exactly what is
/// charged.
fn governor() -> MemoryGovernor {
    MemoryGovernor::with_batch(
        Budget::builder(256 * MIB)
            .engine(EngineId::Vector, 0, 64 * MIB)
            .engine(EngineId::Timeseries, 0, 64 * MIB)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        0,
    )
}

/// A file of `mib` MiB, written, made durable, and read back so all of it
/// is cached.
fn cached_file(name: &str, mib: u64) -> Arc<File> {
    // Where the test binary runs away from cargo's target directory (the
    // VMs), NODEDB_GOVERNOR_TEST_DISK_DIR names a disk.
    let base = std::env::var_os("NODEDB_GOVERNOR_TEST_DISK_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")), PathBuf::from);
    let dir = base.join("engine_cache");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}-{}", std::process::id()));
    let mut f = File::create(&path).unwrap();
    f.write_all(&vec![0x5a; (mib * MIB) as usize]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let mut f = File::open(&path).unwrap();
    let mut sink = Vec::new();
    f.read_to_end(&mut sink).unwrap();
    fs::remove_file(&path).unwrap();
    let f = Arc::new(f);
    assert_eq!(
        resident_bytes(&f).unwrap().0,
        mib * MIB,
        "{name}: read through, all of it is cached"
    );
    f
}

fn cached(f: &File) -> u64 {
    resident_bytes(f).unwrap().0
}

#[test]
fn drop_cold_drops_the_least_recently_used_files_first_and_stops_at_the_target() {
    let cache = EngineCache::new(&governor());
    let oldest = cache.track(EngineId::Timeseries, cached_file("oldest", 8));
    let middle = cache.track(EngineId::Timeseries, cached_file("middle", 8));
    let newest = cache.track(EngineId::Timeseries, cached_file("newest", 8));
    let other = cache.track(EngineId::Vector, cached_file("other", 8));
    // Touched in this order (middle, then newest): oldest stays the
    // coldest. Files used in the same microsecond go in tracking order.
    std::thread::sleep(std::time::Duration::from_millis(2));
    middle.touch();
    std::thread::sleep(std::time::Duration::from_millis(2));
    newest.touch();
    assert_eq!(cache.cached_bytes(EngineId::Timeseries).unwrap(), 24 * MIB);

    // 10 MiB: the coldest file (8) is not enough, the next one is.
    let dropped = cache.drop_cold(EngineId::Timeseries, 10 * MIB).unwrap();
    assert_eq!(dropped.files, 2);
    assert_eq!(dropped.freed_bytes, 16 * MIB);
    assert_eq!(cached(oldest.file()), 0);
    assert_eq!(cached(middle.file()), 0);
    assert_eq!(cached(newest.file()), 8 * MIB, "the hot file stays");
    assert_eq!(cached(other.file()), 8 * MIB, "another engine's file stays");

    // An untracked file is no longer the engine's to drop.
    drop(newest);
    let dropped = cache.drop_cold(EngineId::Timeseries, 64 * MIB).unwrap();
    assert_eq!(dropped.freed_bytes, 0);
    assert_eq!(cache.cached_bytes(EngineId::Vector).unwrap(), 8 * MIB);
}

fn vm_locked_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmLck in /proc/self/status")
}

#[test]
fn a_hot_set_is_charged_bounded_locked_and_released_in_an_emergency() {
    let gov = governor();
    let cache = EngineCache::new(&gov);
    // 2 MiB fits the default RLIMIT_MEMLOCK (8 MiB) of an unprivileged
    // run; root is not limited.
    let len = 2 * MIB as usize;
    let region = memmap2::MmapMut::map_anon(2 * len).unwrap();
    let (first, second) = region.split_at(len);

    // No limit set: no hot set at all.
    let err = cache.protect(EngineId::Vector, first).unwrap_err();
    assert!(
        matches!(err, MemError::HotSetLimit { limit: 0, .. }),
        "{err}"
    );
    cache.set_hot_set_limit(EngineId::Vector, 3 * MIB).unwrap();
    let before = vm_locked_kib();
    let hot = cache.protect(EngineId::Vector, first).unwrap();
    assert!(hot.is_locked());
    assert_eq!(gov.usage(EngineId::Vector).unwrap().used_bytes, 2 * MIB);
    assert_eq!(vm_locked_kib() - before, 2048, "VmLck grows by the range");
    // A second range would pass the 3 MiB bound.
    let err = cache.protect(EngineId::Vector, second).unwrap_err();
    assert!(
        matches!(err, MemError::HotSetLimit { held, limit, .. } if held == 2 * MIB && limit == 3 * MIB),
        "{err}"
    );
    assert_eq!(
        gov.usage(EngineId::Vector).unwrap().used_bytes,
        2 * MIB,
        "a refused hot set charges nothing"
    );
    // A range sharing a page with a held one: refused (the kernel does not
    // count locks, so one unlock would undo the other), nothing charged.
    let err = cache.protect(EngineId::Vector, &first[..4096]).unwrap_err();
    assert!(
        matches!(&err, MemError::LockFailed { reason, .. } if reason.contains("shares a page")),
        "{err}"
    );
    assert_eq!(gov.usage(EngineId::Vector).unwrap().used_bytes, 2 * MIB);

    // An Emergency releases it: unlocked, uncharged; the handle lives on.
    assert_eq!(cache.release_hot_sets(Some(EngineId::Timeseries)), 0);
    assert_eq!(cache.release_hot_sets(Some(EngineId::Vector)), 2 * MIB);
    assert!(!hot.is_locked());
    assert_eq!(gov.usage(EngineId::Vector).unwrap().used_bytes, 0);
    assert_eq!(vm_locked_kib(), before);
    let usage = cache.hot_sets(EngineId::Vector);
    assert_eq!((usage.locked_bytes, usage.released_bytes), (0, 2 * MIB));

    // Locked again only if its charge fits: the budget is taken meanwhile.
    let taken = gov.try_reserve(EngineId::Vector, 63 * MIB).unwrap();
    assert_eq!(cache.restore_hot_sets(None), 0);
    assert!(!hot.is_locked());
    drop(taken);
    assert_eq!(cache.restore_hot_sets(None), 2 * MIB);
    assert!(hot.is_locked());
    assert_eq!(gov.usage(EngineId::Vector).unwrap().used_bytes, 2 * MIB);
    assert_eq!(vm_locked_kib() - before, 2048);

    // Dropped: unlocked and uncharged.
    drop(hot);
    assert_eq!(gov.usage(EngineId::Vector).unwrap().used_bytes, 0);
    assert_eq!(vm_locked_kib(), before);
    assert_eq!(cache.hot_sets(EngineId::Vector).locked_bytes, 0);
}
