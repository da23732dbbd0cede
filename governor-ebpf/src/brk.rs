//! `brk`: growth adds to the caller's mapped bytes; a shrink is a release
//! (bracketed like munmap) whose mapped bytes come off the range's owner.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use nodedb_governor_common::{NO_SLOT, kernel_event};

use crate::{
    counters::{add_mapped, insert_or_count},
    identity::{identity, ids},
    maps::BRK,
    record::{offsets, read_arg, read_ret},
    release::{begin_release, end_release, region_owner},
};

// name: sys_enter_brk
// format, after the common fields (see `record`):
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:unsigned long brk;	offset:16;	size:8;	signed:0;
#[tracepoint(category = "syscalls", name = "sys_enter_brk")]
pub fn sys_enter_brk(ctx: TracePointContext) -> u32 {
    match try_sys_enter_brk(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_enter_brk(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, _) = ids();
    let new_brk = read_arg(ctx, offsets().brk_brk);
    // SAFETY: copy out of the map value.
    let Some(last) = (unsafe { BRK.get(tgid) }).copied() else {
        return Ok(0);
    };
    if new_brk != 0 && new_brk < last {
        // Shrinking: [new_brk, last) goes away, owned by whoever faulted it.
        return begin_release(new_brk, last - new_brk);
    }
    Ok(0)
}

/// `ret` is the new break (the old one if the call failed); the record is
/// laid out as sys_exit_munmap's (see `release`).
#[tracepoint(category = "syscalls", name = "sys_exit_brk")]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    match try_sys_exit_brk(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_exit_brk(ctx: &TracePointContext) -> Result<u32, u32> {
    let (tgid, _) = ids();
    let _ = end_release();
    let Some(slot) = identity().map(|me| me.slot) else {
        return Ok(0);
    };
    let now = read_ret(ctx) as u64;
    // SAFETY: copy out of the map value.
    let last = unsafe { BRK.get(tgid) }.copied();
    insert_or_count(BRK.insert(tgid, now, 0), kernel_event::BRK_INSERT_FAILED);
    if let Some(last) = last
        && now > last
    {
        add_mapped(slot, (now - last) as i64);
    } else if let Some(last) = last
        && now < last
    {
        let owner = match region_owner(tgid, now, last - now).0 {
            NO_SLOT => slot,
            s => s,
        };
        add_mapped(owner, -((last - now) as i64));
    }
    Ok(0)
}
