//! Which agent a probe joins: the arguments every probe takes, and the
//! connection they make.

use std::{path::PathBuf, sync::Arc};

use nodedb_governor::{EngineId, MemoryGovernor, SpillController, control::AgentLink};
use nodedb_governor_demo::governed;

/// `--socket` and `--database`, flattened into each probe's arguments
/// (`#[command(flatten)]`).
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// The agent's control socket.
    #[arg(long)]
    pub socket: PathBuf,
    /// The database the agent governs.
    #[arg(long)]
    pub database: String,
}

impl AgentArgs {
    /// Connects `engines`, with spill requests going to `spill`; returns
    /// once the agent welcomed the process and its budgets are in force.
    pub fn connect(
        &self,
        engines: &[(&str, EngineId)],
        spill: Option<Arc<SpillController>>,
    ) -> anyhow::Result<(MemoryGovernor, AgentLink)> {
        governed::connect(&self.socket, &self.database, engines, spill)
    }
}
