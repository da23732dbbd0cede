//! Synchronisation primitives, swapped for loom's under `--cfg loom` so the
//! reservation core can be model-checked.

#[cfg(loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};
