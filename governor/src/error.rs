//! The library's error type. A refusal names the engine and the numbers, so
//! the caller can decide to spill, wait or give up, and so can a log reader.

use std::sync::Arc;

use crate::engine::EngineId;

/// The database's largest holders when a request was refused: its engines
/// by the bytes they held at that moment (reservations, and credit their
/// threads held ahead), largest first, at most [`Holders::KEPT`]. A
/// refusal's message ends with them, so whoever reads it sees who holds
/// the memory, not only that there is none. Taken under the ledger's lock
/// at the cost of a few comparisons: built-in engines are named by their
/// [`EngineId`]; the governor's table of names is shared (one reference
/// count) only when a custom engine is among them.
#[derive(Clone, Debug)]
pub struct Holders {
    names: Option<Arc<[Arc<str>]>>,
    /// Bytes, engines and their positions in the governor's names, largest
    /// first; the first `len` are set. Apart, to keep a refusal small.
    bytes: [u64; Holders::KEPT],
    ids: [EngineId; Holders::KEPT],
    at: [u8; Holders::KEPT],
    len: u8,
}

impl Default for Holders {
    /// No holder.
    fn default() -> Self {
        Self {
            names: None,
            bytes: [0; Self::KEPT],
            ids: [EngineId::Vector; Self::KEPT],
            at: [0; Self::KEPT],
            len: 0,
        }
    }
}

impl Holders {
    /// Holders kept: the largest three.
    pub const KEPT: usize = 3;

    /// The largest [`KEPT`](Self::KEPT) of the engines (their ids and the
    /// bytes they hold, in the order of `names`); those holding nothing
    /// left out.
    pub fn largest(
        names: &Arc<[Arc<str>]>,
        engines: impl IntoIterator<Item = (EngineId, u64)>,
    ) -> Self {
        let mut h = Self::default();
        let mut len = 0usize;
        for (i, (id, bytes)) in engines.into_iter().enumerate() {
            // Positions past 255 are not named (no database has as many
            // engines).
            if bytes == 0 || i >= names.len() || i > usize::from(u8::MAX) {
                continue;
            }
            let k = h.bytes[..len]
                .iter()
                .position(|&b| bytes > b)
                .unwrap_or(len);
            if k < Self::KEPT {
                // Shifted down by hand: three elements (rotate_right's
                // general path costs more than the whole refusal).
                let mut j = len.min(Self::KEPT - 1);
                while j > k {
                    h.bytes[j] = h.bytes[j - 1];
                    h.ids[j] = h.ids[j - 1];
                    h.at[j] = h.at[j - 1];
                    j -= 1;
                }
                (h.bytes[k], h.ids[k], h.at[k]) = (bytes, id, i as u8);
                len = (len + 1).min(Self::KEPT);
            }
        }
        h.len = len as u8;
        if h.ids[..len].iter().any(|id| id.builtin_name().is_none()) {
            h.names = Some(names.clone());
        }
        h
    }

    /// These engines holding these bytes (largest first), as a refusal
    /// would name them: what a test compares a refusal with.
    pub fn of(holders: &[(EngineId, u64)]) -> Self {
        let names: Arc<[Arc<str>]> = holders
            .iter()
            .map(|(e, _)| Arc::from(e.to_string()))
            .collect();
        Self::largest(&names, holders.iter().copied())
    }

    /// Name and bytes, largest first.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        let len = usize::from(self.len);
        (0..len).filter_map(move |k| {
            let name = match self.ids[k].builtin_name() {
                Some(n) => n,
                None => self.names.as_deref()?.get(usize::from(self.at[k]))?,
            };
            Some((name, self.bytes[k]))
        })
    }
}

/// Equal when they name the same engines with the same bytes, in order.
impl PartialEq for Holders {
    fn eq(&self, other: &Self) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for Holders {}

impl std::fmt::Display for Holders {
    /// "; largest holders: query 300.0 MiB, vector 12.5 MiB" (nothing
    /// when no engine holds anything).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, bytes)) in self.iter().enumerate() {
            f.write_str(if i == 0 { "; largest holders: " } else { ", " })?;
            if bytes >= 1 << 20 {
                write!(f, "{name} {:.1} MiB", bytes as f64 / f64::from(1u32 << 20))?;
            } else {
                write!(f, "{name} {bytes} bytes")?;
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    /// The engine's own cap would be exceeded.
    #[error(
        "engine {engine} refused {requested} bytes: {available} of its {limit}-byte budget available{holders}"
    )]
    BudgetExceeded {
        engine: String,
        requested: u64,
        available: u64,
        limit: u64,
        holders: Holders,
    },
    /// The global ceiling (less what other engines' floors protect) would be
    /// exceeded.
    #[error(
        "engine {engine} refused {requested} bytes: {available} bytes available under the {limit}-byte global ceiling{holders}"
    )]
    GlobalCeilingExceeded {
        engine: String,
        requested: u64,
        available: u64,
        limit: u64,
        holders: Holders,
    },
    /// The engine's share of a NUMA node would be exceeded (and, by its
    /// policy, no other node may take the request).
    #[error(
        "engine {engine} refused {requested} bytes on NUMA node {node}: {available} of its {limit}-byte share there available{holders}"
    )]
    NodeBudgetExceeded {
        engine: String,
        node: u32,
        requested: u64,
        available: u64,
        limit: u64,
        holders: Holders,
    },
    /// A NUMA node's part of the ceiling would be exceeded (and, by the
    /// engine's policy, no other node may take the request).
    #[error(
        "engine {engine} refused {requested} bytes on NUMA node {node}: {available} bytes available under the node's {limit}-byte part of the ceiling{holders}"
    )]
    NodeCeilingExceeded {
        engine: String,
        node: u32,
        requested: u64,
        available: u64,
        limit: u64,
        holders: Holders,
    },
    /// The engine is not in the budget.
    #[error("unknown engine {engine}: not in the budget")]
    UnknownEngine { engine: EngineId },
    /// The request does not fit in a 64-bit counter.
    #[error("engine {engine}: {requested} bytes on top of {current} overflows the counter")]
    SizeOverflow {
        engine: String,
        requested: u64,
        current: u64,
    },
    /// `shrink` or `split` asked for more than the reservation holds.
    #[error("engine {engine}: cannot take {requested} bytes from a reservation of {held}")]
    BeyondReservation {
        engine: String,
        requested: u64,
        held: u64,
    },
    /// A bounded wait ran out.
    #[error("engine {engine}: {requested} bytes not available within {waited_ms} ms{holders}")]
    Timeout {
        engine: String,
        requested: u64,
        waited_ms: u64,
        holders: Holders,
    },
    /// A hot set beyond the engine's hot-set bound.
    #[error(
        "engine {engine} refused a hot set of {requested} bytes: {held} bytes held under its {limit}-byte hot-set bound"
    )]
    HotSetLimit {
        engine: String,
        requested: u64,
        held: u64,
        limit: u64,
    },
    /// The kernel would not lock a hot set (nothing is charged).
    #[error("engine {engine}: locking a hot set of {requested} bytes failed: {reason}")]
    LockFailed {
        engine: String,
        requested: u64,
        reason: String,
    },
    /// A budget or limit change that would break an invariant.
    #[error("invalid budget: {field}: {reason}")]
    InvalidBudget { field: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_keep_the_largest_three_largest_first_and_say_so() {
        use EngineId::*;
        let names: Arc<[Arc<str>]> = ["vector", "ledger", "query", "wal", "crdt"]
            .into_iter()
            .map(Arc::from)
            .collect();
        let ids = [Vector, Custom(0), Query, Wal, Crdt];
        let held = |bytes: [u64; 5]| Holders::largest(&names, ids.into_iter().zip(bytes));
        let h = held([5 << 20, 0, 9 << 20, 1 << 10, 7 << 20]);
        assert_eq!(
            h.iter().collect::<Vec<_>>(),
            [("query", 9 << 20), ("crdt", 7 << 20), ("vector", 5 << 20)]
        );
        assert!(h.names.is_none(), "built-in engines need no names");
        assert_eq!(
            h.to_string(),
            "; largest holders: query 9.0 MiB, crdt 7.0 MiB, vector 5.0 MiB"
        );
        assert_eq!(
            h,
            Holders::of(&[(Query, 9 << 20), (Crdt, 7 << 20), (Vector, 5 << 20)])
        );
        // A custom engine is named by the governor's name for it.
        let custom = held([0, 512, 0, 0, 0]);
        assert_eq!(custom.to_string(), "; largest holders: ledger 512 bytes");
        assert_eq!(held([0; 5]).to_string(), "");
        // Every order of arrival gives the same three, largest first; equal
        // holdings keep the earlier engine first.
        let order = |h: &Holders| h.iter().map(|(n, b)| (n.to_owned(), b)).collect::<Vec<_>>();
        for bytes in [
            [1, 2, 3, 4, 5],
            [5, 4, 3, 2, 1],
            [3, 5, 1, 4, 2],
            [2, 1, 5, 3, 4],
        ] {
            let mut want: Vec<(String, u64)> =
                names.iter().map(|n| n.to_string()).zip(bytes).collect();
            want.sort_by_key(|&(_, b)| std::cmp::Reverse(b));
            want.truncate(Holders::KEPT);
            assert_eq!(order(&held(bytes)), want, "{bytes:?}");
        }
        assert_eq!(
            order(&held([4, 4, 0, 4, 4])),
            [
                ("vector".into(), 4),
                ("ledger".into(), 4),
                ("wal".into(), 4)
            ]
        );
    }
}
