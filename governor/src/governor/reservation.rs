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
    /// The NUMA node (position) of all its bytes, while they are on one
    /// (always so without NUMA: node 0).
    node: u32,
    bytes: u64,
    /// Bytes per node, once they are on more than one.
    spread: Option<Box<[u64]>>,
}

impl Reservation {
    /// A guard for `bytes` of `slot` the ledger has already counted on
    /// `node`.
    #[inline]
    pub(super) fn new(
        shared: Arc<Shared>,
        slot: usize,
        engine: EngineId,
        bytes: u64,
        node: usize,
    ) -> Self {
        Self {
            shared,
            slot,
            engine,
            node: node as u32,
            bytes,
            spread: None,
        }
    }

    /// Bytes held per NUMA node (kernel id, bytes), for the nodes it holds
    /// any on; without NUMA, all of it on node 0.
    pub fn node_bytes(&self) -> Vec<(u32, u64)> {
        match &self.spread {
            None => vec![(self.shared.node_id(self.node as usize), self.bytes)],
            Some(v) => v
                .iter()
                .enumerate()
                .filter(|(_, b)| **b > 0)
                .map(|(n, b)| (self.shared.node_id(n), *b))
                .collect(),
        }
    }

    /// Notes `n` more bytes charged to `node` (before `bytes` grows).
    #[inline]
    fn note(&mut self, node: usize, n: u64) {
        if self.spread.is_none() && self.node as usize == node {
            return;
        }
        self.note_spread(node, n);
    }

    #[cold]
    fn note_spread(&mut self, node: usize, n: u64) {
        match &mut self.spread {
            Some(v) => v[node] += n,
            None if self.bytes == 0 => self.node = node as u32,
            None => {
                let mut v = vec![0; self.shared.nodes()];
                v[self.node as usize] = self.bytes;
                v[node] += n;
                self.spread = Some(v.into_boxed_slice());
            }
        }
    }

    /// Takes `n` of the bytes held off the books per node (the last node
    /// first) and hands each part to `f`.
    #[inline]
    fn take_parts(&mut self, n: u64, mut f: impl FnMut(&Arc<Shared>, usize, u64)) {
        match &mut self.spread {
            None => f(&self.shared, self.node as usize, n),
            Some(v) => {
                let mut left = n;
                for (node, held) in v.iter_mut().enumerate().rev() {
                    let take = left.min(*held);
                    if take > 0 {
                        *held -= take;
                        left -= take;
                        f(&self.shared, node, take);
                    }
                }
            }
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
        let node = self.shared.reserve(self.slot, bytes)?;
        self.note(node, bytes);
        self.bytes += bytes;
        Ok(())
    }

    /// Gives `bytes` back. Asking for more than is held is refused and
    /// changes nothing.
    #[inline]
    pub fn shrink(&mut self, bytes: u64) -> Result<(), MemError> {
        self.check_holds(bytes)?;
        let slot = self.slot;
        self.take_parts(bytes, |shared, node, n| shared.give_back(slot, node, n));
        self.bytes -= bytes;
        Ok(())
    }

    /// Moves `bytes` into a new reservation of the same engine (no change
    /// to the accounting).
    pub fn split(&mut self, bytes: u64) -> Result<Reservation, MemError> {
        self.check_holds(bytes)?;
        let mut parts = Vec::new();
        self.take_parts(bytes, |_, node, n| parts.push((node, n)));
        self.bytes -= bytes;
        let mut out = Reservation::new(
            self.shared.clone(),
            self.slot,
            self.engine,
            0,
            parts.first().map_or(0, |p| p.0),
        );
        for (node, n) in parts {
            out.note(node, n);
            out.bytes += n;
        }
        Ok(out)
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
        let slot = self.slot;
        self.take_parts(self.bytes, |shared, node, n| {
            shared.give_back(slot, node, n)
        });
    }
}
