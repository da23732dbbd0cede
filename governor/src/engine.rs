//! Engine identity: the seed's engines plus engines named at configuration
//! time.

use std::fmt;

/// An engine of the database. The seed's engines are variants; engines
/// defined by name at configuration time are `Custom(n)`, numbered in the
/// order the [`Budget`](crate::Budget) declares them. `Copy` and two bytes
/// wide, so the reservation path passes it around for free.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EngineId {
    Vector,
    Sparse,
    Crdt,
    Timeseries,
    Query,
    Wal,
    Bridge,
    Custom(u16),
}

impl EngineId {
    /// The seed's engines.
    pub const BUILTIN: [EngineId; 7] = [
        EngineId::Vector,
        EngineId::Sparse,
        EngineId::Crdt,
        EngineId::Timeseries,
        EngineId::Query,
        EngineId::Wal,
        EngineId::Bridge,
    ];

    /// Dense index: built-ins first, then custom engines.
    pub const fn index(self) -> usize {
        match self {
            EngineId::Vector => 0,
            EngineId::Sparse => 1,
            EngineId::Crdt => 2,
            EngineId::Timeseries => 3,
            EngineId::Query => 4,
            EngineId::Wal => 5,
            EngineId::Bridge => 6,
            EngineId::Custom(n) => 7 + n as usize,
        }
    }

    /// The lower-case name of a built-in engine.
    pub const fn builtin_name(self) -> Option<&'static str> {
        Some(match self {
            EngineId::Vector => "vector",
            EngineId::Sparse => "sparse",
            EngineId::Crdt => "crdt",
            EngineId::Timeseries => "timeseries",
            EngineId::Query => "query",
            EngineId::Wal => "wal",
            EngineId::Bridge => "bridge",
            EngineId::Custom(_) => return None,
        })
    }

    /// The built-in engine called `name`.
    pub fn builtin(name: &str) -> Option<EngineId> {
        Self::BUILTIN
            .into_iter()
            .find(|e| e.builtin_name() == Some(name))
    }
}

impl fmt::Display for EngineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.builtin_name() {
            Some(name) => f.write_str(name),
            None => write!(f, "custom#{}", self.index() - 7),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_are_dense_and_names_round_trip() {
        for (i, e) in EngineId::BUILTIN.into_iter().enumerate() {
            assert_eq!(e.index(), i);
            assert_eq!(EngineId::builtin(e.builtin_name().unwrap()), Some(e));
        }
        assert_eq!(EngineId::Custom(0).index(), 7);
        assert_eq!(EngineId::Custom(3).to_string(), "custom#3");
        assert_eq!(EngineId::builtin("nope"), None);
    }
}
