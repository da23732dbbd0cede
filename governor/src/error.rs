//! The library's error type. A refusal names the engine and the numbers, so
//! the caller can decide to spill, wait or give up, and so can a log reader.

use crate::engine::EngineId;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The engine's own cap would be exceeded.
    #[error(
        "engine {engine} refused {requested} bytes: {available} of its {limit}-byte budget available"
    )]
    BudgetExceeded {
        engine: String,
        requested: u64,
        available: u64,
        limit: u64,
    },
    /// The global ceiling (less what other engines' floors protect) would be
    /// exceeded.
    #[error(
        "engine {engine} refused {requested} bytes: {available} bytes available under the {limit}-byte global ceiling"
    )]
    GlobalCeilingExceeded {
        engine: String,
        requested: u64,
        available: u64,
        limit: u64,
    },
    /// The engine's share of a NUMA node would be exceeded (and, by its
    /// policy, no other node may take the request).
    #[error(
        "engine {engine} refused {requested} bytes on NUMA node {node}: {available} of its {limit}-byte share there available"
    )]
    NodeBudgetExceeded {
        engine: String,
        node: u32,
        requested: u64,
        available: u64,
        limit: u64,
    },
    /// A NUMA node's part of the ceiling would be exceeded (and, by the
    /// engine's policy, no other node may take the request).
    #[error(
        "engine {engine} refused {requested} bytes on NUMA node {node}: {available} bytes available under the node's {limit}-byte part of the ceiling"
    )]
    NodeCeilingExceeded {
        engine: String,
        node: u32,
        requested: u64,
        available: u64,
        limit: u64,
    },
    /// The engine is not in the budget.
    #[error("unknown engine {engine}: not in the budget")]
    UnknownEngine { engine: EngineId },
    /// The request does not fit in a 64-bit counter.
    #[error("engine {engine}: {requested} bytes on top of {current} overflows the counter")]
    SizeOverflow {
        engine: String,
        requested: u64,
        current: u64,
    },
    /// `shrink` or `split` asked for more than the reservation holds.
    #[error("engine {engine}: cannot take {requested} bytes from a reservation of {held}")]
    BeyondReservation {
        engine: String,
        requested: u64,
        held: u64,
    },
    /// A bounded wait ran out.
    #[error("engine {engine}: {requested} bytes not available within {waited_ms} ms")]
    Timeout {
        engine: String,
        requested: u64,
        waited_ms: u64,
    },
    /// A hot set beyond the engine's hot-set bound.
    #[error(
        "engine {engine} refused a hot set of {requested} bytes: {held} bytes held under its {limit}-byte hot-set bound"
    )]
    HotSetLimit {
        engine: String,
        requested: u64,
        held: u64,
        limit: u64,
    },
    /// The kernel would not lock a hot set (nothing is charged).
    #[error("engine {engine}: locking a hot set of {requested} bytes failed: {reason}")]
    LockFailed {
        engine: String,
        requested: u64,
        reason: String,
    },
    /// A budget or limit change that would break an invariant.
    #[error("invalid budget: {field}: {reason}")]
    InvalidBudget { field: String, reason: String },
}
