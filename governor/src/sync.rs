//! Synchronisation primitives, swapped for loom's under `--cfg nodedb_loom`
//! so the reservation core can be model-checked. (The cfg has a name of its
//! own: tokio changes itself under `--cfg loom`.)

#[cfg(nodedb_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(nodedb_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};

/// Always std's, for threads loom does not model (the rebalancer).
pub(crate) use std::sync::{Condvar as StdCondvar, Mutex as StdMutex};
