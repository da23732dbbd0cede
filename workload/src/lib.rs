//! The validation workload's engines, each charging what it holds to its
//! budget in the library and giving memory back on request:
//! - [`vector`]: HNSW segments (instant-distance), evicted to disk scans;
//! - [`timeseries`]: raw point buffers flushed as Gorilla segments
//!   ([`gorilla`]).
//!
//! - [`query`]: the SQL engine, a DataFusion `GROUP BY` through the
//!   library's memory pool, spilling to disk when refused;
//! - [`cache`]: the cache scenario's mapped index and flush;
//! - [`cpu`]: where a run's CPU went (processes' and threads' CPU time);
//! - [`irq`]: where a disk's interrupts land (the cache scenario places its
//!   engines by it).

pub mod cache;
pub mod cpu;
pub mod gorilla;
pub mod irq;
pub mod query;
pub mod timeseries;
pub mod vector;
