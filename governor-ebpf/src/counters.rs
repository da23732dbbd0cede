//! Adding to a slot's per-CPU counters ([`SlotStats`]).

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

use aya_ebpf::helpers::{bpf_get_numa_node_id, bpf_ktime_get_ns};
use nodedb_governor_common::{MARK_MAX_BATCH, MarkEvent, NO_NODE, NODE_SLOTS, SlotStats, kind};

use crate::maps::{MARK_EVENTS, MARK_TOTALS, MARKS, STATS};

/// Counts one `event` (a `kernel_event` index) on this CPU.
#[inline(always)]
pub fn count_event(event: u32) {
    if let Some(n) = crate::maps::KERNEL_EVENTS.get_ptr_mut(event) {
        add_u64(n, 1);
    }
}

/// Inserts with `insert`; a failure (the map full, or no memory) is
/// counted as `event`.
#[inline(always)]
pub fn insert_or_count<E>(insert: Result<(), E>, event: u32) {
    if insert.is_err() {
        count_event(event);
    }
}

/// This CPU's counters of `slot`.
#[inline(always)]
pub fn stats(slot: u32) -> Option<*mut SlotStats> {
    STATS.get_ptr_mut(slot)
}

#[inline(always)]
pub fn add_i64(field: *mut i64, delta: i64) {
    // SAFETY: `field` points into a live per-CPU map value; the atomic add
    // keeps a preempted update on the same CPU from being lost.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(field, delta) };
}

#[inline(always)]
pub fn add_u64(field: *mut u64, delta: u64) {
    // SAFETY: as in add_i64.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, delta) };
}

/// Adds `delta` to the slot's resident bytes, on `node` (`NO_NODE`: the
/// running CPU's).
#[inline(always)]
pub fn add_resident_on(slot: u32, bucket: usize, delta: i64, node: u32) {
    if let Some(s) = stats(slot) {
        // SAFETY: `s` is a valid per-CPU map value pointer; the bucket index
        // is masked into the array.
        unsafe {
            add_i64(
                &raw mut (*s).resident_bytes[bucket & (kind::COUNT - 1)],
                delta,
            );
            add_u64(&raw mut (*s).rss_events, 1);
        }
        if bucket != kind::SWAP {
            let node = if node == NO_NODE {
                // SAFETY: the helper takes no arguments and reads this
                // CPU's node id.
                unsafe { bpf_get_numa_node_id() as usize }
            } else {
                node as usize
            };
            if node < NODE_SLOTS {
                // SAFETY: as above; the index is checked.
                unsafe {
                    add_i64(
                        &raw mut (*s).node_resident_bytes[node & (NODE_SLOTS - 1)],
                        delta,
                    )
                };
            }
            count_toward_mark(slot, s, delta);
        }
    }
}

/// Counts `delta` toward the slot's mark (see
/// `nodedb_governor_common::SlotMark`): growth is held on this CPU while it
/// is small against the distance to the mark, anything else is added to
/// the shared total, and a total that reaches an armed mark wakes the
/// agent.
#[inline(always)]
fn count_toward_mark(slot: u32, s: *mut SlotStats, delta: i64) {
    let (Some(mark), Some(total)) = (MARKS.get_ptr_mut(slot), MARK_TOTALS.get_ptr_mut(slot)) else {
        return;
    };
    // SAFETY: `s`, `mark` and `total` point into live map values; the
    // per-CPU part is this CPU's, changed with an atomic add as the other
    // counters are.
    unsafe {
        let pending = &raw mut (*s).mark_pending_bytes;
        add_i64(pending, delta);
        let held = core::ptr::read_volatile(pending);
        let armed = core::ptr::read_volatile(&(*mark).armed) != 0;
        let up = core::ptr::read_volatile(&(*mark).up_bytes);
        let shift = (core::ptr::read_volatile(&(*mark).shift) & 63) as u32;
        let room = up.saturating_sub(core::ptr::read_volatile(total));
        let batch = if !armed {
            MARK_MAX_BATCH
        } else if room > 0 {
            (room >> shift).min(MARK_MAX_BATCH)
        } else {
            0
        };
        // What a CPU holds back is never negative (frees go to the total
        // at once), so the total never runs ahead of the exact count and a
        // crossing it reports is real.
        if (0..=batch).contains(&held) {
            return;
        }
        let flushed = atomic_xchg::<i64, { AtomicOrdering::Relaxed }>(pending, 0);
        // The add's old value cannot be had without BPF_FETCH (not in the
        // generic CPU the object is built for): read the total after it.
        // A concurrent flush on another CPU only makes it larger, and the
        // exchange of `armed` below lets one CPU alone report a crossing.
        add_i64(total, flushed);
        let now = core::ptr::read_volatile(total);
        if !armed || now < up {
            return;
        }
        if atomic_xchg::<u64, { AtomicOrdering::Relaxed }>(&raw mut (*mark).armed, 0) == 0 {
            return; // another CPU's crossing
        }
        let sent = MARK_EVENTS.output::<MarkEvent>(
            &MarkEvent {
                slot,
                _pad: 0,
                total_bytes: now,
                up_bytes: up,
                ktime_ns: bpf_ktime_get_ns(),
            },
            0,
        );
        if sent.is_err() {
            // The ring is full: armed again, the next change reports it.
            core::ptr::write_volatile(&raw mut (*mark).armed, 1);
        }
    }
}

#[inline(always)]
pub fn add_mapped(slot: u32, delta: i64) {
    if let Some(s) = stats(slot) {
        // SAFETY: valid per-CPU map value pointer.
        unsafe { add_i64(&raw mut (*s).mapped_bytes, delta) };
    }
}

/// `len` rounded up to whole pages, as the kernel maps and unmaps it.
#[inline(always)]
pub fn page_align(len: u64) -> u64 {
    (len + 4095) & !4095
}
