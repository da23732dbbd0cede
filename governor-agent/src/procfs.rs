//! What the agent reads from /proc.

use std::fs;

use super::error::AgentError;

/// A process's resident memory by kind, from `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssBreakdown {
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
    pub swap: u64,
}

impl RssBreakdown {
    /// VmRSS: anon + file + shmem.
    pub fn total(&self) -> u64 {
        self.anon + self.file + self.shmem
    }
}

fn read(pid: u32, file: &str) -> Result<String, AgentError> {
    fs::read_to_string(format!("/proc/{pid}/{file}")).map_err(|e| gone_or(pid, file, e))
}

/// A failed read of `/proc/<pid>/<file>`: the process is gone (no such
/// entry, or it exited while read), or it could not be read (out of
/// descriptors, say), which says nothing of whether it lives.
fn gone_or(pid: u32, file: &str, e: std::io::Error) -> AgentError {
    if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        AgentError::NoSuchProcess { pid }
    } else {
        AgentError::io(format!("reading /proc/{pid}/{file}"), e)
    }
}

/// A pidfd for `pid` (None if the kernel gives none: too old, the process
/// gone, or out of descriptors).
pub fn pidfd_open(pid: u32) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a
    // new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: as above, a fresh descriptor nobody else holds.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A pidfd for the process at the other end of the Unix socket `socket`,
/// as it was when it connected (`SO_PEERPIDFD`, Linux 6.5 on; None before).
pub fn peer_pidfd(socket: std::os::fd::BorrowedFd<'_>) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut fd: libc::c_int = -1;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int (a new descriptor we own) on a live
    // socket.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&raw mut fd).cast(),
            &mut len,
        )
    };
    // SAFETY: as above.
    (r == 0 && fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// The supplementary groups of the process at the other end of the Unix
/// socket `socket`, as they were when it connected (`SO_PEERGROUPS`,
/// Linux 4.13 on): the kernel's own record, beside `SO_PEERCRED`'s uid
/// and gid, with no /proc read that a changed or reused pid could fool.
pub fn peer_groups(socket: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // NGROUPS_MAX is 65536; most processes have a handful.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `groups`,
        // which holds that many, and sets `len` to what it wrote (or, on
        // ERANGE, to what it needs).
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() {
            return Err(e);
        }
        groups.resize(n, 0);
    }
}

/// Whether the process a pidfd names has exited (its pid may be given to
/// another process from then on).
pub fn pidfd_exited(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 && p.revents != 0 }
}

/// Whether the process `pid` that started at `start_time` still runs.
#[derive(Debug)]
pub enum Liveness {
    Alive,
    /// Exited (its pid may be another process's now).
    Gone,
    /// `/proc` could not be read: not known.
    Unknown(AgentError),
}

pub fn liveness(pid: u32, started: u64) -> Liveness {
    match start_time(pid) {
        Ok(t) if t == started => Liveness::Alive,
        Ok(_) | Err(AgentError::NoSuchProcess { .. }) => Liveness::Gone,
        Err(e) => Liveness::Unknown(e),
    }
}

/// Parses the `kB` fields of a status file.
pub fn parse_rss(status: &str) -> RssBreakdown {
    let mut out = RssBreakdown::default();
    for line in status.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let bytes = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .map(|kb| kb * 1024)
            .unwrap_or(0);
        match key {
            "RssAnon" => out.anon = bytes,
            "RssFile" => out.file = bytes,
            "RssShmem" => out.shmem = bytes,
            "VmSwap" => out.swap = bytes,
            _ => {}
        }
    }
    out
}

/// Resident memory of `pid` by kind.
pub fn rss_breakdown(pid: u32) -> Result<RssBreakdown, AgentError> {
    Ok(parse_rss(&read(pid, "status")?))
}

/// Start time of `pid` in clock ticks since boot (field 22 of stat): with
/// the pid it identifies a process across pid reuse.
pub fn start_time(pid: u32) -> Result<u64, AgentError> {
    let stat = read(pid, "stat")?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or_else(|| {
        AgentError::io(
            format!("parsing /proc/{pid}/stat"),
            std::io::Error::other("no ')'"),
        )
    })?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            AgentError::io(
                format!("parsing /proc/{pid}/stat"),
                std::io::Error::other("no starttime"),
            )
        })
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> Result<Vec<u32>, AgentError> {
    let dir = fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => AgentError::NoSuchProcess { pid },
        _ => AgentError::io(format!("listing /proc/{pid}/task"), e),
    })?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Who a process acts as: its effective uid and gid, and its
/// supplementary groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Creds {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Parses the `Uid:`, `Gid:` and `Groups:` lines of /proc/<pid>/status
/// (the effective id is the second of each).
pub fn parse_creds(status: &str) -> Option<Creds> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
    let effective =
        |name: &str| -> Option<u32> { field(name)?.split_whitespace().nth(1)?.parse().ok() };
    Some(Creds {
        uid: effective("Uid:")?,
        gid: effective("Gid:")?,
        groups: field("Groups:")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?,
    })
}

/// `pid`'s credentials, read now.
pub fn creds(pid: u32) -> Result<Creds, AgentError> {
    parse_creds(&read(pid, "status")?).ok_or_else(|| {
        AgentError::io(
            format!("parsing /proc/{pid}/status"),
            std::io::Error::other("no Uid:, Gid: or Groups: line"),
        )
    })
}

/// The capabilities every thread of this process holds, together (a
/// thread that kept more than the others shows).
pub fn capabilities() -> crate::status::CapabilityStatus {
    let read = || -> std::io::Result<[u64; 3]> {
        let mut sets = [0u64; 3];
        for task in fs::read_dir("/proc/self/task")? {
            let status = fs::read_to_string(task?.path().join("status"))?;
            for (i, field) in ["CapEff:", "CapPrm:", "CapBnd:"].iter().enumerate() {
                let hex = status.lines().find_map(|l| l.strip_prefix(field));
                let bits = hex
                    .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                    .ok_or_else(|| std::io::Error::other(format!("no {field} line")))?;
                sets[i] |= bits;
            }
        }
        Ok(sets)
    };
    match read() {
        Ok([eff, prm, bnd]) => crate::status::CapabilityStatus {
            effective: cap_names(eff),
            permitted: cap_names(prm),
            bounding: cap_names(bnd),
            error: None,
        },
        Err(e) => crate::status::CapabilityStatus {
            error: Some(format!("reading /proc/self/task/*/status: {e}")),
            ..Default::default()
        },
    }
}

/// The names of the capabilities set in `bits` (a bit no name is known
/// for: `cap_<n>`).
pub fn cap_names(bits: u64) -> Vec<String> {
    let mut names: Vec<String> = (0..64u8)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| {
            caps::all()
                .into_iter()
                .find(|c| c.index() == b)
                .map_or(format!("cap_{b}"), |c| c.to_string().to_lowercase())
        })
        .collect();
    names.sort();
    names
}

/// Effective capability bits of this process.
pub fn effective_caps() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_the_effective_ids_and_every_group() {
        let status = "Name:\tx\nUid:\t1000\t1001\t1000\t1001\nGid:\t100\t101\t100\t101\nGroups:\t4 24 27 \nVmRSS:\t1 kB\n";
        let c = parse_creds(status).unwrap();
        assert_eq!((c.uid, c.gid), (1001, 101));
        assert_eq!(c.groups, [4, 24, 27]);
        // No supplementary groups: an empty line.
        let c = parse_creds("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n").unwrap();
        assert!(c.groups.is_empty());
        assert_eq!(parse_creds("Uid:\t0\t0\t0\t0\nGroups:\t1\n"), None);
        assert_eq!(
            parse_creds("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\tx\n"),
            None
        );
        // This process's own, as the kernel shows them.
        let mine = creds(std::process::id()).unwrap();
        // SAFETY: geteuid/getegid have no preconditions.
        assert_eq!((mine.uid, mine.gid), unsafe {
            (libc::geteuid(), libc::getegid())
        });
    }

    /// Out of descriptors, `/proc` cannot be read: a process is then
    /// not known to be gone (the agent once forgot every governed process
    /// this way). Run in a child of the test binary, whose descriptor
    /// limit it lowers.
    #[test]
    fn a_process_proc_cannot_read_is_unknown_not_gone() {
        const CHILD: &str = "NODEDB_PROCFS_FD_CHILD";
        let me = std::process::id();
        let started = start_time(me).unwrap();
        if std::env::var_os(CHILD).is_some() {
            assert!(matches!(liveness(me, started), Liveness::Alive));
            let limit = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            // SAFETY: a valid rlimit for this process.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
            let mut held = Vec::new();
            while let Ok(f) = fs::File::open("/dev/null") {
                held.push(f);
            }
            match liveness(me, started) {
                Liveness::Unknown(e) => assert!(e.to_string().contains("/stat"), "{e}"),
                other => panic!("out of descriptors, liveness said {other:?}"),
            }
            assert!(matches!(liveness(me, started + 1), Liveness::Unknown(_)));
            drop(held);
            assert!(matches!(liveness(me, started + 1), Liveness::Gone));
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "procfs::tests::a_process_proc_cannot_read_is_unknown_not_gone",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the child failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // And a pid no process has is gone.
        assert!(matches!(liveness(u32::MAX >> 2, 1), Liveness::Gone));
    }

    #[test]
    fn parses_status_kb_fields() {
        let s = "Name:\tx\nVmRSS:\t  3000 kB\nRssAnon:\t  1000 kB\nRssFile:\t  1500 kB\nRssShmem:\t   500 kB\nVmSwap:\t 7 kB\n";
        let b = parse_rss(s);
        assert_eq!(b.anon, 1000 * 1024);
        assert_eq!(b.file, 1500 * 1024);
        assert_eq!(b.shmem, 500 * 1024);
        assert_eq!(b.swap, 7 * 1024);
        assert_eq!(b.total(), 3000 * 1024);
    }

    #[test]
    fn own_process_has_a_start_time_and_threads() {
        let me = std::process::id();
        assert!(start_time(me).expect("start time") > 0);
        assert!(threads(me).expect("threads").contains(&me));
        assert!(matches!(
            start_time(u32::MAX - 1),
            Err(AgentError::NoSuchProcess { .. })
        ));
    }
}
