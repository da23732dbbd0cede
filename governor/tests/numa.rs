//! The budget split across NUMA nodes: a reservation is charged to the node
//! of the thread that makes it, by the engine's policy; refusals name the
//! node; a reservation gives its bytes back to the nodes they were charged
//! to, whichever thread drops it.
//!
//! The host has one node, so these tests treat each of two CPUs as a node
//! (a [`Topology`] of the CPUs the test may run on) and pin their threads:
//! the governor finds the node from the CPU the thread runs on, as on a
//! machine of two nodes. The two-node VM runs the same library against the
//! kernel's own topology.

mod common;

use std::sync::Mutex;

use common::{pin, two_cpus};

use nodedb_governor::{
    Budget, EngineId, Holders, MemError, MemoryGovernor, Node, NumaPolicy, Reservation,
    ThresholdsHandle, Topology,
};

const MIB: u64 = 1 << 20;

/// Pinning changes the test thread's CPU: one test at a time.
static PINNED: Mutex<()> = Mutex::new(());

/// Undoes `pin`: every CPU the process had.
struct Unpin(libc::cpu_set_t);

impl Unpin {
    fn new() -> Self {
        // SAFETY: as in two_cpus.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as in two_cpus.
        unsafe { libc::sched_getaffinity(0, size_of_val(&set), &mut set) };
        Self(set)
    }
}

impl Drop for Unpin {
    fn drop(&mut self) {
        // SAFETY: the set is ours and sized as passed.
        unsafe { libc::sched_setaffinity(0, size_of_val(&self.0), &self.0) };
    }
}

/// Node 0 is CPU `a`, node 1 is CPU `b` (kernel ids 0 and 1), 1 GiB each.
fn topology((a, b): (u32, u32)) -> Topology {
    Topology::new(vec![
        Node {
            id: 0,
            cpus: vec![a],
            memory_bytes: 1 << 30,
        },
        Node {
            id: 1,
            cpus: vec![b],
            memory_bytes: 1 << 30,
        },
    ])
    .expect("two nodes")
}

/// A 200 MiB ceiling split evenly; vector (cap 100 MiB: 50 per node) under
/// `policy`, query (cap 100 MiB) prefer-local. `batch` 0: every decision
/// exact.
fn governor(cpus: (u32, u32), policy: NumaPolicy, batch: u64) -> MemoryGovernor {
    let budget = Budget::builder(200 * MIB)
        .engine(EngineId::Vector, 0, 100 * MIB)
        .engine(EngineId::Query, 0, 100 * MIB)
        .numa(topology(cpus))
        .engine_numa(EngineId::Vector, policy, None)
        .build()
        .expect("budget");
    MemoryGovernor::with_batch(budget, ThresholdsHandle::default(), batch)
}

fn used(g: &MemoryGovernor, e: EngineId) -> Vec<u64> {
    g.node_usage(e)
        .unwrap()
        .iter()
        .map(|n| n.used_bytes)
        .collect()
}

#[test]
fn strict_refuses_on_the_exhausted_node_while_the_other_has_room() {
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    let g = governor(cpus, NumaPolicy::Strict, 0);
    pin(cpus.1);
    let r = g
        .try_reserve(EngineId::Vector, 40 * MIB)
        .expect("fits on node 1");
    assert_eq!(r.node_bytes(), [(1, 40 * MIB)]);
    let err = g.try_reserve(EngineId::Vector, 20 * MIB).unwrap_err();
    assert_eq!(
        err,
        MemError::NodeBudgetExceeded {
            engine: "vector".into(),
            node: 1,
            requested: 20 * MIB,
            available: 10 * MIB,
            limit: 50 * MIB,
            holders: Holders::of(&[(EngineId::Vector, 40 * MIB)]),
        },
        "{err}"
    );
    assert!(err.to_string().contains("NUMA node 1"), "{err}");
    assert!(
        err.to_string()
            .ends_with("; largest holders: vector 40.0 MiB"),
        "{err}"
    );
    // The engine has 60 MiB of its cap left, 50 of it on node 0.
    assert_eq!(g.usage(EngineId::Vector).unwrap().used_bytes, 40 * MIB);
    let nodes = g.node_usage(EngineId::Vector).unwrap();
    assert_eq!(nodes[1].rejections, 1);
    assert_eq!(nodes[0].rejections, 0);
    // On node 0 the same request fits.
    pin(cpus.0);
    let r0 = g
        .try_reserve(EngineId::Vector, 20 * MIB)
        .expect("fits on node 0");
    assert_eq!(r0.node_bytes(), [(0, 20 * MIB)]);
    assert_eq!(used(&g, EngineId::Vector), [20 * MIB, 40 * MIB]);
    drop((r, r0));
    assert_eq!(used(&g, EngineId::Vector), [0, 0]);
    assert_eq!(g.total_bytes(), 0);
}

#[test]
fn prefer_local_borrows_the_other_nodes_share_and_reports_it_remote() {
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    for batch in [0, nodedb_governor::DEFAULT_BATCH_BYTES] {
        let g = governor(cpus, NumaPolicy::PreferLocal, batch);
        pin(cpus.1);
        let mut r = g.reservation(EngineId::Vector).unwrap();
        r.try_grow(45 * MIB).expect("local");
        // 5 MiB left on node 1 (less any credit drawn there): the rest
        // goes to node 0, counted as remote.
        r.try_grow(20 * MIB).expect("borrowed from node 0");
        g.flush_thread_credit();
        let nodes = g.node_usage(EngineId::Vector).unwrap();
        assert_eq!(nodes[0].used_bytes, 20 * MIB, "batch {batch}: {nodes:?}");
        assert_eq!(nodes[0].remote_bytes, 20 * MIB, "batch {batch}: {nodes:?}");
        assert_eq!(nodes[1].used_bytes, 45 * MIB, "batch {batch}: {nodes:?}");
        assert_eq!(nodes[1].remote_bytes, 0);
        let mut held = r.node_bytes();
        held.sort();
        assert_eq!(held, [(0, 20 * MIB), (1, 45 * MIB)]);
        // Over both shares together: refused, naming the thread's node.
        let err = r.try_grow(40 * MIB).unwrap_err();
        assert!(
            matches!(err, MemError::BudgetExceeded { .. }),
            "batch {batch}: {err}"
        );
        let err = r.try_grow(31 * MIB).unwrap_err();
        assert!(
            matches!(err, MemError::NodeBudgetExceeded { node: 1, .. }),
            "batch {batch}: {err}"
        );
        // Shrinking gives back to the nodes the bytes are on, and the
        // books never go below zero on either.
        r.shrink(30 * MIB).unwrap();
        let left: u64 = used(&g, EngineId::Vector).iter().sum();
        assert_eq!(left, 35 * MIB, "batch {batch}");
        let split = r.split(10 * MIB).unwrap();
        drop(r);
        g.flush_thread_credit();
        assert_eq!(
            used(&g, EngineId::Vector).iter().sum::<u64>(),
            10 * MIB,
            "batch {batch}"
        );
        drop(split);
        g.flush_thread_credit();
        assert_eq!(used(&g, EngineId::Vector), [0, 0], "batch {batch}");
        assert_eq!(g.total_bytes(), 0, "batch {batch}");
    }
}

#[test]
fn the_node_ceiling_binds_engines_together() {
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    // Node 1 gets a quarter of the ceiling (50 MiB); each engine's cap
    // splits evenly by its own weights.
    let budget = Budget::builder(200 * MIB)
        .engine(EngineId::Vector, 0, 100 * MIB)
        .engine(EngineId::Query, 0, 100 * MIB)
        .numa_weights(topology(cpus), vec![3, 1])
        .engine_numa(EngineId::Vector, NumaPolicy::Strict, Some(vec![1, 1]))
        .engine_numa(EngineId::Query, NumaPolicy::Strict, Some(vec![1, 1]))
        .build()
        .unwrap();
    let g = MemoryGovernor::with_batch(budget, ThresholdsHandle::default(), 0);
    assert_eq!(
        g.node_totals()
            .iter()
            .map(|n| n.ceiling_bytes)
            .collect::<Vec<_>>(),
        [150 * MIB, 50 * MIB]
    );
    pin(cpus.1);
    let _v = g.try_reserve(EngineId::Vector, 30 * MIB).unwrap();
    let err = g.try_reserve(EngineId::Query, 30 * MIB).unwrap_err();
    assert_eq!(
        err,
        MemError::NodeCeilingExceeded {
            engine: "query".into(),
            node: 1,
            requested: 30 * MIB,
            available: 20 * MIB,
            limit: 50 * MIB,
            holders: Holders::of(&[(EngineId::Vector, 30 * MIB)]),
        }
    );
}

#[test]
fn interleave_spreads_wherever_the_thread_runs() {
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    let g = governor(
        cpus,
        NumaPolicy::Interleave,
        nodedb_governor::DEFAULT_BATCH_BYTES,
    );
    pin(cpus.0);
    let held: Vec<Reservation> = (0..10)
        .map(|_| g.try_reserve(EngineId::Vector, 8 * MIB).unwrap())
        .collect();
    assert_eq!(used(&g, EngineId::Vector), [40 * MIB, 40 * MIB]);
    let err = g.try_reserve(EngineId::Vector, 11 * MIB).unwrap_err();
    assert!(matches!(err, MemError::NodeBudgetExceeded { .. }), "{err}");
    drop(held);
    assert_eq!(used(&g, EngineId::Vector), [0, 0]);
    assert_eq!(g.node_usage(EngineId::Vector).unwrap()[0].remote_bytes, 0);
}

#[test]
fn a_reservation_goes_back_to_its_nodes_from_another_thread() {
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    let g = governor(
        cpus,
        NumaPolicy::Strict,
        nodedb_governor::DEFAULT_BATCH_BYTES,
    );
    // Made on node 1 through the fast path (credit drawn there)...
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            pin(cpus.1);
            let mut r = g.reservation(EngineId::Vector).unwrap();
            for _ in 0..64 {
                r.try_grow(64 << 10).unwrap();
            }
            r
        })
        .join()
        .unwrap()
    });
    // ...the thread's credit went back when it exited.
    assert_eq!(used(&g, EngineId::Vector), [0, 4 * MIB]);
    // ...dropped on node 0: node 1's books go down, node 0's stay.
    pin(cpus.0);
    drop(r);
    g.flush_thread_credit();
    assert_eq!(used(&g, EngineId::Vector), [0, 0]);
    assert_eq!(g.total_bytes(), 0);
}

#[test]
fn a_migrating_thread_charges_its_new_node_once_its_credit_is_spent() {
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    let batch = nodedb_governor::DEFAULT_BATCH_BYTES;
    let g = governor(cpus, NumaPolicy::PreferLocal, batch);
    pin(cpus.0);
    let mut r = g.reservation(EngineId::Vector).unwrap();
    r.try_grow(4096).unwrap();
    pin(cpus.1);
    // The credit drawn on node 0 (a batch) is spent there first: at most
    // a batch of the thread's memory is charged to the node it left.
    let mut grown = 4096;
    while grown < 8 * MIB {
        r.try_grow(4096).unwrap();
        grown += 4096;
    }
    g.flush_thread_credit();
    let on = used(&g, EngineId::Vector);
    assert_eq!(on[0] + on[1], 8 * MIB);
    assert!(on[0] <= batch + 4096, "{on:?}");
    assert!(on[1] >= 8 * MIB - batch - 4096, "{on:?}");
    drop(r);
    g.flush_thread_credit();
    assert_eq!(used(&g, EngineId::Vector), [0, 0]);
}

#[test]
fn a_budget_split_badly_is_refused_naming_the_field() {
    let t = Topology::new(vec![
        Node {
            id: 0,
            cpus: vec![0],
            memory_bytes: 1 << 30,
        },
        Node {
            id: 1,
            cpus: vec![1],
            memory_bytes: 1 << 30,
        },
    ])
    .unwrap();
    let base = || Budget::builder(100).engine(EngineId::Vector, 0, 100);
    for (b, field) in [
        (base().numa_weights(t.clone(), vec![1]), "numa.node_weights"),
        (
            base().numa_weights(t.clone(), vec![0, 0]),
            "numa.node_weights",
        ),
        (
            base().numa(t.clone()).engine_numa(
                EngineId::Vector,
                NumaPolicy::Strict,
                Some(vec![1, 2, 3]),
            ),
            "engine vector.node_weights",
        ),
        (
            base()
                .numa(t.clone())
                .engine_numa(EngineId::Query, NumaPolicy::Strict, None),
            "engine query.numa",
        ),
        (
            base().engine_numa(EngineId::Vector, NumaPolicy::Strict, Some(vec![1])),
            "engine vector.node_weights",
        ),
    ] {
        let e = b.build().expect_err(field).to_string();
        assert!(e.contains(field), "{e:?} should name {field}");
    }
    let e = Topology::new(vec![
        Node {
            id: 3,
            cpus: vec![0],
            memory_bytes: 1,
        },
        Node {
            id: 3,
            cpus: vec![1],
            memory_bytes: 1,
        },
    ])
    .unwrap_err()
    .to_string();
    assert!(e.contains("node 3 appears twice"), "{e}");
}

#[test]
fn one_node_keeps_no_node_books() {
    let t = Topology::new(vec![Node {
        id: 0,
        cpus: vec![0, 1],
        memory_bytes: 1 << 30,
    }])
    .unwrap();
    let g = MemoryGovernor::new(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 0, 100 * MIB)
            .numa(t)
            .build()
            .unwrap(),
    );
    let r = g.try_reserve(EngineId::Vector, MIB).unwrap();
    assert_eq!(r.node_bytes(), [(0, MIB)]);
    assert!(g.node_usage(EngineId::Vector).unwrap().is_empty());
    assert!(g.node_totals().is_empty());
}

#[test]
fn a_bounded_wait_waits_for_room_on_the_node_and_refuses_what_never_fits_there() {
    use std::time::{Duration, Instant};
    let Some(cpus) = two_cpus() else { return };
    let _one = PINNED.lock().unwrap_or_else(|p| p.into_inner());
    let _unpin = Unpin::new();
    let g = governor(cpus, NumaPolicy::Strict, 0);
    pin(cpus.0);
    // Above the engine's 50 MiB share of node 0: at once, however long
    // the caller would wait.
    let t = Instant::now();
    let err = g
        .reserve_timeout(EngineId::Vector, 60 * MIB, Duration::from_secs(30))
        .unwrap_err();
    assert!(
        matches!(err, MemError::NodeBudgetExceeded { node: 0, .. }),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // Within the share: waits until the holder on node 0 lets go.
    let held = g.try_reserve(EngineId::Vector, 40 * MIB).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(100));
            drop(held);
        });
        let r = g
            .reserve_timeout(EngineId::Vector, 30 * MIB, Duration::from_secs(30))
            .expect("room once the holder lets go");
        assert_eq!(r.node_bytes(), [(0, 30 * MIB)]);
    });
}
