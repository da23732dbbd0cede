//! An engine: a named set of worker threads and the memory they hold.

use std::{
    io,
    sync::{Arc, Mutex, mpsc},
    thread,
};

use crate::memory::{self, Block, Kind, MIB};

type Job = Box<dyn FnOnce() + Send>;

struct Worker {
    tx: mpsc::Sender<Job>,
    tid: u32,
}

/// A named engine with its own worker threads.
pub struct Engine {
    pub name: String,
    workers: Vec<Worker>,
    blocks: Arc<Mutex<Vec<Block>>>,
}

/// Allocator blocks are this size, so they can be freed in exact amounts.
const MALLOC_BLOCK: usize = MIB;

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

impl Engine {
    /// Starts `threads` worker threads named after the engine.
    pub fn start(name: &str, threads: usize) -> Self {
        let workers = (0..threads)
            .map(|i| {
                let (tx, rx) = mpsc::channel::<Job>();
                let (tid_tx, tid_rx) = mpsc::channel();
                thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        let _ = tid_tx.send(gettid());
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawning an engine worker");
                Worker {
                    tx,
                    tid: tid_rx.recv().expect("worker tid"),
                }
            })
            .collect();
        Self {
            name: name.to_owned(),
            workers,
            blocks: Arc::new(Mutex::new(Vec::new())),
        }
    }

    pub fn tids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.tid).collect()
    }

    pub fn threads(&self) -> usize {
        self.workers.len()
    }

    /// Runs `f` on worker `i` and waits for its result.
    pub fn on<R: Send + 'static>(&self, i: usize, f: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = mpsc::channel();
        self.workers[i % self.workers.len()]
            .tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .expect("engine worker is gone");
        rx.recv().expect("engine worker died")
    }

    /// Runs `f(i)` on every worker at once and waits for all of them.
    pub fn on_all<R: Send + 'static>(
        &self,
        f: impl Fn(usize) -> R + Send + Sync + 'static,
    ) -> Vec<R> {
        let f = Arc::new(f);
        let rxs: Vec<_> = self
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let (tx, rx) = mpsc::channel();
                let f = f.clone();
                w.tx.send(Box::new(move || {
                    let _ = tx.send(f(i));
                }))
                .expect("engine worker is gone");
                rx
            })
            .collect();
        rxs.into_iter()
            .map(|rx| rx.recv().expect("engine worker died"))
            .collect()
    }

    /// Allocates and touches `bytes` of `kind`, split over the workers.
    pub fn alloc(&self, kind: Kind, bytes: usize) -> io::Result<()> {
        let n = self.workers.len();
        let blocks = self.blocks.clone();
        let results = self.on_all(move |i| -> io::Result<()> {
            let mut share = bytes / n + if i == 0 { bytes % n } else { 0 };
            let mut mine = Vec::new();
            while share > 0 {
                let len = if kind == Kind::Malloc {
                    share.min(MALLOC_BLOCK)
                } else {
                    share
                };
                mine.push(Block::new(kind, len)?);
                share -= len;
            }
            blocks.lock().expect("blocks").extend(mine);
            Ok(())
        });
        results.into_iter().collect()
    }

    /// Removes `bytes` of `kind` from the engine's holdings (splitting a
    /// mapping if needed) and returns them, still mapped.
    pub fn take(&self, kind: Kind, bytes: usize) -> Vec<Block> {
        let mut blocks = self.blocks.lock().expect("blocks");
        let mut taken = Vec::new();
        let mut want = bytes;
        let mut i = 0;
        while want > 0 && i < blocks.len() {
            if blocks[i].kind() != kind || blocks[i].resident_bytes() == 0 {
                i += 1;
                continue;
            }
            if blocks[i].len() <= want {
                want -= blocks[i].len();
                taken.push(blocks.remove(i));
            } else if let Some(front) = blocks[i].split_front(want) {
                want = 0;
                taken.push(front);
            } else {
                i += 1;
            }
        }
        taken
    }

    /// Gives memory back: `bytes` of `kind` freed by this engine's own
    /// workers (allocator memory is then trimmed).
    pub fn free(&self, kind: Kind, bytes: usize) {
        let taken = Mutex::new(self.take(kind, bytes));
        self.on(0, move || {
            drop(taken.into_inner().expect("taken"));
            if kind == Kind::Malloc {
                memory::trim_malloc();
            }
        });
    }

    /// Runs `f` over the engine's blocks (to look at where they are).
    pub fn with_blocks<R>(&self, f: impl FnOnce(&[Block]) -> R) -> R {
        f(&self.blocks.lock().expect("blocks"))
    }

    /// Keeps blocks that another engine handed over (or partly released).
    pub fn keep(&self, blocks: Vec<Block>) {
        self.blocks.lock().expect("blocks").extend(blocks);
    }

    /// Starts `threads` new threads from worker 0 (so they inherit its
    /// engine), each touching its share of `bytes` of anonymous memory and
    /// then exiting. The memory stays with the engine.
    pub fn spawn_and_exit(&self, threads: usize, bytes: usize) -> io::Result<Vec<u32>> {
        let blocks = self.blocks.clone();
        let name = self.name.clone();
        self.on(0, move || -> io::Result<Vec<u32>> {
            let handles: Vec<_> = (0..threads)
                .map(|i| {
                    let blocks = blocks.clone();
                    thread::Builder::new()
                        .name(format!("{name}-late-{i}"))
                        .spawn(move || -> io::Result<u32> {
                            let b = Block::new(Kind::Anon, bytes / threads)?;
                            blocks.lock().expect("blocks").push(b);
                            Ok(gettid())
                        })
                        .expect("spawning a late thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("late thread panicked"))
                .collect()
        })
    }

    /// Ground truth: bytes this engine holds that are resident.
    pub fn resident_bytes(&self) -> u64 {
        self.blocks
            .lock()
            .expect("blocks")
            .iter()
            .map(|b| b.resident_bytes() as u64)
            .sum()
    }
}

/// Spills an engine by giving back its newest blocks (unmapped, or freed
/// to the allocator and trimmed), for the agent's spill requests.
pub struct EngineSpill {
    blocks: Arc<Mutex<Vec<Block>>>,
}

impl nodedb_governor::SpillHandler for EngineSpill {
    fn reclaimable_bytes(&self) -> u64 {
        self.blocks
            .lock()
            .map(|b| b.iter().map(|x| x.resident_bytes() as u64).sum())
            .unwrap_or(0)
    }

    fn spill(&self, target_bytes: u64) -> u64 {
        let mut freed = 0u64;
        let mut malloc = false;
        {
            let Ok(mut blocks) = self.blocks.lock() else {
                return 0;
            };
            while freed < target_bytes {
                let Some(b) = blocks.pop() else { break };
                freed += b.resident_bytes() as u64;
                malloc |= b.kind() == Kind::Malloc;
            }
        }
        if malloc {
            memory::trim_malloc();
        }
        freed
    }
}

impl Engine {
    /// The engine's spill handler.
    pub fn spill_handler(&self) -> Arc<EngineSpill> {
        Arc::new(EngineSpill {
            blocks: self.blocks.clone(),
        })
    }
}
