//! A killed agent (SIGKILL: no clean-up) restarts on its pinned maps: the
//! counts go on, the library reconnects on its own and its process is not
//! registered afresh, and the database keeps running meanwhile.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use nodedb_governor_testkit::{
    harness::{Agent, probes::JsonLines},
    privileged::skip_unless_privileged,
    wait::wait_for,
};

#[test]
fn a_killed_agent_restarts_on_its_pinned_maps_and_the_library_reconnects() {
    if skip_unless_privileged("agent restart") {
        return;
    }
    let mut agent = super::start_agent("");
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "48"],
        Stdio::piped(),
    );
    let pid = probe.id();
    let mut lines = JsonLines::of(&mut probe);
    let mut next = move || lines.next_value();
    assert_eq!(next()["held_bytes"], 48 << 20);
    let vector = |agent: &Agent| -> (u64, u64) {
        let s = agent.status_json();
        let p = s["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .cloned()
            .unwrap_or_default();
        (
            p["engines"]["vector"]["resident_bytes"]
                .as_u64()
                .unwrap_or(0),
            p["unattributed"]["resident_bytes"].as_u64().unwrap_or(0),
        )
    };
    wait_for("48 MiB attributed to vector", || {
        vector(&agent).0 >= 47 << 20
    });
    let (before, unattributed_before) = vector(&agent);

    // SIGKILL: no clean-up, the pins and the registry stay.
    agent.kill();
    let mut seen_down = false;
    for _ in 0..50 {
        if next()["connected"] == false {
            seen_down = true;
            break;
        }
    }
    assert!(seen_down, "the library noticed the agent was gone");
    // The database keeps running while the agent is away.
    assert_eq!(probe.try_wait().unwrap(), None);

    agent.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = next();
        if st["connected"] == true && st["connects"].as_u64() >= Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the library did not reconnect: {st}"
        );
    }
    let (after, unattributed_after) = vector(&agent);
    assert!(
        after.abs_diff(before) < 2 << 20,
        "the counts went on from the pinned maps: vector {before} before, {after} after"
    );
    assert!(
        unattributed_after < unattributed_before + (2 << 20),
        "the process was not registered afresh (its memory would be unattributed): {unattributed_before} -> {unattributed_after}"
    );
    let _ = probe.kill();
    let _ = probe.wait();
}

/// What a killed agent left that cannot be trusted is named in the log
/// and the status (`restart.discarded`), the registry kept aside, and the
/// agent starts afresh rather than failing (and being restarted into the
/// same failure): a registry that is not one, one whose indexes are out
/// of range, and maps pinned by another layout. Each time the library
/// reconnects and its process is governed again, and the processes the
/// registry listed are counted as lost.
#[test]
fn state_a_killed_agent_left_that_cannot_be_used_is_named_and_set_aside() {
    if skip_unless_privileged("agent restart on bad state") {
        return;
    }
    let mut agent = super::start_agent("");
    let registry = agent
        .dir()
        .path()
        .join(format!("attribution-{}.json", agent.database));
    let pins = std::path::PathBuf::from("/sys/fs/bpf/nodedb-governor").join(&agent.database);
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "48"],
        Stdio::piped(),
    );
    let pid = probe.id();
    let mut lines = JsonLines::of(&mut probe);
    assert_eq!(lines.next_value()["held_bytes"], 48 << 20);
    let vector = |agent: &Agent| -> u64 {
        agent.status_json()["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"] == pid)
            .and_then(|p| p["engines"]["vector"]["resident_bytes"].as_u64())
            .unwrap_or(0)
    };
    wait_for("48 MiB attributed to vector", || vector(&agent) >= 47 << 20);

    type Spoil = Box<dyn Fn(&std::path::Path, &std::path::Path)>;
    let cases: [(&str, Spoil, bool); 3] = [
        (
            "is not a registry this agent can read",
            Box::new(|registry, _| std::fs::write(registry, b"{\"version\": 5, \"proc").unwrap()),
            false,
        ),
        (
            "slot 99999 is out of range",
            Box::new(|registry, _| {
                let mut saved: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(registry).unwrap()).unwrap();
                saved["processes"][0]["external_slot"] = 99_999.into();
                std::fs::write(registry, serde_json::to_vec(&saved).unwrap()).unwrap();
            }),
            true,
        ),
        (
            "do not match this build's",
            // Another map of the object pinned where STATS was: an array
            // of i64 where per-CPU slot statistics should be.
            Box::new(|_, pins| {
                std::fs::remove_file(pins.join("STATS")).unwrap();
                std::fs::rename(pins.join("MARK_TOTALS"), pins.join("STATS")).unwrap();
                std::fs::hard_link(pins.join("STATS"), pins.join("MARK_TOTALS"))
                    .or_else(|_| {
                        std::fs::copy(pins.join("STATS"), pins.join("MARK_TOTALS")).map(drop)
                    })
                    .ok();
            }),
            true,
        ),
    ];
    for (why, spoil, counted) in cases {
        agent.kill();
        spoil(&registry, &pins);
        agent.restart();
        let status = agent.status_json();
        let restart = &status["restart"];
        assert!(
            restart["discarded"]
                .as_str()
                .is_some_and(|d| d.contains(why)),
            "{why}: {restart}\n{}",
            agent.log()
        );
        if counted {
            assert_eq!(restart["processes_lost"], 1, "{why}: {restart}");
        }
        assert!(
            registry.with_extension("json.discarded").exists(),
            "{why}: the registry is kept aside"
        );
        assert!(
            agent
                .log()
                .contains("the earlier agent's state is discarded"),
            "{why}"
        );
        // The library reconnects (with its backoff); its process is
        // governed afresh (its counts from zero: memory it holds idle is
        // attributed at its next change).
        let again = nodedb_governor_testkit::wait::poll(
            Duration::from_secs(30),
            Duration::from_millis(100),
            || {
                let s = agent.status_json();
                let listed = |k: &str| {
                    s[k].as_array()
                        .is_some_and(|a| a.iter().any(|p| p["pid"] == pid))
                };
                listed("processes") && listed("clients")
            },
        );
        assert!(again, "{why}: the library's process is not governed again");
    }
    let _ = probe.kill();
    let _ = probe.wait();
}

/// `[maps]` sizes the workload's maps, and pins an agent made with other
/// sizes are not taken over: an agent killed with `threads = 1024`, then
/// started with 2048, names the map and both sizes and starts afresh.
#[test]
fn maps_are_sized_by_the_config_and_pins_of_other_sizes_set_aside() {
    if skip_unless_privileged("map sizes") {
        return;
    }
    let mut agent = super::start_agent("[maps]\nthreads = 1024\nregions = 8192\n");
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "8"],
        Stdio::piped(),
    );
    assert_eq!(
        JsonLines::of(&mut probe).next_value()["held_bytes"],
        8 << 20
    );
    agent.kill();
    let config = agent.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("threads = 1024", "threads = 2048")).unwrap();
    agent.restart();
    let restart = agent.status_json()["restart"].clone();
    let discarded = restart["discarded"].as_str().unwrap_or_default();
    assert!(
        discarded.contains("ENGINE_BY_TID holds 1024 entries")
            && discarded.contains("this build's 2048"),
        "{restart}"
    );
    let _ = probe.kill();
    let _ = probe.wait();
}
