//! `[[engine]] cpus`: the agent keeps an engine's threads to its CPUs as it
//! places them, moves them when a reload changes the list, lets them run
//! anywhere when the list goes, and refuses a list naming a CPU that is
//! not online, leaving everything as it was.

use std::process::Stdio;

use nodedb_governor_agent::cpus::CpuList;
use nodedb_governor_testkit::{
    harness::{Agent, probes::JsonLines},
    privileged::skip_unless_privileged,
    wait::wait_for,
};

/// The CPUs thread `tid` of `pid` may run on, as the kernel shows them.
fn allowed(pid: u32, tid: u64) -> CpuList {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list in the thread's status");
    list.trim().parse().unwrap()
}

#[test]
fn an_engines_threads_are_kept_to_its_cpus_and_moved_on_reload() {
    if skip_unless_privileged("engine CPU placement") {
        return;
    }
    let online = CpuList::online().unwrap();
    let cpus: Vec<u32> = online.cpus().collect();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let engines = super::three_engines(&[]).replacen(
        "name = \"vector\"\nbudget = \"64MiB\"\n",
        &format!("name = \"vector\"\nbudget = \"64MiB\"\ncpus = \"{first}\"\n"),
        1,
    );
    let agent = super::start_agent_with("", &engines);
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "4", "--stay"],
        Stdio::piped(),
    );
    let pid = probe.id();
    let mut lines = JsonLines::of(&mut probe);
    let tid = lines.next_value()["engine_tid"]
        .as_u64()
        .expect("the engine thread's tid");
    let one = |c: u32| -> CpuList { c.to_string().parse().unwrap() };
    // Placed, and kept to its engine's CPU; the process's other threads
    // (not the engine's) are left where they were.
    assert_eq!(allowed(pid, tid), one(first));
    assert_eq!(allowed(pid, u64::from(pid)), online, "the main thread");
    let placement = |agent: &Agent| agent.status_json()["placement"]["vector"].clone();
    let p = placement(&agent);
    assert_eq!(p["cpus"], first.to_string(), "{p}");
    assert_eq!(p["threads_pinned"], 1, "{p}");
    assert_eq!(p["errors"], 0, "{p}");

    let config = agent.config_path();
    let original = std::fs::read_to_string(&config).unwrap();
    let with_cpus = |list: &str| {
        original.replacen(
            &format!("cpus = \"{first}\""),
            &format!("cpus = \"{list}\""),
            1,
        )
    };
    // A CPU that is not online: refused whole, the thread left alone.
    std::fs::write(&config, with_cpus("1000")).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("a refusal naming engine[0].cpus", || {
        let log = agent.log();
        log.contains("configuration refused") && log.contains("engine[0].cpus")
    });
    assert_eq!(allowed(pid, tid), one(first), "nothing of it applied");

    // Another CPU: the engine's thread follows at once.
    std::fs::write(&config, with_cpus(&last.to_string())).unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the thread moved to the new CPU", || {
        allowed(pid, tid) == one(last)
    });
    wait_for("the status showing the new CPU", || {
        placement(&agent)["cpus"].as_str() == Some(last.to_string().as_str())
    });

    // The list gone: the thread may run on any online CPU again.
    std::fs::write(
        &config,
        original.replacen(&format!("cpus = \"{first}\"\n"), "", 1),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the thread free to run anywhere", || {
        allowed(pid, tid) == online
    });
    let _ = probe.kill();
    let _ = probe.wait();
}
