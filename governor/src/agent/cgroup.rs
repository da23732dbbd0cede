//! The cgroup v2 subtree the agent owns: `<root>/<database>/` is the
//! database's domain cgroup, `engine-<name>/` under it a threaded child per
//! engine. A thread's engine is the cgroup it sits in, which the eBPF side
//! reads with `bpf_get_current_cgroup_id()`; threads inherit their creator's
//! cgroup, so threads born after registration are attributed with no help.
//!
//! Threaded cgroups need no controller, so this works on hybrid hosts whose
//! memory controller is on cgroup v1 (the v2 tree is then mounted at
//! `/sys/fs/cgroup/unified`).

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::error::AgentError;

/// Finds the cgroup v2 mount: the unified hierarchy on a v2 host, or the
/// `unified` mount of a hybrid host.
pub fn find_v2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string(super::paths::MOUNTINFO).ok()?;
    let mounts: Vec<&str> = info
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4))?
        })
        .collect();
    super::paths::CGROUP2_CANDIDATES
        .iter()
        .find(|c| mounts.contains(c))
        .map(PathBuf::from)
        .or_else(|| mounts.first().map(PathBuf::from))
}

/// The id the kernel reports for a cgroup (`bpf_get_current_cgroup_id`): the
/// inode number of its directory in cgroupfs (kernel 4.18+ on 64-bit).
pub fn cgroup_id(dir: &Path) -> Result<u64, AgentError> {
    fs::metadata(dir)
        .map(|m| m.ino())
        .map_err(|e| AgentError::io(format!("reading cgroup id of {}", dir.display()), e))
}

/// An engine's threaded cgroup.
#[derive(Clone, Debug)]
pub struct EngineCgroup {
    pub dir: PathBuf,
    pub id: u64,
}

/// The database's domain cgroup and its engines' threaded children.
#[derive(Clone, Debug)]
pub struct Subtree {
    pub dir: PathBuf,
    pub engines: BTreeMap<String, EngineCgroup>,
}

impl Subtree {
    /// Creates `<root>/<database>/engine-<name>` for each engine, or adopts
    /// them if they exist, and makes the engine cgroups threaded.
    pub fn create_or_adopt(
        root: &Path,
        database: &str,
        engines: &[String],
    ) -> Result<Self, AgentError> {
        let unusable = |reason: String| AgentError::CgroupUnusable {
            path: root.to_owned(),
            reason,
        };
        if !root.join("cgroup.procs").is_file() {
            return Err(unusable(
                "not a cgroup v2 directory (no cgroup.procs)".into(),
            ));
        }
        let dir = root.join(database);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(unusable(format!("creating {}: {e}", dir.display()))),
        }
        let mut out = BTreeMap::new();
        for name in engines {
            let edir = dir.join(format!("engine-{name}"));
            match fs::create_dir(&edir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(unusable(format!("creating {}: {e}", edir.display()))),
            }
            let ty = fs::read_to_string(edir.join("cgroup.type"))
                .map_err(|e| unusable(format!("reading {}/cgroup.type: {e}", edir.display())))?;
            if ty.trim() != "threaded" {
                write_file(&edir.join("cgroup.type"), "threaded")
                    .map_err(|e| unusable(format!("making {} threaded: {e}", edir.display())))?;
            }
            out.insert(
                name.clone(),
                EngineCgroup {
                    id: cgroup_id(&edir)?,
                    dir: edir,
                },
            );
        }
        Ok(Self { dir, engines: out })
    }

    /// Moves a whole process into the database's domain cgroup (required
    /// before any of its threads can enter an engine's threaded child).
    pub fn adopt_process(&self, pid: u32) -> Result<(), AgentError> {
        if self.pids()?.contains(&pid) {
            return Ok(());
        }
        write_file(&self.dir.join("cgroup.procs"), &pid.to_string())
            .map_err(|e| AgentError::io(format!("moving pid {pid} into {}", self.dir.display()), e))
    }

    /// Moves one thread into an engine's cgroup.
    pub fn move_thread(&self, tid: u32, engine: &str) -> Result<(), AgentError> {
        let cg = self
            .engines
            .get(engine)
            .ok_or_else(|| AgentError::UnknownEngine {
                name: engine.to_owned(),
                known: self.engines.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        write_file(&cg.dir.join("cgroup.threads"), &tid.to_string()).map_err(|e| {
            AgentError::io(format!("moving thread {tid} into {}", cg.dir.display()), e)
        })
    }

    /// Processes with threads anywhere in the subtree.
    pub fn pids(&self) -> Result<Vec<u32>, AgentError> {
        let text = fs::read_to_string(self.dir.join("cgroup.procs")).map_err(|e| {
            AgentError::io(format!("reading {}/cgroup.procs", self.dir.display()), e)
        })?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Engine of the cgroup a thread is in, if any (from /proc).
    pub fn engine_of_thread(&self, pid: u32, tid: u32) -> Option<String> {
        let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
        let v2 = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let name = v2.rsplit('/').next()?;
        let engine = name.strip_prefix("engine-")?;
        self.engines.contains_key(engine).then(|| engine.to_owned())
    }

    /// Removes the engine cgroups and the domain cgroup (they must hold no
    /// threads: move them out first).
    pub fn remove(&self) -> io::Result<()> {
        for cg in self.engines.values() {
            fs::remove_dir(&cg.dir)?;
        }
        fs::remove_dir(&self.dir)
    }
}

fn write_file(path: &Path, text: &str) -> io::Result<()> {
    // cgroupfs wants a single write(2) per value.
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())
}
