//! DataFusion's memory pool over the Query budget: DataFusion's own
//! reservations draw on the governor, a refusal reaches DataFusion as
//! `ResourcesExhausted` with the governor's numbers, and everything comes
//! back when DataFusion lets go. DataFusion's spill files, made by the
//! library's factory, do not stay in the page cache.

mod common;

use std::sync::Arc;

use datafusion_common::DataFusionError;
use datafusion_execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryPool};
use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, Node, ThresholdsHandle, Topology,
    datafusion_pool::GovernorPool,
};

const MIB: usize = 1 << 20;

#[test]
fn datafusion_reserves_from_the_query_budget_and_is_refused_by_it() {
    let g = MemoryGovernor::with_batch(
        Budget::builder(64 * MIB as u64)
            .engine(EngineId::Vector, 0, 64 * MIB as u64)
            .engine(EngineId::Query, 0, 10 * MIB as u64)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        0,
    );
    let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(&g, EngineId::Query).unwrap());
    let agg = MemoryConsumer::new("hash aggregate")
        .with_can_spill(true)
        .register(&pool);
    // The engine's own code shares the budget with DataFusion.
    let own = g.try_reserve(EngineId::Query, 2 * MIB as u64).unwrap();

    agg.try_grow(6 * MIB).unwrap();
    assert_eq!(pool.reserved(), 6 * MIB);
    assert_eq!(g.usage(EngineId::Query).unwrap().used_bytes, 8 * MIB as u64);

    match agg.try_grow(4 * MIB) {
        Err(DataFusionError::ResourcesExhausted(msg)) => {
            assert!(
                msg.contains("engine query refused 4194304 bytes: 2097152 of its 10485760-byte budget available"),
                "{msg}"
            );
            assert!(msg.contains("hash aggregate"), "{msg}");
        }
        other => panic!("expected ResourcesExhausted, got {other:?}"),
    }
    assert_eq!(pool.reserved(), 6 * MIB, "a refusal changes nothing");

    // Spilling gives memory back; grow (which DataFusion cannot have
    // refused) is a charge and may pass the cap.
    agg.shrink(4 * MIB);
    agg.grow(12 * MIB);
    assert_eq!(
        g.usage(EngineId::Query).unwrap().used_bytes,
        16 * MIB as u64
    );
    assert_eq!(pool.reserved(), 14 * MIB);

    // DataFusion sizes some buffers by the pool's limit: the Query cap.
    assert!(matches!(pool.memory_limit(), MemoryLimit::Finite(n) if n == 10 * MIB));

    drop(agg);
    drop(own);
    assert_eq!(pool.reserved(), 0);
    assert_eq!(g.total_bytes(), 0);
    assert!(
        GovernorPool::new(&g, EngineId::Wal).is_err(),
        "an engine not in the budget"
    );
}

/// A refusal names who holds the memory: the database's largest engines
/// (from the governor), and with the tracked pool the engine's largest
/// DataFusion consumers too.
#[test]
fn a_refusal_names_the_largest_holders() {
    let g = MemoryGovernor::with_batch(
        Budget::builder(64 * MIB as u64)
            .engine(EngineId::Vector, 0, 64 * MIB as u64)
            .engine(EngineId::Timeseries, 0, 64 * MIB as u64)
            .engine(EngineId::Query, 0, 16 * MIB as u64)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        0,
    );
    let _vector = g.try_reserve(EngineId::Vector, 30 * MIB as u64).unwrap();
    let _timeseries = g.try_reserve(EngineId::Timeseries, 3 * MIB as u64).unwrap();
    let pool: Arc<dyn MemoryPool> = Arc::new(
        GovernorPool::tracked(&g, EngineId::Query, std::num::NonZeroUsize::new(2).unwrap())
            .unwrap(),
    );
    let sort = MemoryConsumer::new("sort").register(&pool);
    let agg = MemoryConsumer::new("hash aggregate").register(&pool);
    let scan = MemoryConsumer::new("scan").register(&pool);
    sort.try_grow(2 * MIB).unwrap();
    agg.try_grow(9 * MIB).unwrap();
    scan.try_grow(MIB).unwrap();
    let msg = match agg.try_grow(8 * MIB) {
        Err(DataFusionError::ResourcesExhausted(msg)) => msg,
        other => panic!("expected ResourcesExhausted, got {other:?}"),
    };
    // The engine's two largest consumers, largest first; not the third.
    let (top, rest) = msg.split_once("Error:").expect("the tracked pool's layout");
    let (a, b) = (
        top.find("hash aggregate").unwrap(),
        top.find("sort").unwrap(),
    );
    assert!(a < b && !top.contains("scan"), "{msg}");
    // The governor's refusal, with the database's largest engines then.
    assert!(
        rest.contains(
            "engine query refused 8388608 bytes: 4194304 of its 16777216-byte budget available; \
             largest holders: vector 30.0 MiB, query 12.0 MiB, timeseries 3.0 MiB"
        ),
        "{msg}"
    );
}

/// A spill file written and read back through `UncachedSpillFiles`: the
/// bytes come back exactly, neither the writing nor the reading leaves
/// them cached, and the file is gone when DataFusion drops it.
#[test]
fn spill_files_are_written_and_read_back_uncached() {
    use std::{
        io::Write,
        pin::pin,
        task::{Context, Poll, Waker},
    };

    use datafusion_execution::spill_file::TempFileFactory;
    use futures::Stream;
    use nodedb_governor::{datafusion_spill::UncachedSpillFiles, page_cache::resident_bytes};

    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("spill-files-{}", std::process::id()));
    let factory = UncachedSpillFiles::new(&dir).unwrap();
    let file = factory.create_temp_file("HashAggregateSpill").unwrap();
    let path = file.path().unwrap().to_owned();
    let data: Vec<u8> = (0..32 * MIB).map(|i| (i * 31 % 251) as u8).collect();
    let mut w = file.open_writer().unwrap();
    for piece in data.chunks(100_003) {
        w.write_all(piece).unwrap();
    }
    w.finish().unwrap();
    drop(w);
    assert_eq!(file.size(), Some(data.len() as u64));
    assert_eq!(factory.written_bytes(), data.len() as u64);
    let cached = |p: &std::path::Path| resident_bytes(&std::fs::File::open(p).unwrap()).unwrap().0;
    let after_write = cached(&path);
    assert!(
        after_write <= MIB as u64,
        "{} KiB of a 32 MiB spill file cached after writing",
        after_write >> 10
    );
    // The stream is an iterator's: every poll is ready.
    let mut stream = pin!(file.read_stream().unwrap());
    let mut cx = Context::from_waker(Waker::noop());
    let mut back = Vec::new();
    while let Poll::Ready(Some(chunk)) = stream.as_mut().poll_next(&mut cx) {
        back.extend_from_slice(&chunk.unwrap());
    }
    assert!(back == data, "the spill file read back differs");
    let after_read = cached(&path);
    assert!(
        after_read <= MIB as u64,
        "{} KiB of the spill file cached after reading it",
        after_read >> 10
    );
    drop(file);
    assert!(!path.exists(), "a dropped spill file is removed");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pool keeps its own books and does not know which node a byte it
/// gives back was charged to: the ledger takes it off the releasing
/// thread's node first. Threads' unspent credit is charged to its node
/// too, so such a release can leave a node's books short of the credit a
/// thread returns there later. The books stay whole: what a node lacks
/// comes off the others (seen in the two-node VM as the query engine's
/// thread exiting with its credit: an assertion on the node's books).
#[test]
fn the_pool_gives_back_on_the_wrong_node_and_the_node_books_stay_whole() {
    let Some(cpus) = common::two_cpus() else {
        return;
    };
    let node = |id: u32, cpu: u32| Node {
        id,
        cpus: vec![cpu],
        memory_bytes: 1 << 30,
    };
    let topology = Topology::new(vec![node(0, cpus.0), node(1, cpus.1)]).unwrap();
    let g = MemoryGovernor::with_batch(
        Budget::builder(256 * MIB as u64)
            .engine(EngineId::Query, 0, 128 * MIB as u64)
            .numa(topology)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        nodedb_governor::DEFAULT_BATCH_BYTES,
    );
    let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(&g, EngineId::Query).unwrap());
    let used = || -> Vec<u64> {
        g.node_usage(EngineId::Query)
            .unwrap()
            .iter()
            .map(|n| n.used_bytes)
            .collect()
    };
    // Grown on node 0 by a thread that then exits (its unspent credit goes
    // back there)...
    let on_0 = std::thread::scope(|s| {
        s.spawn(|| {
            common::pin(cpus.0);
            let r = MemoryConsumer::new("on node 0").register(&pool);
            r.try_grow(64 << 10).unwrap();
            r
        })
        .join()
        .unwrap()
    });
    // ...and on node 1 by this thread, which keeps a batch of credit
    // there, less what it spent.
    common::pin(cpus.1);
    let on_1 = MemoryConsumer::new("on node 1").register(&pool);
    on_1.try_grow(64 << 10).unwrap();
    assert_eq!(used()[0], 64 << 10);
    // Both given back here: node 1's books lose both (one of them was
    // node 0's), and when this thread's credit returns to node 1, node 1
    // is short by what node 0 still holds.
    drop(on_0);
    drop(on_1);
    g.flush_thread_credit();
    assert_eq!(used(), [0, 0]);
    assert_eq!(g.total_bytes(), 0);
    assert_eq!(pool.reserved(), 0);
}
