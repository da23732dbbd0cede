//! `cargo xtask`: the project's build, set-up, test, run and benchmark
//! tasks. `run` and `test` set up what they need first.

mod apt;
mod bench;
mod cache_report;
mod cargo;
mod cmd;
mod deploy;
mod deps;
mod ebpf;
mod panels;
mod plot;
mod report;
mod run;
mod setup;
mod soak;
mod test;
mod validate;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain (nightly rust-src, LLVM 22, bpf-linker).
    Setup,
    /// Build the eBPF object (with BTF) and report where it is.
    BuildEbpf,
    /// Every check and test: fmt, the dependency check, clippy, unit,
    /// integration and privileged eBPF tests (those fail instead of
    /// skipping under CI or as root).
    Test,
    /// The Grafana dashboard's panels drawn as PNGs under docs/dashboard/,
    /// from a real Prometheus scraping an agent that governs the demo
    /// (the enforcement suite's Prometheus test, run longer).
    Panels {
        /// Seconds of the demo to record beyond the test's own checks.
        #[arg(long, default_value_t = 90)]
        secs: u64,
        /// Draw again from the last run's data (target/dashboard-panels.json)
        /// without running the test.
        #[arg(long)]
        redraw: bool,
    },
    /// The checks of deploy/ alone (they run in `test` too): the
    /// Prometheus rules with promtool, the systemd unit with
    /// systemd-analyze (verify, and its security exposure).
    CheckDeploy,
    /// The dependency check: a database that embeds the library (with
    /// its features, DataFusion's too) pulls in none of the agent's
    /// crates (cargo tree; nothing is built).
    Deps,
    /// The agent with the bundled default config and a three-engine demo,
    /// showing per-engine attribution live until Ctrl-C.
    Run {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// The tests that need cgroup v2 with the memory controller, in qemu on
    /// Debian's cloud kernels (6.1 and 6.12 unless told otherwise).
    VmTest {
        /// Kernel series to fetch with apt-get download (repeatable).
        #[arg(long = "series", default_values_t = ["6.1".to_owned(), "6.12".to_owned()])]
        series: Vec<String>,
        /// Another bzImage to boot (repeatable; with it, no series is
        /// fetched unless --series is given).
        #[arg(long = "kernel")]
        kernels: Vec<std::path::PathBuf>,
        /// Time limit per boot, in seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        /// The validation runs in each VM (nodedb-validate --modes:
        /// governed, ungoverned, ample, roomy, baseline, static); `none`
        /// for none.
        #[arg(long, value_delimiter = ',', default_values_t = ["governed".to_owned(), "ungoverned".to_owned(), "ample".to_owned()])]
        validate: Vec<String>,
        /// Arguments for nodedb-workload in the VMs (sizes), after `--`
        /// (default: sizes for TCG; see vm/initramfs.rs).
        #[arg(last = true)]
        workload: Vec<String>,
        /// The cache scenario in each VM too (after the mixed one).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        cache_scenario: bool,
        /// NUMA nodes in each VM (its 2 CPUs and 3 GiB split evenly); with
        /// two (the default, as in `.ci/run`), vm-check also runs the
        /// library (`numa-probe`) on the kernel's nodes, and the
        /// attribution's per-node and NUMA-balancing checks have two nodes
        /// to tell apart.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=2))]
        numa_nodes: u32,
        /// Breaches the ladder check drives in each VM, each timed from
        /// the crossing to the spill (10 in `.ci/run`).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        breach_rounds: u32,
    },
    /// The validation on this host: the mixed workload governed,
    /// ungoverned (observed, the same ceiling), observed with ample memory,
    /// governed with ample memory, without an agent, and with static
    /// budgets (a pool per engine); report, summary and timeline plot under
    /// target/validate/<kernel>/.
    Validate {
        /// `mixed`: the workload above; `cache`: a mapped vector index's
        /// hot set against a timeseries flush (governed and ungoverned;
        /// report under target/validate/cache/<kernel>/).
        #[arg(long, value_enum, default_value_t = validate::Scenario::Mixed)]
        scenario: validate::Scenario,
        /// Time limit per run, in seconds.
        #[arg(long, default_value_t = 1800)]
        timeout_secs: u64,
        /// The runs (nodedb-validate --modes; default: all six for
        /// `mixed`, governed and ungoverned for `cache`).
        #[arg(long, value_delimiter = ',')]
        modes: Vec<String>,
        /// Runs of the harness, one after the other (the mixed scenario):
        /// with more than one, each comparison's ratio per round, median
        /// and spread in rounds.md, each round's files under round-<k>/.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
        rounds: u32,
        /// The cache scenario: its timing criteria (p99 during the flush,
        /// the flush's throughput) reported beside the verdict instead of
        /// deciding it, as `cargo xtask test` does.
        #[arg(long)]
        report_timing: bool,
        /// Arguments for nodedb-workload (sizes), after `--`.
        #[arg(last = true)]
        workload: Vec<String>,
    },
    /// The soak: the library, a real agent and the kernel driven together
    /// through random demand from a seed (engines, budgets, faults in the
    /// spill target, the agent killed, reloaded, the library reconnecting),
    /// every invariant checked after every step; stops at the first
    /// violation with the seed, the step and the state. As root.
    Soak {
        /// How long, in minutes (the hour: 60).
        #[arg(long, conflicts_with = "seconds")]
        minutes: Option<u64>,
        /// How long, in seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// The seed to run (default: a fresh one, printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Benchmarks: the cost of tracing (page-fault and mmap/munmap loops with
    /// and without the programs attached, in one run).
    Bench {
        /// Rounds per configuration (more rounds, steadier medians).
        #[arg(long, default_value_t = 7)]
        rounds: u32,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => setup::setup().and_then(|()| ebpf::build()),
        Task::Test => setup::setup().and_then(|()| test::test()),
        Task::Deps => deps::deps(),
        Task::Panels { secs, redraw } => setup::setup().and_then(|()| panels::panels(secs, redraw)),
        Task::CheckDeploy => setup::setup().and_then(|()| deploy::check_built()),
        Task::Run { seconds } => setup::setup().and_then(|()| run::run(seconds)),
        Task::Soak {
            minutes,
            seconds,
            seed,
        } => setup::setup().and_then(|()| {
            soak::soak(&soak::Options {
                seconds: seconds.unwrap_or(minutes.unwrap_or(3) * 60),
                seed,
            })
        }),
        Task::VmTest {
            series,
            kernels,
            timeout_secs,
            validate,
            workload,
            cache_scenario,
            numa_nodes,
            breach_rounds,
        } => {
            let explicit_series = std::env::args().any(|a| a.starts_with("--series"));
            // It builds the agent, and so the eBPF programs: the same
            // toolchain as the tests.
            setup::setup().and_then(|()| {
                vm::vm_test(&vm::Options {
                    series: if kernels.is_empty() || explicit_series {
                        series
                    } else {
                        Vec::new()
                    },
                    kernels,
                    timeout: std::time::Duration::from_secs(timeout_secs),
                    validate_modes: validate.into_iter().filter(|m| m != "none").collect(),
                    workload_args: workload,
                    cache_scenario: if cache_scenario {
                        vm::CacheScenario::Every
                    } else {
                        vm::CacheScenario::Never
                    },
                    numa_nodes,
                    breach_rounds,
                })
            })
        }
        Task::Validate {
            scenario,
            timeout_secs,
            modes,
            rounds,
            report_timing,
            workload,
        } => setup::setup().and_then(|()| {
            validate::validate(&validate::Options {
                scenario,
                modes: if modes.is_empty() {
                    match scenario {
                        validate::Scenario::Mixed => validate::MIXED_MODES.as_slice(),
                        validate::Scenario::Cache => ["ungoverned", "governed"].as_slice(),
                    }
                    .iter()
                    .map(|m| (*m).to_owned())
                    .collect()
                } else {
                    modes
                },
                workload_args: workload,
                solo_in: None,
                timeout_secs,
                rounds,
                report_timing,
            })
        }),
        Task::Bench { rounds } => setup::setup().and_then(|()| bench::bench(rounds)),
    };
    cmd::time_summary();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The validation's engines, in plotting order.
fn validate_engines() -> [&'static str; 3] {
    ["vector", "timeseries", "query"]
}

/// The workspace root (xtask lives one level below it).
fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_owned()
}

/// True under CI (`CI=true` or `CI=1`, as CI services and `ci-local` set).
fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}
