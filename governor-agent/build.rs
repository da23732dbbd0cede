//! Builds the eBPF object (governor-ebpf) the agent loads, with aya-build,
//! on the nightly toolchain with `-Z build-std=core`, BTF included. Only the
//! agent has this step: a database that embeds the library needs no eBPF
//! toolchain. The agent's `bench` feature builds the object with the eBPF
//! crate's `bench` feature (the benchmark's empty `floor_*` programs).
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=build.rs");
    // Under cargo fuzz (`--cfg fuzzing`) the targets drive the decoder and
    // the policy, never the kernel: an empty object stands in (loading it
    // would fail, naming a parse error), and the fuzz build skips the
    // eBPF toolchain's nested build.
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
        std::fs::write(out.join("nodedb-governor-ebpf"), [])?;
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../governor-ebpf");
    println!("cargo:rerun-if-changed={root}/../governor-common/src");
    // Cargo sets CARGO_FEATURE_<NAME> for the build script of a package
    // built with that feature (and gives it an OUT_DIR of its own).
    let features: &[&str] = if std::env::var_os("CARGO_FEATURE_BENCH").is_some() {
        &["bench"]
    } else {
        &[]
    };
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "nodedb-governor-ebpf",
            root_dir: root,
            features,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
