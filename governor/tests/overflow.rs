//! The overflow region: no stale bytes from reused space, a hard maximum,
//! freed space merged and reused, safe under threads, file-backed as well,
//! and usable as a spill destination.

mod common;

use std::sync::{Arc, Mutex};

use common::{KIB, exact_governor};
use nodedb_governor::{
    EngineId, OverflowError, OverflowRegion, OverflowSlot, Reservation, SpillConfig,
    SpillController, SpillHandler,
};

#[test]
fn a_reused_slot_never_returns_stale_bytes() {
    let region = OverflowRegion::anonymous(64 * KIB).unwrap();
    let old = region.write(&vec![0xAA; 10 * KIB as usize]).unwrap();
    drop(old);
    let new = region.write(&[0x55; 100]).unwrap();
    assert_eq!(
        new.read(),
        vec![0x55; 100],
        "exactly what was written, nothing of the old slot"
    );
    assert_eq!(new.len(), 100);
    let empty = region.write(&[]).unwrap();
    assert!(empty.read().is_empty());
}

#[test]
fn the_region_is_bounded_and_says_by_how_much() {
    let region = OverflowRegion::anonymous(64 * KIB).unwrap();
    let _big = region.write(&vec![1; 60 * KIB as usize]).unwrap();
    match region.write(&vec![2; 8 * KIB as usize]) {
        Err(OverflowError::Full {
            requested,
            free_bytes,
            largest_free_bytes,
            max_bytes,
        }) => {
            assert_eq!(
                (requested, free_bytes, largest_free_bytes, max_bytes),
                (8 * KIB, 4 * KIB, 4 * KIB, 64 * KIB)
            );
        }
        other => panic!("expected Full, got {other:?}"),
    }
    for bad in [0, 1000] {
        assert!(
            matches!(OverflowRegion::anonymous(bad), Err(OverflowError::BadSize(b)) if b == bad)
        );
    }
}

#[test]
fn freed_space_is_merged_and_reused() {
    let region = OverflowRegion::anonymous(64 * KIB).unwrap();
    let mut slots: Vec<Option<OverflowSlot>> = (0..16)
        .map(|i| Some(region.write(&[i as u8; 4096]).unwrap()))
        .collect();
    assert!(region.write(&[0; 1]).is_err(), "full");
    // Free eight neighbours: one 32 KiB extent, big enough for 32 KiB.
    for s in &mut slots[4..12] {
        *s = None;
    }
    assert_eq!(region.free_extents(), 1);
    let big = region
        .write(&vec![9; 32 * KIB as usize])
        .expect("merged free space is reused");
    for (i, s) in slots.iter().enumerate() {
        if let Some(s) = s {
            assert_eq!(s.read(), vec![i as u8; 4096], "slot {i} untouched");
        }
    }
    drop((slots, big));
    assert_eq!(
        (region.used_bytes(), region.free_extents()),
        (0, 1),
        "everything merged back"
    );
}

#[test]
fn threads_write_read_and_free_at_once() {
    let region = OverflowRegion::anonymous(4096 * KIB).unwrap();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let region = &region;
            s.spawn(move || {
                let mut held = Vec::new();
                for i in 0..400u32 {
                    let len = (i as usize * 37 + t as usize * 911) % (20 * 1024) + 1;
                    let byte = t.wrapping_mul(31).wrapping_add(i as u8);
                    held.push((region.write(&vec![byte; len]).expect("room"), byte, len));
                    if held.len() > 8 {
                        let (slot, byte, len) = held.remove(i as usize % held.len());
                        assert_eq!(slot.read(), vec![byte; len], "thread {t}: corrupted slot");
                    }
                }
            });
        }
    });
    assert_eq!((region.used_bytes(), region.free_extents()), (0, 1));
}

#[test]
fn a_file_backed_region_round_trips() {
    let path = std::env::temp_dir().join(format!("nodedb-overflow-{}", std::process::id()));
    let region = OverflowRegion::file(&path, 256 * KIB).unwrap();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let slot = region.write(&data).unwrap();
    assert_eq!(slot.read(), data);
    drop(slot);
    drop(region);
    std::fs::remove_file(&path).unwrap();
    let e = OverflowRegion::file(std::path::Path::new("/nonexistent-dir/x"), 4 * KIB).unwrap_err();
    assert!(e.to_string().contains("/nonexistent-dir/x"), "{e}");
}

/// A cache that spills its entries into the overflow region: the memory
/// comes off the engine's budget and the data stays readable.
struct SpillingCache {
    region: OverflowRegion,
    entries: Mutex<Vec<(Reservation, Vec<u8>)>>,
    spilled: Mutex<Vec<OverflowSlot>>,
}

impl SpillHandler for SpillingCache {
    fn reclaimable_bytes(&self) -> u64 {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|(r, _)| r.size())
            .sum()
    }
    fn spill(&self, target: u64) -> u64 {
        let mut freed = 0;
        let mut entries = self.entries.lock().unwrap();
        while freed < target {
            let Some((reservation, data)) = entries.pop() else {
                break;
            };
            let Ok(slot) = self.region.write(&data) else {
                entries.push((reservation, data));
                break;
            };
            freed += reservation.size();
            self.spilled.lock().unwrap().push(slot);
        }
        freed
    }
}

#[test]
fn the_region_is_a_spill_destination() {
    let g = exact_governor(1024 * KIB, &[(EngineId::Vector, 0, 512 * KIB)]);
    let region = OverflowRegion::anonymous(1024 * KIB).unwrap();
    let cache = Arc::new(SpillingCache {
        region,
        entries: Mutex::new(
            (0..10u8)
                .map(|i| {
                    (
                        g.try_reserve(EngineId::Vector, 48 * KIB).unwrap(),
                        vec![i; 48 * KIB as usize],
                    )
                })
                .collect(),
        ),
        spilled: Mutex::new(Vec::new()),
    });
    let c = SpillController::new(SpillConfig::default()).unwrap();
    let _reg = c.register(EngineId::Vector, cache.clone());
    // 480 KiB of a 512 KiB cap is past 90%: spill down to 75% (384 KiB).
    let report = c.run(&g);
    assert!(report.freed_bytes() >= 96 * KIB, "{report:?}");
    assert!(g.usage(EngineId::Vector).unwrap().used_bytes <= 384 * KIB);
    let spilled = cache.spilled.lock().unwrap();
    assert_eq!(spilled.len(), 2);
    assert_eq!(
        spilled[0].read(),
        vec![9; 48 * KIB as usize],
        "spilled data reads back"
    );
}
