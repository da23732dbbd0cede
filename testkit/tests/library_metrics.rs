//! Prometheus's own linter (`promtool check metrics`) has nothing to say
//! of the library's series: every one the library registers, with an
//! engine that reserved, was refused and spilled, on two NUMA nodes'
//! worth of series where the machine has them.

use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, SpillConfig, SpillController, ThresholdsHandle,
    metrics::GovernorMetrics,
};
use prometheus::{Encoder, Registry, TextEncoder};

#[test]
fn the_librarys_metrics_pass_promtool() {
    let g = MemoryGovernor::with_batch(
        Budget::builder(64 << 20)
            .engine(EngineId::Vector, 0, 32 << 20)
            .engine(EngineId::Query, 0, 16 << 20)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        0,
    );
    let registry = Registry::new();
    let metrics = GovernorMetrics::register(&registry).unwrap();
    let spill = SpillController::new(SpillConfig::default()).unwrap();
    let _held = g.try_reserve(EngineId::Query, 10 << 20).unwrap();
    assert!(g.try_reserve(EngineId::Query, 10 << 20).is_err());
    metrics.update(&g, Some(&spill));
    let mut text = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut text)
        .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("nodedb_governor_engine_rejections_total{engine=\"query\"} 1"),
        "{text}"
    );
    if let Some(complaints) = nodedb_governor_testkit::promtool::check_metrics(&text) {
        assert!(
            complaints.is_empty(),
            "promtool check metrics:\n{complaints}"
        );
    }
}
