//! DataFusion's memory pool over the Query budget: DataFusion's own
//! reservations draw on the governor, a refusal reaches DataFusion as
//! `ResourcesExhausted` with the governor's numbers, and everything comes
//! back when DataFusion lets go.

use std::sync::Arc;

use datafusion_common::DataFusionError;
use datafusion_execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryPool};
use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, ThresholdsHandle, datafusion_pool::GovernorPool,
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
