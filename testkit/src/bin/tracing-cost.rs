//! The cost and accuracy of kernel attribution, measured in one run (root).
//!
//! Cost: a page-fault-heavy loop (map 64 MiB, write every page, unmap), an
//! mmap/munmap loop (map 64 KiB, touch a page, unmap) and a page-cache loop
//! (64 MiB of buffered writes to a file under `--dir`, then truncated: an
//! add and a delete per page, no disk I/O), each run with no programs
//! attached, with the full set, with each counting source alone and with
//! the page-cache programs alone, and with a bpftrace script that keeps the
//! same per-thread counts on the same tracepoints
//! (`testkit/bpftrace/per-thread-resident.bt`: what a user would write
//! instead, and the comparison for our cost). The process is governed
//! (registered, its thread assigned to an engine), so the programs take
//! their full path. Configurations are interleaved round by round; each
//! is reported as the median time over rounds and as the median, first
//! and third quartile of its per-round ratios to the untraced run of the
//! same round.
//!
//! Accuracy: what each source says for memory whose fault count and page
//! count differ (a THP-backed region, a file read through fault-around, a
//! read-only anonymous region backed by the zero page), against VmRSS.
//!
//! Prints a markdown report; `--json FILE` also writes the figures.

use std::{collections::BTreeMap, path::PathBuf, time::Instant};

use clap::Parser;
use nodedb_governor_agent::{
    attribution::{Attribution, ProgramSet},
    procfs,
};
use nodedb_governor_demo::memory::{self, Block, Kind, MIB, PAGE};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 7)]
    rounds: u32,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Measure only the untraced baseline and this configuration
    /// (full, faults, rss, floor, page-cache; bpftrace: the full set and
    /// the script), and skip the accuracy table.
    #[arg(long)]
    only: Option<String>,
    /// Profiling aid: keep the full set attached and run the fault loop for
    /// this many seconds (read per-program times with `bpftool prog show`
    /// and `kernel.bpf_stats_enabled=1` meanwhile), then exit.
    #[arg(long)]
    hold_seconds: Option<u64>,
    /// Where the page-cache loop writes its file: a disk-backed
    /// filesystem (tmpfs pages are not page-cache adds).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, serde::Serialize)]
enum Config {
    Untraced,
    Full,
    FaultsOnly,
    RssOnly,
    Floor,
    PageCacheOnly,
    Bpftrace,
}

impl Config {
    fn label(self) -> &'static str {
        match self {
            Config::Untraced => "untraced",
            Config::Full => "all programs (agent)",
            Config::FaultsOnly => "page_fault_user only",
            Config::RssOnly => "rss_stat only",
            Config::Floor => "empty programs on the same fault-path tracepoints (floor)",
            Config::PageCacheOnly => "filemap add/delete only (page cache)",
            Config::Bpftrace => "bpftrace script, same counts (comparison)",
        }
    }
}

const CONFIGS: [Config; 7] = [
    Config::Untraced,
    Config::Full,
    Config::FaultsOnly,
    Config::RssOnly,
    Config::Floor,
    Config::PageCacheOnly,
    Config::Bpftrace,
];

/// The comparison: per-thread counts kept by bpftrace.
const BPFTRACE_SCRIPT: &str = include_str!("../../bpftrace/per-thread-resident.bt");

/// What a configuration attached; detaches when dropped.
enum Attached {
    // Held, not read: the programs stay attached while it lives.
    Ours(#[allow(dead_code)] Box<Attribution>),
    Bpftrace(std::process::Child),
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Attached::Bpftrace(child) = self {
            // SIGINT: bpftrace runs END and detaches.
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// Starts the bpftrace script on this process and waits until every
/// probe is attached (it prints "ready" from BEGIN, which runs after).
fn bpftrace() -> std::process::Child {
    use std::io::BufRead;
    let mut child = std::process::Command::new("bpftrace")
        .args(["-q", "-e", BPFTRACE_SCRIPT])
        .arg(std::process::id().to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("starting bpftrace: {e} (the setup step installs Debian's bpftrace)")
        });
    let mut out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    let ready = out.read_line(&mut line).is_ok() && line.trim() == "ready";
    if !ready {
        let _ = child.kill();
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        panic!("bpftrace did not attach: {line}{err}");
    }
    // Whatever it prints later (nothing but END's empty maps) goes
    // nowhere; stderr too, so neither pipe fills.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    if let Some(mut e) = child.stderr.take() {
        std::thread::spawn(move || std::io::copy(&mut e, &mut std::io::sink()));
    }
    child
}

fn gettid() -> u32 {
    // SAFETY: no preconditions.
    unsafe { libc::gettid() as u32 }
}

fn attach(config: Config) -> Option<Attached> {
    let set = match config {
        Config::Untraced => return None,
        Config::Bpftrace => return Some(Attached::Bpftrace(bpftrace())),
        Config::Full => ProgramSet::Full,
        Config::FaultsOnly => ProgramSet::FaultsOnly,
        Config::RssOnly => ProgramSet::RssOnly,
        Config::Floor => ProgramSet::Floor,
        Config::PageCacheOnly => ProgramSet::PageCacheOnly,
    };
    Some(Attached::Ours(Box::new(ours(set))))
}

/// Our programs of `set`, governing this process (its thread in engine
/// "bench").
fn ours(set: ProgramSet) -> Attribution {
    let mut att = Attribution::load(set).expect("loading the eBPF programs");
    let pid = std::process::id();
    att.register_process(pid, &["bench".to_owned()])
        .expect("registering");
    att.assign_tid(pid, gettid(), "bench").expect("assigning");
    att
}

/// ns per page of: map 64 MiB, write every page, unmap (x4).
fn fault_loop() -> f64 {
    let len = 64 * MIB;
    let start = Instant::now();
    for _ in 0..4 {
        drop(Block::new(Kind::Anon, len).expect("mmap"));
    }
    start.elapsed().as_nanos() as f64 / (4 * len / PAGE) as f64
}

/// Maps of the mmap loop.
const MMAP_OPS: usize = 20_000;

/// ns per map + touch + unmap of 64 KiB.
fn mmap_loop() -> f64 {
    let n = MMAP_OPS;
    let start = Instant::now();
    for _ in 0..n {
        drop(Block::new(Kind::Anon, 64 * 1024).expect("mmap"));
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// ns per 4 KiB page of: 64 MiB written to `file` in 64 KiB buffered
/// writes (a page-cache add each page), then truncated to nothing (a
/// delete each page, before any writeback: no disk I/O) (x4).
fn page_cache_loop(file: &std::fs::File) -> f64 {
    use std::os::unix::fs::FileExt;
    let len = 64 * MIB;
    let chunk = vec![7u8; 64 * 1024];
    let start = Instant::now();
    for _ in 0..4 {
        for off in (0..len).step_by(chunk.len()) {
            file.write_all_at(&chunk, off as u64).expect("writing");
        }
        file.set_len(0).expect("truncating");
    }
    start.elapsed().as_nanos() as f64 / (4 * len / PAGE) as f64
}

fn median(v: &mut [f64]) -> f64 {
    quantiles(v).1
}

/// First quartile, median and third quartile (the quartiles rounded
/// outwards, so a few rounds give the widest honest spread).
fn quantiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let last = (v.len() - 1) as f64;
    let (q1, q3) = ((last * 0.25).floor(), (last * 0.75).ceil());
    (v[q1 as usize], v[v.len() / 2], v[q3 as usize])
}

/// A ratio's median and its spread over rounds.
#[derive(serde::Serialize)]
struct Ratio {
    median: f64,
    q1: f64,
    q3: f64,
}

#[derive(serde::Serialize)]
struct CostRow {
    config: Config,
    fault_ns_per_page: f64,
    fault_ratio: Ratio,
    mmap_ns_per_op: f64,
    mmap_ratio: Ratio,
    page_cache_ns_per_page: f64,
    page_cache_ratio: Ratio,
}

/// One program's own time on the fault and mmap loops, from the kernel's
/// program statistics (the time inside the program: what attaching any
/// program costs, the floor, comes on top).
#[derive(serde::Serialize)]
struct ProgramRow {
    program: String,
    fault_runs_per_page: f64,
    fault_ns_per_run: f64,
    /// Its time per page, as a share of an untraced page fault.
    fault_share: f64,
    mmap_runs_per_op: f64,
    mmap_ns_per_run: f64,
    mmap_share: f64,
}

/// Runs the fault and mmap loops under the full set with the kernel's
/// program statistics on, and splits the programs' time by program. The
/// shares are against the untraced loops' times (medians of the rounds).
/// The statistics are the programs' own, over every process: run it on a
/// quiet host (others' events on the same tracepoints, mostly the cheap
/// early exit, would add runs and lower the time per run).
fn program_costs(untraced_fault_ns: f64, untraced_mmap_ns: f64) -> Vec<ProgramRow> {
    let _stats =
        nodedb_governor_agent::attribution::program_stats_on().unwrap_or_else(|e| panic!("{e}"));
    let att = ours(ProgramSet::Full);
    let read = || -> BTreeMap<String, (u64, u64)> {
        att.program_stats()
            .into_iter()
            .map(|p| (p.name, (p.run_count, p.run_time_ns)))
            .collect()
    };
    let delta = |before: &BTreeMap<String, (u64, u64)>, after: &BTreeMap<String, (u64, u64)>| {
        after
            .iter()
            .map(|(name, (runs, ns))| {
                let (r0, n0) = before.get(name).copied().unwrap_or_default();
                (name.clone(), (runs - r0, ns - n0))
            })
            .collect::<BTreeMap<_, _>>()
    };
    fault_loop(); // warm-up
    const FAULT_LOOPS: usize = 5;
    let before = read();
    for _ in 0..FAULT_LOOPS {
        fault_loop();
    }
    let faults = delta(&before, &read());
    let pages = (FAULT_LOOPS * 4 * 64 * MIB / PAGE) as f64;
    let before = read();
    mmap_loop();
    let mmaps = delta(&before, &read());
    let ops = MMAP_OPS as f64;
    faults
        .iter()
        .filter(|(name, (runs, _))| *runs > 0 || mmaps.get(*name).is_some_and(|m| m.0 > 0))
        .map(|(name, &(runs, ns))| {
            let (m_runs, m_ns) = mmaps.get(name).copied().unwrap_or_default();
            let per_run = |ns: u64, runs: u64| {
                if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                }
            };
            ProgramRow {
                program: name.clone(),
                fault_runs_per_page: runs as f64 / pages,
                fault_ns_per_run: per_run(ns, runs),
                fault_share: ns as f64 / pages / untraced_fault_ns,
                mmap_runs_per_op: m_runs as f64 / ops,
                mmap_ns_per_run: per_run(m_ns, m_runs),
                mmap_share: m_ns as f64 / ops / untraced_mmap_ns,
            }
        })
        .collect()
}

#[derive(serde::Serialize)]
struct AccuracyRow {
    case: &'static str,
    truth_mib: f64,
    rss_stat_mib: f64,
    faults_x_4k_mib: f64,
}

fn accuracy() -> Vec<AccuracyRow> {
    let att = ours(ProgramSet::Full);
    let pid = std::process::id();
    let read = || {
        let u = att.read().expect("usage");
        let p = u
            .processes
            .into_iter()
            .find(|p| p.pid == pid)
            .expect("governed");
        let e = p.engines["bench"];
        (e.resident_bytes, e.page_faults)
    };
    let rss = || procfs::rss_breakdown(pid).expect("rss").total();
    let mut rows = Vec::new();
    let mut case = |name: &'static str, make: &dyn Fn() -> Vec<Block>| {
        let (r0, f0, t0) = {
            let (r, f) = read();
            (r, f, rss())
        };
        let held = make();
        let (r1, f1) = read();
        let t1 = rss();
        rows.push(AccuracyRow {
            case: name,
            truth_mib: (t1 as f64 - t0 as f64) / MIB as f64,
            rss_stat_mib: (r1 as f64 - r0 as f64) / MIB as f64,
            faults_x_4k_mib: ((f1 - f0) * PAGE as u64) as f64 / MIB as f64,
        });
        drop(held);
    };
    case("anon 64 MiB, THP (MADV_HUGEPAGE)", &|| {
        vec![huge_block(64 * MIB)]
    });
    case("file 64 MiB read (fault-around)", &|| {
        vec![Block::new(Kind::File, 64 * MIB).expect("file")]
    });
    case("anon 64 MiB read-only (zero page)", &|| {
        vec![zero_page_block(64 * MIB)]
    });
    case("anon 64 MiB written, 4 KiB pages", &|| {
        vec![Block::new(Kind::Anon, 64 * MIB).expect("anon")]
    });
    rows
}

/// A 2 MiB-aligned anonymous region with MADV_HUGEPAGE, written.
fn huge_block(len: usize) -> Block {
    raw_region(len, true, true)
}

/// An anonymous region only read: every fault maps the shared zero page.
fn zero_page_block(len: usize) -> Block {
    raw_region(len, false, false)
}

fn raw_region(len: usize, huge: bool, write: bool) -> Block {
    // Over-map by 2 MiB to align, as allocators do for huge pages.
    let align = 2 * MIB;
    // SAFETY: fresh private anonymous mapping; all pointer arithmetic stays
    // inside it; the trimmed edges are unmapped before use.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len + align,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        ) as usize;
        assert_ne!(p, libc::MAP_FAILED as usize, "mmap");
        let start = p.div_ceil(align) * align;
        if start > p {
            libc::munmap(p as *mut _, start - p);
        }
        let end = start + len;
        if p + len + align > end {
            libc::munmap(end as *mut _, p + len + align - end);
        }
        if huge {
            libc::madvise(start as *mut _, len, libc::MADV_HUGEPAGE);
        }
        for off in (0..len).step_by(PAGE) {
            let q = (start + off) as *mut u8;
            if write {
                std::ptr::write_volatile(q, 1);
            } else {
                std::ptr::read_volatile(q);
            }
        }
        Block::adopt(start as *mut u8, len, Kind::Anon)
    }
}

fn main() {
    let args = Args::parse();
    memory::configure_malloc();
    if let Some(secs) = args.hold_seconds {
        let _att = attach(Config::Full);
        let start = Instant::now();
        while start.elapsed().as_secs() < secs {
            fault_loop();
        }
        return;
    }
    let configs: Vec<Config> = match args.only.as_deref() {
        None => CONFIGS.to_vec(),
        Some("full") => vec![Config::Untraced, Config::Full],
        Some("faults") => vec![Config::Untraced, Config::FaultsOnly],
        Some("rss") => vec![Config::Untraced, Config::RssOnly],
        Some("floor") => vec![Config::Untraced, Config::Floor],
        Some("page-cache") => vec![Config::Untraced, Config::PageCacheOnly],
        Some("bpftrace") => vec![Config::Untraced, Config::Full, Config::Bpftrace],
        Some(other) => {
            panic!("--only {other}: expected full, faults, rss, floor, page-cache or bpftrace")
        }
    };
    std::fs::create_dir_all(&args.dir).expect("creating --dir");
    let path = args
        .dir
        .join(format!("tracing-cost-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let mut fault: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut mmap: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut cache: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    for round in 0..args.rounds as usize {
        for k in 0..configs.len() {
            // Rotate the order so drift in the machine spreads evenly.
            let i = (k + round) % configs.len();
            let att = attach(configs[i]);
            fault_loop(); // warm-up
            fault[i].push(fault_loop());
            mmap[i].push(mmap_loop());
            page_cache_loop(&file); // warm-up
            cache[i].push(page_cache_loop(&file));
            drop(att);
        }
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }
    // Ratios are paired: each configuration against the untraced sample of
    // the same round, then the median over rounds, so slow drift of the
    // machine cancels out.
    let paired = |samples: &[Vec<f64>], i: usize| -> Ratio {
        let mut r: Vec<f64> = samples[i]
            .iter()
            .zip(&samples[0])
            .map(|(c, b)| c / b)
            .collect();
        let (q1, median, q3) = quantiles(&mut r);
        Ratio { median, q1, q3 }
    };
    let cost: Vec<CostRow> = configs
        .iter()
        .enumerate()
        .map(|(i, &config)| CostRow {
            config,
            fault_ns_per_page: median(&mut fault[i].clone()),
            fault_ratio: paired(&fault, i),
            mmap_ns_per_op: median(&mut mmap[i].clone()),
            mmap_ratio: paired(&mmap, i),
            page_cache_ns_per_page: median(&mut cache[i].clone()),
            page_cache_ratio: paired(&cache, i),
        })
        .collect();
    drop(file);
    let _ = std::fs::remove_file(&path);
    let programs = if configs.contains(&Config::Full) {
        program_costs(cost[0].fault_ns_per_page, cost[0].mmap_ns_per_op)
    } else {
        Vec::new()
    };
    let acc = if args.only.is_some() {
        Vec::new()
    } else {
        accuracy()
    };

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "Tracing cost, kernel {}, {} rounds; times are medians, ratios are medians (first-third quartile) of per-round ratios to the untraced run:\n",
        kernel.trim(),
        args.rounds
    );
    println!(
        "| programs attached | fault loop ns/page | vs untraced | mmap+touch+munmap ns | vs untraced | write+truncate ns/page | vs untraced |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for r in &cost {
        let ratio = |r: &Ratio| format!("{:.3} ({:.3}-{:.3})", r.median, r.q1, r.q3);
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {:.0} | {} |",
            r.config.label(),
            r.fault_ns_per_page,
            ratio(&r.fault_ratio),
            r.mmap_ns_per_op,
            ratio(&r.mmap_ratio),
            r.page_cache_ns_per_page,
            ratio(&r.page_cache_ratio)
        );
    }
    if !programs.is_empty() {
        println!(
            "\nThe full set, program by program (the kernel's program statistics: the time inside each program; attaching costs the floor on top). Share: its time per page (per map) against an untraced one:\n"
        );
        println!(
            "| program | fault loop runs/page | ns/run | share of a fault | mmap loop runs/map | ns/run | share of a map |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for p in &programs {
            println!(
                "| {} | {:.2} | {:.0} | {:.2}% | {:.2} | {:.0} | {:.2}% |",
                p.program,
                p.fault_runs_per_page,
                p.fault_ns_per_run,
                p.fault_share * 100.0,
                p.mmap_runs_per_op,
                p.mmap_ns_per_run,
                p.mmap_share * 100.0
            );
        }
    }
    println!("\nCounting sources against VmRSS (MiB):\n");
    println!("| memory | VmRSS change | rss_stat (used) | page faults x 4 KiB |");
    println!("|---|---:|---:|---:|");
    for r in &acc {
        println!(
            "| {} | {:.1} | {:.1} | {:.1} |",
            r.case, r.truth_mib, r.rss_stat_mib, r.faults_x_4k_mib
        );
    }
    if let Some(path) = args.json {
        let doc = serde_json::json!({ "kernel": kernel.trim(), "rounds": args.rounds, "cost": cost, "programs": programs, "accuracy": acc });
        std::fs::write(&path, serde_json::to_string_pretty(&doc).expect("json"))
            .expect("writing json");
    }
}
