//! One engine of the soak's database: the memory it holds (reserved or
//! only touched), what it spilled, and the spill handler the agent's
//! requests reach.

use std::{
    collections::VecDeque,
    fs,
    io::Read,
    path::PathBuf,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use memmap2::MmapMut;
use nodedb_governor::{EngineId, MemError, MemoryGovernor, Reservation, SpillHandler};

use super::target::{SpillTarget, WriteFailure};

const PAGE: usize = 4096;

/// Memory an engine holds: mapped, every page touched and tagged with
/// the holding and the page, so that what is spilled and read back can be
/// checked. `reservation` is `None` for memory touched without reserving.
pub struct Holding {
    id: u64,
    pub reservation: Option<Reservation>,
    map: MmapMut,
}

impl Holding {
    fn new(id: u64, reservation: Option<Reservation>, bytes: usize) -> std::io::Result<Self> {
        let mut map = MmapMut::map_anon(bytes.max(PAGE))?;
        for (i, page) in map.chunks_mut(PAGE).enumerate() {
            page[..8].copy_from_slice(&id.to_le_bytes());
            page[8..16].copy_from_slice(&(i as u64).to_le_bytes());
        }
        Ok(Self {
            id,
            reservation,
            map,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn reserved(&self) -> u64 {
        self.reservation.as_ref().map_or(0, Reservation::size)
    }
}

/// A file's whole content, read into memory this thread maps itself (not
/// the process's malloc arenas, which pass pages between engines' threads:
/// see `read_back`'s caller).
fn read_back(path: &std::path::Path) -> std::io::Result<MmapMut> {
    let mut f = fs::File::open(path)?;
    let len = f.metadata()?.len() as usize;
    let mut map = MmapMut::map_anon(len.max(1))?;
    f.read_exact(&mut map[..len])?;
    let mut extra = [0u8; 1];
    if f.read(&mut extra)? != 0 {
        return Err(std::io::Error::other(format!(
            "{} grew while it was read",
            path.display()
        )));
    }
    Ok(map)
}

/// Checks the tags of a holding's image (in memory, or read back from a
/// spill file).
fn check_image(id: u64, data: &[u8]) -> Result<(), String> {
    for (i, page) in data.chunks(PAGE).enumerate() {
        let got_id = u64::from_le_bytes(page[..8].try_into().expect("8 bytes"));
        let got_page = u64::from_le_bytes(page[8..16].try_into().expect("8 bytes"));
        if (got_id, got_page) != (id, i as u64) {
            return Err(format!(
                "holding {id} page {i}: found holding {got_id} page {got_page}"
            ));
        }
    }
    Ok(())
}

/// What an engine's steps and spills came to.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EngineCounters {
    pub refused: u64,
    pub admitted: u64,
    pub spills: u64,
    pub spilled_bytes: u64,
    pub spill_files: u64,
    pub spill_write_injected: u64,
    pub spill_no_space: u64,
    pub restored: u64,
    pub untracked_skipped: u64,
}

/// An engine: its holdings behind one lock (the spill handler takes it
/// too, so a check that holds it sees the books and the holdings agree).
pub struct EngineSide {
    pub id: EngineId,
    pub name: String,
    governor: MemoryGovernor,
    held: Mutex<Vec<Holding>>,
    spilled: Mutex<VecDeque<(PathBuf, u64, usize)>>,
    target: Arc<SpillTarget>,
    /// All engines' memory touched without a reservation, and its limit.
    untracked: Arc<AtomicU64>,
    untracked_limit: u64,
    next_id: AtomicU64,
    counters: Mutex<EngineCounters>,
    /// A failure no step or fault explains (a spill file that does not
    /// read back as written, a write that failed for another reason).
    pub broken: Mutex<Option<String>>,
}

/// Why a step failed: a refusal or an injected fault are expected; any
/// other error is a violation.
#[derive(Debug)]
pub enum StepError {
    Refused(MemError),
    Fault(&'static str),
    Other(String),
}

impl From<MemError> for StepError {
    fn from(e: MemError) -> Self {
        StepError::Refused(e)
    }
}

impl From<std::io::Error> for StepError {
    fn from(e: std::io::Error) -> Self {
        StepError::Other(e.to_string())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl EngineSide {
    pub fn new(
        id: EngineId,
        name: &str,
        governor: MemoryGovernor,
        target: Arc<SpillTarget>,
        untracked: Arc<AtomicU64>,
        untracked_limit: u64,
    ) -> Self {
        Self {
            id,
            name: name.to_owned(),
            governor,
            held: Mutex::new(Vec::new()),
            spilled: Mutex::new(VecDeque::new()),
            target,
            untracked,
            untracked_limit,
            next_id: AtomicU64::new(1),
            counters: Mutex::new(EngineCounters::default()),
            broken: Mutex::new(None),
        }
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn counters(&self) -> EngineCounters {
        lock(&self.counters).clone()
    }

    fn count(&self, f: impl FnOnce(&mut EngineCounters)) {
        f(&mut lock(&self.counters));
    }

    /// The holdings, locked: the checks read the books under it.
    pub fn holdings(&self) -> MutexGuard<'_, Vec<Holding>> {
        lock(&self.held)
    }

    fn admitted<T>(&self, r: Result<T, MemError>) -> Result<T, StepError> {
        match r {
            Ok(v) => {
                self.count(|c| c.admitted += 1);
                Ok(v)
            }
            Err(e) => {
                self.count(|c| c.refused += 1);
                Err(StepError::Refused(e))
            }
        }
    }

    pub fn reserve(&self, bytes: u64) -> Result<(), StepError> {
        let r = self.admitted(self.governor.try_reserve(self.id, bytes))?;
        let h = Holding::new(self.id(), Some(r), bytes as usize)?;
        lock(&self.held).push(h);
        Ok(())
    }

    /// The reserved holding `pick` chooses, taken out (put back by the
    /// caller), or `None` when the engine reserved nothing.
    fn take_reserved(&self, pick: u64) -> Option<Holding> {
        let mut held = lock(&self.held);
        let reserved: Vec<usize> = (0..held.len())
            .filter(|&i| held[i].reservation.is_some())
            .collect();
        if reserved.is_empty() {
            return None;
        }
        Some(held.swap_remove(reserved[(pick % reserved.len() as u64) as usize]))
    }

    pub fn grow(&self, pick: u64, bytes: u64) -> Result<(), StepError> {
        let Some(mut h) = self.take_reserved(pick) else {
            return Ok(());
        };
        let mut r = h.reservation.take().expect("a reserved holding");
        let grown = self.admitted(r.try_grow(bytes));
        let size = r.size() as usize;
        // Touched at the new size (a refusal leaves it as it was), the old
        // memory let go first (both at once would be memory nobody
        // reserved).
        let id = h.id;
        drop(h);
        let h = Holding::new(id, Some(r), size)?;
        lock(&self.held).push(h);
        grown
    }

    pub fn shrink(&self, pick: u64, bytes: u64) -> Result<(), StepError> {
        let Some(mut h) = self.take_reserved(pick) else {
            return Ok(());
        };
        let mut r = h.reservation.take().expect("a reserved holding");
        // Whole pages, and at least one left.
        let bytes = bytes.min(r.size().saturating_sub(PAGE as u64)) / PAGE as u64 * PAGE as u64;
        let shrunk = r.shrink(bytes).map_err(StepError::Refused);
        let size = r.size() as usize;
        let id = h.id;
        drop(h);
        let h = Holding::new(id, Some(r), size)?;
        lock(&self.held).push(h);
        shrunk
    }

    pub fn release(&self, pick: u64) {
        let mut held = lock(&self.held);
        if held.is_empty() {
            return;
        }
        let i = (pick % held.len() as u64) as usize;
        let h = held.swap_remove(i);
        if h.reservation.is_none() {
            self.untracked.fetch_sub(h.bytes(), Ordering::Relaxed);
        }
    }

    /// Touches `bytes` without reserving them, within the soak's limit on
    /// untracked memory, and only while the database has room for them as
    /// the library sees it (its ceiling less its books and what the
    /// database holds besides, read fresh from its cgroup while the agent
    /// enforces, less all the untracked memory again, which a figure from
    /// the agent alone may not show yet): memory an
    /// engine allocates without reserving is never refused, so an engine
    /// that cooperates looks before it takes it; one that does not can be
    /// OOM-killed whatever the governor does. Otherwise the step does
    /// nothing (counted).
    pub fn touch(&self, bytes: u64) -> Result<(), StepError> {
        let g = &self.governor;
        let room = g
            .ceiling_bytes()
            .saturating_sub(g.total_bytes())
            .saturating_sub(g.refresh_outside())
            .saturating_sub(self.untracked.load(Ordering::Relaxed));
        let now = self.untracked.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if now > self.untracked_limit || bytes > room {
            self.untracked.fetch_sub(bytes, Ordering::Relaxed);
            self.count(|c| c.untracked_skipped += 1);
            return Ok(());
        }
        match Holding::new(self.id(), None, bytes as usize) {
            Ok(h) => {
                lock(&self.held).push(h);
                Ok(())
            }
            Err(e) => {
                self.untracked.fetch_sub(bytes, Ordering::Relaxed);
                Err(e.into())
            }
        }
    }

    /// Writes a file of `bytes` in `dir`, reads it back, checks it and
    /// deletes it (the page cache keeps what the kernel lets it). Its two
    /// buffers are reserved first, as an engine reserves what it reads
    /// into (refused: the step does nothing more).
    pub fn file_io(&self, dir: &std::path::Path, bytes: u64) -> Result<(), StepError> {
        let _buffers = self.admitted(self.governor.try_reserve(self.id, 2 * bytes))?;
        let id = self.id();
        let path = dir.join(format!("{}-{id}", self.name));
        let h = Holding::new(id, None, bytes as usize)?;
        let result = (|| -> Result<(), StepError> {
            // Written out before it is read back, as an engine makes its
            // files durable: clean pages the kernel can drop (dirty ones
            // count against the ceiling until written back, and cgroup v1
            // does not throttle a writer for them).
            let mut f = fs::File::create(&path)?;
            std::io::Write::write_all(&mut f, &h.map[..])?;
            f.sync_data()?;
            drop(f);
            let back = read_back(&path)?;
            check_image(id, &back[..h.map.len()]).map_err(StepError::Other)
        })();
        let _ = fs::remove_file(&path);
        result
    }

    /// Reads back the oldest spill file, checks it and deletes it.
    pub fn restore(&self) -> Result<(), StepError> {
        let Some((path, id, len)) = lock(&self.spilled).pop_front() else {
            return Ok(());
        };
        // What it reads into is reserved first (refused: the file waits).
        let _buffer = match self.admitted(self.governor.try_reserve(self.id, len as u64)) {
            Ok(r) => r,
            Err(e) => {
                lock(&self.spilled).push_front((path, id, len));
                return Err(e);
            }
        };
        let held = fs::metadata(&path)?.len() as usize;
        let back = read_back(&path)?;
        let _ = fs::remove_file(&path);
        if held != len {
            return Err(StepError::Other(format!(
                "spill file {} holds {held} bytes, {len} were written",
                path.display(),
            )));
        }
        check_image(id, &back[..len]).map_err(StepError::Other)?;
        self.count(|c| c.restored += 1);
        Ok(())
    }

    /// Memory touched without reserving, all engines together.
    pub fn untracked_bytes(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    /// Frees every holding and deletes every spill file.
    pub fn free_all(&self) {
        let mut held = lock(&self.held);
        for h in held.drain(..) {
            if h.reservation.is_none() {
                self.untracked.fetch_sub(h.bytes(), Ordering::Relaxed);
            }
        }
        for (path, _, _) in lock(&self.spilled).drain(..) {
            let _ = fs::remove_file(path);
        }
        self.governor.flush_thread_credit();
    }
}

impl SpillHandler for EngineSide {
    fn reclaimable_bytes(&self) -> u64 {
        lock(&self.held).iter().map(Holding::bytes).sum()
    }

    /// Memory touched without reserving is dropped (a cache); reserved
    /// memory is written to the spill target first and kept when the
    /// write fails (the tmpfs full, or the injected failure).
    fn spill(&self, target: u64) -> u64 {
        let mut held = lock(&self.held);
        let mut freed = 0;
        // Untracked memory first: dropping it costs nothing.
        held.sort_by_key(|h| std::cmp::Reverse(h.reservation.is_none()));
        let mut i = 0;
        while freed < target && i < held.len() {
            if held[i].reservation.is_none() {
                let h = held.remove(i);
                self.untracked.fetch_sub(h.bytes(), Ordering::Relaxed);
                freed += h.bytes();
                continue;
            }
            let name = format!("{}-{}", self.name, held[i].id);
            let map = &mut held[i].map;
            // SAFETY: the holding's own private anonymous map; the spill
            // holds the engine's lock, so nothing else touches it.
            let spilled = unsafe { self.target.spill_region(&name, map.as_mut_ptr(), map.len()) };
            match spilled {
                Ok(()) => {
                    let h = held.remove(i);
                    freed += h.bytes();
                    lock(&self.spilled).push_back((self.target.path(&name), h.id, h.map.len()));
                    self.count(|c| c.spill_files += 1);
                }
                Err(WriteFailure::Injected) => {
                    self.count(|c| c.spill_write_injected += 1);
                    i += 1;
                }
                Err(WriteFailure::NoSpace) => {
                    self.count(|c| c.spill_no_space += 1);
                    // Nothing bigger fits either; smaller ones may.
                    i += 1;
                }
                Err(WriteFailure::Other(e)) => {
                    *lock(&self.broken) = Some(format!("writing spill file {name}: {e}"));
                    break;
                }
            }
        }
        // This thread's credit goes back now, so the books equal the
        // holdings as soon as the lock is let go.
        self.governor.flush_thread_credit();
        drop(held);
        self.count(|c| {
            c.spills += 1;
            c.spilled_bytes += freed;
        });
        freed
    }
}
