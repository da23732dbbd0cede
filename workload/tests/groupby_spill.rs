//! A DataFusion GROUP BY over more data than the Query budget: it completes
//! with the right answer by spilling when the governor refuses memory, and
//! fails with the governor's refusal when it may not spill. Streamed into a
//! digest (as the validation workload runs it), the answer is checked the
//! same way.

use std::sync::Arc;

use datafusion::arrow::{array::RecordBatch, datatypes::Schema};
use nodedb_governor::{Budget, EngineId, MemoryGovernor};
use nodedb_governor_workload::query::{
    GroupBy, GroupByData, GroupsDigest, Spill, reference, reference_digest,
};

const MIB: u64 = 1 << 20;
/// A fraction of what the hash tables need. Not much less: under a very
/// small cap, which of DataFusion's operators gets the memory is a race,
/// and one left holding nothing cannot spill and fails (seen at 24 MiB
/// once DataFusion was built optimised).
const QUERY_CAP: u64 = 64 * MIB;

fn governor() -> MemoryGovernor {
    MemoryGovernor::new(
        Budget::builder(256 * MIB)
            .engine(EngineId::Vector, 32 * MIB, 128 * MIB)
            .engine(EngineId::Query, 8 * MIB, QUERY_CAP)
            .build()
            .unwrap(),
    )
}

/// 2 million distinct keys over 4 million rows: the hash tables alone need
/// several times the Query cap.
const DATA: GroupByData = GroupByData {
    rows: 4_000_000,
    keys: 2_000_000,
    seed: 7,
};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The test's query: the Query engine's budget, 2 partitions.
fn query(
    g: &MemoryGovernor,
    schema: Arc<Schema>,
    batches: Vec<RecordBatch>,
    spill: Spill,
) -> GroupBy<'_> {
    GroupBy {
        governor: g,
        engine: EngineId::Query,
        schema,
        batches,
        partitions: 2,
        spill,
        pool: None,
    }
}

#[test]
fn group_by_over_the_budget_spills_and_is_right() {
    let g = governor();
    let (schema, batches) = DATA.batches(8192).unwrap();
    let want = reference(&batches);
    assert!(want.len() > 1_500_000, "the data is high-cardinality");
    let dir = tempdir();
    let got = runtime()
        .block_on(query(&g, schema, batches, Spill::To(dir.clone())).run())
        .unwrap();
    let q = g.usage(EngineId::Query).unwrap();
    assert!(
        q.rejections > 0,
        "the query must have been refused memory at least once: {q:?}"
    );
    assert!(
        q.peak_bytes <= QUERY_CAP,
        "DataFusion stayed inside the Query cap: peak {} > {QUERY_CAP}",
        q.peak_bytes
    );
    assert!(
        got.spill_count > 0 && got.spilled_bytes > 0,
        "DataFusion must have spilled: {} files, {} bytes",
        got.spill_count,
        got.spilled_bytes
    );
    eprintln!(
        "GROUP BY: {} groups, {} refusals, peak {} MiB of a {} MiB cap, {} spill files, {} MiB spilled",
        got.groups.len(),
        q.rejections,
        q.peak_bytes / MIB,
        QUERY_CAP / MIB,
        got.spill_count,
        got.spilled_bytes as u64 / MIB
    );
    assert_eq!(got.groups.len(), want.len(), "number of groups");
    assert!(
        got.groups == want,
        "GROUP BY result differs from the reference"
    );
    // DataFusion's threads are gone and gave everything back.
    g.flush_thread_credit();
    assert_eq!(g.usage(EngineId::Query).unwrap().used_bytes, 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn group_by_without_spilling_fails_with_the_governors_refusal() {
    let g = governor();
    let (schema, batches) = DATA.batches(8192).unwrap();
    let err = runtime()
        .block_on(query(&g, schema, batches, Spill::Disabled).run())
        .expect_err("a GROUP BY that cannot spill must fail inside the budget");
    let msg = format!("{err:#}");
    let q = g.usage(EngineId::Query).unwrap();
    // The governor refused, and the query failed for it: either with the
    // refusal itself, or, when the operator that was refused first tried to
    // spill, with DataFusion's "DiskManager is disabled" (which operator is
    // refused first depends on the threads' timing).
    assert!(q.rejections > 0, "the governor refused: {q:?}");
    assert!(
        msg.contains("engine query refused") || msg.contains("DiskManager is disabled"),
        "the error must come from the governor's refusal: {msg}"
    );
    assert!(q.peak_bytes <= QUERY_CAP, "{q:?}");
    // Everything DataFusion held went back when the query failed.
    g.flush_thread_credit();
    assert_eq!(g.usage(EngineId::Query).unwrap().used_bytes, 0);
}

/// The streamed query, spilling under the same cap, yields the digest of
/// the reference; the digest is the groups' and nothing else (any changed
/// sum, count or key changes it, the order does not).
#[test]
fn streamed_group_by_spills_and_matches_the_reference_digest() {
    let (schema, batches) = DATA.batches(8192).unwrap();
    let groups = reference(&batches);
    let want = reference_digest(&batches);
    let mut by_hand = GroupsDigest::default();
    for &grp in groups.iter().rev() {
        by_hand.add(grp);
    }
    assert_eq!(want, by_hand, "the order of the groups does not matter");
    assert_eq!(want.groups, groups.len() as u64);
    for change in [(0, 1, 0), (0, 0, 1), (1, 0, 0)] {
        let mut d = GroupsDigest::default();
        for (i, &(k, s, c)) in groups.iter().enumerate() {
            d.add(if i == 1000 {
                (k + change.0, s + change.1, c + change.2)
            } else {
                (k, s, c)
            });
        }
        assert_ne!(d, want, "a changed group {change:?} changes the digest");
    }
    let g = governor();
    let dir = tempdir();
    let mut got = GroupsDigest::default();
    let (spill_files, spilled_bytes) = runtime()
        .block_on(query(&g, schema, batches, Spill::To(dir.clone())).run_into(|grp| got.add(grp)))
        .unwrap();
    assert!(spill_files > 0 && spilled_bytes > 0, "it spilled");
    assert_eq!(got, want);
    let q = g.usage(EngineId::Query).unwrap();
    assert!(q.rejections > 0 && q.peak_bytes <= QUERY_CAP, "{q:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A directory of the test's own (the tests run in parallel, and each
/// removes its directory at the end).
fn tempdir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("nodedb-groupby-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
