//! The privileged agent (feature `agent`): kernel attribution, the cgroup
//! subtree, configuration and the admin interface. One module per duty.

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
