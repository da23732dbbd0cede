//! The agent's binary, built for the tests that run it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

/// The agent binary (`nodedb-governor`), built by cargo in the profile the
/// calling test runs in; it belongs to another package, so cargo does not
/// build it for this one's tests. Built once per test process.
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        // target/<profile>/deps/<test> -> target/<profile>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test runs from target/<profile>/deps")
            .to_owned();
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "-q",
            "-p",
            "nodedb-governor-agent",
            "--bin",
            "nodedb-governor",
        ]);
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().expect("running cargo").success(),
            "building the agent"
        );
        profile_dir.join("nodedb-governor")
    })
    .clone()
}
