//! Settling a process's raw slot counters into the figures handed out: the
//! external slot spread over the buckets by share, negatives clamped into
//! `unattributed`, so the parts always add up to the process total.

use std::collections::BTreeMap;

use nodedb_governor_common::{NODE_SLOTS, SlotStats, kind};

use super::attributed::{Attributed, ProcessAttribution};

/// Turns raw slot counters into the reported figures: spreads the external
/// slot over the buckets and clamps negatives into `unattributed`.
pub(super) fn settle(
    pid: u32,
    engines: BTreeMap<String, SlotStats>,
    unattributed: SlotStats,
    external: SlotStats,
    vm_rss_bytes: Option<u64>,
) -> ProcessAttribution {
    let names: Vec<String> = engines.keys().cloned().collect();
    let mut rows: Vec<SlotStats> = engines.into_values().collect();
    rows.push(unattributed);
    let counted: Vec<i64> = rows.iter().map(counted_bytes).collect();
    let engine_rows = names.len();
    for k in 0..kind::COUNT {
        let ext = external.resident_bytes[k];
        spread_and_clamp(&mut rows, engine_rows, ext, |r| &mut r.resident_bytes[k]);
    }
    for n in 0..NODE_SLOTS {
        let ext = external.node_resident_bytes[n];
        spread_and_clamp(&mut rows, engine_rows, ext, |r| {
            &mut r.node_resident_bytes[n]
        });
    }
    let mut usages: Vec<Attributed> = rows
        .into_iter()
        .zip(counted)
        .map(|(r, c)| Attributed {
            counted_bytes: c,
            ..engine_usage(r)
        })
        .collect();
    let unattributed = usages.pop().unwrap_or_default();
    let engines = names.into_iter().zip(usages).collect();
    ProcessAttribution {
        pid,
        engines,
        unattributed,
        vm_rss_bytes,
    }
}

/// Spreads `ext` (the external slot's count of one figure) over the rows
/// by their share of it, then moves the engines' negatives (the first
/// `engines` rows) into the last row, `unattributed`.
fn spread_and_clamp(
    rows: &mut [SlotStats],
    engines: usize,
    ext: i64,
    field: impl Fn(&mut SlotStats) -> &mut i64,
) {
    if ext != 0 {
        let held: i64 = rows.iter_mut().map(|r| (*field(r)).max(0)).sum();
        let mut left = ext;
        if held > 0 {
            for r in rows.iter_mut() {
                let v = field(r);
                let share = (ext as i128 * (*v).max(0) as i128 / held as i128) as i64;
                *v += share;
                left -= share;
            }
        }
        // Rounding remainder, or nothing held at all: unattributed.
        if let Some(last) = rows.last_mut() {
            *field(last) += left;
        }
    }
    let deficit: i64 = rows[..engines]
        .iter_mut()
        .map(|r| {
            let v = field(r);
            let neg = (*v).min(0);
            *v -= neg;
            neg
        })
        .sum();
    let Some(last) = rows.last_mut() else {
        return;
    };
    *field(last) += deficit;
    // `unattributed` below zero (releases charged to an engine that did not
    // hold them, which then went below zero itself: a 2 MiB region's last
    // faulter is not always the owner of every mapping in it) would show as
    // none, and the parts would add up to more than the process holds: the
    // soak saw the total 6 to 100 MiB above VmRSS. Its deficit comes off the
    // engines instead, in proportion to what they hold.
    let short = (*field(last)).min(0);
    if short == 0 {
        return;
    }
    *field(last) = 0;
    let held: i64 = rows[..engines].iter_mut().map(|r| (*field(r)).max(0)).sum();
    if held <= 0 {
        return;
    }
    // Never more than they hold (a process cannot hold less than none).
    let take = short.max(-held);
    let mut left = take;
    for r in rows[..engines].iter_mut() {
        let v = field(r);
        let share = (take as i128 * (*v).max(0) as i128 / held as i128) as i64;
        *v += share;
        left -= share;
    }
    // The rounding remainder (a few bytes) off the first engine that has it.
    for r in rows[..engines].iter_mut() {
        if left == 0 {
            break;
        }
        let v = field(r);
        let off = left.max(-*v);
        *v += off;
        left -= off;
    }
}

/// A slot's own count of resident bytes, every kind but swap: the figure
/// its mark is kept in (the programs count the same kinds toward it).
pub(super) fn counted_bytes(s: &SlotStats) -> i64 {
    s.resident_bytes[kind::ANON] + s.resident_bytes[kind::FILE] + s.resident_bytes[kind::SHMEM]
}

fn engine_usage(s: SlotStats) -> Attributed {
    let r = |k: usize| s.resident_bytes[k].max(0) as u64;
    Attributed {
        resident_bytes: r(kind::ANON) + r(kind::FILE) + r(kind::SHMEM),
        anon_bytes: r(kind::ANON),
        file_bytes: r(kind::FILE),
        shmem_bytes: r(kind::SHMEM),
        swap_bytes: r(kind::SWAP),
        mapped_bytes: s.mapped_bytes.max(0) as u64,
        page_faults: s.page_faults,
        released_for_others_bytes: s.released_for_others_bytes.max(0) as u64,
        // Pages cached before the agent counted them can leave after: a
        // net below zero is clamped.
        page_cache_bytes: s.page_cache_bytes.max(0) as u64,
        page_cache_evicted_bytes: s.page_cache_evicted_bytes,
        page_cache_untracked_bytes: s.page_cache_untracked_bytes,
        hinting_faults_elsewhere: s.hinting_faults_elsewhere,
        node_resident_bytes: s.node_resident_bytes.map(|b| b.max(0) as u64),
        // The slot's own count, before settling: the caller's.
        counted_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(anon: i64, file: i64) -> SlotStats {
        let mut s = SlotStats::default();
        s.resident_bytes[kind::ANON] = anon;
        s.resident_bytes[kind::FILE] = file;
        s
    }

    #[test]
    fn external_changes_are_spread_by_share_and_parts_add_up() {
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), stats(300, 0));
        engines.insert("b".to_owned(), stats(100, 50));
        let u = settle(1, engines, stats(0, 50), stats(-200, -20), None);
        assert_eq!(u.engines["a"].anon_bytes, 150);
        assert_eq!(u.engines["b"].anon_bytes, 50);
        assert_eq!(u.engines["b"].file_bytes, 40);
        assert_eq!(u.unattributed.file_bytes, 40);
        let total: u64 = u.engines.values().map(|e| e.resident_bytes).sum::<u64>()
            + u.unattributed.resident_bytes;
        assert_eq!(total, 300 + 100 + 50 + 50 - 200 - 20);
    }

    #[test]
    fn negative_engine_is_clamped_into_unattributed() {
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), stats(-4096, 0));
        engines.insert("b".to_owned(), stats(8192, 0));
        let u = settle(1, engines, stats(10_000, 0), SlotStats::default(), None);
        assert_eq!(u.engines["a"].anon_bytes, 0);
        assert_eq!(u.engines["b"].anon_bytes, 8192);
        assert_eq!(u.unattributed.anon_bytes, 10_000 - 4096);
    }

    #[test]
    fn nodes_are_settled_like_kinds_each_on_its_own() {
        let node = |n0: i64, n1: i64| {
            let mut s = SlotStats::default();
            s.node_resident_bytes[0] = n0;
            s.node_resident_bytes[1] = n1;
            s
        };
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), node(300, -40));
        engines.insert("b".to_owned(), node(100, 80));
        // Reclaim from outside (kswapd, on node 0's CPUs) took 200 from
        // node 0: spread over node 0's holders only.
        let u = settle(1, engines, node(0, 0), node(-200, 0), None);
        assert_eq!(u.engines["a"].node_resident_bytes[..2], [150, 0]);
        assert_eq!(u.engines["b"].node_resident_bytes[..2], [50, 40]);
        // a's -40 on node 1 (a release counted there by a thread that had
        // moved) is clamped: a shows none, and the deficit, which the
        // unattributed bucket cannot show, comes off b's 80 there.
        assert_eq!(u.unattributed.node_resident_bytes[..2], [0, 0]);
    }

    /// Releases charged to an engine that did not hold them (the last
    /// faulter of a shared 2 MiB region): it goes below zero, and so does
    /// `unattributed` when the deficit is more than it holds. The parts
    /// still add up to the process's total: the rest of the deficit comes
    /// off the other engines, by what they hold.
    #[test]
    fn a_deficit_beyond_unattributed_comes_off_the_engines_and_the_parts_still_add_up() {
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), stats(-60, 0));
        engines.insert("b".to_owned(), stats(200, 0));
        engines.insert("c".to_owned(), stats(100, 0));
        let u = settle(1, engines, stats(30, 0), SlotStats::default(), None);
        assert_eq!(u.engines["a"].anon_bytes, 0);
        assert_eq!(u.unattributed.anon_bytes, 0);
        // 30 short, taken 2:1.
        assert_eq!(u.engines["b"].anon_bytes, 180);
        assert_eq!(u.engines["c"].anon_bytes, 90);
        let total: u64 = u.engines.values().map(|e| e.resident_bytes).sum::<u64>()
            + u.unattributed.resident_bytes;
        assert_eq!(total, 200 + 100 + 30 - 60);
        // More short than the engines hold: none left anywhere.
        let mut engines = BTreeMap::new();
        engines.insert("a".to_owned(), stats(-500, 0));
        engines.insert("b".to_owned(), stats(7, 0));
        let u = settle(1, engines, stats(3, 0), SlotStats::default(), None);
        assert_eq!(u.engines["b"].anon_bytes, 0);
        assert_eq!(u.unattributed.anon_bytes, 0);
    }
}
