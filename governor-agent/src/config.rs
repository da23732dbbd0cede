//! The agent's TOML configuration. A bad file is refused whole, with the
//! field named; nothing of it is applied.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

/// The configuration bundled with the agent (`deploy/nodedb-governor.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/nodedb-governor.toml");

/// How engine identity is established.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// Cgroup identity where a cgroup v2 hierarchy is usable, else TIDs.
    #[default]
    Auto,
    Cgroup,
    Tid,
}

/// A size in the config: bytes (an integer, or a string with a unit:
/// "512MiB", "2GiB", "64kB"...), or for engines a percentage of the
/// ceiling ("25%").
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SizeSpec {
    Bytes(u64),
    Text(String),
}

/// Why a size in the configuration is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{text:?}: a percentage is not allowed here")]
    PercentageNotAllowed { text: String },
    #[error("{text:?} is not a percentage")]
    NotAPercentage { text: String },
    #[error("{text:?} is outside 0%..=100%")]
    PercentageOutOfRange { text: String },
    #[error("{text:?} is not a size (like 512MiB, 2GiB or 25%)")]
    NotASize { text: String },
    #[error("{text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")]
    UnknownUnit { text: String, unit: String },
    #[error("{text:?} is too large")]
    TooLarge { text: String },
}

impl SizeSpec {
    /// The size in bytes; percentages are of `whole` (None: not allowed).
    pub fn resolve(&self, whole: Option<u64>) -> Result<u64, SizeError> {
        let text = match self {
            SizeSpec::Bytes(b) => return Ok(*b),
            SizeSpec::Text(t) => t.trim(),
        };
        let owned = || text.to_owned();
        if let Some(pct) = text.strip_suffix('%') {
            let Some(whole) = whole else {
                return Err(SizeError::PercentageNotAllowed { text: owned() });
            };
            let p: f64 = pct
                .trim()
                .parse()
                .map_err(|_| SizeError::NotAPercentage { text: owned() })?;
            if !(0.0..=100.0).contains(&p) {
                return Err(SizeError::PercentageOutOfRange { text: owned() });
            }
            return Ok((whole as f64 * p / 100.0) as u64);
        }
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (num, unit) = text.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| SizeError::NotASize { text: owned() })?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "TiB" | "T" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            other => {
                return Err(SizeError::UnknownUnit {
                    text: owned(),
                    unit: other.to_owned(),
                });
            }
        };
        let bytes = n * mult as f64;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(SizeError::TooLarge { text: owned() });
        }
        Ok(bytes as u64)
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub name: String,
    /// The engine's budget (its cap): bytes or a percentage of the ceiling.
    pub budget: SizeSpec,
    /// The part of the budget guaranteed to it (default 0).
    #[serde(default)]
    pub floor: Option<SizeSpec>,
    /// Whether the engine keeps its budget in an Emergency of the whole
    /// database (default true). A non-essential engine is held to what it
    /// holds until the Emergency is over: its new reservations are refused
    /// (backpressure).
    #[serde(default = "yes")]
    pub essential: bool,
    /// The engine runs as a process of its own (default false): such a
    /// process declares only this engine, and the agent puts it in a domain
    /// cgroup of its own (`<database>/proc-<name>`) whose `memory.high` is
    /// the engine's budget (on cgroup v1 hosts: its soft limit).
    #[serde(default)]
    pub own_process: bool,
    /// The page cache the engine may hold (bytes or a percentage of the
    /// ceiling; default: no bound). While the database is under memory
    /// pressure (its use at the warning threshold of the ceiling, or
    /// stalling), an engine whose attributed page cache is above its share
    /// is asked to drop its cold files down to it.
    #[serde(default)]
    pub page_cache_share: Option<SizeSpec>,
    /// The hot set the engine may lock resident (`mlock2`, charged to its
    /// budget; default 0: none). The agent raises a governed process's
    /// `RLIMIT_MEMLOCK` by its engines' hot sets, and on cgroup v2 sets
    /// the database cgroup's `memory.low` to the sum over engines, so
    /// reclaim from outside the database leaves the protected set alone.
    #[serde(default)]
    pub hot_set: Option<SizeSpec>,
    /// The engine's spill is cheap (default false): what it holds when idle
    /// is a buffer it must write anyway, or a cache it can rebuild. While
    /// the database is at the warning threshold of its ceiling and the
    /// engine has not grown for `lending.idle_spill_after_ms`, it is asked
    /// to spill down to its floor, and the budget it frees is lent to busy
    /// engines.
    #[serde(default)]
    pub idle_spill: bool,
    /// The CPUs the engine's threads run on (a kernel list, `"0-3,8"`;
    /// default: wherever the database runs them). The agent sets each
    /// thread's affinity as it places it in the engine, and again on a
    /// reload that changes the list: keep a latency-critical engine off
    /// the CPUs that take the disks' interrupts and run the flushes. Every
    /// CPU named must be online.
    #[serde(default)]
    pub cpus: Option<crate::cpus::CpuList>,
    /// How the engine's budget is split over the NUMA nodes: one weight per
    /// online node, in node order (default: over the nodes of its `cpus`,
    /// by `numa.weights` or the nodes' memory). Needs `cpus`: an engine
    /// placed nowhere is judged in all only (see `[numa]`).
    #[serde(default)]
    pub node_weights: Option<Vec<u64>>,
}

fn yes() -> bool {
    true
}

/// NUMA: the ladder per node. A placed engine (with `cpus`) has its
/// budget split over the nodes, as the library splits one: by its
/// `node_weights`, or else over the nodes of its CPUs by `weights` (or the
/// nodes' memory). It is judged on each node as well as in all: past a
/// threshold of its share on one node, it is spilled by what it holds
/// there beyond the restore point, whatever it holds in all, and engines
/// under their shares are left alone. An engine placed nowhere runs
/// wherever the scheduler puts its threads, so where its pages land says
/// nothing of it: it is judged in all only. Nothing changes on a machine
/// of one node. (Pages NUMA balancing moves are not followed: an engine
/// whose pages the kernel moved off a node stays counted there until it
/// frees them, and can be spilled for them.)
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaConfig {
    /// The ladder per node (default true).
    #[serde(default = "yes")]
    pub ladder: bool,
    /// One weight per online node, in node order (default: the nodes'
    /// memory sizes); an engine's `node_weights` take its place. Given, it
    /// also fixes each node's part of the ceiling (what the placed engines
    /// there must fit in); absent, that part is the larger of the nodes'
    /// memory's split and where the budgets in force are placed (the
    /// budgets placed nowhere split by the nodes' memory), so a node the
    /// configuration fills with engines, or that loans fill, has the room
    /// for them.
    #[serde(default)]
    pub weights: Option<Vec<u64>>,
}

/// The database's CPUs and memory nodes, kept by the kernel's cpuset
/// controller on its cgroup (v2 `cpuset.cpus`/`cpuset.mems` of the
/// database's domain cgroup, or a v1 cpuset cgroup of its name): every
/// thread of the database runs on `cpus` and allocates on `mems`. Engines'
/// `cpus` must lie inside `cpus`, and their `node_weights` give nothing to
/// a node outside `mems`. Absent: the database runs where it is put.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpusetConfig {
    /// The database's CPUs, a kernel list (default: its parent's).
    #[serde(default)]
    pub cpus: Option<crate::cpus::CpuList>,
    /// The database's memory nodes, a kernel list (default: its parent's).
    #[serde(default)]
    pub mems: Option<crate::cpus::CpuList>,
}

impl Default for NumaConfig {
    fn default() -> Self {
        Self {
            ladder: true,
            weights: None,
        }
    }
}

/// Pressure stall information as an input: a PSI trigger on the database's
/// cgroup (`memory.pressure`), or the host's (`/proc/pressure/memory`)
/// where there is no cgroup v2 subtree. When tasks stall on memory for
/// `stall_ms` within `window_ms`, the agent purges every engine's arena
/// and, for one window, spills engines from Warning on (not only from
/// Critical).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PressureStallConfig {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "d_stall_ms")]
    pub stall_ms: u64,
    /// 500..=10000 ms; without CAP_SYS_RESOURCE the kernel takes only
    /// multiples of 2 s, and the agent rounds up (and says so).
    #[serde(default = "d_window_ms")]
    pub window_ms: u64,
}

fn d_stall_ms() -> u64 {
    100
}
fn d_window_ms() -> u64 {
    2000
}

impl Default for PressureStallConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            stall_ms: d_stall_ms(),
            window_ms: d_window_ms(),
        }
    }
}

/// How budget moves from idle engines to busy ones (see
/// `nodedb_governor::lending`): the same rules the library lends by alone.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LendingConfig {
    /// An engine lends only after it has not grown for this long.
    #[serde(default = "d_idle_after_ms")]
    pub idle_after_ms: u64,
    /// A loan stands at least this long unless its lender really needs it
    /// (a refused reservation, or Critical of its reduced budget).
    #[serde(default = "d_min_loan_ms")]
    pub min_loan_ms: u64,
    /// A lender at Warning of its reduced budget, or growing past what it
    /// kept, takes back only after rising this long.
    #[serde(default = "d_rise_after_ms")]
    pub rise_after_ms: u64,
    /// A lender keeps this fraction of its budget beyond what it holds.
    #[serde(default = "d_cushion")]
    pub cushion: f64,
    /// An engine with `idle_spill` is asked to spill once it has not grown
    /// for this long (and the database is short of memory).
    #[serde(default = "d_idle_spill_after_ms")]
    pub idle_spill_after_ms: u64,
}

fn d_idle_after_ms() -> u64 {
    nodedb_governor::lending::LendingRules::default()
        .idle_after
        .as_millis() as u64
}
fn d_min_loan_ms() -> u64 {
    nodedb_governor::lending::LendingRules::default()
        .min_loan
        .as_millis() as u64
}
fn d_rise_after_ms() -> u64 {
    nodedb_governor::lending::LendingRules::default()
        .rise_after
        .as_millis() as u64
}
fn d_idle_spill_after_ms() -> u64 {
    nodedb_governor::lending::LendingRules::default()
        .idle_spill_after
        .as_millis() as u64
}
fn d_cushion() -> f64 {
    nodedb_governor::lending::LendingRules::default().cushion
}

impl Default for LendingConfig {
    fn default() -> Self {
        Self {
            idle_after_ms: d_idle_after_ms(),
            min_loan_ms: d_min_loan_ms(),
            rise_after_ms: d_rise_after_ms(),
            cushion: d_cushion(),
            idle_spill_after_ms: d_idle_spill_after_ms(),
        }
    }
}

impl LendingConfig {
    pub fn rules(&self) -> nodedb_governor::lending::LendingRules {
        nodedb_governor::lending::LendingRules {
            idle_after: Duration::from_millis(self.idle_after_ms),
            min_loan: Duration::from_millis(self.min_loan_ms),
            rise_after: Duration::from_millis(self.rise_after_ms),
            cushion: self.cushion,
            idle_spill_after: Duration::from_millis(self.idle_spill_after_ms),
            ..Default::default()
        }
    }
}

/// What the control socket allows its clients (`[control]`): how many may
/// be connected, and how long a silent one is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Connections open at once, in all (one more is refused and closed
    /// at once).
    #[serde(default = "d_max_connections")]
    pub max_connections: u32,
    /// Connections open at once from one uid (root's included).
    #[serde(default = "d_max_connections_per_uid")]
    pub max_connections_per_uid: u32,
    /// A connection that has not said hello within this is closed.
    #[serde(default = "d_hello_timeout_ms")]
    pub hello_timeout_ms: u64,
    /// A welcomed library that has sent nothing for this long is
    /// disconnected (a library reports at least every 5 s).
    #[serde(default = "d_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

fn d_max_connections() -> u32 {
    1024
}
fn d_max_connections_per_uid() -> u32 {
    128
}
fn d_hello_timeout_ms() -> u64 {
    5_000
}
fn d_idle_timeout_ms() -> u64 {
    60_000
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            max_connections: d_max_connections(),
            max_connections_per_uid: d_max_connections_per_uid(),
            hello_timeout_ms: d_hello_timeout_ms(),
            idle_timeout_ms: d_idle_timeout_ms(),
        }
    }
}

/// How many entries the eBPF maps that grow with the workload hold
/// (`[maps]`), within documented limits. The maps of processes (256) and
/// counter slots (1,024) are fixed by the identity the programs pack into
/// one word. A full map is counted and logged (`kernel_events`), and the
/// agent refuses pins made with other sizes (they are set aside, counting
/// starts afresh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapsConfig {
    /// Threads the TID identity map, the releases and the mmaps under way
    /// can each hold (`ENGINE_BY_TID`, `RELEASING`, `PENDING_MMAP`).
    #[serde(default = "d_map_threads")]
    pub threads: u32,
    /// 2 MiB regions whose faulting engine is remembered (`REGIONS`, an
    /// LRU: past it the oldest are forgotten, and a release there comes
    /// off the releasing engine): 262,144 cover 512 GiB.
    #[serde(default = "d_map_regions")]
    pub regions: u32,
    /// Files whose page cache is attributed (`FILE_OWNERS`).
    #[serde(default = "d_map_files")]
    pub files: u32,
}

fn d_map_threads() -> u32 {
    nodedb_governor_common::MAX_TIDS
}
fn d_map_regions() -> u32 {
    nodedb_governor_common::MAX_REGIONS
}
fn d_map_files() -> u32 {
    nodedb_governor_common::MAX_FILES
}

impl Default for MapsConfig {
    fn default() -> Self {
        Self {
            threads: d_map_threads(),
            regions: d_map_regions(),
            files: d_map_files(),
        }
    }
}

impl MapsConfig {
    /// The limits of each size: `(field, least, most)`.
    pub const LIMITS: [(&'static str, u32, u32); 3] = [
        ("maps.threads", 1_024, 4_194_304),
        ("maps.regions", 4_096, 16_777_216),
        ("maps.files", 1_024, 4_194_304),
    ];

    fn validate(&self) -> Result<(), (&'static str, String)> {
        for ((field, least, most), value) in
            Self::LIMITS
                .into_iter()
                .zip([self.threads, self.regions, self.files])
        {
            if !(least..=most).contains(&value) {
                return Err((field, format!("{value} is outside {least}..={most}")));
            }
        }
        Ok(())
    }
}

impl ControlConfig {
    /// The least `idle_timeout_ms`: two of the library's report
    /// heartbeats, so a library that is only quiet is never cut off.
    pub const MIN_IDLE_TIMEOUT_MS: u64 =
        2 * nodedb_governor::control::link::REPORT_HEARTBEAT.as_millis() as u64;

    /// The field that is out of range, and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=65_536).contains(&self.max_connections) {
            return Err((
                "control.max_connections",
                format!("{} is outside 1..=65536", self.max_connections),
            ));
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_uid) {
            return Err((
                "control.max_connections_per_uid",
                format!(
                    "{} is outside 1..=max_connections ({})",
                    self.max_connections_per_uid, self.max_connections
                ),
            ));
        }
        if !(100..=600_000).contains(&self.hello_timeout_ms) {
            return Err((
                "control.hello_timeout_ms",
                format!("{} is outside 100..=600000", self.hello_timeout_ms),
            ));
        }
        if !(Self::MIN_IDLE_TIMEOUT_MS..=86_400_000).contains(&self.idle_timeout_ms) {
            return Err((
                "control.idle_timeout_ms",
                format!(
                    "{} is outside {}..=86400000 (a library reports every {} ms at least)",
                    self.idle_timeout_ms,
                    Self::MIN_IDLE_TIMEOUT_MS,
                    Self::MIN_IDLE_TIMEOUT_MS / 2
                ),
            ));
        }
        Ok(())
    }
}

/// Pressure thresholds, as fractions of a budget (or of the ceiling).
#[derive(Clone, Copy, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdsConfig {
    #[serde(default = "d_warning")]
    pub warning: f64,
    #[serde(default = "d_critical")]
    pub critical: f64,
    #[serde(default = "d_emergency")]
    pub emergency: f64,
    /// A spill request brings the engine down to this fraction.
    #[serde(default = "d_restore")]
    pub restore: f64,
}

fn d_warning() -> f64 {
    0.75
}
fn d_critical() -> f64 {
    0.90
}
fn d_emergency() -> f64 {
    0.97
}
fn d_restore() -> f64 {
    0.75
}

impl Default for ThresholdsConfig {
    fn default() -> Self {
        Self {
            warning: d_warning(),
            critical: d_critical(),
            emergency: d_emergency(),
            restore: d_restore(),
        }
    }
}

impl ThresholdsConfig {
    pub fn pressure(&self) -> nodedb_governor::PressureThresholds {
        nodedb_governor::PressureThresholds {
            warning: self.warning,
            critical: self.critical,
            emergency: self.emergency,
        }
    }
}

/// An engine's limits in bytes, resolved against the ceiling.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EngineLimits {
    pub name: String,
    pub floor_bytes: u64,
    pub budget_bytes: u64,
    pub essential: bool,
    pub own_process: bool,
    /// None: no bound.
    pub page_cache_share_bytes: Option<u64>,
    pub hot_set_bytes: u64,
    pub idle_spill: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the database: its domain cgroup is `<cgroup_root>/<database>`.
    pub database: String,
    #[serde(default)]
    pub identity: IdentityMode,
    /// The cgroup v2 directory under which the database's cgroup is made;
    /// found from the mount table when absent.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// How often attribution is read, in milliseconds, while anything is
    /// under way: an engine above Normal, a spill not yet answered, a
    /// loan, the database near its ceiling, memory stalls.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// The tick while all is calm, with the kernel's marks armed (they
    /// wake the agent at once when an engine crosses its first
    /// threshold): the slow work alone, so an idle agent costs little.
    /// At least `tick_ms` (default: 250, or `tick_ms` if that is longer);
    /// without `mark_events`, `tick_ms` always.
    #[serde(default)]
    pub idle_tick_ms: Option<u64>,
    /// Runtime directory for the admin socket.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// The database's memory ceiling: bytes, or a size with a unit.
    pub ceiling: SizeSpec,
    /// The control socket libraries connect to (default
    /// `<run_dir>/control.sock`).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Uids allowed on the control socket (root always is).
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Besides root, the members of this group (a name, or a gid) may use
    /// the admin socket (`status`, `assign`); the socket is given to it
    /// (mode 0660). Absent: root alone. Checked against each peer's
    /// credentials, not only by the socket's mode.
    #[serde(default)]
    pub admin_group: Option<GroupSpec>,
    /// The control socket is given to this group (a name, or a gid; mode
    /// 0660), at every start: a database whose user is a member can
    /// connect with no step of its own that a restart would undo (its uid
    /// must still be in `allowed_uids`). Absent: root's group.
    #[serde(default)]
    pub control_group: Option<GroupSpec>,
    /// Connection limits and timeouts of the control socket.
    #[serde(default)]
    pub control: ControlConfig,
    /// Sizes of the eBPF maps that grow with the workload.
    #[serde(default)]
    pub maps: MapsConfig,
    /// Delegates the multi-engine processes' cgroups (`shared/` and its
    /// engine cgroups) to this uid, the database's user: its libraries then
    /// move their threads into their engines themselves. Must be in
    /// `allowed_uids`.
    #[serde(default)]
    pub delegate_uid: Option<u32>,
    #[serde(default)]
    pub thresholds: ThresholdsConfig,
    /// Where `/metrics` is served over HTTP (absent: not served). Port 0
    /// picks a free port (the status reports it).
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// `false`: observe only. The agent attributes, reports and keeps the
    /// ceiling (`memory.max`, with no lower high mark), but its ladder asks
    /// nothing of the libraries, and their caps are the ceiling: the
    /// ungoverned baseline, measured the same way.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// Count every eBPF program's runs and run time (the kernel's
    /// `bpf_stats`: two clock reads per run) for `/metrics`.
    #[serde(default = "yes")]
    pub program_stats: bool,
    #[serde(default)]
    pub pressure_stall: PressureStallConfig,
    #[serde(default)]
    pub lending: LendingConfig,
    /// Arm each engine's next threshold in the kernel, so the programs
    /// wake the agent the moment an engine crosses it (a BPF ring buffer);
    /// `false`: the tick alone notices.
    #[serde(default = "yes")]
    pub mark_events: bool,
    /// The agent's owner thread, and the delivery thread that writes its
    /// requests to the libraries, run at `SCHED_FIFO` with this priority
    /// (1-99), so a crossing wakes it at once rather than when the busy
    /// CPU's running task yields (up to a scheduler tick); 0: the normal
    /// policy. Needs CAP_SYS_NICE; refused, the agent says so and runs at
    /// the normal policy.
    #[serde(default = "default_realtime_priority")]
    pub realtime_priority: u8,
    #[serde(default)]
    pub numa: NumaConfig,
    #[serde(default)]
    pub cpuset: Option<CpusetConfig>,
    #[serde(rename = "engine")]
    pub engines: Vec<EngineConfig>,
}

fn default_tick_ms() -> u64 {
    20
}

fn default_realtime_priority() -> u8 {
    1
}

/// The calm tick when the configuration does not set one.
pub const DEFAULT_IDLE_TICK_MS: u64 = 250;

/// The longest calm tick (unless `tick_ms` is longer).
pub const MAX_IDLE_TICK_MS: u64 = 1000;

fn default_run_dir() -> PathBuf {
    super::paths::DEFAULT_RUN_DIR.into()
}

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

/// A group, by name or by id.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum GroupSpec {
    Gid(u32),
    Name(String),
}

impl std::fmt::Display for GroupSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gid(g) => write!(f, "gid {g}"),
            Self::Name(n) => write!(f, "group `{n}`"),
        }
    }
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Config {
    /// The tick while all is calm (see `idle_tick_ms`).
    pub fn idle_tick_ms(&self) -> u64 {
        if !self.mark_events {
            return self.tick_ms;
        }
        self.idle_tick_ms
            .unwrap_or(DEFAULT_IDLE_TICK_MS.max(self.tick_ms))
    }

    /// Parses and validates a configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // serde names the field in its message ("unknown field `x`",
            // "missing field `y`"); the span adds where, when it is narrower
            // than the whole document.
            let field = e
                .span()
                .filter(|s| s.start > 0 || s.end < text.len())
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    let source = text.lines().nth(line - 1).unwrap_or_default().trim();
                    format!("line {line} (`{source}`)")
                })
                .unwrap_or_else(|| "document".into());
            err(field, e.message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.database) {
            return Err(err(
                "database",
                format!("{:?} must be 1-64 of a-z, 0-9, '-', '_'", self.database),
            ));
        }
        if !(10..=60_000).contains(&self.tick_ms) {
            return Err(err(
                "tick_ms",
                format!("{} is outside 10..=60000", self.tick_ms),
            ));
        }
        // The calm tick still notices what has no mark (the ceiling's
        // charge, memory stalls, exits): a second at most, unless the
        // busy tick itself is slower.
        let most = self.tick_ms.max(MAX_IDLE_TICK_MS);
        if let Some(idle) = self.idle_tick_ms
            && !(self.tick_ms..=most).contains(&idle)
        {
            return Err(err(
                "idle_tick_ms",
                format!("{idle} is outside tick_ms ({})..={most}", self.tick_ms),
            ));
        }
        if self.realtime_priority > 99 {
            return Err(err(
                "realtime_priority",
                format!(
                    "{} is outside 0..=99 (SCHED_FIFO priorities are 1-99; 0 is the normal policy)",
                    self.realtime_priority
                ),
            ));
        }
        let weights = self
            .numa
            .weights
            .iter()
            .map(|w| ("numa.weights".to_owned(), w))
            .chain(self.engines.iter().enumerate().filter_map(|(i, e)| {
                Some((
                    format!("engine[{i}].node_weights"),
                    e.node_weights.as_ref()?,
                ))
            }));
        if let Some(i) = self
            .engines
            .iter()
            .position(|e| e.node_weights.is_some() && e.cpus.is_none())
        {
            return Err(err(
                format!("engine[{i}].node_weights"),
                "needs `cpus`: an engine placed nowhere is judged in all only",
            ));
        }
        for (field, w) in weights {
            if w.is_empty() || w.len() > 64 {
                return Err(err(
                    field,
                    format!("{} weights: one per node, 1 to 64", w.len()),
                ));
            }
            if let Some(i) = w.iter().position(|&x| x > 1_000_000) {
                return Err(err(
                    format!("{field}[{i}]"),
                    format!("{} is above 1000000", w[i]),
                ));
            }
            if w.iter().all(|&x| x == 0) {
                return Err(err(
                    field,
                    "every weight is 0: no node would hold any of it",
                ));
            }
        }
        if self.engines.is_empty() {
            return Err(err("engine", "at least one [[engine]] is required"));
        }
        let mut seen = BTreeSet::new();
        for (i, e) in self.engines.iter().enumerate() {
            if !valid_name(&e.name) {
                return Err(err(
                    format!("engine[{i}].name"),
                    format!("{:?} must be 1-64 of a-z, 0-9, '-', '_'", e.name),
                ));
            }
            if !seen.insert(&e.name) {
                return Err(err(
                    format!("engine[{i}].name"),
                    format!("duplicate engine {:?}", e.name),
                ));
            }
        }
        let ceiling = self
            .ceiling
            .resolve(None)
            .map_err(|e| err("ceiling", e.to_string()))?;
        if ceiling == 0 {
            return Err(err("ceiling", "must be above 0"));
        }
        let mut floors = 0u64;
        for (i, e) in self.engines.iter().enumerate() {
            let budget = e
                .budget
                .resolve(Some(ceiling))
                .map_err(|e| err(format!("engine[{i}].budget"), e.to_string()))?;
            if budget == 0 || budget > ceiling {
                return Err(err(
                    format!("engine[{i}].budget"),
                    format!("{budget} bytes must be above 0 and at most the ceiling ({ceiling})"),
                ));
            }
            let floor = match &e.floor {
                Some(f) => f
                    .resolve(Some(ceiling))
                    .map_err(|e| err(format!("engine[{i}].floor"), e.to_string()))?,
                None => 0,
            };
            if floor > budget {
                return Err(err(
                    format!("engine[{i}].floor"),
                    format!("{floor} bytes is above the engine's budget ({budget})"),
                ));
            }
            floors = floors.saturating_add(floor);
            let hot = match &e.hot_set {
                Some(h) => h
                    .resolve(Some(ceiling))
                    .map_err(|e| err(format!("engine[{i}].hot_set"), e.to_string()))?,
                None => 0,
            };
            if hot > budget {
                return Err(err(
                    format!("engine[{i}].hot_set"),
                    format!(
                        "{hot} bytes is above the engine's budget ({budget}), which it is charged to"
                    ),
                ));
            }
            if let Some(cpus) = &e.cpus {
                // Checked where the CPUs can be read (a configuration is
                // also checked on machines other than its own: `check`).
                if let Ok(online) = crate::cpus::CpuList::online() {
                    let missing = cpus.missing_from(&online);
                    if !missing.is_empty() {
                        return Err(err(
                            format!("engine[{i}].cpus"),
                            format!(
                                "CPU {} is not online (online: {online})",
                                missing
                                    .iter()
                                    .map(u32::to_string)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ));
                    }
                }
            }
            if let Some(share) = &e.page_cache_share {
                let share = share
                    .resolve(Some(ceiling))
                    .map_err(|e| err(format!("engine[{i}].page_cache_share"), e.to_string()))?;
                if share > ceiling {
                    return Err(err(
                        format!("engine[{i}].page_cache_share"),
                        format!("{share} bytes is above the ceiling ({ceiling})"),
                    ));
                }
            }
        }
        if let Some(cs) = &self.cpuset {
            self.validate_cpuset(cs)?;
        }
        let hot_sets: u64 = self
            .engines
            .iter()
            .filter_map(|e| e.hot_set.as_ref()?.resolve(Some(ceiling)).ok())
            .sum();
        if hot_sets > ceiling {
            return Err(err(
                "engine.hot_set",
                format!(
                    "the hot sets add up to {hot_sets} bytes, above the ceiling ({ceiling}): locked pages cannot be reclaimed"
                ),
            ));
        }
        if floors > ceiling {
            return Err(err(
                "engine.floor",
                format!("the floors add up to {floors} bytes, above the ceiling ({ceiling})"),
            ));
        }
        if let Err((field, reason)) = self.control.validate() {
            return Err(err(field, reason));
        }
        if let Err((field, reason)) = self.maps.validate() {
            return Err(err(field, reason));
        }
        if let Err((field, reason)) = self.lending.rules().validate() {
            let field = match field {
                "idle_after" | "min_loan" | "rise_after" | "idle_spill_after" => {
                    format!("lending.{field}_ms")
                }
                f => format!("lending.{f}"),
            };
            return Err(err(field, reason));
        }
        let t = &self.thresholds;
        if t.pressure().validate().is_err() {
            return Err(err(
                "thresholds",
                format!(
                    "need 0 < warning ({}) < critical ({}) < emergency ({}) <= 1",
                    t.warning, t.critical, t.emergency
                ),
            ));
        }
        if !(t.restore > 0.0 && t.restore < t.critical) {
            return Err(err(
                "thresholds.restore",
                format!(
                    "{} must be above 0 and below critical ({})",
                    t.restore, t.critical
                ),
            ));
        }
        for (field, group) in [
            ("admin_group", &self.admin_group),
            ("control_group", &self.control_group),
        ] {
            if let Some(GroupSpec::Name(name)) = group
                && (name.is_empty() || name.len() > 256 || name.contains(['\0', ':', '\n']))
            {
                return Err(err(field, format!("{name:?} is not a group name")));
            }
        }
        if let Some(uid) = self.delegate_uid
            && !self.allowed_uids.contains(&uid)
        {
            return Err(err(
                "delegate_uid",
                format!("uid {uid} is not in allowed_uids, so it could not connect"),
            ));
        }
        let ps = &self.pressure_stall;
        if !(500..=10_000).contains(&ps.window_ms) {
            return Err(err(
                "pressure_stall.window_ms",
                format!("{} is outside 500..=10000", ps.window_ms),
            ));
        }
        if ps.stall_ms == 0 || ps.stall_ms > ps.window_ms {
            return Err(err(
                "pressure_stall.stall_ms",
                format!(
                    "{} must be above 0 and at most window_ms ({})",
                    ps.stall_ms, ps.window_ms
                ),
            ));
        }
        if let Some(p) = &self.control_socket
            && !p.is_absolute()
        {
            return Err(err(
                "control_socket",
                format!("{} is not an absolute path", p.display()),
            ));
        }
        if let Some(root) = &self.cgroup_root
            && !root.is_absolute()
        {
            return Err(err(
                "cgroup_root",
                format!("{} is not an absolute path", root.display()),
            ));
        }
        if !self.run_dir.is_absolute() {
            return Err(err(
                "run_dir",
                format!("{} is not an absolute path", self.run_dir.display()),
            ));
        }
        Ok(())
    }

    pub fn engine_names(&self) -> Vec<String> {
        self.engines.iter().map(|e| e.name.clone()).collect()
    }

    /// Engines that run as processes of their own.
    pub fn own_process_engines(&self) -> Vec<String> {
        self.engines
            .iter()
            .filter(|e| e.own_process)
            .map(|e| e.name.clone())
            .collect()
    }

    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join(super::paths::ADMIN_SOCKET)
    }

    pub fn control_socket_path(&self) -> PathBuf {
        self.control_socket
            .clone()
            .unwrap_or_else(|| self.run_dir.join(super::paths::CONTROL_SOCKET))
    }

    /// The ceiling in bytes (validated at parse).
    pub fn ceiling_bytes(&self) -> u64 {
        self.ceiling.resolve(None).unwrap_or(0)
    }

    /// Every engine's limits in bytes (validated at parse).
    pub fn limits(&self) -> Vec<EngineLimits> {
        let ceiling = self.ceiling_bytes();
        self.engines
            .iter()
            .map(|e| EngineLimits {
                name: e.name.clone(),
                budget_bytes: e.budget.resolve(Some(ceiling)).unwrap_or(0),
                floor_bytes: e
                    .floor
                    .as_ref()
                    .map_or(0, |f| f.resolve(Some(ceiling)).unwrap_or(0)),
                essential: e.essential,
                own_process: e.own_process,
                page_cache_share_bytes: e
                    .page_cache_share
                    .as_ref()
                    .map(|s| s.resolve(Some(ceiling)).unwrap_or(0)),
                hot_set_bytes: e
                    .hot_set
                    .as_ref()
                    .map_or(0, |h| h.resolve(Some(ceiling)).unwrap_or(0)),
                idle_spill: e.idle_spill,
            })
            .collect()
    }

    /// The engines kept to CPUs, and their CPUs.
    pub fn engine_cpus(&self) -> BTreeMap<String, crate::cpus::CpuList> {
        self.engines
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.cpus.clone()?)))
            .collect()
    }

    /// The CPUs `engine` is kept to, if it has a list.
    pub fn cpus_of(&self, engine: &str) -> Option<&crate::cpus::CpuList> {
        self.engines
            .iter()
            .find(|e| e.name == engine)
            .and_then(|e| e.cpus.as_ref())
    }

    /// Whether `uid` may use the control socket.
    pub fn uid_allowed(&self, uid: u32) -> bool {
        uid == 0 || self.allowed_uids.contains(&uid)
    }
}

impl Config {
    /// `[cpuset]`: names something, only online CPUs and nodes (where they
    /// can be read: a configuration is also checked on other machines), and
    /// holds every engine's CPUs and the nodes its weights give to.
    fn validate_cpuset(&self, cs: &CpusetConfig) -> Result<(), ConfigError> {
        let names = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
        if cs.cpus.is_none() && cs.mems.is_none() {
            return Err(err("cpuset", "names neither `cpus` nor `mems`"));
        }
        if let Some(cpus) = &cs.cpus
            && let Ok(online) = crate::cpus::CpuList::online()
        {
            let missing = cpus.missing_from(&online);
            if !missing.is_empty() {
                return Err(err(
                    "cpuset.cpus",
                    format!("CPU {} is not online (online: {online})", names(&missing)),
                ));
            }
        }
        let nodes: Option<Vec<u32>> = nodedb_governor::Topology::detect()
            .ok()
            .map(|t| t.nodes().iter().map(|n| n.id).collect());
        if let (Some(mems), Some(nodes)) = (&cs.mems, &nodes) {
            let missing: Vec<u32> = mems.cpus().filter(|m| !nodes.contains(m)).collect();
            if !missing.is_empty() {
                return Err(err(
                    "cpuset.mems",
                    format!(
                        "node {} is not online (online: {})",
                        names(&missing),
                        names(nodes)
                    ),
                ));
            }
        }
        for (i, e) in self.engines.iter().enumerate() {
            if let (Some(own), Some(db)) = (&e.cpus, &cs.cpus) {
                let outside = own.missing_from(db);
                if !outside.is_empty() {
                    return Err(err(
                        format!("engine[{i}].cpus"),
                        format!(
                            "CPU {} is outside the database's cpuset.cpus ({db})",
                            names(&outside)
                        ),
                    ));
                }
            }
            if let (Some(w), Some(mems), Some(nodes)) = (&e.node_weights, &cs.mems, &nodes)
                && let Some((k, node)) = w.iter().zip(nodes).enumerate().find_map(|(k, (w, n))| {
                    (*w > 0 && !mems.cpus().any(|m| m == *n)).then_some((k, n))
                })
            {
                return Err(err(
                    format!("engine[{i}].node_weights[{k}]"),
                    format!(
                        "gives node {node} a share, but the database's memory is kept to cpuset.mems ({mems})"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_default_is_valid() {
        let c = Config::parse(DEFAULT_CONFIG).expect("default config");
        assert_eq!(c.engine_names(), ["vector", "timeseries", "query"]);
        assert_eq!(c.tick_ms, 20);
        assert_eq!(c.idle_tick_ms(), 250);
        assert_eq!(c.realtime_priority, 1);
        // A slower busy tick makes the calm one as slow; without marks
        // the tick never slows.
        let slow = Config::parse(&DEFAULT_CONFIG.replace("tick_ms = 20", "tick_ms = 500")).unwrap();
        assert_eq!(slow.idle_tick_ms(), 500);
        let no_marks = Config::parse(&format!("mark_events = false\n{DEFAULT_CONFIG}")).unwrap();
        assert_eq!(no_marks.idle_tick_ms(), 20);
        let limits = c.limits();
        assert!(limits.iter().all(|l| l.floor_bytes <= l.budget_bytes));
        assert!(limits.iter().map(|l| l.floor_bytes).sum::<u64>() <= c.ceiling_bytes());
    }

    #[test]
    fn lending_rules_come_from_the_file_and_default_to_the_librarys() {
        let text = "database = \"db\"\nceiling = \"1GiB\"\n[lending]\nmin_loan_ms = 5000\n\
                    rise_after_ms = 400\nidle_spill_after_ms = 3000\n\
                    [[engine]]\nname = \"a\"\nbudget = 1\nidle_spill = true\n\
                    [[engine]]\nname = \"b\"\nbudget = 1\n";
        let config = Config::parse(text).unwrap();
        let rules = config.lending.rules();
        let library = nodedb_governor::lending::LendingRules::default();
        assert_eq!(rules.min_loan, Duration::from_secs(5));
        assert_eq!(rules.rise_after, Duration::from_millis(400));
        assert_eq!(rules.idle_spill_after, Duration::from_secs(3));
        assert_eq!(rules.idle_after, library.idle_after);
        assert_eq!(rules.cushion, library.cushion);
        let idle_spill: Vec<bool> = config.limits().iter().map(|l| l.idle_spill).collect();
        assert_eq!(idle_spill, [true, false], "off unless asked for");
        let text = text.replace(
            "[lending]\nmin_loan_ms = 5000\nrise_after_ms = 400\nidle_spill_after_ms = 3000\n",
            "",
        );
        assert_eq!(Config::parse(&text).unwrap().lending.rules(), library);
    }

    /// A group name that cannot be one is refused, naming the field; a
    /// gid or a name is taken as given.
    #[test]
    fn socket_groups_must_be_group_names_or_gids() {
        let base = "database = \"db\"\nceiling = \"1GiB\"\n[[engine]]\nname = \"a\"\nbudget = 1\n";
        for field in ["admin_group", "control_group"] {
            for bad in ["\"\"", "\"a:b\""] {
                let e = Config::parse(&format!("{field} = {bad}\n{base}"))
                    .unwrap_err()
                    .to_string();
                assert!(
                    e.contains(field) && e.contains("is not a group name"),
                    "{e}"
                );
            }
        }
        let c = Config::parse(&format!(
            "control_group = \"nodedb\"\nadmin_group = 4242\n{base}"
        ))
        .unwrap();
        assert_eq!(c.control_group, Some(GroupSpec::Name("nodedb".into())));
        assert_eq!(c.admin_group, Some(GroupSpec::Gid(4242)));
    }

    #[test]
    fn sizes_parse_with_units_and_percentages() {
        let t = |s: &str| SizeSpec::Text(s.into());
        assert_eq!(t("512MiB").resolve(None), Ok(512 << 20));
        assert_eq!(t("1.5 GiB").resolve(None), Ok(3 << 29));
        assert_eq!(t("64kB").resolve(None), Ok(64_000));
        assert_eq!(t("25%").resolve(Some(1 << 30)), Ok(1 << 28));
        assert_eq!(SizeSpec::Bytes(7).resolve(None), Ok(7));
        assert_eq!(
            t("25%").resolve(None),
            Err(SizeError::PercentageNotAllowed { text: "25%".into() })
        );
        assert_eq!(
            t("12 parsecs").resolve(None),
            Err(SizeError::UnknownUnit {
                text: "12 parsecs".into(),
                unit: "parsecs".into()
            })
        );
        assert_eq!(
            t("lots").resolve(None),
            Err(SizeError::NotASize {
                text: "lots".into()
            })
        );
        let e = t("150%").resolve(Some(1)).unwrap_err();
        assert_eq!(
            e,
            SizeError::PercentageOutOfRange {
                text: "150%".into()
            }
        );
        assert!(e.to_string().contains("outside 0%..=100%"), "{e}");
    }

    #[test]
    fn a_cpuset_holds_every_engines_cpus_and_the_nodes_its_weights_give_to() {
        let online = crate::cpus::CpuList::online().unwrap();
        let first = online.cpus().next().unwrap();
        let nodes = nodedb_governor::Topology::detect().unwrap();
        let node0 = nodes.nodes()[0].id;
        let config = |cpuset: &str, engine: &str| {
            Config::parse(&format!(
                "database = \"db\"\nceiling = \"1GiB\"\n[cpuset]\n{cpuset}\n\
                 [[engine]]\nname = \"a\"\nbudget = \"50%\"\n{engine}\n"
            ))
        };
        let c = config(
            &format!("cpus = \"{first}\"\nmems = \"{node0}\""),
            &format!("cpus = \"{first}\""),
        )
        .unwrap();
        let cs = c.cpuset.as_ref().unwrap();
        assert_eq!(cs.cpus.as_ref().unwrap().to_string(), first.to_string());
        assert_eq!(cs.mems.as_ref().unwrap().to_string(), node0.to_string());
        // An engine's CPU outside the database's: refused, by name.
        if let Some(other) = online.cpus().find(|c| *c != first) {
            let e = config(
                &format!("cpus = \"{first}\""),
                &format!("cpus = \"{other}\""),
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains("engine[0].cpus"), "{e}");
            assert!(e.contains("outside the database's cpuset.cpus"), "{e}");
        }
        // Weights giving a node outside `mems` a share: refused, by node.
        if nodes.nodes().len() > 1 {
            let n = nodes.nodes().len();
            let mut w = vec![0; n];
            w[n - 1] = 1;
            let e = config(
                &format!("mems = \"{node0}\""),
                &format!("cpus = \"{first}\"\nnode_weights = {w:?}"),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("engine[0].node_weights[{}]", n - 1)),
                "{e}"
            );
        }
    }

    /// One case per kind of bad config: each is refused whole, naming the
    /// field.
    #[test]
    fn each_bad_config_names_its_field() {
        const HEAD: &str = "database = \"db\"\nceiling = \"1GiB\"\n";
        const ENGINE: &str = "[[engine]]\nname = \"a\"\nbudget = \"50%\"\n";
        let ok = format!("{HEAD}{ENGINE}");
        Config::parse(&ok).expect("minimal config");
        let cases: Vec<(String, &str)> = vec![
            (
                format!("database = \"DB!\"\nceiling = 1\n{ENGINE}"),
                "database",
            ),
            (format!("{HEAD}tick_ms = 1\n{ENGINE}"), "tick_ms"),
            (
                format!("{HEAD}tick_ms = 50\nidle_tick_ms = 20\n{ENGINE}"),
                "idle_tick_ms",
            ),
            (
                format!("{HEAD}idle_tick_ms = 5000\n{ENGINE}"),
                "idle_tick_ms",
            ),
            (
                format!("{HEAD}realtime_priority = 100\n{ENGINE}"),
                "realtime_priority",
            ),
            (
                format!("{HEAD}realtime_priority = -1\n{ENGINE}"),
                "realtime_priority",
            ),
            (format!("{HEAD}engine = []\n"), "engine"),
            (format!("{HEAD}{ENGINE}{ENGINE}"), "engine[1].name"),
            (
                format!("{HEAD}[[engine]]\nname = \"\"\nbudget = 1\n"),
                "engine[0].name",
            ),
            (
                format!("{HEAD}cgroup_root = \"rel\"\n{ENGINE}"),
                "cgroup_root",
            ),
            (format!("{HEAD}run_dir = \"rel\"\n{ENGINE}"), "run_dir"),
            (
                format!("{HEAD}control_socket = \"rel.sock\"\n{ENGINE}"),
                "control_socket",
            ),
            (format!("{HEAD}identity = \"magic\"\n{ENGINE}"), "magic"),
            (format!("{HEAD}bogus = 1\n{ENGINE}"), "`bogus`"),
            (
                format!("{HEAD}tick_ms = \"fast\"\n{ENGINE}"),
                "line 3 (`tick_ms",
            ),
            (format!("ceiling = 1\n{ENGINE}"), "database"),
            (format!("database = \"db\"\n{ENGINE}"), "ceiling"),
            (
                format!("database = \"db\"\nceiling = \"lots\"\n{ENGINE}"),
                "ceiling",
            ),
            (
                format!("database = \"db\"\nceiling = 0\n{ENGINE}"),
                "ceiling",
            ),
            (format!("{HEAD}[[engine]]\nname = \"a\"\n"), "budget"),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = \"2GiB\"\n"),
                "engine[0].budget",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = \"9 furlongs\"\n"),
                "engine[0].budget",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = \"10%\"\nfloor = \"20%\"\n"),
                "engine[0].floor",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = \"10%\"\nhot_set = \"20%\"\n"),
                "engine[0].hot_set",
            ),
            (
                format!(
                    "{HEAD}[[engine]]\nname = \"a\"\nbudget = \"10%\"\npage_cache_share = \"2GiB\"\n"
                ),
                "engine[0].page_cache_share",
            ),
            (
                format!(
                    "{HEAD}[[engine]]\nname = \"a\"\nbudget = \"60%\"\nfloor = \"60%\"\n\
                     [[engine]]\nname = \"b\"\nbudget = \"60%\"\nfloor = \"60%\"\n"
                ),
                "engine.floor",
            ),
            (
                format!(
                    "{HEAD}[[engine]]\nname = \"a\"\nbudget = \"60%\"\nhot_set = \"60%\"\n\
                     [[engine]]\nname = \"b\"\nbudget = \"60%\"\nhot_set = \"60%\"\n"
                ),
                "engine.hot_set",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = 1\ncpus = \"1-0\"\n"),
                "runs backwards",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = 1\ncpus = \"\"\n"),
                "names no CPU",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = 1\ncpus = \"0,1000\"\n"),
                "engine[0].cpus",
            ),
            (format!("{HEAD}[cpuset]\n{ENGINE}"), "cpuset"),
            (
                format!("{HEAD}[cpuset]\ncpus = \"0,1000\"\n{ENGINE}"),
                "cpuset.cpus",
            ),
            (
                format!("{HEAD}[cpuset]\nmems = \"0,1000\"\n{ENGINE}"),
                "cpuset.mems",
            ),
            (
                format!("{HEAD}[cpuset]\nnodes = \"0\"\n{ENGINE}"),
                "`nodes`",
            ),
            (
                format!("{HEAD}[thresholds]\nwarning = 0.95\ncritical = 0.9\n{ENGINE}"),
                "thresholds",
            ),
            (
                format!("{HEAD}[thresholds]\nrestore = 0.95\n{ENGINE}"),
                "thresholds.restore",
            ),
            (
                format!("{HEAD}[lending]\ncushion = 2.0\n{ENGINE}"),
                "lending.cushion",
            ),
            (
                format!("{HEAD}[lending]\nmin_loan_ms = 86400000\n{ENGINE}"),
                "lending.min_loan_ms",
            ),
            (
                format!("{HEAD}[lending]\nidle_spill_after_ms = 86400000\n{ENGINE}"),
                "lending.idle_spill_after_ms",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = 1\nidle_spill = 1\n"),
                "idle_spill",
            ),
            (
                format!("{HEAD}[lending]\nidle_ms = 5\n{ENGINE}"),
                "`idle_ms`",
            ),
            (
                format!("{HEAD}[control]\nmax_connections = 0\n{ENGINE}"),
                "control.max_connections",
            ),
            (
                format!(
                    "{HEAD}[control]\nmax_connections = 8\nmax_connections_per_uid = 9\n{ENGINE}"
                ),
                "control.max_connections_per_uid",
            ),
            (
                format!("{HEAD}[control]\nhello_timeout_ms = 10\n{ENGINE}"),
                "control.hello_timeout_ms",
            ),
            (
                format!("{HEAD}[control]\nidle_timeout_ms = 5000\n{ENGINE}"),
                "control.idle_timeout_ms",
            ),
            (
                format!("{HEAD}[control]\nbacklog = 5\n{ENGINE}"),
                "`backlog`",
            ),
            (
                format!("{HEAD}[maps]\nthreads = 100\n{ENGINE}"),
                "maps.threads",
            ),
            (
                format!("{HEAD}[maps]\nregions = 99999999\n{ENGINE}"),
                "maps.regions",
            ),
            (format!("{HEAD}[maps]\nfiles = 0\n{ENGINE}"), "maps.files"),
            (
                format!("{HEAD}[maps]\nprocesses = 512\n{ENGINE}"),
                "`processes`",
            ),
            (
                format!("{HEAD}allowed_uids = [\"root\"]\n{ENGINE}"),
                "allowed_uids",
            ),
            (
                format!("{HEAD}[[engine]]\nname = \"a\"\nbudget = 1\nessential = \"no\"\n"),
                "line 6 (`essential",
            ),
            (
                format!("{HEAD}delegate_uid = 1000\n{ENGINE}"),
                "delegate_uid",
            ),
            (
                format!("{HEAD}[pressure_stall]\nwindow_ms = 100\n{ENGINE}"),
                "pressure_stall.window_ms",
            ),
            (
                format!("{HEAD}[pressure_stall]\nstall_ms = 0\n{ENGINE}"),
                "pressure_stall.stall_ms",
            ),
            (
                format!("{HEAD}[pressure_stall]\nstall_ms = 3000\n{ENGINE}"),
                "pressure_stall.stall_ms",
            ),
            (
                format!("{HEAD}[pressure_stall]\nwindows = 3000\n{ENGINE}"),
                "`windows`",
            ),
        ];
        for (text, field) in &cases {
            let e = Config::parse(text).expect_err(text);
            let msg = e.to_string();
            assert!(msg.contains(field), "{text:?}: {msg:?} should name {field}");
        }
    }
}
