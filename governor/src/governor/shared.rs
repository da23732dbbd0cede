//! What every handle of one governor shares, and the decisions they all
//! make through it: the ledger under its lock, the fast path's gate, the
//! pressure subscribers; reserving (from credit or exactly), giving back,
//! charging and waiting.

use std::{
    sync::{Arc, atomic::Ordering},
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
    pressure::{PressureChange, ThresholdsHandle},
    sync::{Condvar, Mutex, MutexGuard},
};

const NO_SLOT: usize = usize::MAX;

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
    /// Fault injection: refuse the reservation attempt this many attempts
    /// from now (0: off), and how many were refused so.
    #[cfg(feature = "fault-injection")]
    pub(super) fault: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
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

    fn draw_credit(&self, slot: usize, bytes: u64) -> bool {
        self.with_ledger(|l| l.admit_as(slot, bytes, false).is_ok())
    }

    fn return_credit(&self, slot: usize, bytes: u64) {
        self.release(slot, bytes);
    }
}

impl Shared {
    pub(super) fn new(budget: Budget, thresholds: ThresholdsHandle, batch_bytes: u64) -> Self {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
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
        let gate = Gate::new(budget.engines.len(), batch_bytes);
        let shared = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ledger: Mutex::new(Ledger::new(budget, &thresholds)),
            released: Condvar::new(),
            thresholds,
            subscribers: Mutex::new(Vec::new()),
            slots,
            gate,
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
        let mut changes = Vec::new();
        let r = {
            let mut ledger = self.lock();
            let r = f(&mut ledger);
            ledger.refresh_levels(&self.thresholds, &mut changes);
            self.gate.refresh(&ledger);
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

    /// Counts bytes that cannot be refused (see `MemoryGovernor::charge`).
    pub(super) fn charge(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        self.with_ledger(|l| l.charge(slot, bytes))
    }

    #[inline(never)]
    fn release(&self, slot: usize, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let waiters = self.with_ledger(|l| {
            l.release(slot, bytes);
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
    /// is far from its limits, else exactly under the lock.
    #[inline]
    pub(super) fn reserve(self: &Arc<Self>, slot: usize, bytes: u64) -> Result<(), MemError> {
        #[cfg(feature = "fault-injection")]
        self.injected_refusal(slot, bytes)?;
        if self.gate.is_open(slot) && fast::take(self, slot, bytes) {
            return Ok(());
        }
        self.reserve_exact(slot, bytes)
    }

    /// Takes `bytes` for `slot` under the lock.
    #[inline(never)]
    fn reserve_exact(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        // Exact: this thread's credit (for every engine of this governor)
        // goes back first, so its own slack never decides its refusal.
        self.flush_credit(None);
        self.with_ledger(|l| l.admit(slot, bytes))
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
    ) -> Result<(), MemError> {
        let start = Instant::now();
        self.flush_credit(Some(slot));
        let mut ledger = self.lock();
        let result = loop {
            match ledger.admit(slot, bytes) {
                Ok(()) => break Ok(()),
                Err(MemError::GlobalCeilingExceeded { .. }) => {}
                Err(MemError::BudgetExceeded { .. }) if bytes <= ledger.engines[slot].cap => {}
                Err(e) => break Err(e),
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                break Err(MemError::Timeout {
                    engine: ledger.engines[slot].name.to_string(),
                    requested: bytes,
                    waited_ms: start.elapsed().as_millis() as u64,
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
            engine: l.engines[slot].name.to_string(),
            requested: bytes,
            available: 0,
            limit: l.ceiling,
        })
    }

    /// Gives `bytes` of `slot` back: small releases into this thread's
    /// credit while the engine is fast (the next small reservation reuses
    /// them), everything else to the ledger.
    #[inline]
    pub(super) fn give_back(self: &Arc<Self>, slot: usize, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if bytes <= self.gate.batch() && self.gate.is_open(slot) {
            fast::put(self, slot, bytes);
        } else {
            self.release(slot, bytes);
        }
    }

    /// The engine's name in the ledger, for errors.
    pub(super) fn name(&self, slot: usize) -> String {
        self.lock().engines[slot].name.to_string()
    }
}
