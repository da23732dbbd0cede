//! # nodedb-governor
//!
//! A memory governor for multi-engine database processes: per-engine budgets
//! under a global ceiling, enforced cooperatively in the process. The agent
//! (`nodedb-governor-agent`, a crate of its own) adds the kernel's
//! attribution and enforcement; a database that embeds this library pulls in
//! none of it.
//!
//! ## The reservation protocol
//! Every engine (vector search, timeseries, the SQL engine, ...) asks the
//! [`MemoryGovernor`] before it holds memory, and gets a [`Reservation`]
//! back: a guard that gives the memory back when it is dropped. A request
//! that does not fit is refused *at once* with a [`MemError`] that names the
//! engine and the numbers, so the caller can spill, wait or fail the query.
//! Nothing is ever refused late or at random: the same state gives the same
//! answer. A reservation owns a handle to its governor (as DataFusion's
//! `MemoryReservation` owns an `Arc` of its pool), so it can be kept
//! anywhere: in a cache, in a spill handler, on another thread.
//!
//! The [`Budget`] is a global ceiling and, per engine, a guaranteed floor and
//! a cap. Space above the floors is a pool engines share; an engine's
//! unused floor stays free for it. Caps move between engines by loans: an
//! idle engine lends a busy one the part of its cap it does not need, and
//! takes it back when it needs it.
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
//! ### The fast path
//! While an engine is far from its limits, a thread reserves from
//! *credit* it drew for the engine a batch (1 MiB) at a time: a
//! [`try_grow`](Reservation::try_grow) + [`shrink`](Reservation::shrink)
//! pair is then two thread-local words, no lock and no shared atomic. Near
//! the limits every decision is exact, under the lock, and the deciding
//! thread first gives its own credit back, so refusals are as exact as
//! without the fast path. Credit goes back when a thread exits and on
//! [`flush_thread_credit`](MemoryGovernor::flush_thread_credit); until then
//! a quiet thread's credit (up to two batches) counts as the engine's.
//!
//! Making a reservation and dropping it also count a reference to the
//! governor up and down (a shared atomic), so the hot pattern is the one
//! DataFusion's operators follow: one long-lived reservation per consumer,
//! made empty with [`reservation`](MemoryGovernor::reservation) (never
//! refused), that grows and shrinks as the consumer's use changes.
//!
//! ```
//! use nodedb_governor::{Budget, EngineId, MemError, MemoryGovernor};
//!
//! const KIB: u64 = 1 << 10;
//! let governor = MemoryGovernor::new(
//!     Budget::builder(1 << 30).engine(EngineId::Timeseries, 0, 1 << 30).build()?,
//! );
//! // An ingest buffer: one reservation for its whole life.
//! let mut buffer = governor.reservation(EngineId::Timeseries)?;
//! for _ in 0..1000 {
//!     buffer.try_grow(4 * KIB)?; // a page of points arrives
//!     buffer.shrink(4 * KIB)?; // and is flushed
//! }
//! assert_eq!(buffer.size(), 0);
//! # Ok::<(), MemError>(())
//! ```
//!
//! ## Spilling: a refusal becomes freed memory
//! Engines register a [`SpillHandler`] for each consumer that can give
//! memory back (a cache that drops entries, a hash table that writes
//! partitions to disk). The [`SpillController`] decides who spills and calls
//! them: [`run`](SpillController::run) spills every engine past 90% of its
//! cap down to 75% (hysteresis), and
//! [`reserve_or_spill`](SpillController::reserve_or_spill) answers a refusal
//! for lack of shared memory by spilling *other* engines (borrowers above
//! their floor first) and trying once more.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use nodedb_governor::*;
//!
//! const MIB: u64 = 1 << 20;
//! # fn main() -> Result<(), MemError> {
//! let budget = Budget::builder(100 * MIB)
//!     .engine(EngineId::Vector, 0, 100 * MIB)
//!     .engine(EngineId::Query, 0, 100 * MIB)
//!     .build()?;
//! let governor = MemoryGovernor::new(budget);
//!
//! /// The vector engine's cache: 1 MiB entries it can drop.
//! struct Cache(Mutex<Vec<Reservation>>);
//! impl SpillHandler for Cache {
//!     fn reclaimable_bytes(&self) -> u64 {
//!         self.0.lock().unwrap().iter().map(Reservation::size).sum()
//!     }
//!     fn cost_per_byte(&self) -> f64 { 0.1 } // cheap: it can be recomputed
//!     fn spill(&self, target: u64) -> u64 {
//!         let mut entries = self.0.lock().unwrap();
//!         let mut freed = 0;
//!         while freed < target {
//!             let Some(entry) = entries.pop() else { break };
//!             freed += entry.size(); // dropping the entry releases it
//!         }
//!         freed
//!     }
//! }
//! let entries = (0..80).map(|_| governor.try_reserve(EngineId::Vector, MIB)).collect::<Result<_, _>>()?;
//! let cache = Arc::new(Cache(Mutex::new(entries)));
//! let spill = SpillController::new(SpillConfig::default())?;
//! let _registered = spill.register(EngineId::Vector, cache.clone());
//!
//! // The query needs 40 MiB; only 20 are free. The cache gives way.
//! assert!(governor.try_reserve(EngineId::Query, 40 * MIB).is_err());
//! let table = spill.reserve_or_spill(&governor, EngineId::Query, 40 * MIB)?;
//! assert_eq!(table.size(), 40 * MIB);
//! assert_eq!(spill.spilled_bytes(EngineId::Vector), 20 * MIB);
//! # Ok(()) }
//! ```
//!
//! ## Rebalancing: idle engines lend
//! [`MemoryGovernor::rebalance`] (on a timer:
//! [`MemoryGovernor::spawn_rebalancer`]) moves budget from idle engines to
//! busy ones by the rules of [`lending`], the same the agent lends by: an
//! engine at Critical of its cap borrows from one that has not grown for
//! half a second and sits below Warning, which keeps its floor, or what it
//! holds plus a quarter of its cap. A lender that gets busy, or is refused a
//! reservation, takes its loans back at once; the borrower's cap drops, and
//! [`SpillController::run`] spills what it holds beyond it. The floor is
//! never lent. Limits change at run time with
//! [`set_limits`](MemoryGovernor::set_limits) and
//! [`set_ceiling`](MemoryGovernor::set_ceiling), refused whole if they would
//! break an invariant (new limits end the loans of the engine they change).
//!
//! ```
//! use std::time::Instant;
//! use nodedb_governor::*;
//!
//! const MIB: u64 = 1 << 20;
//! # fn main() -> Result<(), MemError> {
//! let governor = MemoryGovernor::new(
//!     Budget::builder(100 * MIB)
//!         .engine(EngineId::Timeseries, 0, 50 * MIB)
//!         .engine(EngineId::Query, 0, 50 * MIB)
//!         .build()?,
//! );
//! // Timeseries holds 4 MiB and is quiet; a GROUP BY fills Query's cap.
//! let _points = governor.try_reserve(EngineId::Timeseries, 4 * MIB)?;
//! let mut table = governor.try_reserve(EngineId::Query, 46 * MIB)?;
//! assert!(table.try_grow(10 * MIB).is_err());
//! // Query is busy (92% of its cap): Timeseries lends all but what it
//! // holds and a cushion of a quarter of its cap (4 + 12.5 MiB).
//! let lent = governor.rebalance_at(Instant::now());
//! assert_eq!(lent[0].loan().bytes, 50 * MIB - 4 * MIB - 50 * MIB / 4);
//! table.try_grow(10 * MIB)?;
//! // Timeseries needs 20 MiB: refused by its reduced cap, it takes its
//! // loan back at once, and its retry fits. Query is now over its cap of
//! // 50 MiB: a spill controller's `run` would spill it.
//! assert!(governor.try_reserve(EngineId::Timeseries, 20 * MIB).is_err());
//! assert!(governor.loans().is_empty());
//! let _batch = governor.try_reserve(EngineId::Timeseries, 20 * MIB)?;
//! assert_eq!(governor.usage(EngineId::Query)?.cap_bytes, 50 * MIB);
//! # Ok(()) }
//! ```
//!
//! ## NUMA: the budget per node
//! With a [`Topology`] ([`Topology::detect`] reads the kernel's), the
//! ceiling and each engine's cap are split across the nodes (by the
//! nodes' memory, or by weights), and each reservation is charged to a
//! node as well as to its engine: the node of the calling thread, by the
//! engine's [`NumaPolicy`]. `strict` refuses when the engine's share of
//! that node is used up, naming the node, even while another node has
//! room; `prefer-local` then charges the node with the most room and
//! counts the bytes as remote; `interleave` charges the node with the most
//! room wherever the thread runs. A reservation gives its bytes back to
//! the nodes it took them from, whichever thread drops it. The fast path
//! keeps its speed: credit is drawn for the thread's node once a batch
//! (see [`numa`]). With one node nothing of this runs.
//!
//! ```
//! use nodedb_governor::*;
//!
//! const MIB: u64 = 1 << 20;
//! # fn main() -> Result<(), MemError> {
//! // Node 1 has memory but no CPUs here, so every thread is on node 0.
//! let all_cpus = (0..1024).collect();
//! let topology = Topology::new(vec![
//!     Node { id: 0, cpus: all_cpus, memory_bytes: 1 << 30 },
//!     Node { id: 1, cpus: vec![], memory_bytes: 1 << 30 },
//! ])?;
//! let governor = MemoryGovernor::new(
//!     Budget::builder(200 * MIB)
//!         .engine(EngineId::Vector, 0, 100 * MIB)
//!         .engine(EngineId::Query, 0, 100 * MIB)
//!         .numa(topology)
//!         .engine_numa(EngineId::Vector, NumaPolicy::Strict, None)
//!         .build()?,
//! );
//! // Vector's share of node 0 is half its cap.
//! let _index = governor.try_reserve(EngineId::Vector, 50 * MIB)?;
//! assert!(matches!(
//!     governor.try_reserve(EngineId::Vector, MIB),
//!     Err(MemError::NodeBudgetExceeded { node: 0, .. })
//! ));
//! // Query prefers node 0, and borrows node 1's share when it must.
//! let _table = governor.try_reserve(EngineId::Query, 50 * MIB)?;
//! let spilled_over = governor.try_reserve(EngineId::Query, 10 * MIB)?;
//! assert_eq!(spilled_over.node_bytes(), [(1, 10 * MIB)]);
//! assert_eq!(governor.node_usage(EngineId::Query)?[1].remote_bytes, 10 * MIB);
//! # Ok(()) }
//! ```
//!
//! ## Spilling somewhere: the overflow region
//! An [`OverflowRegion`] is a bounded mmap (anonymous or file-backed) that
//! spilled data can go to: slots read back exactly what was written, freed
//! space is merged and its pages returned to the kernel, and it is safe to
//! share between threads.
//!
//! ```
//! use nodedb_governor::OverflowRegion;
//!
//! let region = OverflowRegion::anonymous(1 << 20).unwrap();
//! let slot = region.write(b"a spilled partition").unwrap();
//! assert_eq!(slot.read(), b"a spilled partition");
//! assert!(region.write(&vec![0u8; 2 << 20]).is_err(), "bounded");
//! drop(slot);
//! assert_eq!(region.used_bytes(), 0);
//! ```
//!
//! ## Features
//! * `metrics`: [`metrics::GovernorMetrics`] publishes the accounting on a
//!   `prometheus::Registry` (per engine: reserved, limit, floor, lent,
//!   pressure level, rejections, spilled bytes; with NUMA, the same per
//!   node; with `jemalloc`, arena resident, active and dirty bytes).
//! * `jemalloc`: [`arena::EngineArenas`] gives each engine a dedicated
//!   jemalloc arena (`arenas.create`; with NUMA, one per engine and node),
//!   pins threads to it, reads its statistics and purges it. The embedder installs jemalloc as the
//!   global allocator.
//! * `datafusion`: [`datafusion_pool::GovernorPool`] is DataFusion's
//!   `MemoryPool` over one engine's budget: DataFusion's spillable operators
//!   spill when the governor refuses them; [`datafusion_spill::UncachedSpillFiles`]
//!   makes DataFusion's spill files without leaving them in the page cache.
//! * `fault-injection`: [`MemoryGovernor::refuse_nth_reservation`] refuses
//!   the Nth reservation, to test callers' refusal paths.
//!
//! * `control`: [`control::AgentLink`], the library's end of the control
//!   channel to the agent (thread registration, pressure, spill, purge and
//!   budget requests); [`control::wire`] is the frame format both ends
//!   speak.
//!
//! ## The agent
//! The privileged agent (the `nodedb-governor` binary of the
//! `nodedb-governor-agent` crate) attributes resident memory to engines
//! with eBPF, owns the cgroup subtree, and drives this library through
//! [`control::AgentLink`]. Without it the library governs alone: that is the
//! embedded default.

#[cfg(feature = "jemalloc")]
pub mod arena;
pub mod budget;
pub mod cache;
#[cfg(feature = "control")]
pub mod control;
#[cfg(feature = "datafusion")]
pub mod datafusion_pool;
#[cfg(feature = "datafusion")]
pub mod datafusion_spill;
pub mod engine;
pub mod error;
pub mod governor;
pub mod lending;
#[cfg(feature = "metrics")]
pub mod metrics;
pub mod numa;
pub mod overflow;
pub mod page_cache;
pub mod pressure;
pub mod spill;
mod sync;

pub use budget::{Budget, BudgetBuilder, EngineBudget, NumaBudget};
pub use cache::{CachedFile, EngineCache, HotSet};
pub use engine::EngineId;
pub use error::{Holders, MemError};
pub use governor::{
    DEFAULT_BATCH_BYTES, EngineUsage, MemoryGovernor, OutsideProbe, Rebalancer, Reservation,
};
pub use numa::{Node, NodeTotals, NodeUsage, NumaPolicy, Topology};
pub use overflow::{OverflowError, OverflowRegion, OverflowSlot};
pub use page_cache::{UncachedWriter, WritePath};
pub use pressure::{PressureChange, PressureLevel, PressureThresholds, ThresholdsHandle};
pub use spill::{
    HandlerRegistration, SpillAction, SpillConfig, SpillController, SpillHandler, SpillReport,
};
