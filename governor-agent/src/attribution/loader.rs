//! Loading: the embedded eBPF object, this kernel's layout written into its
//! read-only data, the programs of a [`ProgramSet`] attached, the maps taken
//! out for the registry.

use std::collections::BTreeMap;

use aya::{
    Btf, Ebpf, EbpfLoader,
    programs::{BtfTracePoint, FEntry, ProgramError, TracePoint},
};
use nodedb_governor_common::{
    KernelLayout, MAX_PROCS, MAX_SLOTS,
    names::{self, global, map, program},
};

use super::{Attribution, Persistence, ProgramStats, pins::PINNED_MAPS};
use crate::{
    btf,
    error::AgentError,
    privilege,
    tracefs::{self, TraceFs},
};

/// The compiled eBPF object, built by `build.rs` with aya-build.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodedb-governor-ebpf"));

/// Which programs to attach. The full set is what the agent runs; the
/// others (feature `bench`) exist so the tracing-cost benchmark can price
/// each source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramSet {
    /// Everything: the agent's configuration.
    Full,
    /// Only `page_fault_user` (source 2 above).
    #[cfg(feature = "bench")]
    FaultsOnly,
    /// Only `rss_stat` (source 1 above).
    #[cfg(feature = "bench")]
    RssOnly,
    /// Empty programs on the fault-path tracepoints (`page_fault_user`,
    /// `rss_stat`) and `sched_switch`: the benchmark's floor, the cost of
    /// running any program there at all.
    #[cfg(feature = "bench")]
    Floor,
    /// Only the page-cache programs (`filemap_add`, `filemap_delete`).
    #[cfg(feature = "bench")]
    PageCacheOnly,
}

impl ProgramSet {
    /// Whether the set attaches `prog`.
    fn attaches(self, prog: &str) -> bool {
        // sched_switch and cgroup_attach_task keep the programs' identity
        // cache honest, so they go wherever a hot program goes.
        if matches!(prog, program::SCHED_SWITCH | program::CGROUP_ATTACH_TASK) {
            return true;
        }
        let floor = names::BENCH_BTF_TRACEPOINTS
            .iter()
            .any(|tp| tp.program == prog);
        match self {
            Self::Full => !floor,
            #[cfg(feature = "bench")]
            Self::FaultsOnly => prog == program::PAGE_FAULT_USER,
            #[cfg(feature = "bench")]
            Self::RssOnly => prog == program::RSS_STAT,
            #[cfg(feature = "bench")]
            Self::Floor => floor,
            #[cfg(feature = "bench")]
            Self::PageCacheOnly => {
                matches!(prog, program::FILEMAP_ADD | program::FILEMAP_DELETE)
            }
        }
    }
}

impl Attribution {
    /// Loads and attaches the programs.
    pub fn load(set: ProgramSet) -> Result<Self, AgentError> {
        Self::load_with(set, None, &Default::default())
    }

    /// Loads with the workload's maps sized by `maps`.
    pub(super) fn load_with(
        set: ProgramSet,
        persistence: Option<Persistence>,
        maps: &crate::config::MapsConfig,
    ) -> Result<Self, AgentError> {
        privilege::check_prerequisites()?;
        raise_memlock();
        let tracefs = TraceFs::find_or_mount()?;
        let offsets = tracefs::trace_offsets(&tracefs)?;
        let layout = kernel_layout(&tracefs)?;
        let btf = Btf::from_sys_fs().map_err(|e| AgentError::ebpf("reading kernel BTF", e))?;
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&btf))
            .override_global(global::OFFSETS, &offsets, true)
            .override_global(global::LAYOUT, &layout, true)
            .map_max_entries(map::ENGINE_BY_TID, maps.threads)
            .map_max_entries(map::RELEASING, maps.threads)
            .map_max_entries(map::PENDING_MMAP, maps.threads)
            .map_max_entries(map::REGIONS, maps.regions)
            .map_max_entries(map::FILE_OWNERS, maps.files);
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

        for tp in names::TRACEPOINTS
            .iter()
            .filter(|tp| set.attaches(tp.program))
        {
            let (prog, category, event) = (tp.program, tp.category, tp.event);
            let program: &mut TracePoint = program_mut(&mut ebpf, prog)?;
            program
                .load()
                .map_err(|e| AgentError::ebpf(format!("loading {prog}"), e))?;
            program.attach(category, event).map_err(|e| {
                AgentError::ebpf(format!("attaching {prog} to {category}/{event}"), e)
            })?;
        }
        let btf_tracepoints = names::BTF_TRACEPOINTS.iter();
        #[cfg(feature = "bench")]
        let btf_tracepoints = btf_tracepoints.chain(names::BENCH_BTF_TRACEPOINTS);
        for tp in btf_tracepoints.filter(|tp| set.attaches(tp.program)) {
            let prog = tp.program;
            let program: &mut BtfTracePoint = program_mut(&mut ebpf, prog)?;
            program
                .load(tp.event, &btf)
                .map_err(|e| AgentError::ebpf(format!("loading {prog}"), e))?;
            program
                .attach()
                .map_err(|e| AgentError::ebpf(format!("attaching {prog}"), e))?;
        }
        for f in names::FENTRIES.iter().filter(|f| set.attaches(f.program)) {
            let (prog, function) = (f.program, f.function);
            let program: &mut FEntry = program_mut(&mut ebpf, prog)?;
            let attached = program
                .load(function, &btf)
                .and_then(|()| program.attach().map(drop));
            // Optional: the agent runs without it, says why, and leaves it
            // out of `status`'s programs (the VM checks require it there).
            if let Err(e) = attached {
                tracing::warn!(
                    "{prog} not attached ({}): where NUMA balancing scans, a thread that reads \
                     another engine's memory can take it over",
                    unavailable(&e)
                );
            }
        }

        let stats = take(&mut ebpf, map::STATS)?;
        let procs_map = take(&mut ebpf, map::PROCS)?;
        let by_cgroup = take(&mut ebpf, map::ENGINE_BY_CGROUP)?;
        let by_tid = take(&mut ebpf, map::ENGINE_BY_TID)?;
        let mm_states = take(&mut ebpf, map::MM_STATES)?;
        let cpu_parts = take(&mut ebpf, map::CPU_PARTS)?;
        let mm_by_ptr = take(&mut ebpf, map::MM_BY_PTR)?;
        let generation = take(&mut ebpf, map::GENERATION)?;
        let file_owners = take(&mut ebpf, map::FILE_OWNERS)?;
        let mark_map = take(&mut ebpf, map::MARKS)?;
        let mark_totals = take(&mut ebpf, map::MARK_TOTALS)?;
        let mark_events = take(&mut ebpf, map::MARK_EVENTS)?;
        let brk = take(&mut ebpf, map::BRK)?;
        let kernel_events = take(&mut ebpf, map::KERNEL_EVENTS)?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(what, e)| AgentError::io(what, e))?;
        Ok(Self {
            ebpf,
            persistence,
            stats,
            procs_map,
            by_cgroup,
            by_tid,
            mm_states,
            cpu_parts,
            mm_by_ptr,
            free_mm_indexes: (0..MAX_PROCS).rev().collect(),
            generation,
            file_owners,
            mark_map,
            mark_totals,
            mark_events: Some(mark_events),
            brk,
            kernel_events,
            marks: Default::default(),
            files_swept: None,
            nr_cpus,
            batch_failed: Default::default(),
            free_slots: (0..MAX_SLOTS).rev().collect(),
            procs: BTreeMap::new(),
        })
    }

    /// The programs' failed inserts (per map) and the execs they
    /// followed, summed over the CPUs: a system call per counter.
    pub fn kernel_events(&self) -> Result<crate::status::KernelEvents, AgentError> {
        use nodedb_governor_common::kernel_event;
        let mut events = crate::status::KernelEvents::default();
        for (index, name) in kernel_event::NAMES {
            let n: u64 = self
                .kernel_events
                .get(&index, 0)
                .map_err(|e| AgentError::ebpf(format!("reading {}", map::KERNEL_EVENTS), e))?
                .iter()
                .sum();
            if index == kernel_event::EXEC_FOLLOWED {
                events.execs_followed = n;
            } else {
                events.insert_failures.insert(name.to_owned(), n);
            }
        }
        Ok(events)
    }

    /// Every loaded program with its run count and run time (zero unless
    /// the kernel's program statistics are on: [`program_stats_on`]).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some(ProgramStats {
                    name: name.to_owned(),
                    run_count: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    verified_insns: info.verified_instruction_count(),
                })
            })
            .collect()
    }
}

/// The kernel layout the programs need: RSS counters from BTF, counter
/// numbering from the `rss_stat` format, the page size.
fn kernel_layout(tracefs: &TraceFs) -> Result<KernelLayout, AgentError> {
    let kernel_btf = btf::Btf::from_sys_fs()?;
    let rss = btf::rss_layout(&kernel_btf)?;
    let task_flags = btf::task_flags(&kernel_btf)?;
    let faults = btf::task_fault_counts(&kernel_btf)?;
    let member_kind = tracefs::member_kinds(&tracefs.format("kmem", "rss_stat")?)?;
    // SAFETY: sysconf has no preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page_size <= 0 || (page_size as u64).count_ones() != 1 {
        return Err(AgentError::KernelLayout {
            reason: format!("page size {page_size} is not a power of two"),
        });
    }
    // Each counter's field, the first one's at `first`, by counter number.
    let fields = |first: u32| [0, 1, 2, 3].map(|member| first + member * rss.stride);
    // The per-CPU parts (6.2+), and how the programs find this CPU's copy.
    let (rss_cpu_part, array_pptrs) = match rss.first_cpu_part {
        Some(first) => (fields(first), btf::bpf_array_pptrs(&kernel_btf)?),
        None => ([0; 4], 0),
    };
    Ok(KernelLayout {
        rss_counter: fields(rss.first_counter),
        task_mm: rss.task_mm,
        page_shift: (page_size as u64).trailing_zeros(),
        member_kind,
        task_flags,
        task_min_flt: faults.0,
        task_maj_flt: faults.1,
        rss_cpu_part,
        array_pptrs,
        _pad: 0,
    })
}

/// Why an optional program did not load or attach, in words.
fn unavailable(e: &ProgramError) -> String {
    match e {
        ProgramError::Btf(aya::BtfError::UnknownBtfTypeName { type_name }) => {
            format!("{type_name} is not in this kernel")
        }
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = format!("{verifier_log:?}");
            if log.trim().is_empty() {
                format!("the kernel refused it before verifying it: {io_error}")
            } else {
                format!("the kernel refused it: {io_error}: {}", log.trim())
            }
        }
        other => other.to_string(),
    }
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut P, AgentError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program>,
    <&'a mut P as TryFrom<&'a mut aya::programs::Program>>::Error:
        std::error::Error + Send + Sync + 'static,
{
    ebpf.program_mut(name)
        .ok_or_else(|| AgentError::ebpf(format!("program {name}"), missing("program")))?
        .try_into()
        .map_err(|e| AgentError::ebpf(format!("program {name} type"), e))
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

/// Turns the kernel's program statistics on (run counts and run times:
/// two clock reads per program run) for as long as the descriptor lives.
pub fn program_stats_on() -> Result<std::os::fd::OwnedFd, AgentError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| {
        AgentError::io(
            "turning on the kernel's eBPF program statistics",
            e.io_error,
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use aya_obj::{Object, ProgramSection};
    use object::{Object as _, ObjectSection as _, ObjectSymbol as _};

    use super::*;

    /// The programs the object must hold, with the ELF section each one's
    /// macro puts it in.
    fn expected_programs() -> BTreeMap<&'static str, String> {
        let classic = names::TRACEPOINTS.iter().map(|tp| {
            (
                tp.program,
                format!("tracepoint/{}/{}", tp.category, tp.event),
            )
        });
        let btf = names::BTF_TRACEPOINTS.iter();
        #[cfg(feature = "bench")]
        let btf = btf.chain(names::BENCH_BTF_TRACEPOINTS);
        let btf = btf.map(|tp| (tp.program, format!("tp_btf/{}", tp.event)));
        let fentry = names::FENTRIES
            .iter()
            .map(|f| (f.program, format!("fentry/{}", f.function)));
        classic.chain(btf).chain(fentry).collect()
    }

    /// The layout pins are checked against at a restart is the object's
    /// (a type changed in `governor-common` without the list fails here).
    #[test]
    fn the_pinned_layout_is_the_objects() {
        let obj = Object::parse(EBPF_OBJECT).expect("parsing the embedded eBPF object");
        let layout = crate::attribution::pins::pinned_layout(&Default::default());
        let names: Vec<&str> = layout.iter().map(|l| l.0).collect();
        assert_eq!(
            names, PINNED_MAPS,
            "the layout lists the pinned maps, in order"
        );
        for (name, key, value, entries) in layout {
            let m = &obj.maps[name];
            assert_eq!(
                (m.key_size(), m.value_size(), m.max_entries()),
                (key, value, entries),
                "{name}: key and value sizes and entries"
            );
        }
    }

    /// The embedded object, the agent's `names` and the eBPF crate's
    /// `#[map]`/`#[tracepoint]` items must agree: a name changed on one side
    /// only fails here, not at load time on some host.
    #[test]
    fn object_names_match_the_constants() {
        let obj = Object::parse(EBPF_OBJECT).expect("parsing the embedded eBPF object");

        // Global data sections (.rodata, .bss, ...) are maps too for aya.
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|m| !m.starts_with('.'))
            .collect();
        let named: BTreeSet<&str> = map::ALL.iter().copied().collect();
        assert_eq!(maps, named, "maps in the object vs names::map::ALL");
        let pinned: BTreeSet<&str> = PINNED_MAPS.iter().copied().collect();
        assert!(
            pinned.is_subset(&named),
            "pinned maps not in names::map::ALL"
        );

        let expected = expected_programs();
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        assert_eq!(
            programs,
            expected.keys().copied().collect(),
            "programs in the object vs names (bench feature: {})",
            cfg!(feature = "bench")
        );
        if !cfg!(feature = "bench") {
            assert!(
                !programs.iter().any(|p| p.starts_with("floor_")),
                "the production object carries benchmark programs: {programs:?}"
            );
        }
        for tp in names::TRACEPOINTS {
            assert!(
                matches!(obj.programs[tp.program].section, ProgramSection::TracePoint),
                "{} is not a classic tracepoint program",
                tp.program
            );
        }
        for tp in names::BTF_TRACEPOINTS {
            assert!(
                matches!(
                    obj.programs[tp.program].section,
                    ProgramSection::BtfTracePoint
                ),
                "{} is not a BTF tracepoint program",
                tp.program
            );
        }

        for f in names::FENTRIES {
            assert!(
                matches!(
                    obj.programs[f.program].section,
                    ProgramSection::FEntry { .. }
                ),
                "{} is not an fentry program",
                f.program
            );
        }

        // Where each program attaches and the globals the loader writes are
        // only in the ELF file itself: section and symbol names.
        let elf = object::File::parse(EBPF_OBJECT).expect("parsing the ELF file");
        for (prog, section) in &expected {
            let symbol = elf
                .symbol_by_name(prog)
                .unwrap_or_else(|| panic!("no symbol {prog}"));
            let index = symbol
                .section_index()
                .unwrap_or_else(|| panic!("symbol {prog} in no section"));
            let found = elf
                .section_by_index(index)
                .and_then(|s| s.name().map(str::to_owned))
                .unwrap_or_else(|e| panic!("section of {prog}: {e}"));
            assert_eq!(&found, section, "where {prog} attaches");
        }
        for global in [global::OFFSETS, global::LAYOUT] {
            let symbol = elf
                .symbol_by_name(global)
                .unwrap_or_else(|| panic!("no global {global} in the object"));
            let section = symbol
                .section_index()
                .and_then(|i| elf.section_by_index(i).ok())
                .and_then(|s| s.name().ok().map(str::to_owned));
            assert_eq!(section.as_deref(), Some(".rodata"), "section of {global}");
        }
    }
}
