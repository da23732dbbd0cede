//! The agent's own cost as what it governs grows: for each thread count,
//! an agent of its own governing processes (one per 20 threads, at most
//! `--max-processes`) whose engine threads allocate and free memory all
//! along, and the agent's CPU time (`utime + stime` from
//! `/proc/<agent>/stat`) per second of governing, with its mean tick (the
//! status's `ticks`). Prints one JSON object, a row per thread count.
//!
//! The memory churned per second is the same at every thread count
//! (`--churn-mib-per-s`, shared by the threads), so the curve shows what
//! more threads and processes cost the agent, not a machine saturated by
//! a thousand threads faulting flat out (at 256 KiB every 50 ms each, a
//! thousand threads would fault 5 GB/s).
//!
//! Run by `cargo xtask bench` (release, 10, 100 and 1,000 threads, 10 s
//! each) and by the enforcement tests on a small slice.
//!
//! `--child` runs one governed process: it connects, registers its
//! threads on the three engines in turn, prints `ready` once the agent has
//! placed them all, and churns until its stdin closes.

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor::EngineId;
use nodedb_governor_demo::{
    governed,
    memory::{Block, Kind},
};
use nodedb_governor_testkit::harness::agent::Agent;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Engine threads in all, per measurement (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [10, 100, 1000])]
    threads: Vec<usize>,
    /// At most this many governed processes (one per 20 threads).
    #[arg(long, default_value_t = 50)]
    max_processes: usize,
    /// Seconds of governing measured, per thread count.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Each thread maps, touches and unmaps this many KiB at a time...
    #[arg(long, default_value_t = 256)]
    churn_kib: usize,
    /// ...and all threads together churn this many MiB per second.
    #[arg(long, default_value_t = 100)]
    churn_mib_per_s: u64,
    /// A child's pause between two churns (internal: set by the parent).
    #[arg(long, default_value_t = 50)]
    pause_ms: u64,
    /// Runs as one governed process (internal).
    #[arg(long, requires_all = ["socket", "database"])]
    child: bool,
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long)]
    database: Option<String>,
}

const ENGINES: [EngineId; 3] = [EngineId::Vector, EngineId::Timeseries, EngineId::Query];
const THREADS_PER_PROCESS: usize = 20;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.child {
        return child(&args);
    }
    // A count the agent cannot serve is a row with its error, not the end
    // of the measurement.
    let mut rows = Vec::new();
    for &threads in &args.threads {
        rows.push(measure(&args, threads).unwrap_or_else(|e| {
            eprintln!("agent-scale: {threads} threads: {e:#}");
            json!({ "threads": threads, "error": format!("{e:#}") })
        }));
    }
    println!("{}", json!({ "seconds": args.seconds, "rows": rows }));
    Ok(())
}

/// `utime + stime` of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command's closing parenthesis: state is field 3, utime 14.
    let rest = stat.rsplit_once(')').context("stat without a command")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn measure(args: &Args, threads: usize) -> anyhow::Result<serde_json::Value> {
    let processes = threads
        .div_ceil(THREADS_PER_PROCESS)
        .clamp(1, args.max_processes);
    let agent = Agent::start(
        "scale",
        "ceiling = \"8GiB\"\n\
         [[engine]]\nname = \"vector\"\nbudget = \"30%\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"30%\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"30%\"\n",
    );
    let exe = std::env::current_exe()?;
    let mut children: Vec<Child> = Vec::new();
    for p in 0..processes {
        // The threads spread evenly, the first processes take the rest.
        let mine = threads / processes + usize::from(p < threads % processes);
        // Each thread's share of the churn rate.
        let pause_ms = (args.churn_kib as u64 * threads as u64 * 1000)
            .checked_div(args.churn_mib_per_s << 10)
            .unwrap_or(u64::MAX / 2)
            .max(1);
        let child = Command::new(&exe)
            .args(["--child", "--socket"])
            .arg(&agent.control)
            .args(["--database", &agent.database])
            .args(["--threads", &mine.to_string()])
            .args(["--churn-kib", &args.churn_kib.to_string()])
            .args(["--pause-ms", &pause_ms.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a governed process")?;
        children.push(child);
    }
    let ready = children.iter_mut().all(|c| {
        let mut line = String::new();
        c.stdout
            .as_mut()
            .is_some_and(|out| BufReader::new(out).read_line(&mut line).is_ok())
            && line.trim() == "ready"
    });
    if !ready {
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        bail!("a governed process did not get every thread placed within 30 s");
    }
    let status = agent.status_json();
    let clients = status["clients"].as_array().map_or(0, Vec::len);
    if clients != processes {
        bail!("the agent governs {clients} libraries, not {processes}");
    }
    // A second for the tick and the churn to settle, then the window.
    std::thread::sleep(Duration::from_secs(1));
    let ticks = |s: &serde_json::Value| {
        (
            s["ticks"]["ticks"].as_u64().unwrap_or(0),
            s["ticks"]["total_us"].as_u64().unwrap_or(0),
        )
    };
    let (t0, us0) = ticks(&agent.status_json());
    let cpu0 = cpu_seconds(agent.pid())?;
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(args.seconds));
    let cpu1 = cpu_seconds(agent.pid())?;
    let wall = started.elapsed().as_secs_f64();
    let end = agent.status_json();
    let (t1, us1) = ticks(&end);
    let attributed: u64 = ["vector", "timeseries", "query"]
        .iter()
        .map(|e| end["engines"][e]["page_faults"].as_u64().unwrap_or(0))
        .sum();
    for mut c in children {
        drop(c.stdin.take());
        let _ = c.wait();
    }
    let row = json!({
        "threads": threads,
        "processes": processes,
        "agent_cpu_percent": (cpu1 - cpu0) / wall * 100.0,
        "ticks": t1 - t0,
        "mean_tick_us": (us1 - us0) as f64 / (t1 - t0).max(1) as f64,
        "engine_page_faults": attributed,
        "churn_mib_per_s": args.churn_mib_per_s,
        "tick_period_ms": end["ticks"]["period_ms"],
        "calm_ticks": end["ticks"]["calm_ticks"],
    });
    eprintln!("agent-scale: {row}");
    Ok(row)
}

fn child(args: &Args) -> anyhow::Result<()> {
    let socket = args.socket.as_ref().context("--socket")?;
    let database = args.database.as_deref().context("--database")?;
    let threads = *args.threads.first().context("--threads")?;
    let (_governor, link) = governed::connect(socket, database, &governed::ENGINES, None)?;
    let link = Arc::new(link);
    let stop = Arc::new(AtomicBool::new(false));
    let (placed_tx, placed_rx) = std::sync::mpsc::channel();
    let mut workers = Vec::new();
    for i in 0..threads {
        let (link, stop, placed) = (link.clone(), stop.clone(), placed_tx.clone());
        let (churn, pause) = (args.churn_kib << 10, Duration::from_millis(args.pause_ms));
        workers.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let tid = link.register_current_thread(ENGINES[i % ENGINES.len()])?;
            let ok = link.wait_placed(tid, Duration::from_secs(30));
            let _ = placed.send(ok);
            if !ok {
                bail!("thread {tid} was not placed");
            }
            // Mapped, touched and unmapped each time: the kernel sees every
            // page come and go (an allocator would keep them).
            while !stop.load(Ordering::Relaxed) {
                drop(Block::new(Kind::Anon, churn)?);
                std::thread::sleep(pause);
            }
            Ok(())
        }));
    }
    drop(placed_tx);
    if placed_rx.iter().take(threads).any(|ok| !ok) {
        bail!("the agent did not place every thread");
    }
    println!("ready");
    std::io::stdout().flush()?;
    // Until the parent closes stdin.
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
    }
    Ok(())
}
