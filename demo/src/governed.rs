//! How the demo's processes join the agent: a governor whose budgets the
//! agent sets, and the control-channel link, connected and with the
//! agent's budgets applied.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::bail;
use nodedb_governor::{
    Budget, EngineCache, EngineId, MemoryGovernor, SpillController,
    control::{AgentLink, LinkConfig},
};

/// The agent's status, asked on its admin socket directly (a request
/// line, a reply line; no process spawned, so sampling it often costs
/// little). `None` when the agent does not answer.
pub fn admin_status(socket: &std::path::Path) -> Option<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"{\"op\":\"status\"}\n").ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    (v["result"] == "status").then_some(v)
}

/// The demo's engines, by their names in the agent's configuration.
pub const ENGINES: [(&str, EngineId); 3] = [
    ("vector", EngineId::Vector),
    ("timeseries", EngineId::Timeseries),
    ("query", EngineId::Query),
];

/// Connects `engines` to the agent at `socket`, with spill requests going
/// to `spill`. Returns once the agent welcomed the process and its budgets
/// replaced the library's own (which are unlimited until then).
pub fn connect(
    socket: &std::path::Path,
    database: &str,
    engines: &[(&str, EngineId)],
    spill: Option<Arc<SpillController>>,
) -> anyhow::Result<(MemoryGovernor, AgentLink)> {
    let (governor, link, _) = start(socket, database, engines, spill, false)?;
    Ok((governor, link))
}

/// [`connect`], with the engines' page cache on the link (the agent's
/// `drop_cache` requests, hot sets bounded by its configuration and
/// released in an Emergency). No spill controller.
pub fn connect_with_cache(
    socket: &std::path::Path,
    database: &str,
    engines: &[(&str, EngineId)],
) -> anyhow::Result<(MemoryGovernor, AgentLink, Arc<EngineCache>)> {
    let (governor, link, cache) = start(socket, database, engines, None, true)?;
    Ok((governor, link, cache.expect("asked for")))
}

fn start(
    socket: &std::path::Path,
    database: &str,
    engines: &[(&str, EngineId)],
    spill: Option<Arc<SpillController>>,
    with_cache: bool,
) -> anyhow::Result<(MemoryGovernor, AgentLink, Option<Arc<EngineCache>>)> {
    let mut budget = Budget::builder(1 << 40);
    for (_, id) in engines {
        budget = budget.engine(*id, 0, 1 << 40);
    }
    let governor = MemoryGovernor::new(budget.build()?);
    let mut builder = AgentLink::builder(&governor, LinkConfig::new(socket, database, engines));
    if let Some(spill) = spill {
        builder = builder.spill_controller(spill);
    }
    let cache = with_cache.then(|| EngineCache::new(&governor));
    if let Some(cache) = &cache {
        builder = builder.engine_cache(Arc::clone(cache));
    }
    let link = builder.start()?;
    wait_welcomed(&link, socket, engines.len())?;
    Ok((governor, link, cache))
}

/// Waits until the agent welcomed `link` and sent its budgets for all
/// `engines` of them (the library's own are unlimited until then).
pub fn wait_welcomed(
    link: &AgentLink,
    socket: &std::path::Path,
    engines: usize,
) -> anyhow::Result<()> {
    if !link.wait_connected(Duration::from_secs(30)) {
        bail!(
            "could not reach the agent at {}: {:?}",
            socket.display(),
            link.stats().last_error
        );
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while link.stats().limit_changes < engines as u64 {
        if Instant::now() > deadline {
            bail!("the agent sent no budgets: {:?}", link.stats());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}
