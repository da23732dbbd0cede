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
];

/// 2: `SlotStats` counts page cache (an older agent's pinned maps have
/// smaller values, and are not reused). 3: `SlotStats` counts untracked
/// page cache, and `FILE_OWNERS` holds each file's bytes. 4: `SlotStats`
/// holds the per-CPU part of the mark count, `MARK_TOTALS` the rest. 5:
/// `SlotStats` counts hinting faults and resident bytes per NUMA node.
const STATE_VERSION: u32 = 5;

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

impl Attribution {
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
                        pidfd: registry::open_pidfd(sp.pid, sp.start_time),
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
