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
    let spawn = |source| LaunchError::Spawn {
        bin: bin.to_owned(),
        source,
    };
    let mut agent = Reaped(
        Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(log).map_err(spawn)?)
            .spawn()
            .map_err(spawn)?,
    );
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
