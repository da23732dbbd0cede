//! The batched thread-local fast path under real threads: credit comes back
//! when a thread exits, and engines that cross between the fast and the
//! exact path under contention never take the total past the ceiling nor
//! lose a byte.

use std::{sync::Arc, thread};

use nodedb_governor::{Budget, EngineId, MemoryGovernor, Reservation};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[test]
fn a_threads_credit_comes_back_when_it_exits() {
    let g = Arc::new(MemoryGovernor::new(
        Budget::builder(1024 * MIB)
            .engine(EngineId::Vector, 0, 1024 * MIB)
            .build()
            .unwrap(),
    ));
    let g2 = g.clone();
    // A plain thread: its join waits for thread-local destructors, which a
    // scoped thread's does not.
    thread::spawn(move || {
        let r = g2.try_reserve(EngineId::Vector, 4 * KIB).unwrap();
        drop(r);
        assert!(g2.total_bytes() > 0, "the thread keeps a batch of credit");
    })
    .join()
    .unwrap();
    assert_eq!(g.total_bytes(), 0, "the exiting thread returned its credit");
}

/// A small xorshift, so the workload is the same on every run.
fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn contended_reservations_across_the_fast_and_exact_paths_stay_exact() {
    let ceiling = 64 * MIB;
    let g = MemoryGovernor::new(
        Budget::builder(ceiling)
            .engine(EngineId::Vector, 8 * MIB, 48 * MIB)
            .engine(EngineId::Query, 8 * MIB, 48 * MIB)
            .build()
            .unwrap(),
    );
    let (refused, admitted) = thread::scope(|s| {
        let workers: Vec<_> = (0..4u64)
            .map(|w| {
                let g = &g;
                s.spawn(move || {
                    let engine = if w % 2 == 0 {
                        EngineId::Vector
                    } else {
                        EngineId::Query
                    };
                    let mut seed = 0x9e37_79b9_7f4a_7c15 ^ (w + 1);
                    let mut held: Vec<Reservation> = Vec::new();
                    let (mut refused, mut admitted) = (0u64, 0u64);
                    for i in 0..20_000 {
                        let r = rng(&mut seed);
                        if held.len() < 24 && !r.is_multiple_of(3) {
                            // Mostly small, sometimes a large block.
                            let size = if r.is_multiple_of(5) {
                                4 * MIB
                            } else {
                                (r >> 8) % (64 * KIB) + 1
                            };
                            match g.try_reserve(engine, size) {
                                Ok(res) => {
                                    admitted += 1;
                                    held.push(res);
                                }
                                Err(_) => refused += 1,
                            }
                        } else if !held.is_empty() {
                            let i = (r >> 16) as usize % held.len();
                            drop(held.swap_remove(i));
                        }
                        if i % 256 == 0 {
                            let t = g.total_bytes();
                            assert!(t <= ceiling, "total {t} above the ceiling");
                        }
                    }
                    (refused, admitted)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    });
    assert!(
        refused > 0 && admitted > 0,
        "both paths exercised: {admitted} admitted, {refused} refused"
    );
    assert_eq!(g.total_bytes(), 0, "every byte and every credit came back");
    for u in g.usages() {
        assert_eq!(u.used_bytes, 0, "{} still holds bytes", u.name);
        assert!(
            u.peak_bytes <= u.cap_bytes,
            "{} peaked above its cap",
            u.name
        );
        assert!(
            u.peak_bytes > u.cap_bytes / 2,
            "{} never neared its cap",
            u.name
        );
    }
}
