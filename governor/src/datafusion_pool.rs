//! A DataFusion [`MemoryPool`] backed by one engine's budget (feature
//! `datafusion`), so the SQL engine's operators reserve from the Query
//! budget like every other engine's code.
//!
//! DataFusion calls `try_grow` before its operators hold memory; when the
//! governor refuses, the call fails with `ResourcesExhausted` carrying the
//! governor's refusal (engine, requested, available, limit, and the
//! database's largest engines at that moment), and spillable operators
//! (sorts, hash aggregations) spill and try again. `grow`, which
//! DataFusion uses for memory it cannot refuse, is a governor `charge`.
//!
//! [`GovernorPool::tracked`] wraps the pool in DataFusion's own
//! `TrackConsumersPool`, so a refusal also names the engine's largest
//! DataFusion consumers (what DataFusion's users asked its errors for);
//! it costs a lock on every grow and shrink, which the plain pool does
//! not take.

use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion_common::{DataFusionError, Result};
use datafusion_execution::memory_pool::{
    MemoryLimit, MemoryPool, MemoryReservation, TrackConsumersPool,
};

use crate::{EngineId, MemError, MemoryGovernor};

/// DataFusion's memory pool, drawing on `engine`'s budget.
pub struct GovernorPool {
    governor: MemoryGovernor,
    engine: EngineId,
    slot: usize,
    reserved: AtomicUsize,
}

impl GovernorPool {
    /// A pool over `engine`'s budget in `governor` (a clone of the handle).
    pub fn new(governor: &MemoryGovernor, engine: EngineId) -> Result<Self, MemError> {
        Ok(Self {
            slot: governor.slot(engine)?,
            governor: governor.clone(),
            engine,
            reserved: AtomicUsize::new(0),
        })
    }

    /// The pool in DataFusion's `TrackConsumersPool`: a refusal names the
    /// `top` DataFusion consumers of the engine holding the most, then the
    /// governor's refusal with the database's largest engines.
    pub fn tracked(
        governor: &MemoryGovernor,
        engine: EngineId,
        top: std::num::NonZeroUsize,
    ) -> Result<TrackConsumersPool<Self>, MemError> {
        Ok(TrackConsumersPool::new(Self::new(governor, engine)?, top))
    }
}

impl std::fmt::Debug for GovernorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GovernorPool")
            .field("engine", &self.engine)
            .field("reserved", &self.reserved.load(Ordering::Relaxed))
            .finish()
    }
}

impl std::fmt::Display for GovernorPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nodedb-governor pool for engine {}", self.engine)
    }
}

impl MemoryPool for GovernorPool {
    fn name(&self) -> &str {
        "nodedb-governor"
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        // DataFusion cannot be refused here; only a counter overflow (not
        // reachable with usize-sized requests on 64-bit) could fail.
        if self
            .governor
            .charge_slot(self.slot, additional as u64)
            .is_ok()
        {
            self.reserved.fetch_add(additional, Ordering::Relaxed);
        }
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        self.governor.release_slot(self.slot, shrink as u64);
        self.reserved.fetch_sub(shrink, Ordering::Relaxed);
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        match self.governor.reserve_slot(self.slot, additional as u64) {
            Ok(()) => {
                self.reserved.fetch_add(additional, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(DataFusionError::ResourcesExhausted(format!(
                "{e} (DataFusion consumer {} holds {} bytes)",
                reservation.consumer().name(),
                reservation.size()
            ))),
        }
    }

    fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Relaxed)
    }

    /// The engine's cap (or the ceiling, if lower): what DataFusion could
    /// get at most, for operators that size their buffers by the limit.
    fn memory_limit(&self) -> MemoryLimit {
        let cap = self
            .governor
            .usage(self.engine)
            .map_or(0, |u| u.cap_bytes)
            .min(self.governor.ceiling_bytes());
        MemoryLimit::Finite(usize::try_from(cap).unwrap_or(usize::MAX))
    }
}
