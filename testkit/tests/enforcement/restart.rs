//! A killed agent (SIGKILL: no clean-up) restarts on its pinned maps: the
//! counts go on, the library reconnects on its own and its process is not
//! registered afresh, and the database keeps running meanwhile.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use nodedb_governor_testkit::{
    harness::{Agent, probes::JsonLines},
    privileged::skip_unless_privileged,
    wait::wait_for,
};

#[test]
fn a_killed_agent_restarts_on_its_pinned_maps_and_the_library_reconnects() {
    if skip_unless_privileged("agent restart") {
        return;
    }
    let mut agent = super::start_agent("");
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "48"],
        Stdio::piped(),
    );
    let pid = probe.id();
    let mut lines = JsonLines::of(&mut probe);
    let mut next = move || lines.next_value();
    assert_eq!(next()["held_bytes"], 48 << 20);
    let vector = |agent: &Agent| -> (u64, u64) {
        let s = agent.status_json();
        let p = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
            .unwrap_or_default();
        (
            p["engines"]["vector"]["resident_bytes"]
                .as_u64()
                .unwrap_or(0),
            p["unattributed"]["resident_bytes"].as_u64().unwrap_or(0),
        )
    };
    wait_for("48 MiB attributed to vector", || {
        vector(&agent).0 >= 47 << 20
    });
    let (before, unattributed_before) = vector(&agent);

    // SIGKILL: no clean-up, the pins and the registry stay.
    agent.kill();
    let mut seen_down = false;
    for _ in 0..50 {
        if next()["connected"] == false {
            seen_down = true;
            break;
        }
    }
    assert!(seen_down, "the library noticed the agent was gone");
    // The database keeps running while the agent is away.
    assert_eq!(probe.try_wait().unwrap(), None);

    agent.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = next();
        if st["connected"] == true && st["connects"].as_u64() >= Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the library did not reconnect: {st}"
        );
    }
    let (after, unattributed_after) = vector(&agent);
    assert!(
        after.abs_diff(before) < 2 << 20,
        "the counts went on from the pinned maps: vector {before} before, {after} after"
    );
    assert!(
        unattributed_after < unattributed_before + (2 << 20),
        "the process was not registered afresh (its memory would be unattributed): {unattributed_before} -> {unattributed_after}"
    );
    let _ = probe.kill();
    let _ = probe.wait();
}
