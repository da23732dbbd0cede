//! The database's CPUs and memory nodes (`[cpuset]`), kept by the kernel's
//! cpuset controller on its cgroup:
//! * cgroup v2: `cpuset.cpus` and `cpuset.mems` of the database's domain
//!   cgroup (the controller enabled on its parent), which bound every
//!   process and thread below it, the engines' threaded cgroups included;
//! * hosts whose cpuset controller is on cgroup v1: a `<v1 cpuset>/
//!   <database>` cgroup with both files (v1 needs both before it takes a
//!   task: a field left out takes the parent's), each process put in it
//!   as it registers.
//!
//! A field left out takes the parent's set as it is when written (an
//! empty set, v2's "the parent's, as it changes", is refused by the kernel
//! while the cgroup holds tasks).
//!
//! An engine's `cpus` lie inside the database's (refused otherwise), and
//! its threads' affinity is set again after the set changes (the kernel
//! resets a task's affinity to its cpuset's CPUs when they change).

use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{ceiling::Backend, config::CpusetConfig, cpus::CpuList, error::AgentError};

/// The database's cpuset as the kernel keeps it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpusetStatus {
    pub backend: Backend,
    pub cgroup: String,
    /// As configured (None: the parent's).
    pub cpus: Option<String>,
    pub mems: Option<String>,
    /// What the kernel applies (the configured set within the parent's).
    pub effective_cpus: String,
    pub effective_mems: String,
}

/// The cpuset the agent keeps.
#[derive(Debug)]
pub struct Cpuset {
    backend: Backend,
    dir: PathBuf,
    config: CpusetConfig,
}

fn write(path: &Path, value: &str) -> Result<(), AgentError> {
    fs::write(path, value)
        .map_err(|e| AgentError::io(format!("writing {value:?} to {}", path.display()), e))
}

fn read(path: &Path) -> Result<String, AgentError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))
}

/// The two files, in the order they are written.
const FILES: [&str; 2] = ["cpuset.cpus", "cpuset.mems"];

fn list(l: &Option<CpuList>) -> Option<String> {
    l.as_ref().map(CpuList::to_string)
}

impl Cpuset {
    /// Applies `config` to the database's domain cgroup `v2_dir` (v2 with
    /// the cpuset controller), else to a v1 cpuset cgroup of the
    /// database's name.
    pub fn setup(
        v2_dir: Option<&Path>,
        database: &str,
        config: &CpusetConfig,
    ) -> Result<Self, AgentError> {
        let (backend, dir) = crate::cgroup::controller_dir(v2_dir, database, "cpuset")?;
        let mut c = Self {
            backend,
            dir,
            config: CpusetConfig::default(),
        };
        c.apply(config)?;
        Ok(c)
    }

    /// Writes `config` (a reload's too): both files, or, if the kernel
    /// refuses one, neither (what was written is put back).
    pub fn apply(&mut self, config: &CpusetConfig) -> Result<(), AgentError> {
        let before: Vec<(&str, String)> = FILES
            .iter()
            .map(|f| Ok((*f, read(&self.dir.join(f))?)))
            .collect::<Result<_, AgentError>>()?;
        for (i, (file, value)) in FILES
            .iter()
            .zip([list(&config.cpus), list(&config.mems)])
            .enumerate()
        {
            // Left out: the parent's set as the kernel applies it (an empty
            // set, v2's "the parent's", is refused while the cgroup holds
            // tasks, and v1 takes no task without both).
            let value = match value {
                Some(v) => v,
                None => self.parent_effective(file)?,
            };
            if let Err(e) = write(&self.dir.join(file), &value) {
                for (f, old) in &before[..i] {
                    let _ = fs::write(self.dir.join(f), old);
                }
                return Err(e);
            }
        }
        self.config = config.clone();
        Ok(())
    }

    /// The parent's set that `file` (`cpuset.cpus`, `cpuset.mems`) would
    /// take from it: v2 its `.effective` file, v1 the file itself.
    fn parent_effective(&self, file: &str) -> Result<String, AgentError> {
        let parent = self.dir.parent().unwrap_or(&self.dir);
        match self.backend {
            Backend::CgroupV2 => read(&parent.join(format!("{file}.effective"))),
            Backend::CgroupV1 => read(&parent.join(file)),
        }
    }

    /// Puts a process in the cpuset (v1: its own hierarchy; on v2 the
    /// process is in the domain cgroup already).
    pub fn adopt(&self, pid: u32) -> Result<(), AgentError> {
        if self.backend == Backend::CgroupV1 {
            write(&self.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    pub fn status(&self) -> CpusetStatus {
        let effective = |v2: &str, v1: &str, own: &str| {
            read(&self.dir.join(v2))
                .or_else(|_| read(&self.dir.join(v1)))
                .or_else(|_| read(&self.dir.join(own)))
                .unwrap_or_default()
        };
        CpusetStatus {
            backend: self.backend,
            cgroup: self.dir.display().to_string(),
            cpus: list(&self.config.cpus),
            mems: list(&self.config.mems),
            effective_cpus: effective(
                "cpuset.cpus.effective",
                "cpuset.effective_cpus",
                "cpuset.cpus",
            ),
            effective_mems: effective(
                "cpuset.mems.effective",
                "cpuset.effective_mems",
                "cpuset.mems",
            ),
        }
    }

    /// Removes the v1 cgroup (empty once the database's processes are
    /// gone); on v2 the domain cgroup goes with the subtree.
    pub fn remove(&self) {
        if self.backend == Backend::CgroupV1 {
            let _ = fs::remove_dir(&self.dir);
        }
    }
}
