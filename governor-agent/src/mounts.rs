//! Mounting the pseudo filesystems the agent needs (tracefs, bpffs) when the
//! host has not.

use std::{ffi::CString, fs, io};

/// True when `path` is a mount point of filesystem type `fstype`.
pub fn is_mounted(path: &str, fstype: &str) -> bool {
    let Ok(info) = fs::read_to_string(super::paths::MOUNTINFO) else {
        return false;
    };
    info.lines().any(|line| {
        // "36 25 0:32 / /sys/fs/bpf rw,... - bpf bpf rw"
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        left.split_whitespace().nth(4) == Some(path)
            && right.split_whitespace().next() == Some(fstype)
    })
}

/// Where the cgroup v1 hierarchy of `controller` (`memory`, `cpuset`) is
/// mounted, if anywhere.
pub fn cgroup_v1(controller: &str) -> Option<std::path::PathBuf> {
    let info = fs::read_to_string(super::paths::MOUNTINFO).ok()?;
    info.lines().find_map(|line| {
        // "... /sys/fs/cgroup/memory rw,... - cgroup cgroup rw,memory"
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split_whitespace();
        let fstype = r.next()?;
        let _source = r.next()?;
        let options = r.next()?;
        (fstype == "cgroup" && options.split(',').any(|o| o == controller))
            .then(|| left.split_whitespace().nth(4).map(std::path::PathBuf::from))?
    })
}

/// Mounts a pseudo filesystem (`tracefs`, `bpf`) at `target`.
pub fn mount_pseudo(fstype: &str, target: &str) -> io::Result<()> {
    fs::create_dir_all(target)?;
    let c_type = CString::new(fstype).map_err(io::Error::other)?;
    let c_target = CString::new(target).map_err(io::Error::other)?;
    let c_source = CString::new("nodev").map_err(io::Error::other)?;
    // SAFETY: all pointers are valid NUL-terminated strings for the call;
    // data is null, which mount(2) accepts.
    let rc = unsafe {
        libc::mount(
            c_source.as_ptr(),
            c_target.as_ptr(),
            c_type.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes sure bpffs is mounted at [`super::paths::BPFFS`], mounting it (and
/// saying so) when it is not.
pub fn ensure_bpffs() -> io::Result<()> {
    if is_mounted(super::paths::BPFFS, "bpf") {
        return Ok(());
    }
    tracing::warn!(
        path = super::paths::BPFFS,
        "bpffs is not mounted; mounting it"
    );
    mount_pseudo("bpf", super::paths::BPFFS)
}
