//! The status report: what `nodedb-governor status --json` prints. Its
//! schema is documented in the README and versioned by `schema`; fields are
//! only ever added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Current schema version of [`StatusReport`].
pub const SCHEMA: &str = "nodedb-governor.status.v1";

/// Attributed memory of one engine (or of the unattributed bucket).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineUsage {
    /// anon + file + shmem.
    pub resident_bytes: u64,
    pub anon_bytes: u64,
    pub file_bytes: u64,
    pub shmem_bytes: u64,
    pub swap_bytes: u64,
    /// Address space mapped by the engine's threads and not yet unmapped.
    pub mapped_bytes: u64,
    pub page_faults: u64,
    /// Memory this engine's threads released on behalf of other engines.
    pub released_for_others_bytes: u64,
}

impl EngineUsage {
    pub fn add(&mut self, o: &EngineUsage) {
        self.resident_bytes += o.resident_bytes;
        self.anon_bytes += o.anon_bytes;
        self.file_bytes += o.file_bytes;
        self.shmem_bytes += o.shmem_bytes;
        self.swap_bytes += o.swap_bytes;
        self.mapped_bytes += o.mapped_bytes;
        self.page_faults += o.page_faults;
        self.released_for_others_bytes += o.released_for_others_bytes;
    }
}

/// One governed process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessUsage {
    pub pid: u32,
    pub engines: BTreeMap<String, EngineUsage>,
    pub unattributed: EngineUsage,
    /// The kernel's VmRSS for the process, for comparison.
    pub vm_rss_bytes: Option<u64>,
}

/// Every governed process.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub processes: Vec<ProcessUsage>,
}

/// What `status --json` prints.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub schema: String,
    pub database: String,
    /// `cgroup` or `tid`.
    pub identity: super::attribution::Identity,
    /// The database's domain cgroup, when cgroup identity is used.
    pub cgroup: Option<String>,
    pub kernel: String,
    /// Per engine, summed over the database's processes.
    pub engines: BTreeMap<String, EngineUsage>,
    pub unattributed: EngineUsage,
    pub processes: Vec<ProcessUsage>,
    /// The ceiling as the kernel enforces it (absent: not enforced; see
    /// `ceiling_error`).
    #[serde(default)]
    pub ceiling: Option<super::ceiling::CeilingStatus>,
    #[serde(default)]
    pub ceiling_error: Option<String>,
    /// Connected libraries and what the ladder did for each engine.
    #[serde(default)]
    pub clients: Vec<ClientStatus>,
    /// Where `/metrics` is served, if it is.
    #[serde(default)]
    pub metrics_addr: Option<String>,
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
}

/// One loaded eBPF program.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgramStats {
    pub name: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// One library connected over the control channel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStatus {
    pub pid: u32,
    pub uid: u32,
    pub engines: BTreeMap<String, super::control::EngineEnforcement>,
    pub loans: Vec<super::control::Loan>,
}

impl StatusReport {
    pub fn new(
        database: &str,
        identity: super::attribution::Identity,
        cgroup: Option<String>,
        engine_names: &[String],
        usage: Usage,
    ) -> Self {
        let mut engines: BTreeMap<String, EngineUsage> = engine_names
            .iter()
            .map(|n| (n.clone(), EngineUsage::default()))
            .collect();
        let mut unattributed = EngineUsage::default();
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
            emergency: false,
            psi: None,
            psi_error: None,
            programs: Vec::new(),
        }
    }

    /// A human-readable table.
    pub fn render(&self) -> String {
        let mut out = format!(
            "database {} ({} identity{}), kernel {}\n",
            self.database,
            match self.identity {
                super::attribution::Identity::Cgroup => "cgroup",
                super::attribution::Identity::Tid => "tid",
            },
            self.cgroup
                .as_deref()
                .map(|c| format!(", {c}"))
                .unwrap_or_default(),
            self.kernel
        );
        out.push_str(&format!(
            "{:<14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}\n",
            "engine", "resident", "anon", "file", "shmem", "mapped", "faults"
        ));
        let row = |name: &str, e: &EngineUsage| {
            format!(
                "{:<14} {:>12} {:>12} {:>12} {:>12} {:>12} {:>10}\n",
                name,
                mib(e.resident_bytes),
                mib(e.anon_bytes),
                mib(e.file_bytes),
                mib(e.shmem_bytes),
                mib(e.mapped_bytes),
                e.page_faults
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
        for c in &self.clients {
            for (name, e) in &c.engines {
                out.push_str(&format!(
                    "pid {} {:<12} budget {} resident {} reserved {} level {} spills {} ({} freed) purges {}\n",
                    c.pid,
                    name,
                    mib(e.budget_bytes),
                    mib(e.resident_bytes),
                    mib(e.reserved_bytes),
                    e.level.as_deref().unwrap_or("-"),
                    e.spill_requests,
                    mib(e.spilled_bytes),
                    e.purges
                ));
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

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
