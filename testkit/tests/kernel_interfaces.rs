//! The kernel interfaces the agent reads, on the running kernel: a PSI
//! trigger on the host's memory pressure, and the tracepoint formats the
//! programs' offsets come from. Needs root; elsewhere each test prints why
//! it skips.

use std::{path::Path, time::Duration};

use nodedb_governor_agent::{
    psi::PsiMonitor,
    tracefs::{TraceFs, member_kinds, trace_offsets},
};
use nodedb_governor_common::kind;
use nodedb_governor_testkit::privileged::skip_unless_privileged;

/// A trigger on the host's memory pressure arms (as root, with PSI in the
/// kernel) and rounds its window when it must.
#[test]
fn a_trigger_arms_on_the_host() {
    if skip_unless_privileged("PSI trigger") {
        return;
    }
    let m = PsiMonitor::start(
        Path::new("/proc/pressure/memory"),
        Duration::from_millis(100),
        Duration::from_millis(1000),
    )
    .expect("PSI trigger");
    assert!(m.window() >= Duration::from_millis(1000));
    assert_eq!(m.window().as_micros() % 1_000_000, 0);
    let st = m.status(false);
    assert_eq!(st.stall_us, 100_000);
    assert_eq!(st.window_rounded, m.window() != Duration::from_millis(1000));
    drop(m);
}

#[test]
fn reads_this_kernels_formats() {
    if skip_unless_privileged("reads_this_kernels_formats") {
        return;
    }
    let tracefs = TraceFs::find_or_mount().expect("tracefs");
    let offsets = trace_offsets(&tracefs).expect("this kernel's formats");
    assert!(offsets.munmap_len > offsets.munmap_addr);
    // The page cache events: inode, device, order, in the record's order.
    assert!(
        offsets.filemap_ino >= 8
            && offsets.filemap_dev > offsets.filemap_ino
            && offsets.filemap_order > offsets.filemap_dev,
        "{offsets:?}"
    );
    let rss = tracefs.format("kmem", "rss_stat").expect("rss_stat format");
    assert_ne!(member_kinds(&rss).expect("counter names")[1], kind::UNKNOWN);
}
