//! A test's own directory: configurations, sockets, logs, copies of
//! binaries.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use super::names::unique;

/// A fresh directory under the temporary directory, named by
/// [`unique`]`(prefix)` and removed with its contents when dropped. It is
/// world-readable (0755): tests run copies of the probes from it as
/// another uid.
pub struct ScratchDir {
    name: String,
    path: PathBuf,
}

impl ScratchDir {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        let path = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { name, path }
    }

    /// The directory's own name (unique; tests use it as the database's).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `text` to `file` in the directory; its path.
    pub fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path.join(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// A copy of the executable `bin` in the directory, for a uid the build
    /// tree may be out of reach of (a 0700 clone directory); its path.
    /// Copied once.
    pub fn copy_executable(&self, bin: &Path) -> PathBuf {
        let copy = self.path.join(bin.file_name().expect("a file"));
        if !copy.exists() {
            std::fs::copy(bin, &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        copy
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
