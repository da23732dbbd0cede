//! Engines that run as processes of their own: a domain cgroup each, the
//! engine's budget as its high mark, all of the process's memory the
//! engine's.

use std::{io::Write, path::PathBuf, process::Stdio, time::Duration};

use nodedb_governor::control::wire::ToLibrary;
use nodedb_governor_testkit::{
    privileged::skip_unless_privileged,
    wait::poll,
    wire::{connect, expect_reply, hello},
};

/// An engine that runs as a process of its own (`own_process`) gets a
/// domain cgroup of its own under the database's, with the engine's budget
/// as its high mark (v2 `memory.high`; the v1 soft limit on hybrid hosts),
/// all of the process's memory is the engine's, and the ladder governs it
/// like any engine. A process may not declare such an engine with others.
#[test]
fn an_engine_in_its_own_process_gets_its_own_domain_cgroup() {
    if skip_unless_privileged("own-process engines") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let agent = super::start_agent_with(
        "",
        "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
         [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\nfloor = \"64MiB\"\nown_process = true\n",
    );
    // Declared with another engine: refused, naming why.
    let (mut s, mut d) = connect(&agent.control).unwrap();
    s.write_all(&hello(&agent.database, &["vector", "timeseries"]))
        .unwrap();
    match expect_reply(&mut s, &mut d) {
        ToLibrary::Error { message } => assert!(
            message.contains("timeseries") && message.contains("own_process"),
            "{message}"
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(s);

    // 60 MiB of 64: Critical, so the ladder sends spill requests.
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--engine", "timeseries", "--mib", "60"],
        Stdio::null(),
    );
    let pid = probe.id();
    let engine = |s: &serde_json::Value| s["clients"][0]["engines"]["timeseries"].clone();
    let mut status = serde_json::Value::Null;
    let spilled = poll(Duration::from_secs(20), Duration::from_millis(50), || {
        status = agent.status_json();
        engine(&status)["spill_requests"].as_u64().unwrap_or(0) != 0
    });
    assert!(spilled, "no spill request: {status}");
    // Critical (57.6 MiB) can be crossed before the probe has touched all
    // 60 MiB (the process's own pages count too): read the status again
    // once it holds them, or until the poll gives up and the checks below
    // say what was seen.
    let resident = |s: &serde_json::Value| {
        s["processes"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
            .and_then(|p| p["engines"]["timeseries"]["resident_bytes"].as_u64())
    };
    poll(Duration::from_secs(20), Duration::from_millis(50), || {
        status = agent.status_json();
        resident(&status) >= Some(58 * MIB)
            && status["ceiling"]["engines"]["timeseries"]["current_bytes"].as_u64()
                >= Some(58 * MIB)
    });
    let domain = PathBuf::from(status["cgroup"].as_str().unwrap());
    let own = domain.join("proc-timeseries");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = cg.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    assert!(
        own.ends_with(v2.trim_start_matches('/')),
        "the process sits in {v2}, not {}",
        own.display()
    );
    let ceiling = &status["ceiling"];
    let dom = &ceiling["engines"]["timeseries"];
    assert_eq!(dom["high_bytes"], 64 * MIB, "{ceiling}");
    let dom_dir = PathBuf::from(dom["cgroup"].as_str().unwrap());
    let high_file = match ceiling["backend"].as_str().unwrap() {
        "cgroup-v2" => "memory.high",
        _ => "memory.soft_limit_in_bytes",
    };
    assert_eq!(
        std::fs::read_to_string(dom_dir.join(high_file))
            .unwrap()
            .trim(),
        (64 * MIB).to_string(),
        "the kernel holds the engine's high mark"
    );
    assert!(
        std::fs::read_to_string(dom_dir.join("cgroup.procs"))
            .unwrap()
            .lines()
            .any(|l| l.trim() == pid.to_string()),
        "the process is charged to its engine's cgroup"
    );
    assert!(
        dom["current_bytes"].as_u64() >= Some(58 * MIB),
        "its memory is charged there: {dom}"
    );
    let p = status["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap();
    assert!(
        p["engines"]["timeseries"]["resident_bytes"].as_u64() >= Some(58 * MIB),
        "the engine's memory is attributed to it: {p}"
    );
    assert_eq!(engine(&status)["budget_bytes"], 64 * MIB);
    let _ = probe.kill();
    let _ = probe.wait();
}
