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
