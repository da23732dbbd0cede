//! The agent's end of the control channel, and the enforcement ladder it
//! drives from the kernel's attribution.
//!
//! Each library connection is a [`Client`]: a process (its pid from the
//! socket's peer credentials, never from the message), the engines it
//! declared, its last report, and the state of the ladder per engine:
//!
//! | level (resident / budget) | on entering | while there |
//! |---|---|---|
//! | Warning (75%) | purge the engine's arena | |
//! | Critical (90%) | spill request down to `restore` (75%) | a new spill request when the last one is answered or 250 ms old |
//! | Emergency (97%) | as Critical | as Critical |
//!
//! Every level change is sent to the library as `pressure`, logged and
//! counted.
//!
//! Two inputs besides the attribution move the ladder:
//! * a PSI trigger (the database's tasks stalled on memory): every engine's
//!   arena is purged at once, and for one window engines are spilled from
//!   Warning on;
//! * an Emergency of the whole database (its cgroup's working set at the
//!   emergency threshold of the ceiling): engines that are not `essential`
//!   are held to what they hold (never below their floor), so their new
//!   reservations are refused (backpressure), until use is back under the
//!   warning threshold.
//!
//! The library's cap is the budget less what the kernel sees the engine
//! hold beyond its reservations (memory it allocates without reserving,
//! freed pages its arena keeps), in steps of budget / 64, never below its
//! floor: a reservation is refused when the engine's real footprint, not
//! its books, would pass the budget.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::{
    attribution::Reading,
    config::{Config, EngineLimits},
};
use nodedb_governor::{
    PressureLevel,
    control::wire::{EngineReport, Level, ToAgent, ToLibrary},
};

/// A spill request not answered within this is sent again.
const SPILL_RETRY: Duration = Duration::from_millis(250);
/// An engine lends only after its resident memory has not grown (by more
/// than `GROWTH_BYTES`) for this long, and not for this long after it took
/// a loan back.
const IDLE_AFTER: Duration = Duration::from_millis(500);
const GROWTH_BYTES: u64 = 1 << 20;

/// Counters of what the ladder did, per engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineEnforcement {
    pub level: Option<String>,
    pub budget_bytes: u64,
    pub resident_bytes: u64,
    pub reserved_bytes: u64,
    /// Reservations the library refused (its own count).
    #[serde(default)]
    pub rejections: u64,
    pub spill_requests: u64,
    pub spilled_bytes: u64,
    pub purges: u64,
    pub level_changes: u64,
    /// Limits (floor and cap) sent to the library.
    #[serde(default)]
    pub limit_changes: u64,
    /// The cap the library was last given.
    #[serde(default)]
    pub cap_bytes: u64,
    /// Held to what it holds (an Emergency; the engine is not essential).
    #[serde(default)]
    pub backpressure: bool,
}

/// Budget one engine lends another, for as long as the lender is idle.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Loan {
    pub lender: String,
    pub borrower: String,
    pub bytes: u64,
}

/// One connected library.
pub struct Client {
    pub pid: u32,
    pub uid: u32,
    tx: UnboundedSender<ToLibrary>,
    /// The engines the library declared in its hello.
    declared: BTreeSet<String>,
    /// Engines under backpressure, and the cap they are held to.
    backpressure: BTreeMap<String, u64>,
    /// Observe only (`enforce = false`): levels are computed and shown,
    /// but nothing is asked of the library, and every engine's cap is the
    /// ceiling (`observe_cap`).
    observe: bool,
    observe_cap: u64,
    pub reports: BTreeMap<String, EngineReport>,
    levels: BTreeMap<String, PressureLevel>,
    spill_pending: BTreeMap<String, Instant>,
    pub enforcement: BTreeMap<String, EngineEnforcement>,
    /// Budgets in force (configured budgets moved by loans).
    budgets: BTreeMap<String, u64>,
    pub loans: Vec<Loan>,
    /// Per engine: resident at the last tick, and when it last grew (or
    /// took a loan back).
    activity: BTreeMap<String, (u64, Instant)>,
    /// Per engine: resident memory the library has not reserved (the
    /// kernel's figure above the library's), as last taken off its cap.
    untracked: BTreeMap<String, u64>,
}

/// Untracked memory moves an engine's cap in steps of its budget / 64 (at
/// least 1 MiB, rounded up), so a wobble of a few pages sends nothing.
fn untracked_step(budget: u64) -> u64 {
    (budget / 64).max(1 << 20)
}

impl Client {
    pub fn new(
        pid: u32,
        uid: u32,
        tx: UnboundedSender<ToLibrary>,
        declared: impl IntoIterator<Item = String>,
    ) -> Self {
        Self {
            pid,
            uid,
            tx,
            declared: declared.into_iter().collect(),
            backpressure: BTreeMap::new(),
            observe: false,
            observe_cap: 0,
            reports: BTreeMap::new(),
            levels: BTreeMap::new(),
            spill_pending: BTreeMap::new(),
            enforcement: BTreeMap::new(),
            budgets: BTreeMap::new(),
            loans: Vec::new(),
            activity: BTreeMap::new(),
            untracked: BTreeMap::new(),
        }
    }

    /// Observe only: the library's caps are all `ceiling`, and the ladder
    /// asks nothing of it.
    pub fn observe_only(mut self, ceiling: u64) -> Self {
        self.observe = true;
        self.observe_cap = ceiling;
        self
    }

    /// A new configuration: loans end and every engine gets its configured
    /// budget, sent to the library.
    pub fn reset_budgets(&mut self, config: &Config) {
        self.loans.clear();
        self.budgets.clear();
        for l in config.limits() {
            self.budgets.insert(l.name.clone(), l.budget_bytes);
            self.send_limits(&l, l.budget_bytes);
        }
    }

    /// Sends an engine the limits in force: its floor and `budget`, or
    /// less under backpressure. Logged and counted. Engines the library did
    /// not declare are skipped.
    fn send_limits(&mut self, l: &EngineLimits, budget: u64) {
        if !self.declared.contains(&l.name) {
            return;
        }
        let cap = if self.observe {
            self.observe_cap
        } else {
            // What the kernel sees the engine hold beyond its reservations
            // (allocations the engine does not reserve, freed pages its
            // arena keeps) counts against the budget too: the library may
            // reserve only what is left of it.
            // Never below the floor, though: the floor is guaranteed, and
            // an engine left no room at all could not finish what it is
            // doing (the ladder still spills it).
            let untracked = self.untracked.get(&l.name).copied().unwrap_or(0);
            let budget = budget
                .saturating_sub(untracked)
                .max(l.floor_bytes.min(budget));
            self.backpressure
                .get(&l.name)
                .map_or(budget, |held| (*held).min(budget))
        };
        let floor = if self.observe {
            0
        } else {
            l.floor_bytes.min(cap)
        };
        let e = self.enforcement.entry(l.name.clone()).or_default();
        e.limit_changes += 1;
        e.cap_bytes = cap;
        tracing::info!(pid = self.pid, engine = %l.name, floor, cap, budget, "engine limits sent");
        let _ = self.tx.send(ToLibrary::Limits {
            engine: l.name.clone(),
            floor_bytes: floor,
            cap_bytes: cap,
        });
    }

    /// Sends every declared engine its configured limits (the welcome).
    pub fn send_initial_limits(&mut self, config: &Config) {
        for l in config.limits() {
            let budget = self.budget(&l.name).unwrap_or(l.budget_bytes);
            self.send_limits(&l, budget);
        }
    }

    /// The database's tasks stalled on memory (a PSI trigger): every
    /// engine's arena is purged now (returning dirty pages is the cheapest
    /// relief).
    pub fn on_stall(&mut self) {
        if self.observe {
            return;
        }
        for name in self.declared.clone() {
            self.enforcement.entry(name.clone()).or_default().purges += 1;
            let _ = self.tx.send(ToLibrary::Purge { engine: name });
        }
        tracing::info!(
            pid = self.pid,
            engines = self.declared.len(),
            "memory stall: purge requested of every engine"
        );
    }

    /// Starts (`on`) or ends backpressure on the engines that are not
    /// essential: while on, an engine's cap is what it holds (its
    /// reservations as last reported) or its floor if that is more, so its
    /// new reservations beyond both are refused.
    pub fn set_backpressure(&mut self, on: bool, config: &Config) {
        if self.observe {
            return;
        }
        for l in config.limits() {
            if l.essential || !self.declared.contains(&l.name) {
                continue;
            }
            let budget = self.budget(&l.name).unwrap_or(l.budget_bytes);
            if on && !self.backpressure.contains_key(&l.name) {
                // What it holds, but never less than its floor: the floor
                // is guaranteed, and an engine held to nothing could not
                // even finish what it is doing.
                let held = self
                    .reports
                    .get(&l.name)
                    .map_or(0, |r| r.reserved_bytes)
                    .max(l.floor_bytes)
                    .min(budget);
                self.backpressure.insert(l.name.clone(), held);
                tracing::warn!(pid = self.pid, engine = %l.name, held, "emergency: backpressure on a non-essential engine, its reservations beyond what it holds are refused");
                self.send_limits(&l, budget);
            } else if !on && self.backpressure.remove(&l.name).is_some() {
                tracing::info!(pid = self.pid, engine = %l.name, "backpressure lifted");
                self.send_limits(&l, budget);
            }
            self.enforcement
                .entry(l.name.clone())
                .or_default()
                .backpressure = on;
        }
    }

    /// The limits of the engines this process declared (it lends, borrows
    /// and is enforced only on those).
    fn limits(&self, config: &Config) -> Vec<EngineLimits> {
        config
            .limits()
            .into_iter()
            .filter(|l| self.declared.contains(&l.name))
            .collect()
    }

    /// The engine's budget in force.
    pub fn budget(&self, engine: &str) -> Option<u64> {
        self.budgets.get(engine).copied()
    }

    /// Rebalancing, from the kernel's figures: a busy engine (at Critical
    /// of its budget) borrows the unused budget of an idle one (below
    /// Warning, and not grown for `IDLE_AFTER`; it keeps its floor, what it
    /// holds and a quarter of its configured budget as a cushion); a lender that gets busy (Warning
    /// of its reduced budget) takes the loan back at once, and the
    /// borrower's budget drops, so the ladder spills it. The sum of budgets
    /// never changes. Every change goes to the library as `limits`.
    fn rebalance(&mut self, config: &Config, resident: &BTreeMap<String, u64>) {
        let limits = self.limits(config);
        let t = config.thresholds;
        for l in &limits {
            self.budgets.entry(l.name.clone()).or_insert(l.budget_bytes);
        }
        let res = |n: &str| resident.get(n).copied().unwrap_or(0);
        let now = Instant::now();
        for l in &limits {
            let r = res(&l.name);
            // First seen: quiet (nothing has grown yet).
            let seen = now.checked_sub(IDLE_AFTER).unwrap_or(now);
            let a = self.activity.entry(l.name.clone()).or_insert((r, seen));
            if r > a.0 + GROWTH_BYTES {
                *a = (r, now);
            } else if r < a.0 {
                a.0 = r;
            }
        }
        let mut changed: Vec<String> = Vec::new();
        // Lenders that got busy take their loans back.
        let mut i = 0;
        while i < self.loans.len() {
            let lender = &self.loans[i].lender;
            if res(lender) as f64 >= self.budgets[lender] as f64 * t.warning {
                let loan = self.loans.remove(i);
                if let Some(b) = self.budgets.get_mut(&loan.lender) {
                    *b += loan.bytes;
                }
                if let Some(b) = self.budgets.get_mut(&loan.borrower) {
                    *b = b.saturating_sub(loan.bytes);
                }
                tracing::info!(pid = self.pid, lender = %loan.lender, borrower = %loan.borrower, bytes = loan.bytes, "loan taken back");
                if let Some(a) = self.activity.get_mut(&loan.lender) {
                    a.1 = now;
                }
                changed.push(loan.lender);
                changed.push(loan.borrower);
            } else {
                i += 1;
            }
        }
        // Busy engines borrow from idle ones.
        for b in &limits {
            if (res(&b.name) as f64) < self.budgets[&b.name] as f64 * t.critical {
                continue;
            }
            let lender = limits
                .iter()
                .filter(|l| l.name != b.name && !self.loans.iter().any(|x| x.borrower == l.name))
                .filter_map(|l| {
                    let (r, budget) = (res(&l.name), self.budgets[&l.name]);
                    let quiet = self
                        .activity
                        .get(&l.name)
                        .is_some_and(|a| now.duration_since(a.1) >= IDLE_AFTER);
                    if !quiet || r as f64 >= budget as f64 * t.warning {
                        return None; // not idle
                    }
                    // What it holds: the kernel's figure, or the library's
                    // reservations if they are larger (reserved, not yet
                    // touched).
                    let held = r.max(self.reports.get(&l.name).map_or(0, |x| x.reserved_bytes));
                    let keep = l.floor_bytes.max(held + l.budget_bytes / 4);
                    let lendable = budget.saturating_sub(keep);
                    (lendable > 0).then(|| (l.name.clone(), lendable))
                })
                .max_by_key(|(_, lendable)| *lendable);
            let Some((lender, bytes)) = lender else {
                continue;
            };
            if let Some(x) = self.budgets.get_mut(&lender) {
                *x -= bytes;
            }
            if let Some(x) = self.budgets.get_mut(&b.name) {
                *x += bytes;
            }
            match self
                .loans
                .iter_mut()
                .find(|x| x.lender == lender && x.borrower == b.name)
            {
                Some(x) => x.bytes += bytes,
                None => self.loans.push(Loan {
                    lender: lender.clone(),
                    borrower: b.name.clone(),
                    bytes,
                }),
            }
            tracing::info!(pid = self.pid, %lender, borrower = %b.name, bytes, "budget lent");
            changed.push(lender);
            changed.push(b.name.clone());
        }
        changed.sort();
        changed.dedup();
        for name in changed {
            if let Some(l) = limits.iter().find(|l| l.name == name) {
                let budget = self.budgets[&name];
                self.send_limits(l, budget);
            }
        }
    }

    pub fn send(&self, m: ToLibrary) {
        // A closed channel means the connection is going away; its task
        // detaches the client.
        let _ = self.tx.send(m);
    }

    /// Takes in one message after the hello.
    pub fn on_message(&mut self, m: ToAgent) {
        match m {
            ToAgent::Report { engines } => {
                for r in engines {
                    let e = self.enforcement.entry(r.name.clone()).or_default();
                    if r.rejections > e.rejections {
                        // The library counts its refusals on its hot path;
                        // they are logged here, as they are reported.
                        tracing::info!(
                            pid = self.pid,
                            engine = %r.name,
                            refused = r.rejections - e.rejections,
                            total = r.rejections,
                            reserved = r.reserved_bytes,
                            "reservations refused"
                        );
                    }
                    e.reserved_bytes = r.reserved_bytes;
                    e.rejections = r.rejections;
                    self.reports.insert(r.name.clone(), r);
                }
            }
            ToAgent::Spilled {
                engine,
                target_bytes,
                freed_bytes,
            } => {
                self.spill_pending.remove(&engine);
                self.enforcement
                    .entry(engine.clone())
                    .or_default()
                    .spilled_bytes += freed_bytes;
                tracing::info!(pid = self.pid, %engine, target_bytes, freed_bytes, "spill done");
            }
            ToAgent::Purged {
                engine,
                before_bytes,
                after_bytes,
            } => {
                tracing::info!(pid = self.pid, %engine, before_bytes, after_bytes, "arena purged");
            }
            // Hello and Thread are handled by the agent (they need the
            // cgroup subtree and attribution).
            ToAgent::Hello { .. } | ToAgent::Thread { .. } => {}
        }
    }

    /// One round of the ladder for this client's process. While the
    /// database is `stalling` on memory (PSI), engines are spilled from
    /// Warning on.
    pub fn enforce(&mut self, config: &Config, usage: &Reading, stalling: bool) {
        let Some(process) = usage.processes.iter().find(|p| p.pid == self.pid) else {
            return;
        };
        let thresholds = config.thresholds.pressure();
        let now = Instant::now();
        let residents: BTreeMap<String, u64> = process
            .engines
            .iter()
            .map(|(n, e)| (n.clone(), e.resident_bytes))
            .collect();
        if !self.observe {
            self.rebalance(config, &residents);
        }
        for mut limits in self.limits(config) {
            if let Some(b) = self.budgets.get(&limits.name) {
                limits.budget_bytes = *b;
            }
            let name = limits.name.clone();
            let resident = residents.get(&name).copied().unwrap_or(0);
            let level = thresholds.level(resident, limits.budget_bytes);
            let before = self
                .levels
                .insert(name.clone(), level)
                .unwrap_or(PressureLevel::Normal);
            let e = self.enforcement.entry(name.clone()).or_default();
            e.budget_bytes = limits.budget_bytes;
            e.resident_bytes = resident;
            e.level = Some(format!("{level:?}").to_lowercase());
            if self.observe {
                // Shown, never acted on.
                e.level_changes += u64::from(level != before);
                continue;
            }
            // The kernel's figure against the library's: the cap leaves
            // room only for what the budget has left.
            if let Some(reserved) = self.reports.get(&name).map(|r| r.reserved_bytes) {
                let step = untracked_step(limits.budget_bytes);
                // Rounded up: the cap errs on the side of the budget.
                let untracked = resident.saturating_sub(reserved).div_ceil(step) * step;
                if self.untracked.get(&name).copied().unwrap_or(0) != untracked {
                    self.untracked.insert(name.clone(), untracked);
                    let budget = limits.budget_bytes;
                    self.send_limits(&limits, budget);
                }
            }
            let e = self.enforcement.entry(name.clone()).or_default();
            if level != before {
                e.level_changes += 1;
                tracing::info!(
                    pid = self.pid,
                    engine = %name,
                    from = ?before,
                    to = ?level,
                    resident,
                    budget = limits.budget_bytes,
                    "engine pressure changed"
                );
                let _ = self.tx.send(ToLibrary::Pressure {
                    engine: name.clone(),
                    level: Level::from(level),
                });
                if level >= PressureLevel::Warning && before < PressureLevel::Warning {
                    e.purges += 1;
                    let _ = self.tx.send(ToLibrary::Purge {
                        engine: name.clone(),
                    });
                }
            }
            let spill_from = if stalling {
                PressureLevel::Warning
            } else {
                PressureLevel::Critical
            };
            if level >= spill_from {
                let due = self
                    .spill_pending
                    .get(&name)
                    .is_none_or(|sent| now.duration_since(*sent) >= SPILL_RETRY);
                if due {
                    let goal = (limits.budget_bytes as f64 * config.thresholds.restore) as u64;
                    let target = resident.saturating_sub(goal);
                    e.spill_requests += 1;
                    tracing::info!(
                        pid = self.pid,
                        engine = %name,
                        resident,
                        budget = limits.budget_bytes,
                        target,
                        stalling,
                        "spill requested"
                    );
                    self.spill_pending.insert(name.clone(), now);
                    let _ = self.tx.send(ToLibrary::Spill {
                        engine: name,
                        target_bytes: target,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::{Attributed, ProcessAttribution};
    use nodedb_governor::control::wire::EngineReport;

    const MIB: u64 = 1 << 20;

    fn config() -> Config {
        Config::parse(
            "database = \"t\"\nceiling = \"1GiB\"\n\
             [[engine]]\nname = \"vector\"\nbudget = \"256MiB\"\n\
             [[engine]]\nname = \"query\"\nbudget = \"256MiB\"\nfloor = \"64MiB\"\nessential = false\n",
        )
        .unwrap()
    }

    fn client() -> (Client, tokio::sync::mpsc::UnboundedReceiver<ToLibrary>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut c = Client::new(7, 0, tx, ["vector".to_owned(), "query".to_owned()]);
        c.reset_budgets(&config());
        (c, rx)
    }

    fn report(c: &mut Client, engine: &str, reserved: u64) {
        c.on_message(ToAgent::Report {
            engines: vec![EngineReport {
                name: engine.into(),
                reserved_bytes: reserved,
                rejections: 0,
                arena_resident_bytes: None,
            }],
        });
    }

    fn usage(resident: &[(&str, u64)]) -> Reading {
        Reading {
            processes: vec![ProcessAttribution {
                pid: 7,
                engines: resident
                    .iter()
                    .map(|(n, r)| {
                        (
                            (*n).to_owned(),
                            Attributed {
                                resident_bytes: *r,
                                ..Attributed::default()
                            },
                        )
                    })
                    .collect(),
                ..ProcessAttribution::default()
            }],
        }
    }

    /// The last cap sent for `engine`.
    fn last_cap(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<ToLibrary>,
        engine: &str,
    ) -> Option<u64> {
        let mut cap = None;
        while let Ok(m) = rx.try_recv() {
            if let ToLibrary::Limits {
                engine: e,
                cap_bytes,
                ..
            } = m
                && e == engine
            {
                cap = Some(cap_bytes);
            }
        }
        cap
    }

    #[test]
    fn memory_the_library_did_not_reserve_comes_off_its_cap() {
        let cfg = config();
        let (mut c, mut rx) = client();
        assert_eq!(last_cap(&mut rx, "query"), Some(256 * MIB));
        // The books say 40 MiB; the kernel sees 141 MiB: 101 MiB the
        // library never reserved, taken off in whole steps, rounded up.
        report(&mut c, "query", 40 * MIB);
        c.enforce(&cfg, &usage(&[("query", 141 * MIB), ("vector", 0)]), false);
        let step = untracked_step(256 * MIB);
        assert_eq!(step, 4 * MIB);
        assert_eq!(last_cap(&mut rx, "query"), Some(256 * MIB - 104 * MIB));
        assert_eq!(c.enforcement["query"].cap_bytes, 152 * MIB);
        // A wobble inside the same step sends nothing.
        c.enforce(&cfg, &usage(&[("query", 142 * MIB), ("vector", 0)]), false);
        assert_eq!(last_cap(&mut rx, "query"), None);
        // Once the books cover what the kernel sees, the whole budget is
        // back.
        report(&mut c, "query", 142 * MIB);
        c.enforce(&cfg, &usage(&[("query", 142 * MIB), ("vector", 0)]), false);
        assert_eq!(last_cap(&mut rx, "query"), Some(256 * MIB));
        // However much it holds unreserved, its floor is left to it.
        // (Vector is busy, so nothing is lent to Query.)
        c.enforce(
            &cfg,
            &usage(&[("query", 400 * MIB), ("vector", 200 * MIB)]),
            false,
        );
        assert_eq!(last_cap(&mut rx, "query"), Some(64 * MIB));
        // Reserved but not yet touched is no correction either.
        report(&mut c, "vector", 100 * MIB);
        c.enforce(
            &cfg,
            &usage(&[("query", 142 * MIB), ("vector", 10 * MIB)]),
            false,
        );
        assert_eq!(last_cap(&mut rx, "vector"), None);
    }

    #[test]
    fn observing_sends_no_correction() {
        let cfg = config();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut c = Client::new(7, 0, tx, ["query".to_owned()]).observe_only(1 << 30);
        c.reset_budgets(&cfg);
        assert_eq!(last_cap(&mut rx, "query"), Some(1 << 30));
        report(&mut c, "query", 0);
        c.enforce(&cfg, &usage(&[("query", 200 * MIB)]), false);
        assert_eq!(last_cap(&mut rx, "query"), None);
    }

    #[test]
    fn backpressure_holds_an_engine_to_what_it_holds_but_not_below_its_floor() {
        let cfg = config();
        let (mut c, mut rx) = client();
        let _ = last_cap(&mut rx, "query");
        report(&mut c, "query", 10 * MIB);
        c.set_backpressure(true, &cfg);
        // Holds 10 MiB, floor 64 MiB: held to the floor.
        assert_eq!(last_cap(&mut rx, "query"), Some(64 * MIB));
        assert!(c.enforcement["query"].backpressure);
        c.set_backpressure(false, &cfg);
        assert_eq!(last_cap(&mut rx, "query"), Some(256 * MIB));
        // Holding more than the floor: held to what it holds.
        report(&mut c, "query", 100 * MIB);
        c.set_backpressure(true, &cfg);
        assert_eq!(last_cap(&mut rx, "query"), Some(100 * MIB));
        // The essential engine is never held.
        assert_eq!(last_cap(&mut rx, "vector"), None);
    }
}
