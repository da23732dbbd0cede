//! Prometheus metrics for the library's accounting (feature `metrics`).
//!
//! Register once on a `prometheus::Registry`, then call
//! [`GovernorMetrics::update`] when the registry is scraped (or on a
//! timer): gauges take the governor's current figures, counters advance by
//! what the governor's monotonic counts moved since the last update.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `nodedb_governor_engine_reserved_bytes` | gauge | engine |
//! | `nodedb_governor_engine_limit_bytes` | gauge (the cap) | engine |
//! | `nodedb_governor_engine_floor_bytes` | gauge | engine |
//! | `nodedb_governor_engine_lent_bytes` | gauge | engine |
//! | `nodedb_governor_engine_pressure_level` | gauge, 0 Normal .. 3 Emergency | engine |
//! | `nodedb_governor_engine_rejections_total` | counter | engine |
//! | `nodedb_governor_engine_loan_forced_spills_total` | counter | engine |
//! | `nodedb_governor_engine_spilled_bytes_total` | counter | engine |
//! | `nodedb_governor_engine_arena_resident_bytes` | gauge (feature `jemalloc`) | engine |
//! | `nodedb_governor_engine_arena_active_bytes` | gauge (feature `jemalloc`) | engine |
//! | `nodedb_governor_engine_arena_dirty_bytes` | gauge (feature `jemalloc`) | engine |
//! | `nodedb_governor_engine_node_reserved_bytes` | gauge (NUMA) | engine, node |
//! | `nodedb_governor_engine_node_share_bytes` | gauge (NUMA) | engine, node |
//! | `nodedb_governor_engine_node_remote_bytes_total` | counter (NUMA) | engine, node |
//! | `nodedb_governor_engine_node_rejections_total` | counter (NUMA) | engine, node |
//! | `nodedb_governor_node_reserved_bytes` | gauge (NUMA) | node |
//! | `nodedb_governor_node_ceiling_bytes` | gauge (NUMA) | node |
//! | `nodedb_governor_reserved_bytes` | gauge | |
//! | `nodedb_governor_ceiling_bytes` | gauge | |
//! | `nodedb_governor_pressure_level` | gauge | |

use std::{collections::BTreeMap, sync::Mutex};

use prometheus::{IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::{MemoryGovernor, PressureLevel, SpillController};

/// The library's metrics on one registry.
pub struct GovernorMetrics {
    reserved: IntGaugeVec,
    limit: IntGaugeVec,
    floor: IntGaugeVec,
    lent: IntGaugeVec,
    level: IntGaugeVec,
    rejections: IntCounterVec,
    forced_spills: IntCounterVec,
    spilled: IntCounterVec,
    /// Per (engine, node): reserved, share; remote, rejections.
    node_gauges: [IntGaugeVec; 2],
    node_counters: [IntCounterVec; 2],
    /// Per node: reserved, ceiling.
    node_totals: [IntGaugeVec; 2],
    total: IntGauge,
    ceiling: IntGauge,
    global_level: IntGauge,
    #[cfg(feature = "jemalloc")]
    arena: [IntGaugeVec; 3],
    /// Last seen monotonic counts, per (engine and node, metric).
    last: Mutex<BTreeMap<(String, &'static str), u64>>,
}

fn level_value(l: PressureLevel) -> i64 {
    match l {
        PressureLevel::Normal => 0,
        PressureLevel::Warning => 1,
        PressureLevel::Critical => 2,
        PressureLevel::Emergency => 3,
    }
}

fn saturate(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl GovernorMetrics {
    /// Creates the metrics and registers them on `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let engine_gauge = |name: &str, help: &str| -> prometheus::Result<IntGaugeVec> {
            let g = IntGaugeVec::new(Opts::new(name, help), &["engine"])?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let engine_counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["engine"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let node_gauge =
            |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
                let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(g.clone()))?;
                Ok(g)
            };
        let node_counter = |name: &str, help: &str| -> prometheus::Result<IntCounterVec> {
            let c = IntCounterVec::new(Opts::new(name, help), &["engine", "node"])?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        Ok(Self {
            reserved: engine_gauge(
                "nodedb_governor_engine_reserved_bytes",
                "Bytes reserved by the engine",
            )?,
            limit: engine_gauge("nodedb_governor_engine_limit_bytes", "The engine's cap")?,
            floor: engine_gauge(
                "nodedb_governor_engine_floor_bytes",
                "The engine's guaranteed floor",
            )?,
            lent: engine_gauge(
                "nodedb_governor_engine_lent_bytes",
                "Budget the engine lends to other engines",
            )?,
            level: engine_gauge(
                "nodedb_governor_engine_pressure_level",
                "Pressure level: 0 Normal, 1 Warning, 2 Critical, 3 Emergency",
            )?,
            rejections: engine_counter(
                "nodedb_governor_engine_rejections_total",
                "Reservations refused",
            )?,
            spilled: engine_counter(
                "nodedb_governor_engine_spilled_bytes_total",
                "Bytes freed by spilling",
            )?,
            forced_spills: engine_counter(
                "nodedb_governor_engine_loan_forced_spills_total",
                "Loans taken back from the engine that left it over its spill mark",
            )?,
            node_gauges: [
                node_gauge(
                    "nodedb_governor_engine_node_reserved_bytes",
                    "Bytes reserved by the engine charged to the NUMA node",
                    &["engine", "node"],
                )?,
                node_gauge(
                    "nodedb_governor_engine_node_share_bytes",
                    "The engine's share of the NUMA node (its cap's part there)",
                    &["engine", "node"],
                )?,
            ],
            node_counters: [
                node_counter(
                    "nodedb_governor_engine_node_remote_bytes_total",
                    "Bytes charged to the NUMA node for the engine's threads on another node (prefer-local)",
                )?,
                node_counter(
                    "nodedb_governor_engine_node_rejections_total",
                    "Reservations refused for want of room on the NUMA node",
                )?,
            ],
            node_totals: [
                node_gauge(
                    "nodedb_governor_node_reserved_bytes",
                    "Bytes reserved by all engines charged to the NUMA node",
                    &["node"],
                )?,
                node_gauge(
                    "nodedb_governor_node_ceiling_bytes",
                    "The NUMA node's part of the ceiling",
                    &["node"],
                )?,
            ],
            total: gauge(
                "nodedb_governor_reserved_bytes",
                "Bytes reserved by all engines",
            )?,
            ceiling: gauge("nodedb_governor_ceiling_bytes", "The global ceiling")?,
            global_level: gauge(
                "nodedb_governor_pressure_level",
                "Process-wide pressure level",
            )?,
            #[cfg(feature = "jemalloc")]
            arena: [
                engine_gauge(
                    "nodedb_governor_engine_arena_resident_bytes",
                    "Resident bytes of the engine's jemalloc arena",
                )?,
                engine_gauge(
                    "nodedb_governor_engine_arena_active_bytes",
                    "Bytes in active extents of the engine's jemalloc arena",
                )?,
                engine_gauge(
                    "nodedb_governor_engine_arena_dirty_bytes",
                    "Freed bytes the engine's jemalloc arena has not yet returned to the kernel",
                )?,
            ],
            last: Mutex::new(BTreeMap::new()),
        })
    }

    fn advance(&self, counter: &IntCounterVec, engine: &str, metric: &'static str, now: u64) {
        self.advance_labels(counter, &[engine], metric, now);
    }

    fn advance_labels(
        &self,
        counter: &IntCounterVec,
        labels: &[&str],
        metric: &'static str,
        now: u64,
    ) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let seen = last.entry((labels.join("\u{0}"), metric)).or_insert(0);
        if now > *seen {
            counter.with_label_values(labels).inc_by(now - *seen);
            *seen = now;
        } else {
            // Make the series exist even before the first event.
            counter.with_label_values(labels).inc_by(0);
        }
    }

    /// Takes the current figures from `governor` (and `spill`, if any).
    pub fn update(&self, governor: &MemoryGovernor, spill: Option<&SpillController>) {
        for u in governor.usages() {
            let e = &*u.name;
            for (gauge, bytes) in [
                (&self.reserved, u.used_bytes),
                (&self.limit, u.cap_bytes),
                (&self.floor, u.floor_bytes),
                (&self.lent, u.lent_bytes),
            ] {
                gauge.with_label_values(&[e]).set(saturate(bytes));
            }
            self.level.with_label_values(&[e]).set(level_value(u.level));
            self.advance(&self.rejections, e, "rejections", u.rejections);
            self.advance(&self.forced_spills, e, "forced_spills", u.forced_spills);
            let spilled = spill.map_or(0, |s| s.spilled_bytes(u.engine));
            self.advance(&self.spilled, e, "spilled", spilled);
            for n in governor.node_usage(u.engine).unwrap_or_default() {
                let node = n.node.to_string();
                let labels = [e, node.as_str()];
                let [reserved, share] = &self.node_gauges;
                reserved
                    .with_label_values(&labels)
                    .set(saturate(n.used_bytes));
                share
                    .with_label_values(&labels)
                    .set(saturate(n.share_bytes));
                let [remote, rejections] = &self.node_counters;
                self.advance_labels(remote, &labels, "node_remote", n.remote_bytes);
                self.advance_labels(rejections, &labels, "node_rejections", n.rejections);
            }
        }
        for n in governor.node_totals() {
            let node = n.node.to_string();
            let [reserved, ceiling] = &self.node_totals;
            reserved
                .with_label_values(&[&node])
                .set(saturate(n.used_bytes));
            ceiling
                .with_label_values(&[&node])
                .set(saturate(n.ceiling_bytes));
        }
        self.total.set(saturate(governor.total_bytes()));
        self.ceiling.set(saturate(governor.ceiling_bytes()));
        self.global_level.set(level_value(governor.level()));
    }

    /// Takes fresh statistics of each engine's jemalloc arena, labelled
    /// with the engine's name in `governor`'s budget.
    #[cfg(feature = "jemalloc")]
    pub fn update_arenas(
        &self,
        governor: &MemoryGovernor,
        arenas: &crate::arena::EngineArenas,
    ) -> Result<(), crate::arena::ArenaError> {
        for u in governor.usages() {
            if arenas.index(u.engine).is_err() {
                continue;
            }
            let st = arenas.stats(u.engine)?;
            let e = &*u.name;
            let [resident, active, dirty] = &self.arena;
            resident
                .with_label_values(&[e])
                .set(saturate(st.resident_bytes));
            active
                .with_label_values(&[e])
                .set(saturate(st.active_bytes));
            dirty.with_label_values(&[e]).set(saturate(st.dirty_bytes));
        }
        Ok(())
    }
}
