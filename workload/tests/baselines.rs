//! What the validation compares the governed run with, held to being what
//! it says: the static baseline (`nodedb-workload --static-budgets`: each
//! engine held to a fixed budget by a pool of its own, with no agent, as a
//! user would configure a database without a governor), and the solo
//! phase (each engine busy alone in turn: demand that moves).

use std::{
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Runs the workload, which must succeed; its result.
fn result(args: &[&str]) -> Value {
    let out = workload(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the workload in a scratch directory of its own, removed after.
fn workload(args: &[&str]) -> Output {
    static RUNS: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nodedb-static-baseline-{}-{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let out = Command::new(env!("CARGO_BIN_EXE_nodedb-workload"))
        .arg("--dir")
        .arg(&dir)
        .args(args)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// A small workload: 2,000 vectors of 3 KiB in 1 MiB segments, 400,000
/// points (6.4 MB buffered), a 300,000-row `GROUP BY` over 280,000 groups.
const SMALL: [&str; 14] = [
    "--vectors",
    "2000",
    "--payload",
    "2048",
    "--segment",
    "340",
    "--queries",
    "20",
    "--points",
    "400000",
    "--rows",
    "300000",
    "--keys",
    "1000000",
];

#[test]
fn each_engine_is_held_to_its_own_fixed_budget_and_spills_within_it() {
    let budgets = format!(
        "vector={},timeseries={},query={}",
        2 * MIB,
        2 * MIB,
        4 * MIB
    );
    let ceiling = (64 * MIB).to_string();
    let mut args = SMALL.to_vec();
    args.extend(["--static-budgets", &budgets, "--static-ceiling", &ceiling]);
    let r = result(&args);
    assert_eq!(
        (r["static"].as_bool(), r["governed"].as_bool()),
        (Some(true), Some(false))
    );
    assert_eq!(r["correct"], true, "{r}");
    // The library's pools have the fixed caps, and nothing moved them.
    let caps: Vec<(String, u64)> = r["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["engine"].as_str().unwrap().to_owned(),
                b["cap_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        caps,
        [
            ("vector".to_owned(), 2 * MIB),
            ("timeseries".to_owned(), 2 * MIB),
            ("query".to_owned(), 4 * MIB)
        ]
    );
    // Each engine gave way within its own budget: the vector engine's
    // segments went to disk, the timeseries engine flushed before its end,
    // and the GROUP BY spilled from DataFusion's FairSpillPool (the query
    // engine's library pool is not what it draws from: no refusal there).
    let v = &r["vector"]["stats"];
    assert!(v["evictions"].as_u64() > Some(0), "{v}");
    assert!(
        r["timeseries"]["stats"]["flushes"].as_u64() > Some(1),
        "{r}"
    );
    assert!(r["query"]["spilled_bytes"].as_u64() > Some(0), "{r}");
    let query_refusals = r["budgets"][2]["rejections"].as_u64();
    assert_eq!(
        query_refusals,
        Some(0),
        "the GROUP BY drew from the library"
    );
    // Alone in turn (the solo phase, on by default), each engine is held
    // to the same budget: the idle ones lend nothing.
    let solo = &r["solo"];
    assert!(
        solo["vector"]["stats"]["evictions"].as_u64() > Some(0),
        "{solo}"
    );
    assert!(
        solo["timeseries"]["stats"]["flushes"].as_u64() > Some(1),
        "{solo}"
    );
    assert!(solo["query"]["spilled_bytes"].as_u64() > Some(0), "{solo}");
}

#[test]
fn the_solo_phase_runs_each_engine_alone_and_can_be_left_out() {
    let mut args = SMALL.to_vec();
    let r = result(&args);
    assert_eq!(r["correct"], true, "{r}");
    let solo = &r["solo"];
    // Each engine did the whole job alone, right, on an instance of its
    // own: the together phase's figures are its own.
    assert_eq!(solo["vector"]["stats"]["vectors"], 2000, "{solo}");
    assert!(
        solo["vector"]["recall_at_10"].as_f64() >= Some(0.8),
        "{solo}"
    );
    assert_eq!(solo["timeseries"]["correct"], true, "{solo}");
    assert_eq!(solo["timeseries"]["stats"]["points"], 400_000, "{solo}");
    assert_eq!(solo["query"]["correct"], true, "{solo}");
    assert_eq!(r["vector"]["stats"]["vectors"], 2000);
    assert_eq!(r["timeseries"]["stats"]["points"], 400_000);
    // One engine at a time, in the phase before the together one.
    let took: f64 = ["vector", "timeseries", "query"]
        .iter()
        .map(|e| solo[e]["phase_seconds"].as_f64().unwrap())
        .sum();
    assert!(took < r["seconds"].as_f64().unwrap(), "{r}");
    args.extend(["--solo", "false"]);
    let r = result(&args);
    assert!(r["solo"].is_null(), "{r}");
    assert_eq!(r["correct"], true);
}

#[test]
fn bad_static_budgets_are_named() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["--static-budgets", "vector=abc", "--static-ceiling", "1"],
            "vector's budget \"abc\"",
        ),
        (
            &["--static-budgets", "disk=5", "--static-ceiling", "1"],
            "\"disk\" is not an engine of this workload",
        ),
        (
            &["--static-budgets", "vector=0", "--static-ceiling", "1"],
            "vector's budget is zero",
        ),
        (
            &[
                "--static-budgets",
                "vector=5,timeseries=5",
                "--static-ceiling",
                "100",
            ],
            "names no budget for query",
        ),
        (
            &["--static-budgets", "vector=5,timeseries=5,query=5"],
            "--static-ceiling",
        ),
    ];
    for (args, want) in cases {
        let out = workload(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was taken");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} ran: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
