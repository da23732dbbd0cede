//! The nodedb-governor agent: the privileged process, deployed next to the
//! database, that attributes resident memory to engines with eBPF, owns the
//! database's cgroup subtree, enforces the ceiling and the budgets, and
//! serves its status and metrics. The binary is `nodedb-governor`; this
//! library is its modules, one per duty:
//!
//! * the decisions: [`policy`] (pure: state and inputs in, actions out);
//! * the state and its one owner: [`owner`], fed by [`control`] (library
//!   sessions), [`admin`] (the admin socket) and [`run`] (signals), read
//!   through its snapshot by [`http`] and [`metrics`];
//! * the kernel: [`attribution`] (eBPF), [`cgroup`], [`ceiling`], [`psi`],
//!   with [`btf`], [`tracefs`], [`procfs`], [`mounts`], [`privilege`];
//! * the operator: [`config`], [`cli`], [`status`], [`top`].

pub mod admin;
pub mod attribution;
pub mod btf;
pub mod ceiling;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod cpus;
pub mod cpuset;
pub mod error;
pub mod faults;
pub mod http;
pub mod latency;
pub mod metrics;
pub mod mounts;
pub mod numa;
pub mod owner;
pub mod paths;
pub mod policy;
pub mod privilege;
pub mod procfs;
pub mod psi;
pub mod run;
pub mod sched;
pub mod serving;
pub mod status;
pub mod top;
pub mod tracefs;
