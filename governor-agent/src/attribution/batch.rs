//! Reading every slot's counters in one system call.
//!
//! A tick reads five slots per governed process (its engines, unattributed
//! and external); one `BPF_MAP_LOOKUP_ELEM` each is a system call and an
//! allocation per slot, which at fifty processes is most of the tick.
//! `BPF_MAP_LOOKUP_BATCH` (Linux 5.6) copies the slots `0..n` of the
//! per-CPU array, every CPU's copy, in one call; the sums are made here.
//! aya 0.14 has no batch operations, so this is the system call itself.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{IterableMap, MapData, PerCpuArray};
use nodedb_governor_common::{SlotStats, kind};

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Whether `e` says the kernel cannot do batch reads at all (before 5.6,
/// or not for this map), rather than that this one failed.
pub(super) fn unsupported(e: &std::io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own, not in libc.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

/// Slots `0..n` of `map`, each summed over the CPUs. `nr_cpus`: the
/// possible CPUs (the kernel writes a value for each). Errors are the
/// system call's (see [`unsupported`]).
pub(super) fn read_slots(
    map: &PerCpuArray<MapData, SlotStats>,
    n: u32,
    nr_cpus: usize,
) -> std::io::Result<Vec<SlotStats>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let fd = IterableMap::map(map).fd().as_fd().as_raw_fd();
    // Per-CPU values come 8-byte aligned, CPU after CPU, key after key.
    const _: () = assert!(size_of::<SlotStats>().is_multiple_of(8));
    let mut keys = vec![0u32; n as usize];
    let mut values = vec![SlotStats::default(); n as usize * nr_cpus];
    let mut filled = 0usize;
    let mut next = 0u32;
    // One pointer for both: the kernel reads where to go on from it and
    // writes where it stopped to it.
    let cursor = std::ptr::addr_of_mut!(next) as u64;
    let mut first = true;
    while filled < n as usize {
        let mut attr = BatchAttr {
            // Null on the first call: from the start.
            in_batch: if first { 0 } else { cursor },
            out_batch: cursor,
            keys: keys[filled..].as_mut_ptr() as u64,
            values: values[filled * nr_cpus..].as_mut_ptr() as u64,
            count: n - filled as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        first = false;
        // SAFETY: `attr` points at buffers with room for `count` keys and
        // `count * nr_cpus` values, alive across the call; the kernel
        // writes no more than that and `count` says how many it wrote.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let err = (r < 0).then(std::io::Error::last_os_error);
        filled += attr.count as usize;
        match err {
            // ENOENT: the end of the map (what was filled is valid).
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Some(e) => return Err(e),
            None if attr.count == 0 => break,
            None => {}
        }
    }
    if filled < n as usize {
        return Err(std::io::Error::other(format!(
            "the batch read {filled} of {n} slots"
        )));
    }
    Ok(values.chunks(nr_cpus).map(sum).collect())
}

/// One slot's per-CPU copies summed.
pub(super) fn sum<'a>(values: impl IntoIterator<Item = &'a SlotStats>) -> SlotStats {
    let mut sum = SlotStats::default();
    for v in values {
        for k in 0..kind::COUNT {
            sum.resident_bytes[k] += v.resident_bytes[k];
        }
        sum.mapped_bytes += v.mapped_bytes;
        sum.page_faults += v.page_faults;
        sum.released_for_others_bytes += v.released_for_others_bytes;
        sum.rss_events += v.rss_events;
        sum.page_cache_bytes += v.page_cache_bytes;
        sum.page_cache_evicted_bytes += v.page_cache_evicted_bytes;
        sum.page_cache_untracked_bytes += v.page_cache_untracked_bytes;
        sum.mark_pending_bytes += v.mark_pending_bytes;
        sum.hinting_faults_elsewhere += v.hinting_faults_elsewhere;
        for (total, b) in sum
            .node_resident_bytes
            .iter_mut()
            .zip(v.node_resident_bytes)
        {
            *total += b;
        }
    }
    sum
}
