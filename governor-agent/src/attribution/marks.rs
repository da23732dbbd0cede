//! Marks: where an engine's resident memory wakes the agent.
//!
//! The policy picks each engine's next threshold (in settled resident
//! bytes, the figure it judges by); this module writes it into the
//! `MARKS` array in the slot's own count (see
//! `nodedb_governor_common::SlotMark`), which differs from the settled
//! figure by the engine's share of changes made from outside the process
//! (reclaim). The programs report a crossing on the `MARK_EVENTS` ring
//! buffer and disarm the slot; the owner reads the buffer
//! ([`Attribution::drain_mark_events`]) and tells the policy.
//!
//! Why a mark and not an event per change: a page fault must not wake
//! anyone. Each CPU counts on its own and adds to the shared total only
//! when what it holds back is large against the distance to the mark, so
//! far from every mark a CPU touches the shared line once per
//! `MARK_MAX_BATCH` (16 MiB) of growth, and near one on every change of
//! the CPU the engine runs on. What CPUs it left hold back is the error
//! (see [`Attribution::arm`]).

use std::collections::BTreeMap;

use nodedb_governor_common::{MarkEvent, SlotMark};

use super::{Attribution, Reading};
use crate::error::AgentError;

/// A mark written again only when the offset between the slot's count and
/// the settled figure moved by more than this.
const MARK_TOLERANCE: i64 = 1 << 20;

/// One engine's mark, as asked and as written.
#[derive(Clone, Copy, Debug)]
pub(super) struct Armed {
    /// The mark in settled resident bytes (the policy's figure).
    settled: u64,
    /// What was written to the kernel (the slot's own count), if anything
    /// yet.
    written: Option<i64>,
}

/// The marks asked for, by slot.
pub(super) type Marks = BTreeMap<u32, Armed>;

impl Attribution {
    /// log2 of twice the CPU count, rounded up: all CPUs together hold
    /// back at most half the distance to a mark.
    fn mark_shift(&self) -> u64 {
        u64::from(
            (self.nr_cpus.max(1) * 2)
                .next_power_of_two()
                .trailing_zeros(),
        )
    }

    /// A slot taken into use: no mark, and a total of zero (its per-CPU
    /// part was zeroed with its counters).
    pub(super) fn reset_mark(&mut self, slot: u32) -> Result<(), AgentError> {
        self.marks.remove(&slot);
        self.mark_totals
            .set(slot, 0, 0)
            .map_err(|e| AgentError::ebpf(format!("resetting the mark total of slot {slot}"), e))?;
        self.write_mark(slot, None)
    }

    fn write_mark(&mut self, slot: u32, up: Option<i64>) -> Result<(), AgentError> {
        let value = SlotMark {
            up_bytes: up.unwrap_or(i64::MAX),
            armed: u64::from(up.is_some()),
            shift: self.mark_shift(),
        };
        self.mark_map
            .set(slot, value, 0)
            .map_err(|e| AgentError::ebpf(format!("writing the mark of slot {slot}"), e))
    }

    /// Asks for `engine` of `pid` to wake the agent when its settled
    /// resident bytes reach `bytes` (None: disarms it now). Written by
    /// [`sync_marks`](Self::sync_marks), which knows the offset.
    pub fn set_mark(&mut self, pid: u32, engine: &str, bytes: Option<u64>) {
        let Some(slot) = self
            .procs
            .get(&pid)
            .and_then(|p| p.engines.get(engine))
            .copied()
        else {
            return;
        };
        match bytes {
            // A new mark is written at the next sync, whatever was there.
            Some(settled) => {
                self.marks.insert(
                    slot,
                    Armed {
                        settled,
                        written: None,
                    },
                );
            }
            None => {
                if self
                    .marks
                    .remove(&slot)
                    .is_some_and(|a| a.written.is_some())
                    && let Err(e) = self.write_mark(slot, None)
                {
                    tracing::warn!(error = %e, "disarming a mark");
                }
            }
        }
    }

    /// Writes every mark asked for whose value in the slot's count is new
    /// or moved, from `reading` (the settled figure and the slot's count
    /// of the same moment). Returns the engines (pid, name) whose count
    /// had already reached the new mark when it was written: an engine
    /// growing fast can pass it between the reading and the write, and
    /// then no later change (it may have stopped) would report it. Those
    /// marks are disarmed; the caller treats them as crossed.
    pub fn sync_marks(&mut self, reading: &Reading) -> Vec<(u32, String)> {
        let mut writes = Vec::new();
        for p in &reading.processes {
            let Some(tracked) = self.procs.get(&p.pid) else {
                continue;
            };
            for (name, a) in &p.engines {
                let Some(slot) = tracked.engines.get(name) else {
                    continue;
                };
                let Some(armed) = self.marks.get(slot) else {
                    continue;
                };
                let offset = a.counted_bytes - a.resident_bytes as i64;
                let up = (armed.settled as i64).saturating_add(offset);
                if armed
                    .written
                    .is_none_or(|w| (w - up).abs() > MARK_TOLERANCE)
                {
                    writes.push((p.pid, name, *slot, up));
                }
            }
        }
        let mut passed = Vec::new();
        for (pid, name, slot, up) in writes {
            match self.arm(slot, up) {
                Ok(true) => {}
                Ok(false) => passed.push((pid, name.clone())),
                Err(e) => tracing::warn!(error = %e, "arming a mark"),
            }
        }
        passed
    }

    /// Arms `slot` to report when its count reaches `up`; false (and left
    /// disarmed) if it already has.
    ///
    /// The programs compare the shared total, not the exact count: CPUs
    /// the engine's threads left keep the growth they held back, and the
    /// total stays below the count by as much until they count again. The
    /// difference is read now, with the count, and the mark written in the
    /// total's terms, so what quiet CPUs hold at this moment does not make
    /// the crossing late; if one flushes later, the total jumps and may
    /// report early (the owner checks against the exact figure). What CPUs
    /// the threads leave after this moment hold back makes it late, by at
    /// most a share of the distance each had at its last change; if the
    /// engine stops growing inside that, the tick sees the crossing.
    fn arm(&mut self, slot: u32, up: i64) -> Result<bool, AgentError> {
        // The total first: a flush between the two reads then makes the
        // mark early (checked against the exact figure), never late.
        let total = self
            .mark_totals
            .get(&slot, 0)
            .map_err(|e| AgentError::ebpf(format!("reading the mark total of slot {slot}"), e))?;
        let s = self.read_slot(slot)?;
        let counted = super::settle::counted_bytes(&s);
        if counted >= up {
            self.marks.remove(&slot);
            self.write_mark(slot, None)?;
            return Ok(false);
        }
        self.write_mark(slot, Some(up.saturating_add(total - counted)))?;
        if let Some(a) = self.marks.get_mut(&slot) {
            a.written = Some(up);
        }
        Ok(true)
    }

    /// A crossing the programs reported: the slot's process, engine and
    /// the mark (settled bytes) it was armed at (None: a slot no longer in
    /// use, or disarmed since). The slot is disarmed.
    pub fn mark_crossed(&mut self, event: &MarkEvent) -> Option<(u32, String, u64)> {
        let armed = self.marks.remove(&event.slot)?;
        self.procs.values().find_map(|p| {
            p.engines
                .iter()
                .find(|(_, s)| **s == event.slot)
                .map(|(name, _)| (p.pid, name.clone(), armed.settled))
        })
    }

    /// Marks armed in the kernel now.
    pub fn armed_marks(&self) -> usize {
        self.marks.values().filter(|a| a.written.is_some()).count()
    }

    /// A descriptor of the ring buffer the programs report crossings on,
    /// for the owner to wait on: readable when there are records to
    /// [`drain`](Self::drain_mark_events) (None: no ring buffer).
    pub fn mark_events_fd(&self) -> Option<std::io::Result<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        self.mark_events
            .as_ref()
            .map(|ring| ring.as_fd().try_clone_to_owned())
    }

    /// The crossings the programs reported since the last drain, and how
    /// many records were not ones (cheap when there are none: it reads
    /// the ring's positions, no system call).
    pub fn drain_mark_events(&mut self) -> (Vec<MarkEvent>, u64) {
        let (mut events, mut bad) = (Vec::new(), 0);
        if let Some(ring) = &mut self.mark_events {
            while let Some(record) = ring.next() {
                match parse_mark_event(&record) {
                    Some(e) => events.push(e),
                    None => bad += 1,
                }
            }
        }
        (events, bad)
    }
}

/// The crossing in one ring-buffer record (None: not one of ours).
pub fn parse_mark_event(bytes: &[u8]) -> Option<MarkEvent> {
    (bytes.len() >= size_of::<MarkEvent>()).then(|| {
        // SAFETY: MarkEvent is plain old data (any bit pattern is valid),
        // and the length was checked; the record may be unaligned.
        unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MarkEvent>()) }
    })
}
