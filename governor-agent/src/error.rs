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
    #[error("thread {tid} does not belong to process {pid}")]
    NoSuchThread { pid: u32, tid: u32 },
    #[error("unknown engine `{name}` (configured engines: {known})")]
    UnknownEngine { name: String, known: String },
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
