//! Task switches and thread lifetime: `sched_switch` clears the per-CPU
//! caches when another task gets the CPU; `sched_process_fork` and
//! `sched_process_exit` keep the TID fallback map right as threads come and
//! go (and the break of a process that exits is forgotten);
//! `sched_process_exec` follows a governed process into its new image.

use aya_ebpf::{
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};

use nodedb_governor_common::kernel_event;

use crate::{
    counters::{add_u64, count_event, insert_or_count},
    identity::{identity, ids},
    maps::{
        BRK, ENGINE_BY_TID, IDENTITY_CACHE, MM_BY_PTR, MM_EPOCHS, MM_STATES, PENDING_MMAP,
        REGION_CACHE, RELEASING,
    },
    record::offsets,
};

/// `TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct
/// *next, unsigned int prev_state)`: another task gets this CPU, so the
/// identity cache no longer describes the running thread.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(_ctx: BtfTracePointContext) -> u32 {
    match try_sched_switch() {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn try_sched_switch() -> Result<u32, u32> {
    if let Some(cache) = IDENTITY_CACHE.get_ptr_mut(0) {
        // SAFETY: this CPU's entry of a live per-CPU map.
        unsafe { core::ptr::write_volatile(cache, 0) };
    }
    // The owner change a fault left stays: it names its thread, which may
    // have slept inside the fault and come back here.
    if let Some(cache) = REGION_CACHE.get_ptr_mut(0) {
        // SAFETY: as above.
        unsafe { core::ptr::write_volatile(&raw mut (*cache).word, 0) };
    }
    Ok(0)
}

// name: sched_process_fork
// format, after the common fields (see `record`):
// 	field:__data_loc char[] parent_comm;	offset:8;	size:4;	signed:0;
// 	field:pid_t parent_pid;	offset:12;	size:4;	signed:1;
// 	field:__data_loc char[] child_comm;	offset:16;	size:4;	signed:0;
// 	field:pid_t child_pid;	offset:20;	size:4;	signed:1;
// Older kernels keep the comms in place as char[16] (parent_pid at 24,
// child_pid at 44): the offsets come from the format file at load time.
/// A thread created by a thread with a TID-map engine inherits it, as a
/// thread inherits its cgroup.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    match try_sched_process_fork(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sched_process_fork(ctx: &TracePointContext) -> Result<u32, u32> {
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
        insert_or_count(
            ENGINE_BY_TID.insert(child, slot, 0),
            kernel_event::TID_INHERIT_FAILED,
        );
    }
    Ok(0)
}

/// Forget an exiting thread, so a recycled TID does not inherit its engine.
/// Reads nothing from the record: the running thread is the one exiting.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    match try_sched_process_exit() {
        Ok(v) | Err(v) => v,
    }
}

fn try_sched_process_exit() -> Result<u32, u32> {
    let (tgid, tid) = ids();
    let _ = ENGINE_BY_TID.remove(tid);
    let _ = RELEASING.remove(tid);
    let _ = PENDING_MMAP.remove(tid);
    if tid == tgid {
        // The leader exits: the process is going (a leader that exits
        // early leaves its threads a break to learn again at their next
        // brk, one step uncounted). Otherwise the map would fill with the
        // breaks of processes long gone, and brk would go uncounted for
        // every process after.
        let _ = BRK.remove(tgid);
    }
    Ok(0)
}

/// A governed process called exec (the record is read for nothing: the
/// running thread is the one that did). Its old address space is gone, and
/// with it the break; the new one is learned at its first counter change,
/// with the counts carried on (the first change adds the new image's
/// resident bytes less what the old one last held, so the engine's total
/// is the new image's). Without this, every later change of the new
/// address space would be dropped as another process's.
#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    match try_sched_process_exec() {
        Ok(v) | Err(v) => v,
    }
}

fn try_sched_process_exec() -> Result<u32, u32> {
    let me = identity().ok_or(0u32)?;
    let state = MM_STATES.get_ptr_mut(me.mm_index).ok_or(0u32)?;
    // SAFETY: a valid map value pointer.
    let old = unsafe { core::ptr::read_volatile(&raw const (*state).mm) };
    // SAFETY: copy out of the map value.
    if old != 0 && unsafe { MM_BY_PTR.get(old) }.copied() == Some(me.mm_index) {
        // Only its own: a vfork child shares its parent's address space
        // until it execs, and the entry may be the parent's.
        let _ = MM_BY_PTR.remove(old);
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*state).mm, 0) };
    let _ = BRK.remove(ids().0);
    // Every CPU looks at the new address space's counter parts afresh.
    if let Some(epoch) = MM_EPOCHS.get_ptr_mut(me.mm_index) {
        add_u64(epoch, 1);
    }
    count_event(kernel_event::EXEC_FOLLOWED);
    Ok(0)
}
