//! The library's end of the control channel: a background thread that
//! connects to the agent, declares the process's engines, registers engine
//! threads, reports the books, and carries out the agent's requests
//! (budget changes, spills, purges, pressure levels).
//!
//! Nothing on the allocation path waits for it: reservations only touch
//! the governor; the link reads the governor's figures and changes its
//! limits from its own thread. Work that can take a while runs on threads
//! of its own, so that limits and pressure levels are never held up behind
//! it, and its answer goes out when it is done: dropping cold page cache
//! (a walk of the engine's files with `mincore` and `fadvise`) on one
//! thread, and spills on one thread per engine (an engine's spill handler
//! may write hundreds of MiB, or wait for the engine's own flush; another
//! engine's spill does not wait behind it). A spill request that arrives
//! while an earlier one for the same engine has not started replaces it
//! (the agent's newer figures), so a slow engine does not pile up stale
//! requests; the replaced one is answered with the one that ran. If the
//! agent goes away the governor keeps its last budgets, and the link
//! reconnects with exponential backoff, declaring everything again
//! (engines and live threads).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{ErrorKind, Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::{
    held::HeldReader,
    wire::{self, Decoder, EngineDecl, EngineReport, ToAgent, ToLibrary, WireError},
};
use crate::{
    EngineId, MemoryGovernor, PressureLevel, SpillController,
    cache::{Dropped, EngineCache},
};

/// Why a connection to the agent ended (kept, as text, in
/// [`LinkStats::last_error`]).
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error("agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the connection")]
    Closed,
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("the agent speaks protocol {agent}, this library {}", wire::VERSION)]
    Version { agent: u32 },
}

/// How the link reaches the agent.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// The agent's control socket.
    pub socket: PathBuf,
    /// The database's name, as in the agent's configuration.
    pub database: String,
    /// Each engine's name on the wire and its id in the governor.
    pub engines: Vec<(String, EngineId)>,
    /// How often the books are looked at: reported when they changed, and
    /// every [`REPORT_HEARTBEAT`] when they did not (looked at that often
    /// at least, whatever this says: the agent lets a silent library go).
    pub report_interval: Duration,
    /// Reconnection backoff: first wait, and the longest.
    pub backoff: (Duration, Duration),
    /// The longest one message's write may block (the agent not reading):
    /// past it the connection is dropped and made again.
    pub write_timeout: Duration,
    /// The uid the agent runs as: a socket whose listener is another uid's
    /// is refused (it could be anyone's, left where the agent's should
    /// be). `None`: any.
    pub agent_uid: Option<u32>,
    /// An agent gone (or refusing the link) this long gives its steering
    /// back: every engine returns to the limits it had when the link
    /// started, pressure levels are forgotten and hot sets locked again
    /// (`LinkStats::agent_lost` counts it), rather than the database
    /// keeping a stale Emergency cap until the agent is back.
    pub agent_lost_after: Duration,
}

impl LinkConfig {
    pub fn new(socket: impl Into<PathBuf>, database: &str, engines: &[(&str, EngineId)]) -> Self {
        Self {
            socket: socket.into(),
            database: database.to_owned(),
            engines: engines.iter().map(|(n, e)| ((*n).to_owned(), *e)).collect(),
            report_interval: Duration::from_millis(50),
            backoff: (Duration::from_millis(20), Duration::from_secs(2)),
            write_timeout: Duration::from_secs(5),
            agent_uid: Some(0),
            agent_lost_after: Duration::from_secs(30),
        }
    }
}

/// Unchanged books are reported again this often.
pub const REPORT_HEARTBEAT: Duration = Duration::from_secs(5);

type PurgeFn = Box<dyn Fn(EngineId) -> Option<(u64, u64)> + Send + Sync>;
type ArenaFn = Box<dyn Fn(EngineId) -> Option<u64> + Send + Sync>;

/// What the link has seen, for callers and tests.
#[derive(Clone, Debug, Default)]
pub struct LinkStats {
    /// Connected and welcomed right now.
    pub connected: bool,
    /// Successful connections so far (a reconnect adds one).
    pub connects: u64,
    /// Spills carried out (for the agent's requests, and to bring an
    /// engine under a new cap).
    pub spills: u64,
    pub spilled_bytes: u64,
    /// Spill requests replaced by a newer one for the same engine before
    /// they started.
    pub spills_merged: u64,
    pub purges: u64,
    /// `drop_cache` requests served.
    pub cache_drops: u64,
    pub limit_changes: u64,
    /// The kernel keeps the short scheduler slice the link's threads ask
    /// for while they wait, so a request wakes them at once (Linux 6.12
    /// on; see `wake`).
    pub prompt_wakeups: bool,
    /// Times the agent was lost for `agent_lost_after` after it had
    /// steered the engines, and their own limits were restored (said in
    /// `last_error` too).
    pub agent_lost: u64,
    /// The last error the agent sent, or the last connection failure.
    pub last_error: Option<String>,
}

#[derive(Default)]
struct State {
    stats: LinkStats,
    /// Threads registered, by tid, and those the agent placed.
    threads: BTreeMap<u32, String>,
    placed: BTreeSet<u32>,
    levels: BTreeMap<EngineId, PressureLevel>,
    cgroups: BTreeMap<String, PathBuf>,
    /// Limits the agent sent that are below what the engine held: its cap
    /// is held at what it holds until its spill thread has brought it
    /// down, then these apply. A newer `limits` replaces them.
    wanted: BTreeMap<EngineId, (u64, u64)>,
    /// The agent has changed a limit or sent a level since the link
    /// started or last gave its steering back.
    steered: bool,
    /// The database's `memory.stat`, as the agent named it (`held_from`,
    /// right after `welcome`).
    held: Option<Arc<HeldReader>>,
}

/// Spill work for one engine, not yet started.
#[derive(Default)]
struct SpillJob {
    /// The agent's request: the bytes to free (answered when done).
    request: Option<u64>,
    /// Requests this one replaced.
    merged: u64,
}

#[derive(Default)]
struct SpillJobs {
    pending: BTreeMap<EngineId, SpillJob>,
    /// Engines whose spill thread is running.
    workers: BTreeSet<EngineId>,
}

struct Inner {
    config: LinkConfig,
    governor: MemoryGovernor,
    spill: Option<Arc<SpillController>>,
    purge: Option<PurgeFn>,
    arena_resident: Option<ArenaFn>,
    cache: Option<Arc<EngineCache>>,
    outbox: Mutex<Vec<ToAgent>>,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// `drop_cache` requests not yet served, by engine name (a newer one
    /// for the same engine replaces the older: one walk serves both).
    cache_jobs: Mutex<BTreeMap<String, u64>>,
    cache_wake: Condvar,
    spill_jobs: Mutex<SpillJobs>,
    spill_wake: Condvar,
    spill_threads: Mutex<Vec<JoinHandle<()>>>,
    /// The connection in use (a second handle), shut down by `Drop` so a
    /// write or read blocked on it returns at once.
    live: Mutex<Option<UnixStream>>,
    /// Each engine's floor and cap when the link started: what it returns
    /// to when the agent is lost.
    own_limits: Vec<(EngineId, u64, u64)>,
}

/// A running link; dropping it stops the thread (the connection closes,
/// the governor keeps its budgets).
pub struct AgentLink {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
    cache_thread: Option<JoinHandle<()>>,
}

/// Builds an [`AgentLink`].
pub struct AgentLinkBuilder {
    config: LinkConfig,
    governor: MemoryGovernor,
    spill: Option<Arc<SpillController>>,
    purge: Option<PurgeFn>,
    arena_resident: Option<ArenaFn>,
    cache: Option<Arc<EngineCache>>,
}

impl AgentLinkBuilder {
    /// The engines' page cache: `drop_cache` requests drop their cold
    /// files, an Emergency releases an engine's hot sets (and a level back
    /// at Warning or below locks them again), and reports carry the
    /// locked bytes.
    pub fn engine_cache(mut self, cache: Arc<EngineCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Spill requests go to this controller's handlers.
    pub fn spill_controller(mut self, spill: Arc<SpillController>) -> Self {
        self.spill = Some(spill);
        self
    }

    /// Purge requests call `f(engine)`, which returns resident bytes of the
    /// engine's arena before and after (None: the engine has no arena).
    pub fn on_purge(
        mut self,
        f: impl Fn(EngineId) -> Option<(u64, u64)> + Send + Sync + 'static,
    ) -> Self {
        self.purge = Some(Box::new(f));
        self
    }

    /// Reports carry `f(engine)` as the engine's arena resident bytes.
    pub fn arena_resident(
        mut self,
        f: impl Fn(EngineId) -> Option<u64> + Send + Sync + 'static,
    ) -> Self {
        self.arena_resident = Some(Box::new(f));
        self
    }

    /// Per-engine jemalloc arenas: purges and reports go to them (the
    /// reports' arena figures up to [`ARENA_FIGURES_EVERY`] old).
    #[cfg(feature = "jemalloc")]
    pub fn arenas(self, arenas: Arc<crate::arena::EngineArenas>) -> Self {
        let a = arenas.clone();
        let figures = ArenaFigures::new(arenas);
        self.on_purge(move |e| {
            let before = a.stats(e).ok()?.resident_bytes;
            a.purge(e).ok()?;
            Some((before, a.stats(e).ok()?.resident_bytes))
        })
        .arena_resident(move |e| figures.resident(e))
    }

    /// Starts the link's thread.
    pub fn start(self) -> std::io::Result<AgentLink> {
        let own_limits = self
            .governor
            .usages()
            .into_iter()
            .map(|u| (u.engine, u.floor_bytes, u.cap_bytes))
            .collect();
        let inner = Arc::new(Inner {
            config: self.config,
            governor: self.governor,
            spill: self.spill,
            purge: self.purge,
            arena_resident: self.arena_resident,
            cache: self.cache,
            outbox: Mutex::new(Vec::new()),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            cache_jobs: Mutex::new(BTreeMap::new()),
            cache_wake: Condvar::new(),
            spill_jobs: Mutex::new(SpillJobs::default()),
            spill_wake: Condvar::new(),
            spill_threads: Mutex::new(Vec::new()),
            live: Mutex::new(None),
            own_limits,
        });
        let cache_thread = match inner.cache.clone() {
            Some(cache) => {
                let run = inner.clone();
                Some(
                    std::thread::Builder::new()
                        .name("nodedb-cache-drop".into())
                        .spawn(move || run.drop_cache_worker(&cache))?,
                )
            }
            None => None,
        };
        let run = inner.clone();
        let thread = match std::thread::Builder::new()
            .name("nodedb-agent-link".into())
            .spawn(move || run.run())
        {
            Ok(t) => t,
            Err(e) => {
                inner.stop_cache_thread();
                if let Some(t) = cache_thread {
                    let _ = t.join();
                }
                return Err(e);
            }
        };
        Ok(AgentLink {
            inner,
            thread: Some(thread),
            cache_thread,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The calling thread's kernel thread id.
pub fn current_tid() -> u32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::gettid() as u32 }
}

impl AgentLink {
    pub fn builder(governor: &MemoryGovernor, config: LinkConfig) -> AgentLinkBuilder {
        AgentLinkBuilder {
            config,
            governor: governor.clone(),
            spill: None,
            purge: None,
            arena_resident: None,
            cache: None,
        }
    }

    /// Registers the calling thread as working for `engine`: the thread
    /// goes into the engine's cgroup (moved by the library itself where
    /// the agent delegated the subtree, else by the agent). Does not wait;
    /// see [`wait_placed`](Self::wait_placed). Returns the thread's id.
    pub fn register_current_thread(&self, engine: EngineId) -> Result<u32, crate::MemError> {
        self.inner.register_current_thread(engine)
    }

    /// Waits until the agent confirmed thread `tid` is in its engine.
    pub fn wait_placed(&self, tid: u32, timeout: Duration) -> bool {
        self.inner.wait_for(timeout, |st| st.placed.contains(&tid))
    }

    /// Waits until the link is connected and welcomed.
    pub fn wait_connected(&self, timeout: Duration) -> bool {
        self.inner.wait_for(timeout, |st| st.stats.connected)
    }

    pub fn stats(&self) -> LinkStats {
        lock(&self.inner.state).stats.clone()
    }

    /// The engine's pressure level as the agent last sent it (from the
    /// kernel's attribution), if it sent one.
    pub fn agent_level(&self, engine: EngineId) -> Option<PressureLevel> {
        lock(&self.inner.state).levels.get(&engine).copied()
    }
}

impl Drop for AgentLink {
    fn drop(&mut self) {
        self.inner.stop_cache_thread();
        self.inner.changed.notify_all();
        // Whatever the agent does (stopped with its socket open, not
        // reading), the link's thread is not left blocked on it.
        if let Some(s) = lock(&self.inner.live).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // A walk under way finishes first (it is bounded by the engine's
        // files; no request waits behind it).
        if let Some(t) = self.cache_thread.take() {
            let _ = t.join();
        }
        // Likewise a spill under way (bounded by the engine's handler).
        let spills = std::mem::take(&mut *lock(&self.inner.spill_threads));
        for t in spills {
            let _ = t.join();
        }
        // No agent, no figure for what the database holds besides (after
        // the link's thread, which could still be applying one).
        self.inner.set_outside(0, None);
    }
}

/// How old the arenas' figures in a report may be. The agent does not act
/// on them (its ladder works from the kernel's attribution): read at
/// every report (20 a second) they cost a merge of every arena's
/// statistics per engine, under the arenas' locks, and, changing with
/// every allocation, made every report new (an unchanged one is not sent).
#[cfg(feature = "jemalloc")]
pub const ARENA_FIGURES_EVERY: Duration = Duration::from_secs(1);

/// The engines' arena resident bytes for the reports: all engines from one
/// refresh of jemalloc's statistics, at most every
/// [`ARENA_FIGURES_EVERY`].
#[cfg(feature = "jemalloc")]
struct ArenaFigures {
    arenas: Arc<crate::arena::EngineArenas>,
    last: Mutex<Option<(Instant, BTreeMap<EngineId, u64>)>>,
}

#[cfg(feature = "jemalloc")]
impl ArenaFigures {
    fn new(arenas: Arc<crate::arena::EngineArenas>) -> Self {
        Self {
            arenas,
            last: Mutex::new(None),
        }
    }

    fn resident(&self, engine: EngineId) -> Option<u64> {
        let mut last = lock(&self.last);
        if last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= ARENA_FIGURES_EVERY)
        {
            // A failed read is not tried again before the next refresh.
            *last = Some((
                Instant::now(),
                self.arenas.resident_by_engine().unwrap_or_default(),
            ));
        }
        last.as_ref()?.1.get(&engine).copied()
    }
}

/// Connects to the agent's socket without blocking on it (an agent whose
/// listen queue is full, stopped say, is a failed attempt, tried again
/// later), and checks the listener's uid.
fn connect(path: &std::path::Path, agent_uid: Option<u32>) -> std::io::Result<UnixStream> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    };
    // SAFETY: a plain zeroed sockaddr_un, filled below within its bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "the socket path holds a NUL byte",
        ));
    }
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!(
                "the socket path is longer than {} bytes",
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; a non-negative result is
    // a descriptor we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un of the size given.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EAGAIN) {
            std::io::Error::new(
                ErrorKind::WouldBlock,
                "the agent is not accepting connections (its listen queue is full)",
            )
        } else {
            e
        });
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    if let Some(want) = agent_uid {
        let uid = peer_uid(&stream)?;
        if uid != want {
            return Err(std::io::Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "the socket's listener runs as uid {uid}, not the agent's uid {want} (LinkConfig::agent_uid)"
                ),
            ));
        }
    }
    Ok(stream)
}

/// The uid of the process at the other end of `stream` (SO_PEERCRED).
fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: a zeroed ucred is valid; getsockopt fills at most `len`.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: as above, on a live socket.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

impl Inner {
    /// Registers the calling thread as one of `engine`'s (see
    /// [`AgentLink::register_current_thread`]).
    fn register_current_thread(&self, engine: EngineId) -> Result<u32, crate::MemError> {
        let name = self
            .name_of(engine)
            .ok_or(crate::MemError::UnknownEngine { engine })?
            .to_owned();
        let tid = current_tid();
        let mut st = lock(&self.state);
        st.threads.insert(tid, name.clone());
        let moved = self.move_self(&st, tid, &name);
        drop(st);
        lock(&self.outbox).push(ToAgent::Thread {
            tid,
            engine: name,
            moved,
        });
        Ok(tid)
    }

    /// The outside figure and the probe that reads it fresh (None: the
    /// agent's figures alone).
    fn set_outside(&self, bytes: u64, probe: Option<crate::OutsideProbe>) {
        self.governor.set_outside_probe(probe);
        self.governor.set_outside_bytes(bytes);
    }

    /// The agent lost for `lost`: the engines return to their own limits
    /// (once per loss, if the agent had steered them).
    fn give_steering_back(&self, lost: Duration) {
        let mut st = lock(&self.state);
        if !st.steered {
            return;
        }
        st.steered = false;
        st.wanted.clear();
        st.levels.clear();
        let mut refused = Vec::new();
        for &(engine, floor, cap) in &self.own_limits {
            if let Err(e) = self.governor.set_limits(engine, floor, cap) {
                refused.push(format!("{engine:?}: {e}"));
            }
        }
        self.set_outside(0, None);
        st.stats.agent_lost += 1;
        st.stats.last_error = Some(if refused.is_empty() {
            format!(
                "the agent was lost for {:.1} s: every engine has its own limits again",
                lost.as_secs_f64()
            )
        } else {
            format!(
                "the agent was lost for {:.1} s: own limits restored but for {}",
                lost.as_secs_f64(),
                refused.join("; ")
            )
        });
        drop(st);
        if let Some(cache) = &self.cache {
            cache.restore_hot_sets(None);
        }
        self.changed.notify_all();
    }

    fn name_of(&self, engine: EngineId) -> Option<&str> {
        self.config
            .engines
            .iter()
            .find(|(_, e)| *e == engine)
            .map(|(n, _)| n.as_str())
    }

    fn id_of(&self, name: &str) -> Option<EngineId> {
        self.config
            .engines
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, e)| *e)
    }

    /// Moves `tid` into the engine's cgroup itself, if the agent said it
    /// may (a delegated subtree) and the kernel agrees.
    fn move_self(&self, st: &State, tid: u32, engine: &str) -> bool {
        st.cgroups
            .get(engine)
            .is_some_and(|dir| std::fs::write(dir.join("cgroup.threads"), tid.to_string()).is_ok())
    }

    fn wait_for(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.state);
        while !done(&st) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Sets `stop` under the worker threads' locks, so none can miss the
    /// wake-up between seeing no stop and starting to wait.
    fn stop_cache_thread(&self) {
        let jobs = lock(&self.cache_jobs);
        let spills = lock(&self.spill_jobs);
        self.stop.store(true, Ordering::Release);
        drop((jobs, spills));
        self.cache_wake.notify_all();
        self.spill_wake.notify_all();
    }

    /// Queues spill work for `engine` (an agent's request for
    /// `request` bytes, or bringing it under its wanted limits), starting
    /// the engine's spill thread if it has none. A request not yet started
    /// is replaced by this one.
    fn queue_spill(self: &Arc<Self>, engine: EngineId, request: Option<u64>) {
        let mut jobs = lock(&self.spill_jobs);
        if self.stopped() {
            return;
        }
        // A job with no request brings the engine under its wanted limits
        // (every job does, once it has spilled what was asked).
        let job = jobs.pending.entry(engine).or_default();
        if let Some(bytes) = request
            && job.request.replace(bytes).is_some()
        {
            job.merged += 1;
        }
        if jobs.workers.insert(engine) {
            let run = self.clone();
            let spawned = std::thread::Builder::new()
                .name(format!(
                    "spill-{}",
                    self.name_of(engine).unwrap_or("engine")
                ))
                .spawn(move || run.spill_worker(engine));
            match spawned {
                Ok(t) => lock(&self.spill_threads).push(t),
                Err(e) => {
                    // No thread: the work is done here, on the link's
                    // thread, as it would have been without one.
                    jobs.workers.remove(&engine);
                    let job = jobs.pending.remove(&engine).unwrap_or_default();
                    drop(jobs);
                    lock(&self.state).stats.last_error =
                        Some(format!("starting a spill thread for {engine:?}: {e}"));
                    super::wake::relaxed_while(|| self.spill_now(engine, job));
                    return;
                }
            }
        }
        drop(jobs);
        self.spill_wake.notify_all();
    }

    /// Applies `engine`'s wanted limits once it holds no more than their
    /// cap (the spill thread and every report turn call this); until then
    /// its cap stays where it was clamped, at what it held when the limits
    /// came. (Lowering the cap further as the engine freed, tried on
    /// 2026-12-04, took the room a `GROUP BY` frees by spilling a run and
    /// needs again for the next: 0.73 of ample against 0.94.) Limits
    /// refused for another reason are dropped, the error noted.
    fn apply_wanted(&self, st: &mut State, engine: EngineId) {
        let Some(&(floor, cap)) = st.wanted.get(&engine) else {
            return;
        };
        let held = self.governor.usage(engine).map_or(0, |u| u.used_bytes);
        if held > cap {
            return;
        }
        st.wanted.remove(&engine);
        match self.governor.set_limits(engine, floor, cap) {
            Ok(()) => st.stats.limit_changes += 1,
            Err(e) => st.stats.last_error = Some(e.to_string()),
        }
    }

    /// One engine's spill thread: its jobs, one at a time.
    fn spill_worker(&self, engine: EngineId) {
        // The engine's own thread, as the agent sees it: what its handler
        // frees (memory the engine's threads faulted in) comes off the
        // engine's count, and the spill files it writes are the engine's
        // page cache. Unregistered, the frees went to `unattributed`,
        // which was clamped at zero while the engine kept the pages: the
        // soak (seed 1) saw the attributed total 5 to 18 MiB above VmRSS.
        let _ = self.register_current_thread(engine);
        loop {
            // Woken at once when a request comes; the handler runs at the
            // thread's ordinary slice.
            super::wake::prompt();
            let job = {
                let mut jobs = lock(&self.spill_jobs);
                loop {
                    if self.stopped() {
                        return;
                    }
                    if let Some(job) = jobs.pending.remove(&engine) {
                        break job;
                    }
                    jobs = self
                        .spill_wake
                        .wait(jobs)
                        .unwrap_or_else(|p| p.into_inner());
                }
            };
            // A handler that panics answers 0 freed; the thread goes on
            // serving the engine (its requests would otherwise pile up
            // unanswered).
            super::wake::relaxed();
            let request = job.request;
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.spill_now(engine, job)
            }));
            // What the handler released on this thread went to its credit;
            // this thread reserves nothing, so the books get it back now
            // (also from a handler that panicked half way).
            self.governor.flush_thread_credit();
            if done.is_err() {
                lock(&self.state).stats.last_error =
                    Some(format!("the spill handler of {engine:?} panicked"));
                self.answer_spill(engine, request, 0);
            }
        }
    }

    /// Carries out one spill job: frees what the agent asked for, or what
    /// the engine holds beyond its wanted cap (whichever is more), applies
    /// the wanted limits if they fit now, and answers the request.
    fn spill_now(&self, engine: EngineId, job: SpillJob) {
        let Some(spill) = &self.spill else {
            return;
        };
        let wanted_cap = lock(&self.state).wanted.get(&engine).map(|w| w.1);
        let over = wanted_cap.map_or(0, |cap| {
            let used = self.governor.usage(engine).map_or(0, |u| u.used_bytes);
            used.saturating_sub(cap)
        });
        let target = job.request.unwrap_or(0).max(over);
        let freed = if target > 0 {
            spill.spill_engines(&[engine], target)
        } else {
            0
        };
        // What the handlers released on this thread went to its credit;
        // this thread reserves nothing, so the books get it back before
        // the limits are weighed.
        self.governor.flush_thread_credit();
        let mut st = lock(&self.state);
        if target > 0 {
            st.stats.spills += 1;
        }
        st.stats.spilled_bytes += freed;
        st.stats.spills_merged += job.merged;
        self.apply_wanted(&mut st, engine);
        drop(st);
        self.changed.notify_all();
        self.answer_spill(engine, job.request, freed);
    }

    /// Answers the agent's spill request for `engine`, if there was one
    /// (a job that only brought the engine under new limits has none).
    fn answer_spill(&self, engine: EngineId, request: Option<u64>, freed_bytes: u64) {
        if let (Some(target_bytes), Some(name)) = (request, self.name_of(engine)) {
            lock(&self.outbox).push(ToAgent::Spilled {
                engine: name.to_owned(),
                target_bytes,
                freed_bytes,
            });
        }
    }

    /// The `drop_cache` thread: one request at a time, answered through
    /// the outbox (the link thread sends it on its next turn; an answer
    /// that outlives its connection goes to the next one, whose agent
    /// counts what was freed).
    fn drop_cache_worker(&self, cache: &EngineCache) {
        loop {
            let job = {
                let mut jobs = lock(&self.cache_jobs);
                loop {
                    if self.stopped() {
                        return;
                    }
                    if let Some(job) = jobs.pop_first() {
                        break job;
                    }
                    jobs = self
                        .cache_wake
                        .wait(jobs)
                        .unwrap_or_else(|p| p.into_inner());
                }
            };
            let (name, target_bytes) = job;
            let dropped = match self.id_of(&name) {
                Some(id) => cache.drop_cold(id, target_bytes).unwrap_or_else(|e| {
                    lock(&self.state).stats.last_error =
                        Some(format!("dropping {name}'s cold cache: {e}"));
                    Dropped::default()
                }),
                None => Dropped::default(),
            };
            lock(&self.state).stats.cache_drops += 1;
            lock(&self.outbox).push(ToAgent::CacheDropped {
                engine: name,
                target_bytes,
                freed_bytes: dropped.freed_bytes,
                files: dropped.files,
            });
            self.changed.notify_all();
        }
    }

    /// Sleeps up to `d`, waking early when the link is dropped.
    fn pause(&self, d: Duration) {
        let st = lock(&self.state);
        let _ = self.changed.wait_timeout_while(st, d, |_| !self.stopped());
    }

    fn run(self: Arc<Self>) {
        // Its work is small: it keeps the short slice.
        lock(&self.state).stats.prompt_wakeups = super::wake::prompt();
        let (min, max) = self.config.backoff;
        let mut backoff = min;
        // Since when no agent has had the link welcomed.
        let mut lost_since: Option<Instant> = None;
        while !self.stopped() {
            match connect(&self.config.socket, self.config.agent_uid) {
                Ok(stream) => {
                    backoff = min;
                    let welcomed_before = lock(&self.state).stats.connects;
                    *lock(&self.live) = stream.try_clone().ok();
                    // Dropped meanwhile: the handle may have come too late
                    // for Drop to shut it down.
                    let outcome = if self.stopped() {
                        Ok(())
                    } else {
                        self.serve(stream)
                    };
                    *lock(&self.live) = None;
                    let mut st = lock(&self.state);
                    st.stats.connected = false;
                    st.placed.clear();
                    if let Err(e) = outcome {
                        st.stats.last_error = Some(e.to_string());
                    }
                    if st.stats.connects > welcomed_before {
                        lost_since = Some(Instant::now());
                    } else {
                        lost_since.get_or_insert_with(Instant::now);
                    }
                    drop(st);
                    self.changed.notify_all();
                }
                Err(e) => {
                    lock(&self.state).stats.last_error = Some(format!(
                        "connecting to {}: {e}",
                        self.config.socket.display()
                    ));
                    lost_since.get_or_insert_with(Instant::now);
                }
            }
            if self.stopped() {
                break;
            }
            if let Some(since) = lost_since
                && since.elapsed() >= self.config.agent_lost_after
            {
                self.give_steering_back(since.elapsed());
            }
            self.pause(backoff);
            backoff = (backoff * 2).min(max);
        }
    }

    /// One connection, until it ends. Err: why it ended.
    fn serve(self: &Arc<Self>, mut stream: UnixStream) -> Result<(), Ended> {
        let hello = ToAgent::Hello {
            version: wire::VERSION,
            database: self.config.database.clone(),
            engines: self
                .governor
                .usages()
                .into_iter()
                .filter_map(|u| {
                    Some(EngineDecl {
                        name: self.name_of(u.engine)?.to_owned(),
                        floor_bytes: u.floor_bytes,
                        cap_bytes: u.cap_bytes,
                    })
                })
                .collect(),
        };
        stream.set_write_timeout(Some(self.config.write_timeout))?;
        stream.write_all(&wire::encode(&hello))?;
        // Threads registered before (or during an earlier connection) and
        // still alive are declared again.
        {
            let mut st = lock(&self.state);
            st.threads
                .retain(|tid, _| std::path::Path::new(&format!("/proc/self/task/{tid}")).exists());
            let mut out = lock(&self.outbox);
            for (tid, engine) in &st.threads {
                if !out
                    .iter()
                    .any(|m| matches!(m, ToAgent::Thread { tid: t, .. } if t == tid))
                {
                    out.push(ToAgent::Thread {
                        tid: *tid,
                        engine: engine.clone(),
                        moved: false,
                    });
                }
            }
        }
        let tick = (self.config.report_interval / 4)
            .clamp(Duration::from_millis(1), Duration::from_millis(20));
        stream.set_read_timeout(Some(tick))?;
        let mut decoder = Decoder::new();
        let mut buf = vec![0u8; 16 * 1024];
        let mut next_report = Instant::now();
        let mut last_report: Option<(ToAgent, Instant)> = None;
        loop {
            if self.stopped() {
                return Ok(());
            }
            match stream.read(&mut buf) {
                Ok(0) => {
                    decoder.finish()?;
                    return Err(Ended::Closed);
                }
                Ok(n) => decoder.push(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            while let Some(msg) = decoder.next_message::<ToLibrary>() {
                match msg {
                    Ok(m) => {
                        if let Some(reply) = self.handle(m)? {
                            stream.write_all(&wire::encode(&reply))?;
                        }
                    }
                    Err(e) if e.is_recoverable() => {
                        lock(&self.state).stats.last_error = Some(e.to_string());
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !lock(&self.state).stats.connected {
                continue; // nothing but the hello until welcomed
            }
            if Instant::now() >= next_report {
                next_report = Instant::now() + self.config.report_interval.min(REPORT_HEARTBEAT);
                // Limits waiting for an engine to come down: applied as
                // soon as it has (it may free on its own, or after its
                // spill returned); its cap stays where it was clamped
                // meanwhile (the agent asks for spills while the engine
                // is over the budget it sent).
                {
                    let mut st = lock(&self.state);
                    let waiting: Vec<EngineId> = st.wanted.keys().copied().collect();
                    for engine in waiting {
                        self.apply_wanted(&mut st, engine);
                    }
                }
                // Books that did not change are not sent again, but for a
                // heartbeat every five seconds (an agent governing fifty
                // processes would otherwise parse a thousand a second).
                let report = self.report();
                if last_report
                    .as_ref()
                    .is_none_or(|(r, at)| *r != report || at.elapsed() >= REPORT_HEARTBEAT)
                {
                    stream.write_all(&wire::encode(&report))?;
                    last_report = Some((report, Instant::now()));
                }
            }
            let out = std::mem::take(&mut *lock(&self.outbox));
            for m in out {
                stream.write_all(&wire::encode(&m))?;
            }
        }
    }

    fn report(&self) -> ToAgent {
        ToAgent::Report {
            engines: self
                .governor
                .usages()
                .into_iter()
                .filter_map(|u| {
                    Some(EngineReport {
                        name: self.name_of(u.engine)?.to_owned(),
                        reserved_bytes: u.used_bytes,
                        rejections: u.rejections,
                        arena_resident_bytes: self
                            .arena_resident
                            .as_ref()
                            .and_then(|f| f(u.engine)),
                        hot_set_bytes: self
                            .cache
                            .as_ref()
                            .map_or(0, |c| c.hot_sets(u.engine).locked_bytes),
                    })
                })
                .collect(),
        }
    }

    /// Carries out one message from the agent; the reply to send, if any.
    fn handle(self: &Arc<Self>, m: ToLibrary) -> Result<Option<ToAgent>, Ended> {
        // An engine this process does not have is the agent's mistake:
        // noted, and the connection goes on.
        let engine = |name: &str| {
            self.id_of(name).ok_or_else(|| {
                lock(&self.state).stats.last_error = Some(format!(
                    "the agent named an engine this process does not have: {name:?}"
                ));
            })
        };
        let reply = match m {
            ToLibrary::Welcome {
                version,
                engine_cgroups,
            } => {
                if version != wire::VERSION {
                    return Err(Ended::Version { agent: version });
                }
                let mut st = lock(&self.state);
                st.stats.connected = true;
                st.stats.connects += 1;
                st.cgroups = engine_cgroups
                    .into_iter()
                    .map(|(n, d)| (n, PathBuf::from(d)))
                    .collect();
                // A new agent names its own file, if it has one; until it
                // sends its figure, the last agent's is not read again.
                st.held = None;
                drop(st);
                self.governor.set_outside_probe(None);
                self.changed.notify_all();
                // Hot sets an Emergency released before a reconnect: the
                // new agent's ladder starts at Normal and would not say so.
                if let Some(cache) = &self.cache {
                    cache.restore_hot_sets(None);
                }
                None
            }
            ToLibrary::HeldFrom(from) => {
                // Opened before the state's lock is taken. Without it the
                // agent's figures alone decide (noted).
                let reader = HeldReader::open(&from);
                let mut st = lock(&self.state);
                match reader {
                    Ok(r) => st.held = Some(Arc::new(r)),
                    Err(e) => {
                        st.held = None;
                        st.stats.last_error = Some(e.to_string());
                    }
                }
                None
            }
            ToLibrary::ThreadPlaced { tid, .. } => {
                lock(&self.state).placed.insert(tid);
                self.changed.notify_all();
                None
            }
            ToLibrary::Limits {
                engine: name,
                floor_bytes,
                cap_bytes,
                hot_set_bytes,
            } => {
                let Ok(id) = engine(&name) else {
                    return Ok(None);
                };
                if let (Some(cache), Some(bound)) = (&self.cache, hot_set_bytes) {
                    // The configuration's bound: ranges already locked stay,
                    // new ones must fit it.
                    let _ = cache.set_hot_set_limit(id, bound);
                }
                let mut st = lock(&self.state);
                st.steered = true;
                // These replace any limits still waiting for a spill.
                st.wanted.remove(&id);
                let mut result = self.governor.set_limits(id, floor_bytes, cap_bytes);
                let used = self.governor.usage(id).map_or(0, |u| u.used_bytes);
                let mut spill = false;
                if result.is_err() && used > cap_bytes {
                    // Below what the engine holds: its cap is what it
                    // holds, so every new reservation is refused, and its
                    // spill thread brings it down to the new cap, which
                    // applies then.
                    result = self.governor.set_limits(id, floor_bytes.min(used), used);
                    if result.is_ok() && self.spill.is_some() {
                        st.wanted.insert(id, (floor_bytes, cap_bytes));
                        spill = true;
                    }
                }
                match result {
                    Ok(()) => st.stats.limit_changes += 1,
                    Err(e) => st.stats.last_error = Some(e.to_string()),
                }
                drop(st);
                if spill {
                    self.queue_spill(id, None);
                }
                None
            }
            ToLibrary::Pressure {
                engine: name,
                level,
            } => {
                if let Ok(id) = engine(&name) {
                    if let Some(cache) = &self.cache {
                        match level {
                            PressureLevel::Emergency => {
                                cache.release_hot_sets(Some(id));
                            }
                            PressureLevel::Normal | PressureLevel::Warning => {
                                cache.restore_hot_sets(Some(id));
                            }
                            PressureLevel::Critical => {}
                        }
                    }
                    let mut st = lock(&self.state);
                    st.levels.insert(id, level);
                    st.steered = true;
                    drop(st);
                    self.changed.notify_all();
                }
                None
            }
            ToLibrary::DropCache {
                engine: name,
                target_bytes,
            } => {
                if engine(&name).is_err() {
                    return Ok(None);
                }
                if self.cache.is_some() {
                    // Served by the drop_cache thread.
                    lock(&self.cache_jobs).insert(name, target_bytes);
                    self.cache_wake.notify_one();
                    None
                } else {
                    // No page cache of its own to drop: answered at once.
                    lock(&self.state).stats.cache_drops += 1;
                    Some(ToAgent::CacheDropped {
                        engine: name,
                        target_bytes,
                        freed_bytes: 0,
                        files: 0,
                    })
                }
            }
            ToLibrary::Spill {
                engine: name,
                target_bytes,
            } => {
                let Ok(id) = engine(&name) else {
                    return Ok(None);
                };
                if self.spill.is_some() {
                    // Answered by the engine's spill thread.
                    self.queue_spill(id, Some(target_bytes));
                    None
                } else {
                    // Nothing to spill with: answered at once.
                    lock(&self.state).stats.spills += 1;
                    Some(ToAgent::Spilled {
                        engine: name,
                        target_bytes,
                        freed_bytes: 0,
                    })
                }
            }
            ToLibrary::Outside {
                bytes,
                ceiling_bytes,
            } => {
                let held = {
                    let mut st = lock(&self.state);
                    st.steered = true;
                    st.held.clone()
                };
                // The room is the smaller of what the library's own
                // ceiling leaves its books and what the agent's leaves
                // them and the rest: ceiling - books - x, x this.
                let x = move |outside: u64, own: u64| {
                    outside.saturating_add(own).saturating_sub(ceiling_bytes)
                };
                // Near the ceiling the same figure is read fresh: what is
                // held now less the books now (u64::MAX: taken back).
                let probe = held.filter(|_| ceiling_bytes != u64::MAX).map(|held| {
                    Arc::new(move |books: u64, own: u64| {
                        Some(x(held.read()?.saturating_sub(books), own))
                    }) as crate::OutsideProbe
                });
                let bytes = x(bytes, self.governor.ceiling_bytes());
                self.set_outside(bytes, probe);
                None
            }
            ToLibrary::Purge { engine: name } => {
                let Ok(id) = engine(&name) else {
                    return Ok(None);
                };
                // The engine's work, at the thread's ordinary slice.
                let (before, after) = super::wake::relaxed_while(|| {
                    self.purge.as_ref().and_then(|f| f(id)).unwrap_or((0, 0))
                });
                lock(&self.state).stats.purges += 1;
                Some(ToAgent::Purged {
                    engine: name,
                    before_bytes: before,
                    after_bytes: after,
                })
            }
            ToLibrary::Error { message } => {
                lock(&self.state).stats.last_error = Some(message);
                None
            }
        };
        Ok(reply)
    }
}
