//! Running commands, saying what is run.

use std::{
    process::{Command, ExitStatus, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

/// Every heading printed so far, with when it started.
static STEPS: Mutex<Vec<(String, Instant)>> = Mutex::new(Vec::new());

/// Prints a step heading, with the time since the first one (so a log
/// shows where the time went).
pub fn step(what: &str) {
    let now = Instant::now();
    let mut steps = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let since = steps.first().map_or(Duration::ZERO, |(_, t)| now - *t);
    eprintln!("==> [{}] {what}", clock(since));
    steps.push((what.to_owned(), now));
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}", s / 60, s % 60)
}

/// Prints how long each step took, longest first, and the whole; said at
/// the end of a long command whether it succeeded or not.
pub fn time_summary() {
    let steps = STEPS.lock().unwrap_or_else(|e| e.into_inner());
    let Some((_, start)) = steps.first() else {
        return;
    };
    let end = Instant::now();
    let mut took: Vec<(Duration, &str)> = steps
        .iter()
        .zip(steps.iter().skip(1).map(|(_, t)| *t).chain([end]))
        .map(|((what, begun), ended)| (ended - *begun, what.as_str()))
        .collect();
    took.sort_by_key(|t| std::cmp::Reverse(t.0));
    eprintln!("==> time taken: {} in all", clock(end - *start));
    for (d, what) in took.iter().filter(|(d, _)| d.as_secs() >= 5) {
        eprintln!("    {}  {what}", clock(*d));
    }
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
