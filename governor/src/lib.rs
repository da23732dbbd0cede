//! # nodedb-governor
//!
//! A kernel-assisted memory governor for multi-engine database processes.
//!
//! This crate holds two things:
//! * the in-process library a database codes against (budgets, reservations,
//!   pressure, spilling; built with `default-features = false` it has no
//!   kernel-side dependencies at all), and
//! * behind the `agent` feature (on by default), the privileged agent:
//!   eBPF attribution of resident memory to engines ([`agent::attribution`]),
//!   the cgroup subtree it owns ([`agent::cgroup`]), and its interfaces.

#[cfg(feature = "agent")]
pub mod agent;
