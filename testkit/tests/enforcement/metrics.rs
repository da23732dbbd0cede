//! Metrics over HTTP: the health check, a library's books and the
//! agent's own series on `/metrics`, and the programs' run counts moving.

use std::{
    io::{Read, Write},
    process::Command,
    time::Duration,
};

use nodedb_governor_testkit::{privileged::skip_unless_privileged, wait::poll};

/// `GET path` over plain HTTP/1.0; the body.
pub(super) fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[test]
fn metrics_are_served_over_http() {
    if skip_unless_privileged("metrics endpoint") {
        return;
    }
    let agent = super::start_agent("metrics_addr = \"127.0.0.1:0\"");
    let status = agent.status_json();
    let addr = status["metrics_addr"]
        .as_str()
        .expect("the bound address")
        .to_owned();
    assert_eq!(http_get(&addr, "/healthz"), "ok\n");

    // A library that reports its books and stays a while.
    let mut client = super::reporting_client(&agent, 12345, 5000);
    let pid = client.id();
    let want = format!(
        "nodedb_governor_agent_engine_reserved_bytes{{engine=\"query\",pid=\"{pid}\"}} 12345"
    );
    let mut text = String::new();
    let served = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        text = http_get(&addr, "/metrics");
        text.contains(&want)
    });
    assert!(served, "no {want} in:\n{text}");
    let _ = client.kill();
    let _ = client.wait();
    // The programs run on every page fault: their counts are there and
    // move (read again at most once a second: the status's slow parts).
    let runs = |text: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("nodedb_governor_bpf_program_runs_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let first = runs(&text);
    assert!(first > 0, "no program runs in:\n{text}");
    let _ = Command::new("true").status();
    let moved = poll(Duration::from_secs(3), Duration::from_millis(100), || {
        runs(&http_get(&addr, "/metrics")) > first
    });
    assert!(moved, "the run counts move");
    // How near each program came to the verifier's limit: a figure for
    // every program the kernel counted, under the limit.
    let verified: Vec<(&str, u64)> = text
        .lines()
        .filter(|l| l.starts_with("nodedb_governor_bpf_program_verified_instructions{"))
        .filter_map(|l| {
            let name = l.split('"').nth(1)?;
            Some((name, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    assert!(
        verified.iter().any(|(p, _)| *p == "sys_enter_munmap"),
        "no verified instruction count for sys_enter_munmap in:\n{text}"
    );
    assert!(
        verified.iter().all(|(_, n)| (1..1_000_000).contains(n)),
        "{verified:?}"
    );
    for series in [
        format!("nodedb_governor_agent_engine_refusals_total{{engine=\"query\",pid=\"{pid}\"}} 3"),
        format!(
            "nodedb_governor_agent_engine_budget_bytes{{engine=\"query\",pid=\"{pid}\"}} 67108864"
        ),
        format!("nodedb_governor_agent_engine_resident_bytes{{engine=\"query\",pid=\"{pid}\"}}"),
        format!("nodedb_governor_agent_process_vm_rss_bytes{{pid=\"{pid}\"}}"),
        "nodedb_governor_cgroup_memory_max_bytes{backend=".into(),
        "nodedb_governor_agent_up 1".into(),
        "nodedb_governor_agent_clients 1".into(),
        "nodedb_governor_agent_ticks_total".into(),
        format!(
            "nodedb_governor_agent_engine_limit_changes_total{{engine=\"query\",pid=\"{pid}\"}} 1"
        ),
        "nodedb_governor_emergency 0".into(),
        "nodedb_governor_psi_triggers_total".into(),
        "nodedb_governor_psi_memory_stall_seconds_total{kind=\"some\"}".into(),
    ] {
        assert!(text.contains(&series), "no {series} in:\n{text}");
    }
    // What Prometheus's own linter says of it: nothing.
    if let Some(complaints) = nodedb_governor_testkit::promtool::check_metrics(&text) {
        assert!(
            complaints.is_empty(),
            "promtool check metrics:\n{complaints}"
        );
    }
}
