//! Lending: an idle engine's unused floor goes to the shared pool, and
//! comes back when the engine is active again (the public face is
//! [`MemoryGovernor::lend`](crate::MemoryGovernor::lend),
//! [`rebalance`](crate::MemoryGovernor::rebalance) and
//! [`spawn_rebalancer`](crate::MemoryGovernor::spawn_rebalancer)).

use std::{
    sync::{Arc, Weak},
    time::Duration,
};

use super::{ledger::Ledger, shared::Shared};
use crate::{
    engine::EngineId,
    sync::{StdCondvar, StdMutex},
};

/// A change of an engine's loan to the shared pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoanChange {
    pub engine: EngineId,
    pub from: u64,
    pub to: u64,
}

/// Lends up to `bytes` of engine `i`'s floor.
pub(super) fn lend(ledger: &mut Ledger, i: usize, bytes: u64) {
    ledger.update(i, |e| e.lent = bytes.min(e.floor));
}

/// One round: engines quiet for `idle_rounds` rounds lend their unused
/// floor, active ones take their loan back.
pub(super) fn rebalance(l: &mut Ledger, idle_rounds: u32) -> Vec<LoanChange> {
    let idle_rounds = idle_rounds.max(1);
    let mut changes = Vec::new();
    for i in 0..l.engines.len() {
        let e = &mut l.engines[i];
        if e.activity == e.activity_seen {
            e.quiet_rounds = e.quiet_rounds.saturating_add(1);
        } else {
            e.quiet_rounds = 0;
            e.activity_seen = e.activity;
        }
        let lend = if e.quiet_rounds >= idle_rounds {
            e.floor.saturating_sub(e.used)
        } else {
            0
        };
        if lend != e.lent {
            changes.push(LoanChange {
                engine: e.id,
                from: e.lent,
                to: lend,
            });
            l.update(i, |e| e.lent = lend);
        }
    }
    changes
}

/// The thread started by [`MemoryGovernor::spawn_rebalancer`](crate::MemoryGovernor::spawn_rebalancer);
/// dropping it stops the thread and waits for it.
pub struct Rebalancer {
    stop: Arc<(StdMutex<bool>, StdCondvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rebalancer {
    /// Rebalances the governor behind `weak` every `interval` until dropped
    /// (or until the governor is gone).
    pub(super) fn spawn(weak: Weak<Shared>, interval: Duration, idle_rounds: u32) -> Self {
        let stop = Arc::new((StdMutex::new(false), StdCondvar::new()));
        let signal = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nodedb-rebalance".into())
            .spawn(move || {
                let (lock, cv) = &*signal;
                let mut stopped = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    stopped = cv
                        .wait_timeout(stopped, interval)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    if *stopped {
                        return;
                    }
                    let Some(shared) = weak.upgrade() else {
                        return;
                    };
                    shared.with_ledger(|l| rebalance(l, idle_rounds));
                }
            })
            .ok();
        Self { stop, thread }
    }

    /// False if the thread could not be started.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Rebalancer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
