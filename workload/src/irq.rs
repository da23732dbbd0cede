//! Where a disk's interrupts land, measured: the cache scenario places its
//! engines as an operator of a thread-per-core database does (ScyllaDB's
//! `perftune`, for one): the latency-critical engine off the CPU that takes
//! the disk's completions, the flush on it. A write's completion runs in
//! interrupt and softirq context on that CPU, ahead of any thread there.
//!
//! The probe writes a file to the disk in question, making it durable a
//! piece at a time, and compares `/proc/interrupts` before and after: the
//! device line that counted the most interrupts is the disk's, and the CPU
//! that took most of them is its CPU.

use std::{collections::BTreeMap, fs::File, io::Write, path::Path};

use anyhow::Context;
use serde::Serialize;

/// The online CPUs (the header's columns) and, per numbered interrupt
/// line, its device name and per-CPU counts in the columns' order.
pub struct Interrupts {
    pub cpus: Vec<u32>,
    pub lines: BTreeMap<String, (String, Vec<u64>)>,
}

/// `/proc/interrupts`, now.
pub fn interrupts() -> anyhow::Result<Interrupts> {
    let text = std::fs::read_to_string("/proc/interrupts").context("reading /proc/interrupts")?;
    parse_interrupts(&text)
}

/// `/proc/interrupts`: a header of CPU names, then a line per interrupt
/// (`36:  0  1076908  PCI-MSIX-0000:00:02.0  1-edge  virtio1-req.0`).
/// Only numbered lines (devices) are kept, not the architecture's counters
/// (`LOC`, `RES`, ...).
pub fn parse_interrupts(text: &str) -> anyhow::Result<Interrupts> {
    let mut lines = text.lines();
    let cpu_ids = lines
        .next()
        .context("/proc/interrupts is empty")?
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CPU")
                .and_then(|n| n.parse::<u32>().ok())
                .with_context(|| format!("/proc/interrupts: column {c:?} is not a CPU"))
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let cpus = cpu_ids.len();
    let mut out = BTreeMap::new();
    for line in lines {
        let Some((id, rest)) = line.split_once(':') else {
            continue;
        };
        let id = id.trim();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let counts: Vec<u64> = fields
            .iter()
            .take(cpus)
            .map_while(|f| f.parse().ok())
            .collect();
        if counts.len() != cpus {
            continue;
        }
        let name = fields.last().copied().unwrap_or("").to_owned();
        out.insert(id.to_owned(), (name, counts));
    }
    Ok(Interrupts {
        cpus: cpu_ids,
        lines: out,
    })
}

/// The disk's interrupt line and its CPU, as measured.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DiskIrq {
    /// The interrupt line (`/proc/interrupts`) and its device.
    pub line: String,
    pub device: String,
    /// The online CPUs, and the interrupts each took during the probe.
    pub cpus: Vec<u32>,
    pub per_cpu: Vec<u64>,
    /// The CPU that took the most of them, and its share.
    pub cpu: u32,
    pub share: f64,
}

/// The line that grew most from `before` to `after`, and its busiest CPU;
/// None when no line grew by at least `min` (nothing to tell by).
pub fn busiest(before: &Interrupts, after: &Interrupts, min: u64) -> Option<DiskIrq> {
    let (line, device, per_cpu) = after
        .lines
        .iter()
        .map(|(id, (name, counts))| {
            let was = before.lines.get(id).map(|b| b.1.as_slice()).unwrap_or(&[]);
            let delta: Vec<u64> = counts
                .iter()
                .enumerate()
                .map(|(i, c)| c.saturating_sub(was.get(i).copied().unwrap_or(0)))
                .collect();
            (id, name, delta)
        })
        .max_by_key(|(_, _, d)| d.iter().sum::<u64>())?;
    let total: u64 = per_cpu.iter().sum();
    if total < min {
        return None;
    }
    let (cpu, most) = per_cpu
        .iter()
        .enumerate()
        .max_by_key(|(_, c)| **c)
        .map(|(i, c)| (after.cpus[i], *c))?;
    Some(DiskIrq {
        line: line.clone(),
        device: device.clone(),
        share: most as f64 / total as f64,
        cpus: after.cpus.clone(),
        per_cpu,
        cpu,
    })
}

/// Writes `bytes` to a file under `dir` in 1 MiB pieces, each made durable,
/// and returns where the disk's interrupts landed meanwhile (None: too few
/// to tell, as on a tmpfs).
pub fn probe_disk(dir: &Path, bytes: u64) -> anyhow::Result<Option<DiskIrq>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("irq-probe");
    let before = interrupts()?;
    {
        let mut f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let piece = vec![0x5au8; 1 << 20];
        for _ in 0..bytes.div_ceil(1 << 20) {
            f.write_all(&piece)?;
            f.sync_data()?;
        }
    }
    let after = interrupts()?;
    let _ = std::fs::remove_file(&path);
    // A durable write is at least one completion: fewer than one per
    // piece means the file's disk is not one that interrupts.
    Ok(busiest(&before, &after, bytes >> 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "           CPU0       CPU1       \n\
 28:          0          0 PCI-MSIX-0000:00:01.0   0-edge      virtio0-config\n\
 36:          5     1000 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n\
 40:        100          0   IO-APIC   4-edge      ttyS0\n\
NMI:          0          0   Non-maskable interrupts\n\
LOC:     500000     400000   Local timer interrupts\n\
ERR:          0\n";

    const AFTER: &str = "           CPU0       CPU1       \n\
 28:          0          0 PCI-MSIX-0000:00:01.0   0-edge      virtio0-config\n\
 36:          7     1300 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0\n\
 40:        160          0   IO-APIC   4-edge      ttyS0\n\
NMI:          0          0   Non-maskable interrupts\n\
LOC:     900000     800000   Local timer interrupts\n\
ERR:          0\n";

    #[test]
    fn the_disk_line_and_its_cpu_are_found_and_the_timers_ignored() {
        let before = parse_interrupts(BEFORE).unwrap();
        assert_eq!(before.cpus, [0, 1]);
        assert_eq!(before.lines.len(), 3, "numbered lines only");
        assert_eq!(
            before.lines["36"],
            ("virtio1-req.0".to_owned(), vec![5, 1000])
        );
        let after = parse_interrupts(AFTER).unwrap();
        // The timers grew most, but they are not a device; the disk's line
        // (302) beats the serial port's (60).
        let d = busiest(&before, &after, 10).unwrap();
        assert_eq!(d.line, "36");
        assert_eq!(d.device, "virtio1-req.0");
        assert_eq!(d.per_cpu, [2, 300]);
        assert_eq!(d.cpus, [0, 1]);
        assert_eq!(d.cpu, 1);
        assert!((d.share - 300.0 / 302.0).abs() < 1e-9);
        // Too few to tell.
        assert_eq!(busiest(&before, &after, 1000), None);
        assert!(parse_interrupts("").is_err());
    }
}
