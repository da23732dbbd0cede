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
    // 100 MiB/s churned by the threads together (every page of it a
    // fault), for the 2 s measured and the second before it: the engines'
    // faults are attributed (half of it is well above what the processes'
    // own start-up takes).
    let churned_pages = 100 * 256 * 2;
    assert!(
        row["engine_page_faults"].as_u64() > Some(churned_pages / 2),
        "{r}"
    );
    // Engines idle under their budgets: the calm tick (250 ms), about 4
    // a second.
    assert_eq!(row["tick_period_ms"], 250, "{r}");
    assert!(row["ticks"].as_u64() >= Some(6), "{r}");
    let cpu = row["agent_cpu_percent"].as_f64().unwrap();
    // An agent that does not spin (its figures at scale come from
    // `cargo xtask bench`; two seconds of CPU ticks are too coarse here).
    assert!((0.0..20.0).contains(&cpu), "{r}");
    eprintln!(
        "agent cost, 60 threads in 3 processes: {cpu:.2}% of a CPU, mean tick {:.0} us",
        row["mean_tick_us"].as_f64().unwrap()
    );
}
