//! Types shared between the eBPF programs (`nodedb-governor-ebpf`) and the
//! agent that loads them. Everything here is `#[repr(C)]` and plain old data:
//! the same bytes are written by the kernel side and read by userspace.
//!
//! # Slots
//! Every counter lives in a *slot*: an index into the per-CPU
//! [`SlotStats`] array. The agent hands out slots; each governed process gets
//! two of its own (its `unattributed` bucket for threads with no engine, and
//! its `external` bucket for changes made to its memory from outside the
//! process, such as reclaim), and each engine gets one.
#![no_std]

pub mod names;
pub mod regions;

/// Number of slots in the per-CPU statistics array.
pub const MAX_SLOTS: u32 = 1024;
/// Number of governed processes the maps can hold.
pub const MAX_PROCS: u32 = 256;
/// Number of engine cgroups the identity map can hold.
pub const MAX_ENGINE_CGROUPS: u32 = 1024;
/// Number of threads the TID fallback map can hold.
pub const MAX_TIDS: u32 = 65_536;
/// Number of files whose page cache is attributed (see [`FileKey`]).
pub const MAX_FILES: u32 = 131_072;
/// `task_struct.flags` bit set while a task reclaims memory (direct or
/// memcg reclaim, kswapd, DAMON's pageout): a page leaving the page cache
/// then is an eviction. Unchanged since 2.6.
pub const PF_MEMALLOC: u32 = 0x0000_0800;
/// What the programs count besides memory, per CPU (the map
/// `KERNEL_EVENTS`, indexed by these): an insert into one of their maps
/// that failed (full, or no memory), which loses part of the attribution
/// and must not do so silently, and the execs they followed.
pub mod kernel_event {
    /// `MM_BY_PTR`: a process's address space, learned at its first change.
    pub const MM_BY_PTR_INSERT_FAILED: u32 = 0;
    /// `REGIONS`: the engine that faulted a region in.
    pub const REGIONS_INSERT_FAILED: u32 = 1;
    /// `RELEASING`: a release under way (munmap, madvise, brk shrink).
    pub const RELEASING_INSERT_FAILED: u32 = 2;
    /// `PENDING_MMAP`: an mmap under way.
    pub const PENDING_MMAP_INSERT_FAILED: u32 = 3;
    /// `BRK`: a governed process's last break.
    pub const BRK_INSERT_FAILED: u32 = 4;
    /// `ENGINE_BY_TID`: a new thread's inherited engine (at fork).
    pub const TID_INHERIT_FAILED: u32 = 5;
    /// A governed process called exec: its new address space is learned
    /// at its first change, the old one forgotten.
    pub const EXEC_FOLLOWED: u32 = 6;
    /// Entries of the map (a power of two).
    pub const COUNT: u32 = 8;
    /// Each counted event and its name in the agent's metrics.
    pub const NAMES: [(u32, &str); 7] = [
        (MM_BY_PTR_INSERT_FAILED, "MM_BY_PTR"),
        (REGIONS_INSERT_FAILED, "REGIONS"),
        (RELEASING_INSERT_FAILED, "RELEASING"),
        (PENDING_MMAP_INSERT_FAILED, "PENDING_MMAP"),
        (BRK_INSERT_FAILED, "BRK"),
        (TID_INHERIT_FAILED, "ENGINE_BY_TID"),
        (EXEC_FOLLOWED, "exec"),
    ];
}

/// Number of 2 MiB regions whose faulting engine is remembered.
pub const MAX_REGIONS: u32 = 262_144;
/// Ownership of memory is remembered per region of this many bytes (a PMD,
/// the unit the kernel zaps and batches RSS updates in).
pub const REGION_SHIFT: u32 = 21;
/// No slot: the thread or region is not attributed.
pub const NO_SLOT: u32 = u32::MAX;
/// No node: where a released range was faulted in is not known.
pub const NO_NODE: u32 = u32::MAX;

/// An engine in a `REGIONS` value ([`regions::RegionOwners`]): its slot,
/// and the NUMA node of the CPU that faulted its part of the region in (so
/// a release, whichever CPU makes it, is taken off the node its pages were
/// counted on).
pub mod region_owner {
    pub const fn pack(slot: u32, node: u32) -> u32 {
        (slot & 0xffff) | ((node & 0xff) << 16)
    }

    pub const fn slot(value: u32) -> u32 {
        value & 0xffff
    }

    pub const fn node(value: u32) -> u32 {
        (value >> 16) & 0xff
    }

    const _: () = assert!(super::MAX_SLOTS <= 0x10000);
}

/// Resident-memory kinds, as buckets of [`SlotStats::resident_bytes`]. The
/// kernel's `MM_*` counter numbers are mapped onto these at load time from
/// the `rss_stat` tracepoint's print format, so a kernel that renumbers its
/// counters does not silently swap them.
pub mod kind {
    pub const FILE: usize = 0;
    pub const ANON: usize = 1;
    pub const SWAP: usize = 2;
    pub const SHMEM: usize = 3;
    pub const COUNT: usize = 4;
    /// Marks a kernel counter number the agent does not know.
    pub const UNKNOWN: u8 = u8::MAX;
}

/// Counters of one slot on one CPU. Userspace sums them over CPUs; a single
/// CPU's value may be negative (memory faulted on one CPU, released on
/// another).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotStats {
    /// Net resident bytes per [`kind`].
    pub resident_bytes: [i64; kind::COUNT],
    /// Net bytes of address space mapped (mmap, brk growth) minus unmapped.
    pub mapped_bytes: i64,
    /// User page faults taken by the slot's threads.
    pub page_faults: u64,
    /// Bytes this slot's threads released that another slot owned.
    pub released_for_others_bytes: i64,
    /// `rss_stat` events attributed to this slot.
    pub rss_events: u64,
    /// Net bytes of page cache: added by the slot's threads, minus what
    /// left the cache of the files the slot owns (see [`FileKey`]).
    pub page_cache_bytes: i64,
    /// Bytes of the slot's files that reclaim took out of the page cache.
    pub page_cache_evicted_bytes: u64,
    /// Bytes the slot's threads added to the page cache and that are not
    /// counted, because the file-ownership map was full.
    pub page_cache_untracked_bytes: u64,
    /// Resident bytes (every kind but swap) counted on this CPU and not
    /// yet added to the slot's `MARK_TOTALS` entry (see [`SlotMark`]).
    pub mark_pending_bytes: i64,
    /// NUMA hinting faults the slot's threads took in a region another slot
    /// owns, which therefore stayed that slot's (see [`RegionCache`]).
    pub hinting_faults_elsewhere: u64,
    /// Net resident bytes (every kind but swap) by NUMA node (index:
    /// node). Growth is counted on the node of the CPU that counts it: a
    /// page is first placed on the node of the CPU that touches it, unless
    /// a memory policy or a full node sends it elsewhere. A release
    /// (munmap, madvise, brk) comes off the node its range's owner faulted
    /// it in on (see [`region_owner`]), whichever CPU releases it; other
    /// decreases (exit, reclaim) off the counting CPU's. Not followed:
    /// pages NUMA balancing moves later, and a 2 MiB region faulted in from
    /// two nodes (its release comes off the last one's). Nodes from
    /// [`NODE_SLOTS`] up are not counted.
    pub node_resident_bytes: [i64; NODE_SLOTS],
}

/// NUMA nodes counted per slot ([`SlotStats::node_resident_bytes`]).
pub const NODE_SLOTS: usize = 8;

/// The most one CPU holds back from a slot's mark total, whatever the
/// distance to the mark (a shared write per this many bytes of growth).
pub const MARK_MAX_BATCH: i64 = 16 << 20;

/// Where a slot wakes the agent: the `MARKS` array's entry, written by
/// the agent. A slot's resident bytes (every kind but swap) are counted in
/// two parts: per CPU, `SlotStats::mark_pending_bytes`, and flushed, the
/// slot's `MARK_TOTALS` entry. A CPU flushes its part (an atomic add to
/// the shared total) once it holds more than the distance from the total
/// to `up_bytes` shifted right by `shift` (or [`MARK_MAX_BATCH`]), or less
/// than nothing: far from the mark a CPU flushes growth rarely, near it on
/// every change, so all CPUs together hold back at most half the distance
/// (the agent picks `shift` as log2 of twice the CPU count), and since
/// frees are never held back the total never exceeds the exact count. The flush that brings the total to
/// `up_bytes` while `armed` is 1 swaps `armed` to 0 and sends a
/// [`MarkEvent`] on the `MARK_EVENTS` ring buffer: one event per crossing,
/// and none again until the agent arms the slot anew.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotMark {
    /// The mark, in the slot's own count (not the settled figure).
    pub up_bytes: i64,
    /// 1: armed (64 bits: the programs swap it atomically, and BPF
    /// exchanges only whole words).
    pub armed: u64,
    pub shift: u64,
}

/// A crossing, as the ring buffer carries it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MarkEvent {
    pub slot: u32,
    pub _pad: u32,
    /// The slot's total when it crossed.
    pub total_bytes: i64,
    pub up_bytes: i64,
    /// `bpf_ktime_get_ns` at the crossing (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
}

/// Key of the file-ownership map: a file, as the `filemap` tracepoints
/// name it (`s_dev` in the kernel's encoding, `major << 20 | minor`, not
/// `stat`'s). Files no governed thread added to are not in the map, and
/// their pages are not counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub ino: u64,
    pub dev: u32,
    pub _pad: u32,
}

/// Value of the file-ownership map: the engine slot that owns a file's
/// counted pages, and how many bytes of them are cached. A file is owned
/// by the engine whose thread last added a page of it, and its counted
/// bytes move with it (so an engine's figure is the sum of its files');
/// pages leaving the cache are counted against that owner, since the
/// thread removing them (reclaim, truncation) is often no engine's. A
/// page that leaves a file with no counted bytes left (cached before the
/// agent counted it) is not subtracted, and the entry goes when its last
/// counted byte leaves.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOwner {
    pub slot: u32,
    pub _pad: u32,
    pub bytes: i64,
}

/// A governed process, keyed by TGID.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    /// Slot for governed threads that belong to no engine.
    pub unattributed_slot: u32,
    /// Slot for changes to the process's memory made outside it (reclaim,
    /// another process's access).
    pub external_slot: u32,
    /// Index of the process's [`MmState`] in the `MM_STATES` array.
    pub mm_index: u32,
    pub _pad: u32,
}

/// RSS counter state of one governed address space, in the `MM_STATES`
/// array at the process's `mm_index`. `last_bytes` starts at the baseline
/// the agent read at registration; the programs then difference each new
/// counter value against it with an atomic exchange, so the deltas
/// attributed on all CPUs always add up to the kernel's counter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmState {
    /// Address of the process's `struct mm_struct`, learnt from its first
    /// counter change (0 until then).
    pub mm: u64,
    pub last_bytes: [i64; kind::COUNT],
    /// The process owning the address space.
    pub tgid: u32,
    /// Its slot for changes made from outside the process.
    pub external_slot: u32,
}

/// Where the RSS counters are inside `struct mm_struct`, read from the
/// kernel's BTF at load time (see the agent's `btf` module).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    /// Offset of each counter's value (`percpu_counter.count` from 6.2,
    /// `atomic_long_t` before), by kernel counter number.
    pub rss_counter: [u32; 4],
    /// Offset of `mm` in `struct task_struct`.
    pub task_mm: u32,
    /// log2 of the page size.
    pub page_shift: u32,
    /// `kind` bucket for each kernel `MM_*` counter number, or
    /// [`kind::UNKNOWN`].
    pub member_kind: [u8; 8],
    /// Offset of `flags` in `struct task_struct` (see [`PF_MEMALLOC`]).
    pub task_flags: u32,
    /// Offsets of `min_flt` and `maj_flt` in `struct task_struct` (see
    /// [`RegionCache`]).
    pub task_min_flt: u32,
    pub task_maj_flt: u32,
    /// Offset of each counter's per-CPU part (`percpu_counter.counters`, a
    /// per-CPU pointer) in `struct mm_struct`, by kernel counter number; 0
    /// where the counters have no per-CPU part (up to 6.1).
    pub rss_cpu_part: [u32; 4],
    /// Offset of `pptrs` (the per-CPU pointers of a per-CPU array's
    /// entries) in `struct bpf_array`: how the programs find this CPU's
    /// per-CPU offset (see [`CpuParts`]); 0 if unknown.
    pub array_pptrs: u32,
    pub _pad: u32,
}

/// This CPU's view of one governed address space's per-CPU RSS counter
/// parts, in the per-CPU `CPU_PARTS` array at the process's `mm_index`
/// (kernels from 6.2, whose counters are `percpu_counter`s).
///
/// A change goes into the CPU's part, and into the counter's total
/// (`count`) only when the part passes the batch, all of it at once: the
/// total alone would charge whoever tips the part over with what every
/// thread of the process left there. So each change is charged as the
/// change of total + this CPU's part since this CPU's last look: the
/// change's own amount, whether it folded or not, and the sum over all
/// changes still telescopes to the counter's exact value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuParts {
    /// The `struct mm_struct` these are for (0: none yet; another address
    /// space at this index is looked at afresh).
    pub mm: u64,
    /// The process's exec count (`MM_EPOCHS`) when they were looked at: an
    /// address space after an exec is looked at afresh even where the
    /// allocator gave it an earlier one's address.
    pub epoch: u64,
    /// This CPU's address of each counter's part (an `s32`).
    pub part: [u64; 4],
    /// Each part's value at this CPU's last look, in pages.
    pub seen: [i32; 4],
    /// Bytes counted on this CPU and not charged yet, per counter: one
    /// party's (`pending_slot`, on `pending_node`), charged when another
    /// party's change comes or they pass [`CPU_PENDING_PAGES`] pages, so
    /// a thread faulting page after page is charged once a batch, as it
    /// was when only folds moved the count. Until then the party's count
    /// lags by them: at most the batch per CPU and counter, as the central
    /// count alone lagged (what is charged and what is pending together
    /// telescope to the exact count).
    pub pending: [i64; 4],
    pub pending_slot: [u32; 4],
    pub pending_node: [u32; 4],
}

/// The most pages a CPU holds uncharged per counter of an address space
/// ([`CpuParts::pending`]): the kernel's own per-CPU batch on a small
/// machine, so the count lags by no more than the central count alone
/// did.
pub const CPU_PENDING_PAGES: i64 = 32;

/// The per-CPU cache of the running thread's identity, packed into one
/// 64-bit word so that a single store writes it (a program preempted while
/// filling it can never leave a torn entry behind). A `sched_switch`
/// program zeroes it whenever another task takes the CPU; the generation
/// catches registry changes (the agent adds [`identity::AGENT_GENERATION_STEP`])
/// and cgroup moves (a `cgroup_attach_task` program adds 1).
///
/// Layout: bit 63 valid, bit 62 governed, bits 52..62 slot, bits 44..52
/// mm index, bits 0..44 generation.
pub mod identity {
    pub const VALID: u64 = 1 << 63;
    pub const GOVERNED: u64 = 1 << 62;
    const SLOT_SHIFT: u32 = 52;
    const SLOT_MASK: u64 = 0x3ff;
    const MM_SHIFT: u32 = 44;
    const MM_MASK: u64 = 0xff;
    pub const GENERATION_MASK: u64 = (1 << 44) - 1;
    /// What the agent adds to the generation word per registry change; the
    /// kernel side adds 1 per cgroup move. The word only grows, so a cached
    /// generation is never seen again once it changes.
    pub const AGENT_GENERATION_STEP: u64 = 1 << 20;

    const _: () = assert!(super::MAX_SLOTS as u64 <= SLOT_MASK + 1);
    const _: () = assert!(super::MAX_PROCS as u64 <= MM_MASK + 1);

    pub const fn pack(governed: bool, slot: u32, mm_index: u32, generation: u64) -> u64 {
        VALID
            | if governed { GOVERNED } else { 0 }
            | ((slot as u64 & SLOT_MASK) << SLOT_SHIFT)
            | ((mm_index as u64 & MM_MASK) << MM_SHIFT)
            | (generation & GENERATION_MASK)
    }

    pub const fn slot(word: u64) -> u32 {
        ((word >> SLOT_SHIFT) & SLOT_MASK) as u32
    }

    pub const fn mm_index(word: u64) -> u32 {
        ((word >> MM_SHIFT) & MM_MASK) as u32
    }

    /// True when `word` is a valid entry for `generation`.
    pub const fn current(word: u64, generation: u64) -> bool {
        word & VALID != 0 && (word & GENERATION_MASK) == (generation & GENERATION_MASK)
    }
}

/// One CPU's memory of the faults that recorded regions' owners (the
/// `REGION_CACHE` map).
///
/// A fault is taken for one of two reasons the tracepoint cannot tell
/// apart: to bring a page in, and so take the region for the faulting
/// slot, or (NUMA balancing) to sample which node uses a page already
/// there, which changes nothing. A fault that gives a region (or part of
/// one, see [`regions`]) to another slot leaves the change here, with the thread and its count of finished
/// faults; a hinting fault (the `task_numa_fault` program) puts the value
/// back if it is that same fault: the same thread, on this CPU, with the
/// same count (the kernel counts a fault when it finishes, so any later
/// fault, from user or kernel mode, sees a larger one). Without this, a
/// thread that reads another engine's memory (a spill thread flushing its
/// buffers) takes those regions over while NUMA balancing scans, and their
/// release is then charged to it. Best effort: a hinting fault that races
/// another on the same page, or finds no page to sample, never reaches
/// `task_numa_fault`, and a thread that slept inside its fault and woke on
/// another CPU finds nothing to undo; the region then keeps its new owner
/// until the next fault there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionCache {
    /// [`region_cache::pack`] of the slot and region last recorded, or 0
    /// (`sched_switch` zeroes it).
    pub word: u64,
    /// The thread whose fault gave a region a new owner, or 0.
    pub moved_tid: u32,
    pub _pad: u32,
    /// The region (address >> [`REGION_SHIFT`]).
    pub moved_region: u64,
    /// The thread's finished faults (`min_flt + maj_flt`) when it faulted.
    pub moved_faults: u64,
    /// What the region's value was before.
    pub moved_from: regions::RegionOwners,
    pub _pad2: u32,
}

/// The word of [`RegionCache::word`]: bit 63 valid, bits 53..63 slot,
/// bits 47..53 the unit (its number + 1; 0: the whole region, when it is
/// the slot's alone), bits 0..47 region number (a 57-bit address space
/// has 2^36 regions).
pub mod region_cache {
    const SLOT_SHIFT: u32 = 53;
    const UNIT_SHIFT: u32 = 47;
    const REGION_MASK: u64 = (1 << UNIT_SHIFT) - 1;

    /// The word for a fault by `slot` in `region`: `unit` is `None` when
    /// the region is the slot's alone (any unit of it matches).
    pub const fn pack(slot: u32, region: u64, unit: Option<u32>) -> u64 {
        let unit = match unit {
            Some(u) => (u as u64 & 0x1f) + 1,
            None => 0,
        };
        super::identity::VALID
            | ((slot as u64 & 0x3ff) << SLOT_SHIFT)
            | (unit << UNIT_SHIFT)
            | (region & REGION_MASK)
    }

    /// Whether `word` is of `slot` in `region`, whatever its unit.
    pub const fn is_of(word: u64, slot: u32, region: u64) -> bool {
        word & !(0x3f << UNIT_SHIFT) == pack(slot, region, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_word_round_trips_and_generations_invalidate() {
        let w = identity::pack(true, MAX_SLOTS - 1, MAX_PROCS - 1, 12345);
        assert_eq!(identity::slot(w), MAX_SLOTS - 1);
        assert_eq!(identity::mm_index(w), MAX_PROCS - 1);
        assert!(w & identity::GOVERNED != 0);
        assert!(identity::current(w, 12345));
        assert!(!identity::current(w, 12346));
        assert!(!identity::current(0, 0), "a cleared entry is never current");
        let ungoverned = identity::pack(false, 0, 0, 7);
        assert!(identity::current(ungoverned, 7) && ungoverned & identity::GOVERNED == 0);
    }

    #[test]
    fn region_owners_keep_slot_and_node_apart() {
        let v = region_owner::pack(MAX_SLOTS - 1, 7);
        assert_eq!(region_owner::slot(v), MAX_SLOTS - 1);
        assert_eq!(region_owner::node(v), 7);
        assert_eq!(region_owner::node(region_owner::pack(3, 0)), 0);
    }

    #[test]
    fn region_words_differ_by_slot_region_and_unit() {
        let r = 1 << 35;
        let a = region_cache::pack(3, r, None);
        assert_ne!(a, region_cache::pack(4, r, None));
        assert_ne!(a, region_cache::pack(3, r + 1, None));
        assert_ne!(a, 0);
        let units: [u64; 3] = [0, 5, 31].map(|u| region_cache::pack(3, r, Some(u)));
        assert!(
            units
                .iter()
                .all(|&w| w != a && region_cache::is_of(w, 3, r))
        );
        assert_ne!(units[0], units[1]);
        assert_ne!(units[1], units[2]);
        assert!(region_cache::is_of(a, 3, r));
        assert!(!region_cache::is_of(units[1], 4, r));
        assert!(!region_cache::is_of(units[1], 3, r + 1));
    }
}

/// Key of the engine-by-cgroup map: a cgroup id within one process, so
/// each process's engines have slots of their own.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CgroupKey {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// Key of the region-ownership map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionKey {
    pub tgid: u32,
    pub _pad: u32,
    /// Virtual address >> [`REGION_SHIFT`].
    pub region: u64,
}

/// A release syscall (munmap, madvise, brk shrink) in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReleaseCtx {
    /// Slot that owned the released range, or [`NO_SLOT`].
    pub owner_slot: u32,
    /// The NUMA node its owner faulted it in on, or [`NO_NODE`]: what the
    /// release takes off the owner comes off that node.
    pub owner_node: u32,
    /// Length of the range in bytes (munmap: mapped bytes go away).
    pub len: u64,
    /// Where the range starts (munmap: its regions' owners are dropped).
    pub addr: u64,
}

/// Per-thread state between a syscall's entry and exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingMap {
    pub len: u64,
}

/// Field offsets inside classic tracepoint records, read from tracefs
/// `format` files at load time and written into the programs' read-only data.
/// A kernel that moves a field therefore never feeds us garbage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceOffsets {
    pub munmap_addr: u32,
    pub munmap_len: u32,
    pub madvise_start: u32,
    pub madvise_len: u32,
    pub brk_brk: u32,
    pub mmap_len: u32,
    /// `ret` of every `syscalls/sys_exit_*` record we attach to.
    pub sys_exit_ret: u32,
    pub fork_parent_pid: u32,
    pub fork_child_pid: u32,
    /// `filemap/mm_filemap_{add_to,delete_from}_page_cache` (one layout,
    /// the same class): the file and the folio's order.
    pub filemap_ino: u32,
    pub filemap_dev: u32,
    pub filemap_order: u32,
    pub _pad: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: every type below is #[repr(C)], Copy, made of integers with
    // explicit padding fields, so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::SlotStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ProcInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MmState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RegionKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::regions::RegionOwners {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ReleaseCtx {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TraceOffsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PendingMap {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CgroupKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::KernelLayout {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CpuParts {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FileOwner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SlotMark {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MarkEvent {}
}
