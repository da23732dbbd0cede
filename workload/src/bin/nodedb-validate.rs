//! The validation harness: runs `nodedb-workload` under a fresh agent on a
//! configuration's ceiling and budgets, in one or more modes:
//!
//! - `governed`: the agent enforces;
//! - `ungoverned`: the agent only observes (`enforce = false`), with the
//!   same ceiling (`memory.max`, or the v1 limit): the problem, measured
//!   the same way;
//! - `ample`: the agent only observes, and the ceiling is 16 times larger:
//!   what each engine takes when nothing holds it back, against its
//!   budget;
//! - `roomy`: the agent enforces, with the ample run's ceiling: nothing
//!   has to give, so against `ample` it is the cost of the governor's
//!   machinery alone (reservations, control loop, enforcement), apart
//!   from the cost of the spilling a tight ceiling forces;
//! - `baseline`: no agent at all and no ceiling: ample memory, for the
//!   throughput cost of governance (tracing included);
//! - `static`: what a user would configure instead of a governor, with
//!   the same ceiling in the kernel: each engine held to its configured
//!   budget by a pool of its own (the library with fixed caps and no
//!   lending, which no agent moves; the `GROUP BY` on DataFusion's
//!   `FairSpillPool` at the query budget). An observing agent only
//!   attributes, as in `ungoverned`.
//!
//! Every `--interval-ms` it samples the workload's resident set
//! (`/proc/<pid>/status`) and, under an agent, each engine's attributed
//! resident bytes and budget in force and the database cgroup's charge.
//! Writes `summary.json` to `--out` (the VM tests' init sends that file to
//! the host on the guest's second serial port). Exits non-zero when the governed run misses
//! the target: an engine over its budget + 5%, the resident set at or over
//! the ceiling, an OOM kill, or a wrong result.
//!
//! `--scenario cache` runs `nodedb-cache` instead (governed and ungoverned
//! only, on the cache scenario's configuration): a mapped vector index
//! queried while the timeseries engine flushes several times the page
//! cache's room. The governed run's target adds the cache criteria,
//! judged against the ungoverned run of the same invocation: the index at
//! least 99% resident throughout the flush, the vector thread's major
//! faults during it at most 1% of the ungoverned run's, its query p99
//! during the flush windows within 1.2 times its p99 in the quiet windows
//! interleaved with them, the flush's throughput at least 0.9 times the
//! ungoverned run's, and at most 1% of what the flush wrote left in the
//! page cache (the writer's part: the lock on the index alone would meet
//! the first two). A failed ungoverned run fails the verdict. The two
//! timing criteria (p99, throughput) decide only under `--timing gated`
//! (the default, `cargo xtask validate --scenario cache`); `cargo xtask
//! test` reports them beside the verdict (`--timing reported`: a timed
//! figure of one run is a benchmark's, not a test's), and so do the VM
//! tests (`--timing emulated`: qemu's TCG times the emulator, not the
//! kernel; see `Args::timing`).
//!
//! On a machine of two NUMA nodes or more (the VMs), the mixed scenario's
//! runs under an agent spread the engines over the nodes (`Spread`), and
//! the governed run's target holds on each node as well: every placed
//! engine within its share there of its budget in force + 5%, and the
//! database's anonymous memory on each node (its cgroup's
//! `memory.numa_stat`) within the node's part of the ceiling in force +
//! 5% (the agent's part, which follows the budgets in force; it holds it,
//! a tick late, as it holds the budgets; the kernel holds the ceiling).
//!
//! The governed run places the engines as an operator would (`[[engine]]
//! cpus`): the scratch disk's interrupt CPU is found by a probe write
//! (`irq`), the flushing timeseries engine goes there and the vector
//! engine on the other CPUs, so the flush's I/O completions (interrupt
//! and softirq work, ahead of any thread) do not delay its queries.
//!
//! `cargo xtask validate` runs it on the host, `cargo xtask vm-test` in the
//! VMs; both turn the summary into a report and a timeline plot.

use std::{
    fs,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use nodedb_governor_workload::cpu;
use serde_json::{Value, json};

const ENGINES: [&str; 3] = ["vector", "timeseries", "query"];
/// The cache scenario's phases (see nodedb-cache).
const PHASES: [&str; 3] = ["before", "during", "after"];
/// How far over its budget an engine may peak (the agent acts on what the
/// kernel reports, a tick late).
const BUDGET_SLACK: f64 = 1.05;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Governed,
    Ungoverned,
    Ample,
    Roomy,
    Baseline,
    Static,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Governed => "governed",
            Mode::Ungoverned => "ungoverned",
            Mode::Ample => "ample",
            Mode::Roomy => "roomy",
            Mode::Baseline => "baseline",
            Mode::Static => "static",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Vector search, timeseries ingest and a GROUP BY (nodedb-workload).
    Mixed,
    /// A mapped index's hot set against a flush (nodedb-cache).
    Cache,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Mixed => "mixed",
            Scenario::Cache => "cache",
        }
    }

    fn workload_bin(self) -> &'static str {
        match self {
            Scenario::Mixed => "nodedb-workload",
            Scenario::Cache => "nodedb-cache",
        }
    }
}

#[derive(Parser)]
#[command(name = "nodedb-validate")]
struct Args {
    /// The workload.
    #[arg(long, value_enum, default_value_t = Scenario::Mixed)]
    scenario: Scenario,
    /// The configuration whose ceiling and budgets are validated (the
    /// bundled default, deploy/nodedb-governor.toml).
    #[arg(long)]
    config: PathBuf,
    /// Where nodedb-governor and nodedb-workload are (default: next to
    /// this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where summary.json and each run's logs go.
    #[arg(long)]
    out: PathBuf,
    /// Scratch directory for the workload's spills and segments (on a
    /// disk: a tmpfs would charge what is spilled to the same cgroup).
    #[arg(long, default_value = "/tmp/nodedb-validate")]
    scratch: PathBuf,
    /// The runs, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Governed, Mode::Ungoverned, Mode::Ample, Mode::Roomy, Mode::Baseline, Mode::Static])]
    modes: Vec<Mode>,
    /// The mixed scenario's runs whose workload has its solo phase (each
    /// engine alone in turn; default: every run); the others run without
    /// it (`--solo false`), unless the workload's arguments say otherwise.
    #[arg(long, value_enum, value_delimiter = ',')]
    solo_in: Option<Vec<Mode>>,
    /// Time limit per run, seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Sampling interval, milliseconds.
    #[arg(long, default_value_t = 200)]
    interval_ms: u64,
    /// How long a borrower keeps the larger budget, in the judgement, after
    /// a lender takes its loan back, from the first sample that shows the
    /// smaller one, in milliseconds: the borrower's spill (a flush, a
    /// segment written out) plus the arena's purge. Under TCG a timeseries
    /// flush alone takes over 1 s.
    #[arg(long, default_value_t = 1000)]
    loan_grace_ms: u64,
    /// The cache scenario's timing criteria (the p99 in the flush windows
    /// against the quiet ones, the flush's throughput against the
    /// ungoverned run's): `gated` (they decide the verdict, as every other
    /// criterion does), `reported` (in the summary and the report, beside
    /// the verdict: `cargo xtask test` on the host, since a timed
    /// criterion of one run is a benchmark, not a test), or `emulated`
    /// (reported, not gated: the CPUs' timing is emulated, qemu's TCG).
    /// Under TCG the p99 measures the emulator's jitter (p99 of 14 to 24 ms
    /// per 2 s window with no flush at all), not the kernel's; the flush
    /// throughput, the emulated disk's speed, which varies more from one
    /// run to the next than the criterion's 10% margin: the same
    /// ungoverned flush measured 46 to 62 MiB/s in four runs of one boot
    /// of the 6.1 VM, and governed runs of one configuration 49 to 68
    /// MiB/s across two boots. On the host, the p99 of one run moved from
    /// 1.10 to 1.35 times between runs of the same code (`.ci/run`s), the
    /// scheduler's doing, where what the criterion is for (the index's
    /// pages read back from disk) costs milliseconds and shows in the
    /// gated criteria too (index resident, major faults).
    #[arg(long, value_enum, default_value_t = Timing::Gated)]
    timing: Timing,
    /// Engine placement. The cache scenario's governed run: `auto` puts
    /// the flushing engine on the CPU the scratch disk interrupts and the
    /// vector engine on the others; `none` leaves both to the scheduler, as
    /// in the ungoverned run. The mixed scenario, on a machine of two or
    /// more NUMA nodes: `auto` spreads the engines over the nodes in every
    /// run under an agent (vector on the first node's CPUs, timeseries and
    /// query on the last's), and the target is judged per node as well as
    /// in total; `none` leaves them to the scheduler.
    #[arg(long, value_enum, default_value_t = PlacementMode::Auto)]
    placement: PlacementMode,
    /// Arguments for nodedb-workload (sizes), after `--`.
    #[arg(last = true)]
    workload: Vec<String>,
}

/// A child killed (and reaped) when dropped: a failed run leaves no agent
/// behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // Reaped already (its pid may be another process's by now).
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child, not yet reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Harness {
    args: Args,
    agent_bin: PathBuf,
    workload_bin: PathBuf,
    /// From `nodedb-governor check-config --json`.
    resolved: Value,
    base_config: toml::Table,
    /// The cache scenario's engine placement for its governed run.
    placement: Option<Placement>,
    /// The mixed scenario's engines spread over the NUMA nodes.
    spread: Option<Spread>,
}

/// The mixed scenario's engines spread over the NUMA nodes (`[[engine]]
/// cpus`: each engine's budget lies on its CPUs' node), as a thread-per-core
/// database pins each engine's shards: vector on the first node,
/// timeseries and query on the last. Each node's part of the ceiling is
/// the agent's: with the bundled configuration (no `numa.weights`), the
/// larger of the nodes' memory's split and where the budgets in force are
/// placed (the bundled budgets, 40%, 30% and 40%, put 64% of them on the
/// last node), so loans move it; budgets add up to more than the ceiling,
/// so the agent fits the engines on a node to its part when they crowd it.
///
/// (Query split over both nodes, its budget half on each, was run too: its
/// DataFusion pool's transient buffers, unreserved, spike by some 40 MiB
/// in half a second, 17% of a half-budget share, and peaked at 104-107%
/// of its node-1 share in the 6.12 VM.)
#[derive(Clone, Debug, serde::Serialize)]
struct Spread {
    /// Engine name and its CPUs (a kernel list).
    cpus: Vec<(String, String)>,
    /// Node id and its memory, bytes.
    nodes: Vec<(u32, u64)>,
}

impl Spread {
    /// None on a machine of one node.
    fn of(topology: &nodedb_governor::Topology) -> Option<Self> {
        let nodes = topology.nodes();
        let (first, last) = (nodes.first()?, nodes.last()?);
        if nodes.len() < 2 {
            return None;
        }
        let list = |cpus: &mut dyn Iterator<Item = &u32>| {
            cpus.map(u32::to_string).collect::<Vec<_>>().join(",")
        };
        Some(Self {
            cpus: vec![
                ("vector".into(), list(&mut first.cpus.iter())),
                ("timeseries".into(), list(&mut last.cpus.iter())),
                ("query".into(), list(&mut last.cpus.iter())),
            ],
            nodes: nodes.iter().map(|n| (n.id, n.memory_bytes)).collect(),
        })
    }

    /// `node`'s share of `ceiling`.
    fn ceiling_share(&self, node: u32, ceiling: u64) -> u64 {
        let total: u64 = self.nodes.iter().map(|(_, m)| m).sum();
        let mem = self
            .nodes
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |(_, m)| *m);
        (u128::from(ceiling) * u128::from(mem) / u128::from(total.max(1))) as u64
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum PlacementMode {
    Auto,
    None,
}

/// Where the cache scenario's governed run puts its engines (`[[engine]]
/// cpus`), from where the scratch disk's interrupts land: the vector
/// engine on the other CPUs, the flushing timeseries engine on that one.
#[derive(Clone, Debug, serde::Serialize)]
struct Placement {
    disk: nodedb_governor_workload::irq::DiskIrq,
    vector: String,
    timeseries: String,
}

impl Placement {
    /// Probes the scratch disk (64 MiB written durably); None on a machine
    /// of one CPU, or a disk that does not interrupt.
    fn probe(scratch: &Path) -> anyhow::Result<Option<Self>> {
        let Some(disk) = nodedb_governor_workload::irq::probe_disk(&scratch.join("irq"), 64 << 20)?
        else {
            return Ok(None);
        };
        if disk.cpus.len() < 2 {
            return Ok(None);
        }
        let others: Vec<String> = disk
            .cpus
            .iter()
            .filter(|&&c| c != disk.cpu)
            .map(u32::to_string)
            .collect();
        Ok(Some(Self {
            vector: others.join(","),
            timeseries: disk.cpu.to_string(),
            disk,
        }))
    }
}

fn vm_rss(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

fn describe(exit: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (exit.code(), exit.signal()) {
        (Some(c), _) => format!("code {c}"),
        (None, Some(9)) => "killed (SIGKILL)".to_owned(),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown".to_owned(),
    }
}

impl Harness {
    fn new(args: Args) -> anyhow::Result<Self> {
        let bin_dir = match &args.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()?
                .parent()
                .context("this binary's directory")?
                .to_owned(),
        };
        let agent_bin = bin_dir.join("nodedb-governor");
        let workload_bin = bin_dir.join(args.scenario.workload_bin());
        if args.scenario == Scenario::Cache
            && let Some(m) = args
                .modes
                .iter()
                .find(|m| !matches!(m, Mode::Governed | Mode::Ungoverned))
        {
            bail!(
                "--scenario cache runs governed and ungoverned only, not {}",
                m.name()
            );
        }
        for b in [&agent_bin, &workload_bin] {
            if !b.exists() {
                bail!("{} is missing (build it first)", b.display());
            }
        }
        let out = Command::new(&agent_bin)
            .args(["check-config", "--json"])
            .arg(&args.config)
            .output()
            .context("running nodedb-governor check-config")?;
        if !out.status.success() {
            bail!(
                "{}: {}",
                args.config.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let resolved: Value = serde_json::from_slice(&out.stdout).context("check-config's JSON")?;
        let text = fs::read_to_string(&args.config)
            .with_context(|| format!("reading {}", args.config.display()))?;
        let base_config: toml::Table =
            toml::from_str(&text).with_context(|| format!("in {}", args.config.display()))?;
        let placement = if args.scenario == Scenario::Cache
            && args.modes.contains(&Mode::Governed)
            && args.placement == PlacementMode::Auto
        {
            let p = Placement::probe(&args.scratch)?;
            match &p {
                Some(p) => eprintln!(
                    "nodedb-validate: the scratch disk interrupts CPU {} ({:.0}% of {} on line {} {}): the governed run puts the vector engine on CPUs {} and the timeseries engine on CPU {}",
                    p.disk.cpu,
                    p.disk.share * 100.0,
                    p.disk.per_cpu.iter().sum::<u64>(),
                    p.disk.line,
                    p.disk.device,
                    p.vector,
                    p.timeseries
                ),
                None => eprintln!(
                    "nodedb-validate: one CPU, or a scratch disk without interrupts: no engine placement"
                ),
            }
            p
        } else {
            None
        };
        let spread = if args.scenario == Scenario::Mixed && args.placement == PlacementMode::Auto {
            let topology = nodedb_governor::Topology::detect().context("the NUMA nodes")?;
            let spread = Spread::of(&topology);
            if let Some(s) = &spread {
                eprintln!(
                    "nodedb-validate: {} NUMA nodes: the runs under an agent place {}",
                    s.nodes.len(),
                    s.cpus
                        .iter()
                        .map(|(e, c)| format!("{e} on CPUs {c}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            spread
        } else {
            None
        };
        Ok(Self {
            args,
            agent_bin,
            workload_bin,
            resolved,
            base_config,
            placement,
            spread,
        })
    }

    fn budget(&self, engine: &str) -> u64 {
        self.resolved["engines"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == engine)
            .and_then(|e| e["budget_bytes"].as_u64())
            .unwrap_or(0)
    }

    fn ceiling(&self) -> u64 {
        self.resolved["ceiling_bytes"].as_u64().unwrap_or(0)
    }

    /// The configuration made private to one run: its own database name,
    /// run directory and no metrics port; observe-only when ungoverned.
    fn config(&self, mode: Mode, run_dir: &Path) -> anyhow::Result<String> {
        let mut c = self.base_config.clone();
        c.insert("database".into(), "nodedb-validate".into());
        c.insert("run_dir".into(), run_dir.display().to_string().into());
        c.remove("control_socket");
        c.remove("metrics_addr");
        c.insert(
            "enforce".into(),
            matches!(mode, Mode::Governed | Mode::Roomy).into(),
        );
        if matches!(mode, Mode::Ample | Mode::Roomy) {
            c.insert(
                "ceiling".into(),
                toml::Value::Integer(i64::try_from(self.ceiling() * 16)?),
            );
        }
        if let (Some(p), Mode::Governed) = (&self.placement, mode)
            && let Some(toml::Value::Array(engines)) = c.get_mut("engine")
        {
            for e in engines.iter_mut().filter_map(toml::Value::as_table_mut) {
                let cpus = match e.get("name").and_then(toml::Value::as_str) {
                    Some("vector") => &p.vector,
                    Some("timeseries") => &p.timeseries,
                    _ => continue,
                };
                e.insert("cpus".into(), cpus.clone().into());
            }
        }
        if let Some(s) = &self.spread
            && mode != Mode::Baseline
            && let Some(toml::Value::Array(engines)) = c.get_mut("engine")
        {
            for e in engines.iter_mut().filter_map(toml::Value::as_table_mut) {
                let name = e.get("name").and_then(toml::Value::as_str).unwrap_or("");
                if let Some((_, cpus)) = s.cpus.iter().find(|(n, _)| n == name) {
                    e.insert("cpus".into(), cpus.clone().into());
                }
            }
        }
        Ok(toml::to_string(&c)?)
    }

    fn status(&self, run_dir: &Path) -> Option<Value> {
        nodedb_governor_demo::governed::admin_status(&run_dir.join("agent.sock"))
    }

    fn start_agent(&self, mode: Mode, run_dir: &Path) -> anyhow::Result<Reaped> {
        let config_file = run_dir.join("governor.toml");
        fs::write(&config_file, self.config(mode, run_dir)?)?;
        let mut agent = Reaped(
            Command::new(&self.agent_bin)
                .args(["run", "--config"])
                .arg(&config_file)
                .stderr(fs::File::create(run_dir.join("agent.log"))?)
                .spawn()
                .context("starting the agent")?,
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.status(run_dir).is_none() || !run_dir.join("control.sock").exists() {
            if let Some(exit) = agent.0.try_wait()? {
                bail!(
                    "the agent exited ({}): see {}",
                    describe(exit),
                    run_dir.join("agent.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent did not start within 120 s: see {}",
                    run_dir.join("agent.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    fn run(&self, mode: Mode) -> anyhow::Result<Value> {
        eprintln!("nodedb-validate: {} run", mode.name());
        let run_dir = self.args.out.join(format!("run-{}", mode.name()));
        let _ = fs::remove_dir_all(&run_dir);
        fs::create_dir_all(&run_dir)?;
        let scratch = self.args.scratch.join(mode.name());
        let _ = fs::remove_dir_all(&scratch);
        let agent = match mode {
            Mode::Baseline => None,
            _ => Some(self.start_agent(mode, &run_dir)?),
        };
        // memory.events counts over the cgroup's life, which can span
        // runs: the run's OOM kills are the growth.
        // So are `high` (the database's threads throttled above
        // memory.high) and `max` (charges that hit memory.max), and the
        // time its tasks stalled on memory (PSI `some`).
        let before = agent
            .as_ref()
            .and_then(|_| self.status(&run_dir))
            .unwrap_or(Value::Null);
        // A counter's growth over the run (`ptr` a JSON pointer into the
        // status), None when the last status lacks it.
        let grown = |last: &Value, ptr: &str| {
            let now = last.pointer(ptr)?.as_u64()?;
            Some(now.saturating_sub(before.pointer(ptr).and_then(Value::as_u64).unwrap_or(0)))
        };
        let agent_cpu_before = agent.as_ref().and_then(|a| cpu::process_seconds(a.0.id()));
        let agent_threads_before = agent
            .as_ref()
            .map(|a| cpu::threads_by_name_of(a.0.id()))
            .unwrap_or_default();
        let mut cmd = Command::new(&self.workload_bin);
        if agent.is_some() {
            cmd.arg("--socket")
                .arg(run_dir.join("control.sock"))
                .args(["--database", "nodedb-validate"]);
        }
        if self.args.scenario == Scenario::Cache && mode == Mode::Governed {
            cmd.arg("--governed");
        }
        if self.args.scenario == Scenario::Mixed
            && self
                .args
                .solo_in
                .as_ref()
                .is_some_and(|m| !m.contains(&mode))
            && !self.args.workload.iter().any(|a| a.starts_with("--solo"))
        {
            cmd.args(["--solo", "false"]);
        }
        if mode == Mode::Static {
            let budgets: Vec<String> = ENGINES
                .iter()
                .map(|e| format!("{e}={}", self.budget(e)))
                .collect();
            cmd.arg("--static-budgets")
                .arg(budgets.join(","))
                .arg("--static-ceiling")
                .arg(self.ceiling().to_string());
        }
        let mut workload = Reaped(
            cmd.arg("--dir")
                .arg(&scratch)
                .args(&self.args.workload)
                .stdout(Stdio::piped())
                .stderr(fs::File::create(run_dir.join("workload.log"))?)
                .spawn()
                .context("starting the workload")?,
        );
        let pid = workload.0.id();
        // The result is read while the workload runs, so a full pipe never
        // holds it up.
        let mut stdout = workload.0.stdout.take().context("the workload's stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        let started = Instant::now();
        let timeout = Duration::from_secs(self.args.timeout_secs);
        let interval = Duration::from_millis(self.args.interval_ms);
        let mut timeline = Vec::new();
        // The library's row in the last status that had it (it is gone
        // from the status once the workload exits).
        let mut last_client = Value::Null;
        let exit = loop {
            if let Some(st) = workload.0.try_wait()? {
                break st;
            }
            if started.elapsed() > timeout {
                bail!("the {} workload ran past {timeout:?}", mode.name());
            }
            let mut point = json!({
                "t": started.elapsed().as_secs_f64(),
                "rss_bytes": vm_rss(pid),
            });
            if agent.is_some()
                && let Some(s) = self.status(&run_dir)
            {
                let client = s["clients"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["pid"] == pid))
                    .cloned()
                    .unwrap_or_default();
                if !client.is_null() {
                    last_client = client.clone();
                }
                point["cgroup_bytes"] = s["ceiling"]["current_bytes"].clone();
                for e in ENGINES {
                    point[e] = json!({
                        "resident_bytes": s["engines"][e]["resident_bytes"],
                        "budget_bytes": client["engines"][e]["budget_bytes"],
                        "level": client["engines"][e]["level"],
                        "page_cache_bytes": s["engines"][e]["page_cache_bytes"],
                        "page_cache_evicted_bytes": s["engines"][e]["page_cache_evicted_bytes"],
                    });
                    // A placed engine on each node: what it holds there
                    // against its share of its budget in force.
                    if self.spread.is_some() {
                        point[e]["nodes"] = client["engines"][e]["nodes"].clone();
                    }
                }
                // The database's memory per node (its cgroup's
                // memory.numa_stat).
                if self.spread.is_some() {
                    point["numa"] = s["numa"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|n| {
                            json!({
                                "node": n["node"],
                                "anon_bytes": n["database_anon_bytes"],
                                "file_bytes": n["database_file_bytes"],
                                "ceiling_share_bytes": n["ceiling_share_bytes"],
                            })
                        })
                        .collect();
                }
            }
            timeline.push(point);
            std::thread::sleep(interval);
        };
        let seconds = started.elapsed().as_secs_f64();
        let result: Value =
            serde_json::from_str(reader.join().unwrap_or_default().trim()).unwrap_or(Value::Null);
        let last = agent
            .as_ref()
            .and_then(|_| self.status(&run_dir))
            .unwrap_or_default();
        // The agent's own CPU over the run, which the database's threads
        // share the machine with.
        let agent_cpu = agent
            .as_ref()
            .and_then(|a| cpu::process_seconds(a.0.id()))
            .map(|c| c - agent_cpu_before.unwrap_or(0.0));
        // Where it went: by thread, and how much of it the ticks were.
        let agent_threads = agent
            .as_ref()
            .map(|a| cpu::grown_since(&agent_threads_before, cpu::threads_by_name_of(a.0.id())))
            .unwrap_or_default();
        let agent_ticks = json!({
            "ticks": grown(&last, "/ticks/ticks"),
            "calm_ticks": grown(&last, "/ticks/calm_ticks"),
            "seconds": grown(&last, "/ticks/total_us").map(|us| us as f64 / 1e6),
            // The kernel's marks: crossings that woke it between ticks,
            // and the ladder runs they cost.
            "mark_events": grown(&last, "/marks/events"),
            "mark_reactions": grown(&last, "/marks/reactions"),
            "time_us": last["ticks"]["time"],
        });
        drop(agent);
        let _ = fs::remove_dir_all(&scratch);
        let peak =
            |f: &dyn Fn(&Value) -> Option<u64>| timeline.iter().filter_map(f).max().unwrap_or(0);
        let mut engines = json!({});
        let mut within = true;
        let grace = self.args.loan_grace_ms as f64 / 1000.0;
        for e in ENGINES {
            let resident = peak(&|p: &Value| p[e]["resident_bytes"].as_u64());
            let budget = self.budget(e);
            // Against the budget in force when the sample was taken: the
            // configured one moved by loans (an idle engine lends to a busy
            // one; the sum of budgets never changes). A lender takes its
            // loan back at once, and the borrower then has to spill: for
            // the loan grace after a budget drops, the larger one holds.
            let ratios = in_force_ratios(
                &timeline,
                grace,
                |p| p[e]["resident_bytes"].as_u64(),
                |p| p[e]["budget_bytes"].as_u64(),
            );
            let in_force = ratios.iter().copied().fold(0.0, f64::max);
            let over_in_force = ratios.iter().filter(|r| **r > BUDGET_SLACK).count();
            within &= in_force <= BUDGET_SLACK;
            let enforcement = &last_client["engines"][e];
            engines[e] = json!({
                "forced_spills": enforcement["forced_spills"],
                "spill_requests": enforcement["spill_requests"],
                "spilled_bytes": enforcement["spilled_bytes"],
                "peak_resident_bytes": resident,
                "budget_bytes": budget,
                "peak_over_budget": resident as f64 / budget.max(1) as f64,
                "peak_over_budget_in_force": in_force,
                "samples_over_budget_in_force": over_in_force,
            });
        }
        let peak_rss = peak(&|p: &Value| p["rss_bytes"].as_u64());
        let ceiling = self.ceiling();
        let run_ceiling = last["ceiling"]["limit_bytes"].as_u64();
        let oom_kills = grown(&last, "/ceiling/events/oom_kill").unwrap_or(0);
        let completed = exit.success();
        let correct = match self.args.scenario {
            Scenario::Mixed => result["correct"] == true,
            // Every phase ran and the flush wrote what it was asked to.
            Scenario::Cache => {
                result["flush_requested_bytes"].as_u64() > Some(0)
                    && result["flush"]["bytes"].as_u64() >= result["flush_requested_bytes"].as_u64()
                    && PHASES
                        .iter()
                        .all(|p| result["phases"][p]["queries"].as_u64() > Some(0))
            }
        };
        // Spread over the NUMA nodes: the same criteria on each node.
        let (nodes_met, mut numa) = self.spread.as_ref().map_or((true, Value::Null), |s| {
            judge_nodes(&timeline, s, ceiling, grace)
        });
        if !numa.is_null() {
            // How often the agent found a node crowded (its engines held
            // to shares fitted to its part of the ceiling).
            numa["crowded_nodes"] = last_client["crowded_nodes"].clone();
        }
        let summary = json!({
            "mode": mode.name(),
            "ceiling_bytes": ceiling,
            "run_ceiling_bytes": run_ceiling,
            "cgroup_backend": last["ceiling"]["backend"],
            "seconds": seconds,
            "peak_rss_bytes": peak_rss,
            "peak_cgroup_bytes": peak(&|p: &Value| p["cgroup_bytes"].as_u64()),
            "oom_kills": oom_kills,
            "high_events": grown(&last, "/ceiling/events/high").unwrap_or(0),
            "max_events": grown(&last, "/ceiling/events/max").unwrap_or(0),
            "agent_cpu_seconds": agent_cpu,
            "agent_threads_cpu_seconds": agent_threads,
            "agent_ticks": agent_ticks,
            // The database's cgroup, or the whole machine's where it has
            // no cgroup v2 of its own.
            "memory_stall_source": last["psi"]["source"],
            // The agent refreshes it once a PSI window (2 s by default):
            // the run's last stalls may be missing.
            "memory_stall_seconds": grown(&last, "/psi/figures/some_total_us")
                .map(|us| us as f64 / 1e6),
            "exit": describe(exit),
            "completed": completed,
            "correct": correct,
            "within_budgets": within,
            "under_ceiling": peak_rss < ceiling,
            // The target (judged for the governed run): completed with
            // correct results, no OOM kill, every engine within its budget
            // in force + 5%, the resident set under the ceiling.
            // Spread over the NUMA nodes, on each node as well: every
            // placed engine within its share there of its budget in force
            // + 5%, the database's anonymous memory there under the node's
            // share of the ceiling.
            "target_met": completed && correct && oom_kills == 0 && within && peak_rss < ceiling && nodes_met,
            "numa": numa,
            "engines": engines,
            "workload": result,
            "timeline": timeline,
        });
        eprintln!(
            "nodedb-validate: {}: {} after {seconds:.1} s; peak RSS {} MiB (ceiling {} MiB); {} (peak / configured budget; governed: peak against the budget in force); OOM kills {oom_kills}; throttled above memory.high {} times, memory.max hit {} times, stalled on memory {:.1} s",
            mode.name(),
            summary["exit"].as_str().unwrap_or_default(),
            peak_rss >> 20,
            ceiling >> 20,
            ENGINES
                .iter()
                .map(|e| {
                    let x = &summary["engines"][e];
                    let ratio = if mode == Mode::Governed {
                        &x["peak_over_budget_in_force"]
                    } else {
                        &x["peak_over_budget"]
                    };
                    format!(
                        "{e} {} / {} MiB ({:.0}%)",
                        x["peak_resident_bytes"].as_u64().unwrap_or(0) >> 20,
                        x["budget_bytes"].as_u64().unwrap_or(0) >> 20,
                        ratio.as_f64().unwrap_or(0.0) * 100.0
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            summary["high_events"],
            summary["max_events"],
            summary["memory_stall_seconds"].as_f64().unwrap_or(f64::NAN),
        );
        if !numa.is_null() {
            eprintln!(
                "nodedb-validate: {}: per node: {}; {}",
                mode.name(),
                numa["nodes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| format!(
                        "node {} anon {} / {} MiB",
                        n["node"],
                        n["peak_anon_bytes"].as_u64().unwrap_or(0) >> 20,
                        n["ceiling_share_bytes"].as_u64().unwrap_or(0) >> 20
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                ENGINES
                    .iter()
                    .flat_map(|e| {
                        numa["engines"][e]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(move |n| {
                                format!(
                                    "{e} on {} {} MiB ({:.0}% of its share)",
                                    n["node"],
                                    n["peak_resident_bytes"].as_u64().unwrap_or(0) >> 20,
                                    n["peak_over_share_in_force"].as_f64().unwrap_or(0.0) * 100.0
                                )
                            })
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(summary)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let modes = args.modes.clone();
    let harness = Harness::new(args)?;
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_owned();
    let mut runs = Vec::new();
    for mode in modes {
        runs.push(harness.run(mode)?);
    }
    let cache = (harness.args.scenario == Scenario::Cache)
        .then(|| cache_verdict(&mut runs, harness.args.timing));
    let summary = json!({
        "kernel": kernel,
        "scenario": harness.args.scenario.name(),
        "cache": cache,
        "config": harness.resolved,
        "placement": harness.placement,
        "spread": harness.spread,
        "workload_args": harness.args.workload,
        "loan_grace_seconds": harness.args.loan_grace_ms as f64 / 1000.0,
        "runs": runs,
    });
    fs::write(
        harness.args.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    if runs
        .iter()
        .any(|r| r["mode"] == "governed" && r["target_met"] != true)
    {
        bail!("the governed run missed the target (see summary.json)");
    }
    Ok(())
}

/// The cache criteria for the governed run, against the ungoverned run of
/// the same invocation; a governed run that misses one misses its target.
/// Without both runs there is nothing to judge by (and no verdict).
fn cache_verdict(runs: &mut [Value], timing: Timing) -> Value {
    let find = |runs: &[Value], mode: &str| runs.iter().position(|r| r["mode"] == mode);
    let (Some(g), Some(u)) = (find(runs, "governed"), find(runs, "ungoverned")) else {
        return Value::Null;
    };
    // A failed ungoverned run is no yardstick: its zero throughput and
    // faults would pass anything.
    if !(runs[u]["completed"] == true && runs[u]["correct"] == true) {
        runs[g]["target_met"] = false.into();
        return json!({
            "met": false,
            "why": "the ungoverned run did not complete correctly: nothing to judge against",
        });
    }
    let mut verdict = judge_cache(&runs[g]["workload"], &runs[u]["workload"], timing);
    if verdict["met"] != true {
        runs[g]["target_met"] = false.into();
    }
    // The kernel's attribution of the same story: the vector engine's
    // page cache that reclaim evicted (its index's pages), by run.
    for (mode, i) in [("ungoverned", u), ("governed", g)] {
        verdict["vector_cache_evicted_bytes"][mode] = evicted(&runs[i], "vector").into();
    }
    verdict
}

/// The largest count of `engine`'s page cache evicted by reclaim in a
/// run's samples (a counter: its last value, unless the agent restarted).
fn evicted(run: &Value, engine: &str) -> u64 {
    run["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p[engine]["page_cache_evicted_bytes"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Whether the cache scenario's timing criteria decide its verdict
/// (`nodedb-validate --timing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Timing {
    /// They decide it, as every other criterion does.
    Gated,
    /// Reported beside the verdict: a timed criterion of one run is a
    /// benchmark's figure, not a test's.
    Reported,
    /// Reported beside the verdict: the CPUs' timing is emulated.
    Emulated,
}

impl Timing {
    /// Why a timing criterion does not decide, for the report (None: it
    /// does).
    fn why_reported(self) -> Option<&'static str> {
        match self {
            Timing::Gated => None,
            Timing::Reported => Some("a timed figure of one run"),
            Timing::Emulated => Some("emulated CPUs"),
        }
    }
}

/// Whether a cache criterion decides the verdict: all do, but the timing
/// ones (latency, throughput) unless `--timing gated`.
fn gated(criterion: &str, timing: Timing) -> bool {
    timing == Timing::Gated
        || !matches!(
            criterion,
            "p99_during_vs_quiet" | "flush_throughput_vs_ungoverned"
        )
}

/// How far above the quiet windows' p99 the flush windows' may be
/// whatever the ratio: the p99 of ~1,000 queries is their 10th slowest,
/// and on two CPUs with the flush on one, the scheduler alone moves it by
/// tens of µs (a `.ci/run` on the host: 266 against 197 µs, 1.35; three
/// runs of the same code after it 0.97-1.00), while what the criterion is
/// for, the index's pages evicted and read back from disk, costs
/// milliseconds (49 ms ungoverned in the same run).
const P99_SLACK_US: f64 = 100.0;

/// Judges a governed cache run (`g`) against an ungoverned one (`u`):
/// each criterion with its measured value, its limit and whether it holds.
fn judge_cache(g: &Value, u: &Value, timing: Timing) -> Value {
    let during = |r: &Value, k: &str| r["phases"]["during"][k].as_f64();
    let index = g["index_bytes"].as_f64().unwrap_or(0.0);
    let resident = during(g, "min_hot_resident_bytes").unwrap_or(0.0) / index.max(1.0);
    let faults_g = during(g, "vector_major_faults").unwrap_or(f64::MAX);
    let faults_u = during(u, "vector_major_faults").unwrap_or(0.0);
    // Without a flush: every quiet window's queries together (before,
    // between and after the flush windows).
    let quiet_p99 = g["quiet_p99_us"].as_f64().unwrap_or(0.0);
    let p99_during = during(g, "p99_us").unwrap_or(f64::MAX);
    // Within 1.2 times, or within `P99_SLACK_US` of, the quiet p99 (as a
    // ratio, the larger of the two).
    let p99_limit = 1.2f64.max(1.0 + P99_SLACK_US / quiet_p99.max(1.0));
    let tput = |r: &Value| r["flush"]["mib_per_s"].as_f64().unwrap_or(0.0);
    // What the flush left in the cache: the writer's own doing, apart
    // from the lock on the index (which alone would meet the first two).
    let left = g["flush"]["left_cached_bytes"].as_f64().unwrap_or(f64::MAX)
        / g["flush"]["bytes"].as_f64().unwrap_or(0.0).max(1.0);
    let criteria = [
        ("flush_left_cached", left, 0.01, left <= 0.01),
        ("hot_set_resident", resident, 0.99, resident >= 0.99),
        (
            // Faults are counts: with none ungoverned, none allowed.
            "major_faults_vs_ungoverned",
            faults_g / faults_u.max(1.0),
            0.01,
            faults_g <= faults_u * 0.01,
        ),
        (
            "p99_during_vs_quiet",
            p99_during / quiet_p99.max(1.0),
            p99_limit,
            p99_during <= quiet_p99.max(1.0) * p99_limit,
        ),
        (
            "flush_throughput_vs_ungoverned",
            tput(g) / tput(u).max(1e-9),
            0.9,
            tput(g) >= tput(u) * 0.9,
        ),
    ];
    let mut v = json!({
        "met": criteria
            .iter()
            .all(|c| c.3 || !gated(c.0, timing)),
        "timing_reported_why": timing.why_reported(),
    });
    for (name, value, limit, ok) in criteria {
        v[name] = json!({
            "value": value,
            "limit": limit,
            "ok": ok,
            "gated": gated(name, timing),
        });
    }
    // The problem, as the ungoverned run shows it.
    let u_quiet = ["before", "after"]
        .iter()
        .filter_map(|p| u["phases"][p]["p99_us"].as_f64())
        .fold(f64::MAX, f64::min);
    v["ungoverned"] = json!({
        "min_hot_resident": during(u, "min_hot_resident_bytes").unwrap_or(0.0)
            / u["index_bytes"].as_f64().unwrap_or(1.0).max(1.0),
        "p99_during_vs_before": during(u, "p99_us").unwrap_or(0.0)
            / u["phases"]["before"]["p99_us"].as_f64().unwrap_or(1.0).max(1.0),
        "p99_during_vs_quiet_min": during(u, "p99_us").unwrap_or(0.0) / u_quiet.max(1.0),
        "major_faults_during": faults_u,
        "flush_left_cached": u["flush"]["left_cached_bytes"].as_f64().unwrap_or(0.0)
            / u["flush"]["bytes"].as_f64().unwrap_or(1.0).max(1.0),
    });
    v
}

/// Each sample's resident bytes (`resident`) over the budget in force
/// (`budget`): the largest budget among the samples within `grace` seconds
/// before it and the last sample before those (its budget held until the
/// next sample, so a drop first seen at `t` is not judged before `t +
/// grace`).
fn in_force_ratios(
    timeline: &[Value],
    grace: f64,
    resident: impl Fn(&Value) -> Option<u64>,
    budget: impl Fn(&Value) -> Option<u64>,
) -> Vec<f64> {
    timeline
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let r = resident(p)?;
            let t = p["t"].as_f64()?;
            let window = timeline[..=i]
                .iter()
                .rev()
                .take_while(|q| q["t"].as_f64().is_some_and(|u| t - u < grace))
                .count();
            let b = timeline[i.saturating_sub(window)..=i]
                .iter()
                .filter_map(&budget)
                .max()
                .filter(|b| *b > 0)?;
            Some(r as f64 / b as f64)
        })
        .collect()
}

/// `engine`'s entry for `node` in a sample (its `nodes`, as the agent's
/// status gives a placed engine's).
fn on_node<'a>(p: &'a Value, engine: &str, node: u64) -> Option<&'a Value> {
    p[engine]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["node"].as_u64() == Some(node))
}

/// The per-node criteria of a spread run: each placed engine on each node
/// against its share there of its budget in force (with the loan grace, as
/// in all), and the database's anonymous memory on each node against the
/// node's part of `ceiling` in force (the agent's, with the same grace).
/// Returns the verdict and its figures.
fn judge_nodes(timeline: &[Value], spread: &Spread, ceiling: u64, grace: f64) -> (bool, Value) {
    let mut met = true;
    let mut engines = json!({});
    for e in ENGINES {
        let mut nodes = Vec::new();
        for &(node, _) in &spread.nodes {
            let n = u64::from(node);
            let resident = |p: &Value| on_node(p, e, n)?["resident_bytes"].as_u64();
            let share = |p: &Value| on_node(p, e, n)?["share_bytes"].as_u64();
            if !timeline.iter().any(|p| share(p).is_some_and(|s| s > 0)) {
                continue;
            }
            let ratios = in_force_ratios(timeline, grace, resident, share);
            let worst = ratios.iter().copied().fold(0.0, f64::max);
            met &= worst <= BUDGET_SLACK;
            nodes.push(json!({
                "node": node,
                "peak_resident_bytes": timeline.iter().filter_map(resident).max().unwrap_or(0),
                "peak_over_share_in_force": worst,
                "samples_over_share_in_force": ratios.iter().filter(|r| **r > BUDGET_SLACK).count(),
            }));
        }
        engines[e] = nodes.into();
    }
    let mut totals = Vec::new();
    for &(node, _) in &spread.nodes {
        let field = |p: &Value, k: &str| {
            p["numa"]
                .as_array()?
                .iter()
                .find(|x| x["node"].as_u64() == Some(u64::from(node)))?[k]
                .as_u64()
        };
        let anon = |p: &Value| field(p, "anon_bytes");
        let peak = timeline
            .iter()
            .max_by_key(|p| anon(p).unwrap_or(0))
            .filter(|p| anon(p).is_some());
        let file = timeline
            .iter()
            .filter_map(|p| field(p, "file_bytes"))
            .max()
            .unwrap_or(0);
        // The node's part as the agent judged it at each sample (it
        // follows the budgets in force unless `numa.weights` fixes it),
        // or, from an agent that does not say, the ceiling split by the
        // nodes' memory. It is held by the agent from what the kernel
        // reports, a tick late, as the budgets are (the ceiling itself is
        // the kernel's: memory.max): the same 5%, and the same grace when
        // a loan taken back shrinks it.
        let share = |p: &Value| {
            field(p, "ceiling_share_bytes").or(Some(spread.ceiling_share(node, ceiling)))
        };
        let worst = in_force_ratios(timeline, grace, anon, share)
            .into_iter()
            .fold(0.0, f64::max);
        let under = worst <= BUDGET_SLACK;
        met &= under;
        totals.push(json!({
            "node": node,
            "peak_anon_bytes": peak.and_then(anon).unwrap_or(0),
            "peak_file_bytes": file,
            "ceiling_share_bytes": peak.and_then(share),
            "peak_over_share": worst,
            "under_share": under,
        }));
    }
    (
        met,
        json!({"met": met, "engines": engines, "nodes": totals}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, resident: u64, budget: u64) -> Value {
        json!({"t": t, "ts": {"resident_bytes": resident, "budget_bytes": budget}})
    }

    fn resident(p: &Value) -> Option<u64> {
        p["ts"]["resident_bytes"].as_u64()
    }

    fn budget(p: &Value) -> Option<u64> {
        p["ts"]["budget_bytes"].as_u64()
    }

    #[test]
    fn a_borrower_is_judged_on_the_larger_budget_for_the_grace_after_a_recall() {
        // A loan (600) taken back at 1.0 s (400): the borrower holds 480
        // until it has spilled at 2.5 s.
        let timeline = [
            sample(0.0, 450, 600),
            sample(0.5, 480, 600),
            sample(1.0, 480, 400),
            sample(1.5, 480, 400),
            sample(2.0, 480, 400),
            sample(2.5, 380, 400),
        ];
        let over = |grace| {
            in_force_ratios(&timeline, grace, resident, budget)
                .iter()
                .map(|r| *r > 1.05)
                .collect::<Vec<_>>()
        };
        // Within 2 s of the drop first seen at 1.0 s, the 600 holds.
        assert_eq!(over(2.0), [false; 6]);
        // With 0.75 s, 1.0 and 1.5 s hold it (0.5 s is the last sample
        // before their window), 2.0 s is judged on 400: 120%.
        assert_eq!(over(0.75), [false, false, false, false, true, false]);
        let at_2 = in_force_ratios(&timeline, 0.75, resident, budget)[4];
        assert!((at_2 - 1.2).abs() < 1e-9, "{at_2}");
        // A budget that grows again is in force at once.
        assert_eq!(
            in_force_ratios(
                &[sample(0.0, 100, 200), sample(0.1, 100, 100)],
                0.0,
                resident,
                budget
            ),
            [0.5, 1.0]
        );
    }

    /// A sample of a spread run: timeseries on node 1 alone, query on
    /// both (as the judge takes any placement), and the database's
    /// anonymous memory per node (MiB).
    fn spread_sample(t: f64, ts: (u64, u64), query: [(u64, u64); 2], anon: [u64; 2]) -> Value {
        let n = |node: u32, (r, s): (u64, u64)| json!({"node": node, "resident_bytes": r << 20, "share_bytes": s << 20, "level": "normal"});
        json!({
            "t": t,
            "vector": {},
            "timeseries": {"nodes": [n(1, ts)]},
            "query": {"nodes": [n(0, query[0]), n(1, query[1])]},
            "numa": [
                {"node": 0, "anon_bytes": anon[0] << 20, "file_bytes": 0},
                {"node": 1, "anon_bytes": anon[1] << 20, "file_bytes": 1 << 20},
            ],
        })
    }

    #[test]
    fn a_spread_run_is_judged_on_every_node_each_engine_holds_a_share_of() {
        let spread = Spread {
            cpus: Vec::new(),
            nodes: vec![(0, 1536 << 20), (1, 1536 << 20)],
        };
        let ceiling = 1024 << 20;
        assert_eq!(spread.ceiling_share(1, ceiling), 512 << 20);
        let good = [
            spread_sample(0.0, (200, 307), [(100, 204), (90, 204)], [300, 310]),
            spread_sample(0.5, (310, 307), [(150, 204), (150, 204)], [400, 480]),
        ];
        let (met, v) = judge_nodes(&good, &spread, ceiling, 1.0);
        assert!(met, "{v:#}");
        // The engines placed nowhere have no per-node figures; timeseries
        // only where its budget lies.
        assert_eq!(v["engines"]["vector"], json!([]));
        assert_eq!(v["engines"]["timeseries"][0]["node"], 1);
        assert_eq!(v["engines"]["timeseries"].as_array().unwrap().len(), 1);
        assert_eq!(v["nodes"][1]["peak_anon_bytes"], 480u64 << 20);
        // Query over its share on node 1 while far under its budget in
        // all fails the run, and names the node.
        let mut over = good.to_vec();
        over.push(spread_sample(
            1.0,
            (300, 307),
            [(20, 204), (230, 204)],
            [300, 500],
        ));
        let (met, v) = judge_nodes(&over, &spread, ceiling, 1.0);
        assert!(!met, "{v:#}");
        assert_eq!(v["engines"]["query"][1]["samples_over_share_in_force"], 1);
        assert_eq!(v["engines"]["query"][0]["samples_over_share_in_force"], 0);
        // So does a node whose memory passes its share of the ceiling + 5%
        // (537.6 MiB), every engine inside its shares.
        let mut full = good.to_vec();
        full.push(spread_sample(
            1.0,
            (300, 307),
            [(100, 204), (190, 204)],
            [300, 538],
        ));
        let (met, v) = judge_nodes(&full, &spread, ceiling, 1.0);
        assert!(!met, "{v:#}");
        assert_eq!(v["nodes"][1]["under_share"], false);
        assert_eq!(v["nodes"][0]["under_share"], true);
    }

    #[test]
    fn a_node_is_judged_on_the_agents_part_in_force_with_the_loan_grace() {
        let spread = Spread {
            cpus: Vec::new(),
            nodes: vec![(0, 1536 << 20), (1, 1536 << 20)],
        };
        let ceiling = 1024 << 20;
        // Node 1 at 600 MiB: over the memory's split (512 MiB) but within
        // the 640 MiB part the agent gave it while query borrowed.
        let at = |t: f64, anon1: u64, part1: u64| {
            let mut p = spread_sample(t, (200, 307), [(0, 0), (200, 409)], [300, anon1]);
            p["numa"][1]["ceiling_share_bytes"] = json!(part1 << 20);
            p["numa"][0]["ceiling_share_bytes"] = json!(384u64 << 20);
            p
        };
        let lent = [at(0.0, 500, 640), at(0.5, 600, 640)];
        let (met, v) = judge_nodes(&lent, &spread, ceiling, 1.0);
        assert!(met, "{v:#}");
        assert_eq!(v["nodes"][1]["ceiling_share_bytes"], 640u64 << 20);
        assert_eq!(v["nodes"][1]["peak_anon_bytes"], 600u64 << 20);
        // The loan is taken back (the part seen at 512 MiB from 1.0 s):
        // within the grace the larger part holds, after it the node is
        // over.
        let mut back = lent.to_vec();
        back.extend([at(1.0, 600, 512), at(1.6, 600, 512)]);
        let (met, v) = judge_nodes(&back, &spread, ceiling, 1.0);
        assert!(met, "{v:#}");
        back.push(at(2.1, 600, 512));
        let (met, v) = judge_nodes(&back, &spread, ceiling, 1.0);
        assert!(!met, "{v:#}");
        assert_eq!(v["nodes"][1]["under_share"], false);
        assert_eq!(v["nodes"][0]["under_share"], true);
    }

    fn cache_run(resident_mib: u64, faults: u64, p99s: [u64; 3], mib_per_s: f64) -> Value {
        cache_run_left(resident_mib, faults, p99s, mib_per_s, 0)
    }

    fn cache_run_left(
        resident_mib: u64,
        faults: u64,
        p99s: [u64; 3],
        mib_per_s: f64,
        left_mib: u64,
    ) -> Value {
        let phase = |i: usize| {
            json!({
                "p99_us": p99s[i],
                "vector_major_faults": if i == 1 { faults } else { 0 },
                "min_hot_resident_bytes": if i == 1 { resident_mib << 20 } else { 448 << 20 },
                "queries": 1000,
            })
        };
        json!({
            "index_bytes": 448u64 << 20,
            "phases": {"before": phase(0), "during": phase(1), "after": phase(2)},
            "quiet_p99_us": p99s[0].max(p99s[2]),
            "flush": {"mib_per_s": mib_per_s, "bytes": 2048u64 << 20, "left_cached_bytes": left_mib << 20},
        })
    }

    #[test]
    fn the_cache_criteria_judge_the_governed_run_against_the_ungoverned_one() {
        let ungoverned = cache_run(286, 316, [211, 55_786, 3469], 613.0);
        let good = cache_run(448, 0, [67, 75, 60], 855.0);
        let v = judge_cache(&good, &ungoverned, Timing::Gated);
        assert_eq!(v["met"], true, "{v:#}");
        assert!((v["ungoverned"]["p99_during_vs_before"].as_f64().unwrap() - 264.4).abs() < 0.1);
        // The p99's limit: 1.2 times the quiet one, or 100 µs above it,
        // whichever is more. 266 µs against 197 (1.35, 69 µs more) is
        // within it; 300 against 197 (103 µs more) is not; at 1,000 µs
        // quiet, 1.2 times rules (1,190 within, 1,210 not).
        for (quiet, during, ok) in [
            (197, 266, true),
            (197, 300, false),
            (1000, 1190, true),
            (1000, 1210, false),
        ] {
            let v = judge_cache(
                &cache_run(448, 0, [quiet, during, 150], 855.0),
                &ungoverned,
                Timing::Gated,
            );
            assert_eq!(
                v["p99_during_vs_quiet"]["ok"], ok,
                "{quiet} {during}: {v:#}"
            );
            assert_eq!(v["met"], ok, "{quiet} {during}: {v:#}");
        }
        // Under emulated timing the p99 is reported, not gated; the rest
        // still decide.
        let slow = cache_run(448, 0, [67, 181, 60], 855.0);
        let v = judge_cache(&slow, &ungoverned, Timing::Emulated);
        assert_eq!(v["p99_during_vs_quiet"]["ok"], false, "{v:#}");
        assert_eq!(v["p99_during_vs_quiet"]["gated"], false, "{v:#}");
        assert_eq!(v["met"], true, "{v:#}");
        let v = judge_cache(
            &cache_run(440, 0, [67, 181, 60], 855.0),
            &ungoverned,
            Timing::Emulated,
        );
        assert_eq!(v["met"], false, "{v:#}");
        // So is the throughput: reported, not gated, under emulation.
        let slow_disk = cache_run(448, 0, [67, 75, 60], 400.0);
        let v = judge_cache(&slow_disk, &ungoverned, Timing::Emulated);
        assert_eq!(v["flush_throughput_vs_ungoverned"]["ok"], false, "{v:#}");
        assert_eq!(v["flush_throughput_vs_ungoverned"]["gated"], false, "{v:#}");
        assert_eq!(v["met"], true, "{v:#}");
        assert_eq!(
            judge_cache(&slow_disk, &ungoverned, Timing::Gated)["met"],
            false
        );
        // `--timing reported` (the host's `cargo xtask test`): the timing
        // criteria are measured and reported as missed, with why they do
        // not decide; the index's residency and faults still do.
        for run in [&slow, &slow_disk] {
            let v = judge_cache(run, &ungoverned, Timing::Reported);
            assert_eq!(v["met"], true, "{v:#}");
            assert_eq!(v["timing_reported_why"], "a timed figure of one run");
        }
        let v = judge_cache(&slow, &ungoverned, Timing::Reported);
        assert_eq!(v["p99_during_vs_quiet"]["ok"], false, "{v:#}");
        let faulting = cache_run(448, 4, [67, 181, 60], 855.0);
        let v = judge_cache(&faulting, &ungoverned, Timing::Reported);
        assert_eq!(v["met"], false, "{v:#}");
        assert_eq!(v["major_faults_vs_ungoverned"]["gated"], true, "{v:#}");
        assert!(judge_cache(&slow, &ungoverned, Timing::Gated)["timing_reported_why"].is_null());
        // Each criterion alone fails the run.
        for (bad, criterion) in [
            (cache_run(440, 0, [67, 75, 60], 855.0), "hot_set_resident"),
            (
                cache_run(448, 4, [67, 75, 60], 855.0),
                "major_faults_vs_ungoverned",
            ),
            (
                cache_run(448, 0, [67, 75, 60], 550.0),
                "flush_throughput_vs_ungoverned",
            ),
            (
                cache_run_left(448, 0, [67, 75, 60], 855.0, 64),
                "flush_left_cached",
            ),
            // 368 µs during the flush against 267 quiet: 1.38 times and
            // 101 µs more.
            (
                cache_run(448, 0, [267, 368, 260], 855.0),
                "p99_during_vs_quiet",
            ),
        ] {
            let v = judge_cache(&bad, &ungoverned, Timing::Gated);
            assert_eq!(v["met"], false, "{criterion}: {v:#}");
            assert_eq!(v[criterion]["ok"], false, "{criterion}: {v:#}");
        }
        // A governed run that misses the criteria misses its target.
        let mut runs = vec![
            json!({"mode": "governed", "target_met": true, "workload": cache_run(448, 4, [67, 75, 60], 855.0)}),
            json!({"mode": "ungoverned", "target_met": false, "completed": true, "correct": true, "workload": ungoverned}),
        ];
        assert_eq!(cache_verdict(&mut runs, Timing::Gated)["met"], false);
        assert_eq!(runs[0]["target_met"], false);
        // A good governed run against a failed ungoverned one: no verdict
        // to pass by.
        let mut runs = vec![
            json!({"mode": "governed", "target_met": true, "workload": good}),
            json!({"mode": "ungoverned", "completed": false, "correct": false, "workload": null}),
        ];
        assert_eq!(cache_verdict(&mut runs, Timing::Gated)["met"], false);
        assert_eq!(runs[0]["target_met"], false);
    }
}
