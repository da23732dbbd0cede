//! What the attribution reads back: resident memory per engine of each
//! governed process, as the kernel's counters attribute it, summed over
//! CPUs and settled (see `settle`).

use std::collections::BTreeMap;

use nodedb_governor_common::{SlotStats, kind};

use super::{Attribution, attributed::Reading, settle::settle};
use crate::{error::AgentError, procfs};

impl Attribution {
    pub(super) fn read_slot(&self, slot: u32) -> Result<SlotStats, AgentError> {
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
            sum.page_cache_bytes += v.page_cache_bytes;
            sum.page_cache_evicted_bytes += v.page_cache_evicted_bytes;
            sum.page_cache_untracked_bytes += v.page_cache_untracked_bytes;
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
