//! The database's memory per NUMA node, and each node's pressure.
//!
//! A node can run out while the totals look fine: the kernel reclaims
//! there (or allocations go remote) while another node is idle. Per node
//! the agent reads the node's own figures (`/sys/devices/system/node/
//! node<N>/meminfo`: MemTotal, MemFree, FilePages, AnonPages) and the
//! database cgroup's memory on it (`memory.numa_stat`: v2 `anon N0=<bytes>
//! N1=...`, v1 `anon=<pages> N0=<pages> ...`), and judges the database's
//! part of each node against the node's share of the ceiling, with the
//! same thresholds as the engines' levels. The share is the policy's (see
//! `policy::Rules::node_parts`: by `numa.weights`, or else following where
//! the budgets in force are placed) once it has judged a round, and
//! before that the ceiling split by `numa.weights` or the nodes' memory.
//! The ladder holds the placed engines on a node to that part (see
//! `policy::library`), from the attribution's per-node figures at every
//! tick.
//!
//! These are read when a status snapshot is built (a few small files per
//! node), not at every tick.

use std::{fs, path::Path};

use nodedb_governor::{PressureLevel, PressureThresholds, Topology};
use serde::{Deserialize, Serialize};

use crate::{ceiling::Backend, cpus::kernel_list};

/// One node as the status shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: u32,
    /// Its CPUs, a kernel list.
    pub cpus: String,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
    /// The node's page cache and anonymous memory, every process's.
    pub file_bytes: u64,
    pub anon_bytes: u64,
    /// The database's (its cgroup's) memory on the node; absent without a
    /// ceiling cgroup to read.
    pub database_anon_bytes: Option<u64>,
    pub database_file_bytes: Option<u64>,
    /// The node's share of the ceiling (see the module's doc).
    pub ceiling_share_bytes: Option<u64>,
    /// The database's memory on the node against that share.
    pub level: Option<PressureLevel>,
}

/// Reads every node, and the database cgroup `cgroup` (with its
/// `backend`) on each, judging it against `ceiling` split by `weights` (one
/// per node, `numa.weights`) or else the nodes' memory. An error names the
/// file.
pub fn read(
    topology: &Topology,
    cgroup: Option<(&Path, Backend)>,
    ceiling: Option<u64>,
    thresholds: &PressureThresholds,
    weights: Option<&[u64]>,
) -> Result<Vec<NodeStatus>, String> {
    let nodes_dir = Path::new("/sys/devices/system/node");
    let db = match cgroup {
        Some((dir, backend)) => {
            let path = dir.join("memory.numa_stat");
            let text = fs::read_to_string(&path)
                .map_err(|e| format!("reading {}: {e}", path.display()))?;
            Some(parse_numa_stat(&text, backend).map_err(|e| format!("{}: {e}", path.display()))?)
        }
        None => None,
    };
    let weights: Vec<u64> = match weights {
        Some(w) if w.len() == topology.nodes().len() => w.to_vec(),
        _ => topology.nodes().iter().map(|n| n.memory_bytes).collect(),
    };
    let whole: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let mut out = Vec::with_capacity(topology.nodes().len());
    for (n, &weight) in topology.nodes().iter().zip(&weights) {
        let meminfo = nodes_dir.join(format!("node{}/meminfo", n.id));
        let fields = match fs::read_to_string(&meminfo) {
            Ok(text) => parse_node_meminfo(&text),
            // A kernel without NUMA has no node directory: the machine's.
            Err(_) if topology.nodes().len() == 1 => {
                let text = fs::read_to_string("/proc/meminfo")
                    .map_err(|e| format!("reading /proc/meminfo: {e}"))?;
                parse_node_meminfo(&text)
            }
            Err(e) => return Err(format!("reading {}: {e}", meminfo.display())),
        };
        let field = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| *v);
        let (anon, file) = match &db {
            Some(stat) => (
                Some(stat.anon.get(&n.id).copied().unwrap_or(0)),
                Some(stat.file.get(&n.id).copied().unwrap_or(0)),
            ),
            None => (None, None),
        };
        let share = ceiling.map(|c| (u128::from(c) * u128::from(weight) / whole.max(1)) as u64);
        let level = match (anon, file, share) {
            (Some(a), Some(f), Some(s)) => Some(thresholds.level(a + f, s)),
            _ => None,
        };
        out.push(NodeStatus {
            node: n.id,
            cpus: kernel_list(n.cpus.iter().copied()),
            memory_total_bytes: field("MemTotal").unwrap_or(n.memory_bytes),
            memory_free_bytes: field("MemFree").unwrap_or(0),
            file_bytes: field("FilePages").or(field("Cached")).unwrap_or(0),
            anon_bytes: field("AnonPages").unwrap_or(0),
            database_anon_bytes: anon,
            database_file_bytes: file,
            ceiling_share_bytes: share,
            level,
        });
    }
    Ok(out)
}

/// Judges `nodes` against the policy's parts of `ceiling` (0 to 1 per
/// node; see `policy::Rules::node_parts`) instead of the static split
/// `read` used: a node the parts do not name keeps its figures.
pub fn judge_by_parts(
    nodes: &mut [NodeStatus],
    ceiling: Option<u64>,
    parts: &std::collections::BTreeMap<u32, f64>,
    thresholds: &PressureThresholds,
) {
    let Some(ceiling) = ceiling else {
        return;
    };
    for n in nodes {
        let Some(&part) = parts.get(&n.node) else {
            continue;
        };
        let share = (ceiling as f64 * part) as u64;
        n.ceiling_share_bytes = Some(share);
        if let (Some(a), Some(f)) = (n.database_anon_bytes, n.database_file_bytes) {
            n.level = Some(thresholds.level(a + f, share));
        }
    }
}

/// The machine's NUMA nodes (one, with a warning, if the kernel's cannot
/// be read: the ladder then judges engines in all only).
pub fn machine_nodes() -> Vec<nodedb_governor::Node> {
    match Topology::detect() {
        Ok(t) => t.nodes().to_vec(),
        Err(e) => {
            tracing::warn!(error = %e, "NUMA nodes unreadable: engines are judged in all only");
            Vec::new()
        }
    }
}

/// `(field, bytes)` of a node's meminfo ("Node 0 MemFree:  123 kB") or
/// of `/proc/meminfo` ("MemFree:  123 kB").
fn parse_node_meminfo(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|l| {
            let (key, value) = l.split_once(':')?;
            let key = key.split_whitespace().last()?;
            let kib = value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()?;
            Some((key.to_owned(), kib << 10))
        })
        .collect()
}

/// A cgroup's memory per node, bytes.
#[derive(Debug, Default, PartialEq, Eq)]
struct NumaStat {
    anon: std::collections::BTreeMap<u32, u64>,
    file: std::collections::BTreeMap<u32, u64>,
}

/// `memory.numa_stat`: v2 `anon N0=<bytes> N1=<bytes>` lines, v1
/// `anon=<pages> N0=<pages> N1=<pages>` lines.
fn parse_numa_stat(text: &str, backend: Backend) -> Result<NumaStat, String> {
    let mut stat = NumaStat::default();
    // SAFETY: sysconf has no preconditions.
    let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(1) as u64;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        let (key, scale) = match backend {
            Backend::CgroupV2 => (first, 1),
            Backend::CgroupV1 => (first.split_once('=').map_or(first, |(k, _)| k), page),
        };
        let into = match key {
            "anon" => &mut stat.anon,
            "file" => &mut stat.file,
            _ => continue,
        };
        for w in words {
            let Some((node, value)) = w.strip_prefix('N').and_then(|w| w.split_once('=')) else {
                return Err(format!("{w:?} in {line:?} is not N<node>=<value>"));
            };
            let (Ok(node), Ok(value)) = (node.parse::<u32>(), value.parse::<u64>()) else {
                return Err(format!("{w:?} in {line:?} is not N<node>=<value>"));
            };
            into.insert(node, value.saturating_mul(scale));
        }
    }
    if stat.anon.is_empty() && stat.file.is_empty() {
        return Err("no anon or file line".into());
    }
    Ok(stat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_stat_is_read_in_both_formats_and_bad_lines_are_named() {
        let v2 = "anon N0=4096 N1=8192\nfile N0=0 N1=12288\nkernel_stack N0=16384 N1=0\n";
        let s = parse_numa_stat(v2, Backend::CgroupV2).unwrap();
        assert_eq!(s.anon.get(&1), Some(&8192));
        assert_eq!(s.file.get(&1), Some(&12288));
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        let v1 = "total=3 N0=1 N1=2\nfile=1 N0=0 N1=1\nanon=2 N0=1 N1=1\nhierarchical_total=3 N0=1 N1=2\n";
        let s = parse_numa_stat(v1, Backend::CgroupV1).unwrap();
        assert_eq!(s.anon.get(&0), Some(&page));
        assert_eq!(s.file.get(&1), Some(&page));
        let e = parse_numa_stat("anon N0=x\n", Backend::CgroupV2).unwrap_err();
        assert!(e.contains("\"N0=x\""), "{e}");
        assert!(parse_numa_stat("", Backend::CgroupV2).is_err());
    }

    #[test]
    fn node_meminfo_and_proc_meminfo_parse_alike() {
        let node = "Node 1 MemTotal:        1024 kB\nNode 1 FilePages:  8 kB\n";
        let proc = "MemTotal:        1024 kB\nFilePages:  8 kB\n";
        assert_eq!(parse_node_meminfo(node), parse_node_meminfo(proc));
        assert_eq!(parse_node_meminfo(node)[0], ("MemTotal".into(), 1 << 20));
        assert_eq!(kernel_list([0, 1, 2, 5, 7, 8].into_iter()), "0-2,5,7-8");
    }

    #[test]
    fn the_policys_parts_replace_the_static_split_where_they_name_a_node() {
        let t = PressureThresholds::default();
        let node = |id: u32, share: u64| NodeStatus {
            node: id,
            cpus: id.to_string(),
            memory_total_bytes: 1 << 31,
            memory_free_bytes: 1 << 30,
            file_bytes: 0,
            anon_bytes: 0,
            database_anon_bytes: Some(420 << 20),
            database_file_bytes: Some(50 << 20),
            ceiling_share_bytes: Some(share),
            level: Some(t.level(470 << 20, share)),
        };
        // Node 1 holds 470 MiB: Critical of its 512 MiB by memory, Normal
        // of the 717 MiB the placed budgets give it.
        let mut nodes = vec![node(0, 512 << 20), node(1, 512 << 20), node(2, 512 << 20)];
        assert_eq!(nodes[1].level, Some(PressureLevel::Critical));
        let parts = [(0, 0.3), (1, 0.7)].into_iter().collect();
        judge_by_parts(&mut nodes, Some(1 << 30), &parts, &t);
        assert_eq!(
            nodes[1].ceiling_share_bytes,
            Some((0.7 * (1u64 << 30) as f64) as u64)
        );
        assert_eq!(nodes[1].level, Some(PressureLevel::Normal));
        assert_eq!(
            nodes[0].ceiling_share_bytes,
            Some((0.3 * (1u64 << 30) as f64) as u64)
        );
        assert_eq!(nodes[0].level, Some(PressureLevel::Emergency));
        assert_eq!(nodes[2], node(2, 512 << 20), "a node the parts do not name");
        // Without a ceiling there is nothing to split.
        let before = nodes.clone();
        judge_by_parts(&mut nodes, None, &[(0, 0.9)].into_iter().collect(), &t);
        assert_eq!(nodes, before);
    }

    #[test]
    fn this_machine_reads_and_each_node_is_judged_on_its_share() {
        let t = PressureThresholds::default();
        let topology = Topology::detect().expect("sysfs");
        let read = |w: Option<&[u64]>| read(&topology, None, Some(1 << 30), &t, w);
        let nodes = read(None).expect("sysfs");
        assert!(!nodes.is_empty());
        // Weights split the ceiling instead of the nodes' memory (here the
        // last node gets three parts in n + 2); weights that do not fit
        // the machine are the memory's split.
        let n = nodes.len();
        let mut w = vec![1; n];
        w[n - 1] = 3;
        let weighted = read(Some(&w)).expect("sysfs");
        let last = weighted[n - 1].ceiling_share_bytes.unwrap();
        assert_eq!(last, ((1u128 << 30) * 3 / (n as u128 + 2)) as u64);
        let unfit = read(Some(&[1; 9])).expect("sysfs");
        let shares_of = |v: &[NodeStatus]| -> Vec<Option<u64>> {
            v.iter().map(|n| n.ceiling_share_bytes).collect()
        };
        assert_eq!(shares_of(&unfit), shares_of(&nodes));
        let shares: u64 = nodes.iter().filter_map(|n| n.ceiling_share_bytes).sum();
        assert!(
            shares <= 1 << 30 && shares + nodes.len() as u64 >= 1 << 30,
            "{nodes:?}"
        );
        assert!(
            nodes
                .iter()
                .all(|n| n.memory_total_bytes > 0 && n.level.is_none())
        );
    }
}
