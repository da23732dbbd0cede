//! Fault points, for the tests that need the agent to fail as it would in
//! the field: an owner that stops ticking, a serving task that panics.
//! They are `fail`'s points: compiled in only with the `failpoints`
//! feature (`cargo build -p nodedb-governor-agent` leaves them out; a
//! build of the whole workspace has them, as the testkit asks for them)
//! and configured at start by the `FAILPOINTS` environment variable
//! (`name=action;...`, see `fail::cfg`), which only the service manager
//! sets. Without the feature, each is a constant the compiler removes.

use std::time::Duration;

/// Sets the points up from `FAILPOINTS`; kept for the life of the agent.
#[cfg(feature = "failpoints")]
pub fn setup() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}

/// How long the owner waits before its next tick, as an owner stuck on
/// an await would (`owner-stall=return(MS)`): it answers nothing and
/// ticks not, while the tasks that serve `/healthz` and `status` run on.
pub fn owner_stall() -> Option<Duration> {
    fail::fail_point!("owner-stall", |ms| {
        ms.and_then(|ms| ms.parse().ok()).map(Duration::from_millis)
    });
    None
}

/// A serving task's accept loop, at each connection it accepts
/// (`admin-accept=panic`, `control-accept=panic`): a bug there ends the
/// task, which the agent must not outlive.
pub fn accepted(point: &'static str) {
    let _ = point;
    fail::fail_point!(point);
}

/// A kernel write that fails (`reload-after-ceiling=return`): the error
/// to report instead of going on, as a write the kernel refused would.
pub fn failing(point: &'static str) -> Option<std::io::Error> {
    let _ = point;
    fail::fail_point!(point, |_| Some(std::io::Error::other(format!(
        "{point}: refused by a fault point"
    ))));
    None
}
