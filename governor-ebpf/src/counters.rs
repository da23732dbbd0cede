//! Adding to a slot's per-CPU counters ([`SlotStats`]).

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use nodedb_governor_common::{SlotStats, kind};

use crate::maps::STATS;

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

#[inline(always)]
pub fn add_resident(slot: u32, bucket: usize, delta: i64) {
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
