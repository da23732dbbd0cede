//! Thread-local credit: the fast path of the reservation protocol.
//!
//! While an engine is far from its limits (at least 2 x cores x batch of
//! headroom), a thread does not take the ledger's lock for each
//! reservation: it draws *credit* for the engine a batch at a time (counted
//! in the ledger like any reservation) and spends it, and puts small
//! releases back into it, with no lock and no shared atomic. Credit past
//! two batches goes back to the ledger; all of it goes back when the thread
//! next decides exactly (the engine neared its limits), on
//! [`MemoryGovernor::flush_thread_credit`](crate::MemoryGovernor::flush_thread_credit),
//! and when the thread exits.
//!
//! The cost of the speed: up to two batches per thread that used an engine
//! and went quiet stay counted in that engine's ledger. Near the limits the
//! fast path is off, and a thread that decides exactly first returns its own
//! credit, so a reserving thread's slack never decides its refusal.
//!
//! The credit in use is a `Cell` (a load and a store, no borrow flag), and
//! no code outside this module runs while it is being changed: drawing from
//! or returning to the ledger (which may call pressure subscribers, which
//! may reserve) happens after the thread-local state is consistent again.

use std::{
    cell::{Cell, RefCell},
    sync::{Arc, Weak},
};

use crate::governor::Shared;

/// The credit in use: which governor and engine, and how many bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Hot {
    governor: u64,
    slot: usize,
    bytes: u64,
}

const NONE: Hot = Hot {
    governor: 0,
    slot: usize::MAX,
    bytes: 0,
};

/// Credit parked while another (governor, engine) is hot, and the owners
/// to give everything back to when the thread exits.
struct Parked {
    governor: u64,
    slot: usize,
    bytes: u64,
    owner: Weak<Shared>,
}

struct Credits {
    hot: Cell<Hot>,
    parked: RefCell<Vec<Parked>>,
}

impl Drop for Credits {
    fn drop(&mut self) {
        let hot = self.hot.replace(NONE);
        let parked = std::mem::take(self.parked.get_mut());
        for p in parked {
            let mut bytes = p.bytes;
            if hot.governor == p.governor && hot.slot == p.slot {
                bytes += hot.bytes;
            }
            if bytes > 0
                && let Some(owner) = p.owner.upgrade()
            {
                owner.return_credit(p.slot, bytes);
            }
        }
    }
}

thread_local! {
    static CREDITS: Credits = const {
        Credits { hot: Cell::new(NONE), parked: RefCell::new(Vec::new()) }
    };
}

impl Credits {
    /// Makes (governor, slot) hot: parks the current hot credit and takes
    /// the new one's parked bytes. Runs no outside code.
    fn switch(&self, shared: &Arc<Shared>, slot: usize) -> Hot {
        let old = self.hot.get();
        let mut parked = self.parked.borrow_mut();
        if old.bytes > 0
            && let Some(p) = parked
                .iter_mut()
                .find(|p| p.governor == old.governor && p.slot == old.slot)
        {
            p.bytes += old.bytes;
        }
        let bytes = match parked
            .iter_mut()
            .find(|p| p.governor == shared.id && p.slot == slot)
        {
            Some(p) => std::mem::take(&mut p.bytes),
            None => {
                // Forget governors that are gone, then remember this one.
                parked.retain(|p| p.owner.strong_count() > 0);
                parked.push(Parked {
                    governor: shared.id,
                    slot,
                    bytes: 0,
                    owner: Arc::downgrade(shared),
                });
                0
            }
        };
        let hot = Hot {
            governor: shared.id,
            slot,
            bytes,
        };
        self.hot.set(hot);
        hot
    }

    #[inline]
    fn hot_for(&self, shared: &Arc<Shared>, slot: usize) -> Hot {
        let hot = self.hot.get();
        if hot.governor == shared.id && hot.slot == slot {
            hot
        } else {
            self.switch(shared, slot)
        }
    }

    /// Adds `bytes` to the hot credit if (governor, slot) is still hot.
    fn add_if_hot(&self, shared: &Arc<Shared>, slot: usize, bytes: u64) -> bool {
        let mut hot = self.hot.get();
        if hot.governor != shared.id || hot.slot != slot {
            return false;
        }
        hot.bytes += bytes;
        self.hot.set(hot);
        true
    }
}

/// Spends `bytes` of this thread's credit for `slot`, drawing a batch when
/// it runs short. False: the caller must decide exactly.
#[inline]
pub(crate) fn take(shared: &Arc<Shared>, slot: usize, bytes: u64) -> bool {
    CREDITS
        .try_with(|c| {
            let mut hot = c.hot_for(shared, slot);
            if hot.bytes >= bytes {
                hot.bytes -= bytes;
                c.hot.set(hot);
                return true;
            }
            let Some(want) = (bytes - hot.bytes).checked_add(shared.batch) else {
                return false;
            };
            // Hold the hot bytes here while the ledger is asked: drawing may
            // run subscribers that reserve on this thread.
            let held = hot.bytes;
            c.hot.set(Hot { bytes: 0, ..hot });
            let drawn = shared.draw_credit(slot, want);
            // Spare: held + want - bytes (one batch) on success, held on failure.
            let spare = if drawn { held + want - bytes } else { held };
            if !c.add_if_hot(shared, slot, spare) {
                shared.return_credit(slot, spare);
            }
            if !drawn {
                return false;
            }
            true
        })
        .unwrap_or(false)
}

/// Puts released `bytes` of `slot` into this thread's credit, returning
/// what exceeds two batches to the ledger.
#[inline]
pub(crate) fn put(shared: &Arc<Shared>, slot: usize, bytes: u64) {
    let back = CREDITS
        .try_with(|c| {
            let mut hot = c.hot_for(shared, slot);
            hot.bytes += bytes;
            let mut back = 0;
            if hot.bytes > 2 * shared.batch {
                back = hot.bytes - shared.batch;
                hot.bytes = shared.batch;
            }
            c.hot.set(hot);
            back
        })
        // The thread is exiting: straight to the ledger.
        .unwrap_or(bytes);
    if back > 0 {
        shared.return_credit(slot, back);
    }
}

/// Takes this thread's credit for the governor (`slot`, or every engine
/// when None) out of the thread-local state.
fn take_credit(shared: &Arc<Shared>, slot: Option<usize>) -> Vec<(usize, u64)> {
    CREDITS
        .try_with(|c| {
            let mut out = Vec::new();
            let matches = |g: u64, s: usize| g == shared.id && slot.is_none_or(|want| want == s);
            let mut hot = c.hot.get();
            if matches(hot.governor, hot.slot) && hot.bytes > 0 {
                out.push((hot.slot, hot.bytes));
                hot.bytes = 0;
                c.hot.set(hot);
            }
            if let Ok(mut parked) = c.parked.try_borrow_mut() {
                for p in parked
                    .iter_mut()
                    .filter(|p| matches(p.governor, p.slot) && p.bytes > 0)
                {
                    out.push((p.slot, std::mem::take(&mut p.bytes)));
                }
            }
            out
        })
        .unwrap_or_default()
}

/// Returns this thread's credit for `slot` to the ledger.
pub(crate) fn flush_slot(shared: &Arc<Shared>, slot: usize) {
    for (slot, bytes) in take_credit(shared, Some(slot)) {
        shared.return_credit(slot, bytes);
    }
}

/// Returns all of this thread's credit for the governor to the ledger.
pub(crate) fn flush(shared: &Arc<Shared>) {
    for (slot, bytes) in take_credit(shared, None) {
        shared.return_credit(slot, bytes);
    }
}
