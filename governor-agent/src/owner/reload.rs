//! SIGHUP: a new configuration, applied in place or refused whole.

use std::sync::Arc;

use super::{Agent, startup::normal_high_mark};
use crate::{config::Config, error::ReloadError, policy::Rules};

impl Agent {
    /// Applies a new (valid) configuration at once, or refuses it whole:
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
        let fixed: [(&'static str, bool); 11] = [
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
        // First what the kernel may refuse whole (nothing else changed yet).
        let cpuset_changed = self.reload_cpuset(&new)?;
        // Limits lowered below the charge make the kernel reclaim in the
        // writer's context: at the normal policy.
        let raised = self.raised();
        // An Emergency under way keeps its lowered high mark (at the
        // restore point of the new ceiling) until it ends.
        let emergency_mark = (self.policy.emergency() && new.enforce)
            .then(|| (new.ceiling_bytes() as f64 * rules.restore) as u64);
        if let Some(c) = &mut self.ceiling {
            crate::sched::unraised(raised, || {
                c.set_limit(new.ceiling_bytes(), normal_high_mark(&new))?;
                match emergency_mark {
                    Some(mark) => c.set_high(Some(mark)),
                    None => Ok(()),
                }
            })?;
            // As at startup: a memory.low the kernel refuses is a warning,
            // not a reason to leave the reload half-applied.
            if let Err(e) = c.set_protected(new.limits().iter().map(|l| l.hot_set_bytes).sum()) {
                tracing::warn!(error = %e, "the hot sets' memory.low was not changed");
            }
            for l in new.limits().into_iter().filter(|l| l.own_process) {
                crate::sched::unraised(raised, || c.set_engine_high(&l.name, l.budget_bytes))?;
            }
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
