//! One engine of one governed process, as the policy keeps it: where it is
//! on the ladder, what the library last said of it, what was last asked of
//! it, and what the ladder did (the counters the status and `/metrics`
//! show).

use std::time::{Duration, Instant};

use nodedb_governor::PressureLevel;
use serde::{Deserialize, Serialize};

/// What the ladder did for one engine, and where it stands: the engine's
/// row in `status --json` (`clients[].engines`) and its `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineEnforcement {
    /// None until the first tick saw the engine.
    pub level: Option<PressureLevel>,
    /// The budget in force (the configured budget moved by loans).
    pub budget_bytes: u64,
    pub resident_bytes: u64,
    pub reserved_bytes: u64,
    /// Reservations the library refused (its own count).
    #[serde(default)]
    pub rejections: u64,
    pub spill_requests: u64,
    pub spilled_bytes: u64,
    /// Loans taken back from it (as borrower) that left it at Critical of
    /// its new budget: each forced a spill.
    #[serde(default)]
    pub forced_spills: u64,
    pub purges: u64,
    pub level_changes: u64,
    /// Limits (floor and cap) sent to the library.
    #[serde(default)]
    pub limit_changes: u64,
    /// The cap the library was last given.
    #[serde(default)]
    pub cap_bytes: u64,
    /// Held to what it holds (an Emergency; the engine is not essential).
    #[serde(default)]
    pub backpressure: bool,
    /// The page cache the kernel attributes to it.
    #[serde(default)]
    pub page_cache_bytes: u64,
    /// Its configured page-cache share (None: no bound).
    #[serde(default)]
    pub page_cache_share_bytes: Option<u64>,
    /// `drop_cache` requests sent (its cache above its share while the
    /// database was under pressure), and the bytes they freed.
    #[serde(default)]
    pub cache_drop_requests: u64,
    #[serde(default)]
    pub cache_dropped_bytes: u64,
    /// Bytes its hot sets hold locked (the library's report).
    #[serde(default)]
    pub hot_set_bytes: u64,
    /// Spill requests sent because it sat idle on memory while the database
    /// was short of it (`idle_spill`; counted in `spill_requests` too).
    #[serde(default)]
    pub idle_spills: u64,
    /// Spill requests sent for its part of what the database had to give
    /// back in an Emergency (counted in `spill_requests` too).
    #[serde(default)]
    pub ceiling_spills: u64,
    /// Per node, where its budget is split over nodes (its `cpus` lie on
    /// them): what it holds there against its share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<EngineNode>,
}

/// An engine on one NUMA node: what the kernel attributes to it there
/// against its share of its budget in force.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineNode {
    pub node: u32,
    pub resident_bytes: u64,
    pub share_bytes: u64,
    pub level: PressureLevel,
}

/// The library's books for the engine, from its last report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Books {
    pub reserved_bytes: u64,
    pub rejections: u64,
    pub hot_set_bytes: u64,
}

/// What the ladder has counted for the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counters {
    pub spill_requests: u64,
    pub spilled_bytes: u64,
    pub purges: u64,
    pub level_changes: u64,
    pub limit_changes: u64,
    pub cache_drop_requests: u64,
    pub cache_dropped_bytes: u64,
    pub idle_spills: u64,
    pub ceiling_spills: u64,
}

#[derive(Clone, Debug, Default)]
pub(super) struct EngineState {
    /// Where it is on the ladder (None before the first tick).
    pub level: Option<PressureLevel>,
    /// Resident bytes the kernel attributed to it at the last tick.
    pub resident_bytes: u64,
    /// The library's books (None until its first report).
    pub books: Option<Books>,
    /// When the last spill request went out and has not been answered.
    pub spill_sent: Option<Instant>,
    /// When the ladder last asked for its arena to be purged.
    pub purged_at: Option<Instant>,
    /// When the last spill for its part of the database's Emergency went
    /// out and has not been answered (apart from `spill_sent`, which the
    /// ladder clears whenever the engine is below Critical).
    pub ceiling_spill_sent: Option<Instant>,
    /// What the kernel sees it hold beyond its reservations, in whole
    /// steps, as last taken off its cap.
    pub untracked_bytes: u64,
    /// Once it passes the Critical threshold of its share on a node
    /// (fitted, on a crowded node), what it holds on its worst node beyond
    /// the restore point of its share there, in whole steps, until it is
    /// back under it.
    pub node_excess_bytes: u64,
    /// While it has a node excess: the cap that holds it (what it had
    /// reserved when the excess grew, less the excess), so an engine whose
    /// memory a spill request does not reach (a pool that spills when
    /// refused) gives it back; far under its budget in all, a cap lowered
    /// from the budget would not bind.
    pub node_cap: Option<u64>,
    /// Under backpressure (an Emergency; not essential): the cap it is
    /// held to.
    pub held_to: Option<u64>,
    /// The cap the library was last given.
    pub cap_bytes: u64,
    /// Page cache the kernel attributed to it at the last tick.
    pub page_cache_bytes: u64,
    /// When the last `drop_cache` went out (answered or not: a library
    /// that could drop nothing is not asked again at once).
    pub cache_drop_sent: Option<Instant>,
    /// How long after it the next may go (zero: [`CACHE_DROP_RETRY`]):
    /// [`CACHE_DROP_RETRY`], doubled
    /// (up to [`CACHE_DROP_RETRY_MAX`]) by each answer that freed less
    /// than a quarter of its target, back to the start by one that did.
    ///
    /// [`CACHE_DROP_RETRY`]: super::CACHE_DROP_RETRY
    /// [`CACHE_DROP_RETRY_MAX`]: super::CACHE_DROP_RETRY_MAX
    pub cache_drop_retry: Duration,
    pub counters: Counters,
    /// The mark armed in the kernel for it (resident bytes), if any.
    pub mark: Option<u64>,
    /// The mark that fired last, until the engine falls well below it.
    pub mark_fired: Option<u64>,
    /// The node and its threshold (bytes on the node) behind the armed
    /// mark, when a node's threshold set it (None: the engine's total's).
    pub mark_node: Option<(u32, u64)>,
    /// Per node, the threshold whose mark fired last, until the engine
    /// falls well below it there (as `mark_fired` for the total).
    pub node_fired: std::collections::BTreeMap<u32, u64>,
    /// Per node, at the last tick (empty: judged in all only).
    pub nodes: Vec<EngineNode>,
}

impl EngineState {
    pub fn reserved_bytes(&self) -> u64 {
        self.books.map_or(0, |b| b.reserved_bytes)
    }

    pub fn status(
        &self,
        budget_bytes: u64,
        share: Option<u64>,
        forced_spills: u64,
    ) -> EngineEnforcement {
        let Counters {
            spill_requests,
            spilled_bytes,
            purges,
            level_changes,
            limit_changes,
            cache_drop_requests,
            cache_dropped_bytes,
            idle_spills,
            ceiling_spills,
        } = self.counters;
        EngineEnforcement {
            level: self.level,
            budget_bytes,
            resident_bytes: self.resident_bytes,
            reserved_bytes: self.reserved_bytes(),
            rejections: self.books.map_or(0, |b| b.rejections),
            spill_requests,
            spilled_bytes,
            forced_spills,
            purges,
            level_changes,
            limit_changes,
            cap_bytes: self.cap_bytes,
            backpressure: self.held_to.is_some(),
            page_cache_bytes: self.page_cache_bytes,
            page_cache_share_bytes: share,
            cache_drop_requests,
            cache_dropped_bytes,
            hot_set_bytes: self.books.map_or(0, |b| b.hot_set_bytes),
            idle_spills,
            ceiling_spills,
            nodes: self.nodes.clone(),
        }
    }
}
