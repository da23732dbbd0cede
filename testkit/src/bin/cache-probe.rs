//! A governed process whose timeseries engine keeps files in the page
//! cache: it connects with the engines' page cache on its link, writes
//! `--files` files of `--mib` MiB each under `--dir` on a registered
//! timeseries thread (buffered, then `fdatasync`, so they stay cached and
//! clean), then tracks them, oldest first, and prints a JSON line every 100 ms
//! (until killed): the bytes of its files still cached (`mincore`), each
//! file's, and the `drop_cache` requests its link served.

use std::{fs::File, io::Write, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use nodedb_governor::{EngineId, page_cache::resident_bytes};
use nodedb_governor_demo::governed;
use nodedb_governor_testkit::probe::{AgentArgs, on_engine_thread};

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    agent: AgentArgs,
    /// A directory on a disk (tmpfs pages are not page-cache adds).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 10)]
    files: usize,
    #[arg(long, default_value_t = 8)]
    mib: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let (_governor, link, cache) = governed::connect_with_cache(
        &args.agent.socket,
        &args.agent.database,
        &[("timeseries", EngineId::Timeseries)],
    )?;
    let chunk = vec![0x3cu8; 1 << 20];
    let files = on_engine_thread(&link, EngineId::Timeseries, || {
        let mut files = Vec::new();
        for i in 0..args.files {
            let path = args.dir.join(format!("segment-{i:03}"));
            let mut f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            for _ in 0..args.mib {
                f.write_all(&chunk)?;
            }
            f.sync_data()?;
            files.push(Arc::new(f));
        }
        Ok(files)
    })?;
    // Tracked once all are written (a request that comes meanwhile finds
    // nothing to drop), in one quick pass (a request between two trackings
    // would find only some: the window is microseconds against the agent's
    // 20 ms tick), oldest first: the cache orders files used in the same
    // microsecond by when they were tracked.
    let tracked: Vec<_> = files
        .into_iter()
        .map(|f| cache.track(EngineId::Timeseries, f))
        .collect();
    loop {
        let per_file: Vec<u64> = tracked
            .iter()
            .map(|t| resident_bytes(t.file()).map(|(r, _)| r))
            .collect::<Result<_, _>>()?;
        println!(
            "{}",
            serde_json::json!({
                "cached_bytes": per_file.iter().sum::<u64>(),
                "per_file": per_file,
                "cache_drops": link.stats().cache_drops,
            })
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
