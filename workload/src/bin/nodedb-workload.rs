//! The validation workload: one process playing a database with three
//! engines, each on threads of its own with its own jemalloc arena, each
//! charging what it holds to its budget and giving memory back when
//! refused or asked by the agent:
//! - vector: HNSW segments built over random vectors, then searched;
//! - timeseries: bulk ingest buffered and flushed as Gorilla segments;
//! - query: DataFusion `GROUP BY` over a high-cardinality key through the
//!   library's memory pool, spilling to disk when refused, checked against
//!   a reference computed without DataFusion.
//!
//! The engines run in two phases, so that what each holds overlaps as in
//! a database that serves while it loads:
//! 1. load: vector builds its index, timeseries ingests into its buffers,
//!    query generates its input;
//! 2. serve: vector searches and query runs the `GROUP BY`, while
//!    timeseries still holds what it buffered (a memtable is flushed when
//!    the budget says so, or at the end).
//!
//! Then timeseries flushes and reads every point back.
//!
//! With `--socket` it joins the agent (which sets the budgets and watches
//! the kernel's attribution); without, every budget is unlimited. Prints
//! one JSON object: per engine what it did, how long it took and its rate,
//! and whether the results were right.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, SpillConfig, SpillController,
    arena::EngineArenas,
    control::{AgentLink, LinkConfig},
};
use nodedb_governor_workload::query::{self, GroupByData, Spill};
use nodedb_governor_workload::{
    cpu,
    timeseries::Timeseries,
    vector::{self, VectorEngine},
};
use serde_json::json;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const ENGINES: [(&str, EngineId); 3] = [
    ("vector", EngineId::Vector),
    ("timeseries", EngineId::Timeseries),
    ("query", EngineId::Query),
];

/// Waits at the barrier when dropped: a thread that fails or panics in
/// its phase still lets the others past.
struct PassOnDrop<'a>(&'a std::sync::Barrier);

impl Drop for PassOnDrop<'_> {
    fn drop(&mut self) {
        self.0.wait();
    }
}

/// The defaults, against the bundled configuration (a 1 GiB ceiling;
/// budgets vector 40%, timeseries 30%, query 40%), take more than each
/// budget when nothing holds them back (measured with `nodedb-validate
/// --modes ample`): vector about 500 MiB (60k vectors with 8 KiB payloads
/// and their graphs), timeseries about 450 MiB (28M buffered points),
/// query about 460 MiB (its input and the hash table of 6.3M groups); in
/// all more than the ceiling.
#[derive(Parser)]
struct Args {
    /// The agent's control socket (absent: ungoverned, budgets unlimited).
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long, default_value = "nodedb")]
    database: String,
    /// Scratch directory for spills and flushed segments.
    #[arg(long, default_value = "/tmp/nodedb-workload")]
    dir: PathBuf,
    /// Vectors indexed (64 dimensions; 1 KiB charged each while resident,
    /// plus the payload).
    #[arg(long, default_value_t = 60_000)]
    vectors: u32,
    /// Stored payload (document fields) per vector, bytes.
    #[arg(long, default_value_t = 8192)]
    payload: usize,
    /// Vectors per HNSW segment.
    #[arg(long, default_value_t = 5_000)]
    segment: u32,
    /// Searches (k = 10) after the index is built.
    #[arg(long, default_value_t = 200)]
    queries: u32,
    /// Timeseries points ingested (16 bytes each while buffered).
    #[arg(long, default_value_t = 28_000_000)]
    points: u64,
    /// Series the points are spread over.
    #[arg(long, default_value_t = 1000)]
    series: usize,
    /// Rows of the GROUP BY's input.
    #[arg(long, default_value_t = 8_000_000)]
    rows: usize,
    /// DataFusion's target partitions (each aggregates its share in a
    /// hash table of its own).
    #[arg(long, default_value_t = 4)]
    partitions: usize,
    /// Keys the rows are drawn from (8M rows over 16M keys: 6.3M groups).
    #[arg(long, default_value_t = 16_000_000)]
    keys: u64,
    /// First, each engine busy alone in turn (vector builds and searches an
    /// index, timeseries ingests and flushes, query runs its `GROUP BY`),
    /// on a fresh instance it drops when done, the others idle: demand
    /// that moves between engines. Then all together, as without it.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    solo: bool,
    /// The static baseline: each engine's fixed budget in bytes,
    /// `vector=N,timeseries=N,query=N` (every engine named once).
    #[arg(long, value_delimiter = ',', value_parser = engine_bytes, requires = "static_ceiling")]
    static_budgets: Vec<(EngineId, u64)>,
    /// The static baseline's ceiling in bytes (the library's, over the
    /// vector and timeseries pools; the kernel holds the process's).
    #[arg(long, requires = "static_budgets")]
    static_ceiling: Option<u64>,
}

/// `engine=bytes`, for an engine of this workload.
fn engine_bytes(s: &str) -> Result<(EngineId, u64), String> {
    let (name, bytes) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected engine=bytes"))?;
    let id = ENGINES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, id)| *id)
        .ok_or_else(|| {
            format!(
                "{name:?} is not an engine of this workload ({})",
                ENGINES.map(|(n, _)| n).join(", ")
            )
        })?;
    let bytes = bytes
        .parse::<u64>()
        .map_err(|e| format!("{name}'s budget {bytes:?}: {e}"))?;
    if bytes == 0 {
        return Err(format!("{name}'s budget is zero"));
    }
    Ok((id, bytes))
}

/// The static budgets, one per engine in `ENGINES` order, or None.
fn static_budgets(args: &Args) -> anyhow::Result<Option<(u64, [u64; 3])>> {
    let Some(ceiling) = args.static_ceiling else {
        return Ok(None);
    };
    let mut caps = [0u64; 3];
    for (i, (name, id)) in ENGINES.iter().enumerate() {
        let given: Vec<u64> = args
            .static_budgets
            .iter()
            .filter(|(e, _)| e == id)
            .map(|(_, b)| *b)
            .collect();
        match given[..] {
            [b] => caps[i] = b,
            [] => bail!("--static-budgets names no budget for {name}"),
            _ => bail!("--static-budgets names {name} {} times", given.len()),
        }
    }
    Ok(Some((ceiling, caps)))
}

/// Passes the rest of a sequence of waits on a barrier when dropped: a
/// thread that fails or panics in its turn still lets the others through
/// theirs.
struct Turns<'a> {
    barrier: &'a std::sync::Barrier,
    left: usize,
}

impl<'a> Turns<'a> {
    fn new(barrier: &'a std::sync::Barrier, waits: usize) -> Self {
        Self {
            barrier,
            left: waits,
        }
    }

    fn next(&mut self) {
        if self.left > 0 {
            self.left -= 1;
            self.barrier.wait();
        }
    }
}

impl Drop for Turns<'_> {
    fn drop(&mut self) {
        while self.left > 0 {
            self.next();
        }
    }
}

/// What the threads running now took since `before`
/// ([`cpu::threads_by_name`]),
/// by name: the link's, the spill controller's, the rebalancer's, the
/// index build's workers. Threads that ended are not in it (the engines'
/// own threads are counted on their own; others are only in the
/// process's total).
fn threads_cpu_since(
    before: &std::collections::BTreeMap<String, f64>,
) -> serde_json::Map<String, serde_json::Value> {
    cpu::grown_since(before, cpu::threads_by_name())
        .into_iter()
        .map(|(k, v)| (k, v.into()))
        .collect()
}

/// Writes the thread's CPU time (user, system seconds) where it points
/// when the thread's job ends, however it ends.
struct ThreadCpu<'a>(&'a std::sync::Mutex<(f64, f64)>);

impl<'a> ThreadCpu<'a> {
    /// Names the calling engine thread `name` too, so that the
    /// per-thread figures show it under its engine's name (an engine
    /// thread just joined can still be listed when they are read; unnamed,
    /// it was counted with the index build's workers). A name the kernel
    /// refuses leaves the thread as it was: the figures are a report's.
    fn named(cell: &'a std::sync::Mutex<(f64, f64)>, name: &str) -> Self {
        if let Err(e) = cpu::name_this_thread(name) {
            eprintln!("nodedb-workload: naming the {name} thread: {e}");
        }
        Self(cell)
    }
}

impl Drop for ThreadCpu<'_> {
    fn drop(&mut self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = cpu::rusage_split(libc::RUSAGE_THREAD);
    }
}

/// What an engine's thread returns: its result together, and alone (with
/// the solo phase).
type Outcome = anyhow::Result<(serde_json::Value, Option<serde_json::Value>)>;

/// An engine's thread up to the serve phase: placed (`enter`), its turn
/// alone (`solo`, which passes every turn), then its share of the load
/// phase (`load`); it passes the load barrier whatever happens.
fn load_phase<T>(
    loaded: &std::sync::Barrier,
    enter: impl FnOnce() -> anyhow::Result<()>,
    solo: impl FnOnce() -> Option<anyhow::Result<serde_json::Value>>,
    load: impl FnOnce() -> anyhow::Result<T>,
) -> (Option<anyhow::Result<serde_json::Value>>, anyhow::Result<T>) {
    let _load = PassOnDrop(loaded);
    match enter() {
        Ok(()) => {
            let alone = solo();
            (alone, load())
        }
        Err(e) => (None, Err(e)),
    }
}

/// Builds the vector index, a segment at a time.
fn build_index(vec: &VectorEngine, args: &Args) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut first = 0;
    while first < args.vectors {
        let n = args.segment.min(args.vectors - first);
        vec.add_segment(first, n)?;
        first += n;
    }
    Ok(t0.elapsed())
}

/// Searches the index; the time taken and the recall of the first five
/// searches against exact answers.
fn search_index(vec: &VectorEngine, args: &Args) -> anyhow::Result<(Duration, f64)> {
    let t1 = Instant::now();
    let mut recall = 0.0;
    let checked = args.queries.min(5);
    for i in 0..args.queries {
        let q = vector::vector(u32::MAX - i);
        let found = vec.search(&q, 10)?;
        if i < checked {
            recall += vector::recall(&found, &vector::exact(&q, args.vectors, 10));
        }
    }
    Ok((t1.elapsed(), recall / f64::from(checked.max(1))))
}

fn vector_result(
    vec: &VectorEngine,
    args: &Args,
    build: Duration,
    search: Duration,
    recall: f64,
) -> serde_json::Value {
    json!({
        "build_seconds": build.as_secs_f64(),
        "vectors_per_second": f64::from(args.vectors) / build.as_secs_f64(),
        "search_seconds": search.as_secs_f64(),
        "searches_per_second": f64::from(args.queries) / search.as_secs_f64().max(1e-9),
        "recall_at_10": recall,
        "stats": vec.stats(),
    })
}

/// Ingests the points into `ts`'s buffers: how long it took, the sum of
/// the values, and when it ended.
fn ingest(ts: &Timeseries, args: &Args) -> anyhow::Result<Ingested> {
    let t0 = Instant::now();
    let times = cpu::ThreadTimes::now();
    let mut sum = 0.0;
    for i in 0..args.points {
        let v = 20.0 + (i % 977) as f64 * 0.125;
        sum += v;
        ts.ingest(
            (i % args.series as u64) as usize,
            1_700_000_000_000 + i as i64,
            v,
        )?;
    }
    Ok((t0.elapsed(), sum, Instant::now(), times.since()))
}

/// An ingest's buffering time, the sum of what it ingested, when it
/// ended, and where the ingesting thread's time went.
type Ingested = (Duration, f64, Instant, serde_json::Value);

/// Flushes what `ts` buffered and reads every point back.
fn finish_ingest(
    ts: &Timeseries,
    args: &Args,
    (buffering, sum, ingest_end, buffering_times): Ingested,
) -> anyhow::Result<serde_json::Value> {
    // The ingest's rate counts the final flush too: every point is
    // compressed and written once, whether a tight budget flushed it early
    // or it waited for this one. So does a flush a spill request asked for
    // once the ingest was over (an idle engine giving its buffers back): it
    // ran on the spill's thread, and it is the ingest's work all the same.
    let t0 = Instant::now();
    let times = cpu::ThreadTimes::now();
    ts.flush()?;
    let final_flush = t0.elapsed();
    let final_flush_times = times.since();
    let spilled_later = ts.spill_flush_time_since(ingest_end);
    let took = buffering + final_flush + spilled_later;
    let (points, back) = ts.verify()?;
    Ok(json!({
        "seconds": took.as_secs_f64(),
        "final_flush_seconds": final_flush.as_secs_f64(),
        "spill_flush_seconds_after_ingest": spilled_later.as_secs_f64(),
        // Where the ingesting thread's time went, buffering and in the
        // final flush (wall, user, system, waiting for a CPU, blocked).
        "thread_seconds": {"buffering": buffering_times, "final_flush": final_flush_times},
        "points_per_second": args.points as f64 / took.as_secs_f64(),
        "correct": points == args.points && back == sum,
        "stats": ts.stats(),
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let unlimited = || {
        let mut budget = Budget::builder(1 << 40);
        for (_, id) in ENGINES {
            budget = budget.engine(id, 0, 1 << 40);
        }
        budget.build()
    };
    let fixed = static_budgets(&args)?;
    // The engines' governor; under an agent, the agent sets its budgets,
    // except in the static baseline, whose pools nothing moves (the link
    // then has a governor of its own, which nobody reserves from).
    let governor = MemoryGovernor::new(match fixed {
        Some((ceiling, caps)) => {
            let mut budget = Budget::builder(ceiling);
            for ((_, id), cap) in ENGINES.iter().zip(caps) {
                budget = budget.engine(*id, 0, cap);
            }
            budget.build().context("the static budgets")?
        }
        None => unlimited()?,
    });
    let link_governor = match fixed {
        Some(_) => MemoryGovernor::new(unlimited()?),
        None => governor.clone(),
    };
    let query_pool: Option<Arc<dyn MemoryPool>> = fixed
        .map(|(_, caps)| Arc::new(FairSpillPool::new(caps[2] as usize)) as Arc<dyn MemoryPool>);
    let arenas = Arc::new(EngineArenas::create(&ENGINES.map(|(_, e)| e))?);
    let spill = Arc::new(SpillController::new(SpillConfig::default())?);
    let timeseries = |file: &str| -> anyhow::Result<Arc<Timeseries>> {
        let arenas = arenas.clone();
        Ok(Arc::new(
            Timeseries::new(&governor, args.series, &args.dir.join(file))?.after_flush(move || {
                let _ = arenas.purge(EngineId::Timeseries);
            }),
        ))
    };
    let vectors = |dir: &str| -> anyhow::Result<Arc<VectorEngine>> {
        Ok(Arc::new(
            VectorEngine::new(&governor, &args.dir.join(dir), args.payload)?
                // A fixed budget: no loan comes back to wait for.
                .refusal_wait(if fixed.is_some() {
                    Duration::ZERO
                } else {
                    vector::REFUSAL_WAIT
                }),
        ))
    };
    let ts = timeseries("points.gorilla")?;
    let vec = vectors("vectors")?;
    let _ts_reg = spill.register(EngineId::Timeseries, ts.clone());
    let _vec_reg = spill.register(EngineId::Vector, vec.clone());
    let link = match &args.socket {
        Some(socket) => {
            let link = AgentLink::builder(
                &link_governor,
                LinkConfig::new(socket, &args.database, &ENGINES),
            )
            .spill_controller(spill.clone())
            .arenas(arenas.clone())
            .start()?;
            nodedb_governor_demo::governed::wait_welcomed(&link, socket, ENGINES.len())?;
            Some(link)
        }
        None => None,
    };
    // Each engine's thread: registered with the agent (its cgroup), and
    // allocating from its own arena.
    let enter = |engine: EngineId| -> anyhow::Result<()> {
        arenas.pin_current_thread(engine)?;
        if let Some(link) = &link {
            let tid = link.register_current_thread(engine)?;
            if !link.wait_placed(tid, Duration::from_secs(10)) {
                bail!("the agent did not place the {engine:?} thread");
            }
        }
        Ok(())
    };
    let data = GroupByData {
        rows: args.rows,
        keys: args.keys,
        seed: 7,
    };
    // The GROUP BY's reference answer, computed before the engines start
    // (the data is generated again from the same seed by the query
    // engine), so the check's own memory is no engine's.
    let want = query::reference_digest(&data.batches(8192)?.1);
    // Its pages go back to the kernel before the engines start.
    nodedb_governor::arena::purge_all()?;
    let group_by = |batches: (Arc<_>, Vec<_>)| -> anyhow::Result<serde_json::Value> {
        let (schema, batches) = batches;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let t0 = Instant::now();
        // The result is streamed into a digest, as a database streams it
        // to its client.
        let mut got = query::GroupsDigest::default();
        let query = query::GroupBy {
            governor: &governor,
            engine: EngineId::Query,
            schema,
            batches,
            partitions: args.partitions,
            spill: Spill::To(args.dir.clone()),
            pool: query_pool.clone(),
        };
        let (spill_files, spilled_bytes) = rt.block_on(query.run_into(|g| got.add(g)))?;
        let took = t0.elapsed();
        Ok(json!({
            "seconds": took.as_secs_f64(),
            "rows_per_second": args.rows as f64 / took.as_secs_f64(),
            "groups": got.groups,
            "correct": got == want,
            "spill_files": spill_files,
            "spilled_bytes": spilled_bytes,
        }))
    };
    // The solo phase: each engine busy in turn on a fresh instance of its
    // own (the others idle, holding nothing), which it drops when done,
    // so that demand moves from one engine to the next.
    let solo_vector = |workers: &rayon::ThreadPool| -> anyhow::Result<serde_json::Value> {
        let v = vectors("solo-vectors")?;
        let _reg = spill.register(EngineId::Vector, v.clone());
        let build = workers.install(|| build_index(&v, &args))?;
        let (search, recall) = search_index(&v, &args)?;
        Ok(vector_result(&v, &args, build, search, recall))
    };
    let solo_timeseries = || -> anyhow::Result<serde_json::Value> {
        let t = timeseries("solo-points.gorilla")?;
        let _reg = spill.register(EngineId::Timeseries, t.clone());
        let ingested = ingest(&t, &args)?;
        finish_ingest(&t, &args, ingested)
    };
    let solo_query = || -> anyhow::Result<serde_json::Value> { group_by(data.batches(8192)?) };
    let solo_turns = if args.solo { ENGINES.len() + 1 } else { 0 };
    let solo = std::sync::Barrier::new(3);
    let started = Instant::now();
    // What the set-up took (the GROUP BY's reference answer) is not the
    // run's.
    let cpu_at_start = cpu::rusage_seconds(libc::RUSAGE_SELF);
    let threads_at_start = cpu::threads_by_name();
    // Between the phases; an engine that fails still passes both, so the
    // others are not left waiting.
    let loaded = std::sync::Barrier::new(3);
    let served = std::sync::Barrier::new(3);
    // An engine's thread: its turn alone (if any), then the load phase.
    let solo_then = |me: usize, job: &dyn Fn() -> anyhow::Result<serde_json::Value>| {
        let mut turns = Turns::new(&solo, solo_turns);
        let mut alone = None;
        for turn in 0..solo_turns.saturating_sub(1) {
            turns.next();
            if turn == me {
                let t0 = Instant::now();
                alone = Some(job().map(|mut r| {
                    r["phase_seconds"] = t0.elapsed().as_secs_f64().into();
                    r
                }));
                // The job is over: what its arena keeps goes back too.
                let _ = arenas.purge(ENGINES[me].1);
            }
        }
        drop(turns);
        alone
    };
    // Each engine thread's own CPU time, both phases (the spill and link
    // threads' is the process's rest).
    let cpu: [std::sync::Mutex<(f64, f64)>; 3] = Default::default();
    // The index build's workers (the HNSW builder runs on rayon): a pool
    // of the vector engine's own, each worker registered and placed as the
    // engine's thread is and allocating from its arena, so that what they
    // build is counted as the engine's, on its CPUs and node. (On rayon's
    // global pool they were nobody's: their pages went to the database's
    // unattributed figure, out of reach of the engine's budget and purges.)
    let worker_failed = std::sync::Mutex::new(None::<anyhow::Error>);
    let ((v, t, q), threads_cpu) = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("vector-build-{i}"))
        .build_scoped(
            |worker| {
                if let Err(e) = enter(EngineId::Vector) {
                    worker_failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                }
                worker.run()
            },
            |workers| {
                let solo_vector = || solo_vector(workers);
                let joined = std::thread::scope(|s| {
                    let v = s.spawn(|| -> Outcome {
                        let _cpu = ThreadCpu::named(&cpu[0], "vector");
                        let (alone, built) = load_phase(
                            &loaded,
                            || enter(EngineId::Vector),
                            || solo_then(0, &solo_vector),
                            || workers.install(|| build_index(&vec, &args)),
                        );
                        let served = PassOnDrop(&served);
                        let build = built?;
                        let (search, recall) = search_index(&vec, &args)?;
                        drop(served);
                        Ok((
                            vector_result(&vec, &args, build, search, recall),
                            alone.transpose()?,
                        ))
                    });
                    let t = s.spawn(|| -> Outcome {
                        let _cpu = ThreadCpu::named(&cpu[1], "timeseries");
                        let (alone, ingested) = load_phase(
                            &loaded,
                            || enter(EngineId::Timeseries),
                            || solo_then(1, &solo_timeseries),
                            || ingest(&ts, &args),
                        );
                        // What was buffered stays buffered while the others serve.
                        drop(PassOnDrop(&served));
                        let r = finish_ingest(&ts, &args, ingested?)?;
                        Ok((r, alone.transpose()?))
                    });
                    let q = s.spawn(|| -> Outcome {
                        let _cpu = ThreadCpu::named(&cpu[2], "query");
                        let (alone, input) = load_phase(
                            &loaded,
                            || enter(EngineId::Query),
                            || solo_then(2, &solo_query),
                            || data.batches(8192),
                        );
                        let served = PassOnDrop(&served);
                        let r = group_by(input?)?;
                        drop(served);
                        Ok((r, alone.transpose()?))
                    });
                    (v.join(), t.join(), q.join())
                });
                // Read while the pool's workers are still alive: the
                // figures are of the threads running.
                (joined, threads_cpu_since(&threads_at_start))
            },
        )
        .context("the vector index build's worker pool")?;
    if let Some(e) = worker_failed
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
    {
        return Err(e.context("a vector index build worker"));
    }
    let cpu_of = |c: &std::sync::Mutex<(f64, f64)>| *c.lock().unwrap_or_else(|p| p.into_inner());
    let [v_cpu, t_cpu, q_cpu] = [&cpu[0], &cpu[1], &cpu[2]].map(cpu_of);
    let cpu = json!({
        "vector": v_cpu.0 + v_cpu.1,
        "timeseries": t_cpu.0 + t_cpu.1,
        "query": q_cpu.0 + q_cpu.1,
        // Of which in the kernel (page faults, the memory cgroups'
        // charging and reclaim, the attribution's programs, I/O).
        "system": {"vector": v_cpu.1, "timeseries": t_cpu.1, "query": q_cpu.1},
        "process": cpu::rusage_seconds(libc::RUSAGE_SELF) - cpu_at_start,
        "threads": threads_cpu,
    });
    let get = |r: std::thread::Result<Outcome>, name: &str| {
        r.map_err(|_| anyhow::anyhow!("the {name} thread panicked"))?
            .with_context(|| format!("engine {name}"))
    };
    let ((v, v1), (t, t1), (q, q1)) = (get(v, "vector")?, get(t, "timeseries")?, get(q, "query")?);
    let solo = match (v1, t1, q1) {
        (Some(v), Some(t), Some(q)) => Some(json!({"vector": v, "timeseries": t, "query": q})),
        _ => None,
    };
    let usage: Vec<_> = governor
        .usages()
        .into_iter()
        .map(|u| json!({"engine": format!("{:?}", u.engine).to_lowercase(), "cap_bytes": u.cap_bytes, "rejections": u.rejections}))
        .collect();
    let right = |v: &serde_json::Value, t: &serde_json::Value, q: &serde_json::Value| {
        t["correct"] == true && q["correct"] == true && v["recall_at_10"].as_f64() >= Some(0.8)
    };
    let ok = right(&v, &t, &q)
        && solo
            .as_ref()
            .is_none_or(|s| right(&s["vector"], &s["timeseries"], &s["query"]));
    println!(
        "{}",
        json!({
            "governed": link.is_some() && fixed.is_none(),
            "static": fixed.is_some(),
            "seconds": started.elapsed().as_secs_f64(),
            "correct": ok,
            "vector": v,
            "timeseries": t,
            "query": q,
            "solo": solo,
            "budgets": usage,
            "cpu_seconds": cpu,
            "link": link.as_ref().map(|l| {
                let s = l.stats();
                let (probe_reads, probe_took) = link_governor.outside_probe_reads();
                json!({
                    "spills": s.spills,
                    "spilled_bytes": s.spilled_bytes,
                    "purges": s.purges,
                    "limit_changes": s.limit_changes,
                    // The database's memory.stat read near the ceiling.
                    "probe_reads": probe_reads,
                    "probe_seconds": probe_took.as_secs_f64(),
                })
            }),
        })
    );
    if !ok {
        bail!("a result was wrong");
    }
    Ok(())
}
