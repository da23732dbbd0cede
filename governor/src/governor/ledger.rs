//! The ledger: what each engine holds, its floor and its cap in force (the
//! configured cap moved by loans, kept in a [`LoanBook`]), and the admission
//! rule that decides every exact request. It is plain data under the
//! governor's lock; nothing here locks, waits or calls out.

use std::{sync::Arc, time::Instant};

use crate::{
    budget::{Budget, NumaBudget},
    engine::EngineId,
    error::{Holders, MemError},
    lending::{Holding, LendingRules, Loan, LoanBook, LoanEvent},
    numa::{NodeTotals, NodeUsage, NumaPolicy},
    pressure::{PressureChange, PressureLevel, PressureThresholds, ThresholdsHandle},
    spill::SpillAction,
};

#[derive(Debug)]
pub(super) struct EngineLedger {
    pub(super) id: EngineId,
    pub(super) name: Arc<str>,
    pub(super) floor: u64,
    /// The cap in force: the configured cap, moved by loans.
    pub(super) cap: u64,
    pub(super) used: u64,
    peak: u64,
    rejections: u64,
    level: PressureLevel,
}

impl EngineLedger {
    /// The part of its floor the engine is not using: kept free for it.
    fn protected(&self) -> u64 {
        self.floor.saturating_sub(self.used)
    }
}

/// Why a request was not admitted, before it is said as a [`MemError`]
/// (which only a counted refusal pays for: a name and the holders).
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// The engine's figure would overflow its counter.
    Overflow,
    /// Beyond the engine's cap in force.
    Budget,
    /// Beyond what the ceiling leaves (this much was free).
    Ceiling { available: u64 },
    /// Beyond the engine's share of node position `node`.
    NodeBudget { node: usize },
    /// Beyond node position `node`'s part of the ceiling.
    NodeCeiling { node: usize },
}

#[derive(Debug)]
pub(super) struct Ledger {
    pub(super) ceiling: u64,
    pub(super) total: u64,
    /// What the database holds that no reservation here accounts for
    /// (`MemoryGovernor::set_outside_bytes`): taken off the pool's room.
    pub(super) outside: u64,
    /// Moves with every figure set from outside the governor (and with the
    /// probe): a probe's reading lands only if none came in between.
    pub(super) outside_epoch: u64,
    /// Sum of every engine's `protected()`, kept up to date on each change.
    protected_total: u64,
    pub(super) engines: Vec<EngineLedger>,
    /// The engines' names in ledger order, shared with refusals (their
    /// [`Holders`]).
    names: Arc<[Arc<str>]>,
    pub(super) level: PressureLevel,
    /// The thresholds in force and the handle version they came from.
    thresholds: PressureThresholds,
    thresholds_version: u64,
    /// Threads in `reserve_timeout`: releases wake them only if there are
    /// any (a futex wake is a system call).
    pub(super) waiters: usize,
    /// Budgets lent between engines (by ledger position); the caps in
    /// force follow it.
    pub(super) loans: LoanBook<usize>,
    /// The books per NUMA node; None on one node.
    numa: Option<NumaLedger>,
}

/// The books per NUMA node: each node's part of the ceiling and total,
/// and per engine its use, share weights and policy there.
#[derive(Debug)]
struct NumaLedger {
    ids: Vec<u32>,
    weights: Vec<u64>,
    weight_sum: u64,
    totals: Vec<u64>,
    engines: Vec<EngineNodes>,
}

#[derive(Debug)]
struct EngineNodes {
    policy: NumaPolicy,
    weights: Vec<u64>,
    weight_sum: u64,
    used: Vec<u64>,
    remote: Vec<u64>,
    rejections: Vec<u64>,
}

/// `whole * w / sum`, exactly (u128), for a share by weight.
fn part(whole: u64, w: u64, sum: u64) -> u64 {
    (u128::from(whole) * u128::from(w) / u128::from(sum.max(1))) as u64
}

impl NumaLedger {
    fn new(numa: NumaBudget, engines: &[crate::budget::EngineBudget]) -> Self {
        let n = numa.node_weights.len();
        Self {
            ids: numa.topology.nodes().iter().map(|x| x.id).collect(),
            weight_sum: numa.node_weights.iter().sum(),
            totals: vec![0; n],
            engines: engines
                .iter()
                .map(|e| {
                    let weights = e
                        .node_weights
                        .clone()
                        .unwrap_or_else(|| numa.node_weights.clone());
                    EngineNodes {
                        policy: e.numa_policy,
                        weight_sum: weights.iter().sum(),
                        weights,
                        used: vec![0; n],
                        remote: vec![0; n],
                        rejections: vec![0; n],
                    }
                })
                .collect(),
            weights: numa.node_weights,
        }
    }

    fn node_ceiling(&self, ceiling: u64, node: usize) -> u64 {
        part(ceiling, self.weights[node], self.weight_sum)
    }

    fn share(&self, i: usize, cap: u64, node: usize) -> u64 {
        let e = &self.engines[i];
        part(cap, e.weights[node], e.weight_sum)
    }

    /// Room for engine `i` on `node`: its share's and the node's.
    fn room(&self, i: usize, cap: u64, ceiling: u64, node: usize) -> (u64, u64) {
        (
            self.share(i, cap, node)
                .saturating_sub(self.engines[i].used[node]),
            self.node_ceiling(ceiling, node)
                .saturating_sub(self.totals[node]),
        )
    }
}

/// A snapshot of one engine's accounting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineUsage {
    pub engine: EngineId,
    pub name: Arc<str>,
    pub used_bytes: u64,
    pub floor_bytes: u64,
    /// The cap in force (the configured cap moved by loans).
    pub cap_bytes: u64,
    /// Budget this engine has lent to others.
    pub lent_bytes: u64,
    /// Loans taken back from this engine that left it over its spill
    /// mark: each forced a spill.
    pub forced_spills: u64,
    pub peak_bytes: u64,
    pub rejections: u64,
    pub level: PressureLevel,
}

impl Ledger {
    /// An empty ledger for `budget`, in budget order.
    pub(super) fn new(budget: Budget, thresholds: &ThresholdsHandle) -> Self {
        let numa = budget
            .numa
            .filter(|n| n.node_weights.len() > 1)
            .map(|n| NumaLedger::new(n, &budget.engines));
        let engines: Vec<EngineLedger> = budget
            .engines
            .into_iter()
            .map(|e| EngineLedger {
                id: e.id,
                name: e.name,
                floor: e.floor_bytes,
                cap: e.cap_bytes,
                used: 0,
                peak: 0,
                rejections: 0,
                level: PressureLevel::Normal,
            })
            .collect();
        let mut loans = LoanBook::new(LendingRules::default());
        for (i, e) in engines.iter().enumerate() {
            loans.set_engine(i, e.cap, e.floor);
        }
        Self {
            ceiling: budget.ceiling_bytes,
            outside: 0,
            outside_epoch: 0,
            total: 0,
            protected_total: engines.iter().map(EngineLedger::protected).sum(),
            names: engines.iter().map(|e| e.name.clone()).collect(),
            engines,
            level: PressureLevel::Normal,
            thresholds: thresholds.get(),
            thresholds_version: thresholds.version(),
            waiters: 0,
            loans,
            numa,
        }
    }

    /// Applies `f` to engine `i`, keeping `protected_total` in step.
    pub(super) fn update<R>(&mut self, i: usize, f: impl FnOnce(&mut EngineLedger) -> R) -> R {
        let before = self.engines[i].protected();
        let r = f(&mut self.engines[i]);
        let after = self.engines[i].protected();
        self.protected_total = self.protected_total - before + after;
        r
    }

    /// Admits `n` bytes for engine `i` from a thread on `node` (a position
    /// in the topology; 0 without NUMA); returns the node charged, or the
    /// refusal naming the database's largest holders. A refusal is
    /// counted, and a lender refused takes its loans back.
    pub(super) fn admit(&mut self, i: usize, node: usize, n: u64) -> Result<usize, MemError> {
        match self.decide(i, node, n, true) {
            Ok(m) => {
                self.add_admitted(i, node, m, n);
                Ok(m)
            }
            Err(refusal) => Err(self.refused(i, n, refusal)),
        }
    }

    /// Admits a credit draw of `n` bytes on `node`, if it fits there. A
    /// draw is not the caller's request: it neither counts as a refusal
    /// nor ends loans, and it builds no error (the request then goes
    /// exact, and that one names what refused it).
    pub(super) fn draw(&mut self, i: usize, node: usize, n: u64) -> bool {
        match self.decide(i, node, n, false) {
            Ok(m) => {
                self.add_admitted(i, node, m, n);
                true
            }
            Err(_) => false,
        }
    }

    /// Whether a counted refusal of engine `i` would change anything but
    /// counters: it ends the loans of a lender.
    pub(super) fn refusal_moves_caps(&self, i: usize) -> bool {
        self.loans.is_lender(&i)
    }

    /// The admission rule, without changing anything: the node `n` bytes
    /// of engine `i` are charged to, or why not. `counted` is false for
    /// credit draws, which do not borrow another node's share.
    fn decide(&self, i: usize, node: usize, n: u64, counted: bool) -> Result<usize, Refusal> {
        let e = &self.engines[i];
        let new_used = e.used.checked_add(n).ok_or(Refusal::Overflow)?;
        let global_free = self.global_free(i);
        // A zero-byte request is a probe: it fails once the engine or the
        // pool is exhausted, like any request would.
        let need = n.max(1);
        if e.used.saturating_add(need) > e.cap || new_used > e.cap {
            Err(Refusal::Budget)
        } else if need > global_free {
            Err(Refusal::Ceiling {
                available: global_free,
            })
        } else {
            self.pick_node(i, node, n, counted)
        }
    }

    /// Books `n` admitted bytes of engine `i`, from a thread on `node`,
    /// charged to node `m`.
    fn add_admitted(&mut self, i: usize, node: usize, m: usize, n: u64) {
        self.add(i, m, n);
        if m != node
            && let Some(numa) = &mut self.numa
            && numa.engines[i].policy == NumaPolicy::PreferLocal
        {
            numa.engines[i].remote[m] += n;
        }
    }

    /// Counts the refusal of `n` bytes for engine `i` (ending a lender's
    /// loans) and says it as an error naming the largest holders.
    #[cold]
    fn refused(&mut self, i: usize, n: u64, refusal: Refusal) -> MemError {
        let err = self.refusal_error(i, n, refusal);
        if matches!(refusal, Refusal::Overflow) {
            return err;
        }
        self.engines[i].rejections += 1;
        if let (Some(numa), Refusal::NodeBudget { node: m } | Refusal::NodeCeiling { node: m }) =
            (&mut self.numa, refusal)
        {
            numa.engines[i].rejections[m] += 1;
        }
        // A lender refused takes its loans back at once; borrowers will
        // have to give way (their caps drop, and a spill controller
        // spills what they hold beyond them).
        if self.loans.is_lender(&i) {
            let used: Vec<u64> = self.engines.iter().map(|e| e.used).collect();
            let events = self
                .loans
                .take_back(&i, Instant::now(), &self.thresholds, |j| Holding {
                    resident_bytes: used[*j],
                    reserved_bytes: used[*j],
                });
            self.apply_loans(&events);
        }
        err
    }

    /// The error saying `refusal` of `n` bytes for engine `i`, with the
    /// database's largest holders now.
    fn refusal_error(&self, i: usize, n: u64, refusal: Refusal) -> MemError {
        let e = &self.engines[i];
        let engine = String::from(&*e.name);
        let (cap, ceiling) = (e.cap, self.ceiling);
        match refusal {
            Refusal::Overflow => MemError::SizeOverflow {
                engine,
                requested: n,
                current: e.used,
            },
            Refusal::Budget => MemError::BudgetExceeded {
                engine,
                requested: n,
                available: cap.saturating_sub(e.used),
                limit: cap,
                holders: self.holders(),
            },
            Refusal::Ceiling { available } => MemError::GlobalCeilingExceeded {
                engine,
                requested: n,
                available,
                limit: ceiling,
                holders: self.holders(),
            },
            Refusal::NodeBudget { node: m } | Refusal::NodeCeiling { node: m } => {
                let numa = self
                    .numa
                    .as_ref()
                    .expect("a node refusal comes from the NUMA books");
                let (share_room, node_room) = numa.room(i, cap, ceiling, m);
                if matches!(refusal, Refusal::NodeBudget { .. }) {
                    MemError::NodeBudgetExceeded {
                        engine,
                        node: numa.ids[m],
                        requested: n,
                        available: share_room,
                        limit: numa.share(i, cap, m),
                        holders: self.holders(),
                    }
                } else {
                    MemError::NodeCeilingExceeded {
                        engine,
                        node: numa.ids[m],
                        requested: n,
                        available: node_room,
                        limit: numa.node_ceiling(ceiling, m),
                        holders: self.holders(),
                    }
                }
            }
        }
    }

    /// The database's largest holders now (see [`Holders`]).
    pub(super) fn holders(&self) -> Holders {
        Holders::largest(&self.names, self.engines.iter().map(|e| (e.id, e.used)))
    }

    /// The node a request of `n` bytes for engine `i` from a thread on
    /// `node` is charged to, by the engine's policy, or the refusal naming
    /// the node that had no room.
    fn pick_node(&self, i: usize, node: usize, n: u64, counted: bool) -> Result<usize, Refusal> {
        let Some(numa) = &self.numa else {
            return Ok(0);
        };
        let need = n.max(1);
        let (cap, ceiling) = (self.engines[i].cap, self.ceiling);
        let room = |m: usize| numa.room(i, cap, ceiling, m);
        let fits = |m: usize| {
            let (share, node) = room(m);
            need <= share && need <= node
        };
        let refusal = |m: usize| {
            if need > room(m).0 {
                Refusal::NodeBudget { node: m }
            } else {
                Refusal::NodeCeiling { node: m }
            }
        };
        // The node among `nodes` with the most room (ties to the lowest
        // position).
        let most_room = |nodes: &mut dyn Iterator<Item = usize>| {
            nodes.max_by_key(|&m| {
                let (a, b) = room(m);
                (a.min(b), std::cmp::Reverse(m))
            })
        };
        // The node (other than `skip`) with the most room that fits.
        let best = |skip: Option<usize>| {
            most_room(&mut (0..numa.ids.len()).filter(|&m| Some(m) != skip && fits(m)))
        };
        match numa.engines[i].policy {
            _ if fits(node) && numa.engines[i].policy != NumaPolicy::Interleave => Ok(node),
            NumaPolicy::Strict => Err(refusal(node)),
            NumaPolicy::PreferLocal if !counted => Err(refusal(node)),
            NumaPolicy::PreferLocal => best(Some(node)).ok_or_else(|| refusal(node)),
            NumaPolicy::Interleave => best(None).ok_or_else(|| {
                // None fits: name the node with the most room.
                refusal(most_room(&mut (0..numa.ids.len())).unwrap_or(0))
            }),
        }
    }

    /// Counts bytes that cannot be refused on `node`; only a counter
    /// overflow fails.
    pub(super) fn charge(&mut self, i: usize, node: usize, n: u64) -> Result<(), MemError> {
        let e = &self.engines[i];
        if e.used
            .checked_add(n)
            .and(self.total.checked_add(n))
            .is_none()
        {
            return Err(MemError::SizeOverflow {
                engine: String::from(&*e.name),
                requested: n,
                current: e.used,
            });
        }
        self.add(i, node, n);
        Ok(())
    }

    fn add(&mut self, i: usize, node: usize, n: u64) {
        self.update(i, |e| {
            e.used += n;
            e.peak = e.peak.max(e.used);
        });
        self.total += n;
        if let Some(numa) = &mut self.numa {
            numa.totals[node] += n;
            numa.engines[i].used[node] += n;
        }
    }

    /// Gives back `n` bytes of engine `i` charged to `node`. A node's books
    /// can be short of them: a pool that keeps its own books gives bytes
    /// back without their node (`Shared::give_back_any` takes them off the
    /// releasing thread's node first), and a thread's unspent credit,
    /// charged to its node, may come back there after such a release took
    /// that node's bytes. What `node` lacks then comes off the engine's other nodes,
    /// the last first: the engine's books stay whole, and no node's go
    /// below zero.
    pub(super) fn release(&mut self, i: usize, node: usize, n: u64) {
        // A guard never holds more than was added for it.
        debug_assert!(self.engines[i].used >= n && self.total >= n);
        self.update(i, |e| e.used -= n);
        self.total -= n;
        if let Some(numa) = &mut self.numa {
            let nodes = numa.totals.len();
            let mut left = n;
            for m in std::iter::once(node).chain((0..nodes).rev().filter(|&m| m != node)) {
                let take = left.min(numa.engines[i].used[m]);
                numa.totals[m] -= take;
                numa.engines[i].used[m] -= take;
                left -= take;
                if left == 0 {
                    break;
                }
            }
            debug_assert_eq!(left, 0, "the engine's nodes hold less than it does");
        }
    }

    /// Engine `i`'s books per node (empty without NUMA).
    pub(super) fn node_usage(&self, i: usize) -> Vec<NodeUsage> {
        let Some(numa) = &self.numa else {
            return Vec::new();
        };
        let e = &numa.engines[i];
        (0..numa.ids.len())
            .map(|m| NodeUsage {
                node: numa.ids[m],
                used_bytes: e.used[m],
                share_bytes: numa.share(i, self.engines[i].cap, m),
                remote_bytes: e.remote[m],
                rejections: e.rejections[m],
            })
            .collect()
    }

    /// Each node's total and part of the ceiling (empty without NUMA).
    pub(super) fn node_totals(&self) -> Vec<NodeTotals> {
        let Some(numa) = &self.numa else {
            return Vec::new();
        };
        (0..numa.ids.len())
            .map(|m| NodeTotals {
                node: numa.ids[m],
                used_bytes: numa.totals[m],
                ceiling_bytes: numa.node_ceiling(self.ceiling, m),
            })
            .collect()
    }

    /// Whether the thresholds in force are `handle`'s latest.
    pub(super) fn thresholds_current(&self, handle: &ThresholdsHandle) -> bool {
        handle.version() == self.thresholds_version
    }

    /// Takes up the thresholds in `handle` if they changed, recomputes the
    /// levels, and appends the changes to `out`.
    pub(super) fn refresh_levels(
        &mut self,
        handle: &ThresholdsHandle,
        out: &mut Vec<PressureChange>,
    ) {
        let version = handle.version();
        if version != self.thresholds_version {
            self.thresholds = handle.get();
            self.thresholds_version = version;
        }
        let t = self.thresholds;
        for e in &mut self.engines {
            let now = t.level(e.used, e.cap);
            if now != e.level {
                out.push(PressureChange {
                    engine: Some(e.id),
                    from: e.level,
                    to: now,
                });
                e.level = now;
            }
        }
        let now = t.level(self.total, self.ceiling);
        if now != self.level {
            out.push(PressureChange {
                engine: None,
                from: self.level,
                to: now,
            });
            self.level = now;
        }
    }

    /// What a request may take and still leave a quarter of the ceiling
    /// under it, the books and what is held outside them counted: beyond
    /// it, a probe of what is held outside is read first. (What matters
    /// there is the kernel's ceiling, so floors are not taken off.)
    pub(super) fn probe_slack(&self) -> u64 {
        self.ceiling
            .saturating_sub(self.total)
            .saturating_sub(self.outside)
            .saturating_sub(self.ceiling / 4)
    }

    /// The pool room left for engine `i`: what is below the ceiling, less
    /// the floors other engines keep (unused and not lent).
    fn global_free(&self, i: usize) -> u64 {
        let others = self.protected_total - self.engines[i].protected();
        let books = self
            .ceiling
            .saturating_sub(self.total)
            .saturating_sub(others);
        // What the database holds outside the books takes room, but never
        // what is left of the engine's floor.
        books
            .saturating_sub(self.outside)
            .max(books.min(self.engines[i].protected()))
    }

    /// Bytes the engine could still take: the smaller of its cap room and
    /// the pool room left for it.
    pub(super) fn headroom(&self, i: usize) -> u64 {
        let e = &self.engines[i];
        e.cap.saturating_sub(e.used).min(self.global_free(i))
    }

    /// [`headroom`](Self::headroom) on `node`: the engine's and the node's
    /// room there too. An interleaved engine has none (it decides exactly).
    pub(super) fn headroom_at(&self, i: usize, node: usize) -> u64 {
        let all = self.headroom(i);
        match &self.numa {
            None => all,
            Some(numa) if numa.engines[i].policy == NumaPolicy::Interleave => 0,
            Some(numa) => {
                let (share, room) = numa.room(i, self.engines[i].cap, self.ceiling, node);
                all.min(share).min(room)
            }
        }
    }

    pub(super) fn usage(&self, i: usize) -> EngineUsage {
        let e = &self.engines[i];
        EngineUsage {
            engine: e.id,
            name: e.name.clone(),
            used_bytes: e.used,
            floor_bytes: e.floor,
            cap_bytes: e.cap,
            lent_bytes: self.loans.lent_bytes(&i),
            forced_spills: self.loans.forced_spills(&i),
            peak_bytes: e.peak,
            rejections: e.rejections,
            level: e.level,
        }
    }

    /// Changes engine `i`'s floor and cap, refused whole if it would break
    /// an invariant (see `MemoryGovernor::set_limits`).
    pub(super) fn set_limits(
        &mut self,
        i: usize,
        floor_bytes: u64,
        cap_bytes: u64,
    ) -> Result<(), MemError> {
        let e = &self.engines[i];
        let bad = |field: &str, reason: String| MemError::InvalidBudget {
            field: format!("engine {}.{field}", e.name),
            reason,
        };
        if floor_bytes > cap_bytes {
            return Err(bad(
                "floor_bytes",
                format!("{floor_bytes} is above the cap {cap_bytes}"),
            ));
        }
        if cap_bytes > self.ceiling {
            return Err(bad(
                "cap_bytes",
                format!("{cap_bytes} is above the ceiling {}", self.ceiling),
            ));
        }
        if cap_bytes < e.used {
            return Err(bad(
                "cap_bytes",
                format!(
                    "{cap_bytes} is below the {} bytes it holds; spill first",
                    e.used
                ),
            ));
        }
        let floors: u64 = self.engines.iter().map(|x| x.floor).sum::<u64>() - e.floor + floor_bytes;
        if floors > self.ceiling {
            return Err(bad(
                "floor_bytes",
                format!(
                    "floors would add up to {floors}, above the ceiling {}",
                    self.ceiling
                ),
            ));
        }
        self.update(i, |e| e.floor = floor_bytes);
        // New terms: the engine's loans end, and its cap is the new one.
        self.loans.set_engine(i, cap_bytes, floor_bytes);
        self.apply_caps();
        Ok(())
    }

    /// Sets every engine's cap to its budget in force (never above the
    /// ceiling).
    fn apply_caps(&mut self) {
        for i in 0..self.engines.len() {
            let cap = self
                .loans
                .budget(&i)
                .unwrap_or(self.engines[i].cap)
                .min(self.ceiling);
            self.update(i, |e| e.cap = cap);
        }
    }

    fn apply_loans(&mut self, events: &[LoanEvent<usize>]) {
        if !events.is_empty() {
            self.apply_caps();
        }
    }

    /// One round of lending at `now`, on what each engine holds in the
    /// books (see [`crate::lending`]). Returns what changed.
    pub(super) fn rebalance(&mut self, now: Instant) -> Vec<LoanEvent<EngineId>> {
        let used: Vec<u64> = self.engines.iter().map(|e| e.used).collect();
        let events = self.loans.round(now, &self.thresholds, |i| Holding {
            resident_bytes: used[*i],
            reserved_bytes: used[*i],
        });
        self.apply_loans(&events);
        events
            .into_iter()
            .map(|ev| ev.map(|i| self.engines[i].id))
            .collect()
    }

    /// The idle engines marked to spill that must spill now: the governor
    /// is short of memory when what is held is at the warning threshold of
    /// the ceiling.
    pub(super) fn idle_spills(&mut self, now: Instant) -> Vec<SpillAction> {
        let short = self.total as f64 >= self.ceiling as f64 * self.thresholds.warning;
        self.loans
            .idle_spills(now, short)
            .into_iter()
            .map(|(i, target_bytes)| SpillAction::Spill {
                engine: self.engines[i].id,
                target_bytes,
            })
            .collect()
    }

    /// The loans in force.
    pub(super) fn loans(&self) -> Vec<Loan<EngineId>> {
        self.loans
            .loans()
            .iter()
            .map(|l| l.clone().map(|i| self.engines[i].id))
            .collect()
    }

    /// Changes the ceiling, refused if it is below what is held, a cap, or
    /// the sum of floors.
    pub(super) fn set_ceiling(&mut self, ceiling_bytes: u64) -> Result<(), MemError> {
        let bad = |reason: String| MemError::InvalidBudget {
            field: "ceiling_bytes".into(),
            reason,
        };
        let floors: u64 = self.engines.iter().map(|e| e.floor).sum();
        // The configured caps (a borrower's cap in force is clamped to the
        // ceiling, whatever it borrowed).
        let max_cap = (0..self.engines.len())
            .filter_map(|i| self.loans.configured(&i))
            .max()
            .unwrap_or(0);
        if ceiling_bytes < self.total {
            return Err(bad(format!(
                "{ceiling_bytes} is below the {} bytes held",
                self.total
            )));
        }
        if ceiling_bytes < max_cap || ceiling_bytes < floors {
            return Err(bad(format!(
                "{ceiling_bytes} is below a cap ({max_cap}) or the floors ({floors})"
            )));
        }
        self.ceiling = ceiling_bytes;
        self.apply_caps();
        Ok(())
    }
}
