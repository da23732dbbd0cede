//! Runs inside the test VM (`cargo xtask vm-test`), where cgroup v2 has
//! the memory controller: starts the agent on a configuration of its own,
//! runs the probes against it, and checks what only such a kernel shows:
//! the ceiling as `memory.max`/`memory.high` on the database's cgroup, an
//! own-process engine's `memory.high` (and the kernel acting on it), a
//! privileged PSI trigger, and the ladder end to end. Writes its result
//! to `<work>/result.json` (the VM's init sends it to the host on the
//! second serial port), prints one line per check, and exits 0 when every
//! check passed.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor_testkit::{
    harness::{Reaped, launch::launch, probes::probe_command, relocated, status::read_status},
    wait::try_poll,
};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

#[derive(Parser)]
struct Args {
    /// Where the agent and the probes are.
    #[arg(long, default_value = "/bin")]
    bin_dir: PathBuf,
    /// A scratch directory (the agent's run directory).
    #[arg(long, default_value = "/tmp/vm-check")]
    work: PathBuf,
    /// A directory on a disk-backed filesystem for the page-cache checks
    /// (`none`: the VM has no disk, which fails them).
    #[arg(long, default_value = "none")]
    disk: PathBuf,
    /// Breaches the ladder check drives (each one timed, breach to spill).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    breach_rounds: u32,
}

struct Checks {
    results: Vec<Value>,
    failed: bool,
}

impl Checks {
    fn record(&mut self, name: &str, r: anyhow::Result<Value>) {
        match r {
            Ok(detail) => {
                eprintln!("vm-check: ok   {name}: {detail}");
                self.results
                    .push(json!({"name": name, "ok": true, "detail": detail}));
            }
            Err(e) => {
                eprintln!("vm-check: FAIL {name}: {e:#}");
                self.failed = true;
                self.results
                    .push(json!({"name": name, "ok": false, "detail": format!("{e:#}")}));
            }
        }
    }
}

fn read_u64(path: &Path) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("{}: {s:?}", path.display()))
}

fn keyed(path: &Path, key: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    s.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .with_context(|| format!("no {key} in {}", path.display()))
}

fn wait_until(
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    if !try_poll(timeout, Duration::from_millis(50), f)? {
        bail!("timed out after {timeout:?} waiting for {what}");
    }
    Ok(())
}

struct Env {
    bin: PathBuf,
    work: PathBuf,
    database: String,
}

impl Env {
    fn status(&self) -> anyhow::Result<Value> {
        Ok(read_status(
            &self.bin.join("nodedb-governor"),
            &self.work.join("agent.sock"),
        )?)
    }

    fn probe(&self, name: &str, args: &[&str]) -> Command {
        let mut c = probe_command(
            &self.bin.join(name),
            &self.work.join("control.sock"),
            &self.database,
        );
        c.args(args);
        c
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let env = Env {
        bin: args.bin_dir.clone(),
        work: args.work.clone(),
        database: "vmcheck".into(),
    };
    let config = args.work.join("governor.toml");
    // With two nodes, two engines placed one per node, each budget split
    // evenly over the nodes, for the ladder per node (floors at their
    // budgets: no loans between them, so the shares stay put).
    let placed = placed_engines()?;
    std::fs::write(
        &config,
        format!(
            "database = \"vmcheck\"\nrun_dir = \"{}\"\nceiling = \"512MiB\"\n\
             [pressure_stall]\nstall_ms = 50\nwindow_ms = 1000\n\
             [[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\nhot_set = \"32MiB\"\n\
             [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\n\
             [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\nessential = false\n\
             [[engine]]\nname = \"sparse\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\nown_process = true\n{}",
            args.work.display(),
            placed
                .iter()
                .map(|(engine, cpus, _)| format!(
                    "[[engine]]\nname = \"{engine}\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\n\
                     cpus = \"{cpus}\"\nnode_weights = [{}]\n",
                    vec!["1"; nodedb_governor_testkit::numa::online_nodes().map_or(1, |n| n.len())]
                        .join(", ")
                ))
                .collect::<String>()
        ),
    )?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mut checks = Checks {
        results: Vec::new(),
        failed: false,
    };
    let started = Instant::now();
    let agent = launch(
        &env.bin.join("nodedb-governor"),
        &config,
        &args.work.join("agent.log"),
        &[
            &args.work.join("control.sock"),
            &args.work.join("agent.sock"),
        ],
        &[],
        Duration::from_secs(180),
    );
    let agent_log = || std::fs::read_to_string(args.work.join("agent.log")).unwrap_or_default();
    let _agent: Reaped = match agent {
        Ok(agent) => agent,
        Err(e) => {
            checks.record(
                "agent starts",
                Err(anyhow::Error::new(e).context(agent_log())),
            );
            return finish(&args.work, &kernel, checks, Value::Null);
        }
    };
    checks.record(
        "agent starts",
        Ok(json!({"seconds": started.elapsed().as_secs_f64()})),
    );

    checks.record("verifier margin", verifier_margin(&env));

    // The ceiling and the own-process engine's high mark, in the kernel.
    let status = env.status()?;
    let domain = PathBuf::from(status["cgroup"].as_str().unwrap_or_default());
    checks.record(
        "ceiling on cgroup v2",
        (|| {
            let c = &status["ceiling"];
            if c["backend"] != "cgroup-v2" {
                bail!("backend {} ({})", c["backend"], status["ceiling_error"]);
            }
            let max = read_u64(&domain.join("memory.max"))?;
            let high = read_u64(&domain.join("memory.high"))?;
            // The kernel keeps memory.high in whole pages.
            if max != 512 * MIB || high != ((512 * MIB) * 9 / 10) & !4095 {
                bail!("memory.max {max}, memory.high {high}");
            }
            Ok(json!({"memory.max": max, "memory.high": high}))
        })(),
    );
    checks.record(
        "hot sets protected by memory.low",
        (|| {
            let low = read_u64(&domain.join("memory.low"))?;
            let shown = &status["ceiling"]["protected_bytes"];
            if low != 32 * MIB || shown != 32 * MIB {
                bail!("memory.low {low}, status protected_bytes {shown}");
            }
            Ok(json!({"memory.low": low}))
        })(),
    );
    let own = domain.join("proc-sparse");
    checks.record(
        "own-process engine's memory.high",
        (|| {
            let high = read_u64(&own.join("memory.high"))?;
            if high != 64 * MIB {
                bail!("memory.high {high}");
            }
            Ok(json!({"memory.high": high}))
        })(),
    );
    checks.record(
        "privileged PSI trigger",
        (|| {
            let p = &status["psi"];
            if p["window_us"] != 1_000_000 || p["window_rounded"] != false {
                bail!("psi {p} ({})", status["psi_error"]);
            }
            Ok(p.clone())
        })(),
    );

    // The ladder end to end: breaches by memory only the kernel knows of.
    let mut breach = Value::Null;
    checks.record(
        "breach to spill",
        (|| {
            let out = env
                .probe(
                    "breach-probe",
                    &["--rounds", &args.breach_rounds.to_string()],
                )
                .stderr(Stdio::inherit())
                .output()?;
            if !out.status.success() {
                bail!("breach-probe failed");
            }
            let r: Value = serde_json::from_slice(&out.stdout)?;
            breach = r["latency_us"].clone();
            // The kernel's marks woke the agent for these breaches.
            let marks = env.status()?["marks"].clone();
            if marks["events"].as_u64() < Some(u64::from(args.breach_rounds)) {
                bail!("the marks reported fewer crossings than breaches: {marks}");
            }
            breach["marks"] = marks;
            Ok(breach.clone())
        })(),
    );

    // The ladder per node: the engine placed on the last node is driven
    // over its share there (half its budget) by memory it never reserved,
    // far below its budget in all; it is spilled, and the engine on the
    // first node, under its share, hears nothing.
    if let [(quiet, _, _), (engine, _, node)] = placed.as_slice() {
        checks.record(
            "the ladder per NUMA node",
            (|| {
                let out = env
                    .probe(
                        "breach-probe",
                        &[
                            "--rounds",
                            &args.breach_rounds.to_string(),
                            "--engine",
                            engine,
                            "--node",
                            &node.to_string(),
                            "--quiet",
                            quiet,
                            "--admin",
                            &env.work.join("agent.sock").to_string_lossy(),
                        ],
                    )
                    .stderr(Stdio::inherit())
                    .output()?;
                if !out.status.success() {
                    bail!("breach-probe failed");
                }
                let r: Value = serde_json::from_slice(&out.stdout)?;
                if r["quiet_spills"] != 0 {
                    bail!("the engine under its shares was asked to spill: {r}");
                }
                if r["rounds"].as_array().map(Vec::len) != Some(args.breach_rounds as usize) {
                    bail!("not every breach was spilled: {r}");
                }
                Ok(json!({
                    "judged_on_bytes": r["budget_bytes"],
                    "besides_blocks_bytes": r["besides_blocks_bytes"],
                    "latency_us": r["latency_us"],
                    "quiet_spills": r["quiet_spills"],
                    "early_spills": r["early_spills"],
                    "spill_requests": r["spill_requests"],
                }))
            })(),
        );
    }

    // An own-process engine: attributed, charged to its cgroup, spilled
    // at Critical; then pushed past its memory.high, where the kernel
    // throttles it.
    checks.record(
        "own-process engine governed",
        (|| {
            let probe = Reaped(
                env.probe("hold-probe", &["--engine", "sparse", "--mib", "60"])
                    .stdout(Stdio::null())
                    .spawn()?,
            );
            let pid = probe.id();
            wait_until("spill requests", Duration::from_secs(60), || {
                let s = env.status()?;
                Ok(s["clients"].as_array().into_iter().flatten().any(|c| {
                    c["pid"] == pid && c["engines"]["sparse"]["spill_requests"].as_u64() >= Some(1)
                }))
            })?;
            let procs = std::fs::read_to_string(own.join("cgroup.procs"))?;
            if !procs.lines().any(|l| l.trim() == pid.to_string()) {
                bail!("pid {pid} is not in {}", own.display());
            }
            let current = read_u64(&own.join("memory.current"))?;
            if current < 58 * MIB {
                bail!("memory.current {current}");
            }
            Ok(json!({"memory.current": current}))
        })(),
    );
    checks.record("the kernel throttles above memory.high", (|| {
        let before = keyed(&own.join("memory.events"), "high")?;
        let mut probe = Reaped(
            env.probe("hold-probe", &["--engine", "sparse", "--mib", "80"])
                .stdout(Stdio::piped())
                .spawn()?,
        );
        let mut line = String::new();
        let stdout = probe.stdout.take().context("probe stdout")?;
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let after = keyed(&own.join("memory.events"), "high")?;
        if after <= before {
            bail!("memory.events high {before} -> {after}");
        }
        Ok(json!({"high_events": after - before, "probe": serde_json::from_str::<Value>(&line).unwrap_or_default()}))
    })());
    checks.record(
        "attribution accuracy, RSS, page cache and NUMA nodes (the host's test)",
        host_test(
            &env.bin,
            "attribution_accuracy",
            // The cgroup identity path (what a v2 kernel is for): the TID
            // map's path has the same programs and runs on the host; and
            // two engines taking turns on one CPU (6.12's per-CPU RSS
            // counters, 6.1's per-thread ones).
            &[
                "accuracy_with_cgroup_identity",
                "per_node_attribution",
                "engines_taking_turns",
            ],
            &args.disk,
        )
        .map(|text| {
            let lines = |prefix: &str| -> Vec<&str> {
                text.lines().filter(|l| l.starts_with(prefix)).collect()
            };
            let (read, placed, moved, turns) = (
                lines("[read by another engine]"),
                lines("[placed]"),
                lines("[moved, then freed]"),
                lines("[taking turns on one CPU]"),
            );
            let page_cache: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("page cache truth"))
                .collect();
            let rss: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("[file unmapped]"))
                .collect();
            json!({
                "result": result_line(&text),
                "page_cache": page_cache,
                "rss_last_checkpoint": rss,
                "read_by_another_engine": read,
                "nodes_placed": placed,
                "nodes_thread_moved": moved,
                "taking_turns_on_one_cpu": turns,
            })
        }),
    );
    checks.record(
        "the uncached writer's path and what it leaves cached (the host's test)",
        host_test(&env.bin, "page_cache", &[], &args.disk)
            .map(|text| json!({"result": result_line(&text)})),
    );
    checks.record(
        "cold files dropped first, hot sets locked and released (the host's test)",
        host_test(&env.bin, "engine_cache", &[], &args.disk)
            .map(|text| json!({"result": result_line(&text)})),
    );
    checks.record(
        // The cgroup v2 path of `[cpuset]` (the host's is v1).
        "the database kept to its cpuset, changed and let go on reload (the host's test)",
        host_test(&env.bin, "enforcement", &["placement::"], &args.disk)
            .map(|text| json!({"result": result_line(&text)})),
    );
    checks.record(
        "NUMA nodes as booted, first touch, and the library on them",
        numa_check(&env),
    );
    finish(&args.work, &kernel, checks, breach)
}

/// With two NUMA nodes or more: `(engine, cpus, node)` of the engine
/// placed on the first node and of the one placed on the last.
/// The most instructions the verifier may process for one program before
/// this check fails: 40% of the kernel's limit (1,000,000), so a change
/// that brings a program near the limit on some kernel fails here, with
/// the figures, before an agent on that kernel cannot start.
const VERIFIER_MARGIN: u64 = 400_000;

/// Every loaded program's verified instruction count, each under
/// [`VERIFIER_MARGIN`].
fn verifier_margin(env: &Env) -> anyhow::Result<Value> {
    let mut programs = Vec::new();
    wait_until(
        "the programs in the status",
        Duration::from_secs(10),
        || {
            programs = env.status()?["programs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Ok(!programs.is_empty())
        },
    )?;
    let mut counts: Vec<(String, u64)> = programs
        .iter()
        .map(|p| {
            let name = p["name"].as_str().unwrap_or_default().to_owned();
            match p["verified_insns"].as_u64() {
                Some(n) => Ok((name, n)),
                None => Err(anyhow::anyhow!("no verified instruction count for {name}")),
            }
        })
        .collect::<anyhow::Result<_>>()?;
    counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    let over: Vec<_> = counts
        .iter()
        .filter(|(_, n)| *n > VERIFIER_MARGIN)
        .collect();
    if !over.is_empty() {
        bail!("over {VERIFIER_MARGIN} verified instructions: {over:?} (all: {counts:?})");
    }
    Ok(json!(counts.iter().take(4).collect::<Vec<_>>()))
}

fn placed_engines() -> anyhow::Result<Vec<(String, String, u32)>> {
    use nodedb_governor_testkit::numa;
    let nodes = numa::online_nodes()?;
    let (Some(&first), Some(&last)) = (nodes.first(), nodes.last()) else {
        return Ok(Vec::new());
    };
    if first == last {
        return Ok(Vec::new());
    }
    let cpus = |node: u32| -> anyhow::Result<String> {
        Ok(numa::node_cpus(node)?
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","))
    };
    Ok(vec![
        ("crdt".into(), cpus(first)?, first),
        ("wal".into(), cpus(last)?, last),
    ])
}

/// The nodes the VM was booted with (`nodedb.numa_nodes=N` on the kernel
/// command line; 1 without it) are the kernel's, each with CPUs and
/// memory; with two or more, a thread pinned to a node's CPUs that first
/// touches 64 MiB gets at least 95% of its pages there (`numa_maps`), and
/// `numa-probe` runs the library on the nodes (arenas per node, the budget
/// split across them), and the agent's status shows every node with the
/// database cgroup's memory on it (`memory.numa_stat`).
fn numa_check(env: &Env) -> anyhow::Result<Value> {
    use nodedb_governor_testkit::numa;
    let cmdline = std::fs::read_to_string("/proc/cmdline").context("reading /proc/cmdline")?;
    let booted: usize = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("nodedb.numa_nodes="))
        .map_or(Ok(1), str::parse)
        .context("nodedb.numa_nodes on the kernel command line")?;
    if !Path::new("/sys/devices/system/node").exists() {
        if booted == 1 {
            return Ok(json!("one node: the kernel has no NUMA support"));
        }
        bail!("booted with {booted} nodes, and the kernel has no NUMA support");
    }
    let nodes = numa::online_nodes()?;
    if nodes.len() != booted {
        bail!("booted with {booted} nodes, the kernel has {nodes:?}");
    }
    let mut detail = Vec::new();
    for &node in &nodes {
        let cpus = numa::node_cpus(node)?;
        let memory = numa::node_memory_bytes(node)?;
        if cpus.is_empty() || memory == 0 {
            bail!("node {node} has CPUs {cpus:?} and {memory} bytes of memory");
        }
        let on_node = if nodes.len() > 1 {
            let pages = std::thread::scope(|s| {
                s.spawn(|| -> anyhow::Result<_> {
                    numa::pin_current_thread(&cpus)?;
                    let mut region = memmap2::MmapMut::map_anon((64 * MIB) as usize)?;
                    for page in region.chunks_mut(4096) {
                        page[0] = 1;
                    }
                    numa::mapping_pages_by_node(region.as_ptr() as usize)
                })
                .join()
                .map_err(|_| anyhow::anyhow!("the pinned thread panicked"))?
            })?;
            let total: u64 = pages.values().sum();
            let here = pages.get(&node).copied().unwrap_or(0);
            if total == 0 || (here as f64) < 0.95 * total as f64 {
                bail!(
                    "a thread on node {node}'s CPUs {cpus:?} touched 64 MiB; its pages by node: {pages:?}"
                );
            }
            Some(here as f64 / total as f64)
        } else {
            None
        };
        detail.push(json!({
            "node": node,
            "cpus": cpus,
            "memory_bytes": memory,
            "first_touch_on_node": on_node,
        }));
    }
    // The agent's per-node status: every node, the database cgroup's
    // memory on it (memory.numa_stat) and its share of the ceiling.
    let status = env.status()?;
    let agent = status["numa"].as_array().cloned().unwrap_or_default();
    let seen: Vec<u64> = agent.iter().filter_map(|n| n["node"].as_u64()).collect();
    let want: Vec<u64> = nodes.iter().map(|&n| u64::from(n)).collect();
    if seen != want
        || agent.iter().any(|n| {
            n["database_anon_bytes"].as_u64().is_none()
                || n["ceiling_share_bytes"].as_u64().is_none()
        })
    {
        bail!(
            "the agent's per-node status, for nodes {want:?}: {} (error: {})",
            status["numa"],
            status["numa_error"]
        );
    }
    // Where the kernel has NUMA balancing, the program that tells its
    // hinting faults apart runs (it is optional to the agent, not here).
    let programs: Vec<&str> = status["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    if Path::new("/proc/sys/kernel/numa_balancing").exists()
        && !programs.contains(&"task_numa_fault")
    {
        bail!("NUMA balancing is built in, and task_numa_fault is not loaded: {programs:?}");
    }
    if nodes.len() < 2 {
        return Ok(json!({"nodes": detail, "agent": agent}));
    }
    let out = Command::new(env.bin.join("numa-probe"))
        .output()
        .context("running numa-probe")?;
    if !out.status.success() {
        bail!(
            "numa-probe {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let library: Value = serde_json::from_slice(&out.stdout).context("numa-probe's JSON")?;
    Ok(json!({"nodes": detail, "library": library, "agent": agent}))
}

fn result_line(text: &str) -> String {
    text.lines()
        .find(|l| l.starts_with("test result:"))
        .unwrap_or_default()
        .to_owned()
}

/// Runs the integration test binary `name` (copied in as it was built),
/// its tests matching `filter` (all when empty), with its probes in `bin`
/// and its files on `disk`; returns what it printed, or fails when a test
/// failed or skipped.
fn host_test(bin: &Path, name: &str, filter: &[&str], disk: &Path) -> anyhow::Result<String> {
    if !disk.is_dir() {
        bail!(
            "no disk-backed directory ({}): page cache on tmpfs is not traced",
            disk.display()
        );
    }
    let out = Command::new(bin.join(name))
        .args(["--test-threads=1", "--nocapture"])
        .args(filter)
        .env(relocated::BIN_DIR_ENV, bin)
        .env(relocated::DISK_DIR_ENV, disk)
        .env(
            nodedb_governor_testkit::harness::agent_binary::AGENT_BIN_ENV,
            bin.join("nodedb-governor"),
        )
        .env("NODEDB_GOVERNOR_REQUIRE_PRIVILEGED", "1")
        .output()
        .with_context(|| format!("running {name}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !text.contains("test result: ok") || text.contains("skipping ") {
        let tail: Vec<&str> = text.lines().rev().take(30).collect();
        bail!(
            "{name} failed or skipped ({}):\n{}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(text)
}

fn finish(work: &Path, kernel: &str, checks: Checks, breach: Value) -> anyhow::Result<()> {
    let result = json!({
        "kernel": kernel,
        "passed": !checks.failed,
        "checks": checks.results,
        "breach_latency_us": breach,
    });
    let file = work.join("result.json");
    std::fs::write(&file, serde_json::to_vec(&result)?)
        .with_context(|| format!("writing {}", file.display()))?;
    println!(
        "vm-check: {} ({})",
        if checks.failed { "FAILED" } else { "passed" },
        file.display()
    );
    if checks.failed {
        std::process::exit(1);
    }
    Ok(())
}
