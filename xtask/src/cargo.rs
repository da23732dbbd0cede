//! Running cargo on the workspace: a `cargo` command rooted at it,
//! building named binaries of named packages, and building every target
//! the way `cargo test --all-targets` does (so the binaries the validation
//! and the VMs run are the artifacts the tests built, not a second build).

use std::{path::PathBuf, process::Command};

use crate::cmd;

/// `cargo`, run from the workspace root (xtask may be started from any
/// directory below it). Under CI (a fresh clone, built once) incremental
/// compilation only writes state nobody reads again: it is off there, which
/// saves a few GiB of disk and some build time.
pub fn command() -> Command {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(crate::root());
    if crate::ci() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        cargo.env("CARGO_INCREMENTAL", "0");
    }
    cargo
}

/// `cargo +nightly`, run from the workspace root. Under `cargo xtask`,
/// cargo has set `RUSTC` (and maybe a wrapper) to the stable toolchain's;
/// left in place they would win over `+nightly`.
pub fn nightly() -> Command {
    let mut cargo = command();
    cargo
        .arg("+nightly")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    cargo
}

#[derive(Clone, Copy)]
pub enum Profile {
    /// Built quietly: the tasks that want it run after `cargo test`, which
    /// built these binaries already, so cargo has little to say.
    Debug,
    /// With cargo's progress: an optimised build takes minutes.
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Binaries of one package, and the package's features to build them with.
pub struct Binaries<'a> {
    pub package: &'a str,
    pub features: &'a [&'a str],
    pub bins: &'a [&'a str],
}

impl<'a> Binaries<'a> {
    /// `bins` of `package`, with its default features.
    pub fn new(package: &'a str, bins: &'a [&'a str]) -> Self {
        Self {
            package,
            features: &[],
            bins,
        }
    }
}

/// Builds every package's binaries in one `cargo build` (so their
/// dependencies' features are unified as in any one invocation) and
/// returns the binaries' paths, in the order given.
pub fn build(profile: Profile, packages: &[Binaries]) -> anyhow::Result<Vec<PathBuf>> {
    let mut build = command();
    build.arg("build");
    build.arg(match profile {
        Profile::Debug => "-q",
        Profile::Release => "--release",
    });
    for p in packages {
        build.args(["-p", p.package]);
        if !p.features.is_empty() {
            let features: Vec<String> = p
                .features
                .iter()
                .map(|f| format!("{}/{f}", p.package))
                .collect();
            build.args(["--features", &features.join(",")]);
        }
        for b in p.bins {
            build.args(["--bin", b]);
        }
    }
    cmd::run(&mut build)?;
    let dir = crate::root().join("target").join(profile.dir());
    Ok(packages
        .iter()
        .flat_map(|p| p.bins)
        .map(|b| dir.join(b))
        .collect())
}

/// Every target of the workspace's default members, debug profile:
/// `cargo build --all-targets`, the selection `cargo test --all-targets`
/// makes. Cargo unifies dependency features per invocation, so any other
/// selection (`-p agent --bin ...`) turns features of tokio, serde and
/// others on or off and rebuilds everything above them, DataFusion
/// included; this one resolves exactly as the tests do and, after them,
/// builds nothing. Returns the paths of `bins`, in the order given.
pub fn build_as_tests(bins: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    Ok(build_as_tests_with(bins, &[])?.0)
}

/// [`build_as_tests`], and also the executables of the integration tests
/// named in `tests` (`attribution_accuracy` is
/// `target/debug/deps/attribution_accuracy-<hash>`; cargo names it in its
/// JSON messages), in the order given.
pub fn build_as_tests_with(
    bins: &[&str],
    tests: &[&str],
) -> anyhow::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let out = command()
        .args([
            "build",
            "-q",
            "--all-targets",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("cargo build --all-targets failed ({})", out.status);
    }
    let mut found = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["profile"]["test"] == true
            && msg["target"]["kind"] == serde_json::json!(["test"])
            && let (Some(name), Some(exe)) =
                (msg["target"]["name"].as_str(), msg["executable"].as_str())
        {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    let tests = tests
        .iter()
        .map(|t| {
            found.get(*t).cloned().ok_or_else(|| {
                anyhow::anyhow!("cargo build --all-targets built no integration test {t}")
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let dir = crate::root().join("target").join(Profile::Debug.dir());
    let paths: Vec<PathBuf> = bins.iter().map(|b| dir.join(b)).collect();
    if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
        anyhow::bail!(
            "cargo build --all-targets left no {}: is it a binary of a default member?",
            missing.display()
        );
    }
    Ok((paths, tests))
}
