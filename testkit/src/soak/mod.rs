//! `cargo xtask soak`: the library, the agent and the kernel driven
//! together through random demand, in the spirit of Velox's memory
//! arbitration fuzzer. A seed gives a scenario (2-6 engines, budgets,
//! floors, thresholds, a spill target that fills and fails 2% of its
//! writes) and a sequence of steps (reservations, growth, shrinking,
//! memory touched without reserving, file I/O, threads that come and go,
//! the agent killed and restarted, reloaded with a good or a bad
//! configuration, the library reconnecting); after every step the
//! invariants are checked, and at the first violation the soak stops and
//! says the seed, the step and the state.

pub mod engine;
pub mod plan;
pub mod target;

use std::{
    collections::{BTreeMap, VecDeque},
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::AtomicU64,
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail};
use nodedb_governor::{
    Budget, EngineId, HandlerRegistration, MemoryGovernor, PressureThresholds, SpillConfig,
    SpillController, ThresholdsHandle,
    control::{AgentLink, LinkConfig},
};
use nodedb_governor_demo::governed::{admin_status, wait_welcomed};
use serde_json::{Value, json};

use crate::harness::Agent;
use engine::{EngineSide, StepError};
use plan::{Plan, Reload, Scenario, Step};
use target::SpillTarget;

/// A step that takes longer than this hangs.
const STEP_BOUND: Duration = Duration::from_secs(30);
/// How far the kernel's attribution (engines + unattributed) may be from
/// VmRSS while the process is still: the accuracy test's 2% of VmRSS,
/// and at least 4 MiB (the per-CPU counters' batches, the agent's tick).
const ATTRIBUTION_SLACK: u64 = 4 << 20;

pub struct Options {
    pub seed: u64,
    pub duration: Duration,
    /// A directory on a disk for the engines' file I/O (and the tmpfs's
    /// mount point).
    pub scratch: PathBuf,
    /// The kernel's attribution is compared with VmRSS every this many
    /// steps (each comparison waits for the agent's ticks: 1 makes a soak
    /// slow, and finds the first step that moved it).
    pub attribution_every: u64,
}

/// What a soak did, and what it checked.
#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub seconds: f64,
    pub engines: Vec<String>,
    pub ceiling_bytes: u64,
    /// Steps run, by kind (the agent's events among them).
    pub events: BTreeMap<String, u64>,
    /// Invariants checked, by invariant.
    pub checks: BTreeMap<String, u64>,
    /// Per engine: refusals, spills and what the faults did to them.
    pub per_engine: BTreeMap<String, engine::EngineCounters>,
    /// Attribution checks left for later because memory moved while the
    /// agent read it (a spill under way).
    pub attribution_moving: u64,
    /// The largest |engines + unattributed - VmRSS| seen since the last
    /// agent restart (or the start), bytes.
    pub attribution_worst_bytes: u64,
    /// What each agent restart moved engines + unattributed - VmRSS by,
    /// bytes: a restarted agent attributes what changed while no program
    /// ran to the engine of the next event (README, "Restarts"), and an
    /// engine's count cannot go below zero, so the total can move. Each
    /// restart starts a new baseline for the comparison.
    pub restart_shifts_bytes: Vec<i64>,
    /// The largest |attributed - held| of one engine at a comparison, bytes
    /// (held: what its holdings map; its threads' stacks besides). Not an
    /// invariant: releases are charged to a 2 MiB region's last faulter,
    /// and small mappings of several engines share regions.
    pub engine_attribution_worst_bytes: u64,
    pub violation: Option<String>,
}

enum Job {
    Step(Step),
    Register,
    FreeAll,
}

type Outcome = Result<(), StepError>;

struct Worker {
    jobs: Sender<Job>,
    done: Receiver<Outcome>,
    thread: Option<JoinHandle<()>>,
}

type SharedLink = Arc<RwLock<Option<AgentLink>>>;

fn read_link(link: &SharedLink) -> std::sync::RwLockReadGuard<'_, Option<AgentLink>> {
    link.read().unwrap_or_else(|p| p.into_inner())
}

/// Registers the calling thread as one of `engine`'s and waits until the
/// agent placed it.
fn register(link: &SharedLink, engine: EngineId) -> Outcome {
    let link = read_link(link);
    let Some(link) = link.as_ref() else {
        return Ok(());
    };
    let tid = link.register_current_thread(engine)?;
    if !link.wait_placed(tid, Duration::from_secs(20)) {
        return Err(StepError::Other(format!(
            "the agent did not place {engine:?} thread {tid} within 20 s: {:?}",
            link.stats()
        )));
    }
    Ok(())
}

fn work(
    side: &EngineSide,
    link: &SharedLink,
    governor: &MemoryGovernor,
    files: &Path,
    job: Job,
) -> Outcome {
    let r = match job {
        Job::Register => register(link, side.id),
        Job::FreeAll => {
            side.free_all();
            Ok(())
        }
        Job::Step(step) => match step {
            Step::Reserve { bytes, .. } => side.reserve(bytes),
            Step::Grow { pick, bytes, .. } => side.grow(pick, bytes),
            Step::Shrink { pick, bytes, .. } => side.shrink(pick, bytes),
            Step::Release { pick, .. } => {
                side.release(pick);
                Ok(())
            }
            Step::Touch { bytes, .. } => side.touch(bytes),
            Step::FileIo { bytes, .. } => side.file_io(files, bytes),
            Step::Restore { .. } => side.restore(),
            Step::Thread { bytes, .. } => std::thread::scope(|s| {
                s.spawn(|| -> Outcome {
                    register(link, side.id)?;
                    let r = governor.try_reserve(side.id, bytes)?;
                    let mut map = memmap2::MmapMut::map_anon(bytes as usize)?;
                    for page in map.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    drop(map);
                    drop(r);
                    Ok(())
                })
                .join()
                .unwrap_or_else(|_| Err(StepError::Other("the short-lived thread panicked".into())))
            }),
            other => Err(StepError::Other(format!(
                "{other:?} is not an engine's step"
            ))),
        },
    };
    governor.flush_thread_credit();
    r
}

impl Worker {
    fn start(
        side: Arc<EngineSide>,
        link: SharedLink,
        governor: MemoryGovernor,
        files: PathBuf,
    ) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("soak-{}", side.name))
            .spawn(move || {
                for job in rx {
                    let r = work(&side, &link, &governor, &files, job);
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            })
            .expect("spawning an engine thread");
        Self {
            jobs,
            done,
            thread: Some(thread),
        }
    }

    fn run(&self, job: Job) -> Result<Outcome, String> {
        self.jobs
            .send(job)
            .map_err(|_| "the engine thread is gone (it panicked)".to_owned())?;
        match self.done.recv_timeout(STEP_BOUND) {
            Ok(r) => Ok(r),
            Err(RecvTimeoutError::Timeout) => Err(format!("hung: no answer within {STEP_BOUND:?}")),
            Err(RecvTimeoutError::Disconnected) => Err("the engine thread panicked".to_owned()),
        }
    }
}

/// The agent's configuration for `scenario` with `ceiling` and
/// `budgets` (budget, floor; engine order).
fn config_body(scenario: &Scenario, ceiling: u64, budgets: &[(u64, u64)]) -> String {
    let t = scenario.thresholds;
    let mut s = format!(
        "ceiling = {ceiling}\n[thresholds]\nwarning = {:.3}\ncritical = {:.3}\nemergency = {:.3}\nrestore = {:.3}\n",
        t.warning, t.critical, t.emergency, t.restore
    );
    for (e, (budget, floor)) in scenario.engines.iter().zip(budgets) {
        s.push_str(&format!(
            "[[engine]]\nname = \"{}\"\nbudget = {budget}\nfloor = {floor}\n",
            e.name
        ));
    }
    s
}

struct Soak {
    plan: Plan,
    agent: Agent,
    governor: MemoryGovernor,
    link: SharedLink,
    spill: Arc<SpillController>,
    sides: Vec<Arc<EngineSide>>,
    workers: Vec<Worker>,
    /// The configuration in force (ceiling, budgets), rewritten after a
    /// refused reload so that a restart finds a good one.
    config: String,
    /// Its ceiling and budgets (budget, floor; engine order).
    in_force: (u64, Vec<(u64, u64)>),
    report: Report,
    recent: VecDeque<String>,
    oom_kills_at_start: u64,
    /// `/proc/self/cgroup` before the agent adopted this process.
    cgroups_at_start: String,
    /// Attribution is not compared until then (the agent restarting, the
    /// library reconnecting).
    settle_until: Instant,
    /// engines + unattributed - VmRSS as of the last restart (0 before
    /// any), and whether a restart since wants it taken again.
    attribution_base: i64,
    rebase: bool,
    _registrations: Vec<HandlerRegistration>,
}

impl Soak {
    fn engines(&self) -> Vec<(&str, EngineId)> {
        self.plan
            .scenario
            .engines
            .iter()
            .map(|e| (e.name.as_str(), e.id))
            .collect()
    }

    fn connect(&self) -> anyhow::Result<AgentLink> {
        let engines = self.engines();
        let link = AgentLink::builder(
            &self.governor,
            LinkConfig::new(&self.agent.control, &self.agent.database, &engines),
        )
        .spill_controller(self.spill.clone())
        .start()?;
        wait_welcomed(&link, &self.agent.control, engines.len())?;
        Ok(link)
    }

    fn write_config(&self, body: &str) -> anyhow::Result<()> {
        std::fs::write(
            self.agent.config_path(),
            format!(
                "database = \"{}\"\nrun_dir = \"{}\"\n{body}",
                self.agent.database,
                self.agent.dir().path().display()
            ),
        )
        .context("writing the agent's configuration")
    }

    /// SIGHUP with `body`; waits for the agent to say how it went (its
    /// log from where it was before: reading all of an hour's log at every
    /// poll would be the soak's own hang). Ok(None): reloaded; Ok(Some(
    /// line)): refused, the agent's line saying why.
    fn reload(&mut self, body: &str) -> anyhow::Result<Option<String>> {
        use std::io::{Read, Seek};
        let path = self.agent.dir().path().join("agent.log");
        let from = std::fs::metadata(&path).map_or(0, |m| m.len());
        self.write_config(body)?;
        self.agent.signal(libc::SIGHUP);
        let deadline = Instant::now() + STEP_BOUND;
        let mut seen = String::new();
        loop {
            let mut f = std::fs::File::open(&path)?;
            f.seek(std::io::SeekFrom::Start(from))?;
            seen.clear();
            f.read_to_string(&mut seen)?;
            if seen.contains("SIGHUP: configuration reloaded") {
                return Ok(None);
            }
            if let Some(line) = seen.lines().find(|l| l.contains("configuration refused")) {
                return Ok(Some(line.to_owned()));
            }
            if Instant::now() > deadline {
                let tail: Vec<&str> = seen.lines().rev().take(5).collect();
                bail!(
                    "the agent said neither that it reloaded nor that it refused within {STEP_BOUND:?} of a SIGHUP; its last lines: {tail:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn status(&self) -> anyhow::Result<Value> {
        admin_status(&self.agent.admin).ok_or_else(|| anyhow!("the agent does not answer `status`"))
    }

    fn run_step(&mut self, step: &Step) -> anyhow::Result<()> {
        let engine = match step {
            Step::Reserve { engine, .. }
            | Step::Grow { engine, .. }
            | Step::Shrink { engine, .. }
            | Step::Release { engine, .. }
            | Step::Touch { engine, .. }
            | Step::FileIo { engine, .. }
            | Step::Restore { engine }
            | Step::Thread { engine, .. } => Some(*engine),
            _ => None,
        };
        if let Some(e) = engine {
            return match self.workers[e].run(Job::Step(step.clone())) {
                Err(hang) => bail!("{}: {hang}", self.sides[e].name),
                Ok(Ok(()) | Err(StepError::Refused(_) | StepError::Fault(_))) => Ok(()),
                Ok(Err(StepError::Other(e))) => {
                    bail!("an error that is neither a MemError nor an injected fault: {e}")
                }
            };
        }
        match step {
            Step::KillAgent => {
                let connects = read_link(&self.link).as_ref().map(|l| l.stats().connects);
                self.agent.kill();
                // Started by this process, the agent would be born in the
                // database's cgroups (as a service manager would not start
                // it) and charge its start to them: it starts where the
                // soak began.
                let home = cgroup_procs(&self.cgroups_at_start);
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    self.agent.restart_in(&home)
                }))
                .map_err(|p| {
                    anyhow!(
                        "the agent did not start again: {:?}",
                        p.downcast_ref::<String>()
                    )
                })?;
                // The library finds the new agent on its own.
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let now = read_link(&self.link)
                        .as_ref()
                        .map(|l| (l.stats().connects, l.stats().connected));
                    if let (Some(before), Some((after, true))) = (connects, now)
                        && after > before
                    {
                        break;
                    }
                    if Instant::now() > deadline {
                        bail!(
                            "the library did not reconnect within 60 s of the agent's restart: {now:?}"
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                self.settle_until = Instant::now() + Duration::from_secs(2);
                self.rebase = true;
            }
            Step::Reload(Reload::Valid { ceiling, budgets }) => {
                let body = config_body(&self.plan.scenario, *ceiling, budgets);
                let link = self.link.clone();
                let heard = move || {
                    read_link(&link)
                        .as_ref()
                        .map_or(0, |l| l.stats().limit_changes)
                };
                let before = heard();
                match self.reload(&body)? {
                    None => {
                        self.config = body;
                        self.in_force = (*ceiling, budgets.clone());
                        // The engines carry on once the library has heard
                        // (the new room comes first, the limits after it),
                        // as an engine only learns of a new configuration
                        // from its library.
                        let deadline = Instant::now() + STEP_BOUND;
                        while heard() == before {
                            if Instant::now() > deadline {
                                bail!(
                                    "the library heard no new limits within {STEP_BOUND:?} of a reload"
                                );
                            }
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                    // A ceiling below what the database holds: refused
                    // whole, as the README says, by the agent (beyond the
                    // new ceiling's Emergency mark) or by the kernel
                    // (cgroup v1 answers EBUSY when it cannot reclaim down
                    // to it); the old configuration stays.
                    Some(line)
                        if line.contains("would leave no room")
                            || line.contains("writing") && line.contains("memory.") =>
                    {
                        *self
                            .report
                            .events
                            .entry("agent_sighup_refused_below_held".into())
                            .or_default() += 1;
                        let config = self.config.clone();
                        self.write_config(&config)?;
                    }
                    Some(line) => bail!("a valid configuration was refused: {line}"),
                }
            }
            Step::Reload(Reload::FloorAboveBudget { engine }) => {
                let before = self.status()?["ceiling"]["limit_bytes"].clone();
                let (ceiling, mut budgets) = self.in_force.clone();
                budgets[*engine].1 = budgets[*engine].0 + 4096;
                let bad = config_body(&self.plan.scenario, ceiling, &budgets);
                if self.reload(&bad)?.is_none() {
                    bail!("the agent took a configuration with a floor above its budget");
                }
                if let Ok(Some(st)) = self.agent_exit() {
                    bail!("the agent exited on a bad configuration: {st}");
                }
                let after = self.status()?["ceiling"]["limit_bytes"].clone();
                if after != before {
                    bail!("a refused configuration moved the ceiling: {before} -> {after}");
                }
                let config = self.config.clone();
                self.write_config(&config)?;
            }
            Step::Reconnect => {
                let mut link = self.link.write().unwrap_or_else(|p| p.into_inner());
                drop(link.take());
                *link = Some(self.connect()?);
                drop(link);
                for (w, side) in self.workers.iter().zip(&self.sides) {
                    match w.run(Job::Register) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => bail!("{} registering again: {e:?}", side.name),
                        Err(hang) => bail!("{} registering again: {hang}", side.name),
                    }
                }
                self.settle_until = Instant::now() + Duration::from_secs(1);
            }
            _ => unreachable!("engine steps returned above"),
        }
        Ok(())
    }

    fn agent_exit(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.agent.exit_within(Duration::ZERO))
    }

    /// The books: each engine's equal to what it holds reserved, none
    /// above its cap in force, all of them within the ceiling.
    fn check_books(&mut self) -> anyhow::Result<()> {
        let ceiling = self.governor.ceiling_bytes();
        for side in &self.sides {
            if let Some(broken) = side.broken.lock().unwrap_or_else(|p| p.into_inner()).take() {
                bail!("{}: {broken}", side.name);
            }
        }
        // Every engine's holdings locked (in order; a spill takes one):
        // nothing moves the books while they are read.
        let held: Vec<_> = self.sides.iter().map(|s| s.holdings()).collect();
        let usages = self.governor.usages();
        let books_total = self.governor.total_bytes();
        let mut total = 0;
        for (side, held) in self.sides.iter().zip(&held) {
            let usage = usages
                .iter()
                .find(|u| u.engine == side.id)
                .ok_or_else(|| anyhow!("{}: not in the governor's books", side.name))?;
            let live: u64 = held.iter().map(|h| h.reserved()).sum();
            if usage.used_bytes != live {
                bail!(
                    "{}: the books say {} bytes, its live reservations hold {live}",
                    side.name,
                    usage.used_bytes
                );
            }
            if usage.used_bytes > usage.cap_bytes {
                bail!(
                    "{}: {} bytes reserved, above its cap in force ({})",
                    side.name,
                    usage.used_bytes,
                    usage.cap_bytes
                );
            }
            total += usage.used_bytes;
        }
        drop(held);
        if total > ceiling || books_total != total {
            bail!("the books' total is {books_total} (engines {total}), the ceiling {ceiling}");
        }
        *self
            .report
            .checks
            .entry("books_equal_live_reservations".into())
            .or_default() += 1;
        *self
            .report
            .checks
            .entry("books_within_caps_and_ceiling".into())
            .or_default() += 1;
        Ok(())
    }

    /// The kernel's side: no OOM kill in the database's cgroup; engines +
    /// unattributed = VmRSS within the bound, read while nothing moves.
    fn check_kernel(&mut self) -> anyhow::Result<()> {
        let status = self.status()?;
        let oom = status["ceiling"]["events"]["oom_kill"]
            .as_u64()
            .unwrap_or(0);
        if oom > self.oom_kills_at_start {
            bail!(
                "{} OOM kill(s) in the database's cgroup",
                oom - self.oom_kills_at_start
            );
        }
        *self.report.checks.entry("no_oom_kill".into()).or_default() += 1;
        if Instant::now() < self.settle_until {
            return Ok(());
        }
        let pid = std::process::id();
        for _ in 0..5 {
            let spills = self.spill_count();
            let rss_before = crate::procfs::vm_rss_bytes();
            // Two of the agent's ticks, so its reading is after the step.
            std::thread::sleep(Duration::from_millis(60));
            let status = self.status()?;
            let rss = crate::procfs::vm_rss_bytes();
            if spills != self.spill_count() || rss.abs_diff(rss_before) > ATTRIBUTION_SLACK {
                self.report.attribution_moving += 1;
                continue;
            }
            let Some(p) = status["processes"]
                .as_array()
                .and_then(|v| v.iter().find(|p| p["pid"] == pid))
            else {
                bail!("the agent does not list this process ({pid})");
            };
            let engines: u64 = p["engines"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|e| e["resident_bytes"].as_u64())
                        .sum()
                })
                .unwrap_or(0);
            let sum = engines + p["unattributed"]["resident_bytes"].as_u64().unwrap_or(0);
            // VmRSS as the agent read it at the same tick as its counters
            // (this process's own reading, if the agent gave none).
            let rss = p["vm_rss_bytes"].as_u64().unwrap_or(rss);
            let signed = sum as i64 - rss as i64;
            if self.rebase {
                self.rebase = false;
                self.report
                    .restart_shifts_bytes
                    .push(signed - self.attribution_base);
                self.attribution_base = signed;
                return Ok(());
            }
            let off = signed.abs_diff(self.attribution_base);
            self.report.attribution_worst_bytes = self.report.attribution_worst_bytes.max(off);
            if off > (rss / 50).max(ATTRIBUTION_SLACK) {
                bail!(
                    "the kernel attributes {sum} bytes (engines {engines}), VmRSS is {rss}: {signed} apart ({} since the last agent restart), more than 2% or 4 MiB; {}",
                    off,
                    p
                );
            }
            for side in &self.sides {
                let held: u64 = side.holdings().iter().map(|h| h.bytes()).sum();
                let got = p["engines"][&side.name]["resident_bytes"]
                    .as_u64()
                    .unwrap_or(0);
                self.report.engine_attribution_worst_bytes = self
                    .report
                    .engine_attribution_worst_bytes
                    .max(held.abs_diff(got));
            }
            *self
                .report
                .checks
                .entry("attribution_matches_vmrss".into())
                .or_default() += 1;
            return Ok(());
        }
        Ok(())
    }

    fn spill_count(&self) -> u64 {
        self.sides.iter().map(|s| s.counters().spills).sum()
    }

    fn state(&self) -> Value {
        let engines: Vec<Value> = self
            .sides
            .iter()
            .map(|s| {
                let u = self.governor.usage(s.id).ok();
                json!({
                    "engine": s.name,
                    "used_bytes": u.as_ref().map(|u| u.used_bytes),
                    "cap_bytes": u.as_ref().map(|u| u.cap_bytes),
                    "holdings": s.holdings().len(),
                    "holding_bytes": s.holdings().iter().map(|h| h.bytes()).sum::<u64>(),
                    "counters": s.counters(),
                })
            })
            .collect();
        json!({
            "engines": engines,
            "ceiling_bytes": self.governor.ceiling_bytes(),
            "link": read_link(&self.link).as_ref().map(|l| format!("{:?}", l.stats())),
            "recent_steps": self.recent,
            "config": self.config,
        })
    }

    /// Everything freed: the books, the agent's copy of them and the
    /// untracked count back to zero.
    fn free_everything(&mut self) -> anyhow::Result<()> {
        for (w, side) in self.workers.iter().zip(&self.sides) {
            match w.run(Job::FreeAll) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => bail!("{} freeing everything: {e:?}", side.name),
                Err(hang) => bail!("{} freeing everything: {hang}", side.name),
            }
        }
        self.check_books()?;
        if let Some(side) = self.sides.first()
            && side.untracked_bytes() != 0
        {
            bail!(
                "{} bytes still counted as touched without reserving after everything was freed",
                side.untracked_bytes()
            );
        }
        for side in &self.sides {
            let u = self.governor.usage(side.id)?;
            if u.used_bytes != 0 {
                bail!(
                    "{}: {} bytes still on the books after everything was freed",
                    side.name,
                    u.used_bytes
                );
            }
        }
        let pid = std::process::id();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status()?;
            let reserved: u64 = status["clients"]
                .as_array()
                .and_then(|v| v.iter().find(|c| c["pid"] == pid))
                .and_then(|c| c["engines"].as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|e| e["reserved_bytes"].as_u64())
                        .sum()
                })
                .unwrap_or(u64::MAX);
            if reserved == 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent still counts {reserved} bytes reserved by this process 10 s after it freed everything"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        *self
            .report
            .checks
            .entry("counters_zero_after_freeing".into())
            .or_default() += 1;
        Ok(())
    }
}

/// The `cgroup.procs` files of the cgroups a `/proc/<pid>/cgroup` text
/// names (v1 hierarchies mounted under /sys/fs/cgroup/<controllers>, v2 at
/// /sys/fs/cgroup or /sys/fs/cgroup/unified), those that exist.
fn cgroup_procs(cgroups: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut procs = Vec::new();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let path = path.trim_start_matches('/');
        let dirs: Vec<PathBuf> = if controllers.is_empty() {
            vec![root.join("unified").join(path), root.join(path)]
        } else {
            vec![
                root.join(controllers.trim_start_matches("name="))
                    .join(path),
            ]
        };
        if let Some(file) = dirs
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .find(|f| f.exists())
        {
            procs.push(file);
        }
    }
    procs
}

/// Runs a soak; `Err` is a setup failure, a violation is in the report.
pub fn run(opts: &Options) -> anyhow::Result<Report> {
    let cgroups_at_start = std::fs::read_to_string("/proc/self/cgroup")?;
    let plan = Plan::new(opts.seed);
    let scenario = plan.scenario.clone();
    eprintln!("soak: seed {} scenario {scenario:?}", opts.seed);
    let budgets: Vec<(u64, u64)> = scenario
        .engines
        .iter()
        .map(|e| (e.budget, e.floor))
        .collect();
    let config = config_body(&scenario, scenario.ceiling, &budgets);
    let agent = std::panic::catch_unwind(|| Agent::start("nodedb-soak", &config))
        .map_err(|_| anyhow!("the agent did not start"))?;
    let files = opts.scratch.join(format!("files-{}", opts.seed));
    std::fs::create_dir_all(&files)?;
    let target = Arc::new(SpillTarget::mount(
        &opts.scratch.join(format!("spill-{}", opts.seed)),
        scenario.spill_tmpfs_bytes,
        scenario.write_failures_per_mille,
        opts.seed ^ 0x5ce1_1ed0,
    )?);
    let mut budget = Budget::builder(scenario.ceiling);
    for e in &scenario.engines {
        budget = budget.engine(e.id, e.floor, e.budget);
    }
    let t = scenario.thresholds;
    let governor = MemoryGovernor::with_thresholds(
        budget.build()?,
        ThresholdsHandle::new(PressureThresholds {
            warning: t.warning,
            critical: t.critical,
            emergency: t.emergency,
        })?,
    );
    let spill = Arc::new(SpillController::new(SpillConfig::default())?);
    let untracked = Arc::new(AtomicU64::new(0));
    let sides: Vec<Arc<EngineSide>> = scenario
        .engines
        .iter()
        .map(|e| {
            Arc::new(EngineSide::new(
                e.id,
                &e.name,
                governor.clone(),
                target.clone(),
                untracked.clone(),
                scenario.untracked_limit,
            ))
        })
        .collect();
    let registrations = sides
        .iter()
        .map(|s| spill.register(s.id, s.clone()))
        .collect();
    let link: SharedLink = Arc::new(RwLock::new(None));
    let workers = sides
        .iter()
        .map(|s| Worker::start(s.clone(), link.clone(), governor.clone(), files.clone()))
        .collect();
    let mut soak = Soak {
        plan,
        agent,
        governor,
        link,
        spill,
        sides,
        workers,
        config,
        in_force: (scenario.ceiling, budgets),
        report: Report {
            seed: opts.seed,
            engines: scenario.engines.iter().map(|e| e.name.clone()).collect(),
            ceiling_bytes: scenario.ceiling,
            ..Report::default()
        },
        recent: VecDeque::new(),
        oom_kills_at_start: 0,
        cgroups_at_start,
        settle_until: Instant::now(),
        attribution_base: 0,
        rebase: false,
        _registrations: registrations,
    };
    *soak.link.write().unwrap_or_else(|p| p.into_inner()) = Some(soak.connect()?);
    for (w, side) in soak.workers.iter().zip(&soak.sides) {
        match w.run(Job::Register) {
            Ok(Ok(())) => {}
            other => bail!("registering {}: {other:?}", side.name),
        }
    }
    soak.oom_kills_at_start = soak.status()?["ceiling"]["events"]["oom_kill"]
        .as_u64()
        .unwrap_or(0);
    // Every step, written before it runs: what a soak the kernel killed
    // (an OOM kill takes the report with it) was doing.
    let trail_path = opts.scratch.join(format!("steps-{}.log", opts.seed));
    let mut trail = std::io::LineWriter::new(std::fs::File::create(&trail_path)?);
    eprintln!("soak: steps written to {}", trail_path.display());
    let started = Instant::now();
    let result = (|| -> anyhow::Result<()> {
        while started.elapsed() < opts.duration {
            let step = soak.plan.next_step();
            soak.report.steps += 1;
            let n = soak.report.steps;
            {
                use std::io::Write;
                // With the library's view as the step starts: its books,
                // what it takes as held outside them, its ceiling.
                writeln!(
                    trail,
                    "{n} {:.3}s books {} outside {} ceiling {} {step:?}",
                    started.elapsed().as_secs_f64(),
                    soak.governor.total_bytes() >> 20,
                    soak.governor.outside_bytes() >> 20,
                    soak.governor.ceiling_bytes() >> 20,
                )?;
            }
            soak.recent.push_back(format!("{n}: {step:?}"));
            if soak.recent.len() > 20 {
                soak.recent.pop_front();
            }
            *soak.report.events.entry(step.kind().into()).or_default() += 1;
            soak.run_step(&step)
                .and_then(|()| soak.check_books())
                .and_then(|()| {
                    if n.is_multiple_of(opts.attribution_every.max(1)) {
                        soak.check_kernel()
                    } else {
                        Ok(())
                    }
                })
                .with_context(|| format!("seed {} step {n} ({})", opts.seed, step.kind()))?;
            *soak.report.checks.entry("step_bounded".into()).or_default() += 1;
        }
        soak.free_everything().with_context(|| {
            format!(
                "seed {} after step {}: freeing everything",
                opts.seed, soak.report.steps
            )
        })?;
        soak.check_kernel()
            .with_context(|| format!("seed {} after freeing everything", opts.seed))
    })();
    if let Err(e) = result {
        // The agent's side of it, kept (its directory goes with it).
        let kept = opts.scratch.join(format!("agent-{}.log", opts.seed));
        let _ = std::fs::copy(soak.agent.dir().path().join("agent.log"), &kept);
        soak.report.violation = Some(format!(
            "{e:#}\nthe agent's log: {}\nstate: {:#}",
            kept.display(),
            soak.state()
        ));
    }
    soak.report.seconds = started.elapsed().as_secs_f64();
    soak.report.per_engine = soak
        .sides
        .iter()
        .map(|s| (s.name.clone(), s.counters()))
        .collect();
    // Engine threads stop, the link goes, then the agent (dropped last).
    for w in &mut soak.workers {
        let (jobs, _) = mpsc::channel();
        drop(std::mem::replace(&mut w.jobs, jobs));
        if let Some(t) = w.thread.take() {
            let _ = t.join();
        }
    }
    for side in &soak.sides {
        side.free_all();
    }
    drop(soak.link.write().unwrap_or_else(|p| p.into_inner()).take());
    let _ = std::fs::remove_dir_all(&files);
    Ok(soak.report)
}
