//! What the database holds outside the books (`set_outside_bytes`, the
//! agent's `outside`) takes room from reservations, but never an engine's
//! floor. A probe installed (`set_outside_probe`) is read before a
//! decision that would leave less than a quarter of the ceiling, with the
//! books and the ceiling of the moment, and a figure set while it is read
//! wins over what it read.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use nodedb_governor::{Budget, EngineId, MemError, MemoryGovernor, OutsideProbe};

const MIB: u64 = 1 << 20;

#[test]
fn memory_outside_the_books_takes_room_but_never_a_floor() {
    let governor = MemoryGovernor::new(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 20 * MIB, 80 * MIB)
            .engine(EngineId::Query, 0, 80 * MIB)
            .build()
            .unwrap(),
    );
    governor.set_outside_bytes(95 * MIB);
    assert_eq!(governor.outside_bytes(), 95 * MIB);
    // Query: 100 - 95, less Vector's unused floor (20): nothing.
    assert!(matches!(
        governor.try_reserve(EngineId::Query, MIB),
        Err(MemError::GlobalCeilingExceeded { .. })
    ));
    // Vector: its floor, whatever is held outside, and not a byte more.
    let floor = governor.try_reserve(EngineId::Vector, 20 * MIB).unwrap();
    assert!(governor.try_reserve(EngineId::Vector, MIB).is_err());
    drop(floor);
    // Less outside, more room: 100 - 30 - 20 (Vector's floor, unused).
    governor.set_outside_bytes(30 * MIB);
    let q = governor.try_reserve(EngineId::Query, 50 * MIB).unwrap();
    assert!(governor.try_reserve(EngineId::Query, MIB).is_err());
    drop(q);
    // None: the books alone.
    governor.set_outside_bytes(0);
    assert!(governor.try_reserve(EngineId::Query, 80 * MIB).is_ok());
}

/// A governor of the query engine alone, all of a 100 MiB ceiling its
/// budget, its threads drawing credit `batch` bytes at a time (0: none).
fn query_only(batch: u64) -> MemoryGovernor {
    MemoryGovernor::with_batch(
        Budget::builder(100 * MIB)
            .engine(EngineId::Query, 0, 100 * MIB)
            .build()
            .unwrap(),
        Default::default(),
        batch,
    )
}

#[test]
fn the_probe_is_read_only_near_the_ceiling_with_the_books_of_the_moment() {
    // No thread-local credit: the books are the reservations, exactly.
    let governor = query_only(0);
    // The kernel's figure for what the database holds, as the test sets it.
    let held = Arc::new(AtomicU64::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let probe: OutsideProbe = {
        let (held, calls) = (held.clone(), calls.clone());
        Arc::new(move |books, ceiling| {
            calls.lock().unwrap().push((books, ceiling));
            Some(held.load(Ordering::Relaxed).saturating_sub(books))
        })
    };
    governor.set_outside_probe(Some(probe));
    // 60 of 100 leaves 40: not read.
    held.store(90 * MIB, Ordering::Relaxed);
    let a = governor.try_reserve(EngineId::Query, 60 * MIB).unwrap();
    assert!(calls.lock().unwrap().is_empty());
    assert_eq!(governor.outside_bytes(), 0);
    // 20 more would leave 20 (under 25): read with the books (60) and the
    // ceiling; 90 held, so 30 outside and 10 of room.
    assert!(matches!(
        governor.try_reserve(EngineId::Query, 20 * MIB),
        Err(MemError::GlobalCeilingExceeded { available, .. }) if available == 10 * MIB
    ));
    assert_eq!(*calls.lock().unwrap(), vec![(60 * MIB, 100 * MIB)]);
    // Read now whatever the room, for memory about to be used unreserved.
    held.store(70 * MIB, Ordering::Relaxed);
    assert_eq!(governor.refresh_outside(), 10 * MIB);
    let b = governor.try_reserve(EngineId::Query, 30 * MIB).unwrap();
    // Removed: not read again, and the last figure stays until set.
    governor.set_outside_probe(None);
    let n = calls.lock().unwrap().len();
    drop(b);
    assert!(governor.try_reserve(EngineId::Query, 35 * MIB).is_err());
    assert_eq!(calls.lock().unwrap().len(), n);
    assert_eq!(governor.refresh_outside(), 10 * MIB);
    drop(a);
}

#[test]
fn a_figure_set_while_the_probe_is_read_wins_over_the_reading() {
    let governor = query_only(0);
    // The agent's figure (7 MiB) arrives while the probe reads 50.
    let g = governor.clone();
    governor.set_outside_probe(Some(Arc::new(move |_, _| {
        g.set_outside_bytes(7 * MIB);
        Some(50 * MIB)
    })));
    assert_eq!(governor.refresh_outside(), 7 * MIB);
    // With nothing set in between, the reading lands.
    governor.set_outside_probe(Some(Arc::new(|_, _| Some(50 * MIB))));
    assert_eq!(governor.refresh_outside(), 50 * MIB);
    governor.set_outside_probe(None);
}

#[test]
fn with_thread_local_credit_a_reservation_near_the_ceiling_still_reads_the_probe() {
    // The default batch: small reservations draw credit from the ledger a
    // batch at a time (or go exact where the fast path is shut); either
    // way, near the ceiling the probe decides.
    let governor = query_only(nodedb_governor::DEFAULT_BATCH_BYTES);
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    governor.set_outside_probe(Some(Arc::new(move |_, _| {
        c.fetch_add(1, Ordering::Relaxed);
        Some(40 * MIB)
    })));
    // Far from the ceiling (in small steps, through credit): not read.
    let mut held = Vec::new();
    for _ in 0..40 {
        held.push(governor.try_reserve(EngineId::Query, MIB).unwrap());
    }
    assert_eq!(calls.load(Ordering::Relaxed), 0);
    // Read once the room as the governor sees it (its books and a figure
    // of 0 outside) is within a quarter of the ceiling, about 75 MiB in
    // (a batch of credit either side), and refused from then on: 40 MiB
    // outside leave none.
    let mut refused = false;
    for _ in 0..40 {
        match governor.try_reserve(EngineId::Query, MIB) {
            Ok(r) => held.push(r),
            Err(MemError::GlobalCeilingExceeded { .. }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused, "{} MiB admitted", held.len());
    assert!(calls.load(Ordering::Relaxed) >= 1);
    assert_eq!(governor.outside_bytes(), 40 * MIB);
    let books = governor.total_bytes();
    assert!((72 * MIB..=76 * MIB).contains(&books), "{books}");
    assert!(governor.try_reserve(EngineId::Query, MIB).is_err());
    governor.set_outside_probe(None);
}

#[test]
fn a_slow_probe_is_read_at_most_a_hundredth_of_the_time() {
    // No thread-local credit: every reservation decides at the ledger.
    let governor = query_only(0);
    let reads = Arc::new(AtomicU64::new(0));
    // A read that takes 2 ms (a cgroup v2 `memory.stat` under emulation
    // can): after it, the next waits at least 200 ms, not one.
    let probe: OutsideProbe = {
        let reads = reads.clone();
        Arc::new(move |_, _| {
            reads.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Some(0)
        })
    };
    governor.set_outside_probe(Some(probe.clone()));
    // 80 of 100 MiB held: every further MiB leaves under a quarter.
    let _held = governor.try_reserve(EngineId::Query, 80 * MIB).unwrap();
    let start = std::time::Instant::now();
    let mut tries = 0;
    while start.elapsed() < std::time::Duration::from_millis(90) {
        drop(governor.try_reserve(EngineId::Query, MIB).unwrap());
        tries += 1;
        // The link installs the probe again with every figure the agent
        // sends: that does not start the spacing over.
        if tries % 10 == 0 {
            governor.set_outside_probe(Some(probe.clone()));
        }
    }
    let read = reads.load(Ordering::Relaxed);
    // The first reservation read it; in the 90 ms after, 2 ms reads once a
    // millisecond would have been read some 30 times (and the next read is
    // due 100 ms after the first at the latest, not 200).
    assert!(tries > 30, "{tries} reservations");
    assert!(
        (1..=2).contains(&read),
        "read {read} times in {tries} reservations"
    );
    // Counted, with the time the reads took.
    let (counted, took) = governor.outside_probe_reads();
    assert_eq!(counted, read);
    assert!(
        took >= std::time::Duration::from_millis(2 * read),
        "{took:?}"
    );
    // Asked for, it is read all the same.
    governor.refresh_outside();
    assert_eq!(reads.load(Ordering::Relaxed), read + 1);
}
