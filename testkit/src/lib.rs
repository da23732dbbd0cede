//! Support for the end-to-end tests: the probes' shared pieces and the
//! harness that runs a real agent for a test.

pub mod harness;
pub mod procfs;
