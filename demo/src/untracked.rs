//! Memory an engine touched without reserving it (only the kernel knows),
//! with a spill handler that unmaps it and notes when it ran.

use std::{sync::Mutex, time::Instant};

use nodedb_governor::SpillHandler;

use crate::memory::{Block, Kind};

#[derive(Default)]
pub struct Untracked {
    pub blocks: Mutex<Vec<Block>>,
    /// Each spill: when it ran, its target and what it freed.
    pub spills: Mutex<Vec<(Instant, u64, u64)>>,
}

impl Untracked {
    /// Touches `bytes` more in blocks of `step`, on the calling thread.
    pub fn touch(&self, bytes: usize, step: usize) -> std::io::Result<()> {
        let mut done = 0;
        while done < bytes {
            let b = Block::new(Kind::Anon, step.min(bytes - done))?;
            done += b.len();
            self.blocks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(b);
        }
        Ok(())
    }

    pub fn held_bytes(&self) -> u64 {
        self.blocks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|b| b.len() as u64)
            .sum()
    }

    pub fn spilled_bytes(&self) -> u64 {
        self.spills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.2)
            .sum()
    }
}

impl SpillHandler for Untracked {
    fn reclaimable_bytes(&self) -> u64 {
        self.held_bytes()
    }
    fn spill(&self, target: u64) -> u64 {
        let at = Instant::now();
        let mut blocks = self.blocks.lock().unwrap_or_else(|p| p.into_inner());
        let mut freed = 0;
        while freed < target {
            let Some(b) = blocks.pop() else { break };
            freed += b.len() as u64;
        }
        // Recorded before the blocks' lock is let go, so whoever sees the
        // memory gone also sees the spill.
        self.spills
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, target, freed));
        drop(blocks);
        freed
    }
}
