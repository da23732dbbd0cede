//! A real agent for one test: its own configuration, database name,
//! runtime directory and cgroups; stopped and cleaned up when dropped.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde::de::DeserializeOwned;

use crate::wait::poll;

use super::{
    agent_binary::agent_binary,
    cgroup::RemovedCgroup,
    launch::launch_in,
    pins::RemovedPins,
    probes::{probe_command, spawn},
    reaped::Reaped,
    scratch::ScratchDir,
    status::read_status,
};

/// A running agent (the `nodedb-governor` binary) on a private
/// configuration. Dropping it stops the agent (SIGTERM), then removes the
/// database's cgroups, its pins (left if the agent was killed) and the
/// agent's directory.
pub struct Agent {
    child: Reaped,
    /// Dropped after the agent stopped (in [`Drop`]), in this order.
    cgroups: Vec<RemovedCgroup>,
    _pins: RemovedPins,
    dir: ScratchDir,
    /// The database it governs: unique to the test.
    pub database: String,
    /// The control socket libraries (the probes) connect to.
    pub control: PathBuf,
    /// The admin socket the CLI (`status`, `assign`) talks to.
    pub admin: PathBuf,
    /// The agent's fault points (`FAILPOINTS`), kept for a restart.
    faults: String,
}

impl Agent {
    /// How long the agent may take to open its sockets (loading the
    /// programs is most of it).
    const START_TIMEOUT: Duration = Duration::from_secs(60);

    /// Starts the agent on `database = <unique(prefix)>`, `run_dir = <its
    /// own directory>` and then `config` (any other top-level keys, then
    /// the engines), with its log in `agent.log`; returns once it serves
    /// both sockets.
    pub fn start(prefix: &str, config: &str) -> Self {
        Self::start_with_faults(prefix, config, "")
    }

    /// [`start`], with the agent's fault points set (`FAILPOINTS`, see
    /// `nodedb_governor_agent::faults`): `owner-stall=return(MS)`, say.
    ///
    /// [`start`]: Self::start
    pub fn start_with_faults(prefix: &str, config: &str, faults: &str) -> Self {
        let dir = ScratchDir::new(prefix);
        let database = dir.name().to_owned();
        dir.write(
            "governor.toml",
            &format!(
                "database = \"{database}\"\nrun_dir = \"{}\"\n{config}",
                dir.path().display()
            ),
        );
        let control = dir.path().join("control.sock");
        let admin = dir.path().join("agent.sock");
        // Made before the agent starts, so that they know where this
        // process was before any agent adopted it.
        let mut cgroups = Vec::new();
        if let Some(root) = nodedb_governor_agent::cgroup::find_v2_mount() {
            cgroups.push(RemovedCgroup::new(root.join(&database)));
        }
        let _pins = RemovedPins(database.clone());
        let child = Self::launch(&dir, &control, &admin, faults, &[]);
        let mut agent = Self {
            child,
            cgroups,
            _pins,
            dir,
            database,
            control,
            admin,
            faults: faults.to_owned(),
        };
        // The ceiling's cgroup when the memory controller is on v1, and
        // the cpuset's when that one is.
        let status = agent.status_json();
        for made in [&status["ceiling"]["cgroup"], &status["cpuset"]["cgroup"]] {
            if let Some(dir) = made.as_str().map(PathBuf::from)
                && agent.cgroups.iter().all(|c| c.path() != dir)
            {
                agent.cgroups.push(RemovedCgroup::new(dir));
            }
        }
        agent
    }

    fn launch(
        dir: &ScratchDir,
        control: &Path,
        admin: &Path,
        faults: &str,
        cgroups: &[PathBuf],
    ) -> Reaped {
        let log = dir.path().join("agent.log");
        launch_in(
            &agent_binary(),
            &dir.path().join("governor.toml"),
            &log,
            &[control, admin],
            &[("FAILPOINTS", faults)],
            Self::START_TIMEOUT,
            cgroups,
        )
        .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default()))
    }

    /// The agent's directory (its configuration `governor.toml`, its log
    /// `agent.log`, its sockets; world-readable).
    pub fn dir(&self) -> &ScratchDir {
        &self.dir
    }

    /// The configuration file (rewrite it, then SIGHUP, to reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("governor.toml")
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Sends `signal` to the agent.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// SIGKILL, and waits for it: no clean-up, the pins and the registry
    /// stay.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// How the agent exited, if it does within `timeout` (on its own: it
    /// is not signalled).
    pub fn exit_within(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        poll(timeout, Duration::from_millis(20), || {
            status = self.child.try_wait().expect("waiting for the agent");
            status.is_some()
        });
        status
    }

    /// Starts the agent again on the same configuration (after [`kill`]).
    ///
    /// [`kill`]: Self::kill
    pub fn restart(&mut self) {
        self.restart_in(&[]);
    }

    /// [`restart`], the agent started in the cgroups whose `cgroup.procs`
    /// files `cgroups` names (see [`super::launch::launch_in`]): a process
    /// the agent governs restarts it where it was, not in its own cgroups.
    ///
    /// [`restart`]: Self::restart
    pub fn restart_in(&mut self, cgroups: &[PathBuf]) {
        let _ = std::fs::remove_file(&self.control);
        let _ = std::fs::remove_file(&self.admin);
        self.child = Self::launch(&self.dir, &self.control, &self.admin, &self.faults, cgroups);
    }

    /// Runs the CLI with `args` against this agent's admin socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_binary())
            .args(args)
            .arg("--socket")
            .arg(&self.admin)
            .output()
            .expect("running the CLI")
    }

    /// `status --json`, parsed as `T`; panics when it fails.
    pub fn status<T: DeserializeOwned>(&self) -> T {
        read_status(&agent_binary(), &self.admin).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `status --json` as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        self.status()
    }

    /// The probe `bin` pointed at this agent (`--socket`, `--database`).
    pub fn probe(&self, bin: impl AsRef<Path>) -> Command {
        // Relocated when the test runs away from its target directory (a
        // VM's initramfs).
        let bin = super::relocated::probe_bin(&bin.as_ref().to_string_lossy());
        probe_command(&bin, &self.control, &self.database)
    }

    /// Starts the probe `bin` against this agent with `args`, its stdout
    /// going to `stdout`; killed when the returned guard drops.
    pub fn spawn_probe(&self, bin: impl AsRef<Path>, args: &[&str], stdout: Stdio) -> Reaped {
        spawn(self.probe(bin).args(args).stdout(stdout))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}
