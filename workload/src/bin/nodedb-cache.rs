//! The cache scenario's database: the vector engine serves queries from a
//! mapped index file whose hot part every query touches, while the
//! timeseries engine flushes several times the page cache's room in
//! Gorilla segments. The flush runs in `--windows` windows with queries
//! alone before, between and after them, so that the quiet and the flush
//! windows interleave: a host's drift over the run (its other tenants,
//! its clock) falls on both alike. Reported as three phases: `before` (the
//! first quiet window), `during` (the flush windows together) and `after`
//! (the last quiet window); the quiet p99 pools every quiet window.
//!
//! Ungoverned, the flush writes through the page cache as a database does
//! today. `--governed`: the flush writes through the library's
//! `UncachedWriter`, and the vector engine locks its hot set resident
//! (`mlock2(MLOCK_ONFAULT)`), charged to its budget.
//!
//! Queries are paced (`--qps`) and each is timed from when it was due, so
//! a stall counts for every query it held up.
//!
//! Prints one JSON object: per phase and per window the queries' p50/p99
//! latency, the vector thread's major faults (`/proc/self/task/TID/stat`)
//! and the lowest residency of the index (`mincore`); the flush's
//! throughput; and a timeline sampled every 100 ms.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor::{EngineCache, EngineId, HotSet, MemoryGovernor, control::AgentLink};
use nodedb_governor_workload::cache::{self, FlushWrites, HotIndex, Rng};
use serde_json::{Value, json};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ENGINES: [(&str, EngineId); 2] = [
    ("vector", EngineId::Vector),
    ("timeseries", EngineId::Timeseries),
];

#[derive(Parser)]
#[command(name = "nodedb-cache")]
struct Args {
    /// The agent's control socket (absent: no agent).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long, default_value = "nodedb")]
    database: String,
    /// Where the index and the flushed segments go (a disk, not tmpfs).
    #[arg(long, default_value = "/tmp/nodedb-cache")]
    dir: PathBuf,
    /// The library's protections: uncached flush writes, the hot set
    /// locked resident.
    #[arg(long)]
    governed: bool,
    /// The index (all of it hot: every query touches its upper layers and
    /// neighbourhoods anywhere in it), MiB.
    #[arg(long, default_value_t = 448)]
    index_mib: u64,
    /// Bytes the flush writes, MiB.
    #[arg(long, default_value_t = 2048)]
    flush_mib: u64,
    /// The flush's pace, MiB a second (0: as fast as it can): databases
    /// pace background flushes so that they leave the CPUs to queries.
    #[arg(long, default_value_t = 1024)]
    flush_mib_per_s: u64,
    /// Governed, where the writer falls back to write-behind: how far the
    /// written data may run ahead of what is written back and dropped
    /// (the data in flight to the disk, and the most of the flush the
    /// page cache holds at a time), MiB.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    write_behind_mib: u64,
    /// Per segment file (each made durable when full), MiB.
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Vectors a query reads.
    #[arg(long, default_value_t = 64)]
    fanout: usize,
    /// Queries a second the vector engine serves (paced: a served index is
    /// not saturated, so most of its pages are touched every second or
    /// so, not every millisecond); 0: as fast as it can.
    #[arg(long, default_value_t = 500)]
    qps: u64,
    /// Seconds of queries alone in each quiet window (before, between and
    /// after the flush windows).
    #[arg(long, default_value_t = 2.0)]
    quiet_secs: f64,
    /// Flush windows (each writes an equal part of the flush), with a
    /// quiet window before each and after the last.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    windows: u32,
}

struct Shared {
    /// The window the queries are in: even ones are quiet, odd ones flush.
    window_index: AtomicU32,
    /// The flush window the flush thread waits to start (set by it).
    flush_waiting: AtomicU32,
    stop: AtomicBool,
    queries: AtomicU64,
    flushed: AtomicU64,
    vector_tid: AtomicU64,
    /// Per window, and since the last sample.
    windows: Mutex<Vec<Vec<u32>>>,
    sample: Mutex<Vec<u32>>,
}

fn register(link: Option<&AgentLink>, engine: EngineId) -> anyhow::Result<()> {
    if let Some(link) = link {
        let tid = link.register_current_thread(engine)?;
        if !link.wait_placed(tid, Duration::from_secs(10)) {
            bail!("the agent did not place the {engine:?} thread");
        }
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let (governor, link, engine_cache) = match &args.socket {
        Some(socket) => {
            let (g, l, c) = nodedb_governor_demo::governed::connect_with_cache(
                socket,
                &args.database,
                &ENGINES,
            )?;
            (g, Some(l), c)
        }
        None => {
            let mut budget = nodedb_governor::Budget::builder(1 << 40);
            for (_, id) in ENGINES {
                budget = budget.engine(id, 0, 1 << 40);
            }
            let g = MemoryGovernor::new(budget.build()?);
            // No agent: the bound is the index itself.
            let c = EngineCache::new(&g);
            c.set_hot_set_limit(EngineId::Vector, args.index_mib << 20)?;
            (g, None, c)
        }
    };
    let index_path = args.dir.join("index.vectors");
    HotIndex::create(&index_path, args.index_mib << 20)?;
    let how = if args.governed {
        FlushWrites::Uncached {
            window_bytes: args.write_behind_mib << 20,
        }
    } else {
        FlushWrites::Buffered
    };
    let windows = 2 * args.windows as usize + 1;
    let shared = Arc::new(Shared {
        window_index: AtomicU32::new(0),
        flush_waiting: AtomicU32::new(0),
        stop: AtomicBool::new(false),
        queries: AtomicU64::new(0),
        flushed: AtomicU64::new(0),
        vector_tid: AtomicU64::new(0),
        windows: Mutex::new(vec![Vec::new(); windows]),
        sample: Mutex::new(Vec::new()),
    });
    let index = HotIndex::open(&index_path)?;
    let ready = std::sync::Barrier::new(3);
    // The sampler starts each flush window (a channel, not a barrier: a
    // flush thread that failed must not leave the sampler waiting).
    let (go, gate) = std::sync::mpsc::channel::<()>();
    let started = Instant::now();
    let outcome = std::thread::scope(|s| -> anyhow::Result<Value> {
        let vector = s.spawn(|| -> anyhow::Result<Value> {
            let setup = (|| -> anyhow::Result<Option<HotSet>> {
                register(link.as_ref(), EngineId::Vector)?;
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                shared.vector_tid.store(tid as u64, Ordering::Relaxed);
                // The library's hot set: locked as it faults in, charged
                // to the vector budget (locked pages cannot be reclaimed:
                // they are the engine's memory as much as its heap),
                // bounded by the agent's configuration (`hot_set`).
                let charged = if args.governed {
                    Some(
                        engine_cache
                            .protect(EngineId::Vector, index.bytes_mapped())
                            .context("protecting the index as the vector engine's hot set")?,
                    )
                } else {
                    None
                };
                // Every page read in by this thread, before the clock.
                index.warm();
                Ok(charged)
            })();
            ready.wait();
            let _charged = setup?;
            let mut rng = Rng::new(0xfeed);
            let q = HotIndex::query_vector(&mut rng);
            let mut sink = 0.0f32;
            let pace = (args.qps > 0).then(|| Duration::from_secs_f64(1.0 / args.qps as f64));
            let mut due = Instant::now();
            while !shared.stop.load(Ordering::Relaxed) {
                // Paced, each query timed from when it was due, not from
                // when it started: a stall delays the queries behind it,
                // and they count it (no coordinated omission).
                let t = match pace {
                    Some(pace) => {
                        due += pace;
                        cache::sleep_until(due);
                        due
                    }
                    None => Instant::now(),
                };
                sink += index.query(&mut rng, &q, args.fanout);
                let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                let w = shared.window_index.load(Ordering::Relaxed) as usize;
                shared.windows.lock().unwrap()[w].push(us);
                shared.sample.lock().unwrap().push(us);
                shared.queries.fetch_add(1, Ordering::Relaxed);
            }
            let locked = _charged.as_ref().is_some_and(HotSet::is_locked);
            Ok(json!({ "locked": locked, "checksum": sink.is_finite() }))
        });
        let flusher = s.spawn(|| -> anyhow::Result<cache::FlushOutcome> {
            // The receiver is this thread's (it is not shared).
            let gate = gate;
            let segs = (|| -> anyhow::Result<_> {
                register(link.as_ref(), EngineId::Timeseries)?;
                // 64 series of 16k points: about 1 MiB of segments, encoded
                // before the clock starts.
                Ok(cache::segments(64, 16_384))
            })();
            ready.wait();
            let segs = segs?;
            let flushed = cache::flush(
                &args.dir,
                &segs,
                args.flush_mib << 20,
                args.file_mib << 20,
                args.flush_mib_per_s << 20,
                how,
                &shared.flushed,
                args.windows,
                &|k| {
                    // The flush window before this one has ended: its
                    // queries from now on are the next quiet window's.
                    if k > 0 {
                        shared.window_index.store(2 * k, Ordering::Relaxed);
                    }
                    shared.flush_waiting.store(k, Ordering::Release);
                    // The sampler gone: the run is over, write nothing more.
                    let _ = gate.recv();
                },
            );
            shared
                .window_index
                .store(2 * args.windows, Ordering::Relaxed);
            flushed
        });
        ready.wait();
        let mut timeline = Vec::new();
        let mut window_start = vec![0.0f64; windows];
        let mut min_resident = vec![u64::MAX; windows];
        let mut faults_at = vec![0u64; windows + 1];
        let tid = shared.vector_tid.load(Ordering::Relaxed) as i32;
        let t0 = Instant::now();
        let mut next = t0;
        let quiet = Duration::from_secs_f64(args.quiet_secs);
        let mut w = 0usize;
        let mut window_began = t0;
        faults_at[0] = cache::thread_major_faults(tid).unwrap_or(0);
        loop {
            let now = Instant::now();
            let advance = if w.is_multiple_of(2) {
                now - window_began >= quiet
            } else {
                // A flush window ends when the flush thread waits at the
                // next one's gate, or has finished.
                shared.flush_waiting.load(Ordering::Acquire) as usize > w / 2
                    || flusher.is_finished()
            };
            if advance {
                faults_at[w + 1] = cache::thread_major_faults(tid).unwrap_or(0);
                if w + 1 == windows {
                    break;
                }
                w += 1;
                window_began = now;
                window_start[w] = (now - t0).as_secs_f64();
                if w % 2 == 1 {
                    // The flush thread moves the queries on to the next
                    // quiet window itself, the moment its window ends.
                    shared.window_index.store(w as u32, Ordering::Relaxed);
                    let _ = go.send(());
                }
            }
            let resident = index.resident_bytes();
            min_resident[w] = min_resident[w].min(resident);
            let mut sample = std::mem::take(&mut *shared.sample.lock().unwrap());
            timeline.push(json!({
                "t": (now - t0).as_secs_f64(),
                "phase": phase_name(w, windows),
                "window": w,
                "hot_resident_bytes": resident,
                "vector_major_faults": cache::thread_major_faults(tid),
                "queries": shared.queries.load(Ordering::Relaxed),
                "p50_us": cache::percentile(&mut sample, 50.0),
                "p99_us": cache::percentile(&mut sample, 99.0),
                "flushed_bytes": shared.flushed.load(Ordering::Relaxed),
            }));
            next += cache::SAMPLE;
            cache::sleep_until(next);
        }
        shared.stop.store(true, Ordering::Relaxed);
        let v = vector
            .join()
            .map_err(|_| anyhow::anyhow!("the vector thread panicked"))??;
        let flush = flusher
            .join()
            .map_err(|_| anyhow::anyhow!("the flush thread panicked"))??;
        let mut lat = shared.windows.lock().unwrap();
        let faults = |k: usize| faults_at[k + 1].saturating_sub(faults_at[k]);
        let mut per_window = Vec::with_capacity(windows);
        for (k, l) in lat.iter_mut().enumerate() {
            per_window.push(json!({
                "kind": if k.is_multiple_of(2) { "quiet" } else { "flush" },
                "started_s": window_start[k],
                "queries": l.len(),
                "p50_us": cache::percentile(l, 50.0),
                "p99_us": cache::percentile(l, 99.0),
                "vector_major_faults": faults(k),
                "min_hot_resident_bytes": min_resident[k],
            }));
        }
        // A phase: some windows' queries together.
        let phase = |ks: &[usize]| {
            let mut all: Vec<u32> = ks.iter().flat_map(|&k| lat[k].iter().copied()).collect();
            json!({
                "started_s": window_start[ks[0]],
                "windows": ks.len(),
                "queries": all.len(),
                "p50_us": cache::percentile(&mut all, 50.0),
                "p99_us": cache::percentile(&mut all, 99.0),
                "vector_major_faults": ks.iter().map(|&k| faults(k)).sum::<u64>(),
                "min_hot_resident_bytes": ks.iter().map(|&k| min_resident[k]).min(),
            })
        };
        let flush_windows: Vec<usize> = (1..windows).step_by(2).collect();
        let quiet_windows: Vec<usize> = (0..windows).step_by(2).collect();
        let quiet_phase = phase(&quiet_windows);
        Ok(json!({
            "governed": args.governed,
            "index_bytes": index.bytes(),
            "vector": v,
            "flush": flush,
            "flush_requested_bytes": args.flush_mib << 20,
            "phases": {
                "before": phase(&[0]),
                "during": phase(&flush_windows),
                "after": phase(&[windows - 1]),
            },
            "windows": per_window,
            // Without a flush: every quiet window's queries together.
            "quiet_p99_us": quiet_phase["p99_us"],
            "quiet": quiet_phase,
            "timeline": timeline,
        }))
    })?;
    let _ = std::fs::remove_dir_all(&args.dir);
    let mut outcome = outcome;
    outcome["seconds"] = json!(started.elapsed().as_secs_f64());
    println!("{outcome}");
    drop(link);
    drop(governor);
    Ok(())
}

/// A timeline sample's phase: the first quiet window is `before`, the last
/// `after`, the flush windows `during`, the quiet ones between `between`.
fn phase_name(w: usize, windows: usize) -> &'static str {
    match w {
        0 => "before",
        w if w + 1 == windows => "after",
        w if w % 2 == 1 => "during",
        _ => "between",
    }
}
