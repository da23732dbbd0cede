//! `nodedb-governor run`: loads the programs, owns the cgroup subtree,
//! tracks governed processes and serves the admin socket until SIGINT or
//! SIGTERM.

use std::{
    collections::BTreeMap,
    fs,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::mpsc::{UnboundedSender, unbounded_channel},
};

use super::{
    admin::{self, Reply, Request},
    attribution::{Attribution, Identity, Persistence, ProgramSet},
    ceiling::Ceiling,
    cgroup::{self, Subtree},
    config::{Config, IdentityMode},
    control::Client,
    error::AgentError,
    mounts, procfs,
    psi::PsiMonitor,
    status::{ClientStatus, StatusReport},
};
use nodedb_governor::control::wire::{self, Decoder, ToAgent, ToLibrary};

/// Everything the running agent owns.
pub struct Agent {
    config: Config,
    identity: Identity,
    attribution: Attribution,
    subtree: Option<Subtree>,
    /// Connected libraries, by connection id.
    clients: BTreeMap<u64, Client>,
    ceiling: Option<Ceiling>,
    ceiling_error: Option<String>,
    health: Health,
    metrics_addr: Option<std::net::SocketAddr>,
    /// The PSI trigger (absent: off, or unavailable: see `psi_error`).
    psi: Option<PsiMonitor>,
    psi_error: Option<String>,
    /// Trigger events already acted on, and when the last one came.
    psi_seen: u64,
    psi_last: Option<Instant>,
    /// The whole database is in Emergency (backpressure is on).
    emergency: bool,
    /// Keeps the kernel's program statistics on (run counts and times).
    _program_stats: Option<std::os::fd::OwnedFd>,
    /// Processes of engines that run as processes of their own, and the
    /// engine.
    own: BTreeMap<u32, String>,
}

/// How the agent's own loop is doing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Health {
    pub ticks: u64,
    pub last_tick: Duration,
}

impl Agent {
    /// Loads the programs and sets up the cgroup subtree.
    pub fn start(config: Config) -> Result<Self, AgentError> {
        // Name missing privileges before touching anything that needs them.
        super::privilege::check_prerequisites()?;
        // bpffs is where the maps are pinned; like tracefs, mount it when
        // the host has not.
        mounts::ensure_bpffs().map_err(|e| AgentError::io("mounting bpffs", e))?;
        fs::create_dir_all(&config.run_dir)
            .map_err(|e| AgentError::io(format!("creating {}", config.run_dir.display()), e))?;
        let persistence = Persistence {
            pin_dir: PathBuf::from(super::paths::DEFAULT_PIN_DIR).join(&config.database),
            state_file: config
                .run_dir
                .join(format!("attribution-{}.json", config.database)),
        };
        let (attribution, restored) = Attribution::load_persistent(ProgramSet::Full, &persistence)?;
        if restored {
            tracing::info!("restarted: attribution continues from the pinned maps");
        }
        let engines = config.engine_names();
        let cgroup_subtree = || -> Result<Subtree, AgentError> {
            let root = match &config.cgroup_root {
                Some(root) => root.clone(),
                None => cgroup::find_v2_mount().ok_or_else(|| AgentError::CgroupUnusable {
                    path: PathBuf::from("/sys/fs/cgroup"),
                    reason: "no cgroup2 filesystem is mounted".into(),
                })?,
            };
            Subtree::create_or_adopt(
                &root,
                &config.database,
                &engines,
                &config.own_process_engines(),
            )
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
            tracing::info!(cgroup = %s.domain.display(), engines = engines.len(), "cgroup subtree ready");
            if let Some(uid) = config.delegate_uid {
                s.delegate(uid)?;
                tracing::info!(uid, cgroup = %s.dir.display(), "engine cgroups delegated");
            }
        }
        let limit = config.ceiling_bytes();
        let high = if config.enforce {
            (limit as f64 * config.thresholds.critical) as u64
        } else {
            limit
        };
        let (mut ceiling, ceiling_error) = match Ceiling::setup(
            subtree.as_ref().map(|s| s.domain.as_path()),
            &config.database,
            limit,
            high,
        ) {
            Ok(c) => {
                tracing::info!(backend = ?c.backend(), cgroup = %c.dir().display(), limit, high, "ceiling enforced");
                (Some(c), None)
            }
            Err(e) => {
                tracing::warn!(error = %e, "the ceiling is not enforced by the kernel");
                (None, Some(e.to_string()))
            }
        };
        if let Some(c) = &mut ceiling {
            for l in config.limits().into_iter().filter(|l| l.own_process) {
                let dir = subtree
                    .as_ref()
                    .and_then(|s| s.own.get(&l.name))
                    .map(|cg| cg.dir.as_path());
                if let Err(e) = c.setup_engine(&l.name, dir, l.budget_bytes) {
                    tracing::warn!(engine = %l.name, error = %e, "the engine's own cgroup has no high mark");
                }
            }
        }
        let (psi, psi_error) = if config.pressure_stall.enabled {
            // The database's cgroup (PSI is kept per cgroup v2, controller
            // or not), else the host's.
            let source = subtree
                .as_ref()
                .map(|s| s.domain.join("memory.pressure"))
                .filter(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(super::paths::HOST_MEMORY_PRESSURE));
            let ps = config.pressure_stall;
            match PsiMonitor::start(
                &source,
                Duration::from_millis(ps.stall_ms),
                Duration::from_millis(ps.window_ms),
            ) {
                Ok(m) => (Some(m), None),
                Err(e) => {
                    tracing::warn!(error = %e, "pressure stall information is not an input");
                    (None, Some(e.to_string()))
                }
            }
        } else {
            (None, None)
        };
        let program_stats = if config.program_stats {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!(error = %e, "eBPF program statistics are off");
                    None
                }
            }
        } else {
            None
        };
        Ok(Self {
            config,
            identity,
            attribution,
            subtree,
            clients: BTreeMap::new(),
            ceiling,
            ceiling_error,
            health: Health::default(),
            metrics_addr: None,
            psi,
            psi_error,
            psi_seen: 0,
            psi_last: None,
            emergency: false,
            _program_stats: program_stats,
            own: BTreeMap::new(),
        })
    }

    fn register(&mut self, pid: u32) -> Result<(), AgentError> {
        if self.attribution.is_registered(pid) {
            return Ok(());
        }
        self.attribution
            .register_process(pid, &self.config.engine_names())?;
        if let Some(c) = &self.ceiling
            && let Err(e) = c.adopt(pid)
        {
            tracing::warn!(pid, error = %e, "could not put the process under the ceiling");
        }
        if let Some(s) = &self.subtree {
            for (name, cg) in &s.engines {
                self.attribution.bind_cgroup(pid, name, cg.id)?;
            }
        }
        Ok(())
    }

    /// Takes in a process of an engine that runs as a process of its own:
    /// it goes into the engine's domain cgroup, and everything its threads
    /// do is the engine's.
    fn register_own(&mut self, pid: u32, engine: &str) -> Result<(), AgentError> {
        if self.own.get(&pid).is_some_and(|e| e == engine) {
            return Ok(());
        }
        if let Some(s) = &self.subtree {
            s.adopt_own_process(pid, engine)?;
        }
        if self.attribution.is_registered(pid) {
            // It was first seen elsewhere: start its books afresh.
            self.attribution.forget_process(pid);
        }
        self.attribution
            .register_process(pid, &self.config.engine_names())?;
        if let Some(c) = &self.ceiling
            && let Err(e) = c.adopt(pid).and_then(|()| c.adopt_engine(pid, engine))
        {
            tracing::warn!(pid, engine, error = %e, "could not put the process under its engine's cgroup");
        }
        if let Some(cg) = self.subtree.as_ref().and_then(|s| s.own.get(engine)) {
            self.attribution.bind_cgroup(pid, engine, cg.id)?;
        }
        tracing::info!(pid, engine, "process of an own-process engine registered");
        self.own.insert(pid, engine.to_owned());
        Ok(())
    }

    /// One tick: picks up processes that entered the subtree, forgets those
    /// that exited.
    pub fn tick(&mut self) {
        let started = Instant::now();
        self.tick_inner();
        self.health.ticks += 1;
        self.health.last_tick = started.elapsed();
    }

    pub fn health(&self) -> Health {
        self.health
    }

    fn tick_inner(&mut self) {
        if let Some(s) = &self.subtree {
            let own = s.own_pids();
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
            for (engine, pid) in own {
                if let Err(e) = self.register_own(pid, &engine) {
                    tracing::warn!(pid, engine, error = %e, "could not register process");
                }
            }
        }
        for pid in self.attribution.reap_exited() {
            self.own.remove(&pid);
            tracing::info!(pid, "governed process exited");
        }
        let (new_stall, stalling) = self.pressure_stall();
        let usage = match self.attribution.read() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!(error = %e, "reading attribution");
                None
            }
        };
        if let Some(usage) = &usage {
            for c in self.clients.values_mut() {
                if new_stall {
                    c.on_stall();
                }
                c.enforce(&self.config, usage, stalling);
            }
        }
        let emergency = self.enforce_ceiling(usage.as_ref());
        for c in self.clients.values_mut() {
            c.set_backpressure(emergency, &self.config);
        }
    }

    /// Reads the PSI trigger's count: whether it fired since the last tick,
    /// and whether the database is still within a window of the last event.
    fn pressure_stall(&mut self) -> (bool, bool) {
        let Some(m) = &self.psi else {
            return (false, false);
        };
        let events = m.events();
        let new = events > self.psi_seen;
        if new {
            self.psi_seen = events;
            self.psi_last = Some(Instant::now());
            tracing::warn!(source = %m.source().display(), events, "memory pressure stall (PSI trigger)");
        }
        let stalling = self.psi_last.is_some_and(|t| t.elapsed() < m.window());
        (new, stalling)
    }

    /// Process-wide Emergency: the database's use (the ceiling cgroup's
    /// working set: its charge less the inactive page cache the kernel
    /// drops first, so written-out spills do not count; without a
    /// ceiling cgroup, the memory attributed to its processes) at
    /// the emergency threshold of the ceiling. The high mark drops to the
    /// restore point to force reclaim, and the non-essential engines get
    /// backpressure; both end once use is below the warning threshold.
    /// Returns whether the database is in Emergency.
    fn enforce_ceiling(&mut self, usage: Option<&super::attribution::Reading>) -> bool {
        let t = self.config.thresholds;
        let (current, limit) = match &self.ceiling {
            Some(c) => {
                let st = c.status();
                (st.working_set_bytes, st.limit_bytes)
            }
            None => (
                usage.map_or(0, |u| {
                    u.processes
                        .iter()
                        .flat_map(|p| p.engines.values().chain([&p.unattributed]))
                        .map(|e| e.resident_bytes)
                        .sum()
                }),
                self.config.ceiling_bytes(),
            ),
        };
        let f = current as f64 / limit.max(1) as f64;
        let was = self.emergency;
        if f >= t.emergency {
            self.emergency = true;
        } else if f < t.warning {
            self.emergency = false;
        }
        if self.emergency != was {
            if self.emergency {
                tracing::warn!(current, limit, "the database is in Emergency");
            } else {
                tracing::info!(current, limit, "the database's Emergency is over");
            }
            if let Some(c) = &mut self.ceiling
                && self.config.enforce
            {
                let want = self.emergency.then_some((limit as f64 * t.restore) as u64);
                if let Err(e) = c.set_high(want) {
                    tracing::warn!(error = %e, "changing the memory high mark");
                }
            }
        }
        self.emergency
    }

    /// A library's hello: checks it, takes its process under governance,
    /// and answers with the welcome and the engines' budgets.
    pub fn hello(
        &mut self,
        id: u64,
        pid: u32,
        uid: u32,
        tx: UnboundedSender<ToLibrary>,
        hello: ToAgent,
    ) -> Result<(), String> {
        let ToAgent::Hello {
            version,
            database,
            engines,
        } = hello
        else {
            return Err("the first message must be hello".into());
        };
        if version != wire::VERSION {
            return Err(format!(
                "protocol version {version} is not supported (this agent speaks {})",
                wire::VERSION
            ));
        }
        if database != self.config.database {
            return Err(format!(
                "database {database:?} is not governed here (this agent governs {:?})",
                self.config.database
            ));
        }
        let known = self.config.engine_names();
        if let Some(e) = engines.iter().find(|e| !known.contains(&e.name)) {
            return Err(AgentError::UnknownEngine {
                name: e.name.clone(),
                known: known.join(", "),
            }
            .to_string());
        }
        let own: Vec<&str> = engines
            .iter()
            .filter(|e| {
                self.config
                    .engines
                    .iter()
                    .any(|c| c.name == e.name && c.own_process)
            })
            .map(|e| e.name.as_str())
            .collect();
        match own.as_slice() {
            [] => {
                if let Some(s) = &self.subtree {
                    s.adopt_process(pid).map_err(|e| e.to_string())?;
                }
                self.register(pid).map_err(|e| e.to_string())?;
            }
            [engine] if engines.len() == 1 => {
                let engine = engine.to_string();
                self.register_own(pid, &engine).map_err(|e| e.to_string())?;
            }
            _ => {
                return Err(format!(
                    "engine {} runs as a process of its own (own_process in the config): a process declares it alone",
                    own[0]
                ));
            }
        }
        // A subtree delegated to the library's user: it moves its threads
        // itself.
        let delegated = self.subtree.as_ref().filter(|s| {
            uid != 0
                && !self.own.contains_key(&pid)
                && fs::metadata(&s.dir)
                    .is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == uid)
        });
        let engine_cgroups = delegated
            .map(|s| {
                s.engines
                    .iter()
                    .map(|(n, c)| (n.clone(), c.dir.display().to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let mut client = Client::new(pid, uid, tx, engines.iter().map(|e| e.name.clone()));
        if !self.config.enforce {
            client = client.observe_only(self.config.ceiling_bytes());
        }
        client.send(ToLibrary::Welcome {
            version: wire::VERSION,
            engine_cgroups,
        });
        client.send_initial_limits(&self.config);
        if self.emergency {
            client.set_backpressure(true, &self.config);
        }
        tracing::info!(pid, uid, engines = engines.len(), "library connected");
        self.clients.insert(id, client);
        Ok(())
    }

    /// A message from a welcomed library.
    pub fn client_message(&mut self, id: u64, m: ToAgent) -> Result<(), String> {
        let Some(pid) = self.clients.get(&id).map(|c| c.pid) else {
            return Err("not welcomed".into());
        };
        match m {
            ToAgent::Hello { .. } => Err("hello was already received".into()),
            ToAgent::Thread { tid, engine, moved } => {
                if moved {
                    // The library moved it; check it is where it says.
                    procfs::threads(pid)
                        .map_err(|e| e.to_string())?
                        .contains(&tid)
                        .then_some(())
                        .ok_or_else(|| AgentError::NoSuchThread { pid, tid }.to_string())?;
                    tracing::info!(pid, tid, %engine, "thread moved by the library (delegated subtree)");
                } else {
                    self.assign(pid, tid, &engine).map_err(|e| e.to_string())?;
                }
                if let Some(c) = self.clients.get(&id) {
                    c.send(ToLibrary::ThreadPlaced { tid, engine });
                }
                Ok(())
            }
            other => {
                if let Some(c) = self.clients.get_mut(&id) {
                    c.on_message(other);
                }
                Ok(())
            }
        }
    }

    /// The connection ended.
    pub fn detach(&mut self, id: u64) {
        if let Some(c) = self.clients.remove(&id) {
            tracing::info!(pid = c.pid, "library disconnected");
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Applies a new (valid) configuration at once, or refuses it whole:
    /// what only a restart can change (the database, identity, cgroup root,
    /// sockets, the metrics address, the set of engines) must be unchanged.
    /// Budgets, floors, thresholds, the ceiling, the tick and the allowed
    /// uids change in place; libraries get their new budgets (loans end).
    pub fn reload(&mut self, new: Config) -> Result<(), String> {
        let old = &self.config;
        let fixed: [(&str, bool); 10] = [
            ("database", old.database == new.database),
            ("identity", old.identity == new.identity),
            ("cgroup_root", old.cgroup_root == new.cgroup_root),
            ("run_dir", old.run_dir == new.run_dir),
            (
                "control_socket",
                old.control_socket_path() == new.control_socket_path(),
            ),
            ("metrics_addr", old.metrics_addr == new.metrics_addr),
            ("delegate_uid", old.delegate_uid == new.delegate_uid),
            ("enforce", old.enforce == new.enforce),
            ("engine", old.engine_names() == new.engine_names()),
            (
                "engine.own_process",
                old.own_process_engines() == new.own_process_engines(),
            ),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, same)| !same) {
            return Err(format!("{field} cannot change without a restart"));
        }
        if let Some(c) = &mut self.ceiling {
            let limit = new.ceiling_bytes();
            let high = if new.enforce {
                (limit as f64 * new.thresholds.critical) as u64
            } else {
                limit
            };
            c.set_limit(limit, high).map_err(|e| e.to_string())?;
            for l in new.limits().into_iter().filter(|l| l.own_process) {
                c.set_engine_high(&l.name, l.budget_bytes)
                    .map_err(|e| e.to_string())?;
            }
        }
        self.config = new;
        for c in self.clients.values_mut() {
            c.reset_budgets(&self.config);
        }
        Ok(())
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
        if let Some(own) = self.own.get(&pid) {
            // The whole process is the engine's already.
            if own != engine {
                return Err(AgentError::UnknownEngine {
                    name: engine.to_owned(),
                    known: own.clone(),
                });
            }
            tracing::info!(pid, tid, engine, "thread of an own-process engine");
            return Ok(());
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
        let mut report = StatusReport::new(
            &self.config.database,
            self.identity,
            self.subtree
                .as_ref()
                .map(|s| s.domain.display().to_string()),
            &self.config.engine_names(),
            self.attribution.read()?,
        );
        report.ceiling = self.ceiling.as_ref().map(Ceiling::status);
        report.ceiling_error = self.ceiling_error.clone();
        report.metrics_addr = self.metrics_addr.map(|a| a.to_string());
        report.emergency = self.emergency;
        report.psi = self
            .psi
            .as_ref()
            .map(|m| m.status(self.psi_last.is_some_and(|t| t.elapsed() < m.window())));
        report.psi_error = self.psi_error.clone();
        report.programs = self.attribution.program_stats();
        report.clients = self
            .clients
            .values()
            .map(|c| ClientStatus {
                pid: c.pid,
                uid: c.uid,
                engines: c.enforcement.clone(),
                loans: c.loans.clone(),
            })
            .collect();
        Ok(report)
    }

    /// Leaves the kernel state the agent made (a v1 ceiling cgroup, once
    /// its processes are gone).
    pub fn shutdown(&self) {
        if let Some(c) = &self.ceiling {
            c.remove();
        }
        self.attribution.unpin();
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

/// Runs the agent until SIGINT or SIGTERM; SIGHUP reloads `config_path`
/// (the bundled default when None).
pub async fn run(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let socket_path = config.socket_path();
    let tick = Duration::from_millis(config.tick_ms);
    let agent = Arc::new(Mutex::new(Agent::start(config)?));
    let run_dir = socket_path.parent().map(PathBuf::from).unwrap_or_default();
    fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let listener = bind_socket(&socket_path)?;
    tracing::info!(socket = %socket_path.display(), "agent running");

    let ticker = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            loop {
                interval.tick().await;
                let now = {
                    let mut a = lock(&agent);
                    a.tick();
                    Duration::from_millis(a.config().tick_ms)
                };
                // A reload may change the tick.
                if now != interval.period() {
                    interval = tokio::time::interval(now);
                    interval.tick().await;
                }
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

    let control_path = lock(&agent).config().control_socket_path();
    let control_listener = bind_socket(&control_path)?;
    tracing::info!(socket = %control_path.display(), "control socket open");
    let control = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut next_id = 0u64;
            loop {
                let Ok((stream, _)) = control_listener.accept().await else {
                    continue;
                };
                next_id += 1;
                tokio::spawn(serve_control(agent.clone(), stream, next_id));
            }
        })
    };

    let metrics_addr = lock(&agent).config().metrics_addr;
    let metrics = match metrics_addr {
        Some(addr) => {
            let (bound, task) = super::metrics_http::serve(agent.clone(), addr).await?;
            tracing::info!(addr = %bound, "serving /metrics");
            lock(&agent).metrics_addr = Some(bound);
            Some(task)
        }
        None => None,
    };

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: stopping");
                break;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping");
                break;
            }
            _ = hup.recv() => {
                match super::cli::load_config(config_path.as_ref()) {
                    Ok(new) => match lock(&agent).reload(new) {
                        Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: configuration refused, the old one stays"),
                    },
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: configuration refused, the old one stays"),
                }
            }
        }
    }
    ticker.abort();
    server.abort();
    control.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    lock(&agent).shutdown();
    let _ = fs::remove_file(&socket_path);
    let _ = fs::remove_file(&control_path);
    Ok(())
}

fn lock(agent: &Mutex<Agent>) -> std::sync::MutexGuard<'_, Agent> {
    // A panic while holding the lock must not wedge the agent: the state is
    // still consistent (every mutation is a single map update).
    agent.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds a Unix socket at `path` (replacing a stale one), mode 0660.
fn bind_socket(path: &std::path::Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed a stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// One library connection: peer credentials checked against the
/// allow-list, then the hello, then messages until it ends. Bad frames are
/// answered with an error; only an oversized frame (the stream cannot be
/// resynchronised) or a refused hello ends the connection. Other clients
/// are never held up: each connection is its own task.
async fn serve_control(agent: Arc<Mutex<Agent>>, stream: UnixStream, id: u64) {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials");
            return;
        }
    };
    let uid = cred.uid();
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = unbounded_channel::<ToLibrary>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if wr.write_all(&wire::encode(&m)).await.is_err() {
                break;
            }
        }
    });
    let refuse = |tx: &UnboundedSender<ToLibrary>, message: String| {
        tracing::warn!(uid, %message, "control connection refused");
        let _ = tx.send(ToLibrary::Error { message });
    };
    let allowed = lock(&agent).config().uid_allowed(uid);
    let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
    match (allowed, pid) {
        (false, _) => refuse(
            &tx,
            format!(
                "uid {uid} is not allowed on the control socket (see allowed_uids in the config)"
            ),
        ),
        (true, None) => refuse(&tx, "the peer's pid is unknown".into()),
        (true, Some(pid)) => control_session(&agent, &mut rd, &tx, id, pid, uid).await,
    }
    if !(allowed && pid.is_some()) {
        linger(&mut rd).await;
    }
    lock(&agent).detach(id);
    drop(tx);
    let _ = writer.await;
}

/// A refused peer may still be writing its hello: read (and drop) a
/// little of it before closing, so it reads the refusal instead of failing
/// on a broken pipe.
async fn linger(rd: &mut tokio::net::unix::OwnedReadHalf) {
    let mut sink = vec![0u8; wire::MAX_FRAME];
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

async fn control_session(
    agent: &Arc<Mutex<Agent>>,
    rd: &mut tokio::net::unix::OwnedReadHalf,
    tx: &UnboundedSender<ToLibrary>,
    id: u64,
    pid: u32,
    uid: u32,
) {
    let mut decoder = Decoder::new();
    let mut buf = vec![0u8; 16 * 1024];
    let mut welcomed = false;
    let reply_error = |message: String| {
        tracing::warn!(pid, uid, %message, "bad control message");
        let _ = tx.send(ToLibrary::Error { message });
    };
    loop {
        match rd.read(&mut buf).await {
            Ok(0) | Err(_) => {
                if let Err(e) = decoder.finish() {
                    reply_error(e.to_string());
                }
                return;
            }
            Ok(n) => decoder.push(&buf[..n]),
        }
        while let Some(m) = decoder.next_message::<ToAgent>() {
            match m {
                Err(e) => {
                    reply_error(e.to_string());
                    if !e.is_recoverable() {
                        return;
                    }
                }
                Ok(m) if !welcomed => match lock(agent).hello(id, pid, uid, tx.clone(), m) {
                    Ok(()) => welcomed = true,
                    Err(message) => {
                        reply_error(message);
                        return;
                    }
                },
                Ok(m) => {
                    if let Err(message) = lock(agent).client_message(id, m) {
                        reply_error(message);
                    }
                }
            }
        }
    }
}
