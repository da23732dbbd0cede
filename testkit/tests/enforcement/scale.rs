//! The agent's own cost, on a small slice (`cargo xtask bench` measures
//! 10, 100 and 1,000 threads): governed processes whose engine threads map,
//! touch and unmap memory all along; every process is governed, every
//! thread placed and its faults attributed, and the agent's CPU and ticks
//! are measured.

use nodedb_governor_testkit::privileged::skip_unless_privileged;

#[test]
fn the_agent_governs_many_churning_threads_and_its_cost_is_measured() {
    if skip_unless_privileged("agent cost at scale") {
        return;
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agent-scale"))
        .args(["--threads", "60", "--max-processes", "3", "--seconds", "2"])
        .output()
        .expect("running agent-scale");
    assert!(
        out.status.success(),
        "agent-scale failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let row = &r["rows"][0];
    assert_eq!(row["threads"], 60, "{r}");
    assert_eq!(row["processes"], 3, "{r}");
    // 60 threads mapping and touching 64 pages every 50 ms, for the 2 s
    // measured and the second before it: the
    // engines' faults are attributed (well above what the processes' own
    // start-up takes).
    assert!(
        row["engine_page_faults"].as_u64() > Some(60 * 64 * 10),
        "{r}"
    );
    // About 50 ticks a second at the default 20 ms tick.
    assert!(row["ticks"].as_u64() >= Some(50), "{r}");
    let cpu = row["agent_cpu_percent"].as_f64().unwrap();
    // Ticking 50 times a second over three processes costs something.
    assert!(cpu > 0.0 && cpu < 200.0, "{r}");
    eprintln!(
        "agent cost, 60 threads in 3 processes: {cpu:.2}% of a CPU, mean tick {:.0} us",
        row["mean_tick_us"].as_f64().unwrap()
    );
}
