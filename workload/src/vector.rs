//! Vector search: vectors arrive in batches, each batch becomes an HNSW
//! segment (instant-distance) whose points, graph and stored payload (the
//! documents' fields, `payload_bytes` a vector) are charged to the Vector
//! budget. When a new segment's charge is refused, or the agent
//! asks for a spill, the oldest resident segments are evicted: their
//! vectors and payload are written to disk and searched there by a scan
//! (exact, and slower), and their charge is released. A search returns
//! documents: the payload of each of the `k` nearest is fetched (from
//! memory, or from an evicted segment's file) and checked.
//!
//! An evicted segment is read with direct I/O (`O_DIRECT`), as a database
//! reads its own files when it keeps their pages in budgets of its own:
//! through the page cache, every scan would leave the segment cached,
//! memory in the database's cgroup that no engine's budget counts and
//! that would make an evicted segment as fast as a resident one until the
//! kernel takes it back. A filesystem that refuses `O_DIRECT` (tmpfs
//! before Linux 6.6) is read through the cache, and the stats say so.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use instant_distance::{Builder, HnswMap, Point, Search};
use nodedb_governor::{EngineId, MemoryGovernor, Reservation, SpillHandler, UncachedWriter};

pub const DIM: usize = 64;
/// What a resident vector is charged: its 256 bytes, its zero-layer
/// neighbour list (2M = 64 ids), upper layers and its value, with room
/// for the build's scratch.
pub const CHARGE_PER_VECTOR: u64 = 1024;

/// How long a refused segment waits for room before it evicts: long enough
/// for an agent to hear the refusal (the library reports every 50 ms) and
/// give back what the engine lent, short beside a segment's build.
pub const REFUSAL_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// An evicted segment's record: the id, then the vector.
const RECORD: usize = 4 + DIM * 4;
/// Direct I/O works in whole blocks at aligned offsets.
const BLOCK: usize = 4096;
/// A scan reads this much at a time: whole blocks, and whole records
/// (4,096 of them), so no record straddles two reads.
const SCAN_WINDOW: usize = RECORD * BLOCK;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vector(pub [f32; DIM]);

impl Point for Vector {
    fn distance(&self, other: &Self) -> f32 {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| (a - b) * (a - b))
            .sum()
    }
}

/// Vector `id` of the data set: deterministic, so a reference can
/// regenerate any of them.
pub fn vector(id: u32) -> Vector {
    let mut x = u64::from(id).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut v = [0f32; DIM];
    for c in &mut v {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *c = (x >> 40) as f32 / (1u64 << 24) as f32;
    }
    Vector(v)
}

/// Byte `i` of the payload of the segment starting at vector `first`
/// (document `first + i / payload_bytes`'s fields).
fn payload_byte(first: u32, i: usize) -> u8 {
    (i as u32 ^ first) as u8
}

enum Segment {
    Resident {
        first: u32,
        map: HnswMap<Vector, u32>,
        payload: Vec<u8>,
        charge: Reservation,
    },
    OnDisk {
        first: u32,
        path: PathBuf,
        len: usize,
    },
}

/// A file read past the page cache where the filesystem allows it: one
/// that refuses `O_DIRECT` when the file is opened, or when it is read
/// (a block larger than 4 KiB, some stacked filesystems), is read through
/// the cache instead.
struct DirectFile {
    file: File,
    path: PathBuf,
    direct: bool,
}

impl DirectFile {
    fn open(path: &Path) -> std::io::Result<Self> {
        match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
        {
            Ok(file) => Ok(Self {
                file,
                path: path.to_owned(),
                direct: true,
            }),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Self {
                file: File::open(path)?,
                path: path.to_owned(),
                direct: false,
            }),
            Err(e) => Err(e),
        }
    }

    /// Reads `len` bytes at `offset` into `buf` (grown as needed) and
    /// returns them; the read itself covers the whole blocks around them.
    fn read<'b>(
        &mut self,
        buf: &'b mut Vec<u8>,
        offset: u64,
        len: usize,
    ) -> std::io::Result<&'b [u8]> {
        let start = offset - offset % BLOCK as u64;
        let skip = (offset - start) as usize;
        let span = (skip + len).next_multiple_of(BLOCK);
        // An aligned stretch inside the buffer (direct I/O wants the
        // memory aligned too).
        buf.resize(span + BLOCK, 0);
        let at = buf.as_ptr().align_offset(BLOCK).min(BLOCK);
        let window = &mut buf[at..at + span];
        let mut got = 0;
        while got < skip + len {
            match self.file.read_at(&mut window[got..], start + got as u64) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "{len} bytes at {offset}: the file ends at {}",
                            start + got as u64
                        ),
                    ));
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Direct I/O refused at the read: the rest through the
                // cache (which takes any offset and length).
                Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.file = File::open(&self.path)?;
                    self.direct = false;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(&buf[at + skip..at + skip + len])
    }
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct VectorStats {
    pub vectors: u64,
    pub segments: u64,
    pub evictions: u64,
    pub spill_evictions: u64,
    pub refusals: u64,
    pub searches: u64,
    pub disk_scans: u64,
    /// Documents returned, and those of them read from an evicted
    /// segment's file.
    pub documents: u64,
    pub documents_from_disk: u64,
    /// Bytes asked of evicted segments' files (scans and documents; a
    /// direct read covers the whole blocks around them).
    pub disk_bytes_read: u64,
    /// Whether those reads went past the page cache (`O_DIRECT`); false
    /// when the filesystem refused it, or nothing was read.
    pub direct_io: bool,
}

pub struct VectorEngine {
    governor: MemoryGovernor,
    payload_bytes: usize,
    dir: PathBuf,
    segments: Mutex<Vec<Segment>>,
    stats: Mutex<VectorStats>,
    /// How long a refused segment waits for room once (see
    /// [`REFUSAL_WAIT`]).
    refusal_wait: std::time::Duration,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VectorEngine {
    pub fn new(
        governor: &MemoryGovernor,
        dir: &Path,
        payload_bytes: usize,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            governor: governor.clone(),
            payload_bytes,
            dir: dir.to_owned(),
            segments: Mutex::new(Vec::new()),
            stats: Mutex::new(VectorStats::default()),
            refusal_wait: REFUSAL_WAIT,
        })
    }

    /// Sets how long a refused segment waits for room before it evicts;
    /// zero evicts at once (a fixed budget: no loan will come back).
    pub fn refusal_wait(mut self, wait: std::time::Duration) -> Self {
        self.refusal_wait = wait;
        self
    }

    pub fn stats(&self) -> VectorStats {
        *lock(&self.stats)
    }

    /// Builds a segment of vectors `first..first + n`. Its charge is taken
    /// first; refused, it waits its refusal wait ([`REFUSAL_WAIT`] unless
    /// set) for room once (a budget
    /// it lent may be on its way back: the refusal is what asks for it),
    /// and while it is still refused, older segments go to disk. Fails
    /// when nothing is left to evict and the charge is still refused.
    pub fn add_segment(&self, first: u32, n: u32) -> anyhow::Result<()> {
        let bytes = u64::from(n) * (CHARGE_PER_VECTOR + self.payload_bytes as u64);
        let mut waited = false;
        let charge = loop {
            match self.governor.try_reserve(EngineId::Vector, bytes) {
                Ok(r) => break r,
                Err(e) => {
                    lock(&self.stats).refusals += 1;
                    if !waited && !self.refusal_wait.is_zero() {
                        waited = true;
                        if let Ok(r) = self.governor.reserve_timeout(
                            EngineId::Vector,
                            bytes,
                            self.refusal_wait,
                        ) {
                            break r;
                        }
                    }
                    let mut segs = lock(&self.segments);
                    if self.evict_oldest(&mut segs)? == 0 {
                        anyhow::bail!("a {bytes}-byte segment does not fit the budget: {e}");
                    }
                }
            }
        };
        let points: Vec<Vector> = (first..first + n).map(vector).collect();
        let values: Vec<u32> = (first..first + n).collect();
        // Neighbours are chosen by distance alone: on uniform random
        // vectors the diversity heuristic costs six times the build time
        // (measured: 600 against 3,800 vectors a second) for a few points
        // of recall, which a wider search (ef 200) buys back.
        let map = Builder::default()
            .select_heuristic(None)
            .ef_search(200)
            .seed(u64::from(first))
            .build(points, values);
        // Each document's stored fields (every page written).
        let payload: Vec<u8> = (0..n as usize * self.payload_bytes)
            .map(|i| payload_byte(first, i))
            .collect();
        lock(&self.segments).push(Segment::Resident {
            first,
            map,
            payload,
            charge,
        });
        let mut st = lock(&self.stats);
        st.vectors += u64::from(n);
        st.segments += 1;
        Ok(())
    }

    /// Writes the oldest resident segment to disk; returns the bytes its
    /// charge released (0: nothing resident).
    fn evict_oldest(&self, segs: &mut [Segment]) -> std::io::Result<u64> {
        let Some(i) = segs
            .iter()
            .position(|s| matches!(s, Segment::Resident { .. }))
        else {
            return Ok(0);
        };
        let Segment::Resident {
            first,
            map,
            payload,
            charge,
        } = &segs[i]
        else {
            return Ok(0);
        };
        let path = self.dir.join(format!("segment-{i}.vec"));
        // Evicted because memory is short: through the uncached writer,
        // so the segment does not stay in the page cache either.
        let mut w = UncachedWriter::create(&path)?;
        let mut len = 0;
        for (pid, p) in map.iter() {
            w.write_all(&map.values[pid.into_inner() as usize].to_le_bytes())?;
            for c in p.0 {
                w.write_all(&c.to_le_bytes())?;
            }
            len += 1;
        }
        w.write_all(payload)?;
        // Written; not made durable (a scratch segment), and the drop
        // lets its pages go.
        w.flush()?;
        drop(w);
        let freed = charge.size();
        segs[i] = Segment::OnDisk {
            first: *first,
            path,
            len,
        };
        lock(&self.stats).evictions += 1;
        Ok(freed)
    }

    /// The `k` nearest vectors to `q`: (distance, id), nearest first,
    /// each document's payload fetched and checked (a search returns the
    /// documents, not only their ids). Resident segments are searched in
    /// their graphs; evicted ones are scanned from their files.
    pub fn search(&self, q: &Vector, k: usize) -> std::io::Result<Vec<(f32, u32)>> {
        let segs = lock(&self.segments);
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k * (segs.len() + 1));
        let (mut scans, mut read, mut direct) = (0, 0u64, false);
        let mut buf = Vec::new();
        for s in segs.iter() {
            match s {
                Segment::Resident { map, .. } => {
                    let mut search = Search::default();
                    best.extend(
                        map.search(q, &mut search)
                            .take(k)
                            .map(|i| (i.distance, *i.value)),
                    );
                }
                Segment::OnDisk { path, len, .. } => {
                    scans += 1;
                    let mut file = DirectFile::open(path)?;
                    let mut local: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
                    let bytes = len * RECORD;
                    let mut at = 0;
                    while at < bytes {
                        let n = SCAN_WINDOW.min(bytes - at);
                        let window = file.read(&mut buf, at as u64, n)?;
                        read += n as u64;
                        at += n;
                        for rec in window.chunks_exact(RECORD) {
                            let (id, v) = decode(rec);
                            let d = q.distance(&v);
                            if local.len() < k || d < local[local.len() - 1].0 {
                                let at = local.partition_point(|x| x.0 <= d);
                                local.insert(at, (d, id));
                                local.truncate(k);
                            }
                        }
                    }
                    direct |= file.direct;
                    best.extend(local);
                }
            }
        }
        best.sort_by(|a, b| a.0.total_cmp(&b.0));
        best.truncate(k);
        let mut from_disk = 0;
        for &(_, id) in &best {
            let (fetched, on_disk) = self.document(&segs, id, &mut buf)?;
            read += fetched;
            from_disk += u64::from(on_disk);
        }
        drop(segs);
        let mut st = lock(&self.stats);
        st.searches += 1;
        st.disk_scans += scans;
        st.documents += best.len() as u64;
        st.documents_from_disk += from_disk;
        st.disk_bytes_read += read;
        st.direct_io |= direct;
        Ok(best)
    }

    /// Fetches document `id`'s payload from the segment holding it and
    /// checks every byte; returns the bytes read from disk and whether
    /// it came from an evicted segment.
    fn document(
        &self,
        segs: &[Segment],
        id: u32,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<(u64, bool)> {
        let p = self.payload_bytes;
        let holding = segs.iter().find_map(|s| match s {
            Segment::Resident { first, map, .. }
                if (*first..*first + map.values.len() as u32).contains(&id) =>
            {
                Some((s, *first))
            }
            Segment::OnDisk { first, len, .. } if (*first..*first + *len as u32).contains(&id) => {
                Some((s, *first))
            }
            _ => None,
        });
        let Some((segment, first)) = holding else {
            return Err(std::io::Error::other(format!(
                "document {id} is in no segment"
            )));
        };
        let from = (id - first) as usize * p;
        let (bytes, read, on_disk) = match segment {
            Segment::Resident { payload, .. } => (&payload[from..from + p], 0, false),
            Segment::OnDisk { .. } if p == 0 => (&[][..], 0, true),
            Segment::OnDisk { path, len, .. } => {
                let mut file = DirectFile::open(path)?;
                (
                    file.read(buf, (len * RECORD + from) as u64, p)?,
                    p as u64,
                    true,
                )
            }
        };
        if let Some(bad) = bytes
            .iter()
            .enumerate()
            .position(|(i, b)| *b != payload_byte(first, from + i))
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("document {id}'s payload is wrong at byte {bad}"),
            ));
        }
        Ok((read, on_disk))
    }

    /// Bytes charged by resident segments.
    pub fn resident_charge(&self) -> u64 {
        lock(&self.segments)
            .iter()
            .map(|s| match s {
                Segment::Resident { charge, .. } => charge.size(),
                Segment::OnDisk { .. } => 0,
            })
            .sum()
    }
}

/// An evicted segment's record: (id, vector).
fn decode(rec: &[u8]) -> (u32, Vector) {
    let word = |at: usize| [rec[at], rec[at + 1], rec[at + 2], rec[at + 3]];
    let mut v = [0f32; DIM];
    for (j, c) in v.iter_mut().enumerate() {
        *c = f32::from_le_bytes(word(4 + j * 4));
    }
    (u32::from_le_bytes(word(0)), Vector(v))
}

/// The exact `k` nearest among vectors `0..n` (the reference for recall).
pub fn exact(q: &Vector, n: u32, k: usize) -> Vec<(f32, u32)> {
    let mut all: Vec<(f32, u32)> = (0..n).map(|i| (q.distance(&vector(i)), i)).collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    all.truncate(k);
    all
}

/// Share of `exact`'s ids that `found` has.
pub fn recall(found: &[(f32, u32)], exact: &[(f32, u32)]) -> f64 {
    let hits = exact
        .iter()
        .filter(|e| found.iter().any(|f| f.1 == e.1))
        .count();
    hits as f64 / exact.len().max(1) as f64
}

impl SpillHandler for VectorEngine {
    fn reclaimable_bytes(&self) -> u64 {
        self.resident_charge()
    }

    fn spill(&self, target_bytes: u64) -> u64 {
        let mut segs = lock(&self.segments);
        let mut freed = 0;
        while freed < target_bytes {
            match self.evict_oldest(&mut segs) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    freed += n;
                    lock(&self.stats).spill_evictions += 1;
                }
            }
        }
        freed
    }
}
