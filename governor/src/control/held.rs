//! What the database holds that the kernel cannot drop, read by the
//! library itself from the file the agent names at `welcome` (the
//! database's cgroup's `memory.stat`): the probe the link installs with
//! [`MemoryGovernor::set_outside_probe`](crate::MemoryGovernor::set_outside_probe),
//! so that reservations near the ceiling are decided on the kernel's
//! figure of the moment, not the agent's last one.

use std::{
    fs::File,
    os::unix::fs::{FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use super::wire::HeldFrom;

/// The most keys a `held_from` may name.
const MAX_KEYS: usize = 4;
/// A `memory.stat` is 1 to 4 KiB; it is read whole in one read of this.
const READ_BYTES: usize = 64 << 10;

/// An open `memory.stat` and the keys whose values are summed.
#[derive(Debug)]
pub(super) struct HeldReader {
    file: File,
    keys: Vec<String>,
    /// Reused between reads (under the lock, so readers take turns).
    buf: Mutex<Vec<u8>>,
}

/// Why a `held_from` was not taken.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeldError {
    #[error("held_from: {path:?} is not an absolute path to a memory.stat file")]
    Path { path: PathBuf },
    #[error("held_from: {count} keys (1 to {MAX_KEYS} expected)")]
    KeyCount { count: usize },
    #[error("held_from: key {key:?} is not a memory.stat key")]
    Key { key: String },
    #[error("held_from: opening {path:?}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl HeldReader {
    /// Checks what the agent sent and opens the file.
    pub(super) fn open(from: &HeldFrom) -> Result<Self, HeldError> {
        let path = Path::new(&from.stat);
        if !path.is_absolute() || path.file_name().is_none_or(|n| n != "memory.stat") {
            return Err(HeldError::Path {
                path: path.to_path_buf(),
            });
        }
        if from.keys.is_empty() || from.keys.len() > MAX_KEYS {
            return Err(HeldError::KeyCount {
                count: from.keys.len(),
            });
        }
        if let Some(key) = from
            .keys
            .iter()
            .find(|k| k.is_empty() || !k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        {
            return Err(HeldError::Key { key: key.clone() });
        }
        // Not blocking on what is not a file (a FIFO would hold the link's
        // thread for good).
        let open = || -> std::io::Result<File> {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(path)?;
            if !file.metadata()?.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            Ok(file)
        };
        let file = open().map_err(|source| HeldError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file,
            keys: from.keys.clone(),
            buf: Mutex::new(vec![0; READ_BYTES]),
        })
    }

    /// The sum of the keys' values now; None if the file cannot be read
    /// (the cgroup removed) or a key is missing.
    pub(super) fn read(&self) -> Option<u64> {
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        // In one read: a cgroup file is generated anew at each, so a
        // second could tear a line from the first. One that fills the
        // buffer is not this file.
        let n = self.file.read_at(&mut buf, 0).ok()?;
        if n == buf.len() {
            return None;
        }
        let buf = &buf[..n];
        let text = std::str::from_utf8(buf).ok()?;
        let mut sum = 0u64;
        for key in &self.keys {
            let value = text.lines().find_map(|line| {
                let (k, v) = line.split_once(' ')?;
                (k == key).then(|| v.trim().parse::<u64>().ok())?
            })?;
            sum = sum.saturating_add(value);
        }
        Some(sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory of its own under the system's temporary one, removed
    /// when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("nodedb-held-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn from(stat: &Path, keys: &[&str]) -> HeldFrom {
        HeldFrom {
            stat: stat.display().to_string(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn sums_the_named_keys_as_the_file_changes() {
        let dir = TempDir::new("sums");
        let stat = dir.path().join("memory.stat");
        std::fs::write(
            &stat,
            "cache 100\nrss 7\nshmem 5\ntotal_rss 4096\ntotal_shmem 1024\n",
        )
        .unwrap();
        let r = HeldReader::open(&from(&stat, &["total_rss", "total_shmem"])).unwrap();
        assert_eq!(r.read(), Some(5120));
        // Read again from the start: the file's figure of the moment.
        std::fs::write(&stat, "total_rss 1\ntotal_shmem 2\n").unwrap();
        assert_eq!(r.read(), Some(3));
        // A key gone: no figure, rather than a wrong one.
        std::fs::write(&stat, "total_rss 1\n").unwrap();
        assert_eq!(r.read(), None);
    }

    #[test]
    fn a_file_of_many_lines_is_read_whole_and_one_too_long_for_a_memory_stat_not_at_all() {
        let dir = TempDir::new("long");
        let stat = dir.path().join("memory.stat");
        let mut text = String::new();
        for i in 0..1000 {
            text.push_str(&format!("filler_{i} {i}\n"));
        }
        text.push_str("anon 42\nshmem 8\n");
        std::fs::write(&stat, &text).unwrap();
        let r = HeldReader::open(&from(&stat, &["anon", "shmem"])).unwrap();
        assert_eq!(r.read(), Some(50));
        std::fs::write(&stat, text.repeat(8)).unwrap();
        assert_eq!(r.read(), None);
    }

    #[test]
    fn what_is_not_a_memory_stat_and_its_keys_is_refused_by_name() {
        let dir = TempDir::new("refused");
        let stat = dir.path().join("memory.stat");
        std::fs::write(&stat, "anon 1\n").unwrap();
        let other = dir.path().join("secrets");
        std::fs::write(&other, "anon 1\n").unwrap();
        let err = |f: HeldFrom| HeldReader::open(&f).unwrap_err().to_string();
        assert!(err(from(&other, &["anon"])).contains("memory.stat"));
        assert!(err(from(Path::new("memory.stat"), &["anon"])).contains("absolute"));
        assert!(err(from(&stat, &[])).contains("0 keys"));
        assert!(err(from(&stat, &["a", "b", "c", "d", "e"])).contains("5 keys"));
        assert!(err(from(&stat, &["anon 1"])).contains("\"anon 1\""));
        assert!(err(from(&dir.path().join("x/memory.stat"), &["anon"])).contains("opening"));
        // A directory (or a FIFO) by that name: refused, not waited on.
        let fifo_dir = dir.path().join("fifo");
        std::fs::create_dir_all(&fifo_dir).unwrap();
        let fifo = fifo_dir.join("memory.stat");
        let c = std::ffi::CString::new(fifo.display().to_string()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        assert!(err(from(&fifo, &["anon"])).contains("not a regular file"));
        let d = dir.path().join("d/memory.stat");
        std::fs::create_dir_all(&d).unwrap();
        assert!(err(from(&d, &["anon"])).contains("not a regular file"));
    }
}
