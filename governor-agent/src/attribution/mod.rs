//! Kernel attribution: loads the eBPF programs, keeps the maps that tell
//! them which processes and threads are governed, and reads back resident
//! bytes per engine.
//!
//! # Which source counts memory, and what it costs
//! Two kernel sources could count an engine's resident memory. Figures are
//! from the 6.18 host, `cargo xtask bench`; the README has the tables.
//! 1. **`rss_stat`**, the kernel's own RSS counters, one event per change.
//!    - We difference successive values with an atomic exchange, so the sum
//!      over engines equals the counter exactly, whatever the interleaving.
//!    - It sees everything that changes RSS: transparent huge pages (512
//!      pages in one event), file fault-around (up to 16 pages per fault),
//!      `MAP_POPULATE`, `mlock`, get_user_pages from the kernel, and frees.
//!    - On 6.1 (`SPLIT_RSS_COUNTING`) a thread's changes reach the mm counter
//!      in batches of 64, and at exit. From 6.2 every change fires.
//! 2. **`page_fault_user` alone**, counting 4 KiB per fault: cheap, but
//!    wrong wherever one fault maps more or less than one page. For 64 MiB:
//!    0.1 MiB counted under THP, 1.7 MiB under file fault-around, and
//!    64 MiB for zero-page reads that add nothing.
//!
//! We count with source 1. Source 2 gives only fault counts and which engine
//! faulted each 2 MiB region, so a release by another thread is charged back
//! to the owner.
//!
//! How source 1 is read matters:
//! - **The classic tracepoint** hands over the value, but its perf record,
//!   and from 6.2 the kernel's exact per-CPU sum on every event, cost 4.6%
//!   of a page fault even with an *empty* program.
//! - **The BTF tracepoint** (what we use) costs 0.1% when empty. The program
//!   reads the counter from `mm_struct` itself, at offsets taken from kernel
//!   BTF ([`super::btf`]).
//! - **On 6.2+** the counter is a `percpu_counter`: a change goes into the
//!   running CPU's part, and into the central count only when that part
//!   passes the batch (32 pages on a small machine), all of it at once.
//!   Differencing the central count alone charged each fold to the thread
//!   whose change tipped it, with whatever every other thread of the
//!   process had left on that CPU: where two engines' threads take turns
//!   on a CPU, one engine's pages drifted to the other, fold after fold
//!   (the accuracy test `engines_taking_turns_on_one_cpu_keep_their_own_counts`:
//!   15.6 MiB of one engine's counted as the other's). So the program also
//!   reads this CPU's part (O(1): one CPU's, not the O(CPUs) sum) and
//!   charges each change as the change of central count + this CPU's part
//!   since this CPU last looked: the change's own amount, folded or not
//!   (see `nodedb_governor_common::CpuParts`). What is charged and what a
//!   CPU holds pending (one party's changes, up to 32 pages, so a faulting
//!   thread is charged once a batch) telescope to the exact count; what a
//!   reading lags by is those pending bytes and a part as it was first
//!   seen on each CPU (at registration, or after an exec), each at most
//!   the batch per CPU and counter, as the central count alone lagged.

//! # Buckets
//! Each process has an `unattributed` slot (governed threads with no
//! engine) and an `external` slot (changes made from outside the process:
//! reclaim, exit teardown). When reading, the external slot is spread over
//! the process's engines in proportion to what they hold of that kind, and a
//! bucket that would read negative (its memory was released by code we
//! could not tie back to an owner) is clamped at zero with the remainder
//! moved to `unattributed`, so the parts always add up to the process total.

//! # Files
//! - `loader`: loads the object, fills in this kernel's layout, attaches the
//!   programs of a [`ProgramSet`].
//! - `pins`: [`Persistence`]: the pinned maps and the saved registry that let
//!   a restarted agent carry on counting.
//! - `registry`: which processes, cgroups and threads are governed, and the
//!   slots they count in.
//! - `reading`: summing the per-CPU counters and the figures handed out.
//! - `settle`: spreading the external slot and clamping negatives.
//! - `marks`: the thresholds at which the programs wake the agent.

mod attributed;
mod batch;
mod loader;
mod marks;
mod pins;
mod reading;
mod registry;
mod settle;

use std::collections::BTreeMap;

use aya::{
    Ebpf,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
};
use nodedb_governor_common::{
    CgroupKey, CpuParts, FileKey, FileOwner, MmState, ProcInfo, SlotMark, SlotStats,
};

pub use attributed::{Attributed, ProcessAttribution, ProgramStats, Reading};
pub use loader::{ProgramSet, program_stats_on};
pub use marks::parse_mark_event;
pub use pins::{Persistence, RestartStatus};
pub use registry::Identity;
use registry::TrackedProcess;

/// The loaded programs and the registry of governed processes.
pub struct Attribution {
    // Keeps programs and links alive; dropping it detaches everything.
    ebpf: Ebpf,
    persistence: Option<Persistence>,
    stats: PerCpuArray<MapData, SlotStats>,
    procs_map: BpfHashMap<MapData, u32, ProcInfo>,
    by_cgroup: BpfHashMap<MapData, CgroupKey, u32>,
    by_tid: BpfHashMap<MapData, u32, u32>,
    mm_states: Array<MapData, MmState>,
    /// Each CPU's view of the per-CPU counter parts, by `mm_index`
    /// (cleared when an index is given to another process).
    cpu_parts: PerCpuArray<MapData, CpuParts>,
    mm_by_ptr: BpfHashMap<MapData, u64, u32>,
    free_mm_indexes: Vec<u32>,
    generation: Array<MapData, u64>,
    file_owners: BpfHashMap<MapData, FileKey, FileOwner>,
    mark_map: Array<MapData, SlotMark>,
    mark_totals: Array<MapData, i64>,
    /// Until the owner takes it to poll.
    mark_events: Option<RingBuf<MapData>>,
    /// Each governed process's last break (removed when it is forgotten).
    brk: BpfHashMap<MapData, u32, u64>,
    /// The programs' failed inserts and followed execs, per CPU.
    kernel_events: PerCpuArray<MapData, u64>,
    marks: marks::Marks,
    /// When file-ownership entries that count nothing were last swept.
    files_swept: Option<std::time::Instant>,
    nr_cpus: usize,
    /// The kernel refused a batch read (before 5.6): slot by slot.
    batch_failed: std::sync::atomic::AtomicBool,
    free_slots: Vec<u32>,
    procs: BTreeMap<u32, TrackedProcess>,
}
