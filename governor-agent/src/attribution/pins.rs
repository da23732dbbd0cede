//! Persistence: the maps that hold counts and registrations pinned in
//! bpffs, and the registry saved next to them, so that an agent that is
//! killed and restarted takes both over and carries on counting.

use std::{collections::BTreeMap, path::PathBuf};

use nodedb_governor_common::{CgroupKey, names::map};

use super::{
    Attribution, ProgramSet,
    registry::{self, TrackedProcess},
};
use crate::error::AgentError;

/// Where the agent keeps its maps (pinned in bpffs) and its registry of
/// governed processes, so that an agent that is killed and restarted
/// carries on counting from where it was.
#[derive(Clone, Debug)]
pub struct Persistence {
    pub pin_dir: PathBuf,
    pub state_file: PathBuf,
}

/// The maps that hold counts and registrations (the per-CPU caches are
/// rebuilt by the programs).
pub(super) const PINNED_MAPS: &[&str] = &[
    map::STATS,
    map::PROCS,
    map::ENGINE_BY_CGROUP,
    map::ENGINE_BY_TID,
    map::MM_STATES,
    map::MM_BY_PTR,
    map::REGIONS,
    map::RELEASING,
    map::PENDING_MMAP,
    map::BRK,
    map::GENERATION,
    map::FILE_OWNERS,
    map::MARK_TOTALS,
    map::CPU_PARTS,
    map::MM_EPOCHS,
];

/// Each pinned map as this build makes it, in [`PINNED_MAPS`]' order: its
/// key and value sizes and its entries (the workload's maps sized by
/// `[maps]`). Pins that differ were made by another build or another
/// configuration, and are not used.
pub(super) fn pinned_layout(
    maps: &crate::config::MapsConfig,
) -> [(&'static str, u32, u32, u32); 15] {
    use nodedb_governor_common::{
        CpuParts, FileKey, FileOwner, MAX_ENGINE_CGROUPS, MAX_PROCS, MAX_SLOTS, MmState,
        PendingMap, ProcInfo, RegionKey, ReleaseCtx, SlotStats, regions::RegionOwners,
    };
    fn sz<T>() -> u32 {
        size_of::<T>() as u32
    }
    [
        (map::STATS, 4, sz::<SlotStats>(), MAX_SLOTS),
        (map::PROCS, 4, sz::<ProcInfo>(), MAX_PROCS),
        (
            map::ENGINE_BY_CGROUP,
            sz::<CgroupKey>(),
            4,
            MAX_ENGINE_CGROUPS,
        ),
        (map::ENGINE_BY_TID, 4, 4, maps.threads),
        (map::MM_STATES, 4, sz::<MmState>(), MAX_PROCS),
        (map::MM_BY_PTR, 8, 4, MAX_PROCS),
        (
            map::REGIONS,
            sz::<RegionKey>(),
            sz::<RegionOwners>(),
            maps.regions,
        ),
        (map::RELEASING, 4, sz::<ReleaseCtx>(), maps.threads),
        (map::PENDING_MMAP, 4, sz::<PendingMap>(), maps.threads),
        (map::BRK, 4, 8, MAX_PROCS),
        (map::GENERATION, 4, 8, 1),
        (
            map::FILE_OWNERS,
            sz::<FileKey>(),
            sz::<FileOwner>(),
            maps.files,
        ),
        (map::MARK_TOTALS, 4, 8, MAX_SLOTS),
        (map::CPU_PARTS, 4, sz::<CpuParts>(), MAX_PROCS),
        (map::MM_EPOCHS, 4, 8, MAX_PROCS),
    ]
}

/// 2: `SlotStats` counts page cache (an older agent's pinned maps have
/// smaller values, and are not reused). 3: `SlotStats` counts untracked
/// page cache, and `FILE_OWNERS` holds each file's bytes. 4: `SlotStats`
/// holds the per-CPU part of the mark count, `MARK_TOTALS` the rest. 5:
/// `SlotStats` counts hinting faults and resident bytes per NUMA node. 6:
/// `REGIONS` values hold a second engine and its span of the region. 7:
/// `CPU_PARTS` and `MM_EPOCHS` (the per-CPU counter parts) are pinned.
const STATE_VERSION: u32 = 7;

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

/// What an earlier agent left, as the new one found it (`status
/// --json` `restart`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestartStatus {
    /// Processes whose counts were taken over from the earlier agent's
    /// pinned maps.
    pub taken_over: u64,
    /// Why what it left was not used (absent: it was, or it left nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded: Option<String>,
    /// Processes its registry listed that are governed afresh, their
    /// counts from zero (0 when the registry could not be read at all).
    pub processes_lost: u64,
}

impl RestartStatus {
    /// What the earlier agent left is not used: said, and the registry
    /// kept aside for whoever wants to look.
    fn discard(&mut self, p: &Persistence, why: String, listed: u64) {
        let aside = p.state_file.with_extension("json.discarded");
        let kept = std::fs::rename(&p.state_file, &aside).is_ok();
        tracing::warn!(
            %why,
            processes = listed,
            kept_as = %if kept { aside.display().to_string() } else { "-".into() },
            "the earlier agent's state is discarded: counting starts afresh"
        );
        self.discarded = Some(why);
        self.processes_lost = listed;
    }
}

/// The registry an earlier agent left, read and checked.
enum Saved {
    /// None (a clean stop, or the first start).
    Nothing,
    Usable(SavedState),
    /// Not to be used, and why; how many processes it listed.
    Discarded {
        why: String,
        listed: u64,
    },
}

/// Reads `p`'s registry and checks it against this build: its version, the
/// pins it goes with (there, and of this build's layout and `maps`' sizes),
/// and every index in it in range and used once.
fn read_saved(p: &Persistence, maps: &crate::config::MapsConfig) -> Saved {
    let file = p.state_file.display();
    let bytes = match std::fs::read(&p.state_file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Saved::Nothing,
        Err(e) => {
            return Saved::Discarded {
                why: format!("{file} cannot be read: {e}"),
                listed: 0,
            };
        }
    };
    let version = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| v.get("version")?.as_u64());
    if let Some(v) = version
        && v != u64::from(STATE_VERSION)
    {
        return Saved::Discarded {
            why: format!(
                "{file} is a registry of version {v}; this agent reads version {STATE_VERSION}"
            ),
            listed: 0,
        };
    }
    let state = match serde_json::from_slice::<SavedState>(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return Saved::Discarded {
                why: format!("{file} is not a registry this agent can read: {e}"),
                listed: 0,
            };
        }
    };
    let listed = state.processes.len() as u64;
    let missing: Vec<&str> = PINNED_MAPS
        .iter()
        .copied()
        .filter(|m| !p.pin_dir.join(m).exists())
        .collect();
    if !missing.is_empty() {
        return Saved::Discarded {
            why: format!(
                "{file} goes with maps pinned under {}, and {} are missing",
                p.pin_dir.display(),
                missing.join(", ")
            ),
            listed,
        };
    }
    for (name, key, value, entries) in pinned_layout(maps) {
        let path = p.pin_dir.join(name);
        let found = aya::maps::MapInfo::from_pin(&path)
            .map(|i| (i.key_size(), i.value_size(), i.max_entries()))
            .map_err(|e| e.to_string());
        if found.as_ref() != Ok(&(key, value, entries)) {
            let found = match found {
                Ok((k, v, n)) => format!("{n} entries of {k}-byte keys and {v}-byte values"),
                Err(e) => format!("unreadable ({e})"),
            };
            return Saved::Discarded {
                why: format!(
                    "the maps pinned under {} do not match this build's: {name} holds {found}, this build's {entries} of {key}-byte keys and {value}-byte values",
                    p.pin_dir.display()
                ),
                listed,
            };
        }
    }
    if let Err(why) = check_ranges(&state, maps) {
        return Saved::Discarded {
            why: format!("{file}: {why}"),
            listed,
        };
    }
    Saved::Usable(state)
}

/// Every slot and address-space index in range and used once, every pid
/// a pid, and no more processes, threads or cgroups than the maps hold.
fn check_ranges(state: &SavedState, maps: &crate::config::MapsConfig) -> Result<(), String> {
    use nodedb_governor_common::{MAX_ENGINE_CGROUPS, MAX_PROCS, MAX_SLOTS};
    let max_tids = maps.threads;
    if state.processes.len() > MAX_PROCS as usize {
        return Err(format!(
            "{} processes, more than the maps hold ({MAX_PROCS})",
            state.processes.len()
        ));
    }
    let mut slots = std::collections::BTreeSet::new();
    let mut mm = std::collections::BTreeSet::new();
    let mut pids = std::collections::BTreeSet::new();
    let (mut tids, mut cgroups) = (0usize, 0usize);
    for sp in &state.processes {
        let pid = sp.pid;
        if pid == 0 || pid > 1 << 22 || !pids.insert(pid) {
            return Err(format!("process {pid} is not a pid, or is listed twice"));
        }
        for slot in [sp.unattributed_slot, sp.external_slot]
            .into_iter()
            .chain(sp.engines.values().copied())
        {
            if slot >= MAX_SLOTS || !slots.insert(slot) {
                return Err(format!(
                    "process {pid}: slot {slot} is out of range (below {MAX_SLOTS}) or used twice"
                ));
            }
        }
        if sp.mm_index >= MAX_PROCS || !mm.insert(sp.mm_index) {
            return Err(format!(
                "process {pid}: address-space index {} is out of range (below {MAX_PROCS}) or used twice",
                sp.mm_index
            ));
        }
        tids += sp.tids.len();
        cgroups += sp.cgroup_keys.len();
    }
    if tids > max_tids as usize || cgroups > MAX_ENGINE_CGROUPS as usize {
        return Err(format!(
            "{tids} threads and {cgroups} cgroups, more than the maps hold ({max_tids}, {MAX_ENGINE_CGROUPS})"
        ));
    }
    Ok(())
}

impl Attribution {
    /// Loads with the state maps pinned under `p.pin_dir`. If an earlier
    /// agent left pinned maps and its registry (it was killed), they are
    /// taken over: the counts go on from where they were. What it left
    /// that cannot be trusted (a registry that cannot be read, of another
    /// version, or out of range; pins missing, or that do not match this
    /// build's maps) is named in the log and the returned status, the
    /// registry kept aside as `<file>.discarded`, and the agent starts
    /// afresh: the processes it listed are governed again as they are
    /// found (their libraries reconnect, the subtree is scanned), their
    /// counts from zero.
    pub fn load_persistent(
        set: ProgramSet,
        p: &Persistence,
        maps: &crate::config::MapsConfig,
    ) -> Result<(Self, RestartStatus), AgentError> {
        let mut status = RestartStatus::default();
        let saved = match read_saved(p, maps) {
            Saved::Nothing => None,
            Saved::Usable(s) => Some(s),
            Saved::Discarded { why, listed } => {
                status.discard(p, why, listed);
                None
            }
        };
        if saved.is_none() {
            // Pins without a registry (or the reverse) cannot be trusted.
            Self::unpin_at(p);
        }
        std::fs::create_dir_all(&p.pin_dir)
            .map_err(|e| AgentError::io(format!("creating {}", p.pin_dir.display()), e))?;
        let (mut me, saved) = match Self::load_with(set, Some(p.clone()), maps) {
            Ok(me) => (me, saved),
            // Whether the pins are to blame: a load without them tells (one
            // that fails too is another failure, and leaves the state be).
            Err(e) if saved.is_some() && Self::load_with(set, None, maps).is_ok() => {
                let listed = saved.as_ref().map_or(0, |s| s.processes.len() as u64);
                status.discard(
                    p,
                    format!(
                        "the maps pinned under {} do not match this build's: {e}",
                        p.pin_dir.display()
                    ),
                    listed,
                );
                Self::unpin_at(p);
                std::fs::create_dir_all(&p.pin_dir)
                    .map_err(|e| AgentError::io(format!("creating {}", p.pin_dir.display()), e))?;
                (Self::load_with(set, Some(p.clone()), maps)?, None)
            }
            Err(e) => return Err(e),
        };
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
                        pidfd: registry::open_pidfd(sp.pid, sp.start_time),
                    },
                );
            }
            status.taken_over = me.procs.len() as u64;
            for pid in me.reap_exited() {
                tracing::info!(pid, "a process of the earlier agent has exited");
            }
            me.bump_generation()?;
            tracing::info!(processes = me.procs.len(), pins = %p.pin_dir.display(), "took over the earlier agent's maps and registry");
        }
        me.save();
        Ok((me, status))
    }

    /// Writes the registry next to the pinned maps (atomically).
    pub(super) fn save(&self) {
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
        let written = serde_json::to_vec(&state)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::paths::write_atomically(&p.state_file, &b));
        if let Err(e) = written {
            tracing::warn!(file = %p.state_file.display(), error = %e, "could not save the registry");
        }
    }

    /// A clean stop: the pins and the registry go (the next agent starts
    /// afresh).
    pub fn unpin(&self) {
        if let Some(p) = &self.persistence {
            Self::unpin_at(p);
        }
    }

    fn unpin_at(p: &Persistence) {
        for m in PINNED_MAPS {
            let _ = std::fs::remove_file(p.pin_dir.join(m));
        }
        let _ = std::fs::remove_dir(&p.pin_dir);
        let _ = std::fs::remove_file(&p.state_file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32, slots: [u32; 3], mm_index: u32) -> SavedProcess {
        SavedProcess {
            pid,
            start_time: 1,
            unattributed_slot: slots[0],
            external_slot: slots[1],
            engines: [("vector".to_owned(), slots[2])].into_iter().collect(),
            mm_index,
            cgroup_keys: Vec::new(),
            tids: vec![pid],
        }
    }

    fn state(processes: Vec<SavedProcess>) -> SavedState {
        SavedState {
            version: STATE_VERSION,
            processes,
        }
    }

    /// A registry is used only if every index in it is in range and used
    /// once: an index past a map's end would be a write out of its bounds
    /// refused by the kernel at best, one used twice two processes counted
    /// as one.
    #[test]
    fn a_registry_is_used_only_with_every_index_in_range_and_once() {
        let maps = crate::config::MapsConfig::default();
        let good = state(vec![process(10, [0, 1, 2], 0), process(11, [3, 4, 5], 1)]);
        assert_eq!(check_ranges(&good, &maps), Ok(()));
        for (bad, want) in [
            (
                state(vec![process(10, [0, 1, 99_999], 0)]),
                "slot 99999 is out of range",
            ),
            (
                state(vec![process(10, [0, 1, 2], 0), process(11, [2, 4, 5], 1)]),
                "slot 2 is out of range (below 1024) or used twice",
            ),
            (
                state(vec![process(10, [0, 1, 2], 0), process(11, [3, 4, 5], 0)]),
                "address-space index 0",
            ),
            (
                state(vec![process(10, [0, 1, 2], 256)]),
                "address-space index 256 is out of range",
            ),
            (
                state(vec![process(0, [0, 1, 2], 0)]),
                "process 0 is not a pid",
            ),
            (
                state(vec![process(10, [0, 1, 2], 0), process(10, [3, 4, 5], 1)]),
                "listed twice",
            ),
        ] {
            let e = check_ranges(&bad, &maps).unwrap_err();
            assert!(e.contains(want), "{e} (wanted {want})");
        }
    }
}
