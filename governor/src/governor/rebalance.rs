//! The rebalancer thread: [`MemoryGovernor::rebalance`](crate::MemoryGovernor::rebalance)
//! on a timer. The rules are [`crate::lending`]'s, the same the agent lends
//! by.

use std::{
    sync::{Arc, Weak},
    time::{Duration, Instant},
};

use super::shared::Shared;
use crate::sync::{StdCondvar, StdMutex};

/// The thread started by [`MemoryGovernor::spawn_rebalancer`](crate::MemoryGovernor::spawn_rebalancer);
/// dropping it stops the thread and waits for it.
pub struct Rebalancer {
    stop: Arc<(StdMutex<bool>, StdCondvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Rebalancer {
    /// Rebalances the governor behind `weak` every `interval` until dropped
    /// (or until the governor is gone).
    pub(super) fn spawn(weak: Weak<Shared>, interval: Duration) -> Self {
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
                    if !shared
                        .with_ledger(|l| l.rebalance(Instant::now()))
                        .is_empty()
                    {
                        shared.wake_waiters();
                    }
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
