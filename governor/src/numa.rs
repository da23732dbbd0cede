//! NUMA: the machine's nodes, the node a thread runs on, and how an
//! engine's reservations use the nodes.
//!
//! A thread-per-core database's engine threads sit on different nodes, and
//! a node can run out (the kernel reclaims there, or allocations go remote)
//! while the totals look fine. With a [`Topology`] in the
//! [`Budget`](crate::Budget) ([`BudgetBuilder::numa`](crate::BudgetBuilder::numa)),
//! the ceiling and each engine's cap are split across the nodes, and a
//! reservation is charged to a node as well as to the engine:
//!
//! * the node of the calling thread (the CPU it runs on, mapped to its
//!   node), by the engine's [`NumaPolicy`];
//! * the share of a node is its weight (by default the node's memory) in
//!   the whole: node `n`'s ceiling is `ceiling * w(n) / sum(w)`, and an
//!   engine's share there is `cap * w_e(n) / sum(w_e)`, so loans and a
//!   changed ceiling move the shares with the totals.
//!
//! # Which node, and how cheaply
//! The fast path does not ask the kernel on every reservation: a thread's
//! batch of credit is drawn for the node it runs on when it draws (once a
//! batch, [`crate::governor::DEFAULT_BATCH_BYTES`]), and spending it charges
//! that node. A thread that migrates to another node keeps charging the old
//! node until that credit (at most two batches) is spent, then draws on the
//! new one; exact decisions (near the limits) read the CPU every time. The
//! CPU is `sched_getcpu` (glibc reads it from the thread's rseq area: no
//! system call).
//!
//! A request is charged whole to one node. A
//! [`Reservation`](crate::Reservation) remembers the nodes its bytes are
//! charged to and gives them back there, whichever thread drops it (a
//! shrink takes from the last node first). Floors stay whole-budget: the
//! nodes split the ceiling and the caps, not the floors.
//!
//! Without a topology, or with one of a single node, nothing of this runs:
//! every charge is on node 0 and no per-node books are kept.

use std::{io, path::Path};

use crate::error::MemError;

/// How an engine's reservations use the nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "kebab-case"))]
pub enum NumaPolicy {
    /// Charged to the calling thread's node; refused (naming the node) when
    /// the engine's share there, or the node's ceiling, is used up, even if
    /// another node has room: memory the engine would touch remotely.
    Strict,
    /// Charged to the calling thread's node while the engine's share there
    /// lasts, then to the node with the most room left in the engine's
    /// shares (counted as remote: [`NodeUsage::remote_bytes`]).
    #[default]
    PreferLocal,
    /// Charged to the node with the most room left in the engine's shares,
    /// wherever the thread runs (an engine whose memory is interleaved
    /// across the nodes, `MPOL_INTERLEAVE`). Decided exactly, under the
    /// lock: such an engine takes no fast path.
    Interleave,
}

impl NumaPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            NumaPolicy::Strict => "strict",
            NumaPolicy::PreferLocal => "prefer-local",
            NumaPolicy::Interleave => "interleave",
        }
    }
}

impl std::str::FromStr for NumaPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(NumaPolicy::Strict),
            "prefer-local" => Ok(NumaPolicy::PreferLocal),
            "interleave" => Ok(NumaPolicy::Interleave),
            other => Err(format!(
                "unknown NUMA policy {other:?}: strict, prefer-local or interleave"
            )),
        }
    }
}

impl std::fmt::Display for NumaPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node: its kernel id, its CPUs and its memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: u32,
    pub cpus: Vec<u32>,
    pub memory_bytes: u64,
}

/// The machine's nodes and which node each CPU is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<Node>,
    /// CPU number -> position in `nodes` (`NO_NODE`: a CPU no node lists).
    cpu_node: Box<[u16]>,
}

const NO_NODE: u16 = u16::MAX;

/// At most this many nodes (positions fit the credit key's node bits).
pub const MAX_NODES: usize = 64;

const NODES: &str = "/sys/devices/system/node";

impl Topology {
    /// The nodes as the kernel shows them (`/sys/devices/system/node`); a
    /// kernel without NUMA shows none, and that is one node of every CPU.
    pub fn detect() -> io::Result<Self> {
        Self::detect_at(Path::new(NODES))
    }

    fn detect_at(root: &Path) -> io::Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", p.display())))
        };
        let invalid = |p: &Path, what: String| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {what}", p.display()),
            )
        };
        let online = root.join("online");
        if !online.exists() {
            // SAFETY: sysconf has no preconditions.
            let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1) as u32;
            // SAFETY: as above.
            let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) }.max(0) as u64;
            return Self::new(vec![Node {
                id: 0,
                cpus: (0..cpus).collect(),
                memory_bytes: pages * 4096,
            }])
            .map_err(|e| invalid(root, e.to_string()));
        }
        let ids = parse_list(&read(&online)?).map_err(|e| invalid(&online, e))?;
        let mut nodes = Vec::with_capacity(ids.len());
        for id in ids {
            let dir = root.join(format!("node{id}"));
            let cpulist = dir.join("cpulist");
            let cpus = parse_list(&read(&cpulist)?).map_err(|e| invalid(&cpulist, e))?;
            let meminfo = dir.join("meminfo");
            let memory_bytes = mem_total(&read(&meminfo)?)
                .ok_or_else(|| invalid(&meminfo, "no MemTotal line".into()))?;
            nodes.push(Node {
                id,
                cpus,
                memory_bytes,
            });
        }
        Self::new(nodes).map_err(|e| invalid(root, e.to_string()))
    }

    /// A topology of these nodes (for a machine whose sysfs a container
    /// hides, or a test that treats CPUs as nodes). Refused if a CPU is on
    /// two nodes, a node id repeats, or there are no nodes or more than
    /// [`MAX_NODES`].
    pub fn new(nodes: Vec<Node>) -> Result<Self, MemError> {
        let bad = |reason: String| MemError::InvalidBudget {
            field: "numa.nodes".into(),
            reason,
        };
        if nodes.is_empty() || nodes.len() > MAX_NODES {
            return Err(bad(format!(
                "{} nodes: between 1 and {MAX_NODES}",
                nodes.len()
            )));
        }
        let max_cpu = nodes
            .iter()
            .flat_map(|n| n.cpus.iter().copied())
            .max()
            .unwrap_or(0) as usize;
        if max_cpu >= 1 << 20 {
            return Err(bad(format!("CPU {max_cpu} is beyond any machine")));
        }
        let mut cpu_node = vec![NO_NODE; max_cpu + 1];
        for (i, n) in nodes.iter().enumerate() {
            if nodes[..i].iter().any(|m| m.id == n.id) {
                return Err(bad(format!("node {} appears twice", n.id)));
            }
            for &c in &n.cpus {
                if cpu_node[c as usize] != NO_NODE {
                    return Err(bad(format!("CPU {c} is on two nodes")));
                }
                cpu_node[c as usize] = i as u16;
            }
        }
        Ok(Self {
            nodes,
            cpu_node: cpu_node.into(),
        })
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The position (in [`nodes`](Self::nodes)) of the node `cpu` is on.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<usize> {
        match self.cpu_node.get(cpu as usize) {
            Some(&n) if n != NO_NODE => Some(n as usize),
            _ => None,
        }
    }

    /// The position of the node with kernel id `id`.
    pub fn position(&self, id: u32) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    /// The position of the calling thread's node now (the first node if
    /// its CPU is on none, or the CPU cannot be read).
    #[inline]
    pub fn current_node(&self) -> usize {
        if self.nodes.len() == 1 {
            return 0;
        }
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        if cpu < 0 {
            return 0;
        }
        self.node_of_cpu(cpu as u32).unwrap_or(0)
    }
}

/// A kernel list such as `0-3,8,10-11`.
pub(crate) fn parse_list(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let num = |x: &str| {
            x.trim()
                .parse::<u32>()
                .map_err(|_| format!("{x:?} in {s:?} is not a number"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("{part:?} in {s:?} runs backwards"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    Ok(out)
}

/// `MemTotal` of a node's `meminfo` ("Node 0 MemTotal:  1530220 kB"), bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.split_once("MemTotal:")?.1;
        let kib = rest
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(kib << 10)
    })
}

/// One engine's accounting on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeUsage {
    /// The node's kernel id.
    pub node: u32,
    pub used_bytes: u64,
    /// The engine's share of this node in force (its cap's part here).
    pub share_bytes: u64,
    /// Bytes charged here by `prefer-local` for threads on another node,
    /// since the governor started (a counter).
    pub remote_bytes: u64,
    /// Requests refused for want of room on this node.
    pub rejections: u64,
}

/// One node's totals.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeTotals {
    pub node: u32,
    pub used_bytes: u64,
    /// The node's part of the ceiling.
    pub ceiling_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, rel: &str, s: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    #[test]
    fn sysfs_nodes_are_read_and_bad_files_are_named() {
        let dir = std::env::temp_dir().join(format!("nodedb-numa-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write(&dir, "online", "0-1\n");
        write(&dir, "node0/cpulist", "0-1,4\n");
        write(
            &dir,
            "node0/meminfo",
            "Node 0 MemTotal:       2048 kB\nNode 0 MemFree: 1 kB\n",
        );
        write(&dir, "node1/cpulist", "2-3\n");
        write(&dir, "node1/meminfo", "Node 1 MemTotal:       1024 kB\n");
        let t = Topology::detect_at(&dir).expect("two nodes");
        assert_eq!(t.nodes().len(), 2);
        assert_eq!(t.nodes()[0].memory_bytes, 2048 << 10);
        assert_eq!(
            (0..6).map(|c| t.node_of_cpu(c)).collect::<Vec<_>>(),
            [Some(0), Some(0), Some(1), Some(1), Some(0), None]
        );
        assert_eq!(t.position(1), Some(1));
        write(&dir, "node1/cpulist", "2-x\n");
        let e = Topology::detect_at(&dir).unwrap_err().to_string();
        assert!(e.contains("node1/cpulist") && e.contains("\"x\""), "{e}");
        write(&dir, "node1/cpulist", "1\n");
        let e = Topology::detect_at(&dir).unwrap_err().to_string();
        assert!(e.contains("CPU 1 is on two nodes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn this_machine_has_a_node_for_every_cpu_it_runs_on() {
        let t = Topology::detect().expect("sysfs");
        // SAFETY: sched_getcpu has no preconditions.
        let cpu = unsafe { libc::sched_getcpu() };
        assert!(cpu >= 0);
        assert!(t.node_of_cpu(cpu as u32).is_some(), "{t:?}");
        assert!(t.nodes().iter().all(|n| n.memory_bytes > 0), "{t:?}");
    }

    #[test]
    fn policies_parse_by_their_names() {
        for p in [
            NumaPolicy::Strict,
            NumaPolicy::PreferLocal,
            NumaPolicy::Interleave,
        ] {
            assert_eq!(p.as_str().parse::<NumaPolicy>(), Ok(p));
        }
        assert!(
            "local"
                .parse::<NumaPolicy>()
                .unwrap_err()
                .contains("\"local\"")
        );
    }
}
