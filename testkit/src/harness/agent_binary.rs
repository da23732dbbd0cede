//! The agent's binary, built for the tests that run it.

use std::{path::PathBuf, process::Command, sync::OnceLock};

/// Names an agent binary already built for this test run (`cargo xtask
/// test` builds it with the tests' own selection, so no second build of
/// tokio and the agent under other features happens mid-run).
pub const AGENT_BIN_ENV: &str = "NODEDB_GOVERNOR_AGENT_BIN";

/// The agent binary (`nodedb-governor`): the one `NODEDB_GOVERNOR_AGENT_BIN`
/// names, or else built by cargo in the profile the calling test runs in;
/// it belongs to another package, so cargo does not build it for this
/// one's tests. Built once per test process.
pub fn agent_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(AGENT_BIN_ENV) {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "{AGENT_BIN_ENV}={} names no file",
                bin.display()
            );
            return bin;
        }
        let exe = std::env::current_exe().expect("the test's own path");
        // A test runs from target/<profile>/deps/<test>, a probe from
        // target/<profile>/<probe>: either way, target/<profile>.
        let mut profile_dir = exe
            .parent()
            .expect("the caller runs from target/<profile>")
            .to_owned();
        if profile_dir.ends_with("deps") {
            profile_dir.pop();
        }
        let mut build = Command::new(env!("CARGO"));
        build.current_dir(env!("CARGO_MANIFEST_DIR")).args([
            "build",
            "-q",
            "-p",
            "nodedb-governor-agent",
            "--bin",
            "nodedb-governor",
            // As the tests' own build has it (their dependency on the
            // agent asks for its fault points).
            "--features",
            "failpoints",
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
