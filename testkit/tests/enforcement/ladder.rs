//! The ladder's last rung: an engine pushed over its budget by memory it
//! never reserved (only the kernel's attribution sees it) is asked to
//! spill, and is back under its budget, round after round: woken by the
//! kernel's mark on the engine's next threshold, and with the marks off,
//! by the tick alone (both figures are printed, from the same run).

use nodedb_governor_testkit::{harness::probes::report, privileged::skip_unless_privileged};
use serde_json::Value;

/// 100 breaches under an agent with `extra` settings: the probe's report
/// and the agent's `marks` status.
fn breaches(extra: &str) -> (Value, Value) {
    // The other engines' floors are their whole budgets: nothing to
    // borrow, so a breach must end in a spill.
    let agent = super::start_agent_with(extra, &super::three_engines(&["timeseries", "query"]));
    let report: Value = report(
        agent
            .probe(env!("CARGO_BIN_EXE_breach-probe"))
            .args(["--rounds", "100"]),
    );
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 100, "every breach was answered with a spill");
    for r in rounds {
        assert!(
            r["freed_bytes"].as_u64() >= r["target_bytes"].as_u64()
                && r["target_bytes"].as_u64() > Some(0),
            "each spill freed at least its target: {r}"
        );
    }
    let final_level = report["final_level"].as_str().unwrap();
    assert!(
        final_level.contains("Normal") || final_level.contains("Warning"),
        "the agent saw the engine back under its budget: {final_level}"
    );
    let marks = agent.status_json()["marks"].clone();
    (report, marks)
}

#[test]
fn an_engine_over_its_budget_by_unreserved_memory_is_spilled_back_under_it() {
    if skip_unless_privileged("enforcement end to end") {
        return;
    }
    let (events, marks) = breaches("");
    assert_eq!(marks["enabled"], true, "{marks}");
    // Every breach crosses the Critical mark: the kernel reported
    // crossings, and the agent reacted to them between ticks.
    assert!(marks["events"].as_u64() >= Some(100), "{marks}");
    assert!(marks["reactions"].as_u64() >= Some(100), "{marks}");
    assert_eq!(marks["bad_records"], 0, "{marks}");
    let (tick, off) = breaches("mark_events = false\n");
    assert_eq!(off["enabled"], false, "{off}");
    assert_eq!(off["events"], 0, "no mark is armed: {off}");
    assert_eq!(off["armed"], 0, "{off}");
    for (how, r) in [("marks", &events), ("tick alone", &tick)] {
        eprintln!(
            "breach (Critical crossed) to spill, 100 rounds, {how} (20 ms tick): p50 {} us, p99 {} us, max {} us",
            r["latency_us"]["p50"], r["latency_us"]["p99"], r["latency_us"]["max"]
        );
    }
    eprintln!(
        "marks: {} crossings ({} not confirmed by the exact figure), {} reactions, kernel to agent {} us at most",
        marks["events"], marks["early"], marks["reactions"], marks["max_wake_us"]
    );
}
