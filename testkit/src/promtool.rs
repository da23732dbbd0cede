//! Prometheus's own linter on our `/metrics` text.

use std::{
    io::Write,
    process::{Command, Stdio},
};

/// What `promtool check metrics` says of `text` (empty: nothing). None
/// when there is no promtool here (`cargo xtask test` installs it); under
/// CI or as root with `NODEDB_GOVERNOR_REQUIRE_PRIVILEGED` its absence is
/// a failure, as a privileged test's missing prerequisite is.
pub fn check_metrics(text: &str) -> Option<String> {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            crate::privileged::skip(
                "promtool check metrics",
                format!("{e} (cargo xtask test installs promtool)"),
            );
            return None;
        }
    };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(text.as_bytes())
        .expect("writing to promtool");
    let out = child.wait_with_output().expect("promtool's output");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(if out.status.success() && said.trim().is_empty() {
        String::new()
    } else {
        format!("({}) {said}", out.status)
    })
}
