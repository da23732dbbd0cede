//! What the end-to-end tests run around a real agent: a private agent
//! started and stopped in a guard, the probes driven against it and their
//! output read, and the guards that leave nothing behind (children,
//! cgroups, pins, scratch directories) when a test fails.
//!
//! The pieces that do not panic ([`launch`], [`status`], [`Reaped`],
//! [`probes::probe_command`]) also serve `vm-check`, which runs the same
//! binaries inside a VM and reports instead of panicking.

pub mod agent;
pub mod agent_binary;
pub mod cgroup;
pub mod launch;
pub mod names;
pub mod pins;
pub mod probes;
pub mod reaped;
pub mod relocated;
pub mod scratch;
pub mod status;

pub use agent::Agent;
pub use agent_binary::agent_binary;
pub use names::unique;
pub use reaped::Reaped;
