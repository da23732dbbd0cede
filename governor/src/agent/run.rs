//! `nodedb-governor run`: loads the programs, owns the cgroup subtree,
//! tracks governed processes and serves the admin socket until SIGINT or
//! SIGTERM.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

use super::{
    admin::{self, Reply, Request},
    attribution::{Attribution, Identity, ProgramSet},
    cgroup::{self, Subtree},
    config::{Config, IdentityMode},
    error::AgentError,
    mounts, procfs,
    status::StatusReport,
};

/// Everything the running agent owns.
pub struct Agent {
    config: Config,
    identity: Identity,
    attribution: Attribution,
    subtree: Option<Subtree>,
}

impl Agent {
    /// Loads the programs and sets up the cgroup subtree.
    pub fn start(config: Config) -> Result<Self, AgentError> {
        let attribution = Attribution::load(ProgramSet::Full)?;
        // bpffs is where BPF objects are pinned; like tracefs, mount it when
        // the host has not.
        mounts::ensure_bpffs().map_err(|e| AgentError::io("mounting bpffs", e))?;
        let engines = config.engine_names();
        let cgroup_subtree = || -> Result<Subtree, AgentError> {
            let root = match &config.cgroup_root {
                Some(root) => root.clone(),
                None => cgroup::find_v2_mount().ok_or_else(|| AgentError::CgroupUnusable {
                    path: PathBuf::from("/sys/fs/cgroup"),
                    reason: "no cgroup2 filesystem is mounted".into(),
                })?,
            };
            Subtree::create_or_adopt(&root, &config.database, &engines)
        };
        let (identity, subtree) = match config.identity {
            IdentityMode::Tid => (Identity::Tid, None),
            IdentityMode::Cgroup => (Identity::Cgroup, Some(cgroup_subtree()?)),
            IdentityMode::Auto => match cgroup_subtree() {
                Ok(s) => (Identity::Cgroup, Some(s)),
                Err(e) => {
                    tracing::warn!(error = %e, "threaded cgroups unavailable; using the TID map for engine identity");
                    (Identity::Tid, None)
                }
            },
        };
        if let Some(s) = &subtree {
            tracing::info!(cgroup = %s.dir.display(), engines = engines.len(), "cgroup subtree ready");
        }
        Ok(Self {
            config,
            identity,
            attribution,
            subtree,
        })
    }

    fn register(&mut self, pid: u32) -> Result<(), AgentError> {
        if self.attribution.is_registered(pid) {
            return Ok(());
        }
        self.attribution
            .register_process(pid, &self.config.engine_names())?;
        if let Some(s) = &self.subtree {
            for (name, cg) in &s.engines {
                self.attribution.bind_cgroup(pid, name, cg.id)?;
            }
        }
        Ok(())
    }

    /// One tick: picks up processes that entered the subtree, forgets those
    /// that exited.
    pub fn tick(&mut self) {
        if let Some(s) = &self.subtree {
            match s.pids() {
                Ok(pids) => {
                    for pid in pids {
                        if let Err(e) = self.register(pid) {
                            tracing::warn!(pid, error = %e, "could not register process");
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading the subtree's processes"),
            }
        }
        for pid in self.attribution.reap_exited() {
            tracing::info!(pid, "governed process exited");
        }
    }

    /// Moves thread `tid` of `pid` into `engine`.
    pub fn assign(&mut self, pid: u32, tid: u32, engine: &str) -> Result<(), AgentError> {
        procfs::start_time(pid)?;
        if !procfs::threads(pid)?.contains(&tid) {
            return Err(AgentError::NoSuchThread { pid, tid });
        }
        let engines = self.config.engine_names();
        if !engines.iter().any(|e| e == engine) {
            return Err(AgentError::UnknownEngine {
                name: engine.to_owned(),
                known: engines.join(", "),
            });
        }
        match &self.subtree {
            Some(s) => {
                s.adopt_process(pid)?;
                self.register(pid)?;
                self.subtree
                    .as_ref()
                    .map(|s| s.move_thread(tid, engine))
                    .transpose()?;
            }
            None => {
                self.register(pid)?;
                self.attribution.assign_tid(pid, tid, engine)?;
            }
        }
        tracing::info!(pid, tid, engine, "thread assigned");
        Ok(())
    }

    pub fn status(&self) -> Result<StatusReport, AgentError> {
        Ok(StatusReport::new(
            &self.config.database,
            self.identity,
            self.subtree.as_ref().map(|s| s.dir.display().to_string()),
            &self.config.engine_names(),
            self.attribution.usage()?,
        ))
    }

    fn handle(&mut self, request: Request) -> Reply {
        let result = match request {
            Request::Status => self.status().map(|s| Reply::Status(Box::new(s))),
            Request::Assign { pid, tid, engine } => self
                .assign(pid, tid, &engine)
                .map(|()| Reply::Assigned { pid, tid, engine }),
        };
        result.unwrap_or_else(|e| Reply::Error {
            message: e.to_string(),
        })
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let socket_path = config.socket_path();
    let tick = Duration::from_millis(config.tick_ms);
    let agent = Arc::new(Mutex::new(Agent::start(config)?));
    let run_dir = socket_path.parent().map(PathBuf::from).unwrap_or_default();
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    match fs::remove_file(&socket_path) {
        Ok(()) => tracing::info!(socket = %socket_path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", socket_path.display())),
    }
    let listener = UnixListener::bind(&socket_path)
        .with_context(|| format!("binding {}", socket_path.display()))?;
    fs::set_permissions(&socket_path, fs::Permissions::from_mode(0o660))?;
    tracing::info!(socket = %socket_path.display(), "agent running");

    let ticker = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            loop {
                interval.tick().await;
                lock(&agent).tick();
            }
        })
    };
    let server = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let agent = agent.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut reader = BufReader::new(read);
                    loop {
                        let mut buf = Vec::new();
                        let limit = admin::MAX_REQUEST_BYTES as u64 + 1;
                        match (&mut reader).take(limit).read_until(b'\n', &mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        let complete = buf.last() == Some(&b'\n');
                        let reply = match std::str::from_utf8(&buf) {
                            _ if !complete && buf.len() as u64 >= limit => Reply::Error {
                                message: format!(
                                    "request exceeds {} bytes",
                                    admin::MAX_REQUEST_BYTES
                                ),
                            },
                            Ok(line) => match admin::parse_request(line.trim_end()) {
                                Ok(req) => lock(&agent).handle(req),
                                Err(message) => Reply::Error { message },
                            },
                            Err(_) => Reply::Error {
                                message: "request is not UTF-8".into(),
                            },
                        };
                        if let Reply::Error { message } = &reply {
                            tracing::warn!(%message, "bad admin request");
                        }
                        let mut out = serde_json::to_vec(&reply).unwrap_or_default();
                        out.push(b'\n');
                        // An oversized request leaves the stream mid-line:
                        // answer, then drop the connection.
                        if write.write_all(&out).await.is_err() || !complete {
                            break;
                        }
                    }
                });
            }
        })
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
    }
    ticker.abort();
    server.abort();
    let _ = fs::remove_file(&socket_path);
    Ok(())
}

fn lock(agent: &Mutex<Agent>) -> std::sync::MutexGuard<'_, Agent> {
    // A panic while holding the lock must not wedge the agent: the state is
    // still consistent (every mutation is a single map update).
    agent.lock().unwrap_or_else(|p| p.into_inner())
}
