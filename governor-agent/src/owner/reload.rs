//! SIGHUP: a new configuration, applied in place or refused whole.

use std::sync::Arc;

use super::{Agent, startup::normal_high_mark};
use crate::{config::Config, error::ReloadError, policy::Rules};

impl Agent {
    /// Applies a new (valid) configuration at once, or refuses it whole:
    /// a ceiling lowered below what the database holds and cannot drop
    /// (beyond the new ceiling's Emergency mark) is refused too;
    /// what only a restart can change (the database, identity, cgroup root,
    /// sockets and the admin group, the metrics address, delegation, observe mode, the set of
    /// engines) must be unchanged. Budgets, floors, thresholds, the
    /// ceiling, the tick, the allowed uids, the agent's
    /// `realtime_priority`, the NUMA split (`[numa]`, `node_weights`,
    /// checked against the machine's nodes first) and the database's
    /// cpuset (`[cpuset]`) change in place;
    /// libraries get their new
    /// budgets (loans end); engines whose `cpus` changed have their threads
    /// moved to the new CPUs.
    pub(super) fn reload(&mut self, new: Config) -> Result<(), ReloadError> {
        let old = &self.config;
        let fixed: [(&'static str, bool); 13] = [
            ("database", old.database == new.database),
            ("identity", old.identity == new.identity),
            ("cgroup_root", old.cgroup_root == new.cgroup_root),
            ("run_dir", old.run_dir == new.run_dir),
            (
                "control_socket",
                old.control_socket_path() == new.control_socket_path(),
            ),
            ("metrics_addr", old.metrics_addr == new.metrics_addr),
            ("admin_group", old.admin_group == new.admin_group),
            ("control_group", old.control_group == new.control_group),
            ("maps", old.maps == new.maps),
            ("delegate_uid", old.delegate_uid == new.delegate_uid),
            ("enforce", old.enforce == new.enforce),
            ("engine", old.engine_names() == new.engine_names()),
            (
                "engine.own_process",
                old.own_process_engines() == new.own_process_engines(),
            ),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, same)| !same) {
            return Err(ReloadError::NeedsRestart { field });
        }
        // Checked against the machine before anything is applied.
        let rules = Rules::from_config(&new)
            .on_nodes(&new, &crate::numa::machine_nodes())
            .map_err(crate::error::AgentError::from)?;
        // A ceiling lowered under what the database cannot give back at
        // once is refused (nothing written): the kernel (v1) takes a limit
        // it can reach by dropping page cache, and then the database's
        // next spill, which writes before it frees, is OOM-killed.
        if let Some(c) = &self.ceiling
            && new.ceiling_bytes() < old.ceiling_bytes()
        {
            let held = c.usage().held_bytes;
            let mark = (new.ceiling_bytes() as f64 * rules.thresholds.emergency) as u64;
            if held > mark {
                return Err(ReloadError::CeilingBelowHeld {
                    ceiling: new.ceiling_bytes(),
                    held,
                    mark,
                });
            }
        }
        // The kernel's part, all or nothing: the cpuset first (the kernel
        // refuses a set whole, nothing changed), then the limits; a write
        // refused midway puts back what the old configuration had written,
        // and the reload is refused with the old configuration in force.
        let cpuset_changed = self.reload_cpuset(&new)?;
        if let Err(e) = self.write_limits(&new, rules.restore) {
            let old = self.config.clone();
            if let Err(undo) = self.write_limits(&old, self.policy.rules().restore) {
                tracing::error!(error = %undo, "putting the old limits back after a refused reload");
            }
            if cpuset_changed && let Err(undo) = self.reload_cpuset_from(&old) {
                tracing::error!(error = %undo, "putting the old cpuset back after a refused reload");
            }
            return Err(e);
        }
        // Libraries whose uid the allow-list no longer names are let go
        // (before the policy's reload answers them).
        let refused: Vec<_> = self
            .sessions
            .iter()
            .filter(|(_, (peer, _))| !new.uid_allowed(peer.uid))
            .map(|(s, (peer, _))| (*s, peer.uid))
            .collect();
        for (session, uid) in refused {
            self.let_go(
                session,
                format!(
                    "uid {uid} is no longer allowed on the control socket (allowed_uids changed): disconnected"
                ),
            );
        }
        let actions = self.policy.reload(rules);
        // A failed raise is tried again (its cause may have been fixed).
        let rescheduled = new.realtime_priority != self.config.realtime_priority
            || self.scheduling.error.is_some();
        let old_cpus = self.config.engine_cpus();
        self.config = new;
        self.config_tx.send_replace(Arc::new(self.config.clone()));
        self.apply(actions);
        self.repin(&old_cpus, cpuset_changed);
        if rescheduled {
            self.apply_scheduling();
        }
        Ok(())
    }

    /// Writes `config`'s limits to the kernel: the ceiling and its high
    /// mark (lowered to the restore point while an Emergency lasts), the
    /// hot sets' protection, and own-process engines' high marks. The
    /// first write the kernel refuses ends it (a refused memory.low is a
    /// warning only).
    fn write_limits(&mut self, config: &Config, restore: f64) -> Result<(), ReloadError> {
        // Limits lowered below the charge make the kernel reclaim in the
        // writer's context: at the normal policy.
        let raised = self.raised();
        // An Emergency under way keeps its lowered high mark (at the
        // restore point of the new ceiling) until it ends.
        let emergency_mark = (self.policy.emergency() && config.enforce)
            .then(|| (config.ceiling_bytes() as f64 * restore) as u64);
        let Some(c) = &mut self.ceiling else {
            return Ok(());
        };
        crate::sched::unraised(raised, || {
            c.set_limit(config.ceiling_bytes(), normal_high_mark(config))?;
            match emergency_mark {
                Some(mark) => c.set_high(Some(mark)),
                None => Ok(()),
            }
        })?;
        if let Some(e) = crate::faults::failing("reload-after-ceiling") {
            return Err(crate::error::AgentError::io("reloading the limits", e).into());
        }
        // As at startup: a memory.low the kernel refuses is a warning,
        // not a reason to leave the reload half-applied.
        if let Err(e) = c.set_protected(config.limits().iter().map(|l| l.hot_set_bytes).sum()) {
            tracing::warn!(error = %e, "the hot sets' memory.low was not changed");
        }
        for l in config.limits().into_iter().filter(|l| l.own_process) {
            crate::sched::unraised(raised, || c.set_engine_high(&l.name, l.budget_bytes))?;
        }
        Ok(())
    }

    /// Puts the cpuset of `old` back after `new`'s was applied (a reload
    /// refused later); where `old` had none, the parent's sets, as a
    /// section taken out leaves them.
    fn reload_cpuset_from(&mut self, old: &Config) -> Result<(), ReloadError> {
        let raised = self.raised();
        match (&mut self.cpuset, &old.cpuset) {
            (Some(c), wanted) => {
                let wanted = wanted.clone().unwrap_or_default();
                crate::sched::unraised(raised, || c.apply(&wanted))?;
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }

    /// The database's cpuset after a reload: changed in place (a section
    /// taken out leaves the parent's sets), or set up where there was none
    /// (every governed process put in it). Whether it changed. A set the
    /// kernel refuses refuses the reload, nothing of the cpuset changed; an
    /// unchanged section is left as it is (one the kernel could not apply
    /// at start stays a warning in the status, not a refused reload).
    fn reload_cpuset(&mut self, new: &Config) -> Result<bool, ReloadError> {
        if new.cpuset == self.config.cpuset {
            return Ok(false);
        }
        let raised = self.raised();
        match (&mut self.cpuset, &new.cpuset) {
            (Some(c), wanted) => {
                let wanted = wanted.clone().unwrap_or_default();
                crate::sched::unraised(raised, || c.apply(&wanted))?;
            }
            (None, None) => return Ok(false),
            (None, Some(wanted)) => {
                let c = crate::sched::unraised(raised, || {
                    crate::cpuset::Cpuset::setup(
                        self.subtree.as_ref().map(|s| s.domain.as_path()),
                        &new.database,
                        wanted,
                    )
                })?;
                self.cpuset = Some(c);
                self.cpuset_error = None;
                for pid in self.attribution.registered() {
                    self.adopt_cpuset(pid);
                }
            }
        }
        Ok(true)
    }
}
