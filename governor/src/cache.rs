//! The page cache an engine holds: the files it reads through the cache,
//! dropped coldest first when the agent asks (its share of the cache is
//! exceeded while the database is under pressure), and the hot ranges it
//! holds resident whatever else is flushed.
//!
//! * [`EngineCache::track`] registers a file an engine reads through the
//!   cache (a segment, an index file); the engine calls
//!   [`CachedFile::touch`] when it uses it. [`EngineCache::drop_cold`]
//!   drops the engine's files, least recently touched first
//!   (`POSIX_FADV_DONTNEED` after writing back what is dirty, see
//!   [`page_cache::drop_cached`]), until the bytes asked for have left the
//!   cache (measured with `mincore` before and after each file, so what
//!   another process keeps cached, or the kernel would not drop, does not
//!   count). The agent's `drop_cache` request lands here.
//! * [`EngineCache::protect`] holds a range resident (`mlock2` with
//!   `MLOCK_ONFAULT`: pages are locked as they fault in, the call reads
//!   nothing in), charged to the engine's budget (so the memory a hot set
//!   pins is memory the engine holds) and bounded per engine by
//!   [`EngineCache::set_hot_set_limit`]. Locked pages are out of reach of
//!   reclaim, so a flush of any size cannot evict them. In an Emergency the
//!   hot sets are released (unlocked, their charge given back:
//!   [`EngineCache::release_hot_sets`]), because the database staying
//!   alive matters more than its latency, and they are locked again when
//!   the pressure has fallen ([`EngineCache::restore_hot_sets`]). The
//!   agent link does both on the agent's pressure levels.
//!
//! Locking needs `RLIMIT_MEMLOCK` room (or `CAP_IPC_LOCK`); the agent
//! raises the limit of a governed process to its engines' configured hot
//! sets. A refusal names the limit.

use std::{
    collections::HashMap,
    fs::File,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use crate::{
    engine::EngineId,
    error::MemError,
    governor::{MemoryGovernor, Reservation},
    page_cache,
};

/// What [`EngineCache::drop_cold`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Bytes that left the page cache (by `mincore`, before and after).
    pub freed_bytes: u64,
    /// Files dropped (every file looked at, up to the one that reached
    /// the target).
    pub files: u64,
}

/// One engine's hot sets, as [`EngineCache::hot_sets`] reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HotSetUsage {
    /// Bytes in hot sets that are locked now.
    pub locked_bytes: u64,
    /// Bytes in hot sets released by an Emergency, not locked again yet.
    pub released_bytes: u64,
    /// The engine's bound (0: no hot set allowed).
    pub limit_bytes: u64,
}

struct Tracked {
    engine: EngineId,
    file: Arc<File>,
    last_used: Arc<AtomicU64>,
}

struct Hot {
    engine: EngineId,
    addr: usize,
    len: usize,
    /// The charge, while locked; `None` while released.
    charge: Option<Reservation>,
    /// Being locked or relocked outside the registry's lock.
    pending: bool,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    files: HashMap<u64, Tracked>,
    hot: HashMap<u64, Hot>,
    limits: HashMap<EngineId, u64>,
}

/// The files and hot ranges of a process's engines. Share it (`Arc`)
/// between the engines and the agent link.
pub struct EngineCache {
    governor: MemoryGovernor,
    epoch: Instant,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for EngineCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("EngineCache")
            .field("files", &inner.files.len())
            .field("hot_sets", &inner.hot.len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl EngineCache {
    /// An empty registry whose hot sets are charged to `governor`'s
    /// engines. No engine may lock anything until its limit is set.
    pub fn new(governor: &MemoryGovernor) -> Arc<Self> {
        Arc::new(Self {
            governor: governor.clone(),
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
        })
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Bounds `engine`'s hot sets (the configuration's `hot_set`). Ranges
    /// already locked stay; new ones must fit under the new bound.
    pub fn set_hot_set_limit(&self, engine: EngineId, bytes: u64) -> Result<(), MemError> {
        self.governor.slot(engine)?;
        lock(&self.inner).limits.insert(engine, bytes);
        Ok(())
    }

    /// Registers `file`, which `engine` reads through the page cache;
    /// untracked when the handle drops. Counts as just used.
    pub fn track(self: &Arc<Self>, engine: EngineId, file: Arc<File>) -> CachedFile {
        let last_used = Arc::new(AtomicU64::new(self.now_us()));
        let mut inner = lock(&self.inner);
        inner.next_id += 1;
        let id = inner.next_id;
        inner.files.insert(
            id,
            Tracked {
                engine,
                file: Arc::clone(&file),
                last_used: Arc::clone(&last_used),
            },
        );
        CachedFile {
            cache: Arc::clone(self),
            id,
            file,
            last_used,
        }
    }

    /// Drops `engine`'s tracked files from the page cache, least recently
    /// touched first, until `target_bytes` have left it (or every file has
    /// been dropped). A file that fails to drop is skipped (its error is
    /// the last one returned if nothing could be dropped at all).
    pub fn drop_cold(&self, engine: EngineId, target_bytes: u64) -> io::Result<Dropped> {
        // Least recently used first; files used at the same microsecond in
        // the order they were tracked.
        let mut files: Vec<((u64, u64), Arc<File>)> = lock(&self.inner)
            .files
            .iter()
            .filter(|(_, t)| t.engine == engine)
            .map(|(id, t)| {
                (
                    (t.last_used.load(Ordering::Relaxed), *id),
                    Arc::clone(&t.file),
                )
            })
            .collect();
        files.sort_by_key(|(used, _)| *used);
        let mut done = Dropped::default();
        let mut last_error = None;
        for (_, file) in files {
            if done.freed_bytes >= target_bytes {
                break;
            }
            // drop_cached measures what was cached before it dropped.
            let dropped = page_cache::drop_cached(&file)
                .and_then(|before| Ok(before.saturating_sub(page_cache::resident_bytes(&file)?.0)));
            match dropped {
                Ok(freed) => {
                    done.freed_bytes += freed;
                    done.files += 1;
                }
                Err(e) => last_error = Some(e),
            }
        }
        match last_error {
            Some(e) if done.files == 0 => Err(e),
            _ => Ok(done),
        }
    }

    /// Bytes of `engine`'s tracked files in the page cache now (`mincore`).
    pub fn cached_bytes(&self, engine: EngineId) -> io::Result<u64> {
        let files: Vec<Arc<File>> = lock(&self.inner)
            .files
            .values()
            .filter(|t| t.engine == engine)
            .map(|t| Arc::clone(&t.file))
            .collect();
        files
            .iter()
            .map(|f| page_cache::resident_bytes(f).map(|(r, _)| r))
            .sum()
    }

    /// Holds `range` (a part of a mapping the engine owns: an index's
    /// upper layers) resident for `engine`: charged to its budget, bounded
    /// by its hot-set limit, locked with `MLOCK_ONFAULT`. Released when
    /// the handle drops. The range is locked by address, in whole pages,
    /// and must not share a page with another hot set (the kernel does not
    /// count locks: one handle's unlock would unlock the other's page).
    /// Unmapping it ends the lock (the kernel's rule), so the mapping must
    /// outlive the handle for the protection to mean anything.
    ///
    /// The governor is never called with the registry locked (its pressure
    /// subscribers may call back here).
    pub fn protect(self: &Arc<Self>, engine: EngineId, range: &[u8]) -> Result<HotSet, MemError> {
        let len = range.len();
        let addr = range.as_ptr() as usize;
        let (first, end) = pages(addr, len);
        let id = {
            let mut inner = lock(&self.inner);
            let limit = inner.limits.get(&engine).copied().unwrap_or(0);
            let held: u64 = inner
                .hot
                .values()
                .filter(|h| h.engine == engine)
                .map(|h| h.len as u64)
                .sum();
            if held + len as u64 > limit {
                return Err(MemError::HotSetLimit {
                    engine: engine.to_string(),
                    requested: len as u64,
                    held,
                    limit,
                });
            }
            if inner.hot.values().any(|h| {
                let (f, e) = pages(h.addr, h.len);
                f < end && first < e
            }) {
                return Err(MemError::LockFailed {
                    engine: engine.to_string(),
                    requested: len as u64,
                    reason: "the range shares a page with a hot set already held".into(),
                });
            }
            // Counted against the bound (and for overlaps) from now on;
            // locked below, outside the registry's lock.
            inner.next_id += 1;
            let id = inner.next_id;
            inner.hot.insert(
                id,
                Hot {
                    engine,
                    addr,
                    len,
                    charge: None,
                    pending: true,
                },
            );
            id
        };
        let locked = self
            .governor
            .try_reserve(engine, len as u64)
            .and_then(|charge| match lock_range(addr, len) {
                Ok(()) => Ok(charge),
                Err(e) => {
                    // A partial lock (a hole in the range) is undone.
                    unlock_range(addr, len);
                    Err(lock_error(engine, len, &e))
                }
            });
        let mut inner = lock(&self.inner);
        match locked {
            Ok(charge) => {
                let h = inner.hot.get_mut(&id).expect("a pending hot set stays");
                h.charge = Some(charge);
                h.pending = false;
                Ok(HotSet {
                    cache: Arc::clone(self),
                    id,
                    len,
                })
            }
            Err(e) => {
                inner.hot.remove(&id);
                Err(e)
            }
        }
    }

    /// Unlocks `engine`'s hot sets (every engine's with `None`) and gives
    /// their charge back: what an Emergency does. Returns the bytes
    /// released.
    pub fn release_hot_sets(&self, engine: Option<EngineId>) -> u64 {
        let mut charges = Vec::new();
        let mut released = 0;
        for h in lock(&self.inner).hot.values_mut() {
            if engine.is_some_and(|e| e != h.engine) || h.pending {
                continue;
            }
            if let Some(charge) = h.charge.take() {
                unlock_range(h.addr, h.len);
                released += h.len as u64;
                charges.push(charge);
            }
        }
        // Given back with the registry unlocked.
        drop(charges);
        released
    }

    /// Locks again the hot sets an Emergency released (`engine`'s, or
    /// every engine's with `None`), each only if its charge fits again;
    /// returns the bytes locked.
    pub fn restore_hot_sets(&self, engine: Option<EngineId>) -> u64 {
        let todo: Vec<(u64, EngineId, usize, usize)> = lock(&self.inner)
            .hot
            .iter_mut()
            .filter(|(_, h)| {
                engine.is_none_or(|e| e == h.engine) && h.charge.is_none() && !h.pending
            })
            .map(|(id, h)| {
                h.pending = true;
                (*id, h.engine, h.addr, h.len)
            })
            .collect();
        let mut restored = 0;
        for (id, engine, addr, len) in todo {
            let charge = self
                .governor
                .try_reserve(engine, len as u64)
                .ok()
                .filter(|_| lock_range(addr, len).is_ok());
            let mut inner = lock(&self.inner);
            match inner.hot.get_mut(&id) {
                Some(h) => {
                    h.pending = false;
                    if let Some(charge) = charge {
                        h.charge = Some(charge);
                        restored += len as u64;
                    }
                }
                None => {
                    // Dropped meanwhile: undo, and give the charge back
                    // with the registry unlocked.
                    drop(inner);
                    if charge.is_some() {
                        unlock_range(addr, len);
                    }
                }
            }
        }
        restored
    }

    /// `engine`'s hot sets: locked, released and its bound.
    pub fn hot_sets(&self, engine: EngineId) -> HotSetUsage {
        let inner = lock(&self.inner);
        let mut u = HotSetUsage {
            limit_bytes: inner.limits.get(&engine).copied().unwrap_or(0),
            ..HotSetUsage::default()
        };
        for h in inner.hot.values().filter(|h| h.engine == engine) {
            if h.charge.is_some() {
                u.locked_bytes += h.len as u64;
            } else {
                u.released_bytes += h.len as u64;
            }
        }
        u
    }
}

fn lock_range(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: mlock2 reads no memory; on an address range that is not
    // (all) mapped it fails with ENOMEM.
    let rc = unsafe { libc::mlock2(addr as *const _, len, libc::MLOCK_ONFAULT as libc::c_uint) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The page-aligned span `[first, end)` of `len` bytes at `addr`.
fn pages(addr: usize, len: usize) -> (usize, usize) {
    const PAGE: usize = 4096;
    (addr & !(PAGE - 1), (addr + len).div_ceil(PAGE) * PAGE)
}

fn unlock_range(addr: usize, len: usize) {
    // SAFETY: munlock reads no memory; a range unmapped since is an
    // ENOMEM, harmless.
    unsafe { libc::munlock(addr as *const _, len) };
}

/// `RLIMIT_MEMLOCK`'s soft limit, in bytes (`u64::MAX`: unlimited).
pub fn memlock_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return 0;
    }
    if r.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        r.rlim_cur
    }
}

fn lock_error(engine: EngineId, len: usize, e: &io::Error) -> MemError {
    let limit = memlock_limit();
    MemError::LockFailed {
        engine: engine.to_string(),
        requested: len as u64,
        reason: match e.raw_os_error() {
            Some(libc::ENOMEM) | Some(libc::EAGAIN) | Some(libc::EPERM) => format!(
                "{e} (RLIMIT_MEMLOCK is {}; without CAP_IPC_LOCK the locked total must fit in it: the agent raises it to the engines' configured hot sets)",
                if limit == u64::MAX {
                    "unlimited".to_owned()
                } else {
                    format!("{limit} bytes")
                }
            ),
            _ => e.to_string(),
        },
    }
}

/// A file an engine reads through the cache; untracked on drop.
#[derive(Debug)]
pub struct CachedFile {
    cache: Arc<EngineCache>,
    id: u64,
    file: Arc<File>,
    last_used: Arc<AtomicU64>,
}

impl CachedFile {
    /// Marks the file used now (it is dropped after colder ones).
    pub fn touch(&self) {
        self.last_used.store(self.cache.now_us(), Ordering::Relaxed);
    }

    pub fn file(&self) -> &Arc<File> {
        &self.file
    }
}

impl Drop for CachedFile {
    fn drop(&mut self) {
        lock(&self.cache.inner).files.remove(&self.id);
    }
}

/// A locked hot set; unlocked and uncharged on drop.
#[derive(Debug)]
pub struct HotSet {
    cache: Arc<EngineCache>,
    id: u64,
    len: usize,
}

impl HotSet {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether it is locked now (false after an Emergency released it).
    pub fn is_locked(&self) -> bool {
        lock(&self.cache.inner)
            .hot
            .get(&self.id)
            .is_some_and(|h| h.charge.is_some())
    }
}

impl Drop for HotSet {
    fn drop(&mut self) {
        let hot = lock(&self.cache.inner).hot.remove(&self.id);
        // Unlocked, and the charge given back, with the registry unlocked.
        if let Some(h) = hot
            && h.charge.is_some()
        {
            unlock_range(h.addr, h.len);
        }
    }
}
