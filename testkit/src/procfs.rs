//! What a probe reads about itself from `/proc`, the way the agent reads it.

/// VmRSS of this process in bytes (anon + file + shmem, as the kernel sums
/// it), read with the agent's own parser.
pub fn vm_rss_bytes() -> u64 {
    nodedb_governor_agent::procfs::rss_breakdown(std::process::id())
        .map(|b| b.total())
        .unwrap_or(0)
}
