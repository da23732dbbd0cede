//! Rebalancing: an idle engine lends its unused budget to a busy one, and
//! takes it back (the borrower spilled, the lender not) when it gets busy.

use nodedb_governor_testkit::{harness::probes::report, privileged::skip_unless_privileged};

#[test]
fn an_idle_engine_lends_its_budget_and_takes_it_back_with_spills_on_the_borrower() {
    if skip_unless_privileged("rebalancing end to end") {
        return;
    }
    // Timeseries' floor is its whole budget, so Query is the only lender.
    let agent = super::start_agent_with("", &super::three_engines(&["timeseries"]));
    let r: serde_json::Value = report(
        agent
            .probe(env!("CARGO_BIN_EXE_rebalance-probe"))
            .arg("--admin")
            .arg(&agent.admin),
    );
    let get = |k: &str| r[k].as_u64().unwrap();
    const MIB: u64 = 1 << 20;
    assert_eq!(get("configured_cap_bytes"), 64 * MIB);
    // Query (idle, nothing held) keeps a quarter of its budget and lends
    // the rest: 48 MiB.
    assert_eq!(get("budget_during_loan_bytes"), 112 * MIB, "{r}");
    assert_eq!(get("vector_held_during_loan_bytes"), 96 * MIB);
    // The library's cap is the borrowed budget less the 96 MiB (and a
    // little: stacks, rounding to budget / 64) it holds unreserved.
    assert!(
        (8 * MIB..=16 * MIB).contains(&get("library_cap_during_loan_bytes")),
        "{r}"
    );
    assert_eq!(
        get("vector_spilled_during_loan_bytes"),
        0,
        "no spill while borrowing: {r}"
    );
    // Query got busy (40 MiB): each time it reached Critical of its budget
    // in force it took back what it held + its 16 MiB cushion, so it ends
    // with room for its 40 MiB below Critical (all of it back if it was
    // refused a reservation on the way), and Vector was spilled under what
    // it keeps of the loan. The two
    // budgets still add up to the configured 128 MiB.
    let after = get("vector_budget_after_bytes");
    let query_after = get("query_budget_after_bytes");
    assert_eq!(after + query_after, 128 * MIB, "{r}");
    assert!(query_after as f64 * 0.90 > 40.0 * MIB as f64, "{r}");
    assert!((64 * MIB..112 * MIB).contains(&after), "{r}");
    // Spilled below Critical of what it keeps (a spill goes to 75% of the
    // budget in force when it is asked; take-backs as query grew may have
    // lowered the budget since, short of a new Critical).
    let critical = after * 9 / 10;
    assert!(get("vector_held_after_bytes") < critical, "{r}");
    assert!(
        get("vector_spilled_after_bytes") > 96 * MIB - critical,
        "{r}"
    );
    assert_eq!(
        get("query_spilled_bytes"),
        0,
        "the lender is not spilled: {r}"
    );
}
