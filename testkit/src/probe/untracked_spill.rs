//! Spill handlers for memory the engines touched without reserving it, so
//! that only the kernel's attribution can make the agent ask for a spill.

use std::sync::Arc;

use nodedb_governor::{
    EngineId, HandlerRegistration, MemoryGovernor, SpillConfig, SpillController, control::AgentLink,
};
use nodedb_governor_demo::{governed, untracked::Untracked};

use super::AgentArgs;

/// A spill controller with one [`Untracked`] handler per engine given.
pub struct UntrackedSpill {
    pub controller: Arc<SpillController>,
    untracked: Vec<(EngineId, Arc<Untracked>)>,
}

impl UntrackedSpill {
    pub fn new(engines: &[EngineId]) -> anyhow::Result<Self> {
        Ok(Self {
            controller: Arc::new(SpillController::new(SpillConfig::default())?),
            untracked: engines
                .iter()
                .map(|e| (*e, Arc::new(Untracked::default())))
                .collect(),
        })
    }

    /// The memory `engine` touched; panics for an engine not given to
    /// [`new`](Self::new).
    pub fn of(&self, engine: EngineId) -> Arc<Untracked> {
        self.untracked
            .iter()
            .find(|(e, _)| *e == engine)
            .map(|(_, u)| u.clone())
            .unwrap_or_else(|| panic!("no untracked memory for {engine:?}"))
    }

    /// Registers the handlers; they stay registered while the returned
    /// guards live.
    pub fn register(&self) -> Vec<HandlerRegistration> {
        self.untracked
            .iter()
            .map(|(e, u)| self.controller.register(*e, u.clone()))
            .collect()
    }

    /// Connects its own engines (and no others) to the agent, spill
    /// requests going to these handlers.
    pub fn connect_own(&self, agent: &AgentArgs) -> anyhow::Result<(MemoryGovernor, AgentLink)> {
        let engines: Vec<(&str, EngineId)> = self
            .untracked
            .iter()
            .map(|(e, _)| {
                let name = e
                    .builtin_name()
                    .ok_or_else(|| anyhow::anyhow!("{e:?} has no built-in name"))?;
                Ok((name, *e))
            })
            .collect::<anyhow::Result<_>>()?;
        agent.connect(&engines, Some(self.controller.clone()))
    }

    /// Connects the demo's three engines to the agent, spill requests
    /// going to these handlers.
    pub fn connect(&self, agent: &AgentArgs) -> anyhow::Result<(MemoryGovernor, AgentLink)> {
        agent.connect(&governed::ENGINES, Some(self.controller.clone()))
    }
}
