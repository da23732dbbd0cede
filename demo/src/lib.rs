//! Building blocks for processes that play a multi-engine database: engines
//! made of worker threads, each allocating memory in one of the ways a real
//! engine does (anonymous mmap, the allocator, a file mapping), and how such
//! a process joins the agent.

#[cfg(feature = "cli")]
pub mod app;
pub mod engine;
pub mod governed;
pub mod memory;
pub mod untracked;
