//! `nodedb-governor`: the privileged agent.

use std::process::ExitCode;

use clap::Parser;
use nodedb_governor_agent::cli::{self, Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    #[cfg(feature = "failpoints")]
    let _faults = nodedb_governor_agent::faults::setup();
    let result = match Cli::parse().command {
        Command::Run { config: path } => cli::load_config(path.as_ref()).and_then(|config| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(nodedb_governor_agent::run::run(config, path))
        }),
        other => cli::remote(other),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodedb-governor: {e:#}");
            ExitCode::FAILURE
        }
    }
}
