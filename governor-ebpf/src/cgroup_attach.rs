//! `cgroup_attach_task`: a task changed cgroup, so cached identities may be
//! stale; bumping the generation makes every CPU's cache miss once.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

use crate::{counters::add_u64, maps::GENERATION};

/// `TP_PROTO(struct cgroup *dst_cgrp, const char *path, struct task_struct
/// *task, bool threadgroup)`.
#[btf_tracepoint(function = "cgroup_attach_task")]
pub fn cgroup_attach_task(_ctx: BtfTracePointContext) -> u32 {
    match try_cgroup_attach_task() {
        Ok(v) | Err(v) => v,
    }
}

fn try_cgroup_attach_task() -> Result<u32, u32> {
    let generation = GENERATION.get_ptr_mut(0).ok_or(0u32)?;
    add_u64(generation, 1);
    Ok(0)
}
