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
    // Query got busy (40 MiB): it took back what it needs, 40 MiB + its
    // 16 MiB cushion of budget (more if it was refused a reservation on
    // the way), and Vector was spilled under what it keeps of the loan
    // (to the 75% restore point, or below).
    let after = get("vector_budget_after_bytes");
    assert!((64 * MIB..=72 * MIB).contains(&after), "{r}");
    assert!(get("vector_held_after_bytes") <= after * 3 / 4, "{r}");
    assert!(
        get("vector_spilled_after_bytes") >= 96 * MIB - after * 3 / 4,
        "{r}"
    );
    assert_eq!(
        get("query_spilled_bytes"),
        0,
        "the lender is not spilled: {r}"
    );
}
