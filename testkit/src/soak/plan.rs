//! What a soak does, drawn from its seed alone: the engines, their
//! budgets and floors, the thresholds, the faults of the spill target, and
//! then one step after another. No step's parameters depend on how an
//! earlier one went (a step that picks a holding draws a number and takes
//! it modulo what the engine holds when it runs), so a seed always gives
//! the same sequence of steps; the agent's timing is the one thing a rerun
//! does not repeat.

use nodedb_governor::EngineId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

/// One engine of the soak's database.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineSpec {
    pub id: EngineId,
    /// Its name in the agent's configuration.
    pub name: String,
    pub budget: u64,
    pub floor: u64,
}

/// The pressure thresholds, as fractions of a limit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Thresholds {
    pub warning: f64,
    pub critical: f64,
    pub emergency: f64,
    pub restore: f64,
}

/// The database the soak plays, and the faults around it.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub ceiling: u64,
    pub engines: Vec<EngineSpec>,
    pub thresholds: Thresholds,
    /// At most this much memory touched without a reservation, all engines
    /// together (an engine's untracked overhead; only the kernel's
    /// attribution sees it).
    pub untracked_limit: u64,
    /// The spill target: a tmpfs of this size, which fills.
    pub spill_tmpfs_bytes: u64,
    /// Of every thousand writes to the spill target, this many fail (as
    /// Velox's fuzzer fails 2% of its spill file calls).
    pub write_failures_per_mille: u32,
}

/// A reload's new configuration.
#[derive(Clone, Debug, PartialEq)]
pub enum Reload {
    /// New budgets and floors (engine order) and a new ceiling: a valid
    /// configuration.
    Valid {
        ceiling: u64,
        budgets: Vec<(u64, u64)>,
    },
    /// A configuration the agent must refuse, keeping the one in force:
    /// a floor above its engine's budget.
    FloorAboveBudget { engine: usize },
}

/// One step of the soak. `engine` indexes [`Scenario::engines`]; `pick`
/// chooses among the engine's holdings when the step runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Reserve `bytes` and touch them.
    Reserve { engine: usize, bytes: u64 },
    /// Grow a holding's reservation by `bytes` (touching them).
    Grow {
        engine: usize,
        pick: u64,
        bytes: u64,
    },
    /// Shrink a holding by up to `bytes` (its memory with it).
    Shrink {
        engine: usize,
        pick: u64,
        bytes: u64,
    },
    /// Free a holding.
    Release { engine: usize, pick: u64 },
    /// Touch `bytes` without reserving them.
    Touch { engine: usize, bytes: u64 },
    /// Write a file of `bytes`, read it back and check it.
    FileIo { engine: usize, bytes: u64 },
    /// Read back the engine's oldest spill file, check it, delete it.
    Restore { engine: usize },
    /// A thread of the engine that starts, registers, reserves and touches
    /// `bytes`, frees them and exits.
    Thread { engine: usize, bytes: u64 },
    /// SIGKILL the agent, then start it again.
    KillAgent,
    /// Rewrite the agent's configuration and SIGHUP it.
    Reload(Reload),
    /// The library drops its link to the agent and connects again.
    Reconnect,
}

impl Step {
    /// The step's kind, as counted in the report.
    pub fn kind(&self) -> &'static str {
        match self {
            Step::Reserve { .. } => "reserve",
            Step::Grow { .. } => "grow",
            Step::Shrink { .. } => "shrink",
            Step::Release { .. } => "release",
            Step::Touch { .. } => "touch",
            Step::FileIo { .. } => "file_io",
            Step::Restore { .. } => "restore",
            Step::Thread { .. } => "thread",
            Step::KillAgent => "agent_sigkill",
            Step::Reload(Reload::Valid { .. }) => "agent_sighup",
            Step::Reload(Reload::FloorAboveBudget { .. }) => "agent_sighup_invalid",
            Step::Reconnect => "library_reconnect",
        }
    }

    /// Every kind, in the report's order.
    pub const KINDS: [&'static str; 12] = [
        "reserve",
        "grow",
        "shrink",
        "release",
        "touch",
        "file_io",
        "restore",
        "thread",
        "agent_sigkill",
        "agent_sighup",
        "agent_sighup_invalid",
        "library_reconnect",
    ];
}

/// The seed's scenario and its endless sequence of steps.
pub struct Plan {
    pub seed: u64,
    pub scenario: Scenario,
    rng: ChaCha8Rng,
}

/// The engines a soak draws from, by their names in the configuration.
const ENGINES: [(EngineId, &str); 6] = [
    (EngineId::Vector, "vector"),
    (EngineId::Sparse, "sparse"),
    (EngineId::Crdt, "crdt"),
    (EngineId::Timeseries, "timeseries"),
    (EngineId::Query, "query"),
    (EngineId::Wal, "wal"),
];

fn pages(bytes: u64) -> u64 {
    (bytes / PAGE).max(1) * PAGE
}

/// Log-uniform in `lo..=hi` (small sizes as often as large ones), whole
/// pages.
fn size(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> u64 {
    let (lo, hi) = (lo.max(PAGE) as f64, hi.max(lo.max(PAGE)) as f64);
    pages((lo.ln() + rng.random::<f64>() * (hi.ln() - lo.ln())).exp() as u64)
}

/// Budgets and floors for `n` engines under `ceiling`: each budget 15% to
/// 60% of the ceiling (so that together they ask 0.3 to 3.6 times it),
/// each floor up to half its budget, the floors together at most 80% of
/// the ceiling.
fn budgets(rng: &mut ChaCha8Rng, n: usize, ceiling: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = (0..n)
        .map(|_| {
            let budget = pages((ceiling as f64 * rng.random_range(0.15..0.6)) as u64);
            let floor = pages((budget as f64 * rng.random_range(0.0..0.5)) as u64);
            (budget, floor)
        })
        .collect();
    let floors: u64 = v.iter().map(|b| b.1).sum();
    let most = ceiling / 10 * 8;
    if floors > most {
        for b in &mut v {
            b.1 = pages((b.1 as u128 * most as u128 / floors as u128) as u64);
        }
    }
    v
}

impl Plan {
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ceiling = pages(rng.random_range(192 * MIB..=448 * MIB));
        let n = rng.random_range(2..=6);
        let mut pool: Vec<(EngineId, &str)> = ENGINES.to_vec();
        let mut chosen = Vec::with_capacity(n);
        for _ in 0..n {
            chosen.push(pool.remove(rng.random_range(0..pool.len())));
        }
        let engines = chosen
            .into_iter()
            .zip(budgets(&mut rng, n, ceiling))
            .map(|((id, name), (budget, floor))| EngineSpec {
                id,
                name: name.to_owned(),
                budget,
                floor,
            })
            .collect();
        let warning: f64 = rng.random_range(0.60..0.85);
        let critical = warning + rng.random_range(0.04..0.08);
        let emergency: f64 = (critical + rng.random_range(0.02..0.06)).min(0.99);
        let restore = rng.random_range(0.5..warning);
        let scenario = Scenario {
            ceiling,
            engines,
            thresholds: Thresholds {
                warning,
                critical,
                emergency,
                restore,
            },
            untracked_limit: ceiling / 4,
            spill_tmpfs_bytes: pages(rng.random_range(16 * MIB..=64 * MIB)),
            write_failures_per_mille: 20,
        };
        Self {
            seed,
            scenario,
            rng,
        }
    }

    /// The next step.
    pub fn next_step(&mut self) -> Step {
        let rng = &mut self.rng;
        let s = &self.scenario;
        let engine = rng.random_range(0..s.engines.len());
        let big = s.ceiling / 6;
        // Out of 10,000: the agent's events about once per 300 to 600
        // steps each (a restart costs seconds: the programs load again).
        let roll = rng.random_range(0..10_000u32);
        match roll {
            0..3_000 => Step::Reserve {
                engine,
                bytes: size(rng, 64 << 10, big),
            },
            3_000..4_000 => Step::Grow {
                engine,
                pick: rng.random(),
                bytes: size(rng, 64 << 10, big / 2),
            },
            4_000..4_800 => Step::Shrink {
                engine,
                pick: rng.random(),
                bytes: size(rng, 64 << 10, big / 2),
            },
            4_800..7_000 => Step::Release {
                engine,
                pick: rng.random(),
            },
            7_000..7_700 => Step::Touch {
                engine,
                bytes: size(rng, 64 << 10, s.ceiling / 16),
            },
            7_700..8_400 => Step::FileIo {
                engine,
                bytes: size(rng, 64 << 10, 8 * MIB),
            },
            8_400..9_000 => Step::Restore { engine },
            9_000..9_940 => Step::Thread {
                engine,
                bytes: size(rng, 64 << 10, big / 2),
            },
            9_940..9_958 => Step::KillAgent,
            9_958..9_980 => {
                if rng.random_range(0..4) == 0 {
                    Step::Reload(Reload::FloorAboveBudget { engine })
                } else {
                    let ceiling = pages(
                        (s.ceiling as f64 * rng.random_range(0.8..1.2)).max(160.0 * MIB as f64)
                            as u64,
                    );
                    let budgets = budgets(rng, s.engines.len(), ceiling);
                    Step::Reload(Reload::Valid { ceiling, budgets })
                }
            }
            _ => Step::Reconnect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_scenario_and_steps_and_another_seed_others() {
        let steps = |seed| {
            let mut p = Plan::new(seed);
            let v: Vec<Step> = (0..2_000).map(|_| p.next_step()).collect();
            (p.scenario, v)
        };
        assert_eq!(steps(7), steps(7));
        assert_ne!(steps(7).1, steps(8).1);
    }

    #[test]
    fn scenarios_stay_in_their_bounds_and_every_kind_of_step_comes_up() {
        let mut kinds = std::collections::BTreeSet::new();
        let mut engine_counts = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let mut p = Plan::new(seed);
            let s = p.scenario.clone();
            engine_counts.insert(s.engines.len());
            assert!((2..=6).contains(&s.engines.len()));
            let floors: u64 = s.engines.iter().map(|e| e.floor).sum();
            assert!(floors <= s.ceiling, "seed {seed}: floors {floors}");
            for e in &s.engines {
                assert!(
                    e.floor <= e.budget && e.budget <= s.ceiling,
                    "seed {seed}: {e:?}"
                );
                assert!(e.budget > 0);
            }
            let names: std::collections::BTreeSet<_> = s.engines.iter().map(|e| &e.name).collect();
            assert_eq!(names.len(), s.engines.len(), "seed {seed}: an engine twice");
            let t = s.thresholds;
            assert!(
                0.0 < t.restore
                    && t.restore < t.critical
                    && t.warning < t.critical
                    && t.critical < t.emergency
                    && t.emergency <= 1.0,
                "seed {seed}: {t:?}"
            );
            for _ in 0..1_000 {
                let step = p.next_step();
                kinds.insert(step.kind());
                if let Step::Reload(Reload::Valid { ceiling, budgets }) = &step {
                    assert!(budgets.iter().map(|b| b.1).sum::<u64>() <= *ceiling);
                    assert!(budgets.iter().all(|b| b.1 <= b.0 && b.0 <= *ceiling));
                }
            }
        }
        assert_eq!(kinds.len(), Step::KINDS.len(), "{kinds:?}");
        assert_eq!(engine_counts.len(), 5, "2 to 6 engines: {engine_counts:?}");
    }
}
