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
//! * `spawn ENGINE THREADS MIB` (new threads, born after registration,
//!   touch MIB between them and exit)
//! * `truth`, `quit`

use std::{
    collections::BTreeMap,
    io::{BufRead, Write},
    sync::Mutex,
};

use anyhow::{Context, bail};
use clap::Parser;
use nodedb_governor_demo::{
    engine::Engine,
    memory::{self, Kind, MIB},
};

#[derive(Parser)]
struct Args {
    /// Engines as NAME:THREADS, comma separated.
    #[arg(long, default_value = "vector:1,timeseries:2,query:4")]
    engines: String,
}

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
    let stdout = std::io::stdout();
    writeln!(stdout.lock(), "{hello}")?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"quit") {
            break;
        }
        let reply = match execute(&engines, &words) {
            Ok(Some(json)) => json,
            Ok(None) => "ok".to_owned(),
            Err(e) => format!("err {e:#}"),
        };
        writeln!(stdout.lock(), "{reply}")?;
    }
    Ok(())
}

fn execute(engines: &BTreeMap<String, Engine>, words: &[&str]) -> anyhow::Result<Option<String>> {
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
        ["spawn", name, threads, n] => {
            engine(name)?.spawn_and_exit(threads.parse()?, mib(n)?)?;
        }
        ["truth"] => {
            let truth = serde_json::json!({
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
