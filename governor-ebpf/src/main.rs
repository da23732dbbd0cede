//! Kernel side of nodedb-governor: attributes resident-memory changes of
//! governed processes to the engine of the thread that caused them.
//!
//! # Sources and why
//! * `rss_stat` (BTF tracepoint, kernel 5.5+) is the *quantity* source. It
//!   fires whenever one of an address space's RSS counters (`MM_FILEPAGES`,
//!   `MM_ANONPAGES`, `MM_SWAPENTS`, `MM_SHMEMPAGES`) changes. We read the
//!   counter's value from the `mm_struct` ourselves (its offsets come from
//!   kernel BTF at load time), keep the last value per (mm, counter) and take
//!   the difference with an atomic exchange, so the deltas attributed on all
//!   CPUs always telescope to the kernel's own counter: engines +
//!   unattributed add up to the process's RSS by construction. The classic
//!   tracepoint would hand us the value, but it costs a perf record and an
//!   exact per-CPU sum on every event (4.6% of a page fault on the 6.18 host
//!   with an *empty* program, against 0.1% for the BTF tracepoint).
//! * `page_fault_user` (BTF tracepoint, x86) counts faults and records which
//!   engine last faulted each 2 MiB region, so memory released by another
//!   thread can be charged back to the engine that faulted it in.
//! * `syscalls/sys_{enter,exit}_{munmap,madvise,brk,mmap}` bracket release
//!   syscalls (so negative deltas inside them go to the range's owner, never
//!   to the releaser) and count mapped bytes.
//! * `sched/sched_process_fork` and `sched/sched_process_exit` keep the TID
//!   fallback map right as threads come and go.
//!
//! # The hot path
//! Every page fault runs `page_fault_user` and `rss_stat`, so both avoid
//! helper calls and hash lookups in the common case (on the nested-virtual
//! 6.18 host a single helper call costs about 1.4% of a fault). The running
//! thread's identity lives in a per-CPU cache that `sched_switch` clears when
//! another task gets the CPU; the process's counter state is an array entry;
//! the counter is read with a direct BTF load.
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
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_probe_read_kernel,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{BtfTracePointContext, TracePointContext},
};
use nodedb_governor_common::{
    CgroupKey, KernelLayout, MAX_ENGINE_CGROUPS, MAX_PROCS, MAX_REGIONS, MAX_SLOTS, MAX_TIDS,
    MmState, NO_SLOT, PendingMap, ProcInfo, REGION_SHIFT, RegionKey, ReleaseCtx, SlotStats,
    TraceOffsets, identity as ident, kind, region_cache,
};

/// Written by the agent at load time from tracefs `format` files.
#[unsafe(no_mangle)]
static OFFSETS: TraceOffsets = TraceOffsets {
    munmap_addr: 0,
    munmap_len: 0,
    madvise_start: 0,
    madvise_len: 0,
    brk_brk: 0,
    mmap_len: 0,
    sys_exit_ret: 0,
    fork_parent_pid: 0,
    fork_child_pid: 0,
};

/// Written by the agent at load time from kernel BTF. The verifier sees
/// these as constants (read-only data), which is what lets `rss_stat` load
/// the counter straight from the `mm_struct`.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout {
    rss_counter: [0; 4],
    task_mm: 0,
    page_shift: 12,
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
/// Counter state per governed process, at its `ProcInfo::mm_index`.
#[map]
static MM_STATES: Array<MmState> = Array::with_max_entries(MAX_PROCS, 0);
/// `mm_struct` address to `MM_STATES` index, for changes made from outside
/// the process (reclaim), where the running thread says nothing.
#[map]
static MM_BY_PTR: HashMap<u64, u32> = HashMap::with_max_entries(MAX_PROCS, 0);
#[map]
static REGIONS: LruHashMap<RegionKey, u32> = LruHashMap::with_max_entries(MAX_REGIONS, 0);
#[map]
static RELEASING: HashMap<u32, ReleaseCtx> = HashMap::with_max_entries(MAX_TIDS, 0);
#[map]
static PENDING_MMAP: HashMap<u32, PendingMap> = HashMap::with_max_entries(MAX_TIDS, 0);
/// Last brk of each governed process (by TGID), to size brk growth/shrink.
#[map]
static BRK: HashMap<u32, u64> = HashMap::with_max_entries(MAX_PROCS, 0);
/// The registry generation (see `nodedb_governor_common::identity`): the
/// agent adds a large step on every change to PROCS, ENGINE_BY_CGROUP or
/// ENGINE_BY_TID; `cgroup_attach_task` adds 1 whenever a task changes
/// cgroup.
#[map]
static GENERATION: Array<u64> = Array::with_max_entries(1, 0);
/// The running thread's identity, one packed word per CPU.
#[map]
static IDENTITY_CACHE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// The last region whose owner was recorded, one packed word per CPU.
#[map]
static REGION_CACHE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

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

/// Who the running thread is, for attribution.
#[derive(Clone, Copy)]
struct Identity {
    slot: u32,
    mm_index: u32,
}

/// The running thread's identity, or None if its process is not governed:
/// its cgroup first, then the TID map, else the process's unattributed
/// slot. Served from the per-CPU cache word while the same task keeps the
/// CPU and the generation holds.
#[inline(always)]
fn identity() -> Option<Identity> {
    let cache = IDENTITY_CACHE.get_ptr_mut(0)?;
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: `cache` is this CPU's entry of a live per-CPU map.
    let word = unsafe { core::ptr::read_volatile(cache) };
    if !ident::current(word, generation) {
        return resolve_identity(cache, generation);
    }
    (word & ident::GOVERNED != 0).then_some(Identity {
        slot: ident::slot(word),
        mm_index: ident::mm_index(word),
    })
}

/// The cache missed: resolve from the maps and refill it.
#[inline(always)]
fn resolve_identity(cache: *mut u64, generation: u64) -> Option<Identity> {
    let (tgid, tid) = ids();
    // SAFETY: map values are plain integers; we copy them out at once.
    let found = unsafe { PROCS.get(tgid) }.copied().map(|proc_| {
        let key = CgroupKey {
            // SAFETY: the helper takes no arguments and only reads current.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            tgid,
            _pad: 0,
        };
        // SAFETY: as above.
        let slot = if let Some(slot) = unsafe { ENGINE_BY_CGROUP.get(key) } {
            *slot
        } else if let Some(slot) = unsafe { ENGINE_BY_TID.get(tid) } {
            *slot
        } else {
            proc_.unattributed_slot
        };
        Identity {
            slot,
            mm_index: proc_.mm_index,
        }
    });
    let word = match found {
        Some(me) => ident::pack(true, me.slot, me.mm_index, generation),
        None => ident::pack(false, 0, 0, generation),
    };
    // SAFETY: as in identity(); one 64-bit store, so never torn.
    unsafe { core::ptr::write_volatile(cache, word) };
    found
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
fn add_mapped(slot: u32, delta: i64) {
    if let Some(s) = stats(slot) {
        // SAFETY: valid per-CPU map value pointer.
        unsafe { add_i64(&raw mut (*s).mapped_bytes, delta) };
    }
}

// ------------------------------------------------------ task switches

/// `TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct
/// *next, unsigned int prev_state)`: another task gets this CPU, so the
/// identity cache no longer describes the running thread.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(_ctx: BtfTracePointContext) -> u32 {
    for cache in [IDENTITY_CACHE.get_ptr_mut(0), REGION_CACHE.get_ptr_mut(0)]
        .into_iter()
        .flatten()
    {
        // SAFETY: this CPU's entry of a live per-CPU map.
        unsafe { core::ptr::write_volatile(cache, 0) };
    }
    0
}

/// `TP_PROTO(struct cgroup *dst_cgrp, const char *path, struct task_struct
/// *task, bool threadgroup)`: a task changed cgroup, so cached identities
/// may be stale.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_task(_ctx: BtfTracePointContext) -> u32 {
    if let Some(g) = GENERATION.get_ptr_mut(0) {
        add_u64(g, 1);
    }
    0
}

// ---------------------------------------------------------------- rss_stat

/// `TP_PROTO(struct mm_struct *mm, int member)` from 6.2;
/// `TP_PROTO(struct mm_struct *mm, int member, long count)` before. Only the
/// first two arguments are used, so both shapes work.
#[btf_tracepoint(function = "rss_stat")]
pub fn rss_stat(ctx: BtfTracePointContext) -> u32 {
    match try_rss_stat(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

/// Reads counter `member` of `mm` (pages), with `bpf_probe_read_kernel`:
/// a direct BTF load would be neater, but 6.1's verifier refuses one that
/// lands inside an array of `atomic_long_t` ("not a struct").
#[inline(always)]
fn read_counter(mm: *const u8, member: u32) -> i64 {
    // SAFETY: LAYOUT holds this kernel's offsets of the RSS counters inside
    // mm_struct (from BTF); `mm` is the tracepoint's mm_struct pointer. The
    // helper tolerates a bad address (it returns an error, read as 0).
    unsafe {
        let off = match member {
            0 => core::ptr::read_volatile(&LAYOUT.rss_counter[0]),
            1 => core::ptr::read_volatile(&LAYOUT.rss_counter[1]),
            2 => core::ptr::read_volatile(&LAYOUT.rss_counter[2]),
            _ => core::ptr::read_volatile(&LAYOUT.rss_counter[3]),
        };
        bpf_probe_read_kernel(mm.add(off as usize) as *const i64).unwrap_or(0)
    }
}

fn try_rss_stat(ctx: &BtfTracePointContext) -> Result<u32, u32> {
    let mm: *const u8 = ctx.arg(0);
    let member: u64 = ctx.arg(1);
    let member = member as u32;
    if member >= 4 {
        return Ok(0);
    }
    // SAFETY: read-only data written by the loader.
    let bucket = unsafe { core::ptr::read_volatile(&LAYOUT.member_kind[member as usize & 3]) };
    if bucket == kind::UNKNOWN {
        return Ok(0);
    }
    let bucket = bucket as usize & (kind::COUNT - 1);

    let me = identity();
    let own = me.and_then(|me| {
        let state = MM_STATES.get_ptr_mut(me.mm_index)?;
        Some((me, state))
    });
    // SAFETY: `state` is a valid map value pointer.
    let known_mm = own.map(|(_, state)| unsafe { (*state).mm });
    let (me, state) = match own {
        Some((me, state)) if known_mm == Some(mm as u64) => (Some(me), state),
        Some((me, state)) if known_mm == Some(0) => {
            learn_mm(mm as u64, me, state)?;
            (Some(me), state)
        }
        _ => {
            // A change to an address space that is not the running thread's
            // own: reclaim, a remote access, or another process entirely.
            // SAFETY: copy out of the map value.
            let index = unsafe { MM_BY_PTR.get(mm as u64) }.copied().ok_or(0u32)?;
            (None, MM_STATES.get_ptr_mut(index).ok_or(0u32)?)
        }
    };
    // SAFETY: read-only data written by the loader.
    let page_shift = unsafe { core::ptr::read_volatile(&LAYOUT.page_shift) } & 63;
    let bytes = read_counter(mm, member) << page_shift;
    // SAFETY: `state` is a valid map value pointer. Most events leave the
    // counter where it was (from 6.2 the value we read moves in per-CPU
    // batches), so look before exchanging.
    let last = unsafe { &raw mut (*state).last_bytes[bucket] };
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(last) } == bytes {
        return Ok(0);
    }
    // SAFETY: as above; the exchange is atomic so concurrent events on other
    // CPUs each see a distinct predecessor, and the deltas telescope.
    let delta = bytes - unsafe { atomic_xchg::<i64, { AtomicOrdering::Relaxed }>(last, bytes) };
    if delta == 0 {
        return Ok(0);
    }
    let Some(me) = me else {
        // SAFETY: valid map value pointer.
        add_resident(unsafe { (*state).external_slot }, bucket, delta);
        return Ok(0);
    };
    if delta < 0 {
        // Memory going away inside a release syscall belongs to whoever
        // faulted the range in, not to the thread that released it.
        // SAFETY: copy out of the map value.
        if let Some(rel) = unsafe { RELEASING.get(ids().1) } {
            let owner = rel.owner_slot;
            if owner != NO_SLOT && owner != me.slot {
                add_resident(owner, bucket, delta);
                if let Some(s) = stats(me.slot) {
                    // SAFETY: valid per-CPU map value pointer.
                    unsafe { add_i64(&raw mut (*s).released_for_others_bytes, -delta) };
                }
                return Ok(0);
            }
        }
    }
    add_resident(me.slot, bucket, delta);
    Ok(0)
}

/// First counter change of a governed process since registration: checks
/// that `mm` is the thread's own address space and remembers it.
#[cold]
fn learn_mm(mm: u64, me: Identity, state: *mut MmState) -> Result<(), u32> {
    // SAFETY: read-only data written by the loader.
    let task_mm = unsafe { core::ptr::read_volatile(&LAYOUT.task_mm) } as usize;
    // SAFETY: reads current->mm at this kernel's BTF offset.
    let own_mm = unsafe {
        bpf_probe_read_kernel((bpf_get_current_task() as *const u8).add(task_mm) as *const u64)
    }
    .map_err(|_| 1u32)?;
    if own_mm != mm {
        return Err(0);
    }
    // SAFETY: valid map value pointer; racing CPUs write the same value.
    unsafe { core::ptr::write_volatile(&raw mut (*state).mm, mm) };
    let _ = MM_BY_PTR.insert(mm, me.mm_index, 0);
    Ok(())
}

// ---------------------------------------------------------- page faults

/// `TP_PROTO(unsigned long address, struct pt_regs *regs, unsigned long
/// error_code)` (x86; kernel 3.18+ as a tracepoint, BTF-typed from 5.5).
#[btf_tracepoint(function = "page_fault_user")]
pub fn page_fault_user(ctx: BtfTracePointContext) -> u32 {
    let Some(me) = identity() else {
        return 0;
    };
    if let Some(s) = stats(me.slot) {
        // SAFETY: valid per-CPU map value pointer.
        unsafe { add_u64(&raw mut (*s).page_faults, 1) };
    }
    let address: u64 = ctx.arg(0);
    let region = address >> REGION_SHIFT;
    let Some(cache) = REGION_CACHE.get_ptr_mut(0) else {
        return 0;
    };
    let word = region_cache::pack(me.slot, region);
    // SAFETY: this CPU's entry of a live per-CPU map.
    if unsafe { core::ptr::read_volatile(cache) } == word {
        return 0;
    }
    // Last faulter owns the region: a region reused by another engine after
    // an unmap changes hands on its first fault.
    let key = RegionKey {
        tgid: ids().0,
        _pad: 0,
        region,
    };
    // SAFETY: copy out of the map value.
    if unsafe { REGIONS.get(key) }.copied() != Some(me.slot) {
        let _ = REGIONS.insert(key, me.slot, 0);
    }
    // SAFETY: as above; one 64-bit store.
    unsafe { core::ptr::write_volatile(cache, word) };
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
        let Some(owner) = (unsafe { REGIONS.get(key) }).copied() else {
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
fn begin_release(addr: u64, len: u64) -> u32 {
    if identity().is_none() {
        return 0;
    }
    let (tgid, tid) = ids();
    let ctx = ReleaseCtx {
        owner_slot: region_owner(tgid, addr, len),
        _pad: 0,
        len,
    };
    let _ = RELEASING.insert(tid, ctx, 0);
    0
}

/// Ends a release syscall; returns the context if there was one.
#[inline(always)]
fn end_release() -> Option<ReleaseCtx> {
    let (_, tid) = ids();
    // SAFETY: copy out of the map value.
    let ctx = unsafe { RELEASING.get(tid) }.copied()?;
    let _ = RELEASING.remove(tid);
    Some(ctx)
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
        read_arg(&ctx, off.munmap_addr),
        read_arg(&ctx, off.munmap_len),
    )
}

#[tracepoint(category = "syscalls", name = "sys_exit_munmap")]
pub fn sys_exit_munmap(ctx: TracePointContext) -> u32 {
    let Some(rel) = end_release() else {
        return 0;
    };
    if read_ret(&ctx) != 0 {
        return 0;
    }
    let Some(slot) = identity().map(|me| me.slot) else {
        return 0;
    };
    let owner = if rel.owner_slot != NO_SLOT {
        rel.owner_slot
    } else {
        slot
    };
    add_mapped(owner, -(page_align(rel.len) as i64));
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_madvise")]
pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
    let off = offsets();
    begin_release(
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
    let Some(last) = (unsafe { BRK.get(tgid) }).copied() else {
        return 0;
    };
    if new_brk != 0 && new_brk < last {
        // Shrinking: [new_brk, last) goes away, owned by whoever faulted it.
        return begin_release(new_brk, last - new_brk);
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_brk")]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    let (tgid, _) = ids();
    let _ = end_release();
    let Some(slot) = identity().map(|me| me.slot) else {
        return 0;
    };
    let now = read_ret(&ctx) as u64;
    // SAFETY: copy out of the map value.
    let last = unsafe { BRK.get(tgid) }.copied();
    let _ = BRK.insert(tgid, now, 0);
    if let Some(last) = last
        && now > last
    {
        add_mapped(slot, (now - last) as i64);
    } else if let Some(last) = last
        && now < last
    {
        let owner = match region_owner(tgid, now, last - now) {
            NO_SLOT => slot,
            s => s,
        };
        add_mapped(owner, -((last - now) as i64));
    }
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_mmap")]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    let (_, tid) = ids();
    if identity().map(|me| me.slot).is_none() {
        return 0;
    }
    let pending = PendingMap {
        len: read_arg(&ctx, offsets().mmap_len),
    };
    let _ = PENDING_MMAP.insert(tid, pending, 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_mmap")]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    let (_, tid) = ids();
    // SAFETY: copy out of the map value.
    let Some(pending) = (unsafe { PENDING_MMAP.get(tid) }).copied() else {
        return 0;
    };
    let _ = PENDING_MMAP.remove(tid);
    let ret = read_ret(&ctx);
    // Errors are -4095..-1; anything else is the mapped address.
    if (-4095..0).contains(&ret) {
        return 0;
    }
    let Some(slot) = identity().map(|me| me.slot) else {
        return 0;
    };
    add_mapped(slot, page_align(pending.len) as i64);
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
            ctx.read_at::<u32>(off.fork_parent_pid as usize)
                .unwrap_or(0),
            ctx.read_at::<u32>(off.fork_child_pid as usize).unwrap_or(0),
        )
    };
    // SAFETY: copy out of the map value.
    if let Some(slot) = unsafe { ENGINE_BY_TID.get(parent) }.copied() {
        let _ = ENGINE_BY_TID.insert(child, slot, 0);
    }
    0
}

/// Forget an exiting thread, so a recycled TID does not inherit its engine.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let (_, tid) = ids();
    let _ = ENGINE_BY_TID.remove(tid);
    let _ = RELEASING.remove(tid);
    let _ = PENDING_MMAP.remove(tid);
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

// ------------------------------------------------------ benchmark floor

/// Empty program on `page_fault_user`: the benchmark's floor, the cost of
/// running *any* program on the fault path of this kernel and machine.
#[btf_tracepoint(function = "page_fault_user")]
pub fn floor_page_fault_user(_ctx: BtfTracePointContext) -> u32 {
    0
}

/// Empty program on `rss_stat`, for the same floor.
#[btf_tracepoint(function = "rss_stat")]
pub fn floor_rss_stat(_ctx: BtfTracePointContext) -> u32 {
    0
}
