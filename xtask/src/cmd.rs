//! Running commands, saying what is run.

use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, bail};

/// Prints a step heading.
pub fn step(what: &str) {
    eprintln!("==> {what}");
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs `cmd`, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("    $ {}", describe(cmd));
    let status: ExitStatus = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout, or None if it cannot run or
/// fails.
pub fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Bytes free to an unprivileged writer on the filesystem holding `path`
/// (`statvfs`'s `f_bavail`), or None if it cannot be read.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is writable
    // storage for one statvfs, which the call fills on success.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::useless_conversion)] // c_ulong is u32 on 32-bit targets
    Some(u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize)))
}
