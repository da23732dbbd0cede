//! Removing the cgroups a test made (or had the agent make), even when it
//! fails.

use std::path::{Path, PathBuf};

/// Removes a cgroup directory and its children, deepest first (cgroupfs
/// takes only rmdir). What cannot be removed (a process still in it) is
/// said on stderr and left.
pub fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup(&e.path());
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            eprintln!("cleanup: removing {}: {e}", dir.display());
        }
        _ => {}
    }
}

/// A cgroup (and everything below it) removed when dropped. Declare it
/// before the processes that live in the cgroup, so it drops after they
/// are gone.
pub struct RemovedCgroup(pub PathBuf);

impl Drop for RemovedCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.0);
    }
}
