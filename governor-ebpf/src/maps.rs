//! Every map of the object. The agent pins the ones that hold counts and
//! registrations (all but the per-CPU caches) and finds them by these names,
//! which `nodedb_governor_common::names::map` repeats.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use nodedb_governor_common::{
    CgroupKey, CpuParts, FileKey, FileOwner, MAX_ENGINE_CGROUPS, MAX_FILES, MAX_PROCS, MAX_REGIONS,
    MAX_SLOTS, MAX_TIDS, MmState, PendingMap, ProcInfo, RegionCache, RegionKey, ReleaseCtx,
    SlotMark, SlotStats, regions::RegionOwners,
};

#[map]
pub static STATS: PerCpuArray<SlotStats> = PerCpuArray::with_max_entries(MAX_SLOTS, 0);
#[map]
pub static PROCS: HashMap<u32, ProcInfo> = HashMap::with_max_entries(MAX_PROCS, 0);
#[map]
pub static ENGINE_BY_CGROUP: HashMap<CgroupKey, u32> =
    HashMap::with_max_entries(MAX_ENGINE_CGROUPS, 0);
#[map]
pub static ENGINE_BY_TID: HashMap<u32, u32> = HashMap::with_max_entries(MAX_TIDS, 0);
/// Counter state per governed process, at its `ProcInfo::mm_index`.
#[map]
pub static MM_STATES: Array<MmState> = Array::with_max_entries(MAX_PROCS, 0);
/// `mm_struct` address to `MM_STATES` index, for changes made from outside
/// the process (reclaim), where the running thread says nothing.
#[map]
pub static MM_BY_PTR: HashMap<u64, u32> = HashMap::with_max_entries(MAX_PROCS, 0);
#[map]
pub static REGIONS: LruHashMap<RegionKey, RegionOwners> =
    LruHashMap::with_max_entries(MAX_REGIONS, 0);
#[map]
pub static RELEASING: HashMap<u32, ReleaseCtx> = HashMap::with_max_entries(MAX_TIDS, 0);
#[map]
pub static PENDING_MMAP: HashMap<u32, PendingMap> = HashMap::with_max_entries(MAX_TIDS, 0);
/// Last brk of each governed process (by TGID), to size brk growth/shrink.
#[map]
pub static BRK: HashMap<u32, u64> = HashMap::with_max_entries(MAX_PROCS, 0);
/// The registry generation (see `nodedb_governor_common::identity`): the
/// agent adds a large step on every change to PROCS, ENGINE_BY_CGROUP or
/// ENGINE_BY_TID; `cgroup_attach_task` adds 1 whenever a task changes
/// cgroup.
#[map]
pub static GENERATION: Array<u64> = Array::with_max_entries(1, 0);
/// The running thread's identity, one packed word per CPU.
#[map]
pub static IDENTITY_CACHE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);
/// The last region whose owner was recorded, and the last owner change,
/// per CPU (see `nodedb_governor_common::RegionCache`).
#[map]
pub static REGION_CACHE: PerCpuArray<RegionCache> = PerCpuArray::with_max_entries(1, 0);
/// The engine slot owning each file with counted pages in the page cache,
/// and their bytes (see `nodedb_governor_common::FileOwner`). Not an LRU
/// map: an entry that went would leave its bytes counted forever. The
/// agent removes entries that count nothing, and those of a process it
/// forgets; when the map is full, new files' pages are not counted
/// (`page_cache_untracked_bytes`). Not preallocated: a removed entry is
/// freed after the programs using it are done, not reused under them.
#[map]
pub static FILE_OWNERS: HashMap<FileKey, FileOwner> =
    HashMap::with_max_entries(MAX_FILES, BPF_F_NO_PREALLOC);
/// Each slot's mark, written by the agent (see
/// `nodedb_governor_common::SlotMark`).
#[map]
pub static MARKS: Array<SlotMark> = Array::with_max_entries(MAX_SLOTS, 0);
/// Each slot's flushed resident bytes (the rest is per CPU, in `STATS`).
#[map]
pub static MARK_TOTALS: Array<i64> = Array::with_max_entries(MAX_SLOTS, 0);
/// Crossings of a mark, for the agent (`MarkEvent`s, 32 bytes and an
/// 8-byte header each): 64 KiB hold about 1,600, more than the slots,
/// and there is at most one per armed slot between two arms.
#[map]
pub static MARK_EVENTS: RingBuf = RingBuf::with_byte_size(64 << 10, 0);
/// Inserts that failed and execs followed, per CPU (indexed by
/// `nodedb_governor_common::kernel_event`). Not pinned: a restarted agent
/// counts from zero, as a Prometheus counter may.
#[map]
pub static KERNEL_EVENTS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(nodedb_governor_common::kernel_event::COUNT, 0);
/// The release vote's tally, one per CPU (see `release::Votes`). Not
/// pinned: it holds nothing between two programs' runs.
#[map]
pub static VOTES: PerCpuArray<crate::release::Votes> = PerCpuArray::with_max_entries(1, 0);
/// This CPU's view of each governed address space's per-CPU RSS counter
/// parts (see `nodedb_governor_common::CpuParts`), at its `mm_index`.
/// Pinned: a restarted agent's programs go on from where the last one's
/// looked (the parts' addresses hold while the process lives), with its
/// pending bytes.
#[map]
pub static CPU_PARTS: PerCpuArray<CpuParts> = PerCpuArray::with_max_entries(MAX_PROCS, 0);
/// This CPU's per-CPU offset (see `rss_stat::this_cpu_offset`).
#[map]
pub static CPU_BASE: PerCpuArray<crate::rss_stat::CpuBase> = PerCpuArray::with_max_entries(1, 0);
/// Each governed process's exec count, at its `mm_index` (see
/// `nodedb_governor_common::CpuParts::epoch`); only grows.
#[map]
pub static MM_EPOCHS: Array<u64> = Array::with_max_entries(MAX_PROCS, 0);
