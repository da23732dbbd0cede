//! The Prometheus metrics report the governor's figures: gauges follow the
//! ledger, counters advance by what happened since the last update.

mod common;

use common::{Chunks, MIB, exact_governor};
use nodedb_governor::{EngineId, SpillConfig, SpillController, metrics::GovernorMetrics};
use prometheus::{Encoder, Registry, TextEncoder};

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

/// Asserts each series' value in a scrape.
fn assert_series(text: &str, want: &[(&str, i64)]) {
    for &(series, v) in want {
        assert_eq!(value(text, series), v, "{series}");
    }
}

#[test]
fn metrics_follow_the_ledger_and_count_events() {
    let g = exact_governor(
        100 * MIB,
        &[
            (EngineId::Vector, 10 * MIB, 60 * MIB),
            (EngineId::Query, 10 * MIB, 40 * MIB),
        ],
    );
    let registry = Registry::new();
    let metrics = GovernorMetrics::register(&registry).unwrap();
    let spill = SpillController::new(SpillConfig::default()).unwrap();
    let cache = Chunks::new(&g, EngineId::Vector, 57, 1.0);
    let _reg = spill.register(EngineId::Vector, cache);
    let q = g.try_reserve(EngineId::Query, 4 * MIB).unwrap();
    assert!(g.try_reserve(EngineId::Query, 40 * MIB).is_err());
    assert!(g.try_reserve(EngineId::Query, 40 * MIB).is_err());

    metrics.update(&g, Some(&spill));
    assert_series(
        &scrape(&registry),
        &[
            (
                r#"nodedb_governor_engine_reserved_bytes{engine="vector"}"#,
                57 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_reserved_bytes{engine="query"}"#,
                4 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_limit_bytes{engine="query"}"#,
                40 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_rejections_total{engine="query"}"#,
                2,
            ),
            // 57/60 is Critical.
            (
                r#"nodedb_governor_engine_pressure_level{engine="vector"}"#,
                2,
            ),
            ("nodedb_governor_reserved_bytes", 61 * MIB as i64),
        ],
    );

    // Spill, refuse once more, update: counters advance by the difference.
    spill.run(&g);
    assert!(g.try_reserve(EngineId::Query, 40 * MIB).is_err());
    metrics.update(&g, Some(&spill));
    assert_series(
        &scrape(&registry),
        &[
            (
                r#"nodedb_governor_engine_spilled_bytes_total{engine="vector"}"#,
                12 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_reserved_bytes{engine="vector"}"#,
                45 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_rejections_total{engine="query"}"#,
                3,
            ),
            (
                r#"nodedb_governor_engine_spilled_bytes_total{engine="query"}"#,
                0,
            ),
        ],
    );
    drop(q);
}
