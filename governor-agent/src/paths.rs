//! Every filesystem location the agent touches, in one place.

/// Where tracefs is normally mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";
/// Older location, under debugfs.
pub const TRACEFS_LEGACY: &str = "/sys/kernel/debug/tracing";
/// bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";
/// Default directory for pinned maps (one per agent instance).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/nodedb-governor";
/// Kernel BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Candidate cgroup v2 mount points: a pure v2 host, then a hybrid host.
pub const CGROUP2_CANDIDATES: &[&str] = &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// Default runtime directory (admin socket).
pub const DEFAULT_RUN_DIR: &str = "/run/nodedb-governor";
/// Name of the admin socket inside the runtime directory.
pub const ADMIN_SOCKET: &str = "agent.sock";
/// Mount table.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Name of the control socket (libraries connect here) in the runtime directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// The host's memory pressure (PSI), when the database has no cgroup v2
/// directory of its own.
pub const HOST_MEMORY_PRESSURE: &str = "/proc/pressure/memory";

/// Makes `dir` (and its parents) if missing, mode 0755, and checks it
/// before anything is put there: a real directory (not a symlink), owned
/// by this process's uid (root), that no group or other user can write.
/// Otherwise whoever could write it could swap the agent's sockets or its
/// registry for their own.
pub fn private_dir(dir: &std::path::Path) -> Result<(), crate::error::AgentError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let unsafe_dir = |reason: String| crate::error::AgentError::UnsafeDir {
        path: dir.display().to_string(),
        reason,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| crate::error::AgentError::io(format!("creating {}", dir.display()), e))?;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| crate::error::AgentError::io(format!("reading {}", dir.display()), e))?;
    if !meta.file_type().is_dir() {
        return Err(unsafe_dir("it is not a directory (a symlink?)".into()));
    }
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(unsafe_dir(format!(
            "it is owned by uid {}, not {me}",
            meta.uid()
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(unsafe_dir(format!(
            "its mode {:04o} lets others write it",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` whole or not at all: a new temporary file
/// beside it (created exclusively, never through a symlink, mode 0600),
/// flushed to disk, renamed over `path`, and the directory flushed.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let dir = path.parent().unwrap_or(std::path::Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)?;
    let written = f.write_all(bytes).and_then(|()| f.sync_all());
    drop(f);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("nodedb-paths-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_directory_others_can_write_or_a_symlink_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = scratch("dirs");
        let run = d.join("run");
        private_dir(&run).unwrap();
        assert_eq!(
            std::fs::metadata(&run).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = private_dir(&run).unwrap_err().to_string();
        assert!(e.contains("mode 1777 lets others write it"), "{e}");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = d.join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        let e = private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_atomic_write_replaces_the_file_and_never_writes_through_a_symlink() {
        let d = scratch("write");
        std::fs::create_dir_all(&d).unwrap();
        let file = d.join("registry.json");
        write_atomically(&file, b"one").unwrap();
        write_atomically(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        // A symlink planted where the temporary file goes is replaced, not
        // followed: its target is left as it was.
        let target = d.join("target");
        std::fs::write(&target, b"untouched").unwrap();
        let tmp = d.join(format!(".registry.json.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&target, &tmp).unwrap();
        write_atomically(&file, b"three").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        assert_eq!(std::fs::read(&file).unwrap(), b"three");
        assert!(!tmp.exists());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
