//! The spill controller spills for real: handlers are called, their
//! reservations are released, and the governor's counters fall; with
//! hysteresis, cheapest-first victims, and refusals turned into spills of
//! other engines.

mod common;

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::{Chunks, MIB, exact_governor as governor};
use nodedb_governor::{
    EngineId, MemError, MemoryGovernor, SpillConfig, SpillController,
    lending::{LendingRules, Loan, LoanEvent},
};

fn used(g: &MemoryGovernor, e: EngineId) -> u64 {
    g.usage(e).unwrap().used_bytes
}

#[test]
fn the_controller_spills_for_real_not_just_advice() {
    let g = governor(200 * MIB, &[(EngineId::Query, 0, 100 * MIB)]);
    let c = SpillController::new(SpillConfig::default()).unwrap();
    let table = Chunks::new(&g, EngineId::Query, 95, 1.0);
    let _reg = c.register(EngineId::Query, table.clone());
    let report = c.run(&g);
    // 95 MiB of a 100 MiB cap: spilled down to the 75% restore point.
    assert_eq!(report.spilled, vec![(EngineId::Query, 20 * MIB, 20 * MIB)]);
    assert_eq!(used(&g, EngineId::Query), 75 * MIB);
    assert_eq!(table.spilled.load(Ordering::Relaxed), 20 * MIB);
    assert_eq!(c.spilled_bytes_total(), 20 * MIB);
}

#[test]
fn hysteresis_spills_at_90_percent_and_stops_at_75() {
    let g = governor(200 * MIB, &[(EngineId::Query, 0, 100 * MIB)]);
    let c = SpillController::new(SpillConfig::default()).unwrap();
    let table = Chunks::new(&g, EngineId::Query, 89, 1.0);
    let _reg = c.register(EngineId::Query, table.clone());
    assert!(c.check(&g).is_empty(), "89% is below the spill point");
    let extra: Vec<_> = (0..2)
        .map(|_| g.try_reserve(EngineId::Query, MIB).unwrap())
        .collect();
    assert_eq!(c.run(&g).freed_bytes(), 16 * MIB, "91% spills down to 75%");
    drop(extra);
    // Back between the two thresholds: no spilling until 90% again.
    let more: Vec<_> = (0..12)
        .map(|_| g.try_reserve(EngineId::Query, MIB).unwrap())
        .collect();
    assert_eq!(used(&g, EngineId::Query), 85 * MIB);
    assert!(
        c.check(&g).is_empty(),
        "85% after a spill: inside the hysteresis band"
    );
    drop(more);
    assert_eq!(table.calls.load(Ordering::Relaxed), 1);
}

#[test]
fn cheapest_bytes_spill_first_then_the_largest() {
    let g = governor(200 * MIB, &[(EngineId::Vector, 0, 200 * MIB)]);
    let c = SpillController::new(SpillConfig::default()).unwrap();
    let cache = Chunks::new(&g, EngineId::Vector, 10, 0.1);
    let small_run = Chunks::new(&g, EngineId::Vector, 20, 5.0);
    let big_run = Chunks::new(&g, EngineId::Vector, 50, 5.0);
    let _r = [
        c.register(EngineId::Vector, small_run.clone()),
        c.register(EngineId::Vector, big_run.clone()),
        c.register(EngineId::Vector, cache.clone()),
    ];
    assert_eq!(c.spill_engines(&[EngineId::Vector], 8 * MIB), 8 * MIB);
    assert_eq!(
        cache.spilled.load(Ordering::Relaxed),
        8 * MIB,
        "the cheap cache goes first"
    );
    assert_eq!(c.spill_engines(&[EngineId::Vector], 12 * MIB), 12 * MIB);
    assert_eq!(cache.held_bytes(), 0);
    assert_eq!(
        big_run.spilled.load(Ordering::Relaxed),
        10 * MIB,
        "then the largest of equal cost"
    );
    assert_eq!(small_run.spilled.load(Ordering::Relaxed), 0);
}

#[test]
fn a_refused_reservation_spills_other_engines_and_retries() {
    // Vector borrowed the whole pool; Query's request beyond its floor is
    // refused for lack of shared memory, Vector spills, Query gets it.
    let g = governor(
        100 * MIB,
        &[
            (EngineId::Vector, 20 * MIB, 100 * MIB),
            (EngineId::Query, 20 * MIB, 60 * MIB),
        ],
    );
    let c = SpillController::new(SpillConfig::default()).unwrap();
    let index = Chunks::new(&g, EngineId::Vector, 80, 1.0);
    let _reg = c.register(EngineId::Vector, index.clone());
    let err = g.try_reserve(EngineId::Query, 30 * MIB).unwrap_err();
    assert!(
        matches!(err, MemError::GlobalCeilingExceeded { available, .. } if available == 20 * MIB)
    );
    let r = c
        .reserve_or_spill(&g, EngineId::Query, 30 * MIB)
        .expect("spilling Vector made room");
    assert_eq!(r.size(), 30 * MIB);
    assert_eq!(
        index.spilled.load(Ordering::Relaxed),
        10 * MIB,
        "only the shortfall was spilled"
    );
    // The engine's own cap is not other engines' business.
    let err = c
        .reserve_or_spill(&g, EngineId::Query, 40 * MIB)
        .unwrap_err();
    assert!(matches!(err, MemError::BudgetExceeded { .. }), "{err:?}");
    assert_eq!(index.spilled.load(Ordering::Relaxed), 10 * MIB);
}

#[test]
fn bad_spill_configs_are_refused() {
    for (spill_at, restore_at) in [(0.7, 0.8), (1.2, 0.5), (0.9, 0.0)] {
        let e = SpillController::new(SpillConfig {
            spill_at,
            restore_at,
        })
        .err()
        .expect("refused");
        assert!(e.to_string().contains("restore_at"), "{e}");
    }
}

#[test]
fn an_idle_engine_lends_its_budget_and_the_borrower_spills_when_it_is_taken_back() {
    let g = governor(
        120 * MIB,
        &[
            (EngineId::Vector, 0, 60 * MIB),
            (EngineId::Query, 0, 60 * MIB),
        ],
    );
    let c = SpillController::new(SpillConfig::default()).unwrap();
    // Query holds 4 MiB and is quiet; Vector is busy at 95% of its cap.
    let _query = g.try_reserve(EngineId::Query, 4 * MIB).unwrap();
    let busy = g.try_reserve(EngineId::Vector, 57 * MIB).unwrap();
    let t0 = Instant::now();
    // Query keeps what it holds and a quarter of its cap (4 + 15 MiB) and
    // lends the rest.
    assert_eq!(
        g.rebalance_at(t0),
        [LoanEvent::Lent(Loan {
            lender: EngineId::Query,
            borrower: EngineId::Vector,
            bytes: 41 * MIB
        })]
    );
    assert_eq!(g.usage(EngineId::Query).unwrap().lent_bytes, 41 * MIB);
    assert_eq!(g.usage(EngineId::Query).unwrap().cap_bytes, 19 * MIB);
    assert_eq!(g.usage(EngineId::Vector).unwrap().cap_bytes, 101 * MIB);
    drop(busy);
    let cache = Chunks::new(&g, EngineId::Vector, 90, 1.0);
    let _reg = c.register(EngineId::Vector, cache.clone());
    assert_eq!(used(&g, EngineId::Vector), 90 * MIB, "beyond its own cap");
    // Nothing to spill while the loan stands (90 of 101 MiB).
    assert!(c.run(&g).spilled.is_empty());

    // Query needs 20 MiB: refused by its reduced cap, at once, and the
    // loan ends.
    let err = g.try_reserve(EngineId::Query, 20 * MIB).unwrap_err();
    assert!(
        matches!(err, MemError::BudgetExceeded { limit, .. } if limit == 19 * MIB),
        "{err:?}"
    );
    assert!(g.loans().is_empty());
    assert_eq!(g.usage(EngineId::Vector).unwrap().cap_bytes, 60 * MIB);
    // Vector holds 90 MiB under a 60 MiB cap: the take-back forced a
    // spill, and is counted as one.
    assert_eq!(g.usage(EngineId::Vector).unwrap().forced_spills, 1);
    assert_eq!(g.usage(EngineId::Query).unwrap().forced_spills, 0);
    // Query just took its loan back: a round does not lend it again.
    assert_eq!(g.rebalance_at(t0 + Duration::from_millis(10)), []);
    // The controller spills the borrower down to 75% of its own cap.
    let report = c.run(&g);
    assert_eq!(report.spilled, [(EngineId::Vector, 45 * MIB, 45 * MIB)]);
    assert_eq!(cache.held_bytes(), 45 * MIB);
    let _q = g
        .try_reserve(EngineId::Query, 20 * MIB)
        .expect("Query's own budget is back");
}

#[test]
fn an_idle_engine_marked_to_spill_gives_its_buffer_back_when_memory_is_short_and_lends_it() {
    let g = governor(
        200 * MIB,
        &[
            (EngineId::Timeseries, 10 * MIB, 100 * MIB),
            (EngineId::Query, 0, 120 * MIB),
        ],
    );
    g.set_lending_rules(LendingRules {
        idle_after: Duration::from_millis(20),
        idle_spill_after: Duration::from_millis(60),
        ..LendingRules::default()
    })
    .unwrap();
    assert!(matches!(
        g.set_idle_spill(EngineId::Sparse, true),
        Err(MemError::UnknownEngine { .. })
    ));
    g.set_idle_spill(EngineId::Timeseries, true).unwrap();
    let c = SpillController::new(SpillConfig::default()).unwrap();
    // Timeseries ingested 70 MiB of points and went quiet.
    let points = Chunks::new(&g, EngineId::Timeseries, 70, 1.0);
    let _reg = c.register(EngineId::Timeseries, points.clone());
    let mut query = vec![g.try_reserve(EngineId::Query, 50 * MIB).unwrap()];
    g.rebalance();
    std::thread::sleep(Duration::from_millis(100));
    g.rebalance();
    // Idle long enough, but 120 of 200 MiB is not short of memory.
    assert!(c.run(&g).spilled.is_empty());
    assert_eq!(points.held_bytes(), 70 * MIB);
    // The query grows to 114 MiB (95% of its cap; with timeseries' 70,
    // 92% of the ceiling) and borrows the little timeseries can lend
    // while it holds its points (it keeps 70 + 25 MiB)...
    query.push(g.try_reserve(EngineId::Query, 64 * MIB).unwrap());
    assert_eq!(
        g.rebalance(),
        [LoanEvent::Lent(Loan {
            lender: EngineId::Timeseries,
            borrower: EngineId::Query,
            bytes: 5 * MIB
        })]
    );
    // ...and memory is short: the idle timeseries spills down to its
    // floor.
    // (The query, past its own spill mark, is asked too; it has nothing
    // registered to spill here.)
    let timeseries = |r: nodedb_governor::SpillReport| -> Vec<(u64, u64)> {
        r.spilled
            .iter()
            .filter(|s| s.0 == EngineId::Timeseries)
            .map(|s| (s.1, s.2))
            .collect()
    };
    assert_eq!(timeseries(c.run(&g)), [(60 * MIB, 60 * MIB)]);
    assert_eq!(points.held_bytes(), 10 * MIB);
    assert_eq!(timeseries(c.run(&g)), [], "asked once");
    // What it gave back is lent to the busy query (timeseries keeps 10
    // MiB + a quarter of its budget), which can now grow well past its
    // own cap.
    assert_eq!(
        g.rebalance(),
        [LoanEvent::Lent(Loan {
            lender: EngineId::Timeseries,
            borrower: EngineId::Query,
            bytes: 60 * MIB
        })]
    );
    assert_eq!(g.usage(EngineId::Timeseries).unwrap().lent_bytes, 65 * MIB);
    query.push(g.try_reserve(EngineId::Query, 40 * MIB).unwrap());
    assert_eq!(used(&g, EngineId::Query), 154 * MIB);
}

#[test]
fn a_lender_that_flickers_above_warning_leaves_the_borrower_alone() {
    let g = governor(
        120 * MIB,
        &[
            (EngineId::Vector, 0, 60 * MIB),
            (EngineId::Query, 0, 60 * MIB),
        ],
    );
    let c = SpillController::new(SpillConfig::default()).unwrap();
    let mut query = g.try_reserve(EngineId::Query, 4 * MIB).unwrap();
    let busy = g.try_reserve(EngineId::Vector, 57 * MIB).unwrap();
    let t0 = Instant::now();
    assert_eq!(g.rebalance_at(t0).len(), 1);
    assert_eq!(g.usage(EngineId::Query).unwrap().cap_bytes, 19 * MIB);
    drop(busy);
    let cache = Chunks::new(&g, EngineId::Vector, 90, 1.0);
    let _reg = c.register(EngineId::Vector, cache.clone());
    // Query swings between 4 and 16 MiB of its 19 MiB (past 75%, under
    // 90%) for 100 ms at a time, long after the loan was made.
    let rules = g.lending_rules();
    let mut now = t0 + rules.min_loan;
    for _ in 0..10 {
        query.try_grow(12 * MIB).unwrap();
        assert_eq!(g.rebalance_at(now), []);
        now += rules.rise_after / 2;
        assert_eq!(g.rebalance_at(now), []);
        query.shrink(12 * MIB).unwrap();
        now += rules.rise_after / 2;
        assert_eq!(g.rebalance_at(now), []);
    }
    assert_eq!(g.usage(EngineId::Query).unwrap().lent_bytes, 41 * MIB);
    assert!(
        c.run(&g).spilled.is_empty(),
        "the borrower keeps its 90 MiB"
    );
    assert_eq!(cache.held_bytes(), 90 * MIB);
    // Held past 75% for the whole rise time, it takes back what it needs
    // (16 MiB + a 15 MiB cushion = 31 MiB of budget: 12 MiB back).
    query.try_grow(12 * MIB).unwrap();
    assert_eq!(g.rebalance_at(now), []);
    now += rules.rise_after;
    assert_eq!(
        g.rebalance_at(now),
        [LoanEvent::TakenBack(Loan {
            lender: EngineId::Query,
            borrower: EngineId::Vector,
            bytes: 12 * MIB
        })]
    );
    assert_eq!(g.usage(EngineId::Query).unwrap().cap_bytes, 31 * MIB);
    assert_eq!(g.usage(EngineId::Vector).unwrap().cap_bytes, 89 * MIB);
    // 90 MiB of 89: the borrower spills, and that is counted.
    assert_eq!(g.usage(EngineId::Vector).unwrap().forced_spills, 1);
    assert_eq!(c.run(&g).spilled.len(), 1);
}

#[test]
fn lending_rules_out_of_range_are_refused_naming_the_field() {
    let g = governor(100 * MIB, &[(EngineId::Vector, 0, 50 * MIB)]);
    let before = g.lending_rules();
    for (rules, field) in [
        (
            LendingRules {
                cushion: 1.5,
                ..before
            },
            "lending.cushion",
        ),
        (
            LendingRules {
                min_loan: Duration::from_secs(7200),
                ..before
            },
            "lending.min_loan",
        ),
    ] {
        let err = g.set_lending_rules(rules).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
        assert_eq!(g.lending_rules(), before, "nothing applied");
    }
    let shorter = LendingRules {
        min_loan: Duration::ZERO,
        ..before
    };
    g.set_lending_rules(shorter).unwrap();
    assert_eq!(g.lending_rules(), shorter);
}

#[test]
fn a_floor_others_hold_is_reclaimed_from_them_by_the_shortfall() {
    // Query's 30 MiB floor is kept free, so Vector may reserve 70 MiB; a
    // charge (which cannot be refused) takes 20 MiB more of it.
    let g = governor(
        100 * MIB,
        &[
            (EngineId::Vector, 0, 100 * MIB),
            (EngineId::Query, 30 * MIB, 100 * MIB),
        ],
    );
    // Spill only past 95%, so the 90 MiB Vector ends up holding is not a
    // spill of its own.
    let c = SpillController::new(SpillConfig {
        spill_at: 0.95,
        restore_at: 0.75,
    })
    .unwrap();
    let cache = Chunks::new(&g, EngineId::Vector, 70, 1.0);
    let _reg = c.register(EngineId::Vector, cache.clone());
    assert!(
        g.try_reserve(EngineId::Vector, MIB).is_err(),
        "the pool is used up"
    );
    let _charged = g.charge(EngineId::Vector, 20 * MIB).unwrap();
    assert!(g.try_reserve(EngineId::Query, 30 * MIB).is_err());
    // Vector (90 of 100 MiB) is below spill_at; only the floor's shortfall
    // (30 protected, 10 free) is spilled, from the engine above its floor.
    let report = c.run(&g);
    assert!(report.spilled.is_empty());
    assert_eq!(report.floor_reclaim, (20 * MIB, 20 * MIB));
    assert_eq!(cache.held_bytes(), 50 * MIB);
    let _q = g
        .try_reserve(EngineId::Query, 30 * MIB)
        .expect("the floor is free again");
    assert_eq!(c.reclaim_floors(&g), (0, 0), "nothing left to reclaim");
}

#[test]
fn the_rebalancer_thread_lends_for_idle_engines_and_stops_when_dropped() {
    let g = governor(
        100 * MIB,
        &[
            (EngineId::Vector, 0, 50 * MIB),
            (EngineId::Query, 0, 50 * MIB),
        ],
    );
    let mut query = g.try_reserve(EngineId::Query, 4 * MIB).unwrap();
    let _busy = g.try_reserve(EngineId::Vector, 46 * MIB).unwrap();
    let r = g.spawn_rebalancer(Duration::from_millis(2));
    assert!(r.is_running());
    let deadline = Instant::now() + Duration::from_secs(10);
    while g.loans().is_empty() {
        assert!(Instant::now() < deadline, "the rebalancer never lent");
        std::thread::sleep(Duration::from_millis(2));
    }
    // All but 4 MiB held and a cushion of 12.5 MiB.
    let lent = 50 * MIB - 4 * MIB - 50 * MIB / 4;
    assert_eq!(g.usage(EngineId::Query).unwrap().lent_bytes, lent);
    assert_eq!(
        g.usage(EngineId::Vector).unwrap().cap_bytes,
        50 * MIB + lent
    );
    drop(r);
    // Stopped: Query at Warning of its reduced cap would take the loan
    // back at the next round, and none comes.
    query.try_grow(11 * MIB).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(g.usage(EngineId::Query).unwrap().lent_bytes, lent);
}
