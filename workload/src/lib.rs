//! The validation workload's engines, each charging what it holds to its
//! budget in the library and giving memory back on request:
//! - [`vector`]: HNSW segments (instant-distance), evicted to disk scans;
//! - [`timeseries`]: raw point buffers flushed as Gorilla segments
//!   ([`gorilla`]).
//!
//! The SQL engine is DataFusion through the library's memory pool.

pub mod gorilla;
pub mod timeseries;
pub mod vector;
