//! The agent's policy: what to ask of each library and of the kernel, as a
//! function of the policy's state and its inputs. It does no I/O (it logs
//! what it decides, nothing more): the agent's owner task reads the kernel
//! (attribution, the ceiling's cgroup, PSI), hands the figures in as a
//! [`Tick`], and carries out the [`Action`]s that come back. So every rule
//! below is tested without root or a kernel (see the tests at the end).
//!
//! # Per engine of each governed process
//! The ladder ([`ladder`]), on the resident memory the kernel attributes to
//! the engine against its budget in force:
//!
//! | level (resident / budget) | on entering | while there |
//! |---|---|---|
//! | Warning (75%) | purge the engine's arena | |
//! | Critical (90%) | spill request down to `restore` (75%) | a new spill request when the last one is answered or 250 ms old |
//! | Emergency (97%) | as Critical | as Critical |
//!
//! Every level change is sent to the library as `pressure`.
//!
//! **Loans** (the library's [`nodedb_governor::lending`], the same rules
//! the library lends by on its own): a busy engine (at Critical of its
//! budget) borrows the unused budget of an idle one; a lender that gets
//! busy, or is refused a reservation, takes its loan back, and the
//! borrower's budget drops, so the ladder spills it.
//!
//! **The cap** the library is given is the budget in force less what the
//! kernel sees the engine hold beyond its reservations (memory it allocates
//! without reserving, freed pages its arena keeps), in steps of budget /
//! 64, never below its floor: a reservation is refused when the engine's
//! real footprint, not its books, would pass the budget.
//!
//! # For the whole database
//! * **PSI**: a trigger event (the database's tasks stalled on memory)
//!   purges every engine's arena at once, and for one window engines are
//!   spilled from Warning on.
//! * **Emergency**: the database's use (the ceiling cgroup's working set,
//!   or the attributed total where the kernel has no ceiling) at the
//!   emergency threshold of the ceiling lowers the cgroup's high mark to
//!   the restore point and holds the engines that are not `essential` to
//!   what they hold (never below their floor), so their new reservations
//!   are refused (backpressure), until use is back under the warning
//!   threshold.
//!
//! Observing only (`enforce = false`), levels are computed and shown but
//! nothing is asked: every cap is the ceiling, no loans, no spills.

mod engine;
mod ladder;
mod library;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

pub use engine::{EngineEnforcement, EngineNode};
pub use library::{Library, LibraryStatus};
use nodedb_governor::{
    PressureThresholds,
    control::wire::{EngineReport, ToLibrary},
    lending::LendingRules,
};

use nodedb_governor::Node;
use nodedb_governor_common::NODE_SLOTS;

use crate::{
    attribution::{ProcessAttribution, Reading},
    config::{Config, ConfigError, EngineLimits},
};

/// A spill request not answered within this is sent again.
pub const SPILL_RETRY: Duration = Duration::from_millis(250);
/// A `drop_cache` request is sent at most this often to an engine that
/// stays above its share, answered or not (dropping takes `mincore`
/// passes and writeback of dirty pages, the attribution follows the drops,
/// and a library with nothing tracked to drop answers at once).
pub const CACHE_DROP_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between `drop_cache` requests to an engine whose
/// answers free little (its cache is in files it does not track, or
/// locked): each walk of its files costs `mincore` passes for nothing.
pub const CACHE_DROP_RETRY_MAX: Duration = Duration::from_secs(32);

/// A library connection, as the owner numbers them.
pub type SessionId = u64;

/// The parts of the configuration the policy decides by.
#[derive(Clone, Debug)]
pub struct Rules {
    pub thresholds: PressureThresholds,
    /// A spill brings an engine down to this fraction of its budget.
    pub restore: f64,
    pub enforce: bool,
    pub ceiling_bytes: u64,
    /// Every configured engine, in configuration order.
    pub limits: Vec<EngineLimits>,
    pub lending: LendingRules,
    /// Arm marks in the kernel, so a crossing wakes the agent at once
    /// (false: the tick alone).
    pub mark_events: bool,
    /// Each placed engine (with `cpus`): its budget's split over the NUMA
    /// nodes, the nodes with no part of it left out (see
    /// [`crate::config::NumaConfig`]); an engine absent here is judged in
    /// all only.
    pub node_shares: BTreeMap<String, Vec<NodeShare>>,
    /// Each node's part of the ceiling, 0 to 1, by `numa.weights` or else
    /// the nodes' memory, on a machine of several nodes with the ladder
    /// per node (empty otherwise). Without `numa.weights` it is the least
    /// part a node has (see [`Rules::node_parts`]).
    pub node_ceiling: BTreeMap<u32, f64>,
    /// `numa.weights` was given: the nodes' parts of the ceiling are
    /// fixed by it, wherever the budgets are.
    pub node_parts_fixed: bool,
    /// Each node's memory: no part of the ceiling is more than that.
    pub node_memory: BTreeMap<u32, u64>,
}

/// A node's part of an engine's budget.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeShare {
    pub node: u32,
    /// Of the budget in force, 0 to 1.
    pub fraction: f64,
}

impl Rules {
    pub fn from_config(config: &Config) -> Self {
        Self {
            thresholds: config.thresholds.pressure(),
            restore: config.thresholds.restore,
            enforce: config.enforce,
            ceiling_bytes: config.ceiling_bytes(),
            limits: config.limits(),
            lending: config.lending.rules(),
            mark_events: config.mark_events,
            node_shares: BTreeMap::new(),
            node_ceiling: BTreeMap::new(),
            node_parts_fixed: false,
            node_memory: BTreeMap::new(),
        }
    }

    /// Each node's part of the ceiling (0 to 1) while the engines have
    /// these budgets in force: what the placed engines there must fit in
    /// (empty on one node, or with the ladder per node off). By
    /// `numa.weights` when given. Otherwise the larger of the nodes'
    /// memory's split and the budgets' (the placed budgets' shares on the
    /// node, plus the budgets placed nowhere split by the nodes' memory,
    /// over all the budgets): a node the configuration or its loans fill
    /// with engines has the ceiling's room for them, and no node has less
    /// than its memory's share, so one node's room is not cut to what its
    /// budgets are while the ceiling has room on the other (the ceiling
    /// itself bounds the total). No part is more than the node's memory.
    pub fn node_parts<'a>(
        &self,
        budgets: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> BTreeMap<u32, f64> {
        if self.node_parts_fixed || self.node_ceiling.is_empty() {
            return self.node_ceiling.clone();
        }
        let mut placed: BTreeMap<u32, f64> = BTreeMap::new();
        let (mut unplaced, mut total) = (0.0, 0.0);
        for (engine, budget) in budgets {
            let budget = budget as f64;
            total += budget;
            match self.node_shares.get(engine) {
                Some(shares) => {
                    for s in shares {
                        *placed.entry(s.node).or_default() += budget * s.fraction;
                    }
                }
                None => unplaced += budget,
            }
        }
        if total <= 0.0 {
            return self.node_ceiling.clone();
        }
        self.node_ceiling
            .iter()
            .map(|(&node, &by_memory)| {
                let by_budgets =
                    (placed.get(&node).copied().unwrap_or(0.0) + unplaced * by_memory) / total;
                let part = by_budgets.max(by_memory);
                let most = self
                    .node_memory
                    .get(&node)
                    .map_or(1.0, |&m| m as f64 / self.ceiling_bytes.max(1) as f64);
                (node, part.min(most))
            })
            .collect()
    }

    /// The rules on a machine of these NUMA `nodes`: each placed engine
    /// (with `cpus`) gets its budget split over the nodes by its
    /// `node_weights`, or else over the nodes of its CPUs by
    /// `numa.weights` or the nodes' memory. Weights that do not match the
    /// machine's nodes are refused, naming the field; an engine on a node
    /// the attribution does not count apart (8 and up) is judged in all
    /// only, with a warning.
    pub fn on_nodes(mut self, config: &Config, nodes: &[Node]) -> Result<Self, ConfigError> {
        self.node_shares.clear();
        self.node_ceiling.clear();
        self.node_memory.clear();
        self.node_parts_fixed = config.numa.weights.is_some();
        if !config.numa.ladder || nodes.len() < 2 {
            return Ok(self);
        }
        self.node_memory = nodes.iter().map(|n| (n.id, n.memory_bytes)).collect();
        let fits = |field: String, w: &[u64]| -> Result<(), ConfigError> {
            if w.len() != nodes.len() {
                return Err(ConfigError {
                    field,
                    reason: format!(
                        "{} weights for the {} online nodes (one per node, in node order)",
                        w.len(),
                        nodes.len()
                    ),
                });
            }
            Ok(())
        };
        let default = match &config.numa.weights {
            Some(w) => {
                fits("numa.weights".into(), w)?;
                w.clone()
            }
            None => nodes.iter().map(|n| n.memory_bytes).collect(),
        };
        let whole: u128 = default.iter().map(|&w| u128::from(w)).sum();
        self.node_ceiling = nodes
            .iter()
            .zip(&default)
            .map(|(n, &w)| (n.id, u128::from(w) as f64 / whole.max(1) as f64))
            .collect();
        for (i, e) in config.engines.iter().enumerate() {
            let Some(cpus) = &e.cpus else {
                continue;
            };
            let weights: Vec<u64> = match &e.node_weights {
                Some(w) => {
                    fits(format!("engine[{i}].node_weights"), w)?;
                    w.clone()
                }
                // Where its threads run, and so where its pages land.
                None => nodes
                    .iter()
                    .zip(&default)
                    .map(|(n, &w)| {
                        if cpus.cpus().any(|c| n.cpus.contains(&c)) {
                            w
                        } else {
                            0
                        }
                    })
                    .collect(),
            };
            let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
            if total == 0 {
                continue;
            }
            let shares: Vec<NodeShare> = nodes
                .iter()
                .zip(&weights)
                .filter(|&(_, &w)| w > 0)
                .map(|(n, &w)| NodeShare {
                    node: n.id,
                    fraction: u128::from(w) as f64 / total as f64,
                })
                .collect();
            if let Some(far) = shares.iter().find(|s| s.node as usize >= NODE_SLOTS) {
                tracing::warn!(
                    engine = %e.name,
                    node = far.node,
                    "judged in all only: the attribution counts nodes 0-{} apart",
                    NODE_SLOTS - 1
                );
                continue;
            }
            self.node_shares.insert(e.name.clone(), shares);
        }
        Ok(self)
    }
}

/// The database's use of its ceiling, as its cgroup shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CeilingUse {
    /// The charge less the inactive page cache the kernel drops first.
    pub working_set_bytes: u64,
    /// The whole charge, page cache included (what engines' caches
    /// contend for).
    pub charge_bytes: u64,
    /// What the kernel cannot drop: anonymous and shared memory (tmpfs
    /// files among it). Sent to the libraries (`held`).
    pub held_bytes: u64,
    pub limit_bytes: u64,
    /// The high mark above which the kernel throttles the database, as
    /// configured (cgroup v2's `memory.high`, not its lowered value in an
    /// Emergency); None where nothing throttles below the ceiling (v1's
    /// soft limit acts only under the host's own pressure).
    pub throttle_bytes: Option<u64>,
}

/// What the owner read from the kernel for one tick.
#[derive(Clone, Copy, Debug)]
pub struct Tick<'a> {
    pub now: Instant,
    /// The attribution (None: it could not be read this time).
    pub reading: Option<&'a Reading>,
    /// The ceiling's cgroup (None: the kernel enforces no ceiling).
    pub ceiling: Option<CeilingUse>,
    /// The PSI trigger's event count so far and its window (None: off or
    /// unavailable).
    pub psi: Option<(u64, Duration)>,
}

/// What the policy asks for.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A message to the library of a session.
    Send {
        session: SessionId,
        message: ToLibrary,
    },
    /// The database cgroup's high mark: down to this many bytes (an
    /// Emergency), or back to its normal value (None).
    SetHighMark(Option<u64>),
    /// Raise the process's `RLIMIT_MEMLOCK` to at least `bytes` (its
    /// engines' hot sets and the usual headroom), so they can be locked
    /// without `CAP_IPC_LOCK`.
    RaiseMemlock {
        session: SessionId,
        pid: u32,
        bytes: u64,
    },
    /// Arm the kernel's mark for an engine of a process at this many
    /// resident bytes, or disarm it (None).
    Mark {
        pid: u32,
        engine: String,
        bytes: Option<u64>,
    },
}

/// `RLIMIT_MEMLOCK` room left beside the hot sets (the usual default limit:
/// other locks in the process, such as io_uring rings, keep theirs).
pub const MEMLOCK_HEADROOM: u64 = 8 << 20;

/// Checks a library's first message: a hello, in this protocol version,
/// for `database`, declaring only engines of `known`. Returns the
/// engines it declares.
pub fn check_hello(
    database: &str,
    known: &[String],
    hello: nodedb_governor::control::wire::ToAgent,
) -> Result<Vec<String>, crate::error::HelloError> {
    use crate::error::HelloError;
    let nodedb_governor::control::wire::ToAgent::Hello {
        version,
        database: theirs,
        engines,
    } = hello
    else {
        return Err(HelloError::NotHello);
    };
    if version != nodedb_governor::control::wire::VERSION {
        return Err(HelloError::Version {
            got: version,
            speaks: nodedb_governor::control::wire::VERSION,
        });
    }
    if theirs != database {
        return Err(HelloError::Database {
            got: theirs,
            governs: database.to_owned(),
        });
    }
    if let Some(e) = engines.iter().find(|e| !known.contains(&e.name)) {
        return Err(crate::error::AgentError::UnknownEngine {
            name: e.name.clone(),
            known: known.join(", "),
        }
        .into());
    }
    Ok(engines.into_iter().map(|e| e.name).collect())
}

/// The policy's whole state.
#[derive(Debug)]
pub struct Policy {
    rules: Rules,
    libraries: BTreeMap<SessionId, Library>,
    /// The whole database is in Emergency (backpressure is on).
    emergency: bool,
    /// PSI trigger events already acted on, and when the last one came.
    psi_seen: u64,
    psi_last: Option<Instant>,
    /// Nothing was under way at the last tick (see [`Policy::calm`]).
    calm: bool,
    /// Each node's part of the ceiling at the last round (see
    /// [`Rules::node_parts`]), for the budgets in force of every library.
    node_parts: BTreeMap<u32, f64>,
}

fn sends(session: SessionId, out: Vec<ToLibrary>) -> impl Iterator<Item = Action> {
    out.into_iter()
        .map(move |message| Action::Send { session, message })
}

impl Policy {
    pub fn new(rules: Rules) -> Self {
        Self {
            rules,
            libraries: BTreeMap::new(),
            emergency: false,
            psi_seen: 0,
            psi_last: None,
            calm: false,
            node_parts: BTreeMap::new(),
        }
    }

    /// Each NUMA node's part of the ceiling (0 to 1) at the last round:
    /// what the engines placed there were judged against (empty on one
    /// node, or before the first round).
    pub fn node_parts(&self) -> &BTreeMap<u32, f64> {
        &self.node_parts
    }

    /// Whether nothing was under way at the last tick: every engine of
    /// every library at Normal with no spill outstanding and no loan, no
    /// Emergency, the database's charge below `warning` of its ceiling and
    /// no memory stall. The agent then ticks at its calm pace.
    pub fn calm(&self) -> bool {
        self.calm
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Whether the whole database is in Emergency.
    pub fn emergency(&self) -> bool {
        self.emergency
    }

    /// Whether `now` is within a window of the last PSI trigger event.
    pub fn stalling(&self, now: Instant, window: Duration) -> bool {
        self.psi_last
            .is_some_and(|t| now.saturating_duration_since(t) < window)
    }

    pub fn libraries(&self) -> impl Iterator<Item = (&SessionId, &Library)> {
        self.libraries.iter()
    }

    pub fn library(&self, session: SessionId) -> Option<&Library> {
        self.libraries.get(&session)
    }

    /// A library was welcomed: its engines get their limits, and in an
    /// Emergency its non-essential engines are held at once. The owner has
    /// sent the welcome already.
    pub fn connect(
        &mut self,
        session: SessionId,
        pid: u32,
        uid: u32,
        declared: &[String],
    ) -> Vec<Action> {
        let mut library = Library::new(pid, uid, declared, &self.rules);
        let mut out = Vec::new();
        library.send_all_limits(&self.rules, &mut out);
        if self.emergency {
            library.set_backpressure(true, &self.rules, &mut out);
        }
        tracing::info!(pid, uid, engines = declared.len(), "library connected");
        let raise = self.memlock_raise(session, &library);
        self.libraries.insert(session, library);
        raise.into_iter().chain(sends(session, out)).collect()
    }

    /// The `RLIMIT_MEMLOCK` a library needs for its engines' hot sets
    /// (None: none configured, or observing only).
    fn memlock_raise(&self, session: SessionId, l: &Library) -> Option<Action> {
        let hot = l.hot_set_bytes(&self.rules);
        (self.rules.enforce && hot > 0).then_some(Action::RaiseMemlock {
            session,
            pid: l.pid,
            bytes: hot + MEMLOCK_HEADROOM,
        })
    }

    /// The connection ended: its engines' marks are disarmed.
    pub fn disconnect(&mut self, session: SessionId) -> Vec<Action> {
        let Some(l) = self.libraries.remove(&session) else {
            return Vec::new();
        };
        tracing::info!(pid = l.pid, "library disconnected");
        l.armed_marks()
            .map(|engine| Action::Mark {
                pid: l.pid,
                engine: engine.clone(),
                bytes: None,
            })
            .collect()
    }

    /// The kernel saw `engine` of process `pid` cross its mark; the next
    /// tick (the owner runs one at once) arms the next.
    pub fn on_mark(&mut self, pid: u32, engine: &str) {
        for l in self.libraries.values_mut().filter(|l| l.pid == pid) {
            l.on_mark(engine);
        }
    }

    /// A library's books.
    pub fn on_report(
        &mut self,
        session: SessionId,
        reports: Vec<EngineReport>,
        now: Instant,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(l) = self.libraries.get_mut(&session) {
            l.on_report(&self.rules, reports, now, &mut out);
        }
        sends(session, out).collect()
    }

    /// A library answered a spill request.
    pub fn on_spilled(
        &mut self,
        session: SessionId,
        engine: &str,
        target_bytes: u64,
        freed_bytes: u64,
    ) {
        if let Some(l) = self.libraries.get_mut(&session) {
            l.on_spilled(engine, target_bytes, freed_bytes);
        }
    }

    /// What became of a `RaiseMemlock` (the limit now, or why not).
    pub fn on_memlock(&mut self, session: SessionId, result: Result<u64, String>) {
        if let Some(l) = self.libraries.get_mut(&session) {
            l.memlock = Some(result);
        }
    }

    /// A library answered a `drop_cache` request.
    pub fn on_cache_dropped(
        &mut self,
        session: SessionId,
        engine: &str,
        target_bytes: u64,
        freed_bytes: u64,
    ) {
        if let Some(l) = self.libraries.get_mut(&session) {
            l.on_cache_dropped(engine, target_bytes, freed_bytes);
        }
    }

    /// A new (valid) configuration: loans end, every library hears its
    /// engines' new limits, and one whose hot sets may now lock more (a
    /// larger bound, or enforcement turned on), or whose last raise
    /// failed, gets its `RLIMIT_MEMLOCK` raised first (the limit is only
    /// ever raised).
    pub fn reload(&mut self, rules: Rules) -> Vec<Action> {
        let was_enforcing = self.rules.enforce;
        let before: BTreeMap<SessionId, u64> = self
            .libraries
            .iter()
            .map(|(s, l)| (*s, l.hot_set_bytes(&self.rules)))
            .collect();
        self.rules = rules;
        let mut actions = Vec::new();
        for (session, l) in &self.libraries {
            let grew = l.hot_set_bytes(&self.rules) > before.get(session).copied().unwrap_or(0);
            let failed = matches!(l.memlock, Some(Err(_)));
            if grew || failed || !was_enforcing {
                actions.extend(self.memlock_raise(*session, l));
            }
        }
        for (session, l) in &mut self.libraries {
            let mut out = Vec::new();
            l.reconfigure(&self.rules, &mut out);
            actions.extend(sends(*session, out));
        }
        actions
    }

    /// One tick: PSI, the ladder of every engine of every library, then
    /// the database's Emergency and the backpressure it brings.
    pub fn tick(&mut self, t: &Tick<'_>) -> Vec<Action> {
        self.run(t, None)
    }

    /// The ladder for the libraries of `pids` alone (processes whose
    /// engines crossed a mark), with the ceiling and the backpressure
    /// that follows it: what a reaction to a crossing needs, at a cost
    /// that does not grow with the other libraries connected (a flood of
    /// idle ones). Their lending and the calm pace are the tick's.
    pub fn react(&mut self, t: &Tick<'_>, pids: &[u32]) -> Vec<Action> {
        self.run(t, Some(pids))
    }

    fn run(&mut self, t: &Tick<'_>, only: Option<&[u32]>) -> Vec<Action> {
        let mut actions = Vec::new();
        let (new_stall, stalling) = self.pressure_stall(t);
        let cache_pressure = stalling || {
            let (charge, limit) = self.ceiling_charge(t);
            charge as f64 >= limit as f64 * self.rules.thresholds.warning
        };
        let ceiling_use = self.ceiling_use(t);
        let short = {
            let (current, limit) = ceiling_use;
            current as f64 >= limit as f64 * self.rules.thresholds.warning
        };
        // The database's Emergency is judged before the ladders, so that
        // while it lasts each library hears its share of what the
        // database must give back (see `Conditions::over_ceiling`).
        let was = self.emergency;
        let ceiling_action = self.enforce_ceiling(ceiling_use);
        let over_ceiling = if self.emergency && self.rules.enforce {
            let (current, limit) = ceiling_use;
            current.saturating_sub((limit as f64 * self.rules.restore) as u64)
        } else {
            0
        };
        if let Some(reading) = t.reading {
            let database_resident = reading
                .processes
                .iter()
                .map(resident_of)
                .fold(0u64, u64::saturating_add);
            // What the database holds that the kernel cannot drop, for the
            // libraries' room under the ceiling: the cgroup's figure, or
            // what its processes hold where the kernel has no ceiling.
            let held = t.ceiling.map_or(
                Held {
                    bytes: database_resident,
                    throttle_bytes: None,
                },
                |c| Held {
                    bytes: c.held_bytes,
                    throttle_bytes: c.throttle_bytes,
                },
            );
            let chosen = |l: &Library| only.is_none_or(|pids| pids.contains(&l.pid));
            // The nodes' parts of the ceiling, from every library's
            // budgets in force (the ceiling is the database's); none on
            // one node or with the ladder per node off (a reload may have
            // turned it off).
            self.node_parts = if self.rules.node_ceiling.is_empty() {
                BTreeMap::new()
            } else {
                let budgets: Vec<(String, u64)> = self
                    .libraries
                    .values()
                    .flat_map(|l| l.budgets_in_force(&self.rules))
                    .collect();
                self.rules
                    .node_parts(budgets.iter().map(|(e, b)| (e.as_str(), *b)))
            };
            let process_of = |pid: u32| reading.processes.iter().find(|p| p.pid == pid);
            // Several libraries in one process split its part of the
            // excess by what their own engines hold (each asked for the
            // whole would together ask for it again per library).
            let mut libraries_of: BTreeMap<u32, (usize, u64)> = BTreeMap::new();
            for l in self.libraries.values() {
                if let Some(p) = process_of(l.pid) {
                    let e = libraries_of.entry(l.pid).or_default();
                    e.0 += 1;
                    e.1 = e.1.saturating_add(l.engines_resident(p));
                }
            }
            for (session, l) in self.libraries.iter_mut().filter(|(_, l)| chosen(l)) {
                let mut out = Vec::new();
                if new_stall {
                    l.on_stall(&mut out);
                }
                let mut marks = Vec::new();
                if let Some(p) = process_of(l.pid) {
                    // This process's part of the excess: its part of what
                    // the database holds.
                    let mut over_ceiling = (over_ceiling as u128 * resident_of(p) as u128
                        / database_resident.max(1) as u128)
                        as u64;
                    if let Some(&(n, all)) = libraries_of.get(&l.pid)
                        && n > 1
                    {
                        over_ceiling = (over_ceiling as u128 * l.engines_resident(p) as u128
                            / all.max(1) as u128) as u64;
                    }
                    let at = library::Conditions {
                        stalling,
                        cache_pressure,
                        short,
                        over_ceiling,
                        now: t.now,
                    };
                    l.enforce(&self.rules, &self.node_parts, p, at, &mut out, &mut marks);
                    l.send_outside(held, &self.rules, &mut out);
                }
                actions.extend(sends(*session, out));
                actions.extend(marks.into_iter().map(|(engine, bytes)| Action::Mark {
                    pid: l.pid,
                    engine,
                    bytes,
                }));
            }
        }
        actions.extend(ceiling_action);
        // A reaction holds or frees every library only when it changed
        // the Emergency; otherwise the tick keeps them in step.
        if only.is_none() || self.emergency != was {
            for (session, l) in &mut self.libraries {
                let mut out = Vec::new();
                l.set_backpressure(self.emergency, &self.rules, &mut out);
                actions.extend(sends(*session, out));
            }
        }
        if only.is_some() {
            return actions;
        }
        self.calm = t.reading.is_some()
            && !cache_pressure
            && !self.emergency
            && self.libraries.values().all(Library::calm);
        actions
    }

    /// Whether the PSI trigger fired since the last tick, and whether the
    /// database is still within a window of its last event.
    fn pressure_stall(&mut self, t: &Tick<'_>) -> (bool, bool) {
        let Some((events, window)) = t.psi else {
            return (false, false);
        };
        let new = events > self.psi_seen;
        if new {
            self.psi_seen = events;
            self.psi_last = Some(t.now);
            tracing::warn!(events, "memory pressure stall (PSI trigger)");
        }
        (new, self.stalling(t.now, window))
    }

    /// The database's Emergency, with hysteresis: on at the emergency
    /// threshold of the ceiling, off below the warning threshold. Lowers
    /// the high mark to the restore point while on (when enforcing). Takes
    /// the database's use of its ceiling and the ceiling
    /// ([`Policy::ceiling_use`]).
    fn enforce_ceiling(&mut self, (current, limit): (u64, u64)) -> Option<Action> {
        let th = self.rules.thresholds;
        let f = current as f64 / limit.max(1) as f64;
        let was = self.emergency;
        if f >= th.emergency {
            self.emergency = true;
        } else if f < th.warning {
            self.emergency = false;
        }
        if self.emergency == was {
            return None;
        }
        if self.emergency {
            tracing::warn!(current, limit, "the database is in Emergency");
        } else {
            tracing::info!(current, limit, "the database's Emergency is over");
        }
        self.rules.enforce.then(|| {
            Action::SetHighMark(
                self.emergency
                    .then_some((limit as f64 * self.rules.restore) as u64),
            )
        })
    }

    /// The database's whole charge (page cache included) and its ceiling:
    /// the cgroup's, or the attributed resident and page-cache total
    /// where the kernel enforces no ceiling.
    fn ceiling_charge(&self, t: &Tick<'_>) -> (u64, u64) {
        match t.ceiling {
            Some(c) => (c.charge_bytes, c.limit_bytes),
            None => (
                t.reading.map_or(0, |r| {
                    r.processes
                        .iter()
                        .flat_map(|p| p.engines.values().chain([&p.unattributed]))
                        .map(|e| e.resident_bytes + e.page_cache_bytes)
                        .sum()
                }),
                self.rules.ceiling_bytes,
            ),
        }
    }
}

/// What the database holds that the kernel cannot drop, and the mark above
/// which the kernel throttles it: a library's room for reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Held {
    pub bytes: u64,
    /// See [`CeilingUse::throttle_bytes`].
    pub throttle_bytes: Option<u64>,
}

/// What the kernel attributes to a process as resident, all of it.
fn resident_of(p: &ProcessAttribution) -> u64 {
    p.engines
        .values()
        .chain([&p.unattributed])
        .map(|e| e.resident_bytes)
        .fold(0, u64::saturating_add)
}

impl Policy {
    /// The database's use of its ceiling and the ceiling: the larger of
    /// the cgroup's working set and what its processes hold resident (the
    /// attributed total, which adds up to their RSS), or the attributed
    /// total alone where the kernel enforces no ceiling. The cgroup alone
    /// is not enough: pages a process maps but another cgroup was charged
    /// for (its binary's text read in before it started, memory touched
    /// before it joined) are resident in it, and the ceiling is on the
    /// database's memory, not on its cgroup's share of it.
    fn ceiling_use(&self, t: &Tick<'_>) -> (u64, u64) {
        let resident = t.reading.map_or(0, |r| {
            r.processes
                .iter()
                .map(resident_of)
                .fold(0, u64::saturating_add)
        });
        match t.ceiling {
            Some(c) => (c.working_set_bytes.max(resident), c.limit_bytes),
            None => (resident, self.rules.ceiling_bytes),
        }
    }
}

#[cfg(test)]
mod tests;
