//! `munmap` and `madvise`: release syscalls are bracketed, so that negative
//! RSS deltas inside them go to the released range's owner (the engine that
//! faulted it in), never to the thread that released it. `munmap` also
//! takes the unmapped bytes off the owner's mapped count.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use nodedb_governor_common::{
    NO_NODE, NO_SLOT, REGION_SHIFT, RegionKey, ReleaseCtx, kernel_event, region_owner as owner,
    regions::{NONE, RegionOwners, UNITS},
};

use crate::{
    counters::{add_mapped, insert_or_count, page_align},
    identity::{identity, ids},
    maps::{REGION_CACHE, REGIONS, RELEASING, VOTES},
    record::{offsets, read_arg, read_ret},
};

/// Regions between a released range's ends sampled to find its owner.
const OWNER_SAMPLES: u64 = 30;
/// Distinct owners tallied per range.
const OWNER_CANDIDATES: usize = 4;

/// The engine that faulted most of `[addr, addr + len)` in, and the node
/// it was faulted in on (`NO_SLOT`, `NO_NODE` when no region of it is
/// known): a vote of the range's 64 KiB units (see
/// `nodedb_governor_common::regions`). Mappings are not 2 MiB aligned, so
/// a range's end regions are often shared with its neighbours: there each
/// unit of the range goes to the engine that faulted it, which keeps a
/// neighbour from taking the release. Between them, up to 30 regions
/// spread evenly over the range each give all their units to the engine
/// holding most of them. The node is that of the winner's first region
/// seen.
#[inline(always)]
pub fn region_owner(tgid: u32, addr: u64, len: u64) -> (u32, u32) {
    let Some(votes) = VOTES.get_ptr_mut(0) else {
        return (NO_SLOT, NO_NODE);
    };
    // SAFETY: this CPU's entry of a live per-CPU map, used by one program
    // at a time (classic tracepoint programs do not nest on a CPU).
    let votes = unsafe { &mut *votes };
    *votes = Votes::EMPTY;
    let end = addr + len.max(1) - 1;
    let first = addr >> REGION_SHIFT;
    let last = end >> REGION_SHIFT;
    let mut key = RegionKey {
        tgid,
        _pad: 0,
        region: first,
    };
    // The end regions, unit by unit.
    // SAFETY: a map value, read in place.
    if let Some(v) = unsafe { REGIONS.get(key) } {
        let hi = if first == last {
            RegionOwners::unit(end)
        } else {
            UNITS - 1
        };
        for (packed, units) in v.split(RegionOwners::unit(addr), hi) {
            votes.add(packed, units);
        }
    }
    if last == first {
        return votes.winner();
    }
    key.region = last;
    // SAFETY: a map value, read in place.
    if let Some(v) = unsafe { REGIONS.get(key) } {
        for (packed, units) in v.split(0, RegionOwners::unit(end)) {
            votes.add(packed, units);
        }
    }
    // The regions between, whole.
    let between = last - first - 1;
    let stride = between.div_ceil(OWNER_SAMPLES).max(1);
    for i in 0..OWNER_SAMPLES {
        key.region = first + 1 + i * stride;
        if key.region >= last {
            break;
        }
        // SAFETY: a map value, read in place.
        let Some(v) = (unsafe { REGIONS.get(key) }) else {
            continue;
        };
        let [(owner, mine), (other, theirs)] = v.split(0, UNITS - 1);
        votes.add(if theirs > mine { other } else { owner }, UNITS);
    }
    votes.winner()
}

/// A release's vote: up to `OWNER_CANDIDATES` engines and their units.
///
/// Kept in a per-CPU map ([`VOTES`]), not on the stack: the verifier
/// tracks a stack tally's values exactly, and every candidate filled or
/// not in every sampled region is a state of its own (with 30 samples,
/// 6.1's verifier processed some 577,000 instructions for `munmap`'s
/// program; at 62 it refused it, past 1,000,000). Values in a map are
/// just numbers to it, so the loop's states prune.
#[repr(C)]
pub struct Votes {
    slots: [u32; OWNER_CANDIDATES],
    nodes: [u32; OWNER_CANDIDATES],
    units: [u32; OWNER_CANDIDATES],
}

impl Votes {
    const EMPTY: Self = Self {
        slots: [NO_SLOT; OWNER_CANDIDATES],
        nodes: [NO_NODE; OWNER_CANDIDATES],
        units: [0; OWNER_CANDIDATES],
    };

    #[inline(always)]
    fn add(&mut self, packed: u32, units: u32) {
        if packed == NONE || units == 0 {
            return;
        }
        let slot = owner::slot(packed);
        for c in 0..OWNER_CANDIDATES {
            if self.slots[c] == slot || self.slots[c] == NO_SLOT {
                if self.slots[c] == NO_SLOT {
                    self.slots[c] = slot;
                    self.nodes[c] = owner::node(packed);
                }
                self.units[c] += units;
                return;
            }
        }
    }

    #[inline(always)]
    fn winner(&self) -> (u32, u32) {
        let mut best = 0;
        for c in 1..OWNER_CANDIDATES {
            if self.units[c] > self.units[best] {
                best = c;
            }
        }
        (self.slots[best], self.nodes[best])
    }
}

/// Starts a release of `[addr, addr + len)` by a governed thread.
#[inline(always)]
pub fn begin_release(addr: u64, len: u64) -> Result<u32, u32> {
    if identity().is_none() {
        return Ok(0);
    }
    let (tgid, tid) = ids();
    let (owner_slot, owner_node) = region_owner(tgid, addr, len);
    let ctx = ReleaseCtx {
        owner_slot,
        owner_node,
        len,
        addr,
    };
    insert_or_count(
        RELEASING.insert(tid, ctx, 0),
        kernel_event::RELEASING_INSERT_FAILED,
    );
    Ok(0)
}

/// Ends a release syscall; returns the context if there was one.
#[inline(always)]
pub fn end_release() -> Option<ReleaseCtx> {
    let (_, tid) = ids();
    // SAFETY: copy out of the map value.
    let ctx = unsafe { RELEASING.get(tid) }.copied()?;
    let _ = RELEASING.remove(tid);
    Some(ctx)
}

// name: sys_enter_munmap
// format, after the common fields (see `record`):
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:unsigned long addr;	offset:16;	size:8;	signed:0;
// 	field:size_t len;	offset:24;	size:8;	signed:0;
#[tracepoint(category = "syscalls", name = "sys_enter_munmap")]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    match try_sys_enter_munmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_enter_munmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let off = offsets();
    begin_release(
        read_arg(ctx, off.munmap_addr),
        read_arg(ctx, off.munmap_len),
    )
}

// name: sys_exit_munmap (and every sys_exit_* we attach to)
// format, after the common fields (see `record`):
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:long ret;	offset:16;	size:8;	signed:1;
#[tracepoint(category = "syscalls", name = "sys_exit_munmap")]
pub fn sys_exit_munmap(ctx: TracePointContext) -> u32 {
    match try_sys_exit_munmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_exit_munmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let Some(rel) = end_release() else {
        return Ok(0);
    };
    if read_ret(ctx) != 0 {
        return Ok(0);
    }
    let Some(slot) = identity().map(|me| me.slot) else {
        return Ok(0);
    };
    let owner = if rel.owner_slot != NO_SLOT {
        rel.owner_slot
    } else {
        slot
    };
    add_mapped(owner, -(page_align(rel.len) as i64));
    forget_regions(rel.addr, page_align(rel.len));
    Ok(0)
}

/// Regions between an unmapped range's ends whose owners are dropped (2
/// GiB); past them, they are left to be taken over by their next faults.
const FORGET_REGIONS: u64 = 1024;

/// `[addr, addr + len)` was unmapped: its units are nobody's now (see
/// `RegionOwners::released`). Memory mapped there again then starts with
/// no owner, and its first fault owns its region: a huge page's one fault
/// brings a whole region in, which a unit-by-unit takeover from a stale
/// owner would leave to the engine that unmapped it.
#[inline(always)]
fn forget_regions(addr: u64, len: u64) {
    if len == 0 {
        return;
    }
    let (tgid, _) = ids();
    let end = addr + len - 1;
    let first = addr >> REGION_SHIFT;
    let last = end >> REGION_SHIFT;
    let hi = if first == last {
        RegionOwners::unit(end)
    } else {
        UNITS - 1
    };
    forget_units(tgid, first, RegionOwners::unit(addr), hi);
    if last == first {
        return;
    }
    forget_units(tgid, last, 0, RegionOwners::unit(end));
    let mut key = RegionKey {
        tgid,
        _pad: 0,
        region: first,
    };
    for i in 0..FORGET_REGIONS {
        key.region = first + 1 + i;
        if key.region >= last {
            break;
        }
        let _ = REGIONS.remove(key);
    }
    // This CPU's cache may name one of them as the running slot's: its
    // next fault there must record it again.
    if let Some(cache) = REGION_CACHE.get_ptr_mut(0) {
        // SAFETY: this CPU's entry of a live per-CPU map; one aligned store.
        unsafe { core::ptr::write_volatile(&raw mut (*cache).word, 0) };
    }
}

/// The units `lo..=hi` of `region` were unmapped.
#[inline(always)]
fn forget_units(tgid: u32, region: u64, lo: u32, hi: u32) {
    let key = RegionKey {
        tgid,
        _pad: 0,
        region,
    };
    // SAFETY: copy out of the map value.
    let v = match unsafe { REGIONS.get(key) } {
        Some(v) => *v,
        None => return,
    };
    let next = v.released(lo, hi);
    if next == RegionOwners::EMPTY {
        let _ = REGIONS.remove(key);
    } else if next != v {
        insert_or_count(
            REGIONS.insert(key, next, 0),
            kernel_event::REGIONS_INSERT_FAILED,
        );
    }
}

// name: sys_enter_madvise
// format, after the common fields (see `record`):
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:unsigned long start;	offset:16;	size:8;	signed:0;
// 	field:size_t len_in;	offset:24;	size:8;	signed:0;
// 	field:int behavior;	offset:32;	size:8;	signed:0;
#[tracepoint(category = "syscalls", name = "sys_enter_madvise")]
pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
    match try_sys_enter_madvise(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_enter_madvise(ctx: &TracePointContext) -> Result<u32, u32> {
    let off = offsets();
    begin_release(
        read_arg(ctx, off.madvise_start),
        read_arg(ctx, off.madvise_len),
    )
}

/// Only closes the bracket: madvise maps and unmaps nothing.
#[tracepoint(category = "syscalls", name = "sys_exit_madvise")]
pub fn sys_exit_madvise(_ctx: TracePointContext) -> u32 {
    let _ = end_release();
    0
}
