//! The ladder's last rung: an engine pushed over its budget by memory it
//! never reserved (only the kernel's attribution sees it) is asked to
//! spill, and is back under its budget, round after round: woken by the
//! kernel's mark on the engine's next threshold, and with the marks off,
//! by the tick alone (both figures are printed, from the same run).

use nodedb_governor_testkit::{harness::probes::report, privileged::skip_unless_privileged};
use serde_json::Value;

/// 100 breaches under an agent with `extra` settings: the probe's report,
/// the agent's `marks` status and its `scheduling`.
fn breaches(extra: &str) -> (Value, Value, Value) {
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
    let status = agent.status_json();
    (
        report,
        status["marks"].clone(),
        status["scheduling"].clone(),
    )
}

#[test]
fn an_engine_over_its_budget_by_unreserved_memory_is_spilled_back_under_it() {
    if skip_unless_privileged("enforcement end to end") {
        return;
    }
    let (events, marks, scheduling) = breaches("");
    // As root the agent's thread runs at SCHED_FIFO (the default).
    assert_eq!(scheduling["policy"], "fifo", "{scheduling}");
    assert_eq!(marks["enabled"], true, "{marks}");
    // Every breach crosses the Critical mark: the kernel reported
    // crossings, and the agent reacted to them between ticks.
    assert!(marks["events"].as_u64() >= Some(100), "{marks}");
    assert!(marks["reactions"].as_u64() >= Some(100), "{marks}");
    assert_eq!(marks["bad_records"], 0, "{marks}");
    let (tick, off, _) = breaches("mark_events = false\n");
    assert_eq!(off["enabled"], false, "{off}");
    assert_eq!(off["events"], 0, "no mark is armed: {off}");
    assert_eq!(off["armed"], 0, "{off}");
    for (how, r) in [("marks", &events), ("tick alone", &tick)] {
        eprintln!(
            "breach (Critical crossed) to spill, 100 rounds, {how} (20 ms tick): p50 {} us, p99 {} us, max {} us",
            r["latency_us"]["p50"], r["latency_us"]["p99"], r["latency_us"]["max"]
        );
    }
    // The agent's thread runs at SCHED_FIFO, the link's threads ask for
    // the short slice (kept by 6.12 and later): both wake at once.
    eprintln!(
        "agent scheduling {} {}; the library's link: prompt wake-ups {}",
        scheduling["policy"], scheduling["priority"], events["prompt_wakeups"]
    );
    eprintln!(
        "marks: {} crossings ({} not confirmed by the exact figure), {} reactions, kernel to agent {} us at most",
        marks["events"], marks["early"], marks["reactions"], marks["max_wake_us"]
    );
}
