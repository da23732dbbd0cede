//! `reserve_timeout`: a reservation that does not fit now waits, bounded,
//! and is admitted as soon as room appears, whether a release makes it or
//! a cap is raised (an agent giving a lender's loans back).

mod common;

use std::time::{Duration, Instant};

use common::{MIB, exact_governor as governor};
use nodedb_governor::{EngineId, MemError};

/// Starts a thread waiting up to `timeout` for `bytes` of Vector; returns
/// its handle (the result and how long it waited).
fn waiter(
    g: &nodedb_governor::MemoryGovernor,
    bytes: u64,
    timeout: Duration,
) -> std::thread::JoinHandle<(Result<u64, MemError>, Duration)> {
    let g = g.clone();
    let h = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = g
            .reserve_timeout(EngineId::Vector, bytes, timeout)
            .map(|r| {
                let size = r.size();
                std::mem::forget(r);
                size
            });
        (r, t0.elapsed())
    });
    // Let it reach the wait.
    std::thread::sleep(Duration::from_millis(50));
    h
}

#[test]
fn a_raised_cap_admits_a_waiting_reservation_at_once() {
    let g = governor(200 * MIB, &[(EngineId::Vector, 0, 50 * MIB)]);
    let _held = g.try_reserve(EngineId::Vector, 40 * MIB).unwrap();
    let h = waiter(&g, 20 * MIB, Duration::from_secs(30));
    assert!(!h.is_finished(), "20 MiB more does not fit a 50 MiB cap");
    g.set_limits(EngineId::Vector, 0, 80 * MIB).unwrap();
    let (r, waited) = h.join().unwrap();
    assert_eq!(r.unwrap(), 20 * MIB);
    assert!(
        waited < Duration::from_secs(10),
        "woken by the raise, not by its timeout: {waited:?}"
    );
    assert_eq!(g.usage(EngineId::Vector).unwrap().used_bytes, 60 * MIB);
}

#[test]
fn a_release_admits_a_waiting_reservation_and_nothing_times_out_silently() {
    let g = governor(200 * MIB, &[(EngineId::Vector, 0, 50 * MIB)]);
    let held = g.try_reserve(EngineId::Vector, 40 * MIB).unwrap();
    let h = waiter(&g, 20 * MIB, Duration::from_secs(30));
    drop(held);
    let (r, waited) = h.join().unwrap();
    assert_eq!(r.unwrap(), 20 * MIB);
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // Neither: refused when the time is up, naming the engine.
    let _more = g.try_reserve(EngineId::Vector, 25 * MIB).unwrap();
    let h = waiter(&g, 20 * MIB, Duration::from_millis(100));
    let (r, _) = h.join().unwrap();
    assert!(
        matches!(&r, Err(MemError::Timeout { engine, requested, .. })
            if engine == "vector" && *requested == 20 * MIB),
        "{r:?}"
    );
    // A request above the cap itself could never fit: refused at once.
    let t0 = Instant::now();
    let err = g
        .reserve_timeout(EngineId::Vector, 60 * MIB, Duration::from_secs(30))
        .unwrap_err();
    assert!(matches!(err, MemError::BudgetExceeded { .. }), "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
}
