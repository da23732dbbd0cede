//! The ceiling: the kernel holds it on the database's cgroup, and a
//! process that touches past it without asking is killed there (and the
//! OOM kill reported).

use std::{os::unix::process::ExitStatusExt, path::PathBuf};

use nodedb_governor::control::wire::ToLibrary;
use nodedb_governor_testkit::privileged::skip_unless_privileged;

#[test]
fn the_kernel_enforces_the_ceiling_on_the_databases_cgroup() {
    if skip_unless_privileged("ceiling enforcement") {
        return;
    }
    let agent = super::start_agent_with(
        "ceiling = \"48MiB\"",
        "[[engine]]\nname = \"vector\"\nbudget = \"100%\"\n",
    );
    let before = agent.status_json();
    let ceiling = &before["ceiling"];
    assert_eq!(ceiling["limit_bytes"], 48 << 20, "{before}");
    let backend = ceiling["backend"].as_str().unwrap().to_owned();
    let limit_file = match backend.as_str() {
        "cgroup-v2" => "memory.max",
        "cgroup-v1" => "memory.limit_in_bytes",
        other => panic!("unknown backend {other}"),
    };
    let cgroup = PathBuf::from(ceiling["cgroup"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(cgroup.join(limit_file))
            .unwrap()
            .trim(),
        (48u64 << 20).to_string(),
        "the kernel holds the ceiling"
    );
    // A library process that touches twice the ceiling without asking:
    // the kernel stops it at the ceiling (the OOM killer, inside the
    // database's cgroup only).
    let out = agent
        .probe(env!("CARGO_BIN_EXE_wire-probe"))
        .args(["--touch-mib", "96", "--hold-ms", "100"])
        .output()
        .unwrap();
    let welcomed: ToLibrary =
        serde_json::from_slice(out.stdout.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert!(matches!(welcomed, ToLibrary::Welcome { .. }));
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "killed at the ceiling: {:?}",
        out.status
    );
    let after = agent.status_json();
    assert!(
        after["ceiling"]["events"]["oom_kill"].as_u64() >= Some(1),
        "the OOM kill is reported ({backend}): {}",
        after["ceiling"]
    );
}

/// Right after its welcome the agent names the file its own figure of what
/// the database holds comes from (`held_from`): the ceiling's cgroup's
/// `memory.stat`, and keys that are in it, so a library near the ceiling
/// reads what the agent reads.
#[test]
fn the_agent_names_the_databases_memory_stat_after_its_welcome() {
    if skip_unless_privileged("ceiling held_from") {
        return;
    }
    let agent = super::start_agent_with(
        "ceiling = \"64MiB\"",
        "[[engine]]\nname = \"vector\"\nbudget = \"100%\"\n",
    );
    let status = agent.status_json();
    let cgroup = PathBuf::from(status["ceiling"]["cgroup"].as_str().unwrap());
    // From a process of its own (a probe): the agent adopts a library's
    // process into the database's cgroups, and this test's process runs
    // the other tests' agents.
    let out = agent
        .probe(env!("CARGO_BIN_EXE_wire-probe"))
        .args(["--raw-frames", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let frames: Vec<ToLibrary> = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert!(matches!(frames[0], ToLibrary::Welcome { .. }), "{frames:?}");
    let ToLibrary::HeldFrom(from) = &frames[1] else {
        panic!("no held_from after the welcome: {frames:?}");
    };
    assert_eq!(PathBuf::from(&from.stat), cgroup.join("memory.stat"));
    let stat = std::fs::read_to_string(&from.stat).unwrap();
    for key in &from.keys {
        assert!(
            stat.lines()
                .any(|l| l.split(' ').next() == Some(key.as_str())),
            "{key} not in {}: {stat}",
            from.stat
        );
    }
    assert_eq!(from.keys.len(), 2, "{from:?}");
}
