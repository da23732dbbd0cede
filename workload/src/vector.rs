//! Vector search: vectors arrive in batches, each batch becomes an HNSW
//! segment (instant-distance) whose points, graph and stored payload (the
//! documents' fields, `payload_bytes` a vector) are charged to the Vector
//! budget. When a new segment's charge is refused, or the agent
//! asks for a spill, the oldest resident segments are evicted: their
//! vectors are written to disk and searched there by a scan (exact, and
//! slower), and their charge is released.

use std::{
    fs::File,
    io::{BufReader, Read, Write},
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

enum Segment {
    Resident {
        map: HnswMap<Vector, u32>,
        payload: Vec<u8>,
        charge: Reservation,
    },
    OnDisk {
        path: PathBuf,
        len: usize,
    },
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
            .map(|i| (i as u32 ^ first) as u8)
            .collect();
        lock(&self.segments).push(Segment::Resident {
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
        segs[i] = Segment::OnDisk { path, len };
        lock(&self.stats).evictions += 1;
        Ok(freed)
    }

    /// The `k` nearest vectors to `q`: (distance, id), nearest first.
    pub fn search(&self, q: &Vector, k: usize) -> std::io::Result<Vec<(f32, u32)>> {
        let segs = lock(&self.segments);
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k * (segs.len() + 1));
        let mut scans = 0;
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
                Segment::OnDisk { path, len } => {
                    scans += 1;
                    let mut r = BufReader::with_capacity(1 << 20, File::open(path)?);
                    let mut rec = [0u8; 4 + DIM * 4];
                    let mut local: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
                    for _ in 0..*len {
                        r.read_exact(&mut rec)?;
                        let id = u32::from_le_bytes(rec[..4].try_into().unwrap_or_default());
                        let mut v = [0f32; DIM];
                        for (j, c) in v.iter_mut().enumerate() {
                            let at = 4 + j * 4;
                            *c = f32::from_le_bytes(rec[at..at + 4].try_into().unwrap_or_default());
                        }
                        let d = q.distance(&Vector(v));
                        if local.len() < k || d < local[local.len() - 1].0 {
                            let at = local.partition_point(|x| x.0 <= d);
                            local.insert(at, (d, id));
                            local.truncate(k);
                        }
                    }
                    best.extend(local);
                }
            }
        }
        drop(segs);
        best.sort_by(|a, b| a.0.total_cmp(&b.0));
        best.truncate(k);
        let mut st = lock(&self.stats);
        st.searches += 1;
        st.disk_scans += scans;
        Ok(best)
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
