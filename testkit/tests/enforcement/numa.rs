//! Per NUMA node: the status and `/metrics` show each node as sysfs does,
//! the database's memory on it (its cgroup's `memory.numa_stat`) and the
//! node's pressure against its share of the ceiling.

use std::process::Stdio;

use nodedb_governor_testkit::{
    harness::probes::JsonLines, numa, privileged::skip_unless_privileged,
};

const MIB: u64 = 1 << 20;

#[test]
fn the_status_shows_the_databases_memory_on_each_node() {
    if skip_unless_privileged("per-node figures") {
        return;
    }
    let agent = super::start_agent_with(
        "ceiling = \"256MiB\"\nmetrics_addr = \"127.0.0.1:0\"",
        "[[engine]]\nname = \"vector\"\nbudget = \"100%\"\n",
    );
    // 48 MiB touched by a placed engine thread: in the database's cgroup.
    let mut probe = agent.spawn_probe(
        env!("CARGO_BIN_EXE_hold-probe"),
        &["--mib", "48", "--stay"],
        Stdio::piped(),
    );
    let mut lines = JsonLines::of(&mut probe);
    assert!(
        lines.next_value()["engine_tid"].is_u64(),
        "placed and touched"
    );
    let status = agent.status_json();
    assert!(status["numa_error"].is_null(), "{}", status["numa_error"]);
    eprintln!("per node: {}", status["numa"]);
    let nodes = status["numa"].as_array().expect("per-node figures");
    let online = numa::online_nodes().unwrap();
    assert_eq!(
        nodes
            .iter()
            .map(|n| n["node"].as_u64().unwrap() as u32)
            .collect::<Vec<_>>(),
        online,
        "{nodes:?}"
    );
    let sum = |k: &str| nodes.iter().map(|n| n[k].as_u64().unwrap()).sum::<u64>();
    let anon = sum("database_anon_bytes");
    assert!(
        (44 * MIB..256 * MIB).contains(&anon),
        "the database's anonymous memory on the nodes: {anon} bytes, 48 MiB held: {nodes:?}"
    );
    // The ceiling split by the nodes' memory, to the byte (less rounding).
    let shares = sum("ceiling_share_bytes");
    assert!(shares <= 256 * MIB && shares + 8 >= 256 * MIB, "{nodes:?}");
    for n in nodes {
        assert_eq!(
            n["memory_total_bytes"].as_u64(),
            Some(numa::node_memory_bytes(n["node"].as_u64().unwrap() as u32).unwrap()),
            "{n}"
        );
        // 48 of 256 MiB: below every threshold, on every node.
        assert_eq!(n["level"], "normal", "{n}");
    }
    let text = super::metrics::http_get(status["metrics_addr"].as_str().unwrap(), "/metrics");
    let series = format!(
        "nodedb_governor_node_database_bytes{{kind=\"anon\",node=\"{}\"}}",
        online[0]
    );
    assert!(text.contains(&series), "no {series} in:\n{text}");
    assert!(
        text.contains("nodedb_governor_node_pressure_level{node="),
        "{text}"
    );
}
