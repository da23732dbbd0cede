//! An overflow region: a bounded memory-mapped area where engines park data
//! they spill (an anonymous mapping, or a file mapping whose pages the
//! kernel can write back and drop).
//!
//! The seed's region returned stale bytes from a reused slot and was not
//! thread-safe. Here:
//! * a write returns an [`OverflowSlot`] that knows exactly how many bytes
//!   it holds; reading gives those bytes and nothing of what the space held
//!   before;
//! * space is handed out in 4 KiB granules from a free list that merges
//!   neighbours on free, so freed space is reused and fragmentation stays
//!   bounded by the live slots;
//! * freed granules are given back to the kernel (`MADV_DONTNEED`);
//! * the region never grows past its maximum: a write that does not fit is
//!   refused with the numbers;
//! * any number of threads write, read and free at once: the free list is
//!   locked, and live slots never overlap (a file-backed region's writes
//!   queue behind one another, as they would for the disk);
//! * a file-backed region keeps what it holds out of the page cache:
//!   writes go to the file (not through the mapping, whose write faults
//!   would read around them), with `RWF_DONTCACHE` where the kernel takes
//!   it, else started back at once and, once more than
//!   [`WRITE_BEHIND_BYTES`] were written after them, waited for, unmapped
//!   (`MADV_DONTNEED`: the file keeps the data) and dropped
//!   (`POSIX_FADV_DONTNEED`); a slot is read back through the mapping.
//!   Spilled data is parked, not hot: left cached it would push other
//!   engines' pages out (see [`crate::page_cache`]);
//! * a region is a handle (cloning it gives another to the same mapping),
//!   and each slot holds one, so slots live anywhere, as long as needed:
//!   the mapping goes when the last handle or slot does.

use std::{
    collections::{BTreeMap, VecDeque},
    fs::{File, OpenOptions},
    path::Path,
    sync::{Arc, Mutex},
};

use memmap2::{MmapMut, MmapOptions, MmapRaw, UncheckedAdvice};

use crate::page_cache::{self, WritePath};

/// Space is handed out in units of this many bytes (a page).
pub const GRANULE_BYTES: u64 = 4096;

/// A file-backed region's written pages stay cached until this many bytes
/// were written after them.
pub const WRITE_BEHIND_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OverflowError {
    #[error(
        "overflow region full: {requested} bytes requested, {free_bytes} free of {max_bytes} (largest free extent {largest_free_bytes})"
    )]
    Full {
        requested: u64,
        free_bytes: u64,
        largest_free_bytes: u64,
        max_bytes: u64,
    },
    #[error("overflow region: max_bytes must be a positive multiple of {GRANULE_BYTES}, got {0}")]
    BadSize(u64),
    #[error("overflow region: {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// A bounded, thread-safe, memory-mapped area for spilled data. Cloning
/// gives another handle to the same region.
#[derive(Clone)]
pub struct OverflowRegion {
    mapping: Arc<Mapping>,
}

/// The mapping and its free list, shared by a region's handles and slots.
/// (A file-backed region's writes take its `behind` lock, writes and
/// waits included: writers to one file region queue, as they would for
/// the disk.)
struct Mapping {
    map: MmapRaw,
    max_bytes: u64,
    /// Free extents: offset -> length, merged with neighbours.
    free: Mutex<BTreeMap<u64, u64>>,
    /// A file-backed region's file, and the ranges written and not yet
    /// dropped from the page cache.
    behind: Option<Mutex<Behind>>,
}

struct Behind {
    file: File,
    /// Detected on the first write.
    path: Option<WritePath>,
    pending: VecDeque<(u64, u64)>,
    pending_bytes: u64,
}

impl std::fmt::Debug for OverflowRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverflowRegion")
            .field("max_bytes", &self.max_bytes())
            .field("used_bytes", &self.used_bytes())
            .field("free_extents", &self.free_extents())
            .finish()
    }
}

// SAFETY: the mapping is only written through disjoint ranges owned by live
// slots (the free list, behind its lock, never hands a range out twice), so
// sharing the region between threads cannot race on any byte.
unsafe impl Sync for Mapping {}
// SAFETY: as above; the mapping is not tied to the creating thread.
unsafe impl Send for Mapping {}

impl OverflowRegion {
    /// An anonymous region of at most `max_bytes`.
    pub fn anonymous(max_bytes: u64) -> Result<Self, OverflowError> {
        let len = Self::check_size(max_bytes)?;
        let map = MmapMut::map_anon(len).map_err(|source| OverflowError::Io {
            what: format!("mapping {max_bytes} anonymous bytes"),
            source,
        })?;
        Ok(Self::over(MmapRaw::from(map), max_bytes, None))
    }

    /// A region backed by the file at `path` (created or truncated to
    /// `max_bytes`), so its pages are the page cache's to write back.
    pub fn file(path: &Path, max_bytes: u64) -> Result<Self, OverflowError> {
        let len = Self::check_size(max_bytes)?;
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |source| OverflowError::Io { what, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io("opening"))?;
        file.set_len(max_bytes).map_err(io("sizing"))?;
        let map = MmapOptions::new()
            .len(len)
            .map_raw(&file)
            .map_err(io("mapping"))?;
        Ok(Self::over(map, max_bytes, Some(file)))
    }

    fn check_size(max_bytes: u64) -> Result<usize, OverflowError> {
        if max_bytes == 0 || !max_bytes.is_multiple_of(GRANULE_BYTES) {
            return Err(OverflowError::BadSize(max_bytes));
        }
        usize::try_from(max_bytes).map_err(|_| OverflowError::BadSize(max_bytes))
    }

    fn over(map: MmapRaw, max_bytes: u64, file: Option<File>) -> Self {
        Self {
            mapping: Arc::new(Mapping {
                map,
                max_bytes,
                free: Mutex::new(BTreeMap::from([(0, max_bytes)])),
                behind: file.map(|file| {
                    Mutex::new(Behind {
                        file,
                        path: None,
                        pending: VecDeque::new(),
                        pending_bytes: 0,
                    })
                }),
            }),
        }
    }

    pub fn max_bytes(&self) -> u64 {
        self.mapping.max_bytes
    }

    /// Bytes held by live slots (in whole granules).
    pub fn used_bytes(&self) -> u64 {
        self.mapping.max_bytes - self.mapping.lock().values().sum::<u64>()
    }

    /// Number of free extents: 1 when empty; it stays at most one more than
    /// the number of live slots.
    pub fn free_extents(&self) -> usize {
        self.mapping.lock().len()
    }

    /// Copies `data` into the region. A file-backed region may wait here
    /// for the writeback of what was written a window before (as the
    /// kernel throttles a writer that dirties pages faster than the disk
    /// takes them).
    pub fn write(&self, data: &[u8]) -> Result<OverflowSlot, OverflowError> {
        let len = data.len() as u64;
        let granted = len.div_ceil(GRANULE_BYTES) * GRANULE_BYTES;
        let offset = if granted == 0 {
            0
        } else {
            self.mapping.allocate(granted)?
        };
        // The slot owns its space from here: an error below drops it,
        // and its drop gives the space back.
        let slot = OverflowSlot {
            mapping: self.mapping.clone(),
            offset,
            len,
            granted,
        };
        if len > 0 {
            if self.mapping.behind.is_some() {
                self.mapping
                    .write_file(data, offset, granted)
                    .map_err(|source| OverflowError::Io {
                        what: "writing the region's file".to_owned(),
                        source,
                    })?;
            } else {
                // SAFETY: [offset, offset + len) lies inside the mapping
                // and belongs to this slot alone until it is freed.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        data.as_ptr(),
                        self.mapping.map.as_mut_ptr().add(offset as usize),
                        data.len(),
                    );
                }
            }
        }
        Ok(slot)
    }
}

impl Mapping {
    /// File-backed: writes `data` at `offset` (a slot of `granted`
    /// bytes) to the file, uncached, starts its writeback, and waits for
    /// the writeback of what was written more than a window before it (on
    /// either path: `RWF_DONTCACHE` pages leave when their writeback ends,
    /// which nothing else waits for), dropping it. Only the write's own
    /// failure fails the slot: the writeback and the drops are the cache's
    /// business (a lost drop leaves pages cached, nothing else).
    fn write_file(&self, data: &[u8], offset: u64, granted: u64) -> std::io::Result<()> {
        let Some(behind) = &self.behind else {
            return Ok(());
        };
        let mut b = behind.lock().unwrap_or_else(|p| p.into_inner());
        let b = &mut *b;
        page_cache::write_at(&b.file, data, offset, &mut b.path)?;
        let _ = page_cache::start_writeback(&b.file, offset, granted);
        b.pending.push_back((offset, granted));
        b.pending_bytes += granted;
        while b.pending_bytes > WRITE_BEHIND_BYTES {
            let Some((o, l)) = b.pending.pop_front() else {
                break;
            };
            b.pending_bytes -= l;
            // SAFETY: whole granules inside the mapping. Dropping a shared
            // file mapping's pages loses nothing: a dirty page stays in the
            // page cache (and is not dropped below), a clean one is read
            // back from the file. The range may belong to a live slot (its
            // own, or a newer one's after a free): readers fault it back.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, o as usize, l as usize)
            };
            let _ = page_cache::drop_range(&b.file, o, l);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, u64>> {
        // The free list is only changed by complete insert/remove pairs.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// First fit over the free extents, lowest offset first.
    fn allocate(&self, bytes: u64) -> Result<u64, OverflowError> {
        let mut free = self.lock();
        let found = free
            .iter()
            .find(|(_, len)| **len >= bytes)
            .map(|(o, l)| (*o, *l));
        let Some((offset, len)) = found else {
            return Err(OverflowError::Full {
                requested: bytes,
                free_bytes: free.values().sum(),
                largest_free_bytes: free.values().copied().max().unwrap_or(0),
                max_bytes: self.max_bytes,
            });
        };
        free.remove(&offset);
        if len > bytes {
            free.insert(offset + bytes, len - bytes);
        }
        Ok(offset)
    }

    /// Returns `[offset, offset + bytes)` to the free list, merged with its
    /// neighbours, and its pages to the kernel.
    fn release(&self, offset: u64, bytes: u64) {
        // SAFETY: the range is whole granules (pages) inside the mapping that
        // no live slot owns any more; dropping their pages only makes the
        // next reader see zeroes (or the file's contents), and no reader of
        // this range exists.
        let _ = unsafe {
            self.map.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                offset as usize,
                bytes as usize,
            )
        };
        let mut free = self.lock();
        let mut start = offset;
        let mut len = bytes;
        if let Some((&prev, &prev_len)) = free.range(..offset).next_back()
            && prev + prev_len == offset
        {
            free.remove(&prev);
            start = prev;
            len += prev_len;
        }
        if let Some(&next_len) = free.get(&(offset + bytes)) {
            free.remove(&(offset + bytes));
            len += next_len;
        }
        free.insert(start, len);
    }
}

/// Data parked in an [`OverflowRegion`]; the space is freed on drop.
pub struct OverflowSlot {
    mapping: Arc<Mapping>,
    offset: u64,
    len: u64,
    granted: u64,
}

impl std::fmt::Debug for OverflowSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverflowSlot")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl OverflowSlot {
    /// Bytes written.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes written, exactly.
    pub fn read(&self) -> Vec<u8> {
        let mut out = vec![0; self.len as usize];
        // SAFETY: [offset, offset + len) is this slot's, written by write().
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.mapping.map.as_ptr().add(self.offset as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        out
    }
}

impl Drop for OverflowSlot {
    fn drop(&mut self) {
        if self.granted > 0 {
            self.mapping.release(self.offset, self.granted);
        }
    }
}
