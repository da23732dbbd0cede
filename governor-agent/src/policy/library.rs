//! One connected library (one governed process) as the policy sees it: the
//! engines it declared, each one's state on the ladder, and the loans
//! between them. Its methods are the policy's rules for one process; each
//! writes what the library must be told into `out`.

use std::{collections::BTreeMap, time::Instant};

use nodedb_governor::{
    PressureLevel,
    control::wire::{EngineReport, ToLibrary},
    lending::{Holding, Loan, LoanBook, LoanEvent},
};

use super::{
    CACHE_DROP_RETRY, CACHE_DROP_RETRY_MAX, Rules, SPILL_RETRY,
    engine::{Books, EngineEnforcement, EngineNode, EngineState},
};
use crate::{
    attribution::{Attributed, ProcessAttribution},
    config::EngineLimits,
};

/// One library connected over the control channel.
#[derive(Clone, Debug)]
pub struct Library {
    pub pid: u32,
    pub uid: u32,
    /// Observe only (`enforce = false`): levels are computed and shown, but
    /// nothing is asked of the library, and every engine's cap is this (the
    /// ceiling).
    observe_cap: Option<u64>,
    /// The engines it declared in its hello (the only ones it lends,
    /// borrows and is enforced on).
    engines: BTreeMap<String, EngineState>,
    loans: LoanBook<String>,
    /// What was last sent as held outside its books, and the ceiling
    /// with it (`send_outside`).
    outside_sent: Option<(u64, u64)>,
    /// The database's held memory and throttling mark at the last round
    /// (sent again with a new ceiling at a reload, before the next round).
    held_seen: Option<super::Held>,
    /// Its `RLIMIT_MEMLOCK` as the agent raised it, or why it could not
    /// (None: no hot sets configured for its engines).
    pub(super) memlock: Option<Result<u64, String>>,
    /// The nodes crowded at the last tick, and how often each became so.
    crowded: (std::collections::BTreeSet<u32>, BTreeMap<u32, u64>),
    /// The kernel's figures for its engines at the last round of the
    /// ladder, kept while that round left it calm: the same figures again,
    /// with nothing heard from it since and the database at ease, would
    /// change nothing, and the round is skipped (see `enforce`).
    calm_at: Option<Vec<Option<Attributed>>>,
    /// Rounds skipped so.
    skipped: u64,
}

/// What `status` shows of one library.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LibraryStatus {
    pub pid: u32,
    pub uid: u32,
    pub engines: BTreeMap<String, EngineEnforcement>,
    pub loans: Vec<Loan<String>>,
    /// Its `RLIMIT_MEMLOCK` soft limit as raised for its hot sets.
    #[serde(default)]
    pub memlock_bytes: Option<u64>,
    /// Why the agent could not raise it.
    #[serde(default)]
    pub memlock_error: Option<String>,
    /// Per NUMA node, how often its engines crowded it past the Critical
    /// threshold of its part of the ceiling (and were fitted to it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub crowded_nodes: BTreeMap<u32, u64>,
    /// Ticks at which its ladder was skipped: it was calm and the kernel's
    /// figures for its engines had not moved (a connected library that
    /// does nothing costs a tick next to nothing).
    #[serde(default)]
    pub unchanged_ticks: u64,
}

/// What holds for the whole database at this tick.
#[derive(Clone, Copy, Debug)]
pub(super) struct Conditions {
    /// It stalls on memory (PSI): engines spill from Warning on.
    pub stalling: bool,
    /// Its charge is at the warning threshold of the ceiling (or it
    /// stalls): engines above their page-cache share drop cold files.
    pub cache_pressure: bool,
    /// Its use is at the warning threshold of the ceiling: idle engines
    /// marked `idle_spill` spill down to their floors.
    pub short: bool,
    /// The database is in Emergency (at the emergency threshold of its
    /// ceiling, until below warning): what this process must give back
    /// for the database to be at the restore point again (0 otherwise).
    /// Its engines are asked to spill it between them, each in
    /// proportion to what it holds above its floor, whatever its own
    /// level: engines each within their budgets can still hold more than
    /// the ceiling together (budgets add up to more than it), with memory
    /// the library does not see (touched without reserving), and where
    /// the kernel does not throttle them (cgroup v1 has no
    /// `memory.high`) nothing else stops them before `memory.max`.
    pub over_ceiling: u64,
    pub now: Instant,
}

/// `engine` on each node its budget is split over: what the kernel
/// attributes to it there against its share of `budget` (empty: the
/// engine is judged in all only).
fn judge_nodes(
    rules: &Rules,
    engine: &str,
    budget: u64,
    process: &ProcessAttribution,
) -> Vec<EngineNode> {
    let Some(shares) = rules.node_shares.get(engine) else {
        return Vec::new();
    };
    let attributed = process.engines.get(engine);
    shares
        .iter()
        .filter(|s| s.fraction > 0.0)
        .map(|s| {
            let share_bytes = (budget as f64 * s.fraction) as u64;
            let resident_bytes = attributed
                .and_then(|a| a.node_resident_bytes.get(s.node as usize).copied())
                .unwrap_or(0);
            EngineNode {
                node: s.node,
                resident_bytes,
                share_bytes,
                level: rules.thresholds.level(resident_bytes, share_bytes),
            }
        })
        .collect()
}

/// The nodes whose placed engines must give way, with the factor their
/// shares there are fitted by: a node where what the kernel attributes to
/// the process (its engines, and its threads that are none's) has reached
/// the Critical threshold of the node's part of the ceiling (`parts`, see
/// [`Rules::node_parts`]), while the engines' shares there add up to more
/// than that part (budgets overcommit the ceiling, and an engine within
/// its share can still fill the node). Each is then held to its share
/// scaled down to fit (the node's part over the sum of the shares), so the
/// engines holding the most beyond that give it back.
fn crowded_nodes(
    rules: &Rules,
    parts: &BTreeMap<u32, f64>,
    budgets: &BTreeMap<String, u64>,
    process: &ProcessAttribution,
) -> BTreeMap<u32, f64> {
    let mut out = BTreeMap::new();
    for (&node, &part) in parts {
        let room = rules.ceiling_bytes as f64 * part;
        let shares: f64 = rules
            .node_shares
            .iter()
            .filter_map(|(engine, shares)| {
                let s = shares.iter().find(|s| s.node == node)?;
                Some(*budgets.get(engine)? as f64 * s.fraction)
            })
            .sum();
        // Everything of the process on the node, its threads that are no
        // engine's too.
        let held: u64 = process
            .engines
            .values()
            .chain([&process.unattributed])
            .filter_map(|a| a.node_resident_bytes.get(node as usize).copied())
            .sum();
        if shares > room && held as f64 >= room * rules.thresholds.critical {
            out.insert(node, room / shares);
        }
    }
    out
}

/// `raw` bytes to take off a cap, in whole `step`s: rounded up (the cap
/// errs on the side of the budget), up at once, down only half a step
/// past the boundary below `last`, so memory wobbling at a boundary
/// (threads mapping and unmapping) does not move the cap back and forth.
fn stepped(raw: u64, last: u64, step: u64) -> u64 {
    let up = raw.div_ceil(step) * step;
    if up >= last || raw + step / 2 <= last.saturating_sub(step) {
        up
    } else {
        last
    }
}

/// Untracked memory moves an engine's cap in steps of its budget / 64 (at
/// least 1 MiB, rounded up), so a wobble of a few pages sends nothing.
pub(super) fn untracked_step(budget: u64) -> u64 {
    (budget / 64).max(1 << 20)
}

impl Library {
    /// A library that declared `declared`; its engines start on their
    /// configured budgets.
    pub(super) fn new(pid: u32, uid: u32, declared: &[String], rules: &Rules) -> Self {
        let mut loans = LoanBook::new(rules.lending);
        let mut engines = BTreeMap::new();
        for l in rules.limits.iter().filter(|l| declared.contains(&l.name)) {
            loans.set_engine(l.name.clone(), l.budget_bytes, l.floor_bytes);
            loans.set_idle_spill(l.name.as_str(), l.idle_spill);
            engines.insert(l.name.clone(), EngineState::default());
        }
        Self {
            pid,
            uid,
            observe_cap: (!rules.enforce).then_some(rules.ceiling_bytes),
            engines,
            loans,
            outside_sent: None,
            held_seen: None,
            memlock: None,
            crowded: Default::default(),
            calm_at: None,
            skipped: 0,
        }
    }

    pub fn status(&self, rules: &Rules) -> LibraryStatus {
        let share = |name: &str| {
            rules
                .limits
                .iter()
                .find(|l| l.name == name)
                .and_then(|l| l.page_cache_share_bytes)
        };
        LibraryStatus {
            pid: self.pid,
            uid: self.uid,
            engines: self
                .engines
                .iter()
                .map(|(name, e)| {
                    let forced = self.loans.forced_spills(name.as_str());
                    (
                        name.clone(),
                        e.status(self.budget(name), share(name), forced),
                    )
                })
                .collect(),
            loans: self.loans.loans().to_vec(),
            memlock_bytes: self.memlock.as_ref().and_then(|r| r.as_ref().ok().copied()),
            memlock_error: self
                .memlock
                .as_ref()
                .and_then(|r| r.as_ref().err().cloned()),
            crowded_nodes: self.crowded.1.clone(),
            unchanged_ticks: self.skipped,
        }
    }

    /// The engine's budget in force (0 for an engine it did not declare).
    pub fn budget(&self, engine: &str) -> u64 {
        self.loans.budget(engine).unwrap_or(0)
    }

    /// The hot sets its engines may lock, in all, under `rules`.
    pub(super) fn hot_set_bytes(&self, rules: &Rules) -> u64 {
        self.declared(rules).iter().map(|l| l.hot_set_bytes).sum()
    }

    /// The limits of the engines it declared, in configuration order.
    /// Each declared engine's budget in force.
    pub(super) fn budgets_in_force(&self, rules: &Rules) -> BTreeMap<String, u64> {
        self.declared(rules)
            .iter()
            .map(|l| (l.name.clone(), self.budget(&l.name)))
            .collect()
    }

    fn declared(&self, rules: &Rules) -> Vec<EngineLimits> {
        rules
            .limits
            .iter()
            .filter(|l| self.engines.contains_key(&l.name))
            .cloned()
            .collect()
    }

    /// What this library's engines hold in `process` (the kernel's
    /// attribution): its part of the process when several libraries share
    /// one.
    pub(super) fn engines_resident(&self, process: &ProcessAttribution) -> u64 {
        self.engines
            .keys()
            .filter_map(|name| process.engines.get(name))
            .map(|e| e.resident_bytes)
            .fold(0u64, u64::saturating_add)
    }

    /// Sends `l` the limits in force: its floor and its budget, less what it
    /// holds unreserved (never below the floor), or less again under
    /// backpressure. Observing, the cap is the ceiling and the floor 0.
    fn send_limits(&mut self, l: &EngineLimits, out: &mut Vec<ToLibrary>) {
        self.send_limits_if(l, out, false);
    }

    /// Sends the engine its limits; with `only_new_cap`, only if its cap
    /// is not the one last sent.
    fn send_limits_if(&mut self, l: &EngineLimits, out: &mut Vec<ToLibrary>, only_new_cap: bool) {
        let budget = self.budget(&l.name);
        let observe_cap = self.observe_cap;
        let Some(e) = self.engines.get_mut(&l.name) else {
            return;
        };
        let (floor, cap) = match observe_cap {
            Some(cap) => (0, cap),
            None => {
                // What the kernel sees the engine hold beyond its
                // reservations (allocations it does not reserve, freed
                // pages its arena keeps) counts against the budget too.
                // Never below the floor, though: the floor is guaranteed,
                // and an engine left no room at all could not finish what
                // it is doing (the ladder still spills it).
                let corrected = budget.saturating_sub(e.untracked_bytes);
                let corrected = e
                    .node_cap
                    .map_or(corrected, |c| c.min(corrected))
                    .max(l.floor_bytes.min(budget));
                let cap = e.held_to.map_or(corrected, |held| held.min(corrected));
                (l.floor_bytes.min(cap), cap)
            }
        };
        if only_new_cap && cap == e.cap_bytes {
            return;
        }
        e.counters.limit_changes += 1;
        e.cap_bytes = cap;
        tracing::info!(pid = self.pid, engine = %l.name, floor, cap, budget, "engine limits sent");
        out.push(ToLibrary::Limits {
            engine: l.name.clone(),
            floor_bytes: floor,
            cap_bytes: cap,
            // Only when configured: a library from before hot sets refuses
            // the field (and one without a bound allows none anyway).
            hot_set_bytes: (l.hot_set_bytes > 0).then_some(l.hot_set_bytes),
        });
    }

    /// Sends every declared engine its limits (the welcome, a reload).
    pub(super) fn send_all_limits(&mut self, rules: &Rules, out: &mut Vec<ToLibrary>) {
        self.calm_at = None;
        for l in self.declared(rules) {
            self.send_limits(&l, out);
        }
    }

    /// A new configuration: loans end, every engine gets its configured
    /// budget and floor, and the library hears them.
    pub(super) fn reconfigure(&mut self, rules: &Rules, out: &mut Vec<ToLibrary>) {
        self.loans.set_rules(rules.lending);
        for l in self.declared(rules) {
            self.loans
                .set_engine(l.name.clone(), l.budget_bytes, l.floor_bytes);
            self.loans.set_idle_spill(l.name.as_str(), l.idle_spill);
        }
        self.observe_cap = (!rules.enforce).then_some(rules.ceiling_bytes);
        // The new ceiling's room first (the kernel has the new ceiling
        // already): otherwise the library admits against the old one until
        // the next tick, and the soak's reservations right after a reload
        // that lowered the ceiling were OOM-killed in that window.
        if let Some(held) = self.held_seen {
            self.send_outside(held, rules, out);
        }
        self.send_all_limits(rules, out);
    }

    /// Sends the limits of every engine a loan change touched.
    fn send_loan_changes(
        &mut self,
        rules: &Rules,
        events: &[LoanEvent<String>],
        out: &mut Vec<ToLibrary>,
    ) {
        for ev in events {
            let Loan {
                lender,
                borrower,
                bytes,
            } = ev.loan();
            match ev {
                LoanEvent::Lent(_) => {
                    tracing::info!(pid = self.pid, %lender, %borrower, bytes, "budget lent")
                }
                LoanEvent::TakenBack(_) => {
                    tracing::info!(pid = self.pid, %lender, %borrower, bytes, "loan taken back")
                }
            }
        }
        let mut changed: Vec<&String> = events
            .iter()
            .flat_map(|ev| [&ev.loan().lender, &ev.loan().borrower])
            .collect();
        changed.sort();
        changed.dedup();
        for l in self.declared(rules) {
            if changed.contains(&&l.name) {
                self.send_limits(&l, out);
            }
        }
    }

    /// The library's books. A lender it has refused a reservation (its
    /// count of refusals rose) takes its loans back at once.
    pub(super) fn on_report(
        &mut self,
        rules: &Rules,
        reports: Vec<EngineReport>,
        now: Instant,
        out: &mut Vec<ToLibrary>,
    ) {
        self.calm_at = None;
        let mut events = Vec::new();
        let mut refused = Vec::new();
        for r in reports {
            let Some(e) = self.engines.get_mut(&r.name) else {
                tracing::debug!(pid = self.pid, engine = %r.name, "report for an engine the library did not declare; ignored");
                continue;
            };
            let before = e.books.map_or(0, |b| b.rejections);
            if r.rejections > before {
                refused.push((r.name.clone(), r.rejections - before, r.rejections));
            }
            e.books = Some(Books {
                reserved_bytes: r.reserved_bytes,
                rejections: r.rejections,
                hot_set_bytes: r.hot_set_bytes,
            });
            if r.rejections > before && self.observe_cap.is_none() && self.loans.is_lender(&r.name)
            {
                let engines = &self.engines;
                events.extend(
                    self.loans
                        .take_back(&r.name, now, &rules.thresholds, |name| Holding {
                            resident_bytes: engines.get(name).map_or(0, |e| e.resident_bytes),
                            reserved_bytes: engines
                                .get(name)
                                .map_or(0, EngineState::reserved_bytes),
                        }),
                );
            }
        }
        if !refused.is_empty() {
            // The library counts its refusals on its hot path; they are
            // logged here, as they are reported, with the process's
            // largest holders then.
            let holders = self.largest_holders();
            for (engine, count, total) in refused {
                let reserved = self
                    .engines
                    .get(&engine)
                    .map_or(0, EngineState::reserved_bytes);
                tracing::info!(
                    pid = self.pid,
                    engine = %engine,
                    refused = count,
                    total,
                    reserved,
                    holders = %holders,
                    "reservations refused"
                );
            }
        }
        self.send_loan_changes(rules, &events, out);
    }

    /// The process's three engines holding the most (the kernel's figure
    /// or the library's reservations, whichever is more), largest first:
    /// "query 300.0 MiB resident, 280.0 MiB reserved; vector ...".
    pub(super) fn largest_holders(&self) -> String {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        let mut held: Vec<(&String, u64, u64)> = self
            .engines
            .iter()
            .map(|(n, e)| (n, e.resident_bytes, e.reserved_bytes()))
            .filter(|&(_, r, b)| r.max(b) > 0)
            .collect();
        held.sort_by(|x, y| y.1.max(y.2).cmp(&x.1.max(x.2)).then(x.0.cmp(y.0)));
        held.iter()
            .take(3)
            .map(|(n, r, b)| {
                format!(
                    "{n} {:.1} MiB resident, {:.1} MiB reserved",
                    mib(*r),
                    mib(*b)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Nothing under way: every engine at Normal (after a first tick),
    /// no spill outstanding, no cap held down, no loan.
    pub(super) fn calm(&self) -> bool {
        self.loans.loans().is_empty()
            && self.engines.values().all(|e| {
                e.level == Some(PressureLevel::Normal)
                    && e.spill_sent.is_none()
                    && e.held_to.is_none()
            })
    }

    /// Tells the library what the database holds that the kernel cannot
    /// drop (`held`) beyond the library's books as last reported, when
    /// that moved a step (ceiling / 64) from what was last sent or the
    /// ceiling changed, and always first: the library takes it off its
    /// room under the ceiling. Worked out here, not in the library, so
    /// that memory moving from its books to somewhere else the kernel
    /// cannot drop (a spill written to a tmpfs) is seen. Not while
    /// observing (the library's limits are then its own).
    pub(super) fn send_outside(
        &mut self,
        held: super::Held,
        rules: &Rules,
        out: &mut Vec<ToLibrary>,
    ) {
        self.held_seen = Some(held);
        if self.observe_cap.is_some() {
            // Observing (a reload turned enforcement off): a figure sent
            // before is taken back once.
            if self.outside_sent.take().is_some() {
                out.push(ToLibrary::Outside {
                    bytes: 0,
                    ceiling_bytes: u64::MAX,
                });
            }
            return;
        }
        // Not before every engine's books have been reported: counted as
        // none, the library's own reservations would be outside them too.
        if self.engines.values().any(|e| e.books.is_none()) {
            return;
        }
        // Saturating: the books are what the library says (any u64; the
        // session fuzzer sent two that overflowed a plain sum).
        let books = self
            .engines
            .values()
            .map(EngineState::reserved_bytes)
            .fold(0u64, u64::saturating_add);
        let outside = held.bytes.saturating_sub(books);
        // Reservations stop at the database's Emergency mark: the rest of
        // the ceiling is for what nobody reserves as it comes and goes (a
        // spill's piece on its way to a tmpfs, page tables, thread stacks).
        // Admitted up to the ceiling itself, the soak's database was
        // OOM-killed by the spill meant to relieve it. Where the kernel
        // throttles below that (cgroup v2's high mark, at the Critical
        // threshold), they stop there: admitted above it, a reservation is
        // paid for in reclaim and throttling of every thread of the
        // database instead of a refusal its engine spills on (a 6.1 run
        // whose engines' budgets added up to more than the high mark sat
        // under it for 320 s, 286 s of them stalled on memory).
        let emergency_mark = (rules.ceiling_bytes as f64 * rules.thresholds.emergency) as u64;
        let ceiling = held
            .throttle_bytes
            .map_or(emergency_mark, |high| high.min(emergency_mark));
        let step = (rules.ceiling_bytes / 64).max(1);
        if self
            .outside_sent
            .is_some_and(|(last, sent)| outside.abs_diff(last) < step && sent == ceiling)
        {
            return;
        }
        self.outside_sent = Some((outside, ceiling));
        out.push(ToLibrary::Outside {
            bytes: outside,
            ceiling_bytes: ceiling,
        });
    }

    /// A spill request was answered.
    pub(super) fn on_spilled(&mut self, engine: &str, target_bytes: u64, freed_bytes: u64) {
        self.calm_at = None;
        let Some(e) = self.engines.get_mut(engine) else {
            tracing::warn!(
                pid = self.pid,
                engine,
                "spill answer for an engine the library did not declare; ignored"
            );
            return;
        };
        // An answer that freed something lets the ladder ask again at once
        // (the engine may hold more to spill). One that freed nothing (no
        // spill handler, its spill target full) leaves the request's clock
        // running: asked again at once, such an engine was asked at every
        // tick (a 6.1 run's query engine, which spills only on a refused
        // reservation: 7,070 requests, nothing freed).
        if freed_bytes > 0 {
            e.spill_sent = None;
        }
        // The Emergency's requests are paced by `SPILL_RETRY` whatever the
        // answer: the cgroup's figure can stay put after a spill (written
        // to a tmpfs, it is still the database's), and an engine asked at
        // every tick meanwhile would be spilled down to its floor; one that
        // freed nothing (its spill target full) was asked every 20 ms.
        e.counters.spilled_bytes = e.counters.spilled_bytes.saturating_add(freed_bytes);
        tracing::info!(
            pid = self.pid,
            engine,
            target_bytes,
            freed_bytes,
            "spill done"
        );
    }

    /// A `drop_cache` request was answered.
    pub(super) fn on_cache_dropped(&mut self, engine: &str, target_bytes: u64, freed_bytes: u64) {
        self.calm_at = None;
        let Some(e) = self.engines.get_mut(engine) else {
            tracing::warn!(
                pid = self.pid,
                engine,
                "drop_cache answer for an engine the library did not declare; ignored"
            );
            return;
        };
        e.counters.cache_dropped_bytes = e.counters.cache_dropped_bytes.saturating_add(freed_bytes);
        // Little freed: the next request waits twice as long.
        e.cache_drop_retry = if freed_bytes < target_bytes / 4 {
            (e.cache_drop_retry.max(CACHE_DROP_RETRY) * 2).min(CACHE_DROP_RETRY_MAX)
        } else {
            CACHE_DROP_RETRY
        };
        tracing::info!(
            pid = self.pid,
            engine,
            target_bytes,
            freed_bytes,
            "cold cache dropped"
        );
    }

    /// The database's tasks stalled on memory (a PSI trigger): every
    /// engine's arena is purged now (returning dirty pages is the cheapest
    /// relief).
    pub(super) fn on_stall(&mut self, out: &mut Vec<ToLibrary>) {
        self.calm_at = None;
        if self.observe_cap.is_some() {
            return;
        }
        for (name, e) in &mut self.engines {
            e.counters.purges += 1;
            out.push(ToLibrary::Purge {
                engine: name.clone(),
            });
        }
        tracing::info!(
            pid = self.pid,
            engines = self.engines.len(),
            "memory stall: purge requested of every engine"
        );
    }

    /// Starts (`on`) or ends backpressure on the engines that are not
    /// essential: while on, an engine's cap is what it holds (its
    /// reservations as last reported), or its floor if that is more, so
    /// its new reservations beyond both are refused.
    pub(super) fn set_backpressure(&mut self, on: bool, rules: &Rules, out: &mut Vec<ToLibrary>) {
        // Held, an engine is not calm: no round is skipped (`enforce`).
        if self.observe_cap.is_some() {
            return;
        }
        for l in self.declared(rules) {
            if l.essential {
                continue;
            }
            let budget = self.budget(&l.name);
            let Some(e) = self.engines.get_mut(&l.name) else {
                continue;
            };
            if on && e.held_to.is_none() {
                // What it holds, but never less than its floor: the floor
                // is guaranteed, and an engine held to nothing could not
                // even finish what it is doing.
                let held = e.reserved_bytes().max(l.floor_bytes).min(budget);
                e.held_to = Some(held);
                tracing::warn!(pid = self.pid, engine = %l.name, held, "emergency: backpressure on a non-essential engine, its reservations beyond what it holds are refused");
                self.send_limits(&l, out);
            } else if !on && e.held_to.take().is_some() {
                tracing::info!(pid = self.pid, engine = %l.name, "backpressure lifted");
                self.send_limits(&l, out);
            }
        }
    }

    /// One round of the ladder for this process, from the kernel's figures
    /// for it: loans first (busy engines borrow from idle ones, lenders
    /// that got busy take their loans back), then each engine's level, cap
    /// correction, pressure, purge and spill. While the database is
    /// `stalling` on memory (PSI), engines are spilled from Warning on.
    /// While the database is under pressure (`cache_pressure`), an engine
    /// holding more page cache than its share is asked to drop its cold
    /// files down to the share.
    pub(super) fn enforce(
        &mut self,
        rules: &Rules,
        node_parts: &BTreeMap<u32, f64>,
        process: &ProcessAttribution,
        at: Conditions,
        out: &mut Vec<ToLibrary>,
        marks: &mut Vec<(String, Option<u64>)>,
    ) {
        let round_from = out.len();
        // A calm library whose engines' figures have not moved since a
        // round that left it calm, with nothing heard from it since (an
        // answer, a report, a crossing, a new configuration clears
        // `calm_at`), the database at ease and no node fitting its
        // engines' shares (that reads the whole process): this round would
        // send nothing, lend nothing and arm the same marks. Calm means
        // every engine at Normal with no loan, so none is busy enough to
        // borrow; the idle spills and cache drops want the database short.
        let figures: Vec<Option<Attributed>> = self
            .engines
            .keys()
            .map(|name| process.engines.get(name).copied())
            .collect();
        let at_ease =
            !at.stalling && !at.cache_pressure && !at.short && rules.node_ceiling.is_empty();
        if at_ease && self.calm_at.as_ref() == Some(&figures) && self.calm() {
            self.skipped += 1;
            return;
        }
        let Conditions {
            stalling,
            cache_pressure,
            short,
            over_ceiling,
            now,
        } = at;
        let resident = |name: &str| process.engines.get(name).map_or(0, |e| e.resident_bytes);
        // What lending judges an engine by: what it holds, or, for a
        // placed engine, the total at which it would stand as its worst
        // node does (an engine short on one node is busy, not a lender).
        let holding: BTreeMap<String, u64> = self
            .declared(rules)
            .iter()
            .map(|l| {
                let budget = self.budget(&l.name);
                let worst = judge_nodes(rules, &l.name, budget, process)
                    .iter()
                    .map(|n| {
                        (n.resident_bytes as f64 * budget as f64 / n.share_bytes.max(1) as f64)
                            as u64
                    })
                    .max()
                    .unwrap_or(0);
                (l.name.clone(), resident(&l.name).max(worst))
            })
            .collect();
        if self.observe_cap.is_none() {
            let events = self.loans.round(now, &rules.thresholds, |name| Holding {
                resident_bytes: holding.get(name).copied().unwrap_or_else(|| resident(name)),
                reserved_bytes: self
                    .engines
                    .get(name)
                    .map_or(0, EngineState::reserved_bytes),
            });
            self.send_loan_changes(rules, &events, out);
            for (engine, target) in self.loans.idle_spills(now, short) {
                let Some(e) = self.engines.get_mut(&engine) else {
                    continue;
                };
                e.counters.spill_requests += 1;
                e.counters.idle_spills += 1;
                tracing::info!(
                    pid = self.pid,
                    engine = %engine,
                    resident = resident(&engine),
                    target,
                    "idle spill requested: the database is short of memory and the engine sits idle on it"
                );
                out.push(ToLibrary::Spill {
                    engine,
                    target_bytes: target,
                });
            }
        }
        let budgets = self.budgets_in_force(rules);
        let crowded = crowded_nodes(rules, node_parts, &budgets, process);
        for &node in crowded.keys() {
            if self.crowded.0.insert(node) {
                *self.crowded.1.entry(node).or_default() += 1;
                tracing::info!(
                    pid = self.pid,
                    node,
                    fit = crowded[&node],
                    "node crowded: its engines are held to their shares fitted to its part of the ceiling"
                );
            }
        }
        self.crowded.0.retain(|n| crowded.contains_key(n));
        for l in self.declared(rules) {
            let budget = self.budget(&l.name);
            let resident = resident(&l.name);
            let nodes = judge_nodes(rules, &l.name, budget, process);
            // The worse of the engine in all and its worst node (on a
            // crowded node, against its share fitted to the node's part of
            // the ceiling); the node then sets the spill's target too.
            let total_level = rules.thresholds.level(resident, budget);
            let judged: Vec<EngineNode> = nodes
                .iter()
                .map(|n| match crowded.get(&n.node) {
                    Some(fit) => {
                        let share_bytes = (n.share_bytes as f64 * fit) as u64;
                        EngineNode {
                            share_bytes,
                            level: rules.thresholds.level(n.resident_bytes, share_bytes),
                            ..*n
                        }
                    }
                    None => *n,
                })
                .collect();
            let worst = judged
                .iter()
                .filter(|n| n.level > total_level)
                .max_by(|a, b| {
                    let over =
                        |n: &EngineNode| n.resident_bytes as f64 / n.share_bytes.max(1) as f64;
                    a.level.cmp(&b.level).then(over(a).total_cmp(&over(b)))
                })
                .copied();
            let (level, judged_resident, judged_budget, judged_node) = match worst {
                Some(n) => (n.level, n.resident_bytes, n.share_bytes, Some(n.node)),
                None => (total_level, resident, budget, None),
            };
            let observe = self.observe_cap.is_some();
            let Some(e) = self.engines.get_mut(&l.name) else {
                continue;
            };
            let before = e.level.replace(level).unwrap_or(PressureLevel::Normal);
            e.resident_bytes = resident;
            e.nodes = nodes;
            e.page_cache_bytes = process
                .engines
                .get(&l.name)
                .map_or(0, |a| a.page_cache_bytes);
            if observe {
                // Shown, never acted on.
                e.counters.level_changes += u64::from(level != before);
                continue;
            }
            // The kernel's figure against the library's: the cap leaves
            // room only for what the budget has left; and an engine past
            // the Critical threshold of its share on a node is held below
            // what it has reserved by what it holds there beyond it.
            let step = untracked_step(budget);
            let untracked = e.books.map_or(e.untracked_bytes, |books| {
                stepped(
                    resident.saturating_sub(books.reserved_bytes),
                    e.untracked_bytes,
                    step,
                )
            });
            // Past the Critical threshold of its share on a node (fitted,
            // on a crowded one), what it holds there beyond the restore
            // point, as a spill's target; held so until it is back there.
            let holding_back = e.node_cap.is_some();
            let excess = stepped(
                judged
                    .iter()
                    .map(|n| {
                        let at = |f: f64| (n.share_bytes as f64 * f) as u64;
                        if n.resident_bytes >= at(rules.thresholds.critical) || holding_back {
                            n.resident_bytes.saturating_sub(at(rules.restore))
                        } else {
                            0
                        }
                    })
                    .max()
                    .unwrap_or(0),
                e.node_excess_bytes,
                step,
            );
            // Held at what it has reserved less the excess, lowered again
            // as the excess grows, let go once it is gone.
            let reserved = e
                .books
                .map_or(resident.saturating_sub(untracked), |b| b.reserved_bytes);
            let node_cap = match (excess, e.node_cap) {
                (0, _) => None,
                (x, Some(c)) if x <= e.node_excess_bytes => Some(c),
                (x, c) => Some(c.unwrap_or(u64::MAX).min(reserved.saturating_sub(x))),
            };
            let untracked_moved = e.untracked_bytes != untracked;
            let node_moved = e.node_cap != node_cap;
            e.untracked_bytes = untracked;
            e.node_excess_bytes = excess;
            e.node_cap = node_cap;
            if untracked_moved || node_moved {
                self.send_limits_if(&l, out, !untracked_moved);
            }
            let pid = self.pid;
            let Some(e) = self.engines.get_mut(&l.name) else {
                continue;
            };
            if let Some(share) = l.page_cache_share_bytes
                && cache_pressure
                && e.page_cache_bytes > share
                && e.cache_drop_sent.is_none_or(|sent| {
                    now.duration_since(sent) >= e.cache_drop_retry.max(CACHE_DROP_RETRY)
                })
            {
                let target = e.page_cache_bytes - share;
                e.cache_drop_sent = Some(now);
                e.counters.cache_drop_requests += 1;
                tracing::info!(
                    pid,
                    engine = %l.name,
                    page_cache = e.page_cache_bytes,
                    share,
                    target,
                    "cold cache drop requested"
                );
                out.push(ToLibrary::DropCache {
                    engine: l.name.clone(),
                    target_bytes: target,
                });
            }
            super::ladder::climb(
                &super::ladder::Rung {
                    pid,
                    engine: &l.name,
                    node: judged_node,
                    before,
                    level,
                    resident_bytes: judged_resident,
                    budget_bytes: judged_budget,
                    restore: rules.restore,
                    stalling,
                    now,
                    spill_retry: SPILL_RETRY,
                },
                e,
                out,
            );
            // The next mark up, for the kernel to wake the agent at.
            let mark = if rules.mark_events {
                let total = super::ladder::next_mark(
                    resident,
                    budget,
                    &rules.thresholds,
                    &mut e.mark_fired,
                );
                // The kernel counts the engine in all: a node's next
                // threshold (with the same hysteresis, per node) is armed
                // as the total at which it would be crossed if all growth
                // landed there (growth elsewhere wakes the agent early, and
                // it arms the mark higher).
                let mut by_node: Option<(u64, u32, u64)> = None;
                for n in &e.nodes {
                    let mut fired = e.node_fired.get(&n.node).copied();
                    let next = super::ladder::next_mark(
                        n.resident_bytes,
                        n.share_bytes,
                        &rules.thresholds,
                        &mut fired,
                    );
                    match fired {
                        Some(f) => e.node_fired.insert(n.node, f),
                        None => e.node_fired.remove(&n.node),
                    };
                    if let Some(next) = next {
                        let at = resident + (next - n.resident_bytes);
                        if by_node.is_none_or(|(b, _, _)| at < b) {
                            by_node = Some((at, n.node, next));
                        }
                    }
                }
                match (total, by_node) {
                    (Some(t), Some((n, ..))) if t <= n => {
                        e.mark_node = None;
                        Some(t)
                    }
                    (_, Some((n, node, next))) => {
                        e.mark_node = Some((node, next));
                        Some(n)
                    }
                    (t, None) => {
                        e.mark_node = None;
                        t
                    }
                }
            } else {
                None
            };
            if mark != e.mark {
                e.mark = mark;
                marks.push((l.name.clone(), mark));
            }
        }
        if over_ceiling > 0 && self.observe_cap.is_none() {
            self.spill_over_ceiling(rules, process, over_ceiling, now, out);
        }
        self.coalesce_limits(round_from, out);
        self.calm_at = (at_ease && self.calm()).then_some(figures);
    }

    /// Leaves one `limits` per engine among the messages of this round
    /// (`out[from..]`): the last, where it stands. A loan moves an engine's
    /// budget and the correction for what it holds unreserved then moves
    /// its cap again in the same round; the library would apply the first
    /// only to replace it at once (a growing borrower had two a tick).
    /// Nothing the round sends depends on the cap in between: a spill's
    /// target is in bytes, and a pressure level is the engine's.
    fn coalesce_limits(&mut self, from: usize, out: &mut Vec<ToLibrary>) {
        let mut later = std::collections::BTreeSet::new();
        let mut keep = vec![true; out.len() - from];
        for (i, m) in out[from..].iter().enumerate().rev() {
            if let ToLibrary::Limits { engine, .. } = m
                && !later.insert(engine.as_str())
            {
                keep[i] = false;
                if let Some(e) = self.engines.get_mut(engine.as_str()) {
                    e.counters.limit_changes -= 1;
                }
            }
        }
        let mut keep = keep.into_iter();
        let mut i = 0;
        out.retain(|_| {
            i += 1;
            i <= from || keep.next().unwrap_or(true)
        });
    }

    /// The database is in Emergency and this process holds `excess` of
    /// what it must give back: each engine is asked to spill its part (in
    /// proportion to what it holds above its floor; by what it holds when
    /// every engine is at its floor), unless its ladder asked it already
    /// this round or a request is still out (`SPILL_RETRY`).
    fn spill_over_ceiling(
        &mut self,
        rules: &Rules,
        process: &ProcessAttribution,
        excess: u64,
        now: Instant,
        out: &mut Vec<ToLibrary>,
    ) {
        let resident = |name: &str| process.engines.get(name).map_or(0, |e| e.resident_bytes);
        let weights: Vec<(String, u64, u64)> = self
            .declared(rules)
            .iter()
            .map(|l| {
                let r = resident(&l.name);
                (l.name.clone(), r, r.saturating_sub(l.floor_bytes))
            })
            .collect();
        let above = weights.iter().map(|w| w.2).fold(0u64, u64::saturating_add);
        let all = weights.iter().map(|w| w.1).fold(0u64, u64::saturating_add);
        for (name, held, over_floor) in weights {
            let (part, of) = if above > 0 {
                (over_floor, above)
            } else {
                (held, all)
            };
            // Never more than its part itself (the excess can be more
            // than every engine holds above its floor).
            let target = ((excess as u128 * part as u128 / of.max(1) as u128) as u64).min(part);
            let Some(e) = self.engines.get_mut(&name) else {
                continue;
            };
            let asked = |sent: Option<Instant>| {
                sent.is_some_and(|sent| now.duration_since(sent) < SPILL_RETRY)
            };
            if target == 0 || asked(e.spill_sent) || asked(e.ceiling_spill_sent) {
                continue;
            }
            e.ceiling_spill_sent = Some(now);
            e.counters.spill_requests += 1;
            e.counters.ceiling_spills += 1;
            tracing::info!(
                pid = self.pid,
                engine = %name,
                resident = held,
                target,
                excess,
                "ceiling spill requested: the database is in Emergency"
            );
            out.push(ToLibrary::Spill {
                engine: name,
                target_bytes: target,
            });
        }
    }

    /// The kernel saw `engine` cross its mark (and disarmed it).
    pub(super) fn on_mark(&mut self, engine: &str) {
        self.calm_at = None;
        if let Some(e) = self.engines.get_mut(engine) {
            let fired = e.mark.take();
            match e.mark_node.take() {
                Some((node, threshold)) => {
                    e.node_fired.insert(node, threshold);
                }
                None => e.mark_fired = fired,
            }
        }
    }

    /// Every mark armed for the library's engines, to disarm them (the
    /// library is gone).
    pub(super) fn armed_marks(&self) -> impl Iterator<Item = &String> {
        self.engines
            .iter()
            .filter(|(_, e)| e.mark.is_some())
            .map(|(name, _)| name)
    }
}
