//! Fixtures shared by the integration tests: an exact governor and a
//! spillable consumer. Each test crate uses a part of them.
#![allow(dead_code, reason = "each test crate uses some of the fixtures")]

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use nodedb_governor::{
    Budget, EngineId, MemoryGovernor, Reservation, SpillHandler, ThresholdsHandle,
};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// A governor that decides every reservation exactly (no thread-local
/// credit), so the figures a test reads are exact.
pub fn exact_governor(ceiling: u64, engines: &[(EngineId, u64, u64)]) -> MemoryGovernor {
    let mut b = Budget::builder(ceiling);
    for &(e, floor, cap) in engines {
        b = b.engine(e, floor, cap);
    }
    MemoryGovernor::with_batch(b.build().unwrap(), ThresholdsHandle::default(), 0)
}

/// A spillable consumer: holds 1 MiB chunks of one engine and "writes them
/// to disk" by dropping their reservations.
pub struct Chunks {
    pub engine: EngineId,
    pub held: Mutex<Vec<Reservation>>,
    pub cost: f64,
    /// Bytes its spills freed, and how many times it was asked.
    pub spilled: AtomicU64,
    pub calls: AtomicU64,
}

impl Chunks {
    /// `mib` chunks of `engine`, spilled at `cost` per byte.
    pub fn new(g: &MemoryGovernor, engine: EngineId, mib: u64, cost: f64) -> Arc<Self> {
        let held = (0..mib)
            .map(|_| g.try_reserve(engine, MIB).expect("room"))
            .collect();
        Arc::new(Self {
            engine,
            held: Mutex::new(held),
            cost,
            spilled: AtomicU64::new(0),
            calls: AtomicU64::new(0),
        })
    }

    pub fn held_bytes(&self) -> u64 {
        self.held
            .lock()
            .unwrap()
            .iter()
            .map(Reservation::size)
            .sum()
    }
}

impl SpillHandler for Chunks {
    fn reclaimable_bytes(&self) -> u64 {
        self.held_bytes()
    }
    fn cost_per_byte(&self) -> f64 {
        self.cost
    }
    fn spill(&self, target: u64) -> u64 {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut held = self.held.lock().unwrap();
        let mut freed = 0;
        while freed < target {
            let Some(r) = held.pop() else { break };
            freed += r.size();
        }
        self.spilled.fetch_add(freed, Ordering::Relaxed);
        freed
    }
}

/// The first two CPUs this process may run on, or None (with the reason
/// printed): the NUMA tests treat each as a node and pin threads to them.
pub fn two_cpus() -> Option<(u32, u32)> {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        eprintln!("skipped: two nodes need two CPUs to pin threads to, this process has {cpus:?}");
        return None;
    }
    Some((cpus[0], cpus[1]))
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> Vec<u32> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the set is ours and sized as passed.
    let rc = unsafe { libc::sched_getaffinity(0, size_of_val(&set), &mut set) };
    assert_eq!(
        rc,
        0,
        "sched_getaffinity: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: CPU_ISSET reads the set.
    (0..libc::CPU_SETSIZE as u32)
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: u32) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes the set.
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    // SAFETY: the set is ours and sized as passed.
    let rc = unsafe { libc::sched_setaffinity(0, size_of_val(&set), &set) };
    assert_eq!(
        rc,
        0,
        "pinning to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: sched_getcpu has no preconditions.
    assert_eq!(unsafe { libc::sched_getcpu() }, cpu as i32);
}
