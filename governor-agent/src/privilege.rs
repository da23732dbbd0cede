//! What loading the programs needs (privileges, BTF), checked up front so
//! the error names what is missing; and the rule privileged tests follow.

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

/// For privileged tests: returns true (after printing `skipping <test>:
/// <reason>`) when the prerequisites are missing and skipping is allowed.
/// Under CI (`CI=true`) or with `NODEDB_GOVERNOR_REQUIRE_PRIVILEGED=1`
/// (which `cargo xtask test` sets as root) a missing prerequisite panics:
/// those runs must never skip.
pub fn skip_unprivileged(test: &str) -> bool {
    let Err(e) = check_prerequisites() else {
        return false;
    };
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("NODEDB_GOVERNOR_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    if required {
        panic!("{test} must run here (CI or root) but cannot: {e}");
    }
    eprintln!("skipping {test}: {e}");
    true
}
