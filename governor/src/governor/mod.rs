//! The reservation core: a ledger of what each engine holds, kept exact
//! under one lock, and the [`Reservation`] guard that gives memory back when
//! it is dropped.
//!
//! # Admission
//! A request of `n` bytes for engine `e` is admitted when both hold:
//! * `used(e) + n <= cap(e)`: the engine's own cap in force;
//! * `n <= ceiling - total - protected(others)`, where `protected(x) =
//!   floor(x) - used(x)` (never negative): the part of another engine's
//!   floor it is not using stays free for it.
//!
//! Everything above the floors is therefore a shared pool. Caps move by
//! loans ([`crate::lending`]): an idle engine lends the unused part of its
//! cap to a busy one, and takes it back when it gets busy or one of its own
//! requests is refused. Refusals are deterministic: the same ledger and
//! request always give the same answer, at once, with the numbers. The
//! counters are checked arithmetic: a request that would overflow is
//! refused, never wrapped.
//!
//! # Holding a reservation
//! A [`Reservation`] owns a handle to its governor, like DataFusion's
//! `MemoryReservation` owns an `Arc` of its pool: it has no lifetime, and
//! lives in a cache, a spill handler or another thread as long as needed.
//! Making a reservation clones that handle and dropping it releases the
//! clone: a shared atomic, on a cache line every thread making
//! reservations of the governor writes. So code that reserves often holds
//! one reservation per consumer, made once with
//! [`MemoryGovernor::reservation`] (empty, never refused, like DataFusion's
//! `MemoryConsumer::register`), and grows and shrinks it:
//! [`try_grow`](Reservation::try_grow) and [`shrink`](Reservation::shrink)
//! touch no reference count, and while the engine is far from its limits
//! no shared cache line at all (see the fast path below).
//!
//! # The fast path
//! While an engine is far from its limits, a thread reserves from credit it
//! drew for the engine a batch at a time, kept in thread-local storage;
//! near the limits every decision is exact, under the lock (the `fast`
//! module has the details).
//!
//! # Where things are
//! * `ledger`: the books, admission, pressure levels, headroom;
//! * `fast`: when the fast path is open, and the thread-local credit;
//! * `shared`: what the handles of one governor share, and the reserve and
//!   release decisions;
//! * `reservation`: the [`Reservation`] guard;
//! * `rebalance`: the rebalancer thread (the lending rules are
//!   [`crate::lending`]'s).

mod fast;
mod ledger;
mod rebalance;
mod reservation;
mod shared;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

pub use self::shared::OutsideProbe;
use self::shared::Shared;
pub use self::{ledger::EngineUsage, rebalance::Rebalancer, reservation::Reservation};
use crate::{
    budget::Budget,
    engine::EngineId,
    error::MemError,
    lending::{LendingRules, Loan, LoanEvent},
    numa::{NodeTotals, NodeUsage},
    pressure::{PressureChange, PressureLevel, ThresholdsHandle},
    spill::SpillAction,
};

/// Per-engine budgets under a global ceiling. See the crate documentation
/// for the protocol. Cloning gives another handle to the same governor.
#[derive(Clone)]
pub struct MemoryGovernor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt(f)
    }
}

/// Default credit batch.
pub const DEFAULT_BATCH_BYTES: u64 = 1 << 20;

impl MemoryGovernor {
    /// A governor for `budget` with the default pressure thresholds.
    pub fn new(budget: Budget) -> Self {
        Self::with_thresholds(budget, ThresholdsHandle::default())
    }

    /// A governor whose thresholds are shared with `thresholds` (change
    /// them there at run time).
    pub fn with_thresholds(budget: Budget, thresholds: ThresholdsHandle) -> Self {
        Self::with_batch(budget, thresholds, DEFAULT_BATCH_BYTES)
    }

    /// A governor whose threads draw credit `batch_bytes` at a time; 0 turns
    /// the fast path off (every decision takes the lock).
    pub fn with_batch(budget: Budget, thresholds: ThresholdsHandle, batch_bytes: u64) -> Self {
        Self {
            shared: Arc::new(Shared::new(budget, thresholds, batch_bytes)),
        }
    }

    #[inline]
    pub(crate) fn slot(&self, engine: EngineId) -> Result<usize, MemError> {
        self.shared.slot(engine)
    }

    #[cfg(feature = "datafusion")]
    /// Reserves for a ledger slot without a guard (for pools that keep
    /// their own books, such as the DataFusion pool).
    pub(crate) fn reserve_slot(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        self.shared.reserve(slot, bytes).map(drop)
    }

    #[cfg(feature = "datafusion")]
    /// Gives back what `reserve_slot` or `charge_slot` took.
    pub(crate) fn release_slot(&self, slot: usize, bytes: u64) {
        self.shared.give_back_any(slot, bytes);
    }

    #[cfg(feature = "datafusion")]
    pub(crate) fn charge_slot(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        self.shared.charge(slot, bytes).map(drop)
    }

    /// Fault injection: the `n`th reservation attempt from now (`try_reserve`
    /// or `try_grow`, counting from 1) is refused as if the pool were full.
    /// 0 turns it off.
    #[cfg(feature = "fault-injection")]
    pub fn refuse_nth_reservation(&self, n: u64) {
        self.shared
            .fault
            .0
            .store(n, std::sync::atomic::Ordering::Release);
    }

    /// Fault injection: how many reservations were refused by injection.
    #[cfg(feature = "fault-injection")]
    pub fn injected_refusals(&self) -> u64 {
        self.shared
            .fault
            .1
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the calling thread's unused credit for this governor to the
    /// ledger (threads also do this when they exit).
    pub fn flush_thread_credit(&self) {
        self.shared.flush_credit(None);
    }

    /// A guard for `bytes` of `slot` that the ledger already counts.
    fn guard(&self, slot: usize, engine: EngineId, bytes: u64, node: usize) -> Reservation {
        Reservation::new(self.shared.clone(), slot, engine, bytes, node)
    }

    /// An empty reservation for `engine`, to [`try_grow`](Reservation::try_grow)
    /// and [`shrink`](Reservation::shrink) as the consumer's use changes.
    /// It is never refused (only an engine the budget does not have is an
    /// error), and holding one is how code that reserves often stays off
    /// shared cache lines: see [Holding a reservation](self#holding-a-reservation).
    pub fn reservation(&self, engine: EngineId) -> Result<Reservation, MemError> {
        Ok(self.guard(self.slot(engine)?, engine, 0, 0))
    }

    /// Reserves `bytes` for `engine`, or refuses at once.
    #[inline]
    pub fn try_reserve(&self, engine: EngineId, bytes: u64) -> Result<Reservation, MemError> {
        let slot = self.slot(engine)?;
        let node = self.shared.reserve(slot, bytes)?;
        Ok(self.guard(slot, engine, bytes, node))
    }

    /// Like [`try_reserve`](Self::try_reserve), but waits up to `timeout`
    /// for other reservations to be released (backpressure). A request that
    /// could never fit (above the engine's cap) is refused at once.
    pub fn reserve_timeout(
        &self,
        engine: EngineId,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Reservation, MemError> {
        let slot = self.slot(engine)?;
        let node = self.shared.reserve_waiting(slot, bytes, timeout)?;
        Ok(self.guard(slot, engine, bytes, node))
    }

    /// Counts `bytes` that cannot be refused (memory already allocated
    /// elsewhere, a page the kernel faulted in). It may take the engine
    /// above its cap and the total above the ceiling; pressure then says so.
    pub fn charge(&self, engine: EngineId, bytes: u64) -> Result<Reservation, MemError> {
        let slot = self.slot(engine)?;
        let node = self.shared.charge(slot, bytes)?;
        Ok(self.guard(slot, engine, bytes, node))
    }

    /// One engine's accounting.
    pub fn usage(&self, engine: EngineId) -> Result<EngineUsage, MemError> {
        let slot = self.slot(engine)?;
        Ok(self.shared.lock().usage(slot))
    }

    /// Every engine's accounting, in budget order.
    pub fn usages(&self) -> Vec<EngineUsage> {
        let l = self.shared.lock();
        (0..l.engines.len()).map(|i| l.usage(i)).collect()
    }

    /// `engine`'s books per NUMA node (empty when the budget is not split
    /// across nodes).
    pub fn node_usage(&self, engine: EngineId) -> Result<Vec<NodeUsage>, MemError> {
        let slot = self.slot(engine)?;
        Ok(self.shared.lock().node_usage(slot))
    }

    /// Each NUMA node's total and part of the ceiling (empty when the
    /// budget is not split across nodes).
    pub fn node_totals(&self) -> Vec<NodeTotals> {
        self.shared.lock().node_totals()
    }

    /// Bytes held by all engines.
    pub fn total_bytes(&self) -> u64 {
        self.shared.lock().total
    }

    pub fn ceiling_bytes(&self) -> u64 {
        self.shared.lock().ceiling
    }

    /// The process-wide pressure level.
    pub fn level(&self) -> PressureLevel {
        self.shared.lock().level
    }

    /// The shared thresholds handle.
    pub fn thresholds(&self) -> &ThresholdsHandle {
        &self.shared.thresholds
    }

    /// Calls `f` on every change of an engine's or the process's level.
    pub fn subscribe(&self, f: impl Fn(PressureChange) + Send + Sync + 'static) {
        self.shared.subscribe(Box::new(f));
    }

    /// Changes an engine's configured floor and cap (the agent sends its
    /// budgets this way). Refused whole if it would break an invariant: the
    /// cap may not drop below what the engine holds (ask it to spill
    /// first), floors may not add up past the ceiling. The loans the engine
    /// lends or borrows end (their terms were set against the old figures):
    /// as when a loan is taken back, the other side's cap moves, and a
    /// borrower's may drop below what it holds (a spill controller spills
    /// it).
    pub fn set_limits(
        &self,
        engine: EngineId,
        floor_bytes: u64,
        cap_bytes: u64,
    ) -> Result<(), MemError> {
        let i = self.slot(engine)?;
        self.shared.flush_credit(Some(i));
        self.shared
            .with_ledger(|l| l.set_limits(i, floor_bytes, cap_bytes))?;
        // A raised cap admits waiting reservations as a release would (an
        // agent giving back a lender's loans, say).
        self.shared.wake_waiters();
        Ok(())
    }

    /// Changes the global ceiling; refused if it is below what is held, a
    /// cap, or the sum of floors.
    pub fn set_ceiling(&self, ceiling_bytes: u64) -> Result<(), MemError> {
        self.shared.flush_credit(None);
        self.shared.with_ledger(|l| l.set_ceiling(ceiling_bytes))?;
        self.shared.wake_waiters();
        Ok(())
    }

    /// Memory the database holds that none of this governor's reservations
    /// accounts for (memory touched without reserving, other processes',
    /// files on a tmpfs, allocator pages not yet returned): a reservation
    /// is admitted only while the books, this and the reservation fit
    /// under the ceiling, as an engine's cap leaves room only for what its
    /// budget has left. The agent sets it from the kernel's figure for the
    /// database (and back to 0 when it is lost); 0, the default, admits up
    /// to the ceiling on the books alone. Floors stay guaranteed.
    pub fn set_outside_bytes(&self, bytes: u64) {
        self.shared.flush_credit(None);
        self.shared.set_outside(bytes);
    }

    /// Lets the governor read the outside figure itself when its room runs
    /// short, between the figures [`set_outside_bytes`](Self::set_outside_bytes)
    /// brings: before deciding a reservation (or a draw of credit) that
    /// would leave less than a quarter of the ceiling (less the books and
    /// the outside figure), at most once a millisecond, on the reserving
    /// thread, `probe(books, ceiling)` gives the figure (None: left as it
    /// is). Far from the ceiling it costs an atomic load. The agent's link
    /// installs one that reads the database's cgroup's `memory.stat` while
    /// the agent enforces (about 3 µs on cgroup v1 here; on a large machine
    /// the kernel may flush its statistics first, which takes longer). None
    /// removes it; a reading under way when it changes, or when a figure
    /// is set, is dropped. A probe that holds this governor keeps it alive
    /// until removed.
    pub fn set_outside_probe(&self, probe: Option<OutsideProbe>) {
        self.shared.set_outside_probe(probe);
    }

    /// How many times the outside probe was read, and the time those reads
    /// took in all (on the reserving threads, and in `refresh_outside`):
    /// what the probe costs.
    pub fn outside_probe_reads(&self) -> (u64, Duration) {
        self.shared.probe_reads()
    }

    /// Reads the probe now, if one is installed, and returns the outside
    /// figure in force (for memory about to be used without a reservation:
    /// whether there is room for it).
    pub fn refresh_outside(&self) -> u64 {
        self.shared.refresh_outside()
    }

    /// The outside figure in force: what [`set_outside_bytes`](Self::set_outside_bytes)
    /// or the probe last set.
    pub fn outside_bytes(&self) -> u64 {
        self.shared.lock().outside
    }

    /// One round of rebalancing now: busy engines borrow the unused budget
    /// of idle ones, and lenders that got busy take it back (the rules are
    /// [`crate::lending`]'s; a lender that is refused a reservation takes
    /// its loans back at once, without waiting for a round). Call it on a
    /// timer (see [`spawn_rebalancer`](Self::spawn_rebalancer)); under the
    /// agent, the agent lends instead. Returns what changed.
    ///
    /// Taking a loan back takes no memory from anyone: the borrower keeps
    /// what it holds, its cap drops, and a
    /// [`SpillController`](crate::SpillController) run spills it down.
    pub fn rebalance(&self) -> Vec<LoanEvent<EngineId>> {
        self.rebalance_at(Instant::now())
    }

    /// [`rebalance`](Self::rebalance) as of `now` (for a caller that keeps
    /// its own clock, such as a simulation).
    pub fn rebalance_at(&self, now: Instant) -> Vec<LoanEvent<EngineId>> {
        let events = self.shared.with_ledger(|l| l.rebalance(now));
        if !events.is_empty() {
            self.shared.wake_waiters();
        }
        events
    }

    /// The rules lending goes by ([`LendingRules::default`] until set).
    pub fn lending_rules(&self) -> LendingRules {
        self.shared.with_ledger(|l| l.loans.rules())
    }

    /// Changes the rules lending goes by; refused whole, naming the field,
    /// if they are out of range. Loans in force stand and are judged by
    /// the new rules from the next round.
    pub fn set_lending_rules(&self, rules: LendingRules) -> Result<(), MemError> {
        rules
            .validate()
            .map_err(|(field, reason)| MemError::InvalidBudget {
                field: format!("lending.{field}"),
                reason,
            })?;
        self.shared.with_ledger(|l| l.loans.set_rules(rules));
        Ok(())
    }

    /// Marks `engine` as one whose spill is cheap (a buffer it must write
    /// anyway, a cache it can rebuild): once it has not grown for
    /// [`LendingRules::idle_spill_after`] while the governor is at the
    /// warning threshold of its ceiling, [`idle_spills`](Self::idle_spills)
    /// asks it to spill down to its floor (a
    /// [`SpillController::run`](crate::SpillController::run) does it), and
    /// the budget it frees is lent to busy engines. Idleness is judged by
    /// the rebalancing rounds, so it needs a rebalancer; under the agent,
    /// the agent asks instead (its engine setting `idle_spill`).
    pub fn set_idle_spill(&self, engine: EngineId, on: bool) -> Result<(), MemError> {
        let i = self.shared.slot(engine)?;
        self.shared.with_ledger(|l| l.loans.set_idle_spill(&i, on));
        Ok(())
    }

    /// The engines marked with [`set_idle_spill`](Self::set_idle_spill)
    /// that must spill now, and how much (what each holds beyond its
    /// floor); each is named once per idle spell (see
    /// [`LoanBook::idle_spills`](crate::lending::LoanBook::idle_spills)).
    pub fn idle_spills(&self) -> Vec<SpillAction> {
        self.idle_spills_at(Instant::now())
    }

    /// [`idle_spills`](Self::idle_spills) as of `now`.
    pub fn idle_spills_at(&self, now: Instant) -> Vec<SpillAction> {
        self.shared.with_ledger(|l| l.idle_spills(now))
    }

    /// The loans in force.
    pub fn loans(&self) -> Vec<Loan<EngineId>> {
        self.shared.with_ledger(|l| l.loans())
    }

    /// Runs [`rebalance`](Self::rebalance) every `interval` on a thread of
    /// its own until the returned handle is dropped (or the governor is).
    pub fn spawn_rebalancer(&self, interval: Duration) -> Rebalancer {
        Rebalancer::spawn(Arc::downgrade(&self.shared), interval)
    }
}
