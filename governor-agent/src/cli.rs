//! Command-line interface of `nodedb-governor`.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use super::{
    admin::{self, Reply, Request},
    config::{Config, DEFAULT_CONFIG},
};

#[derive(Debug, Parser)]
#[command(
    name = "nodedb-governor",
    version,
    about = "Kernel-assisted memory governor for multi-engine databases"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the eBPF programs, own the cgroup subtree and govern.
    Run {
        /// Configuration file (the bundled default when omitted).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Move a thread into an engine (temporary, until the library's control
    /// channel exists).
    Assign {
        #[arg(long)]
        pid: u32,
        #[arg(long)]
        tid: u32,
        #[arg(long)]
        engine: String,
        #[command(flatten)]
        target: Target,
    },
    /// Print per-engine attributed memory.
    Status {
        /// Machine-readable output (schema in the README).
        #[arg(long)]
        json: bool,
        /// Refresh every second until Ctrl-C.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        target: Target,
    },
    /// A live view of every governed engine: resident against budget,
    /// pressure, spills, loans (q quits).
    Top {
        /// Refresh interval, milliseconds.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Validate a configuration file.
    CheckConfig {
        file: PathBuf,
        /// Print the configuration as the agent resolves it (the ceiling
        /// and every engine's budget and floor in bytes) as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct Target {
    /// The agent's admin socket (from the configuration when omitted).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Configuration to take the socket path from.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl Target {
    fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Ok(load_config(self.config.as_ref())?.socket_path())
    }
}

pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    let (text, origin) = match path {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (DEFAULT_CONFIG.to_owned(), "the bundled default".to_owned()),
    };
    Config::parse(&text).with_context(|| format!("in {origin}"))
}

/// Runs a command against a running agent, or on a file (everything but
/// `run`).
pub fn remote(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { .. } => unreachable!("`run` is handled by main"),
        Command::CheckConfig { file, json } => {
            let c = load_config(Some(&file))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "database": c.database,
                        "ceiling_bytes": c.ceiling_bytes(),
                        "enforce": c.enforce,
                        "engines": c.limits(),
                    })
                );
                return Ok(());
            }
            println!(
                "{}: ok (database {}, {} engines)",
                file.display(),
                c.database,
                c.engines.len()
            );
            Ok(())
        }
        Command::Assign {
            pid,
            tid,
            engine,
            target,
        } => match admin::call(&target.socket()?, &Request::Assign { pid, tid, engine })? {
            Reply::Assigned { pid, tid, engine } => {
                println!("thread {tid} of process {pid} is now in engine {engine}");
                Ok(())
            }
            Reply::Error { message } => anyhow::bail!("{message}"),
            other => anyhow::bail!("unexpected reply {other:?}"),
        },
        Command::Top {
            interval_ms,
            target,
        } => super::top::run(
            &target.socket()?,
            std::time::Duration::from_millis(interval_ms.max(100)),
        ),
        Command::Status {
            json,
            watch,
            target,
        } => {
            let socket = target.socket()?;
            loop {
                let report = match admin::call(&socket, &Request::Status)? {
                    Reply::Status(s) => s,
                    Reply::Error { message } => anyhow::bail!("{message}"),
                    other => anyhow::bail!("unexpected reply {other:?}"),
                };
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    if watch {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", report.render());
                }
                if !watch {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
}
