//! Keeping flushes and spills out of the page cache.
//!
//! A buffered write leaves its pages in the page cache, and the kernel's
//! LRU treats them like any other: a timeseries engine that flushes
//! gigabytes of segments pushes another engine's hot pages (a vector
//! index's upper layers, mapped from its file) out of memory, and that
//! engine's next queries fault them back in from disk. Data written by a
//! flush or a spill is rarely read back soon, so it should not be cached.
//!
//! [`UncachedWriter`] writes a file so that what it wrote does not stay in
//! the cache, by one of two paths ([`WritePath`]):
//!
//! * [`WritePath::DontCache`]: `pwritev2(..., RWF_DONTCACHE)`, the kernel's
//!   uncached buffered I/O (the flag came in Linux 6.14; filesystems opt
//!   in: xfs and btrfs from 6.15, ext4 from 6.17). The write goes through the cache as usual, the
//!   kernel starts writeback at once and drops the pages when it
//!   completes; pages that were cached before the write stay.
//! * [`WritePath::WriteBehind`], everywhere else: after each chunk the
//!   writer starts its writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`)
//!   and, once the written data is more than a window ahead of a range,
//!   waits for that range's writeback and drops it
//!   (`posix_fadvise(POSIX_FADV_DONTNEED)`). At most about a window plus a
//!   chunk of the file is cached at any time, and the disk stays busy
//!   behind the writer instead of in bursts.
//!
//! The path is detected, not assumed: the first chunk is written with
//! `RWF_DONTCACHE`, and a kernel that does not know the flag, or a
//! filesystem that does not take it, answers `EOPNOTSUPP` before writing
//! anything; the chunk is then written again without it, and the writer
//! stays on write-behind. [`probe`] asks the same question of a directory.
//!
//! [`resident_bytes`] measures how much of a file is in the page cache
//! (`mincore` on a read-only mapping, which faults nothing in), and
//! [`drop_cached`] writes a file's dirty pages back and drops its cached
//! ones: what the agent's "drop cold cache" request does per file.

use std::{
    fs::File,
    io::{self, Write},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

/// `RWF_DONTCACHE` (uapi `linux/fs.h`, Linux 6.14): the `libc` crate does
/// not name it yet.
const RWF_DONTCACHE: libc::c_int = 0x0000_0080;

/// The page size drops are aligned to (the kernel drops whole pages).
const PAGE: u64 = 4096;

/// Bytes written per system call, and the granule of the write-behind.
pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
/// Write-behind: how far the written data runs ahead of the part already
/// written back and dropped.
pub const DEFAULT_WINDOW_BYTES: u64 = 8 << 20;

/// How a writer keeps its data out of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WritePath {
    /// `RWF_DONTCACHE`: the kernel drops the pages when their writeback
    /// completes.
    DontCache,
    /// `sync_file_range` + `posix_fadvise(DONTNEED)` behind the writer.
    WriteBehind,
}

impl WritePath {
    pub fn as_str(self) -> &'static str {
        match self {
            WritePath::DontCache => "dontcache",
            WritePath::WriteBehind => "write-behind",
        }
    }
}

impl std::fmt::Display for WritePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A writer whose data does not stay in the page cache. It appends to a
/// file from the offset it was opened at (positioned writes; the file's
/// own offset is not used), buffering up to a chunk, so a caller may write
/// in pieces of any size. [`finish`](Self::finish) writes the rest, makes
/// the data durable (`fdatasync`) and drops what is still cached; dropping
/// the writer without it writes the rest and drops it, without the
/// `fdatasync`, and ignores errors, as `BufWriter` does.
pub struct UncachedWriter {
    file: File,
    /// The path in use; `None` until the first chunk detects it.
    path: Option<WritePath>,
    buf: Vec<u8>,
    chunk: usize,
    window: u64,
    /// Where the file's data starts for this writer.
    start: u64,
    /// Where the next chunk goes.
    offset: u64,
    /// Write-behind: everything below this offset is written back and
    /// dropped.
    dropped_to: u64,
    /// Set by a failed write (the data after `offset` is lost, so nothing
    /// more is written) and by `finish`.
    stopped: bool,
}

impl UncachedWriter {
    /// Writes `file` from its current end, detecting the path.
    pub fn new(file: File) -> io::Result<Self> {
        let end = file.metadata()?.len();
        Ok(Self::at(file, end, None))
    }

    /// Creates (truncating) the file at `path` and writes it.
    pub fn create(path: &Path) -> io::Result<Self> {
        Self::new(File::create(path)?)
    }

    /// Writes `file` from its current end by the given path, without
    /// detection (`DontCache` where the kernel refuses it fails the
    /// writes with `EOPNOTSUPP`).
    pub fn with_path(file: File, path: WritePath) -> io::Result<Self> {
        let end = file.metadata()?.len();
        Ok(Self::at(file, end, Some(path)))
    }

    fn at(file: File, offset: u64, path: Option<WritePath>) -> Self {
        Self {
            file,
            path,
            buf: Vec::with_capacity(DEFAULT_CHUNK_BYTES),
            chunk: DEFAULT_CHUNK_BYTES,
            window: DEFAULT_WINDOW_BYTES,
            start: offset,
            offset,
            dropped_to: offset,
            stopped: false,
        }
    }

    /// Bytes per write (at least one page) and the write-behind window
    /// (at least a chunk).
    pub fn sizes(mut self, chunk_bytes: usize, window_bytes: u64) -> Self {
        assert!(
            self.buf.is_empty() && self.offset == self.start,
            "sizes are set before the first write"
        );
        self.chunk = chunk_bytes.max(4096).next_multiple_of(4096);
        self.window = window_bytes.max(self.chunk as u64);
        self.buf = Vec::with_capacity(self.chunk);
        self
    }

    /// The path in use: `None` until the first chunk went out (the
    /// detection happens there).
    pub fn path(&self) -> Option<WritePath> {
        self.path
    }

    /// Bytes accepted so far (written, or buffered).
    pub fn written_bytes(&self) -> u64 {
        self.offset - self.start + self.buf.len() as u64
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Writes what is buffered, makes the file's data durable and drops
    /// what is still cached. Returns the file and the path taken.
    pub fn finish(mut self) -> io::Result<(File, WritePath)> {
        if self.stopped {
            return Err(stopped());
        }
        self.write_buffered()?;
        self.file.sync_data()?;
        // DontCache drops each folio at the end of its writeback, which
        // the fdatasync waited for, but not everywhere (6.18's ext4 ends an
        // overwrite's writeback in interrupt context, where the drop is
        // skipped), and a folio may still be on its way out: advise the
        // whole range on either path. From the start: a large folio
        // straddling the last dropped boundary was left by that drop (the
        // kernel drops only folios wholly inside the range).
        advise_dontneed(&self.file, self.start, self.offset - self.start)?;
        let path = self.path.unwrap_or(WritePath::WriteBehind);
        // Nothing is left to do on drop.
        let file = self.file.try_clone()?;
        self.stopped = true;
        Ok((file, path))
    }

    /// Writes what is buffered, waits for the written range's writeback
    /// and drops it, on either path, without `fdatasync` (scratch data,
    /// such as a spill file, that need not outlive the process). Unlike a
    /// drop, it says what failed.
    pub fn close(mut self) -> io::Result<()> {
        if self.stopped {
            return Err(stopped());
        }
        self.write_buffered()?;
        // Nothing is left to do on drop.
        self.stopped = true;
        drop_range(&self.file, self.start, self.offset - self.start)
    }

    fn write_buffered(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.stopped {
            return Err(stopped());
        }
        let buf = std::mem::take(&mut self.buf);
        let result = self.write_chunk(&buf);
        self.buf = buf;
        match result {
            Ok(()) => {
                let len = self.buf.len() as u64;
                self.offset += len;
                self.buf.clear();
                if self.path == Some(WritePath::WriteBehind)
                    && let Err(e) = self.write_behind(len)
                {
                    // Written, but its writeback failed: what fdatasync
                    // would report, and the file's error cursor has moved
                    // past it. Nothing more is written, and finish fails.
                    self.stopped = true;
                    return Err(e);
                }
                Ok(())
            }
            Err(e) => {
                self.stopped = true;
                Err(e)
            }
        }
    }

    /// Writes all of `data` at `self.offset`, by the path in use (chosen
    /// here on the first chunk).
    fn write_chunk(&mut self, data: &[u8]) -> io::Result<()> {
        write_at(&self.file, data, self.offset, &mut self.path)
    }

    /// Starts writeback of the chunk just written, and drops what is more
    /// than a window behind it once its writeback is done.
    fn write_behind(&mut self, len: u64) -> io::Result<()> {
        start_writeback(&self.file, self.offset - len, len)?;
        if self.offset - self.dropped_to > self.window {
            // Whole pages: fadvise keeps a partial page at either end,
            // and a partial flush leaves offsets anywhere.
            let to = (self.offset - self.window) & !(PAGE - 1);
            drop_range(&self.file, self.dropped_to, to - self.dropped_to)?;
            self.dropped_to = to;
        }
        Ok(())
    }
}

impl Write for UncachedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.stopped {
            return Err(stopped());
        }
        let room = self.chunk - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.chunk {
            self.write_buffered()?;
        }
        Ok(n)
    }

    /// Writes what is buffered to the file (not to the disk: that is
    /// [`finish`](UncachedWriter::finish)).
    fn flush(&mut self) -> io::Result<()> {
        self.write_buffered()
    }
}

impl Drop for UncachedWriter {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let _ = self.write_buffered();
        if self.path == Some(WritePath::WriteBehind) {
            let _ = drop_range(&self.file, self.start, self.offset - self.start);
        }
    }
}

impl std::fmt::Debug for UncachedWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UncachedWriter")
            .field("path", &self.path)
            .field("written_bytes", &self.written_bytes())
            .finish()
    }
}

fn stopped() -> io::Error {
    io::Error::other("the writer accepts nothing more: an earlier write failed")
}

/// Which path an [`UncachedWriter`] takes for files in `dir`: writes one
/// page with `RWF_DONTCACHE` to a file it creates there and removes.
pub fn probe(dir: &Path) -> io::Result<WritePath> {
    static N: AtomicU64 = AtomicU64::new(0);
    let name: PathBuf = dir.join(format!(
        ".nodedb-governor-probe-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&name)?;
    let result = pwritev2(&file, &[0u8; 4096], 0, RWF_DONTCACHE);
    let _ = std::fs::remove_file(&name);
    match result {
        Ok(_) => Ok(WritePath::DontCache),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(WritePath::WriteBehind),
        Err(e) => Err(e),
    }
}

/// How much of `file` is in the page cache: `(resident, size)` in bytes,
/// by `mincore` on a read-only shared mapping of it (which faults nothing
/// in). It counts pages cached by anyone when the caller owns the file or
/// could open it for writing (Linux 5.0+); otherwise only the pages this
/// process has mapped, which for a fresh mapping is none.
/// A file opened write-only cannot be mapped: it is opened again, for
/// reading, through `/proc/self/fd`.
pub fn resident_bytes(file: &File) -> io::Result<(u64, u64)> {
    match mincore_file(file) {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
            let again = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
            mincore_file(&again)
        }
        other => other,
    }
}

fn mincore_file(file: &File) -> io::Result<(u64, u64)> {
    let size = file.metadata()?.len();
    if size == 0 {
        return Ok((0, 0));
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let len = usize::try_from(size).map_err(|_| io::Error::other("file too large to map"))?;
    // SAFETY: a new read-only mapping of a file we hold open; it is only
    // given to mincore and unmapped before returning.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if map == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let pages = size.div_ceil(page) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: `map` is a mapping of `len` bytes; `vec` has one byte per
    // page of it.
    let rc = unsafe { libc::mincore(map, len, vec.as_mut_ptr()) };
    let err = io::Error::last_os_error();
    // SAFETY: the mapping made above, of that length.
    unsafe { libc::munmap(map, len) };
    if rc != 0 {
        return Err(err);
    }
    let resident = vec.iter().filter(|&&b| b & 1 == 1).count() as u64;
    Ok(((resident * page).min(size), size))
}

/// Writes `file`'s dirty pages back and drops its cached pages (those no
/// process has mapped and locked). Returns the bytes the file had in the
/// cache before.
pub fn drop_cached(file: &File) -> io::Result<u64> {
    let (before, size) = resident_bytes(file)?;
    drop_range(file, 0, size)?;
    Ok(before)
}

/// Writes all of `data` at `offset` by `path`; `None`: tries
/// `RWF_DONTCACHE` and sets `path` to what the kernel took.
pub(crate) fn write_at(
    file: &File,
    data: &[u8],
    offset: u64,
    path: &mut Option<WritePath>,
) -> io::Result<()> {
    let mut done = 0;
    while done < data.len() {
        let at = offset + done as u64;
        let rest = &data[done..];
        let n = match *path {
            Some(WritePath::DontCache) => pwritev2(file, rest, at, RWF_DONTCACHE),
            Some(WritePath::WriteBehind) => pwritev2(file, rest, at, 0),
            None => match pwritev2(file, rest, at, RWF_DONTCACHE) {
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    // Refused before anything was written.
                    *path = Some(WritePath::WriteBehind);
                    continue;
                }
                other => {
                    if other.is_ok() {
                        *path = Some(WritePath::DontCache);
                    }
                    other
                }
            },
        };
        match n {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Starts the range's writeback, without waiting for it.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
}

/// Waits for the range's writeback (starting it) and drops it.
pub(crate) fn drop_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    sync_file_range(
        file.as_raw_fd(),
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )?;
    advise_dontneed(file, offset, len)
}

fn advise_dontneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain syscall on an open descriptor.
    let rc = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    // posix_fadvise returns the error number instead of setting errno.
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

fn sync_file_range(fd: libc::c_int, offset: u64, len: u64, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let rc =
        unsafe { libc::sync_file_range(fd, offset as libc::off64_t, len as libc::off64_t, flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pwritev2(file: &File, data: &[u8], offset: u64, flags: libc::c_int) -> io::Result<usize> {
    let iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: one iovec describing `data`, which outlives the call; the
    // kernel only reads it.
    let n = unsafe { libc::pwritev2(file.as_raw_fd(), &iov, 1, offset as libc::off_t, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
