//! SIGHUP reloads the configuration whole or not at all: a good change is
//! applied in place (the library told its new budget), a bad one refused
//! with its reason while the old one stays.

use nodedb_governor_testkit::{harness::Agent, privileged::skip_unless_privileged, wait::wait_for};

#[test]
fn sighup_reloads_the_config_atomically() {
    if skip_unless_privileged("configuration reload") {
        return;
    }
    let agent = super::start_agent("");
    let config = agent.config_path();
    let original = std::fs::read_to_string(&config).unwrap();
    let mut client = super::reporting_client(&agent, 1, 20000);
    let query_budget = |agent: &Agent| {
        agent.status_json()["clients"][0]["engines"]["query"]["budget_bytes"].as_u64()
    };
    let ceiling = |agent: &Agent| agent.status_json()["ceiling"]["limit_bytes"].as_u64();
    wait_for("the client's budget", || {
        query_budget(&agent) == Some(64 << 20)
    });
    let hup = |agent: &Agent| agent.signal(libc::SIGHUP);
    // The agent's thread runs at SCHED_FIFO 1 by default (a crossing
    // wakes it at once), as the kernel shows.
    let scheduling = |agent: &Agent| agent.status_json()["scheduling"].clone();
    assert_eq!(
        scheduling(&agent)["policy"],
        "fifo",
        "{}",
        scheduling(&agent)
    );
    assert_eq!(scheduling(&agent)["priority"], 1);
    assert_eq!(kernel_policy(agent.pid()), (SCHED_FIFO, 1));

    // A good change: applied in place, the library told.
    let changed = original
        .replace(
            "ceiling = \"1GiB\"",
            "ceiling = \"512MiB\"\nrealtime_priority = 0",
        )
        .replacen(
            "name = \"query\"\nbudget = \"64MiB\"",
            "name = \"query\"\nbudget = \"32MiB\"",
            1,
        );
    assert_ne!(changed, original);
    std::fs::write(&config, &changed).unwrap();
    hup(&agent);
    wait_for("the new budget", || query_budget(&agent) == Some(32 << 20));
    assert_eq!(ceiling(&agent), Some(512 << 20));
    assert_eq!(scheduling(&agent)["policy"], "normal");
    assert_eq!(kernel_policy(agent.pid()), (SCHED_OTHER, 0));

    // Bad ones: refused whole, the old one stays, the agent keeps running.
    for (bad, named) in [
        (
            changed.replace("budget = \"32MiB\"", "budget = \"lots\""),
            "budget",
        ),
        (
            changed
                .replace("budget = \"32MiB\"", "budget = \"16MiB\"")
                .replace(&agent.database, "another-db"),
            "database cannot change",
        ),
    ] {
        std::fs::write(&config, &bad).unwrap();
        hup(&agent);
        wait_for(&format!("a refusal naming {named}"), || {
            let log = agent.log();
            log.contains("configuration refused") && log.contains(named)
        });
        assert_eq!(
            query_budget(&agent),
            Some(32 << 20),
            "nothing of it applied"
        );
        assert_eq!(ceiling(&agent), Some(512 << 20));
        assert_eq!(kernel_policy(agent.pid()), (SCHED_OTHER, 0));
    }
    let _ = client.kill();
    let _ = client.wait();
}

const SCHED_OTHER: u32 = 0;
const SCHED_FIFO: u32 = 1;

/// The policy and real-time priority of `pid`'s main thread (the agent's
/// runtime thread), from `/proc/<pid>/stat` (fields 41 and 40).
fn kernel_policy(pid: u32) -> (u32, u32) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis start at field 3.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let field = |n: usize| fields[n - 3].parse::<u32>().unwrap();
    (field(41), field(40))
}

/// A reload the kernel refuses midway (the ceiling written, the next
/// write refused: a fault point stands in for the kernel) puts back what
/// it had written: the ceiling the kernel enforces is the old one again,
/// the reload is refused naming the failure, and the old configuration
/// stays in force. Before, the new ceiling stayed in the kernel under the
/// old configuration.
#[test]
fn a_reload_refused_midway_puts_back_what_it_wrote() {
    if skip_unless_privileged("reload rolled back") {
        return;
    }
    let agent = Agent::start_with_faults(
        "nodedb-enforce",
        &format!("ceiling = \"1GiB\"\n{}", super::three_engines(&[])),
        "reload-after-ceiling=1*return",
    );
    let limit = |agent: &Agent| agent.status_json()["ceiling"]["limit_bytes"].as_u64();
    let before = limit(&agent);
    assert_eq!(before, Some(1 << 30));
    let config = agent.config_path();
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        original.replace("ceiling = \"1GiB\"", "ceiling = \"768MiB\""),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the reload to be refused", || {
        agent.log().contains("SIGHUP: configuration refused")
    });
    let log = agent.log();
    assert!(
        log.contains("reload-after-ceiling: refused by a fault point"),
        "{log}"
    );
    assert_eq!(
        limit(&agent),
        before,
        "the old ceiling is back in the kernel"
    );
    // The old configuration is in force: the same change, reloaded again
    // (the fault point fired once), applies.
    agent.signal(libc::SIGHUP);
    wait_for("the reload to apply", || {
        agent.log().contains("SIGHUP: configuration reloaded")
    });
    assert_eq!(limit(&agent), Some(768 << 20));
}

/// A ceiling lowered below what the database holds and cannot drop is
/// refused whole, nothing written (on cgroup v1 the kernel takes a limit
/// it can reach by dropping page cache, and the database's next spill,
/// which writes before it frees, was OOM-killed: the soak found it); one
/// that leaves the Emergency margin above it applies.
#[test]
fn a_ceiling_lowered_below_what_the_database_holds_is_refused() {
    if skip_unless_privileged("reload below what is held") {
        return;
    }
    let agent = Agent::start(
        "nodedb-enforce",
        &format!("ceiling = \"1GiB\"\n{}", super::three_engines(&[])),
    );
    let status = agent.status_json();
    let limit = |agent: &Agent| agent.status_json()["ceiling"]["limit_bytes"].as_u64();
    let cgroup = std::path::PathBuf::from(status["ceiling"]["cgroup"].as_str().unwrap());
    let charge_file = match status["ceiling"]["backend"].as_str() {
        Some("cgroup-v1") => "memory.usage_in_bytes",
        _ => "memory.current",
    };
    let charge = || -> u64 {
        std::fs::read_to_string(cgroup.join(charge_file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // A library process of the database holding 100 MiB untracked.
    let _holder = agent.spawn_probe(
        env!("CARGO_BIN_EXE_wire-probe"),
        &["--touch-mib", "100", "--hold-ms", "30000"],
        std::process::Stdio::null(),
    );
    wait_for("the database to hold 100 MiB", || charge() >= 100 << 20);
    let config = agent.config_path();
    let original = std::fs::read_to_string(&config).unwrap();
    let reload = |ceiling: &str, answer: &str| {
        let before = agent.log().matches(answer).count();
        std::fs::write(
            &config,
            original.replace("ceiling = \"1GiB\"", &format!("ceiling = \"{ceiling}\"")),
        )
        .unwrap();
        agent.signal(libc::SIGHUP);
        wait_for(answer, || agent.log().matches(answer).count() > before);
    };
    reload("96MiB", "SIGHUP: configuration refused");
    let log = agent.log();
    assert!(log.contains("would leave no room"), "{log}");
    assert_eq!(limit(&agent), Some(1 << 30), "nothing written");
    // Room above it, with the Emergency margin: applied.
    reload("256MiB", "SIGHUP: configuration reloaded");
    assert_eq!(limit(&agent), Some(256 << 20));
}
