//! The status report: what `nodedb-governor status --json` prints. Its
//! schema is documented in the README and versioned by `schema`; fields are
//! only ever added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    attribution::{Attributed, Identity, ProcessAttribution, ProgramStats, Reading},
    policy::LibraryStatus,
};

/// Current schema version of [`StatusReport`].
pub const SCHEMA: &str = "nodedb-governor.status.v1";

/// What `status --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub schema: String,
    pub database: String,
    /// `cgroup` or `tid`.
    pub identity: Identity,
    /// The database's domain cgroup, when cgroup identity is used.
    pub cgroup: Option<String>,
    pub kernel: String,
    /// Per engine, summed over the database's processes.
    pub engines: BTreeMap<String, Attributed>,
    pub unattributed: Attributed,
    pub processes: Vec<ProcessAttribution>,
    /// The ceiling as the kernel enforces it (absent: not enforced; see
    /// `ceiling_error`).
    #[serde(default)]
    pub ceiling: Option<super::ceiling::CeilingStatus>,
    #[serde(default)]
    pub ceiling_error: Option<String>,
    /// Connected libraries and what the ladder did for each engine.
    #[serde(default)]
    pub clients: Vec<LibraryStatus>,
    /// Where `/metrics` is served, if it is.
    #[serde(default)]
    pub metrics_addr: Option<String>,
    /// What this agent found of an earlier one's state (taken over, or
    /// discarded and why).
    #[serde(default)]
    pub restart: crate::attribution::RestartStatus,
    /// What the programs counted besides memory: failed map inserts, execs
    /// followed (absent: not read; see `kernel_events_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_events: Option<KernelEvents>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_events_error: Option<String>,
    /// The capabilities the agent holds (after it dropped what it no
    /// longer needs at start).
    #[serde(default)]
    pub capabilities: CapabilityStatus,
    /// The whole database is at the emergency threshold of its ceiling
    /// (non-essential engines are under backpressure).
    #[serde(default)]
    pub emergency: bool,
    /// The pressure stall trigger (absent: off or unavailable, see
    /// `psi_error`).
    #[serde(default)]
    pub psi: Option<super::psi::PsiStatus>,
    #[serde(default)]
    pub psi_error: Option<String>,
    /// The eBPF programs and how often they ran (when the kernel's program
    /// statistics are on).
    #[serde(default)]
    pub programs: Vec<ProgramStats>,
    /// The kernel's marks: crossings that woke the agent between ticks.
    #[serde(default)]
    pub marks: MarkStatus,
    /// From a request queued for a library (limits, pressure, spill,
    /// purge, drop cache) to its write on the library's socket, over the
    /// last requests: the serving side's share of breach to spill.
    #[serde(default)]
    pub delivery: crate::latency::Summary,
    /// The agent's own loop.
    #[serde(default)]
    pub ticks: TickStatus,
    /// The agent thread's scheduling (`realtime_priority`).
    #[serde(default)]
    pub scheduling: crate::sched::SchedulingStatus,
    /// Per engine kept to CPUs (`[[engine]] cpus`): its threads' affinity.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub placement: BTreeMap<String, PlacementStatus>,
    /// Per NUMA node: its memory, the database's on it, and the node's
    /// pressure against its share of the ceiling (one entry on a machine
    /// of one node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub numa: Vec<crate::numa::NodeStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_error: Option<String>,
    /// The database's CPUs and memory nodes as the kernel keeps them
    /// (`[cpuset]`; absent: not configured, or not applied: see
    /// `cpuset_error`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset: Option<crate::cpuset::CpusetStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpuset_error: Option<String>,
}

/// An engine's CPUs, and how setting its threads' affinity went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementStatus {
    /// The CPUs its threads are kept to (a kernel list; empty after a
    /// reload took the list away: its threads were let run anywhere).
    pub cpus: String,
    /// Threads whose affinity was set, since the agent started.
    pub threads_pinned: u64,
    /// Threads whose affinity could not be set.
    pub errors: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// How much work the agent's ticks are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TickStatus {
    pub ticks: u64,
    /// The last tick's time (reading the kernel, deciding, acting), in
    /// microseconds.
    pub last_us: u64,
    /// All ticks' time together.
    pub total_us: u64,
    /// The tick's period now: `idle_tick_ms` while all is calm, else
    /// `tick_ms`.
    #[serde(default)]
    pub period_ms: u64,
    /// Ticks taken at the calm pace.
    #[serde(default)]
    pub calm_ticks: u64,
    /// The last ticks' times (p50, p99, longest): what a crossing or a
    /// library's message may wait behind on the owner.
    #[serde(default)]
    pub time: crate::latency::Summary,
}

/// What the marks did (see `mark_events` in the configuration).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkStatus {
    pub enabled: bool,
    /// Engines with a mark armed in the kernel now.
    pub armed: u64,
    /// Crossings the programs reported.
    pub events: u64,
    /// Times the agent read the kernel and ran its ladder for them
    /// (crossings that came together are served by one).
    pub reactions: u64,
    /// From the crossing (in the program) to the agent reading it, the
    /// last time and the longest, in microseconds.
    pub last_wake_us: u64,
    pub max_wake_us: u64,
    /// Crossings the exact figure did not confirm (the shared total ran
    /// ahead of it); the mark was armed again.
    pub early: u64,
    /// Records on the ring buffer the agent could not read.
    pub bad_records: u64,
    /// From the crossing (in the program) to the agent reading it, over
    /// the last crossings.
    #[serde(default)]
    pub wake: crate::latency::Summary,
    /// From reading a crossing to the ladder's requests queued for the
    /// libraries (the kernel read again, the policy run), per reaction.
    #[serde(default)]
    pub reaction: crate::latency::Summary,
}

impl StatusReport {
    pub fn new(
        database: &str,
        identity: Identity,
        cgroup: Option<String>,
        engine_names: &[String],
        usage: Reading,
    ) -> Self {
        let mut engines: BTreeMap<String, Attributed> = engine_names
            .iter()
            .map(|n| (n.clone(), Attributed::default()))
            .collect();
        let mut unattributed = Attributed::default();
        for p in &usage.processes {
            for (name, e) in &p.engines {
                engines.entry(name.clone()).or_default().add(e);
            }
            unattributed.add(&p.unattributed);
        }
        Self {
            schema: SCHEMA.into(),
            database: database.into(),
            identity,
            cgroup,
            kernel: kernel_release(),
            engines,
            unattributed,
            processes: usage.processes,
            ceiling: None,
            ceiling_error: None,
            clients: Vec::new(),
            metrics_addr: None,
            capabilities: CapabilityStatus::default(),
            kernel_events: None,
            restart: Default::default(),
            kernel_events_error: None,
            emergency: false,
            psi: None,
            psi_error: None,
            programs: Vec::new(),
            marks: MarkStatus::default(),
            delivery: Default::default(),
            ticks: TickStatus::default(),
            scheduling: Default::default(),
            placement: BTreeMap::new(),
            numa: Vec::new(),
            numa_error: None,
            cpuset: None,
            cpuset_error: None,
        }
    }

    /// A human-readable table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "database {} ({} identity{}), kernel {}\n",
            self.database,
            match self.identity {
                Identity::Cgroup => "cgroup",
                Identity::Tid => "tid",
            },
            self.cgroup
                .as_deref()
                .map(|c| format!(", {c}"))
                .unwrap_or_default(),
            self.kernel
        );
        out.push_str(&format!(
            "{:<14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10} {:>12} {:>12}\n",
            "engine",
            "resident",
            "anon",
            "file",
            "shmem",
            "mapped",
            "faults",
            "page cache",
            "evicted"
        ));
        let row = |name: &str, e: &Attributed| {
            format!(
                "{:<14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10} {:>12} {:>12}\n",
                name,
                mib(e.resident_bytes),
                mib(e.anon_bytes),
                mib(e.file_bytes),
                mib(e.shmem_bytes),
                mib(e.mapped_bytes),
                e.page_faults,
                mib(e.page_cache_bytes),
                mib(e.page_cache_evicted_bytes)
            )
        };
        for (name, e) in &self.engines {
            out.push_str(&row(name, e));
        }
        out.push_str(&row("(unattributed)", &self.unattributed));
        let rss: u64 = self.processes.iter().filter_map(|p| p.vm_rss_bytes).sum();
        out.push_str(&format!(
            "{} process(es), VmRSS {}\n",
            self.processes.len(),
            mib(rss)
        ));
        match (&self.ceiling, &self.ceiling_error) {
            (Some(c), _) => out.push_str(&format!(
                "ceiling {} ({:?}, high {}) on {}: {} in use; events high {} max {} oom {} oom_kill {}\n",
                mib(c.limit_bytes),
                c.backend,
                mib(c.high_bytes),
                c.cgroup,
                mib(c.current_bytes),
                c.events.high,
                c.events.max,
                c.events.oom,
                c.events.oom_kill
            )),
            (None, Some(e)) => out.push_str(&format!("ceiling not enforced: {e}\n")),
            (None, None) => {}
        }
        if let Some(c) = &self.ceiling {
            match (&c.protected_bytes, &c.protection_note) {
                (Some(low), _) if *low > 0 => out.push_str(&format!(
                    "hot sets protected by memory.low: {}\n",
                    mib(*low)
                )),
                (_, Some(note)) => out.push_str(&format!("hot sets: {note}\n")),
                _ => {}
            }
        }
        for (engine, p) in &self.placement {
            out.push_str(&format!(
                "engine {engine} on CPUs {}: {} threads placed, {} refused{}\n",
                if p.cpus.is_empty() { "(any)" } else { &p.cpus },
                p.threads_pinned,
                p.errors,
                p.last_error
                    .as_ref()
                    .map_or(String::new(), |e| format!(" (last: {e})"))
            ));
        }
        for n in &self.numa {
            out.push_str(&format!(
                "node {} (CPUs {}): {} of {} free, page cache {}, anon {}; the database {} anon {} file of its {} share, level {}\n",
                n.node,
                n.cpus,
                mib(n.memory_free_bytes),
                mib(n.memory_total_bytes),
                mib(n.file_bytes),
                mib(n.anon_bytes),
                n.database_anon_bytes.map_or("-".to_owned(), mib),
                n.database_file_bytes.map_or("-".to_owned(), mib),
                n.ceiling_share_bytes.map_or("-".to_owned(), mib),
                n.level.map_or("-", |l| l.name()),
            ));
        }
        if let Some(e) = &self.numa_error {
            out.push_str(&format!("NUMA figures: {e}\n"));
        }
        match (&self.cpuset, &self.cpuset_error) {
            (Some(c), _) => out.push_str(&format!(
                "cpuset ({:?}) on {}: CPUs {}, memory nodes {}\n",
                c.backend, c.cgroup, c.effective_cpus, c.effective_mems
            )),
            (None, Some(e)) => out.push_str(&format!("cpuset not applied: {e}\n")),
            (None, None) => {}
        }
        if let Some(e) = &self.scheduling.error {
            out.push_str(&format!(
                "agent scheduling: {} ({e})\n",
                self.scheduling.policy
            ));
        }
        for c in &self.clients {
            for (name, e) in &c.engines {
                out.push_str(&format!(
                    "pid {} {:<12} budget {} resident {} reserved {} level {} spills {} ({} freed, {} forced by take-backs) purges {}\n",
                    c.pid,
                    name,
                    mib(e.budget_bytes),
                    mib(e.resident_bytes),
                    mib(e.reserved_bytes),
                    e.level.map_or("-", |l| l.name()),
                    e.spill_requests,
                    mib(e.spilled_bytes),
                    e.forced_spills,
                    e.purges
                ));
                if e.page_cache_share_bytes.is_some() || e.hot_set_bytes > 0 {
                    out.push_str(&format!(
                        "pid {} {:<12} page cache {} share {} drops {} ({} freed) hot set locked {}\n",
                        c.pid,
                        name,
                        mib(e.page_cache_bytes),
                        e.page_cache_share_bytes.map_or("none".to_owned(), mib),
                        e.cache_drop_requests,
                        mib(e.cache_dropped_bytes),
                        mib(e.hot_set_bytes)
                    ));
                }
            }
            match (&c.memlock_bytes, &c.memlock_error) {
                (_, Some(e)) => out.push_str(&format!("pid {} RLIMIT_MEMLOCK: {e}\n", c.pid)),
                (Some(b), None) => out.push_str(&format!(
                    "pid {} RLIMIT_MEMLOCK {}\n",
                    c.pid,
                    if *b == u64::MAX {
                        "unlimited".to_owned()
                    } else {
                        mib(*b)
                    }
                )),
                _ => {}
            }
            for l in &c.loans {
                out.push_str(&format!(
                    "pid {} loan {} -> {}: {}\n",
                    c.pid,
                    l.lender,
                    l.borrower,
                    mib(l.bytes)
                ));
            }
        }
        out
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The running kernel's release, read once (a report is built every tick).
fn kernel_release() -> String {
    static RELEASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    RELEASE
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        })
        .clone()
}

/// The agent's capabilities: every thread's effective and permitted sets
/// and the bounding set, together (names as the kernel's headers spell
/// them, lower case), as /proc shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityStatus {
    pub effective: Vec<String>,
    pub permitted: Vec<String>,
    pub bounding: Vec<String>,
    /// Why they could not be read, if they could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the eBPF programs counted besides memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEvents {
    /// Per map: inserts the programs could not make (the map full, or the
    /// kernel out of memory for it), each a piece of attribution lost (a
    /// region's owner, a release's, an address space or a break not
    /// learned, a thread's inherited engine). Zero in a healthy agent.
    pub insert_failures: BTreeMap<String, u64>,
    /// Governed processes that called exec and were followed into their
    /// new image.
    pub execs_followed: u64,
}
