//! The VMs' initramfs: busybox, the binaries with their debug info
//! stripped, the shared libraries `ldd` names, the bundled configuration,
//! and an `/init` that mounts cgroup2 with the memory controller and the
//! scratch disk (ext4), runs `vm-check` and then, if asked, the validation
//! (newc cpio, gzip).

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use super::Options;
use crate::cmd;

/// The loan grace in the VMs (nodedb-validate --loan-grace-ms; 1 s on the
/// host): under TCG a timeseries flush takes 1.2 s and a vector segment
/// written out up to 2.3 s, and samples are 500 ms apart. With 1 s, a
/// borrower still spilling was judged on the smaller budget: timeseries
/// at 105% of it on 6.12, 0.6 s after the loan was taken back (the lender
/// lent it again 0.5 s later); vector at 108%, 2.3 s into its spill, with
/// a second guest sharing the host's CPUs.
const VM_LOAN_GRACE_MS: u64 = 3000;
/// The workload's sizes in the VMs when none are given. TCG emulates the
/// HNSW build's float arithmetic about 40 times slower than the host runs
/// it (timeseries and the GROUP BY about 15 times): the vector engine
/// indexes 8,000 vectors with 56 KiB documents instead of 60,000 with
/// 8 KiB, for about as much memory. The rest are the defaults, but for the
/// solo phase (each engine alone in turn), left out: it doubles a run's
/// time, and under TCG that is minutes per run (`cargo xtask vm-test --
/// <sizes>` runs it when the sizes given leave `--solo false` out).
const VM_WORKLOAD: &[&str] = &[
    "--vectors",
    "8000",
    "--segment",
    "500",
    "--payload",
    "57344",
    "--queries",
    "50",
    "--solo",
    "false",
];

/// The cache scenario's arguments in the VMs (nodedb-cache; the host
/// runs its defaults): the same index and ceiling, queries paced for TCG.
/// The flush is `--flush-mib` from [`CACHE_FLUSH_BY_KERNEL`]. The
/// governed writer's write-behind runs 32 MiB ahead instead of 8: the
/// emulated NVMe disk completes slowly, and more in flight keeps it busy
/// (governed flush in the 6.1 VM, same boot: 43 MiB/s at 8 MiB, 49-55 at
/// 32 and 64; 63-68 at 32 in another boot).
const VM_CACHE: &[&str] = &[
    "--qps",
    "100",
    "--file-mib",
    "128",
    "--write-behind-mib",
    "32",
];

/// The cache scenario's flush on a kernel series, as a shell `case` on
/// `uname -r` that sets `$flush`. A buffered 2 GiB flush runs at about
/// 6 MiB/s under TCG against the ceiling's reclaim (455 s for the
/// ungoverned run alone), so the flush is as small as still contends:
/// on 6.1 a quarter of it (512 MiB, four times the cache's room beside
/// the index: ungoverned, the hot set falls to ~53% resident with ~3,200
/// major faults); on 6.12 the kernel alone keeps the hot set resident
/// against 512 MiB (no fault, ungoverned), so there it is 2 GiB (74%
/// resident, ~12,500 faults).
const CACHE_FLUSH_BY_KERNEL: &str =
    "case \"$(uname -r)\" in 6.1.*) flush=512 ;; *) flush=2048 ;; esac";

const INIT_HEAD: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s /bin
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t cgroup2 none /sys/fs/cgroup
echo "+memory +pids" > /sys/fs/cgroup/cgroup.subtree_control
echo "NODEDB-VM-BOOTED $(uname -r) controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
echo 30 > /proc/sys/kernel/hung_task_timeout_secs
# The results go to the host on the second serial port, which nothing else
# writes to (on the console the heartbeat and the kernel's messages land in
# the middle of a long line): a block per result, between marker lines.
result() {
  if [ -f "$2" ]; then
    { echo "NODEDB-RESULT $1"; cat "$2"; echo; echo "NODEDB-RESULT-END"; } > /dev/ttyS1 \
      || echo "NODEDB-RESULT-LOST $1: cannot write /dev/ttyS1"
  fi
}
(while sleep 15; do echo "NODEDB-VM-HEARTBEAT $(cut -d' ' -f1 /proc/uptime)"; done) &
disk=none
if mke2fs -q /dev/nvme0n1 && mount -t ext4 /dev/nvme0n1 /mnt; then disk=/mnt; fi
"#;

/// The `/init` script: the scratch disk formatted and mounted, vm-check,
/// then, when `opts` asks for validation runs, `nodedb-validate` on the
/// bundled configuration.
pub fn init_script(opts: &Options) -> String {
    let mut s = INIT_HEAD.to_owned();
    s.push_str(&format!(
        "/bin/vm-check --bin-dir /bin --work /tmp/vm-check --disk \"$disk\" --breach-rounds {}\n\
         status=$?\n\
         result vm-check /tmp/vm-check/result.json\n",
        opts.breach_rounds
    ));
    if !opts.validate_modes.is_empty() {
        // Single-quoted for the shell (the arguments are sizes and flags).
        let given: Vec<String> = if opts.workload_args.is_empty() {
            VM_WORKLOAD.iter().map(|a| (*a).to_owned()).collect()
        } else {
            opts.workload_args.clone()
        };
        let workload: Vec<String> = given
            .iter()
            .map(|a| format!("'{}'", a.replace('\'', "")))
            .collect();
        let lines = [
            "if [ \"$disk\" = /mnt ]; then".to_owned(),
            format!(
                "  /bin/nodedb-validate --config /etc/nodedb-governor.toml --out /tmp/validate \\\n    --scratch /mnt --interval-ms 500 --loan-grace-ms {VM_LOAN_GRACE_MS} --timeout-secs 1200 --modes {} -- {}",
                opts.validate_modes.join(","),
                workload.join(" ")
            ),
            "  code=$?".to_owned(),
            "  echo \"NODEDB-VALIDATE-EXIT $code\"".to_owned(),
            "  result validate /tmp/validate/summary.json".to_owned(),
            // A missed target: the governed agent's log goes to the host
            // (its last 2,000 lines), for the evidence.
            "  if [ \"$code\" != 0 ]; then tail -n 2000 /tmp/validate/run-governed/agent.log > /tmp/agent-tail.log; result log-governed-agent /tmp/agent-tail.log; fi".to_owned(),
            // And each run's workload log (why a workload exited non-zero).
            "  if [ \"$code\" != 0 ]; then for r in /tmp/validate/run-*; do [ -f \"$r/workload.log\" ] && tail -n 200 \"$r/workload.log\" > /tmp/wl-tail.log && result \"log-${r##*/run-}-workload\" /tmp/wl-tail.log; done; fi".to_owned(),
            "else".to_owned(),
            "  echo \"NODEDB-VALIDATE-EXIT no scratch disk\"".to_owned(),
            "fi".to_owned(),
        ];
        for l in lines {
            s.push_str(&l);
            s.push('\n');
        }
    }
    if let Some(kernels) = opts.cache_scenario.case_pattern() {
        let lines = [
            format!("case \"$(uname -r)\" in\n{kernels})"),
            CACHE_FLUSH_BY_KERNEL.to_owned(),
            "if [ \"$disk\" = /mnt ]; then".to_owned(),
            format!(
                "  /bin/nodedb-validate --scenario cache --config /etc/nodedb-cache.toml --out /tmp/validate-cache \\\n    --scratch /mnt --timeout-secs 1800 --modes ungoverned,governed --timing emulated -- --flush-mib \"$flush\" {}",
                VM_CACHE.join(" ")
            ),
            "  echo \"NODEDB-VALIDATE-EXIT cache $?\"".to_owned(),
            "  result validate-cache /tmp/validate-cache/summary.json".to_owned(),
            "else".to_owned(),
            "  echo \"NODEDB-VALIDATE-EXIT cache: no scratch disk\"".to_owned(),
            "fi ;;".to_owned(),
            "esac".to_owned(),
        ];
        for l in lines {
            s.push_str(&l);
            s.push('\n');
        }
    }
    s.push_str("echo \"NODEDB-VM-EXIT $status\"\npoweroff -f\n");
    s
}

/// Builds `initrd.gz` from busybox, `bins`, their shared libraries, the
/// bundled configuration and `init`.
pub fn build(vm_dir: &Path, bins: &[PathBuf], init: &str) -> anyhow::Result<PathBuf> {
    let dir = vm_dir.join("initramfs");
    let _ = fs::remove_dir_all(&dir);
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "etc"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copying /bin/busybox")?;
    let mut libs = BTreeSet::new();
    for b in bins {
        let name = b.file_name().context("binary name")?;
        cmd::run(
            Command::new("objcopy")
                .arg("--strip-debug")
                .arg(b)
                .arg(dir.join("bin").join(name)),
        )?;
        let ldd = cmd::output(Command::new("ldd").arg(b))
            .with_context(|| format!("ldd {}", b.display()))?;
        for line in ldd.lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
            // "/lib64/ld-linux-x86-64.so.2 (0x...)"
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(p) = path.filter(|p| p.starts_with('/')) {
                libs.insert(PathBuf::from(p));
            }
        }
    }
    for lib in &libs {
        let dst = dir.join(lib.strip_prefix("/")?);
        fs::create_dir_all(dst.parent().context("library directory")?)?;
        fs::copy(lib, &dst).with_context(|| format!("copying {}", lib.display()))?;
    }
    fs::copy(
        crate::root().join("deploy/nodedb-governor.toml"),
        dir.join("etc/nodedb-governor.toml"),
    )
    .context("copying the bundled configuration")?;
    fs::copy(
        crate::root().join(crate::validate::Scenario::Cache.config()),
        dir.join("etc/nodedb-cache.toml"),
    )
    .context("copying the cache scenario's configuration")?;
    let init_path = dir.join("init");
    fs::write(&init_path, init)?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))?;
    let out = vm_dir.join("initrd.gz");
    let status = Command::new("sh")
        .current_dir(&dir)
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet | gzip -1 > {}",
            out.display()
        ))
        .status()?;
    if !status.success() {
        bail!("building the cpio archive failed");
    }
    eprintln!(
        "    {} ({} MiB, {} binaries, {} libraries)",
        out.display(),
        fs::metadata(&out)?.len() >> 20,
        bins.len(),
        libs.len()
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(breach_rounds: u32, validate: &[&str]) -> Options {
        Options {
            series: Vec::new(),
            kernels: Vec::new(),
            timeout: std::time::Duration::from_secs(60),
            validate_modes: validate.iter().map(|m| (*m).to_owned()).collect(),
            workload_args: Vec::new(),
            cache_scenario: super::super::CacheScenario::Never,
            numa_nodes: 1,
            breach_rounds,
        }
    }

    #[test]
    fn vm_check_runs_first_with_the_breaches_asked_for() {
        let s = init_script(&options(100, &["governed"]));
        let check = s
            .find("/bin/vm-check ")
            .expect("the init script runs vm-check");
        let line = s[check..].lines().next().unwrap();
        assert!(line.ends_with("--breach-rounds 100"), "{line}");
        // Its result is sent before the validation starts.
        let sent = s
            .find("result vm-check ")
            .expect("vm-check's result is sent");
        let validate = s.find("/bin/nodedb-validate").expect("validation runs");
        assert!(check < sent && sent < validate, "{s}");
        assert!(
            init_script(&options(10, &[])).contains("--breach-rounds 10\n"),
            "the default reaches vm-check"
        );
    }
}
