//! A test binary run away from its target directory (copied into a VM's
//! initramfs by `cargo xtask vm-test`): the paths cargo compiled into it
//! (`CARGO_BIN_EXE_*`, `CARGO_TARGET_TMPDIR`) do not exist there, so two
//! variables name where its probes and a disk-backed scratch directory
//! are instead. Unset, the compiled paths stand.

use std::path::{Path, PathBuf};

/// The directory holding the probes the test runs.
pub const BIN_DIR_ENV: &str = "NODEDB_GOVERNOR_TEST_BIN_DIR";
/// A directory on a disk (not tmpfs: page-cache tests need one).
pub const DISK_DIR_ENV: &str = "NODEDB_GOVERNOR_TEST_DISK_DIR";

/// The probe `compiled` (a `CARGO_BIN_EXE_*` path), or its namesake in
/// `NODEDB_GOVERNOR_TEST_BIN_DIR`.
pub fn probe_bin(compiled: &str) -> PathBuf {
    let compiled = Path::new(compiled);
    match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => Path::new(&dir).join(compiled.file_name().expect("a binary's path")),
        None => compiled.to_owned(),
    }
}

/// `compiled` (`CARGO_TARGET_TMPDIR`, on the build's disk), or
/// `NODEDB_GOVERNOR_TEST_DISK_DIR`.
pub fn disk_dir(compiled: &str) -> PathBuf {
    std::env::var_os(DISK_DIR_ENV).map_or_else(|| PathBuf::from(compiled), PathBuf::from)
}
