//! Page cache per engine: pages a governed thread adds to the page cache
//! are the engine's; they leave its count when they leave the cache, and
//! when reclaim takes them they are counted as evicted.
//!
//! # Why these tracepoints, and this key
//! `filemap/mm_filemap_add_to_page_cache` fires in the thread that caused
//! the page to be cached: the writer, the reader (readahead included), the
//! thread taking a fault on a mapped file. Its delete counterpart fires in
//! whoever removes it: the truncating or `POSIX_FADV_DONTNEED`ing thread,
//! or a reclaimer (a thread in memcg or direct reclaim, kswapd, DAMON),
//! rarely the engine. So ownership is remembered per file, `(s_dev,
//! i_ino)`, with the file's counted bytes (`FileOwner`): about 10 MB for
//! 131,072 files with the kernel's per-entry overhead, and one hash lookup
//! per event, where a key per page would
//! need an entry per cached page (hundreds of MB) and miss pages once a
//! large folio is split. A file belongs to the engine that last added a
//! page of it, and its counted bytes move with it, so an engine's figure
//! is always the sum of its files' (exact for the files a database's
//! engines keep apart: segments, indexes, spill files; a file two engines
//! fill is wholly the last one's). A delete subtracts at most what the
//! file has counted (its other pages were cached before the agent counted
//! them). An entry is never dropped while it still counts bytes (no LRU),
//! so the figures do not drift; the programs never remove one at all: the
//! agent sweeps out entries that count nothing (`sweep_files`), and an add
//! to such an entry starts it again. A full map leaves new files
//! uncounted, and says so (`page_cache_untracked_bytes`).
//!
//! Both events carry the folio's order: `PAGE_SIZE << order` bytes each
//! (one event per large folio). tmpfs adds emit no event (its deletes do):
//! a delete of a file that is not in the map is not counted. A delete in a
//! task with `PF_MEMALLOC` set is reclaim: an eviction.
//!
//! Two events on one file at once can race between reading the file's
//! bytes and updating them (the updates themselves are atomic adds): two
//! deletes of its last counted pages (kswapd and a direct reclaimer) can
//! both subtract the same folio, which undercounts the owner by it; an
//! owner change racing another event can leave a folio with the old
//! owner. Each race is off by a folio, not more. The map is not
//! preallocated, so an entry the agent sweeps out while a program still
//! holds it is freed only after the program is done (RCU): a late write
//! lands in the dead entry, never in another file's.
//!
//! The classic tracepoints are used (field offsets from tracefs, as for
//! the syscalls): their record already holds the inode and device, where
//! the BTF tracepoint would need three dependent reads through the folio.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use nodedb_governor_common::{FileKey, FileOwner, PF_MEMALLOC};

use crate::{
    counters::{add_i64, add_u64, stats},
    identity::identity,
    maps::FILE_OWNERS,
    record::offsets,
    rss_stat::{page_shift, task_flags_offset},
};

// name: mm_filemap_add_to_page_cache (and mm_filemap_delete_from_page_cache)
// format, after the common fields (see `record`):
// 	field:unsigned long pfn;	offset:8;	size:8;	signed:0;
// 	field:unsigned long i_ino;	offset:16;	size:8;	signed:0;
// 	field:unsigned long index;	offset:24;	size:8;	signed:0;
// 	field:dev_t s_dev;	offset:32;	size:4;	signed:0;
// 	field:unsigned char order;	offset:36;	size:1;	signed:0;

/// The file and the folio's bytes of a `filemap` record.
#[inline(always)]
fn file_and_bytes(ctx: &TracePointContext) -> (FileKey, i64) {
    let off = offsets();
    // SAFETY: offsets from this kernel's format file for this record.
    let (ino, dev, order) = unsafe {
        (
            ctx.read_at::<u64>(off.filemap_ino as usize).unwrap_or(0),
            ctx.read_at::<u32>(off.filemap_dev as usize).unwrap_or(0),
            ctx.read_at::<u8>(off.filemap_order as usize).unwrap_or(0),
        )
    };
    let key = FileKey { ino, dev, _pad: 0 };
    (key, 1i64 << ((page_shift() + u32::from(order)) & 63))
}

/// A page (folio) entered the page cache: the running thread's engine's.
#[tracepoint(category = "filemap", name = "mm_filemap_add_to_page_cache")]
pub fn filemap_add(ctx: TracePointContext) -> u32 {
    match try_filemap_add(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_filemap_add(ctx: &TracePointContext) -> Result<u32, u32> {
    let me = identity().ok_or(0u32)?;
    let (key, bytes) = file_and_bytes(ctx);
    let mine = stats(me.slot).ok_or(0u32)?;
    let file = match FILE_OWNERS.get_ptr_mut(key) {
        Some(f) => f,
        None => {
            let new = FileOwner {
                slot: me.slot,
                _pad: 0,
                bytes,
            };
            if FILE_OWNERS.insert(key, new, BPF_NOEXIST as u64).is_ok() {
                // SAFETY: valid per-CPU map value pointer.
                unsafe { add_i64(&raw mut (*mine).page_cache_bytes, bytes) };
                return Ok(0);
            }
            // Another CPU made the entry meanwhile, or the map is full.
            match FILE_OWNERS.get_ptr_mut(key) {
                Some(f) => f,
                None => {
                    // SAFETY: valid per-CPU map value pointer.
                    unsafe { add_u64(&raw mut (*mine).page_cache_untracked_bytes, bytes as u64) };
                    return Ok(0);
                }
            }
        }
    };
    // SAFETY: `file` is a valid map value pointer; its fields are read and
    // written with single loads, stores and atomic adds.
    unsafe {
        let owner = core::ptr::read_volatile(&raw const (*file).slot);
        if owner != me.slot {
            // The file changes hands, with what it has counted.
            let held = core::ptr::read_volatile(&raw const (*file).bytes);
            core::ptr::write_volatile(&raw mut (*file).slot, me.slot);
            if held > 0 {
                if let Some(theirs) = stats(owner) {
                    add_i64(&raw mut (*theirs).page_cache_bytes, -held);
                }
                add_i64(&raw mut (*mine).page_cache_bytes, held);
            }
        }
        add_i64(&raw mut (*file).bytes, bytes);
        add_i64(&raw mut (*mine).page_cache_bytes, bytes);
    }
    Ok(0)
}

/// A page (folio) left the page cache: its file's owner's, and evicted if
/// a reclaimer took it.
#[tracepoint(category = "filemap", name = "mm_filemap_delete_from_page_cache")]
pub fn filemap_delete(ctx: TracePointContext) -> u32 {
    match try_filemap_delete(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_filemap_delete(ctx: &TracePointContext) -> Result<u32, u32> {
    let (key, bytes) = file_and_bytes(ctx);
    let file = FILE_OWNERS.get_ptr_mut(key).ok_or(0u32)?;
    // SAFETY: `file` is a valid map value pointer (see `try_filemap_add`).
    let (owner, held) = unsafe {
        (
            core::ptr::read_volatile(&raw const (*file).slot),
            core::ptr::read_volatile(&raw const (*file).bytes),
        )
    };
    // At most what the file has counted: its other pages were cached
    // before the agent counted them.
    let gone = if bytes < held { bytes } else { held };
    if gone <= 0 {
        return Ok(0);
    }
    // SAFETY: as above.
    unsafe { add_i64(&raw mut (*file).bytes, -gone) };
    let s = stats(owner).ok_or(0u32)?;
    // SAFETY: valid per-CPU map value pointer.
    unsafe { add_i64(&raw mut (*s).page_cache_bytes, -gone) };
    // SAFETY: reads current->flags at this kernel's BTF offset; a failed
    // read is 0 (not reclaim).
    let flags = unsafe {
        bpf_probe_read_kernel(
            (bpf_get_current_task() as *const u8).add(task_flags_offset()) as *const u32,
        )
    }
    .unwrap_or(0);
    if flags & PF_MEMALLOC != 0 {
        // SAFETY: as above.
        unsafe { add_u64(&raw mut (*s).page_cache_evicted_bytes, gone as u64) };
    }
    Ok(0)
}
