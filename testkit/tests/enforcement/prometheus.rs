//! A real Prometheus (Debian's `prometheus`) scraping an agent that
//! governs the demo database, with the project's rules loaded
//! (`deploy/prometheus`): every series the rules select returns data,
//! every recording rule yields series, every rule evaluates without
//! error, and every query of the Grafana dashboard (`deploy/grafana`)
//! returns data. Each panel's queries over the run are written to
//! `target/dashboard-panels.json`, which `cargo xtask panels` draws (it
//! runs this test longer first: `NODEDB_GOVERNOR_PANELS_SECS`).

use std::{collections::BTreeSet, process::Stdio, time::Duration};

use nodedb_governor_testkit::{
    harness::Reaped,
    privileged::{skip, skip_unless_privileged},
    wait::{poll, wait_for},
};
use serde_json::Value;

use super::metrics::http_get;

const RULES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/prometheus/nodedb-governor.rules.yml"
);
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/nodedb-governor.json"
);
const PANELS_OUT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../target/dashboard-panels.json"
);

/// A dashboard query as Prometheus takes it: every agent, Grafana's rate
/// interval as a minute.
fn resolve(expr: &str) -> String {
    expr.replace("$instance", ".*")
        .replace("$__rate_interval", "1m")
}

/// A dashboard panel: its title, unit and queries (each with its legend).
type Panel = (String, String, Vec<(String, String)>);

/// Each panel of the dashboard.
fn panels(dashboard: &Value) -> Vec<Panel> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| {
            let targets = p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .map(|t| {
                    (
                        t["expr"].as_str().expect("expr").to_owned(),
                        t["legendFormat"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            (
                p["title"].as_str().expect("title").to_owned(),
                p["fieldConfig"]["defaults"]["unit"]
                    .as_str()
                    .unwrap_or("short")
                    .to_owned(),
                targets,
            )
        })
        .collect()
}

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
        && skip(
            "the Prometheus test",
            format!("{e} (cargo xtask test installs prometheus)"),
        )
    {
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

    let started = std::time::SystemTime::now();
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

    // Every query of the dashboard returns data.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).expect("dashboard JSON");
    let panels = panels(&dashboard);
    let exprs: Vec<String> = panels
        .iter()
        .flat_map(|(_, _, t)| t.iter().map(|(e, _)| resolve(e)))
        .collect();
    let mut empty = Vec::new();
    let all = poll(Duration::from_secs(30), Duration::from_millis(500), || {
        empty = exprs
            .iter()
            .filter(|e| query(&web, e).is_empty())
            .cloned()
            .collect();
        empty.is_empty()
    });
    assert!(all, "dashboard queries without data: {empty:?}");

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
        "prometheus: {} series selectors and {} recording rules returned data; {evaluated} rules evaluated without error; {} dashboard queries in {} panels returned data",
        series.len(),
        recorded.len(),
        exprs.len(),
        panels.len()
    );

    // Each panel's queries over the run, for `cargo xtask panels`.
    let extra = std::env::var("NODEDB_GOVERNOR_PANELS_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_secs(extra));
    let since = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let (start, end) = (since(started), since(std::time::SystemTime::now()));
    let drawn: Vec<Value> = panels
        .iter()
        .map(|(title, unit, targets)| {
            let series: Vec<Value> = targets
                .iter()
                .flat_map(|(expr, legend)| {
                    let body = http_get(
                        &web,
                        &format!(
                            "/api/v1/query_range?query={}&start={start}&end={end}&step=1",
                            encode(&resolve(expr))
                        ),
                    );
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    v["data"]["result"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .map(move |r| serde_json::json!({"legend": legend, "metric": r["metric"], "values": r["values"]}))
                        .collect::<Vec<_>>()
                })
                .collect();
            serde_json::json!({"title": title, "unit": unit, "series": series})
        })
        .collect();
    std::fs::write(
        PANELS_OUT,
        serde_json::to_string(&serde_json::json!({"start": start, "end": end, "panels": drawn}))
            .unwrap(),
    )
    .unwrap();
    drop(demo);
}
