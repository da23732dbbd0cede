//! The agent's end of the control channel, and the enforcement ladder it
//! drives from the kernel's attribution.
//!
//! Each library connection is a [`Client`]: a process (its pid from the
//! socket's peer credentials, never from the message), the engines it
//! declared, its last report, and the state of the ladder per engine:
//!
//! | level (resident / budget) | on entering | while there |
//! |---|---|---|
//! | Warning (75%) | purge the engine's arena | |
//! | Critical (90%) | spill request down to `restore` (75%) | a new spill request when the last one is answered or 250 ms old |
//! | Emergency (97%) | as Critical | as Critical |
//!
//! Every level change is sent to the library as `pressure`, logged and
//! counted.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use tokio::sync::mpsc::UnboundedSender;

use super::{config::Config, status::Usage};
use crate::{
    PressureLevel,
    control::wire::{EngineReport, Level, ToAgent, ToLibrary},
};

/// A spill request not answered within this is sent again.
const SPILL_RETRY: Duration = Duration::from_millis(250);

/// Counters of what the ladder did, per engine.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EngineEnforcement {
    pub level: Option<String>,
    pub budget_bytes: u64,
    pub resident_bytes: u64,
    pub reserved_bytes: u64,
    pub spill_requests: u64,
    pub spilled_bytes: u64,
    pub purges: u64,
    pub level_changes: u64,
}

/// One connected library.
pub struct Client {
    pub pid: u32,
    pub uid: u32,
    tx: UnboundedSender<ToLibrary>,
    pub reports: BTreeMap<String, EngineReport>,
    levels: BTreeMap<String, PressureLevel>,
    spill_pending: BTreeMap<String, Instant>,
    pub enforcement: BTreeMap<String, EngineEnforcement>,
}

impl Client {
    pub fn new(pid: u32, uid: u32, tx: UnboundedSender<ToLibrary>) -> Self {
        Self {
            pid,
            uid,
            tx,
            reports: BTreeMap::new(),
            levels: BTreeMap::new(),
            spill_pending: BTreeMap::new(),
            enforcement: BTreeMap::new(),
        }
    }

    pub fn send(&self, m: ToLibrary) {
        // A closed channel means the connection is going away; its task
        // detaches the client.
        let _ = self.tx.send(m);
    }

    /// Takes in one message after the hello.
    pub fn on_message(&mut self, m: ToAgent) {
        match m {
            ToAgent::Report { engines } => {
                for r in engines {
                    self.enforcement
                        .entry(r.name.clone())
                        .or_default()
                        .reserved_bytes = r.reserved_bytes;
                    self.reports.insert(r.name.clone(), r);
                }
            }
            ToAgent::Spilled {
                engine,
                target_bytes,
                freed_bytes,
            } => {
                self.spill_pending.remove(&engine);
                self.enforcement
                    .entry(engine.clone())
                    .or_default()
                    .spilled_bytes += freed_bytes;
                tracing::info!(pid = self.pid, %engine, target_bytes, freed_bytes, "spill done");
            }
            ToAgent::Purged {
                engine,
                before_bytes,
                after_bytes,
            } => {
                tracing::info!(pid = self.pid, %engine, before_bytes, after_bytes, "arena purged");
            }
            // Hello and Thread are handled by the agent (they need the
            // cgroup subtree and attribution).
            ToAgent::Hello { .. } | ToAgent::Thread { .. } => {}
        }
    }

    /// One round of the ladder for this client's process.
    pub fn enforce(&mut self, config: &Config, usage: &Usage) {
        let Some(process) = usage.processes.iter().find(|p| p.pid == self.pid) else {
            return;
        };
        let thresholds = config.thresholds.pressure();
        let now = Instant::now();
        for limits in config.limits() {
            let name = limits.name;
            let resident = process.engines.get(&name).map_or(0, |e| e.resident_bytes);
            let level = thresholds.level(resident, limits.budget_bytes);
            let before = self
                .levels
                .insert(name.clone(), level)
                .unwrap_or(PressureLevel::Normal);
            let e = self.enforcement.entry(name.clone()).or_default();
            e.budget_bytes = limits.budget_bytes;
            e.resident_bytes = resident;
            e.level = Some(format!("{level:?}").to_lowercase());
            if level != before {
                e.level_changes += 1;
                tracing::info!(
                    pid = self.pid,
                    engine = %name,
                    from = ?before,
                    to = ?level,
                    resident,
                    budget = limits.budget_bytes,
                    "engine pressure changed"
                );
                let _ = self.tx.send(ToLibrary::Pressure {
                    engine: name.clone(),
                    level: Level::from(level),
                });
                if level >= PressureLevel::Warning && before < PressureLevel::Warning {
                    e.purges += 1;
                    let _ = self.tx.send(ToLibrary::Purge {
                        engine: name.clone(),
                    });
                }
            }
            if level >= PressureLevel::Critical {
                let due = self
                    .spill_pending
                    .get(&name)
                    .is_none_or(|sent| now.duration_since(*sent) >= SPILL_RETRY);
                if due {
                    let goal = (limits.budget_bytes as f64 * config.thresholds.restore) as u64;
                    let target = resident.saturating_sub(goal);
                    e.spill_requests += 1;
                    tracing::info!(
                        pid = self.pid,
                        engine = %name,
                        resident,
                        budget = limits.budget_bytes,
                        target,
                        "spill requested"
                    );
                    self.spill_pending.insert(name.clone(), now);
                    let _ = self.tx.send(ToLibrary::Spill {
                        engine: name,
                        target_bytes: target,
                    });
                }
            }
        }
    }
}
