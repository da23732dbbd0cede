//! The registry of governed processes: which processes, engine cgroups and
//! threads the programs attribute, the slots they count in, and the map
//! entries that tell the programs so.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
};

use aya::maps::PerCpuValues;
use nodedb_governor_common::{
    CgroupKey, CpuParts, FileKey, FileOwner, MAX_PROCS, MAX_SLOTS, MmState, ProcInfo, SlotStats,
    identity, kind,
};

use super::Attribution;
use crate::{error::AgentError, procfs};

/// How often the agent sweeps out file-ownership entries that count
/// nothing.
pub const FILE_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// How a thread's engine is recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Identity {
    /// The thread's cgroup v2 id (a threaded child cgroup per engine).
    Cgroup,
    /// The TID-to-engine map (where threaded cgroups are unavailable).
    Tid,
}

/// A governed process: its slots and the map entries made for it, so that
/// forgetting it removes them all.
pub(super) struct TrackedProcess {
    pub(super) pid: u32,
    pub(super) start_time: u64,
    pub(super) unattributed_slot: u32,
    pub(super) external_slot: u32,
    pub(super) engines: BTreeMap<String, u32>,
    pub(super) mm_index: u32,
    pub(super) cgroup_keys: Vec<CgroupKey>,
    pub(super) tids: Vec<u32>,
    /// A pidfd for the process (None if the kernel gave none): readable
    /// once it has exited, so a tick learns of every exit with one `poll`.
    pub(super) pidfd: Option<OwnedFd>,
}

/// `/proc` could not tell of a governed process at the last tick (warned
/// once until it can again).
static UNREADABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A pidfd for `pid`, if it is still the process that started at
/// `start_time` once the pidfd is open (so the pidfd cannot name a
/// process that reused the pid).
pub(super) fn open_pidfd(pid: u32, start_time: u64) -> Option<OwnedFd> {
    let fd = procfs::pidfd_open(pid)?;
    (procfs::start_time(pid).ok() == Some(start_time)).then_some(fd)
}

/// What a registration took so far, given back if it fails.
#[derive(Default)]
struct Taken {
    slots: Vec<u32>,
    mm_index: Option<u32>,
}

impl Attribution {
    /// Invalidates the programs' per-CPU identity caches after a registry
    /// change. The word only grows (the programs add 1 per cgroup move, we
    /// add a large step), so no cached generation is ever current again.
    pub(super) fn bump_generation(&mut self) -> Result<(), AgentError> {
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
        // A reused slot starts from zero on every CPU; one that cannot be
        // reset goes back on the free list.
        match self.reset_slot(slot) {
            Ok(()) => Ok(slot),
            Err(e) => {
                self.free_slots.push(slot);
                Err(e)
            }
        }
    }

    fn reset_slot(&mut self, slot: u32) -> Result<(), AgentError> {
        let zero = PerCpuValues::try_from(vec![SlotStats::default(); self.nr_cpus])
            .map_err(|e| AgentError::io("building per-CPU zeroes", e))?;
        self.stats
            .set(slot, zero, 0)
            .map_err(|e| AgentError::ebpf(format!("resetting slot {slot}"), e))?;
        self.reset_mark(slot)
    }

    /// Starts governing process `pid` with the named engines. Its current
    /// resident memory is the baseline and counts as unattributed. All or
    /// nothing: a registration that fails midway (slots or address-space
    /// indexes run out, a map refuses) gives back what it took.
    pub fn register_process(&mut self, pid: u32, engines: &[String]) -> Result<(), AgentError> {
        if self.procs.contains_key(&pid) {
            return Ok(());
        }
        let start_time = procfs::start_time(pid)?;
        let baseline = procfs::rss_breakdown(pid)?;
        let mut taken = Taken::default();
        match self.register_with(pid, start_time, baseline, engines, &mut taken) {
            Ok(()) => {
                tracing::info!(pid, engines = engines.len(), "process registered");
                self.save();
                Ok(())
            }
            Err(e) => {
                let _ = self.procs_map.remove(&pid);
                self.free_slots.extend(taken.slots);
                self.free_mm_indexes.extend(taken.mm_index);
                Err(e)
            }
        }
    }

    fn register_with(
        &mut self,
        pid: u32,
        start_time: u64,
        baseline: procfs::RssBreakdown,
        engines: &[String],
        taken: &mut Taken,
    ) -> Result<(), AgentError> {
        let mut alloc = |me: &mut Self| -> Result<u32, AgentError> {
            let slot = me.alloc_slot()?;
            taken.slots.push(slot);
            Ok(slot)
        };
        let unattributed_slot = alloc(self)?;
        let external_slot = alloc(self)?;
        let mut slots = BTreeMap::new();
        for name in engines {
            slots.insert(name.clone(), alloc(self)?);
        }
        let mm_index = self.free_mm_indexes.pop().ok_or(AgentError::Full {
            what: "governed processes",
            limit: MAX_PROCS,
        })?;
        taken.mm_index = Some(mm_index);
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
        // Every CPU looks at this address space's counter parts afresh
        // (the index's last process may have had its `mm_struct` at the
        // same address, and its parts elsewhere).
        self.cpu_parts
            .set(
                mm_index,
                PerCpuValues::try_from(vec![CpuParts::default(); self.nr_cpus])
                    .map_err(|e| AgentError::io("per-CPU parts", e))?,
                0,
            )
            .map_err(|e| AgentError::ebpf(format!("clearing the counter parts of pid {pid}"), e))?;
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
                pidfd: open_pidfd(pid, start_time),
            },
        );
        Ok(())
    }

    /// Whether `pid` is governed.
    pub fn is_registered(&self, pid: u32) -> bool {
        self.procs.contains_key(&pid)
    }

    /// Whether the programs hold `pid`'s last break (`BRK`, learned at
    /// its first brk and removed when its leader exits).
    pub fn tracks_break(&self, pid: u32) -> bool {
        self.brk.get(&pid, 0).is_ok()
    }

    /// The governed processes.
    pub fn registered(&self) -> Vec<u32> {
        self.procs.keys().copied().collect()
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
        // The programs forget it when the process exits; a process let go
        // while it runs must not keep its entry either.
        let _ = self.brk.remove(&pid);
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
        let slots: Vec<u32> = [p.unattributed_slot, p.external_slot]
            .into_iter()
            .chain(p.engines.values().copied())
            .collect();
        self.forget_files_of(&slots);
        self.free_slots.extend(slots);
        tracing::info!(pid = p.pid, "process forgotten");
        self.save();
    }

    /// Drops the file-ownership entries of `slots` (freed: a slot reused
    /// by another process must not have the old files' pages subtracted
    /// from it when they leave the cache). A walk of the map, once per
    /// forgotten process.
    fn forget_files_of(&mut self, slots: &[u32]) {
        let n = self.remove_files(|owner| slots.contains(&owner.slot));
        if n > 0 {
            tracing::debug!(files = n, "file ownership dropped");
        }
    }

    /// Removes the file-ownership entries that count nothing (their files'
    /// counted pages all left the cache; the programs never remove an
    /// entry), at most once per [`FILE_SWEEP_INTERVAL`]: a walk of the
    /// map, two system calls per entry. Returns how many went.
    pub fn sweep_files(&mut self, now: std::time::Instant) -> usize {
        if self
            .files_swept
            .is_some_and(|t| now.duration_since(t) < FILE_SWEEP_INTERVAL)
        {
            return 0;
        }
        self.files_swept = Some(now);
        self.remove_files(|owner| owner.bytes <= 0)
    }

    /// Removes the entries `doomed` picks, each read again just before it
    /// goes (an add meanwhile may have given it bytes, or another owner).
    /// A program's add between that read and the removal is lost (the
    /// owner keeps a folio with no entry to subtract it): the window is a
    /// system call wide.
    fn remove_files(&mut self, doomed: impl Fn(&FileOwner) -> bool) -> usize {
        let keys: Vec<FileKey> = self
            .file_owners
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, owner)| doomed(owner))
            .map(|(key, _)| key)
            .collect();
        let mut removed = 0;
        for key in &keys {
            if self.file_owners.get(key, 0).is_ok_and(|o| doomed(&o))
                && self.file_owners.remove(key).is_ok()
            {
                removed += 1;
            }
        }
        removed
    }

    /// Forgets processes that have exited (or whose pid was reused), and
    /// returns their pids. A process `/proc` cannot tell of (out of
    /// descriptors, say) is kept: not known to be gone is not gone. One
    /// without a pidfd (none could be opened) is given one when it can.
    pub fn reap_exited(&mut self) -> Vec<u32> {
        // Those with a pidfd: one poll for all of them (readable: exited).
        let polled: Vec<(u32, libc::pollfd)> = self
            .procs
            .values()
            .filter_map(|p| {
                let fd = p.pidfd.as_ref()?;
                Some((
                    p.pid,
                    libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ))
            })
            .collect();
        let (pids, mut fds): (Vec<u32>, Vec<libc::pollfd>) = polled.into_iter().unzip();
        // SAFETY: `fds` is a live array of `fds.len()` pollfds; zero timeout.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        let mut unknown = 0;
        let mut gone_by_proc = |p: &TrackedProcess| match procfs::liveness(p.pid, p.start_time) {
            procfs::Liveness::Alive => false,
            procfs::Liveness::Gone => true,
            procfs::Liveness::Unknown(e) => {
                unknown += 1;
                // Once a spell (every tick would flood the log).
                if unknown == 1 && !UNREADABLE.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(pid = p.pid, error = %e, "cannot tell whether a governed process still runs: kept");
                }
                false
            }
        };
        let mut gone: Vec<u32> = if ready < 0 {
            // Cannot tell this way: every one is checked through /proc.
            pids.iter()
                .filter(|pid| self.procs.get(pid).is_some_and(&mut gone_by_proc))
                .copied()
                .collect()
        } else {
            pids.iter()
                .zip(&fds)
                .filter(|(_, f)| f.revents != 0)
                .map(|(pid, _)| *pid)
                .collect()
        };
        // Those without: their start time, from /proc.
        gone.extend(
            self.procs
                .values()
                .filter(|p| p.pidfd.is_none())
                .filter(|p| gone_by_proc(p))
                .map(|p| p.pid),
        );
        if unknown == 0 {
            UNREADABLE.store(false, std::sync::atomic::Ordering::Relaxed);
        }
        for p in self.procs.values_mut() {
            if p.pidfd.is_none() && !gone.contains(&p.pid) {
                p.pidfd = open_pidfd(p.pid, p.start_time);
            }
        }
        for pid in &gone {
            self.forget_process(*pid);
        }
        gone
    }
}
