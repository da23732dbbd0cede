//! `cargo xtask setup`: installs what building the eBPF programs needs,
//! idempotently, saying what it does. Every step checks first and does
//! nothing when its tool is already there.
//!
//! 1. the nightly toolchain's `rust-src` (for `-Z build-std=core`);
//! 2. Debian's LLVM 22 development packages;
//! 3. `bpf-linker`, built against that LLVM;
//! 4. a check that the nightly's LLVM major version matches bpf-linker's;
//! 5. `make`, which building jemalloc (the library's `jemalloc` feature)
//!    needs;
//! 6. a C++ compiler and `cargo-fuzz`, for the control channel's fuzz
//!    target;
//! 7. `bpftrace`, the tracing benchmark's comparison (a script keeping
//!    the same per-thread counts as our programs).

use std::{path::Path, process::Command};

use anyhow::{Context, bail};

use crate::{
    apt,
    cmd::{self, step},
};

/// LLVM major version of both rustc (stable and nightly) here.
const LLVM_MAJOR: u32 = 22;
const BPF_LINKER_VERSION: &str = "0.13.0";
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn llvm_packages() -> Vec<String> {
    ["llvm-{}-dev", "libclang-{}-dev", "libpolly-{}-dev"]
        .iter()
        .map(|p| p.replace("{}", &LLVM_MAJOR.to_string()))
        .collect()
}

pub fn setup() -> anyhow::Result<()> {
    step("checking the eBPF build toolchain");
    nightly_rust_src()?;
    llvm_dev()?;
    bpf_linker()?;
    check_llvm_match()?;
    tool_or_debian_package("make", "make", "building jemalloc")?;
    // libfuzzer-sys (the fuzz target) builds libFuzzer.
    tool_or_debian_package("c++", "g++", "building libFuzzer")?;
    cargo_fuzz()?;
    tool_or_debian_package("bpftrace", "bpftrace", "the tracing benchmark's comparison")?;
    present_or_debian_package(
        Path::new(crate::plot::FONT).exists(),
        crate::plot::FONT,
        "fonts-dejavu-core",
        "the plots' text",
    )?;
    eprintln!("    toolchain ready");
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains =
        cmd::output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly Rust toolchain: the eBPF programs need one (`rustup toolchain install nightly --component rust-src`)"
        );
    }
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("    nightly rust-src: present");
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain");
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

fn dpkg_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn llvm_dev() -> anyhow::Result<()> {
    let packages = llvm_packages();
    let missing: Vec<&String> = packages.iter().filter(|p| !dpkg_installed(p)).collect();
    if missing.is_empty()
        && Path::new(&format!("/usr/lib/llvm-{LLVM_MAJOR}/bin/llvm-config")).exists()
    {
        eprintln!("    LLVM {LLVM_MAJOR} dev packages: present");
        return Ok(());
    }
    if !apt::is_debian() || Command::new("apt-get").arg("--version").output().is_err() {
        bail!(
            "LLVM {LLVM_MAJOR} development files are missing and this is not a Debian host. Install them by hand:\n  \
             - LLVM {LLVM_MAJOR} with its static or shared libraries and llvm-config (your distribution's llvm{LLVM_MAJOR}-devel),\n  \
             - then: LLVM_PREFIX=<llvm prefix> cargo install bpf-linker --version {BPF_LINKER_VERSION} --no-default-features --features llvm-{LLVM_MAJOR}\n  \
             - and: rustup component add rust-src --toolchain nightly"
        );
    }
    if !cmd::is_root() {
        bail!(
            "missing Debian packages {missing:?}; run as root, or: sudo apt-get install -y {}",
            packages.join(" ")
        );
    }
    step(&format!(
        "installing LLVM {LLVM_MAJOR} development packages"
    ));
    apt::update()?;
    apt::install(&packages)
}

/// Major version of the libLLVM bpf-linker is linked against, from ldd.
fn bpf_linker_llvm_major() -> Option<u32> {
    let path = cmd::output(Command::new("sh").args(["-c", "command -v bpf-linker"]))?;
    let ldd = cmd::output(Command::new("ldd").arg(path.trim()))?;
    ldd.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("libLLVM")?;
        let rest = rest
            .trim_start_matches(['-', '.'])
            .trim_start_matches("so.");
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = cmd::output(Command::new("bpf-linker").arg("--version"));
    if let Some(v) = &version
        && bpf_linker_llvm_major() == Some(LLVM_MAJOR)
    {
        eprintln!("    {}: present (LLVM {LLVM_MAJOR})", v.trim());
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {LLVM_MAJOR} (a few minutes, once)"
    ));
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{LLVM_MAJOR}"),
            ])
            .env("LLVM_PREFIX", format!("/usr/lib/llvm-{LLVM_MAJOR}")),
    )
}

/// cargo-fuzz, for the control channel decoder's fuzz target.
fn cargo_fuzz() -> anyhow::Result<()> {
    if let Some(v) = cmd::output(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("    {}: present", v.trim());
        return Ok(());
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} (a minute, once)"
    ));
    cmd::run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]))
}

/// `tool` (found by `tool --version`), or else Debian's `package`
/// installed; `needed_by` says what wants it.
fn tool_or_debian_package(tool: &str, package: &str, needed_by: &str) -> anyhow::Result<()> {
    let present = cmd::output(Command::new(tool).arg("--version")).is_some();
    present_or_debian_package(present, tool, package, needed_by)
}

/// Nothing when `tool` (a command, or a file) is `present`, or else
/// Debian's `package` installed; `needed_by` says what wants it.
fn present_or_debian_package(
    present: bool,
    tool: &str,
    package: &str,
    needed_by: &str,
) -> anyhow::Result<()> {
    if present {
        eprintln!("    {tool}: present");
        return Ok(());
    }
    if !apt::is_debian() || !cmd::is_root() {
        bail!("`{tool}` is missing ({needed_by} needs it): install {package}");
    }
    step(&format!("installing {package} ({needed_by} needs it)"));
    // Package lists a fresh machine has never fetched, or stale ones, are
    // fetched once and the install tried again.
    apt::install(&[package]).or_else(|e| {
        eprintln!("    {e:#}; fetching the package lists and trying again");
        apt::update()?;
        apt::install(&[package])
    })
}

/// What `cargo xtask test` checks `deploy/` with: `promtool` (Debian's
/// `prometheus`), `systemd-analyze` (`systemd`) and `kubectl` (its
/// `kustomize` renders the Kubernetes manifests for their test).
pub fn deploy_tools() -> anyhow::Result<()> {
    tool_or_debian_package("promtool", "prometheus", "the alert rules' tests")?;
    tool_or_debian_package("systemd-analyze", "systemd", "checking the systemd unit")?;
    // kubectl has no --version.
    let kubectl = cmd::output(Command::new("kubectl").args(["version", "--client"])).is_some();
    present_or_debian_package(
        kubectl,
        "kubectl",
        "kubectl",
        "the Kubernetes manifests' test",
    )
}

fn rustc_llvm_major(toolchain: &str) -> Option<u32> {
    let vv = cmd::output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .arg("-vV"),
    )?;
    let v = vv.lines().find_map(|l| l.strip_prefix("LLVM version:"))?;
    v.trim().split('.').next()?.parse().ok()
}

fn check_llvm_match() -> anyhow::Result<()> {
    let nightly =
        rustc_llvm_major("nightly").context("cannot read the nightly rustc's LLVM version")?;
    let linker =
        bpf_linker_llvm_major().context("cannot tell which LLVM bpf-linker is linked against")?;
    if nightly != linker {
        bail!(
            "LLVM mismatch: the nightly rustc uses LLVM {nightly} but bpf-linker is built against LLVM {linker}; \
             the bitcode rustc emits cannot be read by an older LLVM. Rebuild bpf-linker with --features llvm-{nightly}."
        );
    }
    eprintln!("    LLVM: nightly rustc {nightly} = bpf-linker {linker}");
    Ok(())
}
