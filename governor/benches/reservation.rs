//! Reserve + release pairs, side by side in one run: this library's
//! governor (batched fast path, and exact), against DataFusion's
//! `GreedyMemoryPool` and `FairSpillPool`, uncontended and with 2 threads.
//! Each sample is one pair of 4 KiB; with 2 threads, each thread does the
//! pairs and the figure is wall time per pair per thread.

use std::{hint::black_box, sync::Arc, thread, time::Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion_execution::memory_pool::{
    FairSpillPool, GreedyMemoryPool, MemoryConsumer, MemoryPool,
};
use nodedb_governor::{Budget, EngineId, MemoryGovernor, ThresholdsHandle};

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

fn governor_pair(g: &MemoryGovernor) {
    let r = g.try_reserve(EngineId::Query, SIZE).expect("fits");
    black_box(&r);
    drop(r);
}

fn pool_pair(r: &mut datafusion_execution::memory_pool::MemoryReservation) {
    r.try_grow(SIZE as usize).expect("fits");
    black_box(&*r);
    r.shrink(SIZE as usize);
}

/// Runs `pair` `iters` times on each of `threads` threads at once.
fn concurrent(threads: usize, iters: u64, pair: impl Fn() + Sync) -> std::time::Duration {
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                for _ in 0..iters {
                    pair();
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
    let greedy: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(BIG as usize));
    let fair: Arc<dyn MemoryPool> = Arc::new(FairSpillPool::new(BIG as usize));

    group.bench_function("governor (batched)/1 thread", |b| {
        b.iter(|| governor_pair(&fast))
    });
    group.bench_function("governor (exact)/1 thread", |b| {
        b.iter(|| governor_pair(&exact))
    });
    for (name, pool) in [
        ("datafusion GreedyMemoryPool", &greedy),
        ("datafusion FairSpillPool", &fair),
    ] {
        let mut r = MemoryConsumer::new("q").with_can_spill(true).register(pool);
        group.bench_function(format!("{name}/1 thread"), |b| b.iter(|| pool_pair(&mut r)));
    }

    group.bench_function("governor (batched)/2 threads", |b| {
        b.iter_custom(|iters| concurrent(2, iters, || governor_pair(&fast)))
    });
    group.bench_function("governor (exact)/2 threads", |b| {
        b.iter_custom(|iters| concurrent(2, iters, || governor_pair(&exact)))
    });
    for (name, pool) in [
        ("datafusion GreedyMemoryPool", &greedy),
        ("datafusion FairSpillPool", &fair),
    ] {
        group.bench_function(format!("{name}/2 threads"), |b| {
            b.iter_custom(|iters| {
                // One reservation per thread, as DataFusion's operators hold.
                let start = Instant::now();
                thread::scope(|s| {
                    for _ in 0..2 {
                        s.spawn(|| {
                            let mut r =
                                MemoryConsumer::new("q").with_can_spill(true).register(pool);
                            for _ in 0..iters {
                                pool_pair(&mut r);
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
