//! Where the soak's engines spill: a small tmpfs that fills, written
//! through a writer that fails a share of its writes on purpose.

use std::{
    ffi::CString,
    fs,
    io::{self, Write},
    os::unix::{ffi::OsStrExt, fs::FileExt},
    path::{Path, PathBuf},
    sync::Mutex,
};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Why a write to the spill target failed.
#[derive(Debug)]
pub enum WriteFailure {
    /// Failed on purpose (the fault the soak injects).
    Injected,
    /// The tmpfs is full (the other fault the soak sets up).
    NoSpace,
    /// Anything else: not a fault the soak injects, so a violation.
    Other(io::Error),
}

/// A tmpfs mounted for the soak, unmounted when dropped.
pub struct SpillTarget {
    dir: PathBuf,
    per_mille: u32,
    rng: Mutex<ChaCha8Rng>,
}

/// Writes are made in pieces of this size, each of which may fail.
const PIECE: usize = 1 << 20;

impl SpillTarget {
    /// Mounts a tmpfs of `bytes` on `dir` (made if missing); writes fail
    /// `per_mille` times in a thousand, drawn from `seed`.
    pub fn mount(dir: &Path, bytes: u64, per_mille: u32, seed: u64) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)?;
        let target = CString::new(dir.as_os_str().as_bytes())?;
        // A run the kernel killed left its tmpfs mounted here (its pages
        // still charged to that run's cgroup): detached first, each layer.
        // SAFETY: a NUL-terminated path; fails (EINVAL) once nothing is
        // mounted there.
        while unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } == 0 {}
        let options = CString::new(format!("size={bytes},mode=0700"))?;
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if rc != 0 {
            anyhow::bail!(
                "mounting a {bytes}-byte tmpfs on {}: {}",
                dir.display(),
                io::Error::last_os_error()
            );
        }
        Ok(Self {
            dir: dir.to_owned(),
            per_mille,
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Spills the memory at `base..base + len` to `name` a piece at a
    /// time, each piece let go (`MADV_DONTNEED`) once it is in the file,
    /// so that spilling to a target that is memory too costs a piece at
    /// most, not the whole. When a write fails, every piece written so far
    /// is read back into place, the file shrinking as it is, and the
    /// failure returned: the memory is as it was and no file is left.
    ///
    /// # Safety
    /// `base..base + len` is a private anonymous mapping of the caller's,
    /// which nothing else reads or writes while this runs.
    pub unsafe fn spill_region(
        &self,
        name: &str,
        base: *mut u8,
        len: usize,
    ) -> Result<(), WriteFailure> {
        let path = self.path(name);
        // Read and write: a failed spill reads its pieces back.
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(classify)?;
        let mut done = 0;
        let result = (|| {
            while done < len {
                let n = PIECE.min(len - done);
                let fail = {
                    let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
                    rng.random_range(0..1000) < self.per_mille
                };
                if fail {
                    return Err(WriteFailure::Injected);
                }
                // SAFETY: within the caller's mapping, which only this
                // reads now.
                let piece = unsafe { std::slice::from_raw_parts(base.add(done), n) };
                f.write_all(piece).map_err(classify)?;
                // SAFETY: the same range, written out and no longer read.
                unsafe { libc::madvise(base.add(done).cast(), n, libc::MADV_DONTNEED) };
                done += n;
            }
            Ok(())
        })();
        if result.is_err() {
            while done > 0 {
                let start = (done - 1) / PIECE * PIECE;
                // SAFETY: as above; the range was let go and is written
                // back whole.
                let piece =
                    unsafe { std::slice::from_raw_parts_mut(base.add(start), done - start) };
                if let Err(e) = f.read_exact_at(piece, start as u64) {
                    drop(f);
                    let _ = fs::remove_file(&path);
                    return Err(WriteFailure::Other(e));
                }
                let _ = f.set_len(start as u64);
                done = start;
            }
            drop(f);
            let _ = fs::remove_file(&path);
        }
        result
    }
}

fn classify(e: io::Error) -> WriteFailure {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        WriteFailure::NoSpace
    } else {
        WriteFailure::Other(e)
    }
}

impl Drop for SpillTarget {
    fn drop(&mut self) {
        if let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) {
            // SAFETY: a NUL-terminated path; detaching leaves nothing
            // blocked on a file still open.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.dir);
    }
}
