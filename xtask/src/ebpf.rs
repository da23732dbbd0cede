//! `cargo xtask build-ebpf`: the eBPF object on its own, as the agent's
//! build script (aya-build) builds it: nightly, `-Z build-std=core`, BTF.

use anyhow::{Context, bail};

use crate::{
    cargo,
    cmd::{self, step},
};

pub fn build() -> anyhow::Result<()> {
    step("building the eBPF programs (governor-ebpf)");
    let target_dir = crate::root().join("target");
    cmd::run(
        cargo::nightly()
            .args(["build", "--release", "-p", "nodedb-governor-ebpf"])
            .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                [
                    "--cfg=bpf_target_arch=\"x86_64\"",
                    "-Cdebuginfo=2",
                    "-Clink-arg=--btf",
                ]
                .join("\x1f"),
            ),
    )?;
    let object = target_dir.join("bpfel-unknown-none/release/nodedb-governor-ebpf");
    let bytes = std::fs::read(&object).with_context(|| format!("reading {}", object.display()))?;
    if !bytes.windows(5).any(|w| w == b".BTF\0") {
        bail!("{} has no .BTF section", object.display());
    }
    eprintln!("    {} ({} bytes, with BTF)", object.display(), bytes.len());
    Ok(())
}
