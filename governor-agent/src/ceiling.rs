//! The database's memory ceiling, enforced by the kernel on its domain
//! cgroup:
//! * cgroup v2 with the memory controller: `memory.max` at the ceiling and
//!   `memory.high` below it (at the Critical threshold), so the kernel
//!   throttles and reclaims before anything is killed;
//! * hosts whose memory controller is on cgroup v1 (hybrid hierarchies):
//!   a `<v1 memory>/<database>` cgroup with `memory.limit_in_bytes` at the
//!   ceiling and `memory.soft_limit_in_bytes` at the high mark. The status
//!   says which one is in force.
//!
//! Engines that run as processes of their own get a domain cgroup each
//! under the database's, with their own high mark at the engine's budget:
//! v2 `<database>/proc-<engine>/memory.high` (the memory controller is
//! enabled on the database's cgroup for them), v1
//! `<v1 memory>/<database>/proc-<engine>/memory.soft_limit_in_bytes`.
//!
//! In Emergency the high mark is lowered to force reclaim (v2; on v1 the
//! soft limit only acts under global pressure, and is reported as such),
//! and restored when the pressure is gone. The charge is read every tick
//! (`usage`), and `memory.stat` with it unless a read of it 100 ms old
//! still holds (see `StatMemo`); `memory.events` (v2) or
//! `memory.failcnt` / `memory.oom_control` (v1) when the status is built.

use std::{
    fs::{self, File},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::Mutex,
};

use serde::{Deserialize, Serialize};

use super::error::AgentError;

/// Which kernel interface enforces the ceiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    CgroupV2,
    CgroupV1,
}

/// Counters of the ceiling's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeilingEvents {
    /// v2 `high` (throttled above memory.high); v1: 0.
    pub high: u64,
    /// v2 `max` (hit memory.max); v1 `memory.failcnt`.
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
}

/// The ceiling as the kernel enforces it now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CeilingStatus {
    pub backend: Backend,
    pub cgroup: String,
    pub limit_bytes: u64,
    pub high_bytes: u64,
    pub current_bytes: u64,
    /// The charge less the file pages the kernel can drop first (inactive
    /// page cache: written-out spills, read-once files), as the kernel's
    /// own reclaim sees it. What the Emergency is judged on.
    #[serde(default)]
    pub working_set_bytes: u64,
    pub events: CeilingEvents,
    /// Writes of the ceiling or the high mark since the agent started.
    #[serde(default)]
    pub limit_changes: u64,
    /// Engines that run as processes of their own, by name.
    #[serde(default)]
    pub engines: std::collections::BTreeMap<String, EngineDomainStatus>,
    /// `memory.low` of the database's cgroup (v2): the engines' hot sets,
    /// which reclaim from outside the database leaves alone.
    #[serde(default)]
    pub protected_bytes: Option<u64>,
    /// Why nothing is protected that way (cgroup v1 has no `memory.low`).
    #[serde(default)]
    pub protection_note: Option<String>,
}

/// The domain cgroup of an engine that runs as a process of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineDomainStatus {
    pub cgroup: String,
    /// memory.high (v2) or the soft limit (v1): the engine's budget.
    pub high_bytes: u64,
    pub current_bytes: u64,
}

/// The ceiling the agent enforces.
#[derive(Debug)]
pub struct Ceiling {
    backend: Backend,
    dir: PathBuf,
    limit: u64,
    high: u64,
    /// The high mark now (lowered in Emergency).
    high_now: u64,
    limit_changes: u64,
    /// Own-process engines: their cgroup (where the high mark is written)
    /// and the mark.
    engines: std::collections::BTreeMap<String, (PathBuf, u64)>,
    /// `memory.low` written (v2), or why not.
    protection: Result<u64, String>,
    /// The two files read at every tick, opened at the first (and again
    /// after a read fails).
    usage_files: Mutex<Option<UsageFiles>>,
    /// The last `memory.stat` read, while it still holds.
    stat_memo: Mutex<Option<StatMemo>>,
}

/// A `memory.stat` read and the charge it went with. Reading the file
/// costs far more than the charge (every counter of the subtree; on
/// cgroup v2 it first flushes the memory controller's per-CPU statistics),
/// and at the busy tick it was the agent's largest cost (a tenth of its
/// time on the host, more under emulation). So it is read again only when
/// the last read is `STAT_EVERY` old, or the charge moved by 1/128 of the
/// ceiling since, or the charge is within an eighth of the ceiling of the
/// high mark (where the ladder decides and the kernel throttles: exact
/// figures there). Between reads the figures are estimated upward: growth
/// of the charge is counted as held memory and as working set, a fall is
/// counted as page cache dropped, never as held memory freed; so an
/// estimate never shows less pressure than there is, and errs by at most
/// 1/128 of the ceiling for at most `STAT_EVERY`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StatMemo {
    at: std::time::Instant,
    charge: u64,
    inactive_file: u64,
    held: u64,
}

/// How long a `memory.stat` read holds (at the 20 ms busy tick: one read
/// in five ticks while the charge holds still far from the high mark).
const STAT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl StatMemo {
    /// The inactive file pages and held bytes at charge `charge`, estimated
    /// from this read; `None` when the file must be read again.
    fn estimate(
        &self,
        now: std::time::Instant,
        charge: u64,
        limit: u64,
        high: u64,
    ) -> Option<(u64, u64)> {
        let holds = now.saturating_duration_since(self.at) < STAT_EVERY
            && charge.abs_diff(self.charge) < limit / 128
            && charge.saturating_add(limit / 8) < high;
        holds.then(|| {
            (
                self.inactive_file
                    .saturating_sub(self.charge.saturating_sub(charge)),
                self.held
                    .saturating_add(charge.saturating_sub(self.charge))
                    .min(charge),
            )
        })
    }
}

/// The charge and `memory.stat`, kept open: a kernfs file read again from
/// offset 0 is generated afresh, and opening one (a path walk through
/// cgroupfs and the security hooks) cost more than reading it.
#[derive(Debug)]
struct UsageFiles {
    current: File,
    stat: File,
}

/// A file's whole text, read from its start with `pread` (no open).
fn reread(f: &File) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(len * 2, 0);
        }
        let n = f.read_at(&mut buf[len..], len as u64).ok()?;
        if n == 0 {
            break;
        }
        len += n;
    }
    buf.truncate(len);
    String::from_utf8(buf).ok()
}

fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    if s == "max" {
        return Some(u64::MAX);
    }
    s.parse().ok()
}

fn write(path: &Path, value: &str) -> Result<(), AgentError> {
    fs::write(path, value)
        .map_err(|e| AgentError::io(format!("writing {value:?} to {}", path.display()), e))
}

fn read_u64(path: &Path) -> Option<u64> {
    parse_u64(&fs::read_to_string(path).ok()?)
}

/// `key`'s value in a flat-keyed cgroup file's text (`key value` lines:
/// memory.events, memory.oom_control, memory.stat; 0 if absent).
fn keyed_in(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}

impl Ceiling {
    /// Sets the ceiling up on the database's domain cgroup `v2_dir` (v2
    /// with the memory controller), else on a v1 memory cgroup of the same
    /// name. `high` is the throttling mark below `limit`.
    pub fn setup(
        v2_dir: Option<&Path>,
        database: &str,
        limit: u64,
        high: u64,
    ) -> Result<Self, AgentError> {
        let (backend, dir) = crate::cgroup::controller_dir(v2_dir, database, "memory")?;
        match backend {
            Backend::CgroupV2 => {
                write(&dir.join("memory.max"), &limit.to_string())?;
                write(&dir.join("memory.high"), &high.to_string())?;
            }
            Backend::CgroupV1 => {
                write(&dir.join("memory.limit_in_bytes"), &limit.to_string())?;
                write(&dir.join("memory.soft_limit_in_bytes"), &high.to_string())?;
            }
        }
        Ok(Self {
            backend,
            dir,
            limit,
            high,
            high_now: high,
            limit_changes: 0,
            engines: Default::default(),
            protection: Ok(0),
            usage_files: Mutex::new(None),
            stat_memo: Mutex::new(None),
        })
    }

    /// Protects `bytes` of the database's memory from reclaim caused
    /// outside it: v2 `memory.low` (best effort: the kernel reclaims from
    /// below it only when nothing else is left). On v1, which has no such
    /// knob, nothing is written and the status says so; the hot sets are
    /// still held by their locks.
    pub fn set_protected(&mut self, bytes: u64) -> Result<(), AgentError> {
        match self.backend {
            Backend::CgroupV2 => {
                write(&self.dir.join("memory.low"), &bytes.to_string())?;
                self.protection = Ok(bytes);
            }
            Backend::CgroupV1 => {
                self.protection = Err(if bytes == 0 {
                    "no hot sets configured".to_owned()
                } else {
                    format!(
                        "{bytes} bytes of hot sets not protected from outside reclaim: cgroup v1 has no memory.low (the hot sets' locks still hold them)"
                    )
                });
            }
        }
        Ok(())
    }

    /// Changes the ceiling and the high mark (a configuration reload).
    /// A ceiling below what the cgroup holds is refused by the kernel
    /// (v1: EBUSY), and then nothing changes.
    pub fn set_limit(&mut self, limit: u64, high: u64) -> Result<(), AgentError> {
        let (max_file, high_file) = match self.backend {
            Backend::CgroupV2 => ("memory.max", "memory.high"),
            Backend::CgroupV1 => ("memory.limit_in_bytes", "memory.soft_limit_in_bytes"),
        };
        write(&self.dir.join(max_file), &limit.to_string())?;
        write(&self.dir.join(high_file), &high.to_string())?;
        tracing::info!(cgroup = %self.dir.display(), limit, high, "ceiling changed");
        self.limit = limit;
        self.high = high;
        self.high_now = high;
        self.limit_changes += 1;
        Ok(())
    }

    /// Sets up the domain cgroup of an engine that runs as a process of its
    /// own, with its high mark at `high` (its budget). On v2 that is
    /// `v2_dir` (made by the subtree), with the memory controller enabled
    /// for the database's children; on v1 a `proc-<engine>` child of the
    /// ceiling's cgroup.
    pub fn setup_engine(
        &mut self,
        engine: &str,
        v2_dir: Option<&Path>,
        high: u64,
    ) -> Result<(), AgentError> {
        let dir = match self.backend {
            Backend::CgroupV2 => {
                let dir = v2_dir.ok_or_else(|| AgentError::CgroupUnusable {
                    path: self.dir.clone(),
                    reason: format!("no cgroup for engine {engine}"),
                })?;
                let enabled = fs::read_to_string(self.dir.join("cgroup.subtree_control"))
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"));
                if !enabled {
                    write(&self.dir.join("cgroup.subtree_control"), "+memory")?;
                }
                dir.to_owned()
            }
            Backend::CgroupV1 => {
                let dir = self.dir.join(format!("proc-{engine}"));
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(AgentError::io(format!("creating {}", dir.display()), e)),
                }
                dir
            }
        };
        self.engines.insert(engine.to_owned(), (dir, u64::MAX));
        self.set_engine_high(engine, high)
    }

    /// Changes an own-process engine's high mark (a reload).
    pub fn set_engine_high(&mut self, engine: &str, high: u64) -> Result<(), AgentError> {
        let file = match self.backend {
            Backend::CgroupV2 => "memory.high",
            Backend::CgroupV1 => "memory.soft_limit_in_bytes",
        };
        let Some((dir, now)) = self.engines.get_mut(engine) else {
            return Ok(());
        };
        if *now == high {
            return Ok(());
        }
        write(&dir.join(file), &high.to_string())?;
        tracing::info!(engine, cgroup = %dir.display(), high, "engine high mark set");
        *now = high;
        self.limit_changes += 1;
        Ok(())
    }

    /// Puts a process of an own-process engine under the engine's cgroup
    /// (v1; on v2 the subtree has put it there).
    pub fn adopt_engine(&self, pid: u32, engine: &str) -> Result<(), AgentError> {
        if self.backend == Backend::CgroupV1
            && let Some((dir, _)) = self.engines.get(engine)
        {
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Puts a process under the ceiling (v1: its own hierarchy; on v2 the
    /// process is in the domain cgroup already).
    pub fn adopt(&self, pid: u32) -> Result<(), AgentError> {
        if self.backend == Backend::CgroupV1 {
            write(&self.dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Lowers the high mark to `bytes` (Emergency: force reclaim), or
    /// restores the configured one (None).
    pub fn set_high(&mut self, bytes: Option<u64>) -> Result<(), AgentError> {
        let want = bytes.unwrap_or(self.high).min(self.high);
        if want == self.high_now {
            return Ok(());
        }
        let file = match self.backend {
            Backend::CgroupV2 => "memory.high",
            Backend::CgroupV1 => "memory.soft_limit_in_bytes",
        };
        write(&self.dir.join(file), &want.to_string())?;
        tracing::info!(cgroup = %self.dir.display(), from = self.high_now, to = want, "memory high mark changed");
        self.high_now = want;
        self.limit_changes += 1;
        Ok(())
    }

    /// The `memory.stat` keys of what the kernel cannot drop: anonymous
    /// and shared memory (v1 keeps the hierarchical figure under `total_`).
    fn held_keys(&self) -> [&'static str; 2] {
        match self.backend {
            Backend::CgroupV2 => ["anon", "shmem"],
            Backend::CgroupV1 => ["total_rss", "total_shmem"],
        }
    }

    /// Where a library reads what the database holds when its room runs
    /// short: the figure `usage` gives the policy (`held_bytes`), from the
    /// same file.
    pub fn held_from(&self) -> nodedb_governor::control::wire::HeldFrom {
        nodedb_governor::control::wire::HeldFrom {
            stat: self.dir.join("memory.stat").display().to_string(),
            keys: self.held_keys().map(String::from).to_vec(),
        }
    }

    /// What the policy needs at every tick: the charge and the working
    /// set (two files; the events and the engines' domains are read for
    /// the status only).
    pub fn usage(&self) -> crate::policy::CeilingUse {
        let (current, inactive) = match self.backend {
            Backend::CgroupV2 => ("memory.current", "inactive_file"),
            // v1 keeps the hierarchical figure under `total_`.
            Backend::CgroupV1 => ("memory.usage_in_bytes", "total_inactive_file"),
        };
        let [anon, shmem] = self.held_keys();
        let (current_path, stat_path) = (self.dir.join(current), self.dir.join("memory.stat"));
        let mut files = self.usage_files.lock().unwrap_or_else(|p| p.into_inner());
        if files.is_none() {
            *files = File::open(&current_path)
                .and_then(|current| {
                    Ok(UsageFiles {
                        current,
                        stat: File::open(&stat_path)?,
                    })
                })
                .ok();
        }
        let current_text = match files.as_ref().and_then(|f| reread(&f.current)) {
            Some(text) => text,
            None => {
                // Opened again at the next tick; read by path this time.
                *files = None;
                fs::read_to_string(&current_path).unwrap_or_default()
            }
        };
        let current = parse_u64(&current_text).unwrap_or(0);
        let now = std::time::Instant::now();
        let mut memo = self.stat_memo.lock().unwrap_or_else(|p| p.into_inner());
        let estimate = memo.and_then(|m| m.estimate(now, current, self.limit, self.high_now));
        let (inactive_file, held) = match estimate {
            Some(figures) => figures,
            None => {
                let stat_text = match files.as_ref().and_then(|f| reread(&f.stat)) {
                    Some(text) => text,
                    None => {
                        *files = None;
                        fs::read_to_string(&stat_path).unwrap_or_default()
                    }
                };
                let inactive_file = keyed_in(&stat_text, inactive);
                let held = keyed_in(&stat_text, anon) + keyed_in(&stat_text, shmem);
                *memo = Some(StatMemo {
                    at: now,
                    charge: current,
                    inactive_file,
                    held,
                });
                (inactive_file, held)
            }
        };
        crate::policy::CeilingUse {
            working_set_bytes: current.saturating_sub(inactive_file),
            charge_bytes: current,
            held_bytes: held,
            limit_bytes: self.limit,
            throttle_bytes: (self.backend == Backend::CgroupV2).then_some(self.high),
        }
    }

    pub fn status(&self) -> CeilingStatus {
        let d = &self.dir;
        // Each events file read once.
        let events = match self.backend {
            Backend::CgroupV2 => {
                let ev = fs::read_to_string(d.join("memory.events")).unwrap_or_default();
                CeilingEvents {
                    high: keyed_in(&ev, "high"),
                    max: keyed_in(&ev, "max"),
                    oom: keyed_in(&ev, "oom"),
                    oom_kill: keyed_in(&ev, "oom_kill"),
                }
            }
            Backend::CgroupV1 => {
                let oom = fs::read_to_string(d.join("memory.oom_control")).unwrap_or_default();
                CeilingEvents {
                    high: 0,
                    max: read_u64(&d.join("memory.failcnt")).unwrap_or(0),
                    oom: keyed_in(&oom, "under_oom"),
                    oom_kill: keyed_in(&oom, "oom_kill"),
                }
            }
        };
        let usage = self.usage();
        CeilingStatus {
            backend: self.backend,
            cgroup: d.display().to_string(),
            limit_bytes: self.limit,
            high_bytes: self.high_now,
            current_bytes: usage.charge_bytes,
            working_set_bytes: usage.working_set_bytes,
            events,
            limit_changes: self.limit_changes,
            protected_bytes: self.protection.as_ref().ok().copied(),
            protection_note: self.protection.as_ref().err().cloned(),
            engines: self
                .engines
                .iter()
                .map(|(name, (dir, high))| {
                    let current = match self.backend {
                        Backend::CgroupV2 => read_u64(&dir.join("memory.current")),
                        Backend::CgroupV1 => read_u64(&dir.join("memory.usage_in_bytes")),
                    };
                    (
                        name.clone(),
                        EngineDomainStatus {
                            cgroup: dir.display().to_string(),
                            high_bytes: *high,
                            current_bytes: current.unwrap_or(0),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Removes the v1 cgroups the agent made (when they are empty).
    pub fn remove(&self) {
        if self.backend == Backend::CgroupV1 {
            for (dir, _) in self.engines.values() {
                let _ = fs::remove_dir(dir);
            }
            let _ = fs::remove_dir(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    const MIB: u64 = 1 << 20;
    const LIMIT: u64 = 1024 * MIB;
    const HIGH: u64 = 922 * MIB;

    fn read_at(at: Instant) -> StatMemo {
        StatMemo {
            at,
            charge: 500 * MIB,
            inactive_file: 100 * MIB,
            held: 380 * MIB,
        }
    }

    #[test]
    fn a_stat_read_holds_for_a_short_while_and_a_small_move_of_the_charge() {
        let t = Instant::now();
        let m = read_at(t);
        // The same charge 60 ms later: the read's own figures.
        assert_eq!(
            m.estimate(t + Duration::from_millis(60), 500 * MIB, LIMIT, HIGH),
            Some((100 * MIB, 380 * MIB))
        );
        // Read again once STAT_EVERY has passed...
        assert_eq!(m.estimate(t + STAT_EVERY, 500 * MIB, LIMIT, HIGH), None);
        // ... or the charge moved by 1/128 of the ceiling (8 MiB here),
        // either way.
        assert_eq!(m.estimate(t, 508 * MIB, LIMIT, HIGH), None);
        assert_eq!(m.estimate(t, 492 * MIB, LIMIT, HIGH), None);
        assert!(m.estimate(t, 507 * MIB, LIMIT, HIGH).is_some());
        assert!(m.estimate(t, 493 * MIB, LIMIT, HIGH).is_some());
    }

    #[test]
    fn near_the_high_mark_memory_stat_is_read_every_time() {
        let t = Instant::now();
        let m = StatMemo {
            charge: 795 * MIB,
            ..read_at(t)
        };
        // An eighth of the ceiling (128 MiB) below the high mark: read.
        assert!(m.estimate(t, 793 * MIB, LIMIT, HIGH).is_some());
        assert_eq!(m.estimate(t, 794 * MIB, LIMIT, HIGH), None);
        assert_eq!(m.estimate(t, 795 * MIB, LIMIT, HIGH), None);
        // The high mark lowered (Emergency): the same charge is near it.
        assert_eq!(m.estimate(t, 793 * MIB, LIMIT, 900 * MIB), None);
    }

    #[test]
    fn between_reads_the_estimate_never_shows_less_pressure_than_there_is() {
        let t = Instant::now();
        let m = read_at(t);
        // Growth: all of it held, none of it page cache (working set
        // 406 - 100 = 306, the read's 400 + 6).
        assert_eq!(
            m.estimate(t, 506 * MIB, LIMIT, HIGH),
            Some((100 * MIB, 386 * MIB))
        );
        // A fall: page cache dropped (the working set stays 400), the held
        // figure kept.
        assert_eq!(
            m.estimate(t, 494 * MIB, LIMIT, HIGH),
            Some((94 * MIB, 380 * MIB))
        );
        // A fall larger than the page cache read: none left, and held
        // never above the charge.
        let little_cache = StatMemo {
            charge: 384 * MIB,
            inactive_file: 2 * MIB,
            held: 382 * MIB,
            ..m
        };
        assert_eq!(
            little_cache.estimate(t, 378 * MIB, LIMIT, HIGH),
            Some((0, 378 * MIB))
        );
    }
}
