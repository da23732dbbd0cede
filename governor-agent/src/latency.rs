//! Recent latencies, kept for the status: the last [`KEPT`] samples of a
//! kind, summarised (median, 99th percentile, longest) when a snapshot is
//! built. What the agent reports of its own speed (a crossing to its
//! reaction, a message queued to written) comes from these.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

/// Samples kept per kind: a few minutes of a busy engine's crossings.
pub const KEPT: usize = 512;

/// The last [`KEPT`] samples, in microseconds.
#[derive(Clone, Debug, Default)]
pub struct Recent(VecDeque<u64>);

/// What the status shows of one kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples summarised (at most [`KEPT`], the newest).
    pub samples: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl Recent {
    pub fn record(&mut self, us: u64) {
        if self.0.len() == KEPT {
            self.0.pop_front();
        }
        self.0.push_back(us);
    }

    /// Nearest-rank percentiles of what is kept.
    pub fn summary(&self) -> Summary {
        let mut s: Vec<u64> = self.0.iter().copied().collect();
        if s.is_empty() {
            return Summary::default();
        }
        s.sort_unstable();
        let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Summary {
            samples: s.len() as u64,
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            max_us: s[s.len() - 1],
        }
    }
}

/// [`Recent`] shared between threads (a writer on one, the snapshot's
/// builder on another).
#[derive(Clone, Debug, Default)]
pub struct Shared(Arc<Mutex<Recent>>);

impl Shared {
    pub fn record(&self, us: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).record(us);
    }

    pub fn summary(&self) -> Summary {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).summary()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_of_the_newest_samples_only() {
        let mut r = Recent::default();
        assert_eq!(r.summary(), Summary::default());
        // An old slow sample, then KEPT fast ones: it has left the window.
        r.record(1_000_000);
        for us in 1..=KEPT as u64 {
            r.record(us);
        }
        let s = r.summary();
        assert_eq!(s.samples, KEPT as u64);
        assert_eq!(s.max_us, KEPT as u64);
        assert_eq!(s.p50_us, KEPT as u64 / 2);
        // Nearest rank: the 507th of 512.
        assert_eq!(s.p99_us, 507);
        let mut one = Recent::default();
        one.record(42);
        assert_eq!(
            one.summary(),
            Summary {
                samples: 1,
                p50_us: 42,
                p99_us: 42,
                max_us: 42
            }
        );
    }
}
