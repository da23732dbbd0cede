//! `[[engine]] cpus`: the agent keeps an engine's threads to its CPUs as it
//! places them, moves them when a reload changes the list, lets them run
//! anywhere when the list goes, and refuses a list naming a CPU that is
//! not online, leaving everything as it was. `[cpuset]`: the whole
//! database is kept to its CPUs and memory nodes by the kernel's cpuset
//! controller (v2, or the v1 hierarchy), changed and dropped on reload.

use std::process::Stdio;

use nodedb_governor_agent::cpus::CpuList;
use nodedb_governor_testkit::{
    harness::{Agent, probes::JsonLines},
    privileged::skip_unless_privileged,
    wait::wait_for,
};

/// A list thread `tid` of `pid` is allowed, as the kernel shows it
/// (`Cpus_allowed_list`, `Mems_allowed_list`).
fn allowed_list(pid: u32, tid: u64, field: &str) -> CpuList {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("{field} in the thread's status"));
    list.trim().parse().unwrap()
}

/// The three engines with vector kept to CPU `cpu`.
fn vector_on(cpu: u32) -> String {
    super::three_engines(&[]).replacen(
        "name = \"vector\"\nbudget = \"64MiB\"\n",
        &format!("name = \"vector\"\nbudget = \"64MiB\"\ncpus = \"{cpu}\"\n"),
        1,
    )
}

/// A hold-probe of the vector engine against `agent`: the probe, its
/// output (kept open: the probe prints on), its pid and its engine
/// thread's tid.
fn vector_probe(
    agent: &Agent,
) -> (
    nodedb_governor_testkit::harness::Reaped,
    JsonLines,
    u32,
    u64,
) {
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
    (probe, lines, pid, tid)
}

/// The CPUs thread `tid` of `pid` may run on.
fn allowed(pid: u32, tid: u64) -> CpuList {
    allowed_list(pid, tid, "Cpus_allowed_list")
}

#[test]
fn an_engines_threads_are_kept_to_its_cpus_and_moved_on_reload() {
    if skip_unless_privileged("engine CPU placement") {
        return;
    }
    let online = CpuList::online().unwrap();
    let cpus: Vec<u32> = online.cpus().collect();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let agent = super::start_agent_with("", &vector_on(first));
    let (mut probe, _lines, pid, tid) = vector_probe(&agent);
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

#[test]
fn the_database_is_kept_to_its_cpuset_changed_and_let_go_on_reload() {
    if skip_unless_privileged("the database's cpuset") {
        return;
    }
    let online = CpuList::online().unwrap();
    let cpus: Vec<u32> = online.cpus().collect();
    let (first, last) = (cpus[0], *cpus.last().unwrap());
    let node = nodedb_governor::Topology::detect().unwrap().nodes()[0].id;
    let list = |c: &[u32]| -> CpuList {
        c.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
            .parse()
            .unwrap()
    };
    // The database on its first and last CPUs, node 0's memory; the
    // vector engine on the first CPU alone.
    let pair = list(&[first, last]);
    let agent = super::start_agent_with(
        &format!("[cpuset]\ncpus = \"{pair}\"\nmems = \"{node}\"\n"),
        &vector_on(first),
    );
    let status = agent.status_json();
    let cs = &status["cpuset"];
    assert_eq!(cs["effective_cpus"], pair.to_string(), "{status:#}");
    assert_eq!(cs["effective_mems"], node.to_string(), "{status:#}");
    assert!(status["cpuset_error"].is_null(), "{status:#}");
    let (mut probe, _lines, pid, tid) = vector_probe(&agent);
    let main = u64::from(pid);
    // The whole process is in the cpuset: its main thread (no engine's)
    // runs on the database's CPUs and allocates on its node; the engine's
    // thread is kept to its own CPU inside them.
    wait_for("the process kept to the database's cpuset", || {
        allowed(pid, main) == pair
    });
    assert_eq!(allowed_list(pid, main, "Mems_allowed_list"), list(&[node]));
    assert_eq!(allowed(pid, tid), list(&[first]));

    let config = agent.config_path();
    let original = std::fs::read_to_string(&config).unwrap();
    // The database narrowed to a CPU the vector engine is not kept to:
    // refused whole (the engine's CPU would lie outside), nothing applied.
    if first != last {
        std::fs::write(
            &config,
            original.replacen(
                &format!("cpus = \"{pair}\""),
                &format!("cpus = \"{last}\""),
                1,
            ),
        )
        .unwrap();
        agent.signal(libc::SIGHUP);
        wait_for(
            "a refusal naming the engine's CPUs outside the cpuset",
            || {
                let log = agent.log();
                log.contains("configuration refused")
                    && log.contains("outside the database's cpuset.cpus")
            },
        );
        assert_eq!(allowed(pid, main), pair, "nothing of it applied");
    }
    // The database's CPUs narrowed to the first: the process follows, and
    // the engine's thread keeps its CPU.
    std::fs::write(
        &config,
        original.replacen(
            &format!("cpus = \"{pair}\""),
            &format!("cpus = \"{first}\""),
            1,
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the process on the narrowed cpuset", || {
        allowed(pid, main) == list(&[first])
    });
    assert_eq!(allowed(pid, tid), list(&[first]));
    wait_for("the status showing the narrowed cpuset", || {
        agent.status_json()["cpuset"]["effective_cpus"].as_str() == Some(first.to_string().as_str())
    });
    // The section gone: the database runs where its parent lets it again,
    // and the engine stays on its CPU.
    std::fs::write(
        &config,
        original.replacen(
            &format!("[cpuset]\ncpus = \"{pair}\"\nmems = \"{node}\"\n"),
            "",
            1,
        ),
    )
    .unwrap();
    agent.signal(libc::SIGHUP);
    wait_for("the process free of the cpuset", || {
        allowed(pid, main) == online
    });
    // Kernels before 6.2 reset the engine's thread to the widened set with
    // the rest of the process; the agent keeps it to its CPU again right
    // after the write (kernels since keep the affinity it asked for).
    wait_for("the engine's thread kept to its CPU", || {
        allowed(pid, tid) == list(&[first])
    });
    let _ = probe.kill();
    let _ = probe.wait();
}
