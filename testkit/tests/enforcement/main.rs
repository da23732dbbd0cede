//! The agent enforcing, end to end, as root: a process embedding the
//! library registers over the control socket; an engine driven over its
//! budget by memory it never reserved (only the kernel knows) is caught by
//! the attribution and spilled back under budget. The control socket
//! refuses uids not on the allow-list and answers malformed, truncated and
//! oversized frames with errors while a good client keeps working.
//! Unprivileged runs skip with the reason.
//!
//! One test binary, a module per area (cargo runs test binaries one after
//! another, the tests inside one in parallel); each test runs an agent of
//! its own.

mod ceiling;
mod control_socket;
mod delegation;
mod flood;
mod kernel;
mod ladder;
mod liveness;
mod metrics;
mod numa;
mod observe;
mod own_process;
mod page_cache;
mod placement;
mod pressure;
mod prometheus;
mod rebalancing;
mod reload;
mod restart;
mod scale;

use std::process::Stdio;

use nodedb_governor_testkit::harness::{Agent, Reaped};

/// The database most tests govern: vector, timeseries and query, 64 MiB
/// each. Those named in `no_lending` have floors of their whole budgets:
/// they lend nothing.
fn three_engines(no_lending: &[&str]) -> String {
    ["vector", "timeseries", "query"]
        .iter()
        .map(|name| {
            let floor = if no_lending.contains(name) {
                "floor = \"64MiB\"\n"
            } else {
                ""
            };
            format!("[[engine]]\nname = \"{name}\"\nbudget = \"64MiB\"\n{floor}")
        })
        .collect()
}

/// An agent on [`three_engines`], all lending, with `extra` top-level
/// settings.
fn start_agent(extra: &str) -> Agent {
    start_agent_with(extra, &three_engines(&[]))
}

/// An agent on `engines`, with `extra` top-level settings and a ceiling of
/// 1 GiB unless `extra` sets one.
fn start_agent_with(extra: &str, engines: &str) -> Agent {
    let ceiling = if extra.contains("ceiling") {
        ""
    } else {
        "ceiling = \"1GiB\""
    };
    Agent::start("nodedb-enforce", &format!("{ceiling}\n{extra}\n{engines}"))
}

/// A client of the query engine that reports `reserved_bytes` reserved (and
/// 3 refusals) and stays connected `hold_ms`, speaking raw frames.
fn reporting_client(agent: &Agent, reserved_bytes: u64, hold_ms: u64) -> Reaped {
    agent.spawn_probe(
        env!("CARGO_BIN_EXE_wire-probe"),
        &[
            "--engine",
            "query",
            "--report-reserved",
            &reserved_bytes.to_string(),
            "--hold-ms",
            &hold_ms.to_string(),
        ],
        Stdio::null(),
    )
}
