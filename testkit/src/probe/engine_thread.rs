//! Work done on a thread the agent knows as one of an engine's.

use std::time::Duration;

use anyhow::{anyhow, bail};
use nodedb_governor::{EngineId, control::AgentLink};

/// Runs `work` on a thread of its own, registered over `link` as one of
/// `engine`'s and placed by the agent (its engine's cgroup, or its tid
/// assigned) before `work` starts; returns what `work` returned. The
/// memory the thread touches is the engine's.
pub fn on_engine_thread<T: Send>(
    link: &AgentLink,
    engine: EngineId,
    work: impl FnOnce() -> anyhow::Result<T> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let tid = link.register_current_thread(engine)?;
            if !link.wait_placed(tid, Duration::from_secs(10)) {
                bail!(
                    "the agent did not place {engine:?} thread {tid}: {:?}",
                    link.stats()
                );
            }
            work()
        })
        .join()
        .map_err(|_| anyhow!("the {engine:?} thread panicked"))?
    })
}
