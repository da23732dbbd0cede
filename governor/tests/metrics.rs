//! The Prometheus metrics report the governor's figures: gauges follow the
//! ledger, counters advance by what happened since the last update.

use std::sync::{Arc, Mutex};

use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, Reservation, SpillConfig, SpillController, SpillHandler,
    ThresholdsHandle, metrics::GovernorMetrics,
};
use prometheus::{Encoder, Registry, TextEncoder};

const MIB: u64 = 1 << 20;

struct Cache(Mutex<Vec<Reservation<'static>>>);

impl SpillHandler for Cache {
    fn reclaimable_bytes(&self) -> u64 {
        self.0.lock().unwrap().iter().map(Reservation::size).sum()
    }
    fn spill(&self, target: u64) -> u64 {
        let mut held = self.0.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(r) = held.pop() else { break };
            freed += r.size();
        }
        freed
    }
}

fn scrape(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .unwrap();
    String::from_utf8(out).unwrap()
}

fn value(text: &str, series: &str) -> i64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[test]
fn metrics_follow_the_ledger_and_count_events() {
    let g: &'static MemoryGovernor = Box::leak(Box::new(MemoryGovernor::with_batch(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 10 * MIB, 60 * MIB)
            .engine(EngineId::Query, 10 * MIB, 40 * MIB)
            .build()
            .unwrap(),
        ThresholdsHandle::default(),
        0,
    )));
    let registry = Registry::new();
    let metrics = GovernorMetrics::register(&registry).unwrap();
    let spill = SpillController::new(SpillConfig::default()).unwrap();
    let cache = Arc::new(Cache(Mutex::new(
        (0..57)
            .map(|_| g.try_reserve(EngineId::Vector, MIB).unwrap())
            .collect(),
    )));
    let _reg = spill.register(EngineId::Vector, cache);
    let q = g.try_reserve(EngineId::Query, 4 * MIB).unwrap();
    assert!(g.try_reserve(EngineId::Query, 40 * MIB).is_err());
    assert!(g.try_reserve(EngineId::Query, 40 * MIB).is_err());

    metrics.update(g, Some(&spill));
    let t = scrape(&registry);
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_reserved_bytes{engine="vector"}"#
        ),
        57 * MIB as i64
    );
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_reserved_bytes{engine="query"}"#
        ),
        4 * MIB as i64
    );
    assert_eq!(
        value(&t, r#"nodedb_governor_engine_limit_bytes{engine="query"}"#),
        40 * MIB as i64
    );
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_rejections_total{engine="query"}"#
        ),
        2
    );
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_pressure_level{engine="vector"}"#
        ),
        2,
        "57/60 is Critical"
    );
    assert_eq!(value(&t, "nodedb_governor_reserved_bytes"), 61 * MIB as i64);

    // Spill, refuse once more, update: counters advance by the difference.
    spill.run(g);
    assert!(g.try_reserve(EngineId::Query, 40 * MIB).is_err());
    metrics.update(g, Some(&spill));
    let t = scrape(&registry);
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_spilled_bytes_total{engine="vector"}"#
        ),
        12 * MIB as i64
    );
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_reserved_bytes{engine="vector"}"#
        ),
        45 * MIB as i64
    );
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_rejections_total{engine="query"}"#
        ),
        3
    );
    assert_eq!(
        value(
            &t,
            r#"nodedb_governor_engine_spilled_bytes_total{engine="query"}"#
        ),
        0
    );
    drop(q);
}
