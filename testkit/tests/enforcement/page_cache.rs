//! Page-cache shares: an engine whose files fill the database's ceiling
//! with page cache, above its share, is asked by the agent to drop its
//! cold cache; the library drops its least recently used files first
//! until the engine is back at its share, and the newest stays cached.

use std::{process::Stdio, time::Duration};

use nodedb_governor_testkit::{
    harness::{probes::JsonLines, relocated, unique},
    privileged::skip_unless_privileged,
    wait::poll,
};

const MIB: u64 = 1 << 20;

#[test]
fn an_engine_above_its_page_cache_share_under_pressure_drops_its_coldest_files() {
    if skip_unless_privileged("page cache share") {
        return;
    }
    // 80 MiB of segments in a 96 MiB ceiling: 83%, past the 75% warning
    // threshold, with the page cache alone.
    let agent = super::start_agent_with(
        "ceiling = \"96MiB\"",
        "[[engine]]\nname = \"timeseries\"\nbudget = \"100%\"\npage_cache_share = \"12MiB\"\n",
    );
    let dir = relocated::disk_dir(env!("CARGO_TARGET_TMPDIR")).join(unique("cache-probe"));
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_cache-probe"),
        &[
            "--dir",
            dir.to_str().unwrap(),
            "--files",
            "10",
            "--mib",
            "8",
        ],
        Stdio::piped(),
    );
    let lines = JsonLines::of(&mut probe).collect();
    let dropped = poll(Duration::from_secs(20), Duration::from_millis(100), || {
        let last = lines.last();
        last["cache_drops"].as_u64() >= Some(1) && last["cached_bytes"].as_u64() <= Some(12 * MIB)
    });
    let last = lines.last();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        dropped,
        "the engine's cache was not dropped to its share: {last}\nagent log:\n{}",
        agent.log()
    );
    assert!(
        lines.any(|l| l["cached_bytes"].as_u64() >= Some(72 * MIB)),
        "the files were cached first"
    );
    // Coldest first: the newest file is the one left (a share of 12 MiB,
    // not 8, so a page of the engine's other cache, which the attribution
    // counts too, does not tip the last file over).
    let per_file: Vec<u64> = last["per_file"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let log = agent.log();
    let drops: Vec<&str> = log.lines().filter(|l| l.contains("cold cache")).collect();
    assert_eq!(
        per_file.last(),
        Some(&(8 * MIB)),
        "{last}\n{}",
        drops.join("\n")
    );
    assert!(per_file[..9].iter().all(|&b| b == 0), "{last}");
    // The library's answer (what it freed) reaches the agent after the
    // probe has said so: the status shows it once the agent has it.
    let ts = || agent.status_json()["clients"][0]["engines"]["timeseries"].clone();
    let answered = poll(Duration::from_secs(10), Duration::from_millis(100), || {
        ts()["cache_dropped_bytes"].as_u64() >= Some(64 * MIB)
    });
    let ts = ts();
    assert!(answered, "the agent never heard what the drop freed: {ts}");
    assert!(ts["cache_drop_requests"].as_u64() >= Some(1), "{ts}");
    assert_eq!(ts["page_cache_share_bytes"], 12 * MIB, "{ts}");
}
