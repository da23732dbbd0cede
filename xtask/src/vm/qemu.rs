//! The qemu loop: boots a kernel with the initramfs under TCG, watches the
//! serial console (ttyS0: boot, progress, heartbeat, exit) and takes the
//! JSON results from the second serial port (ttyS1), which only the init
//! script writes, a block per result between marker lines (on the console
//! the heartbeat and the kernel's messages land in the middle of a long
//! result). A hard time limit kills qemu. A guest lost to its kernel, not to a failed
//! check, is booted once more after the evidence is printed: one that
//! froze (its heartbeat stopped; where its vCPUs are is the evidence) and
//! one that stopped before its script ended (qemu's status and the
//! console's tail).

use std::{
    fs,
    io::Write,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use super::freeze;
use crate::cmd::step;

/// The VM's memory: the bundled 1 GiB ceiling, and room for the `ample`
/// run (which takes what it wants) and the initramfs.
const VM_MEMORY_MIB: u32 = 3072;
/// vCPUs.
const VM_CPUS: u32 = 2;
/// The scratch disk (sparse) the workload spills to: an NVMe device, whose
/// driver and ext4 are built into Debian's cloud kernels (a tmpfs would
/// charge what is spilled to the very cgroup that spilled it).
const SCRATCH_GIB: u64 = 8;
/// A booted guest silent this long (it prints a heartbeat every 15 s) is
/// frozen.
const STALL: Duration = Duration::from_secs(120);

/// vm-check's JSON result, and the validations' that ran (each names its
/// `scenario`).
pub type Results = (serde_json::Value, Vec<serde_json::Value>);

/// Boots `kernel` with `initrd`, and once more if the guest was lost to
/// its kernel (a freeze, seen once in ~20 boots of 6.1 under TCG before
/// any test output; a guest that stopped before its script ended, once on
/// 6.12 right after vm-check, and the `int3` of [`accel_for`] before TCG
/// ran on one thread there): a second loss fails. The result of a second
/// boot says why there was one (`lost_boot`).
pub fn boot_twice_if_lost(
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    numa_nodes: u32,
    vm_dir: &Path,
) -> anyhow::Result<Results> {
    let booted = boot(kernel, initrd, timeout, numa_nodes, vm_dir);
    if let Err(e) = &booted
        && let Some(lost) = e.downcast_ref::<Lost>()
    {
        let what = lost.what;
        eprintln!("    {e:#}");
        step(&format!(
            "booting {} again (the guest {what})",
            kernel.display()
        ));
        return boot(kernel, initrd, timeout, numa_nodes, vm_dir).map(
            |(mut result, validations)| {
                result["lost_boot"] = what.into();
                (result, validations)
            },
        );
    }
    booted
}

/// `-accel` for this machine's qemu: see [`accel_for`].
pub fn accel() -> anyhow::Result<&'static str> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .context("running qemu-system-x86_64 --version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    accel_for(text.lines().next().unwrap_or_default())
}

/// `-accel` for the qemu whose `--version` line is `line`: TCG, run by a
/// single thread before qemu 8.1. Before 8.1 (its commit "accel/tcg:
/// Always lock pages before translation"), a block that one vCPU
/// translates while the other patches that page can outlive the patch;
/// when the kernel patches the static branch in `__schedule` (a program
/// attached to or detached from `sched_switch`, as the agent does at every
/// start and stop), the other vCPU can go on executing the `int3` that
/// `text_poke_bp` left there, and the guest dies ("Oops: int3" in
/// `__schedule`, 2 of 4 first boots of 6.12 in `.ci/run` on Debian 12's
/// qemu 7.2, each half a second after an OOM kill). One thread running
/// both vCPUs cannot race with itself; it costs a boot a quarter to a
/// third more time.
fn accel_for(line: &str) -> anyhow::Result<&'static str> {
    let version = line
        .split_once("version ")
        .map(|(_, v)| v.split_whitespace().next().unwrap_or_default())
        .with_context(|| format!("no version in qemu's `--version` line {line:?}"))?;
    let mut parts = version.split('.').map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        bail!("qemu's version {version:?} (from {line:?}) is not major.minor[.patch]");
    };
    Ok(if (major, minor) < (8, 1) {
        "tcg,thread=single"
    } else {
        "tcg"
    })
}

/// `-smp`: a socket per NUMA node, so that no CPU shares a last-level
/// cache with a CPU of another node (with both CPUs in one socket, 6.12
/// warns at boot that CPU 1's LLC sibling is on another node and taints
/// itself).
fn smp_arg(nodes: u32) -> String {
    let sockets = nodes.max(1);
    format!(
        "{VM_CPUS},sockets={sockets},cores={},threads=1",
        VM_CPUS / sockets
    )
}

/// qemu's arguments for `nodes` NUMA nodes sharing the VM's memory and
/// CPUs evenly (a RAM backend and CPUs per node); none for one node.
fn numa_args(nodes: u32) -> anyhow::Result<Vec<String>> {
    if nodes <= 1 {
        return Ok(Vec::new());
    }
    if !VM_CPUS.is_multiple_of(nodes) || !VM_MEMORY_MIB.is_multiple_of(nodes) {
        bail!("{nodes} NUMA nodes do not divide {VM_CPUS} CPUs and {VM_MEMORY_MIB} MiB evenly");
    }
    let (cpus, mib) = (VM_CPUS / nodes, VM_MEMORY_MIB / nodes);
    let mut args = Vec::new();
    for n in 0..nodes {
        args.push("-object".to_owned());
        args.push(format!("memory-backend-ram,id=mem{n},size={mib}M"));
        args.push("-numa".to_owned());
        let first = n * cpus;
        let last = first + cpus - 1;
        args.push(format!("node,nodeid={n},cpus={first}-{last},memdev=mem{n}"));
    }
    Ok(args)
}

/// Boots `kernel` with `initrd` once.
fn boot(
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    numa_nodes: u32,
    vm_dir: &Path,
) -> anyhow::Result<Results> {
    let name = kernel.file_name().unwrap_or_default().to_string_lossy();
    let console = vm_dir.join(format!("console-{name}.log"));
    let _ = fs::remove_file(&console);
    let results = vm_dir.join(format!("results-{name}.log"));
    let _ = fs::remove_file(&results);
    // A fresh sparse scratch disk per boot.
    let scratch = vm_dir.join(format!("scratch-{name}.img"));
    let _ = fs::remove_file(&scratch);
    fs::File::create(&scratch)?.set_len(SCRATCH_GIB << 30)?;
    let monitor = vm_dir.join(format!("monitor-{name}.sock"));
    let _ = fs::remove_file(&monitor);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", accel()?, "-cpu", "max", "-smp"])
        .arg(smp_arg(numa_nodes))
        .args(["-m", &VM_MEMORY_MIB.to_string()])
        .args(numa_args(numa_nodes)?)
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=scratch,format=raw,cache=unsafe",
            scratch.display()
        ))
        .args(["-device", "nvme,serial=nodedb-scratch,drive=scratch"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        // nokaslr: the vCPUs' addresses read from the monitor on a stall
        // are System.map's. nodedb.numa_nodes: what vm-check expects.
        // loglevel=5: warnings too, so that a WARN that taints the kernel
        // is in the console (and in its tail when a boot is lost).
        .arg(format!(
            "console=ttyS0 panic=-1 oops=panic loglevel=5 nokaslr nodedb.numa_nodes={}",
            numa_nodes.max(1)
        ))
        .args(["-display", "none", "-no-reboot"])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .stdin(Stdio::null())
        .spawn()
        .context("starting qemu")?;
    let started = Instant::now();
    let tail = |n: usize| console_tail(&fs::read_to_string(&console).unwrap_or_default(), n);
    let mut booted = false;
    let (mut seen, mut last_output) = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let text = fs::read_to_string(&console).unwrap_or_default();
        if text.len() != seen {
            (seen, last_output) = (text.len(), Instant::now());
        }
        if !booted && let Some(l) = text.lines().find(|l| l.starts_with("NODEDB-VM-BOOTED")) {
            booted = true;
            eprintln!("    {l} ({:.1} s)", started.elapsed().as_secs_f64());
        }
        let exited = qemu.try_wait()?;
        if text.contains("NODEDB-VM-EXIT") || exited.is_some() {
            let status = match exited {
                Some(s) => s,
                None => {
                    // poweroff -f follows; give it a moment.
                    let deadline = Instant::now() + Duration::from_secs(20);
                    while qemu.try_wait()?.is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = qemu.kill();
                    qemu.wait()?
                }
            };
            let _ = std::io::stderr().flush();
            let _ = fs::remove_file(&scratch);
            // All qemu wrote, read after it stopped.
            let text = fs::read_to_string(&console).unwrap_or_default();
            if !text.contains("NODEDB-VM-EXIT") {
                // A guest panic (oops=panic, panic=-1 and -no-reboot make
                // qemu exit) or qemu's own death.
                return Err(Lost {
                    what: "stopped early",
                    evidence: format!(
                        "the guest stopped after {:.0} s, before its script ended (qemu: {status}); console tail:\n{}",
                        started.elapsed().as_secs_f64(),
                        console_tail(&text, 60)
                    ),
                }
                .into());
            }
            let lines = |tag: &str| -> Vec<String> {
                text.lines()
                    .filter_map(|l| l.split_once(tag).map(|(_, j)| j.to_owned()))
                    .collect()
            };
            for exit in lines("NODEDB-VALIDATE-EXIT ") {
                eprintln!("    validation exit: {exit}");
                if !exit.trim().ends_with(" 0") && exit.trim() != "0" {
                    eprintln!(
                        "    the validation's console tail:\n{}",
                        console_tail(&text, 40)
                    );
                }
            }
            for lost in lines("NODEDB-RESULT-LOST ") {
                eprintln!("    a result was lost: {lost}");
            }
            // Lossy: a stray byte on the line costs its block, not all.
            let sent =
                String::from_utf8_lossy(&fs::read(&results).unwrap_or_default()).into_owned();
            let mut check = None;
            let mut validations = Vec::new();
            for (block, json) in result_blocks(&sent) {
                if let Some(log) = block.strip_prefix("log-") {
                    // A log the guest sent as evidence: kept beside the
                    // console's.
                    let file = vm_dir.join(format!("{log}-{name}.log"));
                    match fs::write(&file, &json) {
                        Ok(()) => eprintln!("    the guest's {log} log: {}", file.display()),
                        Err(e) => eprintln!("    writing {}: {e}", file.display()),
                    }
                    // A workload's last lines say why it exited non-zero;
                    // printed, so a CI log that keeps no files still has
                    // them.
                    if log.ends_with("-workload") {
                        for line in console_tail(&json, 12).lines() {
                            eprintln!("      | {line}");
                        }
                    }
                    continue;
                }
                match serde_json::from_str::<serde_json::Value>(&json) {
                    Ok(value) if block == "vm-check" => check = Some(value),
                    Ok(value) => validations.push(value),
                    // Its scenario then has no result, which fails on its
                    // own; the others stand.
                    Err(e) => {
                        eprintln!("    the VM's result `{block}` is not JSON ({e}); left out")
                    }
                }
            }
            return match check {
                Some(result) => {
                    eprintln!("    finished in {:.1} s", started.elapsed().as_secs_f64());
                    Ok((result, validations))
                }
                None => bail!(
                    "the VM stopped without vm-check's result on its second serial port ({}); console tail:\n{}",
                    results.display(),
                    console_tail(&text, 40)
                ),
            };
        }
        // The guest prints a heartbeat every 15 s: silence means its
        // kernel is frozen. Where its CPUs are is the evidence.
        if booted && last_output.elapsed() > STALL {
            let cpus = freeze::frozen_cpus(&monitor, kernel);
            let _ = qemu.kill();
            let _ = qemu.wait();
            let _ = fs::remove_file(&scratch);
            return Err(Lost {
                what: "froze",
                evidence: format!(
                    "the guest froze: no console output for {STALL:?} (the heartbeat is every \
                     15 s) after {:.0} s; its CPUs:\n{cpus}\nconsole tail:\n{}",
                    started.elapsed().as_secs_f64(),
                    tail(40)
                ),
            }
            .into());
        }
        if started.elapsed() > timeout {
            let _ = qemu.kill();
            let _ = qemu.wait();
            let _ = fs::remove_file(&scratch);
            bail!(
                "no verdict within {timeout:?} (hang or lockup); console tail:\n{}",
                tail(40)
            );
        }
    }
}

/// The result blocks the init script wrote to the second serial port:
/// `NODEDB-RESULT <name>`, the JSON, `NODEDB-RESULT-END`, each on its own
/// lines (the serial line may add `\r`). A block cut off by the guest's
/// end is left out (its result is then missing, which fails on its own).
fn result_blocks(text: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in text.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(name) = line.strip_prefix("NODEDB-RESULT ") {
            open = Some((name.trim().to_owned(), String::new()));
        } else if line == "NODEDB-RESULT-END" {
            blocks.extend(open.take());
        } else if let Some((_, body)) = &mut open {
            body.push_str(line);
            body.push('\n');
        }
    }
    blocks
}

/// The last `n` lines of the console, each cut at 300 characters (the
/// JSON results are one long line each).
fn console_tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| match l.char_indices().nth(300) {
            Some((i, _)) => format!("{}…", &l[..i]),
            None => (*l).to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A guest lost to its kernel, not to a failed check: one that went
/// silent (`froze`) or stopped before its script ended (`stopped early`).
/// The harness boots it once more.
#[derive(Debug)]
struct Lost {
    what: &'static str,
    evidence: String,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.evidence)
    }
}

impl std::error::Error for Lost {}

#[cfg(test)]
mod tests {
    use super::{accel_for, result_blocks, smp_arg};

    #[test]
    fn tcg_runs_on_one_thread_before_qemu_8_1_and_a_bad_version_line_is_an_error() {
        let debian12 = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)";
        assert_eq!(accel_for(debian12).unwrap(), "tcg,thread=single");
        assert_eq!(
            accel_for("QEMU emulator version 8.0.5").unwrap(),
            "tcg,thread=single"
        );
        assert_eq!(accel_for("QEMU emulator version 8.1.0").unwrap(), "tcg");
        assert_eq!(
            accel_for("QEMU emulator version 10.0.2 (Debian)").unwrap(),
            "tcg"
        );
        let none = accel_for("qemu-system-x86_64: command not found").unwrap_err();
        assert!(format!("{none:#}").contains("no version"), "{none:#}");
        let bad = accel_for("QEMU emulator version eight").unwrap_err();
        assert!(format!("{bad:#}").contains("\"eight\""), "{bad:#}");
    }

    #[test]
    fn each_numa_node_is_a_socket_of_its_own() {
        assert_eq!(smp_arg(2), "2,sockets=2,cores=1,threads=1");
        assert_eq!(smp_arg(1), "2,sockets=1,cores=2,threads=1");
        assert_eq!(smp_arg(0), "2,sockets=1,cores=2,threads=1");
    }

    #[test]
    fn result_blocks_are_read_whole_and_a_cut_one_is_left_out() {
        let text = "NODEDB-RESULT vm-check\r\n{\"passed\":true}\r\n\r\nNODEDB-RESULT-END\r\n\
                    NODEDB-RESULT validate\n{\"scenario\":\n\"mixed\"}\nNODEDB-RESULT-END\n\
                    NODEDB-RESULT validate-cache\n{\"scenario\":\"ca";
        let blocks = result_blocks(text);
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        assert_eq!(blocks[0].0, "vm-check");
        let v: serde_json::Value = serde_json::from_str(&blocks[0].1).unwrap();
        assert_eq!(v["passed"], true);
        assert_eq!(blocks[1].0, "validate");
        let v: serde_json::Value = serde_json::from_str(&blocks[1].1).unwrap();
        assert_eq!(v["scenario"], "mixed");
    }
}
