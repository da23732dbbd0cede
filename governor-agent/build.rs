//! Builds the eBPF object (governor-ebpf) the agent loads, with aya-build,
//! on the nightly toolchain with `-Z build-std=core`, BTF included. Only the
//! agent has this step: a database that embeds the library needs no eBPF
//! toolchain.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
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
