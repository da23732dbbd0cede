//! NUMA topology as the kernel shows it (`/sys/devices/system/node`), a
//! thread pinned to a node's CPUs, and where a mapping's pages are
//! (`/proc/self/numa_maps`): the truth the NUMA checks compare with.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, bail};

const NODES: &str = "/sys/devices/system/node";

/// A kernel list such as `0-1,4,6-7`.
pub fn parse_list(s: &str) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (
                    a.parse().with_context(|| format!("list item {part:?}"))?,
                    b.parse().with_context(|| format!("list item {part:?}"))?,
                );
                if b < a {
                    bail!("list item {part:?} runs backwards");
                }
                out.extend(a..=b);
            }
            None => out.push(
                part.parse()
                    .with_context(|| format!("list item {part:?}"))?,
            ),
        }
    }
    Ok(out)
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
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it
    // for CPUs below CPU_SETSIZE, which is checked.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            if c as usize >= libc::CPU_SETSIZE as usize {
                bail!("CPU {c} is beyond CPU_SETSIZE");
            }
            libc::CPU_SET(c as usize, &mut set);
        }
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
        }
    }
    Ok(())
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
