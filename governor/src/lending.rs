//! Lending: budget moves from idle engines to busy ones, and back.
//!
//! This is the one set of rules both layers lend by: the library alone
//! ([`MemoryGovernor::rebalance`](crate::MemoryGovernor::rebalance), where
//! what an engine holds is its reservations) and the agent (where it is the
//! resident memory the kernel attributes to the engine, or its reservations
//! when they are larger). A [`LoanBook`] is pure: it is given what each
//! engine holds and the time, and answers with the budgets in force and
//! what changed. Whoever owns it applies the budgets (the library as caps,
//! the agent by sending them to the library).
//!
//! # The rules
//! Every engine has a configured budget and a floor; the budget *in force*
//! is the configured one moved by loans, and the budgets in force always
//! add up to the configured ones.
//! * **Busy**: an engine holding at least `critical` of its budget in force,
//!   or at least `warning` of it while growing (it grew within
//!   [`LendingRules::idle_after`]), borrows: a growing engine borrows before
//!   it is refused, not after.
//! * **Idle**: an engine that has not grown by more than
//!   [`LendingRules::growth_bytes`] for [`LendingRules::idle_after`] (nor
//!   taken a loan back within it), holds less than `warning` of its budget
//!   in force, and is not borrowing itself, can lend.
//! * **How much**: a lender keeps what it would need back at once (see
//!   below): its floor, what it holds plus a cushion of
//!   [`LendingRules::cushion`] of its configured budget, and what it holds
//!   over `warning`, whichever is most; the rest of its budget in force is
//!   lendable. A lender never borrows. A busy engine
//!   borrows everything lendable from the idle engine that can lend the
//!   most. The floor is never lent.
//! * **Taken back, at once**: a lender that is refused a reservation
//!   ([`LoanBook::take_back`]) takes all its loans back; a lender that
//!   holds `critical` of its reduced budget (where it would be spilled
//!   itself) takes back what it needs, whatever the loans' age.
//! * **Taken back, when the rise is sustained**: a lender that has, for
//!   [`LendingRules::rise_after`], held `warning` of its reduced budget or
//!   kept growing past what it kept (what it holds plus the cushion is
//!   more than its reduced budget, by [`LendingRules::growth_bytes`] or
//!   more) takes back what it needs from the loans older than
//!   [`LendingRules::min_loan`]; a flicker (a fall of more than
//!   [`LendingRules::growth_bytes`] below where the rise started), or a
//!   young loan, is left alone. A growing lender takes back before it is
//!   at `warning` (where its own spilling starts soon after), as a
//!   growing engine borrows before it is refused.
//! * **What it needs**: enough for its budget in force to be its floor,
//!   what it holds plus the cushion, and what it holds over `warning`,
//!   whichever is most; taken from the loans booked last first (a loan
//!   moved to another borrower is booked anew, keeping its age), the last
//!   one partly. The borrower's budget drops by as much; what it holds beyond
//!   it is spilled by whoever enforces the budget, and a take-back that
//!   brings the borrower to `critical` of its new budget (from below it)
//!   is counted as one that forced a spill ([`LoanBook::forced_spills`]).
//! * **Loans follow need**: a busy engine that no idle engine can lend to
//!   takes over loans held by a quiet borrower (one that has not grown for
//!   [`LendingRules::idle_after`]) whose budget in force is a larger share
//!   of its configured budget than its own, or more than it needs: what it
//!   needs, at most up to
//!   equal shares or all the borrower does not need (what it holds plus
//!   the cushion, under `warning`), whichever is more, whatever the loans'
//!   age. Budget lent to an engine that
//!   has stopped growing goes to the one that is growing; the quiet
//!   borrower's budget drops by as much (a drop that brings it to
//!   `critical` counts as a forced spill). A loan that moves keeps its
//!   age: [`LendingRules::min_loan`] runs from when its lender lent it.
//! * **Idle spill**: an engine whose spill is cheap (a buffer it must write
//!   anyway; marked with [`LoanBook::set_idle_spill`]) that has not grown
//!   for [`LendingRules::idle_spill_after`] while memory is short (the
//!   owner says when: the database at `warning` of its ceiling) is asked to
//!   spill down to its floor ([`LoanBook::idle_spills`]), once per idle
//!   spell; what it frees, it lends like any idle engine.
//!
//! Thresholds are [`PressureThresholds`]: the same `warning` and
//! `critical` as the pressure levels.

use std::{
    borrow::Borrow,
    time::{Duration, Instant},
};

use crate::PressureThresholds;

/// The timing and the cushion of lending (the thresholds come with each
/// round).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LendingRules {
    /// An engine lends only after it has not grown for this long, and not
    /// for this long after it took a loan back.
    pub idle_after: Duration,
    /// Growth smaller than this does not count as activity (allocator
    /// noise, a page here and there), and a loan (or a top-up of one)
    /// smaller than this is not made: it would be noise too, and each one
    /// is a budget change for whoever enforces it.
    pub growth_bytes: u64,
    /// A lender keeps this fraction of its configured budget beyond what it
    /// holds.
    pub cushion: f64,
    /// A loan stands at least this long from when its lender lent it
    /// (moving to another borrower does not restart it) unless its lender
    /// really needs it (refused, or at `critical` of its reduced budget).
    pub min_loan: Duration,
    /// A lender at `warning` of its reduced budget, or growing past what
    /// it kept, takes back only once it has risen this long.
    pub rise_after: Duration,
    /// An engine marked to spill when idle (see
    /// [`LoanBook::set_idle_spill`]) is asked to spill down to its floor
    /// once it has not grown for this long and memory is short.
    pub idle_spill_after: Duration,
}

impl Default for LendingRules {
    /// Idle after 500 ms without 1 MiB of growth; a cushion of a quarter of
    /// the budget; loans stand 2 s; a rise counts after 250 ms; an idle
    /// spill after 2 s without growth.
    fn default() -> Self {
        Self {
            idle_after: Duration::from_millis(500),
            growth_bytes: 1 << 20,
            cushion: 0.25,
            min_loan: Duration::from_secs(2),
            rise_after: Duration::from_millis(250),
            idle_spill_after: Duration::from_secs(2),
        }
    }
}

impl LendingRules {
    /// The longest any of the durations may be (an hour).
    pub const MAX_DURATION: Duration = Duration::from_secs(3600);

    /// Checks the rules, naming the field that is wrong.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(0.0..=1.0).contains(&self.cushion) {
            return Err(("cushion", format!("{} is outside 0..=1", self.cushion)));
        }
        for (field, d) in [
            ("idle_after", self.idle_after),
            ("min_loan", self.min_loan),
            ("rise_after", self.rise_after),
            ("idle_spill_after", self.idle_spill_after),
        ] {
            if d > Self::MAX_DURATION {
                return Err((field, format!("{d:?} is longer than an hour")));
            }
        }
        Ok(())
    }
}

/// Budget one engine lends another, for as long as the lender is idle.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Loan<K> {
    pub lender: K,
    pub borrower: K,
    pub bytes: u64,
}

impl<K> Loan<K> {
    /// The same loan, its engines named another way.
    pub fn map<J>(self, mut f: impl FnMut(K) -> J) -> Loan<J> {
        Loan {
            lender: f(self.lender),
            borrower: f(self.borrower),
            bytes: self.bytes,
        }
    }
}

/// What an engine holds this round.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holding {
    /// What it really holds: the kernel's figure under the agent, the
    /// reservations in the library alone. Busy and idle are judged on it.
    pub resident_bytes: u64,
    /// Its reservations: a lender keeps room for them even where they are
    /// not resident yet.
    pub reserved_bytes: u64,
}

impl Holding {
    fn held(&self) -> u64 {
        self.resident_bytes.max(self.reserved_bytes)
    }
}

/// A change of loans, for the log and the counters. A take-back's bytes
/// are what was taken back (a loan can be taken back in part).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoanEvent<K> {
    Lent(Loan<K>),
    TakenBack(Loan<K>),
}

impl<K> LoanEvent<K> {
    pub fn loan(&self) -> &Loan<K> {
        match self {
            LoanEvent::Lent(l) | LoanEvent::TakenBack(l) => l,
        }
    }

    /// The same event, its engines named another way.
    pub fn map<J>(self, f: impl FnMut(K) -> J) -> LoanEvent<J> {
        match self {
            LoanEvent::Lent(l) => LoanEvent::Lent(l.map(f)),
            LoanEvent::TakenBack(l) => LoanEvent::TakenBack(l.map(f)),
        }
    }
}

#[derive(Clone, Debug)]
struct Account<K> {
    engine: K,
    budget_bytes: u64,
    floor_bytes: u64,
    in_force_bytes: u64,
    /// What it held when it last grew (or the least since), and when it
    /// last grew or took a loan back; `None` until the first round.
    activity: Option<(u64, Instant)>,
    /// What it held at the last round.
    last: Holding,
    /// Since when a lender has been rising (held `warning` of its budget
    /// in force, or grown past what it kept), and what it held then: a
    /// fall below that ends the rise (a flicker).
    rising_since: Option<(Instant, u64)>,
    /// Take-backs that left this engine, as borrower, at `critical` of
    /// its new budget.
    forced_spills: u64,
    /// It is asked to spill down to its floor when idle and memory is
    /// short (its spill is cheap: a buffer it must write anyway).
    idle_spill: bool,
    /// When it was last asked to (None: never, or not since it was
    /// marked).
    idle_spilled: Option<Instant>,
}

impl<K> Account<K> {
    /// It has not grown for `after` (nor taken a loan back within it);
    /// never before its first round.
    fn quiet(&self, now: Instant, after: Duration) -> bool {
        self.activity
            .is_some_and(|(_, since)| now.duration_since(since) >= after)
    }

    /// It holds at least `fraction` of its budget in force.
    fn holds(&self, fraction: f64) -> bool {
        self.last.resident_bytes as f64 >= self.in_force_bytes as f64 * fraction
    }
}

/// Why loans are taken back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Need {
    /// Refused: every loan, at once.
    All,
    /// At `critical` of its reduced budget: what it needs, any loan.
    Urgent,
    /// A sustained rise past `warning`, or growth past what it kept: what
    /// it needs, from loans older than `min_loan`.
    Sustained,
}

/// The loans between a set of engines, and their budgets in force.
#[derive(Clone, Debug)]
pub struct LoanBook<K> {
    rules: LendingRules,
    /// In the order engines were added: ties go the same way every time.
    accounts: Vec<Account<K>>,
    /// In the order they were booked (a top-up of a loan, or a loan moved
    /// to another borrower, goes last), each with when its lender lent it
    /// or last topped it up (a moved loan keeps its time; a top-up makes
    /// the merged loan as young as the younger part).
    loans: Vec<Loan<K>>,
    made: Vec<Instant>,
}

impl<K: Clone + PartialEq> LoanBook<K> {
    pub fn new(rules: LendingRules) -> Self {
        Self {
            rules,
            accounts: Vec::new(),
            loans: Vec::new(),
            made: Vec::new(),
        }
    }

    pub fn rules(&self) -> LendingRules {
        self.rules
    }

    /// New rules; the loans stand (they are judged by the new rules from
    /// the next round).
    pub fn set_rules(&mut self, rules: LendingRules) {
        self.rules = rules;
    }

    /// Adds an engine, or changes its configured budget and floor. The
    /// loans it lends or borrows end (their terms were set against the old
    /// figures); other engines' loans stand.
    pub fn set_engine(&mut self, engine: K, budget_bytes: u64, floor_bytes: u64) {
        self.end_where(|l| l.lender == engine || l.borrower == engine, None);
        match self.accounts.iter_mut().find(|a| a.engine == engine) {
            Some(a) => {
                a.budget_bytes = budget_bytes;
                a.floor_bytes = floor_bytes;
                a.in_force_bytes = budget_bytes;
                a.rising_since = None;
            }
            None => self.accounts.push(Account {
                engine,
                budget_bytes,
                floor_bytes,
                in_force_bytes: budget_bytes,
                activity: None,
                last: Holding::default(),
                rising_since: None,
                forced_spills: 0,
                idle_spill: false,
                idle_spilled: None,
            }),
        }
    }

    /// The engine's budget in force, if it is in the book.
    pub fn budget<Q>(&self, engine: &Q) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.account(engine).map(|a| a.in_force_bytes)
    }

    /// The engine's configured budget, if it is in the book.
    pub fn configured<Q>(&self, engine: &Q) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.account(engine).map(|a| a.budget_bytes)
    }

    /// Take-backs that left the engine, as borrower, holding `critical` of
    /// its new budget: each forced a spill.
    pub fn forced_spills<Q>(&self, engine: &Q) -> u64
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.account(engine).map_or(0, |a| a.forced_spills)
    }

    pub fn loans(&self) -> &[Loan<K>] {
        &self.loans
    }

    /// Marks the engine as one whose spill is cheap (a buffer it must write
    /// anyway, a cache it can rebuild): while memory is short and it has not
    /// grown for [`LendingRules::idle_spill_after`], it is asked to spill
    /// down to its floor (see [`LoanBook::idle_spills`]), and what it gives
    /// back is lent to busy engines like any idle engine's budget. Returns
    /// false if the engine is not in the book.
    pub fn set_idle_spill<Q>(&mut self, engine: &Q, on: bool) -> bool
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.account_mut(engine)
            .map(|a| {
                a.idle_spill = on;
                a.idle_spilled = None;
            })
            .is_some()
    }

    /// The engines marked to spill when idle that must spill now, each with
    /// what it holds beyond its floor: memory is `short`, and the engine
    /// has not grown for [`LendingRules::idle_spill_after`] (as of the last
    /// [`round`](Self::round)) and holds more than its floor by at least
    /// [`LendingRules::growth_bytes`]. An engine asked is not asked again
    /// until it grows and goes idle again, or another
    /// [`LendingRules::idle_spill_after`] has passed with it still
    /// holding (its spill freed less than asked, or failed).
    pub fn idle_spills(&mut self, now: Instant, short: bool) -> Vec<(K, u64)> {
        if !short {
            return Vec::new();
        }
        let rules = self.rules;
        let mut out = Vec::new();
        for a in &mut self.accounts {
            let Some((_, since)) = a.activity else {
                continue;
            };
            if !a.idle_spill || now.saturating_duration_since(since) < rules.idle_spill_after {
                continue;
            }
            let excess = a.last.resident_bytes.saturating_sub(a.floor_bytes);
            if excess == 0 || excess < rules.growth_bytes {
                continue;
            }
            // Asked before it last grew is as good as never asked: it has
            // been idle for `idle_spill_after` since, so longer since then.
            let asked_lately = a
                .idle_spilled
                .is_some_and(|at| now.saturating_duration_since(at) < rules.idle_spill_after);
            if asked_lately {
                continue;
            }
            a.idle_spilled = Some(now);
            out.push((a.engine.clone(), excess));
        }
        out
    }

    /// Bytes of budget the engine has lent to others.
    pub fn lent_bytes<Q>(&self, engine: &Q) -> u64
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.loans
            .iter()
            .filter(|l| l.lender.borrow() == engine)
            .map(|l| l.bytes)
            .sum()
    }

    /// Whether the engine has lent anything.
    pub fn is_lender<Q>(&self, engine: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.loans.iter().any(|l| l.lender.borrow() == engine)
    }

    fn account<Q>(&self, engine: &Q) -> Option<&Account<K>>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.accounts.iter().find(|a| a.engine.borrow() == engine)
    }

    fn account_mut<Q>(&mut self, engine: &Q) -> Option<&mut Account<K>>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        self.accounts
            .iter_mut()
            .find(|a| a.engine.borrow() == engine)
    }

    /// The lender needs its budget now (it was refused a reservation): all
    /// its loans end. `holding` is what the engines hold now (the
    /// borrowers' figure decides whether the take-back forced a spill).
    /// Returns the loans taken back.
    pub fn take_back<Q>(
        &mut self,
        lender: &Q,
        now: Instant,
        thresholds: &PressureThresholds,
        holding: impl Fn(&K) -> Holding,
    ) -> Vec<LoanEvent<K>>
    where
        K: Borrow<Q>,
        Q: PartialEq + ?Sized,
    {
        let Some(k) = self.account(lender).map(|a| a.engine.clone()) else {
            return Vec::new();
        };
        for a in &mut self.accounts {
            a.last = holding(&a.engine);
        }
        self.recall(&k, Need::All, now, thresholds)
    }

    /// Ends the loans `ends` picks and repays them (new terms, not a
    /// lender's need: nothing counts as activity or a forced spill).
    fn end_where(&mut self, ends: impl Fn(&Loan<K>) -> bool, now: Option<Instant>) {
        let mut i = 0;
        while i < self.loans.len() {
            if ends(&self.loans[i]) {
                let loan = self.loans.remove(i);
                self.made.remove(i);
                self.repay(&loan, now);
            } else {
                i += 1;
            }
        }
    }

    fn repay(&mut self, loan: &Loan<K>, now: Option<Instant>) {
        if let Some(a) = self.account_mut(&loan.lender) {
            a.in_force_bytes += loan.bytes;
            // Taking a loan back counts as activity: no lending again
            // straight away.
            if let (Some(activity), Some(now)) = (&mut a.activity, now) {
                activity.1 = now;
            }
        }
        if let Some(a) = self.account_mut(&loan.borrower) {
            a.in_force_bytes = a.in_force_bytes.saturating_sub(loan.bytes);
        }
    }

    /// The budget in force the lender needs: its floor, what it holds plus
    /// the cushion, or what it holds over `warning`, whichever is most (at
    /// most its configured budget).
    fn needed(&self, a: &Account<K>, thresholds: &PressureThresholds) -> u64 {
        self.wanted(a, thresholds).min(a.budget_bytes)
    }

    /// The budget in force that leaves the engine its floor, what it holds
    /// plus the cushion, and what it holds under `warning`: what a lender
    /// keeps (up to its configured budget) and what a borrower borrows up
    /// to.
    fn wanted(&self, a: &Account<K>, thresholds: &PressureThresholds) -> u64 {
        let held = a.last.held();
        let cushion = (a.budget_bytes as f64 * self.rules.cushion) as u64;
        let over_warning = if thresholds.warning > 0.0 {
            // Strictly below Warning, which is reached at equality (a
            // report near u64::MAX saturates rather than wrap).
            ((held as f64 / thresholds.warning) as u64).saturating_add(1)
        } else {
            a.budget_bytes
        };
        a.floor_bytes
            .max(held.saturating_add(cushion))
            .max(over_warning)
    }

    /// Takes back the loans of `lender` that `need` allows, newest first,
    /// until its budget in force reaches what it needs (all of them for
    /// `Need::All`).
    fn recall(
        &mut self,
        lender: &K,
        need: Need,
        now: Instant,
        thresholds: &PressureThresholds,
    ) -> Vec<LoanEvent<K>> {
        let Some(a) = self.account(lender) else {
            return Vec::new();
        };
        let mut short = match need {
            Need::All => u64::MAX,
            _ => self.needed(a, thresholds).saturating_sub(a.in_force_bytes),
        };
        let critical = |b: &Account<K>| b.holds(thresholds.critical);
        let mut events = Vec::new();
        let mut i = self.loans.len();
        while i > 0 && short > 0 {
            i -= 1;
            if &self.loans[i].lender != lender
                || (need == Need::Sustained
                    && now.saturating_duration_since(self.made[i]) < self.rules.min_loan)
            {
                continue;
            }
            let bytes = self.loans[i].bytes.min(short);
            short -= bytes;
            let taken = Loan {
                lender: lender.clone(),
                borrower: self.loans[i].borrower.clone(),
                bytes,
            };
            if bytes == self.loans[i].bytes {
                self.loans.remove(i);
                self.made.remove(i);
            } else {
                self.loans[i].bytes -= bytes;
            }
            // A borrower this take-back brings to Critical must spill; one
            // already there was spilling anyway.
            let was = self.account(&taken.borrower).is_some_and(critical);
            self.repay(&taken, Some(now));
            if let Some(b) = self.account_mut(&taken.borrower)
                && !was
                && critical(b)
            {
                b.forced_spills += 1;
            }
            events.push(LoanEvent::TakenBack(taken));
        }
        // A rise that took something back is answered; one that found
        // only young loans goes on counting.
        if !events.is_empty()
            && let Some(a) = self.account_mut(lender)
        {
            a.rising_since = None;
        }
        events
    }

    /// One round at `now`: notes who grew, takes back what lenders that
    /// got busy need, and lends idle engines' budget to busy ones. Engines
    /// `holding` says nothing of hold nothing. Returns what changed, in
    /// order.
    pub fn round(
        &mut self,
        now: Instant,
        thresholds: &PressureThresholds,
        holding: impl Fn(&K) -> Holding,
    ) -> Vec<LoanEvent<K>> {
        let rules = self.rules;
        for a in &mut self.accounts {
            let h = holding(&a.engine);
            a.last = h;
            let r = h.resident_bytes;
            // First seen: quiet (nothing has grown yet).
            let since = now.checked_sub(rules.idle_after).unwrap_or(now);
            let activity = a.activity.get_or_insert((r, since));
            if r > activity.0.saturating_add(rules.growth_bytes) {
                *activity = (r, now);
            } else if r < activity.0 {
                activity.0 = r;
            }
        }
        let mut events = Vec::new();
        // Lenders that got busy take back what they need.
        for l in 0..self.accounts.len() {
            let a = &self.accounts[l];
            if !self.loans.iter().any(|x| x.lender == a.engine) {
                self.accounts[l].rising_since = None;
                continue;
            }
            let r = a.last.resident_bytes as f64;
            let budget = a.in_force_bytes as f64;
            // Growing past what it kept when it lent: it will be at
            // `warning` soon.
            let outgrowing = !a.quiet(now, rules.idle_after)
                && self.needed(a, thresholds)
                    >= a.in_force_bytes.saturating_add(rules.growth_bytes);
            let need = if r >= budget * thresholds.critical {
                Some(Need::Urgent)
            } else if r >= budget * thresholds.warning || outgrowing {
                let held = a.last.resident_bytes;
                let rising = &mut self.accounts[l].rising_since;
                match *rising {
                    // Fell back below where it started, by more than
                    // the growth noise: a flicker.
                    Some((_, from)) if held.saturating_add(rules.growth_bytes) < from => {
                        *rising = None;
                        None
                    }
                    Some((since, _)) => (now.saturating_duration_since(since) >= rules.rise_after)
                        .then_some(Need::Sustained),
                    None => {
                        *rising = Some((now, held));
                        rules.rise_after.is_zero().then_some(Need::Sustained)
                    }
                }
            } else {
                self.accounts[l].rising_since = None;
                None
            };
            if let Some(need) = need {
                let lender = self.accounts[l].engine.clone();
                events.extend(self.recall(&lender, need, now, thresholds));
            }
        }
        // Busy engines borrow from idle ones.
        let mut unserved = Vec::new();
        for b in 0..self.accounts.len() {
            let borrower = &self.accounts[b];
            let growing = !borrower.quiet(now, rules.idle_after);
            let busy = borrower.holds(thresholds.critical)
                || (growing && borrower.holds(thresholds.warning));
            // A lender never borrows: it takes its own loans back.
            if !busy || self.loans.iter().any(|x| x.lender == borrower.engine) {
                continue;
            }
            let lender = self
                .accounts
                .iter()
                .enumerate()
                .filter(|(l, a)| *l != b && !self.loans.iter().any(|x| x.borrower == a.engine))
                .filter_map(|(l, a)| {
                    if !a.quiet(now, rules.idle_after) || a.holds(thresholds.warning) {
                        return None; // not idle
                    }
                    // It keeps what it would take back at once: its floor,
                    // what it holds (resident, or its reservations if they
                    // are larger) plus the cushion, and what it holds over
                    // Warning; so lending never leaves it at Warning.
                    let lendable = a.in_force_bytes.saturating_sub(self.needed(a, thresholds));
                    (lendable > 0 && lendable >= rules.growth_bytes).then_some((l, lendable))
                })
                .max_by_key(|(_, lendable)| *lendable);
            let Some((l, bytes)) = lender else {
                unserved.push(b);
                continue;
            };
            self.accounts[l].in_force_bytes -= bytes;
            self.accounts[b].in_force_bytes += bytes;
            let (lender, borrower) = (
                self.accounts[l].engine.clone(),
                self.accounts[b].engine.clone(),
            );
            events.push(self.book(lender, borrower, bytes, now));
        }
        for b in unserved {
            events.extend(self.relend(b, now, thresholds));
        }
        events
    }

    /// Records `bytes` lent by `lender` to `borrower` at `made` (the
    /// budgets in force are the caller's to move): a top-up of a loan
    /// between the two makes it newest, and as young as the younger of the
    /// two (a top-up lent now: new again).
    fn book(&mut self, lender: K, borrower: K, bytes: u64, mut made: Instant) -> LoanEvent<K> {
        let mut loan = Loan {
            lender: lender.clone(),
            borrower: borrower.clone(),
            bytes,
        };
        if let Some(x) = self
            .loans
            .iter()
            .position(|x| x.lender == lender && x.borrower == borrower)
        {
            loan.bytes += self.loans.remove(x).bytes;
            made = made.max(self.made.remove(x));
        }
        self.loans.push(loan);
        self.made.push(made);
        LoanEvent::Lent(Loan {
            lender,
            borrower,
            bytes,
        })
    }

    /// A busy engine no idle engine could lend to takes over loans held by
    /// a quiet borrower (one that has not grown for `idle_after`) whose
    /// budget in force is a larger share of its configured budget than the
    /// busy engine's, or more than it needs, whatever the loans' age (a busy engine's need is
    /// real, as a lender's at `critical` is): what it needs, at most up to
    /// equal shares or what the quiet borrower does not need, whichever is
    /// more (an engine done with a job and holding little keeps no more of
    /// a loan than a lender would keep of its own budget). Loans follow need: budget lent to an engine
    /// that has stopped growing goes to the one that is growing. The quiet
    /// borrower's budget drops by as much, and if that leaves it at
    /// `critical` it spills (counted as a forced spill).
    fn relend(
        &mut self,
        b: usize,
        now: Instant,
        thresholds: &PressureThresholds,
    ) -> Vec<LoanEvent<K>> {
        let rules = self.rules;
        let share = |a: &Account<K>| a.in_force_bytes as f64 / a.budget_bytes.max(1) as f64;
        let busy = &self.accounts[b];
        let mut want = self
            .wanted(busy, thresholds)
            .saturating_sub(busy.in_force_bytes);
        let mut events = Vec::new();
        while want >= rules.growth_bytes {
            let busy = &self.accounts[b];
            let pick = (0..self.loans.len())
                .filter(|&i| {
                    let loan = &self.loans[i];
                    loan.borrower != busy.engine && loan.lender != busy.engine
                })
                .filter_map(|i| {
                    let x = self.account(&self.loans[i].borrower)?;
                    let spare = x.in_force_bytes.saturating_sub(self.wanted(x, thresholds));
                    (x.quiet(now, rules.idle_after)
                        && (share(x) > share(busy) || spare >= rules.growth_bytes))
                        .then_some((i, share(x)))
                })
                .max_by(|p, q| p.1.total_cmp(&q.1));
            let Some((i, _)) = pick else {
                break;
            };
            let x = self.account(&self.loans[i].borrower).expect("picked");
            // Up to equal shares: (x - m) / X = (b + m) / B; and whatever
            // the quiet borrower does not need (what it holds plus the
            // cushion, under Warning), which costs it nothing.
            let (xb, xi) = (x.budget_bytes as f64, x.in_force_bytes as f64);
            let (bb, bi) = (busy.budget_bytes as f64, busy.in_force_bytes as f64);
            let equal = ((xi * bb - bi * xb) / (xb + bb)).max(0.0) as u64;
            let spare = x.in_force_bytes.saturating_sub(self.wanted(x, thresholds));
            let bytes = want.min(equal.max(spare)).min(self.loans[i].bytes);
            if bytes < rules.growth_bytes {
                break;
            }
            want -= bytes;
            let lender = self.loans[i].lender.clone();
            let from = self.loans[i].borrower.clone();
            let to = busy.engine.clone();
            // Moved, not lent anew: the lender lent it when it did.
            let made = self.made[i];
            if bytes == self.loans[i].bytes {
                self.loans.remove(i);
                self.made.remove(i);
            } else {
                self.loans[i].bytes -= bytes;
            }
            if let Some(x) = self.account_mut(&from) {
                let was = x.holds(thresholds.critical);
                x.in_force_bytes -= bytes;
                if !was && x.holds(thresholds.critical) {
                    x.forced_spills += 1;
                }
            }
            self.accounts[b].in_force_bytes += bytes;
            events.push(LoanEvent::TakenBack(Loan {
                lender: lender.clone(),
                borrower: from,
                bytes,
            }));
            events.push(self.book(lender, to, bytes, made));
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn book() -> LoanBook<&'static str> {
        let mut b = LoanBook::new(LendingRules::default());
        b.set_engine("vector", 256 * MIB, 0);
        b.set_engine("query", 256 * MIB, 64 * MIB);
        b
    }

    fn holding(v: u64, q: u64) -> impl Fn(&&str) -> Holding {
        move |e: &&str| Holding {
            resident_bytes: if *e == "vector" { v } else { q },
            reserved_bytes: 0,
        }
    }

    /// Vector, query and timeseries: 256 MiB each, no floor.
    fn three() -> LoanBook<&'static str> {
        let mut b = LoanBook::new(LendingRules::default());
        b.set_engine("vector", 256 * MIB, 0);
        b.set_engine("query", 256 * MIB, 0);
        b.set_engine("timeseries", 256 * MIB, 0);
        b
    }

    /// What vector, query and timeseries hold, in MiB.
    fn h(v: u64, q: u64, ts: u64) -> impl Fn(&&str) -> Holding {
        move |e: &&str| Holding {
            resident_bytes: match *e {
                "vector" => v,
                "query" => q,
                _ => ts,
            } * MIB,
            reserved_bytes: 0,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A library's report is its own word: figures near `u64::MAX` (a bug
    /// or a hostile peer) must neither wrap nor move a byte of budget that
    /// is not there.
    #[test]
    fn absurd_holdings_neither_overflow_nor_create_budget() {
        let t = PressureThresholds::default();
        let mut b = three();
        let t0 = Instant::now();
        let huge = |e: &&str| Holding {
            resident_bytes: if *e == "vector" { 0 } else { u64::MAX - 1 },
            reserved_bytes: if *e == "query" { u64::MAX } else { 0 },
        };
        for at in [0, 1000, 2000, 5000] {
            b.round(t0 + ms(at), &t, huge);
            let sum: u64 = ["vector", "query", "timeseries"]
                .iter()
                .map(|e| b.budget(e).unwrap())
                .sum();
            assert_eq!(
                sum,
                768 * MIB,
                "budgets in force always sum to the configured"
            );
        }
        // Vector, idle and holding nothing, lent to a busy engine.
        assert!(b.lent_bytes(&"vector") > 0);
    }

    #[test]
    fn an_idle_engine_lends_all_but_its_cushion_and_takes_back_what_it_needs() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        // Query busy (240 of 256 MiB), vector idle (first seen: quiet).
        let ev = b.round(t0, &t, holding(10 * MIB, 240 * MIB));
        // Vector keeps 10 MiB + 64 MiB of cushion; lends 182 MiB.
        assert_eq!(
            ev,
            vec![LoanEvent::Lent(Loan {
                lender: "vector",
                borrower: "query",
                bytes: 182 * MIB
            })]
        );
        assert_eq!(b.budget(&"vector"), Some(74 * MIB));
        assert_eq!(b.budget(&"query"), Some(438 * MIB));
        assert_eq!(b.lent_bytes(&"vector"), 182 * MIB);
        // Vector rises to warning of its reduced budget (56 of 74 MiB):
        // the loan stands, young as it is, however long the rise lasts.
        for at in [20, 300, 1900] {
            let ev = b.round(t0 + ms(at), &t, holding(56 * MIB, 380 * MIB));
            assert!(ev.is_empty(), "at {at} ms: {ev:?}");
        }
        // Two seconds on, the sustained rise takes back what vector needs
        // (56 + 64 MiB of cushion), not the whole loan.
        let ev = b.round(t0 + ms(2000), &t, holding(56 * MIB, 380 * MIB));
        assert_eq!(
            ev,
            vec![LoanEvent::TakenBack(Loan {
                lender: "vector",
                borrower: "query",
                bytes: 46 * MIB
            })]
        );
        assert_eq!(b.budget(&"vector"), Some(120 * MIB));
        assert_eq!(b.budget(&"query"), Some(392 * MIB));
        assert_eq!(b.lent_bytes(&"vector"), 136 * MIB);
        assert_eq!(
            b.forced_spills(&"query"),
            1,
            "380 MiB: under 90% of 438, past 90% of 392"
        );
        // Vector jumps to critical of its budget (110 of 120 MiB): it
        // would be spilled itself, so it takes back at once what it needs
        // (110 + 64 MiB), and query, at 300 MiB, need not spill.
        let ev = b.round(t0 + ms(2020), &t, holding(110 * MIB, 300 * MIB));
        assert!(
            matches!(&ev[..], [LoanEvent::TakenBack(l)] if l.bytes == 54 * MIB),
            "{ev:?}"
        );
        assert_eq!(b.budget(&"vector"), Some(174 * MIB));
        assert_eq!(b.budget(&"query"), Some(338 * MIB));
        assert_eq!(b.forced_spills(&"query"), 1);
        let sum = b.budget(&"vector").unwrap() + b.budget(&"query").unwrap();
        assert_eq!(sum, 512 * MIB);
    }

    #[test]
    fn a_lender_growing_again_takes_back_before_warning_even_a_loan_that_moved() {
        let t = PressureThresholds::default();
        let mut b = three();
        let t0 = Instant::now();
        // Query busy; vector (10 MiB) lends it 182 MiB, more than
        // timeseries (30 MiB) could.
        b.round(t0, &t, h(10, 240, 30));
        assert_eq!(b.lent_bytes(&"vector"), 182 * MIB);
        // Query done and quiet; timeseries busy: no idle engine can lend
        // (vector kept what it holds plus the cushion), so the loan moves
        // to timeseries, three seconds after vector lent it.
        b.round(t0 + ms(2900), &t, h(10, 60, 100));
        let ev = b.round(t0 + ms(3000), &t, h(10, 60, 240));
        assert!(
            ev.iter()
                .any(|e| matches!(e, LoanEvent::Lent(l) if l.borrower == "timeseries")),
            "{ev:?}"
        );
        // Vector grows again, 4 MiB every 50 ms (80 MiB/s), to 170 MiB.
        // It takes back as it grows, starting before it is at warning,
        // and is never at critical of its budget in force, where it would
        // be spilled itself (taking back only from warning, it was at
        // critical 700 ms into the rise).
        let mut first_from = None;
        let mut first_at = None;
        let (mut at, mut v) = (3050, 14);
        while v <= 170 {
            let budget = b.budget(&"vector").unwrap();
            assert!(
                (v * MIB) < (budget as f64 * t.critical) as u64,
                "at {at} ms vector holds {v} MiB of {} MiB in force",
                budget >> 20
            );
            let ev = b.round(t0 + ms(at), &t, h(v, 60, 240));
            if first_from.is_none() {
                first_from = ev.iter().find_map(|e| match e {
                    LoanEvent::TakenBack(l) if l.lender == "vector" => Some(l.borrower),
                    _ => None,
                });
                first_at = first_from.map(|_| (v, budget));
            }
            at += 50;
            v += 4;
        }
        let (v, budget) = first_at.expect("a take-back");
        assert!(
            (v * MIB) < (budget as f64 * t.warning) as u64,
            "first take-back at {v} MiB of {} MiB in force",
            budget >> 20
        );
        // The loan booked last first: the one that moved, old enough to
        // take back since it keeps the time vector lent it (stamped
        // anew at its move, it was not, and query's older part went
        // first).
        assert_eq!(first_from, Some("timeseries"));
        let sum: u64 = ["vector", "query", "timeseries"]
            .iter()
            .map(|e| b.budget(e).unwrap())
            .sum();
        assert_eq!(sum, 768 * MIB);
    }

    #[test]
    fn a_flicker_above_warning_takes_nothing_back() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        b.round(t0, &t, holding(10 * MIB, 240 * MIB));
        assert_eq!(b.lent_bytes(&"vector"), 182 * MIB);
        // Old loans; vector above warning (56 of 74 MiB) for 200 ms at a
        // time, then back under: never sustained for 250 ms.
        let mut now = t0 + ms(3000);
        for _ in 0..5 {
            for (dt, v) in [(0, 56), (100, 60), (200, 56), (300, 20)] {
                let ev = b.round(now + ms(dt), &t, holding(v * MIB, 400 * MIB));
                assert!(ev.is_empty(), "{ev:?}");
            }
            now += ms(400);
        }
        assert_eq!(b.lent_bytes(&"vector"), 182 * MIB);
        assert_eq!(b.forced_spills(&"query"), 0);
        // Held there for 250 ms, it is a rise.
        b.round(now, &t, holding(56 * MIB, 400 * MIB));
        let ev = b.round(now + ms(250), &t, holding(56 * MIB, 400 * MIB));
        assert_eq!(ev.len(), 1, "{ev:?}");
    }

    #[test]
    fn a_rise_at_warning_survives_jitter_below_the_growth_noise() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        b.round(t0, &t, holding(10 * MIB, 240 * MIB));
        assert_eq!(b.budget(&"vector"), Some(74 * MIB));
        // Old loan; vector at Warning (60 of 74 MiB), a page up and down
        // every round: still a rise, taken back once it has lasted 250
        // ms.
        let mut taken = None;
        for i in 0..10u64 {
            let v = 60 * MIB - (i % 2) * 4096;
            let ev = b.round(t0 + ms(3000 + 50 * i), &t, holding(v, 400 * MIB));
            if !ev.is_empty() && taken.is_none() {
                taken = Some(50 * i);
            }
        }
        assert_eq!(taken, Some(250));
    }

    #[test]
    fn the_newest_loan_is_taken_back_first() {
        let t = PressureThresholds::default();
        let mut b = three();
        let t0 = Instant::now();
        // Vector, holding 40 MiB, lends 152 MiB to busy query (more than
        // timeseries could).
        b.round(t0, &t, h(40, 240, 100));
        assert_eq!(b.lent_bytes(&"vector"), 152 * MIB);
        // Vector frees its 40 MiB and lends 40 more, now to busy
        // timeseries.
        b.round(t0 + ms(600), &t, h(0, 240, 240));
        assert_eq!(b.lent_bytes(&"vector"), 192 * MIB);
        assert_eq!(b.budget(&"timeseries"), Some(296 * MIB));
        // Vector at critical of its 64 MiB: it needs 58 + 64 MiB, all of
        // the newest loan (timeseries') and 18 MiB of the older one.
        let ev = b.round(t0 + ms(700), &t, h(58, 240, 240));
        assert_eq!(
            ev[..2],
            [
                LoanEvent::TakenBack(Loan {
                    lender: "vector",
                    borrower: "timeseries",
                    bytes: 40 * MIB
                }),
                LoanEvent::TakenBack(Loan {
                    lender: "vector",
                    borrower: "query",
                    bytes: 18 * MIB
                })
            ]
        );
        assert_eq!(b.budget(&"vector"), Some(122 * MIB));
        // Timeseries at 240 of 256 MiB is past critical: that take-back
        // forced a spill; query at 240 of 390 MiB did not.
        assert_eq!(b.forced_spills(&"timeseries"), 1);
        assert_eq!(b.forced_spills(&"query"), 0);
        // And busy timeseries, which no idle engine can lend to, takes
        // over part of quiet query's loan: what it needs to hold its 240
        // MiB under Warning (64 MiB and a byte), less than equal shares of
        // their configured budgets would allow ((390 - m) / 256 = (256 +
        // m) / 256: 67 MiB).
        let m = 64 * MIB + 1;
        assert_eq!(
            ev[2..],
            [
                LoanEvent::TakenBack(Loan {
                    lender: "vector",
                    borrower: "query",
                    bytes: m
                }),
                LoanEvent::Lent(Loan {
                    lender: "vector",
                    borrower: "timeseries",
                    bytes: m
                })
            ]
        );
        assert_eq!(b.budget(&"timeseries"), Some(256 * MIB + m));
        assert_eq!(b.budget(&"query"), Some(390 * MIB - m));
        assert_eq!(b.forced_spills(&"query"), 0, "240 of 326 MiB: not critical");
    }

    #[test]
    fn an_engine_that_grew_recently_does_not_lend_and_the_floor_is_never_lent() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        b.round(t0, &t, holding(0, 0));
        // Vector grows: not idle for 500 ms, so busy query borrows nothing.
        let ev = b.round(t0 + Duration::from_millis(10), &t, holding(100 * MIB, 0));
        assert!(ev.is_empty());
        let ev = b.round(
            t0 + Duration::from_millis(20),
            &t,
            holding(100 * MIB, 240 * MIB),
        );
        assert!(ev.is_empty(), "{ev:?}");
        // Vector busy now, query idle: query keeps its 64 MiB floor (more
        // than 0 held + 64 MiB cushion? equal) and lends the rest.
        let ev = b.round(t0 + Duration::from_millis(600), &t, holding(240 * MIB, 0));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].loan().bytes, 192 * MIB);
        assert_eq!(b.budget(&"query"), Some(64 * MIB), "the floor stays");
    }

    #[test]
    fn an_idle_engine_marked_to_spill_spills_to_its_floor_when_memory_is_short_then_lends() {
        let t = PressureThresholds::default();
        let mut b = LoanBook::new(LendingRules::default());
        b.set_engine("vector", 256 * MIB, 32 * MIB);
        b.set_engine("query", 256 * MIB, 64 * MIB);
        assert!(b.set_idle_spill(&"vector", true));
        assert!(!b.set_idle_spill(&"sparse", true), "not in the book");
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // Nothing before the first round (idleness is not known yet).
        assert_eq!(b.idle_spills(t0, true), []);
        b.round(t0, &t, holding(180 * MIB, 100 * MIB));
        // Vector grows at 100 ms, then sits on 200 MiB (78%: at Warning,
        // so it lends nothing); query grew too (so it lent nothing).
        b.round(at(100), &t, holding(200 * MIB, 110 * MIB));
        assert_eq!(b.idle_spills(at(1000), true), [], "idle only 0.9 s");
        assert_eq!(b.idle_spills(at(2200), false), [], "memory is not short");
        // Query busy and nobody can lend it anything.
        let ev = b.round(at(2200), &t, holding(200 * MIB, 240 * MIB));
        assert_eq!(ev, []);
        // Idle 2.1 s and memory short: down to its floor. Query is not
        // marked: it is never asked.
        assert_eq!(b.idle_spills(at(2200), true), [("vector", 168 * MIB)]);
        assert_eq!(b.idle_spills(at(2300), true), [], "asked once");
        // It spilled: it lends what it no longer needs to busy query
        // (keeping 10 MiB + the 64 MiB cushion).
        let ev = b.round(at(2400), &t, holding(10 * MIB, 240 * MIB));
        assert_eq!(
            ev,
            [LoanEvent::Lent(Loan {
                lender: "vector",
                borrower: "query",
                bytes: 182 * MIB
            })]
        );
        assert_eq!(b.idle_spills(at(5000), true), [], "at its floor's side");
        // A spill that freed nothing is asked again once another
        // `idle_spill_after` has passed, not before.
        let mut b = LoanBook::new(LendingRules::default());
        b.set_engine("vector", 256 * MIB, 32 * MIB);
        b.set_engine("query", 256 * MIB, 64 * MIB);
        b.set_idle_spill(&"vector", true);
        b.round(t0, &t, holding(200 * MIB, 0));
        assert_eq!(b.idle_spills(at(1600), true), [("vector", 168 * MIB)]);
        b.round(at(1700), &t, holding(200 * MIB, 0));
        assert_eq!(b.idle_spills(at(3500), true), []);
        assert_eq!(b.idle_spills(at(3600), true), [("vector", 168 * MIB)]);
        // Unmarked: never.
        b.set_idle_spill(&"vector", false);
        assert_eq!(b.idle_spills(at(9000), true), []);
    }

    #[test]
    fn a_growing_engine_borrows_from_warning_a_steady_one_only_from_critical() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        // Query steady at 200 of 256 MiB (78%, Warning; first seen: not
        // growing), vector idle: no loan.
        assert_eq!(b.round(t0, &t, holding(10 * MIB, 200 * MIB)), []);
        // Query grows to 210 MiB (82%): it borrows before it is refused.
        let ev = b.round(t0 + ms(100), &t, holding(10 * MIB, 210 * MIB));
        assert_eq!(
            ev,
            [LoanEvent::Lent(Loan {
                lender: "vector",
                borrower: "query",
                bytes: 182 * MIB
            })]
        );
        // Growing but under Warning: it would not have.
        let mut b = book();
        b.round(t0, &t, holding(10 * MIB, 150 * MIB));
        assert_eq!(b.round(t0 + ms(100), &t, holding(10 * MIB, 180 * MIB)), []);
    }

    #[test]
    fn loans_follow_need_from_a_quiet_borrower_to_a_busy_one_up_to_equal_shares() {
        let t = PressureThresholds::default();
        let mut b = three();
        let t0 = Instant::now();
        // Timeseries (idle, empty) lends to busy vector; query has 20 MiB
        // and is growing, so lends nothing.
        let ev = b.round(t0, &t, h(240, 20, 0));
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(b.budget(&"vector"), Some(448 * MIB));
        // Query grows and is busy; vector is still growing: its loan is
        // not taken over.
        assert_eq!(b.round(t0 + ms(300), &t, h(260, 100, 0)), []);
        assert_eq!(b.round(t0 + ms(600), &t, h(300, 240, 0)), []);
        // Vector has stopped at 300 MiB (quiet from 1.1 s): busy query
        // takes over what it needs of vector's loan (240 under Warning:
        // 320 MiB and a byte), less than equal shares would allow.
        let ev = b.round(t0 + ms(1200), &t, h(300, 240, 0));
        let m = 64 * MIB + 1;
        assert_eq!(
            ev,
            [
                LoanEvent::TakenBack(Loan {
                    lender: "timeseries",
                    borrower: "vector",
                    bytes: m
                }),
                LoanEvent::Lent(Loan {
                    lender: "timeseries",
                    borrower: "query",
                    bytes: m
                })
            ]
        );
        assert_eq!(b.budget(&"vector"), Some(448 * MIB - m));
        assert_eq!(b.budget(&"query"), Some(256 * MIB + m));
        // Vector holds 300 of 384 MiB: not critical, no forced spill.
        assert_eq!(b.forced_spills(&"vector"), 0);
        // Query grows on to 300 MiB and wants 80 MiB more: equal shares
        // bound it now ((384 - m) = (320 + m): 32 MiB). Vector keeps 352
        // MiB (it holds 85% of it: no forced spill).
        let ev = b.round(t0 + ms(1300), &t, h(300, 300, 0));
        let m2 = 32 * MIB;
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(ev[1].loan().bytes, ev[0].loan().bytes);
        assert!(ev[0].loan().bytes.abs_diff(m2) <= 1, "{ev:?}");
        assert_eq!(b.budget(&"vector"), b.budget(&"query"), "equal shares");
        assert_eq!(b.forced_spills(&"vector"), 0);
        // Shares equal: nothing more moves, however busy query is.
        assert_eq!(b.round(t0 + ms(1400), &t, h(300, 340, 0)), []);
        // The budgets in force still add up.
        let sum: u64 = ["timeseries", "vector", "query"]
            .iter()
            .map(|e| b.budget(e).unwrap())
            .sum();
        assert_eq!(sum, 3 * 256 * MIB);
    }

    #[test]
    fn a_quiet_borrower_holding_little_gives_all_it_does_not_need_past_equal_shares() {
        let t = PressureThresholds::default();
        let mut b = three();
        let t0 = Instant::now();
        // Vector, busy alone, borrows from both idle engines.
        b.round(t0, &t, h(240, 0, 0));
        b.round(t0 + ms(100), &t, h(420, 0, 0));
        b.round(t0 + ms(200), &t, h(600, 0, 0));
        let vector = b.budget(&"vector").unwrap();
        assert_eq!(vector, 640 * MIB, "all but the lenders' cushions");
        // Its job over, it holds 16 MiB and stays quiet; timeseries gets
        // busy. No idle engine has anything left to lend (query keeps its
        // cushion), so timeseries takes over vector's loans: not only up
        // to equal shares but all vector does not need.
        b.round(t0 + ms(300), &t, h(16, 0, 0));
        b.round(t0 + ms(1400), &t, h(16, 0, 200));
        let mut ts = b.budget(&"timeseries").unwrap();
        for i in 0..8 {
            let held = (ts as f64 * 0.9) as u64 / MIB;
            b.round(t0 + ms(1500 + 100 * i), &t, h(16, 0, held));
            ts = b.budget(&"timeseries").unwrap();
        }
        let vector = b.budget(&"vector").unwrap();
        let cushion = (256.0 * MIB as f64 * LendingRules::default().cushion) as u64;
        assert!(
            vector <= (16 * MIB + cushion).max(256 * MIB),
            "vector kept {} MiB of loans it does not need",
            vector / MIB
        );
        // Past equal shares: timeseries' share of its budget is above
        // vector's.
        assert!(
            ts > vector,
            "timeseries {} MiB, vector {}",
            ts / MIB,
            vector / MIB
        );
        assert_eq!(b.forced_spills(&"vector"), 0, "nothing it held was taken");
        let sum: u64 = ["timeseries", "vector", "query"]
            .iter()
            .map(|e| b.budget(e).unwrap())
            .sum();
        assert_eq!(sum, 3 * 256 * MIB);
    }

    #[test]
    fn loans_smaller_than_the_growth_noise_are_not_made() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        let ev = b.round(t0, &t, holding(10 * MIB, 240 * MIB));
        assert_eq!(ev.len(), 1);
        // Query stays busy; vector shrinks by a page, then by 700 bytes
        // more: each would be a top-up of a few hundred bytes (and a
        // budget change for the enforcer). None is made.
        for (i, v) in [10 * MIB - 4096, 10 * MIB - 4796, 10 * MIB - (1 << 19)]
            .into_iter()
            .enumerate()
        {
            let ev = b.round(t0 + ms(20 * (i as u64 + 1)), &t, holding(v, 430 * MIB));
            assert!(ev.is_empty(), "vector at {v}: {ev:?}");
        }
        assert_eq!(b.budget(&"query"), Some(438 * MIB));
        // Two MiB freed is a loan worth making.
        let ev = b.round(t0 + ms(100), &t, holding(8 * MIB, 430 * MIB));
        assert!(
            matches!(&ev[..], [LoanEvent::Lent(l)] if l.bytes == 2 * MIB),
            "{ev:?}"
        );
    }

    #[test]
    fn a_refused_lender_takes_its_loans_back_at_once_and_waits_before_lending_again() {
        let t = PressureThresholds::default();
        let mut b = book();
        let t0 = Instant::now();
        b.round(t0, &t, holding(0, 240 * MIB));
        assert!(b.is_lender(&"vector"));
        let ev = b.take_back(
            &"vector",
            t0 + Duration::from_millis(5),
            &t,
            holding(0, 240 * MIB),
        );
        assert_eq!(ev.len(), 1);
        assert_eq!(b.budget(&"vector"), Some(256 * MIB));
        assert!(b.loans().is_empty());
        // Still quiet by its memory, but it just needed its budget.
        assert!(
            b.round(t0 + Duration::from_millis(100), &t, holding(0, 240 * MIB))
                .is_empty()
        );
        assert_eq!(
            b.round(t0 + Duration::from_millis(506), &t, holding(0, 240 * MIB))
                .len(),
            1
        );
    }

    #[test]
    fn reservations_not_yet_resident_are_kept_by_the_lender() {
        let t = PressureThresholds::default();
        let mut b = book();
        let ev = b.round(Instant::now(), &t, |e: &&str| match *e {
            "vector" => Holding {
                resident_bytes: 0,
                reserved_bytes: 100 * MIB,
            },
            _ => Holding {
                resident_bytes: 240 * MIB,
                reserved_bytes: 0,
            },
        });
        assert_eq!(ev[0].loan().bytes, 256 * MIB - 164 * MIB);
    }

    #[test]
    fn budgets_in_force_always_add_up_to_the_configured_ones() {
        // The default rules, and a thin cushion with no waiting (where the
        // cushion alone would leave a lender at Warning of what it keeps).
        walk(LendingRules::default());
        walk(LendingRules {
            cushion: 0.05,
            min_loan: Duration::ZERO,
            rise_after: Duration::ZERO,
            ..LendingRules::default()
        });
    }

    fn walk(rules: LendingRules) {
        let t = PressureThresholds::default();
        let mut b = LoanBook::new(rules);
        for (e, budget, floor) in [(0u8, 100, 10), (1, 300, 0), (2, 50, 50), (3, 200, 20)] {
            b.set_engine(e, budget * MIB, floor * MIB);
        }
        let total = 650 * MIB;
        let mut now = Instant::now();
        // A deterministic walk through busy and idle phases.
        let mut x: u64 = 7;
        for _ in 0..2000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            now += Duration::from_millis(x % 300);
            let seed = x;
            let ev = b.round(now, &t, |e: &u8| {
                let budget = [100, 300, 50, 200][*e as usize] * MIB;
                let share = (seed >> (*e * 8)) % 128;
                Holding {
                    resident_bytes: budget * share / 100,
                    reserved_bytes: budget * ((seed >> (*e * 8 + 4)) % 64) / 100,
                }
            });
            if x.is_multiple_of(13) {
                b.take_back(&((x % 4) as u8), now, &t, |_| Holding::default());
            }
            for e in &ev {
                if let LoanEvent::Lent(l) = e {
                    let a = b.account(&l.lender).unwrap();
                    assert!(
                        (a.last.held() as f64) < a.in_force_bytes as f64 * t.warning,
                        "lending left {} at Warning: {ev:?}",
                        l.lender
                    );
                }
            }
            assert_eq!(b.loans.len(), b.made.len());
            let sum: u64 = (0..4u8).map(|e| b.budget(&e).unwrap()).sum();
            assert_eq!(sum, total, "after {ev:?}");
            for e in 0..4u8 {
                let floor = [10, 0, 50, 20][e as usize] * MIB;
                assert!(b.budget(&e).unwrap() >= floor.min(b.configured(&e).unwrap()));
            }
            for l in b.loans() {
                assert!(
                    !b.loans().iter().any(|x| x.borrower == l.lender),
                    "a lender never borrows"
                );
            }
        }
    }
}
