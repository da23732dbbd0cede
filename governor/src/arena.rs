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
//! With NUMA ([`EngineArenas::create_numa`]) each engine gets one arena per
//! node, and a thread joins its engine's arena *on the node it runs on*:
//! jemalloc's extents are per arena, so an arena's pages are first touched
//! by threads of one node and land there (the kernel's default policy
//! places a page on the node of the thread that first touches it). A
//! thread-per-core database pins its threads, so a thread's node does not
//! change; one that moves joins again ([`EngineArenas::pin_current_thread`]).
//!
//! The embedder installs jemalloc as the global allocator (for example
//! `#[global_allocator] static A: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;`);
//! otherwise creating arenas works but no allocation goes to them.

use std::{collections::BTreeMap, ffi::CString};

use crate::{EngineId, numa::Topology};

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

/// One dedicated arena per engine (and NUMA node).
#[derive(Debug)]
pub struct EngineArenas {
    /// Per engine, its arena on each node (one without NUMA).
    arenas: BTreeMap<EngineId, Vec<u32>>,
    /// The nodes the arenas are per, when more than one.
    topology: Option<Topology>,
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
        Self::create_per_node(engines, None)
    }

    /// Creates a dedicated arena for each engine on each of `topology`'s
    /// nodes.
    pub fn create_numa(engines: &[EngineId], topology: &Topology) -> Result<Self, ArenaError> {
        Self::create_per_node(
            engines,
            Some(topology.clone()).filter(|t| t.nodes().len() > 1),
        )
    }

    fn create_per_node(
        engines: &[EngineId],
        topology: Option<Topology>,
    ) -> Result<Self, ArenaError> {
        let nodes = topology.as_ref().map_or(1, |t| t.nodes().len());
        let mut arenas = BTreeMap::new();
        for &e in engines {
            let per_node = (0..nodes)
                .map(|_| read::<u32>("arenas.create"))
                .collect::<Result<Vec<_>, _>>()?;
            arenas.insert(e, per_node);
        }
        Ok(Self {
            arenas,
            topology,
            page_bytes: read::<usize>("arenas.page")? as u64,
        })
    }

    /// The arena index of `engine` on node position `node` (in the
    /// topology's order; 0 without NUMA).
    pub fn index_on(&self, engine: EngineId, node: usize) -> Result<u32, ArenaError> {
        self.arenas
            .get(&engine)
            .and_then(|v| v.get(node))
            .copied()
            .ok_or(ArenaError::UnknownEngine(engine))
    }

    /// The node position the calling thread runs on (0 without NUMA).
    fn current_node(&self) -> usize {
        self.topology.as_ref().map_or(0, Topology::current_node)
    }

    /// The engines that have an arena.
    pub fn engines(&self) -> impl Iterator<Item = EngineId> + '_ {
        self.arenas.keys().copied()
    }

    /// The arena index of `engine` (on the calling thread's node, with
    /// NUMA).
    pub fn index(&self, engine: EngineId) -> Result<u32, ArenaError> {
        self.index_on(engine, self.current_node())
    }

    /// Moves the calling thread's allocations to `engine`'s arena (on the
    /// node the thread runs on, with NUMA).
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

    /// `engine`'s arenas, one per node.
    fn all(&self, engine: EngineId) -> Result<&[u32], ArenaError> {
        self.arenas
            .get(&engine)
            .map(Vec::as_slice)
            .ok_or(ArenaError::UnknownEngine(engine))
    }

    /// Fresh statistics of `engine`'s arenas (every node's, summed).
    pub fn stats(&self, engine: EngineId) -> Result<ArenaStats, ArenaError> {
        tikv_jemalloc_ctl::epoch::advance().map_err(|e| mallctl_err("epoch", e))?;
        self.summed(engine)
    }

    /// Every engine's arenas' resident bytes (every node's, summed), from
    /// one refresh of jemalloc's statistics: [`stats`](Self::stats)
    /// refreshes them at each call, which merges every arena's figures
    /// under their locks.
    pub fn resident_by_engine(&self) -> Result<BTreeMap<EngineId, u64>, ArenaError> {
        tikv_jemalloc_ctl::epoch::advance().map_err(|e| mallctl_err("epoch", e))?;
        self.arenas
            .keys()
            .map(|&engine| Ok((engine, self.summed(engine)?.resident_bytes)))
            .collect()
    }

    /// `engine`'s arenas' statistics as of the last refresh, every node's
    /// summed.
    fn summed(&self, engine: EngineId) -> Result<ArenaStats, ArenaError> {
        let mut sum = ArenaStats::default();
        for &i in self.all(engine)? {
            let st = self.arena_stats(i)?;
            sum.resident_bytes += st.resident_bytes;
            sum.active_bytes += st.active_bytes;
            sum.dirty_bytes += st.dirty_bytes;
            sum.mapped_bytes += st.mapped_bytes;
        }
        Ok(sum)
    }

    /// Fresh statistics of `engine`'s arena on node position `node`.
    pub fn stats_on(&self, engine: EngineId, node: usize) -> Result<ArenaStats, ArenaError> {
        let i = self.index_on(engine, node)?;
        tikv_jemalloc_ctl::epoch::advance().map_err(|e| mallctl_err("epoch", e))?;
        self.arena_stats(i)
    }

    fn arena_stats(&self, i: u32) -> Result<ArenaStats, ArenaError> {
        let stat = |s: &str| read::<usize>(&format!("stats.arenas.{i}.{s}")).map(|v| v as u64);
        Ok(ArenaStats {
            resident_bytes: stat("resident")?,
            active_bytes: stat("pactive")? * self.page_bytes,
            dirty_bytes: stat("pdirty")? * self.page_bytes,
            mapped_bytes: stat("mapped")?,
        })
    }

    /// Returns all of `engine`'s dirty pages (on every node) to the kernel
    /// now.
    pub fn purge(&self, engine: EngineId) -> Result<(), ArenaError> {
        for &i in self.all(engine)? {
            call_void(&format!("arena.{i}.purge"))?;
        }
        Ok(())
    }

    /// Returns the dirty pages that are past the arenas' decay time.
    pub fn decay(&self, engine: EngineId) -> Result<(), ArenaError> {
        for &i in self.all(engine)? {
            call_void(&format!("arena.{i}.decay"))?;
        }
        Ok(())
    }
}
