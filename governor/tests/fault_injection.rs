//! Sweeps an injected refusal over every reservation of a small mixed
//! workload (three engines, spillable consumers, growth, frees): whichever
//! reservation is refused, the refusal ends in a spill of other engines or
//! in a clean error the workload handles, never in a panic, and the
//! accounting stays exact.

mod common;

use std::sync::Arc;

use common::{Chunks, MIB, exact_governor};
use nodedb_governor::{
    EngineId, HandlerRegistration, MemError, MemoryGovernor, Reservation, SpillConfig,
    SpillController, SpillHandler,
};

const ENGINES: [EngineId; 3] = [EngineId::Vector, EngineId::Timeseries, EngineId::Query];

#[derive(Default, Debug)]
struct Outcome {
    attempts: u64,
    clean_errors: u64,
}

fn is_refusal(e: &MemError) -> bool {
    matches!(
        e,
        MemError::GlobalCeilingExceeded { .. } | MemError::BudgetExceeded { .. }
    )
}

/// The workload: reservations through the spill controller, growth,
/// frees. Every error must be a refusal, handled by carrying on.
fn workload(g: &MemoryGovernor, c: &SpillController) -> (Vec<Reservation>, Outcome) {
    let mut live = Vec::new();
    let mut out = Outcome::default();
    for step in 0..36u64 {
        let engine = ENGINES[(step % 3) as usize];
        let size = (step * 7 % 5 + 1) * MIB;
        out.attempts += 1;
        match c.reserve_or_spill(g, engine, size) {
            Ok(mut r) => {
                if step % 4 == 0 {
                    out.attempts += 1;
                    if let Err(e) = r.try_grow(MIB) {
                        assert!(is_refusal(&e), "unexpected error {e:?}");
                        out.clean_errors += 1;
                    }
                }
                live.push(r);
            }
            Err(e) => {
                assert!(is_refusal(&e), "unexpected error {e:?}");
                out.clean_errors += 1;
            }
        }
        if live.len() > 4 {
            drop(live.remove(0));
        }
    }
    (live, out)
}

struct Setup {
    g: MemoryGovernor,
    c: SpillController,
    handlers: Vec<Arc<Chunks>>,
    _registrations: Vec<HandlerRegistration>,
}

fn setup() -> Setup {
    let g = exact_governor(
        100 * MIB,
        &[
            (EngineId::Vector, 10 * MIB, 80 * MIB),
            (EngineId::Timeseries, 10 * MIB, 60 * MIB),
            (EngineId::Query, 10 * MIB, 60 * MIB),
        ],
    );
    let c = SpillController::new(SpillConfig::default()).unwrap();
    // Vector's caches borrow from the pool and can be spilled.
    let handlers: Vec<Arc<Chunks>> = [(EngineId::Vector, 30), (EngineId::Timeseries, 5)]
        .into_iter()
        .map(|(engine, mib)| Chunks::new(&g, engine, mib, 1.0))
        .collect();
    let _registrations = handlers
        .iter()
        .map(|h| c.register(h.engine, h.clone()))
        .collect();
    Setup {
        g,
        c,
        handlers,
        _registrations,
    }
}

fn check_accounting(s: &Setup, live: &[Reservation], label: &str) {
    for e in ENGINES {
        let held: u64 = live
            .iter()
            .filter(|r| r.engine() == e)
            .map(Reservation::size)
            .sum::<u64>()
            + s.handlers
                .iter()
                .filter(|h| h.engine == e)
                .map(|h| h.reclaimable_bytes())
                .sum::<u64>();
        assert_eq!(
            s.g.usage(e).unwrap().used_bytes,
            held,
            "{label}: engine {e} accounting drifted"
        );
    }
}

#[test]
fn every_injected_refusal_ends_in_a_spill_or_a_clean_error() {
    // Baseline: the workload fits, nothing is refused or spilled.
    let base = setup();
    let (live, out) = workload(&base.g, &base.c);
    assert_eq!(out.clean_errors, 0, "the baseline workload fits");
    assert_eq!(base.c.spilled_bytes_total(), 0);
    check_accounting(&base, &live, "baseline");
    let attempts = out.attempts;
    drop(live);

    for n in 1..=attempts {
        let s = setup();
        s.g.refuse_nth_reservation(n);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| workload(&s.g, &s.c)));
        let (live, out) = result.unwrap_or_else(|_| panic!("refusing reservation {n} panicked"));
        assert_eq!(s.g.injected_refusals(), 1, "reservation {n} was refused");
        let spilled = s.c.spilled_bytes_total() > 0;
        assert!(
            spilled || out.clean_errors == 1,
            "refusal {n}: neither a spill nor a clean error ({out:?})"
        );
        check_accounting(&s, &live, &format!("refusal {n}"));
        drop(live);
        let handlers_left: u64 = s.handlers.iter().map(|h| h.reclaimable_bytes()).sum();
        assert_eq!(
            s.g.total_bytes(),
            handlers_left,
            "refusal {n}: bytes leaked"
        );
    }
}
