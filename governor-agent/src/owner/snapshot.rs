//! The snapshot the owner publishes at every tick: what `status` answers
//! and `/metrics` renders, built from the figures the tick read, so that
//! serving them reads nothing from the kernel and waits for no one.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
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
/// publishes one, and its wake-up; and the owner's heartbeat, which the
/// readers judge without asking the owner anything.
#[derive(Debug)]
pub(super) struct Wanted {
    pub flag: AtomicBool,
    pub wake: Notify,
    pub beat: Heartbeat,
}

impl Wanted {
    /// A snapshot is wanted at once (the first tick builds one).
    pub fn new() -> Self {
        Self {
            flag: AtomicBool::new(true),
            wake: Notify::new(),
            beat: Heartbeat::new(),
        }
    }

    pub fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
}

/// A tick that has not ended for this long, at least, means the owner has
/// stopped (the calm tick is seconds at most; a tick under load, a few
/// hundred milliseconds).
pub const STALLED_FLOOR: Duration = Duration::from_secs(2);
/// ... and for this many of its periods.
pub const STALLED_PERIODS: u32 = 5;

/// When the owner last ended a tick, and its period then. Written by the
/// owner, read by `/healthz` and `/metrics` when they answer,
/// so that an owner that stopped ticking (stuck on an await, or a loop
/// that no longer reaches its tick) shows however long it has been,
/// even though every snapshot it published before says it was fine.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Nanoseconds from `origin` to the end of the last tick (0: none yet;
    /// the age is then counted from the start).
    last_ns: AtomicU64,
    period_ms: AtomicU64,
}

/// How long ago the owner last ended a tick, and whether that is too long.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Liveness {
    pub age: Duration,
    pub period: Duration,
    pub stalled: bool,
}

impl Liveness {
    /// How long a tick may be awaited before the owner counts as stopped.
    pub fn stalled_after(period: Duration) -> Duration {
        (period * STALLED_PERIODS).max(STALLED_FLOOR)
    }
}

impl Heartbeat {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            last_ns: AtomicU64::new(0),
            period_ms: AtomicU64::new(0),
        }
    }

    /// A tick has ended; the next is due within `period`.
    pub fn beat(&self, period: Duration) {
        let ns = self.origin.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.period_ms
            .store(period.as_millis() as u64, Ordering::Relaxed);
        self.last_ns.store(ns.max(1), Ordering::Relaxed);
    }

    /// The owner's liveness as of `now`.
    pub fn at(&self, now: Instant) -> Liveness {
        let last = self.origin + Duration::from_nanos(self.last_ns.load(Ordering::Relaxed));
        let period = Duration::from_millis(self.period_ms.load(Ordering::Relaxed));
        let age = now.saturating_duration_since(last);
        Liveness {
            age,
            period,
            stalled: age > Liveness::stalled_after(period),
        }
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

    /// Whether the owner still ticks, as of now.
    pub fn liveness(&self) -> Liveness {
        self.wanted.beat.at(Instant::now())
    }
}

/// How long the slow parts of a snapshot are shown as read: the
/// harness and dashboards read the status several times a second, and
/// these took most of a snapshot's system calls (a file per agent thread
/// for the capabilities, a call per program for its statistics, the
/// nodes' directories for the topology).
pub(super) const SLOW_PARTS_EVERY: Duration = Duration::from_secs(1);

/// What a snapshot shows that changes slowly: the programs' run counts
/// and times (read for the status and `/metrics`, a second old at most),
/// the agent's capabilities (they only ever shrink, at startup) and the
/// machine's NUMA topology (it changes with hotplug only).
pub(super) struct SlowParts {
    pub at: Instant,
    pub programs: Vec<crate::attribution::ProgramStats>,
    pub capabilities: crate::status::CapabilityStatus,
    pub topology: Result<nodedb_governor::Topology, String>,
}

impl Agent {
    /// Builds the status report from `reading` and `ceiling` (this tick's
    /// figures) and the policy's state, and publishes it.
    pub(super) fn publish(&mut self, reading: Reading, ceiling: Option<CeilingStatus>) {
        let now = Instant::now();
        self.wanted.flag.store(false, Ordering::Relaxed);
        let slow = match self.slow.take() {
            Some(slow) if now.duration_since(slow.at) < SLOW_PARTS_EVERY => slow,
            _ => SlowParts {
                at: now,
                programs: self.attribution.program_stats(),
                // Read as the snapshot is built (a file per thread).
                capabilities: crate::procfs::capabilities(),
                topology: nodedb_governor::Topology::detect().map_err(|e| e.to_string()),
            },
        };
        let mut report = StatusReport::new(
            &self.config.database,
            self.identity,
            self.subtree
                .as_ref()
                .map(|s| s.domain.display().to_string()),
            &self.config.engine_names(),
            reading,
        );
        let nodes = slow
            .topology
            .as_ref()
            .map_err(Clone::clone)
            .and_then(|topology| {
                crate::numa::read(
                    topology,
                    self.ceiling.as_ref().map(|c| (c.dir(), c.backend())),
                    ceiling.as_ref().map(|c| c.limit_bytes),
                    &self.policy.rules().thresholds,
                    self.config.numa.weights.as_deref(),
                )
            });
        match nodes {
            Ok(mut nodes) => {
                crate::numa::judge_by_parts(
                    &mut nodes,
                    ceiling.as_ref().map(|c| c.limit_bytes),
                    self.policy.node_parts(),
                    &self.policy.rules().thresholds,
                );
                report.numa = nodes;
            }
            Err(e) => report.numa_error = Some(e),
        }
        report.ceiling = ceiling;
        report.ceiling_error = self.ceiling_error.clone();
        report.cpuset = self.cpuset.as_ref().map(crate::cpuset::Cpuset::status);
        report.cpuset_error = self.cpuset_error.clone();
        report.metrics_addr = self.metrics_addr.map(|a| a.to_string());
        report.capabilities = slow.capabilities.clone();
        report.emergency = self.policy.emergency();
        report.psi = self
            .psi
            .as_ref()
            .map(|m| m.status(self.policy.stalling(now, m.window())));
        report.psi_error = self.psi_error.clone();
        report.programs = slow.programs.clone();
        self.slow = Some(slow);
        report.restart = self.restart.clone();
        match self.attribution.kernel_events() {
            Ok(events) => {
                self.note_kernel_events(&events);
                report.kernel_events = Some(events);
            }
            Err(e) => report.kernel_events_error = Some(e.to_string()),
        }
        report.ticks = crate::status::TickStatus {
            ticks: self.health.ticks,
            last_us: self.health.last_tick.as_micros() as u64,
            total_us: self.health.tick_time.as_micros() as u64,
            period_ms: self.health.period.as_millis() as u64,
            calm_ticks: self.health.calm_ticks,
            time: self.tick_times.summary(),
        };
        report.scheduling = self.scheduling.clone();
        report.placement = self.placement.clone();
        report.marks = crate::status::MarkStatus {
            enabled: self.policy.rules().mark_events,
            armed: self.attribution.armed_marks() as u64,
            wake: self.wakes.summary(),
            reaction: self.reactions.summary(),
            ..self.mark_status
        };
        report.delivery = self.deliveries.summary();
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

    /// The agent's threads dropped capabilities (or anything else the slow
    /// parts show changed at once): the next snapshot reads them afresh,
    /// not the second-old figures.
    pub fn slow_parts_changed(&mut self) {
        self.slow = None;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The owner counts as stopped once no tick has ended for five of its
    /// periods, and never sooner than the floor (a calm tick of a second
    /// is not a stall); a tick that ends makes it live again.
    #[test]
    fn the_owner_is_stalled_past_five_periods_or_the_floor() {
        let beat = Heartbeat::new();
        let start = beat.origin;
        // No tick yet: the age counts from the start.
        let l = beat.at(start + Duration::from_millis(1500));
        assert_eq!(l.age, Duration::from_millis(1500));
        assert!(!l.stalled, "{l:?}");
        assert!(
            beat.at(start + STALLED_FLOOR + Duration::from_millis(1))
                .stalled
        );

        beat.beat(Duration::from_millis(20));
        let ended = start + Duration::from_nanos(beat.last_ns.load(Ordering::Relaxed));
        assert!(!beat.at(ended + STALLED_FLOOR).stalled, "the floor holds");
        let l = beat.at(ended + STALLED_FLOOR + Duration::from_millis(1));
        assert!(l.stalled && l.period == Duration::from_millis(20), "{l:?}");

        // A calm period of a second: five of them.
        beat.beat(Duration::from_secs(1));
        let ended = start + Duration::from_nanos(beat.last_ns.load(Ordering::Relaxed));
        assert!(!beat.at(ended + Duration::from_millis(4900)).stalled);
        assert!(beat.at(ended + Duration::from_millis(5001)).stalled);
        // A reading from before the last beat is not a negative age.
        assert_eq!(beat.at(start).age, Duration::ZERO);
    }
}
