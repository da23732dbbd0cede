//! The rungs of the ladder for one engine at one tick: what a level, and a
//! change of level, asks of the library.
//!
//! | level (resident / budget in force) | on entering | while there |
//! |---|---|---|
//! | Warning | purge the engine's arena (at most once a `PURGE_SPACING`) | |
//! | Critical | spill request down to `restore` | again when the last one is answered, the engine was below Critical since, or `spill_retry` old |
//! | Emergency | as Critical | as Critical |
//!
//! Every change of level is sent as `pressure`. While the database stalls
//! on memory (PSI), spilling starts at Warning. An engine whose budget is
//! split over NUMA nodes climbs by the worse of its total and its worst
//! node; a node that sets the level sets the spill's target too (what the
//! engine holds there beyond the restore point of its share).

use std::time::{Duration, Instant};

use nodedb_governor::{PressureLevel, control::wire::ToLibrary};

use super::engine::EngineState;

/// One engine's standing at this tick.
pub(super) struct Rung<'a> {
    pub pid: u32,
    pub engine: &'a str,
    /// The node whose share set the level (None: the engine in all).
    /// `resident_bytes` and `budget_bytes` are then the node's.
    pub node: Option<u32>,
    /// The level at the last tick (Normal before the first).
    pub before: PressureLevel,
    pub level: PressureLevel,
    pub resident_bytes: u64,
    pub budget_bytes: u64,
    /// A spill brings the engine down to this fraction of its budget.
    pub restore: f64,
    pub stalling: bool,
    pub now: Instant,
    pub spill_retry: Duration,
}

/// The shortest time between two purges the ladder asks of one engine.
/// An engine growing through its Warning threshold crosses it again and
/// again: its budget grows with a loan and it climbs back, or the purge
/// itself takes it under (the freed pages its arena kept were a few
/// percent of its budget) and its next allocations, faulting fresh pages
/// in where it would have reused those, bring it back. A purge at every
/// such entry returned little and made it pay for the faults again (the
/// `GROUP BY` entered Warning 14 times in 1.1 s in a host run); one purge a
/// second still returns what a flush or a spill frees.
pub(super) const PURGE_SPACING: Duration = Duration::from_secs(1);

/// Applies the rung to `e` and writes what the library must hear.
pub(super) fn climb(r: &Rung<'_>, e: &mut EngineState, out: &mut Vec<ToLibrary>) {
    let Rung {
        pid,
        engine,
        node,
        before,
        level,
        resident_bytes,
        budget_bytes,
        restore,
        stalling,
        now,
        spill_retry,
    } = *r;
    if level != before {
        e.counters.level_changes += 1;
        tracing::info!(
            pid,
            engine,
            from = ?before,
            to = ?level,
            node,
            resident = resident_bytes,
            budget = budget_bytes,
            "engine pressure changed"
        );
        out.push(ToLibrary::Pressure {
            engine: engine.to_owned(),
            level,
        });
        if level >= PressureLevel::Warning
            && before < PressureLevel::Warning
            && e.purged_at
                .is_none_or(|at| now.duration_since(at) >= PURGE_SPACING)
        {
            e.purged_at = Some(now);
            e.counters.purges += 1;
            out.push(ToLibrary::Purge {
                engine: engine.to_owned(),
            });
        }
    }
    let spill_from = if stalling {
        PressureLevel::Warning
    } else {
        PressureLevel::Critical
    };
    if level < spill_from {
        // Below where spilling starts, the kernel's own figure says the
        // last request was carried out: a new crossing is answered at
        // once, not when the library's answer (behind a busy socket,
        // say) arrives or `spill_retry` has passed.
        e.spill_sent = None;
        return;
    }
    let due = e
        .spill_sent
        .is_none_or(|sent| now.duration_since(sent) >= spill_retry);
    if !due {
        return;
    }
    let goal = (budget_bytes as f64 * restore) as u64;
    let target = resident_bytes.saturating_sub(goal);
    e.counters.spill_requests += 1;
    tracing::info!(
        pid,
        engine,
        node,
        resident = resident_bytes,
        budget = budget_bytes,
        target,
        stalling,
        "spill requested"
    );
    e.spill_sent = Some(now);
    out.push(ToLibrary::Spill {
        engine: engine.to_owned(),
        target_bytes: target,
    });
}

/// How far below a mark that fired an engine must fall before that mark
/// is armed again (a fraction of its budget in force): an engine hovering
/// at a threshold wakes the agent once, and the tick watches it after.
pub(super) const MARK_HYSTERESIS: f64 = 0.02;

/// The mark that wakes the agent for an engine holding `resident_bytes` of
/// `budget_bytes`: the next threshold (Warning, Critical, Emergency) above
/// what it holds; if that is the mark that `fired` last and the engine has
/// not fallen [`MARK_HYSTERESIS`] below it since, the one above that (None:
/// no mark; the tick alone watches). `fired` is forgotten once the engine
/// has fallen that far.
pub(super) fn next_mark(
    resident_bytes: u64,
    budget_bytes: u64,
    t: &nodedb_governor::PressureThresholds,
    fired: &mut Option<u64>,
) -> Option<u64> {
    let at = |f: f64| (budget_bytes as f64 * f) as u64;
    let band = at(MARK_HYSTERESIS);
    if fired.is_some_and(|f| resident_bytes.saturating_add(band) <= f) {
        *fired = None;
    }
    let marks = [t.warning, t.critical, t.emergency].map(at);
    let next = marks.into_iter().find(|&m| m > resident_bytes)?;
    if *fired == Some(next) {
        // Hovering at the mark that fired: the tick watches it, and the
        // one above stays armed for a jump past it.
        return marks.into_iter().find(|&m| m > next);
    }
    Some(next)
}
