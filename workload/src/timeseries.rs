//! Bulk timeseries ingest: points are buffered per series in raw form (16
//! bytes a point) in fixed chunks, each charged to the Timeseries budget
//! when it is allocated (a chunk never grows, so what is charged is what
//! is held). When a chunk is refused, or the agent asks for a spill, the
//! buffers are flushed: each series' points are Gorilla-compressed into a
//! segment and appended to the engine's file on disk (through the
//! library's uncached writer), and series by series the buffers'
//! reservations are released and the engine's arena gives the freed pages
//! back to the kernel (the `after_flush` hook, every 32 MiB and at the
//! end).

use std::{
    fs::File,
    io::{BufRead, Read, Write},
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use nodedb_governor::{EngineId, MemoryGovernor, Reservation, SpillHandler, UncachedWriter};

use crate::gorilla::{self, Encoder};

/// Points per reserved chunk of a series' buffer.
pub const CHUNK_POINTS: usize = 4096;
/// A flush has the arena give freed pages back every this many bytes.
const PURGE_EVERY: u64 = 32 << 20;
const POINT_BYTES: u64 = 16;

struct Series {
    /// Full chunks and the one being filled (each `CHUNK_POINTS` long).
    chunks: Vec<Vec<(i64, f64)>>,
}

impl Series {
    fn points(&self) -> impl Iterator<Item = &(i64, f64)> {
        self.chunks.iter().flatten()
    }

    fn len(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }
}

struct State {
    series: Vec<Series>,
    /// One reservation per chunk held by the buffers.
    chunks: Vec<Reservation>,
    /// Segments go out through the library's uncached writer: a flush
    /// does not leave its data in the page cache, where it would push
    /// out other engines' pages.
    out: UncachedWriter,
}

/// What the engine did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TimeseriesStats {
    pub points: u64,
    pub flushes: u64,
    pub spill_flushes: u64,
    pub refusals: u64,
    pub segments: u64,
    pub raw_bytes_flushed: u64,
    pub compressed_bytes: u64,
}

type Hook = Box<dyn Fn() + Send + Sync>;

pub struct Timeseries {
    governor: MemoryGovernor,
    path: PathBuf,
    after_flush: Option<Hook>,
    state: Mutex<State>,
    stats: Mutex<TimeseriesStats>,
    /// When each flush a spill request asked for started, and how long it
    /// took (it runs on the caller's thread, not the ingest's).
    spill_flushes: Mutex<Vec<(Instant, Duration)>>,
}

impl Timeseries {
    pub fn new(governor: &MemoryGovernor, series: usize, path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            governor: governor.clone(),
            path: path.to_owned(),
            after_flush: None,
            state: Mutex::new(State {
                series: (0..series).map(|_| Series { chunks: Vec::new() }).collect(),
                chunks: Vec::new(),
                out: UncachedWriter::create(path)?,
            }),
            stats: Mutex::new(TimeseriesStats::default()),
            spill_flushes: Mutex::new(Vec::new()),
        })
    }

    /// Runs `hook` after every flush, and every 32 MiB released during a
    /// long one (the workload purges the engine's arena there, so freed
    /// buffers leave the resident set at once).
    pub fn after_flush(mut self, hook: impl Fn() + Send + Sync + 'static) -> Self {
        self.after_flush = Some(Box::new(hook));
        self
    }

    pub fn stats(&self) -> TimeseriesStats {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The time spent in flushes that spill requests asked for and that
    /// started at or after `since`: the compression and writing an ingest
    /// that ended at `since` left to another thread, which its rate must
    /// still count.
    pub fn spill_flush_time_since(&self, since: Instant) -> Duration {
        self.spill_flushes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(at, _)| *at >= since)
            .map(|(_, took)| *took)
            .sum()
    }

    /// Appends one point to `series`; takes a chunk's reservation when the
    /// buffers grow by a chunk, flushing first when it is refused.
    pub fn ingest(&self, series: usize, ts: i64, value: f64) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let n = st.series.len();
        let s = &mut st.series[series % n];
        if s.chunks.last().is_none_or(|c| c.len() == CHUNK_POINTS) {
            let bytes = CHUNK_POINTS as u64 * POINT_BYTES;
            let r = match self.governor.try_reserve(EngineId::Timeseries, bytes) {
                Ok(r) => r,
                Err(_) => {
                    self.stats
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .refusals += 1;
                    self.flush_locked(&mut st, false)?;
                    // After a flush the buffers hold nothing: a refusal
                    // now means the budget is smaller than one chunk.
                    self.governor
                        .try_reserve(EngineId::Timeseries, bytes)
                        .map_err(std::io::Error::other)?
                }
            };
            st.chunks.push(r);
            st.series[series % n]
                .chunks
                .push(Vec::with_capacity(CHUNK_POINTS));
        }
        if let Some(c) = st.series[series % n].chunks.last_mut() {
            c.push((ts, value));
        }
        drop(st);
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).points += 1;
        Ok(())
    }

    /// Compresses every buffered series to disk and releases the buffers.
    /// Returns the bytes released.
    fn flush_locked(&self, st: &mut State, spill: bool) -> std::io::Result<u64> {
        let mut segments = 0;
        let (mut raw, mut compressed) = (0u64, 0u64);
        let (mut released, mut unpurged) = (0u64, 0u64);
        for i in 0..st.series.len() {
            let s = &mut st.series[i];
            if s.chunks.is_empty() {
                continue;
            }
            let mut e = Encoder::new();
            for &(t, v) in s.points() {
                e.push(t, v);
            }
            raw += s.len() as u64 * POINT_BYTES;
            let held = s.chunks.len();
            s.chunks = Vec::new();
            let seg = e.finish();
            st.out.write_all(&(i as u32).to_le_bytes())?;
            st.out.write_all(&(seg.len() as u32).to_le_bytes())?;
            st.out.write_all(&seg)?;
            compressed += seg.len() as u64;
            segments += 1;
            // The series is on its way to disk: its chunks' reservations go
            // now (they are all the same size), and every 32 MiB the arena
            // gives the freed pages back, so a long flush brings the
            // engine down as it goes rather than at its end.
            let n = held.min(st.chunks.len());
            let gone: u64 = st
                .chunks
                .drain(st.chunks.len() - n..)
                .map(|r| r.size())
                .sum();
            released += gone;
            unpurged += gone;
            if unpurged >= PURGE_EVERY
                && let Some(hook) = &self.after_flush
            {
                hook();
                unpurged = 0;
            }
        }
        st.out.flush()?;
        released += st.chunks.iter().map(Reservation::size).sum::<u64>();
        st.chunks.clear();
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.flushes += 1;
        stats.spill_flushes += u64::from(spill);
        stats.segments += segments;
        stats.raw_bytes_flushed += raw;
        stats.compressed_bytes += compressed;
        drop(stats);
        if let Some(hook) = &self.after_flush {
            hook();
        }
        Ok(released)
    }

    /// Flushes what is buffered (the end of the run).
    pub fn flush(&self) -> std::io::Result<u64> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.flush_locked(&mut st, false)
    }

    /// Reads every segment back: (points, sum of values), to check nothing
    /// was lost or changed. Streams the file a segment at a time: the
    /// engine's memory stays what one segment takes, not the file's size
    /// (which no budget was asked for).
    pub fn verify(&self) -> anyhow::Result<(u64, f64)> {
        let file = File::open(&self.path)?;
        let size = file.metadata()?.len();
        let mut file = std::io::BufReader::new(file);
        let (mut points, mut sum, mut at) = (0u64, 0.0, 0u64);
        let mut seg = Vec::new();
        loop {
            if file.fill_buf()?.is_empty() {
                break;
            }
            let mut head = [0u8; 8];
            anyhow::ensure!(at + 8 <= size, "a segment header is cut at byte {at}");
            file.read_exact(&mut head)?;
            let len = u32::from_le_bytes(head[4..8].try_into()?) as usize;
            // The length is checked against the file before anything is
            // allocated for it.
            anyhow::ensure!(at + 8 + len as u64 <= size, "a segment is cut at byte {at}");
            seg.resize(len, 0);
            file.read_exact(&mut seg)?;
            for (_, v) in gorilla::decode(&seg)? {
                points += 1;
                sum += v;
            }
            at += 8 + len as u64;
        }
        Ok((points, sum))
    }
}

impl SpillHandler for Timeseries {
    fn reclaimable_bytes(&self) -> u64 {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.chunks.iter().map(Reservation::size).sum()
    }

    fn spill(&self, _target_bytes: u64) -> u64 {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let freed = self.flush_locked(&mut st, true).unwrap_or(0);
        self.spill_flushes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((started, started.elapsed()));
        freed
    }
}
