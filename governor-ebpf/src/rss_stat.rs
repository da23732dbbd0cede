//! `rss_stat`: the quantity source. Each change of one of an address
//! space's RSS counters is differenced against the last value seen and the
//! delta charged to the running thread's engine (or, inside a release
//! syscall, to the range's owner; from outside the process, to its external
//! slot).

use core::intrinsics::{AtomicOrdering, atomic_xchg};

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use nodedb_governor_common::{
    CPU_PENDING_PAGES, CpuParts, KernelLayout, MmState, NO_NODE, NO_SLOT, kernel_event, kind,
};

use crate::{
    counters::{add_i64, add_resident_on, insert_or_count, stats},
    identity::{Identity, identity, ids},
    maps::{CPU_BASE, CPU_PARTS, MM_BY_PTR, MM_EPOCHS, MM_STATES, RELEASING},
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
    task_flags: 0,
    task_min_flt: 0,
    task_maj_flt: 0,
    rss_cpu_part: [0; 4],
    array_pptrs: 0,
    _pad: 0,
};

/// log2 of the kernel's page size, from the same layout.
#[inline(always)]
pub fn page_shift() -> u32 {
    // SAFETY: read-only data written by the loader.
    unsafe { core::ptr::read_volatile(&LAYOUT.page_shift) & 63 }
}

/// The running thread's finished faults (`min_flt + maj_flt`), from the
/// offsets in the same layout; 0 if unreadable.
#[inline(always)]
pub fn task_faults() -> u64 {
    // SAFETY: read-only data written by the loader; the helper reads the
    // current task at those offsets and tolerates a bad address.
    unsafe {
        let task = bpf_get_current_task() as *const u8;
        let at =
            |off: u32| bpf_probe_read_kernel(task.add(off as usize) as *const u64).unwrap_or(0);
        at(core::ptr::read_volatile(&LAYOUT.task_min_flt))
            .wrapping_add(at(core::ptr::read_volatile(&LAYOUT.task_maj_flt)))
    }
}

/// Offset of `flags` in `struct task_struct`, from the same layout.
#[inline(always)]
pub fn task_flags_offset() -> usize {
    // SAFETY: read-only data written by the loader.
    unsafe { core::ptr::read_volatile(&LAYOUT.task_flags) as usize }
}

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
    let (me, index, state) = match own {
        Some((me, state)) if known_mm == Some(mm as u64) => (Some(me), me.mm_index, state),
        Some((me, state)) if known_mm == Some(0) => {
            learn_mm(mm as u64, me, state)?;
            (Some(me), me.mm_index, state)
        }
        _ => {
            // A change to an address space that is not the running thread's
            // own: reclaim, a remote access, or another process entirely.
            // SAFETY: copy out of the map value.
            let index = unsafe { MM_BY_PTR.get(mm as u64) }.copied().ok_or(0u32)?;
            (None, index, MM_STATES.get_ptr_mut(index).ok_or(0u32)?)
        }
    };
    // What this CPU's part moved by (from 6.2), and where it stands.
    let (part_change, parts, part_now) = cpu_part_change(mm as u64, index, member);
    let mut delta = part_change << page_shift();
    // The total moves only when a part is folded into it, which leaves
    // that part at 0: only then (and where there are no parts) is it
    // read. A change is charged as the change of total + this CPU's part
    // (see `CpuParts`): its own amount, folded or not.
    if parts.is_none() || part_now == 0 {
        let bytes = read_counter(mm, member) << page_shift();
        // SAFETY: `state` is a valid map value pointer.
        let last = unsafe { &raw mut (*state).last_bytes[bucket] };
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(last) } != bytes {
            // SAFETY: as above; the exchange is atomic so concurrent
            // events on other CPUs each see a distinct predecessor, and
            // the deltas telescope.
            delta +=
                bytes - unsafe { atomic_xchg::<i64, { AtomicOrdering::Relaxed }>(last, bytes) };
        }
    }
    if delta == 0 {
        return Ok(0);
    }
    let Some(me) = me else {
        // SAFETY: valid map value pointer.
        let external = unsafe { (*state).external_slot };
        charge(parts, member, external, bucket, delta, NO_NODE);
        return Ok(0);
    };
    let (mut slot, mut node) = (me.slot, NO_NODE);
    if delta < 0 {
        // Memory going away inside a release syscall belongs to whoever
        // faulted the range in, not to the thread that released it, and
        // comes off the node it was faulted in on.
        // SAFETY: copy out of the map value.
        if let Some(rel) = unsafe { RELEASING.get(ids().1) } {
            node = rel.owner_node;
            let owner = rel.owner_slot;
            if owner != NO_SLOT && owner != me.slot {
                slot = owner;
                if let Some(s) = stats(me.slot) {
                    // SAFETY: valid per-CPU map value pointer.
                    unsafe { add_i64(&raw mut (*s).released_for_others_bytes, -delta) };
                }
            }
        }
    }
    charge(parts, member, slot, bucket, delta, node);
    Ok(0)
}

/// Charges `delta` to `slot` on `node`; where the counters have per-CPU
/// parts (`parts`), through this CPU's pending bytes for the counter (see
/// `CpuParts::pending`): held while the same party's changes stay within
/// the batch, charged when another party's comes.
#[inline(always)]
fn charge(
    parts: Option<*mut CpuParts>,
    member: u32,
    slot: u32,
    bucket: usize,
    delta: i64,
    node: u32,
) {
    let Some(parts) = parts else {
        add_resident_on(slot, bucket, delta, node);
        return;
    };
    let m = member as usize & 3;
    // SAFETY: this CPU's entry of a live per-CPU map, indexes masked.
    unsafe {
        let pending = &raw mut (*parts).pending[m];
        let mut held = core::ptr::read_volatile(pending);
        if held != 0 {
            let (was_slot, was_node) = (
                core::ptr::read_volatile(&raw const (*parts).pending_slot[m]),
                core::ptr::read_volatile(&raw const (*parts).pending_node[m]),
            );
            if was_slot != slot || was_node != node {
                add_resident_on(was_slot, bucket, held, was_node);
                held = 0;
            }
        }
        let sum = held + delta;
        if sum.unsigned_abs() < (CPU_PENDING_PAGES as u64) << page_shift() {
            core::ptr::write_volatile(pending, sum);
            core::ptr::write_volatile(&raw mut (*parts).pending_slot[m], slot);
            core::ptr::write_volatile(&raw mut (*parts).pending_node[m], node);
            return;
        }
        core::ptr::write_volatile(pending, 0);
        add_resident_on(slot, bucket, sum, node);
    }
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
    insert_or_count(
        MM_BY_PTR.insert(mm, me.mm_index, 0),
        kernel_event::MM_BY_PTR_INSERT_FAILED,
    );
    Ok(())
}

/// This CPU's per-CPU offset (what `per_cpu_ptr` adds to a per-CPU
/// pointer for it), found once per CPU.
#[repr(C)]
pub struct CpuBase {
    offset: u64,
    known: u64,
    /// Where an address is written and read back as a number.
    scratch: u64,
}

/// This CPU's per-CPU offset. The kernel keeps it in `__per_cpu_offset`,
/// a symbol `/proc/kallsyms` may not show (it lists data only with
/// `CONFIG_KALLSYMS_ALL`), so it is worked out from a per-CPU map's own
/// entry: a lookup returns this CPU's copy, `pptrs[0] + offset`, and
/// `pptrs[0]` is in the map's `struct bpf_array` (its offset from BTF).
/// The two addresses become numbers by being written to the map value and
/// read back (the agent loads the programs with `CAP_PERFMON`, which lets
/// a program store an address).
#[inline(always)]
fn this_cpu_offset() -> Option<u64> {
    let base = CPU_BASE.get_ptr_mut(0)?;
    // SAFETY: this CPU's entry of a live per-CPU map; the layout is
    // read-only data written by the loader.
    unsafe {
        if core::ptr::read_volatile(&raw const (*base).known) != 0 {
            return Some(core::ptr::read_volatile(&raw const (*base).offset));
        }
        let pptrs = core::ptr::read_volatile(&LAYOUT.array_pptrs);
        if pptrs == 0 {
            return None;
        }
        let scratch = &raw mut (*base).scratch;
        core::ptr::write_volatile(scratch, &raw const CPU_BASE as u64);
        let map = core::ptr::read_volatile(scratch);
        core::ptr::write_volatile(scratch, base as u64);
        let mine = core::ptr::read_volatile(scratch);
        let first = bpf_probe_read_kernel((map + u64::from(pptrs)) as *const u64).ok()?;
        let offset = mine.wrapping_sub(first);
        core::ptr::write_volatile(&raw mut (*base).offset, offset);
        core::ptr::write_volatile(&raw mut (*base).known, 1);
        Some(offset)
    }
}

/// How far counter `member`'s part on this CPU moved since this CPU last
/// looked (pages), and this CPU's entry for the address space; 0 and none
/// where the counters have no per-CPU part (up to 6.1). 0 at the first
/// look at an address space on a CPU, which takes the part as it finds
/// it.
#[inline(always)]
fn cpu_part_change(mm: u64, index: u32, member: u32) -> (i64, Option<*mut CpuParts>, i32) {
    // SAFETY: read-only data written by the loader.
    let first = unsafe { core::ptr::read_volatile(&LAYOUT.rss_cpu_part[0]) };
    if first == 0 {
        return (0, None, 0);
    }
    let Some(parts) = CPU_PARTS.get_ptr_mut(index) else {
        return (0, None, 0);
    };
    let epoch = MM_EPOCHS.get(index).copied().unwrap_or(0);
    let (change, now) = part_change(mm, epoch, parts, member);
    (change, Some(parts), now)
}

/// The part's change since this CPU's last look, and its value now.
#[inline(always)]
fn part_change(mm: u64, epoch: u64, parts: *mut CpuParts, member: u32) -> (i64, i32) {
    let m = member as usize & 3;
    // SAFETY: this CPU's entry of a live per-CPU map; the helper reads the
    // kernel's memory at addresses from the counter's own per-CPU pointer
    // and tolerates a bad one (read as 0).
    unsafe {
        if core::ptr::read_volatile(&raw const (*parts).mm) != mm
            || core::ptr::read_volatile(&raw const (*parts).epoch) != epoch
        {
            let Some(offset) = this_cpu_offset() else {
                return (0, 0);
            };
            for i in 0..4 {
                let at = core::ptr::read_volatile(&LAYOUT.rss_cpu_part[i]);
                let pointer =
                    bpf_probe_read_kernel((mm + u64::from(at)) as *const u64).unwrap_or(0);
                let part = if pointer == 0 {
                    0
                } else {
                    pointer.wrapping_add(offset)
                };
                core::ptr::write_volatile(&raw mut (*parts).part[i], part);
                let value = if part == 0 {
                    0
                } else {
                    bpf_probe_read_kernel(part as *const i32).unwrap_or(0)
                };
                core::ptr::write_volatile(&raw mut (*parts).seen[i], value);
            }
            core::ptr::write_volatile(&raw mut (*parts).mm, mm);
            core::ptr::write_volatile(&raw mut (*parts).epoch, epoch);
            // The total is read at a first look: it may have moved since
            // this CPU's last one.
            return (0, 0);
        }
        let part = core::ptr::read_volatile(&raw const (*parts).part[m]);
        if part == 0 {
            return (0, 0);
        }
        let now = bpf_probe_read_kernel(part as *const i32).unwrap_or(0);
        let seen = &raw mut (*parts).seen[m];
        let change = i64::from(now) - i64::from(core::ptr::read_volatile(seen));
        core::ptr::write_volatile(seen, now);
        (change, now)
    }
}
