//! Who the running thread is: its process's registration and its engine,
//! served from a per-CPU cache word on the hot path (see
//! `nodedb_governor_common::identity` for the word's layout and how it is
//! invalidated).

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid};
use nodedb_governor_common::{CgroupKey, identity as ident};

use crate::maps::{ENGINE_BY_CGROUP, ENGINE_BY_TID, GENERATION, IDENTITY_CACHE, PROCS};

/// The running thread's (TGID, TID).
#[inline(always)]
pub fn ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    ((pid_tgid >> 32) as u32, pid_tgid as u32)
}

/// Who the running thread is, for attribution.
#[derive(Clone, Copy)]
pub struct Identity {
    pub slot: u32,
    pub mm_index: u32,
}

/// The running thread's identity, or None if its process is not governed:
/// its cgroup first, then the TID map, else the process's unattributed
/// slot. Served from the per-CPU cache word while the same task keeps the
/// CPU and the generation holds.
#[inline(always)]
pub fn identity() -> Option<Identity> {
    let cache = IDENTITY_CACHE.get_ptr_mut(0)?;
    let generation = GENERATION.get(0).copied().unwrap_or(0);
    // SAFETY: `cache` is this CPU's entry of a live per-CPU map.
    let word = unsafe { core::ptr::read_volatile(cache) };
    if !ident::current(word, generation) {
        return resolve_identity(cache, generation);
    }
    (word & ident::GOVERNED != 0).then_some(Identity {
        slot: ident::slot(word),
        mm_index: ident::mm_index(word),
    })
}

/// The cache missed: resolve from the maps and refill it.
#[inline(always)]
fn resolve_identity(cache: *mut u64, generation: u64) -> Option<Identity> {
    let (tgid, tid) = ids();
    // SAFETY: map values are plain integers; we copy them out at once.
    let found = unsafe { PROCS.get(tgid) }.copied().map(|proc_| {
        let key = CgroupKey {
            // SAFETY: the helper takes no arguments and only reads current.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            tgid,
            _pad: 0,
        };
        // SAFETY: as above.
        let slot = if let Some(slot) = unsafe { ENGINE_BY_CGROUP.get(key) } {
            *slot
        } else if let Some(slot) = unsafe { ENGINE_BY_TID.get(tid) } {
            *slot
        } else {
            proc_.unattributed_slot
        };
        Identity {
            slot,
            mm_index: proc_.mm_index,
        }
    });
    let word = match found {
        Some(me) => ident::pack(true, me.slot, me.mm_index, generation),
        None => ident::pack(false, 0, 0, generation),
    };
    // SAFETY: as in identity(); one 64-bit store, so never torn.
    unsafe { core::ptr::write_volatile(cache, word) };
    found
}
