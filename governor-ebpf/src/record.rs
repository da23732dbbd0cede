//! Fields of classic tracepoint records, read at the offsets the agent
//! found in this kernel's tracefs `format` files. The formats pasted above
//! the probes are the 6.18 host's (other kernels may differ), without the
//! fields every record starts with, which are these:

// 	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
// 	field:unsigned char common_flags;	offset:2;	size:1;	signed:0;
// 	field:unsigned char common_preempt_count;	offset:3;	size:1;	signed:0;
// 	field:int common_pid;	offset:4;	size:4;	signed:1;

use aya_ebpf::programs::TracePointContext;
use nodedb_governor_common::TraceOffsets;

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
    filemap_ino: 0,
    filemap_dev: 0,
    filemap_order: 0,
    _pad: 0,
};

#[inline(always)]
pub fn offsets() -> TraceOffsets {
    // SAFETY: OFFSETS is a plain static; the volatile read stops the compiler
    // from folding the zero initialiser, since the loader rewrites .rodata.
    unsafe { core::ptr::read_volatile(&OFFSETS) }
}

/// A 64-bit syscall argument at `off`, 0 if the record is shorter.
#[inline(always)]
pub fn read_arg(ctx: &TracePointContext, off: u32) -> u64 {
    // SAFETY: offset from this kernel's format file for this record.
    unsafe { ctx.read_at::<u64>(off as usize) }.unwrap_or(0)
}

/// `ret` of a `sys_exit_*` record, -1 if unreadable.
#[inline(always)]
pub fn read_ret(ctx: &TracePointContext) -> i64 {
    // SAFETY: as read_arg.
    unsafe { ctx.read_at::<i64>(offsets().sys_exit_ret as usize) }.unwrap_or(-1)
}
