//! `cargo xtask soak`: the library, the agent and the kernel driven
//! together through random demand (`nodedb-soak`, in the test-support
//! crate), as root. Prints the seed first, the report after; on a
//! violation, the seed, the step and the state, and how to rerun it.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::{cargo, cmd};

pub struct Options {
    pub seconds: u64,
    /// None: a fresh one, printed.
    pub seed: Option<u64>,
}

/// A fresh seed: the clock's nanoseconds and this process's id, mixed.
fn fresh_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // SplitMix64's finaliser: neighbouring inputs give unrelated seeds.
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn soak(opts: &Options) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("the soak starts the agent and mounts a tmpfs: run it as root");
    }
    let seed = opts.seed.unwrap_or_else(fresh_seed);
    cmd::step(&format!(
        "soak: seed {seed}, {} s (rerun: cargo xtask soak --seed {seed} --seconds {})",
        opts.seconds, opts.seconds
    ));
    cmd::step("building the agent and the soak");
    let [agent, soak] = cargo::build_as_tests(&["nodedb-governor", "nodedb-soak"])?
        .try_into()
        .expect("two binaries asked for, two paths");
    let root = crate::root();
    // On the disk (the engines' files must be page cache a flush can
    // drop), not in /tmp, which may be a tmpfs.
    let scratch = root.join("target/soak");
    std::fs::create_dir_all(&scratch)?;
    let out = scratch.join(format!("report-{seed}.json"));
    cmd::step(&format!("soaking for {} s", opts.seconds));
    let mut child = Command::new(&soak)
        .args(["--seed", &seed.to_string()])
        .args(["--seconds", &opts.seconds.to_string()])
        .arg("--scratch")
        .arg(&scratch)
        .env(
            "NODEDB_GOVERNOR_AGENT_BIN",
            std::fs::canonicalize(&agent).context("the agent binary")?,
        )
        .stdout(std::fs::File::create(&out)?)
        .stderr(Stdio::inherit())
        .spawn()
        .context("running nodedb-soak")?;
    let status = child.wait().context("waiting for nodedb-soak")?;
    // A soak the kernel killed leaves its agent behind, and its spill
    // tmpfs mounted (its pages charged until it goes).
    kill_leftover_agents(child.id());
    detach(&scratch.join(format!("spill-{seed}")));
    let report: Option<Value> = std::fs::read(&out)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(report) = report else {
        let trail = scratch.join(format!("steps-{seed}.log"));
        let last = std::fs::read_to_string(&trail).unwrap_or_default();
        let tail: Vec<&str> = last.lines().rev().take(10).collect();
        bail!(
            "the soak (seed {seed}) ended without a report ({status}; killed by the kernel's OOM killer if signal 9: see dmesg); its last steps, newest first:\n{}\nrerun: cargo xtask soak --seed {seed} --seconds {}",
            tail.join("\n"),
            opts.seconds
        );
    };
    println!("{}", summary(&report));
    if !status.success() || !report["violation"].is_null() {
        bail!(
            "the soak found a violation (seed {seed}; rerun: cargo xtask soak --seed {seed} --seconds {}): {}",
            opts.seconds,
            report["violation"].as_str().unwrap_or("see above")
        );
    }
    Ok(())
}

/// A report's figures in a few lines.
pub fn summary(r: &Value) -> String {
    let map = |v: &Value| {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let per_engine = r["per_engine"].as_object();
    let sum = |field: &str| -> u64 {
        per_engine
            .map(|m| m.values().filter_map(|e| e[field].as_u64()).sum())
            .unwrap_or(0)
    };
    format!(
        "soak: seed {} engines {} ceiling {} MiB: {} steps in {:.0} s\n  events: {}\n  invariants checked: {}\n  refusals {}, spills {}, spill writes failed on purpose {}, spill target full {}, restored {}\n  attribution against VmRSS: worst {:.1} MiB apart (agent restarts moved it by {}); one engine's against what it holds: worst {:.1} MiB",
        r["seed"],
        r["engines"].as_array().map_or(0, Vec::len),
        r["ceiling_bytes"].as_u64().unwrap_or(0) >> 20,
        r["steps"],
        r["seconds"].as_f64().unwrap_or(0.0),
        map(&r["events"]),
        map(&r["checks"]),
        sum("refused"),
        sum("spills"),
        sum("spill_write_injected"),
        sum("spill_no_space"),
        sum("restored"),
        r["attribution_worst_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
        r["restart_shifts_bytes"]
            .as_array()
            .map(|v| {
                v.iter()
                    .map(|b| format!("{:.1} MiB", b.as_f64().unwrap_or(0.0) / f64::from(1 << 20)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "nothing: none".into()),
        r["engine_attribution_worst_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
    )
}

/// Stops the agents the soak `soak` started (their configuration in its
/// `nodedb-soak-<pid>-*` directory), left behind when the kernel killed
/// it; another run's are left alone.
fn kill_leftover_agents(soak: u32) {
    let theirs = format!("/nodedb-soak-{soak}-");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("nodedb-governor")
            && cmdline.contains(&theirs)
            && let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>()
        {
            // SAFETY: signalling a process by pid.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    remove_cgroups(&theirs[1..]);
}

/// Detaches whatever is mounted on `dir` (each layer); nothing when
/// nothing is.
fn detach(dir: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path; fails (EINVAL, ENOENT) once nothing
    // is mounted there.
    while unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } == 0 {}
}

/// Removes the cgroups named `<prefix>*` the soak's harness made (its
/// database's, in every hierarchy), deepest first: left behind when the
/// kernel killed the soak before its harness could remove them. One
/// still in use stays (the kernel refuses to remove it).
fn remove_cgroups(prefix: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    fn remove_tree(dir: &std::path::Path) {
        if let Ok(children) = std::fs::read_dir(dir) {
            for c in children.flatten() {
                if c.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&c.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    for h in hierarchies.flatten() {
        let Ok(cgroups) = std::fs::read_dir(h.path()) else {
            continue;
        };
        for c in cgroups.flatten() {
            if c.file_name().to_string_lossy().starts_with(prefix) {
                remove_tree(&c.path());
            }
        }
    }
}
