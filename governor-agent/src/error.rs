//! The agent's error type: each variant names the thing that failed and
//! keeps the source.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(
        "the agent needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN); running as uid {uid} without {missing}"
    )]
    NotPrivileged { uid: u32, missing: String },
    #[error("kernel BTF is missing ({path}): the kernel needs CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf { path: PathBuf },
    #[error("tracefs is not available at {path} and could not be mounted: {source}")]
    NoTracefs { path: PathBuf, source: io::Error },
    #[error("kernel struct layout (BTF): {reason}")]
    KernelLayout { reason: String },
    #[error("tracepoint {event} has an unexpected format: {reason}")]
    TraceFormat { event: String, reason: String },
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: u32 },
    #[error(
        "the process that connected (pid {pid}) has exited: this connection no longer speaks for a process (pid {pid} is no one's now, or another process's)"
    )]
    PeerGone { pid: u32 },
    #[error("thread {tid} does not belong to process {pid}")]
    NoSuchThread { pid: u32, tid: u32 },
    #[error(
        "thread {tid} was said to be moved into engine `{engine}`'s cgroup, but it is in {found}: the agent moves nothing on a library's word"
    )]
    NotMoved {
        tid: u32,
        engine: String,
        found: String,
    },
    #[error(
        "process {pid} runs as uid {uid}: {by} may not assign it (only processes of the uids in allowed_uids, and of root for root)"
    )]
    AssignRefused { pid: u32, uid: u32, by: String },
    #[error("unknown engine `{name}` (configured engines: {known})")]
    UnknownEngine { name: String, known: String },
    #[error(
        "{path} cannot hold the agent's sockets and registry: {reason} (a directory only root can write, not a symlink)"
    )]
    UnsafeDir { path: String, reason: String },
    #[error("cannot use cgroup hierarchy at {path}: {reason}")]
    CgroupUnusable { path: PathBuf, reason: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("eBPF: {what}: {source}")]
    Ebpf {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("too many {what} (limit {limit})")]
    Full { what: &'static str, limit: u32 },
    /// The configuration does not fit this machine (checked once the
    /// machine is known, e.g. NUMA weights against its nodes).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

impl AgentError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub fn ebpf(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Ebpf {
            what: what.into(),
            source: Box::new(source),
        }
    }
}

/// Why a library's hello was refused (the library is told, and the
/// connection ends).
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("the first message must be hello")]
    NotHello,
    #[error("uid {uid} is not allowed on the control socket (see allowed_uids in the config)")]
    UidNotAllowed { uid: u32 },
    #[error("protocol version {got} is not supported (this agent speaks {speaks})")]
    Version { got: u32, speaks: u32 },
    #[error("database {got:?} is not governed here (this agent governs {governs:?})")]
    Database { got: String, governs: String },
    #[error(
        "engine {engine} runs as a process of its own (own_process in the config): a process declares it alone"
    )]
    OwnProcessNotAlone { engine: String },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Why a message from a welcomed library was refused (the library is told;
/// the connection goes on).
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("hello was already received")]
    HelloAgain,
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// Why a new configuration was refused (the old one stays, whole).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{field} cannot change without a restart")]
    NeedsRestart { field: &'static str },
    #[error(
        "a ceiling of {ceiling} bytes would leave no room: the database holds {held} bytes the kernel cannot drop (anonymous and shared memory), above the new ceiling's Emergency mark ({mark} bytes); a spill needs room under the ceiling to write, so lowering it this far would end in an OOM kill. Lower the engines' budgets first, or the ceiling in steps as the database comes down"
    )]
    CeilingBelowHeld { ceiling: u64, held: u64, mark: u64 },
    #[error(transparent)]
    Agent(#[from] AgentError),
}
