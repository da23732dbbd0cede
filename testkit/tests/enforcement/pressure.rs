//! The pressure inputs besides attribution, made real in the database's
//! cgroups: memory stalls (PSI) and an Emergency of the whole database.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use nodedb_governor_testkit::{
    harness::probes::JsonLines,
    privileged::skip_unless_privileged,
    wait::{poll, wait_for},
};

/// A shell script that joins `cgroups` and then runs `dd if=/dev/zero
/// <dd_args>`: the pages it writes are charged there.
fn dd_in(cgroups: &[String], dd_args: &str) -> String {
    format!(
        "for d in {}; do echo $$ > \"$d/cgroup.procs\" || exit 1; done; \
         exec dd if=/dev/zero {dd_args} status=none",
        cgroups.join(" ")
    )
}

/// The pressure inputs besides attribution: a PSI trigger on the
/// database's cgroup (its tasks stalled on memory) purges every engine and
/// spills engines from Warning on; an Emergency of the whole database (its
/// cgroup's working set at 97% of the ceiling) holds the non-essential
/// engine to what it holds while the essential one keeps its budget, until
/// use falls again. The pressure is real: a writer in the database's
/// cgroups streams 2.5 times the ceiling through the page cache, so the
/// kernel reclaims (and stalls) at the ceiling; that page cache is
/// reclaimable and is no Emergency. Then memory the kernel cannot drop
/// (tmpfs pages, without swap) fills the cgroup to the Emergency.
#[test]
fn memory_stalls_and_an_emergency_move_the_ladder() {
    if skip_unless_privileged("pressure inputs") {
        return;
    }
    const MIB: u64 = 1 << 20;
    // No lending (a lender keeps its whole budget beyond what it holds):
    // vector, growing at Warning, would otherwise borrow idle query's
    // budget and leave Warning.
    let agent = super::start_agent_with(
        "ceiling = \"160MiB\"\n[pressure_stall]\nstall_ms = 1\nwindow_ms = 2000\n\
         [lending]\ncushion = 1.0",
        "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
         [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\nessential = false\n",
    );
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_pressure-probe"),
        &["--vector-mib", "52", "--query-mib", "8"],
        Stdio::piped(),
    );
    let lines = JsonLines::of(&mut probe).collect();
    let last = || lines.last();
    let vector = |s: &serde_json::Value| s["clients"][0]["engines"]["vector"].clone();
    let query = |s: &serde_json::Value| s["clients"][0]["engines"]["query"].clone();
    wait_for("the probe to hold its memory", || {
        last()["held_bytes"].as_u64() >= Some(52 * MIB)
            && vector(&agent.status_json())["level"] == "warning"
    });
    let before = agent.status_json();
    assert_eq!(last()["query_granted"], true, "{}", last());
    assert_eq!(
        vector(&before)["spill_requests"],
        0,
        "Warning alone does not spill: {before}"
    );
    assert!(before["psi"]["source"].as_str().is_some(), "{before}");
    assert_eq!(before["emergency"], false);
    let purges_before = vector(&before)["purges"].as_u64().unwrap();

    // The writer joins the database's cgroups (v2 for PSI, the ceiling's
    // for the charge) and streams 2.5 times the ceiling to a file.
    let fill = agent.dir().path().join("fill.dat");
    let mut dirs = vec![format!("{}/shared", before["cgroup"].as_str().unwrap())];
    let ceiling_dir = before["ceiling"]["cgroup"].as_str().unwrap().to_owned();
    if !dirs.contains(&ceiling_dir) {
        dirs.push(ceiling_dir);
    }
    let script = dd_in(
        &dirs,
        &format!("of={} bs=1M count=400 conv=fsync", fill.display()),
    );
    let dd = Command::new("sh").arg("-c").arg(&script).status().unwrap();
    assert!(dd.success(), "{script}");

    let mut seen = serde_json::Value::Null;
    let fired = poll(Duration::from_secs(10), Duration::from_millis(20), || {
        seen = agent.status_json();
        seen["psi"]["triggers"].as_u64() >= Some(1)
            && vector(&seen)["spill_requests"].as_u64() >= Some(1)
    });
    assert!(
        fired,
        "the PSI trigger did not fire, or the ladder did not spill at Warning: psi {} vector {}",
        seen["psi"],
        vector(&seen)
    );
    let streamed = agent.status_json();
    assert_eq!(
        streamed["emergency"], false,
        "page cache the kernel can drop is no Emergency: {}",
        streamed["ceiling"]
    );

    // Memory the kernel cannot reclaim: tmpfs pages written from the
    // database's cgroups, 4 MiB at a time until the agent declares the
    // Emergency (97% of 160 MiB; each step stays under the ceiling).
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let shm = Removed(PathBuf::from(format!(
        "/dev/shm/nodedb-test-{}-{}",
        std::process::id(),
        agent.database
    )));
    let mut written = 0;
    while agent.status_json()["emergency"] != true {
        assert!(
            written < 160,
            "no Emergency after {written} MiB of tmpfs: {}",
            agent.status_json()["ceiling"]
        );
        let step = dd_in(
            &dirs,
            &format!(
                "of={} bs=1M count=4 oflag=append conv=notrunc",
                shm.0.display()
            ),
        );
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(&step)
                .status()
                .unwrap()
                .success()
        );
        written += 4;
        std::thread::sleep(Duration::from_millis(60));
    }
    eprintln!("emergency after {written} MiB of tmpfs");
    wait_for(
        "backpressure on query while vector keeps its budget",
        || {
            // Held to what it holds: its 8 MiB and at most the thread's
            // credit (two 1 MiB batches).
            let held = lines.any(|l| {
                l["query_granted"] == false
                    && (8 * MIB..=10 * MIB).contains(&l["query_cap_bytes"].as_u64().unwrap_or(0))
            });
            let s = agent.status_json();
            held && query(&s)["backpressure"] == true && vector(&s)["backpressure"] == false
        },
    );
    // Vector is not held, but the tmpfs leaves the database no room under
    // the Emergency mark of its ceiling, where reservations stop (`outside`):
    // its reservation is refused for room, not by backpressure.
    wait_for("no room for vector's reservation either", || {
        lines.any(|l| l["vector_granted"] == false)
    });
    let during = agent.status_json();
    eprintln!("psi: {} ceiling: {}", during["psi"], during["ceiling"]);
    // A reload during the Emergency (the same file) keeps the lowered
    // high mark: the kernel goes on reclaiming at the restore point.
    let lowered = during["ceiling"]["high_bytes"].as_u64().unwrap();
    assert!(
        lowered < during["ceiling"]["limit_bytes"].as_u64().unwrap() * 9 / 10,
        "the Emergency lowered the high mark: {}",
        during["ceiling"]
    );
    agent.signal(libc::SIGHUP);
    wait_for("the reload", || {
        agent.log().contains("configuration reloaded")
    });
    let reloaded = agent.status_json();
    assert_eq!(reloaded["emergency"], true, "{reloaded}");
    assert_eq!(
        reloaded["ceiling"]["high_bytes"].as_u64(),
        Some(lowered),
        "a reload undid the Emergency's high mark: {}",
        reloaded["ceiling"]
    );
    // As the kernel has it.
    let high_file = match reloaded["ceiling"]["backend"].as_str() {
        Some("cgroup-v1") => "memory.soft_limit_in_bytes",
        _ => "memory.high",
    };
    let in_kernel = std::fs::read_to_string(
        std::path::Path::new(reloaded["ceiling"]["cgroup"].as_str().unwrap()).join(high_file),
    )
    .unwrap();
    // (In whole pages.)
    assert_eq!(
        in_kernel.trim().parse::<u64>().ok().map(|b| b / 4096),
        Some(lowered / 4096),
        "{high_file}"
    );
    assert!(
        vector(&during)["purges"].as_u64() > Some(purges_before),
        "the stall purged the arenas: {during}"
    );
    assert!(
        query(&during)["purges"].as_u64() >= Some(1),
        "every engine, not only those at Warning: {during}"
    );
    assert!(
        last()["purges"].as_u64() >= Some(2),
        "the library ran the purges: {}",
        last()
    );

    // The pressure goes: the tmpfs file and the page cache go, use falls
    // under the warning threshold, the backpressure ends.
    drop(shm);
    std::fs::remove_file(&fill).unwrap();
    wait_for("the backpressure to end", || {
        let l = last();
        l["query_granted"] == true && l["query_cap_bytes"] == 64 * MIB
    });
    let after = agent.status_json();
    assert_eq!(after["emergency"], false, "{after}");
    assert_eq!(query(&after)["backpressure"], false, "{after}");
    assert!(
        query(&after)["limit_changes"].as_u64() >= Some(3),
        "welcome, hold, release: {after}"
    );
    assert!(
        after["ceiling"]["limit_changes"].as_u64() >= Some(2),
        "the high mark was lowered and restored: {after}"
    );
    let _ = probe.kill();
    let _ = probe.wait();
}
