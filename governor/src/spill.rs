//! Spilling, for real: engines register [`SpillHandler`]s for their
//! spillable consumers (a hash table that can write partitions to disk, a
//! cache that can drop entries); the [`SpillController`] decides who spills
//! and how much, and calls them.
//!
//! * **Hysteresis** ([`SpillConfig`], the seed's defaults): an engine whose
//!   use of its cap reaches `spill_at` (90%) is spilled down to `restore_at`
//!   (75%), and not again until it climbs back to `spill_at`, so it does not
//!   oscillate around one threshold.
//! * **Victims**: cheapest bytes first (the handler's cost hint per byte),
//!   then the largest reclaimable amount, until the target is met.
//! * **Refusals**: [`SpillController::reserve_or_spill`] turns a refusal for
//!   lack of *shared* memory into a spill of other engines, those above
//!   their floor first, and one retry; no peer pool does this.
//!
//! The controller never holds its own lock while a handler runs: handlers
//! free memory by dropping reservations, which takes the governor's lock,
//! and may register or unregister handlers.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{
    engine::EngineId,
    error::MemError,
    governor::{MemoryGovernor, Reservation},
};

/// A consumer that can give memory back on request.
pub trait SpillHandler: Send + Sync {
    /// Bytes it could free now.
    fn reclaimable_bytes(&self) -> u64;
    /// Relative cost of spilling one byte (lower spills first): dropping a
    /// cache entry is cheap, writing a sorted run is dearer.
    fn cost_per_byte(&self) -> f64 {
        1.0
    }
    /// Frees about `target_bytes` (by releasing the reservations that
    /// account for them) and returns how many bytes it freed.
    fn spill(&self, target_bytes: u64) -> u64;
}

/// When engines spill.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpillConfig {
    /// Start spilling an engine at this fraction of its cap.
    pub spill_at: f64,
    /// ...and spill it down to this fraction.
    pub restore_at: f64,
}

impl Default for SpillConfig {
    fn default() -> Self {
        Self {
            spill_at: 0.90,
            restore_at: 0.75,
        }
    }
}

impl SpillConfig {
    pub fn validate(&self) -> Result<(), MemError> {
        if !(0.0 < self.restore_at && self.restore_at < self.spill_at && self.spill_at <= 1.0) {
            return Err(MemError::InvalidBudget {
                field: "spill config".into(),
                reason: format!(
                    "need 0 < restore_at ({}) < spill_at ({}) <= 1",
                    self.restore_at, self.spill_at
                ),
            });
        }
        Ok(())
    }
}

/// What the controller decided for one engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpillAction {
    /// Spill `target_bytes` of `engine`.
    Spill { engine: EngineId, target_bytes: u64 },
}

/// What a spill round did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpillReport {
    /// Per engine past `spill_at`, or idle and marked to spill when memory
    /// is short: (engine, target, freed).
    pub spilled: Vec<(EngineId, u64, u64)>,
    /// Floors their owners are not using but cannot have, because engines
    /// above their own floors hold the memory: (target, freed) spilled from
    /// those engines.
    pub floor_reclaim: (u64, u64),
}

impl SpillReport {
    pub fn freed_bytes(&self) -> u64 {
        self.spilled.iter().map(|(_, _, f)| f).sum::<u64>() + self.floor_reclaim.1
    }
}

struct Registered {
    id: u64,
    engine: EngineId,
    handler: Arc<dyn SpillHandler>,
}

type Handlers = Mutex<Vec<Registered>>;

fn lock_handlers(handlers: &Handlers) -> std::sync::MutexGuard<'_, Vec<Registered>> {
    handlers.lock().unwrap_or_else(|p| p.into_inner())
}

/// Decides who spills and calls their handlers.
pub struct SpillController {
    config: SpillConfig,
    /// Shared with the registrations, which hold it weakly: dropping one
    /// after the controller is gone does nothing.
    handlers: Arc<Handlers>,
    /// Engines currently being spilled down (hysteresis), by EngineId index.
    spilling: Mutex<Vec<bool>>,
    next_id: AtomicU64,
    spilled_total: AtomicU64,
    spilled_by_engine: Mutex<BTreeMap<EngineId, u64>>,
}

/// Keeps a handler registered; unregisters it when dropped. It does not
/// borrow the controller, so it can live anywhere (next to the handler's
/// owner, say) for as long as needed.
#[must_use = "the handler is unregistered when this is dropped"]
pub struct HandlerRegistration {
    handlers: Weak<Handlers>,
    id: u64,
}

impl Drop for HandlerRegistration {
    fn drop(&mut self) {
        if let Some(handlers) = self.handlers.upgrade() {
            lock_handlers(&handlers).retain(|r| r.id != self.id);
        }
    }
}

impl SpillController {
    pub fn new(config: SpillConfig) -> Result<Self, MemError> {
        config.validate()?;
        Ok(Self {
            config,
            handlers: Arc::new(Mutex::new(Vec::new())),
            spilling: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            spilled_total: AtomicU64::new(0),
            spilled_by_engine: Mutex::new(BTreeMap::new()),
        })
    }

    /// Registers a spillable consumer of `engine`.
    pub fn register(
        &self,
        engine: EngineId,
        handler: Arc<dyn SpillHandler>,
    ) -> HandlerRegistration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock_handlers(&self.handlers).push(Registered {
            id,
            engine,
            handler,
        });
        HandlerRegistration {
            handlers: Arc::downgrade(&self.handlers),
            id,
        }
    }

    /// Bytes freed by every spill so far.
    pub fn spilled_bytes_total(&self) -> u64 {
        self.spilled_total.load(Ordering::Relaxed)
    }

    /// Bytes freed by `engine`'s handlers so far.
    pub fn spilled_bytes(&self, engine: EngineId) -> u64 {
        let by = self
            .spilled_by_engine
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        by.get(&engine).copied().unwrap_or(0)
    }

    /// Which engines must spill, and how much, with hysteresis.
    pub fn check(&self, governor: &MemoryGovernor) -> Vec<SpillAction> {
        let mut spilling = self.spilling.lock().unwrap_or_else(|p| p.into_inner());
        let mut actions = Vec::new();
        for u in governor.usages() {
            let i = u.engine.index();
            if spilling.len() <= i {
                spilling.resize(i + 1, false);
            }
            let cap = u.cap_bytes as f64;
            let used = u.used_bytes as f64;
            if cap == 0.0 {
                continue;
            }
            if used >= cap * self.config.spill_at {
                spilling[i] = true;
            } else if used <= cap * self.config.restore_at {
                spilling[i] = false;
            }
            if spilling[i] {
                let target = (used - cap * self.config.restore_at).max(0.0).ceil() as u64;
                if target > 0 {
                    actions.push(SpillAction::Spill {
                        engine: u.engine,
                        target_bytes: target,
                    });
                }
            }
        }
        actions
    }

    /// Checks and spills: every engine past `spill_at` is spilled down to
    /// `restore_at` (as far as its handlers can), and every idle engine
    /// marked to spill when memory is short
    /// ([`MemoryGovernor::set_idle_spill`]) down to its floor.
    pub fn run(&self, governor: &MemoryGovernor) -> SpillReport {
        let mut report = SpillReport::default();
        for SpillAction::Spill {
            engine,
            target_bytes,
        } in self.check(governor)
        {
            let freed = self.spill_engines(&[engine], target_bytes);
            if freed >= target_bytes {
                // Down at the restore point: this episode is over, and the
                // engine spills again only once it climbs back to spill_at.
                let mut spilling = self.spilling.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(flag) = spilling.get_mut(engine.index()) {
                    *flag = false;
                }
            }
            report.spilled.push((engine, target_bytes, freed));
        }
        for SpillAction::Spill {
            engine,
            target_bytes,
        } in governor.idle_spills()
        {
            let freed = self.spill_engines(&[engine], target_bytes);
            report.spilled.push((engine, target_bytes, freed));
        }
        report.floor_reclaim = self.reclaim_floors(governor);
        report
    }

    /// Floors that are protected (their owners are not using them) but not
    /// free, because engines above their own floors hold the memory (it was
    /// charged, which cannot be refused, or a floor was raised or the
    /// ceiling lowered at run time): those engines spill by the shortfall.
    /// Returns (shortfall, freed).
    pub fn reclaim_floors(&self, governor: &MemoryGovernor) -> (u64, u64) {
        let usages = governor.usages();
        let protected: u64 = usages
            .iter()
            .map(|u| u.floor_bytes.saturating_sub(u.used_bytes))
            .sum();
        let free = governor
            .ceiling_bytes()
            .saturating_sub(governor.total_bytes());
        let shortfall = protected.saturating_sub(free);
        if shortfall == 0 {
            return (0, 0);
        }
        let borrowers: Vec<EngineId> = usages
            .iter()
            .filter(|u| u.used_bytes > u.floor_bytes)
            .map(|u| u.engine)
            .collect();
        (shortfall, self.spill_engines(&borrowers, shortfall))
    }

    /// Frees up to `target_bytes` from the handlers of `engines`: cheapest
    /// bytes first, then the largest. Returns the bytes freed.
    pub fn spill_engines(&self, engines: &[EngineId], target_bytes: u64) -> u64 {
        // Snapshot the candidates, then call them without our lock.
        // Clone the candidates under our lock; ask and call them outside it.
        let registered: Vec<(EngineId, Arc<dyn SpillHandler>)> = lock_handlers(&self.handlers)
            .iter()
            .filter(|r| engines.contains(&r.engine))
            .map(|r| (r.engine, r.handler.clone()))
            .collect();
        let mut candidates: Vec<(EngineId, Arc<dyn SpillHandler>, f64, u64)> = registered
            .into_iter()
            .map(|(engine, h)| {
                let (cost, reclaimable) = (h.cost_per_byte(), h.reclaimable_bytes());
                (engine, h, cost, reclaimable)
            })
            .filter(|c| c.3 > 0)
            .collect();
        candidates.sort_by(|a, b| a.2.total_cmp(&b.2).then(b.3.cmp(&a.3)));
        let mut freed = 0;
        for (engine, handler, _, _) in candidates {
            if freed >= target_bytes {
                break;
            }
            let got = handler.spill(target_bytes - freed);
            freed += got;
            *self
                .spilled_by_engine
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(engine)
                .or_default() += got;
        }
        self.spilled_total.fetch_add(freed, Ordering::Relaxed);
        freed
    }

    /// Reserves, and if the request was refused for lack of shared memory,
    /// spills other engines (those above their floor first) by the
    /// shortfall and tries once more. A refusal by the engine's own cap is
    /// returned as it is (only the engine itself can make room there),
    /// unless the refusal ended loans the engine had made and its cap is
    /// larger now: then it tries once more.
    pub fn reserve_or_spill(
        &self,
        governor: &MemoryGovernor,
        engine: EngineId,
        bytes: u64,
    ) -> Result<Reservation, MemError> {
        match governor.try_reserve(engine, bytes) {
            Err(MemError::GlobalCeilingExceeded { available, .. }) => {
                let shortfall = bytes.saturating_sub(available);
                let usages = governor.usages();
                let others = |borrowing: bool| -> Vec<EngineId> {
                    usages
                        .iter()
                        .filter(|u| {
                            u.engine != engine && (u.used_bytes > u.floor_bytes) == borrowing
                        })
                        .map(|u| u.engine)
                        .collect()
                };
                let freed = self.spill_engines(&others(true), shortfall);
                if freed < shortfall {
                    self.spill_engines(&others(false), shortfall - freed);
                }
                governor.try_reserve(engine, bytes)
            }
            Err(MemError::BudgetExceeded { limit, .. })
                if governor.usage(engine).is_ok_and(|u| u.cap_bytes > limit) =>
            {
                governor.try_reserve(engine, bytes)
            }
            other => other,
        }
    }
}
