//! Whether the agent is alive, as a service manager or Prometheus judges
//! it: `/healthz` and `nodedb_governor_agent_up` follow the owner's ticks,
//! not the HTTP task's; a serving task that dies takes the agent with it.

use std::{
    io::{Read, Write},
    time::Duration,
};

use nodedb_governor_testkit::{
    harness::agent::Agent, privileged::skip_unless_privileged, wait::poll,
};

/// `GET path` over plain HTTP/1.0: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (code, body.unwrap_or_default())
}

fn agent_up(addr: &str) -> Option<String> {
    let (_, text) = get(addr, "/metrics");
    text.lines()
        .find(|l| l.starts_with("nodedb_governor_agent_up "))
        .map(str::to_owned)
}

/// An owner that stops ticking (held on an await for 6 s, by a fault
/// point, as a bug would hold it) while the HTTP task runs on: the health
/// check answers 503 naming how long no tick has ended, `agent_up` is 0,
/// and both recover once it ticks again.
#[test]
fn a_stalled_owner_fails_the_health_check_until_it_ticks_again() {
    if skip_unless_privileged("agent liveness") {
        return;
    }
    // Some twenty ticks first: the agent starts, and its first snapshot
    // is published, before the stall.
    let agent = Agent::start_with_faults(
        "nodedb-alive",
        &format!(
            "ceiling = \"1GiB\"\nmetrics_addr = \"127.0.0.1:0\"\n{}",
            super::three_engines(&[])
        ),
        "owner-stall=20*off->1*return(6000)",
    );
    let addr = agent.status_json()["metrics_addr"]
        .as_str()
        .expect("the bound address")
        .to_owned();
    let mut last = (0, String::new());
    let stalled = poll(Duration::from_secs(15), Duration::from_millis(100), || {
        last = get(&addr, "/healthz");
        last.0 == 503
    });
    assert!(stalled, "the stall was never reported: {last:?}");
    assert!(
        last.1.starts_with("stalled: no tick has ended for "),
        "{last:?}"
    );
    assert_eq!(
        agent_up(&addr).as_deref(),
        Some("nodedb_governor_agent_up 0"),
        "while no tick ends"
    );
    let back = poll(Duration::from_secs(15), Duration::from_millis(100), || {
        last = get(&addr, "/healthz");
        last.0 == 200
    });
    assert!(back, "not live again after the stall: {last:?}");
    assert_eq!(last.1, "ok\n");
    assert_eq!(
        agent_up(&addr).as_deref(),
        Some("nodedb_governor_agent_up 1")
    );
}

/// A serving task that panics (the control socket's, at the connection it
/// accepts, by a fault point) stops the agent with a non-zero exit naming
/// it, so that the service manager starts it again; an agent that stayed
/// up without its control socket would govern no new library. The pins
/// and the registry stay for the next agent (a clean stop removes them).
#[test]
fn a_serving_task_that_panics_stops_the_agent_non_zero() {
    if skip_unless_privileged("agent liveness") {
        return;
    }
    let mut agent = Agent::start_with_faults(
        "nodedb-alive",
        &format!("ceiling = \"1GiB\"\n{}", super::three_engines(&[])),
        "control-accept=panic",
    );
    let _client = std::os::unix::net::UnixStream::connect(&agent.control).unwrap();
    let exit = agent.exit_within(Duration::from_secs(20));
    let log = agent.log();
    let exit = exit.unwrap_or_else(|| panic!("the agent outlived its control socket:\n{log}"));
    assert!(!exit.success(), "{exit:?}\n{log}");
    assert!(
        log.contains("the control socket's server task panicked"),
        "{log}"
    );
    // Not a stop: what the next agent carries on from stays.
    let pins = std::path::Path::new("/sys/fs/bpf/nodedb-governor").join(&agent.database);
    assert!(pins.join("STATS").exists(), "the pins were removed");
    assert!(
        agent
            .dir()
            .path()
            .join(format!("attribution-{}.json", agent.database))
            .exists(),
        "the registry was removed"
    );
}
