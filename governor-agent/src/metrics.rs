//! The agent's Prometheus metrics, rendered from a [`Snapshot`] (the
//! figures of the last tick: a scrape reads nothing from the kernel and
//! waits for no one). Each render fills a fresh registry, so nothing stale
//! survives a process that left. [`crate::http`] serves them.
//!
//! | metric | labels |
//! |---|---|
//! | `nodedb_governor_agent_engine_budget_bytes` | pid, engine |
//! | `nodedb_governor_agent_engine_reserved_bytes` (the library's books) | pid, engine |
//! | `nodedb_governor_agent_engine_resident_bytes` (the kernel's attribution) | pid, engine |
//! | `nodedb_governor_agent_engine_page_faults_total` | pid, engine |
//! | `nodedb_governor_agent_engine_node_resident_bytes` (more than one NUMA node) | pid, engine, node |
//! | `nodedb_governor_agent_engine_node_share_bytes` (a placed engine's share of its budget per node) | pid, engine, node |
//! | `nodedb_governor_agent_engine_page_cache_bytes` (its files' cached pages) | pid, engine |
//! | `nodedb_governor_agent_engine_page_cache_evicted_bytes_total` (by reclaim) | pid, engine |
//! | `nodedb_governor_agent_engine_page_cache_untracked_bytes_total` (not counted: the file map was full) | pid, engine |
//! | `nodedb_governor_agent_engine_pressure_level` (0 Normal .. 3 Emergency) | pid, engine |
//! | `nodedb_governor_agent_engine_cache_drop_requests_total`, `_cache_dropped_bytes_total` (its page cache above its share under pressure) | pid, engine |
//! | `nodedb_governor_agent_engine_hot_set_bytes` (locked by the library) | pid, engine |
//! | `nodedb_governor_cgroup_memory_low_bytes` (v2: the hot sets' protection) | backend |
//! | `nodedb_governor_agent_engine_spill_requests_total` | pid, engine |
//! | `nodedb_governor_agent_engine_loan_forced_spills_total` | pid, engine |
//! | `nodedb_governor_agent_engine_spilled_bytes_total` | pid, engine |
//! | `nodedb_governor_agent_engine_purges_total` | pid, engine |
//! | `nodedb_governor_agent_engine_refusals_total` (the library's) | pid, engine |
//! | `nodedb_governor_agent_unattributed_bytes` | pid |
//! | `nodedb_governor_agent_process_vm_rss_bytes` (what /proc reports; the engines and the unattributed bucket should add up to it) | pid |
//! | `nodedb_governor_cgroup_memory_current_bytes`, `_high_bytes`, `_max_bytes` | backend |
//! | `nodedb_governor_cgroup_memory_events_total` | backend, event |
//! | `nodedb_governor_agent_engine_limit_changes_total` (limits sent to the library) | pid, engine |
//! | `nodedb_governor_agent_engine_backpressure` (1: held to what it holds) | pid, engine |
//! | `nodedb_governor_cgroup_limit_changes_total` (memory.max/high writes) | backend |
//! | `nodedb_governor_emergency` (1: the database at the emergency threshold) | |
//! | `nodedb_governor_psi_triggers_total`, `nodedb_governor_psi_stalling` | |
//! | `nodedb_governor_psi_memory_stall_seconds_total`, `_avg10_ratio` | kind (some, full) |
//! | `nodedb_governor_bpf_program_runs_total`, `_run_seconds_total` | program |
//! | `nodedb_governor_bpf_map_insert_failures_total` (attribution lost to a full map) | map |
//! | `nodedb_governor_bpf_execs_followed_total` | |
//! | `nodedb_governor_node_memory_total_bytes`, `_free_bytes`, `_file_bytes`, `_anon_bytes` | node |
//! | `nodedb_governor_node_database_bytes` (the database cgroup's memory on the node) | node, kind (anon, file) |
//! | `nodedb_governor_node_ceiling_share_bytes`, `nodedb_governor_node_pressure_level` | node |
//! | `nodedb_governor_agent_clients`, `_processes`, `_ticks_total`, `_tick_seconds` | |

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::owner::{Liveness, Snapshot};

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> prometheus::Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn sat(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metrics text for `snapshot`.
pub fn render(snapshot: &Snapshot, alive: Liveness) -> prometheus::Result<String> {
    let status = &snapshot.report;
    let health = snapshot.health;
    let r = Registry::new();
    {
        let pe = &["pid", "engine"];
        let budget = gauge(
            &r,
            "nodedb_governor_agent_engine_budget_bytes",
            "The engine's budget in force (after loans)",
            pe,
        )?;
        let reserved = gauge(
            &r,
            "nodedb_governor_agent_engine_reserved_bytes",
            "Bytes the library has reserved for the engine",
            pe,
        )?;
        let resident = gauge(
            &r,
            "nodedb_governor_agent_engine_resident_bytes",
            "Resident bytes the kernel attributes to the engine",
            pe,
        )?;
        let faults = counter(
            &r,
            "nodedb_governor_agent_engine_page_faults_total",
            "Page faults of the engine's threads",
            pe,
        )?;
        let page_cache = gauge(
            &r,
            "nodedb_governor_agent_engine_page_cache_bytes",
            "Page cache of the engine's files (added by its threads, less what left)",
            pe,
        )?;
        let evicted = counter(
            &r,
            "nodedb_governor_agent_engine_page_cache_evicted_bytes_total",
            "Bytes of the engine's page cache that reclaim evicted",
            pe,
        )?;
        let untracked = counter(
            &r,
            "nodedb_governor_agent_engine_page_cache_untracked_bytes_total",
            "Bytes the engine added to the page cache that are not counted (the file map was full)",
            pe,
        )?;
        let level = gauge(
            &r,
            "nodedb_governor_agent_engine_pressure_level",
            "Pressure level: 0 Normal, 1 Warning, 2 Critical, 3 Emergency",
            pe,
        )?;
        let spills = counter(
            &r,
            "nodedb_governor_agent_engine_spill_requests_total",
            "Spill requests sent",
            pe,
        )?;
        let spilled = counter(
            &r,
            "nodedb_governor_agent_engine_spilled_bytes_total",
            "Bytes freed by spill requests",
            pe,
        )?;
        let forced_spills = counter(
            &r,
            "nodedb_governor_agent_engine_loan_forced_spills_total",
            "Loans taken back from the engine that left it at Critical of its new budget",
            pe,
        )?;
        let purges = counter(
            &r,
            "nodedb_governor_agent_engine_purges_total",
            "Arena purge requests sent",
            pe,
        )?;
        let refusals = counter(
            &r,
            "nodedb_governor_agent_engine_refusals_total",
            "Reservations the library refused",
            pe,
        )?;
        let limit_changes = counter(
            &r,
            "nodedb_governor_agent_engine_limit_changes_total",
            "Limits (floor and cap) sent to the library",
            pe,
        )?;
        let backpressure = gauge(
            &r,
            "nodedb_governor_agent_engine_backpressure",
            "1 while a non-essential engine is held to what it holds (Emergency)",
            pe,
        )?;
        let cache_drops = counter(
            &r,
            "nodedb_governor_agent_engine_cache_drop_requests_total",
            "Requests to drop cold page cache (above its share under pressure)",
            pe,
        )?;
        let cache_dropped = counter(
            &r,
            "nodedb_governor_agent_engine_cache_dropped_bytes_total",
            "Bytes of page cache those requests dropped",
            pe,
        )?;
        let hot_set = gauge(
            &r,
            "nodedb_governor_agent_engine_hot_set_bytes",
            "Bytes the engine's hot sets hold locked",
            pe,
        )?;
        let unattributed = gauge(
            &r,
            "nodedb_governor_agent_unattributed_bytes",
            "Resident bytes of a governed process no engine caused",
            &["pid"],
        )?;
        let vm_rss = gauge(
            &r,
            "nodedb_governor_agent_process_vm_rss_bytes",
            "A governed process's VmRSS as /proc reports it (what the engines and the unattributed bucket should add up to)",
            &["pid"],
        )?;
        let node_resident = gauge(
            &r,
            "nodedb_governor_agent_engine_node_resident_bytes",
            "Resident bytes the kernel attributes to the engine on the NUMA node (the counting CPU's node)",
            &["pid", "engine", "node"],
        )?;
        let node_share = gauge(
            &r,
            "nodedb_governor_agent_engine_node_share_bytes",
            "The NUMA node's share of a placed engine's budget in force",
            &["pid", "engine", "node"],
        )?;
        for p in &status.processes {
            let pid = p.pid.to_string();
            for (name, e) in &p.engines {
                // Nodes as the status lists them (none on one node).
                for node in status.numa.iter().filter(|_| status.numa.len() > 1) {
                    let held = e.node_resident_bytes.get(node.node as usize).copied();
                    if let Some(held) = held {
                        node_resident
                            .with_label_values(&[&pid, name, &node.node.to_string()])
                            .set(sat(held));
                    }
                }
                resident
                    .with_label_values(&[&pid, name])
                    .set(sat(e.resident_bytes));
                faults
                    .with_label_values(&[&pid, name])
                    .inc_by(e.page_faults);
                page_cache
                    .with_label_values(&[&pid, name])
                    .set(sat(e.page_cache_bytes));
                evicted
                    .with_label_values(&[&pid, name])
                    .inc_by(e.page_cache_evicted_bytes);
                untracked
                    .with_label_values(&[&pid, name])
                    .inc_by(e.page_cache_untracked_bytes);
            }
            unattributed
                .with_label_values(&[&pid])
                .set(sat(p.unattributed.resident_bytes));
            if let Some(rss) = p.vm_rss_bytes {
                vm_rss.with_label_values(&[&pid]).set(sat(rss));
            }
        }
        for c in &status.clients {
            let pid = c.pid.to_string();
            for (name, e) in &c.engines {
                for n in &e.nodes {
                    node_share
                        .with_label_values(&[&pid, name, &n.node.to_string()])
                        .set(sat(n.share_bytes));
                }
                let l = [pid.as_str(), name.as_str()];
                budget.with_label_values(&l).set(sat(e.budget_bytes));
                reserved.with_label_values(&l).set(sat(e.reserved_bytes));
                level
                    .with_label_values(&l)
                    .set(e.level.map_or(0, |l| i64::from(l.index())));
                spills.with_label_values(&l).inc_by(e.spill_requests);
                spilled.with_label_values(&l).inc_by(e.spilled_bytes);
                forced_spills.with_label_values(&l).inc_by(e.forced_spills);
                purges.with_label_values(&l).inc_by(e.purges);
                refusals.with_label_values(&l).inc_by(e.rejections);
                limit_changes.with_label_values(&l).inc_by(e.limit_changes);
                backpressure
                    .with_label_values(&l)
                    .set(i64::from(e.backpressure));
                cache_drops
                    .with_label_values(&l)
                    .inc_by(e.cache_drop_requests);
                cache_dropped
                    .with_label_values(&l)
                    .inc_by(e.cache_dropped_bytes);
                hot_set.with_label_values(&l).set(sat(e.hot_set_bytes));
            }
        }
        if let Some(c) = &status.ceiling {
            let b = serde_json::to_value(c.backend)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let g = |name: &str, help: &str, v: u64| -> prometheus::Result<()> {
                gauge(&r, name, help, &["backend"])?
                    .with_label_values(&[&b])
                    .set(sat(v));
                Ok(())
            };
            g(
                "nodedb_governor_cgroup_memory_current_bytes",
                "Memory charged to the database's cgroup",
                c.current_bytes,
            )?;
            g(
                "nodedb_governor_cgroup_memory_high_bytes",
                "The cgroup's high mark (memory.high or the v1 soft limit)",
                c.high_bytes,
            )?;
            g(
                "nodedb_governor_cgroup_memory_max_bytes",
                "The ceiling (memory.max or the v1 limit)",
                c.limit_bytes,
            )?;
            if let Some(low) = c.protected_bytes {
                g(
                    "nodedb_governor_cgroup_memory_low_bytes",
                    "memory.low: the engines' hot sets, protected from reclaim from outside",
                    low,
                )?;
            }
            let ev = counter(
                &r,
                "nodedb_governor_cgroup_memory_events_total",
                "The cgroup's memory events",
                &["backend", "event"],
            )?;
            counter(
                &r,
                "nodedb_governor_cgroup_limit_changes_total",
                "Writes of the ceiling or the high mark",
                &["backend"],
            )?
            .with_label_values(&[&b])
            .inc_by(c.limit_changes);
            for (e, v) in [
                ("high", c.events.high),
                ("max", c.events.max),
                ("oom", c.events.oom),
                ("oom_kill", c.events.oom_kill),
            ] {
                ev.with_label_values(&[&b, e]).inc_by(v);
            }
        }
        let plain = |name: &str, help: &str, v: i64| -> prometheus::Result<()> {
            let g = prometheus::IntGauge::new(name, help)?;
            r.register(Box::new(g.clone()))?;
            g.set(v);
            Ok(())
        };
        plain(
            "nodedb_governor_agent_up",
            "1 while the agent's owner ticks; 0 once no tick has ended for 5 periods (2 s at least)",
            i64::from(!alive.stalled),
        )?;
        plain(
            "nodedb_governor_emergency",
            "1 while the database is at the emergency threshold of its ceiling",
            i64::from(status.emergency),
        )?;
        if let Some(p) = &status.psi {
            plain(
                "nodedb_governor_psi_stalling",
                "1 within a window of the last PSI trigger",
                i64::from(p.stalling),
            )?;
            let t = prometheus::IntCounter::new(
                "nodedb_governor_psi_triggers_total",
                "Times the PSI trigger fired",
            )?;
            r.register(Box::new(t.clone()))?;
            t.inc_by(p.triggers);
            let stall = prometheus::CounterVec::new(
                Opts::new(
                    "nodedb_governor_psi_memory_stall_seconds_total",
                    "Time the database's tasks stalled on memory",
                ),
                &["kind"],
            )?;
            r.register(Box::new(stall.clone()))?;
            let avg = prometheus::GaugeVec::new(
                Opts::new(
                    "nodedb_governor_psi_memory_avg10_ratio",
                    "Share of the last 10 s stalled on memory",
                ),
                &["kind"],
            )?;
            r.register(Box::new(avg.clone()))?;
            let f = &p.figures;
            for (kind, total, avg10) in [
                ("some", f.some_total_us, f.some_avg10),
                ("full", f.full_total_us, f.full_avg10),
            ] {
                stall.with_label_values(&[kind]).inc_by(total as f64 / 1e6);
                avg.with_label_values(&[kind]).set(avg10);
            }
        }
        if !status.numa.is_empty() {
            let n = &["node"];
            let node_gauges = [
                ("nodedb_governor_node_memory_total_bytes", "The NUMA node's memory"),
                ("nodedb_governor_node_memory_free_bytes", "The NUMA node's free memory"),
                ("nodedb_governor_node_file_bytes", "The NUMA node's page cache (every process's)"),
                ("nodedb_governor_node_anon_bytes", "The NUMA node's anonymous memory (every process's)"),
                ("nodedb_governor_node_ceiling_share_bytes", "The NUMA node's share of the ceiling (numa.weights, or by the nodes' memory and where the budgets in force are placed)"),
                ("nodedb_governor_node_pressure_level", "The database's memory on the NUMA node against its share: 0 Normal .. 3 Emergency"),
            ]
            .map(|(name, help)| gauge(&r, name, help, n));
            let [total, free, file, anon, share, level] = node_gauges;
            let (total, free, file, anon, share, level) =
                (total?, free?, file?, anon?, share?, level?);
            let database = gauge(
                &r,
                "nodedb_governor_node_database_bytes",
                "The database cgroup's memory on the NUMA node",
                &["node", "kind"],
            )?;
            for node in &status.numa {
                let id = node.node.to_string();
                let l = &[id.as_str()];
                total.with_label_values(l).set(sat(node.memory_total_bytes));
                free.with_label_values(l).set(sat(node.memory_free_bytes));
                file.with_label_values(l).set(sat(node.file_bytes));
                anon.with_label_values(l).set(sat(node.anon_bytes));
                if let Some(s) = node.ceiling_share_bytes {
                    share.with_label_values(l).set(sat(s));
                }
                if let Some(lv) = node.level {
                    level.with_label_values(l).set(i64::from(lv.index()));
                }
                for (kind, v) in [
                    ("anon", node.database_anon_bytes),
                    ("file", node.database_file_bytes),
                ] {
                    if let Some(v) = v {
                        database.with_label_values(&[id.as_str(), kind]).set(sat(v));
                    }
                }
            }
        }
        if let Some(k) = &status.kernel_events {
            let failed = counter(
                &r,
                "nodedb_governor_bpf_map_insert_failures_total",
                "Inserts the eBPF programs could not make (the map full, or no memory): attribution lost",
                &["map"],
            )?;
            for (map, n) in &k.insert_failures {
                failed.with_label_values(&[map]).inc_by(*n);
            }
            let execs = prometheus::IntCounter::new(
                "nodedb_governor_bpf_execs_followed_total",
                "Governed processes that called exec, followed into their new image",
            )?;
            r.register(Box::new(execs.clone()))?;
            execs.inc_by(k.execs_followed);
        }
        if !status.programs.is_empty() {
            let runs = counter(
                &r,
                "nodedb_governor_bpf_program_runs_total",
                "Runs of the agent's eBPF programs (kernel program statistics)",
                &["program"],
            )?;
            let time = prometheus::CounterVec::new(
                Opts::new(
                    "nodedb_governor_bpf_program_run_seconds_total",
                    "Time spent in the agent's eBPF programs",
                ),
                &["program"],
            )?;
            r.register(Box::new(time.clone()))?;
            let verified = IntGaugeVec::new(
                Opts::new(
                    "nodedb_governor_bpf_program_verified_instructions",
                    "Instructions the kernel's verifier processed to load the program (limit 1,000,000)",
                ),
                &["program"],
            )?;
            r.register(Box::new(verified.clone()))?;
            for p in &status.programs {
                runs.with_label_values(&[&p.name]).inc_by(p.run_count);
                time.with_label_values(&[&p.name])
                    .inc_by(p.run_time_ns as f64 / 1e9);
                if let Some(n) = p.verified_insns {
                    verified.with_label_values(&[&p.name]).set(i64::from(n));
                }
            }
        }
        plain(
            "nodedb_governor_agent_clients",
            "Libraries connected over the control channel",
            status.clients.len() as i64,
        )?;
        plain(
            "nodedb_governor_agent_processes",
            "Governed processes",
            status.processes.len() as i64,
        )?;
        let ticks = prometheus::IntCounter::new(
            "nodedb_governor_agent_ticks_total",
            "Enforcement ticks run",
        )?;
        r.register(Box::new(ticks.clone()))?;
        ticks.inc_by(health.ticks);
        let tick = prometheus::Gauge::new(
            "nodedb_governor_agent_tick_seconds",
            "Duration of the last tick",
        )?;
        r.register(Box::new(tick.clone()))?;
        tick.set(health.last_tick.as_secs_f64());
        let age = prometheus::Gauge::new(
            "nodedb_governor_agent_last_tick_age_seconds",
            "Time since the last tick ended",
        )?;
        r.register(Box::new(age.clone()))?;
        age.set(alive.age.as_secs_f64());
        let mut out = Vec::new();
        TextEncoder::new().encode(&r.gather(), &mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}
