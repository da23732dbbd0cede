//! Kernel side of nodedb-governor: attributes resident-memory changes of
//! governed processes to the engine of the thread that caused them.
//!
//! # Sources and why
//! * `kmem/rss_stat` (classic tracepoint, kernel 5.5+) is the *quantity*
//!   source. It fires whenever one of an address space's RSS counters
//!   (`MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SWAPENTS`, `MM_SHMEMPAGES`) changes
//!   and carries the counter's new value in bytes. We keep the last value per
//!   (mm, counter) and take the difference with an atomic exchange, so the
//!   deltas attributed on all CPUs always telescope to the kernel's own
//!   counter: engines + unattributed add up to VmRSS by construction. On 6.1
//!   (`SPLIT_RSS_COUNTING`) the event fires when a thread flushes its cached
//!   counts (every 64 events, and at exit), still in that thread's context;
//!   from 6.2 it fires on every change and the kernel sums the per-CPU
//!   counters for the record, a cost we measured (see the agent's
//!   `attribution` module docs and the README).
//! * `exceptions/page_fault_user` (BTF tracepoint) counts faults and records
//!   which engine last faulted each 2 MiB region, so memory released by
//!   another thread can be charged back to the engine that faulted it in.
//! * `syscalls/sys_{enter,exit}_{munmap,madvise,brk,mmap}` bracket release
//!   syscalls (so negative deltas inside them go to the region's owner, never
//!   to the releaser) and count mapped bytes.
//! * `sched/sched_process_fork` and `sched/sched_process_exit` keep the TID
//!   fallback map right as threads come and go.
//!
//! Nothing is sent to userspace per event: all counters are per-CPU array
//! entries that the agent sums when it reads them.
#![no_std]
#![no_main]
// The bpf target has no compare-and-swap, so core's Atomic* types hide
// fetch_add/swap; the intrinsics lower to BPF_ATOMIC add and xchg (ISA v3).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics, see above")]

use core::intrinsics::{AtomicOrdering, atomic_xadd, atomic_xchg};

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext},
};
use nodedb_governor_common::{
    CgroupKey, MAX_ENGINE_CGROUPS, MAX_PROCS, MAX_REGIONS, MAX_SLOTS, MAX_TIDS, MmState, NO_SLOT,
    PendingMap, ProcInfo, REGION_SHIFT, RegionKey, ReleaseCtx, SYSCALL_BRK, SYSCALL_MADVISE,
    SYSCALL_MUNMAP, SlotStats, TraceOffsets, kind,
};

/// Written by the agent at load time from tracefs `format` files.
#[unsafe(no_mangle)]
static OFFSETS: TraceOffsets = TraceOffsets {
    rss_stat_mm_id: 0,
    rss_stat_curr: 0,
    rss_stat_member: 0,
    rss_stat_size: 0,
    munmap_addr: 0,
    munmap_len: 0,
    madvise_start: 0,
    madvise_len: 0,
    brk_brk: 0,
    mmap_len: 0,
    sys_exit_ret: 0,
    fork_parent_pid: 0,
    fork_child_pid: 0,
    _pad: 0,
    member_kind: [kind::UNKNOWN; 8],
};

#[map]
static STATS: PerCpuArray<SlotStats> = PerCpuArray::with_max_entries(MAX_SLOTS, 0);
#[map]
static PROCS: HashMap<u32, ProcInfo> = HashMap::with_max_entries(MAX_PROCS, 0);
#[map]
static ENGINE_BY_CGROUP: HashMap<CgroupKey, u32> = HashMap::with_max_entries(MAX_ENGINE_CGROUPS, 0);
#[map]
static ENGINE_BY_TID: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TIDS, 0);
#[map]
static MM_STATE: HashMap<u32, MmState> = HashMap::with_max_entries(MAX_PROCS * 4, 0);
#[map]
static REGIONS: LruHashMap<RegionKey, u32> = LruHashMap::with_max_entries(MAX_REGIONS, 0);
#[map]
static RELEASING: HashMap<u32, ReleaseCtx> = HashMap::with_max_entries(MAX_TIDS, 0);
#[map]
static PENDING_MMAP: HashMap<u32, PendingMap> = HashMap::with_max_entries(MAX_TIDS, 0);
/// Last brk of each governed process (by TGID), to size brk growth/shrink.
#[map]
static BRK: HashMap<u32, u64> = HashMap::with_max_entries(MAX_PROCS, 0);

#[inline(always)]
fn offsets() -> TraceOffsets {
    // SAFETY: OFFSETS is a plain static; the volatile read stops the compiler
    // from folding the zero initialiser, since the loader rewrites .rodata.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

#[inline(always)]
fn ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Engine slot of the current thread: its cgroup first, then the TID map,
/// else the process's unattributed slot.
#[inline(always)]
fn current_slot(tgid: u32, tid: u32, proc_: &ProcInfo) -> u32 {
    let key = CgroupKey {
        // SAFETY: the helper takes no arguments and only reads current.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid,
        _pad: 0,
    };
    // SAFETY: map values are plain integers; we copy them out at once.
    if let Some(slot) = unsafe { ENGINE_BY_CGROUP.get(&key) } {
        return *slot;
    }
    // SAFETY: as above.
    if let Some(slot) = unsafe { ENGINE_BY_TID.get(&tid) } {
        return *slot;
    }
    proc_.unattributed_slot
}

#[inline(always)]
fn stats(slot: u32) -> Option<*mut SlotStats> {
    STATS.get_ptr_mut(slot)
}

#[inline(always)]
fn add_i64(field: *mut i64, delta: i64) {
    // SAFETY: `field` points into a live per-CPU map value; the atomic add
    // keeps a preempted update on the same CPU from being lost.
    unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(field, delta) };
}

#[inline(always)]
fn add_u64(field: *mut u64, delta: u64) {
    // SAFETY: as in add_i64.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(field, delta) };
}

#[inline(always)]
fn add_resident(slot: u32, bucket: usize, delta: i64) {
    if let Some(s) = stats(slot) {
        // SAFETY: `s` is a valid per-CPU map value pointer; the bucket index
        // is bounds-checked against the array by the caller (< kind::COUNT).
        unsafe {
            add_i64(&raw mut (*s).resident_bytes[bucket & (kind::COUNT - 1)], delta);
            add_u64(&raw mut (*s).rss_events, 1);
        }
    }
}

#[inline(always)]
fn add_mapped(slot: u32, delta: i64) {
    if let Some(s) = stats(slot) {
        // SAFETY: valid per-CPU map value pointer.
        unsafe { add_i64(&raw mut (*s).mapped_bytes, delta) };
    }
}

// ---------------------------------------------------------------- rss_stat

// name: rss_stat
// format:
//   field:unsigned short common_type;        offset:0; size:2; signed:0;
//   field:unsigned char common_flags;        offset:2; size:1; signed:0;
//   field:unsigned char common_preempt_count; offset:3; size:1; signed:0;
//   field:int common_pid;                    offset:4; size:4; signed:1;
//   field:unsigned int mm_id;                offset:8; size:4; signed:0;
//   field:unsigned int curr;                 offset:12; size:4; signed:0;
//   field:int member;                        offset:16; size:4; signed:1;
//   field:long size;                         offset:24; size:8; signed:1;
// (6.18 host; offsets are read at load time, this is for the eye only)
#[tracepoint(category = "kmem", name = "rss_stat")]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    match try_rss_stat(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_rss_stat(ctx: &TracePointContext) -> Result<u32, u32> {
    let off = offsets();
    // SAFETY: offsets come from this kernel's format file for this record.
    let (mm_id, curr, member, size) = unsafe {
        (
            ctx.read_at::<u32>(off.rss_stat_mm_id as usize).map_err(|_| 1u32)?,
            ctx.read_at::<u32>(off.rss_stat_curr as usize).map_err(|_| 1u32)?,
            ctx.read_at::<i32>(off.rss_stat_member as usize).map_err(|_| 1u32)?,
            ctx.read_at::<i64>(off.rss_stat_size as usize).map_err(|_| 1u32)?,
        )
    };
    let bucket = off.member_kind[(member as usize) & 7];
    if bucket == kind::UNKNOWN || member < 0 || member > 7 {
        return Ok(0);
    }
    let bucket = bucket as usize & (kind::COUNT - 1);
    let (tgid, tid) = ids();

    if curr == 0 {
        // The change was made from outside the address space (reclaim,
        // exit_mmap after the mm was detached, remote access): only an mm we
        // already know belongs to a governed process.
        let Some(state) = MM_STATE.get_ptr_mut(&mm_id) else {
            return Ok(0);
        };
        // SAFETY: valid map value pointer.
        let owner_tgid = unsafe { (*state).tgid };
        // SAFETY: copy out of the map value.
        let Some(proc_) = (unsafe { PROCS.get(&owner_tgid) }) else {
            return Ok(0);
        };
        let delta = exchange_last(state, bucket, size);
        if delta != 0 {
            add_resident(proc_.external_slot, bucket, delta);
        }
        return Ok(0);
    }

    // SAFETY: copy out of the map value.
    let Some(proc_) = (unsafe { PROCS.get(&tgid) }) else {
        return Ok(0);
    };
    let state = match MM_STATE.get_ptr_mut(&mm_id) {
        Some(s) => s,
        None => {
            let fresh = MmState {
                last_bytes: proc_.baseline_bytes,
                tgid,
                _pad: 0,
            };
            // BPF_NOEXIST: if another CPU created it first, use theirs.
            let _ = MM_STATE.insert(&mm_id, &fresh, 1);
            MM_STATE.get_ptr_mut(&mm_id).ok_or(1u32)?
        }
    };
    let delta = exchange_last(state, bucket, size);
    if delta == 0 {
        return Ok(0);
    }
    let slot = current_slot(tgid, tid, proc_);
    if delta < 0 {
        // Memory going away inside a release syscall belongs to whoever
        // faulted the range in, not to the thread that released it.
        // SAFETY: copy out of the map value.
        if let Some(rel) = unsafe { RELEASING.get(&tid) } {
            let owner = rel.owner_slot;
            if owner != NO_SLOT && owner != slot {
                add_resident(owner, bucket, delta);
                if let Some(s) = stats(slot) {
                    // SAFETY: valid per-CPU map value pointer.
                    unsafe { add_i64(&raw mut (*s).released_for_others_bytes, -delta) };
                }
                return Ok(0);
            }
        }
    }
    add_resident(slot, bucket, delta);
    Ok(0)
}

#[inline(always)]
fn exchange_last(state: *mut MmState, bucket: usize, size: i64) -> i64 {
    // SAFETY: `state` is a valid map value pointer; the exchange is atomic
    // so concurrent events on other CPUs each see a distinct predecessor.
    let old = unsafe {
        let last = &raw mut (*state).last_bytes[bucket & (kind::COUNT - 1)];
        atomic_xchg::<i64, { AtomicOrdering::Relaxed }>(last, size)
    };
    size - old
}

// ---------------------------------------------------------- page faults

/// `TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long
/// error_code)` (x86; kernel 3.18+ as a tracepoint, BTF-typed from 5.5).
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user(ctx: BtfTracePointContext) -> u32 {
    let (tgid, tid) = ids();
    // SAFETY: copy out of the map value.
    let Some(proc_) = (unsafe { PROCS.get(&tgid) }) else {
        return 0;
    };
    let slot = current_slot(tgid, tid, proc_);
    if let Some(s) = stats(slot) {
        // SAFETY: valid per-CPU map value pointer.
        unsafe { add_u64(&raw mut (*s).page_faults, 1) };
    }
    let address: u64 = ctx.arg(0);
    let key = RegionKey {
        tgid,
        _pad: 0,
        region: address >> REGION_SHIFT,
    };
    // Last faulter owns the region: a region reused by another engine after
    // an unmap changes hands on its first fault. Write only on change, so
    // the common case is one lookup.
    // SAFETY: copy out of the map value.
    let known = unsafe { REGIONS.get(&key) }.copied();
    if known != Some(slot) {
        let _ = REGIONS.insert(&key, &slot, 0);
    }
    0
}

// ------------------------------------------------------ release syscalls

/// Regions of a released range sampled to find its owner.
const OWNER_SAMPLES: u64 = 64;
/// Distinct owners tallied per range.
const OWNER_CANDIDATES: usize = 4;

/// The engine that faulted most of `[addr, addr + len)` in: a majority vote
/// over up to 64 regions spread evenly over the range. Mappings are not
/// 2 MiB aligned, so a range's first region is often shared with a
/// neighbour; the vote keeps that neighbour from taking the whole release.
#[inline(always)]
fn region_owner(tgid: u32, addr: u64, len: u64) -> u32 {
    let first = addr >> REGION_SHIFT;
    let last = (addr + len.max(1) - 1) >> REGION_SHIFT;
    let regions = last - first + 1;
    let stride = regions.div_ceil(OWNER_SAMPLES).max(1);
    let mut slots = [NO_SLOT; OWNER_CANDIDATES];
    let mut votes = [0u32; OWNER_CANDIDATES];
    let mut key = RegionKey {
        tgid,
        _pad: 0,
        region: first,
    };
    for i in 0..OWNER_SAMPLES {
        key.region = first + i * stride;
        if key.region > last {
            break;
        }
        // SAFETY: copy out of the map value.
        let Some(owner) = (unsafe { REGIONS.get(&key) }).copied() else {
            continue;
        };
        for c in 0..OWNER_CANDIDATES {
            if slots[c] == owner || slots[c] == NO_SLOT {
                slots[c] = owner;
                votes[c] += 1;
                break;
            }
        }
    }
    let mut best = 0;
    for c in 1..OWNER_CANDIDATES {
        if votes[c] > votes[best] {
            best = c;
        }
    }
    slots[best]
}

#[inline(always)]
fn begin_release(syscall: u32, addr: u64, len: u64) -> u32 {
    let (tgid, tid) = ids();
    // SAFETY: copy out of the map value.
    if unsafe { PROCS.get(&tgid) }.is_none() {
        return 0;
    }
    let ctx = ReleaseCtx {
        owner_slot: region_owner(tgid, addr, len),
        syscall,
        len,
    };
    let _ = RELEASING.insert(&tid, &ctx, 0);
    0
}

/// Ends a release syscall; returns the context if there was one.
#[inline(always)]
fn end_release() -> Option<(u32, u32, ReleaseCtx)> {
    let (tgid, tid) = ids();
    // SAFETY: copy out of the map value.
    let ctx = unsafe { RELEASING.get(&tid) }.copied()?;
    let _ = RELEASING.remove(&tid);
    Some((tgid, tid, ctx))
}

#[inline(always)]
fn read_arg(ctx: &TracePointContext, off: u32) -> u64 {
    // SAFETY: offset from this kernel's format file for this record.
    unsafe { ctx.read_at::<u64>(off as usize) }.unwrap_or(0)
}

#[inline(always)]
fn read_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: as read_arg.
    unsafe { ctx.read_at::<i64>(offsets().sys_exit_ret as usize) }.unwrap_or(-1)
}

#[tracepoint(category = "syscalls", name = "sys_enter_munmap")]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    let off = offsets();
    begin_release(
        SYSCALL_MUNMAP,
        read_arg(&ctx, off.munmap_addr),
        read_arg(&ctx, off.munmap_len),
    )
}

#[tracepoint(category = "syscalls", name = "sys_exit_munmap")]
pub fn sys_exit_munmap(ctx: TracePointContext) -> u32 {
    let Some((tgid, tid, rel)) = end_release() else {
        return 0;
    };
    if read_ret(&ctx) != 0 {
        return 0;
    }
    // SAFETY: copy out of the map value.
    let Some(proc_) = (unsafe { PROCS.get(&tgid) }) else {
        return 0;
    };
    let owner = if rel.owner_slot != NO_SLOT {
        rel.owner_slot
    } else {
        current_slot(tgid, tid, proc_)
    };
    add_mapped(owner, -(page_align(rel.len) as i64));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_madvise")]
pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
    let off = offsets();
    begin_release(
        SYSCALL_MADVISE,
        read_arg(&ctx, off.madvise_start),
        read_arg(&ctx, off.madvise_len),
    )
}

#[tracepoint(category = "syscalls", name = "sys_exit_madvise")]
pub fn sys_exit_madvise(_ctx: TracePointContext) -> u32 {
    let _ = end_release();
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_brk")]
pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
    let (tgid, _) = ids();
    let new_brk = read_arg(&ctx, offsets().brk_brk);
    // SAFETY: copy out of the map value.
    let Some(last) = (unsafe { BRK.get(&tgid) }).copied() else {
        return 0;
    };
    if new_brk != 0 && new_brk < last {
        // Shrinking: [new_brk, last) goes away, owned by whoever faulted it.
        return begin_release(SYSCALL_BRK, new_brk, last - new_brk);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_brk")]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    let _ = end_release();
    // SAFETY: copy out of the map value.
    let Some(proc_) = (unsafe { PROCS.get(&tgid) }) else {
        return 0;
    };
    let now = read_ret(&ctx) as u64;
    // SAFETY: copy out of the map value.
    let last = unsafe { BRK.get(&tgid) }.copied();
    let _ = BRK.insert(&tgid, &now, 0);
    if let Some(last) = last
        && now > last
    {
        add_mapped(current_slot(tgid, tid, proc_), (now - last) as i64);
    } else if let Some(last) = last
        && now < last
    {
        let owner = match region_owner(tgid, now, last - now) {
            NO_SLOT => current_slot(tgid, tid, proc_),
            s => s,
        };
        add_mapped(owner, -((last - now) as i64));
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mmap")]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    // SAFETY: copy out of the map value.
    if unsafe { PROCS.get(&tgid) }.is_none() {
        return 0;
    }
    let pending = PendingMap {
        len: read_arg(&ctx, offsets().mmap_len),
    };
    let _ = PENDING_MMAP.insert(&tid, &pending, 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_mmap")]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    let (tgid, tid) = ids();
    // SAFETY: copy out of the map value.
    let Some(pending) = (unsafe { PENDING_MMAP.get(&tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_MMAP.remove(&tid);
    let ret = read_ret(&ctx);
    // Errors are -4095..-1; anything else is the mapped address.
    if (-4095..0).contains(&ret) {
        return 0;
    }
    // SAFETY: copy out of the map value.
    let Some(proc_) = (unsafe { PROCS.get(&tgid) }) else {
        return 0;
    };
    add_mapped(current_slot(tgid, tid, proc_), page_align(pending.len) as i64);
    0
}

#[inline(always)]
fn page_align(len: u64) -> u64 {
    (len + 4095) & !4095
}

// ------------------------------------------------------- thread lifetime

/// A thread created by a thread with a TID-map engine inherits it, as a
/// thread inherits its cgroup.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    let off = offsets();
    // SAFETY: offsets from this kernel's format file for this record.
    let (parent, child) = unsafe {
        (
            ctx.read_at::<u32>(off.fork_parent_pid as usize).unwrap_or(0),
            ctx.read_at::<u32>(off.fork_child_pid as usize).unwrap_or(0),
        )
    };
    // SAFETY: copy out of the map value.
    if let Some(slot) = unsafe { ENGINE_BY_TID.get(&parent) }.copied() {
        let _ = ENGINE_BY_TID.insert(&child, &slot, 0);
    }
    0
}

/// Forget an exiting thread, so a recycled TID does not inherit its engine.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = ids();
    let _ = ENGINE_BY_TID.remove(&tid);
    let _ = RELEASING.remove(&tid);
    let _ = PENDING_MMAP.remove(&tid);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
