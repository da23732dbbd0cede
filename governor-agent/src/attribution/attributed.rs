//! The attribution's figures: resident memory per engine of each governed
//! process, as the kernel's counters attribute it (read in `reading`,
//! settled in `settle`).

use std::collections::BTreeMap;

use nodedb_governor_common::NODE_SLOTS;
use serde::{Deserialize, Serialize};

/// Attributed memory of one engine (or of the unattributed bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributed {
    /// anon + file + shmem.
    pub resident_bytes: u64,
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub swap_bytes: u64,
    /// Address space mapped by the engine's threads and not yet unmapped.
    pub mapped_bytes: u64,
    pub page_faults: u64,
    /// Memory this engine's threads released on behalf of other engines.
    pub released_for_others_bytes: u64,
    /// Page cache of the engine's files: what its threads added, minus
    /// what left the cache (see the eBPF crate's `page_cache`). Not part
    /// of `resident_bytes`: the cache is the cgroup's, not the process's.
    #[serde(default)]
    pub page_cache_bytes: u64,
    /// Of the engine's page cache, what reclaim evicted, in all.
    #[serde(default)]
    pub page_cache_evicted_bytes: u64,
    /// Page cache the engine's threads added that is not counted: the
    /// file-ownership map was full (non-zero: the figure above is low).
    #[serde(default)]
    pub page_cache_untracked_bytes: u64,
    /// NUMA hinting faults the engine's threads took in memory another
    /// engine owns (reads of its memory while NUMA balancing scans); the
    /// memory stays the other engine's.
    #[serde(default)]
    pub hinting_faults_elsewhere: u64,
    /// `resident_bytes` by NUMA node (index: node; see
    /// [`nodedb_governor_common::SlotStats::node_resident_bytes`] for how a
    /// page's node is judged).
    #[serde(default)]
    pub node_resident_bytes: [u64; NODE_SLOTS],
    /// The engine's own count of resident bytes (every kind but swap)
    /// before settling: the figure its mark is kept in.
    #[serde(skip)]
    pub counted_bytes: i64,
}

impl Attributed {
    pub fn add(&mut self, o: &Attributed) {
        self.resident_bytes += o.resident_bytes;
        self.anon_bytes += o.anon_bytes;
        self.file_bytes += o.file_bytes;
        self.shmem_bytes += o.shmem_bytes;
        self.swap_bytes += o.swap_bytes;
        self.mapped_bytes += o.mapped_bytes;
        self.page_faults += o.page_faults;
        self.released_for_others_bytes += o.released_for_others_bytes;
        self.page_cache_bytes += o.page_cache_bytes;
        self.page_cache_evicted_bytes += o.page_cache_evicted_bytes;
        self.page_cache_untracked_bytes += o.page_cache_untracked_bytes;
        self.hinting_faults_elsewhere += o.hinting_faults_elsewhere;
        for (mine, theirs) in self
            .node_resident_bytes
            .iter_mut()
            .zip(o.node_resident_bytes)
        {
            *mine += theirs;
        }
        self.counted_bytes += o.counted_bytes;
    }
}

/// One governed process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessAttribution {
    pub pid: u32,
    pub engines: BTreeMap<String, Attributed>,
    pub unattributed: Attributed,
    /// The kernel's VmRSS for the process, for comparison.
    pub vm_rss_bytes: Option<u64>,
}

/// Every governed process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reading {
    pub processes: Vec<ProcessAttribution>,
}

/// One loaded eBPF program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
    /// Instructions the verifier processed to accept the program (prog
    /// info, kernel 5.16 and later): its limit is 1,000,000, so this is
    /// how close a change to a program came to being refused at load.
    #[serde(default)]
    pub verified_insns: Option<u32>,
}
