//! DataFusion's spill files, kept out of the page cache (feature
//! `datafusion`).
//!
//! A `GROUP BY` or a sort that spills writes its partitions once and reads
//! each back once, in the merge: cached, they would push other engines'
//! hot pages out for nothing. DataFusion lets a runtime create its spill
//! files through a [`TempFileFactory`]; [`UncachedSpillFiles`] is one that
//! writes them with the library's [`UncachedWriter`] and reads them back
//! dropping each chunk from the cache once read
//! (`POSIX_FADV_DONTNEED`). Install it with
//! `DiskManagerBuilder::default().with_temp_file_factory(...)`.
//!
//! The reads are blocking `read`s of 1 MiB, in the stream's `poll` (the
//! library has no async runtime of its own; DataFusion's default reads
//! through tokio's blocking pool): on a local disk, a chunk takes a
//! fraction of a millisecond to a few.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Write},
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use datafusion_common::{DataFusionError, Result};
use datafusion_execution::spill_file::{SpillFile, SpillWriter, TempFileFactory};
use futures::Stream;

use crate::page_cache::{self, UncachedWriter};

/// Bytes per read of a spill file.
const READ_CHUNK: usize = 1 << 20;

/// Creates DataFusion's spill files in a directory, written and read
/// without leaving their data in the page cache. Each file is removed when
/// DataFusion drops it.
#[derive(Debug)]
pub struct UncachedSpillFiles {
    dir: PathBuf,
    next: AtomicU64,
    /// Bytes written to every file made, so far.
    written: Arc<AtomicU64>,
}

impl UncachedSpillFiles {
    /// Spill files go in `dir` (created if missing; on a disk: a tmpfs
    /// keeps what is spilled in memory).
    pub fn new(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            next: AtomicU64::new(0),
            written: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Bytes written to spill files by this factory, in all.
    pub fn written_bytes(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

impl TempFileFactory for UncachedSpillFiles {
    fn create_temp_file(&self, description: &str) -> Result<Arc<dyn SpillFile>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // The description is DataFusion's ("HashAggregateSpill" and the
        // like): kept, for whoever lists the directory, without anything a
        // file name cannot hold.
        let what: String = description
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(32)
            .collect();
        let path = self
            .dir
            .join(format!("spill-{}-{n}-{what}", std::process::id()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_error(e, "creating", &path))?;
        Ok(Arc::new(UncachedSpillFile {
            path,
            size: Arc::new(AtomicU64::new(0)),
            written: self.written.clone(),
        }))
    }
}

fn io_error(e: io::Error, what: &str, path: &Path) -> DataFusionError {
    DataFusionError::IoError(io::Error::new(
        e.kind(),
        format!("{what} spill file {}: {e}", path.display()),
    ))
}

/// One spill file; removed when dropped.
struct UncachedSpillFile {
    path: PathBuf,
    size: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Drop for UncachedSpillFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl SpillFile for UncachedSpillFile {
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }

    fn size(&self) -> Option<u64> {
        Some(self.size.load(Ordering::Relaxed))
    }

    fn read_stream(&self) -> Result<Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>> {
        let file = File::open(&self.path).map_err(|e| io_error(e, "opening", &self.path))?;
        Ok(Box::pin(futures::stream::iter(DroppingReader {
            file: Some(file),
            offset: 0,
            path: self.path.clone(),
        })))
    }

    fn open_writer(&self) -> Result<Box<dyn SpillWriter>> {
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| io_error(e, "opening", &self.path))?;
        let writer = UncachedWriter::new(file).map_err(|e| io_error(e, "opening", &self.path))?;
        Ok(Box::new(UncachedSpillWriter {
            writer: Some(writer),
            size: self.size.clone(),
            written: self.written.clone(),
        }))
    }
}

struct UncachedSpillWriter {
    writer: Option<UncachedWriter>,
    size: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl UncachedSpillWriter {
    fn writer(&mut self) -> io::Result<&mut UncachedWriter> {
        self.writer
            .as_mut()
            .ok_or_else(|| io::Error::other("the spill file was finished"))
    }
}

impl Write for UncachedSpillWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.writer()?.write(buf)?;
        self.size.fetch_add(n as u64, Ordering::Relaxed);
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer()?.flush()
    }
}

impl SpillWriter for UncachedSpillWriter {
    /// Writes what is buffered, waits for the file's writeback and drops
    /// its pages (no `fdatasync`: a spill file does not outlive the
    /// process). On either path: `RWF_DONTCACHE` pages leave only when
    /// their writeback ends, which nothing else waits for.
    fn finish(&mut self) -> Result<()> {
        if let Some(w) = self.writer.take() {
            w.close()?;
        }
        Ok(())
    }
}

/// Reads a spill file a chunk at a time, dropping each chunk from the
/// page cache once read.
struct DroppingReader {
    file: Option<File>,
    offset: u64,
    path: PathBuf,
}

impl Iterator for DroppingReader {
    type Item = Result<Bytes>;

    fn next(&mut self) -> Option<Result<Bytes>> {
        let file = self.file.as_mut()?;
        let mut buf = vec![0u8; READ_CHUNK];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.file = None;
                    return Some(Err(io_error(e, "reading", &self.path)));
                }
            }
        }
        if filled == 0 {
            // A large folio that straddled two chunks was left by both
            // drops (the kernel drops only folios wholly in the range):
            // the whole file, once, at the end.
            let _ = page_cache::drop_range(file, 0, self.offset);
            self.file = None;
            return None;
        }
        // Read once, in the merge: not worth a page of anyone's cache.
        let _ = page_cache::drop_range(file, self.offset, filled as u64);
        self.offset += filled as u64;
        buf.truncate(filled);
        Some(Ok(Bytes::from(buf)))
    }
}
