//! Where a frozen guest's vCPUs are: RIPs read from the qemu monitor,
//! named from the kernel's System.map (the guest boots with nokaslr, so
//! the addresses are the map's).

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{Context, bail};

use super::kernel;

/// Three samples of each vCPU's RIP from the qemu monitor at `monitor`,
/// one line each, named from the System.map next to `kernel`.
pub fn frozen_cpus(monitor: &Path, kernel: &Path) -> String {
    let symbols = kernel
        .parent()
        .and_then(|dir| match kernel::real_system_map(dir) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("    no kernel symbols: {e:#}");
                None
            }
        })
        .map(|t| parse_system_map(&t))
        .unwrap_or_default();
    let mut out = String::new();
    for sample in 0..3 {
        if sample > 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        match hmp(monitor, "info registers -a") {
            Ok(text) => {
                let rips = vcpu_rips(&text);
                if rips.is_empty() {
                    out.push_str(&format!(
                        "  sample {sample}: no RIP in the monitor's answer\n"
                    ));
                }
                for (cpu, rip) in rips {
                    out.push_str(&format!(
                        "  sample {sample}: cpu {cpu} RIP {rip:#x} {}\n",
                        symbolize(&symbols, rip)
                    ));
                }
            }
            Err(e) => out.push_str(&format!("  sample {sample}: monitor: {e:#}\n")),
        }
    }
    out
}

/// One human-monitor command over its unix socket; returns the answer.
fn hmp(socket: &Path, command: &str) -> anyhow::Result<String> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let read_prompt = |s: &mut UnixStream| -> anyhow::Result<String> {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while !got.ends_with(b"(qemu) ") {
            let n = s.read(&mut buf).context("reading the monitor")?;
            if n == 0 {
                bail!("the monitor closed");
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok(String::from_utf8_lossy(&got).into_owned())
    };
    read_prompt(&mut s)?;
    s.write_all(format!("{command}\n").as_bytes())?;
    read_prompt(&mut s)
}

/// `(cpu, RIP)` for each "CPU#n" block of `info registers -a`.
fn vcpu_rips(text: &str) -> Vec<(u32, u64)> {
    let mut cpu = None;
    let mut rips = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(n) = line.strip_prefix("CPU#") {
            cpu = n.trim().parse().ok();
        }
        if let (Some(c), Some(rest)) = (cpu, line.strip_prefix("RIP=")) {
            let hex = rest.split_whitespace().next().unwrap_or_default();
            if let Ok(rip) = u64::from_str_radix(hex, 16) {
                rips.push((c, rip));
            }
        }
    }
    rips
}

/// System.map's text symbols, sorted by address.
fn parse_system_map(text: &str) -> Vec<(u64, String)> {
    let mut syms: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let addr = u64::from_str_radix(f.next()?, 16).ok()?;
            let kind = f.next()?;
            let name = f.next()?;
            matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_owned()))
        })
        .collect();
    syms.sort();
    syms
}

/// `name+0xoff` of the symbol at or below `addr`; "(user space)" below the
/// kernel's first symbol.
fn symbolize(symbols: &[(u64, String)], addr: u64) -> String {
    match symbols.partition_point(|(a, _)| *a <= addr) {
        0 if symbols.is_empty() => "(no System.map)".to_owned(),
        0 => "(user space)".to_owned(),
        i => {
            let (base, name) = &symbols[i - 1];
            format!("{name}+{:#x}", addr - base)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_each_vcpus_rip_from_system_map() {
        let map = parse_system_map(
            "ffffffff81000000 T _stext\n\
             ffffffff81000100 t native_safe_halt\n\
             ffffffff81000200 D some_data\n\
             ffffffff81000300 T queued_spin_lock_slowpath\n",
        );
        let regs = "CPU#0\nRAX=0000000000000000 RBX=0000000000000001\n\
                    RIP=ffffffff81000310 RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
                    CPU#1\nRIP=ffffffff81000104 RFL=00000246\n\
                    CPU#2\nRIP=00007f0011223344 RFL=00000246\n";
        let named: Vec<String> = vcpu_rips(regs)
            .into_iter()
            .map(|(cpu, rip)| format!("{cpu} {}", symbolize(&map, rip)))
            .collect();
        assert_eq!(
            named,
            [
                "0 queued_spin_lock_slowpath+0x10",
                "1 native_safe_halt+0x4",
                "2 (user space)"
            ]
        );
        assert_eq!(symbolize(&[], 0x1000), "(no System.map)");
    }
}
