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

#[test]
fn numa_metrics_show_each_nodes_books() {
    use nodedb_governor::{Budget, MemError, MemoryGovernor, Node, NumaPolicy, Topology};
    // Node 1 has memory and no CPUs (a memory-only node): every thread is
    // on node 0, and what does not fit there goes to node 1.
    let all: Vec<u32> = (0..cpu_numbers()).collect();
    let topology = Topology::new(vec![
        Node {
            id: 0,
            cpus: all,
            memory_bytes: 1 << 30,
        },
        Node {
            id: 1,
            cpus: vec![],
            memory_bytes: 1 << 30,
        },
    ])
    .unwrap();
    let g = MemoryGovernor::with_batch(
        Budget::builder(100 * MIB)
            .engine(EngineId::Vector, 0, 40 * MIB)
            .engine(EngineId::Query, 0, 40 * MIB)
            .numa(topology)
            .engine_numa(EngineId::Vector, NumaPolicy::Strict, None)
            .build()
            .unwrap(),
        Default::default(),
        0,
    );
    let registry = Registry::new();
    let m = GovernorMetrics::register(&registry).unwrap();
    let _v = g.try_reserve(EngineId::Vector, 15 * MIB).unwrap();
    let err = g.try_reserve(EngineId::Vector, 10 * MIB).unwrap_err();
    assert!(
        matches!(err, MemError::NodeBudgetExceeded { node: 0, .. }),
        "{err}"
    );
    // Query's 20 MiB share of node 0 takes 15, and the next 10 go whole
    // to node 1.
    let _q = g.try_reserve(EngineId::Query, 15 * MIB).unwrap();
    let _q1 = g.try_reserve(EngineId::Query, 10 * MIB).unwrap();
    m.update(&g, None);
    let text = scrape(&registry);
    assert_series(
        &text,
        &[
            (
                r#"nodedb_governor_engine_node_reserved_bytes{engine="vector",node="0"}"#,
                15 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_node_share_bytes{engine="vector",node="0"}"#,
                20 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_node_rejections_total{engine="vector",node="0"}"#,
                1,
            ),
            (
                r#"nodedb_governor_engine_node_rejections_total{engine="vector",node="1"}"#,
                0,
            ),
            (
                r#"nodedb_governor_engine_node_reserved_bytes{engine="query",node="0"}"#,
                15 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_node_reserved_bytes{engine="query",node="1"}"#,
                10 * MIB as i64,
            ),
            (
                r#"nodedb_governor_engine_node_remote_bytes_total{engine="query",node="1"}"#,
                10 * MIB as i64,
            ),
            (
                r#"nodedb_governor_node_reserved_bytes{node="0"}"#,
                30 * MIB as i64,
            ),
            (
                r#"nodedb_governor_node_reserved_bytes{node="1"}"#,
                10 * MIB as i64,
            ),
            (
                r#"nodedb_governor_node_ceiling_bytes{node="1"}"#,
                50 * MIB as i64,
            ),
        ],
    );
    // Counters advance by what happened since: nothing more.
    m.update(&g, None);
    assert_eq!(
        value(
            &scrape(&registry),
            r#"nodedb_governor_engine_node_remote_bytes_total{engine="query",node="1"}"#
        ),
        10 * MIB as i64
    );
}

/// Past every CPU number this machine uses (they need not be contiguous).
fn cpu_numbers() -> u32 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }).max(1) as u32 * 4
}
