//! Starting an agent binary and waiting until it serves.

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use super::reaped::Reaped;
use crate::wait::try_poll;

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("starting the agent {bin}: {source}")]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("waiting for the agent: {0}")]
    Wait(std::io::Error),
    #[error("the agent exited ({0})")]
    Exited(ExitStatus),
    #[error("the agent did not open {sockets:?} within {timeout:?}")]
    Timeout {
        sockets: Vec<PathBuf>,
        timeout: Duration,
    },
}

/// Runs `bin run --config <config>` with `env` added to its environment
/// and its stderr (the agent's log) in `log`, and waits up to `timeout` for every one of `sockets` to exist.
/// An agent that exits first, or does not open them in time, is an error
/// (and is killed).
pub fn launch(
    bin: &Path,
    config: &Path,
    log: &Path,
    sockets: &[&Path],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Reaped, LaunchError> {
    launch_in(bin, config, log, sockets, env, timeout, &[])
}

/// [`launch`], the agent put into the cgroups whose `cgroup.procs` files
/// `cgroups` names before it runs a single instruction of its own (as a
/// service manager starts it where it belongs): started by a process the
/// agent governs, it would otherwise be born in that process's cgroups
/// and charge what it allocates while starting to them.
pub fn launch_in(
    bin: &Path,
    config: &Path,
    log: &Path,
    sockets: &[&Path],
    env: &[(&str, &str)],
    timeout: Duration,
    cgroups: &[PathBuf],
) -> Result<Reaped, LaunchError> {
    use std::os::unix::{ffi::OsStrExt, process::CommandExt};
    let spawn = |source| LaunchError::Spawn {
        bin: bin.to_owned(),
        source,
    };
    // Made before the fork: between fork and exec only system calls.
    let procs: Vec<std::ffi::CString> = cgroups
        .iter()
        .map(|p| std::ffi::CString::new(p.as_os_str().as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| spawn(std::io::Error::other(e)))?;
    let mut command = Command::new(bin);
    command
        .args(["run", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .stderr(std::fs::File::create(log).map_err(spawn)?);
    if !procs.is_empty() {
        // SAFETY: the closure makes only async-signal-safe system calls
        // (open, write, close) on memory allocated before the fork.
        unsafe {
            command.pre_exec(move || {
                for path in &procs {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // "0": the process writing it.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let error = std::io::Error::last_os_error();
                    libc::close(fd);
                    if written != 1 {
                        return Err(error);
                    }
                }
                Ok(())
            });
        }
    }
    let mut agent = Reaped(command.spawn().map_err(spawn)?);
    let up = try_poll(timeout, Duration::from_millis(20), || {
        if sockets.iter().all(|s| s.exists()) {
            return Ok(true);
        }
        match agent.try_wait().map_err(LaunchError::Wait)? {
            Some(status) => Err(LaunchError::Exited(status)),
            None => Ok(false),
        }
    })?;
    if !up {
        return Err(LaunchError::Timeout {
            sockets: sockets.iter().map(|s| s.to_path_buf()).collect(),
            timeout,
        });
    }
    Ok(agent)
}
