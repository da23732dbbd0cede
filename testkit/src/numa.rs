//! NUMA topology as the kernel shows it (`/sys/devices/system/node`), a
//! thread pinned to a node's CPUs, and where a mapping's pages are
//! (`/proc/self/numa_maps`): the truth the NUMA checks compare with.

use std::{collections::BTreeMap, path::Path};

use anyhow::Context;

const NODES: &str = "/sys/devices/system/node";

/// A kernel list such as `0-1,4,6-7` (the agent's parser: the lists the
/// agent is configured with are read the same way).
pub fn parse_list(s: &str) -> anyhow::Result<Vec<u32>> {
    Ok(nodedb_governor_agent::cpus::CpuList::parse_kernel(s)?
        .cpus()
        .collect())
}

/// The online nodes (a kernel without NUMA shows none: one node, 0).
pub fn online_nodes() -> anyhow::Result<Vec<u32>> {
    let path = Path::new(NODES).join("online");
    if !path.exists() {
        return Ok(vec![0]);
    }
    let s =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_list(&s)
}

/// The CPUs of `node`.
pub fn node_cpus(node: u32) -> anyhow::Result<Vec<u32>> {
    let path = Path::new(NODES).join(format!("node{node}/cpulist"));
    let s =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_list(&s)
}

/// `node`'s memory (`MemTotal` of its `meminfo`), bytes.
pub fn node_memory_bytes(node: u32) -> anyhow::Result<u64> {
    let path = Path::new(NODES).join(format!("node{node}/meminfo"));
    let s =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // "Node 0 MemTotal:       1530220 kB"
    s.lines()
        .find_map(|l| {
            let rest = l.split_once("MemTotal:")?.1;
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib << 10)
        .with_context(|| format!("no MemTotal in {}", path.display()))
}

/// Pins the calling thread to `cpus`.
pub fn pin_current_thread(cpus: &[u32]) -> anyhow::Result<()> {
    let list: nodedb_governor_agent::cpus::CpuList = cpus
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
        .parse()?;
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as u32;
    list.apply(tid).context("sched_setaffinity")
}

/// Pages per node of the mapping that starts at `addr`, from
/// `/proc/self/numa_maps` (its `N<node>=<pages>` fields).
pub fn mapping_pages_by_node(addr: usize) -> anyhow::Result<BTreeMap<u32, u64>> {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").context("reading numa_maps")?;
    let start = format!("{addr:x} ");
    let line = maps
        .lines()
        .find(|l| l.starts_with(&start))
        .with_context(|| format!("no mapping at {addr:#x} in numa_maps"))?;
    Ok(parse_numa_maps_nodes(line))
}

/// The `N<node>=<pages>` fields of one `numa_maps` line.
pub fn parse_numa_maps_nodes(line: &str) -> BTreeMap<u32, u64> {
    line.split_whitespace()
        .filter_map(|f| {
            let (k, v) = f.strip_prefix('N')?.split_once('=')?;
            Some((k.parse().ok()?, v.parse().ok()?))
        })
        .collect()
}

/// The node of each page of `[addr, addr + len)`, from the kernel
/// (`move_pages(2)` with no target nodes only reports); a page not present
/// reports a negative errno.
pub fn page_nodes(addr: usize, len: usize) -> anyhow::Result<Vec<i32>> {
    const PAGE: usize = 4096;
    let pages: Vec<*const libc::c_void> = (addr..addr + len)
        .step_by(PAGE)
        .map(|a| a as *const libc::c_void)
        .collect();
    let mut status = vec![0i32; pages.len()];
    // SAFETY: `pages` and `status` are `count` long; a null node list
    // asks where the pages are and moves nothing.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0,
            pages.len() as libc::c_ulong,
            pages.as_ptr(),
            std::ptr::null::<i32>(),
            status.as_mut_ptr(),
            0,
        )
    };
    anyhow::ensure!(rc == 0, "move_pages: {}", std::io::Error::last_os_error());
    Ok(status)
}

/// NUMA balancing on, and scanning often, for as long as it lives (the
/// knobs are put back on drop): the kernel's hinting faults, which the
/// attribution must tell from faults that bring memory in, happen within a
/// second instead of a minute.
pub struct FastNumaScan {
    saved: Vec<(std::path::PathBuf, String)>,
}

const NUMA_BALANCING: &str = "/proc/sys/kernel/numa_balancing";
const SCAN_KNOBS: &str = "/sys/kernel/debug/sched/numa_balancing";

impl FastNumaScan {
    /// None on a kernel with one node, or without NUMA balancing: it
    /// never scans there.
    pub fn start() -> anyhow::Result<Option<Self>> {
        if online_nodes()?.len() < 2 || !Path::new(NUMA_BALANCING).exists() {
            return Ok(None);
        }
        let mut scan = Self { saved: Vec::new() };
        scan.set(Path::new(NUMA_BALANCING), "1")?;
        if !Path::new(SCAN_KNOBS).exists()
            && !nodedb_governor_agent::mounts::is_mounted("/sys/kernel/debug", "debugfs")
        {
            nodedb_governor_agent::mounts::mount_pseudo("debugfs", "/sys/kernel/debug")
                .context("mounting debugfs for NUMA balancing's scan knobs")?;
        }
        for (knob, value) in [
            ("scan_delay_ms", "0"),
            ("scan_period_min_ms", "100"),
            ("scan_size_mb", "1024"),
        ] {
            scan.set(&Path::new(SCAN_KNOBS).join(knob), value)?;
        }
        Ok(Some(scan))
    }

    fn set(&mut self, path: &Path, value: &str) -> anyhow::Result<()> {
        let old =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        std::fs::write(path, value).with_context(|| format!("writing {}", path.display()))?;
        self.saved.push((path.to_owned(), old.trim().to_owned()));
        Ok(())
    }
}

impl Drop for FastNumaScan {
    fn drop(&mut self) {
        for (path, old) in self.saved.drain(..).rev() {
            if let Err(e) = std::fs::write(&path, &old) {
                eprintln!("putting {} back to {old}: {e}", path.display());
            }
        }
    }
}

/// The kernel's count of NUMA hinting faults (`numa_hint_faults` in
/// `/proc/vmstat`), 0 on a kernel without NUMA balancing.
pub fn hinting_faults() -> anyhow::Result<u64> {
    let s = std::fs::read_to_string("/proc/vmstat").context("reading /proc/vmstat")?;
    Ok(s.lines()
        .find_map(|l| l.strip_prefix("numa_hint_faults ")?.trim().parse().ok())
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_lists_and_numa_maps_fields_parse_and_bad_ones_are_named() {
        assert_eq!(parse_list("0-1,4,6-7\n").unwrap(), [0, 1, 4, 6, 7]);
        assert_eq!(parse_list("0").unwrap(), [0]);
        assert_eq!(parse_list("").unwrap(), Vec::<u32>::new());
        let e = parse_list("0-x").unwrap_err().to_string();
        assert!(e.contains("0-x"), "{e}");
        assert!(
            parse_list("3-1")
                .unwrap_err()
                .to_string()
                .contains("backwards")
        );
        let line = "7f1c2a000000 default anon=16384 dirty=16384 active=0 N0=12 N1=16372 kernelpagesize_kB=4";
        let nodes = parse_numa_maps_nodes(line);
        assert_eq!(nodes, BTreeMap::from([(0, 12), (1, 16372)]));
    }

    #[test]
    fn this_machines_nodes_hold_every_online_cpu_and_some_memory() {
        if !Path::new(NODES).exists() {
            eprintln!("skipping: this kernel has no NUMA support ({NODES} is missing)");
            return;
        }
        let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
        let mut cpus: Vec<u32> = online_nodes()
            .unwrap()
            .into_iter()
            .flat_map(|n| node_cpus(n).unwrap())
            .collect();
        cpus.sort_unstable();
        assert_eq!(cpus, parse_list(&online).unwrap());
        for n in online_nodes().unwrap() {
            assert!(node_memory_bytes(n).unwrap() > 0, "node {n}");
        }
    }
}
