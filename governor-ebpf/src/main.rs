//! Kernel side of nodedb-governor: attributes resident-memory changes of
//! governed processes to the engine of the thread that caused them.
//!
//! # Sources and why
//! * `rss_stat` (BTF tracepoint, kernel 5.5+) is the *quantity* source. It
//!   fires whenever one of an address space's RSS counters (`MM_FILEPAGES`,
//!   `MM_ANONPAGES`, `MM_SWAPENTS`, `MM_SHMEMPAGES`) changes. We read the
//!   counter's value from the `mm_struct` ourselves (its offsets come from
//!   kernel BTF at load time), keep the last value per (mm, counter) and take
//!   the difference with an atomic exchange, so the deltas attributed on all
//!   CPUs always telescope to the kernel's own counter: engines +
//!   unattributed add up to the process's RSS by construction. The classic
//!   tracepoint would hand us the value, but it costs a perf record and an
//!   exact per-CPU sum on every event (4.6% of a page fault on the 6.18 host
//!   with an *empty* program, against 0.1% for the BTF tracepoint).
//! * `page_fault_user` (BTF tracepoint, x86) counts faults and records which
//!   engine last faulted each 2 MiB region, so memory released by another
//!   thread can be charged back to the engine that faulted it in.
//! * `syscalls/sys_{enter,exit}_{munmap,madvise,brk,mmap}` bracket release
//!   syscalls (so negative deltas inside them go to the range's owner, never
//!   to the releaser) and count mapped bytes.
//! * `sched/sched_process_fork` and `sched/sched_process_exit` keep the TID
//!   fallback map right as threads come and go.
//! * `filemap/mm_filemap_{add_to,delete_from}_page_cache` attribute the
//!   page cache: see `page_cache`.
//! * `fentry/task_numa_fault` tells NUMA balancing's hinting faults from
//!   faults that bring memory in, so that reading another engine's memory
//!   does not take it over: see `numa_hint`.
//!
//! # Layout
//! One module per probe: `rss_stat`, `page_fault_user`, `numa_hint`,
//! `release` (munmap, madvise), `brk`, `mmap`, `sched` (switch, fork, exit), `cgroup_attach`;
//! `floor` holds the benchmark's empty programs (feature `bench`). Shared by
//! them: `maps`, `identity` (who the running thread is, and its per-CPU
//! cache), `counters` (adding to a slot) and `record` (classic tracepoint
//! fields at the offsets the agent found). The names of maps, programs and
//! globals are repeated in `nodedb_governor_common::names` for the agent.
//!
//! # The hot path
//! Every page fault runs `page_fault_user` and `rss_stat`, so both avoid
//! helper calls and hash lookups in the common case (on the nested-virtual
//! 6.18 host a single helper call costs about 1.4% of a fault). The running
//! thread's identity lives in a per-CPU cache that `sched_switch` clears when
//! another task gets the CPU; the process's counter state is an array entry;
//! the counter is read with one `bpf_probe_read_kernel` at an offset from
//! BTF (6.1's verifier refuses the direct load, see `rss_stat`).
//!
//! Nothing is sent to userspace per event: all counters are per-CPU array
//! entries that the agent sums when it reads them.
#![no_std]
#![no_main]
// The bpf target has no compare-and-swap, so core's Atomic* types hide
// fetch_add/swap; the intrinsics lower to BPF_ATOMIC add and xchg (ISA v3).
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic intrinsics, see above")]

mod brk;
mod cgroup_attach;
mod counters;
#[cfg(feature = "bench")]
mod floor;
mod identity;
mod maps;
mod mmap;
mod numa_hint;
mod page_cache;
mod page_fault_user;
mod record;
mod release;
mod rss_stat;
mod sched;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
