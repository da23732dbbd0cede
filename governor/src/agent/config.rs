//! The agent's TOML configuration. A bad file is refused whole, with the
//! field named; nothing of it is applied.

use std::{collections::BTreeSet, path::PathBuf};

use serde::Deserialize;

/// The configuration bundled with the agent (`deploy/nodedb-governor.toml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../deploy/nodedb-governor.toml");

/// How engine identity is established.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdentityMode {
    /// Cgroup identity where a cgroup v2 hierarchy is usable, else TIDs.
    #[default]
    Auto,
    Cgroup,
    Tid,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of the database: its domain cgroup is `<cgroup_root>/<database>`.
    pub database: String,
    #[serde(default)]
    pub identity: IdentityMode,
    /// The cgroup v2 directory under which the database's cgroup is made;
    /// found from the mount table when absent.
    #[serde(default)]
    pub cgroup_root: Option<PathBuf>,
    /// How often attribution is read, in milliseconds.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Runtime directory for the admin socket.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    #[serde(rename = "engine")]
    pub engines: Vec<EngineConfig>,
}

fn default_tick_ms() -> u64 {
    100
}

fn default_run_dir() -> PathBuf {
    super::paths::DEFAULT_RUN_DIR.into()
}

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn err(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Config {
    /// Parses and validates a configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // serde names the field in its message ("unknown field `x`",
            // "missing field `y`"); the span adds where, when it is narrower
            // than the whole document.
            let field = e
                .span()
                .filter(|s| s.start > 0 || s.end < text.len())
                .map(|s| {
                    let line = text[..s.start].matches('\n').count() + 1;
                    let source = text.lines().nth(line - 1).unwrap_or_default().trim();
                    format!("line {line} (`{source}`)")
                })
                .unwrap_or_else(|| "document".into());
            err(field, e.message().to_owned())
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !valid_name(&self.database) {
            return Err(err(
                "database",
                format!("{:?} must be 1-64 of a-z, 0-9, '-', '_'", self.database),
            ));
        }
        if !(10..=60_000).contains(&self.tick_ms) {
            return Err(err(
                "tick_ms",
                format!("{} is outside 10..=60000", self.tick_ms),
            ));
        }
        if self.engines.is_empty() {
            return Err(err("engine", "at least one [[engine]] is required"));
        }
        let mut seen = BTreeSet::new();
        for (i, e) in self.engines.iter().enumerate() {
            if !valid_name(&e.name) {
                return Err(err(
                    format!("engine[{i}].name"),
                    format!("{:?} must be 1-64 of a-z, 0-9, '-', '_'", e.name),
                ));
            }
            if !seen.insert(&e.name) {
                return Err(err(
                    format!("engine[{i}].name"),
                    format!("duplicate engine {:?}", e.name),
                ));
            }
        }
        if let Some(root) = &self.cgroup_root
            && !root.is_absolute()
        {
            return Err(err(
                "cgroup_root",
                format!("{} is not an absolute path", root.display()),
            ));
        }
        if !self.run_dir.is_absolute() {
            return Err(err(
                "run_dir",
                format!("{} is not an absolute path", self.run_dir.display()),
            ));
        }
        Ok(())
    }

    pub fn engine_names(&self) -> Vec<String> {
        self.engines.iter().map(|e| e.name.clone()).collect()
    }

    pub fn socket_path(&self) -> PathBuf {
        self.run_dir.join(super::paths::ADMIN_SOCKET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_default_is_valid() {
        let c = Config::parse(DEFAULT_CONFIG).expect("default config");
        assert_eq!(c.engine_names(), ["vector", "timeseries", "query"]);
        assert_eq!(c.tick_ms, 100);
    }

    #[test]
    fn each_bad_config_names_its_field() {
        let ok = "database = \"db\"\n[[engine]]\nname = \"a\"\n";
        Config::parse(ok).expect("minimal config");
        let cases: &[(&str, &str)] = &[
            ("database = \"DB!\"\n[[engine]]\nname = \"a\"\n", "database"),
            (
                "database = \"db\"\ntick_ms = 1\n[[engine]]\nname = \"a\"\n",
                "tick_ms",
            ),
            ("database = \"db\"\nengine = []\n", "engine"),
            (
                "database = \"db\"\n[[engine]]\nname = \"a\"\n[[engine]]\nname = \"a\"\n",
                "engine[1].name",
            ),
            (
                "database = \"db\"\n[[engine]]\nname = \"\"\n",
                "engine[0].name",
            ),
            (
                "database = \"db\"\ncgroup_root = \"rel\"\n[[engine]]\nname = \"a\"\n",
                "cgroup_root",
            ),
            (
                "database = \"db\"\nrun_dir = \"rel\"\n[[engine]]\nname = \"a\"\n",
                "run_dir",
            ),
            (
                "database = \"db\"\nidentity = \"magic\"\n[[engine]]\nname = \"a\"\n",
                "magic",
            ),
            (
                "database = \"db\"\nbogus = 1\n[[engine]]\nname = \"a\"\n",
                "`bogus`",
            ),
            (
                "database = \"db\"\ntick_ms = \"fast\"\n[[engine]]\nname = \"a\"\n",
                "line 2 (`tick_ms",
            ),
            ("[[engine]]\nname = \"a\"\n", "database"),
        ];
        for (text, field) in cases {
            let e = Config::parse(text).expect_err(text);
            let msg = e.to_string();
            assert!(msg.contains(field), "{text:?}: {msg:?} should name {field}");
        }
    }
}
