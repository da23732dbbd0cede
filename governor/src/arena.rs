//! Per-engine jemalloc arenas (feature `jemalloc`).
//!
//! Each engine gets an arena of its own, created with `arenas.create`:
//! jemalloc never hands a created arena to a thread by itself (its automatic
//! arenas are the first `opt.narenas`), so an engine's memory is not mixed
//! with other threads'. A thread joins its engine's arena with
//! `thread.arena`; from then on its allocations come from there, and the
//! arena's statistics (resident, active, dirty, mapped) are the engine's.
//! Under pressure an engine's idle memory is given back at once
//! (`arena.<i>.purge`) or aged out (`arena.<i>.decay`).
//!
//! The embedder installs jemalloc as the global allocator (for example
//! `#[global_allocator] static A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;`);
//! otherwise creating arenas works but no allocation goes to them.

use std::{collections::BTreeMap, ffi::CString};

use crate::EngineId;

#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    #[error("jemalloc mallctl {name}: {reason}")]
    Mallctl { name: String, reason: String },
    #[error("no arena for engine {0}")]
    UnknownEngine(EngineId),
}

fn mallctl_err(name: &str, e: impl std::fmt::Display) -> ArenaError {
    ArenaError::Mallctl {
        name: name.to_owned(),
        reason: e.to_string(),
    }
}

/// An arena's statistics, in bytes, as of the last refresh.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Physically resident (includes dirty pages and metadata).
    pub resident_bytes: u64,
    /// In active extents (allocated to the application).
    pub active_bytes: u64,
    /// Freed but not yet returned to the kernel.
    pub dirty_bytes: u64,
    /// Mapped from the kernel.
    pub mapped_bytes: u64,
}

/// One dedicated arena per engine.
#[derive(Debug)]
pub struct EngineArenas {
    arenas: BTreeMap<EngineId, u32>,
    page_bytes: u64,
}

fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn read<T: Copy>(n: &str) -> Result<T, ArenaError> {
    // SAFETY: `n` is a NUL-terminated mallctl name whose value type is T
    // (the callers below pair each name with jemalloc's documented type).
    unsafe { tikv_jemalloc_ctl::raw::read::<T>(&name(n)) }.map_err(|e| mallctl_err(n, e))
}

/// A mallctl that takes and returns nothing (purge, decay): jemalloc wants
/// every pointer NULL.
fn call_void(n: &str) -> Result<(), ArenaError> {
    let c = CString::new(n).map_err(|e| mallctl_err(n, e))?;
    // SAFETY: a valid NUL-terminated name; NULL in and out, as a void
    // mallctl requires.
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            c.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
    if rc != 0 {
        return Err(mallctl_err(n, std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

/// Returns the dirty pages of every arena (the engines' and jemalloc's
/// own) to the kernel now: after a large transient allocation outside any
/// engine, say.
pub fn purge_all() -> Result<(), ArenaError> {
    // MALLCTL_ARENAS_ALL.
    call_void("arena.4096.purge")
}

impl EngineArenas {
    /// Creates a dedicated arena for each engine.
    pub fn create(engines: &[EngineId]) -> Result<Self, ArenaError> {
        let mut arenas = BTreeMap::new();
        for &e in engines {
            let index: u32 = read("arenas.create")?;
            arenas.insert(e, index);
        }
        Ok(Self {
            arenas,
            page_bytes: read::<usize>("arenas.page")? as u64,
        })
    }

    /// The engines that have an arena.
    pub fn engines(&self) -> impl Iterator<Item = EngineId> + '_ {
        self.arenas.keys().copied()
    }

    /// The arena index of `engine`.
    pub fn index(&self, engine: EngineId) -> Result<u32, ArenaError> {
        self.arenas
            .get(&engine)
            .copied()
            .ok_or(ArenaError::UnknownEngine(engine))
    }

    /// Moves the calling thread's allocations to `engine`'s arena.
    pub fn pin_current_thread(&self, engine: EngineId) -> Result<(), ArenaError> {
        let index = self.index(engine)?;
        // SAFETY: "thread.arena" takes an unsigned (u32) arena index.
        unsafe { tikv_jemalloc_ctl::raw::write(&name("thread.arena"), index) }
            .map_err(|e| mallctl_err("thread.arena", e))
    }

    /// The arena the calling thread allocates from.
    pub fn current_thread_arena() -> Result<u32, ArenaError> {
        read("thread.arena")
    }

    /// Fresh statistics of `engine`'s arena.
    pub fn stats(&self, engine: EngineId) -> Result<ArenaStats, ArenaError> {
        let i = self.index(engine)?;
        tikv_jemalloc_ctl::epoch::advance().map_err(|e| mallctl_err("epoch", e))?;
        let stat = |s: &str| read::<usize>(&format!("stats.arenas.{i}.{s}")).map(|v| v as u64);
        Ok(ArenaStats {
            resident_bytes: stat("resident")?,
            active_bytes: stat("pactive")? * self.page_bytes,
            dirty_bytes: stat("pdirty")? * self.page_bytes,
            mapped_bytes: stat("mapped")?,
        })
    }

    /// Returns all of `engine`'s dirty pages to the kernel now.
    pub fn purge(&self, engine: EngineId) -> Result<(), ArenaError> {
        call_void(&format!("arena.{}.purge", self.index(engine)?))
    }

    /// Returns the dirty pages that are past the arena's decay time.
    pub fn decay(&self, engine: EngineId) -> Result<(), ArenaError> {
        call_void(&format!("arena.{}.decay", self.index(engine)?))
    }
}
