//! Budgets: a global ceiling, and per engine a guaranteed floor and a cap.
//!
//! The space above the floors (ceiling minus the sum of floors) is a pool
//! any engine may draw from, up to its cap. An engine's floor is kept free
//! for it while it is not using it, and is never lent; caps move between
//! engines by loans (see [`crate::lending`] and
//! [`MemoryGovernor::rebalance`](crate::MemoryGovernor::rebalance)).

use std::{collections::BTreeSet, sync::Arc};

use crate::{
    engine::EngineId,
    error::MemError,
    numa::{NumaPolicy, Topology},
};

/// One engine's share of the budget.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineBudget {
    pub id: EngineId,
    pub name: Arc<str>,
    /// Guaranteed to the engine: other engines cannot take it, and it is
    /// never lent.
    pub floor_bytes: u64,
    /// The engine never holds more than this through reservations (loans
    /// move it while they last).
    pub cap_bytes: u64,
    /// How its reservations use the NUMA nodes (with [`Budget::numa`]).
    pub numa_policy: NumaPolicy,
    /// Its cap's split across the nodes, as weights (one per node, in the
    /// topology's order); None: the nodes' own weights.
    pub node_weights: Option<Vec<u64>>,
}

/// The ceiling's split across NUMA nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaBudget {
    pub topology: Topology,
    /// One weight per node (in the topology's order): node `n`'s part of
    /// the ceiling is `ceiling * w(n) / sum(w)`.
    pub node_weights: Vec<u64>,
}

/// The whole budget. Built and validated by [`BudgetBuilder`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Budget {
    pub ceiling_bytes: u64,
    pub engines: Vec<EngineBudget>,
    /// Split across NUMA nodes; None: one node, as if NUMA did not exist.
    pub numa: Option<NumaBudget>,
}

/// Builds a [`Budget`]; `build` refuses it whole, naming the field, if any
/// part is inconsistent.
#[derive(Clone, Debug)]
pub struct BudgetBuilder {
    ceiling_bytes: u64,
    engines: Vec<EngineBudget>,
    next_custom: u16,
    numa: Option<NumaBudget>,
    /// Per-engine NUMA settings for engines not added yet, or unknown.
    engine_numa: Vec<(EngineId, NumaPolicy, Option<Vec<u64>>)>,
}

impl Budget {
    /// Starts a budget with a global ceiling.
    pub fn builder(ceiling_bytes: u64) -> BudgetBuilder {
        BudgetBuilder {
            ceiling_bytes,
            engines: Vec::new(),
            next_custom: 0,
            numa: None,
            engine_numa: Vec::new(),
        }
    }
}

impl BudgetBuilder {
    /// Adds a built-in engine.
    pub fn engine(mut self, id: EngineId, floor_bytes: u64, cap_bytes: u64) -> Self {
        let name: Arc<str> = match id.builtin_name() {
            Some(n) => n.into(),
            None => id.to_string().into(),
        };
        self.engines.push(EngineBudget {
            id,
            name,
            floor_bytes,
            cap_bytes,
            numa_policy: NumaPolicy::default(),
            node_weights: None,
        });
        self
    }

    /// Splits the ceiling across `topology`'s nodes by their memory.
    pub fn numa(self, topology: Topology) -> Self {
        let weights = topology.nodes().iter().map(|n| n.memory_bytes).collect();
        self.numa_weights(topology, weights)
    }

    /// Splits the ceiling across `topology`'s nodes by `weights` (one per
    /// node, in its order: bytes, or any proportion).
    pub fn numa_weights(mut self, topology: Topology, weights: Vec<u64>) -> Self {
        self.numa = Some(NumaBudget {
            topology,
            node_weights: weights,
        });
        self
    }

    /// Sets `engine`'s NUMA policy and, optionally, its cap's split across
    /// the nodes (one weight per node; None: the nodes' weights).
    pub fn engine_numa(
        mut self,
        engine: EngineId,
        policy: NumaPolicy,
        node_weights: Option<Vec<u64>>,
    ) -> Self {
        self.engine_numa.push((engine, policy, node_weights));
        self
    }

    /// Adds an engine defined by name; it gets the next `EngineId::Custom`.
    /// A built-in engine's name maps to the built-in id.
    pub fn named(mut self, name: &str, floor_bytes: u64, cap_bytes: u64) -> Self {
        let id = EngineId::builtin(name).unwrap_or_else(|| {
            let id = EngineId::Custom(self.next_custom);
            self.next_custom += 1;
            id
        });
        self.engines.push(EngineBudget {
            id,
            name: name.into(),
            floor_bytes,
            cap_bytes,
            numa_policy: NumaPolicy::default(),
            node_weights: None,
        });
        self
    }

    pub fn build(mut self) -> Result<Budget, MemError> {
        let bad = |field: String, reason: String| MemError::InvalidBudget { field, reason };
        if self.ceiling_bytes == 0 {
            return Err(bad("ceiling_bytes".into(), "must be positive".into()));
        }
        if self.engines.is_empty() {
            return Err(bad(
                "engines".into(),
                "at least one engine is required".into(),
            ));
        }
        let mut ids = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut floors: u64 = 0;
        for e in &self.engines {
            let field = |f: &str| format!("engine {}.{f}", e.name);
            if e.name.is_empty() {
                return Err(bad("engine name".into(), "must not be empty".into()));
            }
            if !ids.insert(e.id) || !names.insert(e.name.clone()) {
                return Err(bad(field("name"), "engine appears twice".into()));
            }
            if e.floor_bytes > e.cap_bytes {
                return Err(bad(
                    field("floor_bytes"),
                    format!("{} is above the cap {}", e.floor_bytes, e.cap_bytes),
                ));
            }
            if e.cap_bytes > self.ceiling_bytes {
                return Err(bad(
                    field("cap_bytes"),
                    format!(
                        "{} is above the ceiling {}",
                        e.cap_bytes, self.ceiling_bytes
                    ),
                ));
            }
            floors = floors.saturating_add(e.floor_bytes);
        }
        if floors > self.ceiling_bytes {
            return Err(bad(
                "floors".into(),
                format!(
                    "they add up to {floors}, above the ceiling {}",
                    self.ceiling_bytes
                ),
            ));
        }
        for (id, policy, weights) in std::mem::take(&mut self.engine_numa) {
            let Some(e) = self.engines.iter_mut().find(|e| e.id == id) else {
                return Err(bad(
                    format!("engine {id}.numa"),
                    "the engine is not in the budget".into(),
                ));
            };
            e.numa_policy = policy;
            e.node_weights = weights;
        }
        let nodes = self.numa.as_ref().map_or(1, |n| n.topology.nodes().len());
        let check_weights = |field: String, w: &[u64]| {
            if w.len() != nodes {
                return Err(bad(field, format!("{} weights for {nodes} nodes", w.len())));
            }
            if w.iter()
                .try_fold(0u64, |a, x| a.checked_add(*x))
                .is_none_or(|s| s == 0)
            {
                return Err(bad(
                    field,
                    "they must add up to a positive 64-bit number".into(),
                ));
            }
            Ok(())
        };
        if let Some(numa) = &self.numa {
            check_weights("numa.node_weights".into(), &numa.node_weights)?;
        }
        for e in &self.engines {
            if let Some(w) = &e.node_weights {
                if self.numa.is_none() {
                    return Err(bad(
                        format!("engine {}.node_weights", e.name),
                        "the budget is not split across NUMA nodes".into(),
                    ));
                }
                check_weights(format!("engine {}.node_weights", e.name), w)?;
            }
        }
        Ok(Budget {
            ceiling_bytes: self.ceiling_bytes,
            engines: self.engines,
            numa: self.numa,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_inconsistency_is_refused_naming_the_field() {
        let ok = Budget::builder(100)
            .engine(EngineId::Vector, 10, 50)
            .named("graph", 20, 60);
        let b = ok.clone().build().expect("valid");
        assert_eq!(b.engines[1].id, EngineId::Custom(0));
        let cases = [
            (
                Budget::builder(0).engine(EngineId::Vector, 0, 0),
                "ceiling_bytes",
            ),
            (Budget::builder(100), "engines"),
            (
                Budget::builder(100).engine(EngineId::Vector, 60, 50),
                "vector.floor_bytes",
            ),
            (
                Budget::builder(100).engine(EngineId::Vector, 0, 150),
                "vector.cap_bytes",
            ),
            (
                Budget::builder(100)
                    .engine(EngineId::Vector, 60, 60)
                    .engine(EngineId::Query, 50, 60),
                "floors",
            ),
            (ok.named("graph", 0, 1), "graph.name"),
            (Budget::builder(100).named("", 0, 1), "engine name"),
        ];
        for (builder, field) in cases {
            let e = builder.build().expect_err(field).to_string();
            assert!(e.contains(field), "{e:?} should name {field}");
        }
    }
}
