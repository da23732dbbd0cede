//! `task_numa_fault`: NUMA balancing's hinting faults. To learn which node
//! uses a page, the kernel makes present pages inaccessible for a while;
//! the next access faults, `page_fault_user` sees it as any other fault,
//! and the kernel calls `task_numa_fault` from inside it (after migrating
//! the page, if it does). Such a fault brings no memory in, so it must not
//! give the region a new owner: the change `page_fault_user` made is undone
//! here, when it is this same fault's (see
//! `nodedb_governor_common::RegionCache`, and its limits).

use aya_ebpf::{macros::fentry, programs::FEntryContext};
use nodedb_governor_common::{RegionKey, kernel_event, region_cache};

use crate::{
    counters::{add_u64, insert_or_count, stats},
    identity::{identity, ids},
    maps::{REGION_CACHE, REGIONS},
    rss_stat::task_faults,
};

/// `void task_numa_fault(int last_cpupid, int mem_node, int pages, int
/// flags)`, called once per hinting fault (for a huge page, once for all
/// of it), in the faulting thread.
#[fentry(function = "task_numa_fault")]
pub fn task_numa_fault(_ctx: FEntryContext) -> u32 {
    match try_task_numa_fault() {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_task_numa_fault() -> Result<u32, u32> {
    let me = identity().ok_or(0u32)?;
    let cache = REGION_CACHE.get_ptr_mut(0).ok_or(0u32)?;
    let (tgid, tid) = ids();
    // SAFETY: this CPU's entry of a live per-CPU map, single aligned loads.
    // The change must be this fault's: this thread's, with its count of
    // finished faults unchanged since (any later fault, from user or
    // kernel mode, has a larger one). Read, then the thread's id again: a
    // task that preempted us and faulted here in between rewrote it.
    let (region, from) = unsafe {
        if core::ptr::read_volatile(&(*cache).moved_tid) != tid {
            return Ok(0);
        }
        let region = core::ptr::read_volatile(&(*cache).moved_region);
        let from = core::ptr::read_volatile(&(*cache).moved_from);
        let faults = core::ptr::read_volatile(&(*cache).moved_faults);
        if core::ptr::read_volatile(&(*cache).moved_tid) != tid || faults != task_faults() {
            return Ok(0);
        }
        core::ptr::write_volatile(&raw mut (*cache).moved_tid, 0);
        (region, from)
    };
    let key = RegionKey {
        tgid,
        _pad: 0,
        region,
    };
    // SAFETY: copy out of the map value.
    if unsafe { REGIONS.get(key) }.is_some_and(|v| v.holds(me.slot)) {
        insert_or_count(
            REGIONS.insert(key, from, 0),
            kernel_event::REGIONS_INSERT_FAILED,
        );
        if let Some(s) = stats(me.slot) {
            // SAFETY: valid per-CPU map value pointer.
            unsafe { add_u64(&raw mut (*s).hinting_faults_elsewhere, 1) };
        }
    }
    // SAFETY: as above; the next fault of this slot there looks again.
    unsafe {
        if region_cache::is_of(core::ptr::read_volatile(&(*cache).word), me.slot, region) {
            core::ptr::write_volatile(&raw mut (*cache).word, 0);
        }
    }
    Ok(0)
}
