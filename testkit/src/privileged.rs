//! The rule every privileged test follows: run when the agent's
//! prerequisites (root's capabilities, BTF) are there; otherwise skip and
//! say why, except where skipping would hide a failure.

use nodedb_governor_agent::privilege;

/// Returns true (after printing `skipping <test>: <reason>`) when the
/// agent's prerequisites are missing and skipping is allowed; the test then
/// returns at once. Under CI (`CI=true`) or with
/// `NODEDB_GOVERNOR_REQUIRE_PRIVILEGED=1` (which `cargo xtask test` sets as
/// root) a missing prerequisite panics instead: those runs must never skip.
///
/// ```no_run
/// # fn a_privileged_test() {
/// if nodedb_governor_testkit::privileged::skip_unless_privileged("a_privileged_test") {
///     return;
/// }
/// # }
/// ```
pub fn skip_unless_privileged(test: &str) -> bool {
    match privilege::check_prerequisites() {
        Ok(()) => false,
        Err(e) => skip(test, e),
    }
}

/// `test` cannot run here, for `why` (a missing prerequisite: a
/// capability, a tool `cargo xtask test` installs): skips it (true, after
/// printing `skipping <test>: <why>`), or, under CI or with
/// `NODEDB_GOVERNOR_REQUIRE_PRIVILEGED=1`, panics, as
/// [`skip_unless_privileged`] does.
pub fn skip(test: &str, why: impl std::fmt::Display) -> bool {
    let required = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
        || std::env::var("NODEDB_GOVERNOR_REQUIRE_PRIVILEGED").is_ok_and(|v| v == "1");
    if required {
        panic!("{test} must run here (CI or root) but cannot: {why}");
    }
    eprintln!("skipping {test}: {why}");
    true
}
