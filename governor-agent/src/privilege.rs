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
