//! What the probes (processes that embed the library and play a database's
//! engines against a real agent) share: the arguments that point them at
//! an agent and the connection, threads registered to an engine, and
//! spill handlers for memory only the kernel knows of.

pub mod agent_args;
pub mod engine_thread;
pub mod untracked_spill;

pub use agent_args::AgentArgs;
pub use engine_thread::on_engine_thread;
pub use untracked_spill::UntrackedSpill;
