//! `mmap`: the requested length is kept between entry and exit and, if the
//! call succeeds, added to the caller's mapped bytes.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use nodedb_governor_common::{PendingMap, kernel_event};

use crate::{
    counters::{add_mapped, insert_or_count, page_align},
    identity::{identity, ids},
    maps::PENDING_MMAP,
    record::{offsets, read_arg, read_ret},
};

// name: sys_enter_mmap
// format, after the common fields (see `record`):
// 	field:int __syscall_nr;	offset:8;	size:4;	signed:1;
// 	field:unsigned long addr;	offset:16;	size:8;	signed:0;
// 	field:unsigned long len;	offset:24;	size:8;	signed:0;
// 	field:unsigned long prot;	offset:32;	size:8;	signed:0;
// 	field:unsigned long flags;	offset:40;	size:8;	signed:0;
// 	field:unsigned long fd;	offset:48;	size:8;	signed:0;
// 	field:unsigned long off;	offset:56;	size:8;	signed:0;
#[tracepoint(category = "syscalls", name = "sys_enter_mmap")]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    match try_sys_enter_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_enter_mmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tid) = ids();
    if identity().map(|me| me.slot).is_none() {
        return Ok(0);
    }
    let pending = PendingMap {
        len: read_arg(ctx, offsets().mmap_len),
    };
    insert_or_count(
        PENDING_MMAP.insert(tid, pending, 0),
        kernel_event::PENDING_MMAP_INSERT_FAILED,
    );
    Ok(0)
}

/// `ret` is the mapped address or an error; the record is laid out as
/// sys_exit_munmap's (see `release`).
#[tracepoint(category = "syscalls", name = "sys_exit_mmap")]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    match try_sys_exit_mmap(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sys_exit_mmap(ctx: &TracePointContext) -> Result<u32, u32> {
    let (_, tid) = ids();
    // SAFETY: copy out of the map value.
    let Some(pending) = (unsafe { PENDING_MMAP.get(tid) }).copied() else {
        return Ok(0);
    };
    let _ = PENDING_MMAP.remove(tid);
    let ret = read_ret(ctx);
    // Errors are -4095..-1; anything else is the mapped address.
    if (-4095..0).contains(&ret) {
        return Ok(0);
    }
    let Some(slot) = identity().map(|me| me.slot) else {
        return Ok(0);
    };
    add_mapped(slot, page_align(pending.len) as i64);
    Ok(0)
}
