//! A scripted process for the attribution accuracy tests: engines with
//! different thread counts that allocate, free and release each other's
//! memory on command, and report the ground truth.
//!
//! Protocol (one line each way): it starts by printing
//! `{"pid":P,"engines":{"name":[tids...]}}`, then reads commands on stdin and
//! answers each with `ok`, `err <reason>`, or (for `truth`) a JSON object:
//! * `alloc ENGINE KIND MIB` (KIND: mmap, malloc, file)
//! * `free ENGINE KIND MIB` (freed by the engine's own threads)
//! * `release VICTIM BY munmap|madvise MIB` (VICTIM's anonymous memory,
//!   released by a thread of engine BY)
//! * `read VICTIM BY MILLIS` (a thread of engine BY reads every page of
//!   VICTIM's anonymous memory, over and over for MILLIS; answers
//!   `{"passes":N}`)
//! * `interleave FIRST SECOND N` (N blocks of 2 MiB each, alternating
//!   between the engines, every 2 MiB region shared by two blocks)
//! * `turns FIRST SECOND ROUNDS PAGES` (both engines' first threads on
//!   one CPU, taking turns: FIRST faults PAGES pages in and keeps them,
//!   then SECOND faults 64 pages in and unmaps them, ROUNDS times; with
//!   PAGES under the kernel's per-CPU counter batch, FIRST's pages stay
//!   in the CPU's part of the process's RSS counter until SECOND's pages
//!   push it over the batch and fold it into the total)
//! * `pin ENGINE NODE` (the engine's first thread onto NODE's CPUs)
//! * `nodes`: each engine's resident mapped memory by node, from the
//!   kernel (`move_pages`): `{"engine":{"node":bytes}}`
//! * `spawn ENGINE THREADS MIB` (new threads, born after registration,
//!   touch MIB between them and exit)
//! * page cache, files under `--dir` (a disk: tmpfs adds are not traced),
//!   each belonging to the engine that made it:
//!   * `pc-write ENGINE FILE MIB`: buffered writes, then `fdatasync` (the
//!     pages stay cached);
//!   * `pc-read ENGINE FILE`: reads it through (what is not cached comes
//!     in, readahead included);
//!   * `pc-map ENGINE FILE`: maps it and touches every page, then unmaps;
//!   * `pc-drop ENGINE FILE`: `POSIX_FADV_DONTNEED` on the whole file;
//!   * `pc-append ENGINE FILE MIB`: buffered writes at its end, then
//!     `fdatasync`: the file, all its cached pages, is now ENGINE's (the
//!     engine that last added a page of a file owns it);
//! * `truth` (its `page_cache` is each engine's files' cached bytes, by
//!   `mincore`), `quit`

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    sync::Mutex,
};

use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor_demo::{
    engine::Engine,
    memory::{self, Block, Kind, MIB},
};
use nodedb_governor_testkit::numa;

#[derive(Parser)]
struct Args {
    /// Engines as NAME:THREADS, comma separated.
    #[arg(long, default_value = "vector:1,timeseries:2,query:4")]
    engines: String,
    /// Where the page-cache commands' files go.
    #[arg(long, default_value = "/var/tmp/nodedb-attribution-probe")]
    dir: std::path::PathBuf,
}

/// The page-cache commands' files: name -> (engine, path).
type Files = Mutex<BTreeMap<String, (String, std::path::PathBuf)>>;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    memory::configure_malloc();
    let mut engines = BTreeMap::new();
    for spec in args.engines.split(',') {
        let (name, threads) = spec
            .split_once(':')
            .context("engine spec is NAME:THREADS")?;
        engines.insert(name.to_owned(), Engine::start(name, threads.parse()?));
    }
    let hello = serde_json::json!({
        "pid": std::process::id(),
        "engines": engines.iter().map(|(n, e)| (n.clone(), e.tids())).collect::<BTreeMap<_, _>>(),
    });
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let files: Files = Mutex::new(BTreeMap::new());
    let stdout = std::io::stdout();
    writeln!(stdout.lock(), "{hello}")?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            break;
        }
        let reply = match execute(&engines, &files, &args.dir, &words) {
            Ok(Some(json)) => json,
            Ok(None) => "ok".to_owned(),
            Err(e) => format!("err {e:#}"),
        };
        writeln!(stdout.lock(), "{reply}")?;
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}

fn execute(
    engines: &BTreeMap<String, Engine>,
    files: &Files,
    dir: &std::path::Path,
    words: &[&str],
) -> anyhow::Result<Option<String>> {
    let engine = |name: &str| {
        engines
            .get(name)
            .with_context(|| format!("no engine {name:?}"))
    };
    let mib = |s: &str| -> anyhow::Result<usize> { Ok(s.parse::<usize>()? * MIB) };
    match words {
        ["alloc", name, kind, n] => {
            engine(name)?.alloc(kind.parse::<Kind>().map_err(anyhow::Error::msg)?, mib(n)?)?
        }
        ["free", name, kind, n] => {
            engine(name)?.free(kind.parse::<Kind>().map_err(anyhow::Error::msg)?, mib(n)?)
        }
        ["release", victim, by, how, n] => {
            let blocks = engine(victim)?.take(Kind::Anon, mib(n)?);
            let by = engine(by)?;
            match *how {
                "munmap" => by.on(0, move || drop(blocks)),
                "madvise" => {
                    let blocks = Mutex::new(blocks);
                    let blocks = by.on(0, move || -> std::io::Result<_> {
                        let mut blocks = blocks.into_inner().expect("blocks");
                        for b in &mut blocks {
                            b.dont_need()?;
                        }
                        Ok(blocks)
                    })?;
                    // Still mapped, no longer resident: the victim keeps the
                    // mapping.
                    engine(victim)?.keep(blocks);
                }
                other => bail!("release how {other:?} (munmap, madvise)"),
            }
        }
        ["pool", mapper, user, n] => {
            // One engine's thread maps, another's faults the pages in
            // (a buffer pool handing out its reservation).
            let len = mib(n)?;
            // Huge pages where the kernel allows them (its `always`
            // setting gives them to every mapping; here, asked for): one
            // fault brings a whole region in.
            let mut block = engine(mapper)?.on(0, move || -> std::io::Result<Block> {
                let block = Block::reserve(len)?;
                block.advise_huge_pages()?;
                Ok(block)
            })?;
            let block = engine(user)?.on(0, move || {
                block.fault_in();
                block
            });
            engine(user)?.keep(vec![block]);
        }
        ["interleave", first, second, n] => {
            // N blocks of 2 MiB for each engine, alternating, each
            // starting halfway into a 2 MiB region (mmap does not align
            // them), so every region holds the end of one engine's block
            // and the start of the other's; faulted from the highest
            // address down, the order in which mmap hands addresses out.
            let n: usize = n.parse()?;
            const BLOCK: usize = 2 * MIB;
            let span = (2 * n + 2) * BLOCK;
            // SAFETY: a fresh reservation at an address of the kernel's
            // choosing; what the blocks do not replace stays reserved
            // (never resident) until the probe exits.
            let base = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    span,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if base == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error().into());
            }
            let start = (base as usize).next_multiple_of(BLOCK) + BLOCK / 2;
            for i in (0..2 * n).rev() {
                let at = start + i * BLOCK;
                let owner = engine(if i % 2 == 0 { first } else { second })?;
                // SAFETY: inside the reservation above, used by nothing
                // else.
                let block = owner.on(0, move || unsafe { Block::new_at(at, BLOCK) })?;
                owner.keep(vec![block]);
            }
        }
        ["turns", first, second, rounds, pages] => {
            let (first, second) = (engine(first)?, engine(second)?);
            let pages: usize = pages.parse()?;
            // The CPU the first engine's thread is on: both go there.
            let cpu = first.on(0, || {
                // SAFETY: no arguments; returns this thread's CPU.
                u32::try_from(unsafe { libc::sched_getcpu() })
            })?;
            first.on(0, move || numa::pin_current_thread(&[cpu]))?;
            second.on(0, move || numa::pin_current_thread(&[cpu]))?;
            for _ in 0..rounds.parse::<usize>()? {
                let block = first.on(0, move || -> std::io::Result<Block> {
                    let mut block = Block::reserve(pages * 4096)?;
                    block.fault_in();
                    Ok(block)
                })?;
                first.keep(vec![block]);
                second.on(0, || -> std::io::Result<()> {
                    Block::reserve(64 * 4096)?.fault_in();
                    Ok(())
                })?;
            }
        }
        ["read", victim, by, millis] => {
            let blocks = engine(victim)?.take(Kind::Anon, usize::MAX);
            let until =
                std::time::Instant::now() + std::time::Duration::from_millis(millis.parse()?);
            let (blocks, passes) = engine(by)?.on(0, move || {
                let mut passes = 0u64;
                while passes == 0 || std::time::Instant::now() < until {
                    for b in &blocks {
                        std::hint::black_box(b.read_pages());
                    }
                    passes += 1;
                }
                (blocks, passes)
            });
            engine(victim)?.keep(blocks);
            return Ok(Some(serde_json::json!({ "passes": passes }).to_string()));
        }
        ["pin", name, node] => {
            let cpus = numa::node_cpus(node.parse()?)?;
            engine(name)?.on(0, move || numa::pin_current_thread(&cpus))?;
        }
        ["nodes"] => {
            let mut all = BTreeMap::new();
            for (name, e) in engines {
                let by_node = e.with_blocks(|blocks| -> anyhow::Result<BTreeMap<u32, u64>> {
                    let mut by_node = BTreeMap::new();
                    for b in blocks.iter().filter(|b| b.kind() != Kind::Malloc) {
                        for node in numa::page_nodes(b.addr(), b.len())? {
                            if let Ok(node) = u32::try_from(node) {
                                *by_node.entry(node).or_insert(0) += 4096;
                            }
                        }
                    }
                    Ok(by_node)
                })?;
                all.insert(name.clone(), by_node);
            }
            return Ok(Some(serde_json::to_string(&all)?));
        }
        ["spawn", name, threads, n] => {
            engine(name)?.spawn_and_exit(threads.parse()?, mib(n)?)?;
        }
        ["pc-write", name, file, n] => {
            let path = dir.join(file);
            files
                .lock()
                .expect("files")
                .insert((*file).to_owned(), ((*name).to_owned(), path.clone()));
            let len = mib(n)?;
            engine(name)?.on(0, move || -> std::io::Result<()> {
                let mut f = std::fs::File::create(&path)?;
                let chunk = vec![0x5au8; MIB];
                for _ in 0..len / MIB {
                    f.write_all(&chunk)?;
                }
                f.sync_data()
            })?;
        }
        ["pc-append", name, file, n] => {
            let path = {
                let mut files = files.lock().expect("files");
                let entry = files
                    .get_mut(*file)
                    .with_context(|| format!("no file {file:?} (pc-write it first)"))?;
                entry.0 = (*name).to_owned();
                entry.1.clone()
            };
            let len = mib(n)?;
            engine(name)?.on(0, move || -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
                let chunk = vec![0xa5u8; MIB];
                for _ in 0..len / MIB {
                    f.write_all(&chunk)?;
                }
                f.sync_data()
            })?;
        }
        ["pc-read" | "pc-map" | "pc-drop", name, file] => {
            let path = files
                .lock()
                .expect("files")
                .get(*file)
                .map(|(_, p)| p.clone())
                .with_context(|| format!("no file {file:?} (pc-write it first)"))?;
            let op = words[0].to_owned();
            engine(name)?.on(0, move || -> std::io::Result<()> {
                let f = std::fs::File::open(&path)?;
                match op.as_str() {
                    "pc-read" => {
                        let mut buf = vec![0u8; MIB];
                        let mut r = &f;
                        while std::io::Read::read(&mut r, &mut buf)? > 0 {}
                    }
                    "pc-map" => {
                        // SAFETY: a private read-only mapping of our own
                        // file, dropped before returning.
                        let map = unsafe { memmap2::Mmap::map(&f)? };
                        let mut sum = 0u64;
                        for page in map.chunks(4096) {
                            sum = sum.wrapping_add(u64::from(std::hint::black_box(page[0])));
                        }
                        std::hint::black_box(sum);
                    }
                    _ => {
                        nodedb_governor::page_cache::drop_cached(&f)?;
                    }
                }
                Ok(())
            })?;
        }
        ["truth"] => {
            let mut page_cache: BTreeMap<String, u64> =
                engines.keys().map(|n| (n.clone(), 0)).collect();
            for (engine, path) in files.lock().expect("files").values() {
                let f = std::fs::File::open(path)?;
                *page_cache.entry(engine.clone()).or_default() +=
                    nodedb_governor::page_cache::resident_bytes(&f)?.0;
            }
            let truth = serde_json::json!({
                "page_cache": page_cache,
                "engines": engines.iter().map(|(n, e)| (n.clone(), e.resident_bytes())).collect::<BTreeMap<_, _>>(),
                "vm_rss": nodedb_governor_testkit::procfs::vm_rss_bytes(),
                "threads": engines.values().map(Engine::threads).sum::<usize>(),
            });
            return Ok(Some(truth.to_string()));
        }
        _ => bail!("unknown command {:?}", words.join(" ")),
    }
    Ok(None)
}
