//! Property tests of the reservation core against a reference model: for
//! any sequence of reservations, growth, shrinking, splitting, frees,
//! charges, rebalancing rounds and limit changes,
//! * every decision (admit or refuse, and which refusal) equals the model's,
//!   so refusals are a function of the state alone (deterministic);
//! * the reservations held add up to each engine's counter, and the
//!   counters to the total;
//! * without charges, no engine is above its cap (unless a loan it
//!   borrowed was just taken back: it keeps what it holds, and spills) and
//!   the total never above the ceiling;
//! * caps never go below floors, and the configured caps are what every
//!   cap returns to when loans end.
//!
//! Caps move by loans, whose rules ([`nodedb_governor::lending`]) have tests
//! of their own; the model takes the caps in force from the governor after
//! each step and checks every decision against them.

use std::time::{Duration, Instant};

use nodedb_governor::{Budget, EngineId, MemError, MemoryGovernor, Reservation, ThresholdsHandle};
use proptest::prelude::*;

const CEILING: u64 = 100;
const ENGINES: [EngineId; 3] = [EngineId::Vector, EngineId::Timeseries, EngineId::Query];

#[derive(Clone, Debug)]
enum Op {
    Reserve(usize, u64),
    Grow(usize, u64),
    Shrink(usize, u64),
    Split(usize, u64),
    Free(usize),
    Charge(usize, u64),
    /// A rebalancing round this many milliseconds after the last step.
    Rebalance(u64),
    SetLimits(usize, u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3usize, 0..60u64).prop_map(|(e, n)| Op::Reserve(e, n)),
        3 => (0..8usize, 0..40u64).prop_map(|(r, n)| Op::Grow(r, n)),
        2 => (0..8usize, 0..40u64).prop_map(|(r, n)| Op::Shrink(r, n)),
        1 => (0..8usize, 0..40u64).prop_map(|(r, n)| Op::Split(r, n)),
        2 => (0..8usize).prop_map(Op::Free),
        1 => (0..3usize, 0..20u64).prop_map(|(e, n)| Op::Charge(e, n)),
        2 => (0..700u64).prop_map(Op::Rebalance),
        1 => (0..3usize, 0..40u64, 0..101u64).prop_map(|(e, f, c)| Op::SetLimits(e, f, c)),
    ]
}

/// The reference: the admission rule written out plainly.
#[derive(Clone, Debug)]
struct Model {
    /// Bytes in one unit of the figures below.
    unit: u64,
    floor: [u64; 3],
    /// The caps in force, in bytes, as the governor last reported them
    /// (loans move caps by amounts that need not be whole units).
    cap_bytes: [u64; 3],
    /// The configured caps.
    configured: [u64; 3],
    used: [u64; 3],
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    Budget,
    Global,
}

impl Model {
    fn protected(&self, e: usize) -> u64 {
        self.floor[e].saturating_sub(self.used[e])
    }

    fn admit(&mut self, e: usize, n: u64) -> Verdict {
        let u = self.unit;
        // A zero-byte request is a probe: it needs one byte of room.
        let need = (n * u).max(1);
        let total: u64 = self.used.iter().sum();
        let others: u64 = (0..3).filter(|&x| x != e).map(|x| self.protected(x)).sum();
        let free = CEILING.saturating_sub(total).saturating_sub(others) * u;
        let v = if self.used[e] * u + need > self.cap_bytes[e] {
            Verdict::Budget
        } else if need > free {
            Verdict::Global
        } else {
            Verdict::Ok
        };
        if v == Verdict::Ok {
            self.used[e] += n;
        }
        v
    }
}

fn verdict<T>(r: &Result<T, MemError>) -> Verdict {
    match r {
        Ok(_) => Verdict::Ok,
        Err(MemError::BudgetExceeded { .. }) => Verdict::Budget,
        Err(MemError::GlobalCeilingExceeded { .. }) => Verdict::Global,
        Err(e) => panic!("unexpected error {e:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Every decision under the lock.
    #[test]
    fn exact_decisions_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        check(ops, 1, 0)?;
    }

    /// Sizes in 64 KiB units with a one-unit credit batch: the thread-local
    /// fast path is on whenever an engine has 2 x cores units of headroom,
    /// and must decide exactly as the model does.
    #[test]
    fn fast_path_decisions_match_the_model(ops in prop::collection::vec(op(), 1..80)) {
        check(ops, 64 * 1024, 64 * 1024)?;
    }
}

fn check(ops: Vec<Op>, unit: u64, batch: u64) -> Result<(), TestCaseError> {
    {
        let g = MemoryGovernor::with_batch(
            Budget::builder(CEILING * unit)
                .engine(ENGINES[0], 20 * unit, 80 * unit)
                .engine(ENGINES[1], 10 * unit, 60 * unit)
                .engine(ENGINES[2], 30 * unit, 100 * unit)
                .build()
                .unwrap(),
            ThresholdsHandle::default(),
            batch,
        );
        let mut m = Model {
            unit,
            floor: [20, 10, 30],
            cap_bytes: [80 * unit, 60 * unit, 100 * unit],
            configured: [80, 60, 100],
            used: [0; 3],
        };
        let mut held: Vec<(usize, Reservation)> = Vec::new();
        let mut charged = false;
        let mut now = Instant::now();
        // Engines whose cap a take-back lowered below what they hold.
        let mut over = [false; 3];
        for op in ops {
            match op {
                Op::Reserve(e, n) => {
                    let r = g.try_reserve(ENGINES[e], n * unit);
                    prop_assert_eq!(verdict(&r), m.admit(e, n));
                    if let Ok(r) = r {
                        held.push((e, r));
                    }
                }
                Op::Grow(i, n) if i < held.len() => {
                    let e = held[i].0;
                    let r = held[i].1.try_grow(n * unit);
                    prop_assert_eq!(verdict(&r), m.admit(e, n));
                }
                Op::Shrink(i, n) if i < held.len() => {
                    let (e, r) = &mut held[i];
                    let ok = n * unit <= r.size();
                    prop_assert_eq!(r.shrink(n * unit).is_ok(), ok);
                    if ok {
                        m.used[*e] -= n;
                    }
                }
                Op::Split(i, n) if i < held.len() => {
                    let e = held[i].0;
                    if let Ok(part) = held[i].1.split(n * unit) {
                        held.push((e, part));
                    }
                }
                Op::Free(i) if i < held.len() => {
                    let (e, r) = held.swap_remove(i);
                    m.used[e] -= r.size() / unit;
                    r.free();
                }
                Op::Charge(e, n) => {
                    held.push((e, g.charge(ENGINES[e], n * unit).unwrap()));
                    m.used[e] += n;
                    charged |= n > 0;
                }
                Op::Rebalance(ms) => {
                    now += Duration::from_millis(ms);
                    g.flush_thread_credit();
                    g.rebalance_at(now);
                }
                Op::SetLimits(e, f, c) => {
                    let floors: u64 = m.floor.iter().sum::<u64>() - m.floor[e] + f;
                    let ok = f <= c && c <= CEILING && c >= m.used[e] && floors <= CEILING;
                    prop_assert_eq!(g.set_limits(ENGINES[e], f * unit, c * unit).is_ok(), ok);
                    if ok {
                        m.floor[e] = f;
                        m.configured[e] = c;
                    }
                }
                _ => {}
            }
            // Credit held by this thread counts in the ledger; nothing else
            // may differ from the model and the guards.
            g.flush_thread_credit();
            let loans = g.loans();
            for (e, id) in ENGINES.iter().enumerate() {
                let u = g.usage(*id).unwrap();
                let guards: u64 = held
                    .iter()
                    .filter(|(x, _)| *x == e)
                    .map(|(_, r)| r.size())
                    .sum();
                prop_assert_eq!(u.used_bytes, m.used[e] * unit);
                prop_assert_eq!(u.used_bytes, guards);
                prop_assert!(u.cap_bytes >= u.floor_bytes);
                prop_assert!(u.cap_bytes <= CEILING * unit);
                if loans.is_empty() {
                    prop_assert_eq!(u.cap_bytes, m.configured[e] * unit);
                }
                let lent: u64 = loans
                    .iter()
                    .filter(|l| l.lender == *id)
                    .map(|l| l.bytes)
                    .sum();
                prop_assert_eq!(u.lent_bytes, lent);
                // A cap that fell below what the engine holds: a borrower
                // whose loan was taken back.
                if u.cap_bytes < m.cap_bytes[e] && u.used_bytes > u.cap_bytes {
                    over[e] = true;
                }
                if u.used_bytes <= u.cap_bytes {
                    over[e] = false;
                }
                if !charged {
                    prop_assert!(u.used_bytes <= u.cap_bytes || over[e]);
                }
                m.cap_bytes[e] = u.cap_bytes;
            }
            // Loans move budget, never make it.
            let caps: u64 = ENGINES
                .iter()
                .map(|id| g.usage(*id).unwrap().cap_bytes)
                .sum();
            prop_assert!(caps <= m.configured.iter().sum::<u64>() * unit);
            prop_assert_eq!(g.total_bytes(), m.used.iter().sum::<u64>() * unit);
            if !charged {
                prop_assert!(g.total_bytes() <= CEILING * unit);
            }
        }
        drop(held);
        g.flush_thread_credit();
        prop_assert_eq!(g.total_bytes(), 0);
    }
    Ok(())
}
