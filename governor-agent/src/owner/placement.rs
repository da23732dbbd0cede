//! Placement: taking processes under governance and putting each thread in
//! its engine (its engine's cgroup, or the TID map), from a library's hello
//! and thread messages, from `assign`, and from processes found in the
//! subtree.

use std::fs;

use nodedb_governor::control::wire::ToAgent;

use super::Agent;
use crate::{
    cgroup::Subtree,
    error::{AgentError, HelloError},
    procfs,
};

/// How often the subtree is scanned for processes that entered it by
/// themselves.
pub(super) const SCAN_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Agent {
    /// Takes in processes that entered the subtree (a child of a governed
    /// process, a process moved there by hand: within [`SCAN_INTERVAL`]),
    /// and those of own-process engines.
    pub(super) fn adopt_new_processes(&mut self, now: std::time::Instant) {
        let Some(s) = &self.subtree else {
            return;
        };
        // `cgroup.procs` walks every thread of the subtree: read it every
        // SCAN_INTERVAL, not at every tick (processes that connect are
        // registered at their hello, and those the admin assigns at once).
        if self
            .scanned
            .is_some_and(|at| now.duration_since(at) < SCAN_INTERVAL)
        {
            return;
        }
        self.scanned = Some(now);
        let own = s.own_pids();
        match s.pids() {
            Ok(pids) => {
                for pid in pids {
                    if let Err(e) = self.register(pid) {
                        tracing::warn!(pid, error = %e, "could not register process");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the subtree's processes"),
        }
        for (engine, pid) in own {
            if let Err(e) = self.register_own(pid, &engine) {
                tracing::warn!(pid, engine, error = %e, "could not register process");
            }
        }
    }

    /// Governs `pid` (a process that runs several engines): its counters,
    /// its place under the ceiling, its engines' cgroups.
    fn register(&mut self, pid: u32) -> Result<(), AgentError> {
        if self.attribution.is_registered(pid) {
            return Ok(());
        }
        self.attribution
            .register_process(pid, &self.config.engine_names())?;
        if let Some(c) = &self.ceiling
            && let Err(e) = c.adopt(pid)
        {
            tracing::warn!(pid, error = %e, "could not put the process under the ceiling");
        }
        self.adopt_cpuset(pid);
        if let Some(s) = &self.subtree {
            for (name, cg) in &s.engines {
                if let Err(e) = self.attribution.bind_cgroup(pid, name, cg.id) {
                    // Half bound, its threads in an unbound engine would
                    // count as unattributed for good: forgotten whole, to
                    // be registered again at its next hello or the next
                    // scan of the subtree.
                    self.attribution.forget_process(pid);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes in a process of an engine that runs as a process of its own:
    /// it goes into the engine's domain cgroup, and everything its threads
    /// do is the engine's.
    fn register_own(&mut self, pid: u32, engine: &str) -> Result<(), AgentError> {
        if self.own.get(&pid).is_some_and(|e| e == engine) {
            return Ok(());
        }
        if let Some(s) = &self.subtree {
            s.adopt_own_process(pid, engine)?;
        }
        if self.attribution.is_registered(pid) {
            // It was first seen elsewhere: start its books afresh.
            self.attribution.forget_process(pid);
        }
        self.attribution
            .register_process(pid, &self.config.engine_names())?;
        if let Some(c) = &self.ceiling
            && let Err(e) = c.adopt(pid).and_then(|()| c.adopt_engine(pid, engine))
        {
            tracing::warn!(pid, engine, error = %e, "could not put the process under its engine's cgroup");
        }
        self.adopt_cpuset(pid);
        if let Some(cg) = self.subtree.as_ref().and_then(|s| s.own.get(engine))
            && let Err(e) = self.attribution.bind_cgroup(pid, engine, cg.id)
        {
            // As in `register`: forgotten whole, registered again later.
            self.attribution.forget_process(pid);
            return Err(e);
        }
        // The whole process is the engine's: every thread it has now (the
        // ones it starts inherit their creator's CPUs).
        let threads = procfs::threads(pid).unwrap_or_default();
        self.pin(engine, &threads);
        tracing::info!(pid, engine, "process of an own-process engine registered");
        self.own.insert(pid, engine.to_owned());
        Ok(())
    }

    /// `assign` on the admin socket: moves thread `tid` of `pid` into
    /// `engine`, for root (`by` None) or a member of the admin group
    /// (`by` its uid). Checked as a library's thread is: the process must
    /// run as a uid the control socket allows (and, asked by a non-root
    /// admin, not as root), and it is held by a pidfd from the first check
    /// to the move, so a pid given to another process meanwhile is refused.
    pub(super) fn assign(
        &mut self,
        pid: u32,
        tid: u32,
        engine: &str,
        by: Option<u32>,
    ) -> Result<(), AgentError> {
        let held = procfs::pidfd_open(pid).ok_or(AgentError::NoSuchProcess { pid })?;
        let started = procfs::start_time(pid)?;
        let uid = procfs::creds(pid)?.uid;
        let allowed = match by {
            None => self.config.uid_allowed(uid),
            Some(_) => self.config.allowed_uids.contains(&uid) && uid != 0,
        };
        if !allowed {
            return Err(AgentError::AssignRefused {
                pid,
                uid,
                by: by.map_or("root".into(), |u| format!("uid {u} (admin group)")),
            });
        }
        // Still the process checked: its pidfd has not seen it exit, and
        // the pid's start time is the one read first.
        if procfs::pidfd_exited(std::os::fd::AsFd::as_fd(&held))
            || procfs::start_time(pid).ok() != Some(started)
        {
            return Err(AgentError::NoSuchProcess { pid });
        }
        self.place(pid, tid, engine)?;
        if procfs::pidfd_exited(std::os::fd::AsFd::as_fd(&held)) {
            // Exited after the checks: whatever was moved is the tick's
            // to forget (the process is gone, its pid not yet reaped).
            tracing::warn!(pid, tid, "the assigned process exited while it was placed");
        }
        Ok(())
    }

    /// Moves thread `tid` of `pid` into `engine` (a library's own thread,
    /// or an `assign` checked first).
    pub(super) fn place(&mut self, pid: u32, tid: u32, engine: &str) -> Result<(), AgentError> {
        procfs::start_time(pid)?;
        if !procfs::threads(pid)?.contains(&tid) {
            return Err(AgentError::NoSuchThread { pid, tid });
        }
        let engines = self.config.engine_names();
        if !engines.iter().any(|e| e == engine) {
            return Err(AgentError::UnknownEngine {
                name: engine.to_owned(),
                known: engines.join(", "),
            });
        }
        if let Some(own) = self.own.get(&pid) {
            // The whole process is the engine's already.
            if own != engine {
                return Err(AgentError::UnknownEngine {
                    name: engine.to_owned(),
                    known: own.clone(),
                });
            }
            tracing::info!(pid, tid, engine, "thread of an own-process engine");
            return Ok(());
        }
        match self.subtree.clone() {
            Some(s) => {
                self.adopt(pid)?;
                self.register(pid)?;
                let engine = engine.to_owned();
                self.off_thread(move || s.move_thread(tid, &engine))?;
            }
            None => {
                self.register(pid)?;
                self.attribution.assign_tid(pid, tid, engine)?;
            }
        }
        self.pin(engine, &[tid]);
        tracing::info!(pid, tid, engine, "thread assigned");
        Ok(())
    }

    /// Keeps `threads` of `engine` to the engine's CPUs, if it has any
    /// (`[[engine]] cpus`). A refusal (the thread exited, a CPU went
    /// offline) is counted and shown in the status, not fatal: the thread
    /// is governed all the same.
    pub(super) fn pin(&mut self, engine: &str, threads: &[u32]) {
        // Engines without a list are left where the database runs them.
        if let Some(cpus) = self.config.cpus_of(engine).cloned() {
            self.set_affinity(engine, Some(&cpus), threads);
        }
    }

    /// Sets `threads`' affinity to `cpus`, or to every online CPU when
    /// None (an engine whose list a reload removed).
    fn set_affinity(&mut self, engine: &str, cpus: Option<&crate::cpus::CpuList>, threads: &[u32]) {
        let online;
        let (cpus, shown) = match cpus {
            Some(c) => (c, c.to_string()),
            None => match crate::cpus::CpuList::online() {
                Ok(o) => {
                    online = o;
                    (&online, String::new())
                }
                Err(e) => {
                    tracing::warn!(engine, error = %e, "reading the online CPUs");
                    return;
                }
            },
        };
        let status = self.placement.entry(engine.to_owned()).or_default();
        status.cpus = shown;
        for &tid in threads {
            match cpus.apply(tid) {
                Ok(()) => status.threads_pinned += 1,
                Err(e) => {
                    status.errors += 1;
                    let e = format!("thread {tid}: {e}");
                    tracing::warn!(engine, error = %e, "could not keep the thread to its engine's CPUs");
                    status.last_error = Some(e);
                }
            }
        }
        if status.cpus.is_empty() && status.errors == 0 {
            self.placement.remove(engine);
        }
    }

    /// Puts a process in the database's cpuset (v1; on v2 it is there
    /// already, in the domain cgroup).
    pub(super) fn adopt_cpuset(&self, pid: u32) {
        if let Some(c) = &self.cpuset
            && let Err(e) = c.adopt(pid)
        {
            tracing::warn!(pid, error = %e, "could not put the process in the database's cpuset");
        }
    }

    /// After a reload: engines whose CPUs changed have every thread they
    /// hold moved to the new CPUs (to any online CPU when the list went);
    /// with `all` (the database's cpuset changed, and the kernel reset its
    /// threads' affinity to it), every engine kept to CPUs.
    pub(super) fn repin(
        &mut self,
        old: &std::collections::BTreeMap<String, crate::cpus::CpuList>,
        all: bool,
    ) {
        let new = self.config.engine_cpus();
        let engines: std::collections::BTreeSet<String> =
            old.keys().chain(new.keys()).cloned().collect();
        for engine in engines {
            if old.get(&engine) == new.get(&engine) && !(all && new.contains_key(&engine)) {
                continue;
            }
            let mut threads = match &self.subtree {
                Some(s) => s.engine_threads(&engine).unwrap_or_else(|e| {
                    tracing::warn!(engine, error = %e, "reading the engine's threads");
                    Vec::new()
                }),
                None => Vec::new(),
            };
            for (pid, _) in self.own.iter().filter(|(_, e)| **e == engine) {
                threads.extend(procfs::threads(*pid).unwrap_or_default());
            }
            threads.sort_unstable();
            threads.dedup();
            self.set_affinity(&engine, new.get(&engine), &threads);
        }
    }

    /// A library's thread started working for `engine`. `moved`: the
    /// library put it in the engine's cgroup itself (a delegated subtree);
    /// the agent checks that it is there (and is the process's).
    pub(super) fn place_thread(
        &mut self,
        pid: u32,
        tid: u32,
        engine: &str,
        moved: bool,
    ) -> Result<(), AgentError> {
        if !moved {
            return self.place(pid, tid, engine);
        }
        if !procfs::threads(pid)?.contains(&tid) {
            return Err(AgentError::NoSuchThread { pid, tid });
        }
        // On the library's word alone, a thread left in `shared` would be
        // counted as governed and pinned as the engine's: its cgroup is
        // read.
        let found = match &self.subtree {
            Some(_) => Subtree::cgroup_of_thread(pid, tid)?,
            None => "no cgroup of this agent's (it manages no cgroup v2 subtree)".into(),
        };
        let theirs = self.subtree.as_ref().and_then(|s| s.engine_of(&found));
        if theirs != Some(engine) {
            return Err(AgentError::NotMoved {
                tid,
                engine: engine.to_owned(),
                found,
            });
        }
        self.pin(engine, &[tid]);
        tracing::info!(pid, tid, %engine, "thread moved by the library (delegated subtree)");
        Ok(())
    }

    /// Checks a hello (see [`crate::policy::check_hello`]).
    pub(super) fn check_hello(&self, hello: ToAgent) -> Result<Vec<String>, HelloError> {
        crate::policy::check_hello(&self.config.database, &self.config.engine_names(), hello)
    }

    /// Takes a library's process under governance: into `shared/` when it
    /// runs several engines, into its engine's own cgroup when it declared
    /// an own-process engine (which it must declare alone).
    pub(super) fn place_library(
        &mut self,
        pid: u32,
        declared: &[String],
    ) -> Result<(), HelloError> {
        let own: Vec<&String> = declared
            .iter()
            .filter(|name| {
                self.config
                    .engines
                    .iter()
                    .any(|c| &&c.name == name && c.own_process)
            })
            .collect();
        match own.as_slice() {
            [] => {
                self.adopt(pid)?;
                self.register(pid)?;
            }
            [engine] if declared.len() == 1 => {
                let engine = engine.to_string();
                self.register_own(pid, &engine)?;
            }
            _ => {
                return Err(HelloError::OwnProcessNotAlone {
                    engine: own[0].clone(),
                });
            }
        }
        Ok(())
    }

    /// Moves `pid` into the subtree's shared cgroup, if there is one and
    /// it is not there already (off the owner's thread: see `off_thread`).
    fn adopt(&mut self, pid: u32) -> Result<(), AgentError> {
        let Some(s) = &self.subtree else {
            return Ok(());
        };
        if s.pids()?.contains(&pid) {
            return Ok(());
        }
        let s = s.clone();
        self.off_thread(move || s.adopt_process(pid))
    }

    /// Where the subtree is delegated to the library's user, the engines'
    /// cgroup directories (it moves its threads itself); else none.
    pub(super) fn delegated_cgroups(&self, pid: u32, uid: u32) -> Vec<(String, String)> {
        let delegated = self.subtree.as_ref().filter(|s| {
            uid != 0
                && !self.own.contains_key(&pid)
                && fs::metadata(&s.dir)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid)
        });
        delegated
            .map(|s| {
                s.engines
                    .iter()
                    .map(|(n, c)| (n.clone(), c.dir.display().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }
}
