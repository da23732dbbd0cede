//! Debian's package tools: whether this host has them, refreshing the
//! package lists, installing and downloading packages.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

use crate::cmd;

/// True on Debian (and its derivatives), where apt-get can install what
/// is missing.
pub fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

/// `apt-get update`.
pub fn update() -> anyhow::Result<()> {
    cmd::run(Command::new("apt-get").args(["update", "-q"]))
}

/// `apt-get install` of `packages`, without recommends or questions.
pub fn install<S: AsRef<std::ffi::OsStr>>(packages: &[S]) -> anyhow::Result<()> {
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// `apt-get download package` into a fresh `dir`; returns the .deb.
pub fn download(dir: &Path, package: &str) -> anyhow::Result<PathBuf> {
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
        .with_context(|| format!("apt-get download {package} left no .deb"))
}
