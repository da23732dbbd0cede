//! CPU placement of engines: an engine's threads may be kept to a set of
//! CPUs (`[[engine]] cpus`), as a thread-per-core database keeps its
//! latency-critical shards off the cores that take the disks' interrupts
//! and run background flushes (a flush's I/O completions run in interrupt
//! and softirq context on the CPU the device interrupts, ahead of any
//! thread there: measured in the cache scenario, a vector query thread on
//! that CPU waited 1.7 ms at p99 to be woken during a flush, against
//! 0.3 ms on the other CPU).
//!
//! The agent sets each thread's affinity (`sched_setaffinity`) when it
//! places the thread in its engine, and again for every thread of the
//! engine when a reload changes its CPUs. Threads a placed thread starts
//! inherit its affinity. This works the same on cgroup v1 and v2 hosts (the
//! engines' threaded cgroups carry no controller on hybrid hosts).

use std::{collections::BTreeSet, fmt, io, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A set of CPUs, written as the kernel writes lists (`0-3,8,10-11`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(BTreeSet<u32>);

/// Why a CPU list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuListError {
    #[error("list item {0:?} is not a CPU number or a range a-b")]
    Item(String),
    #[error("list item {0:?} runs backwards")]
    Backwards(String),
    #[error("the list names no CPU")]
    Empty,
    #[error("CPU {0} is beyond the {max} CPUs a thread's mask can name", max = libc::CPU_SETSIZE)]
    TooLarge(u32),
}

impl CpuList {
    /// Parses a kernel list; an empty list is allowed here (the kernel's
    /// own files may be empty) and refused by [`FromStr`].
    pub fn parse_kernel(s: &str) -> Result<Self, CpuListError> {
        let mut out = BTreeSet::new();
        for part in s.trim().split(',').filter(|p| !p.is_empty()) {
            let num = |x: &str| {
                x.trim()
                    .parse::<u32>()
                    .map_err(|_| CpuListError::Item(part.to_owned()))
            };
            match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (num(a)?, num(b)?);
                    if b < a {
                        return Err(CpuListError::Backwards(part.to_owned()));
                    }
                    if b >= libc::CPU_SETSIZE as u32 {
                        return Err(CpuListError::TooLarge(b));
                    }
                    out.extend(a..=b);
                }
                None => {
                    let c = num(part)?;
                    if c >= libc::CPU_SETSIZE as u32 {
                        return Err(CpuListError::TooLarge(c));
                    }
                    out.insert(c);
                }
            }
        }
        Ok(Self(out))
    }

    pub fn cpus(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The CPUs of this list that are not in `other`.
    pub fn missing_from(&self, other: &CpuList) -> Vec<u32> {
        self.0.difference(&other.0).copied().collect()
    }

    /// The CPUs that are online now (`/sys/devices/system/cpu/online`).
    pub fn online() -> io::Result<Self> {
        let text = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
        Self::parse_kernel(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Keeps thread `tid` (any process's: the agent has `CAP_SYS_NICE`) to
    /// these CPUs.
    pub fn apply(&self, tid: u32) -> io::Result<()> {
        // SAFETY: a zeroed cpu_set_t is an empty set; every CPU in the list
        // is below CPU_SETSIZE (checked at parse), so CPU_SET stays in it.
        let set = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for c in self.cpus() {
                libc::CPU_SET(c as usize, &mut set);
            }
            set
        };
        // SAFETY: `set` is a valid cpu_set_t of the size given.
        let rc = unsafe {
            libc::sched_setaffinity(tid as libc::pid_t, size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The CPUs thread `tid` may run on.
    pub fn of_thread(tid: u32) -> io::Result<Self> {
        // SAFETY: a zeroed cpu_set_t is valid storage for the kernel to fill.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is writable and of the size given.
        let rc = unsafe {
            libc::sched_getaffinity(tid as libc::pid_t, size_of::<libc::cpu_set_t>(), &mut set)
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self(
            (0..libc::CPU_SETSIZE as u32)
                // SAFETY: c is below CPU_SETSIZE.
                .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
                .collect(),
        ))
    }
}

impl FromStr for CpuList {
    type Err = CpuListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let list = Self::parse_kernel(s)?;
        if list.is_empty() {
            return Err(CpuListError::Empty);
        }
        Ok(list)
    }
}

impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&kernel_list(self.cpus()))
    }
}

/// Ascending CPUs written as the kernel writes lists (`0-3,8,10-11`).
pub fn kernel_list(cpus: impl Iterator<Item = u32>) -> String {
    let mut out = String::new();
    let mut it = cpus.peekable();
    while let Some(a) = it.next() {
        let mut b = a;
        while it.peek() == Some(&(b + 1)) {
            b = it.next().expect("peeked");
        }
        if !out.is_empty() {
            out.push(',');
        }
        if a == b {
            out.push_str(&a.to_string());
        } else {
            out.push_str(&format!("{a}-{b}"));
        }
    }
    out
}

impl<'de> Deserialize<'de> for CpuList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for CpuList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_print_as_the_kernel_writes_them() {
        let l: CpuList = "0-1,4,6-7\n".parse().unwrap();
        assert_eq!(l.cpus().collect::<Vec<_>>(), [0, 1, 4, 6, 7]);
        assert_eq!(l.to_string(), "0-1,4,6-7");
        assert_eq!("3,2,1".parse::<CpuList>().unwrap().to_string(), "1-3");
        assert_eq!(CpuList::parse_kernel("").unwrap().cpus().count(), 0);
        for (bad, want) in [
            ("", CpuListError::Empty),
            ("0-x", CpuListError::Item("0-x".into())),
            ("3-1", CpuListError::Backwards("3-1".into())),
            ("1,,a", CpuListError::Item("a".into())),
            ("0-5000", CpuListError::TooLarge(5000)),
        ] {
            assert_eq!(bad.parse::<CpuList>().unwrap_err(), want, "{bad:?}");
        }
    }

    #[test]
    fn a_thread_is_kept_to_its_cpus_and_an_offline_set_is_refused() {
        let online = CpuList::online().expect("the online CPUs");
        let first: CpuList = online.cpus().next().unwrap().to_string().parse().unwrap();
        let handle = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            first.apply(tid).expect("pinning to an online CPU");
            let now = CpuList::of_thread(tid).unwrap();
            // Not a CPU this machine has: refused, the mask unchanged.
            let beyond: CpuList = "1023".parse().unwrap();
            let e = beyond.apply(tid).unwrap_err();
            (now, e.raw_os_error(), CpuList::of_thread(tid).unwrap())
        });
        let (now, errno, after) = handle.join().unwrap();
        assert_eq!(now.cpus().count(), 1);
        assert_eq!(errno, Some(libc::EINVAL));
        assert_eq!(after, now);
    }
}
