//! What the attribution reads back: resident memory per engine of each
//! governed process, as the kernel's counters attribute it, summed over
//! CPUs and settled (see `settle`).

use std::collections::BTreeMap;

use nodedb_governor_common::{SlotStats, kind};
use serde::{Deserialize, Serialize};

use super::{Attribution, settle::settle};
use crate::{error::AgentError, procfs};

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
}

impl Attribution {
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
