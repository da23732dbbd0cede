//! The tracing-cost benchmark's floor (feature `bench` only, so the agent's
//! object does not carry them): empty programs on the fault-path
//! tracepoints, the cost of running *any* program there on this kernel and
//! machine.

use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};

/// Empty program on `page_fault_user`.
#[btf_tracepoint(function = "page_fault_user")]
pub fn floor_page_fault_user(_ctx: BtfTracePointContext) -> u32 {
    0
}

/// Empty program on `rss_stat`.
#[btf_tracepoint(function = "rss_stat")]
pub fn floor_rss_stat(_ctx: BtfTracePointContext) -> u32 {
    0
}
