//! A subtree delegated to the database's user: the library moves its own
//! threads into their engines, the agent only checks.

use std::os::unix::{fs::MetadataExt, process::CommandExt};
use std::{path::PathBuf, process::Stdio};

use nodedb_governor_testkit::{
    harness::probes::{JsonLines, spawn},
    privileged::skip_unless_privileged,
    wait::wait_for,
};

/// With the engine cgroups delegated to the database's user
/// (`delegate_uid`), a library running as that user moves its threads
/// into their engines itself (the agent only checks), and attribution
/// follows.
#[test]
fn a_library_in_a_delegated_subtree_moves_its_own_threads() {
    if skip_unless_privileged("delegated subtree") {
        return;
    }
    const NOBODY: u32 = 65534;
    const MIB: u64 = 1 << 20;
    let agent = super::start_agent("allowed_uids = [65534]\ndelegate_uid = 65534");
    let status = agent.status_json();
    let shared = PathBuf::from(status["cgroup"].as_str().unwrap()).join("shared");
    assert_eq!(
        std::fs::metadata(shared.join("engine-vector/cgroup.threads"))
            .unwrap()
            .uid(),
        NOBODY,
        "delegated"
    );
    std::os::unix::fs::chown(&agent.control, None, Some(NOBODY)).unwrap();
    // Run a copy from the agent's world-readable directory (the build
    // tree may be out of that uid's reach).
    let probe_bin = agent
        .dir()
        .copy_executable(env!("CARGO_BIN_EXE_hold-probe").as_ref());
    let mut probe = spawn(
        agent
            .probe(probe_bin)
            .args(["--mib", "32"])
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::piped()),
    );
    let pid = probe.id();
    let first = JsonLines::of(&mut probe).next_value();
    assert_eq!(first["held_bytes"], 32 * MIB, "{first}");
    // The worker (gone now; its memory stays) was moved by the library:
    // a failed move would have fallen back to the agent ("assigned").
    let log = agent.log();
    assert!(
        log.lines().any(|l| l.contains("thread moved by the library")
            && l.contains(&format!("pid={pid}"))),
        "the library moved it, not the agent:\n{log}"
    );
    assert!(!log.contains("thread assigned"), "{log}");
    wait_for("the vector engine's memory to be attributed", || {
        agent.status_json()["engines"]["vector"]["resident_bytes"].as_u64() >= Some(30 * MIB)
    });
}
