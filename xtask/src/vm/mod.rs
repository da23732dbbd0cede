//! `cargo xtask vm-test`: the tests that need cgroup v2 with the memory
//! controller, which the hosts do not have (hybrid cgroups), run in qemu on
//! Debian's cloud kernels.
//!
//! 1. Installs qemu, busybox (static) and cpio when they are missing.
//! 2. Builds the agent and the probes as `cargo test --all-targets`
//!    builds them (same selection, so the same artifacts: nothing new
//!    after the tests).
//! 3. Gets each kernel with `apt-get download` (the newest of the series;
//!    cached under `target/vm/kernels`), or takes `--kernel PATH`.
//! 4. Builds an initramfs (newc cpio, gzip): busybox, the binaries with
//!    their debug info stripped, the shared libraries `ldd` names, and an
//!    `/init` that mounts cgroup2 with the memory controller and runs
//!    `vm-check`.
//! 5. Boots each kernel under TCG (KVM hangs on these hosts), watches the
//!    serial console, and takes the JSON results from the second serial
//!    port, which only the init script writes.
//!    A hard time limit kills qemu; a hang or a failed check fails the
//!    task with the console's tail. A guest lost to its kernel is booted
//!    once more after the evidence is printed, and a second loss fails:
//!    one that froze (it prints a heartbeat every 15 s; after 2 min of
//!    silence the harness prints where its vCPUs are, RIPs from the qemu
//!    monitor named from the kernel's System.map), and one that stopped
//!    before its script ended (a panic makes qemu exit: qemu's status and
//!    the console's tail).

mod freeze;
mod initramfs;
mod kernel;
mod packages;
mod qemu;

use std::{fs, path::PathBuf, time::Duration};

use anyhow::bail;

use crate::{cargo, cmd::step};

/// The binaries the VM runs.
const AGENT: &str = "nodedb-governor";
const PROBE_BINS: &[&str] = &[
    "vm-check",
    "breach-probe",
    "hold-probe",
    "attribution-probe",
    "numa-probe",
];
/// Integration tests vm-check runs as they are (under their target's name,
/// without cargo's hash).
const TESTS: &[&str] = &[
    "attribution_accuracy",
    "page_cache",
    "engine_cache",
    "enforcement",
];
const WORKLOAD_BINS: &[&str] = &["nodedb-workload", "nodedb-cache", "nodedb-validate"];

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
    /// Where the cache scenario runs too (`nodedb-validate --scenario
    /// cache`, both modes), after the mixed one, in the same boot.
    pub cache_scenario: CacheScenario,
    /// NUMA nodes the VM is booted with (its CPUs and memory split
    /// evenly); 1: none.
    pub numa_nodes: u32,
    /// Breaches vm-check's ladder check drives and times.
    pub breach_rounds: u32,
}

/// The kernels the cache scenario runs on.
pub enum CacheScenario {
    Every,
    Never,
    /// The kernels of these series ("6.1": a release `6.1.*`).
    Series(Vec<String>),
}

impl CacheScenario {
    /// The init script's `case` pattern for `uname -r` (None: nowhere).
    fn case_pattern(&self) -> Option<String> {
        match self {
            Self::Every => Some("*".to_owned()),
            Self::Never => None,
            Self::Series(s) if s.is_empty() => None,
            Self::Series(s) => Some(
                s.iter()
                    .map(|s| format!("{s}.*"))
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
        }
    }

    /// Whether it ran on the kernel of release `kernel` (`uname -r`).
    fn on(&self, kernel: &str) -> bool {
        match self {
            Self::Every => true,
            Self::Never => false,
            Self::Series(s) => s.iter().any(|s| kernel.starts_with(&format!("{s}."))),
        }
    }
}

pub fn vm_test(opts: &Options) -> anyhow::Result<()> {
    packages::install_missing()?;
    step("building the agent and the VM probes");
    let (mut bins, tests) = cargo::build_as_tests_with(
        &std::iter::once(AGENT)
            .chain(PROBE_BINS.iter().copied())
            .chain(WORKLOAD_BINS.iter().copied())
            .collect::<Vec<_>>(),
        TESTS,
    )?;
    let root = crate::root();
    let vm_dir = root.join("target/vm");
    let tests_dir = vm_dir.join("tests");
    fs::create_dir_all(&tests_dir)?;
    for (name, built) in TESTS.iter().zip(tests) {
        let named = tests_dir.join(name);
        fs::copy(&built, &named)?;
        bins.push(named);
    }
    step("building the initramfs");
    let initrd = initramfs::build(&vm_dir, &bins, &initramfs::init_script(opts))?;
    let mut kernels = Vec::new();
    for s in &opts.series {
        kernels.push(kernel::debian_kernel(&vm_dir.join("kernels"), s)?);
    }
    kernels.extend(opts.kernels.iter().cloned());
    let results = vm_dir.join("results");
    fs::create_dir_all(&results)?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for k in &kernels {
        step(&format!(
            "booting {} under TCG ({})",
            k.display(),
            qemu::accel()?
        ));
        let booted = qemu::boot_twice_if_lost(k, &initrd, opts.timeout, opts.numa_nodes, &vm_dir);
        match booted {
            Ok((result, validations)) => {
                let kernel = result["kernel"].as_str().unwrap_or("unknown").to_owned();
                let file = results.join(format!("{kernel}.json"));
                fs::write(&file, serde_json::to_vec_pretty(&result)?)?;
                let mut passed = result["passed"] == true;
                let asked = [
                    ("mixed", !opts.validate_modes.is_empty()),
                    ("cache", opts.cache_scenario.on(&kernel)),
                ];
                for (scenario, _) in asked.into_iter().filter(|(_, wanted)| *wanted) {
                    match validations.iter().find(|v| v["scenario"] == scenario) {
                        Some(v) => {
                            let met = if scenario == "cache" {
                                let dir = root.join("target/validate/cache").join(&kernel);
                                crate::cache_report::write(&dir, v)?
                            } else {
                                let dir = root.join("target/validate").join(&kernel);
                                crate::report::write(&dir, v)?
                            };
                            if !met {
                                eprintln!(
                                    "    FAIL the governed run missed the target ({scenario} scenario)"
                                );
                                passed = false;
                            }
                        }
                        None => {
                            eprintln!("    FAIL the {scenario} validation sent no result");
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
