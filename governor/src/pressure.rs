//! Pressure levels: how close an engine (or the whole process) is to its
//! limit, as a fraction of it. The thresholds can change at run time
//! through a shared [`ThresholdsHandle`]; subscribers hear every change of
//! level.

use std::sync::{
    Arc, RwLock,
    atomic::{AtomicU64, Ordering},
};

use crate::{engine::EngineId, error::MemError};

/// How close to its limit an engine or the process is. Ordered: a higher
/// level is worse. With the `serde` feature it is written as its lowercase
/// name (`"critical"`), on the control channel and in the agent's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum PressureLevel {
    /// Below the warning threshold.
    Normal,
    /// Purge idle allocator memory; lend less.
    Warning,
    /// Spill; reservations beyond the budget are refused.
    Critical,
    /// Backpressure on everything that is not essential.
    Emergency,
}

impl PressureLevel {
    /// 0 Normal, 1 Warning, 2 Critical, 3 Emergency: the level as a gauge
    /// exports it.
    pub fn index(self) -> u8 {
        self as u8
    }

    /// The lowercase name (`"warning"`), as it is written on the wire.
    pub fn name(self) -> &'static str {
        match self {
            PressureLevel::Normal => "normal",
            PressureLevel::Warning => "warning",
            PressureLevel::Critical => "critical",
            PressureLevel::Emergency => "emergency",
        }
    }
}

impl std::fmt::Display for PressureLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Fractions of a limit at which each level begins.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PressureThresholds {
    pub warning: f64,
    pub critical: f64,
    pub emergency: f64,
}

impl Default for PressureThresholds {
    /// Warning at 75% (the seed's restore point), Critical at 90% (the
    /// seed's spill point), Emergency at 97%.
    fn default() -> Self {
        Self {
            warning: 0.75,
            critical: 0.90,
            emergency: 0.97,
        }
    }
}

impl PressureThresholds {
    /// Checks `0 < warning < critical < emergency <= 1`.
    pub fn validate(&self) -> Result<(), MemError> {
        let Self {
            warning,
            critical,
            emergency,
        } = *self;
        let ordered =
            0.0 < warning && warning < critical && critical < emergency && emergency <= 1.0;
        if !ordered
            || [warning, critical, emergency]
                .iter()
                .any(|v| !v.is_finite())
        {
            return Err(MemError::InvalidBudget {
                field: "pressure thresholds".into(),
                reason: format!(
                    "need 0 < warning ({warning}) < critical ({critical}) < emergency ({emergency}) <= 1"
                ),
            });
        }
        Ok(())
    }

    /// The level of `used` out of `limit`. A zero limit with anything used
    /// is Emergency; an empty zero limit is Normal.
    pub fn level(&self, used: u64, limit: u64) -> PressureLevel {
        if limit == 0 {
            return if used == 0 {
                PressureLevel::Normal
            } else {
                PressureLevel::Emergency
            };
        }
        let f = used as f64 / limit as f64;
        if f >= self.emergency {
            PressureLevel::Emergency
        } else if f >= self.critical {
            PressureLevel::Critical
        } else if f >= self.warning {
            PressureLevel::Warning
        } else {
            PressureLevel::Normal
        }
    }
}

/// A shared, run-time changeable set of thresholds. Readers that keep a
/// copy check [`version`](Self::version), one atomic load, to see whether it
/// changed.
#[derive(Clone, Debug, Default)]
pub struct ThresholdsHandle(Arc<(RwLock<PressureThresholds>, AtomicU64)>);

impl ThresholdsHandle {
    pub fn new(t: PressureThresholds) -> Result<Self, MemError> {
        t.validate()?;
        Ok(Self(Arc::new((RwLock::new(t), AtomicU64::new(0)))))
    }

    pub fn get(&self) -> PressureThresholds {
        *self.0.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes every time the thresholds are replaced.
    pub fn version(&self) -> u64 {
        self.0.1.load(Ordering::Acquire)
    }

    /// Replaces the thresholds; an invalid set is refused and the old one
    /// stays.
    pub fn set(&self, t: PressureThresholds) -> Result<(), MemError> {
        t.validate()?;
        *self.0.0.write().unwrap_or_else(|p| p.into_inner()) = t;
        self.0.1.fetch_add(1, Ordering::Release);
        Ok(())
    }
}

/// What subscribers hear: `engine` is None for the process-wide level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PressureChange {
    pub engine: Option<EngineId>,
    pub from: PressureLevel,
    pub to: PressureLevel,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_thresholds() {
        let t = PressureThresholds::default();
        assert_eq!(t.level(0, 100), PressureLevel::Normal);
        assert_eq!(t.level(75, 100), PressureLevel::Warning);
        assert_eq!(t.level(90, 100), PressureLevel::Critical);
        assert_eq!(t.level(97, 100), PressureLevel::Emergency);
        assert_eq!(t.level(200, 100), PressureLevel::Emergency);
        assert_eq!(t.level(0, 0), PressureLevel::Normal);
        assert_eq!(t.level(1, 0), PressureLevel::Emergency);
    }

    #[test]
    fn bad_thresholds_are_refused_and_the_old_ones_kept() {
        let h = ThresholdsHandle::new(PressureThresholds::default()).unwrap();
        let bad = PressureThresholds {
            warning: 0.9,
            critical: 0.8,
            emergency: 0.95,
        };
        assert!(
            h.set(bad)
                .unwrap_err()
                .to_string()
                .contains("warning (0.9) < critical (0.8)")
        );
        assert_eq!(h.get(), PressureThresholds::default());
        let nan = PressureThresholds {
            warning: f64::NAN,
            ..PressureThresholds::default()
        };
        assert!(h.set(nan).is_err());
    }
}
