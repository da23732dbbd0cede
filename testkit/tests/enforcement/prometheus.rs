//! A real Prometheus (Debian's `prometheus`) scraping an agent that
//! governs the demo database, with the project's rules loaded
//! (`deploy/prometheus`): every series the rules select returns data,
//! every recording rule yields series, and every rule evaluates without
//! error.

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use nodedb_governor_testkit::{
    harness::Reaped,
    privileged::skip_unless_privileged,
    wait::{poll, wait_for},
};
use serde_json::Value;

use super::metrics::http_get;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/prometheus/nodedb-governor.rules.yml"
);

/// Percent-encodes `s` for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The instant query's result vector.
fn query(web: &str, promql: &str) -> Vec<Value> {
    let body = http_get(web, &format!("/api/v1/query?query={}", encode(promql)));
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(v["status"], "success", "{promql}: {body}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

/// The series selectors in the rules' expressions (`name` or
/// `name{matchers}`), and the recording rules' names.
fn selectors(rules: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let text: String = rules
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let selector =
        regex::Regex::new(r"\b(nodedb_governor_[a-z0-9_]+|up)(\{[^}]*\})?").expect("regex");
    let record = regex::Regex::new(r"record:\s*(\S+)").expect("regex");
    let mut series = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("summary:")
            || line.trim_start().starts_with("description:")
        {
            continue;
        }
        for c in selector.captures_iter(line) {
            // `up` alone is a word of prose; as a selector it has matchers.
            if &c[1] == "up" && c.get(2).is_none() {
                continue;
            }
            series.insert(c[0].to_owned());
        }
    }
    let recorded = record
        .captures_iter(&text)
        .map(|c| c[1].to_owned())
        .collect();
    (series, recorded)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn prometheus_scrapes_the_agent_and_every_rule_has_data() {
    if skip_unless_privileged("a real Prometheus against the agent") {
        return;
    }
    if let Err(e) = std::process::Command::new("prometheus")
        .arg("--version")
        .output()
    {
        let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
            || std::env::var("NODEDB_GOVERNOR_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
        assert!(!required, "prometheus must run here but cannot: {e}");
        eprintln!("skipping the Prometheus test: {e} (cargo xtask test installs it)");
        return;
    }
    let agent = super::start_agent("metrics_addr = \"127.0.0.1:0\"");
    let metrics = agent.status_json()["metrics_addr"]
        .as_str()
        .expect("the bound address")
        .to_owned();
    let demo = agent.spawn_probe(
        env!("CARGO_BIN_EXE_demo-probe"),
        &["--scale", "1"],
        Stdio::null(),
    );
    let pid = demo.id() as u64;
    wait_for("the demo's engines to hold memory", || {
        agent.status_json()["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["pid"].as_u64() == Some(pid))
            .any(|p| {
                ["vector", "timeseries", "query"]
                    .iter()
                    .all(|e| p["engines"][e]["resident_bytes"].as_u64() > Some(0))
            })
    });

    let dir = agent.dir();
    let web = format!("127.0.0.1:{}", free_port());
    let config = dir.write(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: nodedb-governor\n    static_configs:\n      - targets: [\"{metrics}\"]\n"
        ),
    );
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let _prometheus = Reaped(
        std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting prometheus"),
    );
    let prometheus_log =
        || std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default();
    let up = poll(Duration::from_secs(30), Duration::from_millis(250), || {
        std::net::TcpStream::connect(&web).is_ok()
            && query(&web, "up{job=\"nodedb-governor\"}")
                .first()
                .is_some_and(|s| s["value"][1] == "1")
    });
    assert!(
        up,
        "Prometheus never scraped the agent:\n{}",
        prometheus_log()
    );

    let (series, recorded) = selectors(&std::fs::read_to_string(RULES).unwrap());
    assert!(
        series.len() >= 10 && recorded.len() >= 5,
        "{series:?} {recorded:?}"
    );
    // Rates want two samples; the recording rules a few evaluations.
    let mut missing = Vec::new();
    let all = poll(Duration::from_secs(30), Duration::from_millis(500), || {
        missing = series
            .iter()
            .chain(&recorded)
            .filter(|s| query(&web, s).is_empty())
            .cloned()
            .collect();
        missing.is_empty()
    });
    assert!(all, "no data for {missing:?}:\n{}", prometheus_log());
    // The demo's engines are there by name, with a budget in force.
    let ratio = query(
        &web,
        &format!("nodedb_governor:engine_budget_used:ratio{{pid=\"{pid}\"}}"),
    );
    let engines: BTreeSet<&str> = ratio
        .iter()
        .filter_map(|s| s["metric"]["engine"].as_str())
        .collect();
    assert_eq!(engines, BTreeSet::from(["query", "timeseries", "vector"]));

    // Every rule evaluated, none with an error.
    let rules: Value = serde_json::from_str(&http_get(&web, "/api/v1/rules")).unwrap();
    let mut evaluated = 0;
    for group in rules["data"]["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert_eq!(rule["health"], "ok", "{rule}");
            evaluated += 1;
        }
    }
    assert_eq!(evaluated, 12, "{rules}");
    eprintln!(
        "prometheus: {} series selectors and {} recording rules returned data; {evaluated} rules evaluated without error",
        series.len(),
        recorded.len()
    );
    drop(demo);
}
