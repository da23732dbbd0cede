//! One test per defect of the seed crate `nodedb-mem` that this library
//! must make impossible (the reservation core's share of them).

use std::time::Instant;

use nodedb_governor::{
    Budget, EngineId, MemError, MemoryGovernor,
    lending::{Loan, LoanEvent},
};

const MIB: u64 = 1 << 20;

fn governor() -> MemoryGovernor {
    MemoryGovernor::new(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 20 * MIB, 100 * MIB)
            .engine(EngineId::Query, 20 * MIB, 100 * MIB)
            .build()
            .unwrap(),
    )
}

/// What the engine really holds: this thread's idle credit (the batched
/// fast path) goes back first.
fn used(g: &MemoryGovernor, e: EngineId) -> u64 {
    g.flush_thread_credit();
    g.usage(e).unwrap().used_bytes
}

fn total(g: &MemoryGovernor) -> u64 {
    g.flush_thread_credit();
    g.total_bytes()
}

#[test]
fn current_plus_size_cannot_wrap_into_acceptance() {
    let g = governor();
    let _held = g.try_reserve(EngineId::Vector, MIB).unwrap();
    let err = g.try_reserve(EngineId::Vector, u64::MAX).unwrap_err();
    assert!(matches!(err, MemError::SizeOverflow { .. }), "{err:?}");
    let mut r = g.try_reserve(EngineId::Vector, MIB).unwrap();
    assert!(matches!(
        r.try_grow(u64::MAX - MIB),
        Err(MemError::SizeOverflow { .. })
    ));
    // charge, which never refuses for lack of memory, still refuses to wrap.
    assert!(matches!(
        g.charge(EngineId::Vector, u64::MAX),
        Err(MemError::SizeOverflow { .. })
    ));
    assert_eq!(used(&g, EngineId::Vector), 2 * MIB);
    assert_eq!(total(&g), 2 * MIB);
}

#[test]
fn releasing_more_than_reserved_is_refused_and_changes_nothing() {
    let g = governor();
    let mut r = g.try_reserve(EngineId::Query, 10 * MIB).unwrap();
    let err = r.shrink(10 * MIB + 1).unwrap_err();
    assert!(matches!(err, MemError::BeyondReservation { held, .. } if held == 10 * MIB));
    assert!(r.split(11 * MIB).is_err());
    assert_eq!(used(&g, EngineId::Query), 10 * MIB);
    let part = r.split(4 * MIB).unwrap();
    r.shrink(6 * MIB).unwrap();
    assert_eq!((r.size(), part.size()), (0, 4 * MIB));
    drop(part);
    drop(r);
    assert_eq!(used(&g, EngineId::Query), 0);
    assert_eq!(total(&g), 0);
}

#[test]
fn an_unknown_engine_is_an_error_not_emergency_and_leaks_nothing() {
    let g = governor();
    for e in [EngineId::Wal, EngineId::Custom(9)] {
        assert_eq!(
            g.try_reserve(e, MIB).unwrap_err(),
            MemError::UnknownEngine { engine: e }
        );
        assert_eq!(
            g.charge(e, MIB).unwrap_err(),
            MemError::UnknownEngine { engine: e }
        );
        assert_eq!(
            g.usage(e).unwrap_err(),
            MemError::UnknownEngine { engine: e }
        );
    }
    assert_eq!(total(&g), 0);
    assert_eq!(g.level(), nodedb_governor::PressureLevel::Normal);
}

#[test]
fn a_zero_byte_probe_fails_when_the_engine_is_full() {
    let g = MemoryGovernor::new(
        Budget::builder(10)
            .engine(EngineId::Vector, 0, 4)
            .build()
            .unwrap(),
    );
    assert!(
        g.try_reserve(EngineId::Vector, 0).is_ok(),
        "room left: the probe passes"
    );
    let _full = g.try_reserve(EngineId::Vector, 4).unwrap();
    assert!(matches!(
        g.try_reserve(EngineId::Vector, 0),
        Err(MemError::BudgetExceeded { available: 0, .. })
    ));
}

#[test]
fn memory_between_the_floors_and_the_ceiling_is_usable() {
    let g = governor();
    // 100 MiB ceiling, floors 20 + 20: one engine can take its floor plus
    // the whole 60 MiB pool; the other's floor stays free for it.
    let big = g.try_reserve(EngineId::Vector, 80 * MIB).unwrap();
    let err = g.try_reserve(EngineId::Vector, 1).unwrap_err();
    assert!(
        matches!(err, MemError::GlobalCeilingExceeded { available: 0, .. }),
        "{err:?}"
    );
    let floor = g
        .try_reserve(EngineId::Query, 20 * MIB)
        .expect("the Query floor was kept free");
    assert_eq!(total(&g), 100 * MIB);
    drop((big, floor));
}

#[test]
fn rebalancing_is_real_an_idle_engine_lends_and_takes_it_back() {
    // Each engine may use half the ceiling; Query's floor is 20 MiB.
    let g = MemoryGovernor::new(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 0, 50 * MIB)
            .engine(EngineId::Query, 20 * MIB, 50 * MIB)
            .build()
            .unwrap(),
    );
    let mut v = g.try_reserve(EngineId::Vector, 48 * MIB).unwrap();
    assert!(v.try_grow(10 * MIB).is_err(), "at its cap");
    // Query holds nothing and has not grown: it lends all but its floor
    // (more than its 12.5 MiB cushion).
    let lent = g.rebalance_at(Instant::now());
    assert_eq!(
        lent,
        [LoanEvent::Lent(Loan {
            lender: EngineId::Query,
            borrower: EngineId::Vector,
            bytes: 30 * MIB
        })]
    );
    v.try_grow(22 * MIB).unwrap();
    // Query gets busy: refused (deterministically, at once) by its reduced
    // cap, and the loan is called back, so Vector cannot grow again until
    // it gives way.
    assert!(g.try_reserve(EngineId::Query, 25 * MIB).is_err());
    assert!(g.loans().is_empty());
    assert_eq!(g.usage(EngineId::Vector).unwrap().cap_bytes, 50 * MIB);
    assert!(v.try_grow(MIB).is_err(), "over its own cap again");
    let _q = g.try_reserve(EngineId::Query, 25 * MIB).unwrap();
    // Budgets change at run time, within the invariants.
    assert!(
        g.set_limits(EngineId::Vector, 0, 60 * MIB).is_err(),
        "below what Vector holds"
    );
    g.set_limits(EngineId::Vector, 10 * MIB, 90 * MIB).unwrap();
    assert!(
        g.set_limits(EngineId::Query, 95 * MIB, 100 * MIB).is_err(),
        "floors past the ceiling"
    );
}
