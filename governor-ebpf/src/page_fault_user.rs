//! `page_fault_user`: counts the faults of each slot and records which
//! engine last faulted each 2 MiB region, and on which NUMA node, so
//! memory released by another thread (or from another node) can be
//! charged back to the engine that faulted it in, on that node.

use aya_ebpf::{
    helpers::bpf_get_numa_node_id, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use nodedb_governor_common::{REGION_SHIFT, RegionKey, kernel_event, region_cache, region_owner};

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
    let word = region_cache::pack(me.slot, region);
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&(*cache).word) } == word {
        return Ok(0);
    }
    // Last faulter owns the region: a region reused by another engine after
    // an unmap changes hands on its first fault.
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
    let owner = unsafe { REGIONS.get(key) }.copied();
    if owner != Some(mine) {
        insert_or_count(
            REGIONS.insert(key, mine, 0),
            kernel_event::REGIONS_INSERT_FAILED,
        );
        if let Some(from) = owner.filter(|&v| region_owner::slot(v) != me.slot) {
            // For a hinting fault inside this same fault to undo (see
            // `numa_hint`); the thread's id goes last, so a reader that
            // sees it sees the rest.
            let faults = task_faults();
            // SAFETY: as above.
            unsafe {
                core::ptr::write_volatile(&raw mut (*cache).moved_tid, 0);
                core::ptr::write_volatile(&raw mut (*cache).moved_region, region);
                core::ptr::write_volatile(&raw mut (*cache).moved_from, from);
                core::ptr::write_volatile(&raw mut (*cache).moved_faults, faults);
                core::ptr::write_volatile(&raw mut (*cache).moved_tid, tid);
            }
        }
    }
    // SAFETY: as above; one 64-bit store.
    unsafe { core::ptr::write_volatile(&raw mut (*cache).word, word) };
    Ok(0)
}
