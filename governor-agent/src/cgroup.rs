//! The cgroup v2 subtree the agent owns:
//!
//! ```text
//! <root>/<database>/                 domain: the ceiling (memory.max, memory.high), PSI
//! <root>/<database>/shared/          threaded domain: processes that run several engines
//! <root>/<database>/shared/engine-<e>/   threaded, one per engine
//! <root>/<database>/proc-<e>/        domain: engine <e> running as a process of its own
//!                                    (`own_process`), with its own memory.high
//! ```
//!
//! A thread's engine is the cgroup it sits in, which the eBPF side reads
//! with `bpf_get_current_cgroup_id()`; threads inherit their creator's
//! cgroup, so threads born after registration are attributed with no help.
//! (A threaded domain's domain children would be invalid, hence `shared/`:
//! the database's own cgroup holds no processes.)
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

/// Where the database's cgroup gets `controller` (`memory`, `cpuset`): on
/// cgroup v2, its domain `v2_dir` once the parent passes the controller
/// down (enabled in the parent's `cgroup.subtree_control` here if it is
/// not yet); else `<v1 hierarchy>/<database>`, made if missing. Which
/// backend, and the directory; an error says why neither can be had.
pub fn controller_dir(
    v2_dir: Option<&Path>,
    database: &str,
    controller: &str,
) -> Result<(crate::ceiling::Backend, PathBuf), AgentError> {
    let has = |file: PathBuf| {
        fs::read_to_string(file).is_ok_and(|c| c.split_whitespace().any(|x| x == controller))
    };
    if let Some(dir) = v2_dir
        && let Some(parent) = dir.parent()
        && has(parent.join("cgroup.controllers"))
    {
        if !has(parent.join("cgroup.subtree_control")) {
            let file = parent.join("cgroup.subtree_control");
            fs::write(&file, format!("+{controller}")).map_err(|e| {
                AgentError::io(format!("writing +{controller} to {}", file.display()), e)
            })?;
        }
        return Ok((crate::ceiling::Backend::CgroupV2, dir.to_owned()));
    }
    let Some(mount) = crate::mounts::cgroup_v1(controller) else {
        return Err(AgentError::CgroupUnusable {
            path: v2_dir
                .map(Path::to_owned)
                .unwrap_or_else(|| "/sys/fs/cgroup".into()),
            reason: format!(
                "no {controller} controller: neither on cgroup v2 (cgroup.controllers) nor a cgroup v1 {controller} hierarchy"
            ),
        });
    };
    let dir = mount.join(database);
    mkdir(&dir).map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
    Ok((crate::ceiling::Backend::CgroupV1, dir))
}

/// An engine's threaded cgroup.
#[derive(Clone, Debug)]
pub struct EngineCgroup {
    pub dir: PathBuf,
    pub id: u64,
}

/// The database's domain cgroup, the threaded domain of its multi-engine
/// processes with the engines' threaded children, and the domain cgroups of
/// engines that run as processes of their own.
#[derive(Clone, Debug)]
pub struct Subtree {
    /// `<root>/<database>`: the ceiling's cgroup.
    pub domain: PathBuf,
    /// `<domain>/shared`: where multi-engine processes live.
    pub dir: PathBuf,
    pub engines: BTreeMap<String, EngineCgroup>,
    /// `<domain>/proc-<engine>`, for engines that run as their own process.
    pub own: BTreeMap<String, EngineCgroup>,
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        r => r,
    }
}

impl Subtree {
    /// Creates `<root>/<database>/shared/engine-<name>` for each engine
    /// (threaded) and `<root>/<database>/proc-<name>` for each engine in
    /// `own` (a domain), or adopts them if they exist.
    pub fn create_or_adopt(
        root: &Path,
        database: &str,
        engines: &[String],
        own: &[String],
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
        let domain = root.join(database);
        let dir = domain.join("shared");
        for d in [&domain, &dir] {
            mkdir(d).map_err(|e| unusable(format!("creating {}: {e}", d.display())))?;
        }
        let mut own_out = BTreeMap::new();
        for name in own {
            let pdir = domain.join(format!("proc-{name}"));
            mkdir(&pdir).map_err(|e| unusable(format!("creating {}: {e}", pdir.display())))?;
            let ty = fs::read_to_string(pdir.join("cgroup.type")).unwrap_or_default();
            if ty.trim() != "domain" {
                return Err(unusable(format!(
                    "{} is a {} cgroup, not a domain",
                    pdir.display(),
                    ty.trim()
                )));
            }
            own_out.insert(
                name.clone(),
                EngineCgroup {
                    id: cgroup_id(&pdir)?,
                    dir: pdir,
                },
            );
        }
        let mut out = BTreeMap::new();
        for name in engines {
            let edir = dir.join(format!("engine-{name}"));
            mkdir(&edir).map_err(|e| unusable(format!("creating {}: {e}", edir.display())))?;
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
        Ok(Self {
            domain,
            dir,
            engines: out,
            own: own_out,
        })
    }

    /// Delegates `shared/` and the engines' threaded cgroups to `uid` (the
    /// directories and their cgroup.procs, cgroup.threads and
    /// cgroup.subtree_control, as a service manager delegates): processes
    /// of that uid can then move their own threads between engines.
    pub fn delegate(&self, uid: u32) -> Result<(), AgentError> {
        for dir in std::iter::once(&self.dir).chain(self.engines.values().map(|c| &c.dir)) {
            let files = ["cgroup.procs", "cgroup.threads", "cgroup.subtree_control"];
            for path in std::iter::once(dir.clone()).chain(files.iter().map(|f| dir.join(f))) {
                std::os::unix::fs::chown(&path, Some(uid), None).map_err(|e| {
                    AgentError::io(format!("delegating {} to uid {uid}", path.display()), e)
                })?;
            }
        }
        Ok(())
    }

    /// Moves a whole process into the domain cgroup of `engine`, which runs
    /// as a process of its own.
    pub fn adopt_own_process(&self, pid: u32, engine: &str) -> Result<(), AgentError> {
        let cg = self
            .own
            .get(engine)
            .ok_or_else(|| AgentError::UnknownEngine {
                name: engine.to_owned(),
                known: self.own.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
        write_file(&cg.dir.join("cgroup.procs"), &pid.to_string())
            .map_err(|e| AgentError::io(format!("moving pid {pid} into {}", cg.dir.display()), e))
    }

    /// Processes in an own-process engine's cgroup, by engine.
    pub fn own_pids(&self) -> Vec<(String, u32)> {
        self.own
            .iter()
            .flat_map(|(name, cg)| {
                fs::read_to_string(cg.dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .map(|pid| (name.clone(), pid))
                    .collect::<Vec<_>>()
            })
            .collect()
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

    /// The threads in an engine's cgroup (its threaded child, or its own
    /// process's domain cgroup).
    pub fn engine_threads(&self, engine: &str) -> Result<Vec<u32>, AgentError> {
        let Some(cg) = self.engines.get(engine).or_else(|| self.own.get(engine)) else {
            return Ok(Vec::new());
        };
        let path = cg.dir.join("cgroup.threads");
        let text = fs::read_to_string(&path)
            .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// Processes with threads anywhere in the subtree.
    pub fn pids(&self) -> Result<Vec<u32>, AgentError> {
        let text = fs::read_to_string(self.dir.join("cgroup.procs")).map_err(|e| {
            AgentError::io(format!("reading {}/cgroup.procs", self.dir.display()), e)
        })?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// The cgroup v2 path `tid` of `pid` is in, as `/proc` shows it
    /// (relative to the reader's cgroup namespace).
    pub fn cgroup_of_thread(pid: u32, tid: u32) -> Result<String, AgentError> {
        let path = format!("/proc/{pid}/task/{tid}/cgroup");
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => AgentError::NoSuchThread { pid, tid },
            _ => AgentError::io(format!("reading {path}"), e),
        })?;
        text.lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(str::to_owned)
            .ok_or_else(|| AgentError::io(path, io::Error::other("no cgroup v2 line")))
    }

    /// The engine whose cgroup `path` (as [`cgroup_of_thread`] reads it)
    /// is, if any: the whole path under the cgroup v2 mount, not its last
    /// name (another cgroup called `engine-vector` is not the vector
    /// engine's). /proc shows it from the root of the agent's cgroup
    /// namespace, which is the mount's root (the init namespace, or a
    /// container's own with its own mount); `cgroup_root` may be any
    /// directory below it.
    ///
    /// [`cgroup_of_thread`]: Self::cgroup_of_thread
    pub fn engine_of(&self, path: &str) -> Option<&str> {
        self.engine_under(&find_v2_mount()?, path)
    }

    /// [`engine_of`] with the mount given.
    ///
    /// [`engine_of`]: Self::engine_of
    pub fn engine_under(&self, mount: &Path, path: &str) -> Option<&str> {
        let dir = mount.join(path.trim_start_matches('/'));
        self.engines
            .iter()
            .find(|(_, cg)| cg.dir == dir)
            .map(|(name, _)| name.as_str())
    }

    /// Removes the engine cgroups, `shared` and the domain cgroup (they
    /// must hold no threads: move them out first).
    pub fn remove(&self) -> io::Result<()> {
        for cg in self.engines.values().chain(self.own.values()) {
            fs::remove_dir(&cg.dir)?;
        }
        fs::remove_dir(&self.dir)?;
        fs::remove_dir(&self.domain)
    }
}

fn write_file(path: &Path, text: &str) -> io::Result<()> {
    // cgroupfs wants a single write(2) per value.
    let mut f = fs::OpenOptions::new().write(true).open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subtree() -> Subtree {
        subtree_at("/sys/fs/cgroup")
    }

    fn subtree_at(root: &str) -> Subtree {
        let dir = PathBuf::from(root).join("db/shared");
        let engine = |name: &str| EngineCgroup {
            dir: dir.join(format!("engine-{name}")),
            id: 0,
        };
        Subtree {
            domain: PathBuf::from(root).join("db"),
            engines: [("vector", engine("vector")), ("query", engine("query"))]
                .into_iter()
                .map(|(n, c)| (n.to_owned(), c))
                .collect(),
            dir,
            own: BTreeMap::new(),
        }
    }

    /// A thread's cgroup is an engine's only by its whole path under the
    /// mount, never by its last name alone.
    #[test]
    fn a_cgroup_is_an_engines_by_its_whole_path() {
        let s = subtree();
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            s.engine_under(mount, "/db/shared/engine-vector"),
            Some("vector")
        );
        assert_eq!(
            s.engine_under(mount, "/db/shared/engine-query"),
            Some("query")
        );
        // A cgroup_root below the mount: /proc shows the whole path.
        let deeper = subtree_at("/sys/fs/cgroup/nodedb.slice");
        assert_eq!(
            deeper.engine_under(mount, "/nodedb.slice/db/shared/engine-vector"),
            Some("vector")
        );
        assert_eq!(deeper.engine_under(mount, "/db/shared/engine-vector"), None);
        for other in [
            "/other/shared/engine-vector",
            "/shared/engine-vector",
            "/engine-vector",
            "/engine-vector-x",
            "/db/shared",
            "/db/shared/engine-vector/sub",
            "/",
            "",
        ] {
            assert_eq!(s.engine_under(mount, other), None, "{other}");
        }
    }
}
