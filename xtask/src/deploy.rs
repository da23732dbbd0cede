//! `cargo xtask test`'s checks of `deploy/`:
//!
//! - the Prometheus rules: `promtool check rules` (they parse, their
//!   expressions are valid PromQL) and `promtool test rules` (each alert
//!   once firing and once silent, on series written in the test file);
//! - the systemd unit: `systemd-analyze verify` (with its `ExecStart`
//!   pointed at the agent just built, which the unit's path names once
//!   installed) and `systemd-analyze security`, whose exposure score is
//!   printed and may not rise above [`MAX_EXPOSURE`].

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::cmd;

/// The unit's exposure as `systemd-analyze security` scores it (0 safest,
/// 10 least): 3.8 with the hardening in place, 8.2 before; a change that
/// loosens it past this fails.
const MAX_EXPOSURE: f64 = 4.0;

/// Where the unit expects the agent once installed.
const INSTALLED_AGENT: &str = "/usr/local/bin/nodedb-governor";

/// Builds the agent (debug) and checks `deploy/` against it.
pub fn check_built() -> anyhow::Result<()> {
    cmd::step("building the agent (the unit's ExecStart)");
    let [agent] = crate::cargo::build(
        crate::cargo::Profile::Debug,
        &[crate::cargo::Binaries::new(
            "nodedb-governor-agent",
            &["nodedb-governor"],
        )],
    )?
    .try_into()
    .expect("one binary asked for, one path");
    cmd::step("deploy/: the Prometheus rules (promtool) and the systemd unit (systemd-analyze)");
    check(&agent)
}

pub fn check(agent: &Path) -> anyhow::Result<()> {
    crate::setup::deploy_tools()?;
    let root = crate::root();
    let prometheus = root.join("deploy/prometheus");
    cmd::run(Command::new("promtool").current_dir(&prometheus).args([
        "check",
        "rules",
        "nodedb-governor.rules.yml",
    ]))?;
    cmd::run(Command::new("promtool").current_dir(&prometheus).args([
        "test",
        "rules",
        "nodedb-governor.rules.test.yml",
    ]))?;
    let unit = unit_for(&root.join("deploy/systemd/nodedb-governor.service"), agent)?;
    let checked = check_unit(&unit);
    if let Some(dir) = unit.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
    checked
}

fn check_unit(unit: &Path) -> anyhow::Result<()> {
    cmd::run(Command::new("systemd-analyze").arg("verify").arg(unit))?;
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit)
        .output()
        .context("running systemd-analyze security")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let exposure = exposure(&text).with_context(|| {
        format!(
            "no exposure level in systemd-analyze security's output: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    eprintln!("    systemd-analyze security: exposure {exposure:.1} (at most {MAX_EXPOSURE})");
    if exposure > MAX_EXPOSURE {
        bail!(
            "the systemd unit's exposure is {exposure:.1}, above {MAX_EXPOSURE}: a hardening setting was loosened (see `systemd-analyze security --offline=true deploy/systemd/nodedb-governor.service`)"
        );
    }
    Ok(())
}

/// A copy of the unit at `unit` whose `ExecStart` runs `agent`, in a
/// directory of its own (verify reads the unit by its file name).
fn unit_for(unit: &Path, agent: &Path) -> anyhow::Result<PathBuf> {
    let text =
        std::fs::read_to_string(unit).with_context(|| format!("reading {}", unit.display()))?;
    if !text.contains(INSTALLED_AGENT) {
        bail!("{} no longer runs {INSTALLED_AGENT}", unit.display());
    }
    let dir = std::env::temp_dir().join(format!("nodedb-governor-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join(unit.file_name().context("the unit's file name")?);
    std::fs::write(
        &copy,
        text.replace(INSTALLED_AGENT, &agent.display().to_string()),
    )?;
    Ok(copy)
}

/// The score in "→ Overall exposure level for x.service: 3.8 OK".
fn exposure(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposure_is_read_from_the_summary_line() {
        let out = "✗ UMask= ...   0.1\n\n→ Overall exposure level for nodedb-governor.service: 3.8 OK 🙂\n";
        assert_eq!(exposure(out), Some(3.8));
        assert_eq!(exposure("nothing here"), None);
    }
}
