//! The reservation core: a ledger of what each engine holds, kept exact
//! under one lock, and the [`Reservation`] guard that gives memory back when
//! it is dropped.
//!
//! # Admission
//! A request of `n` bytes for engine `e` is admitted when both hold:
//! * `used(e) + n <= cap(e)`: the engine's own cap;
//! * `n <= ceiling - total - protected(others)`, where `protected(x) =
//!   floor(x) - used(x) - lent(x)` (never negative): the part of another
//!   engine's floor it is not using and has not lent stays free for it.
//!
//! Everything above the floors is therefore a shared pool; an idle engine
//! can lend its unused floor (`lend`), and takes the loan back the moment
//! one of its own requests is refused. Refusals are deterministic: the same
//! ledger and request always give the same answer, at once, with the
//! numbers. The counters are checked arithmetic: a request that would
//! overflow is refused, never wrapped.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    Budget, EngineId, MemError, credit,
    pressure::{PressureChange, PressureLevel, PressureThresholds, ThresholdsHandle},
    sync::{Condvar, Mutex, MutexGuard, StdCondvar, StdMutex},
};

const NO_SLOT: usize = usize::MAX;

#[derive(Debug)]
struct EngineLedger {
    id: EngineId,
    name: Arc<str>,
    floor: u64,
    cap: u64,
    used: u64,
    lent: u64,
    peak: u64,
    rejections: u64,
    level: PressureLevel,
    /// Ledger calls for the engine (admissions, refusals, credit draws,
    /// charges): `rebalance` calls an engine idle when this stands still.
    activity: u64,
    /// The activity count at the last `rebalance`, and how many rounds in
    /// a row it had not moved.
    activity_seen: u64,
    quiet_rounds: u32,
}

impl EngineLedger {
    fn protected(&self) -> u64 {
        self.floor
            .saturating_sub(self.used.saturating_add(self.lent))
    }
}

#[derive(Debug)]
struct Ledger {
    ceiling: u64,
    total: u64,
    /// Sum of every engine's `protected()`, kept up to date on each change.
    protected_total: u64,
    engines: Vec<EngineLedger>,
    level: PressureLevel,
    /// The thresholds in force and the handle version they came from.
    thresholds: PressureThresholds,
    thresholds_version: u64,
    /// Threads in `reserve_timeout`: releases wake them only if there are
    /// any (a futex wake is a system call).
    waiters: usize,
}

/// A snapshot of one engine's accounting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineUsage {
    pub engine: EngineId,
    pub name: Arc<str>,
    pub used_bytes: u64,
    pub floor_bytes: u64,
    pub cap_bytes: u64,
    pub lent_bytes: u64,
    pub peak_bytes: u64,
    pub rejections: u64,
    pub level: PressureLevel,
}

type Subscriber = Box<dyn Fn(PressureChange) + Send + Sync>;

/// Per-engine budgets under a global ceiling. See the crate documentation
/// for the protocol. Cloning gives another handle to the same governor.
#[derive(Clone)]
pub struct MemoryGovernor {
    shared: Arc<Shared>,
}

/// Everything the governor owns; thread-local credit points back here.
pub(crate) struct Shared {
    /// Tells governors apart in thread-local credit.
    pub(crate) id: u64,
    ledger: Mutex<Ledger>,
    released: Condvar,
    thresholds: ThresholdsHandle,
    subscribers: Mutex<Vec<Subscriber>>,
    /// EngineId::index() -> ledger position, or NO_SLOT (fixed at creation,
    /// so the fast path reads it without the lock).
    slots: Vec<usize>,
    /// Per ledger position: true while the engine is far enough from its
    /// limits for threads to reserve from batched credit.
    fast: Vec<AtomicBool>,
    /// Credit is drawn from the ledger this many bytes at a time.
    pub(crate) batch: u64,
    /// Fast mode needs this much headroom: 2 x cores x batch.
    fast_headroom: u64,
    /// Fault injection: refuse the reservation attempt this many attempts
    /// from now (0: off), and how many were refused so.
    #[cfg(feature = "fault-injection")]
    fault: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
}

impl std::fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("ledger", &*self.shared.lock())
            .field("thresholds", &self.shared.thresholds.get())
            .field("batch", &self.shared.batch)
            .finish()
    }
}

/// Default credit batch.
pub const DEFAULT_BATCH_BYTES: u64 = 1 << 20;

impl Ledger {
    /// Applies `f` to engine `i`, keeping `protected_total` in step.
    fn update<R>(&mut self, i: usize, f: impl FnOnce(&mut EngineLedger) -> R) -> R {
        let before = self.engines[i].protected();
        let r = f(&mut self.engines[i]);
        let after = self.engines[i].protected();
        self.protected_total = self.protected_total - before + after;
        r
    }

    fn admit(&mut self, i: usize, n: u64) -> Result<(), MemError> {
        self.admit_as(i, n, true)
    }

    /// Admission; `counted` is false for credit draws, which are not the
    /// caller's request and so neither count as refusals nor end loans.
    fn admit_as(&mut self, i: usize, n: u64, counted: bool) -> Result<(), MemError> {
        self.engines[i].activity += 1;
        let e = &self.engines[i];
        let name = || e.name.to_string();
        let new_used = e
            .used
            .checked_add(n)
            .ok_or_else(|| MemError::SizeOverflow {
                engine: name(),
                requested: n,
                current: e.used,
            })?;
        let others = self.protected_total - e.protected();
        let global_free = self
            .ceiling
            .saturating_sub(self.total)
            .saturating_sub(others);
        // A zero-byte request is a probe: it fails once the engine or the
        // pool is exhausted, like any request would.
        let need = n.max(1);
        let refusal = if e.used.saturating_add(need) > e.cap || new_used > e.cap {
            Some(MemError::BudgetExceeded {
                engine: name(),
                requested: n,
                available: e.cap.saturating_sub(e.used),
                limit: e.cap,
            })
        } else if need > global_free {
            Some(MemError::GlobalCeilingExceeded {
                engine: name(),
                requested: n,
                available: global_free,
                limit: self.ceiling,
            })
        } else {
            None
        };
        if let Some(err) = refusal {
            if !counted {
                return Err(err);
            }
            self.update(i, |e| {
                e.rejections += 1;
                // A lender refused for want of memory takes its loan back;
                // borrowers will have to give way.
                if e.used < e.floor {
                    e.lent = 0;
                }
            });
            return Err(err);
        }
        self.add(i, n);
        Ok(())
    }

    fn add(&mut self, i: usize, n: u64) {
        self.update(i, |e| {
            e.used += n;
            e.peak = e.peak.max(e.used);
        });
        self.total += n;
    }

    fn release(&mut self, i: usize, n: u64) {
        // A guard never holds more than was added for it.
        debug_assert!(self.engines[i].used >= n && self.total >= n);
        self.update(i, |e| e.used -= n);
        self.total -= n;
    }

    /// Recomputes levels; returns the changes.
    fn levels(&mut self, t: &PressureThresholds, out: &mut Vec<PressureChange>) {
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

    /// Bytes the engine could still take: the smaller of its cap room and
    /// the pool room left for it.
    fn headroom(&self, i: usize) -> u64 {
        let e = &self.engines[i];
        let others = self.protected_total - e.protected();
        let global_free = self
            .ceiling
            .saturating_sub(self.total)
            .saturating_sub(others);
        e.cap.saturating_sub(e.used).min(global_free)
    }

    fn usage(&self, i: usize) -> EngineUsage {
        let e = &self.engines[i];
        EngineUsage {
            engine: e.id,
            name: e.name.clone(),
            used_bytes: e.used,
            floor_bytes: e.floor,
            cap_bytes: e.cap,
            lent_bytes: e.lent,
            peak_bytes: e.peak,
            rejections: e.rejections,
            level: e.level,
        }
    }
}

impl Shared {
    #[inline]
    fn slot(&self, engine: EngineId) -> Result<usize, MemError> {
        match self.slots.get(engine.index()) {
            Some(&s) if s != NO_SLOT => Ok(s),
            _ => Err(MemError::UnknownEngine { engine }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // Every mutation of the ledger is complete before any call that
        // could panic, so a poisoned lock still guards a consistent ledger.
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the ledger, then tells subscribers about level changes
    /// (outside the lock, so they may call back into the governor).
    fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        let mut changes = Vec::new();
        let r = {
            let mut ledger = self.lock();
            let r = f(&mut ledger);
            let version = self.thresholds.version();
            if version != ledger.thresholds_version {
                ledger.thresholds = self.thresholds.get();
                ledger.thresholds_version = version;
            }
            let thresholds = ledger.thresholds;
            ledger.levels(&thresholds, &mut changes);
            self.refresh_fast(&ledger);
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

    /// Engines far from their limits take credit; the others go exact.
    fn refresh_fast(&self, ledger: &Ledger) {
        for (i, flag) in self.fast.iter().enumerate() {
            let fast = self.batch > 0 && ledger.headroom(i) >= self.fast_headroom;
            // Write only on change: the flag's cache line is read by every
            // reservation on every core.
            if flag.load(Ordering::Relaxed) != fast {
                flag.store(fast, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    pub(crate) fn is_fast(&self, slot: usize) -> bool {
        self.fast[slot].load(Ordering::Relaxed)
    }

    /// Draws `bytes` of credit for engine `slot`, if it fits.
    pub(crate) fn draw_credit(&self, slot: usize, bytes: u64) -> bool {
        self.with_ledger(|l| l.admit_as(slot, bytes, false).is_ok())
    }

    /// Counts bytes that cannot be refused (see `MemoryGovernor::charge`).
    pub(crate) fn charge_slot(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        self.with_ledger(|l| {
            let e = &l.engines[slot];
            if e.used
                .checked_add(bytes)
                .and(l.total.checked_add(bytes))
                .is_none()
            {
                return Err(MemError::SizeOverflow {
                    engine: e.name.to_string(),
                    requested: bytes,
                    current: e.used,
                });
            }
            l.engines[slot].activity += 1;
            l.add(slot, bytes);
            Ok(())
        })
    }

    /// Gives unused credit back.
    pub(crate) fn return_credit(&self, slot: usize, bytes: u64) {
        self.release(slot, bytes);
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

    /// Takes `bytes` for `slot`: from this thread's credit while the engine
    /// is far from its limits, else exactly under the lock.
    #[inline]
    fn reserve(self: &Arc<Self>, slot: usize, bytes: u64) -> Result<(), MemError> {
        #[cfg(feature = "fault-injection")]
        self.injected_refusal(slot, bytes)?;
        if self.is_fast(slot) && credit::take(self, slot, bytes) {
            return Ok(());
        }
        self.reserve_exact(slot, bytes)
    }

    /// Takes `bytes` for `slot` under the lock.
    #[inline(never)]
    fn reserve_exact(self: &Arc<Self>, slot: usize, bytes: u64) -> Result<(), MemError> {
        // Exact: this thread's credit (for every engine of this governor)
        // goes back first, so its own slack never decides its refusal.
        credit::flush(self);
        self.with_ledger(|l| l.admit(slot, bytes))
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
    fn give_back(self: &Arc<Self>, slot: usize, bytes: u64) {
        if bytes == 0 {
            return;
        }
        if bytes <= self.batch && self.is_fast(slot) {
            credit::put(self, slot, bytes);
        } else {
            self.release(slot, bytes);
        }
    }
}

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
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let max_index = budget
            .engines
            .iter()
            .map(|e| e.id.index())
            .max()
            .unwrap_or(0);
        let mut slots = vec![NO_SLOT; max_index + 1];
        let engines: Vec<EngineLedger> = budget
            .engines
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                slots[e.id.index()] = i;
                EngineLedger {
                    id: e.id,
                    name: e.name,
                    floor: e.floor_bytes,
                    cap: e.cap_bytes,
                    used: 0,
                    lent: 0,
                    peak: 0,
                    rejections: 0,
                    level: PressureLevel::Normal,
                    activity: 0,
                    activity_seen: 0,
                    quiet_rounds: 0,
                }
            })
            .collect();
        let protected_total = engines.iter().map(EngineLedger::protected).sum();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        // Loom checks the exact core; the fast path is thread-local.
        // Batches are capped at 1 TiB so credit arithmetic never nears u64::MAX.
        let batch = if cfg!(nodedb_loom) {
            0
        } else {
            batch_bytes.min(1 << 40)
        };
        let fast = engines.iter().map(|_| AtomicBool::new(false)).collect();
        let shared = Shared {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            ledger: Mutex::new(Ledger {
                ceiling: budget.ceiling_bytes,
                total: 0,
                protected_total,
                engines,
                level: PressureLevel::Normal,
                thresholds: thresholds.get(),
                thresholds_version: thresholds.version(),
                waiters: 0,
            }),
            released: Condvar::new(),
            thresholds,
            subscribers: Mutex::new(Vec::new()),
            slots,
            fast,
            batch,
            fast_headroom: batch.saturating_mul(2 * cores),
            #[cfg(feature = "fault-injection")]
            fault: Default::default(),
        };
        shared.with_ledger(|_| ());
        Self {
            shared: Arc::new(shared),
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
        self.shared.reserve(slot, bytes)
    }

    #[cfg(feature = "datafusion")]
    /// Gives back what `reserve_slot` or `charge_slot` took.
    pub(crate) fn release_slot(&self, slot: usize, bytes: u64) {
        self.shared.give_back(slot, bytes);
    }

    #[cfg(feature = "datafusion")]
    pub(crate) fn charge_slot(&self, slot: usize, bytes: u64) -> Result<(), MemError> {
        self.shared.charge_slot(slot, bytes)
    }

    /// Fault injection: the `n`th reservation attempt from now (`try_reserve`
    /// or `try_grow`, counting from 1) is refused as if the pool were full.
    /// 0 turns it off.
    #[cfg(feature = "fault-injection")]
    pub fn refuse_nth_reservation(&self, n: u64) {
        self.shared.fault.0.store(n, Ordering::Release);
    }

    /// Fault injection: how many reservations were refused by injection.
    #[cfg(feature = "fault-injection")]
    pub fn injected_refusals(&self) -> u64 {
        self.shared.fault.1.load(Ordering::Relaxed)
    }

    /// Returns the calling thread's unused credit for this governor to the
    /// ledger (threads also do this when they exit).
    pub fn flush_thread_credit(&self) {
        credit::flush(&self.shared);
    }

    /// Reserves `bytes` for `engine`, or refuses at once.
    #[inline]
    pub fn try_reserve(&self, engine: EngineId, bytes: u64) -> Result<Reservation<'_>, MemError> {
        let slot = self.slot(engine)?;
        self.shared.reserve(slot, bytes)?;
        Ok(Reservation {
            gov: self,
            slot,
            engine,
            bytes,
        })
    }

    /// Like [`try_reserve`](Self::try_reserve), but waits up to `timeout`
    /// for other reservations to be released (backpressure). A request that
    /// could never fit (above the engine's cap) is refused at once.
    pub fn reserve_timeout(
        &self,
        engine: EngineId,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Reservation<'_>, MemError> {
        let start = Instant::now();
        let slot = self.slot(engine)?;
        credit::flush_slot(&self.shared, slot);
        let mut ledger = self.shared.lock();
        loop {
            match ledger.admit(slot, bytes) {
                Ok(()) => break,
                Err(MemError::GlobalCeilingExceeded { .. }) => {}
                Err(MemError::BudgetExceeded { .. }) if bytes <= ledger.engines[slot].cap => {}
                Err(e) => return Err(e),
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(MemError::Timeout {
                    engine: ledger.engines[slot].name.to_string(),
                    requested: bytes,
                    waited_ms: start.elapsed().as_millis() as u64,
                });
            }
            ledger.waiters += 1;
            ledger = self
                .shared
                .released
                .wait_timeout(ledger, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
            ledger.waiters -= 1;
        }
        drop(ledger);
        // Levels and subscribers, as every other change.
        self.shared.with_ledger(|_| ());
        Ok(Reservation {
            gov: self,
            slot,
            engine,
            bytes,
        })
    }

    /// Counts `bytes` that cannot be refused (memory already allocated
    /// elsewhere, a page the kernel faulted in). It may take the engine
    /// above its cap and the total above the ceiling; pressure then says so.
    pub fn charge(&self, engine: EngineId, bytes: u64) -> Result<Reservation<'_>, MemError> {
        let slot = self.slot(engine)?;
        self.shared.charge_slot(slot, bytes)?;
        Ok(Reservation {
            gov: self,
            slot,
            engine,
            bytes,
        })
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
        self.shared
            .subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Box::new(f));
    }

    /// Changes an engine's floor and cap (rebalancing). Refused whole if it
    /// would break an invariant: the cap may not drop below what the engine
    /// holds (ask it to spill first), floors may not add up past the
    /// ceiling.
    pub fn set_limits(
        &self,
        engine: EngineId,
        floor_bytes: u64,
        cap_bytes: u64,
    ) -> Result<(), MemError> {
        let i = self.slot(engine)?;
        credit::flush_slot(&self.shared, i);
        self.shared.with_ledger(|l| {
            let e = &l.engines[i];
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
            if cap_bytes > l.ceiling {
                return Err(bad(
                    "cap_bytes",
                    format!("{cap_bytes} is above the ceiling {}", l.ceiling),
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
            let floors: u64 =
                l.engines.iter().map(|x| x.floor).sum::<u64>() - e.floor + floor_bytes;
            if floors > l.ceiling {
                return Err(bad(
                    "floor_bytes",
                    format!(
                        "floors would add up to {floors}, above the ceiling {}",
                        l.ceiling
                    ),
                ));
            }
            l.update(i, |e| {
                e.floor = floor_bytes;
                e.cap = cap_bytes;
                e.lent = e.lent.min(floor_bytes);
            });
            Ok(())
        })
    }

    /// Changes the global ceiling; refused if it is below what is held, a
    /// cap, or the sum of floors.
    pub fn set_ceiling(&self, ceiling_bytes: u64) -> Result<(), MemError> {
        credit::flush(&self.shared);
        self.shared.with_ledger(|l| {
            let bad = |reason: String| MemError::InvalidBudget {
                field: "ceiling_bytes".into(),
                reason,
            };
            let floors: u64 = l.engines.iter().map(|e| e.floor).sum();
            let max_cap = l.engines.iter().map(|e| e.cap).max().unwrap_or(0);
            if ceiling_bytes < l.total {
                return Err(bad(format!(
                    "{ceiling_bytes} is below the {} bytes held",
                    l.total
                )));
            }
            if ceiling_bytes < max_cap || ceiling_bytes < floors {
                return Err(bad(format!(
                    "{ceiling_bytes} is below a cap ({max_cap}) or the floors ({floors})"
                )));
            }
            l.ceiling = ceiling_bytes;
            Ok(())
        })
    }

    /// Lets other engines use up to `bytes` of `engine`'s unused floor (an
    /// idle engine lends). The loan ends when the engine is next refused,
    /// or by lending 0.
    pub fn lend(&self, engine: EngineId, bytes: u64) -> Result<(), MemError> {
        let i = self.slot(engine)?;
        self.shared
            .with_ledger(|l| l.update(i, |e| e.lent = bytes.min(e.floor)));
        Ok(())
    }

    /// One round of automatic rebalancing: an engine that asked the
    /// governor for nothing (no reservation, refusal, credit draw or
    /// charge) for `idle_rounds` rounds in a row lends its whole unused
    /// floor to the shared pool; an engine that was active takes its loan
    /// back. Call it on a timer (see [`spawn_rebalancer`](Self::spawn_rebalancer)),
    /// or let the agent drive it. Returns the loans that changed.
    ///
    /// Taking a loan back never takes memory from anyone: borrowers keep
    /// what they hold, new requests see the floor protected again, and a
    /// [`SpillController`](crate::SpillController) run asks borrowers to
    /// spill until the floor is really free.
    pub fn rebalance(&self, idle_rounds: u32) -> Vec<LoanChange> {
        let idle_rounds = idle_rounds.max(1);
        self.shared.with_ledger(|l| {
            let mut changes = Vec::new();
            for i in 0..l.engines.len() {
                let e = &mut l.engines[i];
                if e.activity == e.activity_seen {
                    e.quiet_rounds = e.quiet_rounds.saturating_add(1);
                } else {
                    e.quiet_rounds = 0;
                    e.activity_seen = e.activity;
                }
                let lend = if e.quiet_rounds >= idle_rounds {
                    e.floor.saturating_sub(e.used)
                } else {
                    0
                };
                if lend != e.lent {
                    changes.push(LoanChange {
                        engine: e.id,
                        from: e.lent,
                        to: lend,
                    });
                    l.update(i, |e| e.lent = lend);
                }
            }
            changes
        })
    }

    /// Runs [`rebalance`](Self::rebalance) every `interval` on a thread of
    /// its own until the returned handle is dropped (or the governor is).
    pub fn spawn_rebalancer(&self, interval: Duration, idle_rounds: u32) -> Rebalancer {
        let weak = Arc::downgrade(&self.shared);
        let stop = Arc::new((StdMutex::new(false), StdCondvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nodedb-rebalance".into())
            .spawn(move || {
                let (lock, cv) = &*signal;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    stopped = cv
                        .wait_timeout(stopped, interval)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    if *stopped {
                        return;
                    }
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    MemoryGovernor { shared }.rebalance(idle_rounds);
                }
            })
            .ok();
        Rebalancer { stop, thread }
    }
}

/// A change of an engine's loan to the shared pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoanChange {
    pub engine: EngineId,
    pub from: u64,
    pub to: u64,
}

/// The thread started by [`MemoryGovernor::spawn_rebalancer`]; dropping it
/// stops the thread and waits for it.
pub struct Rebalancer {
    stop: Arc<(StdMutex<bool>, StdCondvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rebalancer {
    /// False if the thread could not be started.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Rebalancer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Memory reserved for one engine. Dropping it (or [`free`](Self::free))
/// gives the memory back; it can grow, shrink and split.
#[must_use = "a reservation is released as soon as it is dropped"]
#[derive(Debug)]
pub struct Reservation<'g> {
    gov: &'g MemoryGovernor,
    slot: usize,
    engine: EngineId,
    bytes: u64,
}

impl<'g> Reservation<'g> {
    pub fn size(&self) -> u64 {
        self.bytes
    }

    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// Reserves `bytes` more, or refuses at once (the reservation is then
    /// unchanged).
    pub fn try_grow(&mut self, bytes: u64) -> Result<(), MemError> {
        // The engine's counter already holds self.bytes, so a request the
        // ledger admits cannot overflow this guard.
        self.gov.shared.reserve(self.slot, bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Gives `bytes` back. Asking for more than is held is refused and
    /// changes nothing.
    pub fn shrink(&mut self, bytes: u64) -> Result<(), MemError> {
        self.check_holds(bytes)?;
        self.gov.shared.give_back(self.slot, bytes);
        self.bytes -= bytes;
        Ok(())
    }

    /// Moves `bytes` into a new reservation of the same engine (no change
    /// to the accounting).
    pub fn split(&mut self, bytes: u64) -> Result<Reservation<'g>, MemError> {
        self.check_holds(bytes)?;
        self.bytes -= bytes;
        Ok(Reservation {
            gov: self.gov,
            slot: self.slot,
            engine: self.engine,
            bytes,
        })
    }

    /// Gives everything back now.
    pub fn free(self) {}

    fn check_holds(&self, bytes: u64) -> Result<(), MemError> {
        if bytes > self.bytes {
            let name = self.gov.shared.lock().engines[self.slot].name.to_string();
            return Err(MemError::BeyondReservation {
                engine: name,
                requested: bytes,
                held: self.bytes,
            });
        }
        Ok(())
    }
}

impl Drop for Reservation<'_> {
    #[inline]
    fn drop(&mut self) {
        self.gov.shared.give_back(self.slot, self.bytes);
    }
}
