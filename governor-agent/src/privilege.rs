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
