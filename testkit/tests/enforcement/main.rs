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
mod ladder;
mod metrics;
mod observe;
mod own_process;
mod pressure;
mod rebalancing;
mod reload;
mod restart;

use nodedb_governor_testkit::harness::Agent;

/// Three engines of 64 MiB: the database most tests govern.
const ENGINES: &str = "[[engine]]\nname = \"vector\"\nbudget = \"64MiB\"\n\
     [[engine]]\nname = \"timeseries\"\nbudget = \"64MiB\"\n\
     [[engine]]\nname = \"query\"\nbudget = \"64MiB\"\n";

/// An agent on [`ENGINES`], with `extra` top-level settings.
fn start_agent(extra: &str) -> Agent {
    start_agent_with(extra, ENGINES)
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
