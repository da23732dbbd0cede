//! The tools a VM test needs on the host (qemu, a static busybox, cpio),
//! installed from Debian's packages when missing.

use std::{path::Path, process::Command};

use anyhow::bail;

use crate::{
    apt,
    cmd::{self, step},
};

pub fn install_missing() -> anyhow::Result<()> {
    step("checking the VM tools");
    let tools = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
    ];
    let mut missing: Vec<&str> = tools
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
    if !static_busybox && !missing.contains(&"busybox-static") {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        eprintln!("    qemu, static busybox, cpio: present");
        return Ok(());
    }
    if !apt::is_debian() || !cmd::is_root() {
        bail!(
            "missing {}: install them (Debian: apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    step(&format!("installing {}", missing.join(" ")));
    // Stale package lists are refreshed only when installing fails.
    if apt::install(&missing).is_err() {
        apt::update()?;
        apt::install(&missing)?;
    }
    Ok(())
}
