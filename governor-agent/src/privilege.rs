//! What loading the programs needs (privileges, BTF), checked up front so
//! the error names what is missing.

use std::path::Path;

use super::{error::AgentError, procfs};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Checks the privileges and kernel features the agent needs.
pub fn check_prerequisites() -> Result<(), AgentError> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let caps = procfs::effective_caps().unwrap_or(0);
    let missing: Vec<&str> = [
        (CAP_BPF, "CAP_BPF"),
        (CAP_PERFMON, "CAP_PERFMON"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| caps & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    if !missing.is_empty() {
        return Err(AgentError::NotPrivileged {
            uid: euid,
            missing: missing.join(", "),
        });
    }
    if !Path::new(super::paths::VMLINUX_BTF).exists() {
        return Err(AgentError::NoBtf {
            path: super::paths::VMLINUX_BTF.into(),
        });
    }
    Ok(())
}

/// What the agent keeps once its programs are attached, its cgroups made
/// (and delegated) and its sockets bound, and why each:
///
/// - `CAP_BPF`: every later `bpf()` call (the maps the tick reads and
///   the registrations write, the programs' statistics, the ring buffer)
///   on kernels that check it for any command while unprivileged BPF is
///   off (6.1 does);
/// - `CAP_SYS_NICE`: the engines' threads kept to their CPUs
///   (`sched_setaffinity` on processes of other uids) and the agent's own
///   `SCHED_FIFO` (`realtime_priority`, changed by a reload);
/// - `CAP_SYS_RESOURCE`: a library's locked-memory limit raised for its
///   hot sets (`prlimit` on another uid's process);
/// - `CAP_DAC_OVERRIDE`, with `delegate_uid` only: the delegated cgroups'
///   files belong to that uid, and the agent still moves processes in.
///
/// Everything else goes from the effective, permitted, inheritable,
/// ambient and bounding sets: `CAP_SYS_ADMIN`, `CAP_PERFMON` (attaching
/// is done), `CAP_CHOWN` (delegation and the admin socket's group are
/// done at start), `CAP_NET_BIND_SERVICE` (the endpoint is bound), and the
/// rest, which the agent never used.
pub fn kept_capabilities(delegating: bool) -> caps::CapsHashSet {
    let mut keep: caps::CapsHashSet = [
        caps::Capability::CAP_BPF,
        caps::Capability::CAP_SYS_NICE,
        caps::Capability::CAP_SYS_RESOURCE,
    ]
    .into_iter()
    .collect();
    if delegating {
        keep.insert(caps::Capability::CAP_DAC_OVERRIDE);
    }
    keep
}

/// Drops every capability but `keep` from this thread, for good: from the
/// bounding set first (if `CAP_SETPCAP` is held, else it is left as given),
/// so that no `exec` brings any back, then the inheritable and ambient sets, then the
/// effective and permitted. No new privileges either (`PR_SET_NO_NEW_PRIVS`).
/// Capabilities are per thread: call it while the process has no other
/// thread (the agent's runtime has one), or the others keep theirs.
/// Returns the names of those that remain (the ones kept that it had).
pub fn drop_capabilities(keep: &caps::CapsHashSet) -> Result<Vec<String>, AgentError> {
    use caps::CapSet;
    let failed = |what: &str, e: caps::errors::CapsError| {
        AgentError::io(
            format!("dropping capabilities: {what}"),
            std::io::Error::other(e.to_string()),
        )
    };
    let had =
        caps::read(None, CapSet::Permitted).map_err(|e| failed("reading the permitted set", e))?;
    let bounding =
        caps::read(None, CapSet::Bounding).map_err(|e| failed("reading the bounding set", e))?;
    if had.contains(&caps::Capability::CAP_SETPCAP) {
        for cap in bounding.difference(keep) {
            caps::drop(None, CapSet::Bounding, *cap)
                .map_err(|e| failed(&format!("{cap} from the bounding set"), e))?;
        }
    } else {
        // A service manager that bounded the agent already (without
        // CAP_SETPCAP): its set stays, and no_new_privs below keeps an
        // exec from gaining anything beyond what is permitted.
        tracing::info!("no CAP_SETPCAP: the bounding set is left as the service manager gave it");
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| failed("the ambient set", e))?;
    caps::clear(None, CapSet::Inheritable).map_err(|e| failed("the inheritable set", e))?;
    let left: caps::CapsHashSet = had.intersection(keep).copied().collect();
    caps::set(None, CapSet::Effective, &left).map_err(|e| failed("the effective set", e))?;
    caps::set(None, CapSet::Permitted, &left).map_err(|e| failed("the permitted set", e))?;
    // SAFETY: prctl with these arguments only sets a flag on this thread
    // (inherited by its children).
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(AgentError::io(
            "setting no_new_privs",
            std::io::Error::last_os_error(),
        ));
    }
    let mut names: Vec<String> = left.iter().map(|c| c.to_string().to_lowercase()).collect();
    names.sort();
    Ok(names)
}

/// Raises this process's soft `RLIMIT_NOFILE` to its hard limit (each
/// control connection holds
/// [`DESCRIPTORS_PER_CONNECTION`](crate::control::DESCRIPTORS_PER_CONNECTION)).
/// Returns the soft limit now.
pub fn raise_nofile() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into a live struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: a live struct; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// The gid of `group`: a gid as it is, a name looked up as the system
/// does (`getgrnam_r`: /etc/group, or the directory NSS names).
pub fn resolve_group(field: &str, group: &crate::config::GroupSpec) -> Result<u32, AgentError> {
    let name = match group {
        crate::config::GroupSpec::Gid(g) => return Ok(*g),
        crate::config::GroupSpec::Name(n) => n,
    };
    let missing = |reason: String| {
        AgentError::Config(crate::config::ConfigError {
            field: field.into(),
            reason,
        })
    };
    let c_name = std::ffi::CString::new(name.as_str())
        .map_err(|_| missing(format!("{name:?} holds a NUL")))?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: zeroed is a valid `group` (pointers null, ids 0).
        let mut grp: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is to live memory of the length given;
        // `grp`'s strings point into `buf`, read before it is dropped.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut grp,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => {
                return Err(missing(format!(
                    "no group is named `{name}` on this machine"
                )));
            }
            0 => return Ok(grp.gr_gid),
            libc::ERANGE if buf.len() < 1 << 20 => buf.resize(buf.len() * 4, 0),
            e => {
                return Err(AgentError::io(
                    format!("looking up group `{name}`"),
                    std::io::Error::from_raw_os_error(e),
                ));
            }
        }
    }
}

/// Raises `pid`'s `RLIMIT_MEMLOCK` (soft, and hard where it is lower) to
/// at least `bytes` with `prlimit` (needs `CAP_SYS_RESOURCE` to raise the
/// hard limit, or to touch another user's process). A limit already at or
/// above it is left. Returns the soft limit now (`u64::MAX`: unlimited).
pub fn raise_memlock(pid: u32, bytes: u64) -> std::io::Result<u64> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit with a null new limit only reads into `old`.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_MEMLOCK,
            std::ptr::null(),
            &mut old,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if old.rlim_cur >= bytes {
        return Ok(old.rlim_cur);
    }
    let new = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: old.rlim_max.max(bytes),
    };
    // SAFETY: both pointers are to live rlimit structs.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_MEMLOCK,
            &new,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GroupSpec;

    /// Names are looked up as the system does; a gid is taken as it is;
    /// a group the machine lacks is named in the error.
    #[test]
    fn admin_groups_resolve_by_name_or_gid() {
        assert_eq!(
            resolve_group("admin_group", &GroupSpec::Name("root".into())).unwrap(),
            0
        );
        assert_eq!(
            resolve_group("admin_group", &GroupSpec::Gid(4242)).unwrap(),
            4242
        );
        let e = resolve_group(
            "admin_group",
            &GroupSpec::Name("nodedb-no-such-group".into()),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("admin_group") && e.contains("no group is named `nodedb-no-such-group`"),
            "{e}"
        );
    }

    fn memlock_of(pid: u32) -> u64 {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max locked memory"))
            .unwrap();
        let soft = line.split_whitespace().nth(3).unwrap();
        if soft == "unlimited" {
            u64::MAX
        } else {
            soft.parse().unwrap()
        }
    }

    /// A limit already high enough is left alone (no privilege needed); a
    /// raise above the hard limit takes CAP_SYS_RESOURCE (which the root
    /// of some sandboxes, this project's CI machine among them, lacks), and
    /// without it the error is EPERM and the limit unchanged.
    #[test]
    fn raise_memlock_raises_or_names_the_missing_capability() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let before = memlock_of(pid);
        assert_eq!(raise_memlock(pid, before.min(4096)).unwrap(), before);
        let want = before.saturating_add(64 << 20).min(u64::MAX - 1);
        let has_sys_resource = procfs::effective_caps().is_some_and(|c| c & (1 << 24) != 0);
        match raise_memlock(pid, want) {
            Ok(now) => {
                // With the capability, or within the hard limit.
                assert_eq!(now, memlock_of(pid));
                assert!(now >= want, "raised to {now}, asked {want}");
            }
            Err(e) => {
                assert!(
                    !has_sys_resource,
                    "raising failed with CAP_SYS_RESOURCE: {e}"
                );
                assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                assert_eq!(memlock_of(pid), before, "a refused raise changes nothing");
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
