//! The cache scenario's database: the vector engine serves queries from a
//! mapped index file whose hot part every query touches, while the
//! timeseries engine flushes several times the page cache's room in
//! Gorilla segments. Three phases: queries alone (`before`), queries
//! during the flush (`during`), queries alone again (`after`).
//!
//! Ungoverned, the flush writes through the page cache as a database does
//! today. `--governed`: the flush writes through the library's
//! `UncachedWriter`, and the vector engine locks its hot set resident
//! (`mlock2(MLOCK_ONFAULT)`), charged to its budget.
//!
//! Queries are paced (`--qps`) and each is timed from when it was due, so
//! a stall counts for every query it held up.
//!
//! Prints one JSON object: per phase the queries' p50/p99 latency, the
//! vector thread's major faults (`/proc/self/task/TID/stat`) and the
//! lowest residency of the index (`mincore`); the flush's throughput; and
//! a timeline sampled every 100 ms.

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering},
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
const PHASES: [&str; 3] = ["before", "during", "after"];

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
    /// Seconds of queries alone before the flush and after it.
    #[arg(long, default_value_t = 4.0)]
    quiet_secs: f64,
}

/// What the vector thread measured in a phase.
#[derive(Default)]
struct PhaseLatencies {
    micros: Vec<u32>,
}

struct Shared {
    phase: AtomicU8,
    stop: AtomicBool,
    queries: AtomicU64,
    flushed: AtomicU64,
    vector_tid: AtomicU64,
    /// Per phase, and since the last sample.
    phases: Mutex<[PhaseLatencies; 3]>,
    window: Mutex<Vec<u32>>,
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
        FlushWrites::Uncached
    } else {
        FlushWrites::Buffered
    };
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(0),
        stop: AtomicBool::new(false),
        queries: AtomicU64::new(0),
        flushed: AtomicU64::new(0),
        vector_tid: AtomicU64::new(0),
        phases: Mutex::new(Default::default()),
        window: Mutex::new(Vec::new()),
    });
    let index = HotIndex::open(&index_path)?;
    let ready = std::sync::Barrier::new(3);
    let go = std::sync::Barrier::new(2);
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
                let phase = usize::from(shared.phase.load(Ordering::Relaxed));
                shared.phases.lock().unwrap()[phase].micros.push(us);
                shared.window.lock().unwrap().push(us);
                shared.queries.fetch_add(1, Ordering::Relaxed);
            }
            let locked = _charged.as_ref().is_some_and(HotSet::is_locked);
            Ok(json!({ "locked": locked, "checksum": sink.is_finite() }))
        });
        let flusher = s.spawn(|| -> anyhow::Result<cache::FlushOutcome> {
            let segs = (|| -> anyhow::Result<_> {
                register(link.as_ref(), EngineId::Timeseries)?;
                // 64 series of 16k points: about 1 MiB of segments, encoded
                // before the clock starts.
                Ok(cache::segments(64, 16_384))
            })();
            ready.wait();
            go.wait();
            let segs = segs?;
            cache::flush(
                &args.dir,
                &segs,
                args.flush_mib << 20,
                args.file_mib << 20,
                args.flush_mib_per_s << 20,
                how,
                &shared.flushed,
            )
        });
        ready.wait();
        let mut timeline = Vec::new();
        let mut phase_start = [0.0f64; 3];
        let mut min_resident = [u64::MAX; 3];
        let mut faults_at = [0u64; 4];
        let tid = shared.vector_tid.load(Ordering::Relaxed) as i32;
        let t0 = Instant::now();
        let mut next = t0;
        let quiet = Duration::from_secs_f64(args.quiet_secs);
        let mut phase = 0usize;
        let mut phase_began = t0;
        faults_at[0] = cache::thread_major_faults(tid).unwrap_or(0);
        loop {
            let now = Instant::now();
            let advance = match phase {
                0 | 2 => now - phase_began >= quiet,
                _ => flusher.is_finished(),
            };
            if advance {
                faults_at[phase + 1] = cache::thread_major_faults(tid).unwrap_or(0);
                if phase == 2 {
                    break;
                }
                phase += 1;
                phase_began = now;
                phase_start[phase] = (now - t0).as_secs_f64();
                shared.phase.store(phase as u8, Ordering::Relaxed);
                if phase == 1 {
                    go.wait();
                }
            }
            let resident = index.resident_bytes();
            min_resident[phase] = min_resident[phase].min(resident);
            let mut window = std::mem::take(&mut *shared.window.lock().unwrap());
            timeline.push(json!({
                "t": (now - t0).as_secs_f64(),
                "phase": PHASES[phase],
                "hot_resident_bytes": resident,
                "vector_major_faults": cache::thread_major_faults(tid),
                "queries": shared.queries.load(Ordering::Relaxed),
                "p50_us": cache::percentile(&mut window, 50.0),
                "p99_us": cache::percentile(&mut window, 99.0),
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
        let mut phases = shared.phases.lock().unwrap();
        let mut by_phase = json!({});
        for (i, name) in PHASES.iter().enumerate() {
            let lat = &mut phases[i].micros;
            by_phase[*name] = json!({
                "started_s": phase_start[i],
                "queries": lat.len(),
                "p50_us": cache::percentile(lat, 50.0),
                "p99_us": cache::percentile(lat, 99.0),
                "vector_major_faults": faults_at[i + 1].saturating_sub(faults_at[i]),
                "min_hot_resident_bytes": min_resident[i],
            });
        }
        // Without a flush: the before and after phases' queries together.
        let mut quiet: Vec<u32> = phases[0]
            .micros
            .iter()
            .chain(&phases[2].micros)
            .copied()
            .collect();
        Ok(json!({
            "governed": args.governed,
            "index_bytes": index.bytes(),
            "vector": v,
            "flush": flush,
            "flush_requested_bytes": args.flush_mib << 20,
            "phases": by_phase,
            "quiet_p99_us": cache::percentile(&mut quiet, 99.0),
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
