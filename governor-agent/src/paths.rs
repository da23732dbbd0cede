//! Every filesystem location the agent touches, in one place.

/// Where tracefs is normally mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Older location, under debugfs.
pub const TRACEFS_LEGACY: &str = "/sys/kernel/debug/tracing";
/// bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default directory for pinned maps (one per agent instance).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/nodedb-governor";
/// Kernel BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Candidate cgroup v2 mount points: a pure v2 host, then a hybrid host.
pub const CGROUP2_CANDIDATES: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// Default runtime directory (admin socket).
pub const DEFAULT_RUN_DIR: &str = "/run/nodedb-governor";
/// Name of the admin socket inside the runtime directory.
pub const ADMIN_SOCKET: &str = "agent.sock";
/// Mount table.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Name of the control socket (libraries connect here) in the runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The host's memory pressure (PSI), when the database has no cgroup v2
/// directory of its own.
pub const HOST_MEMORY_PRESSURE: &str = "/proc/pressure/memory";
