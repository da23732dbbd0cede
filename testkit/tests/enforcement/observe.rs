//! Observing only (`enforce = false`): the ungoverned baseline.

use std::{process::Stdio, time::Duration};

use nodedb_governor_testkit::{privileged::skip_unless_privileged, wait::wait_for};

/// `enforce = false`: the ungoverned baseline, measured the same way. The
/// agent attributes and shows the levels, keeps `memory.max` at the
/// ceiling, and asks nothing of the library: an engine far over its
/// budget is neither spilled nor purged, and its cap is the ceiling.
#[test]
fn an_observing_agent_measures_but_asks_nothing() {
    if skip_unless_privileged("observe mode") {
        return;
    }
    const MIB: u64 = 1 << 20;
    let agent = super::start_agent("enforce = false");
    // Nothing governed, nothing under way: the calm tick.
    let period = |s: &serde_json::Value| s["ticks"]["period_ms"].as_u64();
    // (A calm tick has run, not only been scheduled: on a busy machine
    // the probe below could otherwise end the calm before its first tick.)
    wait_for("the calm tick", || {
        let s = agent.status_json();
        period(&s) == Some(250) && s["ticks"]["calm_ticks"].as_u64() > Some(0)
    });
    let _probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "80"],
        Stdio::null(),
    );
    let vector = |s: &serde_json::Value| s["clients"][0]["engines"]["vector"].clone();
    wait_for("vector past its budget, as the kernel sees it", || {
        let s = agent.status_json();
        vector(&s)["resident_bytes"].as_u64() >= Some(78 * MIB)
            && vector(&s)["level"] == "emergency"
    });
    // Many ticks at Emergency.
    std::thread::sleep(Duration::from_millis(500));
    let s = agent.status_json();
    let v = vector(&s);
    assert_eq!(v["spill_requests"], 0, "{v}");
    assert_eq!(v["purges"], 0, "{v}");
    assert_eq!(
        v["cap_bytes"],
        1u64 << 30,
        "the library's cap is the ceiling: {v}"
    );
    assert_eq!(
        s["ceiling"]["high_bytes"], s["ceiling"]["limit_bytes"],
        "no lower high mark"
    );
    assert_eq!(
        period(&s),
        Some(20),
        "an engine in Emergency: the busy tick ({})",
        s["ticks"]
    );
    assert!(
        s["ticks"]["calm_ticks"].as_u64() > Some(0),
        "{}",
        s["ticks"]
    );
}

/// A governed process that exits is forgotten at the next tick (its
/// pidfd turns readable; one `poll` per tick for every process), and one
/// still running is kept.
#[test]
fn an_exited_process_is_forgotten_at_once() {
    if skip_unless_privileged("exit of a governed process") {
        return;
    }
    let agent = super::start_agent("enforce = false");
    let bin = env!("CARGO_BIN_EXE_hold-probe");
    let mut gone = agent.spawn_probe(bin, &["--mib", "8"], Stdio::null());
    let _kept = agent.spawn_probe(bin, &["--mib", "8"], Stdio::null());
    let pids = |s: &serde_json::Value| -> Vec<u64> {
        let mut v: Vec<u64> = s["processes"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["pid"].as_u64()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    wait_for("both processes governed", || {
        pids(&agent.status_json()).len() == 2
    });
    let pid = u64::from(gone.id());
    gone.kill().expect("killing the probe");
    gone.wait().expect("reaping the probe");
    let started = std::time::Instant::now();
    wait_for("the exited process forgotten", || {
        !pids(&agent.status_json()).contains(&pid)
    });
    let left = pids(&agent.status_json());
    assert_eq!(left.len(), 1, "the running one is kept: {left:?}");
    eprintln!("forgotten after {:?}", started.elapsed());
}
