//! The cache scenario's engines: a vector index served from a mapped file
//! whose hot part every query touches, and a timeseries flush that writes
//! Gorilla segments at disk speed. Together, under a ceiling that leaves
//! the page cache little room, they show cache cannibalization: the flush's
//! pages push the index's out, and queries fault them back from disk.
//!
//! The governed side: the flush writes through
//! [`UncachedWriter`](nodedb_governor::UncachedWriter) (its data does not
//! stay cached), and the vector engine holds its hot set resident with
//! `mlock2(MLOCK_ONFAULT)`, charged to its budget.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use memmap2::Mmap;
use nodedb_governor::{UncachedWriter, WritePath, page_cache};

use crate::gorilla::Encoder;

/// Floats per vector (a vector is 1 KiB: four to a page).
pub const DIM: usize = 256;
const VECTOR_BYTES: usize = DIM * 4;

/// A small, fast generator (xorshift64*): the scenario's randomness must
/// cost nothing next to what it measures.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    }
}

/// A vector index in a file, mapped read-only. Its first sixteenth stands
/// for HNSW's upper layers (every query starts there), the rest for the
/// neighbourhoods queries descend into.
pub struct HotIndex {
    map: Mmap,
    vectors: usize,
}

impl HotIndex {
    /// Writes an index of `bytes` (random vectors) to `path`, durably, and
    /// drops it from the page cache: each run starts with the same cold
    /// file.
    pub fn create(path: &Path, bytes: u64) -> anyhow::Result<()> {
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        let mut rng = Rng::new(0x1d3a);
        let mut v = [0u8; VECTOR_BYTES];
        for _ in 0..bytes / VECTOR_BYTES as u64 {
            for c in v.chunks_mut(4) {
                c.copy_from_slice(&rng.unit().to_le_bytes());
            }
            out.write_all(&v)?;
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        page_cache::drop_cached(&file)?;
        Ok(())
    }

    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the file is ours and nobody truncates it while mapped.
        let map = unsafe { Mmap::map(&file)? };
        let vectors = map.len() / VECTOR_BYTES;
        anyhow::ensure!(
            vectors >= 64,
            "{}: an index of {vectors} vectors",
            path.display()
        );
        Ok(Self { map, vectors })
    }

    pub fn bytes(&self) -> u64 {
        self.map.len() as u64
    }

    /// The mapped index (what the vector engine protects as its hot set).
    pub fn bytes_mapped(&self) -> &[u8] {
        &self.map
    }

    /// Reads every page (brings the whole index into the cache).
    pub fn warm(&self) -> u64 {
        let mut sum = 0u64;
        for page in self.map.chunks(4096) {
            // black_box: a read whose value is unused would be optimised
            // out, and the pages never touched.
            sum = sum.wrapping_add(u64::from(std::hint::black_box(page[0])));
        }
        std::hint::black_box(sum)
    }

    /// One query: `fanout` vectors, a quarter from the upper layers, the
    /// rest from anywhere in the index; returns the best dot product (so
    /// the reads cannot be optimised away).
    pub fn query(&self, rng: &mut Rng, q: &[f32; DIM], fanout: usize) -> f32 {
        let upper = (self.vectors / 16).max(1);
        let mut best = f32::MIN;
        for i in 0..fanout {
            let v = if i % 4 == 0 {
                rng.below(upper)
            } else {
                rng.below(self.vectors)
            };
            let bytes = &self.map[v * VECTOR_BYTES..(v + 1) * VECTOR_BYTES];
            let mut dot = 0.0f32;
            for (c, x) in bytes.chunks_exact(4).zip(q) {
                dot += f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * x;
            }
            best = best.max(dot);
        }
        best
    }

    /// Bytes of the index in the page cache: `mincore` on the index's own
    /// mapping (no second mapping of it, whose setup and teardown would
    /// contend with the queries' faults).
    pub fn resident_bytes(&self) -> u64 {
        let pages = self.map.len().div_ceil(4096);
        let mut vec = vec![0u8; pages];
        // SAFETY: the mapping is ours and `self.map.len()` long; `vec` has
        // a byte per page of it.
        let rc = unsafe {
            libc::mincore(
                self.map.as_ptr() as *mut libc::c_void,
                self.map.len(),
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return 0;
        }
        (vec.iter().filter(|&&b| b & 1 == 1).count() as u64 * 4096).min(self.bytes())
    }

    pub fn query_vector(rng: &mut Rng) -> [f32; DIM] {
        std::array::from_fn(|_| rng.unit())
    }
}

/// How the flush writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushWrites {
    /// Ordinary buffered writes, what a database does today.
    Buffered,
    /// Through the library's uncached writer, its write-behind running
    /// at most `window_bytes` ahead of what is written back and dropped.
    Uncached { window_bytes: u64 },
}

/// What a flush did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlushOutcome {
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
    pub files: u32,
    /// `dontcache`, `write-behind`, or `buffered`.
    pub path: String,
    /// The flushed files' bytes still in the page cache, each measured
    /// once made durable, summed.
    pub left_cached_bytes: u64,
}

/// Gorilla segments to flush: `series` series of `points` points each (a
/// random walk sampled every 10 s), encoded once; the flush writes them
/// over and over, each with its own header.
pub fn segments(series: usize, points: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0x7e57);
    (0..series)
        .map(|_| {
            let mut e = Encoder::new();
            let mut v = 100.0f64;
            for p in 0..points {
                v += f64::from(rng.unit()) * 0.5;
                e.push(
                    1_700_000_000_000 + p as i64 * 10_000,
                    (v * 100.0).round() / 100.0,
                );
            }
            e.finish()
        })
        .collect()
}

/// Writes `total` bytes of segments into files of `file_bytes` under
/// `dir`, each made durable when full (`fdatasync`), counting progress in
/// `written`. At most `rate` bytes a second (0: unlimited): a database
/// paces its background flushes so that they do not take the CPUs and
/// the disk from its queries.
///
/// The flush runs in `windows` windows of about equal bytes, each ending
/// with its last file made durable (so files should be no larger than a
/// window); `gate(k)` is called before window `k` and returns when it may
/// start (the scenario interleaves quiet windows with them). The
/// throughput counts the windows' time only.
#[allow(clippy::too_many_arguments)]
pub fn flush(
    dir: &Path,
    segs: &[Vec<u8>],
    total: u64,
    file_bytes: u64,
    rate: u64,
    how: FlushWrites,
    written: &AtomicU64,
    windows: u32,
    gate: &dyn Fn(u32),
) -> anyhow::Result<FlushOutcome> {
    let windows = u64::from(windows.max(1));
    let mut active = Duration::ZERO;
    let mut done = 0u64;
    let mut files = 0u32;
    let mut path_taken: Option<WritePath> = None;
    let mut left_cached = 0u64;
    let mut out: Option<Box<dyn SegmentSink>> = None;
    let mut in_file = 0u64;
    let mut i = 0usize;
    for k in 0..windows {
        gate(k as u32);
        let t0 = Instant::now();
        let from = done;
        let until = total * (k + 1) / windows;
        // The bytes written are due at `rate`: after each MiB, sleep until
        // the time they were due at.
        let mut next_pause = from + (1 << 20);
        // A window ends with its last file durable, as a flush is done
        // when its data is: a buffered writer's writeback is paid in its
        // window, not deferred into the quiet one after it.
        while done < total && (done < until || out.is_some()) {
            let sink = match &mut out {
                Some(sink) => sink,
                None => {
                    let name = dir.join(format!("segments-{files:04}.gorilla"));
                    files += 1;
                    in_file = 0;
                    i = 0;
                    out.insert(match how {
                        FlushWrites::Buffered => Box::new(BufWriter::with_capacity(
                            1 << 20,
                            File::create(&name)
                                .with_context(|| format!("creating {}", name.display()))?,
                        )),
                        FlushWrites::Uncached { window_bytes } => Box::new(
                            UncachedWriter::create(&name)
                                .with_context(|| format!("creating {}", name.display()))?
                                .sizes(page_cache::DEFAULT_CHUNK_BYTES, window_bytes),
                        ),
                    })
                }
            };
            let seg = &segs[i % segs.len()];
            sink.write_all(&(i as u32).to_le_bytes())?;
            sink.write_all(&(seg.len() as u32).to_le_bytes())?;
            sink.write_all(seg)?;
            let n = 8 + seg.len() as u64;
            in_file += n;
            done += n;
            i += 1;
            written.store(done, Ordering::Relaxed);
            if in_file >= file_bytes || done >= total {
                let sink = out.take().expect("a file is open");
                if let Some(p) = sink.finish()? {
                    path_taken = Some(p);
                }
                let name = dir.join(format!("segments-{:04}.gorilla", files - 1));
                left_cached += page_cache::resident_bytes(&File::open(&name)?)?.0;
            }
            if rate > 0 && done >= next_pause {
                next_pause += 1 << 20;
                sleep_until(t0 + Duration::from_secs_f64((done - from) as f64 / rate as f64));
            }
        }
        active += t0.elapsed();
    }
    let seconds = active.as_secs_f64();
    Ok(FlushOutcome {
        bytes: done,
        seconds,
        mib_per_s: done as f64 / 1048576.0 / seconds.max(1e-9),
        files,
        path: path_taken.map_or("buffered", WritePath::as_str).to_owned(),
        left_cached_bytes: left_cached,
    })
}

/// A flush file: written, then made durable.
trait SegmentSink: Write {
    /// Makes the file durable; returns the uncached path taken, if any.
    fn finish(self: Box<Self>) -> std::io::Result<Option<WritePath>>;
}

impl SegmentSink for BufWriter<File> {
    fn finish(self: Box<Self>) -> std::io::Result<Option<WritePath>> {
        let file = self.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()?;
        Ok(None)
    }
}

impl SegmentSink for UncachedWriter {
    fn finish(self: Box<Self>) -> std::io::Result<Option<WritePath>> {
        let (_, path) = UncachedWriter::finish(*self)?;
        Ok(Some(path))
    }
}

/// A thread's major faults so far (`/proc/self/task/TID/stat`, field 12).
pub fn thread_major_faults(tid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    // The command (field 2) may hold spaces: count from after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(9)?.parse().ok()
}

/// Percentile (0..=100) of microsecond latencies, sorting `v`.
pub fn percentile(v: &mut [u32], p: f64) -> Option<u32> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    Some(v[i.min(v.len() - 1)])
}

/// Sleeps until `deadline` (returns at once if it passed).
pub fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

pub const SAMPLE: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn major_faults_are_read_from_the_right_field() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let before = thread_major_faults(tid).expect("this thread's stat");
        // Minor faults do not move it: touch fresh anonymous memory.
        let v = vec![1u8; 8 << 20];
        assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 8 << 20);
        let after = thread_major_faults(tid).unwrap();
        assert!(
            after - before < 16,
            "{} major faults for anonymous memory: the field read is not majflt",
            after - before
        );
        // A mapped file read from disk does: an index dropped from the
        // cache, then read through its mapping.
        let dir = std::env::temp_dir().join(format!("nodedb-cache-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("index");
        HotIndex::create(&path, 4 << 20).unwrap();
        let index = HotIndex::open(&path).unwrap();
        let before = thread_major_faults(tid).unwrap();
        index.warm();
        let after = thread_major_faults(tid).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        if std::fs::read_to_string("/proc/mounts")
            .unwrap_or_default()
            .lines()
            .any(|l| l.split(' ').nth(1) == Some("/tmp") && l.contains("tmpfs"))
        {
            // tmpfs pages cannot be dropped: nothing to fault from disk.
            return;
        }
        assert!(
            after > before,
            "reading a 4 MiB file dropped from the cache took no major fault"
        );
    }

    #[test]
    fn a_flush_runs_in_windows_each_ending_with_its_files_whole() {
        let dir = std::env::temp_dir().join(format!("nodedb-flush-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let segs = segments(4, 1024);
        let written = AtomicU64::new(0);
        // At each gate: how far the flush got, and the files then on disk.
        let seen = std::sync::Mutex::new(Vec::new());
        let out = flush(
            &dir,
            &segs,
            4 << 20,
            1 << 20,
            0,
            FlushWrites::Buffered,
            &written,
            2,
            &|k| {
                let files = std::fs::read_dir(&dir).unwrap().count();
                seen.lock()
                    .unwrap()
                    .push((k, written.load(Ordering::Relaxed), files));
            },
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.bytes >= 4 << 20 && out.bytes < (4 << 20) + (64 << 10),
            "{out:?}"
        );
        assert_eq!(out.files, 4, "{out:?}");
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0], (0, 0, 0));
        // The second window starts after the first's 2 MiB, its two files
        // finished (the third not started), not mid-file.
        let (k, at, files) = seen[1];
        assert_eq!((k, files), (1, 2), "{seen:?}");
        assert!((2 << 20..(2 << 20) + (64 << 10)).contains(&at), "{seen:?}");
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<u32> = (1..=100).rev().collect();
        assert_eq!(percentile(&mut v, 50.0), Some(51));
        assert_eq!(percentile(&mut v, 99.0), Some(99));
        assert_eq!(percentile(&mut [], 99.0), None);
    }
}
