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
//! - **On 6.2+** that value is the per-CPU counter's central count. It lags
//!   the exact sum by at most `percpu_counter_batch` pages per CPU, about
//!   0.1 MiB measured on 2 CPUs, which is the price of an O(1) read instead
//!   of an O(CPUs) sum on every fault.

//! # Buckets
//! Each process has an `unattributed` slot (governed threads with no
//! engine) and an `external` slot (changes made from outside the process:
//! reclaim, exit teardown). When reading, the external slot is spread over
//! the process's engines in proportion to what they hold of that kind, and a
//! bucket that would read negative (its memory was released by code we
//! could not tie back to an owner) is clamped at zero with the remainder
//! moved to `unattributed`, so the parts always add up to the process total.

mod reading;

use std::{collections::BTreeMap, path::Path};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{BtfTracePoint, TracePoint},
};
use nodedb_governor_common::{
    CgroupKey, KernelLayout, MAX_PROCS, MAX_SLOTS, MmState, ProcInfo, SlotStats, identity, kind,
};

use super::{
    btf,
    error::AgentError,
    privilege, procfs,
    tracefs::{self, TraceFs},
};

pub use reading::{Attributed, ProcessAttribution, ProgramStats, Reading};

/// The compiled eBPF object, built by `build.rs` with aya-build.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodedb-governor-ebpf"));

/// Classic tracepoints we attach: (program, category, event).
const TRACEPOINTS: &[(&str, &str, &str)] = &[
    ("sys_enter_munmap", "syscalls", "sys_enter_munmap"),
    ("sys_exit_munmap", "syscalls", "sys_exit_munmap"),
    ("sys_enter_madvise", "syscalls", "sys_enter_madvise"),
    ("sys_exit_madvise", "syscalls", "sys_exit_madvise"),
    ("sys_enter_brk", "syscalls", "sys_enter_brk"),
    ("sys_exit_brk", "syscalls", "sys_exit_brk"),
    ("sys_enter_mmap", "syscalls", "sys_enter_mmap"),
    ("sys_exit_mmap", "syscalls", "sys_exit_mmap"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exit", "sched", "sched_process_exit"),
];

/// Which programs to attach. The full set is what the agent runs; the
/// others exist so the tracing-cost benchmark can price each source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramSet {
    /// Everything: the agent's configuration.
    Full,
    /// Only `page_fault_user` (source 2 above).
    FaultsOnly,
    /// Only `rss_stat` (source 1 above).
    RssOnly,
    /// Empty programs on the fault-path tracepoints (`page_fault_user`,
    /// `rss_stat`) and `sched_switch`: the benchmark's floor, the cost of
    /// running any program there at all.
    Floor,
}

/// How a thread's engine is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// The thread's cgroup v2 id (a threaded child cgroup per engine).
    Cgroup,
    /// The TID-to-engine map (where threaded cgroups are unavailable).
    Tid,
}

struct TrackedProcess {
    pid: u32,
    start_time: u64,
    unattributed_slot: u32,
    external_slot: u32,
    engines: BTreeMap<String, u32>,
    mm_index: u32,
    cgroup_keys: Vec<CgroupKey>,
    tids: Vec<u32>,
}

/// The loaded programs and the registry of governed processes.
/// Where the agent keeps its maps (pinned in bpffs) and its registry of
/// governed processes, so that an agent that is killed and restarted
/// carries on counting from where it was.
#[derive(Clone, Debug)]
pub struct Persistence {
    pub pin_dir: std::path::PathBuf,
    pub state_file: std::path::PathBuf,
}

/// The maps that hold counts and registrations (the per-CPU caches are
/// rebuilt by the programs).
const PINNED_MAPS: &[&str] = &[
    "STATS",
    "PROCS",
    "ENGINE_BY_CGROUP",
    "ENGINE_BY_TID",
    "MM_STATES",
    "MM_BY_PTR",
    "REGIONS",
    "RELEASING",
    "PENDING_MMAP",
    "BRK",
    "GENERATION",
];

const STATE_VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedProcess {
    pid: u32,
    start_time: u64,
    unattributed_slot: u32,
    external_slot: u32,
    engines: BTreeMap<String, u32>,
    mm_index: u32,
    cgroup_keys: Vec<(u64, u32)>,
    tids: Vec<u32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedState {
    version: u32,
    processes: Vec<SavedProcess>,
}

pub struct Attribution {
    // Keeps programs and links alive; dropping it detaches everything.
    ebpf: Ebpf,
    persistence: Option<Persistence>,
    stats: PerCpuArray<MapData, SlotStats>,
    procs_map: BpfHashMap<MapData, u32, ProcInfo>,
    by_cgroup: BpfHashMap<MapData, CgroupKey, u32>,
    by_tid: BpfHashMap<MapData, u32, u32>,
    mm_states: Array<MapData, MmState>,
    mm_by_ptr: BpfHashMap<MapData, u64, u32>,
    free_mm_indexes: Vec<u32>,
    generation: Array<MapData, u64>,
    nr_cpus: usize,
    free_slots: Vec<u32>,
    procs: BTreeMap<u32, TrackedProcess>,
}

impl Attribution {
    /// Loads and attaches the programs.
    pub fn load(set: ProgramSet) -> Result<Self, AgentError> {
        Self::load_with(set, None)
    }

    /// Loads with the state maps pinned under `p.pin_dir`. If an earlier
    /// agent left pinned maps and its registry (it was killed), they are
    /// taken over: the counts go on from where they were. Returns whether
    /// state was taken over.
    pub fn load_persistent(set: ProgramSet, p: &Persistence) -> Result<(Self, bool), AgentError> {
        let saved = std::fs::read(&p.state_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<SavedState>(&b).ok())
            .filter(|s| s.version == STATE_VERSION)
            .filter(|_| PINNED_MAPS.iter().all(|m| p.pin_dir.join(m).exists()));
        if saved.is_none() {
            // Pins without a registry (or the reverse) cannot be trusted.
            Self::unpin_at(p);
        }
        std::fs::create_dir_all(&p.pin_dir)
            .map_err(|e| AgentError::io(format!("creating {}", p.pin_dir.display()), e))?;
        let mut me = Self::load_with(set, Some(p.clone()))?;
        let restored = saved.is_some();
        if let Some(saved) = saved {
            for sp in saved.processes {
                me.free_slots.retain(|s| {
                    *s != sp.unattributed_slot
                        && *s != sp.external_slot
                        && !sp.engines.values().any(|e| e == s)
                });
                me.free_mm_indexes.retain(|i| *i != sp.mm_index);
                me.procs.insert(
                    sp.pid,
                    TrackedProcess {
                        pid: sp.pid,
                        start_time: sp.start_time,
                        unattributed_slot: sp.unattributed_slot,
                        external_slot: sp.external_slot,
                        engines: sp.engines,
                        mm_index: sp.mm_index,
                        cgroup_keys: sp
                            .cgroup_keys
                            .into_iter()
                            .map(|(cgroup_id, tgid)| CgroupKey {
                                cgroup_id,
                                tgid,
                                _pad: 0,
                            })
                            .collect(),
                        tids: sp.tids,
                    },
                );
            }
            for pid in me.reap_exited() {
                tracing::info!(pid, "a process of the earlier agent has exited");
            }
            me.bump_generation()?;
            tracing::info!(processes = me.procs.len(), pins = %p.pin_dir.display(), "took over the earlier agent's maps and registry");
        }
        me.save();
        Ok((me, restored))
    }

    /// Writes the registry next to the pinned maps (atomically).
    fn save(&self) {
        let Some(p) = &self.persistence else {
            return;
        };
        let state = SavedState {
            version: STATE_VERSION,
            processes: self
                .procs
                .values()
                .map(|t| SavedProcess {
                    pid: t.pid,
                    start_time: t.start_time,
                    unattributed_slot: t.unattributed_slot,
                    external_slot: t.external_slot,
                    engines: t.engines.clone(),
                    mm_index: t.mm_index,
                    cgroup_keys: t
                        .cgroup_keys
                        .iter()
                        .map(|k| (k.cgroup_id, k.tgid))
                        .collect(),
                    tids: t.tids.clone(),
                })
                .collect(),
        };
        let tmp = p.state_file.with_extension("tmp");
        let written = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &p.state_file));
        if let Err(e) = written {
            tracing::warn!(file = %p.state_file.display(), error = %e, "could not save the registry");
        }
    }

    fn unpin_at(p: &Persistence) {
        for m in PINNED_MAPS {
            let _ = std::fs::remove_file(p.pin_dir.join(m));
        }
        let _ = std::fs::remove_dir(&p.pin_dir);
        let _ = std::fs::remove_file(&p.state_file);
    }

    /// Every loaded program with its run count and run time (zero unless
    /// the kernel's program statistics are on: `aya::sys::enable_stats`).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramStats {
                    name: name.to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                })
            })
            .collect()
    }

    /// A clean stop: the pins and the registry go (the next agent starts
    /// afresh).
    pub fn unpin(&self) {
        if let Some(p) = &self.persistence {
            Self::unpin_at(p);
        }
    }

    fn load_with(set: ProgramSet, persistence: Option<Persistence>) -> Result<Self, AgentError> {
        privilege::check_prerequisites()?;
        raise_memlock();
        let tracefs = TraceFs::find_or_mount()?;
        let offsets = tracefs::trace_offsets(&tracefs)?;
        let layout = kernel_layout(&tracefs)?;
        let btf = Btf::from_sys_fs().map_err(|e| AgentError::ebpf("reading kernel BTF", e))?;
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global("OFFSETS", &offsets, true)
            .override_global("LAYOUT", &layout, true);
        let pin_paths: Vec<(&str, std::path::PathBuf)> = persistence
            .iter()
            .flat_map(|p| PINNED_MAPS.iter().map(|m| (*m, p.pin_dir.join(m))))
            .collect();
        for (m, path) in &pin_paths {
            loader.map_pin_path(m, path.as_path());
        }
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| AgentError::ebpf("loading the eBPF object", e))?;

        let wanted = |name: &str| match set {
            ProgramSet::Full => !name.starts_with("floor_"),
            ProgramSet::FaultsOnly => name == "page_fault_user",
            ProgramSet::RssOnly => name == "rss_stat",
            ProgramSet::Floor => matches!(name, "floor_page_fault_user" | "floor_rss_stat"),
        };
        for &(prog, category, event) in TRACEPOINTS {
            if !wanted(prog) {
                continue;
            }
            let program: &mut TracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| AgentError::ebpf(format!("program {prog}"), missing("program")))?
                .try_into()
                .map_err(|e| AgentError::ebpf(format!("program {prog} type"), e))?;
            program
                .load()
                .map_err(|e| AgentError::ebpf(format!("loading {prog}"), e))?;
            program.attach(category, event).map_err(|e| {
                AgentError::ebpf(format!("attaching {prog} to {category}/{event}"), e)
            })?;
        }
        // sched_switch and cgroup_attach_task keep the programs' identity
        // cache honest, so they go wherever a hot program goes.
        for (prog, event) in [
            ("sched_switch", "sched_switch"),
            ("cgroup_attach_task", "cgroup_attach_task"),
            ("page_fault_user", "page_fault_user"),
            ("rss_stat", "rss_stat"),
            ("floor_page_fault_user", "page_fault_user"),
            ("floor_rss_stat", "rss_stat"),
        ] {
            if !(wanted(prog) || matches!(prog, "sched_switch" | "cgroup_attach_task")) {
                continue;
            }
            let program: &mut BtfTracePoint = ebpf
                .program_mut(prog)
                .ok_or_else(|| AgentError::ebpf(format!("program {prog}"), missing("program")))?
                .try_into()
                .map_err(|e| AgentError::ebpf(format!("program {prog} type"), e))?;
            program
                .load(event, &btf)
                .map_err(|e| AgentError::ebpf(format!("loading {prog}"), e))?;
            program
                .attach()
                .map_err(|e| AgentError::ebpf(format!("attaching {prog}"), e))?;
        }

        let stats = take(&mut ebpf, "STATS")?;
        let procs_map = take(&mut ebpf, "PROCS")?;
        let by_cgroup = take(&mut ebpf, "ENGINE_BY_CGROUP")?;
        let by_tid = take(&mut ebpf, "ENGINE_BY_TID")?;
        let mm_states = take(&mut ebpf, "MM_STATES")?;
        let mm_by_ptr = take(&mut ebpf, "MM_BY_PTR")?;
        let generation = take(&mut ebpf, "GENERATION")?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| AgentError::io(what, e))?;
        Ok(Self {
            ebpf,
            persistence,
            stats,
            procs_map,
            by_cgroup,
            by_tid,
            mm_states,
            mm_by_ptr,
            free_mm_indexes: (0..MAX_PROCS).rev().collect(),
            generation,
            nr_cpus,
            free_slots: (0..MAX_SLOTS).rev().collect(),
            procs: BTreeMap::new(),
        })
    }

    /// Invalidates the programs' per-CPU identity caches after a registry
    /// change. The word only grows (the programs add 1 per cgroup move, we
    /// add a large step), so no cached generation is ever current again.
    fn bump_generation(&mut self) -> Result<(), AgentError> {
        let now = self
            .generation
            .get(&0, 0)
            .map_err(|e| AgentError::ebpf("reading the registry generation", e))?;
        self.generation
            .set(0, now + identity::AGENT_GENERATION_STEP, 0)
            .map_err(|e| AgentError::ebpf("bumping the registry generation", e))
    }

    fn alloc_slot(&mut self) -> Result<u32, AgentError> {
        let slot = self.free_slots.pop().ok_or(AgentError::Full {
            what: "counter slots",
            limit: MAX_SLOTS,
        })?;
        // A reused slot starts from zero on every CPU.
        let zero = PerCpuValues::try_from(vec![SlotStats::default(); self.nr_cpus])
            .map_err(|e| AgentError::io("building per-CPU zeroes", e))?;
        self.stats
            .set(slot, zero, 0)
            .map_err(|e| AgentError::ebpf(format!("resetting slot {slot}"), e))?;
        Ok(slot)
    }

    /// Starts governing process `pid` with the named engines. Its current
    /// resident memory is the baseline and counts as unattributed.
    pub fn register_process(&mut self, pid: u32, engines: &[String]) -> Result<(), AgentError> {
        if self.procs.contains_key(&pid) {
            return Ok(());
        }
        let start_time = procfs::start_time(pid)?;
        let baseline = procfs::rss_breakdown(pid)?;
        let unattributed_slot = self.alloc_slot()?;
        let external_slot = self.alloc_slot()?;
        let mut slots = BTreeMap::new();
        for name in engines {
            slots.insert(name.clone(), self.alloc_slot()?);
        }
        let mm_index = self.free_mm_indexes.pop().ok_or(AgentError::Full {
            what: "governed processes",
            limit: MAX_PROCS,
        })?;
        let mut baseline_bytes = [0i64; kind::COUNT];
        baseline_bytes[kind::ANON] = baseline.anon as i64;
        baseline_bytes[kind::FILE] = baseline.file as i64;
        baseline_bytes[kind::SHMEM] = baseline.shmem as i64;
        baseline_bytes[kind::SWAP] = baseline.swap as i64;
        // The baseline is resident before we started: it is unattributed.
        let mut per_cpu = vec![SlotStats::default(); self.nr_cpus];
        per_cpu[0] = SlotStats {
            resident_bytes: baseline_bytes,
            ..SlotStats::default()
        };
        self.stats
            .set(
                unattributed_slot,
                PerCpuValues::try_from(per_cpu).map_err(|e| AgentError::io("per-CPU seed", e))?,
                0,
            )
            .map_err(|e| AgentError::ebpf("seeding baseline", e))?;
        // The programs difference the counters against this baseline from
        // the process's first change on.
        let state = MmState {
            mm: 0,
            last_bytes: baseline_bytes,
            tgid: pid,
            external_slot,
        };
        self.mm_states
            .set(mm_index, state, 0)
            .map_err(|e| AgentError::ebpf(format!("initialising counter state of pid {pid}"), e))?;
        let info = ProcInfo {
            unattributed_slot,
            external_slot,
            mm_index,
            _pad: 0,
        };
        self.procs_map
            .insert(pid, info, 0)
            .map_err(|e| AgentError::ebpf(format!("registering pid {pid}"), e))?;
        self.bump_generation()?;
        self.procs.insert(
            pid,
            TrackedProcess {
                pid,
                start_time,
                unattributed_slot,
                external_slot,
                engines: slots,
                mm_index,
                cgroup_keys: Vec::new(),
                tids: Vec::new(),
            },
        );
        tracing::info!(pid, engines = engines.len(), "process registered");
        self.save();
        Ok(())
    }

    /// Whether `pid` is governed.
    pub fn is_registered(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    fn engine_slot(&self, pid: u32, engine: &str) -> Result<u32, AgentError> {
        let proc_ = self
            .procs
            .get(&pid)
            .ok_or(AgentError::NoSuchProcess { pid })?;
        proc_
            .engines
            .get(engine)
            .copied()
            .ok_or_else(|| AgentError::UnknownEngine {
                name: engine.to_owned(),
                known: proc_.engines.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// Tells the programs that threads of `pid` in cgroup `cgroup_id` belong
    /// to `engine` (cgroup identity).
    pub fn bind_cgroup(
        &mut self,
        pid: u32,
        engine: &str,
        cgroup_id: u64,
    ) -> Result<(), AgentError> {
        let slot = self.engine_slot(pid, engine)?;
        let key = CgroupKey {
            cgroup_id,
            tgid: pid,
            _pad: 0,
        };
        self.by_cgroup
            .insert(key, slot, 0)
            .map_err(|e| AgentError::ebpf(format!("binding cgroup {cgroup_id} to {engine}"), e))?;
        if let Some(p) = self.procs.get_mut(&pid)
            && !p.cgroup_keys.contains(&key)
        {
            p.cgroup_keys.push(key);
        }
        self.save();
        self.bump_generation()
    }

    /// Assigns thread `tid` of `pid` to `engine` through the TID map. Threads
    /// it creates afterwards inherit the engine.
    pub fn assign_tid(&mut self, pid: u32, tid: u32, engine: &str) -> Result<(), AgentError> {
        if !Path::new(&format!("/proc/{pid}/task/{tid}")).exists() {
            return Err(AgentError::NoSuchThread { pid, tid });
        }
        let slot = self.engine_slot(pid, engine)?;
        self.by_tid
            .insert(tid, slot, 0)
            .map_err(|e| AgentError::ebpf(format!("assigning thread {tid} to {engine}"), e))?;
        if let Some(p) = self.procs.get_mut(&pid)
            && !p.tids.contains(&tid)
        {
            p.tids.push(tid);
        }
        self.save();
        self.bump_generation()
    }

    /// Stops governing `pid`: removes it from every map and frees its slots.
    pub fn forget_process(&mut self, pid: u32) {
        let Some(p) = self.procs.remove(&pid) else {
            return;
        };
        let _ = self.procs_map.remove(&pid);
        for key in &p.cgroup_keys {
            let _ = self.by_cgroup.remove(key);
        }
        for tid in &p.tids {
            let _ = self.by_tid.remove(tid);
        }
        if let Ok(state) = self.mm_states.get(&p.mm_index, 0) {
            let _ = self.mm_by_ptr.remove(&state.mm);
        }
        let _ = self.mm_states.set(p.mm_index, MmState::default(), 0);
        self.free_mm_indexes.push(p.mm_index);
        if let Err(e) = self.bump_generation() {
            tracing::warn!(error = %e, "could not invalidate identity caches");
        }
        self.free_slots.push(p.unattributed_slot);
        self.free_slots.push(p.external_slot);
        self.free_slots.extend(p.engines.values().copied());
        tracing::info!(pid = p.pid, "process forgotten");
        self.save();
    }

    /// Forgets processes that have exited (or whose pid was reused), and
    /// returns their pids.
    pub fn reap_exited(&mut self) -> Vec<u32> {
        let gone: Vec<u32> = self
            .procs
            .values()
            .filter(|p| procfs::start_time(p.pid).ok() != Some(p.start_time))
            .map(|p| p.pid)
            .collect();
        for pid in &gone {
            self.forget_process(*pid);
        }
        gone
    }

    fn read_slot(&self, slot: u32) -> Result<SlotStats, AgentError> {
        let values = self
            .stats
            .get(&slot, 0)
            .map_err(|e| AgentError::ebpf(format!("reading slot {slot}"), e))?;
        let mut sum = SlotStats::default();
        for v in values.iter() {
            for k in 0..kind::COUNT {
                sum.resident_bytes[k] += v.resident_bytes[k];
            }
            sum.mapped_bytes += v.mapped_bytes;
            sum.page_faults += v.page_faults;
            sum.released_for_others_bytes += v.released_for_others_bytes;
            sum.rss_events += v.rss_events;
        }
        Ok(sum)
    }

    /// Reads every governed process's attribution.
    pub fn read(&self) -> Result<Reading, AgentError> {
        let mut processes = Vec::new();
        for p in self.procs.values() {
            let mut engines = BTreeMap::new();
            for (name, slot) in &p.engines {
                engines.insert(name.clone(), self.read_slot(*slot)?);
            }
            let unattributed = self.read_slot(p.unattributed_slot)?;
            let external = self.read_slot(p.external_slot)?;
            let vm_rss_bytes = procfs::rss_breakdown(p.pid).map(|b| b.total()).ok();
            processes.push(settle(p.pid, engines, unattributed, external, vm_rss_bytes));
        }
        Ok(Reading { processes })
    }
}

/// The kernel layout the programs need: RSS counters from BTF, counter
/// numbering from the `rss_stat` format, the page size.
fn kernel_layout(tracefs: &TraceFs) -> Result<KernelLayout, AgentError> {
    let rss = btf::rss_layout(&btf::Btf::from_sys_fs()?)?;
    let member_kind = tracefs::member_kinds(&tracefs.format("kmem", "rss_stat")?)?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page_size <= 0 || (page_size as u64).count_ones() != 1 {
        return Err(AgentError::KernelLayout {
            reason: format!("page size {page_size} is not a power of two"),
        });
    }
    let counter = |member: u32| rss.first_counter + member * rss.stride;
    Ok(KernelLayout {
        rss_counter: [counter(0), counter(1), counter(2), counter(3)],
        task_mm: rss.task_mm,
        page_shift: (page_size as u64).trailing_zeros(),
        member_kind,
    })
}

/// Turns raw slot counters into the reported figures: spreads the external
/// slot over the buckets and clamps negatives into `unattributed`.
fn settle(
    pid: u32,
    engines: BTreeMap<String, SlotStats>,
    unattributed: SlotStats,
    external: SlotStats,
    vm_rss_bytes: Option<u64>,
) -> ProcessAttribution {
    let names: Vec<String> = engines.keys().cloned().collect();
    let mut rows: Vec<SlotStats> = engines.into_values().collect();
    rows.push(unattributed);
    for k in 0..kind::COUNT {
        let ext = external.resident_bytes[k];
        if ext != 0 {
            let held: i64 = rows.iter().map(|r| r.resident_bytes[k].max(0)).sum();
            let mut left = ext;
            if held > 0 {
                for r in rows.iter_mut() {
                    let share =
                        (ext as i128 * r.resident_bytes[k].max(0) as i128 / held as i128) as i64;
                    r.resident_bytes[k] += share;
                    left -= share;
                }
            }
            // Rounding remainder, or nothing held at all: unattributed.
            if let Some(last) = rows.last_mut() {
                last.resident_bytes[k] += left;
            }
        }
        let deficit: i64 = rows[..names.len()]
            .iter_mut()
            .map(|r| {
                let neg = r.resident_bytes[k].min(0);
                r.resident_bytes[k] -= neg;
                neg
            })
            .sum();
        if let Some(last) = rows.last_mut() {
            last.resident_bytes[k] += deficit;
        }
    }
    let unattributed = rows.pop().map(engine_usage).unwrap_or_default();
    let engines = names
        .into_iter()
        .zip(rows)
        .map(|(n, r)| (n, engine_usage(r)))
        .collect();
    ProcessAttribution {
        pid,
        engines,
        unattributed,
        vm_rss_bytes,
    }
}

fn engine_usage(s: SlotStats) -> Attributed {
    let r = |k: usize| s.resident_bytes[k].max(0) as u64;
    Attributed {
        resident_bytes: r(kind::ANON) + r(kind::FILE) + r(kind::SHMEM),
        anon_bytes: r(kind::ANON),
        file_bytes: r(kind::FILE),
        shmem_bytes: r(kind::SHMEM),
        swap_bytes: r(kind::SWAP),
        mapped_bytes: s.mapped_bytes.max(0) as u64,
        page_faults: s.page_faults,
        released_for_others_bytes: s.released_for_others_bytes.max(0) as u64,
    }
}

fn take<V: TryFrom<aya::maps::Map>>(ebpf: &mut Ebpf, name: &str) -> Result<V, AgentError>
where
    V::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| AgentError::ebpf(format!("map {name}"), missing("map")))?;
    V::try_from(map).map_err(|e| AgentError::ebpf(format!("map {name} type"), e))
}

fn missing(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{what} not in the eBPF object"),
    )
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK; fine on 5.11+");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(anon: i64, file: i64) -> SlotStats {
        let mut s = SlotStats::default();
        s.resident_bytes[kind::ANON] = anon;
        s.resident_bytes[kind::FILE] = file;
        s
    }

    #[test]
    fn external_changes_are_spread_by_share_and_parts_add_up() {
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), stats(300, 0));
        engines.insert("b".to_owned(), stats(100, 50));
        let u = settle(1, engines, stats(0, 50), stats(-200, -20), None);
        assert_eq!(u.engines["a"].anon_bytes, 150);
        assert_eq!(u.engines["b"].anon_bytes, 50);
        assert_eq!(u.engines["b"].file_bytes, 40);
        assert_eq!(u.unattributed.file_bytes, 40);
        let total: u64 = u.engines.values().map(|e| e.resident_bytes).sum::<u64>()
            + u.unattributed.resident_bytes;
        assert_eq!(total, 300 + 100 + 50 + 50 - 200 - 20);
    }

    #[test]
    fn negative_engine_is_clamped_into_unattributed() {
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), stats(-4096, 0));
        engines.insert("b".to_owned(), stats(8192, 0));
        let u = settle(1, engines, stats(10_000, 0), SlotStats::default(), None);
        assert_eq!(u.engines["a"].anon_bytes, 0);
        assert_eq!(u.engines["b"].anon_bytes, 8192);
        assert_eq!(u.unattributed.anon_bytes, 10_000 - 4096);
    }
}
