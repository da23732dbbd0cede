//! Removing the cgroups a test made (or had the agent make), even when it
//! fails.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

/// Removes a cgroup directory and its children, deepest first (cgroupfs
/// takes only rmdir). What cannot be removed (a process still in it) is
/// said on stderr and left.
pub fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            eprintln!("cleanup: removing {}: {e}", dir.display());
        }
        _ => {}
    }
}

/// A cgroup directly under a hierarchy's mount (`<mount>/<name>`: a
/// database's, as the agent makes them) removed, with everything below
/// it, when dropped. Declare it before the processes that live in it, so
/// it drops after they are gone.
///
/// A test that registers its own threads with the agent has this process
/// adopted into the cgroup, and so, while it is there, every process any
/// test of this binary starts (probes, agents, the CLI). Such a cgroup
/// could never be removed: the guard first moves the processes still in
/// it back to where this process was before any agent could adopt it.
pub struct RemovedCgroup {
    dir: PathBuf,
}

impl RemovedCgroup {
    pub fn new(dir: PathBuf) -> Self {
        // Read now, while no agent of this test has adopted this process.
        if let Some(mount) = dir.parent() {
            home(mount);
        }
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for RemovedCgroup {
    fn drop(&mut self) {
        if let Some(mount) = self.dir.parent()
            && let Some(home) = home(mount)
        {
            let procs = mount
                .join(home.trim_start_matches('/'))
                .join("cgroup.procs");
            evacuate(&self.dir, &procs);
        }
        remove_cgroup(&self.dir);
    }
}

/// Moves every process in `dir` and below to the cgroup whose
/// `cgroup.procs` is `procs`. (A threaded cgroup has no process list of
/// its own: its processes are its threaded domain's.)
fn evacuate(dir: &Path, procs: &Path) {
    if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in pids.lines() {
            if let Err(e) = std::fs::write(procs, pid) {
                eprintln!("cleanup: moving {pid} to {}: {e}", procs.display());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                evacuate(&e.path(), procs);
            }
        }
    }
}

/// Where this process was, in the hierarchy mounted at `mount`, when this
/// was first asked (before any agent of this test binary could adopt it):
/// v2 when the mount has `cgroup.controllers`, v1's cpuset controller
/// when it has `cpuset.cpus`, v1's memory controller otherwise.
fn home(mount: &Path) -> Option<String> {
    type Homes = (Option<String>, Option<String>, Option<String>);
    static HOMES: OnceLock<Homes> = OnceLock::new();
    let (v2, v1_memory, v1_cpuset) = HOMES.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let find = |ours: &dyn Fn(&str) -> bool| {
            text.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                ours(controllers).then(|| path.to_owned())
            })
        };
        (
            find(&|c| c.is_empty()),
            find(&|c| c.split(',').any(|c| c == "memory")),
            find(&|c| c.split(',').any(|c| c == "cpuset")),
        )
    });
    if mount.join("cgroup.controllers").exists() {
        v2.clone()
    } else if mount.join("cpuset.cpus").exists() {
        v1_cpuset.clone()
    } else {
        v1_memory.clone()
    }
}
