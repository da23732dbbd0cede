//! The [`Reservation`] guard: memory one engine holds, given back when the
//! guard is dropped.

use std::sync::Arc;

use super::shared::Shared;
use crate::{engine::EngineId, error::MemError};

/// Memory reserved for one engine. Dropping it (or [`free`](Self::free))
/// gives the memory back; it can grow, shrink and split.
///
/// A reservation owns a handle to its governor (as DataFusion's
/// `MemoryReservation` owns an `Arc` of its pool), so it can be stored
/// anywhere, for as long as needed. Making one (or splitting one) clones
/// that handle, a shared atomic; growing and shrinking one touches no
/// shared cache line while the engine is far from its limits. Code that
/// reserves often holds one reservation and grows and shrinks it (see
/// [`MemoryGovernor::reservation`](crate::MemoryGovernor::reservation)).
#[must_use = "a reservation is released as soon as it is dropped"]
#[derive(Debug)]
pub struct Reservation {
    shared: Arc<Shared>,
    slot: usize,
    engine: EngineId,
    bytes: u64,
}

impl Reservation {
    /// A guard for `bytes` of `slot` the ledger has already counted.
    pub(super) fn new(shared: Arc<Shared>, slot: usize, engine: EngineId, bytes: u64) -> Self {
        Self {
            shared,
            slot,
            engine,
            bytes,
        }
    }

    pub fn size(&self) -> u64 {
        self.bytes
    }

    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// Reserves `bytes` more, or refuses at once (the reservation is then
    /// unchanged).
    #[inline]
    pub fn try_grow(&mut self, bytes: u64) -> Result<(), MemError> {
        // The engine's counter already holds self.bytes, so a request the
        // ledger admits cannot overflow this guard.
        self.shared.reserve(self.slot, bytes)?;
        self.bytes += bytes;
        Ok(())
    }

    /// Gives `bytes` back. Asking for more than is held is refused and
    /// changes nothing.
    #[inline]
    pub fn shrink(&mut self, bytes: u64) -> Result<(), MemError> {
        self.check_holds(bytes)?;
        self.shared.give_back(self.slot, bytes);
        self.bytes -= bytes;
        Ok(())
    }

    /// Moves `bytes` into a new reservation of the same engine (no change
    /// to the accounting).
    pub fn split(&mut self, bytes: u64) -> Result<Reservation, MemError> {
        self.check_holds(bytes)?;
        self.bytes -= bytes;
        Ok(Reservation::new(
            self.shared.clone(),
            self.slot,
            self.engine,
            bytes,
        ))
    }

    /// Gives everything back now.
    pub fn free(self) {}

    fn check_holds(&self, bytes: u64) -> Result<(), MemError> {
        if bytes > self.bytes {
            return Err(MemError::BeyondReservation {
                engine: self.shared.name(self.slot),
                requested: bytes,
                held: self.bytes,
            });
        }
        Ok(())
    }
}

impl Drop for Reservation {
    #[inline]
    fn drop(&mut self) {
        self.shared.give_back(self.slot, self.bytes);
    }
}
