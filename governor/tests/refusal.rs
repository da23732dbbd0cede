//! A refusal is cheap because it changes nothing but a counter: levels and
//! the fast path's gates are left as they are. These tests hold the cases
//! where a refusal does change what levels are made of, or where the
//! thresholds moved, to being seen at once, as every other change is.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, PressureChange, PressureLevel, PressureThresholds,
    ThresholdsHandle,
};

const MIB: u64 = 1 << 20;

/// A governor whose level changes are collected, every request exact (no
/// thread-local credit to blur the figures).
fn watched(budget: Budget) -> (MemoryGovernor, Arc<Mutex<Vec<PressureChange>>>) {
    let g = MemoryGovernor::with_batch(budget, ThresholdsHandle::default(), 0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    g.subscribe(move |c| s.lock().unwrap().push(c));
    (g, seen)
}

fn taken(seen: &Mutex<Vec<PressureChange>>) -> Vec<PressureChange> {
    std::mem::take(&mut *seen.lock().unwrap())
}

#[test]
fn a_refusal_moves_no_level_unless_it_ends_a_loan_and_then_at_once() {
    let (g, seen) = watched(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 0, 50 * MIB)
            .engine(EngineId::Query, 20 * MIB, 50 * MIB)
            .build()
            .unwrap(),
    );
    let mut v = g.try_reserve(EngineId::Vector, 48 * MIB).unwrap();
    assert_eq!(
        g.usage(EngineId::Vector).unwrap().level,
        PressureLevel::Critical
    );
    taken(&seen);
    // Query lends 30 MiB: Vector holds 48 of its 80 MiB.
    assert_eq!(g.rebalance_at(Instant::now()).len(), 1);
    let level = g.usage(EngineId::Vector).unwrap().level;
    assert_eq!(level, PressureLevel::Normal, "48 of 80 MiB");
    taken(&seen);

    // Refused beyond its cap: a counter, and nothing else moves.
    for _ in 0..3 {
        assert!(g.try_reserve(EngineId::Vector, 40 * MIB).is_err());
    }
    let u = g.usage(EngineId::Vector).unwrap();
    assert_eq!((u.rejections, u.cap_bytes, u.level), (3, 80 * MIB, level));
    assert!(taken(&seen).is_empty(), "a refusal changed a level");

    // New thresholds are taken up by the next call on the ledger, a
    // refusal included: 48 of 80 MiB is Warning at 0.55.
    g.thresholds()
        .set(PressureThresholds {
            warning: 0.55,
            ..PressureThresholds::default()
        })
        .unwrap();
    assert!(g.try_reserve(EngineId::Vector, 40 * MIB).is_err());
    assert_eq!(
        taken(&seen),
        [PressureChange {
            engine: Some(EngineId::Vector),
            from: PressureLevel::Normal,
            to: PressureLevel::Warning,
        }],
        "the refusal took up the thresholds"
    );

    // Query, a lender, is refused: its loan ends, Vector's cap drops to
    // 50 MiB, 48 held is Critical again, and its level says so before
    // the refusal returns; its next 3 MiB are refused.
    assert!(g.try_reserve(EngineId::Query, 25 * MIB).is_err());
    let changes = taken(&seen);
    assert!(g.loans().is_empty());
    assert!(
        changes.contains(&PressureChange {
            engine: Some(EngineId::Vector),
            from: PressureLevel::Warning,
            to: PressureLevel::Critical,
        }),
        "{changes:?}"
    );
    assert!(g.try_reserve(EngineId::Vector, 3 * MIB).is_err());
    assert!(v.try_grow(3 * MIB).is_err());
}
