//! Model checking of the reservation core with loom: every interleaving of
//! concurrent reservations, growth, releases and a waiting reservation.
//! Run with `RUSTFLAGS="--cfg nodedb_loom" cargo test -p nodedb-governor
//! --test loom --release` (`cargo xtask test` does).
#![cfg(nodedb_loom)]

use std::time::Duration;

use loom::{sync::Arc, thread};
use nodedb_governor::{Budget, EngineId, MemoryGovernor};

fn governor(ceiling: u64) -> Arc<MemoryGovernor> {
    Arc::new(MemoryGovernor::new(
        Budget::builder(ceiling)
            .engine(EngineId::Vector, 0, ceiling)
            .engine(EngineId::Query, 2, ceiling)
            .build()
            .unwrap(),
    ))
}

#[test]
fn concurrent_reservations_never_pass_the_ceiling_and_all_come_back() {
    loom::model(|| {
        let g = governor(10);
        let g1 = g.clone();
        let t = thread::spawn(move || {
            if let Ok(mut r) = g1.try_reserve(EngineId::Vector, 5) {
                let _ = r.try_grow(3);
                assert!(g1.total_bytes() <= 10);
                let _ = r.shrink(2);
            }
        });
        // Query's floor (2) is protected from Vector: this always fits.
        let q = g
            .try_reserve(EngineId::Query, 2)
            .expect("the Query floor is guaranteed");
        if let Ok(more) = g.try_reserve(EngineId::Query, 3) {
            assert!(g.total_bytes() <= 10);
            drop(more);
        }
        drop(q);
        t.join().unwrap();
        assert_eq!(g.total_bytes(), 0);
        assert_eq!(g.usage(EngineId::Vector).unwrap().used_bytes, 0);
    });
}

#[test]
fn a_waiting_reservation_is_woken_by_a_release() {
    loom::model(|| {
        let g = governor(4);
        let held = g.try_reserve(EngineId::Vector, 2).unwrap();
        let g1 = g.clone();
        let t = thread::spawn(move || {
            // Needs the 2 bytes Vector holds; waits for them.
            let r = g1.reserve_timeout(EngineId::Vector, 2, Duration::from_secs(3600));
            r.map(|r| r.size()).ok()
        });
        drop(held);
        let got = t.join().unwrap();
        // Either it found the room at once or it was woken: never lost.
        assert_eq!(got, Some(2));
        assert_eq!(g.total_bytes(), 0);
    });
}
