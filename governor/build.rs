//! Builds the eBPF object (governor-ebpf) for the agent with aya-build, on the
//! nightly toolchain with `-Z build-std=core`, BTF included. Library-only
//! builds (`--no-default-features`) skip it, so a database that embeds the
//! library needs no eBPF toolchain.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_AGENT").is_none() {
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../governor-ebpf");
    println!("cargo:rerun-if-changed={root}/../governor-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nodedb-governor-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
