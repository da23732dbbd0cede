//! The fast path of the reservation protocol: when it is open, and the
//! thread-local credit it runs on.
//!
//! While an engine is far from its limits (at least 2 x cores x batch of
//! headroom: the [`Gate`] is open), a thread does not take the ledger's
//! lock for each reservation: it draws *credit* for the engine a batch at a
//! time (counted in the ledger like any reservation) and spends it, and puts
//! small releases back into it, with no lock and no shared atomic. Credit
//! past two batches goes back to the ledger; all of it goes back when the
//! thread next decides exactly (the engine neared its limits), on
//! [`MemoryGovernor::flush_thread_credit`](crate::MemoryGovernor::flush_thread_credit),
//! and when the thread exits.
//!
//! The cost of the speed: up to two batches per thread that used an engine
//! and went quiet stay counted in that engine's ledger. Near the limits the
//! fast path is off, and a thread that decides exactly first returns all its
//! credit for the governor, so a reserving thread's own slack never decides
//! its refusal (other threads' credit can: at most two batches each).
//!
//! The credit in use is a `Cell` (a load and a store, no borrow flag), and
//! no code outside this module runs while it is being changed: drawing from
//! or returning to the ledger (which may call pressure subscribers, which
//! may reserve) happens after the thread-local state is consistent again.
//!
//! This module sees a governor only as a [`CreditSource`]: credit is drawn
//! from it and returned to it, and the governor decides, under its lock,
//! what a draw may take.

use std::{
    cell::{Cell, RefCell},
    sync::{
        Arc, Weak,
        atomic::{AtomicBool, Ordering},
    },
};

use super::ledger::Ledger;

/// Per engine, whether threads may reserve from credit.
pub(super) struct Gate {
    /// Per ledger position: true while the engine is far enough from its
    /// limits, and from its share of every NUMA node's, for threads to
    /// reserve from batched credit.
    open: Vec<AtomicBool>,
    nodes: usize,
    /// Credit is drawn from the ledger this many bytes at a time; 0 keeps
    /// the gate shut.
    batch: u64,
    /// The gate opens at this much headroom: 2 x cores x batch.
    headroom: u64,
}

impl Gate {
    /// A shut gate for `engines` engines on `nodes` nodes drawing
    /// `batch_bytes` at a time.
    pub(super) fn new(engines: usize, nodes: usize, batch_bytes: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        // Loom checks the exact core; the fast path is thread-local.
        // Batches are capped at 1 TiB so credit arithmetic never nears u64::MAX.
        let batch = if cfg!(nodedb_loom) {
            0
        } else {
            batch_bytes.min(1 << 40)
        };
        Self {
            open: (0..engines).map(|_| AtomicBool::new(false)).collect(),
            nodes,
            batch,
            headroom: batch.saturating_mul(2 * cores),
        }
    }

    pub(super) fn batch(&self) -> u64 {
        self.batch
    }

    /// Engines far from their limits take credit; the others go exact.
    pub(super) fn refresh(&self, ledger: &Ledger) {
        for (i, flag) in self.open.iter().enumerate() {
            let open = self.batch > 0
                && (0..self.nodes).all(|node| ledger.headroom_at(i, node) >= self.headroom);
            // Write only on change: the flag's cache line is read by every
            // reservation on every core.
            if flag.load(Ordering::Relaxed) != open {
                flag.store(open, Ordering::Relaxed);
            }
        }
    }

    #[inline]
    pub(super) fn is_open(&self, slot: usize) -> bool {
        self.open[slot].load(Ordering::Relaxed)
    }
}

/// A governor, as thread-local credit sees it.
pub(super) trait CreditSource {
    /// Tells governors apart in thread-local credit; never 0.
    fn id(&self) -> u64;
    /// Credit is drawn this many bytes at a time.
    fn batch(&self) -> u64;
    /// The NUMA node (position) the calling thread runs on.
    fn current_node(&self) -> usize;
    /// Draws `bytes` of credit for engine `slot` on `node`, if the ledger
    /// admits it there.
    fn draw_credit(&self, slot: usize, node: usize, bytes: u64) -> bool;
    /// Gives unused credit back to the ledger.
    fn return_credit(&self, slot: usize, node: usize, bytes: u64);
}

/// Bits of a key that name the NUMA node (position) of the credit.
const NODE_BITS: u32 = 6;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;
const _: () = assert!(crate::numa::MAX_NODES as u64 == NODE_MASK + 1);

/// Names a (governor, engine slot, node) triple in one word; 0 names
/// nothing (governor ids start at 1). Slots are below 2^24
/// (`EngineId::index`), so the slot and node fit the low 32 bits.
#[inline]
fn key(source: &impl CreditSource, slot: usize, node: usize) -> u64 {
    (source.id() << 32) | ((slot as u64) << NODE_BITS) | node as u64
}

fn unkey(key: u64) -> (u64, usize, usize) {
    (
        key >> 32,
        ((key & 0xffff_ffff) >> NODE_BITS) as usize,
        (key & NODE_MASK) as usize,
    )
}

/// Credit parked while another (governor, engine) is hot, and the owners
/// to give everything back to when the thread exits.
struct Parked {
    key: u64,
    bytes: u64,
    owner: Weak<dyn CreditSource>,
}

/// The credit in use is two words (which pair, how many bytes), each its
/// own `Cell` so the fast path is a load, a compare and a store straight
/// to thread-local storage.
struct Credits {
    hot_key: Cell<u64>,
    hot_bytes: Cell<u64>,
    parked: RefCell<Vec<Parked>>,
}

impl Drop for Credits {
    fn drop(&mut self) {
        let hot_key = self.hot_key.replace(0);
        let hot_bytes = self.hot_bytes.replace(0);
        let parked = std::mem::take(self.parked.get_mut());
        for p in parked {
            let mut bytes = p.bytes;
            if hot_key == p.key {
                bytes += hot_bytes;
            }
            if bytes > 0
                && let Some(owner) = p.owner.upgrade()
            {
                let (_, slot, node) = unkey(p.key);
                owner.return_credit(slot, node, bytes);
            }
        }
    }
}

thread_local! {
    static CREDITS: Credits = const {
        Credits {
            hot_key: Cell::new(0),
            hot_bytes: Cell::new(0),
            parked: RefCell::new(Vec::new()),
        }
    };
}

impl Credits {
    /// Makes (governor, slot, node) hot: parks the current hot credit and
    /// takes the new one's parked bytes. Runs no outside code.
    fn switch<S: CreditSource + 'static>(&self, source: &Arc<S>, slot: usize, node: usize) {
        let old_key = self.hot_key.get();
        let old_bytes = self.hot_bytes.replace(0);
        let new_key = key(&**source, slot, node);
        let mut parked = self.parked.borrow_mut();
        if old_bytes > 0
            && let Some(p) = parked.iter_mut().find(|p| p.key == old_key)
        {
            p.bytes += old_bytes;
        }
        let bytes = match parked.iter_mut().find(|p| p.key == new_key) {
            Some(p) => std::mem::take(&mut p.bytes),
            None => {
                // Forget governors that are gone, then remember this one.
                parked.retain(|p| p.owner.strong_count() > 0);
                let owner: Weak<S> = Arc::downgrade(source);
                parked.push(Parked {
                    key: new_key,
                    bytes: 0,
                    owner,
                });
                0
            }
        };
        self.hot_key.set(new_key);
        self.hot_bytes.set(bytes);
    }

    /// Adds `bytes` to the hot credit if (governor, slot) is still hot.
    fn add_if_hot(&self, k: u64, bytes: u64) -> bool {
        if self.hot_key.get() != k {
            return false;
        }
        self.hot_bytes.set(self.hot_bytes.get() + bytes);
        true
    }
}

/// Spends `bytes` of this thread's credit for `slot`, drawing a batch when
/// it runs short; returns the node (position) the bytes are charged to.
/// None: the caller must decide exactly.
///
/// The hot credit is spent on whichever node it was drawn for: a thread
/// that migrated keeps charging its old node until that credit runs out
/// (the next draw is for the node it runs on then).
#[inline]
pub(super) fn take<S: CreditSource + 'static>(
    source: &Arc<S>,
    slot: usize,
    bytes: u64,
) -> Option<usize> {
    let base = key(&**source, slot, 0);
    let spent = CREDITS.try_with(|c| {
        let hot = c.hot_key.get();
        let have = c.hot_bytes.get();
        let node = (hot & NODE_MASK) as usize;
        if hot & !NODE_MASK == base && have >= bytes {
            c.hot_bytes.set(have - bytes);
            Some(node)
        } else {
            None
        }
    });
    match spent {
        Ok(Some(node)) => Some(node),
        Ok(None) => take_slow(source, slot, bytes),
        Err(_) => None,
    }
}

/// `take` when the engine's credit is not hot or is short: switch to the
/// thread's node now, then draw a batch from the ledger.
#[cold]
#[inline(never)]
fn take_slow<S: CreditSource + 'static>(source: &Arc<S>, slot: usize, bytes: u64) -> Option<usize> {
    let node = source.current_node();
    let k = key(&**source, slot, node);
    CREDITS
        .try_with(|c| {
            if c.hot_key.get() != k {
                c.switch(source, slot, node);
            }
            let held = c.hot_bytes.get();
            if held >= bytes {
                c.hot_bytes.set(held - bytes);
                return Some(node);
            }
            let want = (bytes - held).checked_add(source.batch())?;
            // Hold the hot bytes here while the ledger is asked: drawing may
            // run subscribers that reserve on this thread.
            c.hot_bytes.set(0);
            let drawn = source.draw_credit(slot, node, want);
            // Spare: held + want - bytes (one batch) on success, held on failure.
            let spare = if drawn { held + want - bytes } else { held };
            if !c.add_if_hot(k, spare) {
                source.return_credit(slot, node, spare);
            }
            drawn.then_some(node)
        })
        .ok()
        .flatten()
}

/// Puts released `bytes` of `slot` charged to `node` into this thread's
/// credit, returning what exceeds two batches to the ledger.
#[inline]
pub(super) fn put<S: CreditSource + 'static>(
    source: &Arc<S>,
    slot: usize,
    node: usize,
    bytes: u64,
) {
    let k = key(&**source, slot, node);
    let kept = CREDITS.try_with(|c| {
        let now = c.hot_bytes.get().saturating_add(bytes);
        if c.hot_key.get() == k && now <= source.batch().saturating_mul(2) {
            c.hot_bytes.set(now);
            true
        } else {
            false
        }
    });
    if kept != Ok(true) {
        put_slow(source, slot, node, bytes);
    }
}

/// `put` when the pair is not hot or the credit would pass two batches.
#[cold]
#[inline(never)]
fn put_slow<S: CreditSource + 'static>(source: &Arc<S>, slot: usize, node: usize, bytes: u64) {
    let batch = source.batch();
    let back = CREDITS
        .try_with(|c| {
            if c.hot_key.get() != key(&**source, slot, node) {
                c.switch(source, slot, node);
            }
            let mut now = c.hot_bytes.get().saturating_add(bytes);
            let mut back = 0;
            if now > batch.saturating_mul(2) {
                back = now - batch;
                now = batch;
            }
            c.hot_bytes.set(now);
            back
        })
        // The thread is exiting: straight to the ledger.
        .unwrap_or(bytes);
    if back > 0 {
        source.return_credit(slot, node, back);
    }
}

/// Takes this thread's credit for the governor (`slot`, or every engine
/// when None) out of the thread-local state.
fn take_credit(source: &impl CreditSource, slot: Option<usize>) -> Vec<(usize, usize, u64)> {
    let id = source.id();
    CREDITS
        .try_with(|c| {
            let mut out = Vec::new();
            let matches = |k: u64| {
                let (g, s, _) = unkey(k);
                g == id && slot.is_none_or(|want| want == s)
            };
            let hot_key = c.hot_key.get();
            if matches(hot_key) && c.hot_bytes.get() > 0 {
                let (_, s, n) = unkey(hot_key);
                out.push((s, n, c.hot_bytes.replace(0)));
            }
            if let Ok(mut parked) = c.parked.try_borrow_mut() {
                for p in parked.iter_mut().filter(|p| matches(p.key) && p.bytes > 0) {
                    let (_, s, n) = unkey(p.key);
                    out.push((s, n, std::mem::take(&mut p.bytes)));
                }
            }
            out
        })
        .unwrap_or_default()
}

/// Returns this thread's credit for `slot` (or, when None, for every engine
/// of the governor) to the ledger.
pub(super) fn flush(source: &impl CreditSource, slot: Option<usize>) {
    for (slot, node, bytes) in take_credit(source, slot) {
        source.return_credit(slot, node, bytes);
    }
}
