//! Reserve + release pairs, side by side in one run: this library's
//! governor (batched fast path, and exact), against DataFusion's
//! `GreedyMemoryPool` and `FairSpillPool`, uncontended and with 2 threads.
//! Each sample is one pair of 4 KiB; with 2 threads, each thread does the
//! pairs and the figure is wall time per pair per thread.
//!
//! Two shapes of pair for the governor:
//! * `held`: `try_grow` + `shrink` on a reservation the thread holds, the
//!   same pair DataFusion's pools are measured with (an operator registers
//!   one `MemoryReservation` and grows and shrinks it): the fair comparison;
//! * `guard`: a new reservation per request, created and dropped.
//!
//! And the batched governor with its budget split across two NUMA nodes
//! (this machine's CPUs split between them by parity), beside the same
//! governor on one node: the fast path's cost of NUMA, same run.

use std::{hint::black_box, sync::Arc, thread, time::Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion_execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryPool, TrackConsumersPool,
};
use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, Node, Reservation, ThresholdsHandle, Topology,
};

const SIZE: u64 = 4096;
const BIG: u64 = 1 << 40;

fn governor(batch: u64) -> MemoryGovernor {
    MemoryGovernor::with_batch(
        Budget::builder(BIG)
            .engine(EngineId::Query, 0, BIG)
            .build()
            .expect("budget"),
        ThresholdsHandle::default(),
        batch,
    )
}

/// The batched governor on two nodes: CPUs split between them by parity.
fn governor_two_nodes() -> MemoryGovernor {
    let cpus = thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let node = |id: u32| Node {
        id,
        cpus: (0..cpus.max(2)).filter(|c| c % 2 == id).collect(),
        memory_bytes: 1 << 30,
    };
    let topology = Topology::new(vec![node(0), node(1)]).expect("two nodes");
    MemoryGovernor::with_batch(
        Budget::builder(BIG)
            .engine(EngineId::Query, 0, BIG)
            .numa(topology)
            .build()
            .expect("budget"),
        ThresholdsHandle::default(),
        nodedb_governor::DEFAULT_BATCH_BYTES,
    )
}

fn governor_pair(g: &MemoryGovernor) {
    let r = g.try_reserve(EngineId::Query, SIZE).expect("fits");
    black_box(&r);
    drop(r);
}

fn governor_held_pair(r: &mut Reservation) {
    r.try_grow(SIZE).expect("fits");
    black_box(&*r);
    r.shrink(SIZE).expect("held");
}

/// The empty reservation a thread holds for `held` pairs.
fn held(g: &MemoryGovernor) -> Reservation {
    g.reservation(EngineId::Query).expect("a budgeted engine")
}

fn pool_pair(r: &mut datafusion_execution::memory_pool::MemoryReservation) {
    r.try_grow(SIZE as usize).expect("fits");
    black_box(&*r);
    r.shrink(SIZE as usize);
}

/// Runs `pair` `iters` times on each of `threads` threads at once, on
/// state each thread makes for itself with `setup` (the reservation it
/// holds, as DataFusion's operators hold one each).
fn concurrent<S>(
    threads: usize,
    iters: u64,
    setup: impl Fn() -> S + Sync,
    pair: impl Fn(&mut S) + Sync,
) -> std::time::Duration {
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut state = setup();
                for _ in 0..iters {
                    pair(&mut state);
                }
            });
        }
    });
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("reserve+release");
    let fast = governor(nodedb_governor::DEFAULT_BATCH_BYTES);
    let exact = governor(0);
    let numa = governor_two_nodes();
    let greedy: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(BIG as usize));
    let fair: Arc<dyn MemoryPool> = Arc::new(FairSpillPool::new(BIG as usize));

    for (name, g) in [
        ("batched", &fast),
        ("batched, 2 NUMA nodes", &numa),
        ("exact", &exact),
    ] {
        group.bench_function(format!("governor ({name}) guard/1 thread"), |b| {
            b.iter(|| governor_pair(g))
        });
        let mut r = held(g);
        group.bench_function(format!("governor ({name}) held/1 thread"), |b| {
            b.iter(|| governor_held_pair(&mut r))
        });
    }
    for (name, pool) in [
        ("datafusion GreedyMemoryPool", &greedy),
        ("datafusion FairSpillPool", &fair),
    ] {
        let mut r = MemoryConsumer::new("q").with_can_spill(true).register(pool);
        group.bench_function(format!("{name}/1 thread"), |b| b.iter(|| pool_pair(&mut r)));
    }

    for (name, g) in [
        ("batched", &fast),
        ("batched, 2 NUMA nodes", &numa),
        ("exact", &exact),
    ] {
        group.bench_function(format!("governor ({name}) guard/2 threads"), |b| {
            b.iter_custom(|iters| concurrent(2, iters, || (), |_| governor_pair(g)))
        });
        group.bench_function(format!("governor ({name}) held/2 threads"), |b| {
            b.iter_custom(|iters| concurrent(2, iters, || held(g), governor_held_pair))
        });
    }
    for (name, pool) in [
        ("datafusion GreedyMemoryPool", &greedy),
        ("datafusion FairSpillPool", &fair),
    ] {
        group.bench_function(format!("{name}/2 threads"), |b| {
            b.iter_custom(|iters| {
                concurrent(
                    2,
                    iters,
                    || MemoryConsumer::new("q").with_can_spill(true).register(pool),
                    pool_pair,
                )
            })
        });
    }
    group.finish();
}

/// A refusal: a request beyond the engine's budget, with three engines
/// holding memory (what a refusal reports), against DataFusion's
/// `GreedyMemoryPool` refusing a request beyond its size, same run.
fn refusal(c: &mut Criterion) {
    let mut group = c.benchmark_group("refusal");
    let g = MemoryGovernor::new(
        Budget::builder(1 << 30)
            .engine(EngineId::Vector, 0, 256 << 20)
            .engine(EngineId::Timeseries, 0, 256 << 20)
            .engine(EngineId::Query, 0, 256 << 20)
            .build()
            .expect("budget"),
    );
    let held: Vec<Reservation> = [EngineId::Vector, EngineId::Timeseries, EngineId::Query]
        .iter()
        .map(|&e| g.try_reserve(e, 100 << 20).unwrap())
        .collect();
    group.bench_function("governor try_reserve beyond the budget", |b| {
        b.iter(|| {
            black_box(
                g.try_reserve(EngineId::Query, black_box(200 << 20))
                    .is_err(),
            )
        })
    });
    let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(256 << 20));
    let r = MemoryConsumer::new("q").register(&pool);
    r.try_grow(100 << 20).unwrap();
    group.bench_function(
        "datafusion GreedyMemoryPool try_grow beyond the pool",
        |b| b.iter(|| black_box(r.try_grow(black_box(200 << 20)).is_err())),
    );
    // Through DataFusion's consumer tracking, whose refusal lists the top
    // consumers: around this library's pool and around DataFusion's.
    let top = std::num::NonZeroUsize::new(3).unwrap();
    let tracked: Arc<dyn MemoryPool> = Arc::new(
        nodedb_governor::datafusion_pool::GovernorPool::tracked(&g, EngineId::Query, top).unwrap(),
    );
    let r = MemoryConsumer::new("q").register(&tracked);
    r.try_grow(50 << 20).unwrap();
    group.bench_function("governor pool, tracked: try_grow beyond the budget", |b| {
        b.iter(|| black_box(r.try_grow(black_box(200 << 20)).is_err()))
    });
    let greedy: Arc<dyn MemoryPool> = Arc::new(TrackConsumersPool::new(
        GreedyMemoryPool::new(256 << 20),
        top,
    ));
    let r = MemoryConsumer::new("q").register(&greedy);
    r.try_grow(100 << 20).unwrap();
    group.bench_function(
        "datafusion TrackConsumersPool<GreedyMemoryPool> try_grow beyond",
        |b| b.iter(|| black_box(r.try_grow(black_box(200 << 20)).is_err())),
    );
    group.finish();
    drop(held);
}

criterion_group!(benches, bench, refusal);
criterion_main!(benches);
