//! The nodedb-governor agent: the privileged process, deployed next to the
//! database, that attributes resident memory to engines with eBPF, owns the
//! database's cgroup subtree, enforces the ceiling and the budgets, and
//! serves its status and metrics. The binary is `nodedb-governor`; this
//! library is its modules, one per duty.

pub mod admin;
pub mod attribution;
pub mod btf;
pub mod ceiling;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod metrics_http;
pub mod mounts;
pub mod paths;
pub mod privilege;
pub mod procfs;
pub mod psi;
pub mod run;
pub mod status;
pub mod top;
pub mod tracefs;
