//! Thread-local credit: the fast path of the reservation protocol.
//!
//! While an engine is far from its limits (at least 2 x cores x batch of
//! headroom), a thread does not take the ledger's lock for each
//! reservation: it draws *credit* for the engine a batch at a time (counted
//! in the ledger like any reservation) and spends it, and gives released
//! memory back into it, with no lock and no shared atomic. Credit that
//! grows past two batches goes back to the ledger; all of it goes back when
//! the engine turns exact, when the thread next reserves exactly, and when
//! the thread exits.
//!
//! The cost of this speed: up to one batch per thread that used an engine
//! and went quiet stays counted in that engine's ledger. Near the limits
//! the fast path is off, so that slack never decides a refusal for a thread
//! that reserves; a quiet thread's credit returns when it exits or calls
//! [`MemoryGovernor::flush_thread_credit`](crate::MemoryGovernor::flush_thread_credit).

use std::{
    cell::RefCell,
    sync::{Arc, Weak},
};

use crate::governor::Shared;

struct Credit {
    governor: u64,
    slot: usize,
    bytes: u64,
    owner: Weak<Shared>,
}

struct Credits {
    entries: Vec<Credit>,
    /// The entry used last: the common case is one engine in a loop.
    last: usize,
}

impl Drop for Credits {
    fn drop(&mut self) {
        for c in self.entries.drain(..) {
            if c.bytes > 0
                && let Some(owner) = c.owner.upgrade()
            {
                owner.return_credit(c.slot, c.bytes);
            }
        }
    }
}

thread_local! {
    static CREDITS: RefCell<Credits> = const {
        RefCell::new(Credits { entries: Vec::new(), last: 0 })
    };
}

impl Credits {
    fn entry(&mut self, shared: &Arc<Shared>, slot: usize) -> &mut Credit {
        let hit = self
            .entries
            .get(self.last)
            .is_some_and(|c| c.governor == shared.id && c.slot == slot);
        if !hit {
            self.last = match self
                .entries
                .iter()
                .position(|c| c.governor == shared.id && c.slot == slot)
            {
                Some(i) => i,
                None => {
                    // Forget governors that are gone.
                    self.entries.retain(|c| c.owner.strong_count() > 0);
                    self.entries.push(Credit {
                        governor: shared.id,
                        slot,
                        bytes: 0,
                        owner: Arc::downgrade(shared),
                    });
                    self.entries.len() - 1
                }
            };
        }
        &mut self.entries[self.last]
    }
}

/// Spends `bytes` of this thread's credit for `slot`, drawing a batch when
/// it runs short. False: the caller must decide exactly.
pub(crate) fn take(shared: &Arc<Shared>, slot: usize, bytes: u64) -> bool {
    CREDITS
        .try_with(|c| {
            // Re-entered from a pressure subscriber: decide exactly.
            let Ok(mut c) = c.try_borrow_mut() else {
                return false;
            };
            let e = c.entry(shared, slot);
            if e.bytes >= bytes {
                e.bytes -= bytes;
                return true;
            }
            let Some(want) = (bytes - e.bytes).checked_add(shared.batch) else {
                return false;
            };
            if !shared.draw_credit(slot, want) {
                return false;
            }
            e.bytes = e.bytes + want - bytes;
            true
        })
        .unwrap_or(false)
}

/// Puts released `bytes` of `slot` into this thread's credit, returning
/// what exceeds two batches to the ledger.
pub(crate) fn put(shared: &Arc<Shared>, slot: usize, bytes: u64) {
    let kept = CREDITS
        .try_with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else {
                return false;
            };
            let e = c.entry(shared, slot);
            e.bytes += bytes;
            if e.bytes > 2 * shared.batch {
                let excess = e.bytes - shared.batch;
                e.bytes = shared.batch;
                shared.return_credit(slot, excess);
            }
            true
        })
        .unwrap_or(false);
    if !kept {
        shared.return_credit(slot, bytes);
    }
}

/// Returns this thread's credit for `slot` to the ledger.
pub(crate) fn flush_slot(shared: &Arc<Shared>, slot: usize) {
    let bytes = CREDITS
        .try_with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else {
                return 0;
            };
            std::mem::take(&mut c.entry(shared, slot).bytes)
        })
        .unwrap_or(0);
    shared.return_credit(slot, bytes);
}

/// Returns all of this thread's credit for the governor to the ledger.
pub(crate) fn flush(shared: &Arc<Shared>) {
    let taken: Vec<(usize, u64)> = CREDITS
        .try_with(|c| {
            let Ok(mut c) = c.try_borrow_mut() else {
                return Vec::new();
            };
            c.entries
                .iter_mut()
                .filter(|e| e.governor == shared.id && e.bytes > 0)
                .map(|e| (e.slot, std::mem::take(&mut e.bytes)))
                .collect()
        })
        .unwrap_or_default();
    for (slot, bytes) in taken {
        shared.return_credit(slot, bytes);
    }
}
