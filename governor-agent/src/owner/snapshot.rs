//! The snapshot the owner publishes at every tick: what `status` answers
//! and `/metrics` renders, built from the figures the tick read, so that
//! serving them reads nothing from the kernel and waits for no one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{Notify, watch};

use super::Agent;
use crate::{attribution::Reading, ceiling::CeilingStatus, status::StatusReport};

/// How the agent's own loop is doing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Health {
    pub ticks: u64,
    /// How long the last tick took (reading the kernel, deciding, acting).
    pub last_tick: Duration,
    /// All ticks together.
    pub tick_time: Duration,
    /// The tick's period now.
    pub period: Duration,
    /// Ticks taken at the calm pace.
    pub calm_ticks: u64,
}

/// The agent's state as of one tick.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub report: StatusReport,
    pub health: Health,
}

/// A reader's request for a snapshot: the flag the owner clears when it
/// publishes one, and its wake-up.
#[derive(Debug, Default)]
pub(super) struct Wanted {
    pub flag: AtomicBool,
    pub wake: Notify,
}

impl Wanted {
    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// A reader of the published snapshots, for the tasks that serve them. A
/// read asks the owner for a snapshot and waits for it (a second at most,
/// then it takes the last one): the owner builds one only when asked
/// (with VmRSS and the eBPF programs' statistics read afresh, a system
/// call per process and per program), so their cost goes with how often
/// someone looks, and a calm agent answers at once, not at its next tick.
#[derive(Clone, Debug)]
pub struct Snapshots {
    rx: watch::Receiver<Arc<Snapshot>>,
    wanted: Arc<Wanted>,
}

impl Snapshots {
    pub(super) fn new(rx: watch::Receiver<Arc<Snapshot>>, wanted: Arc<Wanted>) -> Self {
        Self { rx, wanted }
    }

    /// A snapshot built after this call (or, if none comes within a
    /// second, the last one).
    pub async fn next(&self) -> Arc<Snapshot> {
        let mut rx = self.rx.clone();
        rx.mark_unchanged();
        self.wanted.flag.store(true, Ordering::Relaxed);
        self.wanted.wake.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        rx.borrow_and_update().clone()
    }
}

impl Agent {
    /// Builds the status report from `reading` and `ceiling` (this tick's
    /// figures) and the policy's state, and publishes it.
    pub(super) fn publish(&mut self, reading: Reading, ceiling: Option<CeilingStatus>) {
        let now = Instant::now();
        self.wanted.flag.store(false, Ordering::Relaxed);
        self.programs = self.attribution.program_stats();
        let mut report = StatusReport::new(
            &self.config.database,
            self.identity,
            self.subtree
                .as_ref()
                .map(|s| s.domain.display().to_string()),
            &self.config.engine_names(),
            reading,
        );
        match crate::numa::read(
            self.ceiling.as_ref().map(|c| (c.dir(), c.backend())),
            ceiling.as_ref().map(|c| c.limit_bytes),
            &self.policy.rules().thresholds,
            self.config.numa.weights.as_deref(),
        ) {
            Ok(nodes) => report.numa = nodes,
            Err(e) => report.numa_error = Some(e),
        }
        report.ceiling = ceiling;
        report.ceiling_error = self.ceiling_error.clone();
        report.cpuset = self.cpuset.as_ref().map(crate::cpuset::Cpuset::status);
        report.cpuset_error = self.cpuset_error.clone();
        report.metrics_addr = self.metrics_addr.map(|a| a.to_string());
        report.emergency = self.policy.emergency();
        report.psi = self
            .psi
            .as_ref()
            .map(|m| m.status(self.policy.stalling(now, m.window())));
        report.psi_error = self.psi_error.clone();
        report.programs = self.programs.clone();
        report.ticks = crate::status::TickStatus {
            ticks: self.health.ticks,
            last_us: self.health.last_tick.as_micros() as u64,
            total_us: self.health.tick_time.as_micros() as u64,
            period_ms: self.health.period.as_millis() as u64,
            calm_ticks: self.health.calm_ticks,
        };
        report.scheduling = self.scheduling.clone();
        report.placement = self.placement.clone();
        report.marks = crate::status::MarkStatus {
            enabled: self.policy.rules().mark_events,
            armed: self.attribution.armed_marks() as u64,
            ..self.mark_status
        };
        report.clients = self
            .policy
            .libraries()
            .map(|(_, l)| l.status(self.policy.rules()))
            .collect();
        self.snapshot.send_replace(Arc::new(Snapshot {
            report,
            health: self.health,
        }));
    }

    /// Publishes a snapshot read afresh, outside a tick (after an `assign`,
    /// so that a `status` straight after it shows the process).
    pub(super) fn publish_now(&mut self) {
        match self.attribution.read() {
            Ok(reading) => {
                let ceiling = self.ceiling.as_ref().map(crate::ceiling::Ceiling::status);
                self.publish(reading, ceiling);
            }
            Err(e) => tracing::warn!(error = %e, "reading attribution"),
        }
    }
}
