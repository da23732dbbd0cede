//! Support for the end-to-end tests: the harness that runs a real agent
//! for a test, the pieces the probes (processes that embed the library)
//! share, and the rule privileged tests follow.

pub mod flood;
pub mod harness;
pub mod numa;
pub mod privileged;
pub mod probe;
pub mod procfs;
pub mod promtool;
pub mod soak;
pub mod wait;
pub mod wire;
