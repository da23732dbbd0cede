//! `cargo xtask vm-test`: the tests that need cgroup v2 with the memory
//! controller, which the hosts do not have (hybrid cgroups), run in qemu on
//! Debian's cloud kernels.
//!
//! 1. Installs qemu, busybox (static) and cpio when they are missing.
//! 2. Builds the agent and the probes (the debug profile `cargo test`
//!    builds anyway).
//! 3. Gets each kernel with `apt-get download` (the newest of the series;
//!    cached under `target/vm/kernels`), or takes `--kernel PATH`.
//! 4. Builds an initramfs (newc cpio, gzip): busybox, the binaries with
//!    their debug info stripped, the shared libraries `ldd` names, and an
//!    `/init` that mounts cgroup2 with the memory controller and runs
//!    `vm-check`.
//! 5. Boots each kernel under TCG (KVM hangs on these hosts), reads the
//!    serial console, and takes the verdict and the JSON result from it.
//!    A hard time limit kills qemu; a hang or a failed check fails the
//!    task with the console's tail. A guest lost to its kernel is booted
//!    once more after the evidence is printed, and a second loss fails:
//!    one that froze (it prints a heartbeat every 15 s; after 2 min of
//!    silence the harness prints where its vCPUs are, RIPs from the qemu
//!    monitor named from the kernel's System.map), and one that stopped
//!    before its script ended (a panic makes qemu exit: qemu's status and
//!    the console's tail).

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::cmd::{self, step};

/// The binaries the VM runs.
const AGENT: &str = "nodedb-governor";
const PROBE_BINS: &[&str] = &["vm-check", "breach-probe", "hold-probe"];
const WORKLOAD_BINS: &[&str] = &["nodedb-workload", "nodedb-validate"];
/// The VM's memory: the bundled 1 GiB ceiling, and room for the `ample`
/// run (which takes what it wants) and the initramfs.
const VM_MEMORY_MIB: u32 = 3072;
/// The scratch disk (sparse) the workload spills to: an NVMe device, whose
/// driver and ext4 are built into Debian's cloud kernels (a tmpfs would
/// charge what is spilled to the very cgroup that spilled it).
const SCRATCH_GIB: u64 = 8;
/// A booted guest silent this long (it prints a heartbeat every 15 s) is
/// frozen.
const STALL: Duration = Duration::from_secs(120);
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
/// 8 KiB, for about as much memory. The rest are the defaults.
const VM_WORKLOAD: &[&str] = &[
    "--vectors",
    "8000",
    "--segment",
    "500",
    "--payload",
    "57344",
    "--queries",
    "50",
];

pub struct Options {
    /// Kernel series to fetch from Debian ("6.1", "6.12").
    pub series: Vec<String>,
    /// Other bzImages to boot.
    pub kernels: Vec<PathBuf>,
    /// Per boot.
    pub timeout: Duration,
    /// The validation runs in each VM (`nodedb-validate --modes`); empty:
    /// none.
    pub validate_modes: Vec<String>,
    /// Arguments for nodedb-workload in the VMs (empty: its defaults).
    pub workload_args: Vec<String>,
}

pub fn vm_test(opts: &Options) -> anyhow::Result<()> {
    packages()?;
    step("building the agent and the VM probes");
    let root = crate::root();
    cmd::run(Command::new("cargo").current_dir(&root).args([
        "build",
        "-q",
        "-p",
        "nodedb-governor-agent",
        "--bin",
        AGENT,
    ]))?;
    let mut probes = Command::new("cargo");
    probes
        .current_dir(&root)
        .args(["build", "-q", "-p", "nodedb-governor-testkit"]);
    for b in PROBE_BINS {
        probes.args(["--bin", b]);
    }
    cmd::run(&mut probes)?;
    let mut workload = Command::new("cargo");
    workload
        .current_dir(&root)
        .args(["build", "-q", "-p", "nodedb-governor-workload"]);
    for b in WORKLOAD_BINS {
        workload.args(["--bin", b]);
    }
    cmd::run(&mut workload)?;
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir)?;
    let target = root.join("target/debug");
    let bins: Vec<PathBuf> = std::iter::once(AGENT)
        .chain(PROBE_BINS.iter().copied())
        .chain(WORKLOAD_BINS.iter().copied())
        .map(|b| target.join(b))
        .collect();
    step("building the initramfs");
    let initrd = initramfs(&vm_dir, &bins, &init_script(opts))?;
    let mut kernels = Vec::new();
    for s in &opts.series {
        kernels.push(debian_kernel(&vm_dir.join("kernels"), s)?);
    }
    kernels.extend(opts.kernels.iter().cloned());
    let results = vm_dir.join("results");
    fs::create_dir_all(&results)?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for k in &kernels {
        step(&format!("booting {} under TCG", k.display()));
        let mut booted = boot(k, &initrd, opts.timeout, &vm_dir);
        // A guest lost to its kernel (a freeze, seen once in ~20 boots of
        // 6.1 under TCG before any test output; a guest that stopped
        // before its script ended, once on 6.12 right after vm-check) is
        // booted once more, after the evidence is printed; a second loss
        // fails.
        if let Err(e) = &booted
            && let Some(lost) = e.downcast_ref::<Lost>()
        {
            let what = lost.what;
            eprintln!("    {e:#}");
            step(&format!("booting {} again (the guest {what})", k.display()));
            booted = boot(k, &initrd, opts.timeout, &vm_dir).map(|(mut result, validation)| {
                result["lost_boot"] = what.into();
                (result, validation)
            });
        }
        match booted {
            Ok((result, validation)) => {
                let kernel = result["kernel"].as_str().unwrap_or("unknown").to_owned();
                let file = results.join(format!("{kernel}.json"));
                fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
                let mut passed = result["passed"] == true;
                if !opts.validate_modes.is_empty() {
                    match validation {
                        Some(v) => {
                            let dir = root.join("target/validate").join(&kernel);
                            let met = crate::validate::write_report(&dir, &v)?;
                            if !met {
                                eprintln!("    FAIL the governed run missed the target");
                                passed = false;
                            }
                        }
                        None => {
                            eprintln!("    FAIL the validation printed no result");
                            passed = false;
                        }
                    }
                }
                for c in result["checks"].as_array().into_iter().flatten() {
                    eprintln!(
                        "    {} {}: {}",
                        if c["ok"] == true { "ok  " } else { "FAIL" },
                        c["name"].as_str().unwrap_or_default(),
                        c["detail"]
                    );
                }
                eprintln!("    result: {}", file.display());
                summary.push(format!(
                    "{kernel}: {}{}",
                    if passed { "passed" } else { "FAILED" },
                    match result["lost_boot"].as_str() {
                        Some(what) => format!(" (on a second boot: the first {what})"),
                        None => String::new(),
                    }
                ));
                if !passed {
                    failed.push(kernel);
                }
            }
            Err(e) => {
                eprintln!("    {e:#}");
                summary.push(format!(
                    "{}: FAILED ({})",
                    k.display(),
                    e.to_string().lines().next().unwrap_or_default()
                ));
                failed.push(k.display().to_string());
            }
        }
    }
    step("VM tests");
    for s in &summary {
        eprintln!("    {s}");
    }
    if !failed.is_empty() {
        bail!("VM tests failed on {}", failed.join(", "));
    }
    Ok(())
}

fn packages() -> anyhow::Result<()> {
    step("checking the VM tools");
    let tools = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
    ];
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(bin, _)| {
            cmd::output(Command::new("sh").args(["-c", &format!("command -v {bin}")])).is_none()
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    // A dynamically linked busybox cannot run alone in the initramfs.
    let static_busybox = Path::new("/bin/busybox").exists()
        && cmd::output(Command::new("file").arg("-L").arg("/bin/busybox"))
            .is_none_or(|f| f.contains("statically linked"));
    let mut missing: Vec<&str> = missing;
    if !static_busybox && !missing.contains(&"busybox-static") {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        eprintln!("    qemu, static busybox, cpio: present");
        return Ok(());
    }
    if !Path::new("/etc/debian_version").exists() || !cmd::is_root() {
        bail!(
            "missing {}: install them (Debian: apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    step(&format!("installing {}", missing.join(" ")));
    let install = |cmd: &mut Command| {
        cmd::run(
            cmd.args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    if install(&mut Command::new("apt-get")).is_err() {
        cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
        install(&mut Command::new("apt-get"))?;
    }
    Ok(())
}

/// A version's numbers, for ordering package names.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest Debian cloud kernel of `series`, downloaded and unpacked
/// once into `cache`; returns its bzImage.
fn debian_kernel(cache: &Path, series: &str) -> anyhow::Result<PathBuf> {
    let pattern = match series {
        "6.1" => r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$",
        "6.12" => r"^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64$",
        other => bail!("unknown kernel series {other:?} (6.1 or 6.12; or --kernel PATH)"),
    };
    let search = || {
        cmd::output(Command::new("apt-cache").args(["search", "--names-only", pattern]))
            .unwrap_or_default()
    };
    let mut found = search();
    if found.trim().is_empty() && cmd::is_root() {
        cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
        found = search();
    }
    let Some(package) = found
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .max_by_key(|n| version_key(n))
        .map(str::to_owned)
    else {
        bail!(
            "apt-cache finds no package matching {pattern} (is the Debian archive in sources.list?)"
        );
    };
    let dir = cache.join(&package);
    if let Some(k) = find_vmlinuz(&dir).filter(|_| system_map(&dir).is_some()) {
        eprintln!("    {package}: cached");
        return Ok(k);
    }
    step(&format!("downloading {package}"));
    let dl = cache.join("download");
    let deb = apt_download(&dl, &package)?;
    let unpack = cache.join(format!("{package}.tmp"));
    let _ = fs::remove_dir_all(&unpack);
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpack))?;
    // Only the kernel and its symbols are needed (the modules are not:
    // everything the tests use is built in).
    let boot = unpack.join("boot");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    for e in fs::read_dir(&boot)?.flatten() {
        let name = e.file_name();
        // System.map names where a frozen guest's CPUs are (Debian's has
        // one line, pointing to the -dbg package: see real_system_map).
        let n = name.to_string_lossy();
        if n.starts_with("vmlinuz-") || n.starts_with("System.map-") {
            fs::copy(e.path(), dir.join(&name))?;
        }
    }
    let _ = fs::remove_dir_all(&unpack);
    let _ = fs::remove_dir_all(&dl);
    find_vmlinuz(&dir).with_context(|| format!("{package} has no boot/vmlinuz-*"))
}

/// `apt-get download package` into a fresh `dir`; returns the .deb.
fn apt_download(dir: &Path, package: &str) -> anyhow::Result<PathBuf> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir)?;
    cmd::run(
        Command::new("apt-get")
            .current_dir(dir)
            .args(["download", package]),
    )?;
    fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")
}

/// The file in `dir` whose name starts with `prefix`.
fn file_named(dir: &Path, prefix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
}

fn system_map(dir: &Path) -> Option<PathBuf> {
    file_named(dir, "System.map-")
}

fn find_vmlinuz(dir: &Path) -> Option<PathBuf> {
    file_named(dir, "vmlinuz-")
}

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
(while sleep 15; do echo "NODEDB-VM-HEARTBEAT $(cut -d' ' -f1 /proc/uptime)"; done) &
/bin/vm-check --bin-dir /bin --work /tmp/vm-check
status=$?
"#;

/// The validation, after vm-check: the scratch disk formatted and mounted,
/// then `nodedb-validate` on the bundled configuration.
fn init_script(opts: &Options) -> String {
    let mut s = INIT_HEAD.to_owned();
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
            "if mke2fs -q /dev/nvme0n1 && mount -t ext4 /dev/nvme0n1 /mnt; then".to_owned(),
            format!(
                "  /bin/nodedb-validate --config /etc/nodedb-governor.toml --out /tmp/validate \\\n    --scratch /mnt --interval-ms 500 --loan-grace-ms {VM_LOAN_GRACE_MS} --timeout-secs 1200 --modes {} -- {}",
                opts.validate_modes.join(","),
                workload.join(" ")
            ),
            "  echo \"NODEDB-VALIDATE-EXIT $?\"".to_owned(),
            "else".to_owned(),
            "  echo \"NODEDB-VALIDATE-EXIT no scratch disk\"".to_owned(),
            "fi".to_owned(),
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
fn initramfs(vm_dir: &Path, bins: &[PathBuf], init: &str) -> anyhow::Result<PathBuf> {
    let dir = vm_dir.join("initramfs");
    let _ = fs::remove_dir_all(&dir);
    for d in ["bin", "dev", "proc", "sys", "tmp", "run", "etc"] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::copy("/bin/busybox", dir.join("bin/busybox")).context("copying /bin/busybox")?;
    let mut libs = std::collections::BTreeSet::new();
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
    let init_path = dir.join("init");
    fs::write(&init_path, init)?;
    use std::os::unix::fs::PermissionsExt;
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

/// Boots `kernel` with `initrd` and returns vm-check's JSON result and
/// the validation's, if it ran.
fn boot(
    kernel: &Path,
    initrd: &Path,
    timeout: Duration,
    vm_dir: &Path,
) -> anyhow::Result<(serde_json::Value, Option<serde_json::Value>)> {
    let name = kernel.file_name().unwrap_or_default().to_string_lossy();
    let console = vm_dir.join(format!("console-{name}.log"));
    let _ = fs::remove_file(&console);
    // A fresh sparse scratch disk per boot.
    let scratch = vm_dir.join(format!("scratch-{name}.img"));
    let _ = fs::remove_file(&scratch);
    fs::File::create(&scratch)?.set_len(SCRATCH_GIB << 30)?;
    let monitor = vm_dir.join(format!("monitor-{name}.sock"));
    let _ = fs::remove_file(&monitor);
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2"])
        .args(["-m", &VM_MEMORY_MIB.to_string()])
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
        .args([
            "-append",
            // nokaslr: the vCPUs' addresses read from the monitor on a
            // stall are System.map's.
            "console=ttyS0 panic=-1 oops=panic loglevel=4 nokaslr",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
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
            let line = |tag: &str| {
                text.lines()
                    .find_map(|l| l.split_once(tag).map(|(_, j)| j.to_owned()))
            };
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
            let validation = line("NODEDB-VALIDATE-RESULT ")
                .map(|j| serde_json::from_str(&j).context("the validation's result"))
                .transpose()?;
            if let Some(exit) = line("NODEDB-VALIDATE-EXIT ") {
                eprintln!("    validation exit: {exit}");
                if exit.trim() != "0" {
                    eprintln!(
                        "    the validation's console tail:\n{}",
                        console_tail(&text, 40)
                    );
                }
            }
            return match line("NODEDB-VM-RESULT ") {
                Some(j) => {
                    eprintln!("    finished in {:.1} s", started.elapsed().as_secs_f64());
                    Ok((
                        serde_json::from_str(&j).context("vm-check's result")?,
                        validation,
                    ))
                }
                None => bail!(
                    "the VM stopped without a result; console tail:\n{}",
                    console_tail(&text, 40)
                ),
            };
        }
        // The guest prints a heartbeat every 15 s: silence means its
        // kernel is frozen. Where its CPUs are is the evidence.
        if booted && last_output.elapsed() > STALL {
            let cpus = frozen_cpus(&monitor, kernel);
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

/// Where a frozen guest's vCPUs are: three samples of each vCPU's RIP from
/// the qemu monitor, named from the kernel's System.map (the guest boots
/// with nokaslr).
fn frozen_cpus(monitor: &Path, kernel: &Path) -> String {
    let symbols = kernel
        .parent()
        .and_then(|dir| match real_system_map(dir) {
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

/// The text of the kernel's full System.map. The one in Debian's image
/// package is a single line pointing to the `-dbg` package (280 MB), which
/// is fetched only when a guest froze; its map is cached next to the kernel.
fn real_system_map(dir: &Path) -> anyhow::Result<String> {
    let map = system_map(dir).context("no System.map next to the kernel")?;
    let text = fs::read_to_string(&map)?;
    if text.lines().count() > 1 {
        return Ok(text);
    }
    let package = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.starts_with("linux-image-"))
        .context(
            "System.map has one line (Debian's points to the -dbg package) and the kernel is not a Debian package",
        )?;
    let dbg = format!("{package}-dbg");
    step(&format!("fetching {dbg} for the kernel's symbols"));
    let dl = dir.join("download");
    let deb = apt_download(&dl, &dbg)?;
    let member = format!(
        "./usr/lib/debug/boot/{}",
        map.file_name()
            .context("System.map's name")?
            .to_string_lossy()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -xO \"$2\"")
        .arg("sh")
        .arg(&deb)
        .arg(&member)
        .output()?;
    let _ = fs::remove_dir_all(&dl);
    let real = String::from_utf8(out.stdout).context("System.map is not text")?;
    if !out.status.success() || real.lines().count() <= 1 {
        bail!(
            "{member} not found in {dbg}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    fs::write(&map, &real)?;
    Ok(real)
}

/// One human-monitor command over its unix socket; returns the answer.
fn hmp(socket: &Path, command: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let read_prompt = |s: &mut std::os::unix::net::UnixStream| -> anyhow::Result<String> {
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
