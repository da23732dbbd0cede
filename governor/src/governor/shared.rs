//! What every handle of one governor shares, and the decisions they all
//! make through it: the ledger under its lock, the fast path's gate, the
//! pressure subscribers; reserving (from credit or exactly), giving back,
//! charging and waiting.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::{
    fast::{self, CreditSource, Gate},
    ledger::Ledger,
};
use crate::{
    budget::Budget,
    engine::EngineId,
    error::MemError,
    numa::Topology,
    pressure::{PressureChange, ThresholdsHandle},
    sync::{Condvar, Mutex, MutexGuard, StdMutex},
};

const NO_SLOT: usize = usize::MAX;

/// The probe is read at most this often (a read of a cgroup v1
/// `memory.stat` costs a few microseconds)...
const PROBE_EVERY: Duration = Duration::from_millis(1);
/// ... and at most 1% of one core: after a read that took `d`, the next
/// waits at least `d` times this. A read is not always a few microseconds:
/// cgroup v2's `memory.stat` flushes the memory controller's per-CPU
/// statistics first, and under emulation (TCG) a read takes about a
/// millisecond, where once a millisecond would be most of a core...
const PROBE_SPACING: u64 = 100;
/// ... but never waits longer than this: the wait is wall-clock time, and
/// one read held up (preempted, or throttled by the kernel above
/// `memory.high`) must not leave reservations near the ceiling without a
/// fresh figure for long.
const PROBE_LONGEST_WAIT: Duration = Duration::from_millis(100);

/// What the database holds outside the books, read fresh: given the books
/// and the ceiling, the figure for `MemoryGovernor::set_outside_bytes`, or
/// None when it cannot be read.
pub type OutsideProbe = Arc<dyn Fn(u64, u64) -> Option<u64> + Send + Sync>;

type Subscriber = Box<dyn Fn(PressureChange) + Send + Sync>;

/// Everything the governor owns; its handles and reservations hold it in
/// an `Arc`, and thread-local credit points back here (weakly).
pub(super) struct Shared {
    /// Tells governors apart in thread-local credit.
    id: u64,
    ledger: Mutex<Ledger>,
    released: Condvar,
    pub(super) thresholds: ThresholdsHandle,
    subscribers: Mutex<Vec<Subscriber>>,
    /// EngineId::index() -> ledger position, or NO_SLOT (fixed at creation,
    /// so the fast path reads it without the lock).
    slots: Vec<usize>,
    gate: Gate,
    /// The machine's nodes when the budget is split across them (more
    /// than one node), else None: every charge is on node 0.
    topology: Option<Topology>,
    /// Reads the outside figure itself when room runs short
    /// (`MemoryGovernor::set_outside_probe`); `probe_on` says there is one
    /// without taking a lock.
    outside_probe: StdMutex<Option<OutsideProbe>>,
    probe_on: AtomicBool,
    /// When it was last read, in nanoseconds since `born` (0: never).
    probed_at: AtomicU64,
    /// How long that read took, in nanoseconds (`PROBE_SPACING`): the
    /// file's cost, kept when the probe is installed again.
    probe_cost: AtomicU64,
    /// A read is under way: no other starts beside it.
    probe_busy: AtomicBool,
    /// Reads of the probe so far, and the nanoseconds they took in all.
    probe_reads: AtomicU64,
    probe_nanos: AtomicU64,
    /// A request up to this many bytes leaves at least a quarter of the
    /// ceiling as the ledger last stood (`Ledger::probe_slack`): the probe
    /// is not read for it, and the lock not taken to find out.
    slack: AtomicU64,
    born: Instant,
    /// Fault injection: refuse the reservation attempt this many attempts
    /// from now (0: off), and how many were refused so.
    #[cfg(feature = "fault-injection")]
    pub(super) fault: (AtomicU64, AtomicU64),
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("ledger", &*self.lock())
            .field("thresholds", &self.thresholds.get())
            .field("batch", &self.gate.batch())
            .finish()
    }
}

impl CreditSource for Shared {
    #[inline]
    fn id(&self) -> u64 {
        self.id
    }

    #[inline]
    fn batch(&self) -> u64 {
        self.gate.batch()
    }

    fn current_node(&self) -> usize {
        self.node()
    }

    fn draw_credit(&self, slot: usize, node: usize, bytes: u64) -> bool {
        self.probe_if_short(bytes);
        self.with_ledger_if(|l| {
            let drawn = l.draw(slot, node, bytes);
            (drawn, drawn)
        })
    }

    fn return_credit(&self, slot: usize, node: usize, bytes: u64) {
        self.release(slot, node, bytes);
    }
}

impl Shared {
    pub(super) fn new(budget: Budget, thresholds: ThresholdsHandle, batch_bytes: u64) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let max_index = budget
            .engines
            .iter()
            .map(|e| e.id.index())
            .max()
            .unwrap_or(0);
        let mut slots = vec![NO_SLOT; max_index + 1];
        for (i, e) in budget.engines.iter().enumerate() {
            slots[e.id.index()] = i;
        }
        let topology = budget
            .numa
            .as_ref()
            .map(|n| n.topology.clone())
            .filter(|t| t.nodes().len() > 1);
        let nodes = topology.as_ref().map_or(1, |t| t.nodes().len());
        let gate = Gate::new(budget.engines.len(), nodes, batch_bytes);
        let shared = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ledger: Mutex::new(Ledger::new(budget, &thresholds)),
            released: Condvar::new(),
            thresholds,
            subscribers: Mutex::new(Vec::new()),
            slots,
            gate,
            topology,
            outside_probe: StdMutex::new(None),
            probe_on: AtomicBool::new(false),
            probed_at: AtomicU64::new(0),
            probe_cost: AtomicU64::new(0),
            probe_busy: AtomicBool::new(false),
            probe_reads: AtomicU64::new(0),
            probe_nanos: AtomicU64::new(0),
            slack: AtomicU64::new(0),
            born: Instant::now(),
            #[cfg(feature = "fault-injection")]
            fault: Default::default(),
        };
        shared.with_ledger(|_| ());
        shared
    }

    #[inline]
    pub(super) fn slot(&self, engine: EngineId) -> Result<usize, MemError> {
        match self.slots.get(engine.index()) {
            Some(&s) if s != NO_SLOT => Ok(s),
            _ => Err(MemError::UnknownEngine { engine }),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Every mutation of the ledger is complete before any call that
        // could panic, so a poisoned lock still guards a consistent ledger.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the ledger, then tells subscribers about level changes
    /// (outside the lock, so they may call back into the governor).
    pub(super) fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        self.with_ledger_if(|l| (f(l), true))
    }

    /// [`with_ledger`](Self::with_ledger) for an `f` that says whether it
    /// changed what levels and the fast path's gates are made of (what an
    /// engine holds, its cap, the ceiling); when it did not, and the
    /// thresholds did not move either, they are left as they are (a
    /// refusal changes nothing but a counter, and costs no more).
    pub(super) fn with_ledger_if<R>(&self, f: impl FnOnce(&mut Ledger) -> (R, bool)) -> R {
        let mut changes = Vec::new();
        let r = {
            let mut ledger = self.lock();
            let (r, changed) = f(&mut ledger);
            if changed || !ledger.thresholds_current(&self.thresholds) {
                ledger.refresh_levels(&self.thresholds, &mut changes);
                self.gate.refresh(&ledger);
                self.slack.store(ledger.probe_slack(), Ordering::Relaxed);
            }
            r
        };
        if !changes.is_empty() {
            let subs = self.subscribers.lock().unwrap_or_else(|p| p.into_inner());
            for c in changes {
                for s in subs.iter() {
                    s(c);
                }
            }
        }
        r
    }

    pub(super) fn subscribe(&self, f: Subscriber) {
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(f);
    }

    /// The node (position) the calling thread runs on; 0 without NUMA.
    #[inline]
    pub(super) fn node(&self) -> usize {
        self.topology.as_ref().map_or(0, Topology::current_node)
    }

    /// NUMA nodes in the books (1 without NUMA).
    pub(super) fn nodes(&self) -> usize {
        self.topology.as_ref().map_or(1, |t| t.nodes().len())
    }

    /// The kernel id of node position `node`.
    pub(super) fn node_id(&self, node: usize) -> u32 {
        self.topology.as_ref().map_or(0, |t| t.nodes()[node].id)
    }

    /// Counts bytes that cannot be refused (see `MemoryGovernor::charge`),
    /// on the calling thread's node; returns the node.
    pub(super) fn charge(&self, slot: usize, bytes: u64) -> Result<usize, MemError> {
        let node = self.node();
        self.with_ledger(|l| l.charge(slot, node, bytes))?;
        Ok(node)
    }

    #[inline(never)]
    fn release(&self, slot: usize, node: usize, bytes: u64) {
        if bytes == 0 {
            return;
        }
        self.release_by(|l| l.release(slot, node, bytes));
    }

    /// Gives memory back to the ledger with `f`, then wakes the threads
    /// waiting in `reserve_timeout`, if any.
    fn release_by(&self, f: impl FnOnce(&mut Ledger)) {
        let waiters = self.with_ledger(|l| {
            f(l);
            l.waiters > 0
        });
        if waiters {
            self.released.notify_all();
        }
    }

    /// Wakes the threads waiting in `reserve_timeout`, if any: a cap or the
    /// ceiling moved (a raise can admit them as a release would).
    pub(super) fn wake_waiters(&self) {
        if self.with_ledger(|l| l.waiters > 0) {
            self.released.notify_all();
        }
    }

    /// Takes `bytes` for `slot`: from this thread's credit while the engine
    /// is far from its limits, else exactly under the lock. Returns the
    /// node (position) charged.
    #[inline]
    pub(super) fn reserve(self: &Arc<Self>, slot: usize, bytes: u64) -> Result<usize, MemError> {
        #[cfg(feature = "fault-injection")]
        self.injected_refusal(slot, bytes)?;
        if self.gate.is_open(slot)
            && let Some(node) = fast::take(self, slot, bytes)
        {
            return Ok(node);
        }
        self.reserve_exact(slot, bytes)
    }

    /// Takes `bytes` for `slot` under the lock.
    #[inline(never)]
    fn reserve_exact(&self, slot: usize, bytes: u64) -> Result<usize, MemError> {
        // Exact: this thread's credit (for every engine of this governor)
        // goes back first, so its own slack never decides its refusal.
        self.flush_credit(None);
        self.probe_if_short(bytes);
        let node = self.node();
        self.with_ledger_if(|l| {
            let moves_caps = l.refusal_moves_caps(slot);
            let r = l.admit(slot, node, bytes);
            let changed = r.is_ok() || moves_caps;
            (r, changed)
        })
    }

    /// Installs (or with None removes) the probe; a figure set by the
    /// caller or read before no longer lands. When the last read was, and
    /// what it cost, carry over: the link installs the probe again with
    /// every figure the agent sends (as often as every tick), and reading
    /// at once each time would undo the spacing.
    pub(super) fn set_outside_probe(&self, probe: Option<OutsideProbe>) {
        let on = probe.is_some();
        *self.outside_probe.lock().unwrap_or_else(|p| p.into_inner()) = probe;
        self.probe_on.store(on, Ordering::Release);
        self.lock().outside_epoch += 1;
    }

    /// Sets the outside figure, and no reading of the probe under way
    /// lands over it.
    pub(super) fn set_outside(&self, bytes: u64) {
        self.with_ledger(|l| {
            l.outside = bytes;
            l.outside_epoch += 1;
        });
        // Less outside is more room, as a release would give.
        self.wake_waiters();
    }

    /// Before a decision for `bytes` under the lock: when a probe is
    /// installed, the room left after them (the ceiling less the books and
    /// what is held outside them) would be under a quarter of the ceiling,
    /// no read is under way, and the last one started more than the
    /// spacing ago (a millisecond, or a hundred times what it took, up to
    /// 100 ms), reads it. The
    /// figure the agent sends follows the kernel at its own pace (a tick, a
    /// report interval, a step of the ceiling), and memory moving from the
    /// books to somewhere else the kernel cannot drop (a spill written to a
    /// tmpfs), or touched without reserving, would be admitted against a
    /// view tens of MiB behind the kernel.
    fn probe_if_short(&self, bytes: u64) {
        if !self.probe_on.load(Ordering::Acquire) || bytes <= self.slack.load(Ordering::Relaxed) {
            return;
        }
        // Once a millisecond, and at most 1% of a core, by whichever
        // thread wins the exchange, one read at a time.
        if self.probe_busy.load(Ordering::Acquire) {
            return;
        }
        let now = self.nanos();
        let last = self.probed_at.load(Ordering::Relaxed);
        let every = self
            .probe_cost
            .load(Ordering::Relaxed)
            .saturating_mul(PROBE_SPACING)
            .clamp(
                PROBE_EVERY.as_nanos() as u64,
                PROBE_LONGEST_WAIT.as_nanos() as u64,
            );
        if last != 0 && now.saturating_sub(last) < every
            || self
                .probed_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
            || self.probe_busy.swap(true, Ordering::Acquire)
        {
            return;
        }
        // Cleared however the read ends (a probe may panic).
        struct Busy<'a>(&'a AtomicBool);
        impl Drop for Busy<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _busy = Busy(&self.probe_busy);
        self.read_probe();
    }

    /// Reads of the probe so far, and the time they took in all.
    pub(super) fn probe_reads(&self) -> (u64, Duration) {
        (
            self.probe_reads.load(Ordering::Relaxed),
            Duration::from_nanos(self.probe_nanos.load(Ordering::Relaxed)),
        )
    }

    /// Reads the probe now (if installed); the outside figure in force.
    pub(super) fn refresh_outside(&self) -> u64 {
        if self.probe_on.load(Ordering::Acquire) {
            self.probed_at.store(self.nanos(), Ordering::Relaxed);
            self.read_probe();
        }
        self.lock().outside
    }

    /// Nanoseconds since the governor was made (never 0: 0 is "never").
    fn nanos(&self) -> u64 {
        (self.born.elapsed().as_nanos() as u64).max(1)
    }

    /// Calls the probe outside every lock, with the books and the ceiling
    /// of the moment, and applies its figure unless another was set
    /// meanwhile; remembers how long the call took.
    fn read_probe(&self) {
        let (epoch, books, ceiling) = {
            let l = self.lock();
            (l.outside_epoch, l.total, l.ceiling)
        };
        let probe = self
            .outside_probe
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let started = Instant::now();
        let read = probe.as_ref().and_then(|f| f(books, ceiling));
        if probe.is_some() {
            let took = started.elapsed().as_nanos() as u64;
            self.probe_cost.store(took, Ordering::Relaxed);
            self.probe_reads.fetch_add(1, Ordering::Relaxed);
            self.probe_nanos.fetch_add(took, Ordering::Relaxed);
        }
        let Some(bytes) = read else {
            return;
        };
        let less = self.with_ledger(|l| {
            if l.outside_epoch != epoch || l.outside == bytes {
                return false;
            }
            let less = bytes < l.outside;
            l.outside = bytes;
            less
        });
        if less {
            self.wake_waiters();
        }
    }

    /// Returns this thread's credit for `slot` (every engine when None).
    pub(super) fn flush_credit(&self, slot: Option<usize>) {
        fast::flush(self, slot);
    }

    /// Takes `bytes` for `slot` under the lock, waiting up to `timeout` for
    /// releases while the request could fit later.
    pub(super) fn reserve_waiting(
        &self,
        slot: usize,
        bytes: u64,
        timeout: Duration,
    ) -> Result<usize, MemError> {
        let start = Instant::now();
        self.flush_credit(Some(slot));
        self.probe_if_short(bytes);
        let node = self.node();
        let mut ledger = self.lock();
        let result = loop {
            match ledger.admit(slot, node, bytes) {
                Ok(m) => break Ok(m),
                Err(MemError::GlobalCeilingExceeded { .. }) => {}
                // A node's share or part of the ceiling that could hold the
                // request once others release.
                Err(
                    MemError::NodeCeilingExceeded { limit, .. }
                    | MemError::NodeBudgetExceeded { limit, .. },
                ) if bytes <= limit => {}
                Err(MemError::BudgetExceeded { .. }) if bytes <= ledger.engines[slot].cap => {}
                Err(e) => break Err(e),
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break Err(MemError::Timeout {
                    engine: String::from(&*ledger.engines[slot].name),
                    requested: bytes,
                    waited_ms: start.elapsed().as_millis() as u64,
                    holders: ledger.holders(),
                });
            }
            ledger.waiters += 1;
            ledger = self
                .released
                .wait_timeout(ledger, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            ledger.waiters -= 1;
        };
        drop(ledger);
        // Levels, the fast path's gates and subscribers, as after every
        // other change: a refusal may have ended loans and moved caps.
        self.with_ledger(|_| ());
        result
    }

    /// Counts down to the injected refusal; refuses like a full pool would.
    #[cfg(feature = "fault-injection")]
    fn injected_refusal(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        let hit = self
            .fault
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok_and(|before| before == 1);
        if !hit {
            return Ok(());
        }
        self.fault.1.fetch_add(1, Ordering::Relaxed);
        let l = self.lock();
        Err(MemError::GlobalCeilingExceeded {
            engine: String::from(&*l.engines[slot].name),
            requested: bytes,
            available: 0,
            limit: l.ceiling,
            holders: l.holders(),
        })
    }

    /// Gives `bytes` of `slot` charged to `node` back: small releases into
    /// this thread's credit while the engine is fast (the next small
    /// reservation reuses them), everything else to the ledger.
    #[inline]
    pub(super) fn give_back(self: &Arc<Self>, slot: usize, node: usize, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if bytes <= self.gate.batch() && self.gate.is_open(slot) {
            fast::put(self, slot, node, bytes);
        } else {
            self.release(slot, node, bytes);
        }
    }

    /// Gives `bytes` of `slot` back whose node is not known: off the
    /// calling thread's node first, then the engine's others (see
    /// `Ledger::release`); on one node, as `give_back`.
    #[cfg(feature = "datafusion")]
    pub(super) fn give_back_any(self: &Arc<Self>, slot: usize, bytes: u64) {
        if self.topology.is_none() {
            return self.give_back(slot, 0, bytes);
        }
        if bytes == 0 {
            return;
        }
        let node = self.node();
        self.release_by(|l| l.release(slot, node, bytes));
    }

    /// The engine's name in the ledger, for errors.
    pub(super) fn name(&self, slot: usize) -> String {
        String::from(&*self.lock().engines[slot].name)
    }
}
