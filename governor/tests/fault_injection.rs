//! Sweeps an injected refusal over every reservation of a small mixed
//! workload (three engines, spillable consumers, growth, frees): whichever
//! reservation is refused, the refusal ends in a spill of other engines or
//! in a clean error the workload handles, never in a panic, and the
//! accounting stays exact.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use nodedb_governor::{
    Budget, EngineId, MemError, MemoryGovernor, Reservation, SpillConfig, SpillController,
    SpillHandler, ThresholdsHandle,
};

const MIB: u64 = 1 << 20;
const ENGINES: [EngineId; 3] = [EngineId::Vector, EngineId::Timeseries, EngineId::Query];

/// A spillable consumer holding 1 MiB chunks.
struct Chunks {
    engine: EngineId,
    held: Mutex<Vec<Reservation<'static>>>,
    spilled: AtomicU64,
}

impl SpillHandler for Chunks {
    fn reclaimable_bytes(&self) -> u64 {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(Reservation::size)
            .sum()
    }
    fn spill(&self, target: u64) -> u64 {
        let mut held = self.held.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(r) = held.pop() else { break };
            freed += r.size();
        }
        self.spilled.fetch_add(freed, Ordering::Relaxed);
        freed
    }
}

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
fn workload(
    g: &'static MemoryGovernor,
    c: &SpillController,
) -> (Vec<Reservation<'static>>, Outcome) {
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
    g: &'static MemoryGovernor,
    c: SpillController,
    handlers: Vec<Arc<Chunks>>,
}

fn setup() -> Setup {
    let g: &'static MemoryGovernor = Box::leak(Box::new(MemoryGovernor::with_batch(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 10 * MIB, 80 * MIB)
            .engine(EngineId::Timeseries, 10 * MIB, 60 * MIB)
            .engine(EngineId::Query, 10 * MIB, 60 * MIB)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        0,
    )));
    let c = SpillController::new(SpillConfig::default()).unwrap();
    // Vector's caches borrow from the pool and can be spilled.
    let handlers: Vec<Arc<Chunks>> = [(EngineId::Vector, 30), (EngineId::Timeseries, 5)]
        .into_iter()
        .map(|(engine, mib)| {
            Arc::new(Chunks {
                engine,
                held: Mutex::new(
                    (0..mib)
                        .map(|_| g.try_reserve(engine, MIB).unwrap())
                        .collect(),
                ),
                spilled: AtomicU64::new(0),
            })
        })
        .collect();
    Setup { g, c, handlers }
}

fn check_accounting(s: &Setup, live: &[Reservation<'static>], label: &str) {
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
    let regs: Vec<_> = base
        .handlers
        .iter()
        .map(|h| base.c.register(h.engine, h.clone()))
        .collect();
    let (live, out) = workload(base.g, &base.c);
    assert_eq!(out.clean_errors, 0, "the baseline workload fits");
    assert_eq!(base.c.spilled_bytes_total(), 0);
    check_accounting(&base, &live, "baseline");
    let attempts = out.attempts;
    drop((live, regs));

    for n in 1..=attempts {
        let s = setup();
        let regs: Vec<_> = s
            .handlers
            .iter()
            .map(|h| s.c.register(h.engine, h.clone()))
            .collect();
        s.g.refuse_nth_reservation(n);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| workload(s.g, &s.c)));
        let (live, out) = result.unwrap_or_else(|_| panic!("refusing reservation {n} panicked"));
        assert_eq!(s.g.injected_refusals(), 1, "reservation {n} was refused");
        let spilled = s.c.spilled_bytes_total() > 0;
        assert!(
            spilled || out.clean_errors == 1,
            "refusal {n}: neither a spill nor a clean error ({out:?})"
        );
        check_accounting(&s, &live, &format!("refusal {n}"));
        drop((live, regs));
        let handlers_left: u64 = s.handlers.iter().map(|h| h.reclaimable_bytes()).sum();
        assert_eq!(
            s.g.total_bytes(),
            handlers_left,
            "refusal {n}: bytes leaked"
        );
    }
}
