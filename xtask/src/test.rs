//! `cargo xtask test`: formatting, the dependency check, lints, and every
//! test. The privileged tests (eBPF, cgroups) run for real as root; under
//! CI they may not skip.

use crate::{
    cargo,
    cmd::{self, step},
};

/// Read by the test harness (`testkit::harness::agent_binary`).
const AGENT_BIN_ENV: &str = "NODEDB_GOVERNOR_AGENT_BIN";

/// What a build of every target from nothing writes under `target/` (a
/// fresh clone's, after the whole of `cargo xtask test` under CI: 5.7 GiB
/// with incremental compilation off, as `.ci/run` sets it; 8.2-8.6 GiB with
/// it on), with room to spare.
const FRESH_TARGET_BYTES: u64 = 7 << 30;
const FRESH_INCREMENTAL_TARGET_BYTES: u64 = 10 << 30;
/// What a rebuild over an existing `target/` needs at most: the test
/// binaries it relinks (DataFusion's are ~250 MB each) beside the old ones.
const WARM_TARGET_BYTES: u64 = 4 << 30;

/// Fails before any build when the disk cannot hold it. A linker that runs
/// out of room mid-write dies of SIGBUS ("ld terminated with signal 7")
/// half an hour in, which names nothing; this names the disk.
fn check_disk() -> anyhow::Result<()> {
    let root = crate::root();
    // `cargo xtask` itself lives in target/debug, so that directory says
    // nothing; the agent binary is built only by the build below.
    let warm = root.join("target/debug/nodedb-governor").is_file();
    let incremental = std::env::var_os("CARGO_INCREMENTAL").is_none_or(|v| v != "0");
    let need = if warm {
        WARM_TARGET_BYTES
    } else if incremental {
        FRESH_INCREMENTAL_TARGET_BYTES
    } else {
        FRESH_TARGET_BYTES
    };
    let Some(free) = cmd::free_bytes(&root) else {
        eprintln!(
            "    cannot read the free space of {}: not checked",
            root.display()
        );
        return Ok(());
    };
    let gib = |b: u64| b as f64 / f64::from(1u32 << 30);
    if free < need {
        anyhow::bail!(
            "{:.1} GiB free on the filesystem of {}; {} needs about {:.0} GiB: free some space (old clones, `cargo clean`) and run again",
            gib(free),
            root.display(),
            if warm {
                "a rebuild over the existing target/"
            } else {
                "a build of every target from nothing"
            },
            gib(need)
        );
    }
    eprintln!(
        "    {:.1} GiB free for target/ (needs about {:.0} GiB)",
        gib(free),
        gib(need)
    );
    Ok(())
}

pub fn test() -> anyhow::Result<()> {
    step("disk space for the build");
    check_disk()?;
    step("cargo fmt --check");
    cmd::run(cargo::command().args(["fmt", "--all", "--check"]))?;
    crate::deps::deps()?;
    step("clippy (host crates)");
    cmd::run(cargo::command().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    step("clippy (the library alone, no features)");
    cmd::run(cargo::command().args([
        "clippy",
        "-p",
        "nodedb-governor",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy (library with all its features, benchmarks included)");
    cmd::run(cargo::command().args([
        "clippy",
        "-p",
        "nodedb-governor",
        "--features",
        "control,datafusion,fault-injection,metrics,jemalloc",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy (eBPF programs, nightly, bpf target)");
    cmd::run(
        cargo::nightly()
            .args(["clippy", "--release", "-p", "nodedb-governor-ebpf"])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    step("building every target (the tests' selection) and the agent binary with it");
    let [agent] = cargo::build_as_tests(&["nodedb-governor"])?
        .try_into()
        .expect("one binary asked for, one path");
    step("deploy/: the Prometheus rules (promtool) and the systemd unit (systemd-analyze)");
    crate::deploy::check(&agent)?;
    step("tests");
    let mut test = cargo::command();
    test.args(["test", "--all-targets"]);
    // The end-to-end tests run this agent (built above with the tests'
    // features) instead of building one of their own with `-p`, which
    // would resolve features differently and rebuild tokio and the agent.
    test.env(AGENT_BIN_ENV, &agent);
    if cmd::is_root() {
        // As root the privileged tests must run: a missing prerequisite is
        // then a failure, not a skip.
        test.env("NODEDB_GOVERNOR_REQUIRE_PRIVILEGED", "1");
    } else {
        eprintln!("    not root: privileged tests will skip, each saying why");
    }
    cmd::run(&mut test)?;
    step("library features: fault injection, metrics, jemalloc arenas, DataFusion pool");
    cmd::run(cargo::command().args([
        "test",
        "-p",
        "nodedb-governor",
        "--features",
        "fault-injection,metrics,jemalloc,datafusion",
        "--test",
        "fault_injection",
        "--test",
        "datafusion_pool",
        "--test",
        "metrics",
        "--test",
        "arena",
    ]))?;
    step("model checking the reservation core (loom)");
    cmd::run(
        cargo::command()
            .args([
                "test",
                "-p",
                "nodedb-governor",
                "--test",
                "loom",
                "--release",
            ])
            .args(["--target-dir", "target/loom"])
            .env("RUSTFLAGS", "--cfg nodedb_loom"),
    )?;
    // Without a sanitizer: the fuzzed code (the decoder, the policy) has
    // no `unsafe`, so AddressSanitizer would instrument every dependency
    // for nothing (the build takes minutes longer, each run is slower);
    // overflow and bounds are checked by Rust itself (cargo fuzz builds
    // with debug assertions).
    for (target, what) in [
        ("decode", "the control channel's decoder"),
        (
            "session",
            "the agent's sessions: sequences of frames into the policy",
        ),
    ] {
        step(&format!("fuzzing {what} (cargo fuzz, 30 s)"));
        cmd::run(
            cargo::nightly()
                .args(["fuzz", "run", "--sanitizer", "none", target, "--"])
                .args(["-max_total_time=30", "-rss_limit_mb=2048"]),
        )?;
    }
    step("doc tests");
    cmd::run(cargo::command().args(["test", "--doc"]))?;
    if cmd::is_root() || crate::ci() {
        step("the validation on this host (cgroup v1 fallback where the host has it)");
        crate::validate::validate(&crate::validate::Options {
            scenario: crate::validate::Scenario::Mixed,
            modes: crate::validate::MIXED_MODES.map(str::to_owned).to_vec(),
            workload_args: Vec::new(),
            // The solo phase where the report compares alone (governed
            // against static); the other runs are compared together only,
            // and without it take half the time.
            solo_in: Some(["governed", "static"].map(str::to_owned).to_vec()),
            timeout_secs: 1200,
            rounds: 1,
            report_timing: false,
        })?;
        step(
            "the soak: a 3-minute slice, a fresh seed (cargo xtask soak --minutes 60 runs the hour)",
        );
        crate::soak::soak(&crate::soak::Options {
            seconds: 180,
            seed: None,
        })?;
        step("the cache scenario on this host: a mapped index's hot set against a flush");
        crate::validate::validate(&crate::validate::Options {
            scenario: crate::validate::Scenario::Cache,
            modes: ["ungoverned", "governed"].map(str::to_owned).to_vec(),
            workload_args: Vec::new(),
            solo_in: None,
            timeout_secs: 600,
            rounds: 1,
            // The p99 and the throughput are one run's timings: reported
            // (the index's residency, its faults and the flush's cache
            // left behind decide).
            report_timing: true,
        })?;
        step(
            "VM tests: cgroup v2 with the memory controller on Debian's 6.1 and 6.12 kernels (qemu), and the validation in each",
        );
        crate::vm::vm_test(&crate::vm::Options {
            series: vec!["6.1".into(), "6.12".into()],
            kernels: Vec::new(),
            // vm-check, the mixed validation and (6.1) the cache scenario
            // in one boot; a hang is still caught well before .ci/run's
            // cut-off.
            timeout: std::time::Duration::from_secs(2700),
            validate_modes: ["governed", "ungoverned"].map(str::to_owned).to_vec(),
            workload_args: Vec::new(),
            // The cache scenario on 6.1 only: there the 512 MiB flush
            // contends (ungoverned, the hot set falls to ~53% resident
            // with ~3,200 major faults). On 6.12 the kernel alone keeps
            // the hot set resident at 512 MiB (no faults ungoverned); the
            // 2 GiB flush that defeats it takes ~15 min under TCG, too
            // long for CI. `cargo xtask vm-test --cache-scenario` runs it
            // on every kernel.
            cache_scenario: crate::vm::CacheScenario::Series(vec!["6.1".into()]),
            // Two nodes, as NUMA hosts run us: the checks, the library
            // and the mixed validation on them, with NUMA balancing
            // scanning (the kernel's default on more than one node).
            numa_nodes: 2,
            breach_rounds: 10,
        })?;
    } else {
        eprintln!(
            "    skipping the validation and the VM tests: not root (they install qemu and busybox; run `cargo xtask vm-test` as root)"
        );
    }
    Ok(())
}
