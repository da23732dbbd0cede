//! # nodedb-governor
//!
//! A memory governor for multi-engine database processes: per-engine budgets
//! under a global ceiling, enforced cooperatively in the process, and
//! (behind the `agent` feature) attributed and enforced by the kernel.
//!
//! ## The reservation protocol
//! Every engine (vector search, timeseries, the SQL engine, ...) asks the
//! [`MemoryGovernor`] before it holds memory, and gets a [`Reservation`]
//! back: a guard that gives the memory back when it is dropped. A request
//! that does not fit is refused *at once* with a [`MemError`] that names the
//! engine and the numbers, so the caller can spill, wait or fail the query.
//! Nothing is ever refused late or at random: the same state gives the same
//! answer.
//!
//! The [`Budget`] is a global ceiling and, per engine, a guaranteed floor and
//! a cap. Space above the floors is a pool engines share; an engine's
//! unused floor stays free for it unless it lends it (an idle engine lends;
//! a lender refused for lack of memory takes its loan back).
//!
//! ```
//! use nodedb_governor::{Budget, EngineId, MemError, MemoryGovernor};
//!
//! const MIB: u64 = 1 << 20;
//! let budget = Budget::builder(1024 * MIB)
//!     .engine(EngineId::Vector, 256 * MIB, 768 * MIB)
//!     .engine(EngineId::Query, 128 * MIB, 512 * MIB)
//!     .build()?;
//! let governor = MemoryGovernor::new(budget);
//!
//! // A hash table for a GROUP BY grows as it goes.
//! let mut table = governor.try_reserve(EngineId::Query, 64 * MIB)?;
//! table.try_grow(192 * MIB)?;
//! match table.try_grow(512 * MIB) {
//!     Err(MemError::BudgetExceeded { available, .. }) => {
//!         // Over the Query cap: spill partitions to disk instead.
//!         assert_eq!(available, 256 * MIB);
//!     }
//!     other => panic!("expected a refusal, got {other:?}"),
//! }
//! assert_eq!(governor.usage(EngineId::Query)?.used_bytes, 256 * MIB);
//! drop(table); // the memory goes back
//! assert_eq!(governor.total_bytes(), 0);
//! # Ok::<(), MemError>(())
//! ```
//!
//! Memory that must be counted but cannot be refused (already allocated, or
//! faulted in by the kernel) is [`charge`](MemoryGovernor::charge)d; a
//! [`reserve_timeout`](MemoryGovernor::reserve_timeout) waits a bounded time
//! for others to release (backpressure). [`PressureLevel`]s (Normal,
//! Warning, Critical, Emergency) follow each engine's use of its cap and the
//! total's use of the ceiling; their thresholds change at run time through a
//! [`ThresholdsHandle`], and [`subscribe`](MemoryGovernor::subscribe)rs hear
//! every change.
//!
//! ## The agent
//! With the `agent` feature (on by default; a database that only embeds the
//! library builds with `default-features = false`), [`agent`] holds the
//! privileged agent: eBPF attribution of resident memory to engines, the
//! cgroup subtree it owns, and its interfaces.

#[cfg(feature = "jemalloc")]
pub mod arena;
pub mod budget;
mod credit;
#[cfg(feature = "datafusion")]
pub mod datafusion_pool;
pub mod engine;
pub mod error;
pub mod governor;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod overflow;
pub mod pressure;
pub mod spill;
mod sync;

pub use budget::{Budget, BudgetBuilder, EngineBudget};
pub use engine::EngineId;
pub use error::MemError;
pub use governor::{
    DEFAULT_BATCH_BYTES, EngineUsage, LoanChange, MemoryGovernor, Rebalancer, Reservation,
};
pub use overflow::{OverflowError, OverflowRegion, OverflowSlot};
pub use pressure::{PressureChange, PressureLevel, PressureThresholds, ThresholdsHandle};
pub use spill::{
    HandlerRegistration, SpillAction, SpillConfig, SpillController, SpillHandler, SpillReport,
};

#[cfg(feature = "agent")]
pub mod agent;
