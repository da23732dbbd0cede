//! `page_fault_user`: counts the faults of each slot and records which
//! engines faulted each 2 MiB region (which part, see
//! `nodedb_governor_common::regions`), and on which NUMA node, so
//! memory released by another thread (or from another node) can be
//! charged back to the engine that faulted it in, on that node.

use aya_ebpf::{
    helpers::bpf_get_numa_node_id, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use nodedb_governor_common::{
    REGION_SHIFT, RegionKey, kernel_event, region_cache, region_owner,
    regions::{NONE, RegionOwners},
};

use crate::{
    counters::{add_u64, insert_or_count, stats},
    identity::{identity, ids},
    maps::{REGION_CACHE, REGIONS},
    rss_stat::task_faults,
};

/// `TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long
/// error_code)` (x86; kernel 3.18+ as a tracepoint, BTF-typed from 5.5).
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user(ctx: BtfTracePointContext) -> u32 {
    match try_page_fault_user(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_page_fault_user(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    let Some(me) = identity() else {
        return Ok(0);
    };
    if let Some(s) = stats(me.slot) {
        // SAFETY: valid per-CPU map value pointer.
        unsafe { add_u64(&raw mut (*s).page_faults, 1) };
    }
    let address: u64 = ctx.arg(0);
    let region = address >> REGION_SHIFT;
    let unit = RegionOwners::unit(address);
    let cache = REGION_CACHE.get_ptr_mut(0).ok_or(0u32)?;
    // SAFETY: this CPU's entry of a live per-CPU map; single aligned loads
    // and stores. An owner change left by an earlier fault is over: this
    // is another fault (see `numa_hint`; its fault count rules out the
    // rest).
    unsafe {
        if core::ptr::read_volatile(&(*cache).moved_tid) != 0 {
            core::ptr::write_volatile(&raw mut (*cache).moved_tid, 0);
        }
    }
    // SAFETY: as above.
    let last = unsafe { core::ptr::read_volatile(&(*cache).word) };
    if last == region_cache::pack(me.slot, region, None)
        || last == region_cache::pack(me.slot, region, Some(unit))
    {
        return Ok(0);
    }
    // Who faulted which part of the region (see `RegionOwners`): a region
    // reused by another engine after an unmap changes hands as it faults
    // it in; two engines' mappings meeting in it share it.
    let (tgid, tid) = ids();
    let key = RegionKey {
        tgid,
        _pad: 0,
        region,
    };
    // SAFETY: the helper takes no arguments and reads this CPU's node id.
    let node = unsafe { bpf_get_numa_node_id() } as u32;
    let mine = region_owner::pack(me.slot, node);
    // SAFETY: copy out of the map value.
    let prev = match unsafe { REGIONS.get(key) } {
        Some(v) => *v,
        None => RegionOwners::EMPTY,
    };
    let now = RegionOwners::after_fault(prev, mine, unit);
    if now != prev {
        insert_or_count(
            REGIONS.insert(key, now, 0),
            kernel_event::REGIONS_INSERT_FAILED,
        );
        if prev.owner != NONE && prev.sole_slot() != Some(me.slot) {
            // For a hinting fault inside this same fault to undo (see
            // `numa_hint`); the thread's id goes last, so a reader that
            // sees it sees the rest.
            let faults = task_faults();
            // SAFETY: as above.
            unsafe {
                core::ptr::write_volatile(&raw mut (*cache).moved_tid, 0);
                core::ptr::write_volatile(&raw mut (*cache).moved_region, region);
                core::ptr::write_volatile(&raw mut (*cache).moved_from, prev);
                core::ptr::write_volatile(&raw mut (*cache).moved_faults, faults);
                core::ptr::write_volatile(&raw mut (*cache).moved_tid, tid);
            }
        }
    }
    // The region is this slot's alone: any fault of it there is skipped;
    // shared, only faults in this unit (the span moves unit by unit).
    let word = match now.sole_slot() {
        Some(s) if s == me.slot => region_cache::pack(me.slot, region, None),
        _ => region_cache::pack(me.slot, region, Some(unit)),
    };
    // SAFETY: as above; one 64-bit store.
    unsafe { core::ptr::write_volatile(&raw mut (*cache).word, word) };
    Ok(0)
}
