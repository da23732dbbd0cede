//! The ladder's last rung: an engine pushed over its budget by memory it
//! never reserved (only the kernel's attribution sees it) is asked to
//! spill, and is back under its budget, round after round.

use nodedb_governor_testkit::{harness::probes::report, privileged::skip_unless_privileged};

#[test]
fn an_engine_over_its_budget_by_unreserved_memory_is_spilled_back_under_it() {
    if skip_unless_privileged("enforcement end to end") {
        return;
    }
    // The other engines' floors are their whole budgets: nothing to
    // borrow, so a breach must end in a spill.
    let agent = super::start_agent_with("", &super::three_engines(&["timeseries", "query"]));
    let report: serde_json::Value = report(
        agent
            .probe(env!("CARGO_BIN_EXE_breach-probe"))
            .args(["--rounds", "40"]),
    );
    let rounds = report["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 40, "every breach was answered with a spill");
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
    eprintln!(
        "breach (Critical crossed) to spill, 40 rounds at the default tick: p50 {} us, p99 {} us, max {} us",
        report["latency_us"]["p50"], report["latency_us"]["p99"], report["latency_us"]["max"]
    );
}
