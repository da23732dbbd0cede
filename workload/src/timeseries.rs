//! Bulk timeseries ingest: points are buffered per series in raw form (16
//! bytes a point) in fixed chunks, each charged to the Timeseries budget
//! when it is allocated (a chunk never grows, so what is charged is what
//! is held). When a chunk is refused, or the agent asks for a spill, the
//! buffers are flushed: taken whole from the ingest (a memtable swap: the
//! ingest goes on into new buffers at once, within what the budget has
//! left), then each series' points are Gorilla-compressed into a segment
//! and appended to the engine's file on disk (through the library's
//! uncached writer; one flush writes at a time), and series by series the
//! buffers' reservations are released and the engine's arena gives the
//! freed pages back to the kernel (the `after_flush` hook, every 32 MiB
//! and at the end). A chunk refused while a spill's flush is under way
//! waits for that flush's releases rather than flushing behind it, as a
//! write stall behind an immutable memtable does.

use std::{
    fs::File,
    io::{BufRead, Read, Write},
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use nodedb_governor::{EngineId, MemoryGovernor, Reservation, SpillHandler, UncachedWriter};

use crate::gorilla::{self, Encoder};

/// Points per reserved chunk of a series' buffer.
pub const CHUNK_POINTS: usize = 4096;
/// A flush has the arena give freed pages back every this many bytes.
const PURGE_EVERY: u64 = 32 << 20;
const POINT_BYTES: u64 = 16;
/// How long the ingest waits for a chunk when its own buffers are flushed
/// and the budget still has no room (a write stall) before it fails.
const STALL_LIMIT: Duration = Duration::from_secs(60);

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

/// The buffers the ingest fills.
struct State {
    series: Vec<Series>,
    /// One reservation per chunk held by the buffers.
    chunks: Vec<Reservation>,
}

/// Buffers taken from the ingest for a flush: each series' chunks, and
/// their reservations (released as the series go to disk).
struct Frozen {
    series: Vec<(usize, Series)>,
    chunks: Vec<Reservation>,
}

impl State {
    /// Takes every buffered series and its reservations, leaving the
    /// ingest empty buffers.
    fn freeze(&mut self) -> Frozen {
        Frozen {
            series: self
                .series
                .iter_mut()
                .enumerate()
                .filter(|(_, s)| !s.chunks.is_empty())
                .map(|(i, s)| (i, std::mem::replace(s, Series { chunks: Vec::new() })))
                .collect(),
            chunks: std::mem::take(&mut self.chunks),
        }
    }
}

/// What the engine did.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TimeseriesStats {
    pub points: u64,
    pub flushes: u64,
    pub spill_flushes: u64,
    pub refusals: u64,
    /// Refusals that came again after the ingest's own flush, and the
    /// time it then waited for memory to be released (a write stall).
    pub stalls: u64,
    pub stalled_micros: u64,
    /// Refusals met while a flush was under way, and the time the ingest
    /// then waited for that flush's releases (instead of flushing its new
    /// buffers behind it).
    pub flush_waits: u64,
    pub flush_waited_micros: u64,
    pub segments: u64,
    pub raw_bytes_flushed: u64,
    pub compressed_bytes: u64,
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// How long each wait for a flush's releases lasts before the ingest
/// looks again whether the flush is still under way.
const FLUSH_WAIT_STEP: Duration = Duration::from_millis(20);

/// A flush under way, counted in `Timeseries::flushing` until dropped.
struct Flushing<'a>(&'a AtomicU32);

impl<'a> Flushing<'a> {
    fn start(n: &'a AtomicU32) -> Self {
        n.fetch_add(1, Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Timeseries {
    governor: MemoryGovernor,
    path: PathBuf,
    after_flush: Option<Hook>,
    state: Mutex<State>,
    /// Segments go out through the library's uncached writer: a flush
    /// does not leave its data in the page cache, where it would push
    /// out other engines' pages. Held by the flush writing.
    out: Mutex<UncachedWriter>,
    stats: Mutex<TimeseriesStats>,
    /// Flushes under way (taken, not yet written).
    flushing: AtomicU32,
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
            }),
            out: Mutex::new(UncachedWriter::create(path)?),
            stats: Mutex::new(TimeseriesStats::default()),
            flushing: AtomicU32::new(0),
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
    /// buffers grow by a chunk (see [`Self::chunk`]).
    pub fn ingest(&self, series: usize, ts: i64, value: f64) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = series % st.series.len();
        if st.series[i]
            .chunks
            .last()
            .is_none_or(|c| c.len() == CHUNK_POINTS)
        {
            let r;
            (st, r) = self.chunk(st)?;
            st.chunks.push(r);
            st.series[i].chunks.push(Vec::with_capacity(CHUNK_POINTS));
        }
        if let Some(c) = st.series[i].chunks.last_mut() {
            c.push((ts, value));
        }
        drop(st);
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).points += 1;
        Ok(())
    }

    /// A new chunk's reservation, and the buffers' lock again. Refused,
    /// the ingest waits for a flush under way to release what it took
    /// ([`Self::wait_for_flush`]); with none under way (or none that
    /// freed enough), it flushes its own buffers and asks again, and then
    /// stalls until memory is released.
    fn chunk<'a>(
        &'a self,
        st: MutexGuard<'a, State>,
    ) -> std::io::Result<(MutexGuard<'a, State>, Reservation)> {
        let bytes = CHUNK_POINTS as u64 * POINT_BYTES;
        if let Ok(r) = self.governor.try_reserve(EngineId::Timeseries, bytes) {
            return Ok((st, r));
        }
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refusals += 1;
        drop(st);
        let relock = || self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = self.wait_for_flush(bytes) {
            return Ok((relock(), r));
        }
        self.flush_buffers(false)?;
        // The buffers were flushed (and any flush under way when this one
        // started is done: one writes at a time). A refusal now is the
        // other engines' doing (the ceiling, or a NUMA node's part of it,
        // taken while the agent spills them) or a cap lowered for a
        // moment: the ingest stalls until memory is released, as a write
        // stall does, and gives up only after `STALL_LIMIT` (or at once if
        // one chunk can never fit).
        let r = match self.governor.try_reserve(EngineId::Timeseries, bytes) {
            Ok(r) => r,
            Err(_) => {
                let t0 = Instant::now();
                let r = self
                    .governor
                    .reserve_timeout(EngineId::Timeseries, bytes, STALL_LIMIT)
                    .map_err(std::io::Error::other);
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                stats.stalls += 1;
                stats.stalled_micros += t0.elapsed().as_micros() as u64;
                drop(stats);
                r?
            }
        };
        Ok((relock(), r))
    }

    /// While a flush is under way (a spill's, on another thread), waits
    /// for its releases to make room for `bytes`, as a write stall behind
    /// an immutable memtable does, rather than flushing the new buffers
    /// behind it: that would hold the ingest until the whole flush is
    /// written (one flush writes at a time) and leave small segments. The
    /// flush releases its buffers series by series, so the ingest goes on
    /// after the first of them. `None` when no flush is under way, when it
    /// ended without making room, or when the request could never fit.
    fn wait_for_flush(&self, bytes: u64) -> Option<Reservation> {
        if self.flushing.load(Ordering::Acquire) == 0 {
            return None;
        }
        let t0 = Instant::now();
        let r = loop {
            let asked = Instant::now();
            match self
                .governor
                .reserve_timeout(EngineId::Timeseries, bytes, FLUSH_WAIT_STEP)
            {
                Ok(r) => break Some(r),
                // Refused at once: it cannot fit, however much is freed.
                Err(_) if asked.elapsed() < FLUSH_WAIT_STEP / 2 => break None,
                Err(_) if self.flushing.load(Ordering::Acquire) == 0 => break None,
                Err(_) => {}
            }
        };
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.flush_waits += 1;
        stats.flush_waited_micros += t0.elapsed().as_micros() as u64;
        r
    }

    /// Compresses `frozen` to disk, series by series, releasing each
    /// series' reservations as it goes; one flush writes at a time.
    /// Returns the bytes released.
    fn write(&self, frozen: Frozen, spill: bool) -> std::io::Result<u64> {
        let Frozen { series, mut chunks } = frozen;
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let mut segments = 0;
        let (mut raw, mut compressed) = (0u64, 0u64);
        let (mut released, mut unpurged) = (0u64, 0u64);
        for (i, s) in series {
            let mut e = Encoder::new();
            for &(t, v) in s.points() {
                e.push(t, v);
            }
            raw += s.len() as u64 * POINT_BYTES;
            let held = s.chunks.len();
            drop(s);
            let seg = e.finish();
            out.write_all(&(i as u32).to_le_bytes())?;
            out.write_all(&(seg.len() as u32).to_le_bytes())?;
            out.write_all(&seg)?;
            compressed += seg.len() as u64;
            segments += 1;
            // The series is on its way to disk: its chunks' reservations go
            // now (they are all the same size), and every 32 MiB the arena
            // gives the freed pages back, so a long flush brings the
            // engine down as it goes rather than at its end.
            let n = held.min(chunks.len());
            let gone: u64 = chunks.drain(chunks.len() - n..).map(|r| r.size()).sum();
            released += gone;
            unpurged += gone;
            if unpurged >= PURGE_EVERY
                && let Some(hook) = &self.after_flush
            {
                hook();
                unpurged = 0;
            }
        }
        out.flush()?;
        drop(out);
        released += chunks.iter().map(Reservation::size).sum::<u64>();
        drop(chunks);
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

    /// Flushes what is buffered (the end of the run), after any flush
    /// under way.
    pub fn flush(&self) -> std::io::Result<u64> {
        self.flush_buffers(false)
    }

    /// Takes every buffer from the ingest and writes it ([`Self::write`]),
    /// counted as under way from before it takes them until it is written.
    fn flush_buffers(&self, spill: bool) -> std::io::Result<u64> {
        let _under_way = Flushing::start(&self.flushing);
        let frozen = self
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .freeze();
        self.write(frozen, spill)
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
        let started = Instant::now();
        let freed = self.flush_buffers(true).unwrap_or(0);
        self.spill_flushes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((started, started.elapsed()));
        freed
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, mpsc};

    use nodedb_governor::Budget;

    use super::*;

    /// A governor with `cap` bytes for the Timeseries engine, and an
    /// engine of 8 series whose first `after_flush` call (a spill's first
    /// purge point, 32 MiB released) says so on the first channel and
    /// holds the flush until the second one says go.
    fn held_at_first_purge(
        cap: u64,
        file: &Path,
    ) -> (
        MemoryGovernor,
        Arc<Timeseries>,
        mpsc::Receiver<()>,
        mpsc::SyncSender<()>,
    ) {
        let budget = Budget::builder(1 << 40)
            .engine(EngineId::Timeseries, 0, cap)
            .build()
            .unwrap();
        let governor = MemoryGovernor::new(budget);
        let (inside_tx, inside_rx) = mpsc::sync_channel::<()>(1);
        let (go_tx, go_rx) = mpsc::sync_channel::<()>(1);
        let (inside_tx, go_rx) = (Mutex::new(Some(inside_tx)), Mutex::new(go_rx));
        let ts = Arc::new(
            Timeseries::new(&governor, 8, file)
                .unwrap()
                .after_flush(move || {
                    if let Some(tx) = inside_tx.lock().unwrap().take() {
                        tx.send(()).unwrap();
                        go_rx.lock().unwrap().recv().unwrap();
                    }
                }),
        );
        (governor, ts, inside_rx, go_tx)
    }

    /// A spill's flush takes the buffers and lets the ingest go on: while
    /// the flush is held at its first purge point (32 MiB written), new
    /// points are buffered, and every point is read back once.
    #[test]
    fn the_ingest_goes_on_while_a_spill_flushes_what_it_took() {
        let dir = std::env::temp_dir().join(format!("nodedb-ts-swap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (governor, ts, inside_rx, go_tx) =
            held_at_first_purge(1 << 40, &dir.join("points.gorilla"));
        // 40 MiB of points, over the purge point.
        let first = 40 * (1 << 20) / POINT_BYTES;
        let mut sum = 0.0;
        for i in 0..first {
            let v = (i % 977) as f64 * 0.125;
            sum += v;
            ts.ingest((i % 8) as usize, i as i64, v).unwrap();
        }
        let buffered = ts.reclaimable_bytes();
        assert!(buffered >= first * POINT_BYTES, "{buffered}");
        let spiller = {
            let ts = ts.clone();
            std::thread::spawn(move || ts.spill(u64::MAX))
        };
        inside_rx.recv().unwrap();
        // The spill holds what it took; the ingest starts on empty buffers
        // and is not held up (on another thread, so that a flush that held
        // the ingest fails the test instead of hanging it).
        assert_eq!(ts.reclaimable_bytes(), 0);
        let (done_tx, done_rx) = mpsc::channel();
        {
            let ts = ts.clone();
            std::thread::spawn(move || {
                let mut sum = 0.0;
                for i in first..first + 10_000 {
                    let v = (i % 977) as f64 * 0.125;
                    sum += v;
                    ts.ingest((i % 8) as usize, i as i64, v).unwrap();
                }
                done_tx.send(sum).unwrap();
            });
        }
        sum += done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the ingest was held up by the spill's flush");
        assert!(ts.reclaimable_bytes() > 0);
        assert_eq!(ts.stats().flushes, 0, "the spill is still writing");
        go_tx.send(()).unwrap();
        let freed = spiller.join().unwrap();
        assert_eq!(freed, buffered);
        ts.flush().unwrap();
        let stats = ts.stats();
        assert_eq!((stats.flushes, stats.spill_flushes), (2, 1));
        assert_eq!(stats.points, first + 10_000);
        assert_eq!(ts.verify().unwrap(), (first + 10_000, sum));
        // Every reservation released (this thread's unused credit given back
        // first; the spill's thread gave its own back when it ended).
        governor.flush_thread_credit();
        assert_eq!(governor.usage(EngineId::Timeseries).unwrap().used_bytes, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Refused while a spill's flush is under way, the ingest waits for
    /// that flush's releases and keeps its new buffers, rather than
    /// flushing them behind it: held at the flush's first purge point, the
    /// ingest waits with its buffers whole, and goes on when the flush
    /// releases the rest; the spill's is the only flush.
    #[test]
    fn a_refused_ingest_waits_for_the_flush_under_way_instead_of_flushing_behind_it() {
        let dir = std::env::temp_dir().join(format!("nodedb-ts-wait-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        const MIB: u64 = 1 << 20;
        let (governor, ts, inside_rx, go_tx) =
            held_at_first_purge(48 * MIB, &dir.join("points.gorilla"));
        let point = |i: u64| (i % 977) as f64 * 0.125;
        // 40 MiB buffered, in eight series of 5 MiB.
        let first = 40 * MIB / POINT_BYTES;
        let mut sum = 0.0;
        for i in 0..first {
            sum += point(i);
            ts.ingest((i % 8) as usize, i as i64, point(i)).unwrap();
        }
        let spiller = {
            let ts = ts.clone();
            std::thread::spawn(move || ts.spill(u64::MAX))
        };
        // Held after seven series (35 MiB) are released: the spill still
        // holds 5 MiB, so 43 MiB of the 48 are left, and the ingest's next
        // 45 MiB are refused before their end.
        inside_rx.recv().unwrap();
        let second = 45 * MIB / POINT_BYTES;
        let (done_tx, done_rx) = mpsc::channel();
        {
            let ts = ts.clone();
            std::thread::spawn(move || {
                let mut sum = 0.0;
                for i in first..first + second {
                    sum += point(i);
                    ts.ingest((i % 8) as usize, i as i64, point(i)).unwrap();
                }
                done_tx.send(sum).unwrap();
            });
        }
        let waiting = {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if ts.stats().refusals > 0 {
                    break true;
                }
                if Instant::now() > deadline {
                    break false;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        assert!(waiting, "the ingest was never refused: {:?}", ts.stats());
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            done_rx.try_recv().is_err(),
            "the ingest went past the budget"
        );
        // Waiting with its new buffers whole: it flushed nothing itself.
        let held = ts.reclaimable_bytes();
        assert!(
            held >= 40 * MIB,
            "the ingest flushed its buffers: {held} left"
        );
        go_tx.send(()).unwrap();
        assert_eq!(spiller.join().unwrap(), first * POINT_BYTES);
        sum += done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the ingest went on once the flush released the rest");
        let stats = ts.stats();
        assert_eq!((stats.flushes, stats.spill_flushes), (1, 1), "{stats:?}");
        assert!(stats.flush_waits >= 1 && stats.stalls == 0, "{stats:?}");
        ts.flush().unwrap();
        assert_eq!(ts.verify().unwrap(), (first + second, sum));
        governor.flush_thread_credit();
        assert_eq!(governor.usage(EngineId::Timeseries).unwrap().used_bytes, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// When the ceiling is still full after the ingest flushed its own
    /// buffers (another engine took the room), the ingest waits for memory
    /// to be released rather than failing, and goes on once it is.
    #[test]
    fn the_ingest_stalls_until_another_engine_releases_the_ceiling() {
        let dir = std::env::temp_dir().join(format!("nodedb-ts-stall-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chunk = CHUNK_POINTS as u64 * POINT_BYTES;
        // Room for two chunks in all; each engine could take both.
        let budget = Budget::builder(2 * chunk)
            .engine(EngineId::Timeseries, 0, 2 * chunk)
            .engine(EngineId::Query, 0, 2 * chunk)
            .build()
            .unwrap();
        let governor = MemoryGovernor::new(budget);
        let query = governor.clone();
        let taken = std::sync::atomic::AtomicBool::new(false);
        let ts = Timeseries::new(&governor, 1, &dir.join("points.gorilla"))
            .unwrap()
            .after_flush(move || {
                // The first flush: the query engine takes all the room the
                // flush freed, and gives it back 300 ms later.
                if taken.swap(true, Ordering::Relaxed) {
                    return;
                }
                let r = query.try_reserve(EngineId::Query, 2 * chunk).unwrap();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(300));
                    drop(r);
                });
            });
        // Three chunks' points: the third chunk is refused (both taken),
        // the ingest flushes, the query engine takes the room.
        let n = 3 * CHUNK_POINTS as u64;
        let mut sum = 0.0;
        for i in 0..n {
            let v = (i % 977) as f64 * 0.125;
            sum += v;
            ts.ingest(0, i as i64, v)
                .expect("the ingest waits for the room instead of failing");
        }
        let stats = ts.stats();
        assert_eq!((stats.refusals, stats.stalls), (1, 1), "{stats:?}");
        // It went on only once the query engine released, 300 ms on.
        assert!(stats.stalled_micros >= 250_000, "{stats:?}");
        ts.flush().unwrap();
        assert_eq!(ts.verify().unwrap(), (n, sum));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
