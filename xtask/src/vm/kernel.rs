//! The kernels the VMs boot: Debian's cloud kernels, fetched with
//! `apt-get download` (the newest of a series) and cached with their
//! System.map; the full System.map from the `-dbg` package when a frozen
//! guest's CPUs are to be named.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::{
    apt,
    cmd::{self, step},
};

/// A version's numbers, for ordering package names.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// The newest Debian cloud kernel of `series`, downloaded and unpacked
/// once into `cache`; returns its bzImage.
pub fn debian_kernel(cache: &Path, series: &str) -> anyhow::Result<PathBuf> {
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
        apt::update()?;
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
    let deb = apt::download(&dl, &package)?;
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

/// The text of the full System.map of the kernel cached in `dir`. The one
/// in Debian's image package is a single line pointing to the `-dbg`
/// package (280 MB), which is fetched only when a guest froze; its map is
/// cached next to the kernel.
pub fn real_system_map(dir: &Path) -> anyhow::Result<String> {
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
    let deb = apt::download(&dl, &dbg)?;
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
