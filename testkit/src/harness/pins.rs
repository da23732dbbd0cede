//! Removing the maps an agent pinned for a test's database, when it could
//! not remove them itself (it failed to start, or was killed).

use std::path::PathBuf;

use nodedb_governor_agent::paths::DEFAULT_PIN_DIR;

/// The pins of `database` (`/sys/fs/bpf/nodedb-governor/<database>`),
/// removed when dropped.
pub struct RemovedPins(pub String);

impl RemovedPins {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(DEFAULT_PIN_DIR).join(&self.0)
    }
}

impl Drop for RemovedPins {
    fn drop(&mut self) {
        let dir = self.path();
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("cleanup: removing {}: {e}", dir.display());
            }
            _ => {}
        }
    }
}
