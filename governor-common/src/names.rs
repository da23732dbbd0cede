//! Names of what the eBPF object holds: maps, programs, the globals the
//! agent writes at load time, and where each program attaches.
//!
//! The eBPF side cannot use these constants: aya-ebpf's `#[map]`,
//! `#[tracepoint]` and `#[btf_tracepoint]` take their names from the item's
//! identifier and from literals. The agent uses them instead of repeating
//! the strings, and its unit test `object_names_match_the_constants` parses
//! the embedded object and fails if the two sides disagree (a map or program
//! renamed on one side only, or one added without a name here).

/// Map names: the `#[map]` statics of `nodedb-governor-ebpf`.
pub mod map {
    pub const STATS: &str = "STATS";
    pub const PROCS: &str = "PROCS";
    pub const ENGINE_BY_CGROUP: &str = "ENGINE_BY_CGROUP";
    pub const ENGINE_BY_TID: &str = "ENGINE_BY_TID";
    pub const MM_STATES: &str = "MM_STATES";
    pub const MM_BY_PTR: &str = "MM_BY_PTR";
    pub const REGIONS: &str = "REGIONS";
    pub const RELEASING: &str = "RELEASING";
    pub const PENDING_MMAP: &str = "PENDING_MMAP";
    pub const BRK: &str = "BRK";
    pub const GENERATION: &str = "GENERATION";
    pub const IDENTITY_CACHE: &str = "IDENTITY_CACHE";
    pub const REGION_CACHE: &str = "REGION_CACHE";
    pub const FILE_OWNERS: &str = "FILE_OWNERS";
    pub const MARKS: &str = "MARKS";
    pub const MARK_TOTALS: &str = "MARK_TOTALS";
    pub const MARK_EVENTS: &str = "MARK_EVENTS";
    pub const KERNEL_EVENTS: &str = "KERNEL_EVENTS";
    pub const VOTES: &str = "VOTES";
    pub const CPU_PARTS: &str = "CPU_PARTS";
    pub const CPU_BASE: &str = "CPU_BASE";
    pub const MM_EPOCHS: &str = "MM_EPOCHS";

    /// Every map in the object.
    pub const ALL: &[&str] = &[
        STATS,
        PROCS,
        ENGINE_BY_CGROUP,
        ENGINE_BY_TID,
        MM_STATES,
        MM_BY_PTR,
        REGIONS,
        RELEASING,
        PENDING_MMAP,
        BRK,
        GENERATION,
        IDENTITY_CACHE,
        REGION_CACHE,
        FILE_OWNERS,
        MARKS,
        MARK_TOTALS,
        MARK_EVENTS,
        KERNEL_EVENTS,
        VOTES,
        CPU_PARTS,
        CPU_BASE,
        MM_EPOCHS,
    ];
}

/// Read-only globals the agent writes before loading (`override_global`).
pub mod global {
    /// [`crate::TraceOffsets`], from tracefs `format` files.
    pub const OFFSETS: &str = "OFFSETS";
    /// [`crate::KernelLayout`], from kernel BTF.
    pub const LAYOUT: &str = "LAYOUT";
}

/// Program names: the entry functions of `nodedb-governor-ebpf`.
pub mod program {
    pub const RSS_STAT: &str = "rss_stat";
    pub const PAGE_FAULT_USER: &str = "page_fault_user";
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const CGROUP_ATTACH_TASK: &str = "cgroup_attach_task";
    pub const SYS_ENTER_MUNMAP: &str = "sys_enter_munmap";
    pub const SYS_EXIT_MUNMAP: &str = "sys_exit_munmap";
    pub const SYS_ENTER_MADVISE: &str = "sys_enter_madvise";
    pub const SYS_EXIT_MADVISE: &str = "sys_exit_madvise";
    pub const SYS_ENTER_BRK: &str = "sys_enter_brk";
    pub const SYS_EXIT_BRK: &str = "sys_exit_brk";
    pub const SYS_ENTER_MMAP: &str = "sys_enter_mmap";
    pub const SYS_EXIT_MMAP: &str = "sys_exit_mmap";
    pub const SCHED_PROCESS_FORK: &str = "sched_process_fork";
    pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
    pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
    pub const FILEMAP_ADD: &str = "filemap_add";
    pub const FILEMAP_DELETE: &str = "filemap_delete";
    pub const TASK_NUMA_FAULT: &str = "task_numa_fault";
    /// Benchmark only (the eBPF crate's `bench` feature): an empty program
    /// on `page_fault_user`.
    pub const FLOOR_PAGE_FAULT_USER: &str = "floor_page_fault_user";
    /// Benchmark only: an empty program on `rss_stat`.
    pub const FLOOR_RSS_STAT: &str = "floor_rss_stat";
}

/// A program on a classic tracepoint, `tracefs/events/{category}/{event}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracePoint {
    pub program: &'static str,
    pub category: &'static str,
    pub event: &'static str,
}

/// A program on a BTF tracepoint (`tp_btf/{event}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BtfTracePoint {
    pub program: &'static str,
    pub event: &'static str,
}

impl TracePoint {
    const fn new(program: &'static str, category: &'static str, event: &'static str) -> Self {
        Self {
            program,
            category,
            event,
        }
    }
}

impl BtfTracePoint {
    const fn new(program: &'static str, event: &'static str) -> Self {
        Self { program, event }
    }
}

/// The classic tracepoint programs.
pub const TRACEPOINTS: &[TracePoint] = &[
    TracePoint::new(program::SYS_ENTER_MUNMAP, "syscalls", "sys_enter_munmap"),
    TracePoint::new(program::SYS_EXIT_MUNMAP, "syscalls", "sys_exit_munmap"),
    TracePoint::new(program::SYS_ENTER_MADVISE, "syscalls", "sys_enter_madvise"),
    TracePoint::new(program::SYS_EXIT_MADVISE, "syscalls", "sys_exit_madvise"),
    TracePoint::new(program::SYS_ENTER_BRK, "syscalls", "sys_enter_brk"),
    TracePoint::new(program::SYS_EXIT_BRK, "syscalls", "sys_exit_brk"),
    TracePoint::new(program::SYS_ENTER_MMAP, "syscalls", "sys_enter_mmap"),
    TracePoint::new(program::SYS_EXIT_MMAP, "syscalls", "sys_exit_mmap"),
    TracePoint::new(program::SCHED_PROCESS_FORK, "sched", "sched_process_fork"),
    TracePoint::new(program::SCHED_PROCESS_EXIT, "sched", "sched_process_exit"),
    TracePoint::new(program::SCHED_PROCESS_EXEC, "sched", "sched_process_exec"),
    TracePoint::new(
        program::FILEMAP_ADD,
        "filemap",
        "mm_filemap_add_to_page_cache",
    ),
    TracePoint::new(
        program::FILEMAP_DELETE,
        "filemap",
        "mm_filemap_delete_from_page_cache",
    ),
];

/// The BTF tracepoint programs.
pub const BTF_TRACEPOINTS: &[BtfTracePoint] = &[
    BtfTracePoint::new(program::SCHED_SWITCH, "sched_switch"),
    BtfTracePoint::new(program::CGROUP_ATTACH_TASK, "cgroup_attach_task"),
    BtfTracePoint::new(program::PAGE_FAULT_USER, "page_fault_user"),
    BtfTracePoint::new(program::RSS_STAT, "rss_stat"),
];

/// A program on a kernel function's entry (`fentry/{function}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FEntry {
    pub program: &'static str,
    pub function: &'static str,
}

/// The fentry programs. Each is optional: a kernel without the function
/// (built without NUMA balancing) has nothing for it to see, and the agent
/// runs without it.
pub const FENTRIES: &[FEntry] = &[FEntry {
    program: program::TASK_NUMA_FAULT,
    function: "task_numa_fault",
}];

/// The benchmark's empty programs, in the object only when the eBPF crate
/// is built with its `bench` feature.
pub const BENCH_BTF_TRACEPOINTS: &[BtfTracePoint] = &[
    BtfTracePoint::new(program::FLOOR_PAGE_FAULT_USER, "page_fault_user"),
    BtfTracePoint::new(program::FLOOR_RSS_STAT, "rss_stat"),
];
