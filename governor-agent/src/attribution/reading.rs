//! What the attribution reads back: resident memory per engine of each
//! governed process, as the kernel's counters attribute it, summed over
//! CPUs and settled (see `settle`).

use std::{collections::BTreeMap, sync::atomic::Ordering};

use nodedb_governor_common::SlotStats;

use super::{Attribution, attributed::Reading, batch, settle::settle};
use crate::{error::AgentError, procfs};

impl Attribution {
    pub(super) fn read_slot(&self, slot: u32) -> Result<SlotStats, AgentError> {
        let values = self
            .stats
            .get(&slot, 0)
            .map_err(|e| AgentError::ebpf(format!("reading slot {slot}"), e))?;
        Ok(batch::sum(values.iter()))
    }

    /// Reads every governed process's attribution, with each process's
    /// VmRSS from `/proc`.
    pub fn read(&self) -> Result<Reading, AgentError> {
        let mut r = self.read_counters()?;
        r.read_vm_rss();
        Ok(r)
    }

    /// Reads every governed process's attribution from the programs'
    /// counters alone (no VmRSS: see [`Reading::read_vm_rss`]): one system
    /// call for all of them where the kernel has batch reads.
    pub fn read_counters(&self) -> Result<Reading, AgentError> {
        self.counters(true)
    }

    /// Whether the counters are read in one batch (false once the kernel
    /// refused one).
    pub fn batched_reads(&self) -> bool {
        !self.batch_failed.load(Ordering::Relaxed)
    }

    /// As [`read_counters`](Self::read_counters), a system call per slot:
    /// the path taken where the kernel has no batch reads (the tests
    /// compare the two).
    pub fn read_counters_unbatched(&self) -> Result<Reading, AgentError> {
        self.counters(false)
    }

    fn counters(&self, batched: bool) -> Result<Reading, AgentError> {
        let used = self
            .procs
            .values()
            .flat_map(|p| {
                p.engines
                    .values()
                    .copied()
                    .chain([p.unattributed_slot, p.external_slot])
            })
            .max()
            .map_or(0, |m| m + 1);
        let batched = batched && !self.batch_failed.load(Ordering::Relaxed);
        let all = match batched.then(|| batch::read_slots(&self.stats, used, self.nr_cpus)) {
            None => None,
            Some(Ok(all)) => Some(all),
            Some(Err(e)) if batch::unsupported(&e) => {
                // Said once; the slots are read one by one from now on.
                self.batch_failed.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, "the kernel refuses batch reads of the counters; reading them slot by slot (a system call each)");
                None
            }
            // This read failed (memory, a signal): slot by slot this
            // time, in one batch again the next.
            Some(Err(e)) => {
                tracing::debug!(error = %e, "a batch read of the counters failed; slot by slot this time");
                None
            }
        };
        let slot = |s: u32| match &all {
            Some(all) => Ok(all[s as usize]),
            None => self.read_slot(s),
        };
        let mut processes = Vec::new();
        for p in self.procs.values() {
            let mut engines = BTreeMap::new();
            for (name, s) in &p.engines {
                engines.insert(name.clone(), slot(*s)?);
            }
            let unattributed = slot(p.unattributed_slot)?;
            let external = slot(p.external_slot)?;
            processes.push(settle(p.pid, engines, unattributed, external, None));
        }
        Ok(Reading { processes })
    }
}

impl Reading {
    /// Fills in each process's VmRSS from `/proc` (a file read per
    /// process: done for what is shown, not at every tick).
    pub fn read_vm_rss(&mut self) {
        for p in &mut self.processes {
            p.vm_rss_bytes = procfs::rss_breakdown(p.pid).map(|b| b.total()).ok();
        }
    }
}
